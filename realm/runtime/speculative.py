"""Speculative decoding: cheap proposals for a sequence's next tokens, verified by the target model in one forward.

    SamplingParams(speculative="ngram")                        # per request (or EngineConfig(speculative=...))
    SamplingParams(speculative=SpeculativeConfig("draft", num_speculative_tokens=4))   # load(..., draft_model=path)

Each step, for every running sequence about to decode, a proposer guesses up to k tokens (`Sequence.propose`); the
scheduler runs them with the decode's token as one chunk of k + 1 tokens (never preempting for them); the target's
logits at those k + 1 positions verify them (`BatchSampler.verify`: greedy, the proposals equal to the argmax;
sampled, the rejection rule of Leviathan et al. 2023 / Chen et al. 2023); the engine keeps the accepted ones and the
token drawn after them, and drops the rejected ones with their KV (`Scheduler.truncate`). Greedy output is token for
token the plain output; sampled output has exactly the target's distribution.

Proposers:
- n-gram (prompt lookup, Saxena 2023): the longest suffix n-gram of the sequence (n from ngram_max down to
  ngram_min) found earlier in its own tokens proposes the (up to k) tokens that followed it there: where it occurred
  more than once, the occurrence followed by its most frequent next token (the latest of those). Where the output
  departs from the text it was copying (a corrected word) and no n-gram matches, it goes on proposing that text in
  lockstep (`PromptLookup`). No model: it pays where the output quotes its input (summaries, edits, code).
- draft model (`DraftProposer`): a smaller model of the same vocabulary runs k autoregressive steps for all
  speculating sequences at once, on its own paged KV cache, before the target's step.

Adaptive k (`SpeculationController`): from each sequence's recent acceptance (two rates, `Acceptance`: of a first
proposal, and of a proposal after an accepted one) and a cost model measured online (the target's step time by its
tokens, on steps of decodes and verifications only, as measured at each token count, else fitted linearly, and
relative to the machine's speed when measured; the draft's likewise, its catch-up on a sequence's prompt
included), it gives each sequence the k that maximises the step's expected tokens per second, 0 where a proposal
costs more than it is expected to earn: with
large batches the forward stops being memory-bound, each verified token costs nearly a decoded one, and speculation
switches itself off. A step with proposals is never priced below the plain step, and a gain within two standard
errors of the plain step's measured time is not taken (the machine's noise must not buy proposals).
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import heapq
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from .model import Model
    from .sampling import SamplingParams

log = logging.getLogger(__name__)

MAX_SPECULATIVE_TOKENS = 15  # k + 1 <= 16 queries per sequence: the verification attention kernel's tile
NGRAM_INDEX_MAX = 16  # longest n-gram bound kept in an NgramIndex (its size grows with n^2 per token); above, scans


class SpecMethod(str, enum.Enum):
    NONE = "none"  # plain decoding
    NGRAM = "ngram"  # prompt lookup in the sequence's own tokens
    DRAFT = "draft"  # a smaller model of the same vocabulary (the model's `draft`)


def spec_method_of(value: SpecMethod | str) -> SpecMethod:
    try:
        return SpecMethod(value)
    except ValueError:
        raise ValueError(f"unknown speculative method {value!r}; choose one of: "
                         f"{', '.join(m.value for m in SpecMethod)}") from None


@dataclass(frozen=True)
class SpeculativeConfig:
    method: SpecMethod = SpecMethod.NGRAM
    num_speculative_tokens: int = 4  # k: proposals per sequence and step, at most
    ngram_min: int = 1  # shortest suffix n-gram looked up
    ngram_max: int = 4  # longest (tried first)
    adaptive: bool = True  # k per sequence and step from the measured acceptance and step costs; False: always k
    ngram_lockstep: bool = True  # n-gram: keep copying through a changed token (PromptLookup); False: n-grams only

    def __post_init__(self):
        object.__setattr__(self, "method", spec_method_of(self.method))
        for name in ("num_speculative_tokens", "ngram_min", "ngram_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be <= {MAX_SPECULATIVE_TOKENS} (k + 1 queries per "
                             f"sequence fit one verification tile), got {self.num_speculative_tokens}")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) is above ngram_max ({self.ngram_max}): the n-gram bounds "
                             "are reversed")
        for name in ("adaptive", "ngram_lockstep"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def enabled(self) -> bool:
        return self.method is not SpecMethod.NONE


def speculative_config_of(value: SpeculativeConfig | SpecMethod | str | None) -> SpeculativeConfig | None:
    """None stays None (the default applies); a method name is that method with the default settings."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, (str, SpecMethod)):
        return SpeculativeConfig(method=value)
    if isinstance(value, dict):  # a JSON request's {"method": "ngram", "num_speculative_tokens": 3}
        known = {f.name for f in dataclasses.fields(SpeculativeConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown speculative setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        try:
            return SpeculativeConfig(**value)
        except ValueError as e:
            raise ValueError(f"speculative: {e}") from None
    raise ValueError(f"speculative must be None, a method name ({', '.join(m.value for m in SpecMethod)}), a "
                     f"SpeculativeConfig or a dict of its fields, got {type(value).__name__}")


# ---- n-gram proposals --------------------------------------------------------------------------------------------

def propose_ngram(token_ids: Sequence[int] | np.ndarray, k: int, ngram_min: int = 1, ngram_max: int = 4) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the longest suffix n-gram of token_ids (ngram_max >= n
    >= ngram_min): of its occurrences, the latest of those followed by its most frequent next token; [] when no
    suffix of ngram_min tokens occurred before."""
    return match_ngram(token_ids, k, ngram_min, ngram_max)[0]


def match_ngram(token_ids: Sequence[int] | np.ndarray, k: int, ngram_min: int = 1,
                ngram_max: int = 4) -> tuple[list[int], int]:
    """propose_ngram's proposal and the length n of the n-gram that matched (0: none). Longer matches are right more
    often: the controller keeps an acceptance rate per n.

    Why the most frequent next token, not simply the latest occurrence (prompt lookup's usual rule): a short n-gram
    ("the") occurs in many places, and what followed it most often is a better guess than what followed it last. On
    bench/speculative.py's 12 grounded prompts (plain outputs of SmolLM2-135M-Instruct, 96 tokens), verifying every
    match's 15 tokens takes 517 steps where the latest occurrence's takes 531 (bench/results/speculative.jsonl, the
    plain row at N=1 of commit afcb9a2: lookup_steps, lookup_steps_latest)."""
    start, n = ngram_source(token_ids, ngram_min, ngram_max)
    return _ints(token_ids[start : start + k]) if n else [], n


def _ints(tokens: Sequence[int] | np.ndarray) -> list[int]:
    return [int(t) for t in tokens]


def ngram_source(token_ids: Sequence[int] | np.ndarray, ngram_min: int = 1, ngram_max: int = 4) -> tuple[int, int]:
    """match_ngram's choice as (where its proposal starts in token_ids, n); (0, 0) when nothing matches. A scan of
    the whole sequence per n (NgramIndex answers alike, incrementally)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    total = len(ids)
    for n in range(min(ngram_max, total - 1), ngram_min - 1, -1):
        # windows starting at 0 .. total - n - 1: every occurrence except the suffix itself, each followed by a token
        windows = np.lib.stride_tricks.sliding_window_view(ids[: total - 1], n)
        hits = np.flatnonzero((windows == ids[total - n :]).all(axis=1))
        if hits.size:
            followers = ids[hits + n]
            tokens, counts = np.unique(followers, return_counts=True)
            return int(hits[np.isin(followers, tokens[counts == counts.max()])][-1]) + n, n
    return 0, 0


class NgramIndex:
    """Prompt lookup for one sequence, kept as it grows: every n-gram (ngram_min <= n <= ngram_max) followed by a
    token, with how often each next token followed it (and where last) and its best occurrence so far (match_ngram's
    choice). `match` gives match_ngram's answer with at most ngram_max - ngram_min + 1 dict lookups, where
    match_ngram scans the whole sequence once per n: at 32 sequences of a few hundred tokens the scans cost about 3 ms
    a step (propose_s in bench/results/speculative.jsonl), a few percent of a CPU decode step.

    A sequence's verified tokens only grow; when they were cut (or replaced) since the last call, the index is
    rebuilt. A wrong guess here would cost speed, never exactness: verification decides."""

    def __init__(self, ngram_min: int = 1, ngram_max: int = 4):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self._followers: dict[tuple[int, ...], dict[int, int]] = {}  # n-gram -> next token -> times it followed
        self._best: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (count, start) of the occurrence to use
        self._length = 0  # tokens indexed: n-grams ending before the last of them
        self._last: int | None = None  # the last indexed token: a cheap check that the sequence was not cut

    def match(self, token_ids: Sequence[int], k: int) -> tuple[list[int], int]:
        """match_ngram(token_ids, k, ngram_min, ngram_max)."""
        start, n = self.source(token_ids)
        return _ints(token_ids[start : start + k]) if n else [], n

    def source(self, token_ids: Sequence[int]) -> tuple[int, int]:
        """ngram_source(token_ids, ngram_min, ngram_max)."""
        total = len(token_ids)
        if total < self._length or (self._length and token_ids[self._length - 1] != self._last):
            self._followers.clear()
            self._best.clear()
            self._length = 0
        self._extend(token_ids)
        for n in range(min(self.ngram_max, total - 1), self.ngram_min - 1, -1):
            best = self._best.get(tuple(token_ids[total - n :]))
            if best is not None:
                return best[1] + n, n
        return 0, 0

    def _extend(self, token_ids: Sequence[int]) -> None:
        total = len(token_ids)
        # an n-gram at s is eligible once a token follows it: s + n <= total - 1. Occurrences of an n-gram arrive in
        # order, so the newest is the latest: it becomes the best when its next token is now (one of) the most
        # frequent.
        for stop in range(max(self._length, 1), total):
            follower = token_ids[stop]
            for n in range(self.ngram_min, min(self.ngram_max, stop) + 1):
                key = tuple(token_ids[stop - n : stop])
                counts = self._followers.setdefault(key, {})
                count = counts[follower] = counts.get(follower, 0) + 1
                best = self._best.get(key)
                if best is None or count >= best[0]:
                    self._best[key] = (count, stop - n)
        self._length = total
        self._last = token_ids[total - 1] if total else None


LOCKSTEP = "lockstep"  # the kind of PromptLookup's lockstep proposals: their acceptance is kept apart from n-grams'


class PromptLookup:
    """A sequence's n-gram proposals (prompt lookup), kept across steps, that keep copying through a changed token.

    The n-gram rule (match_ngram, through an NgramIndex where ngram_max allows one) proposes what followed the
    longest matching suffix. Where the output departs from the text it was copying for one token (an edit's
    corrected spelling, a quote's changed word), no suffix ending in that new token occurred before, and prompt lookup
    proposes nothing until n-grams match again. With `lockstep`, it then proposes the copied text from where the
    output would be had each token since the last proposal replaced one token of it (kind LOCKSTEP), until an n-gram
    matches again. On bench/speculative.py's grounded prompts this took prompt lookup's steps at full k from 517 to 498,
    and the adaptive n-gram mode at batch 1 from 1.81x plain to 1.84x in the same run (bench/results/speculative.jsonl,
    commit 4d16f83: lookup_steps_ngrams_only and lookup_steps; ngram-nolockstep and ngram). A wrong guess costs rows,
    never exactness: verification decides, and the controller keeps LOCKSTEP's acceptance apart, so text that does not
    copy soon stops buying them."""

    def __init__(self, ngram_min: int = 1, ngram_max: int = 4, lockstep: bool = True):
        self.ngram_min, self.ngram_max, self.lockstep = ngram_min, ngram_max, lockstep
        self._index = NgramIndex(ngram_min, ngram_max) if ngram_max <= NGRAM_INDEX_MAX else None
        # (where the last proposal started in the sequence, the sequence's length then): what it was copying
        self._copying: tuple[int, int] | None = None

    def propose(self, token_ids: Sequence[int], k: int) -> tuple[list[int], object]:
        """Up to k proposals and their kind: the n-gram's length, LOCKSTEP, or 0 with none."""
        total = len(token_ids)
        if self._copying is not None and total < self._copying[1]:  # cut below the last proposal: forget it
            self._copying = None
        if self._index is not None:
            start, n = self._index.source(token_ids)
        else:
            start, n = ngram_source(token_ids, self.ngram_min, self.ngram_max)
        if n:
            self._copying = (start, total)
            return _ints(token_ids[start : start + k]), n
        if self.lockstep and self._copying is not None:
            source, since = self._copying
            at = source + total - since  # one source token per token since the last proposal
            if at < since:
                self._copying = (at, total)
                return _ints(token_ids[at : at + k]), LOCKSTEP
        return [], 0


# ---- the draft model ---------------------------------------------------------------------------------------------

@dataclass
class DraftRequest:
    """What the draft model is asked for one sequence: up to k proposals after its (verified) tokens."""

    seq_id: int
    token_ids: list[int]
    k: int
    params: SamplingParams


@dataclass
class Proposal:
    tokens: list[int]
    probs: torch.Tensor | None = None  # float32 [len(tokens), vocab]: q, for sampled requests


def check_same_vocabulary(draft: Model, target: Model) -> None:
    """A draft must speak the target's token ids: same size, and the same pieces where both tokenizers have them."""
    a, b = draft.tokenizer, target.tokenizer
    if a.vocab_size != b.vocab_size:
        raise ValueError(f"the draft model's vocabulary has {a.vocab_size} tokens, the target's {b.vocab_size}: a "
                         "draft must use the target's vocabulary")
    pieces_a, pieces_b = getattr(a, "_tokens", None), getattr(b, "_tokens", None)
    if pieces_a is not None and pieces_b is not None and pieces_a != pieces_b:
        i = next(i for i, (x, y) in enumerate(zip(pieces_a, pieces_b, strict=True)) if x != y)
        raise ValueError(f"the draft model's vocabulary differs from the target's (token {i}: {pieces_a[i]!r} vs "
                         f"{pieces_b[i]!r}): a draft must use the target's vocabulary")


class DraftProposer:
    """A draft model proposing for many sequences at once, on its own paged KV cache: each call runs one step for
    every sequence's tokens it has not seen (its prompt at first; later the accepted proposals and the new token),
    then k - 1 single-token steps, sampling each proposal as the request samples (greedy stays greedy; a seeded
    request draws from a seed derived from its own). What the target rejected is dropped from the draft's cache at
    the next call (its tokens no longer match)."""

    def __init__(self, draft: Model, target: Model, num_blocks: int, block_size: int, seed: int | None = None):
        from .block_manager import BlockManager
        from .runner import ModelRunner

        check_same_vocabulary(draft, target)
        self.model = draft
        self.vocab_size = target.tokenizer.vocab_size
        self.runner = ModelRunner(draft.transformer, num_blocks, block_size, self.vocab_size, seed)
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching=False)
        self.context_length = draft.config.context_length
        self._held: dict[int, tuple] = {}  # seq_id -> (SequenceKV, token ids in the draft's cache)
        self.costs = CostModel()  # the draft's step time by tokens
        self.steps = 0

    def setup_tokens(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Tokens the draft must run for this sequence before proposing: those its cache does not hold yet."""
        held = self._held.get(seq_id)
        have = held[1] if held is not None else []
        return len(token_ids) - _common_prefix(have, token_ids, limit=len(token_ids) - 1)

    def release(self, seq_id: int) -> None:
        held = self._held.pop(seq_id, None)
        if held is not None:
            self.blocks.free(held[0])

    def propose(self, requests: Sequence[DraftRequest]) -> dict[int, Proposal]:
        """Proposals by seq_id (a sequence that found no room in the draft's cache gets none). A failing draft
        forward is logged and proposes nothing: speculation must never fail a request."""
        try:
            return self._propose(requests)
        except Exception:
            log.exception("the draft model failed; this step proposes nothing")
            for r in requests:
                self.release(r.seq_id)
            return {}

    def _propose(self, requests: Sequence[DraftRequest]) -> dict[int, Proposal]:
        from .block_manager import CacheFullError, SequenceKV
        from .plan import ChunkPlan, StepPlan
        from .sampler import RowSampling, draft_seed

        states = []
        for r in requests:
            kv, have = self._held.get(r.seq_id) or (SequenceKV(), [])
            n = len(r.token_ids)
            if n + r.k - 1 > self.context_length:
                continue
            common = _common_prefix(have, r.token_ids, limit=n - 1)  # the last token is fed again: its logits
            self.blocks.truncate(kv, min(kv.length, common))
            del have[common:]
            try:
                self.blocks.allocate(kv, n + r.k - 1)
            except CacheFullError:
                self.blocks.free(kv)
                self._held.pop(r.seq_id, None)
                continue
            self._held[r.seq_id] = (kv, have)
            states.append((r, kv, have, [], []))
        out: dict[int, Proposal] = {}
        for j in range(max((s[0].k for s in states), default=0)):
            live = [s for s in states if s[0].k > j]
            chunks = []
            for r, kv, have, drawn, _ in live:
                fed = r.token_ids[len(have) :] if j == 0 else drawn[-1:]
                start = len(have) if j == 0 else len(r.token_ids) + j - 1
                position = len(r.token_ids) + j
                history = (*r.token_ids, *drawn) if r.params.repetition_penalty != 1.0 else ()
                sampling = RowSampling.of(r.params, position, history)
                if sampling.seed is not None:
                    sampling = dataclasses.replace(sampling, seed=draft_seed(sampling.seed))
                chunks.append(ChunkPlan(r.seq_id, start, tuple(fed), tuple(kv.blocks), (len(fed) - 1,), sampling))
            plan = StepPlan(self.runner.block_size, tuple(chunks),
                            return_probs=any(r.params.temperature > 0 for r, *_ in live))
            began = time.perf_counter()
            result = self.runner.execute(plan)
            self.costs.add(plan.num_tokens, time.perf_counter() - began)
            self.steps += 1
            for i, ((r, kv, have, drawn, probs), chunk, tokens, error) in enumerate(
                    zip(live, chunks, result.tokens, result.errors, strict=True)):
                if error is not None:
                    raise RuntimeError(f"draft step failed for sequence {r.seq_id}: {error}")
                have.extend(chunk.token_ids)
                kv.length = chunk.end
                drawn.append(tokens[0])
                if result.probs is not None and r.params.temperature > 0:
                    probs.append(result.probs[i])
        for r, kv, have, drawn, probs in states:
            del have[len(r.token_ids) + len(drawn) - 1 :]  # the last proposal was never fed
            kv.length = len(have)
            if drawn:
                import torch

                out[r.seq_id] = Proposal(drawn, torch.stack(probs) if probs else None)
        return out


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


# ---- adaptivity --------------------------------------------------------------------------------------------------

COST_SAMPLES = 8  # steps kept per token count: recent enough to follow the machine's load
COST_SIZES = 64  # token counts kept: the batch sizes and proposal counts of recent steps
# Steps after which a token count not measured again is forgotten: its time was taken under another batch (other
# sequences, other context lengths), which the speed level does not carry over. In bench/speculative.py's full run at
# bb90ed3 the counts just above 32 kept from grounded work at N=32, thousands of steps earlier, priced chat's proposals
# at N=32 as nearly free, and ngram-nolockstep there ran at 0.87x plain (bench/results/speculative.jsonl).
COST_MAX_AGE = 256
# Counts kept however old: with fewer than two the controller explores again (a step of full speculation, which for
# a draft model means catching it up on a whole prompt): forgetting down to one after a long run of plain decodes
# put the draft mode below plain at batch 1 (a run stopped after batch 1, not kept).
COST_MIN_KEPT = 2
ACCEPT_DECAY = 0.8  # weight of the past in a sequence's acceptance estimate, per verification
PRIOR_ACCEPTED, PRIOR_REJECTED = 1.0, 1.0  # a new sequence's estimate: alpha = 1/2
MARGIN_Z = 2.0  # speculation must beat plain by this many standard errors of the plain step's measured time
LEVEL_RATE = 0.2  # how far each step moves the cost model's speed level towards its own time (in the log)


class CostModel:
    """Seconds of a forward step by its tokens, from the last COST_SAMPLES steps measured at each token count (at
    most COST_SIZES counts, the least recently measured forgotten first): the mean at that count where there are
    some (step time need not be linear nor even monotone in the tokens: on a CPU, torch's float32 matmul of 2 or 3
    rows takes longer than of 4), else interpolated between measured counts (`predictor`). Kept per count, so that a
    size measured once (a step with proposals, among many without) is not forgotten while its batch lasts.

    Times are kept relative to the machine's speed when they were measured (`level`), and given back at its speed
    now: a CPU shared with other work runs at speeds tens of percent apart from one minute to the next, and a count
    measured in a slow minute must not look dear beside one measured in a fast one (the controller compares counts).
    Each step at an already measured count moves the level by LEVEL_RATE of the way from the level to the step's time
    over its count's kept mean, in the log. A count not measured in the last `max_age` steps is forgotten: the level
    follows the machine, not a change of batch (COST_MAX_AGE)."""

    def __init__(self, samples: int = COST_SAMPLES, sizes: int = COST_SIZES, max_age: int = COST_MAX_AGE):
        self._by_size: OrderedDict[int, deque[float]] = OrderedDict()  # times / the level when measured
        self._raw: dict[int, deque[float]] = {}  # the times as measured: their spread is the noise (relative_error)
        self._measured_at: dict[int, int] = {}  # count -> the step (of `add`) that last measured it
        self._steps = 0
        self._samples, self._sizes, self._max_age = samples, sizes, max_age
        self.level = 1.0  # the machine's speed now: time of a step / its count's kept mean
        self._fit: tuple[float, float] | None = None  # fit() until the next add: choose asks every step, and a
        self._fitted = False  # draft that did not run keeps its costs (no refit of unchanged samples each step)

    def add(self, tokens: int, seconds: float) -> None:
        times = self._by_size.pop(tokens, None) or deque(maxlen=self._samples)
        mean = sum(times) / len(times) if times else 0.0
        if mean > 0 and seconds > 0:
            self.level *= (seconds / (self.level * mean)) ** LEVEL_RATE
        times.append(seconds / self.level)
        self._by_size[tokens] = times  # the most recently measured last
        self._raw.setdefault(tokens, deque(maxlen=self._samples)).append(seconds)
        self._steps += 1
        self._measured_at[tokens] = self._steps
        self._forget_stale()
        self._fitted = False

    def _forget_stale(self) -> None:
        """Drops the least recently measured counts beyond `sizes`, and those not measured for `max_age` steps while
        more than COST_MIN_KEPT counts are kept."""
        while self._by_size:
            oldest = next(iter(self._by_size))
            stale = self._steps - self._measured_at[oldest] > self._max_age and len(self._by_size) > COST_MIN_KEPT
            if len(self._by_size) <= self._sizes and not stale:
                return
            del self._by_size[oldest], self._raw[oldest], self._measured_at[oldest]

    @property
    def samples(self) -> list[tuple[int, float]]:
        """(tokens, seconds) of the kept steps, at the machine's speed now."""
        return [(n, t * self.level) for n, times in self._by_size.items() for t in times]

    @property
    def distinct(self) -> int:
        return len(self._by_size)

    def fit(self) -> tuple[float, float] | None:
        """(a, b): the least-squares line t = a + b * tokens through the kept samples at the machine's speed now;
        b = 0 (the mean) with a single token count measured; None before any step. From each count's number and sum
        of times (the samples of one count share their tokens), cached until the next add."""
        if not self._fitted:
            self._fit, self._fitted = self._least_squares(), True
        return self._fit

    def _least_squares(self) -> tuple[float, float] | None:
        groups = [(n, len(times), sum(times) * self.level) for n, times in self._by_size.items()]
        count = sum(c for _, c, _ in groups)
        if not count:
            return None
        n_mean = sum(n * c for n, c, _ in groups) / count
        t_mean = sum(total for _, _, total in groups) / count
        if len(groups) < 2:
            return t_mean, 0.0
        sxx = sum(c * (n - n_mean) ** 2 for n, c, _ in groups)
        sxy = sum((n - n_mean) * total for n, _, total in groups)
        b = max(sxy / sxx, 0.0)  # noise must not make tokens look free-er than free
        return max(t_mean - b * n_mean, 0.0), b

    def relative_error(self, tokens: int) -> float:
        """The standard error of the mean time at this count, relative to it (0 with fewer than two samples): of the
        times as measured, so that the machine's drift counts as noise too (the margin it sets stays conservative)."""
        times = self._raw.get(tokens)
        if times is None or len(times) < 2:
            return 0.0
        n, first = len(times), times[0]
        mean = first + sum(t - first for t in times) / n  # shifted: equal times give exactly 0
        variance = sum((t - mean) ** 2 for t in times) / (n - 1)
        return math.sqrt(variance / n) / mean

    def table(self) -> dict[int, float]:
        """Mean seconds per measured token count, at the machine's speed now."""
        return {n: self.level * sum(times) / len(times) for n, times in self._by_size.items()}

    def predictor(self, fit: tuple[float, float] | None = None):
        """A function tokens -> predicted seconds (None before any step), fixed for one decision: the measured mean
        at a measured count, linear interpolation between the nearest measured counts, and beyond them the nearest
        one's time plus (or, below the smallest, minus) the fitted b per token (never a fitted line alone, which
        prefill steps of hundreds of tokens would pull below the measured times of small steps), and below the
        smallest never under its time per token (never 0: the controller divides by a plain step's price). fit:
        this model's `fit()`, when the caller has it."""
        fit = fit or self.fit()
        if fit is None:
            return None
        table = self.table()
        sizes = sorted(table)
        times = [table[n] for n in sizes]
        slope = fit[1]

        def predict(tokens: int) -> float:
            at = bisect.bisect_left(sizes, tokens)
            if at < len(sizes) and sizes[at] == tokens:
                return times[at]
            if at == 0:  # below every measured count: never under its time per token, which a step of fewer
                # tokens never beats (its fixed costs shared by fewer rows); a steep fitted slope alone would reach 0
                return max(times[0] - slope * (sizes[0] - tokens), times[0] * tokens / sizes[0])
            if at == len(sizes):
                return times[-1] + slope * (tokens - sizes[-1])
            lo, hi = sizes[at - 1], sizes[at]
            w = (tokens - lo) / (hi - lo)
            return times[at - 1] * (1 - w) + times[at] * w

        return predict

    def predict(self, tokens: int) -> float | None:
        predict = self.predictor()
        return None if predict is None else predict(tokens)


@dataclass
class Acceptance:
    """A sequence's recent acceptance as two rates, each counting verified proposals as Bernoulli trials up to the
    first rejection: `first`, that a verification's first proposal passes, and `then`, that a proposal passes after
    its predecessor did. One rate would undersell long proposals: a prompt-lookup match either copies its source for
    many tokens or is wrong at once, so a proposal after an accepted one passes far more often than a first one
    (the quote and edit prompts of bench/speculative.py). Both decay, so that they follow the text (a quoted passage
    ends, a list starts)."""

    first_accepted: float = 0.0
    first_rejected: float = 0.0
    then_accepted: float = 0.0
    then_rejected: float = 0.0

    @property
    def first(self) -> float:
        return _rate(self.first_accepted, self.first_rejected)

    @property
    def then(self) -> float:
        """Its prior is `first`: until proposals after an accepted one were tried, they are assumed to pass as often
        as first ones (one rate, the geometric model), not at an uninformed 1/2."""
        prior = PRIOR_ACCEPTED + PRIOR_REJECTED
        return (self.then_accepted + prior * self.first) / (self.then_accepted + self.then_rejected + prior)

    @property
    def rate(self) -> float:
        """Every trial together: the per-token acceptance of a geometric model."""
        return _rate(self.first_accepted + self.then_accepted, self.first_rejected + self.then_rejected)

    def gain(self, j: int) -> float:
        """The expected tokens the j-th proposal (j >= 1) adds: it and all before it pass."""
        return self.first * self.then ** (j - 1)

    def update(self, proposed: int, accepted: int) -> None:
        if proposed < 1:
            return
        d = ACCEPT_DECAY
        self.first_accepted = self.first_accepted * d + (accepted >= 1)
        self.first_rejected = self.first_rejected * d + (accepted == 0)
        if proposed > 1 and accepted >= 1:  # the first passed: proposals 2.. were tried up to the first rejection
            self.then_accepted = self.then_accepted * d + (accepted - 1)
            self.then_rejected = self.then_rejected * d + (accepted < proposed)


def _rate(accepted: float, rejected: float) -> float:
    return (accepted + PRIOR_ACCEPTED) / (accepted + rejected + PRIOR_ACCEPTED + PRIOR_REJECTED)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a verification of k proposals yields on average when each passes with probability alpha: the
    accepted run plus the token drawn after it, (1 - alpha^(k+1)) / (1 - alpha)."""
    return k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass
class Candidate:
    seq_id: int
    max_k: int  # proposals it may get: its request's k, what max_tokens leaves, what an n-gram found
    kind: object = None  # what proposes (the n-gram's length, "draft"): acceptance is kept per sequence and kind
    setup_tokens: int = 1  # tokens a draft model must run before its first proposal (its prompt, the first time)
    # Whether a token accepted for it shortens the work: requests wait for the slot it frees, or it is the one
    # sequence expected to finish last. Otherwise (a draining batch) it ends earlier, but the run does not: the
    # token saves only its row in a later step (SpeculationController.choose).
    critical: bool = True


class SpeculationController:
    """Chooses each step's k per sequence (see the module docstring). `choose` maximises expected tokens per
    second: the j-th proposal of a sequence adds first * then^(j-1) tokens (`Acceptance.gain`); proposals are ranked
    by that,
    and the step takes the best prefix of the ranking, priced by the measured step costs (the target's at the step's
    token count, plus the draft's steps with one more sequence each). Before two different step sizes were measured
    it alternates between full speculation and none, so that the cost model sees both."""

    def __init__(self):
        self.acceptance: dict[tuple[int, object], Acceptance] = {}  # (seq_id, kind)
        self.by_kind: dict[object, Acceptance] = {}  # every sequence's, per kind: a new sequence's prior
        self.target = CostModel()
        self._explore_plain = False

    def observe_step(self, tokens: int, seconds: float) -> None:
        """A step of decodes and verifications only (every token a logits row). Steps with prefill chunks are not
        taken: their tokens cost far less than rows with logits (the output head's product, sampling), so a step of
        32 decodes and a 29-token prefill chunk costs less than one of 32 decodes and 29 proposals; priced by
        them, proposals looked nearly free at 32 sequences, where on a CPU each costs about what a decode costs."""
        self.target.add(tokens, seconds)

    def observe_verification(self, seq_id: int, proposed: int, accepted: int, kind: object = None) -> None:
        self.acceptance.setdefault((seq_id, kind), Acceptance()).update(proposed, accepted)
        self.by_kind.setdefault(kind, Acceptance()).update(proposed, accepted)

    def forget(self, seq_id: int) -> None:
        for key in [key for key in self.acceptance if key[0] == seq_id]:
            del self.acceptance[key]

    def rate(self, seq_id: int, kind: object = None) -> float:
        """The sequence's recent acceptance for proposals of this kind; before it has any, every sequence's."""
        return self.estimate(seq_id, kind).rate

    def estimate(self, seq_id: int, kind: object = None) -> Acceptance:
        """The sequence's acceptance for proposals of this kind; before it has any, every sequence's (the prior)."""
        return self.acceptance.get((seq_id, kind)) or self.by_kind.get(kind) or Acceptance()

    def _worth(self, candidates: list[Candidate], base_tokens: int, decoding: int, target,
               slope: float) -> dict[int, float]:
        """What an accepted token of each candidate is worth, as a share of a decoded token's (the step's time per
        decoding sequence). 1 for critical ones. A non-critical one's saves only its row in a later step: the cost
        model's marginal time per row (its fitted slope), a small share on a CPU step that is near compute-bound
        only when rows cost nearly what the step costs per sequence. Sequences tied for the longest budget count
        as non-critical: the run shortens only if every one of them advances, which one proposal cannot promise
        (bench/results/speculative.jsonl, commit 23bdf10: chat at 32 sequences that start together, 22% of n-gram
        proposals accepted, ran at 0.85x plain, in 97 steps instead of 98)."""
        if all(c.critical for c in candidates):
            return {c.seq_id: 1.0 for c in candidates}
        per_token = target(base_tokens) / max(decoding, 1)
        share = min(1.0, slope / per_token) if per_token > 0 else 1.0
        return {c.seq_id: 1.0 if c.critical else share for c in candidates}

    def choose(self, candidates: Iterable[Candidate], base_tokens: int, decoding: int,
               draft: CostModel | None = None) -> dict[int, int]:
        """k per candidate's seq_id. base_tokens: the step's rows that yield a token, without proposals (its
        decodes: the cost model is measured on steps of decodes and verifications alone, `observe_step`); decoding:
        sequences that will emit a token in it (each yields one without speculation); draft: the draft model's costs
        (None for n-gram, whose proposals cost nothing measurable)."""
        candidates = [c for c in candidates if c.max_k > 0]
        if not candidates:
            return {}
        if self.target.distinct < 2:  # explore: measure a step with proposals and one without
            self._explore_plain = not self._explore_plain and bool(self.target.samples)
            return {} if self._explore_plain else {c.seq_id: c.max_k for c in candidates}
        if draft is not None and not draft.samples:  # measure the draft on one sequence, the cheapest to catch up
            first = min(candidates, key=lambda c: c.setup_tokens)
            return {first.seq_id: first.max_k}
        fit = self.target.fit()
        target = self.target.predictor(fit)
        draft_cost = draft.predictor() if draft is not None else None
        # Every possible proposal in the order of its expected gain (a sequence's j-th after its (j-1)-th: gains only
        # fall along a sequence); the best choice is a prefix of this order. Costs need not be convex, so every
        # prefix is priced, not just the next proposal.
        estimates = {c.seq_id: self.estimate(c.seq_id, c.kind) for c in candidates}
        worth = self._worth(candidates, base_tokens, decoding, target, fit[1])
        then = {seq_id: e.then for seq_id, e in estimates.items()}  # a property: computed once, not per proposal
        heap = [(-estimates[c.seq_id].gain(1) * worth[c.seq_id], c.seq_id, c.max_k, 1) for c in candidates]
        heapq.heapify(heap)
        order = []
        while heap:
            neg, seq_id, max_k, j = heapq.heappop(heap)
            order.append((seq_id, j, -neg))
            if j < max_k:
                heapq.heappush(heap, (neg * then[seq_id], seq_id, max_k, j + 1))
        # depth[j]: the tokens of the draft's step j so far (step 1 catches each sequence up: its setup tokens)
        depth = [0] * (max(c.max_k for c in candidates) + 2)
        setup = {c.seq_id: max(c.setup_tokens, 1) for c in candidates}
        gain, drafting = float(decoding), 0.0
        plain = target(base_tokens)
        if plain <= 0.0:  # no step of this size priced above 0 (times below the clock's resolution): no basis
            return {}
        # A gain within the noise of the plain step's measured cost is not taken: MARGIN_Z standard errors
        best, best_rate = 0, gain / plain * (1.0 + MARGIN_Z * self.target.relative_error(base_tokens))
        # A step with more rows never costs less than the plain step: a mean at a larger count below plain's is
        # noise, or the machine's drift between the steps that measured them, and the best of many noisy prefixes
        # is biased towards such luck (proposals bought for nothing). (Not a linear trend either: one sequence's
        # verification on a CPU costs what a decode costs up to ~6 rows and more beyond, and a line fitted over
        # 1-16 rows overprices the short proposals: tried by hand, it took grounded work at batch 1 below 1.8x.)
        for m, (seq_id, j, more) in enumerate(order, 1):
            gain += more
            tokens = setup[seq_id] if j == 1 else 1
            if draft_cost is not None:  # the draft's step j grows by this sequence's tokens
                drafting += draft_cost(depth[j] + tokens) - (draft_cost(depth[j]) if depth[j] else 0.0)
            depth[j] += tokens
            rate = gain / (max(target(base_tokens + m), plain) + drafting)
            if rate > best_rate:
                best, best_rate = m, rate
        k: dict[int, int] = {}
        for seq_id, j, _ in order[:best]:
            k[seq_id] = j
        return k


# ---- metrics -----------------------------------------------------------------------------------------------------

@dataclass
class SpeculativeStats:
    """Counts of an engine's (or a request's) speculation."""

    proposed: int = 0  # proposals verified
    accepted: int = 0  # of those, accepted
    verifications: int = 0  # chunks verified (a sequence's proposals, once per step)
    draft_steps: int = 0  # the draft model's forward steps
    propose_s: float = 0.0  # time spent proposing (n-gram lookups, draft forwards)
    by_k: dict[int, list[int]] = field(default_factory=dict)  # k -> [verifications, accepted]

    def add(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.verifications += 1
        row = self.by_k.setdefault(proposed, [0, 0])
        row[0] += 1
        row[1] += accepted

    @property
    def acceptance_rate(self) -> float:
        """Accepted proposals / proposals verified (nan before any)."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Accepted proposals per verification (nan before any); each verification also yields one more token."""
        return self.accepted / self.verifications if self.verifications else float("nan")
