"""The continuously batching engine (realm.runtime.engine) and the offline API (realm.LLM), end to end.

The acceptance test: with greedy sampling every output of a batch of mixed-length prompts equals that prompt
generated alone (`Model.generate`, itself checked against the single-sequence oracle of tests/oracle.py), also
when a small KV cache forces preemptions (the preempted sequences recompute their tokens) and with prefix caching on
and off. The batched
forward packs different numbers of tokens per step than the solo run, so logits differ in the last float bits
(matmuls of other shapes); greedy tokens agree unless two logits tie that closely, which these prompts do not.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from oracle import greedy_alone
from tiny_gguf import StubTokenizer, write_tiny_llama

import realm
from realm.runtime import (
    LLM,
    Backend,
    Engine,
    EngineConfig,
    FinishReason,
    Model,
    SamplingParams,
    backends_for,
    load_weights,
)

SYSTEM = "You are a helpful assistant. Answer briefly and truthfully, in plain English. "
PROMPTS = [
    SYSTEM + "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    SYSTEM + "def fibonacci(n):",
    "1, 2, 3, 4,",
    SYSTEM + "Water boils at a temperature of",
    "Hi",
]
MAX_TOKENS = [12, 5, 9, 16, 6, 10]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def solo(smollm2):
    """Each prompt generated alone (`Model.generate`: one request on the model's own engine), and checked against
    the independent single-sequence oracle (tests/oracle.py: no scheduler, no step plan, no batched sampler)."""
    alone = [smollm2.generate(p, greedy(n)) for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)]
    for c, n in zip(alone, MAX_TOKENS, strict=True):
        assert c.token_ids == greedy_alone(smollm2, c.prompt_ids, n)
    return alone


@pytest.mark.parametrize(("kv_blocks", "prefix_caching"), [(None, True), (10, True), (10, False)])
def test_batch_equals_each_prompt_alone(smollm2, solo, kv_blocks, prefix_caching):
    """kv_blocks=10 of 4 tokens (40 slots) cannot hold the six sequences at once: preemption and recomputation.
    max_batch_tokens=16 splits every longer prompt into chunks, prefilled beside other sequences' decodes."""
    llm = LLM(smollm2, max_batch_tokens=16, kv_blocks=kv_blocks, block_size=4, prefix_caching=prefix_caching)
    outs = llm.generate(PROMPTS, [greedy(n) for n in MAX_TOKENS])
    for out, alone in zip(outs, solo, strict=True):
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text
        assert out.finish_reason is FinishReason.LENGTH and out.prompt_ids == alone.prompt_ids
    stats = llm.engine.scheduler.stats
    if kv_blocks is not None:
        assert stats.preemptions > 0 and sum(o.timings.preemptions for o in outs) == stats.preemptions
    else:
        assert stats.preemptions == 0
    # the system prompt is shared: later prompts find its full blocks (and resumed sequences their own)
    assert (stats.cached_tokens > 0) == prefix_caching
    blocks = llm.engine.blocks
    blocks.check()
    assert blocks.num_used == 0  # every block came back; cached ones are evictable


def test_static_batching_gives_the_same_outputs(smollm2, solo):
    llm = LLM(smollm2, max_batch_tokens=64, max_num_seqs=4, kv_blocks=64, batching="static")
    outs = llm.generate(PROMPTS, [greedy(n) for n in MAX_TOKENS])
    assert [o.token_ids for o in outs] == [s.token_ids for s in solo]


def test_per_request_sampling_and_stops(smollm2):
    """Different parameters side by side in one batch give what each gives alone: a stop string, end of generation
    honoured, a seeded sampled request (its own generator), a repetition penalty."""
    params = [
        SamplingParams(max_tokens=16, stop=(", 8",)),
        SamplingParams(max_tokens=24),
        SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=3),
        SamplingParams(max_tokens=10, repetition_penalty=1.3),
    ]
    prompts = ["1, 2, 3, 4,", "What is the capital of France?", "Once upon a time", "The the the the"]
    outs = LLM(smollm2, max_batch_tokens=32, kv_blocks=128).generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        alone = smollm2.generate(prompt, p)
        assert (out.token_ids, out.text, out.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason)
    assert outs[0].finish_reason is FinishReason.STOP and ", 8" not in outs[0].text and outs[0].text.endswith("7")


