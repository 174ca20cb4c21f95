"""In-register decode of a tile of quantized weights, shared by every kernel that reads a `realm.quant` weight.

One `@triton.jit` routine serves all eighteen formats: the weight is in the kernel layout of `realm.quant.planes`
(codes as bit planes in natural order, integer sub-scales, per-block `d`), and the format enters only as constexprs
derived from its `PlaneSpec` by `decode_meta`. Triton specialises the routine per format at compile time, so the
branches below cost nothing at run time.

The decode evaluates `scale * value (+|-) offset` in float32 in ggml's order. Run with `enable_fp_fusion=False` it is
bit-identical to `realm.quant.dequantize` (the dequantize kernel does this and its tests check it); the matmul kernels
let the compiler fuse the multiply-add, which only makes the product more accurate.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from realm.quant import Layout, QTensor
from realm.quant.planes import Offset, Planes, ScaleCode, Value

log = logging.getLogger(__name__)

# Value kinds as kernel constexprs.
VALUE_INT, VALUE_TABLE, VALUE_F32, VALUE_F16, VALUE_BF16 = 0, 1, 2, 3, 4
OFFSET_NONE, OFFSET_ADD, OFFSET_SUB = 0, 1, 2
_VALUE = {Value.INT: VALUE_INT, Value.TABLE: VALUE_TABLE, Value.F32: VALUE_F32, Value.F16: VALUE_F16,
          Value.BF16: VALUE_BF16}
_OFFSET = {Offset.NONE: OFFSET_NONE, Offset.ADD: OFFSET_ADD, Offset.SUB: OFFSET_SUB}
_TABLES: dict[tuple, torch.Tensor] = {}
# Triton decides at decoration (import) time whether kernels are interpreted; CPU tensors need that.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def weight_planes(w: QTensor) -> Planes:
    """The kernel layout of w: its own data when it is already `Layout.PLANES`, else a repacking (exact, but a full
    pass over the weight: repack once at load with `w.repack("planes")`)."""
    if not isinstance(w, QTensor):
        raise TypeError(f"w must be a realm.quant.QTensor, got {type(w).__name__}")
    if w.layout is not Layout.PLANES:
        log.debug("%s weight %s is in the %s layout: repacking it to planes for this call", w.fmt.name,
                  list(w.shape), w.layout.value)
    return w.planes()


def weight_args(p: Planes, block_k: int) -> dict:
    """Kernel arguments describing the weight: its tensors (absent ones replaced by a placeholder pointer that the
    specialised kernel never reads) and its format constexprs."""
    spec = p.spec
    filler = p.planes[0]
    table = None
    if spec.table is not None:
        key = (spec.table, filler.device)
        table = _TABLES.get(key)
        if table is None:
            table = _TABLES[key] = torch.tensor(spec.table, dtype=torch.float32, device=filler.device)
    return {
        "p0": p.planes[0],
        "p1": p.planes[1] if len(p.planes) > 1 else filler,
        "d_ptr": filler if p.d is None else p.d,
        "sub_ptr": filler if p.sub is None else p.sub,
        "m_ptr": filler if p.m is None else p.m,
        "subm_ptr": filler if p.sub_m is None else p.sub_m,
        "table_ptr": filler if table is None else table,
        "W0": spec.widths[0],
        "W1": spec.widths[1] if len(spec.widths) > 1 else 0,
        "VALUE": _VALUE[spec.value],
        "BIAS": spec.bias,
        "QBLOCK": spec.block,
        "GROUP": spec.group,
        "CHUNK": min(spec.group, block_k),
        "SUB": spec.sub_scales,
        "OFFSET": _OFFSET[spec.offset],
        "E8M0": spec.scale_code is ScaleCode.E8M0,
    }


def check_block_k(p: Planes, block_k: int) -> None:
    """block_k must be a power of two holding whole words of every plane (>= 32 weights for quantized formats)."""
    if block_k < 1 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two, got {block_k}")
    if not p.spec.value.is_float and block_k < 32:
        raise ValueError(f"block_k must be >= 32 for quantized formats (one word of a 1-bit plane), got {block_k}")


def check_runnable(tensors: Sequence[torch.Tensor], what: str) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1 set before
    realm.kernels is imported); say so instead of failing inside Triton."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{what}: tensors are on different devices: {sorted(str(d) for d in devices)}")
    device = devices.pop()
    if device.type == "cuda":
        return
    if device.type == "cpu" and INTERPRETED:
        return
    hint = " (set TRITON_INTERPRET=1 before importing realm.kernels to run on CPU)" if device.type == "cpu" else ""
    raise ValueError(f"{what}: Triton kernels need CUDA tensors, got {device}{hint}")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for activations of dtype: IEEE float32 products for float32 (TF32 would lose the
    float32 reference's accuracy); "tf32" is ignored for 16-bit operands, which use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _load_plane(ptr, rows, n_mask, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W: tl.constexpr):
    """Codes k0 .. k0 + BLOCK_K of a W-bit plane: int32 [BLOCK_N, BLOCK_K]. Word j of a row holds codes
    j * (32 / W) .. in ascending bit order, so the tile is a [BLOCK_N, words] load broadcast against the shifts."""
    PER_WORD: tl.constexpr = 32 // W
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    offs_w = k0 // PER_WORD + tl.arange(0, WORDS)
    mask = n_mask[:, None] & (offs_w < K // PER_WORD)[None, :]
    words = tl.load(ptr + rows * (K // PER_WORD) + offs_w[None, :], mask=mask, other=0)
    shifts = tl.arange(0, PER_WORD) * W
    bits = (words[:, :, None] >> shifts[None, None, :]) & ((1 << W) - 1)
    return tl.reshape(bits, (BLOCK_N, BLOCK_K))


@triton.jit
def _load_float_tile(p0, rows, n_mask, k0, K, BLOCK_K: tl.constexpr, VALUE: tl.constexpr):
    """F32 / F16 / BF16 weights: the plane holds their bits, one element per int32 / int16."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    bits = tl.load(p0 + rows * K + offs_k[None, :], mask=n_mask[:, None] & (offs_k < K)[None, :], other=0)
    if VALUE == 2:
        w = bits.to(tl.float32, bitcast=True)
    elif VALUE == 3:
        w = bits.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        w = (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return w


@triton.jit
def _decode_tile(p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr, rows, n_mask, k0, K,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                 VALUE: tl.constexpr, BIAS: tl.constexpr, QBLOCK: tl.constexpr, GROUP: tl.constexpr,
                 CHUNK: tl.constexpr, SUB: tl.constexpr, OFFSET: tl.constexpr, E8M0: tl.constexpr):
    """Block formats: codes from the planes, then scale * value (+|-) offset per CHUNK of weights."""
    codes = _load_plane(p0, rows, n_mask, k0, K, BLOCK_N, BLOCK_K, W0)
    if W1 > 0:
        codes = codes | (_load_plane(p1, rows, n_mask, k0, K, BLOCK_N, BLOCK_K, W1) << W0)
    values = tl.load(table_ptr + codes) if VALUE == 1 else (codes - BIAS).to(tl.float32)

    # One scale per CHUNK consecutive weights (CHUNK divides GROUP, which divides QBLOCK).
    CHUNKS: tl.constexpr = BLOCK_K // CHUNK
    offs_c = k0 // CHUNK + tl.arange(0, CHUNKS)
    c_mask = n_mask[:, None] & (offs_c < K // CHUNK)[None, :]
    block_idx = rows * (K // QBLOCK) + (offs_c // (QBLOCK // CHUNK))[None, :]
    group_idx = rows * (K // GROUP) + (offs_c // (GROUP // CHUNK))[None, :]
    d = tl.load(d_ptr + block_idx, mask=c_mask, other=0)
    if E8M0:  # ggml_e8m0_to_fp32_half: 2^(e - 128), subnormal below e = 2
        e = d.to(tl.int32)
        scale = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23).to(tl.float32, bitcast=True)
    else:
        scale = d.to(tl.float32)
    if SUB:
        scale = scale * tl.load(sub_ptr + group_idx, mask=c_mask, other=0).to(tl.float32)
    w = scale[:, :, None] * tl.reshape(values, (BLOCK_N, CHUNKS, CHUNK))
    if OFFSET != 0:
        m = tl.load(m_ptr + block_idx, mask=c_mask, other=0).to(tl.float32)
        if OFFSET == 2:
            m = m * tl.load(subm_ptr + group_idx, mask=c_mask, other=0).to(tl.float32)
            w = w - m[:, :, None]
        else:
            w = w + m[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def load_weight_tile(p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr, offs_n, n_mask, k0, K,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                     VALUE: tl.constexpr, BIAS: tl.constexpr, QBLOCK: tl.constexpr, GROUP: tl.constexpr,
                     CHUNK: tl.constexpr, SUB: tl.constexpr, OFFSET: tl.constexpr, E8M0: tl.constexpr):
    """Weights [offs_n, k0 : k0 + BLOCK_K] as float32 [BLOCK_N, BLOCK_K]; rows outside n_mask and columns >= K
    come out as 0 (finite, so a masked-out zero activation times them stays 0)."""
    rows = offs_n.to(tl.int64)[:, None]
    if VALUE >= 2:
        w = _load_float_tile(p0, rows, n_mask, k0, K, BLOCK_K, VALUE)
    else:
        w = _decode_tile(p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr, rows, n_mask, k0, K, BLOCK_N, BLOCK_K,
                         W0, W1, VALUE, BIAS, QBLOCK, GROUP, CHUNK, SUB, OFFSET, E8M0)
    return w
