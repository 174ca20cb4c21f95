"""Batched sampling on device tensors: one call turns a step's logits [rows, vocab] into one token per row.

    sampler = BatchSampler(device, vocab_size, seed=0)
    rows = [RowSampling.of(request.params, position=len(ids), history=ids) for request, ids in batch]
    out = sampler(logits, rows, return_probs=True)   # out.tokens: int64 [rows]; out.probs: float32 [rows, vocab]

Row by row, the distribution is exactly the per-row reference's, `Sampler(params).distribution(...)` then softmax in
`realm.runtime.sampling` (HF's order: repetition penalty, temperature, top-k, top-p, min-p), computed for all rows at
once with per-row parameter tensors: one sort serves top-k and top-p, and only when some row asks for either; a batch
of plain greedy rows is a single argmax. Greedy rows take the argmax after the repetition penalty. One deliberate
difference: a temperature below float32's smallest normal number gives the argmax here, NaN in the reference.

Tokens are drawn by the exponential race (Gumbel-max in another guise): argmax(probs / E) with E ~ Exp(1) i.i.d. per
vocab entry picks token i with probability exactly probs[i]. Unseeded rows share one batched draw from the sampler's
own generator. A seeded row draws its E from a generator seeded with a mix of (seed, position), so its token at a
position is the same whatever else is in the batch, in whatever order, and after a preemption recomputes it. Seeded
outputs therefore differ from the per-row sampler's multinomial draws (same distribution, different draws), and they
are reproducible per (seed, position) on one device type only: CPU and CUDA generators produce different streams.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from realm.runtime.sampling import SamplingParams

logger = logging.getLogger(__name__)

# The smallest normal float32: temperatures below it (1e-300 rounds to 0 in float32) divide by it instead, so
# (logits - max) / t keeps 0 at the max and sends the others to -inf (differences below ~1e-30: far below 0) rather
# than giving 0 / 0 = NaN at the max, as the per-row reference does.
_TINY = torch.finfo(torch.float32).tiny
_FLOAT32_MAX = torch.finfo(torch.float32).max
# Top-p for rows without the filter: above any cumulative mass even after rounding (which can exceed 1 by a few ulps).
_TOP_P_OFF = 2.0
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class RowSampling:
    """One logits row's sampling: plain, picklable data (it travels in the engine's step plan)."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None  # None: a draw from the sampler's own generator
    position: int = 0  # index in its sequence (prompt + output) of the token being sampled: with a seed, the draw's key
    history: tuple[int, ...] = ()  # ids the repetition penalty applies to (the engine fills it only when penalty != 1)

    def __post_init__(self):
        history = self.history.tolist() if isinstance(self.history, torch.Tensor) else self.history
        object.__setattr__(self, "history", tuple(history))
        # Plain comparisons only (NaN fails every one of them): thousands of rows are built per second.
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0 (0 is greedy), got {self.temperature}")
        if not self.top_k >= 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be finite and > 0 (1 is off), got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if not self.position >= 0:
            raise ValueError(f"position must be >= 0, got {self.position}")

    @classmethod
    def of(cls, params: SamplingParams, position: int, history: Sequence[int] = ()) -> RowSampling:
        """A request's row at `position`; the history is kept only when the repetition penalty reads it."""
        return cls(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                   repetition_penalty=params.repetition_penalty, seed=params.seed, position=position,
                   history=() if params.repetition_penalty == 1.0 else history)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 and len(self.history) > 0


@dataclass
class SampleOutput:
    """One step's draws."""

    tokens: torch.Tensor  # int64 [rows] on the logits' device
    probs: torch.Tensor | None  # float32 [rows, vocab]: what each token was drawn from (greedy: one-hot); if asked


@dataclass
class VerifyOutput:
    """A speculative step's verification, per logits row (BatchSampler.verify)."""

    tokens: torch.Tensor  # int64 [rows]: the token the row emits if its proposal is rejected (or it is a bonus row)
    accept: torch.Tensor  # bool [rows]: the row accepts its proposal (False for bonus rows)


# Mixed into a seeded row's key for its acceptance uniform, so that it never reuses the stream of the token draw.
_ACCEPT_SALT = 0x5EC0_DEC0_DE5A_17ED
# Mixed into a request's seed for the draft model's own draws (they must be independent of the target's).
DRAFT_SALT = 0x0D8A_F7ED_0D8A_F7ED


