"""A linear layer of the model: its weight parts, its bias, and its epilogue contract.

    qkv = Linear.build("blk.3.attn_qkv", [w.wq, w.wk, w.wv], bias, ops, device, dtype)
    y = qkv(x, batch)              # x [tokens, K] -> [tokens, sum of the weights' rows]

Weights that read the same input (Q, K, V; gate, up) are one layer: their rows stacked, as few launches as the
backend allows (`Ops.group_by_format`: the quantized kernels need one weight format per launch, so a layer whose Q
is Q4_K and whose V is Q6_K has two parts; the reference's dense matrices are always one part).

The epilogue: after y = x @ W.T (+ bias), in this order and nowhere else,
1. `deltas`: per-row additions into y, each called as delta(x, y, batch) and writing y in place. This is where a
   per-row LoRA delta `scale * (x @ A[adapter(row)].T) @ B[adapter(row)].T` goes (the adapter of each row comes
   from the step plan, through `batch`); the fused LoRA kernels will fold it into the matmul's own epilogue.
2. `reduce`: y = reduce(y), applied once the full local y is known. This is where the all-reduce of a
   row-parallel (tensor-parallel) layer goes; a column-parallel layer has none.
Neither is used yet; both are tested with stand-ins, so that the features that need them plug in here and nowhere
else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from realm.quant import QTensor

from .ops import Ops

Delta = Callable[[torch.Tensor, torch.Tensor, Any], None]  # (x, y, batch) -> None, adds into y


@dataclass(eq=False)
class Linear:
    name: str
    parts: tuple[Any, ...]  # the backend's prepared weights, each covering consecutive output rows
    sizes: tuple[int, ...]  # output rows of each original weight, in order (Q, K, V)
    in_features: int
    bias: torch.Tensor | None  # [sum(sizes)] in the compute dtype
    ops: Ops = field(repr=False)
    deltas: list[Delta] = field(default_factory=list)
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def build(cls, name: str, weights: Sequence[QTensor], bias: torch.Tensor | None, ops: Ops,
              device: torch.device, dtype: torch.dtype, dense: torch.Tensor | None = None) -> Linear:
        """dense: an already prepared dense matrix to use as the one part (a tied output head shares the
        reference's dequantized embedding instead of holding a second copy)."""
        k = weights[0].shape[1]
        if any(w.shape[1] != k for w in weights):
            raise ValueError(f"{name}: weights read inputs of different sizes {[w.shape[1] for w in weights]}")
        if dense is not None:
            parts = (dense,)
        else:
            parts = tuple(ops.prepare_linear(group, device, dtype) for group in _groups(weights, ops.group_by_format))
        sizes = tuple(w.shape[0] for w in weights)
        if bias is not None:
            if bias.shape != (sum(sizes),):
                raise ValueError(f"{name}: bias has shape {list(bias.shape)}, expected [{sum(sizes)}]")
            bias = bias.to(device=device, dtype=dtype).contiguous()
        return cls(name, parts, sizes, k, bias, ops)

    @property
    def out_features(self) -> int:
        return sum(self.sizes)

    def __call__(self, x: torch.Tensor, batch=None) -> torch.Tensor:
        """x [tokens, in_features] -> y [tokens, out_features], epilogue applied; batch: the step (ForwardBatch), for
        the per-row deltas."""
        matmul = self.ops.matmul
        if len(self.parts) == 1:
            y = matmul(x, self.parts[0], self.bias)
        else:
            y = torch.cat([matmul(x, part, None) for part in self.parts], dim=-1)
            if self.bias is not None:
                y += self.bias
        for delta in self.deltas:
            delta(x, y, batch)
        if self.reduce is not None:
            y = self.reduce(y)
        return y


def _groups(weights: Sequence[QTensor], by_format: bool) -> list[list[QTensor]]:
    """Consecutive weights of one format together (by_format), or all of them in one group."""
    if not by_format:
        return [list(weights)]
    groups: list[list[QTensor]] = []
    for w in weights:
        if groups and groups[-1][0].fmt == w.fmt:
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups
