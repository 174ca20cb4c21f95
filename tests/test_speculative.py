"""Speculative decoding (realm.runtime.speculative): proposers, the acceptance rule, the engine's verification.

The acceptance tests: greedy speculative output is token for token the plain output (both proposers, both backends,
mixed batches with preemption and prefix caching, stop strings and max_tokens inside an accepted run); sampled
speculative output has the target's distribution (a chi-square test against the exact distribution of a tiny model
with a 6-token vocabulary, which a wrong acceptance rule fails); a seeded run is reproducible; truncating rejected
proposals never leaks a block nor puts an unverified token in the prefix cache (a property test on the scheduler).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_gguf import StubTokenizer, write_tiny_llama

from realm.runtime import (
    LLM,
    Backend,
    BlockManager,
    Engine,
    EngineConfig,
    FinishReason,
    Model,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    Sequence,
    backends_for,
    load_weights,
)
from realm.runtime import sampler as sampler_module
from realm.runtime.block_manager import block_hashes
from realm.runtime.sampler import BatchSampler, RowSampling
from realm.runtime.speculative import (
    ACCEPT_DECAY,
    LOCKSTEP,
    MAX_SPECULATIVE_TOKENS,
    Acceptance,
    Candidate,
    CostModel,
    NgramIndex,
    PromptLookup,
    SpeculationController,
    SpeculativeConfig,
    expected_tokens,
    match_ngram,
    propose_ngram,
)

P_VALUE = 1e-4  # the chi-square tests' level: runs are seeded, so a pass is deterministic; a wrong rule fails by far


def fixed(method: str, k: int = 4, **kw) -> SpeculativeConfig:
    """Speculation at a fixed k (adaptive k may decide not to speculate on tiny models, where nothing is costly)."""
    return SpeculativeConfig(method, num_speculative_tokens=k, adaptive=False, **kw)


# ---- n-gram proposals and settings -------------------------------------------------------------------------------

def test_ngram_proposes_what_followed_the_longest_match():
    ids = [5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 2, 3]
    # suffix (2, 3): latest earlier occurrence at 7..8, followed by 7, 8, 4
    assert propose_ngram(ids, 3, 1, 2) == [7, 8, 4]
    assert propose_ngram(ids, 2, 1, 2) == [7, 8]
    # the longest n first: (4, 2, 3) never occurred before, (2, 3) did
    assert propose_ngram(ids, 5, 1, 3) == [7, 8, 4, 2, 3]
    assert propose_ngram(ids, 5, 3, 3) == []  # only 3-grams allowed: none matches
    assert propose_ngram([1, 2, 3], 4) == []  # nothing repeats
    assert propose_ngram([1], 4) == []
    assert propose_ngram([7, 7], 4) == [7]  # the continuation may run into the suffix itself
    assert propose_ngram([1, 2, 1, 2, 1], 4, 1, 2) == [2, 1]


def test_ngram_takes_the_occurrence_followed_by_the_most_frequent_next_token():
    # the suffix 1 occurred at 0, 2 and 4, followed by 5, 5 and 6: 5 is the more frequent, its latest occurrence at 2
    ids = [1, 5, 1, 5, 1, 6, 1]
    assert propose_ngram(ids, 2, 1, 1) == [5, 1]
    assert NgramIndex(1, 1).match(ids, 2) == ([5, 1], 1)
    # a tie between next tokens: the latest occurrence (1 followed by 5 at 0, by 6 at 2)
    assert propose_ngram([1, 5, 1, 6, 1], 3, 1, 1) == [6, 1]
    # a longer match wins over a more frequent shorter one: (3, 1) occurred once, followed by 7
    assert propose_ngram([1, 5, 1, 5, 3, 1, 7, 3, 1], 2, 1, 2) == [7, 3]


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(0, 3), min_size=0, max_size=60),
       cuts=st.lists(st.tuples(st.integers(1, 7), st.integers(0, 3)), min_size=1, max_size=12),
       bounds=st.tuples(st.integers(1, 4), st.integers(0, 3)), k=st.integers(1, 6))
def test_ngram_index_matches_the_scan_as_the_sequence_grows_and_is_cut(tokens, cuts, bounds, k):
    """The engine's incremental index answers as match_ngram's scan of the whole sequence after every growth (a
    step's accepted tokens) and after cuts (truncation; a small vocabulary: many repeats, many candidates)."""
    ngram_min, ngram_max = bounds[0], bounds[0] + bounds[1]
    index = NgramIndex(ngram_min, ngram_max)
    seq, at = [], 0
    for grow, cut in cuts:
        seq += tokens[at : at + grow]
        at += grow
        if cut and cut < len(seq):  # cut, then replaced by other tokens: the index must not keep what was cut
            seq[-cut:] = [(t + 1) % 4 for t in seq[-cut:]]
        assert index.match(seq, k) == match_ngram(seq, k, ngram_min, ngram_max)


def test_lockstep_keeps_copying_through_a_changed_token():
    text = [1, 2, 3, 4, 5, 6, 7, 8, 0]
    lookup, plain = PromptLookup(1, 4), PromptLookup(1, 4, lockstep=False)
    seq = [*text, 1, 2]
    assert lookup.propose(seq, 4) == plain.propose(seq, 4) == ([3, 4, 5, 6], 2)
    seq += [3, 9]  # 3 accepted, then 9 where the text has 4: no n-gram ends in 9
    assert plain.propose(seq, 4) == ([], 0)
    assert lookup.propose(seq, 4) == ([5, 6, 7, 8], LOCKSTEP)  # 9 stood for 4: the text goes on after it
    seq += [11]  # rejected again: one token more in lockstep
    assert lookup.propose(seq, 2) == ([6, 7], LOCKSTEP)
    seq += [6]  # an n-gram matches again and takes over
    assert lookup.propose(seq, 2) == ([7, 8], 1)
    # nothing was being copied: nothing to go on with
    assert PromptLookup(1, 4).propose([5, 6, 7], 3) == ([], 0)


def test_lockstep_stops_at_the_text_it_copied_and_forgets_it_when_cut():
    lookup = PromptLookup(1, 4)
    seq = [1, 2, 3, 1]
    assert lookup.propose(seq, 4) == ([2, 3, 1], 1)
    # 9 10 11 12 replaced 2 3 1 and more: lockstep would read past the text the proposal came from
    assert lookup.propose([*seq, 9, 10, 11, 12], 4) == ([], 0)
    lookup = PromptLookup(1, 4)
    assert lookup.propose([1, 2, 3, 4, 5, 1], 2) == ([2, 3], 1)
    # cut below the last proposal's length (preemption, truncation) and regrown otherwise: not followed
    assert lookup.propose([7, 8, 9], 2) == ([], 0)


@settings(max_examples=100, deadline=None)
@given(tokens=st.lists(st.integers(0, 5), min_size=1, max_size=50), grows=st.lists(st.integers(1, 5), min_size=1,
       max_size=10), k=st.integers(1, 6), ngram_max=st.sampled_from([2, 4, 20]))
def test_prompt_lookup_proposes_the_ngram_match_wherever_one_exists(tokens, grows, k, ngram_max):
    """Its n-gram proposals are match_ngram's (through an NgramIndex, or a scan above NGRAM_INDEX_MAX); lockstep
    proposals only where no n-gram matches, and only tokens of the sequence."""
    lookup, seq, at = PromptLookup(1, ngram_max), [], 0
    for grow in grows:
        seq += tokens[at : at + grow]
        at += grow
        proposal, kind = lookup.propose(seq, k)
        expected = match_ngram(seq, k, 1, ngram_max)
        if expected[1]:
            assert (proposal, kind) == expected
        else:
            assert kind in (0, LOCKSTEP) and len(proposal) <= k and (kind == LOCKSTEP) == bool(proposal)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(num_speculative_tokens=0), "num_speculative_tokens must be an integer >= 1"),
    (dict(num_speculative_tokens=MAX_SPECULATIVE_TOKENS + 1), "must be <= 15"),
    (dict(ngram_min=3, ngram_max=2), "n-gram bounds are reversed"),
    (dict(ngram_min=0), "ngram_min must be an integer >= 1"),
    (dict(method="medusa"), "unknown speculative method 'medusa'"),
    (dict(adaptive="yes"), "adaptive must be True or False"),
    (dict(ngram_lockstep=1), "ngram_lockstep must be True or False"),
])
def test_bad_settings_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig(**kwargs)
    with pytest.raises(ValueError, match="speculative must be None, a method name"):
        SamplingParams(speculative=4)
    assert SamplingParams(speculative="ngram").speculative == SpeculativeConfig("ngram")
    assert EngineConfig(speculative="none").speculative.enabled is False


