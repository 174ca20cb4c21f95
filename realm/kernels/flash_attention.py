"""Flash attention for prefill: variable-length sequences packed in one batch, grouped-query heads, causal or not,
keys and values from contiguous tensors or from the paged KV cache (realm/kernels/paged.py).

For query i of a sequence with len_q queries and len_k keys (the queries are the LAST len_q tokens, at positions
len_k - len_q + i: chunked prefill over a cached prefix, or speculative verification of a few tokens):

    out[i, h] = sum_j softmax_j(scale * q[i, h] . k[j, h // group]) v[j, h // group],   group = n_heads / n_kv_heads
    causal: j <= len_k - len_q + i;  not causal: every key j < len_k of the sequence
    with a sliding window W (causal): also j > len_k - len_q + i - W (W keys per query, itself included)

The kernel is FlashAttention-2's forward (Dao 2023, arXiv:2307.08691; the Triton fused-attention tutorial): one
program owns BLOCK_M queries of one head of one sequence and streams that sequence's keys BLOCK_N at a time,
keeping an online softmax in float32 (running row max m, running sum l, unnormalized accumulator acc, all rescaled
by exp2(m_old - m_new) when the max grows) and dividing by l once at the end. Scores are taken in base 2 with
scale * log2(e) folded into one multiply, so every exponential is one exp2. Causal programs visit only the key
blocks some of their queries can see, in two loops: the blocks every query of the program sees entirely (no mask),
then the few diagonal blocks (mask). Key blocks are masked only where needed: the tail of the sequence and the
diagonal. float32 inputs use IEEE float32 dot products (not TF32) so the float32 path matches torch's float32
attention to rounding; float16/bfloat16 use tensor cores with float32 accumulation, the probabilities rounded to
the input dtype before the P @ V product, as every flash-attention kernel does.

One @triton.jit kernel serves both layouts; the constexpr PAGED picks how key j of sequence b maps to a row of K/V:
contiguous: row cu_seqlens_k[b] + j;  paged: block_table[b, j // block_size] * block_size + j % block_size.

Invalid index contents: on CPU the launchers check and raise. On CUDA they do not look (that is a device-to-host
sync per layer; the runtime builds these tables on the host and checks them there). The kernel then reads and writes
nothing out of bounds: sequence bounds outside [0, total] are clamped and that sequence's rows come out NaN; a
paged block id outside [0, num_blocks) is not read and the rows of every query block whose loop reaches it come out
NaN; a query that sees no key (len_k == 0, or causal with len_q > len_k) comes out NaN.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import paged, tuning
from .checks import cdiv, check_heads, check_softcap, check_window, next_power_of_2
from .qdecode import check_runnable, dot_precision

MAX_HEAD_DIM = 256  # one head's row of q and the float32 accumulator stay in registers
MAX_BATCH = 65535  # the grid's third axis
LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes and launch parameters: BLOCK_M queries per program, BLOCK_N keys per loop step."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        tuning.check_launch_fields(self, ("block_m", "block_n", "num_warps"), {"block_m": 16, "block_n": 16})


def default_config(head_dim: int, dtype: torch.dtype) -> AttentionConfig:
    """Untuned tiles for an H100-class GPU. 16-bit: the Triton tutorial's 128 x 64 forward tile (64 x 64 past
    head_dim 128). float32: its IEEE dots run on CUDA cores with both operands in registers, so the tiles are small.
    Chosen by compiling for sm_90 and reading ptxas -v (not yet timed on a GPU): with these, no register spills
    (4 warps at 128 x 64 spill; float32 at 64 x 32 spills 1-30 KiB) and shared memory <= 160 KiB with the loads
    pipelined."""
    if dtype == torch.float32:
        return AttentionConfig(block_m=32, block_n=32 if head_dim <= 64 else 16, num_warps=8, num_stages=2)
    if head_dim <= 128:
        return AttentionConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return AttentionConfig(block_m=64, block_n=64, num_warps=8, num_stages=2)


# ---- kernel ------------------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(ptrs, row_mask, d_mask, MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr):
    """A [rows, BLOCK_D] tile; masks only where a constexpr says some rows or columns are out of range."""
    if MASK_ROWS and MASK_D:
        tile = tl.load(ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    elif MASK_ROWS:
        tile = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    elif MASK_D:
        tile = tl.load(ptrs, mask=d_mask[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def tanh(x):
    """tanh through exp: saturates to +-1 for large |x| (exp overflows to inf or underflows to 0), never NaN."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _key_rows(table_ptr, k_start, cols, in_seq, num_blocks, MASKED: tl.constexpr, PAGED: tl.constexpr,
              PAGE_SIZE: tl.constexpr):
    """Rows of K/V (int64) holding keys `cols` of the sequence, and which of them have a valid block id."""
    if PAGED:
        if MASKED:
            block = tl.load(table_ptr + cols // PAGE_SIZE, mask=in_seq, other=0)
        else:
            block = tl.load(table_ptr + cols // PAGE_SIZE)
        valid = (block >= 0) & (block < num_blocks)
        rows = tl.where(valid, block, 0).to(tl.int64) * PAGE_SIZE + (cols % PAGE_SIZE)  # invalid: block 0, then NaN
    else:
        rows = k_start + cols.to(tl.int64)
        valid = in_seq
    return rows, valid


@triton.jit
def _attend(acc, l_i, m_i, bad_keys, q, q_pos, k_base, v_base, table_ptr, k_start, len_k, num_blocks, lo, hi,
            qk_scale, window, softcap2, stride_kt, stride_vt, offs_n, offs_d, d_mask,
            MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
            MASK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, WINDOWED: tl.constexpr,
            SOFTCAP: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) with the key blocks lo, lo + BLOCK_N, .. < hi (lo a multiple of
    BLOCK_N). MASKED: the blocks may reach past len_k or (causal) past some query's position. WINDOWED: query p sees
    only keys j > p - window (sliding-window attention; always MASKED). SOFTCAP: scores soft-capped (Gemma 2),
    scale * s -> cap * tanh(scale * s / cap), softcap2 = cap * log2(e)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        in_seq = cols < len_k
        rows, valid = _key_rows(table_ptr, k_start, cols, in_seq, num_blocks, MASKED, PAGED, PAGE_SIZE)
        if PAGED:
            bad_keys += (in_seq & (valid == 0)).to(tl.int32)
        k = _load_tile(k_base + rows[:, None] * stride_kt + offs_d[None, :], in_seq, d_mask, MASKED, MASK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if SOFTCAP:  # capped in base-2 units, then put back in the units qk_scale multiplies below
            s = tanh(s * (qk_scale / softcap2)) * (softcap2 / qk_scale)
        if MASKED:
            visible = in_seq[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= q_pos[:, None])
            if WINDOWED:
                visible = visible & (cols[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        # m_new is finite for every query row, padding rows included: the first block a row meets holds key 0,
        # which every row sees (causal rows have positions >= 0 when len_q <= len_k). Only rows that see no key at
        # all (invalid lengths) get -inf - -inf = NaN, which stays in their own row.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # log2 units (qk_scale = scale * log2(e) > 0)
        if WINDOWED:  # noqa: SIM108 (a constexpr branch) a row may meet blocks wholly before its window: all -inf
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # which must add nothing, not NaN
        else:
            m_sub = m_new
        p = tl.exp2(s * qk_scale - m_sub[:, None])  # one FMA: the exponent is rounded once
        alpha = tl.exp2(m_i - m_sub)  # 0 on the first block (m_i = -inf)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base + rows[:, None] * stride_vt + offs_d[None, :], in_seq, d_mask, MASKED, MASK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i, bad_keys


@triton.jit
def _flash_attention_kernel(out_ptr, q_ptr, k_ptr, v_ptr, cu_q_ptr, k_index_ptr, block_table_ptr,
                            total_q, total_k, num_blocks, max_blocks, group, qk_scale, window, softcap2,
                            stride_ot, stride_oh, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PAGED: tl.constexpr,
                            PAGE_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, WINDOWED: tl.constexpr,
                            SOFTCAP: tl.constexpr):
    """Queries pid_m * BLOCK_M .. + BLOCK_M of head pid_h of sequence pid_b. k_index_ptr: cu_seqlens_k [batch + 1]
    (contiguous) or seq_lens_k [batch] (PAGED, with block_table [batch, max_blocks] and K/V viewed as
    [num_blocks * PAGE_SIZE, n_kv_heads, HEAD_DIM])."""
    pid_m, head, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # Sequence bounds, clamped so that invalid index contents (unchecked on CUDA) read nothing out of bounds.
    q_lo, q_hi = tl.load(cu_q_ptr + b), tl.load(cu_q_ptr + b + 1)
    q_start = tl.minimum(tl.maximum(q_lo, 0), total_q)
    len_q = tl.minimum(tl.maximum(q_hi, q_start), total_q) - q_start
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    broken = (q_start != q_lo) | (q_start + len_q != q_hi)
    if PAGED:
        k_start = 0
        n_keys = tl.load(k_index_ptr + b)
        len_k = tl.minimum(tl.maximum(n_keys, 0), max_blocks * PAGE_SIZE)
        broken = broken | (len_k != n_keys)
        table_ptr = block_table_ptr + b.to(tl.int64) * max_blocks
    else:
        k_lo, k_hi = tl.load(k_index_ptr + b), tl.load(k_index_ptr + b + 1)
        k_start = tl.minimum(tl.maximum(k_lo, 0), total_k)
        len_k = tl.minimum(tl.maximum(k_hi, k_start), total_k) - k_start
        broken = broken | (k_start != k_lo) | (k_start + len_k != k_hi)
        table_ptr = block_table_ptr  # unused
    kv_head = head // group

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    q_mask = offs_m < len_q
    q_rows = (q_start + offs_m).to(tl.int64)
    q = _load_tile(q_ptr + head.to(tl.int64) * stride_qh + q_rows[:, None] * stride_qt + offs_d[None, :],
                   q_mask, d_mask, True, MASK_D)
    k_base = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + kv_head.to(tl.int64) * stride_vh
    q_pos = (len_k - len_q) + offs_m  # each query's position in its sequence

    # Key blocks [0, n_full) are visible to every query of this program: no mask. [n_full, n_end) need one.
    if CAUSAL:
        n_full = tl.maximum(((len_k - len_q + m0 + 1) // BLOCK_N) * BLOCK_N, 0)
        n_end = tl.minimum(len_k, len_k - len_q + tl.minimum(m0 + BLOCK_M, len_q))
    else:
        n_full = (len_k // BLOCK_N) * BLOCK_N
        n_end = len_k
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    bad_keys = tl.zeros((BLOCK_N,), dtype=tl.int32)  # PAGED: per lane, keys seen with an invalid block id
    if WINDOWED:  # one masked loop from the first block the program's first query still sees
        lo = (tl.maximum(len_k - len_q + m0 - window + 1, 0) // BLOCK_N) * BLOCK_N
        acc, l_i, m_i, bad_keys = _attend(acc, l_i, m_i, bad_keys, q, q_pos, k_base, v_base, table_ptr, k_start,
                                           len_k, num_blocks, lo, n_end, qk_scale, window, softcap2, stride_kt,
                                           stride_vt, offs_n, offs_d, d_mask, True, CAUSAL, PAGED, PAGE_SIZE, MASK_D,
                                           BLOCK_N, DOT_PRECISION, True, SOFTCAP)
    else:
        acc, l_i, m_i, bad_keys = _attend(acc, l_i, m_i, bad_keys, q, q_pos, k_base, v_base, table_ptr, k_start,
                                           len_k, num_blocks, 0, n_full, qk_scale, window, softcap2, stride_kt,
                                           stride_vt, offs_n, offs_d, d_mask, False, CAUSAL, PAGED, PAGE_SIZE, MASK_D,
                                           BLOCK_N, DOT_PRECISION, False, SOFTCAP)
        acc, l_i, m_i, bad_keys = _attend(acc, l_i, m_i, bad_keys, q, q_pos, k_base, v_base, table_ptr, k_start,
                                           len_k, num_blocks, n_full, n_end, qk_scale, window, softcap2, stride_kt,
                                           stride_vt, offs_n, offs_d, d_mask, True, CAUSAL, PAGED, PAGE_SIZE, MASK_D,
                                           BLOCK_N, DOT_PRECISION, False, SOFTCAP)

    out = tl.math.div_rn(acc, l_i[:, None])  # IEEE division: no extra error on the float32 path
    if PAGED:
        broken = broken | (tl.sum(bad_keys, axis=0) > 0)
    out = tl.where(broken, float("nan"), out)
    out_ptrs = out_ptr + head.to(tl.int64) * stride_oh + q_rows[:, None] * stride_ot + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


# ---- validation --------------------------------------------------------------------------------------------------

def _check_heads_match(q: torch.Tensor, n_kv_heads: int, kv_dtype: torch.dtype, kv_head_dim: int, kv: str) -> None:
    """q against the keys/values: one dtype, one head_dim, n_heads a multiple of n_kv_heads."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    if kv_dtype != q.dtype:
        raise ValueError(f"q and {kv} must have one dtype, got {q.dtype} and {kv_dtype}")
    if kv_head_dim != head_dim:
        raise ValueError(f"q has head_dim {head_dim} but {kv} has {kv_head_dim}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1 .. {MAX_HEAD_DIM}, got {head_dim}")
    if n_heads == 0 or n_kv_heads == 0 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a positive multiple of n_kv_heads ({n_kv_heads})")


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> list[int] | None:
    """cu: int32 [batch + 1]; on the CPU its contents (0, non-decreasing, total) too. Returns the lengths on CPU."""
    paged.check_index(name, cu, 1, device)
    if cu.numel() == 0:
        raise ValueError(f"{name} must be [batch + 1] cumulative offsets starting at 0, got an empty tensor")
    if device.type != "cpu":
        return None
    offsets = cu.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offsets[0]}")
    lens = [b - a for a, b in itertools.pairwise(offsets)]
    if any(n < 0 for n in lens):
        b = next(i for i, n in enumerate(lens) if n < 0)
        raise ValueError(f"{name} must be non-decreasing, got {offsets[b]} then {offsets[b + 1]} at {b}")
    if offsets[-1] != total:
        raise ValueError(f"{name} must end at {total} (the tokens of its tensor), got {offsets[-1]}")
    return lens


def _check_lengths(lens_q: list[int] | None, lens_k: list[int] | None, causal: bool) -> None:
    """CPU only: every sequence with queries has keys, and causal queries are the last len_q of len_k keys."""
    if lens_q is None or lens_k is None:
        return
    for b, (n_q, n_k) in enumerate(zip(lens_q, lens_k, strict=True)):
        if n_q and not n_k:
            raise ValueError(f"sequence {b} has {n_q} queries but no keys (len_k == 0)")
        if causal and n_q > n_k:
            raise ValueError(f"sequence {b} has len_q {n_q} > len_k {n_k}: causal queries are the last len_q of "
                             f"the sequence's len_k tokens")


def _check_options(q: torch.Tensor, lens_q: list[int] | None, scale: float | None, max_seqlen_q: int | None,
                   out: torch.Tensor | None) -> None:
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    if max_seqlen_q is not None:
        if not isinstance(max_seqlen_q, int) or max_seqlen_q < 0:
            raise ValueError(f"max_seqlen_q must be a non-negative int, got {max_seqlen_q!r}")
        if lens_q is not None and max_seqlen_q < max(lens_q, default=0):
            raise ValueError(f"max_seqlen_q = {max_seqlen_q} is less than the longest query run "
                             f"({max(lens_q)}) in cu_seqlens_q")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or \
                out.device != q.device:
            got = f"{out.dtype} {list(out.shape)} on {out.device}" if isinstance(out, torch.Tensor) else \
                type(out).__name__
            raise ValueError(f"out must be {q.dtype} {list(q.shape)} on {q.device}, got {got}")
        if out.stride(-1) != 1 and out.shape[-1] > 1:
            raise ValueError(f"out must be contiguous along head_dim (stride 1), got strides {out.stride()}")


def _check_config(config: AttentionConfig | None, head_dim: int, dtype: torch.dtype) -> AttentionConfig:
    if config is None:
        return default_config(head_dim, dtype)
    if not isinstance(config, AttentionConfig):
        raise ValueError(f"config must be an AttentionConfig, got {type(config).__name__}")
    return config


# ---- launchers ---------------------------------------------------------------------------------------------------

def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, *, causal: bool = True, scale: float | None = None,
                    max_seqlen_q: int | None = None, out: torch.Tensor | None = None,
                    config: AttentionConfig | None = None, window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Attention of packed sequences -> out [total_q, n_heads, head_dim] in q.dtype.

    q: [total_q, n_heads, head_dim]; k, v: [total_k, n_kv_heads, head_dim]; float16/bfloat16/float32, one dtype,
    stride 1 along head_dim and any token/head strides (views into a fused qkv projection work without copies);
    head_dim <= 256, n_heads a multiple of n_kv_heads. cu_seqlens_q, cu_seqlens_k: int32 [batch + 1] offsets
    (0, non-decreasing, total): sequence b's queries are q[cu_q[b]:cu_q[b + 1]], the LAST len_q of its
    k[cu_k[b]:cu_k[b + 1]]. causal: query i sees keys j <= len_k - len_q + i. scale: > 0, default head_dim ** -0.5.
    max_seqlen_q: the longest query run (host int, sizes the grid); None reads it from cu_seqlens_q (a device sync
    on CUDA). out: optional output buffer (stride 1 along head_dim). config: tile sizes (default_config).
    window: sliding-window attention (causal only): query i sees keys j > its position - window; None: all.
    softcap: soft-capped scores (Gemma 2), scale * q.k -> softcap * tanh(scale * q.k / softcap); None: none.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_heads(name, t)
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"k and v must have one shape and dtype, got {k.dtype} {list(k.shape)} and "
                         f"{v.dtype} {list(v.shape)}")
    _check_heads_match(q, k.shape[1], k.dtype, k.shape[2], "k")
    lens_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    lens_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel() - 1} sequences but cu_seqlens_k has "
                         f"{cu_seqlens_k.numel() - 1}")
    _check_lengths(lens_q, lens_k, causal)
    _check_options(q, lens_q, scale, max_seqlen_q, out)
    check_window(window, causal)
    check_softcap(softcap)
    cfg = _check_config(config, q.shape[2], q.dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    check_runnable([out, q, k, v, cu_seqlens_q, cu_seqlens_k], "flash_attention")
    _launch(out, q, k, v, cu_seqlens_q, cu_seqlens_k, None, causal=causal, scale=scale, max_seqlen_q=max_seqlen_q,
            config=cfg, window=window, softcap=softcap)
    return out


def flash_attention_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          seq_lens_k: torch.Tensor, block_table: torch.Tensor, *, causal: bool = True,
                          scale: float | None = None, max_seqlen_q: int | None = None,
                          out: torch.Tensor | None = None, config: AttentionConfig | None = None,
                          window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """flash_attention with keys and values read from the paged cache -> out [total_q, n_heads, head_dim].

    k_cache, v_cache: [num_blocks, block_size, n_kv_heads, head_dim] (paged.py's layout; any block_size >= 1).
    seq_lens_k: int32 [batch], each sequence's tokens in the cache INCLUDING this chunk's (already written there).
    block_table: int32 [batch, max_blocks]: key j of sequence b is at block block_table[b, j // block_size], row
    j % block_size. Other arguments as flash_attention.
    """
    check_heads("q", q)
    num_blocks, block_size, n_kv_heads, head_dim = paged.check_kv_cache(k_cache, v_cache)
    _check_heads_match(q, n_kv_heads, k_cache.dtype, head_dim, "k_cache")
    lens_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    paged.check_block_table(block_table, seq_lens_k, num_blocks, block_size, q.device)
    if seq_lens_k.numel() != cu_seqlens_q.numel() - 1:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel() - 1} sequences but seq_lens_k has "
                         f"{seq_lens_k.numel()}")
    _check_lengths(lens_q, seq_lens_k.tolist() if q.device.type == "cpu" else None, causal)
    _check_options(q, lens_q, scale, max_seqlen_q, out)
    check_window(window, causal)
    check_softcap(softcap)
    cfg = _check_config(config, head_dim, q.dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    check_runnable([out, q, k_cache, v_cache, cu_seqlens_q, seq_lens_k, block_table], "flash_attention_paged")
    _launch(out, q, k_cache, v_cache, cu_seqlens_q, seq_lens_k, block_table, causal=causal, scale=scale,
            max_seqlen_q=max_seqlen_q, config=cfg, window=window, softcap=softcap)
    return out


def _launch(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            k_index: torch.Tensor, block_table: torch.Tensor | None, *, causal: bool, scale: float | None,
            max_seqlen_q: int | None, config: AttentionConfig, window: int | None = None,
            softcap: float | None = None) -> None:
    """The kernel on validated shapes, index contents unchecked (tests use it to see invalid ones give NaN).
    k_index: cu_seqlens_k, or seq_lens_k when block_table is given (k, v then the paged caches)."""
    total_q, n_heads, head_dim = q.shape
    batch = cu_seqlens_q.numel() - 1
    if batch > MAX_BATCH:
        raise ValueError(f"batch must be <= {MAX_BATCH} sequences (the grid's third axis), got {batch}")
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if batch else 0  # a sync on CUDA
    if total_q == 0 or batch == 0 or max_seqlen_q == 0:
        return
    scale = head_dim ** -0.5 if scale is None else float(scale)
    if block_table is None:
        n_kv_heads, total_k = k.shape[1], k.shape[0]
        num_blocks, max_blocks, page_size, table = 0, 0, 1, k_index  # table: a placeholder pointer, never read
        stride_kt, stride_kh, stride_vt, stride_vh = k.stride(0), k.stride(1), v.stride(0), v.stride(1)
    else:
        num_blocks, page_size, n_kv_heads = k.shape[0], k.shape[1], k.shape[2]
        total_k, max_blocks, table = num_blocks * page_size, block_table.shape[1], block_table
        stride_kt, stride_kh, stride_vt, stride_vh = k.stride(1), k.stride(2), v.stride(1), v.stride(2)
    grid = (cdiv(max_seqlen_q, config.block_m), n_heads, batch)
    _flash_attention_kernel[grid](
        out, q, k, v, cu_seqlens_q, k_index, table,
        total_q, total_k, num_blocks, max_blocks, n_heads // n_kv_heads, scale * LOG2E, window or 0,
        (softcap or 1.0) * LOG2E,
        out.stride(0), out.stride(1), q.stride(0), q.stride(1), stride_kt, stride_kh, stride_vt, stride_vh,
        HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_D=max(16, next_power_of_2(head_dim)), CAUSAL=bool(causal), PAGED=block_table is not None,
        PAGE_SIZE=page_size, DOT_PRECISION=dot_precision(q.dtype), WINDOWED=window is not None,
        SOFTCAP=softcap is not None,
        num_warps=config.num_warps, num_stages=config.num_stages)


# ---- references --------------------------------------------------------------------------------------------------

def _attention_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                   window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """One sequence in float32: q [len_q, n_heads, D], k, v [len_k, n_kv_heads, D] -> [len_q, n_heads, D]."""
    len_q, n_heads, _ = q.shape
    len_k, n_kv_heads, _ = k.shape
    group = n_heads // n_kv_heads
    qf = q.float().transpose(0, 1)  # [n_heads, len_q, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [n_heads, len_k, D]: head h uses h // group
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    s = (qf @ kf.transpose(1, 2)) * scale  # [n_heads, len_q, len_k]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if causal:
        pos = torch.arange(len_q, device=q.device)[:, None] + (len_k - len_q)
        keys = torch.arange(len_k, device=q.device)[None, :]
        hidden = keys > pos if window is None else (keys > pos) | (keys <= pos - window)
        s = s.masked_fill(hidden, float("-inf"))
    return (torch.softmax(s, dim=-1) @ vf).transpose(0, 1)


def _reference(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], cu_seqlens_q: torch.Tensor,
               causal: bool, scale: float | None, window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
    scale = q.shape[2] ** -0.5 if scale is None else scale
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    offsets = cu_seqlens_q.tolist()
    for b, (k, v) in enumerate(zip(keys, values, strict=True)):
        start, end = offsets[b], offsets[b + 1]
        if end > start:
            out[start:end] = _attention_one(q[start:end], k, v, causal, scale, window, softcap)
    return out.to(q.dtype)


def flash_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor, *, causal: bool = True, scale: float | None = None,
                        window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Plain torch, sequence by sequence: float32 scores, mask, softmax and @ v, rounded once to q.dtype."""
    ck = cu_seqlens_k.tolist()
    bounds = list(itertools.pairwise(ck))
    return _reference(q, [k[a:b] for a, b in bounds], [v[a:b] for a, b in bounds], cu_seqlens_q, causal, scale,
                      window, softcap)


def flash_attention_paged_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              cu_seqlens_q: torch.Tensor, seq_lens_k: torch.Tensor, block_table: torch.Tensor, *,
                              causal: bool = True, scale: float | None = None,
                              window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """flash_attention_ref on the sequences gathered from the paged cache with paged.gather_kv."""
    keys = paged.gather_kv(k_cache, block_table, seq_lens_k)
    values = paged.gather_kv(v_cache, block_table, seq_lens_k)
    return _reference(q, keys, values, cu_seqlens_q, causal, scale, window, softcap)
