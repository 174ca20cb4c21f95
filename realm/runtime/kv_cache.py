"""The paged KV cache both backends use: fixed-size blocks of tokens, a free list, and per-sequence block lists.

    cache = PagedKVCache.allocate(config, num_blocks=256, block_size=16, dtype=torch.float16, device="cuda")
    seq = SequenceKV()
    cache.reserve(seq, 40)            # blocks for 40 tokens (3 blocks of 16)
    k, v = cache.layer(0)             # [num_blocks, block_size, kv_heads, head_dim] each: realm/kernels/paged.py
    cache.release(seq)                # its blocks back to the free list

Token t of a sequence lives in block `seq.blocks[t // block_size]`, row `t % block_size`. Blocks are taken from the
free list in any order, so a sequence's blocks are scattered: the kernels and the torch reference look every token up
through the block table and never assume adjacency. `KVCache` wraps one PagedKVCache with a fixed batch of sequences
of one capacity, for the rectangular `Model.forward(tokens [batch, T], cache, start)` API and single-stream
generation; the continuous-batching scheduler manages blocks itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ModelConfig

DEFAULT_BLOCK_SIZE = 16


class CacheFullError(ValueError):
    """Not enough free blocks for a reservation."""


@dataclass
class SequenceKV:
    """One sequence's place in the cache: its blocks in token order and how many tokens are stored."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0


@dataclass
class PagedKVCache:
    k: torch.Tensor  # [layers, num_blocks, block_size, kv_heads, head_dim]
    v: torch.Tensor
    free: list[int] = field(default_factory=list)  # block ids not held by any sequence

    @classmethod
    def allocate(cls, config: ModelConfig, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> PagedKVCache:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        shape = (config.n_layers, num_blocks, block_size, config.n_kv_heads, config.head_dim)
        k = torch.empty(shape, dtype=dtype, device=device)
        return cls(k, torch.empty_like(k), list(range(num_blocks)))

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's K and V caches, [num_blocks, block_size, kv_heads, head_dim] each (views)."""
        return self.k[i], self.v[i]

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def reserve(self, seq: SequenceKV, tokens: int) -> None:
        """Give seq enough blocks to hold `tokens` tokens in all (a no-op when it already has them)."""
        need = self.blocks_for(tokens) - len(seq.blocks)
        if need <= 0:
            return
        if need > len(self.free):
            raise CacheFullError(f"{tokens} tokens need {need} more KV blocks of {self.block_size}; "
                                 f"{len(self.free)} of {self.num_blocks} are free")
        seq.blocks.extend(self.free.pop() for _ in range(need))

    def release(self, seq: SequenceKV) -> None:
        self.free.extend(reversed(seq.blocks))
        seq.blocks.clear()
        seq.length = 0


class KVCache:
    """A fixed batch of sequences, each with room for `capacity` tokens, in one PagedKVCache.

    Blocks are dealt round-robin (sequence 0 gets blocks 0, batch, 2 * batch, ...), so no sequence's blocks are
    adjacent: the same scattered layout the scheduler produces.
    """

    def __init__(self, config: ModelConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str, block_size: int = DEFAULT_BLOCK_SIZE):
        if capacity > config.context_length:
            raise ValueError(f"KV cache capacity {capacity} exceeds the model's context length "
                             f"{config.context_length}")
        if batch < 1 or capacity < 1 or block_size < 1:
            raise ValueError(f"batch, capacity and block_size must be >= 1, got {batch}, {capacity} and {block_size}")
        per_seq = -(-capacity // block_size)
        self.paged = PagedKVCache.allocate(config, batch * per_seq, block_size, dtype, device)
        self.paged.free.clear()
        self.sequences = [SequenceKV(blocks=list(range(b, batch * per_seq, batch))) for b in range(batch)]
        self.capacity = capacity

    @property
    def batch(self) -> int:
        return len(self.sequences)

    @property
    def length(self) -> int:
        """Tokens stored per sequence (the same for all of them)."""
        return self.sequences[0].length

    @property
    def nbytes(self) -> int:
        return self.paged.nbytes

    def check_room(self, start: int, tokens: int) -> None:
        if start != self.length:
            raise ValueError(f"forward at position {start}, but the cache holds {self.length} positions")
        if start + tokens > self.capacity:
            raise ValueError(f"{start} cached + {tokens} new tokens exceed the KV cache capacity {self.capacity}")