def test_streaming_iterator_and_callback(smollm2):
    engine = Engine(smollm2, EngineConfig(max_batch_tokens=32, kv_blocks=64))
    seen = []
    a = engine.add_request(PROMPTS[1], greedy(10))
    b = engine.add_request(PROMPTS[3], greedy(6), on_event=lambda r, e: seen.append((r.request_id, e)))
    events = list(engine.stream(a))
    assert a.finished and "".join(e.text for e in events) == a.completion.text
    assert [e.token_id for e in events if e.token_id is not None] == a.completion.token_ids
    assert b.finished  # b (shorter) advanced in the same steps
    assert all(rid == b.request_id for rid, _ in seen) and "".join(e.text for _, e in seen) == b.completion.text
    assert list(engine.stream(b)) == [e for _, e in seen]  # its events were kept for its iterator too
    assert not engine.has_work and engine.step() == []


def test_cancel_frees_blocks_and_leaves_the_rest_unchanged(smollm2, solo):
    engine = Engine(smollm2, EngineConfig(max_batch_tokens=16, max_num_seqs=2, kv_blocks=64, block_size=4))
    requests = [engine.add_request(p, greedy(n)) for p, n in zip(PROMPTS[:4], MAX_TOKENS[:4], strict=True)]
    for _ in range(4):
        engine.step()
    running, waiting = requests[0], requests[3]
    assert running.seq.kv.blocks and not waiting.seq.kv.blocks
    used = engine.blocks.num_used
    engine.cancel(running)
    engine.cancel(waiting.request_id)
    assert engine.blocks.num_used < used and not running.seq.kv.blocks
    for r in (running, waiting):
        assert r.completion.finish_reason is FinishReason.ABORT
    assert len(running.completion.token_ids) < MAX_TOKENS[0] and waiting.completion.token_ids == []
    engine.run()
    assert [r.completion.token_ids for r in requests[1:3]] == [s.token_ids for s in solo[1:3]]
    engine.cancel(requests[1])  # finished already: nothing changes
    assert requests[1].completion.finish_reason is FinishReason.LENGTH
    engine.blocks.check()
    assert engine.blocks.num_used == 0


def test_cancel_from_a_callback(smollm2):
    engine = Engine(smollm2, EngineConfig(kv_blocks=64))

    def stop_after_three(request, event):
        if len(request.seq.output_ids) == 3:
            engine.cancel(request)

    r = engine.add_request("Once upon a time", greedy(20), on_event=stop_after_three)
    other = engine.add_request("1, 2, 3,", greedy(5))
    engine.run()
    assert r.completion.finish_reason is FinishReason.ABORT and len(r.completion.token_ids) == 3
    assert other.completion.finish_reason is FinishReason.LENGTH and len(other.completion.token_ids) == 5


def test_bad_requests_fail_alone(smollm2, solo):
    context = smollm2.config.context_length
    llm = LLM(smollm2, max_batch_tokens=32, kv_blocks=16, block_size=4)  # 64 KV slots
    prompts = ["", PROMPTS[3], [1] * context, PROMPTS[1], [1, 2, smollm2.config.vocab_size], PROMPTS[3]]
    params = [greedy(4), greedy(MAX_TOKENS[3]), greedy(4), greedy(MAX_TOKENS[1]), greedy(4), greedy(60)]
    outs = llm.generate(prompts, params)
    expected_errors = {
        0: "the prompt is empty",
        2: f"the prompt has {context} tokens; the model's context holds {context}",
        4: r"prompt token ids out of range \[0, \d+\): \[\d+\]",
        5: r"the prompt \(\d+ tokens\) and max_tokens \(60\) need \d+ KV slots, \d+ blocks of 4; the cache has 16 "
           r"blocks in all",
    }
    for i, out in enumerate(outs):
        if i in expected_errors:
            assert out.finish_reason is FinishReason.ERROR and re.search(expected_errors[i], out.error)
            assert out.token_ids == [] and out.text == ""
        else:
            assert out.error is None and out.token_ids == solo[PROMPTS.index(prompts[i])].token_ids
    assert outs[2].prompt_ids == [1] * context and outs[2].timings.prompt_tokens == context


