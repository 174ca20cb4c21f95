"""No request can hurt another (issue 14): a failure in the step, a non-finite logit, a callback that steps the engine
or is interrupted, stays with the request that caused it; the others' results are complete and equal their solo
runs. Values that cannot work are refused up front, naming the field.

The faults are injected where they would arise: a forward that raises for batches holding a poison token, an
embedding row of NaN (a model whose weights hold NaN), a sampler that raises for one row, a tokenizer that cannot
detokenize one id.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_gguf import StubTokenizer, write_tiny_llama

from realm.runtime import LLM, Backend, Engine, EngineConfig, FinishReason, Model, SamplingParams, load_weights
from realm.runtime.block_manager import block_hashes
from realm.runtime.generate import GenerationError
from realm.runtime.runner import NON_FINITE
from realm.runtime.sampler import BatchSampler, RowSampling

VOCAB = 64
POISON = 13  # the token id the injected faults key on
PROMPTS = [[3, 17, 42, 8, 8, 1, 49, 21, 5], [60, 2], [POISON, 4, 5], [7, 9, 11, 30, 31], [1, 2, 3, POISON, 33, 34]]
CLEAN = [i for i, p in enumerate(PROMPTS) if POISON not in p]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_llama(path, dims=dict(vocab=VOCAB), context_length=64)
    return path


@pytest.fixture
def model(path):
    """A fresh model per test, weights included: tests poison its tensors (some share the weights' memory)."""
    return Model(load_weights(path), StubTokenizer(VOCAB), Backend.TORCH, torch.device("cpu"), torch.float32)


def solo(model: Model, prompt, params: SamplingParams):
    """The request run alone on a fresh engine (the poisoned parts stay: a poisoned request fails alone too)."""
    return LLM(model, max_batch_tokens=64, kv_blocks=40, block_size=4).generate([prompt], params)[0]


def assert_clean_requests_equal_solo(model, outs, params, clean=CLEAN):
    for i in clean:
        alone = solo(model, PROMPTS[i], params)
        assert outs[i].error is None, (i, outs[i].error)
        assert (outs[i].token_ids, outs[i].finish_reason) == (alone.token_ids, alone.finish_reason), i


# ------------------------------------------------------------------------ class 1: the step fails for one request


def _forward_raising_on_poison(model, exc: Exception):
    forward = model.transformer.forward

    def faulty(batch, kv):
        if (batch.tokens == POISON).any():
            raise exc
        return forward(batch, kv)

    model.transformer.forward = faulty


@pytest.mark.parametrize("exc", [RuntimeError("CUDA error: an illegal memory access"), torch.OutOfMemoryError(
    "out of memory"), ValueError("a sequence reaches position 99"), IndexError("index 7 is out of bounds")])
@pytest.mark.parametrize("max_batch_tokens", [64, 5])  # all prompts in one step; chunked prefills mixed with decodes
def test_a_forward_that_fails_for_one_request_fails_only_that_request(model, exc, max_batch_tokens):
    _forward_raising_on_poison(model, exc)
    llm = LLM(model, max_batch_tokens=max_batch_tokens, kv_blocks=40, block_size=4)
    outs = llm.generate(PROMPTS, greedy(6))
    for i, p in enumerate(PROMPTS):
        if POISON in p:
            assert outs[i].finish_reason is FinishReason.ERROR
            assert outs[i].error == f"the step failed for this request: {type(exc).__name__}: {exc}"
    assert_clean_requests_equal_solo(model, outs, greedy(6))
    llm.engine.blocks.check([])  # every block came back


def test_a_failed_prefill_chunk_never_enters_the_prefix_cache(model):
    """The failing request shares a 4-token prefix with a later clean one: the clean one must compute it itself, not
    reuse blocks the failed forward may have half-written."""
    shared = [POISON, 20, 21, 22]
    _forward_raising_on_poison(model, RuntimeError("boom"))
    llm = LLM(model, max_batch_tokens=64, kv_blocks=40, block_size=4)
    first = llm.generate([[*shared, 23, 24], [1, 2, 3]], greedy(3))
    assert first[0].finish_reason is FinishReason.ERROR and first[1].error is None
    assert block_hashes(shared, 4)[0] not in llm.engine.blocks.cached
    model.transformer.forward = type(model.transformer).forward.__get__(model.transformer)  # healed
    (again,) = llm.generate([[*shared, 25]], greedy(3))
    assert again.timings.cached_tokens == 0
    assert again.token_ids == solo(model, [*shared, 25], greedy(3)).token_ids


def test_a_sampler_that_fails_for_one_row_fails_only_its_request(model):
    llm = LLM(model, max_batch_tokens=64, kv_blocks=40, block_size=4)
    sample = llm.engine.runner.sampler.__call__

    def faulty(logits, rows, **kwargs):
        if any(r.seed == 13 for r in rows):
            raise RuntimeError("sampling broke")
        return sample(logits, rows, **kwargs)

    llm.engine.runner.sampler = faulty
    params = [SamplingParams(max_tokens=5, temperature=0.8, seed=13 if i == 1 else i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    outs = llm.generate(PROMPTS, params)
    assert outs[1].finish_reason is FinishReason.ERROR and "RuntimeError: sampling broke" in outs[1].error
    for i in (0, 2, 3, 4):  # seeded draws are keyed by (seed, position): the same alone and in any batch
        assert outs[i].error is None
        assert outs[i].token_ids == solo(model, PROMPTS[i], params[i]).token_ids


def test_a_token_that_cannot_be_detokenized_fails_only_its_request(model):
    """The first token PROMPTS[1] generates cannot be shown: the requests that generate it fail, each as it does
    alone; the others are untouched."""
    bad = solo(model, PROMPTS[1], greedy(8)).token_ids[0]

    class Decoder:
        def push(self, token_id):
            if token_id == bad:
                raise UnicodeError(f"cannot render token {token_id}")
            return f"<{token_id}>"

        def flush(self):
            return ""

    class Tokenizer(StubTokenizer):
        def stream_decoder(self, skip_special=False, continuation=False):
            return Decoder()

    model.tokenizer = Tokenizer(VOCAB)
    outs = LLM(model, max_batch_tokens=64, kv_blocks=40, block_size=4).generate(PROMPTS, greedy(8))
    assert outs[1].finish_reason is FinishReason.ERROR
    assert outs[1].error == f"the step failed for this request: UnicodeError: cannot render token {bad}"
    for out, prompt in zip(outs, PROMPTS, strict=True):
        alone = solo(model, prompt, greedy(8))
        assert (out.token_ids, out.finish_reason, out.error) == (alone.token_ids, alone.finish_reason, alone.error)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("temperature", 1e-300, "temperature 1e-300 is outside float32's normal range"),
    ("temperature", 1e-39, "temperature 1e-39 is outside float32's normal range"),
    ("temperature", 1e39, "temperature 1e+39 is outside float32's normal range"),
    ("temperature", math.inf, "temperature must be a finite number, got inf"),
    ("temperature", math.nan, "temperature must be a finite number, got nan"),
    ("repetition_penalty", 1e-300, "repetition_penalty 1e-300 is outside float32's normal range"),
    ("repetition_penalty", 5e-324, "repetition_penalty 5e-324 is outside float32's normal range"),
    ("repetition_penalty", 1e300, "repetition_penalty 1e+300 is outside float32's normal range"),
    ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
    ("min_p", 1.5, "min_p must be in [0, 1], got 1.5"),
    ("max_tokens", 0, "max_tokens must be >= 1, got 0"),
    ("seed", 2**64, "seed must be < 2**63"),
    ("top_k", True, "top_k must be an integer, got True"),
    ("stop", None, "stop must be a string or a list of strings, got NoneType"),
    ("stop", 5, "stop must be a string or a list of strings, got int"),
    ("stop", ["ok", "\ud800"], "a stop string is not valid Unicode text: lone surrogate U+D800 at character 0"),
    ("stop", "caf\udcc3", "a stop string is not valid Unicode text: lone surrogate U+DCC3 at character 3"),
])
def test_values_that_cannot_work_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("+", r"\+").replace("*", r"\*")):
        SamplingParams(**{field: value})