# ---- the acceptance rule -----------------------------------------------------------------------------------------

def test_verify_greedy_keeps_the_proposals_equal_to_the_argmax():
    sampler = BatchSampler("cpu", 5, seed=0)
    logits = torch.tensor([[0, 3, 0, 0, 0], [0, 0, 0, 4, 0], [1, 0, 0, 0, 0], [0, 0, 2, 0, 0]], dtype=torch.float32)
    out = sampler.verify(logits, [RowSampling()] * 4, [1, 3, 4, -1])
    assert out.tokens.tolist() == [1, 3, 0, 2]
    assert out.accept.tolist() == [True, True, False, False]


def _first_token_histogram(rule, p_logits, q, draws, monkeypatch, seeded=False) -> torch.Tensor:
    """Counts of the first emitted token over `draws` verifications of one proposal drawn from q (one-hot q when
    None: n-gram), under `rule` (None: realm's)."""
    if rule is not None:
        monkeypatch.setattr(sampler_module, "_accepts", rule)
    vocab = p_logits.shape[0]
    g = torch.Generator().manual_seed(1)
    proposals = torch.full((draws,), 2) if q is None else torch.multinomial(q, draws, replacement=True, generator=g)
    rows, proposed, logits = [], [], []
    for i, d in enumerate(proposals.tolist()):
        rows += [RowSampling(temperature=1.0, seed=i if seeded else None, position=10),
                 RowSampling(temperature=1.0, seed=i if seeded else None, position=11)]
        proposed += [d, -1]
        logits += [p_logits, p_logits]
    draft_probs = None if q is None else torch.stack([q, torch.zeros(vocab)] * draws)
    out = BatchSampler("cpu", vocab, seed=2).verify(torch.stack(logits), rows, proposed, draft_probs)
    accept, tokens = out.accept.view(draws, 2)[:, 0], out.tokens.view(draws, 2)[:, 0]
    first = torch.where(accept, proposals, tokens)
    return torch.bincount(first, minlength=vocab).double()


