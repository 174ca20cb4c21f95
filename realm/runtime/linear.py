"""A linear layer of the model: its weight parts, its bias, and its epilogue contract.

    qkv = Linear.build("blk.3.attn_qkv", [w.wq, w.wk, w.wv], bias, ops, device, dtype)
    y = qkv(x, batch)              # x [tokens, K] -> [tokens, sum of the weights' rows]

Weights that read the same input (Q, K, V; gate, up) are one layer: their rows stacked, as few launches as the
backend allows (`Ops.group_by_format`: the quantized kernels need one weight format per launch, so a layer whose Q
is Q4_K and whose V is Q6_K has two parts; the reference's dense matrices are always one part).

The epilogue: after y = x @ W.T (+ bias), in this order and nowhere else,
1. LoRA: when the layer has adapter slots (`lora`, a realm.runtime.lora.LoraStack the registry attaches) and a row
   of the step has an adapter (`batch.lora`), each such row gets `scale * (x @ A[adapter(row)].T) @ B[adapter(row)].T`
   on every slice (Q, K, V; gate, up). The reference adds it in PEFT's op order; the Triton backend runs the shrink
   kernel, then the expand in the quantized matmul's own epilogue (`LoraMode.FUSED`) or as a kernel adding into y
   (`LoraMode.SEPARATE`).
2. `deltas`: other per-row additions into y, each called as delta(x, y, batch) and writing y in place.
3. `reduce`: y = reduce(y), applied once the full local y is known. This is where the all-reduce of a
   row-parallel (tensor-parallel) layer goes; a column-parallel layer has none.
`reduce` carries tensor parallelism's all-reduce and vocabulary gather (realm.parallel.tensor_parallel); it runs
after the LoRA delta, so a row-parallel layer's one all-reduce sums the ranks' partial deltas with their partial
outputs (realm.parallel.lora_shard). `deltas` is not used yet; it is tested with stand-ins.
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
    lora: Any = None  # realm.runtime.lora.LoraStack: this layer's adapter slots, when a registry attached them

    @classmethod
    def build(cls, name: str, weights: Sequence[QTensor], bias: torch.Tensor | None, ops: Ops,
              device: torch.device, dtype: torch.dtype, dense: torch.Tensor | None = None) -> Linear:
        """dense: an already prepared dense matrix to use as the one part (a tied output head shares the
        reference's dequantized embedding instead of holding a second copy)."""
        k = weights[0].shape[1]
        if any(w.shape[1] != k for w in weights):
            raise ValueError(f"{name}: weights read inputs of different sizes {[w.shape[1] for w in weights]}")
        if dense is not None:
            parts = (ops.prepare_dense(dense),)
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
        rows = getattr(batch, "lora", None) if self.lora is not None else None
        if rows is not None and self.ops.lora_kernels:
            y = self._lora_kernels(x, rows)
        else:
            y = self._matmul(x)
            if rows is not None:
                self.lora.delta_ref(x, y, rows)
        for delta in self.deltas:
            delta(x, y, batch)
        if self.reduce is not None:
            y = self.reduce(y)
        return y


    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        matmul = self.ops.matmul
        if len(self.parts) == 1:
            return matmul(x, self.parts[0], self.bias)
        y = torch.cat([matmul(x, part, None) for part in self.parts], dim=-1)
        if self.bias is not None:
            y += self.bias
        return y

    def _lora_kernels(self, x: torch.Tensor, rows) -> torch.Tensor:
        """The Triton backend with adapters: one shrink for every slice, then the expand fused into each part's
        quantized matmul (each part covers consecutive output columns), or a separate expand kernel."""
        from realm.kernels.lora import LoraEpilogue, lora_expand, lora_shrink

        from .lora import LoraMode

        stack = self.lora
        t = lora_shrink(x, stack.a, rows.indices)  # float32 [tokens, slices * rank]
        if rows.mode is LoraMode.SEPARATE:
            y = self._matmul(x)
            lora_expand(y, t, stack.b, stack.scale, rows.indices)
            return y
        outs, start = [], 0
        for part in self.parts:
            cols = slice(start, start + part.shape[0])
            outs.append(part(x, lora=LoraEpilogue(t, stack.b[:, cols], stack.scale[:, cols], rows.indices)))
            start = cols.stop
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.bias is not None:
            y += self.bias
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