def test_numpy_numbers_are_numbers():
    params = SamplingParams(max_tokens=np.int32(4), temperature=np.float32(0.5), top_k=np.int64(3), seed=np.uint8(7))
    assert (params.max_tokens, params.temperature, params.top_k, params.seed) == (4, 0.5, 3, 7)
    assert all(type(v) in (int, float) for v in (params.max_tokens, params.temperature, params.top_k, params.seed))


@pytest.mark.parametrize("row", [
    RowSampling(temperature=0.7, repetition_penalty=1e-300, history=(1, 2, 3)),  # float32 0: x / 0 = inf
    RowSampling(temperature=0.7, repetition_penalty=1e300, history=(1, 2, 3)),  # float32 inf
    RowSampling(temperature=1e-300, repetition_penalty=1e-300, history=(4,)),
    RowSampling(temperature=0.9, top_p=1e-300),  # float32 0: would drop every token
    RowSampling(temperature=0.9, top_p=1e-300, top_k=1, min_p=1.0),
    RowSampling(temperature=3e38, seed=4),
    RowSampling(repetition_penalty=1e-300, history=(0, 1, 2, 3, 4, 5)),  # greedy, penalised
])
def test_the_sampler_gives_a_valid_token_for_any_row_it_accepts(row):
    """SamplingParams refuses these, but RowSampling (the plan's data) takes any positive float: whatever float32
    makes of it, each row still draws from a valid distribution."""
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 10
    out = BatchSampler("cpu", 40, seed=0)(logits, [row] * 3, return_probs=True)
    assert ((out.tokens >= 0) & (out.tokens < 40)).all()
    assert torch.isfinite(out.probs).all() and torch.allclose(out.probs.sum(-1), torch.ones(3))
    assert (out.probs.gather(1, out.tokens[:, None]) > 0).all()  # never a token of probability 0


