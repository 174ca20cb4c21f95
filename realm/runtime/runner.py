"""Runner: what both backends (TorchModel, TritonModel) share: the ragged-batch forward they implement, and the
rectangular [batch, T] entry point built on it.

    logits = runner.forward(batch, cache)                          # ForwardBatch, PagedKVCache -> [rows, vocab]
    logits = runner.forward_tokens([[1, 2, 3]])                    # [batch, T] ids -> [batch, T, vocab]
    logits = runner.forward_tokens([[4]], cache, start=3, last_only=True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch import ForwardBatch, Logits
from .config import ModelConfig
from .kv_cache import DEFAULT_BLOCK_SIZE, KVCache, PagedKVCache


def indexed_device(device: torch.device | str) -> torch.device:
    """cuda -> cuda:<current>: tensors report an indexed device, and torch.device("cuda") != torch.device("cuda:0")."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Runner:
    config: ModelConfig
    device: torch.device  # indexed (cuda:0, not cuda): compared with tensors' devices
    dtype: torch.dtype

    def forward(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        """Runs batch's packed chunks, storing their K and V in cache -> logits [len(batch.logits_rows), vocab] in
        `dtype`. The caller advances the sequences (batch.advance()) once the step is done."""
        if batch.max_seq_len > self.config.context_length:
            raise ValueError(f"a sequence reaches position {batch.max_seq_len}, past the context length "
                             f"{self.config.context_length}")
        if cache.k.dtype != self.dtype or cache.k.device != self.device:
            raise ValueError(f"the KV cache is {cache.k.dtype} on {cache.k.device}; this model computes in "
                             f"{self.dtype} on {self.device}")
        if cache.k.shape[0] != self.config.n_layers or cache.k.shape[3:] != (self.config.n_kv_heads,
                                                                                 self.config.head_dim):
            raise ValueError(f"the KV cache's shape {tuple(cache.k.shape)} does not fit this model's "
                             f"{self.config.n_layers} layers of {self.config.n_kv_heads} KV heads x "
                             f"{self.config.head_dim}")
        return self._forward(batch, cache)

    def _forward(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        raise NotImplementedError

    def new_cache(self, batch: int, capacity: int, block_size: int = DEFAULT_BLOCK_SIZE) -> KVCache:
        """A paged cache for `batch` sequences of up to `capacity` tokens each."""
        return KVCache(self.config, batch, capacity, self.dtype, self.device, block_size)

    def forward_tokens(self, tokens: Sequence[Sequence[int]] | torch.Tensor, cache: KVCache | None = None,
                       start: int = 0, last_only: bool = False) -> torch.Tensor:
        """tokens: ids [batch, T] at positions [start, start + T) -> logits [batch, T, vocab] ([batch, 1, vocab] with
        last_only). With a cache, the tokens follow the `start` tokens it holds and are stored in it; without one,
        start must be 0 and the T tokens attend only to each other. Ids are not range-checked here (Model.forward
        does)."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        batch, n = len(tokens), len(tokens[0]) if tokens else 0
        if batch == 0 or n == 0 or any(len(row) != n for row in tokens):
            raise ValueError(f"tokens must be a non-empty [batch, T] rectangle, got {batch} rows of lengths "
                             f"{sorted({len(row) for row in tokens})}")
        if cache is None:
            if start:
                raise ValueError("forward without a cache starts at position 0")
            cache = self.new_cache(batch, n)
        cache.check_room(start, n)
        if cache.batch != batch:
            raise ValueError(f"tokens have batch {batch}, the cache {cache.batch}")
        step = ForwardBatch.build(cache.paged, list(zip(cache.sequences, tokens, strict=True)), self.device,
                                  Logits.LAST if last_only else Logits.ALL, self.config.context_length)
        logits = self.forward(step, cache.paged)
        step.advance()
        return logits.view(batch, 1 if last_only else n, -1)
