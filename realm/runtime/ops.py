"""The op layer: every op the model definition calls, with a Triton implementation and a torch reference.

    ops = ops_for(Backend.TRITON)            # or Backend.TORCH: the `<op>_ref` functions of realm.kernels
    x, h = ops.rms_norm(out, weight, eps, residual=h)
    q, k = ops.rope(q, k, positions, cos_sin)
    y = ops.matmul(x, part, bias)             # a linear layer's weight part, as ops.prepare_linear made it

Each field is the kernel file's launcher (TRITON) or its reference beside it (TORCH), so the model in
`transformer.py` is written once and the torch backend is that same model on reference ops. The two differ only
where the reference must reproduce HF transformers bit for bit in float32: its linear layers multiply dequantized
matrices with `F.linear` (cuBLAS/MKL, as HF does), and its attention is SDPA per sequence.

| op        | Triton (realm.kernels)                          | reference                                  |
|-----------|-------------------------------------------------|--------------------------------------------|
| linear    | qmatmul on quantized planes (`PreparedWeight`)  | F.linear on the dequantized matrix         |
| rms_norm  | rms_norm (residual add fused)                   | rms_norm_ref                               |
| rope      | apply_rope (in place)                           | apply_rope_ref                             |
| silu_mul  | silu_mul                                        | silu_mul_ref                               |
| gelu_tanh_mul | gelu_tanh_mul (silu_mul's kernel)           | gelu_tanh_mul_ref                          |
| store_kv  | store_kv                                        | store_kv_ref                               |
| attention | paged_attention (flash / paged decode / paged flash) | paged_attention_ref (SDPA per sequence) |

Backend.ONEDNN is the reference with three changes, for speed on CPUs: its linear layers multiply the dequantized
matrices packed once (`PackedWeight`), not through F.linear: steps of up to 64 rows (decodes, verification) in a C
kernel streaming float32 panels (`realm.kernels.cpu_linear`), longer ones (prompt chunks) in oneDNN's GEMM; its
attention reads short chunks in place from the pages in a C kernel (`realm.kernels.cpu_attention`), not gathered for
SDPA; and its RMSNorm, RoPE and SiLU * up are one C loop each (`realm.kernels.cpu_layer_ops`), not several torch ops.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from realm.quant import QTensor


class Backend(str, enum.Enum):
    TORCH = "torch"  # the torch reference forward (float32 by default)
    TRITON = "triton"  # realm's Triton kernels: quantized matmuls, flash / paged attention, fused layer ops
    # The reference's ops with its linear layers on weights packed once for the CPU (realm's C kernel for steps of
    # up to 64 rows, oneDNN above; bench/cpu_linear.py) and a C kernel for short attention chunks. Not bit-exact with
    # HF (other summation orders).
    ONEDNN = "onednn"


def backend_of(backend: Backend | str) -> Backend:
    try:
        return Backend(backend)
    except ValueError:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(b.value for b in Backend)}") from None


@dataclass(frozen=True)
class Ops:
    backend: Backend
    # A linear layer's weights as parts: `group_by_format` says whether consecutive weights of one block format
    # become one part (quantized kernels: one launch per format) or all weights one part (dense matrices).
    group_by_format: bool
    prepare_linear: Callable[[Sequence[QTensor], torch.device, torch.dtype], Any]  # weights -> one part
    matmul: Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor]  # x [T, K], part, bias -> [T, N]
    rms_norm: Callable  # (x, weight, eps, residual=None) -> y, or (y, x + residual)
    rope: Callable  # (q, k, positions, cos_sin) -> (q, k) rotated
    silu_mul: Callable  # gate_up [T, 2F] -> [T, F]
    store_kv: Callable  # (k, v, k_cache, v_cache, slot_mapping) -> None
    attention: Callable  # (q, k, v, k_cache, v_cache, meta, scale, window=None) -> [T, heads, head_dim]
    # The same ops without their input checks, for the layers after the first of a step: they see the same shapes,
    # dtypes and devices, so the first layer's checks hold for them (the host time of a decode step is mostly such
    # checks otherwise). None: these ops are cheap to check (the reference's).
    unchecked: Ops | None = None
    # An already dense matrix (the reference's tied head: the embedding itself) -> one part.
    prepare_dense: Callable[[torch.Tensor], Any] = lambda w: w
    # Whether adapters run as kernels (Triton's shrink/expand) or as the reference's PEFT-order delta.
    lora_kernels: bool = False
    gelu_tanh_mul: Callable | None = None  # gate_up [T, 2F] -> GELU-tanh(gate) * up [T, F] (Gemma)

    @property
    def fast(self) -> Ops:
        return self if self.unchecked is None else self.unchecked


def _dense_part(weights: Sequence[QTensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The reference's part: the weights dequantized (realm's bit-exact decoder, what HF gets from gguf-py) and
    stacked row-wise into one matrix [sum(N), K]: one matmul, each output element the same dot product."""
    w = torch.cat([q.dequantize() for q in weights]) if len(weights) > 1 else weights[0].dequantize()
    return w.to(device=device, dtype=dtype).contiguous()