def _chi2_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1  # the chi-square survival function: the regularised upper incomplete gamma function
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_verify_sampled_emits_exactly_the_target_distribution(draft, monkeypatch):
    """The token a verification emits first (the accepted proposal, or the residual's draw) is distributed as p, for
    a draft distribution q far from p; accepting only when p >= q (a plausible mistake) is caught by the same test."""
    p_logits = torch.tensor([1.0, 0.2, -0.5, 0.8, -2.0, 0.0])
    p = p_logits.softmax(-1)
    q = None if draft == "ngram" else torch.tensor([0.05, 0.4, 0.3, 0.05, 0.15, 0.05])
    counts = _first_token_histogram(None, p_logits, q, 20000, monkeypatch)
    assert _chi2_p(counts, p) > P_VALUE
    seeded = _first_token_histogram(None, p_logits, q, 4000, monkeypatch, seeded=True)
    assert _chi2_p(seeded, p) > P_VALUE  # keyed draws (one generator per seed) are as good
    wrong = _first_token_histogram(lambda u, p_d, q_d: p_d >= q_d, p_logits, q, 20000, monkeypatch)
    assert _chi2_p(wrong, p) < P_VALUE


# ---- tiny models -------------------------------------------------------------------------------------------------

DIMS = dict(hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn=96, vocab=48)
PROMPTS = [[3, 17, 42, 8, 8, 0, 3, 17, 42, 21, 5, 30, 11], [40, 41], [1, 2, 3, 1, 2, 3, 1, 2], [9], [7, 7, 7, 7],
           [12, 30, 12, 30, 12, 30, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
MAX_TOKENS = [20, 14, 24, 9, 17, 12]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Target models (both backends) and two drafts of the same vocabulary: another random model and the target."""
    root = tmp_path_factory.mktemp("spec")
    write_tiny_llama(root / "target.gguf", dims=DIMS, formats={"attn_q": "Q8_0", "ffn_down": "Q4_0"},
                     context_length=96)
    write_tiny_llama(root / "draft.gguf", dims={**DIMS, "layers": 1}, seed=5, context_length=96)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = {b: Model(load_weights(root / "target.gguf"), StubTokenizer(DIMS["vocab"]), b, device, torch.float32)
              for b in backends_for(device)}
    other = {b: Model(load_weights(root / "draft.gguf"), StubTokenizer(DIMS["vocab"]), b, device, torch.float32)
             for b in backends_for(device)}
    return target, other


def greedy(n: int, spec=None, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True, speculative=spec, **kw)


def plain_outputs(model, prompts=PROMPTS, max_tokens=MAX_TOKENS):
    return [model.generate(p, greedy(n)).token_ids for p, n in zip(prompts, max_tokens, strict=True)]


@pytest.mark.parametrize(("method", "draft", "kv_blocks", "prefix_caching", "backend"), [
    ("ngram", None, None, True, Backend.TORCH),
    ("ngram", None, 14, True, Backend.TORCH),   # preemption
    ("ngram", None, 14, False, Backend.TORCH),
    ("draft", "other", None, True, Backend.TORCH),
    ("draft", "self", 14, True, Backend.TORCH),  # every proposal accepted: long runs, preemption
    ("ngram", None, 14, True, Backend.ONEDNN),
    ("draft", "other", None, True, Backend.ONEDNN),
])
def test_greedy_speculation_equals_plain_decoding(tiny, method, draft, kv_blocks, prefix_caching, backend):
    """Many prompts in one batch; max_batch_tokens=10 chunks the long prompts beside other sequences'
    verifications and cuts some proposal runs short; 14 blocks of 4 force preemptions."""
    target, other = tiny
    if backend not in target:
        pytest.skip(f"the {backend.value} backend does not run on {next(iter(target.values())).device}")
    model = target[backend]
    model.set_draft_model({"other": other[backend], "self": model, None: None}[draft])
    try:
        want = plain_outputs(model)
        for adaptive in (False, True):
            spec = SpeculativeConfig(method, num_speculative_tokens=4, adaptive=adaptive)
            llm = LLM(model, max_batch_tokens=10, kv_blocks=kv_blocks, block_size=4, prefix_caching=prefix_caching)
            outs = llm.generate(PROMPTS * 2, [greedy(n, spec) for n in MAX_TOKENS * 2])
            assert [o.token_ids for o in outs] == want * 2
            assert all(o.finish_reason is FinishReason.LENGTH for o in outs)
            stats = llm.engine.spec_stats
            if not adaptive:
                assert stats.proposed > 0 and stats.verifications > 0
                assert stats.proposed == sum(o.timings.proposed_tokens for o in outs)
                assert stats.accepted == sum(o.timings.accepted_tokens for o in outs)
            if draft == "self" and not adaptive:
                assert stats.accepted == stats.proposed  # a draft equal to the target is always right
            if kv_blocks is not None and not adaptive:
                assert llm.engine.scheduler.stats.preemptions > 0
            llm.engine.blocks.check([])
            assert llm.engine.blocks.num_used == 0
    finally:
        model.set_draft_model(None)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_speculation_equals_plain_on_the_triton_backend(tiny, method):
    """The Triton kernels (interpreter on CPU), verification chunks through the verification attention path."""
    target, other = tiny
    model = target[Backend.TRITON]
    model.set_draft_model(other[Backend.TRITON] if method == "draft" else None)
    try:
        prompts, max_tokens = PROMPTS[:3], [10, 6, 12]
        want = plain_outputs(model, prompts, max_tokens)
        llm = LLM(model, max_batch_tokens=12, block_size=4)
        outs = llm.generate(prompts, [greedy(n, fixed(method, 3)) for n in max_tokens])
        assert [o.token_ids for o in outs] == want
        assert llm.engine.spec_stats.verifications > 0
    finally:
        model.set_draft_model(None)


def test_stop_strings_and_max_tokens_cut_an_accepted_run_where_plain_decoding_stops(tiny):
    """The draft is the target itself: every proposal passes, so stops fall inside accepted runs."""
    model = tiny[0][Backend.TORCH]
    model.set_draft_model(model)
    try:
        prompt = PROMPTS[2]
        full = model.generate(prompt, greedy(24)).token_ids
        stop = "".join(f"<{t}>" for t in full[6:8])  # the text of tokens 6..7
        for params in (greedy(24, stop=stop), greedy(5), greedy(7), greedy(1)):
            want = model.generate(prompt, params)
            for spec in (fixed("draft", 4), fixed("ngram", 4), fixed("draft", 15)):
                got = model.generate(prompt, dataclasses.replace(params, speculative=spec))
                assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text,
                                                                        want.finish_reason)
    finally:
        model.set_draft_model(None)


def test_sampled_speculation_is_seeded_reproducible(tiny):
    target, other = tiny
    model = target[Backend.TORCH]
    model.set_draft_model(other[Backend.TORCH])
    try:
        for method in ("ngram", "draft"):
            params = [SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=s, ignore_eos=True,
                                     speculative=SpeculativeConfig(method)) for s in range(4)]
            runs = [[o.token_ids for o in LLM(model, max_batch_tokens=16).generate(PROMPTS[:4], params)]
                    for _ in range(2)]
            assert runs[0] == runs[1]
            assert len({tuple(r) for r in runs[0]}) > 1
    finally:
        model.set_draft_model(None)


# ---- the sampled distribution, end to end ------------------------------------------------------------------------

STAT_DIMS = dict(hidden=32, n_heads=2, n_kv_heads=1, head_dim=16, ffn=48, vocab=6, layers=1)
STAT_DRAWS = 1500  # requests per run (the torch reference attends sequence by sequence: ~5 ms per 1000 rows)
STAT_PROMPT = [1, 2, 1, 2, 1]
STAT_TOKENS = 4  # t1 sampled after the prompt; t2..t4 verified (k = 2 proposals, then the bonus)


@pytest.fixture(scope="module")
def stat_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("stat")
    write_tiny_llama(root / "t.gguf", dims=STAT_DIMS, seed=11, context_length=16)
    write_tiny_llama(root / "d.gguf", dims=STAT_DIMS, seed=12, context_length=16)
    make = lambda p: Model(load_weights(p), StubTokenizer(6), Backend.TORCH, torch.device("cpu"), torch.float32)  # noqa: E731
    target, draft = make(root / "t.gguf"), make(root / "d.gguf")
    target.set_draft_model(draft)
    return target


def _exact_marginals(model: Model, temperature: float) -> list[torch.Tensor]:
    """P(t_i = v) for i = 1..STAT_TOKENS, by enumerating every continuation (6^3 prefixes)."""
    vocab = STAT_DIMS["vocab"]
    tails = list(itertools.product(range(vocab), repeat=STAT_TOKENS - 1))
    tokens = torch.tensor([STAT_PROMPT + list(t) for t in tails])
    with torch.no_grad():
        probs = (model.forward(tokens).double() / temperature).softmax(-1)  # [tails, len, vocab]
    n = len(STAT_PROMPT)
    marginals = [probs[0, n - 1]]
    joint = torch.ones(len(tails), dtype=torch.float64)  # P(t_1 .. t_i) of each tail's first i tokens
    for i in range(1, STAT_TOKENS):
        prev = torch.tensor([t[i - 1] for t in tails])
        joint = joint * probs[torch.arange(len(tails)), n - 2 + i, prev]
        # each prefix t_1..t_i appears vocab^(STAT_TOKENS - 1 - i) times among the tails
        weight = joint / vocab ** (STAT_TOKENS - 1 - i)
        marginals.append((weight[:, None] * probs[:, n - 1 + i]).sum(0))
    return marginals


def _sampled_marginals(model: Model, spec, draws: int, temperature: float) -> list[torch.Tensor]:
    engine = Engine(model, EngineConfig(max_batch_tokens=4096, max_num_seqs=512, kv_blocks=2048, block_size=4),
                    seed=3)
    params = SamplingParams(max_tokens=STAT_TOKENS, temperature=temperature, ignore_eos=True, speculative=spec)
    requests = [engine.add_request(STAT_PROMPT, params) for _ in range(draws)]
    engine.run()
    outs = torch.tensor([r.completion.token_ids for r in requests])
    # every request verified proposals (the draft always proposes; n-gram where t1 continues a repeat)
    assert engine.spec_stats.verifications >= (draws if spec.method.value == "draft" else draws // 2)
    return [torch.bincount(outs[:, i], minlength=STAT_DIMS["vocab"]).double() for i in range(STAT_TOKENS)]


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_sampled_speculation_has_the_target_distribution(stat_models, method, monkeypatch):
    """Each generated position's token distribution equals the exact one (chi-square, 6 tokens), through the
    engine; with the draft model, the same test fails when proposals are accepted only where p >= q (the rule
    itself is tested for both proposers, with more draws, in test_verify_sampled_emits_exactly_the_target_...)."""
    model = stat_models
    exact = _exact_marginals(model, 1.0)
    spec = fixed(method, 2)
    counts = _sampled_marginals(model, spec, STAT_DRAWS, 1.0)
    assert min(_chi2_p(c, p) for c, p in zip(counts, exact, strict=True)) > P_VALUE / STAT_TOKENS
    if method == "draft":
        monkeypatch.setattr(sampler_module, "_accepts", lambda u, p, q: p >= q)
        wrong = _sampled_marginals(model, spec, STAT_DRAWS, 1.0)
        assert min(_chi2_p(c, p) for c, p in zip(wrong, exact, strict=True)) < P_VALUE


# ---- adaptivity --------------------------------------------------------------------------------------------------

def test_a_count_not_measured_for_max_age_steps_is_forgotten():
    """A count measured under another batch (its step time from other sequences and contexts) must not price this
    batch's proposals: the level follows the machine's speed, not a change of batch."""
    cost = CostModel(max_age=10)
    cost.add(40, 0.20)  # a big batch's step with proposals, long ago
    for i in range(10):
        cost.add(31 + i % 2, 0.07)
    assert set(cost.table()) == {31, 32, 40}  # measured 10 steps ago: still kept
    cost.add(32, 0.07)
    assert set(cost.table()) == {31, 32} and cost.relative_error(40) == 0.0
    cost.add(33, 0.071)  # a count measured again is kept again
    assert set(cost.table()) == {31, 32, 33}
    for _ in range(20):  # but two counts stay, however old: with fewer the controller would explore again
        cost.add(32, 0.07)
    assert set(cost.table()) == {32, 33}


def test_expected_tokens_and_the_cost_model():
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert math.isclose(expected_tokens(0.5, 2), 1.75)
    cost = CostModel()
    assert cost.fit() is None
    for n in (1, 5, 9):
        cost.add(n, 0.010 + 0.002 * n)
    a, b = cost.fit()
    assert math.isclose(a, 0.010, abs_tol=1e-9) and math.isclose(b, 0.002, abs_tol=1e-9)


def test_the_cost_fit_is_least_squares_over_every_kept_sample_and_follows_each_step():
    """fit() sums per token count (cached between steps); it must be the least-squares line through the samples
    themselves, at the machine's speed now."""
    rng = np.random.default_rng(3)
    cost = CostModel()
    for _ in range(60):
        n = int(rng.integers(1, 12))
        cost.add(n, float(0.03 + 0.002 * n + 0.004 * rng.random()))  # rising: the fit keeps b >= 0
    n, t = zip(*cost.samples, strict=True)
    b, a = np.polyfit(n, t, 1)
    assert cost.fit() == pytest.approx((a, b), rel=1e-9)
    cost.add(40, 0.2)  # a new step: a new line, not the cached one
    n, t = zip(*cost.samples, strict=True)
    assert cost.fit() == pytest.approx(tuple(reversed(np.polyfit(n, t, 1))), rel=1e-9)


def test_controller_speculates_when_cheap_and_stops_when_each_token_costs():
    """Memory-bound steps (a large fixed cost, tokens nearly free) get the full k for sequences that accept;
    compute-bound ones (time proportional to tokens) get none: speculation would only slow them down."""
    cheap, dear = SpeculationController(), SpeculationController()
    for n in range(1, 40, 3):
        cheap.observe_step(n, 0.050 + 0.001 * n)
        dear.observe_step(n, 0.0001 + 0.010 * n)
    for c in (cheap, dear):
        for _ in range(6):
            c.observe_verification(1, 4, 3)  # sequence 1 accepts most of its proposals
            c.observe_verification(2, 4, 0)  # sequence 2 none
    candidates = [Candidate(1, 4), Candidate(2, 4)]
    k = cheap.choose(candidates, base_tokens=2, decoding=2)
    assert k.get(1) == 4 and k.get(2, 0) < 4
    assert dear.choose(candidates, base_tokens=32, decoding=32) == {}


def test_acceptance_counts_first_and_following_proposals_apart():
    a = Acceptance()
    assert a.first == a.then == 0.5  # the prior
    a.update(4, 0)  # the first proposal rejected: one first trial, no following one tried
    assert (a.first_accepted, a.first_rejected, a.then_accepted, a.then_rejected) == (0, 1, 0, 0)
    a.update(4, 2)  # first passed; of the following, one passed and the next was rejected
    assert (a.first_accepted, a.first_rejected) == (1, ACCEPT_DECAY)
    assert (a.then_accepted, a.then_rejected) == (1, 1)
    a.update(3, 3)  # all passed: no rejection
    assert a.then_accepted == 1 * ACCEPT_DECAY + 2 and a.then_rejected == ACCEPT_DECAY
    assert math.isclose(a.gain(3), a.first * a.then**2)


def test_controller_gives_copying_sequences_long_proposals():
    """Prompt lookup's proposals are right for many tokens or wrong at once. A sequence that rejects its first
    proposal three times, then accepts all 8, gets two rates: under half for first proposals, nearly all for the
    following ones. One per-token rate (~0.85 here) would count the rejected first proposals against every position,
    so that each further proposal looks 15% less likely to pass: at these costs it stops at 5 (checked while writing
    this test); the two rates take all 8."""
    c = SpeculationController()
    for n in range(1, 40, 3):
        c.observe_step(n, 0.050 + 0.010 * n)
    for _ in range(4):
        for _ in range(3):
            c.observe_verification(1, 8, 0)
        c.observe_verification(1, 8, 8)
    est = c.estimate(1)
    assert est.first < 0.5 and est.then > 0.9
    assert c.choose([Candidate(1, 8)], base_tokens=1, decoding=1) == {1: 8}


def test_controller_never_takes_a_larger_step_for_a_cheaper_one():
    """Per-count means are noisy and the machine drifts between the steps that measured them: 40 rows measured in a
    faster moment than 32 must not make 8 proposals look like a saving. Priced at plain's cost (never less), their
    expected tokens are within the noise of plain's time, and none is taken."""
    c = SpeculationController()
    for i in range(8):
        c.observe_step(32, 0.120 * (1 + 0.1 * (-1) ** i))
        c.observe_step(40, 0.100)
    for _ in range(6):
        c.observe_verification(1, 8, 1)
    assert c.choose([Candidate(1, 8)], base_tokens=32, decoding=32) == {}


def test_cost_model_follows_the_machine_speed_across_counts():
    """16 rows measured while the machine ran 1.5x slower, then single rows at full speed: the costs compare more as
    the step sizes do (16 rows cost 2x one) than as the minutes they were measured in (3x without the level). Only
    part of the way: while one count alone is measured, the machine's speed and that count's own cost cannot be told
    apart, and the level takes part of the change (LEVEL_RATE). The machine's drift still counts as noise for the
    margin."""
    cost = CostModel()
    for _ in range(8):  # the slow minute: both counts
        cost.add(1, 0.015)
        cost.add(16, 0.030)
    for _ in range(30):  # the fast one: single rows only
        cost.add(1, 0.010)
    table = cost.table()
    assert table[1] == pytest.approx(0.010, rel=0.02)
    assert 2.0 < table[16] / table[1] < 2.5
    assert cost.predictor()(16) == pytest.approx(table[16])
    assert CostModel().relative_error(1) == 0.0 and cost.relative_error(16) == 0.0
    drifting = CostModel()
    for t in (0.010, 0.011, 0.012, 0.013):
        drifting.add(1, t)
    assert drifting.relative_error(1) > 0.05  # of the times as measured


def test_controller_does_not_bet_on_a_gain_within_the_noise():
    """One proposal beside 8 decodes, expected to add about 7% more tokens for 0.5% more time: taken when the
    plain step's measured time is steady, not when its standard error (+-10% samples: 3.8%) puts that gain within
    two standard errors."""
    for spread, speculates in ((0.0, True), (0.10, False)):
        c = SpeculationController()
        for i in range(8):
            c.observe_step(8, 0.100 * (1 + spread * (-1) ** i))
            c.observe_step(9, 0.1005)
        for _ in range(10):
            c.observe_verification(1, 1, 0)
        for _ in range(4):
            c.observe_verification(1, 1, 1)
        assert (c.choose([Candidate(1, 1)], base_tokens=8, decoding=8) == {1: 1}) is speculates, spread
    assert c.target.relative_error(8) > 0.03 and c.target.relative_error(9) == 0.0


def test_controller_values_tokens_that_do_not_shorten_the_run_at_their_row():
    """In a draining batch, a token accepted for a sequence that will not finish last saves only its row in a later
    step. Where a row costs half the step's time per sequence (near compute-bound), a sequence accepting 60% of
    its proposals pays as the critical one, and not otherwise."""
    c = SpeculationController()
    for n in range(8, 41, 4):
        c.observe_step(n, 0.040 + 0.005 * n)  # at 8 rows: 10 ms per sequence, 5 ms of it the row's own
    for _ in range(6):
        c.observe_verification(1, 4, 2)
        c.observe_verification(2, 4, 2)
    k = c.choose([Candidate(1, 4, critical=True), Candidate(2, 4, critical=False)], base_tokens=8, decoding=8)
    assert k.get(1, 0) >= 1 and 2 not in k
    assert c.choose([Candidate(2, 4, critical=False)], base_tokens=8, decoding=8) == {}


def test_the_engine_marks_the_sequence_that_finishes_last(tiny, monkeypatch):
    """Critical: every sequence while requests wait; else only the one with the most tokens left (none when
    several tie for it)."""
    seen = []
    choose = SpeculationController.choose

    def spy(self, candidates, *args, **kw):
        candidates = list(candidates)
        seen.append({c.seq_id: c.critical for c in candidates})
        return choose(self, candidates, *args, **kw)

    monkeypatch.setattr(SpeculationController, "choose", spy)
    model = tiny[0][Backend.TORCH]
    spec = SpeculativeConfig("ngram", num_speculative_tokens=2)
    prompt = list(range(DIMS["vocab"]))  # every token occurred: a 1-gram proposal at every step
    for budgets, waiting, want in (((12, 6), False, [True, False]), ((9, 9), False, [False, False]),
                                   ((12, 6), True, [True, True])):
        seen.clear()
        engine = Engine(model, EngineConfig(max_num_seqs=2, block_size=4, kv_blocks=64))
        ids = [engine.add_request(prompt, greedy(n, spec)).seq.seq_id for n in budgets]
        if waiting:
            engine.add_request(prompt, greedy(4, spec))  # a third: it waits for a slot
        engine.step()  # the prefills
        engine.step()
        assert seen and seen[0] == dict(zip(ids, want, strict=True)), (budgets, waiting, seen)


def test_the_engine_prices_proposals_by_decode_steps_only(tiny):
    """Prefill tokens cost far less than rows with logits (the output head, sampling): a step with a prefill chunk
    is not a measure of what proposals cost, and the controller's cost model never sees one."""
    model = tiny[0][Backend.TORCH]
    llm = LLM(model, max_batch_tokens=64, block_size=4)
    prompt = list(range(3, 40))  # a 37-token prefill: more tokens than any decode or verification step here
    llm.generate([prompt, prompt[::-1]], [greedy(12, SpeculativeConfig("ngram", num_speculative_tokens=4))] * 2)
    sizes = set(llm.engine.speculation.target.table())
    assert sizes and max(sizes) <= 2 * (4 + 1), sizes


def test_controller_explores_before_it_has_a_cost_model():
    c = SpeculationController()
    candidates = [Candidate(1, 3)]
    assert c.choose(candidates, 1, 1) == {1: 3}  # nothing measured: speculate
    c.observe_step(4, 0.01)
    assert c.choose(candidates, 1, 1) == {}  # one size measured: measure a plain step too
    c.observe_step(1, 0.01)
    assert c.choose(candidates, 1, 1) == {1: 3}  # flat cost: speculation is free


def test_draft_model_errors(tiny, tmp_path):
    target, _ = tiny
    model = target[Backend.TORCH]
    engine = Engine(model, EngineConfig(kv_blocks=32))
    with pytest.raises(ValueError, match="needs a draft model"):
        engine.add_request([1, 2, 3], SamplingParams(speculative="draft"))
    write_tiny_llama(tmp_path / "other_vocab.gguf", dims={**DIMS, "vocab": 40})
    other = Model(load_weights(tmp_path / "other_vocab.gguf"), StubTokenizer(40), Backend.TORCH, model.device,
                  torch.float32)
    with pytest.raises(ValueError, match="vocabulary has 40 tokens, the target's 48"):
        model.set_draft_model(other)
    assert model.draft is None


# ---- truncation and the prefix cache (no model) ------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_truncating_proposals_never_leaks_blocks_nor_caches_unverified_tokens(data):
    """The engine's protocol on the scheduler alone: proposals appended to decoding sequences, scheduled as far as
    the step has room, verified with a random number accepted, the rest truncated. Small vocabularies make rejected
    proposals look like verified text elsewhere; every full block in the prefix cache must hold a verified prefix."""
    draw = data.draw
    block_size = draw(st.sampled_from([1, 2, 4]), label="block_size")
    blocks = BlockManager(draw(st.integers(6, 30), label="num_blocks"), block_size, prefix_caching=True)
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=draw(st.integers(2, 16), label="budget"),
                                          max_num_seqs=4), blocks)
    rng = random.Random(draw(st.integers(0, 2**16), label="seed"))
    sequences = []
    for i in range(draw(st.integers(1, 4), label="sequences")):
        prompt = [rng.randrange(3) for _ in range(rng.randint(1, 9))]
        seq = Sequence(i, prompt, max_tokens=rng.randint(1, 12), salt=rng.choice([None, "a"]))
        try:
            scheduler.add(seq)
        except ValueError:  # does not fit the cache even alone
            continue
        sequences.append(seq)
    verified: set[bytes] = set()  # hashes of every full block of verified tokens ever (prompts are verified)
    for seq in sequences:
        verified.update(block_hashes(seq.token_ids, block_size, seq.salt))
    for _ in range(200):
        if not scheduler.has_work:
            break
        for seq in scheduler.running:
            room = seq.max_tokens - seq.num_output_tokens - 1
            if seq.remaining == 1 and room > 0 and rng.random() < 0.7:
                seq.propose([rng.randrange(3) for _ in range(rng.randint(1, min(room, 4)))])
        step = scheduler.schedule()
        scheduled = {c.seq.seq_id: c for c in step.chunks}
        for seq in scheduler.running:  # the engine's _keep_scheduled_proposals
            chunk = scheduled.get(seq.seq_id)
            seq.drop_proposals(min(seq.num_draft, chunk.num_unverified if chunk is not None else 0))
        assert all(s.num_draft == 0 for s in scheduler.waiting)
        scheduler.complete(step)
        for chunk in step.chunks:
            seq = chunk.seq
            if not chunk.completes:
                continue
            k = chunk.num_unverified
            accepted = rng.randint(0, k)
            keep = chunk.start + chunk.num_tokens - k + accepted
            scheduler.truncate(seq, keep)
            run = seq.draft_ids
            seq.drop_proposals()
            for token in [*run, rng.randrange(3)]:
                seq.append(token)
                verified.update(block_hashes(seq.token_ids, block_size, seq.salt))
                if seq.num_output_tokens == seq.max_tokens:
                    break
            if seq.num_output_tokens == seq.max_tokens:
                scheduler.finish(seq)
            else:
                scheduler.commit(seq, keep)
        blocks.check([s.kv for s in scheduler.running])
        assert set(blocks.cached) <= verified, "a block of unverified tokens entered the prefix cache"
        for seq in scheduler.running:
            assert seq.num_computed <= seq.num_tokens
    for seq in list(scheduler.running) + list(scheduler.waiting):
        scheduler.finish(seq)
    blocks.check([])
    assert blocks.num_used == 0


