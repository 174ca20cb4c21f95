"""The paged KV cache both backends use: fixed-size blocks of tokens, and the block manager that hands them out.

    cache = PagedKVCache.allocate(config, num_blocks=256, block_size=16, dtype=torch.float16, device="cuda")
    seq = SequenceKV()
    cache.reserve(seq, 40)            # blocks for 40 tokens (3 blocks of 16): cache.blocks.allocate
    k, v = cache.layer(0)             # [num_blocks, block_size, kv_heads, head_dim] each: realm/kernels/paged.py
    cache.release(seq)                # its blocks back: cache.blocks.free

Token t of a sequence lives in block `seq.blocks[t // block_size]`, row `t % block_size`. Blocks are taken from the
free list in any order, so a sequence's blocks are scattered: the kernels and the torch reference look every token up
through the block table and never assume adjacency. `KVCache` wraps one PagedKVCache with a fixed batch of sequences
of one capacity, for the rectangular `Model.forward(tokens [batch, T], cache, start)` API and single-stream
generation. Which block holds what (reference counts, prefix caching) is the block manager's business
(realm.runtime.block_manager, plain Python); the cache itself is the two tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .block_manager import BlockManager, CacheFullError, SequenceKV
from .config import ModelConfig

DEFAULT_BLOCK_SIZE = 16

__all__ = ["DEFAULT_BLOCK_SIZE", "CacheFullError", "KVCache", "PagedKVCache", "SequenceKV"]


@dataclass
class PagedKVCache:
    k: torch.Tensor  # [layers, num_blocks, block_size, kv_heads, head_dim]
    v: torch.Tensor
    blocks: BlockManager = field(default=None)  # type: ignore[assignment]  # None: one without prefix caching

    def __post_init__(self):
        if self.blocks is None:
            self.blocks = BlockManager(self.k.shape[1], self.k.shape[2], prefix_caching=False)
        elif (self.blocks.num_blocks, self.blocks.block_size) != tuple(self.k.shape[1:3]):
            raise ValueError(f"the block manager's {self.blocks.num_blocks} blocks of {self.blocks.block_size} do "
                             f"not match the cache's {self.k.shape[1]} of {self.k.shape[2]}")

    @classmethod
    def allocate(cls, config: ModelConfig, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 prefix_caching: bool = False) -> PagedKVCache:
        blocks = BlockManager(num_blocks, block_size, prefix_caching)  # checks the sizes
        shape = (config.n_layers, num_blocks, block_size, config.n_kv_heads, config.head_dim)
        k = torch.empty(shape, dtype=dtype, device=device)
        return cls(k, torch.empty_like(k), blocks)

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

    def reserve(self, seq: SequenceKV, tokens: int) -> None:
        """Give seq enough blocks to hold `tokens` tokens in all (a no-op when it already has them)."""
        self.blocks.allocate(seq, tokens)

    def release(self, seq: SequenceKV) -> None:
        self.blocks.free(seq)


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
        self.sequences = [SequenceKV() for _ in range(batch)]
        for _ in range(per_seq):  # one block each in turn
            for seq in self.sequences:
                self.paged.reserve(seq, (len(seq.blocks) + 1) * block_size)
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