def test_timings_and_progress(smollm2, capsys):
    """One sequence at a time (max_num_seqs=1): each request waits in the queue while the ones before it run, so
    its queue time covers their whole prefill and decode; the first waits for nothing."""
    llm = LLM(smollm2, max_batch_tokens=64, max_num_seqs=1, kv_blocks=64)
    outs = llm.generate(PROMPTS[:3], [greedy(n) for n in MAX_TOKENS[:3]], progress=True)
    assert "3/3" in capsys.readouterr().err
    for out, n in zip(outs, MAX_TOKENS, strict=False):
        t = out.timings
        assert t.generated_tokens == n and t.prompt_tokens == len(out.prompt_ids)
        assert t.prefill_s > 0 and t.decode_s > 0 and t.decode_tokens_per_s == (n - 1) / t.decode_s
    first = outs[0].timings
    assert first.queue_s < first.prefill_s  # admitted in the first step
    for before, after in itertools.pairwise(outs):
        ran = before.timings.queue_s + before.timings.prefill_s + before.timings.decode_s
        assert after.timings.queue_s >= ran


def test_engine_and_llm_errors(smollm2):
    with pytest.raises(ValueError, match="max_batch_tokens must be an integer >= 1, got 0"):
        EngineConfig(max_batch_tokens=0)
    with pytest.raises(ValueError, match="kv_blocks must be an integer >= 1, got 0"):
        EngineConfig(kv_blocks=0)
    with pytest.raises(ValueError, match="unknown batching 'dynamic'; choose one of: continuous, static"):
        EngineConfig(batching="dynamic")
    with pytest.raises(ValueError, match=r"a loaded Model brings its backend \(torch\), device and dtype"):
        LLM(smollm2, device="cpu")
    llm = LLM(smollm2, kv_blocks=8)
    with pytest.raises(ValueError, match=r"sampling must be one SamplingParams or one per prompt \(2\), got 1"):
        llm.generate(["a", "b"], [greedy(1)])
    with pytest.raises(ValueError, match="params must be a SamplingParams"):
        llm.engine.add_request("a", {"max_tokens": 3})
    with pytest.raises(ValueError, match="prefix_caching must be True or False, got 'no'"):
        EngineConfig(prefix_caching="no")
    assert isinstance(llm, realm.LLM) and "8 KV blocks of 16" in repr(llm)
    bad = llm.generate([[1, 2.5], [1, True], ["7"]])  # ids are integers: nothing is converted
    assert all(o.finish_reason is FinishReason.ERROR and "integer token ids" in o.error for o in bad)
    (one,) = llm.generate([1, 2, 3], greedy(2))  # one list of ids is one prompt
    assert one.prompt_ids == [1, 2, 3] and len(one.token_ids) == 2


# ---------------------------------------------------------------------------------- the Triton backend, tiny model

