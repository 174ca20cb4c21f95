"""The batched sampler against the per-row reference (realm.runtime.sampling): same tokens for greedy rows, the same
distributions for sampled rows, draws that follow them (chi-square), seeded draws keyed by (seed, position)."""

from __future__ import annotations

import itertools
import logging
import math
import pickle
from dataclasses import replace

import pytest
import torch
from tolerances import assert_close, assert_equal

from realm.runtime.sampler import BatchSampler, RowSampling, first_argmax
from realm.runtime.sampling import Sampler, SamplingParams

VOCAB = 123  # odd, and the logits below are padded to 128 columns as an embedding may be
PADDED = 128


def params_of(row: RowSampling) -> SamplingParams:
    return SamplingParams(temperature=row.temperature, top_k=row.top_k, top_p=row.top_p, min_p=row.min_p,
                          repetition_penalty=row.repetition_penalty, seed=row.seed)


def reference_probs(logits: torch.Tensor, row: RowSampling) -> torch.Tensor:
    """logits: [>= vocab] -> float32 [vocab]: softmax of the per-row sampler's distribution."""
    history = torch.tensor(row.history, dtype=torch.long)
    return Sampler(params_of(row)).distribution(logits, history).softmax(-1)


def padded_logits(rows: int, seed: int, scale: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    """[rows, PADDED]: random logits in the first VOCAB columns, huge ones in the padding that must never win."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, PADDED, generator=g) * scale
    logits[:, VOCAB:] = 1e4
    return logits.to(dtype)


def random_history(g: torch.Generator, vocab: int = VOCAB) -> tuple[int, ...]:
    n = int(torch.randint(1, 20, (), generator=g))
    return tuple(torch.randint(0, vocab // 4, (n,), generator=g).tolist())  # a small id range: duplicates


def test_greedy_rows_match_the_per_row_sampler_in_a_mixed_batch():
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(24):
        kind = i % 4
        if kind == 0:
            rows.append(RowSampling())
        elif kind == 1:
            rows.append(RowSampling(repetition_penalty=1.5, history=random_history(g)))
        elif kind == 2:
            rows.append(RowSampling(repetition_penalty=0.7, history=random_history(g)))  # < 1 favours repeats
        else:
            rows.append(RowSampling(temperature=0.9, top_p=0.8, repetition_penalty=1.2, history=random_history(g)))
    logits = padded_logits(len(rows), seed=1)
    before = logits.clone()
    out = BatchSampler("cpu", VOCAB, seed=0)(logits, rows)
    assert_equal(logits, before, "logits after sampling (must not be modified)")
    assert out.tokens.dtype == torch.int64 and out.tokens.shape == (len(rows),)
    for i, row in enumerate(rows):
        if row.greedy:
            expected = Sampler(params_of(row)).sample(logits[i, :VOCAB], torch.tensor(row.history, dtype=torch.long))
            assert int(out.tokens[i]) == expected, f"row {i}"
        else:
            assert 0 <= int(out.tokens[i]) < VOCAB, f"row {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probs_match_the_per_row_distribution_for_a_grid_in_one_batch(dtype):
    g = torch.Generator().manual_seed(2)
    grid = itertools.product((0.3, 1.0, 2.5), (0, 1, 5), (0.3, 0.9, 1.0), (0.0, 0.1), (1.0, 1.3))
    rows = []
    for n, (t, k, p, min_p, penalty) in enumerate(grid):
        params = SamplingParams(temperature=t, top_k=k, top_p=p, min_p=min_p, repetition_penalty=penalty)
        rows.append(RowSampling.of(params, position=n, history=random_history(g)))
        if n % 10 == 0:  # greedy rows side by side with the sampled ones
            rows.append(RowSampling(repetition_penalty=penalty, history=random_history(g)))
    logits = padded_logits(len(rows), seed=3, dtype=dtype)
    out = BatchSampler("cpu", VOCAB, seed=0)(logits, rows, return_probs=True)
    assert out.probs.dtype == torch.float32 and out.probs.shape == (len(rows), VOCAB)
    for i, row in enumerate(rows):
        token = int(out.tokens[i])
        if row.greedy:
            assert_equal(out.probs[i], torch.nn.functional.one_hot(out.tokens[i], VOCAB).float(), f"greedy row {i}")
            continue
        assert_close(out.probs[i], reference_probs(logits[i, :VOCAB], row), what=f"row {i} {row}")
        assert out.probs[i, token] > 0, f"row {i} drew token {token}, which its distribution excludes"


def test_ties_at_the_cuts_follow_the_reference():
    # top_k keeps every logit tied with the k-th; top_p drops a token once the mass above it reaches p exactly
    # (four equal logits: masses above are 0, .25, .5, .75, exact in float32, so top_p .5 keeps two of them).
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rows = [RowSampling(temperature=1.0, top_k=1), RowSampling(temperature=1.0, top_p=0.5)]
    out = BatchSampler("cpu", 4, seed=0)(logits, rows, return_probs=True)
    assert_close(out.probs[0], reference_probs(logits[0], rows[0]))
    kept = [int((reference_probs(logits[i], row) > 0).sum()) for i, row in enumerate(rows)]
    assert kept == [2, 2] and (out.probs > 0).sum(-1).tolist() == kept


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness-of-fit p-value of `counts` [vocab] under `probs` [vocab].

    Bins are pooled, smallest expectation first, until each expects >= 5 (the chi-square approximation's usual
    condition); a count on a token that `probs` excludes is impossible under it: p = 0.
    """
    counts, probs = counts.double(), probs.double()
    if (counts[probs == 0] > 0).any():
        return 0.0
    expected = counts.sum() * probs
    pooled: list[list[float]] = []  # [observed, expected] per bin
    observed, wanted = 0.0, 0.0
    for i in expected.argsort().tolist():
        if expected[i] == 0:
            continue
        observed, wanted = observed + float(counts[i]), wanted + float(expected[i])
        if wanted >= 5:
            pooled.append([observed, wanted])
            observed, wanted = 0.0, 0.0
    if wanted > 0:  # a remainder expecting < 5 joins the last bin
        pooled[-1][0] += observed
        pooled[-1][1] += wanted
    bins = torch.tensor(pooled, dtype=torch.float64)
    statistic = ((bins[:, 0] - bins[:, 1]) ** 2 / bins[:, 1]).sum()
    dof = torch.tensor((len(pooled) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, statistic / 2))


# (what it checks, the sampling, a wrong top_p the counts must reject)
STATISTICS = [
    ("top_p cut mid-distribution", RowSampling(temperature=1.0, top_p=0.6), 0.75),
    ("temperature below 1", RowSampling(temperature=0.7), 0.9),
    ("top_k cut, min_p on", RowSampling(temperature=1.3, top_k=20, min_p=0.02), 0.8),
    ("min_p cut, top_k on", RowSampling(temperature=1.3, top_k=40, min_p=0.05), 0.8),
]


@pytest.mark.parametrize("what,row,wrong_top_p", STATISTICS, ids=[s[0] for s in STATISTICS])
def test_draws_follow_the_reference_distribution(what, row, wrong_top_p):
    vocab, n = 50, 20000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(4)) * 2
    out = BatchSampler("cpu", vocab, seed=5)(logits.expand(n, vocab), [row] * n)  # deterministic: seeded sampler
    counts = torch.bincount(out.tokens, minlength=vocab)
    p = chi_square_p_value(counts, reference_probs(logits, row))
    assert p > 1e-6, f"{what}: draws reject the reference distribution, p = {p:.3g}"
    # Negative controls: the same counts must reject near misses, or the test above has no power.
    for wrong in (replace(row, temperature=row.temperature * 1.15), replace(row, top_p=wrong_top_p)):
        p_wrong = chi_square_p_value(counts, reference_probs(logits, wrong))
        assert p_wrong < 1e-6, f"{what}: counts fail to reject {wrong}, p = {p_wrong:.3g}"


