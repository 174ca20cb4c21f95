"""Verification attention for speculative decoding over a paged KV cache: each sequence's k + 1 new queries (the token
it last accepted and its k draft tokens) attend, causally, every token of their sequence, in one launch for a batch.

    out[i, h] = sum_j softmax_j(scale * q[i, h] . K_b[j, g]) V_b[j, g],   j <= seq_len - q_len + i,   g = h // group

Chunk b is q[cu_seqlens_q[b] : cu_seqlens_q[b + 1]]: the LAST q_len of the seq_lens[b] tokens its sequence holds in
the paged cache (realm.kernels.paged; their K and V already stored), so query i sits at position seq_len - q_len + i.
Chunks of 0 .. MAX_VERIFY_QUERIES queries are taken (a short prefill chunk after a cached prefix is the same
computation); K_b, V_b are read through the sequence's block table row.

Why a kernel of its own: verification is memory-bound like decode (at k + 1 = 16 queries, a K/V element still meets
few FLOPs), but `flash_attention_paged`, which served these chunks, gives each query head its own programs with a
BLOCK_M of 32 to 128 query rows of which only k + 1 are real: each K/V byte is read once per query head (group times
more than needed) and most of its tensor-core work is padding. This kernel is `_paged_decode_kernel`
(paged_attention.py) generalised from one query to q_len queries:
- grid (batch, n_kv_heads x row_tiles, num_splits). One program takes ALL (query, head-of-group) pairs of its
  sequence's chunk for its KV head as the rows of one tile: row r = i * group + g is query i of query head
  kvh * group + g, BLOCK_M = max(16, next_power_of_2(max_seqlen_q * group)) rows (16: tl.dot's smallest M). So each
  K/V byte is read from HBM once per KV head for all k + 1 queries and all heads of the group. The [BLOCK_M, head_dim]
  float32 accumulator has to stay in registers: past `max_block_m` rows (64 at head_dim 128 in 16-bit, e.g. 16
  queries x group 8, or multi-query attention) the rows are cut into row_tiles tiles, each reading the K/V again
  (the tiles of one KV head are neighbouring programs, so the second read may hit L2; not measured).
  Arithmetic intensity: BLOCK_M rows x 2 FLOP x 2 products per (K, V) element pair, i.e. BLOCK_M FLOP/byte in
  float16 (16 at decode's 16 rows, 128 at most) against an H100's ~295 FLOP/byte tensor-core ridge: memory-bound at
  every tile. float32 (BLOCK_M / 2 FLOP/byte, IEEE dot products on CUDA cores, ridge ~20) turns
  compute-bound from 64 rows on; it is the exact path for tests, not the serving dtype.
- a program walks its tokens in BLOCK_N tiles with the online softmax in base 2 (Milakov & Gimelshein 2018;
  FlashAttention), looking up every token's block in the block table (any block size), and masks per row the keys
  past the row's position (the causal mask; one compare per score, cheap in a memory-bound loop).
- split-K ("flash-decoding", Dao et al. 2023) as paged decode: the tokens are cut into num_splits ranges of whole
  BLOCK_N tiles, planned by `plan_decode`'s heuristic with batch x n_kv_heads x row_tiles programs per split. Each
  split writes its float32 output normalised by its own softmax sum and its base-2 log-sum-exp to partials
  [tokens, n_heads, splits, head_dim] and [tokens, n_heads, splits]; paged_attention's `_combine_kernel`, launched
  over (tokens, n_heads), merges them. A row that sees no key of a split (a split past its sequence's end, or the
  last split when it holds only keys after the row's position) writes lse = -inf, o = 0: weight 0 in the combine.
  With one split the kernel writes the output directly.

Precision: scores and softmax in float32; probabilities rounded to q's dtype for the P @ V tensor-core product (as
every flash-attention kernel does) and the output rounded once to q's dtype. float32 inputs use IEEE float32 dot
products (not TF32).

Index contents: on CPU the launcher checks cu_seqlens_q, lengths and block ids and raises. On CUDA it does not look
(no device-to-host sync per layer and step). A chunk whose cu_seqlens_q bounds are out of [0, tokens], whose
sequence length is below its query count or beyond its table row, or whose block table holds an out-of-range block id
among its first seq_len tokens, comes out NaN in all its rows (every head), and nothing is read out of bounds; under
TRITON_DEBUG=1 the kernel asserts. max_seqlen_q sizes the tiles: on CUDA a chunk longer than a max_seqlen_q the
caller passes comes out NaN as well.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .checks import cdiv, check_heads, check_softcap, check_window, next_power_of_2
from .flash_attention import _check_cu_seqlens, _check_lengths, tanh
from .paged import check_block_table, check_kv_cache, gather_kv
from .paged_attention import MAX_HEAD_DIM, MIN_DOT_ROWS, PagedDecodeConfig, _combine_kernel, plan_decode
from .qdecode import check_runnable, dot_precision

log = logging.getLogger(__name__)

MAX_VERIFY_QUERIES = 16  # the longest chunk this kernel takes: k + 1 for up to 15 draft tokens
# The largest [BLOCK_M, BLOCK_D] tile (its float32 accumulator lives in registers): more (query, head) rows are cut
# into row tiles. Compiled for sm_90 at 8 warps (tests/compile_for_gpu.py, registers and spills read with cuobjdump;
# not yet timed): 16-bit 64 x 128 and 128 x 64 tiles spill nothing, 128 x 128 spills 350-400 bytes per thread (and
# still 200+ at 16 warps); float32 64 x 64 and 32 x 128 spill nothing, 64 x 128 and 128 x 64 do.
MAX_TILE = {torch.float16: 8192, torch.bfloat16: 8192, torch.float32: 4096}
LOG2E = 1.4426950408889634


def max_block_m(block_d: int, dtype: torch.dtype) -> int:
    """The most rows of one tile at head_dim padded to block_d (a power of two): MAX_TILE elements, at least 16."""
    return max(MIN_DOT_ROWS, MAX_TILE[dtype] // block_d)


def default_config(block_m: int, block_d: int, dtype: torch.dtype) -> PagedDecodeConfig:
    """Untuned tiles for an H100-class GPU by the [block_m, block_d] tile: 8 warps; BLOCK_N 64 tokens in 16-bit (paged
    decode's) and 32 in float32 (IEEE dots on CUDA cores, both operands in registers), halved above 2048 tile
    elements. Chosen by compiling for sm_90 and reading the registers and spills, as MAX_TILE (not yet timed on a
    GPU): no spills on any tile up to MAX_TILE at head_dim 64 and 128, where 4 warps spill from 16 x 128 on and BLOCK_N
    64 from 32 x 128 (16-bit)."""
    block_n = 32 if dtype == torch.float32 else 64
    return PagedDecodeConfig(block_n=block_n if block_m * block_d <= 2048 else block_n // 2, num_warps=8)


@dataclass(frozen=True)
class PagedVerifyPlan:
    """What paged_verify_attention launches: row_tiles tiles of block_m (query, head) rows per KV head, num_splits
    ranges of tokens_per_split tokens (a multiple of config.block_n; the last split also takes any tokens past
    num_splits * tokens_per_split), and where num_splits came from ("heuristic" or "given")."""

    num_splits: int
    tokens_per_split: int
    block_m: int
    row_tiles: int
    config: PagedDecodeConfig
    source: str


# ---- kernel ------------------------------------------------------------------------------------------------------

@triton.jit
def _paged_verify_kernel(out_ptr, part_o_ptr, part_lse_ptr, q_ptr, k_cache_ptr, v_cache_ptr, cu_q_ptr, seq_lens_ptr,
                         block_table_ptr, qk_scale, window, softcap2, total_q, num_blocks, block_size, max_blocks,
                         group, n_heads, row_tiles, head_dim, tokens_per_split, num_splits, stride_qt, stride_qh,
                         stride_ot, stride_oh, stride_cblock, stride_crow, stride_ch, stride_bt,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    """Sequence program_id(0); KV head program_id(1) // row_tiles and its row tile program_id(1) % row_tiles; split
    program_id(2): rows r = tile * BLOCK_M + 0 .. BLOCK_M - 1 (query r // group of head kvh * group + r % group)
    against tokens [split * tokens_per_split, ..) of the sequence, causal. qk_scale = scale * log2(e).
    SPLIT: write the normalised partial output and its log-sum-exp to part_o [T, H, S, D], part_lse [T, H, S]; else
    the output to out. window > 0: row i sees only keys > its position - window (sliding window); 0: all earlier."""
    b, pid_h, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    kvh, tile = pid_h // row_tiles, pid_h % row_tiles
    # Chunk bounds, clamped so that invalid contents (unchecked on CUDA) read and write nothing out of bounds.
    q_lo, q_hi = tl.load(cu_q_ptr + b), tl.load(cu_q_ptr + b + 1)
    q_start = tl.minimum(tl.maximum(q_lo, 0), total_q)
    len_q = tl.minimum(tl.maximum(q_hi, q_start), total_q) - q_start
    if tile * BLOCK_M >= len_q * group:  # a chunk shorter than the longest: this row tile holds none of its queries
        return
    seq_len = tl.load(seq_lens_ptr + b)
    first = tl.where(window > 0, tl.maximum(seq_len - len_q + 1 - window, 0), 0)  # the first query's first key
    start = tl.maximum(split * tokens_per_split, first)
    end = tl.where(split == num_splits - 1, seq_len, tl.minimum(split * tokens_per_split + tokens_per_split, seq_len))

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rows // group  # the query of each row
    heads = kvh * group + rows % group
    row_mask = qi < len_q
    last_key = seq_len - len_q + qi  # causal: the row sees keys 0 .. last_key
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q_rows = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None].to(tl.int64) * stride_qh + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    table_row = block_table_ptr + b * stride_bt
    head_offset = kvh.to(tl.int64) * stride_ch

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_bad = tl.zeros([BLOCK_N], dtype=tl.int32)  # tokens whose block table entry is unusable (CUDA: unchecked)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        col = offs_n // block_size
        block = tl.load(table_row + col, mask=n_mask & (col < max_blocks), other=-1)
        ok = (block >= 0) & (block < num_blocks)
        n_bad += (n_mask & ~ok).to(tl.int32)
        rows_kv = tl.where(ok, block, 0).to(tl.int64) * stride_cblock + (offs_n % block_size) * stride_crow
        kv_offs = head_offset + rows_kv[:, None] + d[None, :]  # [BLOCK_N, BLOCK_D]
        kv_mask = (n_mask & ok)[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], base-2 logits
        if SOFTCAP:  # Gemma 2: cap * tanh(logit / cap), in base-2 units (softcap2 = cap * log2(e))
            s = tanh(s / softcap2) * softcap2
        visible = n_mask[None, :] & (offs_n[None, :] <= last_key[:, None])
        visible = visible & ((window <= 0) | (offs_n[None, :] > last_key[:, None] - window))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no key yet (its keys start in a later tile or split) keeps m = -inf: exponents taken
        # against 0 instead give p = 0 and alpha = 0, never -inf - -inf.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    bad = ((tl.sum(n_bad, axis=0) > 0) | (q_start != q_lo) | (q_start + len_q != q_hi) | (seq_len < len_q)
           | (seq_len > max_blocks * block_size) | (len_q * group > row_tiles * BLOCK_M))
    tl.device_assert(~bad, "paged_verify_attention: cu_seqlens_q, a length or a block id out of range")
    has_keys = l_i > 0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if SPLIT:
        # A row that sees no key of this split writes o = 0, lse = -inf: weight 0 in the combine.
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        lse = tl.where(bad, float("nan"), lse)
        base = (q_rows * n_heads + heads) * num_splits + split  # [BLOCK_M] rows of part_lse [T, H, S]
        tl.store(part_lse_ptr + base, lse, mask=row_mask)
        tl.store(part_o_ptr + base[:, None] * head_dim + d[None, :], o, mask=row_mask[:, None] & d_mask[None, :])
    else:
        o = tl.where((bad | ~has_keys)[:, None], float("nan"), o)
        out = out_ptr + q_rows[:, None] * stride_ot + heads[:, None].to(tl.int64) * stride_oh + d[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    if tile == row_tiles - 1:
        # A chunk longer than the row tiles hold (a too small max_seqlen_q, unchecked on CUDA): its rows past them are
        # NaN too (their log-sum-exp when split, so the combine writes NaN). No iteration on valid inputs.
        for r0 in range(row_tiles * BLOCK_M, len_q * group, BLOCK_M):
            extra = r0 + tl.arange(0, BLOCK_M)
            e_rows = (q_start + extra // group).to(tl.int64)
            e_heads = kvh * group + extra % group
            e_mask = extra < len_q * group
            if SPLIT:
                tl.store(part_lse_ptr + (e_rows * n_heads + e_heads) * num_splits + split,
                         tl.full([BLOCK_M], float("nan"), dtype=tl.float32), mask=e_mask)
            else:
                nan = tl.full([BLOCK_M, BLOCK_D], float("nan"), dtype=tl.float32).to(out_ptr.dtype.element_ty)
                tl.store(out_ptr + e_rows[:, None] * stride_ot + e_heads[:, None].to(tl.int64) * stride_oh
                         + d[None, :], nan, mask=e_mask[:, None] & d_mask[None, :])


# ---- planning ----------------------------------------------------------------------------------------------------

def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def plan_verify(batch: int, n_heads: int, n_kv_heads: int, head_dim: int, max_seqlen_q: int, max_seq_len: int,
                dtype: torch.dtype, device: torch.device | str, *, num_splits: int | None = None,
                config: PagedDecodeConfig | None = None) -> PagedVerifyPlan:
    """How paged_verify_attention tiles batch chunks of up to max_seqlen_q queries over up to max_seq_len tokens.

    Rows: max_seqlen_q * group (query, head) pairs per KV head, in row_tiles tiles of block_m rows (a power of two
    from 16 to max_block_m). Splits: `plan_decode`'s heuristic with batch * n_kv_heads * row_tiles programs per
    split, or num_splits when given. config: default_config for the tile when None."""
    for name, value in (("batch", batch), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                        ("max_seqlen_q", max_seqlen_q)):
        _positive_int(name, value)
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    if max_seqlen_q > MAX_VERIFY_QUERIES:
        raise ValueError(f"max_seqlen_q = {max_seqlen_q} is above MAX_VERIFY_QUERIES = {MAX_VERIFY_QUERIES}: longer "
                         f"chunks go through flash_attention_paged")
    if dtype not in MAX_TILE:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    rows, block_d = max_seqlen_q * (n_heads // n_kv_heads), max(16, next_power_of_2(head_dim))
    block_m = min(max_block_m(block_d, dtype), max(MIN_DOT_ROWS, next_power_of_2(rows)))
    row_tiles = cdiv(rows, block_m)
    config = default_config(block_m, block_d, dtype) if config is None else config
    split = plan_decode(batch, n_kv_heads * row_tiles, max_seq_len, device, num_splits=num_splits, config=config)
    return PagedVerifyPlan(split.num_splits, split.tokens_per_split, block_m, row_tiles, split.config, split.source)


# ---- launcher ----------------------------------------------------------------------------------------------------

def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  seq_lens: torch.Tensor, block_table: torch.Tensor, scale: float | None, max_seqlen_q: int | None,
                  out: torch.Tensor | None) -> list[int] | None:
    """Shapes, dtypes and devices always; index contents on CPU. Returns the chunk lengths on CPU, else None."""
    check_heads("q", q, "[tokens, n_heads, head_dim]")
    num_blocks, block_size, kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    n_heads, q_head_dim = q.shape[1], q.shape[2]
    if k_cache.dtype != q.dtype:
        raise ValueError(f"the KV cache is {k_cache.dtype} but q is {q.dtype}; they must match")
    if q_head_dim != head_dim:
        raise ValueError(f"q has head_dim {q_head_dim} but the KV cache has {head_dim}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is above the supported {MAX_HEAD_DIM}")
    if n_heads == 0 or n_heads % kv_heads:
        raise ValueError(f"q has {n_heads} heads, not a multiple of the KV cache's {kv_heads} heads")
    lens_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    check_block_table(block_table, seq_lens, num_blocks, block_size, q.device)
    if seq_lens.shape[0] != cu_seqlens_q.shape[0] - 1:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0] - 1} chunks but seq_lens has {seq_lens.shape[0]} "
                         f"lengths")
    if lens_q is not None:
        too_long = [b for b, n in enumerate(lens_q) if n > MAX_VERIFY_QUERIES]
        if too_long:
            b = too_long[0]
            raise ValueError(f"chunk {b} has {lens_q[b]} queries, above MAX_VERIFY_QUERIES = {MAX_VERIFY_QUERIES} "
                             f"(longer chunks go through flash_attention_paged)")
        _check_lengths(lens_q, seq_lens.tolist(), causal=True)
    if max_seqlen_q is not None:
        if not isinstance(max_seqlen_q, int) or isinstance(max_seqlen_q, bool) or max_seqlen_q < 0:
            raise ValueError(f"max_seqlen_q must be a non-negative int, got {max_seqlen_q!r}")
        if max_seqlen_q > MAX_VERIFY_QUERIES:
            raise ValueError(f"max_seqlen_q = {max_seqlen_q} is above MAX_VERIFY_QUERIES = {MAX_VERIFY_QUERIES} "
                             f"(longer chunks go through flash_attention_paged)")
        if lens_q is not None and max_seqlen_q < max(lens_q, default=0):
            raise ValueError(f"max_seqlen_q = {max_seqlen_q} is less than the longest chunk ({max(lens_q)})")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            got = f"{out.dtype} {list(out.shape)} on {out.device}" if isinstance(out, torch.Tensor) else \
                type(out).__name__
            raise ValueError(f"out must be {q.dtype} {list(q.shape)} on {q.device}, got {got}")
        if out.stride(-1) != 1 and out.shape[-1] > 1:
            raise ValueError(f"out must be contiguous along head_dim (stride 1), got strides {out.stride()}")
    check_runnable([q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table] + ([] if out is None else [out]),
                   "paged_verify_attention")
    return lens_q


def paged_verify_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           seq_lens: torch.Tensor, block_table: torch.Tensor, *, scale: float | None = None,
                           max_seqlen_q: int | None = None, max_seq_len: int | None = None,
                           num_splits: int | None = None, out: torch.Tensor | None = None,
                           config: PagedDecodeConfig | None = None, window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """q: [tokens, n_heads, head_dim], the packed chunks (float16/bfloat16/float32, stride 1 on head_dim, any
    token/head strides); k_cache, v_cache: [num_blocks, block_size, n_kv_heads, head_dim] in q's dtype,
    n_heads % n_kv_heads == 0; cu_seqlens_q: int32 [batch + 1] (0, non-decreasing, tokens), chunk b = rows
    cu_seqlens_q[b] .. cu_seqlens_q[b + 1], at most MAX_VERIFY_QUERIES each; seq_lens: int32 [batch], each
    sequence's tokens in the cache INCLUDING its chunk's (already stored), >= its chunk's length; block_table: int32
    [batch, max_blocks]. Returns causal attention of every chunk over its sequence, [tokens, n_heads, head_dim] in q's
    dtype (into `out` when given: that shape and dtype, stride 1 on head_dim). window: sliding-window attention (each
    query sees the `window` keys ending at its own position); None: every earlier key. softcap: Gemma 2's soft-capped
    scores (scale * q.k -> softcap * tanh(scale * q.k / softcap)); None: none.

    scale: default head_dim ** -0.5. max_seqlen_q: a host int >= every chunk's length, sizing the tile; None reads
    cu_seqlens_q (a device sync on CUDA: the runtime passes it). max_seq_len: a host int >= every length, for the
    split heuristic; None reads seq_lens.max() (a sync on CUDA). num_splits: None for the heuristic, an int >= 1 to
    force it. config: tiles (default_config by the tile's rows and q's dtype).
    """
    lens_q = _check_inputs(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, scale, max_seqlen_q, out)
    check_window(window)
    check_softcap(softcap)
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool)
                                    or max_seq_len < 1):
        raise ValueError(f"max_seq_len must be an int >= 1, got {max_seq_len!r}")
    if config is not None and not isinstance(config, PagedDecodeConfig):
        raise ValueError(f"config must be a PagedDecodeConfig, got {type(config).__name__}")
    tokens, n_heads, head_dim = q.shape
    batch = seq_lens.shape[0]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if max_seqlen_q is None:
        max_seqlen_q = max(lens_q, default=0) if lens_q is not None else \
            int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if batch else 0
        if max_seqlen_q > MAX_VERIFY_QUERIES:  # on CUDA: the longest chunk, read from the device
            raise ValueError(f"a chunk has {max_seqlen_q} queries, above MAX_VERIFY_QUERIES = {MAX_VERIFY_QUERIES} "
                             f"(longer chunks go through flash_attention_paged)")
    if tokens == 0 or batch == 0 or max_seqlen_q == 0:
        return out
    if max_seq_len is None:
        max_seq_len = max(1, int(seq_lens.max()))
    elif q.device.type == "cpu" and max_seq_len < int(seq_lens.max()):
        raise ValueError(f"max_seq_len = {max_seq_len} is below the longest sequence ({int(seq_lens.max())})")
    plan = plan_verify(batch, n_heads, k_cache.shape[2], head_dim, max_seqlen_q, max_seq_len, q.dtype, q.device,
                       num_splits=num_splits, config=config)
    log.debug("paged_verify_attention batch=%d tokens=%d heads=%d/%d head_dim=%d max_seqlen_q=%d max_seq_len=%d: %s",
              batch, tokens, n_heads, k_cache.shape[2], head_dim, max_seqlen_q, max_seq_len, plan)
    _launch(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, head_dim ** -0.5 if scale is None else
            float(scale), plan, out, window, softcap)
    return out


def _launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
            seq_lens: torch.Tensor, block_table: torch.Tensor, scale: float, plan: PagedVerifyPlan,
            out: torch.Tensor, window: int | None = None, softcap: float | None = None) -> None:
    """The kernels on validated inputs, index contents unchecked (realm.kernels.attention calls it per layer; tests
    use it to see what CUDA does with bad indices). out: [tokens, n_heads, head_dim], stride 1 on head_dim."""
    tokens, n_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    batch, cfg, splits = seq_lens.shape[0], plan.config, plan.num_splits
    if tokens == 0 or batch == 0:
        return
    block_d = max(16, next_power_of_2(head_dim))
    part_o = part_lse = out  # placeholders: the one-split kernel never touches them
    if splits > 1:
        part_o = torch.empty(tokens, n_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(tokens, n_heads, splits, dtype=torch.float32, device=q.device)
    _paged_verify_kernel[(batch, kv_heads * plan.row_tiles, splits)](
        out, part_o, part_lse, q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, scale * LOG2E, window or 0,
        (softcap or 1.0) * LOG2E,
        tokens,
        num_blocks, block_size, block_table.shape[1], n_heads // kv_heads, n_heads, plan.row_tiles, head_dim,
        plan.tokens_per_split, splits, q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        BLOCK_M=plan.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, SPLIT=splits > 1,
        DOT_PRECISION=dot_precision(q.dtype), SOFTCAP=softcap is not None, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    if splits > 1:  # one program per (token, query head): part rows token * n_heads + head, as the kernel wrote them
        _combine_kernel[(tokens, n_heads)](out, part_o, part_lse, splits, head_dim, out.stride(0), out.stride(1),
                                           BLOCK_S=next_power_of_2(splits), BLOCK_D=block_d)


# ---- reference ---------------------------------------------------------------------------------------------------

def paged_verify_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, *,
                               scale: float | None = None, window: int | None = None,
                               softcap: float | None = None) -> torch.Tensor:
    """The reference: per sequence, its K and V gathered by paged.gather_kv, causal softmax(q K^T * scale) V in
    float32 (query i of a q_len chunk sees keys 0 .. seq_len - q_len + i, and with a window only those > its
    position - window), rounded once to q's dtype."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    group = n_heads // k_cache.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    offsets = cu_seqlens_q.tolist()
    pairs = zip(gather_kv(k_cache, block_table, seq_lens), gather_kv(v_cache, block_table, seq_lens), strict=True)
    for b, (k, v) in enumerate(pairs):
        lo, hi = offsets[b], offsets[b + 1]
        q_len, seq_len = hi - lo, k.shape[0]
        if q_len == 0:
            continue
        k = k.float().repeat_interleave(group, dim=1)  # [seq_len, n_heads, head_dim]: head h uses KV head h // group
        v = v.float().repeat_interleave(group, dim=1)
        s = torch.einsum("ihd,nhd->hin", q[lo:hi].float(), k) * scale  # [n_heads, q_len, seq_len]
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        last_key = torch.arange(q_len, device=q.device) + (seq_len - q_len)
        keys = torch.arange(seq_len, device=q.device)[None, None, :]
        hidden = keys > last_key[None, :, None]
        if window is not None:
            hidden = hidden | (keys <= last_key[None, :, None] - window)
        s = s.masked_fill(hidden, float("-inf"))
        out[lo:hi] = torch.einsum("hin,nhd->ihd", torch.softmax(s, dim=-1), v).to(q.dtype)
    return out