def test_prompts_that_cannot_run_fail_alone_in_llm_generate(model):
    class Tokenizer(StubTokenizer):
        def encode(self, text, add_bos=False, parse_special=False):
            raise TypeError("TextInputSequence must be str")  # what a tokenizer library bug looks like

    model.tokenizer = Tokenizer(VOCAB)
    outs = LLM(model, kv_blocks=40).generate([PROMPTS[0], "\ud800", [], [VOCAB + 5], PROMPTS[1]], greedy(4))
    assert outs[1].error == "the request could not be added: TypeError: TextInputSequence must be str"
    assert outs[2].error == "the prompt is empty"
    assert "outside the vocabulary" in outs[3].error or "out of range" in outs[3].error
    for i, prompt in ((0, PROMPTS[0]), (4, PROMPTS[1])):
        assert outs[i].token_ids == solo(model, prompt, greedy(4)).token_ids


# ------------------------------------------------------------------------------------ class 5: non-finite logits


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_token_whose_embedding_is_not_finite_fails_only_its_requests(model, value):
    model.transformer.embedding[POISON, 3] = value
    _check_poisoned_requests_fail_alone(model)


def test_nan_in_one_sequence_s_kv_stays_there_in_the_triton_kernels(path):
    """The Triton kernels read other sequences' blocks only masked out: a NaN there must not leak (NaN * 0 = NaN)."""
    model = Model(load_weights(path), StubTokenizer(VOCAB), Backend.TRITON, torch.device("cpu"), torch.float32)
    model.transformer.embedding[POISON, 3] = math.nan
    _check_poisoned_requests_fail_alone(model)


def _check_poisoned_requests_fail_alone(model):
    llm = LLM(model, max_batch_tokens=64, kv_blocks=12, block_size=4)  # too small for all at once: preemptions
    outs = llm.generate(PROMPTS, greedy(6))
    for i, p in enumerate(PROMPTS):
        if POISON in p:
            assert outs[i].finish_reason is FinishReason.ERROR
            assert outs[i].error == f"the step failed for this request: {NON_FINITE}"
            assert outs[i].token_ids == []  # never a token drawn from NaN
    assert_clean_requests_equal_solo(model, outs, greedy(6))
    # the poisoned requests' blocks (NaN in their KV) are free now, and these take every block of the cache in turn
    again = llm.generate([PROMPTS[i] for i in CLEAN] * 2, greedy(6))
    assert [o.token_ids for o in again] == [outs[i].token_ids for i in CLEAN] * 2