def seeded_token(row: RowSampling, logits_row: torch.Tensor, others: list[RowSampling], at: int, seed: int) -> int:
    """The token `row` draws when placed at index `at` among `others` (with their own random logits)."""
    rows = [*others[:at], row, *others[at:]]
    logits = padded_logits(len(rows), seed=100 + at + len(others))
    logits[at] = logits_row
    return int(BatchSampler("cpu", VOCAB, seed=seed)(logits, rows).tokens[at])


def test_seeded_rows_depend_only_on_seed_and_position():
    logits_row = padded_logits(1, seed=6, scale=0.3)[0]  # nearly flat: many tokens are likely
    row = RowSampling(temperature=1.0, top_p=0.95, seed=1234, position=17)
    others = [RowSampling(temperature=0.8, seed=7, position=17), RowSampling(), RowSampling(temperature=1.0),
              RowSampling(temperature=1.2, top_k=5, repetition_penalty=1.3, history=(1, 2, 2)),
              RowSampling(temperature=1.0, seed=1234, position=18), RowSampling(temperature=0.5, min_p=0.1)]
    alone = seeded_token(row, logits_row, [], 0, seed=0)
    batches = [(others, 0), (others, 3), (others, 6), (others[::-1], 2), (others[2:4], 1), (others[:1], 1)]
    for n, (batch, at) in enumerate(batches):  # each with a differently seeded sampler: seeded rows ignore it
        assert seeded_token(row, logits_row, batch, at, seed=n + 1) == alone, f"batch {n}: row at {at} of {batch}"
    by_position = {seeded_token(replace(row, position=p), logits_row, others, 2, seed=0) for p in range(8)}
    assert len(by_position) > 1, "eight positions drew the same token"


