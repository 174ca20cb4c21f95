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

import torch

from .batch import ForwardBatch
from .kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache
from .plan import ChunkPlan, StepOutput, StepPlan
from .sampler import BatchSampler, RowSampling
from .transformer import Transformer


class BlockCopyError(RuntimeError):
    """The plan's block copies failed: the destination blocks hold no valid KV (their sequences must not go on)."""

    def __init__(self, copies, cause: BaseException):
        super().__init__(f"copying KV blocks failed: {type(cause).__name__}: {cause}")
        self.destinations = {dst for _, dst in copies}


class ModelRunner:
    def __init__(self, transformer: Transformer, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 vocab_size: int | None = None, seed: int | None = None):
        """vocab_size: the tokenizer's (the embedding may have padding rows, never sampled); seed: of the sampler's
        own generator, used by unseeded requests (None: random)."""
        self.transformer = transformer
        self.config = transformer.config
        self.device = transformer.device
        self.kv = PagedKVCache.allocate(self.config, num_blocks, block_size, transformer.dtype, transformer.device)
        self.sampler = BatchSampler(self.device, vocab_size or self.config.vocab_size, seed)

    def __repr__(self) -> str:
        return f"ModelRunner({self.transformer!r}, {self.kv.num_blocks} KV blocks of {self.kv.block_size})"

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    def execute(self, plan: StepPlan) -> StepOutput:
        if plan.block_size != self.kv.block_size:
            raise ValueError(f"the plan's blocks hold {plan.block_size} tokens, this runner's {self.kv.block_size}")
        batch = ForwardBatch.build(plan, self.kv.num_blocks, self.device, self.config.context_length)
        self._check_copies(plan.copies)
        try:
            self.kv.copy_blocks(plan.copies)
        except Exception as e:
            raise BlockCopyError(plan.copies, e) from e
        logits = self.transformer.forward(batch, self.kv)  # [plan.num_logits, vocab]
        out = StepOutput(logits=logits if plan.return_logits else None)
        rows, index = [], []  # the sampled logits rows and their sampling
        row = 0
        for chunk in plan.chunks:
            if chunk.sampling is not None:
                rows.extend(_row_samplings(chunk))
                index.extend(range(row, row + len(chunk.logits)))
            row += len(chunk.logits)
        if not rows:
            out.tokens = [[] for _ in plan.chunks]
            return out
        sampled_logits = logits if len(index) == logits.shape[0] else logits[torch.tensor(index, device=self.device)]
        sample = self.sampler(sampled_logits, rows, return_probs=plan.return_probs)
        tokens = iter(sample.tokens.tolist())  # the step's one device-to-host sync
        out.tokens = [[next(tokens) for _ in c.logits] if c.sampling is not None else [] for c in plan.chunks]
        out.probs = sample.probs
        return out


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
