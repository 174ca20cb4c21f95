"""Multi-LoRA on a batch whose token rows each use their own adapter (BGMV: Punica, Chen et al. 2023; S-LoRA, Sheng
et al. 2023), in two steps around the base layer's matmul:

    t[m]     = x[m] @ a[idx[m]].T                                     lora_shrink:  [T, K] -> float32 [T, R]
    y[m, n] += scale[idx[m], n] * sum_j t[m, j] * b[idx[m], n, j]     lora_expand, or qmatmul's epilogue (LoraEpilogue)

idx: int32 [T], each row's slot in the layer's adapter pool, -1 for no adapter (t's row is 0, y's row is untouched).
The pool holds per slot `a` [R, K], `b` [N, R] and `scale` [N]. A fused projection (QKV, gate/up) stacks its slices'
lora_A along the rank (slice s in rows s * r_pad .. s * r_pad + r_s, the others zero) and makes `b` block-diagonal
(output column n of slice s is non-zero only in slice s's rank columns), so one shrink and one expand serve every
slice with no slice logic, and `scale` per output column gives each slice and adapter its own lora scale.

Paths, chosen per tile of rows at run time: when every row of the tile that has an adapter uses the same one (a prefill
segment, or a decode batch on one adapter) the tile multiplies on the tensor cores (tl.dot, padded to 16 rows and
rank columns); otherwise each row gathers its own adapter's weights and multiplies on CUDA cores, in chunks that keep
[rows, columns, chunk] in registers (qmatmul's decode kernel with <= 4 rows always gathers). A tile without adapters
computes nothing. The path is a run-time choice per tile, so no launcher can log it; the tests build index patterns
that give both.

Precision: float32 accumulation. The shrink's products are exact (16-bit inputs) or IEEE float32 (float32 inputs). The
expand multiplies float32 t by b of the compute dtype: in float32 exactly on CUDA cores; on tensor cores float32 t
(float32 b: IEEE) or t split into two halves of b's dtype, t ~= hi + lo to 2^-22 (float16; 2^-16 bfloat16), so the
tensor cores see t almost as float32 for two small dots (float16: |t| must stay below 65504, as in any float16 expand).
The delta is added to y in float32 and y rounded once; qmatmul's LoRA kernels compute it before their K loop and start
their float32 accumulator at it, so that its registers are free during the loop.

Indices: the launchers check shapes and dtypes always, and that every index is in [-1, slots) when the indices are
on the CPU; on CUDA reading them would sync, so they are not read on the host: a row with an index out of range gets
NaN (t's row, y's row) and TRITON_DEBUG=1 turns that into a device assert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import tuning
from .checks import cdiv, next_power_of_2
from .paged import check_index
from .qdecode import check_runnable, dot_precision

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_M = 16  # rows per tile: tl.dot's minimum; a prefill segment spans many tiles, a decode batch one
# Rank columns per tl.dot (padded to >= 16). Compiled for sm_90 (ptxas, no GPU run): with 64, qmatmul's prefill kernel
# with the LoRA epilogue at its default 64 x 64 tile, float16, Q4_K spills inside its K loop (12 local loads/stores
# per iteration); with 32 its K loop has none, for every block format tried (Q8_0, Q2_K, Q4_K, Q6_K, IQ4_XS, MXFP4).
MAX_BLOCK_R = 32
SHRINK_BLOCK_K = 64
# Gather path: elements of the [rows, columns, chunk] product a program holds at once. 4096 at 4 warps is 32 float32
# registers per thread (untuned); under the interpreter, where each loop iteration is Python, larger chunks are faster.
GATHER_ELEMENTS = 4096
GATHER_ELEMENTS_INTERPRETED = 1 << 16


def gather_chunk(tile: int, depth: int, device: torch.device) -> int:
    """The gather path's chunk of the reduced dimension (rank or K, `depth`) for a tile of `tile` outputs."""
    budget = GATHER_ELEMENTS if device.type == "cuda" else GATHER_ELEMENTS_INTERPRETED
    return max(1, min(next_power_of_2(depth), budget // tile))


# ---- kernels -----------------------------------------------------------------------------------------------------

@triton.jit
def _row_slots(idx_ptr, offs_m, m_mask, n_slots):
    """Each row's slot: (valid: index in [-1, n_slots), active: valid and >= 0, slot: int64 (0 when inactive), first
    and last slot among the active rows (first > last when none is active)."""
    idx = tl.load(idx_ptr + offs_m, mask=m_mask, other=-1)
    valid = (idx >= -1) & (idx < n_slots)
    tl.device_assert(valid, "lora: an adapter index outside [-1, slots)")
    active = valid & (idx >= 0)
    first = tl.min(tl.where(active, idx, n_slots), axis=0)
    last = tl.max(tl.where(active, idx, -1), axis=0)
    return valid, active, tl.where(active, idx, 0).to(tl.int64), first, last


@triton.jit
def _expand_one(t_rows, b_ptr, scale_ptr, slot, active, offs_n, n_mask, R, stride_bs, stride_bn, stride_ss,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """scale[slot, n] * sum_j t[m, j] * b[slot, n, j], every row on one adapter: tensor cores. t_rows [BLOCK_M] point
    at the rows of t."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_cols = b_ptr + slot * stride_bs + offs_n.to(tl.int64) * stride_bn
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        t = tl.load(t_rows[:, None] + offs_r[None, :], mask=active[:, None] & r_mask[None, :], other=0.0)
        b = tl.load(b_cols[:, None] + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        if b.dtype == tl.float32:
            acc = tl.dot(t, tl.trans(b), acc, input_precision="ieee")
        else:  # t = hi + lo in b's dtype: two tensor-core dots see t to 2^-22 (float16) / 2^-16 (bfloat16)
            hi = t.to(b.dtype)
            lo = (t - hi.to(tl.float32)).to(b.dtype)
            acc = tl.dot(hi, tl.trans(b), acc)
            acc = tl.dot(lo, tl.trans(b), acc)
    scale = tl.load(scale_ptr + slot * stride_ss + offs_n, mask=n_mask, other=0.0)
    return acc * scale[None, :]


@triton.jit
def _expand_gather(t_rows, b_ptr, scale_ptr, slots, active, offs_n, n_mask, R, stride_bs, stride_bn, stride_ss,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATHER_R: tl.constexpr):
    """scale[slots[m], n] * sum_j t[m, j] * b[slots[m], n, j], each row its own adapter: float32 on CUDA cores,
    GATHER_R rank columns at a time."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_tile = b_ptr + slots[:, None, None] * stride_bs + offs_n.to(tl.int64)[None, :, None] * stride_bn
    tile_mask = active[:, None, None] & n_mask[None, :, None]
    for r0 in range(0, R, GATHER_R):
        offs_r = r0 + tl.arange(0, GATHER_R)
        r_mask = offs_r < R
        t = tl.load(t_rows[:, None] + offs_r[None, :], mask=active[:, None] & r_mask[None, :], other=0.0)
        b = tl.load(b_tile + offs_r[None, None, :], mask=tile_mask & r_mask[None, None, :], other=0.0)
        acc += tl.sum(t[:, None, :] * b.to(tl.float32), axis=2)
    scale = tl.load(scale_ptr + slots[:, None] * stride_ss + offs_n[None, :], mask=active[:, None] & n_mask[None, :],
                    other=0.0)
    return acc * scale


@triton.jit
def lora_delta(lora_t, lora_b, lora_scale, lora_idx, offs_m, m_mask, offs_n, n_mask, lora_rank, lora_slots,
               stride_lt, stride_lbs, stride_lbn, stride_lss,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LORA_BLOCK_R: tl.constexpr,
               LORA_GATHER_R: tl.constexpr, LORA_DOT: tl.constexpr):
    """float32 [BLOCK_M, BLOCK_N]: scale[idx[m], n] * sum_j t[m, j] * b[idx[m], n, j] for rows offs_m and columns
    offs_n (an epilogue: the caller's float32 accumulator starts at it or adds it). +0.0 on rows with index -1 or
    outside m_mask (so such rows come out bit-identical to a matmul without LoRA), NaN on rows whose index is outside
    [-1, slots). LORA_DOT: the tile is >= 16 x 16, so a tile of one adapter may use tl.dot."""
    valid, active, slots, first, last = _row_slots(lora_idx, offs_m, m_mask, lora_slots)
    t_rows = lora_t + offs_m.to(tl.int64) * stride_lt
    delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if last >= 0:
        if LORA_DOT:
            if first == last:
                delta = _expand_one(t_rows, lora_b, lora_scale, last.to(tl.int64), active, offs_n, n_mask,
                                    lora_rank, stride_lbs, stride_lbn, stride_lss, BLOCK_M, BLOCK_N, LORA_BLOCK_R)
            else:
                delta = _expand_gather(t_rows, lora_b, lora_scale, slots, active, offs_n, n_mask, lora_rank,
                                       stride_lbs, stride_lbn, stride_lss, BLOCK_M, BLOCK_N, LORA_GATHER_R)
        else:
            delta = _expand_gather(t_rows, lora_b, lora_scale, slots, active, offs_n, n_mask, lora_rank,
                                   stride_lbs, stride_lbn, stride_lss, BLOCK_M, BLOCK_N, LORA_GATHER_R)
        # Rows without an adapter: +0.0 exactly (times a negative scale it could be -0.0), so that they come out
        # bit-identical to a matmul without LoRA.
        delta = tl.where(active[:, None], delta, 0.0)
    return tl.where(valid[:, None], delta, float("nan"))


@triton.jit
def _lora_expand_kernel(y_ptr, M, N, stride_ym, lora_t, lora_b, lora_scale, lora_idx, lora_rank, lora_slots,
                        stride_lt, stride_lbs, stride_lbn, stride_lss,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LORA_BLOCK_R: tl.constexpr,
                        LORA_GATHER_R: tl.constexpr, LORA_DOT: tl.constexpr):
    """y[m, n] = round(y[m, n] + lora_delta) on the rows with an index other than -1."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    delta = lora_delta(lora_t, lora_b, lora_scale, lora_idx, offs_m, m_mask, offs_n, n_mask, lora_rank, lora_slots,
                       stride_lt, stride_lbs, stride_lbn, stride_lss, BLOCK_M, BLOCK_N, LORA_BLOCK_R, LORA_GATHER_R,
                       LORA_DOT)
    touched = m_mask & (tl.load(lora_idx + offs_m, mask=m_mask, other=-1) != -1)
    mask = touched[:, None] & n_mask[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    acc = tl.load(y, mask=mask, other=0.0).to(tl.float32) + delta
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_shrink_kernel(out_ptr, x_ptr, a_ptr, idx_ptr, M, K, R, n_slots, stride_xm, stride_as, stride_ar, stride_om,
                        stride_split, k_per_split,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, GATHER_K: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """out[split, m, r] = sum over this split's K slice of x[m, k] * a[idx[m], r, k]: 0 on rows with index -1, NaN on
    rows with an index outside [-1, slots)."""
    pid_m, pid_r, pid_split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_mask, r_mask = offs_m < M, offs_r < R
    valid, active, slots, first, last = _row_slots(idx_ptr, offs_m, m_mask, n_slots)
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    k_start = pid_split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if last >= 0:
        if first == last:  # one adapter: tensor cores
            a_rows = a_ptr + last.to(tl.int64) * stride_as + offs_r.to(tl.int64) * stride_ar
            for k0 in range(k_start, k_end, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < k_end
                x = tl.load(x_rows[:, None] + offs_k[None, :], mask=active[:, None] & k_mask[None, :], other=0.0)
                a = tl.load(a_rows[:, None] + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
                acc = tl.dot(x, tl.trans(a), acc, input_precision=DOT_PRECISION)
        else:  # each row its own adapter: [rows, ranks, GATHER_K] products on CUDA cores
            a_tile = a_ptr + slots[:, None, None] * stride_as + offs_r.to(tl.int64)[None, :, None] * stride_ar
            tile_mask = active[:, None, None] & r_mask[None, :, None]
            for k0 in range(k_start, k_end, GATHER_K):
                offs_k = k0 + tl.arange(0, GATHER_K)
                k_mask = offs_k < k_end
                x = tl.load(x_rows[:, None] + offs_k[None, :], mask=active[:, None] & k_mask[None, :], other=0.0)
                a = tl.load(a_tile + offs_k[None, None, :], mask=tile_mask & k_mask[None, None, :], other=0.0)
                acc += tl.sum(x.to(tl.float32)[:, None, :] * a.to(tl.float32), axis=2)
    acc = tl.where(valid[:, None], acc, float("nan"))
    out = out_ptr + pid_split.to(tl.int64) * stride_split + offs_m.to(tl.int64)[:, None] * stride_om + offs_r[None, :]
    tl.store(out, acc, mask=m_mask[:, None] & r_mask[None, :])


# ---- checks ------------------------------------------------------------------------------------------------------

def _check_tensor(name: str, v) -> None:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")


def check_indices(name: str, indices: torch.Tensor, m: int, slots: int, device: torch.device) -> None:
    """indices: int32 [m], contiguous, on device; on the CPU also every value in [-1, slots) (naming the first bad
    row). On CUDA the values are not read (a device-to-host sync): the kernels give such rows NaN."""
    _check_tensor(name, indices)
    check_index(name, indices, 1, device)
    if indices.shape[0] != m:
        raise ValueError(f"{name} must be [{m}] (one adapter slot per token row), got {list(indices.shape)}")
    if device.type == "cpu" and m:
        bad = (indices < -1) | (indices >= slots)
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}[{row}] = {int(indices[row])} is not an adapter slot in [-1, {slots}) "
                             f"(-1: no adapter)")


@dataclass(frozen=True, eq=False)
class LoraEpilogue:
    """The expand step as an epilogue of a layer's matmul y [T, N] (qmatmul(x, w, lora=...)):

        y[m, n] += scale[indices[m], n] * sum_j t[m, j] * b[indices[m], n, j]      (rows with index -1: nothing)

    t: float32 [T, R], lora_shrink's output, stride 1 along R; b: [slots, N, R] in y's dtype, stride 1 along R, any
    other strides (b[:, c0:c1] of a fused projection's pool is fine); scale: float32 [slots, N], stride 1 along N
    (scale[:, c0:c1] too); indices: int32 [T] contiguous, -1 for no adapter. b and scale are already sliced to the
    weight's output columns.
    """

    t: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor
    indices: torch.Tensor

    @property
    def rank(self) -> int:
        return self.t.shape[1]

    @property
    def slots(self) -> int:
        return self.b.shape[0]

    def check(self, m: int, n: int, dtype: torch.dtype, device: torch.device, prefix: str = "lora.") -> None:
        """For an output [m, n] of dtype on device: raises TypeError/ValueError naming the field that does not fit
        (indices' values too when they are on the CPU, see check_indices)."""
        t, b, scale = self.t, self.b, self.scale
        for name in ("t", "b", "scale", "indices"):
            _check_tensor(prefix + name, getattr(self, name))
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[0] != m or t.shape[1] < 1:
            raise ValueError(f"{prefix}t must be float32 [{m}, R] with R >= 1 (lora_shrink's output), got {t.dtype} "
                             f"{list(t.shape)}")
        r = t.shape[1]
        if b.dim() != 3 or b.shape[0] < 1 or tuple(b.shape[1:]) != (n, r):
            raise ValueError(f"{prefix}b must be [slots, {n}, {r}] (slots >= 1; N of the output, R of t), got "
                             f"{list(b.shape)}")
        if b.dtype != dtype:
            raise ValueError(f"{prefix}b must have the output's dtype {dtype}, got {b.dtype}")
        if scale.dtype != torch.float32 or tuple(scale.shape) != (b.shape[0], n):
            raise ValueError(f"{prefix}scale must be float32 [{b.shape[0]}, {n}] (slots, N), got {scale.dtype} "
                             f"{list(scale.shape)}")
        for name, v in (("t", t), ("b", b), ("scale", scale)):
            if v.stride(-1) != 1 and v.shape[-1] > 1:
                raise ValueError(f"{prefix}{name} must have stride 1 along its last dimension, got strides "
                                 f"{v.stride()}")
            if v.device != device:
                raise ValueError(f"{prefix}{name} is on {v.device}, the output on {device}")
        check_indices(prefix + "indices", self.indices, m, b.shape[0], device)

    def kernel_args(self, block_m: int, block_n: int, use_dot: bool) -> dict:
        """The `lora_*` arguments of a kernel calling `lora_delta` on [block_m, block_n] tiles."""
        t, b, scale = self.t, self.b, self.scale
        r = t.shape[1]
        return {"lora_t": t, "lora_b": b, "lora_scale": scale, "lora_idx": self.indices, "lora_rank": r,
                "lora_slots": b.shape[0], "stride_lt": t.stride(0), "stride_lbs": b.stride(0),
                "stride_lbn": b.stride(1), "stride_lss": scale.stride(0),
                "LORA_BLOCK_R": min(MAX_BLOCK_R, max(16, next_power_of_2(r))),
                "LORA_GATHER_R": gather_chunk(block_m * block_n, r, t.device),
                "LORA_DOT": use_dot and block_m >= 16 and block_n >= 16}


def _check_activations(name: str, x: torch.Tensor) -> None:
    _check_tensor(name, x)
    if x.dtype not in DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [tokens, features], got shape {list(x.shape)}")
    if x.stride(1) != 1 and x.shape[1] > 1:
        raise ValueError(f"{name} must have contiguous rows (stride 1 along a row), got strides {x.stride()}")


def _check_shrink(x: torch.Tensor, a: torch.Tensor, indices: torch.Tensor, out: torch.Tensor | None) -> None:
    _check_activations("x", x)
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError("lora_shrink has no backward: x requires grad (call it under torch.no_grad() or detach x)")
    _check_tensor("a", a)
    t_rows, k = x.shape
    if a.dim() != 3 or a.shape[0] < 1 or a.shape[1] < 1 or a.shape[2] != k:
        raise ValueError(f"a must be [slots, R, {k}] (slots, R >= 1; K of x), got {list(a.shape)}")
    if a.dtype != x.dtype:
        raise ValueError(f"a must have x's dtype {x.dtype}, got {a.dtype}")
    if a.device != x.device:
        raise ValueError(f"a is on {a.device}, x on {x.device}")
    if a.stride(2) != 1 and k > 1:
        raise ValueError(f"a must have stride 1 along K, got strides {a.stride()}")
    check_indices("indices", indices, t_rows, a.shape[0], x.device)
    if out is not None:
        _check_tensor("out", out)
        r = a.shape[1]
        if tuple(out.shape) != (t_rows, r) or out.dtype != torch.float32 or out.device != x.device:
            raise ValueError(f"out must be float32 [{t_rows}, {r}] on {x.device}, got {out.dtype} {list(out.shape)} "
                             f"on {out.device}")
        if out.stride(1) != 1 and r > 1:
            raise ValueError(f"out must have contiguous rows (stride 1 along R), got strides {out.stride()}")


# ---- launchers ---------------------------------------------------------------------------------------------------

def lora_shrink(x: torch.Tensor, a: torch.Tensor, indices: torch.Tensor, out: torch.Tensor | None = None, *,
                split_k: int | None = None) -> torch.Tensor:
    """t[m] = x[m] @ a[indices[m]].T in float32 -> out: float32 [T, R] (rows with index -1: 0).

    x: [T, K] float16/bfloat16/float32, stride 1 along K; a: [slots, R, K] in x's dtype, stride 1 along K (any R:
    a fused projection's slices stacked along it); indices: int32 [T], -1 for no adapter. split_k: slices of K summed
    in float32 afterwards (default 1 off CUDA; on CUDA enough to give the GPU two waves of programs; untuned)."""
    _check_shrink(x, a, indices, out)
    if split_k is not None and (not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be an int >= 1, got {split_k!r}")
    check_runnable([x, a, indices] + ([] if out is None else [out]), "lora_shrink")
    t_rows, r = x.shape[0], a.shape[1]
    out = torch.empty(t_rows, r, dtype=torch.float32, device=x.device) if out is None else out
    if t_rows:
        _launch_shrink(out, x, a, indices, split_k)
    return out


def _shrink_split(tiles: int, k: int, device: torch.device) -> int:
    """Slices of K for the shrink: on CUDA, until the tiles times the slices give two waves of programs or a slice
    would be shorter than 4 K tiles; 1 elsewhere."""
    split = 1
    if device.type == "cuda":
        sms = tuning.sm_count(device)
        while tiles * split < 2 * sms and k // (2 * split) >= 4 * SHRINK_BLOCK_K:
            split *= 2
    return split


def _launch_shrink(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, indices: torch.Tensor,
                   split_k: int | None = None) -> None:
    """The kernel on checked shapes, index values unchecked (tests use it to see rows out of range get NaN)."""
    (t_rows, k), r = x.shape, a.shape[1]
    block_r = min(MAX_BLOCK_R, max(16, next_power_of_2(r)))
    tiles = cdiv(t_rows, BLOCK_M) * cdiv(r, block_r)
    split = _shrink_split(tiles, k, x.device) if split_k is None else split_k
    k_per_split = cdiv(cdiv(k, split), SHRINK_BLOCK_K) * SHRINK_BLOCK_K
    split = cdiv(k, k_per_split)  # drops empty slices
    target = out if split == 1 else torch.empty(split, t_rows, r, dtype=torch.float32, device=x.device)
    stride_om = out.stride(0) if split == 1 else r
    grid = (cdiv(t_rows, BLOCK_M), cdiv(r, block_r), split)
    _lora_shrink_kernel[grid](
        target, x, a, indices, t_rows, k, r, a.shape[0], x.stride(0), a.stride(0), a.stride(1), stride_om,
        t_rows * r, k_per_split, BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=SHRINK_BLOCK_K,
        GATHER_K=gather_chunk(BLOCK_M * block_r, SHRINK_BLOCK_K, x.device), DOT_PRECISION=dot_precision(x.dtype))
    if split > 1:
        torch.sum(target, dim=0, out=out)


def lora_expand(y: torch.Tensor, t: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                indices: torch.Tensor) -> None:
    """y[m, n] += scale[indices[m], n] * sum_j t[m, j] * b[indices[m], n, j], in place, computed in float32 and
    rounded once to y's dtype; rows with index -1 are not written. The unfused path of LoraEpilogue.

    y: [T, N] float16/bfloat16/float32, stride 1 along N (a column view of a fused output is fine); t: float32
    [T, R]; b: [slots, N, R] in y's dtype; scale: float32 [slots, N]; b and scale may be column views
    (b[:, c0:c1], scale[:, c0:c1]); indices: int32 [T]."""
    _check_activations("y", y)
    lora = LoraEpilogue(t, b, scale, indices)
    lora.check(y.shape[0], y.shape[1], y.dtype, y.device, prefix="")
    check_runnable([y, t, b, scale, indices], "lora_expand")
    if y.numel():
        _launch_expand(y, lora)


def _launch_expand(y: torch.Tensor, lora: LoraEpilogue) -> None:
    """The kernel on checked shapes, index values unchecked."""
    m, n = y.shape
    # Interpreter: whole rows per program (fewer Python-level programs). GPU: 64 columns, untuned.
    block_n = 64 if y.device.type == "cuda" else min(1024, max(16, next_power_of_2(n)))
    grid = (cdiv(m, BLOCK_M), cdiv(n, block_n))
    _lora_expand_kernel[grid](y, m, n, y.stride(0), **lora.kernel_args(BLOCK_M, block_n, True), BLOCK_M=BLOCK_M,
                              BLOCK_N=block_n)


# ---- references --------------------------------------------------------------------------------------------------

def _rows_by_slot(indices: torch.Tensor):
    """(slot, its rows) for every slot used by indices (rows with -1 skipped)."""
    idx = indices.long()
    for s in idx.unique().tolist():
        if s >= 0:
            yield s, (idx == s).nonzero().squeeze(1)


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The reference: float32 x[m] @ a[indices[m]].T per slot, 0 for index -1 -> float32 [T, R]."""
    _check_shrink(x, a, indices, None)
    out = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    for s, rows in _rows_by_slot(indices):
        out[rows] = x[rows].float() @ a[s].float().t()
    return out


def lora_delta_ref(t: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """float32 [T, N]: scale[indices[m]] * (t[m] @ b[indices[m]].T), 0 on rows with index -1."""
    delta = torch.zeros(t.shape[0], b.shape[1], dtype=torch.float32, device=t.device)
    for s, rows in _rows_by_slot(indices):
        delta[rows] = (t[rows] @ b[s].float().t()) * scale[s]
    return delta


def lora_expand_ref(y: torch.Tensor, t: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                    indices: torch.Tensor) -> None:
    """The reference, in place as lora_expand: y = (y.float() + lora_delta_ref).to(y.dtype) on rows with an
    adapter."""
    _check_activations("y", y)
    LoraEpilogue(t, b, scale, indices).check(y.shape[0], y.shape[1], y.dtype, y.device, prefix="")
    rows = (indices >= 0).nonzero().squeeze(1)
    delta = lora_delta_ref(t, b, scale, indices)
    y[rows] = (y[rows].float() + delta[rows]).to(y.dtype)