@pytest.mark.parametrize("poison", ["output_norm", "head_bias", "layer"])
def test_a_model_whose_weights_hold_nan_fails_every_request_with_a_clear_error(model, poison):
    if poison == "output_norm":
        model.transformer.output_norm[0] = math.nan
    elif poison == "head_bias":
        model.transformer.embedding[:, 0] = math.inf  # every token: inf - inf in the first norm
    else:
        model.transformer.layers[0].attn_norm[1] = math.nan
    outs = LLM(model, kv_blocks=40).generate(PROMPTS[:3], greedy(4))
    assert [o.finish_reason for o in outs] == [FinishReason.ERROR] * 3
    assert all(NON_FINITE in o.error and o.token_ids == [] for o in outs)
    with pytest.raises(GenerationError, match="not finite"):
        model.generate(PROMPTS[0], greedy(4))


# ------------------------------------------------------------------------------------------- class 6: re-entrancy


@pytest.mark.parametrize("reenter", ["step", "run", "stream", "wait"])
def test_a_callback_cannot_step_the_engine(model, reenter):
    engine = Engine(model, EngineConfig(kv_blocks=40, block_size=4))
    others = []

    def callback(request, event):
        if len(request.seq.output_ids) == 2:
            if reenter == "step":
                engine.step()
            elif reenter == "run":
                engine.run()
            elif reenter == "stream":
                list(engine.stream(engine.add_request([5, 6], greedy(2))))  # a request with nothing queued yet
            else:
                engine.wait(others)

    bad = engine.add_request(PROMPTS[0], greedy(6), on_event=callback)
    others += [engine.add_request(p, greedy(6)) for p in (PROMPTS[1], PROMPTS[3])]
    engine.run()
    assert bad.completion.finish_reason is FinishReason.ERROR
    assert bad.completion.error.startswith("on_event raised RuntimeError: the engine is stepped from inside its own "
                                           "step")
    for request, prompt in zip(others, (PROMPTS[1], PROMPTS[3]), strict=True):
        alone = solo(model, prompt, greedy(6)).token_ids
        assert request.completion.token_ids == alone
        assert [e.token_id for e in engine.stream(request)] == alone  # every event delivered, once, in order
    engine.blocks.check([])


def test_an_interrupt_in_a_callback_loses_no_other_request_s_events(model):
    """Ctrl-C while a callback runs: the interrupt reaches the caller, the step's other events are still queued, the
    request whose callback did not finish ends with the reason, and the engine goes on with the others."""
    engine = Engine(model, EngineConfig(kv_blocks=40, block_size=4))
    prompts = (PROMPTS[0], PROMPTS[1], PROMPTS[3])

    def callback(request, event):
        if len(request.seq.output_ids) == 2:
            raise KeyboardInterrupt

    requests = [engine.add_request(p, greedy(5), on_event=callback if i == 0 else None) for i, p in enumerate(prompts)]
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    engine.run()  # goes on
    alone = [solo(model, p, greedy(5)).token_ids for p in prompts]
    first = requests[0].completion
    assert (first.finish_reason, first.error, first.token_ids) == (FinishReason.ERROR,
                                                                   "on_event raised KeyboardInterrupt: ", alone[0][:2])
    for request, want in zip(requests, alone, strict=True):
        assert [e.token_id for e in engine.stream(request)] == request.completion.token_ids
        if request is not requests[0]:
            assert request.completion.token_ids == want
    engine.blocks.check([])


