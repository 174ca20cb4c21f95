"""Sampling parameters and filters, stop strings, and generation's streaming and finish reasons."""

from __future__ import annotations

import math

import pytest
import torch

from realm.runtime import FinishReason, Sampler, SamplingParams, StopStrings
from realm.runtime.sampling import apply_repetition_penalty, filter_min_p, filter_top_k, filter_top_p

LOGITS = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0, 0.5])  # probabilities ~ [.23, .08, .03, .01, .62, .05]


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


@pytest.mark.parametrize("k,expected", [(0, [0, 1, 2, 3, 4, 5]), (1, [4]), (2, [0, 4]), (3, [0, 1, 4]), (6, list(
    range(6))), (100, list(range(6)))])
def test_top_k(k, expected):
    assert kept(filter_top_k(LOGITS, k)) == expected


def test_top_k_keeps_ties_with_the_kth():
    assert kept(filter_top_k(torch.tensor([1.0, 2.0, 2.0, 0.0]), 1)) == [1, 2]


@pytest.mark.parametrize("p,expected", [(1.0, list(range(6))), (0.5, [4]), (0.6, [4]), (0.8, [0, 4]),
                                        (0.9, [0, 1, 4]), (1e-9, [4])])
def test_top_p(p, expected):
    assert kept(filter_top_p(LOGITS, p)) == expected


@pytest.mark.parametrize("min_p,expected", [(0.0, list(range(6))), (0.3, [0, 4]), (0.1, [0, 1, 4]), (1.0, [4])])
def test_min_p(min_p, expected):
    assert kept(filter_min_p(LOGITS, min_p)) == expected


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    out = apply_repetition_penalty(LOGITS, torch.tensor([0, 3, 0]), 2.0)
    assert out.tolist() == [1.0, 1.0, 0.0, -2.0, 3.0, 0.5]
    assert apply_repetition_penalty(LOGITS, torch.tensor([0]), 1.0) is LOGITS


def test_greedy_is_argmax_after_the_penalty():
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=10.0))
    assert sampler.sample(LOGITS, torch.tensor([], dtype=torch.long)) == 4
    assert sampler.sample(LOGITS, torch.tensor([4])) == 0  # 3/10 < 2


def draws(params: SamplingParams, n: int = 2000) -> torch.Tensor:
    sampler = Sampler(params)
    return torch.tensor([sampler.sample(LOGITS, torch.tensor([], dtype=torch.long)) for _ in range(n)])


def test_seed_reproduces_the_draws_and_another_seed_differs():
    a, b = draws(SamplingParams(temperature=1.0, seed=7), 200), draws(SamplingParams(temperature=1.0, seed=7), 200)
    assert torch.equal(a, b)
    assert not torch.equal(a, draws(SamplingParams(temperature=1.0, seed=8), 200))


def test_temperature_one_samples_the_softmax():
    counts = torch.bincount(draws(SamplingParams(temperature=1.0, seed=0), 4000), minlength=6).double() / 4000
    torch.testing.assert_close(counts, LOGITS.double().softmax(-1), atol=0.03, rtol=0)  # 3 sigma of 4000 draws


def test_filters_bound_the_support():
    assert set(draws(SamplingParams(temperature=5.0, top_k=2, seed=0), 300).tolist()) == {0, 4}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.8, seed=0), 300).tolist()) == {0, 4}
    assert set(draws(SamplingParams(temperature=1.0, min_p=0.1, seed=0), 300).tolist()) == {0, 1, 4}
    low = draws(SamplingParams(temperature=0.05, seed=0), 300)  # near-greedy
    assert set(low.tolist()) == {4}


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"temperature": math.nan}, "temperature must be a finite number"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"min_p": -0.5}, r"min_p must be in \[0, 1\]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"max_tokens": True}, "max_tokens must be an integer"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"stop": ("",)}, "stop strings must be non-empty"),
])
def test_invalid_sampling_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_a_single_stop_string_is_not_split_into_characters():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)


# ------------------------------------------------------------------------------------------------------ stop strings


def feed(stops: StopStrings, pieces: list[str]) -> str:
    return "".join(stops.push(p) for p in pieces) + ("" if stops.stopped else stops.flush())


@pytest.mark.parametrize("pieces,stop,expected,stopped", [
    (["Hello", " wor", "ld", "!"], ["world"], "Hello ", True),
    (["Hel", "lo"], ["lo"], "Hel", True),
    (["a", "b", "c"], ["x"], "abc", False),
    (["ab", "c", "d"], ["bcd", "cx"], "a", True),
    (["one\n", "\nTwo"], ["\n\n"], "one", True),
    (["wo", "rk wor", "ld"], ["world"], "work ", True),  # a false start, then the real one
    (["wor"], ["world"], "wor", False),  # held back, released at the end
    (["xy", "z"], ["yz", "xyz"], "", True),  # the earliest occurrence wins
])
def test_stop_strings(pieces, stop, expected, stopped):
    stops = StopStrings(stop)
    assert feed(stops, pieces) == expected
    assert stops.stopped == stopped


def test_stop_strings_hold_back_only_a_possible_start():
    stops = StopStrings(["STOP"])
    assert stops.push("go ST") == "go "
    assert stops.push("X") == "STX"


# -------------------------------------------------------------------------------------------- generation (the model)


def test_stream_shows_the_generated_text_once(smollm2):
    stream = smollm2.stream("The capital of France is", max_tokens=12)
    events = list(stream)
    c = stream.completion
    assert "".join(e.text for e in events) == c.text == smollm2.tokenizer.decode(c.token_ids)
    assert [e.token_id for e in events if e.token_id is not None] == c.token_ids
    assert c.finish_reason is FinishReason.LENGTH and len(c.token_ids) == 12
    t = c.timings
    assert t.prompt_tokens == len(c.prompt_ids) and t.generated_tokens == 12 and t.decode_tokens_per_s > 0


def test_stop_string_ends_generation_before_it(smollm2):
    free = smollm2.generate("def fibonacci(n):", max_tokens=24)
    assert "return" in free.text
    stopped = smollm2.generate("def fibonacci(n):", max_tokens=24, stop=["return"])
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.text == free.text[: free.text.index("return")]


def test_end_of_generation_token_stops_and_is_not_shown(smollm2):
    c = smollm2.chat("What is the capital of France?", max_tokens=32)
    assert c.finish_reason is FinishReason.STOP and c.token_ids[-1] in smollm2.tokenizer.stop_ids
    assert "<|im_end|>" not in c.text
    longer = smollm2.chat("What is the capital of France?", max_tokens=len(c.token_ids) + 3, ignore_eos=True)
    assert len(longer.token_ids) == len(c.token_ids) + 3 and longer.finish_reason is FinishReason.LENGTH


def test_seeded_sampling_reproduces(smollm2):
    kwargs = dict(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, min_p=0.02, repetition_penalty=1.1)
    a = smollm2.generate("Once upon a time", seed=3, **kwargs)
    assert smollm2.generate("Once upon a time", seed=3, **kwargs).token_ids == a.token_ids


def test_unknown_sampling_option_is_an_error(smollm2):
    with pytest.raises(ValueError, match=r"invalid sampling option.*temprature"):
        smollm2.generate("Hi", temprature=0.5)
    with pytest.raises(ValueError, match="either a SamplingParams or keyword"):
        smollm2.generate("Hi", SamplingParams(), max_tokens=3)
