"""The engine as a server drives it: its loop in a background thread, requests added and cancelled from other threads
and from asyncio, consumers that only wait, an idle loop that sleeps, and a failing step that fails only its own
requests. On a tiny random model (torch backend, CPU), greedy outputs checked against the single-sequence oracle."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import greedy_alone
from tiny_gguf import StubTokenizer, write_tiny_llama

from realm.runtime import Backend, Engine, EngineConfig, FinishReason, Model, SamplingParams, load_weights

DIMS = dict(hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn=96, vocab=80)
PROMPTS = [[3, 17, 42, 8, 8, 0, 49, 21, 5, 30, 11], [60, 70], [1, 2, 3, 4, 5, 6, 7, 8, 9], [50], [7, 7, 7, 7, 7, 7],
           [3, 17, 42, 8, 8, 0, 49, 21, 5, 30, 12, 13, 14]]  # the last shares a prefix with the first


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_llama(path, dims=DIMS, formats={"attn_q": "Q8_0", "ffn_down": "Q8_0"}, context_length=64)
    return Model(load_weights(path), StubTokenizer(DIMS["vocab"]), Backend.TORCH, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def alone(tiny):
    """Each prompt's greedy continuation (up to 12 tokens), by the single-sequence oracle."""
    return [greedy_alone(tiny, p, 12) for p in PROMPTS]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def small_engine(model, **config) -> Engine:
    """Few blocks of 4 tokens: concurrent requests preempt each other, prefixes are shared."""
    return Engine(model, EngineConfig(**{"max_batch_tokens": 8, "kv_blocks": 14, "block_size": 4, **config}))


def check_ended(engine: Engine, requests) -> None:
    """Every request ended once, with its events ending the stream; every block back."""
    for r in requests:
        assert r.finished and r.completion.finish_reason in (FinishReason.LENGTH, FinishReason.ABORT)
        assert r.events.ended and r.events.snapshot() == []  # the consumer took everything, the end included
    assert engine.requests == {} and not engine.has_work
    engine.blocks.check([])
    assert engine.blocks.num_used == 0


# ---------------------------------------------------------------------------------------- threads, hypothesis


Action = st.tuples(st.integers(0, len(PROMPTS) - 1), st.integers(1, 12), st.sampled_from(["keep", "now", "after"]),
                   st.integers(1, 4))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(st.lists(st.lists(Action, min_size=1, max_size=4), min_size=2, max_size=4), st.integers(0, 2**31))
