"""RMSNorm, optionally fused with the residual add before it: one program per row, the row held in registers.

    y = weight * x / sqrt(mean(x^2) + eps)                         (Zhang & Sennrich 2019; HF's LlamaRMSNorm)
    with a residual:  h = x + residual  (rounded to x.dtype),  y = rms_norm(h),  returns (y, h)

The residual form fuses a llama block's `h = h + sublayer(...)` with the next sub-layer's norm, so the residual stream
is read once and written once. h is rounded to x.dtype before it is normalized, as HF normalizes the stored stream.

Precision: the sum of squares and the scaling are float32 and y is rounded once to x.dtype. In float32 this is HF's
(and realm.runtime.torch_model's) formula; in float16/bfloat16 HF rounds twice (the normalized row to x.dtype, then the
product with the weight), so the kernel is at most about one output ulp away from it and at least as accurate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import next_power_of_2
from .qdecode import check_runnable

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# One row must fit one program's registers (Triton caps a block at 2^20 elements; 65536 floats already spill).
MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(y_ptr, h_ptr, x_ptr, r_ptr, w_ptr, N, eps, stride_y, stride_h, stride_x, stride_r,
                     BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """Row `program_id` of y (and h = x + r when HAS_RESIDUAL); N <= BLOCK."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)  # torch's add: one rounding
        tl.store(h_ptr + row * stride_h + cols, x, mask=mask)
    h = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * (h * inv_rms)).to(y_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    # Liger-Kernel's rule for one-row-per-program norms (calculate_settings); not yet measured on realm's GPUs.
    return 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4


def _check_rows(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """t must be a dtype [tokens, hidden] tensor on device whose rows are contiguous (any row stride)."""
    if t.shape != shape or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be {dtype} {list(shape)} on {device}, got {t.dtype} {list(t.shape)} "
                         f"on {t.device}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have contiguous rows (stride 1 along hidden), got strides {t.stride()}")


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None) -> None:
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, hidden], got shape {list(x.shape)}")
    hidden = x.shape[1]
    if not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(f"x has hidden = {hidden}; rms_norm supports 1 .. {MAX_HIDDEN} (one row per program)")
    _check_rows("x", x, tuple(x.shape), x.dtype, x.device)
    if weight.dtype not in DTYPES:
        raise ValueError(f"weight must be float16, bfloat16 or float32, got {weight.dtype}")
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [{hidden}] (x's hidden size), got {list(weight.shape)}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if residual is not None:
        _check_rows("residual", residual, tuple(x.shape), x.dtype, x.device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None, *, residual_out: torch.Tensor | None = None,
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x: [tokens, hidden] (float16/bfloat16/float32, rows contiguous), weight: [hidden] (any of those dtypes).

    Without residual: y [tokens, hidden] in x.dtype. With residual ([tokens, hidden], x.dtype): (y, h) where
    h = x + residual is the new residual stream. `out` receives y and `residual_out` receives h (either may be x or
    residual itself: each program reads its whole row before writing it, so updating the stream in place is safe).
    """
    _check_inputs(x, weight, eps, residual)
    tokens, hidden = x.shape
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _check_rows("out", out, (tokens, hidden), x.dtype, x.device)
    h = out  # placeholder pointer: the kernel never touches it without a residual
    if residual is not None:
        if residual_out is None:
            residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
        _check_rows("residual_out", residual_out, (tokens, hidden), x.dtype, x.device)
        h = residual_out
    elif residual_out is not None:
        raise ValueError("residual_out is given but residual is not")
    check_runnable([x, weight, out, h] + ([residual] if residual is not None else []), "rms_norm")
    _launch(out, h, x, weight, eps, residual)
    return out if residual is None else (out, h)


def rms_norm_unchecked(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """rms_norm without the input checks, for a caller that has checked these shapes already (the model checks
    its first layer's call; every later layer's has the same shapes, dtypes and devices)."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = out if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(out, h, x, weight, eps, residual)
    return out if residual is None else (out, h)


def _launch(out: torch.Tensor, h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None) -> None:
    tokens, hidden = x.shape
    if tokens:
        r = x if residual is None else residual
        block = next_power_of_2(hidden)
        _rms_norm_kernel[(tokens,)](out, h, x, r, weight, hidden, float(eps), out.stride(0), h.stride(0),
                                    x.stride(0), r.stride(0), BLOCK=block, HAS_RESIDUAL=residual is not None,
                                    num_warps=_num_warps(block))


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """realm.runtime.torch_model.rms_norm on float32 copies, rounded once to x.dtype (equal to it in float32);
    with a residual, h = x + residual in x.dtype first (torch's add) and (y, h) is returned."""
    h = x if residual is None else x + residual
    hf = h.float()
    y = (weight.float() * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)
    if out is not None:
        y = out.copy_(y)
    return y if residual is None else (y, h)