DIMS = dict(hidden=128, n_heads=4, n_kv_heads=2, head_dim=32, ffn=256, vocab=96)
TINY_PROMPTS = [[3, 17, 42, 8, 8, 0, 49, 21, 5, 30, 11], [60, 70], [1, 2, 3, 4, 5, 6, 7, 8, 9], [90]]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_llama(path, dims=DIMS, formats={"attn_q": "Q8_0", "ffn_down": "Q4_K"}, context_length=64)
    weights = load_weights(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [Model(weights, StubTokenizer(DIMS["vocab"]), backend, device, torch.float32)
            for backend in backends_for(device)]


@pytest.mark.parametrize("backend", list(Backend))
def test_tiny_model_batch_equals_alone_on_both_backends(tiny_models, backend):
    """Decodes, chunks after cached tokens and fresh prompts in one step, with preemption (6 blocks of 4)."""
    model = next((m for m in tiny_models if m.backend is backend), None)
    if model is None:
        pytest.skip(f"the {backend.value} backend does not run on {tiny_models[0].device}")
    params = [greedy(n) for n in (10, 14, 6, 12)]
    alone = [model.generate(p, sp).token_ids for p, sp in zip(TINY_PROMPTS, params, strict=True)]
    llm = LLM(model, backend=backend, max_batch_tokens=6, kv_blocks=6, block_size=4)
    outs = llm.generate(TINY_PROMPTS, params)
    assert [o.token_ids for o in outs] == alone
    assert llm.engine.scheduler.stats.preemptions > 0


def test_callbacks_cannot_break_the_engine(tiny_models):
    """A callback that raises ends its own request (finish reason "error"); one that cancels on the last event, or
    cancels another request mid-step, leaves every request consistent; the engine goes on."""
    model = next(m for m in tiny_models if m.backend is Backend.TORCH)
    engine = Engine(model, EngineConfig(kv_blocks=32, block_size=4))

    def boom(request, event):
        if len(request.seq.output_ids) == 2:
            raise RuntimeError("client went away")

    def cancel_at_end(request, event):
        engine.cancel(request)  # on every event, the last included: a no-op once finished

    bad = engine.add_request(TINY_PROMPTS[0], greedy(6), on_event=boom)
    late = engine.add_request(TINY_PROMPTS[1], greedy(4))
    killer = engine.add_request(TINY_PROMPTS[2], greedy(5),
                                on_event=lambda r, e: engine.cancel(late) if len(r.seq.output_ids) == 2 else None)
    selfish = engine.add_request(TINY_PROMPTS[3], greedy(1), on_event=cancel_at_end)
    engine.run()
    assert bad.completion.finish_reason is FinishReason.ERROR
    assert bad.completion.error == "on_event raised RuntimeError: client went away"
    assert len(bad.completion.token_ids) == 2
    assert late.completion.finish_reason is FinishReason.ABORT and len(late.completion.token_ids) == 2
    assert killer.completion.finish_reason is FinishReason.LENGTH
    assert selfish.completion.finish_reason is FinishReason.LENGTH  # its only event was its last: cancel is a no-op
    for r in (bad, late, killer, selfish):  # the events a stream would give spell the completion
        assert "".join(e.text for e in engine.stream(r)) == r.completion.text
    engine.blocks.check([])
    again = engine.add_request(TINY_PROMPTS[1], greedy(4))
    engine.run()
    assert again.completion.token_ids == model.generate(TINY_PROMPTS[1], greedy(4)).token_ids


def test_requests_are_checked(tiny_models):
    model = next(m for m in tiny_models if m.backend is Backend.TORCH)
    engine, other = (Engine(model, EngineConfig(kv_blocks=8)) for _ in range(2))
    with pytest.raises(ValueError, match="salt must be a string or None, got 7"):
        engine.add_request([1, 2], greedy(2), salt=7)
    with pytest.raises(ValueError, match="no request 5 was ever added"):
        engine.cancel(5)
    foreign = other.add_request([1, 2], greedy(2))
    with pytest.raises(ValueError, match="request 0 is not one of this engine's requests"):
        next(engine.stream(foreign))
    llm = LLM(model, kv_blocks=8)
    (one,) = llm.generate(torch.tensor([5, 6, 7]), greedy(2))  # a 1-D tensor of ids is one prompt
    assert one.prompt_ids == [5, 6, 7] and len(one.token_ids) == 2
    bad = llm.generate([None, b"abc"], greedy(2))
    assert [o.error for o in bad] == ["a prompt is text or a sequence of integer token ids; got NoneType",
                                      "a prompt is text or a sequence of integer token ids; got bytes"]
    with pytest.raises(ValueError, match="sampling holds a dict, not a SamplingParams"):
        llm.generate([[1], [2]], [greedy(1), {"max_tokens": 1}])
