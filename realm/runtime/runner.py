"""The model runner: the model on its device, the KV tensors, the sampler; a step plan in, tokens out.

    runner = ModelRunner(transformer, num_blocks=1024, block_size=16)
    out = runner.execute(plan)        # StepPlan (plain data) -> StepOutput (tokens per chunk; logits, probs if asked)

`execute` is the only place where a step touches the device: it copies the plan's blocks (copy-on-write), packs the
plan into device tensors (`ForwardBatch.build`, one host-to-device copy), runs the forward for the logits rows the
plan asks for, and samples every row that has a `RowSampling`, all rows of the step in one batched call
(realm.runtime.sampler). One runner per engine (its KV cache is the engine's); several runners may share one
Transformer (the weights). Under tensor parallelism every rank runs the same plan on its own shard.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import torch

from .batch import ForwardBatch
from .kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache
from .lora import LoraMode, lora_mode_of
from .plan import ChunkPlan, StepOutput, StepPlan
from .sampler import BatchSampler, RowSampling
from .transformer import Transformer

log = logging.getLogger(__name__)

NON_FINITE = ("the model's logits are not finite (NaN or inf): its weights, or the activations this input leads to, "
              "hold NaN or inf")


class BlockCopyError(RuntimeError):
    """The plan's block copies failed: the destination blocks hold no valid KV (their sequences must not go on)."""

    def __init__(self, copies, cause: BaseException):
        super().__init__(f"copying KV blocks failed: {type(cause).__name__}: {cause}")
        self.destinations = {dst for _, dst in copies}


