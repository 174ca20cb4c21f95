"""Dequantize a weight to float32 with the in-register decode the matmul kernels use.

Its use is twofold: it proves the kernel decode exact (bit for bit against `realm.quant.dequantize`, compiled without
multiply-add fusion so the float32 operations round as the reference's), and it is the fallback a user reaches for
to inspect or materialise a weight. The matmul kernels never call it: they decode tiles in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from realm.quant import QTensor

from .checks import cdiv
from .qdecode import check_block_k, check_runnable, load_weight_tile, weight_args, weight_planes


@triton.jit
def _dequantize_kernel(out_ptr, p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr, N, K,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                       VALUE: tl.constexpr, BIAS: tl.constexpr, QBLOCK: tl.constexpr, GROUP: tl.constexpr,
                       CHUNK: tl.constexpr, SUB: tl.constexpr, OFFSET: tl.constexpr, E8M0: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_mask = offs_n < N
    w = load_weight_tile(p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr, offs_n, n_mask, k0, K,
                         BLOCK_N, BLOCK_K, W0, W1, VALUE, BIAS, QBLOCK, GROUP, CHUNK, SUB, OFFSET, E8M0)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = n_mask[:, None] & (offs_k < K)[None, :]
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], w, mask=mask)


def dequantize(w: QTensor, out: torch.Tensor | None = None, *, block_n: int = 16, block_k: int = 256) -> torch.Tensor:
    """w [N, K] (any format, any layout) -> float32 [N, K], equal to `dequantize_ref(w)` bit for bit."""
    planes = weight_planes(w)
    n, k = w.shape
    check_block_k(planes, block_k)
    if out is None:
        out = torch.empty(n, k, dtype=torch.float32, device=w.device)
    elif out.shape != (n, k) or out.dtype != torch.float32 or not out.is_contiguous() or out.device != w.device:
        raise ValueError(f"out must be a contiguous float32 [{n}, {k}] tensor on {w.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    check_runnable([out, *planes.tensors()], "dequantize")
    if out.numel() == 0:
        return out
    grid = (cdiv(n, block_n), cdiv(k, block_k))
    _dequantize_kernel[grid](out, N=n, K=k, BLOCK_N=block_n, BLOCK_K=block_k, **weight_args(planes, block_k),
                             enable_fp_fusion=False)
    return out


def dequantize_ref(w: QTensor) -> torch.Tensor:
    """float32 [N, K] from realm.quant's reference decoder."""
    return w.dequantize()
