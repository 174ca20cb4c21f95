"""ForwardBatch: one forward step over a ragged batch of sequences, packed, with their paged-cache addresses.

Each sequence contributes a chunk of new tokens after the ones it already has in the cache (a whole prompt, a
prefill chunk, one decode token, or a few draft tokens to verify). The tokens of all chunks are packed into one
[tokens] row, so every per-token op (matmuls, norms, rope, the K/V store) runs once over the whole batch; attention
alone needs the chunk boundaries (cu_seqlens_q) and each sequence's pages (block_tables, seq_lens).

    batch = ForwardBatch.build(cache, [(seq_a, [5, 6, 7]), (seq_b, [9])], device)   # seq_*: SequenceKV
    logits = runner.forward(batch, cache)                # [2, vocab]: the last token of each chunk
    batch.advance()                                      # the sequences now hold their chunks

`build` checks everything on the host (the kernels do not look at index contents on CUDA): chunk sizes, that each
sequence has blocks for its new tokens, that block ids exist, and the context length.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .kv_cache import PagedKVCache, SequenceKV


class Logits(str, enum.Enum):
    LAST = "last"  # the last token of each chunk: what sampling needs
    ALL = "all"  # every token: scoring, speculative verification


@dataclass(frozen=True)
class ForwardBatch:
    tokens: torch.Tensor  # int64 [tokens]: the chunks, packed
    positions: torch.Tensor  # int32 [tokens]: each token's position in its sequence
    slot_mapping: torch.Tensor  # int32 [tokens]: each token's flat cache slot (block * block_size + row)
    cu_seqlens_q: torch.Tensor  # int32 [batch + 1]: chunk offsets in the packed row
    seq_lens: torch.Tensor  # int32 [batch]: tokens of each sequence in the cache after this step
    block_tables: torch.Tensor  # int32 [batch, max_blocks]; unused columns hold 0
    logits_rows: torch.Tensor  # int64 [rows]: packed rows whose logits the forward returns
    query_lens: tuple[int, ...]  # host copies of the chunk sizes ...
    context_lens: tuple[int, ...]  # ... and of seq_lens
    sequences: tuple[SequenceKV, ...]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_seqlen_q(self) -> int:
        return max(self.query_lens)

    @property
    def max_seq_len(self) -> int:
        return max(self.context_lens)

    @property
    def is_decode(self) -> bool:
        """One new token per sequence: paged decode attention."""
        return self.max_seqlen_q == 1

    @property
    def num_decode(self) -> int:
        """Leading sequences with one new token each (the engine puts decodes first): a mixed step can run them
        through paged decode attention and only the rest through paged flash attention."""
        return next((b for b, q in enumerate(self.query_lens) if q != 1), len(self.query_lens))

    @property
    def is_fresh_prefill(self) -> bool:
        """No sequence has cached tokens: attention needs only this step's K and V."""
        return all(q == c for q, c in zip(self.query_lens, self.context_lens, strict=True))

    @classmethod
    def build(cls, cache: PagedKVCache, chunks: Sequence[tuple[SequenceKV, Sequence[int] | torch.Tensor]],
              device: torch.device | str, logits: Logits | str = Logits.LAST,
              max_positions: int | None = None) -> ForwardBatch:
        """chunks: (sequence, its new token ids); each sequence must already have blocks for its new tokens
        (`cache.reserve`). max_positions: the model's context length, checked when given."""
        if not chunks:
            raise ValueError("a forward batch needs at least one sequence")
        logits = Logits(logits)
        if len({id(seq) for seq, _ in chunks}) != len(chunks):
            raise ValueError("a sequence appears twice in one forward batch")
        bs = cache.block_size
        ids: list[torch.Tensor] = []
        positions, slots, query_lens, context_lens, rows = [], [], [], [], []
        for b, (seq, new) in enumerate(chunks):
            new = torch.as_tensor(new, dtype=torch.int64).reshape(-1).cpu()
            n, start = new.shape[0], seq.length
            if n == 0:
                raise ValueError(f"sequence {b} has no new tokens")
            end = start + n
            if max_positions is not None and end > max_positions:
                raise ValueError(f"sequence {b}: positions up to {end} exceed the context length {max_positions}")
            if len(seq.blocks) * bs < end:
                raise ValueError(f"sequence {b} needs room for {end} tokens but holds {len(seq.blocks)} blocks of "
                                 f"{bs}; reserve them first")
            bad = [blk for blk in seq.blocks[: -(-end // bs)] if not 0 <= blk < cache.num_blocks]
            if bad:
                raise ValueError(f"sequence {b} has block id {bad[0]}, not in [0, {cache.num_blocks})")
            pos = range(start, end)
            positions.extend(pos)
            slots.extend(seq.blocks[p // bs] * bs + p % bs for p in pos)
            first = sum(query_lens)
            rows.extend(range(first, first + n) if logits is Logits.ALL else [first + n - 1])
            ids.append(new)
            query_lens.append(n)
            context_lens.append(end)
        if len(set(slots)) != len(slots):
            raise ValueError("two new tokens map to one cache slot: the sequences share a block they both write")
        width = max(len(seq.blocks) for seq, _ in chunks)
        table = torch.zeros(len(chunks), width, dtype=torch.int32)
        for b, (seq, _) in enumerate(chunks):
            table[b, : len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
        cu = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        return cls(
            tokens=dev(torch.cat(ids)),
            positions=dev(torch.tensor(positions, dtype=torch.int32)),
            slot_mapping=dev(torch.tensor(slots, dtype=torch.int32)),
            cu_seqlens_q=dev(cu),
            seq_lens=dev(torch.tensor(context_lens, dtype=torch.int32)),
            block_tables=dev(table),
            logits_rows=dev(torch.tensor(rows, dtype=torch.int64)),
            query_lens=tuple(query_lens),
            context_lens=tuple(context_lens),
            sequences=tuple(seq for seq, _ in chunks),
        )

    def advance(self) -> None:
        """Record that the forward stored every chunk: each sequence's length moves past its chunk."""
        for seq, n in zip(self.sequences, self.context_lens, strict=True):
            seq.length = n