class ModelRunner:
    def __init__(self, transformer: Transformer, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 vocab_size: int | None = None, seed: int | None = None, *, lora_slots: int = 0,
                 lora_mode: LoraMode | str = LoraMode.FUSED):
        """vocab_size: the tokenizer's (the embedding may have padding rows, never sampled); seed: of the sampler's
        own generator, used by unseeded requests (None: random); lora_slots: the model's LoRA pool slots (a chunk's
        `adapter`), lora_mode: how the Triton backend adds their deltas."""
        self.transformer = transformer
        self.config = transformer.config
        self.device = transformer.device
        self.kv = PagedKVCache.allocate(self.config, num_blocks, block_size, transformer.dtype, transformer.device)
        self.vocab_size = vocab_size or self.config.vocab_size
        self.sampler = BatchSampler(self.device, self.vocab_size, seed)
        self.lora_slots = lora_slots
        self.lora_mode = lora_mode_of(lora_mode)

    def __repr__(self) -> str:
        return f"ModelRunner({self.transformer!r}, {self.kv.num_blocks} KV blocks of {self.kv.block_size})"

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    def execute(self, plan: StepPlan, draft_probs: Mapping[int, torch.Tensor] | None = None) -> StepOutput:
        """Run the plan. A chunk that cannot be computed fails alone: `StepOutput.errors` names why, per chunk (its
        logits are not finite, or the forward or sampling raised with it in the batch and again with it alone).
        draft_probs: {seq_id: float32 [num_draft, vocab]}, the draft model's distributions of a chunk's proposals
        (sampled requests); a chunk with proposals and none here was proposed with q = one-hot (n-gram, greedy)."""
        draft_probs = draft_probs or {}
        if plan.block_size != self.kv.block_size:
            raise ValueError(f"the plan's blocks hold {plan.block_size} tokens, this runner's {self.kv.block_size}")
        self._check_copies(plan.copies)
        try:
            self.kv.copy_blocks(plan.copies)
        except Exception as e:
            raise BlockCopyError(plan.copies, e) from e
        if len(plan.chunks) == 1:
            return self._run(plan, draft_probs)
        try:
            return self._run(plan, draft_probs)
        except Exception:
            log.exception("a step of %d chunks failed; running each alone to find the failing ones", len(plan.chunks))
        # Each chunk writes only its own positions' KV, so running it again alone recomputes exactly what the failed
        # batch would have; the copies ran above.
        return self._merge(plan, [self._run_alone(dataclasses.replace(plan, chunks=(c,), copies=()), draft_probs)
                                  for c in plan.chunks])

    def _run_alone(self, plan: StepPlan, draft_probs: Mapping[int, torch.Tensor]) -> StepOutput:
        try:
            return self._run(plan, draft_probs)
        except Exception as e:
            log.exception("chunk of sequence %d failed alone", plan.chunks[0].seq_id)
            return StepOutput(tokens=[[]], errors=[f"{type(e).__name__}: {e}"], accepted=[0])

    def _merge(self, plan: StepPlan, outputs: list[StepOutput]) -> StepOutput:
        """One StepOutput from the chunks' own, in plan order; a failed chunk's logits and probability rows are NaN."""
        out = StepOutput(tokens=[o.tokens[0] for o in outputs], errors=[o.errors[0] for o in outputs],
                         lora=next((o.lora for o in outputs if o.lora is not None), None),
                         accepted=[o.accepted[0] for o in outputs])
        if plan.return_logits:
            width = next((o.logits.shape[1] for o in outputs if o.logits is not None), self.config.vocab_size)
            out.logits = torch.cat([o.logits if o.logits is not None else self._nan_rows(len(c.logits), width)
                                    for c, o in zip(plan.chunks, outputs, strict=True)])
        if plan.return_probs:
            out.probs = torch.cat([o.probs if o.probs is not None else self._nan_rows(
                len(c.logits) if c.sampling is not None else 0, self.vocab_size)
                for c, o in zip(plan.chunks, outputs, strict=True)])
        return out

    def _nan_rows(self, n: int, width: int) -> torch.Tensor:
        return torch.full((n, width), float("nan"), dtype=torch.float32, device=self.device)

    def _run(self, plan: StepPlan, draft_probs: Mapping[int, torch.Tensor]) -> StepOutput:
        batch = ForwardBatch.build(plan, self.kv.num_blocks, self.device, self.config.context_length,
                                   self.lora_slots, self.lora_mode)
        logits = self.transformer.forward(batch, self.kv)  # [plan.num_logits, vocab]
        out = StepOutput(logits=logits if plan.return_logits else None, lora=self._lora_path(batch))
        rows, index = [], []  # the sampled logits rows and their sampling
        checks, check_index, proposed = [], [], []  # the rows verifying proposals, and what each judges
        row = 0
        for chunk in plan.chunks:
            span = range(row, row + len(chunk.logits))
            if chunk.sampling is not None and chunk.num_draft:
                checks.extend(_row_samplings(chunk))
                check_index.extend(span)
                proposed.extend(chunk.token_ids[-chunk.num_draft :])
                proposed.append(-1)  # the last row draws the bonus token
            elif chunk.sampling is not None:
                rows.extend(_row_samplings(chunk))
                index.extend(span)
            row += len(chunk.logits)
        # NaN or inf anywhere in a row makes its sum non-finite (a cheap test; `_finite` looks again at what it flags)
        flags = torch.isfinite(logits[:, : self.vocab_size].sum(-1, dtype=torch.float32)).long()
        parts = []
        if rows:
            sample = self.sampler(self._rows(logits, index), rows, return_probs=plan.return_probs)
            out.probs = sample.probs
            parts.append(sample.tokens)
        if checks:
            verdict = self.sampler.verify(self._rows(logits, check_index), checks, proposed,
                                          self._draft_rows(plan, draft_probs, len(checks)))
            parts += [verdict.tokens, verdict.accept.long()]
        host = torch.cat([*parts, flags]).tolist()  # the step's one device-to-host sync
        tokens, host = host[: len(rows)], host[len(rows) :]
        verified, accepts, flags = host[: len(checks)], host[len(checks) : 2 * len(checks)], host[2 * len(checks) :]
        finite = iter(self._finite(logits, flags))
        drawn, checked = iter(tokens), iter(zip(verified, accepts, strict=True))
        out.tokens, out.accepted = [], []
        for c in plan.chunks:
            if c.sampling is not None and c.num_draft:
                emitted = _emitted(c.token_ids[-c.num_draft :], [next(checked) for _ in c.logits])
                out.tokens.append(emitted)
                out.accepted.append(len(emitted) - 1)
            else:
                out.tokens.append([next(drawn) for _ in c.logits] if c.sampling is not None else [])
                out.accepted.append(0)
        out.errors = [None if all([next(finite) for _ in c.logits]) else NON_FINITE for c in plan.chunks]
        out.tokens = [t if e is None else [] for t, e in zip(out.tokens, out.errors, strict=True)]
        out.accepted = [a if e is None else 0 for a, e in zip(out.accepted, out.errors, strict=True)]
        return out

    def _rows(self, logits: torch.Tensor, index: list[int]) -> torch.Tensor:
        return logits if len(index) == logits.shape[0] else logits[torch.tensor(index, device=self.device)]

    def _draft_rows(self, plan: StepPlan, draft_probs: Mapping[int, torch.Tensor], rows: int) -> torch.Tensor | None:
        """q for every verifying row: a chunk's draft distributions, one-hot rows for proposals that came without one
        (n-gram), zeros for bonus rows; None when no chunk brought distributions (then q is one-hot for all)."""
        if not any(c.seq_id in draft_probs for c in plan.chunks if c.num_draft):
            return None
        q = torch.zeros(rows, self.vocab_size, dtype=torch.float32, device=self.device)
        at = 0
        for c in plan.chunks:
            if c.sampling is None or not c.num_draft:
                continue
            k = c.num_draft
            given = draft_probs.get(c.seq_id)
            if given is None:
                ids = torch.tensor(c.token_ids[-k:], device=self.device)
                q[at + torch.arange(k, device=self.device), ids] = 1.0
            else:
                if tuple(given.shape) != (k, self.vocab_size):
                    raise ValueError(f"draft_probs of sequence {c.seq_id} must be [{k}, {self.vocab_size}], got "
                                     f"{list(given.shape)}")
                q[at : at + k] = given
            at += k + 1
        return q

    def _lora_path(self, batch: ForwardBatch) -> str | None:
        if batch.lora is None:
            return None
        return batch.lora.mode.value if self.transformer.ops.lora_kernels else "reference"

    def _finite(self, logits: torch.Tensor, flags: list[int]) -> list[bool]:
        """Per logits row, whether all its logits are finite. `flags` come from a float32 sum, which also overflows
        for rows of huge finite logits (~1e34 and up): those rows are looked at again, exactly (a second sync, only
        when a row was flagged)."""
        suspects = [i for i, ok in enumerate(flags) if not ok]
        finite = [bool(ok) for ok in flags]
        if suspects:
            exact = torch.isfinite(logits[torch.tensor(suspects, device=self.device), : self.vocab_size]).all(-1)
            for i, ok in zip(suspects, exact.tolist(), strict=True):
                finite[i] = ok
        return finite

    def _check_copies(self, copies) -> None:
        """Block ids in range (a bad one on CUDA would be a device assert), each destination written once and not
        also read (the copies run as one gather and one scatter)."""
        n = self.kv.num_blocks
        bad = [pair for pair in copies if not all(isinstance(b, int) and 0 <= b < n for b in pair)]
        if bad:
            raise ValueError(f"block copy {bad[0]} names a block outside [0, {n})")
        dsts = [d for _, d in copies]
        if len(set(dsts)) != len(dsts) or set(dsts) & {s for s, _ in copies}:
            raise ValueError(f"block copies {list(copies)} write a block twice, or read a block they write")


def _emitted(proposals, verdicts: list[tuple[int, int]]) -> list[int]:
    """The tokens a verified chunk emits: its proposals up to the first one rejected, then that row's token (the
    correction; the bonus token when every proposal passed). verdicts: per logits row, (token, accepted)."""
    out = []
    for proposal, (token, accepted) in zip(proposals, verdicts, strict=False):
        if not accepted:
            return [*out, token]
        out.append(proposal)
    return [*out, verdicts[len(out)][0]]


def _row_samplings(chunk: ChunkPlan) -> list[RowSampling]:
    """The sampling of each logits row of chunk: the row at offset i draws the token at position start + i + 1, with
    the chunk's tokens up to it added to the penalty's history."""
    s = chunk.sampling
    last = len(chunk.token_ids) - 1
    if chunk.logits == (last,) and s.position == chunk.end and s.repetition_penalty == 1.0:
        return [s]  # the common case, a decode or a prompt's last token: as the engine made it
    rows = []
    for i in chunk.logits:
        history = s.history + tuple(chunk.token_ids[: i + 1]) if s.repetition_penalty != 1.0 else ()
        rows.append(dataclasses.replace(s, position=s.position - last + i, history=history))
    return rows
