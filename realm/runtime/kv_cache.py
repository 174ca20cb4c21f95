"""KVCache: the keys and values of every layer for a batch of sequences, in one contiguous buffer per K and V.

    cache = KVCache.allocate(config, batch=1, capacity=512, dtype=torch.float32, device="cpu")
    k_all, v_all = cache.write(layer, start, k, v)   # k, v: [batch, kv_heads, tokens, head_dim]

Positions [0, capacity) of each sequence are slots; `length` counts the ones filled. The paged cache of the Triton
forward (issue 5) replaces the contiguous slots with blocks; this one is the torch reference's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig


@dataclass
class KVCache:
    k: torch.Tensor  # [layers, batch, kv_heads, capacity, head_dim]
    v: torch.Tensor
    length: int = 0  # positions filled (the same for every sequence of the batch)

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str) -> KVCache:
        if capacity > config.context_length:
            raise ValueError(f"KV cache capacity {capacity} exceeds the model's context length "
                             f"{config.context_length}")
        shape = (config.n_layers, batch, config.n_kv_heads, capacity, config.head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def check_room(self, start: int, tokens: int) -> None:
        if start != self.length:
            raise ValueError(f"forward at position {start}, but the cache holds {self.length} positions")
        if start + tokens > self.capacity:
            raise ValueError(f"{start} cached + {tokens} new tokens exceed the KV cache capacity {self.capacity}")

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [batch, kv_heads, tokens, head_dim] at [start, start + tokens); returns the layer's K and V
        for positions [0, start + tokens)."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