def test_unseeded_rows_follow_the_samplers_seed():
    logits = padded_logits(64, seed=7, scale=0.3)
    rows = [RowSampling(temperature=1.0)] * 64

    def draw(seed: int) -> torch.Tensor:
        return BatchSampler("cpu", VOCAB, seed=seed)(logits, rows).tokens

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


@pytest.mark.parametrize("temperature", [1e-30, 1e-300])
def test_tiny_temperature_is_the_argmax(temperature):
    logits = padded_logits(4, seed=8)
    rows = [RowSampling(temperature=temperature), RowSampling(temperature=temperature, top_p=0.9),
            RowSampling(temperature=temperature, top_k=3, min_p=0.1), RowSampling(temperature=temperature, seed=3)]
    out = BatchSampler("cpu", VOCAB, seed=0)(logits, rows, return_probs=True)
    argmax = logits[:, :VOCAB].argmax(-1)
    assert_equal(out.tokens, argmax, "tokens")
    assert_equal(out.probs, torch.nn.functional.one_hot(argmax, VOCAB).float(), "probs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_greedy_rows_take_one_argmax(dtype, caplog):
    logits = padded_logits(5, seed=9, dtype=dtype)
    with caplog.at_level(logging.DEBUG, logger="realm.runtime.sampler"):
        out = BatchSampler("cpu", VOCAB)(logits, [RowSampling()] * 5, return_probs=True)
    assert "one argmax" in caplog.text
    assert_equal(out.tokens, logits[:, :VOCAB].argmax(-1), "tokens")
    assert_equal(out.probs, torch.nn.functional.one_hot(out.tokens, VOCAB).float(), "probs")
    assert BatchSampler("cpu", VOCAB)(logits, [RowSampling()] * 5).probs is None


def test_empty_batch():
    out = BatchSampler("cpu", VOCAB)(torch.zeros(0, VOCAB), [], return_probs=True)
    assert out.tokens.shape == (0,) and out.probs.shape == (0, VOCAB)


@pytest.mark.parametrize("logits,rows,message", [
    (torch.zeros(3, VOCAB), [RowSampling()] * 2, "2 RowSampling for 3 logits rows"),
    (torch.zeros(VOCAB), [RowSampling()], "2-D"),
    (torch.zeros(1, VOCAB - 1), [RowSampling()], "fewer than vocab_size"),
    (torch.zeros(1, VOCAB, dtype=torch.long), [RowSampling()], "float"),
    (torch.zeros(1, VOCAB), [RowSampling(repetition_penalty=1.2, history=(VOCAB,))], "history ids"),
])
def test_bad_inputs_raise(logits, rows, message):
    with pytest.raises(ValueError, match=message):
        BatchSampler("cpu", VOCAB)(logits, rows)


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("temperature", math.inf), ("top_k", -1),
                                         ("top_p", 0.0), ("min_p", 1.5), ("repetition_penalty", 0.0),
                                         ("seed", -1), ("position", -1)])
def test_bad_row_sampling_raises(field, value):
    with pytest.raises(ValueError, match=field):
        RowSampling(**{field: value})


@pytest.mark.parametrize("vocab_size", [0, 1.5, True])
def test_bad_vocab_size_raises(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        BatchSampler("cpu", vocab_size)


def test_row_sampling_is_plain_data():
    row = RowSampling.of(SamplingParams(temperature=0.8, top_k=4, repetition_penalty=1.1, seed=3), 9, [5, 6, 5])
    assert row == RowSampling(temperature=0.8, top_k=4, repetition_penalty=1.1, seed=3, position=9, history=(5, 6, 5))
    assert pickle.loads(pickle.dumps(row)) == row
    assert not row.greedy and RowSampling().greedy
    assert RowSampling.of(SamplingParams(temperature=0.8), 9, [5, 6, 5]).history == ()
    assert RowSampling.of(SamplingParams(repetition_penalty=1.1), 2, torch.tensor([5, 6])).history == (5, 6)


@pytest.mark.parametrize("width", [1, 7, 49152])
def test_first_argmax_is_argmax_with_ties_and_nans(width):
    """The greedy token is argmax's: the first of tied maxima, a NaN where a row has one (the runner flags the row)."""
    g = torch.Generator().manual_seed(width)
    x = torch.randint(0, 3, (6, width), generator=g).float()  # many ties
    x[1, width // 2] = float("nan")
    x[2] = float("-inf")
    x[3, -1] = float("inf")
    assert_equal(first_argmax(x), x.argmax(-1))