def test_an_interrupt_in_the_callback_of_a_cancelled_request_still_ends_it(model):
    """cancel() delivers the held-back text at once when nothing steps: its callback interrupted, the request still
    ends (a waiting consumer is released), and the engine is left with no work."""
    engine = Engine(model, EngineConfig(kv_blocks=40, block_size=4))

    def callback(request, event):
        if event.token_id is None:  # the held-back tail, delivered by cancel()
            raise KeyboardInterrupt

    request = engine.add_request([1, 2, 3], SamplingParams(max_tokens=20, stop=[">X"]), on_event=callback)
    engine.step()  # "<id>" ends in ">": held back, a possible start of ">X"
    with pytest.raises(KeyboardInterrupt):
        engine.cancel(request)
    assert request.finished and request.ended and not engine.has_work
    assert engine.wait([request]) is True
    engine.blocks.check([])


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt()])
def test_a_callback_raising_systemexit_in_the_loop_ends_only_its_request(model, exc):
    engine = Engine(model, EngineConfig(kv_blocks=40, block_size=4))

    def callback(request, event):
        raise exc

    with engine:
        bad = engine.add_request(PROMPTS[0], greedy(3), on_event=callback)
        good = engine.add_request(PROMPTS[1], greedy(3))
        assert [e.token_id for e in engine.stream(good)] == solo(model, PROMPTS[1], greedy(3)).token_ids
        assert engine.wait([bad], timeout=30)
        assert engine.loop_running
    assert bad.completion.finish_reason is FinishReason.ERROR
    assert bad.completion.error.startswith(f"on_event raised {type(exc).__name__}")


def test_wait_needs_a_request(model):
    with pytest.raises(ValueError, match="wait needs at least one request"):
        Engine(model, EngineConfig(kv_blocks=8)).wait([])


def test_a_callback_that_starts_the_loop_does_not_break_generate(model):
    llm = LLM(model, kv_blocks=40)
    outs = llm.generate(PROMPTS[:2], greedy(4), on_event=lambda i, event: llm.engine.start())
    llm.engine.stop()
    assert [o.token_ids for o in outs] == [solo(model, p, greedy(4)).token_ids for p in PROMPTS[:2]]


def test_an_interrupt_in_the_forward_leaves_the_engine_usable(model):
    engine = Engine(model, EngineConfig(kv_blocks=40, block_size=4))
    forward = model.transformer.forward
    calls = []

    def interrupted(batch, kv):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return forward(batch, kv)

    model.transformer.forward = interrupted
    requests = [engine.add_request(p, greedy(5)) for p in (PROMPTS[0], PROMPTS[1])]
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    engine.run()
    model.transformer.forward = forward
    for request, prompt in zip(requests, (PROMPTS[0], PROMPTS[1]), strict=True):
        assert request.completion.token_ids == solo(model, prompt, greedy(5)).token_ids
    engine.blocks.check([])


# ---------------------------------------------------------------------------------------- class 7: engine edges


@pytest.mark.parametrize("request_id", ["0", 1.0, None, True, [0]])
def test_cancel_refuses_what_is_not_a_request(model, request_id):
    engine = Engine(model, EngineConfig(kv_blocks=8))
    engine.add_request([1, 2], greedy(2))
    with pytest.raises(ValueError, match=r"cancel takes a Request or a request id \(int\), got"):
        engine.cancel(request_id)


@pytest.mark.parametrize(("config", "message"), [
    (EngineConfig(kv_blocks=10**12), r"kv_blocks=1000000000000 of block_size=16 tokens need .* GiB of KV cache; "
                                     r"cpu has .* GiB in all"),
    (EngineConfig(kv_blocks=8, block_size=2**40), r"kv_blocks=8 of block_size=1099511627776 tokens need"),
    (EngineConfig(block_size=2**40), r"no room for a KV cache block"),
])
def test_a_kv_cache_larger_than_the_memory_is_refused_before_allocating(model, config, message):
    with pytest.raises(ValueError, match=message):
        Engine(model, config)


def test_huge_finite_logits_are_not_mistaken_for_non_finite(model):
    """The runner's cheap test (a float32 sum per row) overflows for rows of huge finite logits; those rows must be
    looked at again, not failed."""
    forward = model.transformer.forward
    model.transformer.forward = lambda batch, kv: forward(batch, kv).abs()
    want = solo(model, PROMPTS[0], greedy(4)).token_ids
    model.transformer.forward = lambda batch, kv: forward(batch, kv).abs() * 1e37 + 1e37  # sum > float32's max
    out = solo(model, PROMPTS[0], greedy(4))
    assert out.error is None and out.token_ids == want