def _dense_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, bias)


@functools.cache
def reference_ops() -> Ops:
    from realm.kernels.attention import paged_attention_ref
    from realm.kernels.rms_norm import rms_norm_ref
    from realm.kernels.rope import apply_rope_ref
    from realm.kernels.silu_mul import gelu_tanh_mul_ref, silu_mul_ref
    from realm.kernels.store_kv import store_kv_ref

    return Ops(Backend.TORCH, group_by_format=False, prepare_linear=_dense_part, matmul=_dense_matmul,
               rms_norm=rms_norm_ref, rope=apply_rope_ref, silu_mul=silu_mul_ref, store_kv=store_kv_ref,
               attention=paged_attention_ref, gelu_tanh_mul=gelu_tanh_mul_ref)


def _quantized_part(weights: Sequence[QTensor], device: torch.device, dtype: torch.dtype):
    """Triton's part: weights of one format concatenated row-wise on their GGUF bytes (quantized rows are
    independent, so this is exact), in the planes layout on the device, ready for repeated launches."""
    from realm.kernels.qmatmul import PreparedWeight

    first = weights[0]
    if len(weights) == 1:
        return PreparedWeight(first, device)
    rows = sum(w.shape[0] for w in weights)
    data = torch.cat([w.gguf_bytes() for w in weights])
    return PreparedWeight(QTensor(data, first.fmt, (rows, first.shape[1])), device)


def _quantized_matmul(x: torch.Tensor, part, bias: torch.Tensor | None) -> torch.Tensor:
    y = part(x)
    if bias is not None:
        y += bias
    return y


@functools.cache
def triton_ops() -> Ops:
    """Imports Triton's kernels: only when the Triton backend is asked for."""
    from realm.kernels.attention import paged_attention, paged_attention_unchecked
    from realm.kernels.rms_norm import rms_norm, rms_norm_unchecked
    from realm.kernels.rope import apply_rope, apply_rope_unchecked
    from realm.kernels.silu_mul import gelu_tanh_mul, gelu_tanh_mul_unchecked, silu_mul, silu_mul_unchecked
    from realm.kernels.store_kv import store_kv, store_kv_unchecked

    unchecked = Ops(Backend.TRITON, group_by_format=True, prepare_linear=_quantized_part, matmul=_quantized_matmul,
                    rms_norm=rms_norm_unchecked, rope=apply_rope_unchecked, silu_mul=silu_mul_unchecked,
                    store_kv=store_kv_unchecked, attention=paged_attention_unchecked,
                    gelu_tanh_mul=gelu_tanh_mul_unchecked)
    return Ops(Backend.TRITON, group_by_format=True, prepare_linear=_quantized_part, matmul=_quantized_matmul,
               rms_norm=rms_norm, rope=apply_rope, silu_mul=silu_mul, store_kv=store_kv, attention=paged_attention,
               unchecked=unchecked, lora_kernels=True, gelu_tanh_mul=gelu_tanh_mul)