# ---- SmolLM2 -----------------------------------------------------------------------------------------------------

QUOTE = ("Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
         "Liberty, and dedicated to the proposition that all men are created equal.")


def test_smollm2_greedy_speculation_equals_plain_decoding(smollm2):
    """A real model, mixed prompts in one batch (quoting, open questions, code), prefix caching and chunked prefill:
    n-gram speculation, fixed k and adaptive, gives the plain tokens, and accepts proposals where the answer quotes."""
    prompts = [smollm2.chat_prompt(f"Repeat this sentence exactly: {QUOTE}"), "The capital of France is",
               smollm2.chat_prompt("What is the capital of France?"), "def fibonacci(n):\n    if n < 2:"]
    want = [smollm2.generate(p, greedy(24)).token_ids for p in prompts]
    for spec in (fixed("ngram", 4), SpeculativeConfig("ngram", num_speculative_tokens=6)):
        llm = LLM(smollm2, max_batch_tokens=64, kv_blocks=128, block_size=16)
        outs = llm.generate(prompts, greedy(24, spec))
        assert [o.token_ids for o in outs] == want
        quote = outs[0].timings
        if not spec.adaptive:
            assert quote.accepted_tokens >= 12 and quote.mean_accepted_length > 2
        llm.engine.blocks.check([])


