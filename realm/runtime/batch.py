"""ForwardBatch: a step plan's chunks packed into device tensors, with their paged-cache addresses.

The tokens of all chunks are packed into one [tokens] row, so every per-token op (matmuls, norms, rope, the K/V
store) runs once over the whole batch; attention alone needs the chunk boundaries and each sequence's pages
(`attention`: realm.kernels.attention.AttentionMetadata, worked out once per step, not per layer).

    batch = ForwardBatch.build(plan, num_blocks, device, max_positions=config.context_length)
    logits = transformer.forward(batch, kv)      # [rows, vocab]: the rows the plan asked for, in plan order

`build` checks everything on the host (the kernels do not look at index contents on CUDA): chunk sizes, that each
sequence's blocks cover its new tokens, that block ids exist, that no two new tokens share a slot, and the context
length. All index arrays travel to the device in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from realm.kernels.attention import AttentionMetadata

from .lora import LoraMode, LoraRows
from .plan import StepPlan


@dataclass(frozen=True)
class ForwardBatch:
    tokens: torch.Tensor  # int32 [tokens]: the chunks, packed
    positions: torch.Tensor  # int32 [tokens]: each token's position in its sequence
    slot_mapping: torch.Tensor  # int32 [tokens]: each token's flat cache slot (block * block_size + row)
    cu_seqlens_q: torch.Tensor  # int32 [batch + 1]: chunk offsets in the packed row
    seq_lens: torch.Tensor  # int32 [batch]: tokens of each sequence in the cache after this step
    block_tables: torch.Tensor  # int32 [batch, max_blocks]; unused columns hold 0
    logits_rows: torch.Tensor  # int32 [rows]: packed rows whose logits the forward returns
    query_lens: tuple[int, ...]  # host copies of the chunk sizes ...
    context_lens: tuple[int, ...]  # ... and of seq_lens
    attention: AttentionMetadata
    lora: LoraRows | None = None  # each row's LoRA adapter slot, when any row has one

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_logits(self) -> int:
        return self.logits_rows.shape[0]

    @property
    def max_seqlen_q(self) -> int:
        return max(self.query_lens)

    @property
    def max_seq_len(self) -> int:
        return max(self.context_lens)

    @property
    def num_decode(self) -> int:
        """Leading sequences with one new token each (the engine puts decodes first)."""
        return self.attention.num_decode

    @property
    def is_fresh_prefill(self) -> bool:
        """No sequence has cached tokens: attention needs only this step's K and V."""
        return self.attention.fresh

    @classmethod
    def build(cls, plan: StepPlan, num_blocks: int, device: torch.device | str,
              max_positions: int | None = None, lora_slots: int = 0,
              lora_mode: LoraMode = LoraMode.FUSED) -> ForwardBatch:
        """plan's chunks on a cache of num_blocks blocks of plan.block_size; max_positions: the model's context
        length, checked when given; lora_slots: the LoRA pool's slots (chunks' adapters must be below it)."""
        chunks = plan.chunks
        if not chunks:
            raise ValueError("a forward batch needs at least one sequence")
        bs = plan.block_size
        tokens, positions, slots, rows, query_lens, context_lens = [], [], [], [], [], []
        for b, c in enumerate(chunks):
            n, start = len(c.token_ids), c.start
            if n == 0:
                raise ValueError(f"sequence {b} has no new tokens")
            if start < 0:
                raise ValueError(f"sequence {b} starts at position {start}")
            end = start + n
            if max_positions is not None and end > max_positions:
                raise ValueError(f"sequence {b}: positions up to {end} exceed the context length {max_positions}")
            if len(c.block_table) * bs < end:
                raise ValueError(f"sequence {b} needs room for {end} tokens but holds {len(c.block_table)} blocks "
                                 f"of {bs}; reserve them first")
            blocks = c.block_table[: -(-end // bs)]
            bad = [blk for blk in blocks if not 0 <= blk < num_blocks]
            if bad:
                raise ValueError(f"sequence {b} has block id {bad[0]}, not in [0, {num_blocks})")
            if any(not 0 <= i < n for i in c.logits) or list(c.logits) != sorted(set(c.logits)):
                raise ValueError(f"sequence {b}: logits offsets {c.logits} must increase within [0, {n})")
            if isinstance(c.adapter, bool) or not isinstance(c.adapter, int) or not -1 <= c.adapter < lora_slots:
                raise ValueError(f"sequence {b}: adapter slot {c.adapter!r} is not -1 (none) or a slot of the LoRA "
                                 f"pool [0, {lora_slots})")
            if c.sampling is not None and not c.logits:
                raise ValueError(f"sequence {b} asks for sampling but for no logits rows to sample from")
            if c.num_draft and (not 0 < c.num_draft < n or c.sampling is None
                                or tuple(c.logits) != tuple(range(n - c.num_draft - 1, n))):
                raise ValueError(f"sequence {b}: {c.num_draft} proposals to verify need a chunk of more tokens, "
                                 f"sampling, and logits at its last {c.num_draft + 1} offsets; got {n} tokens, "
                                 f"logits {c.logits}")
            first = len(tokens)
            tokens.extend(c.token_ids)
            positions.extend(range(start, end))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            rows.extend(first + i for i in c.logits)
            query_lens.append(n)
            context_lens.append(end)
        if len(set(slots)) != len(slots):
            raise ValueError("two new tokens map to one cache slot: the sequences share a block they both write")
        width = max(len(c.block_table) for c in chunks)
        cu = [0]
        for n in query_lens:
            cu.append(cu[-1] + n)
        table = []
        for c in chunks:
            table.extend(c.block_table)
            table.extend([0] * (width - len(c.block_table)))
        adapters = [c.adapter for c in chunks]
        with_lora = any(a >= 0 for a in adapters)
        lora_index = [a for a, n in zip(adapters, query_lens, strict=True) for _ in range(n)] if with_lora else []
        # One host buffer, one copy to the device; the fields are views into it.
        parts = (tokens, positions, slots, cu, context_lens, rows, table, lora_index)
        flat = torch.tensor([v for part in parts for v in part], dtype=torch.int32).to(device, non_blocking=True)
        views, at = [], 0
        for part in parts:
            views.append(flat[at : at + len(part)])
            at += len(part)
        t_tokens, t_positions, t_slots, t_cu, t_lens, t_rows, t_table, t_lora = views
        t_table = t_table.view(len(chunks), width)
        lora = LoraRows(t_lora, _lora_groups(adapters, cu, t_lora.device), lora_mode) if with_lora else None
        return cls(t_tokens, t_positions, t_slots, t_cu, t_lens, t_table, t_rows, tuple(query_lens),
                   tuple(context_lens), AttentionMetadata.build(query_lens, context_lens, t_cu, t_lens, t_table), lora)


def _lora_groups(adapters: list[int], cu: list[int], device) -> tuple[tuple[int, slice | torch.Tensor], ...]:
    """Per adapter slot, its rows of the packed batch: a slice when they are one run, else their indices."""
    runs: dict[int, list[tuple[int, int]]] = {}
    for i, a in enumerate(adapters):
        if a >= 0:
            spans = runs.setdefault(a, [])
            if spans and spans[-1][1] == cu[i]:
                spans[-1] = (spans[-1][0], cu[i + 1])
            else:
                spans.append((cu[i], cu[i + 1]))
    return tuple((a, slice(*spans[0]) if len(spans) == 1 else torch.tensor(
        [r for lo, hi in spans for r in range(lo, hi)], device=device)) for a, spans in runs.items())
