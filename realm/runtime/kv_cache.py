"""The paged KV cache's tensors, and a fixed-batch cache for the rectangular `Model.forward(tokens, cache)` API.

    kv = PagedKVCache.allocate(config, num_blocks=256, block_size=16, dtype=torch.float16, device="cuda")
    k, v = kv.layer(0)                # [num_blocks, block_size, kv_heads, head_dim] each: realm/kernels/paged.py
    kv.copy_blocks([(3, 7)])          # block 3's rows into block 7, every layer (copy-on-write)

Token t of a sequence lives in block `block_table[t // block_size]`, row `t % block_size`. Which block holds what
(allocation, reference counts, prefix caching) is the block manager's business (realm.runtime.block_manager, plain
Python, in the scheduler); the cache is only the two tensors, owned by the model runner.

`KVCache` is a fixed batch of sequences of one capacity in one PagedKVCache, for `Model.forward(tokens [batch, T],
cache, start)`: its blocks are dealt round-robin (sequence 0 gets blocks 0, batch, 2 * batch, ...), so no sequence's
blocks are adjacent, the same scattered layout the scheduler produces.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .config import ModelConfig

DEFAULT_BLOCK_SIZE = 16

__all__ = ["DEFAULT_BLOCK_SIZE", "KVCache", "PagedKVCache"]


@dataclass
class PagedKVCache:
    k: torch.Tensor  # [layers, num_blocks, block_size, kv_heads, head_dim]
    v: torch.Tensor

    def __post_init__(self):
        if self.k.dim() != 5 or self.k.shape != self.v.shape or self.k.dtype != self.v.dtype:
            raise ValueError(f"k and v must be one [layers, num_blocks, block_size, kv_heads, head_dim] shape and "
                             f"dtype, got {self.k.dtype} {list(self.k.shape)} and {self.v.dtype} {list(self.v.shape)}")

    @classmethod
    def allocate(cls, config: ModelConfig, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> PagedKVCache:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        shape = (config.n_layers, num_blocks, block_size, config.n_kv_heads, config.head_dim)
        k = torch.empty(shape, dtype=dtype, device=device)
        return cls(k, torch.empty_like(k))

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return 2 * config.n_layers * block_size * config.n_kv_heads * config.head_dim * dtype.itemsize

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

    def copy_blocks(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Copy each (src, dst) block's rows, in every layer: one gather and scatter for all pairs."""
        pairs = list(pairs)
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.k.device)
        dst = torch.tensor([d for _, d in pairs], device=self.k.device)
        for t in (self.k, self.v):
            t[:, dst] = t[:, src]


@dataclass
class _Rows:
    """One sequence of a KVCache: its blocks and how many tokens it holds."""

    blocks: list[int]
    length: int = 0


class KVCache:
    """A fixed batch of sequences, each with room for `capacity` tokens, in one PagedKVCache."""

    def __init__(self, config: ModelConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str, block_size: int = DEFAULT_BLOCK_SIZE):
        if capacity > config.context_length:
            raise ValueError(f"KV cache capacity {capacity} exceeds the model's context length "
                             f"{config.context_length}")
        if batch < 1 or capacity < 1 or block_size < 1:
            raise ValueError(f"batch, capacity and block_size must be >= 1, got {batch}, {capacity} and {block_size}")
        per_seq = -(-capacity // block_size)
        self.paged = PagedKVCache.allocate(config, batch * per_seq, block_size, dtype, device)
        self.sequences = [_Rows([i + batch * j for j in range(per_seq)]) for i in range(batch)]
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

    def advance(self, tokens: int) -> None:
        for seq in self.sequences:
            seq.length += tokens