def test_controller_prices_each_step_size_as_measured():
    """Costs need not be linear: on a CPU a verification of 2 or 3 tokens can cost more than one of 5. With those
    measured, a sequence that accepts most proposals gets 4 of them, not 1 or 2."""
    c = SpeculationController()
    for _ in range(3):
        for n, t in ((1, 0.050), (2, 0.090), (3, 0.100), (5, 0.060)):
            c.observe_step(n, t)
    for _ in range(6):
        c.observe_verification(1, 4, 4, kind=3)
    assert c.choose([Candidate(1, 4, kind=3)], base_tokens=1, decoding=1) == {1: 4}
    # a sequence whose 1-gram proposals are rarely right gets none, while its 3-gram ones still pass
    for _ in range(20):
        c.observe_verification(1, 4, 0, kind=1)  # alpha -> 1/7 (the decayed evidence against the prior)
    assert c.choose([Candidate(1, 4, kind=1)], base_tokens=1, decoding=1) == {}
    assert c.choose([Candidate(1, 4, kind=3)], base_tokens=1, decoding=1) == {1: 4}


def test_speculation_with_lora_adapters_equals_plain(tiny):
    """Verification chunks carry their request's adapter like any chunk: a batch mixing two adapters and none, with
    n-gram and draft proposals (the draft runs the base model), gives each request its plain greedy tokens."""
    from test_lora_runtime import random_adapter

    target, other = tiny
    model = target[Backend.TORCH]
    for i in range(2):
        model.add_lora(f"a{i}", random_adapter(model.config, f"a{i}", rank=4, seed=i))
    model.set_draft_model(other[Backend.TORCH])
    try:
        adapters = ["a0", "a1", None] * 2
        params = [greedy(n, adapter=a) for n, a in zip(MAX_TOKENS, adapters, strict=True)]
        want = [model.generate(p, sp).token_ids for p, sp in zip(PROMPTS, params, strict=True)]
        for method in ("ngram", "draft"):
            llm = LLM(model, max_batch_tokens=12, block_size=4)
            outs = llm.generate(PROMPTS, [dataclasses.replace(p, speculative=fixed(method, 3)) for p in params])
            assert [o.token_ids for o in outs] == want
            assert llm.engine.spec_stats.verifications > 0
    finally:
        model.set_draft_model(None)
        for i in range(2):
            model.remove_lora(f"a{i}")