def _accepts(u: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The rejection rule: a proposal drawn from q passes with probability min(1, p / q) (u ~ U[0, 1)), written
    without dividing by a q of 0."""
    return u * q < p


def draft_seed(seed: int | None) -> int | None:
    """The seed a draft model samples a seeded request's proposals with: independent of the target's draws."""
    return None if seed is None else _splitmix64(seed ^ DRAFT_SALT) >> 1


def _splitmix64(z: int) -> int:
    """One step of splitmix64 (Steele, Lea & Flood, OOPSLA 2014): a bijection of 64-bit ints that mixes every bit."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _draw_seed(seed: int, position: int) -> int:
    """The generator seed of a seeded row's draw: splitmix64(splitmix64(seed) ^ position) >> 1.

    Nesting keeps nearby (seed, position) pairs apart (seed + position would make (s, p + 1) and (s + 1, p) collide);
    dropping the top bit gives 63 bits, a non-negative int64 that every torch.Generator accepts.
    """
    return _splitmix64(_splitmix64(seed) ^ position) >> 1


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """x [rows, n] -> int64 [rows]: per row the index of its largest value, the first of equal ones (a NaN counts as
    the largest), as argmax(-1) gives. From max(-1), which returns the same index: torch's CPU argmax over a vocabulary
    row is a slower loop, and a verification samples every one of its rows."""
    return x.max(-1).indices


class BatchSampler:
    """Turns a step's logits into one token per row. Owns two generators on its device: its own, for unseeded rows,
    and one re-seeded for each seeded row (one object reused rather than a generator per row and step)."""

    def __init__(self, device: torch.device | str, vocab_size: int, seed: int | None = None):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"seed must be None or an integer in [0, 2**63), got {seed!r}")
        self.vocab_size = vocab_size
        self._own = torch.Generator(device=torch.device(device))
        if seed is None:
            self._own.seed()
        else:
            self._own.manual_seed(seed)
        self._keyed = torch.Generator(device=self._own.device)
        self.device = self._own.device

    def __call__(self, logits: torch.Tensor, rows: Sequence[RowSampling], *,
                 return_probs: bool = False) -> SampleOutput:
        """logits: [len(rows), >= vocab_size], any float dtype; only the first vocab_size columns are read (the
        embedding may be padded). Returns the tokens and, if `return_probs`, the distributions they were drawn from."""
        self._check(logits, rows)
        logits = logits[:, : self.vocab_size]  # [rows, vocab]
        sampled = [i for i, r in enumerate(rows) if not r.greedy]
        if not sampled and not any(r.penalized for r in rows):
            logger.debug("BatchSampler: %d greedy rows without penalty, one argmax", len(rows))
            tokens = first_argmax(logits)
            return SampleOutput(tokens, self._one_hot(tokens) if return_probs else None)
        x = _penalize(logits.float(), rows)  # float32 [rows, vocab]; a new tensor when any row is penalised
        if not sampled:
            logger.debug("BatchSampler: %d greedy rows with repetition penalty, argmax", len(rows))
            tokens = first_argmax(x)
            return SampleOutput(tokens, self._one_hot(tokens) if return_probs else None)
        if len(sampled) == len(rows):
            probs = self._distribution(x, rows)
            tokens = self._draw(probs, rows)
            return SampleOutput(tokens, probs if return_probs else None)
        # Mixed batch: greedy rows keep the argmax, sampled rows overwrite theirs with a draw.
        index = torch.tensor(sampled, device=x.device)
        chosen = [rows[i] for i in sampled]
        probs = self._distribution(x[index], chosen)
        tokens = first_argmax(x)
        tokens[index] = self._draw(probs, chosen)
        if not return_probs:
            return SampleOutput(tokens, None)
        out = self._one_hot(tokens)
        out[index] = probs
        return SampleOutput(tokens, out)

    def verify(self, logits: torch.Tensor, rows: Sequence[RowSampling], proposed: Sequence[int],
               draft_probs: torch.Tensor | None = None) -> VerifyOutput:
        """Speculative verification of proposed tokens, one logits row per proposal plus a bonus row per sequence.

        logits: [len(rows), >= vocab]; rows: each row's sampling (the row draws the token at `position`);
        proposed: per row, the draft token that row judges (the token at its position), or -1 for a sequence's last
        row (nothing left to judge: its draw is the bonus token); draft_probs: float32 [len(rows), vocab], per row the
        draft's distribution q it drew `proposed` from, or None: every proposal came with q = one-hot (n-gram).

        Per row: greedy, the proposal is accepted iff it is the argmax and the row's token is the argmax; sampled, the
        rule of Leviathan et al. 2023 / Chen et al. 2023: accepted with probability min(1, p(d) / q(d)), and the row's
        token drawn from norm(max(p - q, 0)) (the residual, used when the proposal is rejected) or, for a bonus row,
        from p. The caller takes the proposals up to the first rejected one, then that row's token: every emitted token
        is then distributed exactly as p (greedy: exactly the argmax plain decoding would take). Seeded rows draw their
        acceptance uniform and their token from generators keyed by (seed, position), as __call__ does."""
        self._check(logits, rows)
        if len(proposed) != len(rows):
            raise ValueError(f"proposed: got {len(proposed)} tokens for {len(rows)} rows")
        vocab = self.vocab_size
        if any(not -1 <= t < vocab for t in proposed):
            raise ValueError(f"proposed tokens must be in [0, {vocab}) (or -1 for a bonus row)")
        if draft_probs is not None and tuple(draft_probs.shape) != (len(rows), vocab):
            raise ValueError(f"draft_probs must be [{len(rows)}, {vocab}], got {list(draft_probs.shape)}")
        x = _penalize(logits[:, :vocab].float(), rows)
        tokens = first_argmax(x)
        draft = torch.tensor(proposed, device=x.device)
        accept = tokens == draft
        sampled = [i for i, r in enumerate(rows) if not r.greedy]
        if not sampled:
            return VerifyOutput(tokens, accept)
        index = torch.tensor(sampled, device=x.device)
        chosen = [rows[i] for i in sampled]
        p = self._distribution(x[index], chosen)  # [S, vocab]
        d = draft[index]
        judged = d >= 0
        if draft_probs is None:  # q = one-hot at the proposal (bonus rows: q = 0, the residual is p itself)
            q = torch.zeros_like(p).scatter_(1, d.clamp_min(0)[:, None], judged[:, None].float())
        else:
            q = draft_probs[index].float() * judged[:, None]
        p_d = p.gather(1, d.clamp_min(0)[:, None])[:, 0]
        q_d = q.gather(1, d.clamp_min(0)[:, None])[:, 0]
        u = self._uniform(chosen, p.device)
        accept[index] = judged & _accepts(u, p_d, q_d)
        tokens[index] = self._draw((p - q).clamp_min_(0), chosen)  # unnormalised: the race needs no sum
        return VerifyOutput(tokens, accept)

    def _uniform(self, rows: Sequence[RowSampling], device) -> torch.Tensor:
        """One U[0, 1) per row: from the sampler's own generator, or keyed by (seed, position) for seeded rows (on a
        different stream than the token's draw at that position)."""
        u = torch.rand(len(rows), generator=self._own, device=device)
        for i, r in enumerate(rows):
            if r.seed is not None:
                self._keyed.manual_seed(_draw_seed(r.seed ^ _ACCEPT_SALT, r.position))
                u[i] = torch.rand(1, generator=self._keyed, device=device)[0]
        return u

    def _check(self, logits: torch.Tensor, rows: Sequence[RowSampling]) -> None:
        if logits.dim() != 2:
            raise ValueError(f"logits must be 2-D [rows, vocab], got shape {tuple(logits.shape)}")
        if not logits.is_floating_point():
            raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
        if logits.shape[0] != len(rows):
            raise ValueError(f"rows: got {len(rows)} RowSampling for {logits.shape[0]} logits rows")
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns, fewer than vocab_size {self.vocab_size}")
        here, mine = logits.device, self.device
        if here.type != mine.type or (mine.index is not None and here.index != mine.index):
            raise ValueError(f"logits are on {here}, the sampler's generators on {mine}")

    def _distribution(self, x: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
        """x: float32 [n, vocab] (penalised), no greedy row -> the probabilities [n, vocab] each row draws from."""
        vocab = x.shape[-1]
        # One host -> device copy per step for all per-row parameters; k is exact in float32 (vocab < 2**24).
        params = torch.tensor(
            [[r.temperature, r.top_k if 0 < r.top_k < vocab else vocab, r.top_p if r.top_p < 1 else _TOP_P_OFF,
              r.min_p] for r in rows], dtype=torch.float32, device=x.device)
        temperature, top_k, top_p, min_p = (p[:, None] for p in params.unbind(-1))  # each [n, 1]
        # Shifted so the top logit is 0 before dividing (as the reference does); see _TINY for tiny temperatures.
        x = (x - x.amax(-1, keepdim=True)) / temperature.clamp_min(_TINY)
        if any(0 < r.top_k < vocab or r.top_p < 1 for r in rows):
            x = _filter_top_k_top_p(x, top_k.long(), top_p)
        if any(r.min_p > 0 for r in rows):
            probs = x.softmax(-1)
            x = x.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), -math.inf)
        return x.softmax(-1)

    def _draw(self, probs: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
        """probs: float32 [n, vocab] -> int64 [n]: argmax(probs / E), E ~ Exp(1) i.i.d. (the exponential race)."""
        e = torch.empty_like(probs)
        seeded = [(i, r) for i, r in enumerate(rows) if r.seed is not None]
        if len(seeded) < len(rows):
            e.exponential_(generator=self._own)  # one batched draw; the seeded rows' part is overwritten below
        for i, r in seeded:
            self._keyed.manual_seed(_draw_seed(r.seed, r.position))
            e[i].exponential_(generator=self._keyed)
        # An E of exactly 0 (possible in some generators) would give 0 / 0 = NaN at filtered tokens, which argmax
        # ranks first; clamping costs a bias far below float32 resolution.
        return first_argmax(probs / e.clamp_min_(_TINY))

    def _one_hot(self, tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(tokens.shape[0], self.vocab_size, dtype=torch.float32, device=tokens.device)
        return out.scatter_(1, tokens[:, None], 1.0)


def _penalize(x: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """x: float32 [rows, vocab] -> x with every (row, history id) pair penalised as `apply_repetition_penalty` does,
    out of place (x may alias the caller's logits). Duplicate ids in a history write the same value twice."""
    penalized = [(i, r) for i, r in enumerate(rows) if r.penalized]
    if not penalized:
        return x
    row_ids = list(chain.from_iterable([i] * len(r.history) for i, r in penalized))
    token_ids = list(chain.from_iterable(r.history for _, r in penalized))
    low, high = min(token_ids), max(token_ids)
    if low < 0 or high >= x.shape[-1]:
        # Checked here: an out-of-range index on a GPU is a device-side assert, not an error naming the cause.
        raise ValueError(f"history ids must be in [0, {x.shape[-1]}), got ids from {low} to {high}")
    pairs = torch.tensor([row_ids, token_ids], device=x.device)  # int64 [2, pairs]
    factor = torch.tensor([r.repetition_penalty for r in rows], dtype=torch.float32, device=x.device)[pairs[0]]
    seen = x[pairs[0], pairs[1]]
    # A penalty float32 rounds to 0 or inf (RowSampling takes any positive float) would make inf here, and inf - inf =
    # NaN when the row is shifted by its max: the largest finite float32 keeps such a row a valid distribution.
    seen = torch.where(seen > 0, seen / factor, seen * factor).clamp_(-_FLOAT32_MAX, _FLOAT32_MAX)
    return x.index_put((pairs[0], pairs[1]), seen)


def _filter_top_k_top_p(x: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """x: float32 [n, vocab]; k: int64 [n, 1] (vocab: off); p: float32 [n, 1] (> 1: off) -> x with -inf where
    `filter_top_p(filter_top_k(x, k), p)` drops a token.

    One descending sort serves both: top-k keeps the values >= the k-th (ties included), and since they stay first
    in sorted order, the top-k-masked sorted row is what filter_top_p would sort. Top-p drops a token when the mass
    ranked above it is >= p. Among exactly tied logits at the top-p cut, which ones stay follows the sort's order,
    as in the reference.
    """
    sorted_x, order = torch.sort(x, descending=True)
    cut_k = sorted_x < sorted_x.gather(-1, k - 1)
    sorted_x = sorted_x.masked_fill(cut_k, -math.inf)
    probs = sorted_x.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass of the tokens ranked above each one
    drop_sorted = cut_k | (before >= p)
    drop_sorted[:, 0] = False  # the most likely token always stays, even for a top_p float32 rounds to 0 (1e-300)
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return x.masked_fill(drop, -math.inf)