# The row count oneDNN packs for (a hint: any count runs): 4 was the fastest of 1, 4 and 16 for steps of 1-16 rows
# (bench/cpu_linear.py); oneDNN now runs the steps above cpu_linear.MAX_ROWS rows, where the hint matters little.
ONEDNN_PACKED_ROWS = 4


@dataclass(frozen=True)
class PackedWeight:
    """A dense weight [N, K], packed once at load: in oneDNN's blocked layout (an opaque mkldnn tensor) for long
    steps, and in float32 the panels of realm.kernels.cpu_linear for steps of up to its MAX_ROWS rows (None where
    that kernel cannot run: other dtypes, no C compiler). The two copies double the weights' memory on this backend:
    the price of the faster decode and verification (neither layout serves both well)."""

    packed: torch.Tensor
    shape: tuple[int, int]
    panels: torch.Tensor | None = None


def _pack(w: torch.Tensor) -> PackedWeight:
    from realm.kernels import cpu_linear

    w = w.contiguous()
    panels = None
    if w.dtype == torch.float32:
        if (reason := cpu_linear.unavailable_reason()) is None:
            panels = cpu_linear.pack_panels(w)
        else:
            cpu_linear.warn_unavailable(reason)
    return PackedWeight(torch.ops.mkldnn._reorder_linear_weight(w, ONEDNN_PACKED_ROWS), tuple(w.shape), panels)


def _packed_part(weights: Sequence[QTensor], device: torch.device, dtype: torch.dtype) -> PackedWeight:
    return _pack(_dense_part(weights, device, dtype))


def _packed_matmul(x: torch.Tensor, part: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    from realm.kernels.cpu_linear import MAX_ROWS, linear_panels_unchecked

    if part.panels is not None and x.shape[0] <= MAX_ROWS:
        return linear_panels_unchecked(x, part.panels, part.shape[0], bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), part.packed, bias, "none", [], "")


def check_onednn(device: torch.device, dtype: torch.dtype) -> None:
    """The onednn backend packs for the CPU, in float32 or bfloat16 (what oneDNN's CPU matmul takes)."""
    if device.type != "cpu":
        raise ValueError(f"the onednn backend runs on the CPU, not {device}; use triton (or torch) on CUDA")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the onednn backend computes in float32 or bfloat16, not {dtype}")
    if not torch.backends.mkldnn.is_available():
        raise ValueError("the onednn backend needs a torch built with oneDNN (torch.backends.mkldnn.is_available() is "
                         "False); use the torch backend")


@functools.cache
def onednn_ops() -> Ops:
    from realm.kernels.cpu_attention import paged_attention_cpu
    from realm.kernels.cpu_layer_ops import apply_rope_cpu, rms_norm_cpu, silu_mul_cpu

    return dataclasses.replace(reference_ops(), backend=Backend.ONEDNN, prepare_linear=_packed_part,
                               matmul=_packed_matmul, prepare_dense=_pack, attention=paged_attention_cpu,
                               rms_norm=rms_norm_cpu, rope=apply_rope_cpu, silu_mul=silu_mul_cpu)


def backends_for(device: torch.device | str) -> list[Backend]:
    """The backends that run on this kind of device (onednn only on the CPU)."""
    cpu = torch.device(device).type == "cpu"
    return [b for b in Backend if cpu or b is not Backend.ONEDNN]


def ops_for(backend: Backend | str) -> Ops:
    backend = backend_of(backend)
    if backend is Backend.TORCH:
        return reference_ops()
    return onednn_ops() if backend is Backend.ONEDNN else triton_ops()