def test_controller_prices_a_draft_catching_up_on_a_prompt():
    """A draft model that must first run a sequence's 300-token prompt does not pay for one step's proposals; once
    it holds the sequence, the same proposals do."""
    c = SpeculationController()
    draft = CostModel()
    for n in (1, 2, 5, 9):
        c.observe_step(n, 0.050)  # memory-bound target: verification is nearly free
    for n, t in ((1, 0.010), (4, 0.011), (300, 0.400)):
        draft.add(n, t)
    for _ in range(6):
        c.observe_verification(1, 4, 3, kind="draft")
    fresh = Candidate(1, 4, "draft", setup_tokens=300)
    held = Candidate(1, 4, "draft", setup_tokens=2)
    assert c.choose([fresh], base_tokens=1, decoding=1, draft=draft) == {}
    assert c.choose([held], base_tokens=1, decoding=1, draft=draft).get(1, 0) >= 2


def test_cost_model_interpolates_between_measured_sizes():
    """An unmeasured size is priced from its measured neighbours, not from a line that prefill steps of hundreds of
    tokens pull below the measured small steps."""
    cost = CostModel()
    for n, t in ((32, 0.190), (300, 0.400), (500, 0.600), (1, 0.060)):
        cost.add(n, t)
    predict = cost.predictor()
    assert predict(32) == 0.190
    assert 0.190 < predict(33) < 0.200  # between 32's and 300's
    assert predict(600) > 0.600
    assert math.isclose(predict(16), 0.060 + (0.190 - 0.060) * 15 / 31)


def test_a_step_below_every_measured_count_is_never_priced_at_zero():
    """CI once failed here: a draft test on the tiny model had measured only steps of several rows, with a fitted
    slope steep enough (timing noise) that extrapolating down to one row gave 0 s, and the controller divided by the
    plain step's price. Below the smallest measured count a step costs at least its time per token."""
    cost = CostModel()
    for n, t in ((6, 1e-4), (6, 1.1e-4), (7, 9e-3), (40, 0.5)):  # a slope of ~0.014 s/token against 1e-4 s at 6
        cost.add(n, t)
    predict = cost.predictor()
    smallest = cost.table()[6]
    assert predict(1) == pytest.approx(smallest / 6) and predict(1) > 0
    assert predict(5) == pytest.approx(smallest * 5 / 6)
    c = SpeculationController()
    c.target = cost
    k = c.choose([Candidate(seq_id=1, max_k=4, setup_tokens=1)], base_tokens=1, decoding=1)
    assert set(k) <= {1}
