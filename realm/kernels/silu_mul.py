"""The gated activations of an MLP (Shazeer 2020, "GLU Variants Improve Transformer"), from one fused gate/up matmul:

    gate_up = x @ [W_gate; W_up].T         # [tokens, 2 * ffn]: gate = first half, up = second half
    out     = silu(gate) * up              # SwiGLU (llama): silu(g) = g / (1 + exp(-g)), [tokens, ffn]
    out     = gelu_tanh(gate) * up         # GeGLU (Gemma): 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))

One kernel serves both (the constexpr GELU picks the activation).

Precision: computed in float32 and rounded once to gate_up's dtype at the store. In float32 that is
realm.runtime.torch_model's `F.silu(gate) * up`; in float16/bfloat16 torch would round silu(gate) before the
multiply, so the kernel is at most about one output ulp from it and at least as accurate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import cdiv, next_power_of_2
from .qdecode import check_runnable

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Columns per program: whole rows up to 1024 (few programs at decode), two or more programs per row beyond. Elementwise
# and memory-bound, so the tile only needs to be large enough to keep loads in flight; not yet tuned on a GPU.
MAX_BLOCK = 1024


SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # a Triton constexpr: kernels read only those globals


@triton.jit
def _silu_mul_kernel(out_ptr, gu_ptr, F, stride_o, stride_gu, BLOCK: tl.constexpr, GELU: tl.constexpr):
    """out[row, cols] = act(gate_up[row, cols]) * gate_up[row, F + cols] for this program's BLOCK columns; act is
    silu, or GELU's tanh approximation when GELU."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate = gu_ptr + row * stride_gu + cols
    g = tl.load(gate, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate + F, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        inner = SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
        tanh = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)  # tanh through exp: saturates to +-1, never NaN
        a = 0.5 * g * (1.0 + tanh)
    else:
        a = g / (1.0 + tl.exp(-g))
    tl.store(out_ptr + row * stride_o + cols, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """gate_up: [tokens, 2 * ffn] (float16/bfloat16/float32, rows contiguous, any row stride) -> [tokens, ffn] in its
    dtype; `out` (rows contiguous) receives the result when given. gelu: GELU-tanh instead of silu (gelu_tanh_mul)."""
    if gate_up.dtype not in DTYPES:
        raise ValueError(f"gate_up must be float16, bfloat16 or float32, got {gate_up.dtype}")
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be 2-D [tokens, 2 * ffn] (an even width), got shape {list(gate_up.shape)}")
    if gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must have contiguous rows (stride 1 along a row), got strides {gate_up.stride()}")
    tokens, ffn = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = torch.empty(tokens, ffn, dtype=gate_up.dtype, device=gate_up.device)
    if out.shape != (tokens, ffn) or out.dtype != gate_up.dtype or out.device != gate_up.device:
        raise ValueError(f"out must be {gate_up.dtype} [{tokens}, {ffn}] on {gate_up.device}, got {out.dtype} "
                         f"{list(out.shape)} on {out.device}")
    if out.stride(-1) != 1:
        raise ValueError(f"out must have contiguous rows (stride 1 along ffn), got strides {out.stride()}")
    check_runnable([gate_up, out], "silu_mul")
    _launch(out, gate_up, gelu)
    return out


def silu_mul_unchecked(gate_up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """silu_mul without the input checks, for a caller that has checked these shapes already (the model)."""
    out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype, device=gate_up.device)
    _launch(out, gate_up, gelu)
    return out


def gelu_tanh_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """GELU-tanh(gate) * up (Gemma's MLP): silu_mul's shapes and checks."""
    return silu_mul(gate_up, out, gelu=True)


def gelu_tanh_mul_unchecked(gate_up: torch.Tensor) -> torch.Tensor:
    return silu_mul_unchecked(gate_up, gelu=True)


def _launch(out: torch.Tensor, gate_up: torch.Tensor, gelu: bool = False) -> None:
    tokens, ffn = out.shape
    if out.numel():
        block = min(MAX_BLOCK, next_power_of_2(ffn))
        _silu_mul_kernel[(tokens, cdiv(ffn, block))](out, gate_up, ffn, out.stride(0), gate_up.stride(0), BLOCK=block,
                                                     GELU=gelu)


def silu_mul_ref(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch_model's `F.silu(gate) * up` in float32, rounded once to gate_up's dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    y = (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)
    return y if out is None else out.copy_(y)


def gelu_tanh_mul_ref(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """HF's Gemma MLP gate, `gelu_pytorch_tanh(gate) * up`, in float32, rounded once to gate_up's dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    y = (torch.nn.functional.gelu(gate, approximate="tanh") * up).to(gate_up.dtype)
    return y if out is None else out.copy_(y)