def test_threads_add_and_cancel_while_the_loop_runs(tiny, alone, plan, seed):
    """Several client threads each add requests, some cancelled at once, some after a few of their events, some left
    to finish, each consumed by its own thread while the loop steps: no leak, every request ends exactly once,
    finished ones equal their solo greedy runs, cancelled ones are a prefix of it."""
    engine = small_engine(tiny)
    done: list[tuple] = []  # (request, prompt index, max_tokens, cancelled)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(actions, rng):
        try:
            for prompt, n, cancel, after in actions:
                r = engine.add_request(PROMPTS[prompt], greedy(n))
                if cancel == "now":
                    engine.cancel(r.request_id if rng.random() < 0.5 else r)
                events = []
                for event in engine.stream(r):
                    events.append(event)
                    if cancel == "after" and len(events) == after:
                        engine.cancel(r)
                assert [e.token_id for e in events] == r.completion.token_ids  # the stream spells the completion
                with lock:
                    done.append((r, prompt, n, cancel != "keep"))
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    with engine:
        threads = [threading.Thread(target=client, args=(actions, random.Random(seed + i)))
                   for i, actions in enumerate(plan)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a client thread hangs"
    assert not errors, errors
    assert len(done) == sum(len(a) for a in plan)
    for r, prompt, n, cancelled in done:
        expected = alone[prompt][:n]
        if r.completion.finish_reason is FinishReason.LENGTH:
            assert r.completion.token_ids == expected
        else:
            assert cancelled and r.completion.token_ids == expected[: len(r.completion.token_ids)]
    check_ended(engine, [r for r, *_ in done])


# ------------------------------------------------------------------------------------------------- asyncio


def test_async_consumers_do_not_step_the_engine(tiny, alone):
    engine = small_engine(tiny, kv_blocks=40)

    async def consume(i: int) -> list[int]:
        r = engine.add_request(PROMPTS[i], greedy(10))
        return [e.token_id async for e in engine.astream(r)]

    async def main():
        return await asyncio.gather(*(consume(i) for i in range(len(PROMPTS))))

    stepper = threading.current_thread()
    stepped_here = []
    original = engine._step
    engine._step = lambda: (stepped_here.append(threading.current_thread() is stepper), original())[1]
    with engine:
        results = asyncio.run(main())
    assert results == [a[:10] for a in alone]
    assert stepped_here and not any(stepped_here)  # the loop thread stepped, never the consumers' thread


def test_an_async_consumer_cancels_from_its_task(tiny, alone):
    async def main():
        with small_engine(tiny) as engine:
            r = engine.add_request(PROMPTS[0], greedy(12))
            seen = []
            async for event in engine.astream(r):
                seen.append(event.token_id)
                if len(seen) == 3:
                    engine.cancel(r)
            return engine, r, seen

    engine, r, seen = asyncio.run(main())
    assert r.completion.finish_reason is FinishReason.ABORT and seen == r.completion.token_ids
    assert seen[:3] == alone[0][:3] and len(seen) < 12
    check_ended(engine, [r])


# ------------------------------------------------------------------------------------------------ the loop


def test_the_idle_loop_sleeps_and_wakes_on_a_request(tiny, alone):
    engine = small_engine(tiny).start()
    try:
        steps = []
        original = engine._step
        engine._step = lambda: (steps.append(1), original())[1]
        clock = time.pthread_getcpuclockid(engine._thread.ident)
        cpu = time.clock_gettime(clock)
        time.sleep(0.5)
        assert time.clock_gettime(clock) - cpu < 0.05, "the idle loop burns CPU"
        assert steps == []
        r = engine.add_request(PROMPTS[1], greedy(5))
        assert [e.token_id for e in engine.stream(r)] == alone[1][:5]
        assert steps
        with pytest.raises(RuntimeError, match="the engine's loop runs in its own thread"):
            engine.step()
    finally:
        engine.stop(timeout=10)
    assert not engine.loop_running
    r = engine.add_request(PROMPTS[3], greedy(4))  # stopped: the caller steps again
    assert [e.token_id for e in engine.stream(r)] == alone[3][:4]


# ----------------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("loop", [False, True])
def test_a_failing_step_fails_only_its_requests(tiny, alone, loop):
    """The third forward raises (injected): the requests in that step end with finish reason "error" and the
    message; a request that was waiting then, and one added later, run to their solo tokens; no block leaks."""
    engine = small_engine(tiny, max_num_seqs=2, kv_blocks=40)
    calls = []
    original = engine.runner.execute

    def flaky(plan, draft_probs=None):
        calls.append(plan)
        if len(calls) == 3:
            raise RuntimeError("injected device fault")
        return original(plan)

    engine.runner.execute = flaky
    if loop:
        engine.start()
    try:
        a, b, c = (engine.add_request(PROMPTS[i], greedy(8)) for i in (0, 2, 4))  # c waits: max_num_seqs 2
        outs = {r.request_id: [e.token_id for e in engine.stream(r)] for r in (a, b, c)}
        later = engine.add_request(PROMPTS[1], greedy(6))
        late = [e.token_id for e in engine.stream(later)]
    finally:
        engine.stop()
    failed = {chunk.seq_id for chunk in calls[2].chunks}
    assert failed == {a.request_id, b.request_id}
    for r in (a, b):
        assert r.completion.finish_reason is FinishReason.ERROR
        assert r.completion.error == "the step failed: RuntimeError: injected device fault"
        assert outs[r.request_id] == r.completion.token_ids
    assert c.completion.finish_reason is FinishReason.LENGTH and c.completion.token_ids == alone[4][:8]
    assert late == alone[1][:6]
    engine.blocks.check([])
    assert engine.blocks.num_used == 0 and engine.requests == {}


def test_a_bug_outside_the_forward_does_not_hang_consumers(tiny):
    """Anything that raises in the loop's step (here the scheduler) ends the requests in flight with an error rather
    than leaving their consumers waiting; the loop stays up."""
    engine = small_engine(tiny)
    original = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: (_ for _ in ()).throw(RuntimeError("scheduler bug"))
    with engine:
        r = engine.add_request(PROMPTS[0], greedy(4))
        assert list(engine.stream(r)) == []
        assert r.completion.finish_reason is FinishReason.ERROR and "scheduler bug" in r.completion.error
        engine.scheduler.schedule = original
        again = engine.add_request(PROMPTS[1], greedy(3))
        assert len(list(engine.stream(again))) == 3


def test_llm_generate_waits_for_a_running_loop(tiny, alone):
    """realm.LLM on an engine whose loop runs (a server's engine, used offline too): it waits, never steps."""
    from realm.runtime import LLM

    llm = LLM(tiny, max_batch_tokens=8, kv_blocks=40, block_size=4)
    with llm.engine:
        outs = llm.generate(PROMPTS[:4], greedy(6))
    assert [o.token_ids for o in outs] == [a[:6] for a in alone[:4]]


def test_every_event_reaches_a_consumer_before_its_end(tiny, alone):
    """A request finishes (its completion set) before its last events are queued: the loop delivers a step's events
    after settling its state, and another request's slow callback holds them up. A consumer must still get them
    all, and a late or second consumer the end."""
    engine = small_engine(tiny, kv_blocks=40)

    def slow(request, event):
        time.sleep(0.05)

    with engine:
        slowpoke = engine.add_request(PROMPTS[0], greedy(3), on_event=slow)
        quick = engine.add_request(PROMPTS[3], greedy(1))  # one token: finished in its first step
        tokens = [e.token_id for e in engine.stream(quick)]
        assert tokens == quick.completion.token_ids == alone[3][:1]
        assert list(engine.stream(quick)) == []  # a second consumer: the end, not a hang
        list(engine.stream(slowpoke))

    async def late():
        return [e async for e in engine.astream(quick)]

    assert asyncio.run(late()) == []  # the loop has stopped, but this request has ended: its (empty) rest


def test_astream_needs_the_loop_and_says_when_it_stops(tiny):
    engine = small_engine(tiny)
    r = engine.add_request(PROMPTS[0], greedy(12))

    async def consume():
        return [e async for e in engine.astream(r)]

    with pytest.raises(RuntimeError, match="waits for the engine's loop, which is not running: start"):
        asyncio.run(consume())

    async def stopped_under_it():
        seen = []
        async for event in engine.astream(r):
            seen.append(event)
            if len(seen) == 2:
                await asyncio.to_thread(engine.stop)
        return seen

    engine.start()
    with pytest.raises(RuntimeError, match="waits for the engine's loop, which is not running"):
        asyncio.run(stopped_under_it())
    rest = list(engine.stream(r))  # stepping here now: the request goes on to its end
    assert r.completion.finish_reason is FinishReason.LENGTH and len(r.completion.token_ids) == 12
    assert len(rest) <= 10


def test_stop_from_a_callback_ends_the_loop_after_its_step(tiny, alone):
    engine = small_engine(tiny, kv_blocks=40).start()
    loop_thread = engine._thread
    r = engine.add_request(PROMPTS[2], greedy(6), on_event=lambda request, event: engine.stop())
    loop_thread.join(10)
    assert not loop_thread.is_alive() and not engine.loop_running and not r.finished
    assert [e.token_id for e in engine.stream(r)][-1] == alone[2][5]  # the caller steps it to the end
    engine.start()  # and a new loop can start
    other = engine.add_request(PROMPTS[1], greedy(3))
    assert [e.token_id for e in engine.stream(other)] == alone[1][:3]
    engine.stop()


def test_a_request_the_scheduler_refuses_ends_alone(tiny, alone):
    """Whatever the scheduler raises when a request arrives from the inbox ends that request, not the engine."""
    engine = small_engine(tiny, kv_blocks=40)
    original = engine.scheduler.add

    def picky(seq):
        if seq.seq_id == 1:
            raise RuntimeError("no room at the inn")
        original(seq)

    engine.scheduler.add = picky
    with engine:
        good, bad, later = (engine.add_request(PROMPTS[i], greedy(4)) for i in (0, 1, 2))
        assert list(engine.stream(bad)) == []
        assert [e.token_id for e in engine.stream(later)] == alone[2][:4]
        assert [e.token_id for e in engine.stream(good)] == alone[0][:4]
    assert bad.completion.finish_reason is FinishReason.ERROR
    assert bad.completion.error == "the request could not be scheduled: RuntimeError: no room at the inn"
    engine.cancel(1)  # by id: ended already, nothing to do
    assert engine._live == {} and engine.requests == {}


def test_model_generate_raises_when_its_request_fails(tiny, alone, monkeypatch):
    """Model.generate is one request: a failed step is a GenerationError with the engine's message, not a short
    answer; the model's engine then serves the next request."""
    from realm.runtime import GenerationError
    from realm.runtime.runner import ModelRunner

    original = ModelRunner.execute
    monkeypatch.setattr(ModelRunner, "execute",
                        lambda self, plan, draft_probs=None: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(GenerationError, match="generation failed: the step failed: RuntimeError: boom"):
        tiny.generate(PROMPTS[0], greedy(3))
    monkeypatch.setattr(ModelRunner, "execute", original)
    assert tiny.generate(PROMPTS[0], greedy(3)).token_ids == alone[0][:3]
