"""Decode attention over a paged KV cache: one query token per sequence attends all of its sequence's cached tokens.

    out[b, h] = softmax(q[b, h] . K_b[:, g]^T * scale) @ V_b[:, g],   g = h // (n_heads / n_kv_heads)   (GQA)

K_b, V_b are sequence b's seq_lens[b] tokens, read through its block table row (realm.kernels.paged: PagedAttention,
Kwon et al. 2023). Sequences of different lengths share one launch.

Grid (batch, n_kv_heads, num_splits). Decode attention is memory-bound (each K/V byte is used by one query token per
head of its group), so the design serves bandwidth:
- one program takes *all* query heads of its KV head's group as the rows of one tile (padded to the 16 rows tl.dot
  needs), so each K/V byte is read from HBM once per group, not once per query head. The padding costs arithmetic,
  not bytes: 16 rows x 2 FLOP x 2 products = 64 FLOP per (K, V) element pair, i.e. 16 FLOP/byte in float16 against an
  H100's ~295 FLOP/byte tensor-core ridge, and 8 FLOP/byte in float32 (IEEE, CUDA cores) against ~20. So one
  tensor-core path serves every group size, MHA included (not yet measured on a GPU).
- a program walks its tokens in BLOCK_N tiles with the online softmax (Milakov & Gimelshein 2018; FlashAttention),
  looking up every token's block in the block table, so any block size works.
- split-K ("flash-decoding", Dao et al. 2023): long contexts with few sequences would give too few programs to fill
  the GPU, so the tokens are cut into num_splits contiguous ranges (whole BLOCK_N tiles). Each split writes its
  float32 output normalised by its own softmax sum plus its log-sum-exp (base 2); `_combine_kernel` merges them:
  out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M). A split holding no tokens of a short sequence writes
  lse = -inf, o = 0 and contributes nothing. With one split the kernel writes the output directly.
  How many splits: `plan_decode` (about 2 programs per SM, >= 256 tokens per split, <= 32 splits).

Precision: scores and softmax in float32; the probabilities are rounded to q's dtype for the P @ V tensor-core product
(as every flash-attention kernel does), and the output once to q's dtype. float32 inputs use IEEE float32 dot products
(not TF32).

Index contents (realm.kernels.paged): on CPU the launcher checks lengths and block ids and raises. On CUDA it does not
look (no device-to-host sync per layer and step); a sequence whose block table holds an out-of-range block id among
its first seq_len tokens, or whose length exceeds its table row or is < 1, gets NaN in all its rows, nothing is read
out of bounds, and under TRITON_DEBUG=1 the kernel asserts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import tuning
from .checks import cdiv, check_heads, check_softcap, check_window, next_power_of_2
from .flash_attention import tanh
from .paged import check_block_table, check_kv_cache, gather_kv
from .qdecode import check_runnable, dot_precision

log = logging.getLogger(__name__)

MAX_HEAD_DIM = 256  # one [rows, head_dim] float32 accumulator per program, held in registers
MIN_DOT_ROWS = 16  # tl.dot's smallest M: a group of query heads is padded to this many rows
PROGRAMS_PER_SM = 2  # the heuristic's target occupancy: enough programs in flight to saturate HBM
MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost (q load, partial write, combine) is not repaid
MAX_SPLITS = 32
DEFAULT_SMS = 132  # an H100 SXM's SM count: the heuristic's stand-in off CUDA, so CPU tests exercise its logic
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PagedDecodeConfig:
    """Tile and launch settings: BLOCK_N tokens per tile (a power of two >= 16, tl.dot's K for P @ V)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        tuning.check_launch_fields(self, ("block_n", "num_warps"), {"block_n": 16})


@dataclass(frozen=True)
class PagedDecodePlan:
    """What paged_decode_attention launches: num_splits ranges of tokens_per_split tokens (a multiple of
    config.block_n; the last split also takes any tokens past num_splits * tokens_per_split), and where num_splits
    came from ("heuristic" or "given")."""

    num_splits: int
    tokens_per_split: int
    config: PagedDecodeConfig
    source: str


# ---- kernels -----------------------------------------------------------------------------------------------------

@triton.jit
def _paged_decode_kernel(out_ptr, part_o_ptr, part_lse_ptr, q_ptr, k_cache_ptr, v_cache_ptr, seq_lens_ptr,
                         block_table_ptr, qk_scale, window, softcap2, num_blocks, block_size, max_blocks, group,
                         head_dim, tokens_per_split, num_splits, stride_qb, stride_qh, stride_ob, stride_oh,
                         stride_cblock, stride_crow, stride_ch, stride_bt,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    """Sequence program_id(0), KV head program_id(1), split program_id(2): its group's query heads (rows) against
    tokens [split * tokens_per_split, ..) of the sequence. qk_scale = scale * log2(e) (the softmax runs in base 2).
    SPLIT: write the normalised partial output and its log-sum-exp to part_o [B, H, S, D], part_lse [B, H, S];
    else the output to out. window > 0: only the last `window` tokens (sliding-window attention); 0: all."""
    b, kvh, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    first = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)  # splits wholly before it come out empty
    start = tl.maximum(split * tokens_per_split, first)
    end = tl.where(split == num_splits - 1, seq_len, tl.minimum(split * tokens_per_split + tokens_per_split, seq_len))

    rows = tl.arange(0, BLOCK_M)
    heads = kvh * group + rows  # query heads of this KV head's group
    row_mask = rows < group
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q = tl.load(q_ptr + b * stride_qb + heads[:, None].to(tl.int64) * stride_qh + d[None, :],
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
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds at least one token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    bad = (tl.sum(n_bad, axis=0) > 0) | (seq_len < 1) | (seq_len > max_blocks * block_size)
    tl.device_assert(~bad, "paged_decode_attention: a block id or sequence length out of range")
    has_tokens = l_i > 0
    o = acc / tl.where(has_tokens, l_i, 1.0)[:, None]
    if SPLIT:
        # An empty split (short sequence) writes o = 0, lse = -inf: weight 0 in the combine.
        lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
        lse = tl.where(bad, float("nan"), lse)
        base = (b * tl.num_programs(1) * group + heads.to(tl.int64)) * num_splits + split  # [BLOCK_M]
        tl.store(part_lse_ptr + base, lse, mask=row_mask)
        tl.store(part_o_ptr + base[:, None] * head_dim + d[None, :], o, mask=row_mask[:, None] & d_mask[None, :])
    else:
        o = tl.where((bad | ~has_tokens)[:, None], float("nan"), o)
        out = out_ptr + b * stride_ob + heads[:, None].to(tl.int64) * stride_oh + d[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _combine_kernel(out_ptr, part_o_ptr, part_lse_ptr, num_splits, head_dim, stride_ob, stride_oh,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sequence program_id(0), query head program_id(1): out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),
    M = max_s lse_s; NaN when a split is NaN (bad block ids) or no split holds a token (length < 1)."""
    b, h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    row = b * tl.num_programs(1) + h
    s = tl.arange(0, BLOCK_S)
    s_mask = s < num_splits
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    lse = tl.load(part_lse_ptr + row * num_splits + s, mask=s_mask, other=float("-inf"))
    n_nan = tl.sum((lse != lse).to(tl.int32), axis=0)
    lse = tl.where(lse != lse, float("-inf"), lse)
    m = tl.max(lse, axis=0)
    empty = m == float("-inf")
    w = tl.exp2(lse - tl.where(empty, 0.0, m))  # 0 for empty splits
    o = tl.load(part_o_ptr + (row * num_splits + s)[:, None] * head_dim + d[None, :],
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    result = tl.sum(w[:, None] * o, axis=0) / tl.where(empty, 1.0, total)
    result = tl.where((n_nan > 0) | empty, float("nan"), result)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, result.to(out_ptr.dtype.element_ty), mask=d_mask)


# ---- planning ----------------------------------------------------------------------------------------------------

def plan_decode(batch: int, n_kv_heads: int, max_seq_len: int, device: torch.device | str, *,
                num_splits: int | None = None, config: PagedDecodeConfig | None = None) -> PagedDecodePlan:
    """How paged_decode_attention splits the tokens of batch sequences of up to max_seq_len tokens.

    Heuristic: batch * n_kv_heads programs per split; split until about PROGRAMS_PER_SM programs per SM run
    (torch.cuda's SM count on CUDA, DEFAULT_SMS elsewhere), keeping >= MIN_TOKENS_PER_SPLIT tokens per split and at
    most MAX_SPLITS splits. Short contexts and large batches get 1 (no combine pass). num_splits forces the count
    (splits past a sequence's end are empty)."""
    config = PagedDecodeConfig() if config is None else config
    if not isinstance(config, PagedDecodeConfig):
        raise ValueError(f"config must be a PagedDecodeConfig, got {type(config).__name__}")
    for name, value in (("batch", batch), ("n_kv_heads", n_kv_heads), ("max_seq_len", max_seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    device = torch.device(device)
    source = "given"
    if num_splits is None:
        source = "heuristic"
        sms = tuning.sm_count(device) if device.type == "cuda" else DEFAULT_SMS
        wanted = math.ceil(PROGRAMS_PER_SM * sms / (batch * n_kv_heads))
        num_splits = max(1, min(wanted, max_seq_len // MIN_TOKENS_PER_SPLIT, MAX_SPLITS))
    elif not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    tiles = cdiv(max_seq_len, config.block_n)
    tokens_per_split = cdiv(tiles, num_splits) * config.block_n
    if source == "heuristic":  # rounding up to whole tiles may leave the last splits empty: drop them
        num_splits = cdiv(max_seq_len, tokens_per_split)
    return PagedDecodePlan(num_splits, tokens_per_split, config, source)


# ---- launcher ----------------------------------------------------------------------------------------------------

def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                  block_table: torch.Tensor, scale: float | None, out: torch.Tensor | None) -> None:
    check_heads("q", q, "[batch, n_heads, head_dim]")
    num_blocks, block_size, kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    batch, n_heads, q_head_dim = q.shape
    if k_cache.dtype != q.dtype:
        raise ValueError(f"the KV cache is {k_cache.dtype} but q is {q.dtype}; they must match")
    if q_head_dim != head_dim:
        raise ValueError(f"q has head_dim {q_head_dim} but the KV cache has {head_dim}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is above the supported {MAX_HEAD_DIM}")
    if n_heads % kv_heads:
        raise ValueError(f"q has {n_heads} heads, not a multiple of the KV cache's {kv_heads} heads")
    check_block_table(block_table, seq_lens, num_blocks, block_size, q.device)
    if seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens must be [{batch}] (one length per sequence of q), got {list(seq_lens.shape)}")
    if q.device.type == "cpu" and batch and int(seq_lens.min()) < 1:
        b = int((seq_lens < 1).nonzero()[0, 0])
        raise ValueError(f"seq_lens[{b}] = {int(seq_lens[b])}: every sequence must hold at least its current token")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    if out is not None:
        if tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out must be {q.dtype} {list(q.shape)} on {q.device}, got {out.dtype} "
                             f"{list(out.shape)} on {out.device}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    check_runnable([q, k_cache, v_cache, seq_lens, block_table] + ([] if out is None else [out]),
                   "paged_decode_attention")


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                           block_table: torch.Tensor, *, scale: float | None = None, num_splits: int | None = None,
                           max_seq_len: int | None = None, out: torch.Tensor | None = None,
                           config: PagedDecodeConfig | None = None, window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """q: [batch, n_heads, head_dim] (float16/bfloat16/float32, stride 1 on head_dim, any batch/head strides);
    k_cache, v_cache: [num_blocks, block_size, n_kv_heads, head_dim] in q's dtype, n_heads % n_kv_heads == 0;
    seq_lens: int32 [batch], each >= 1, the current token included (already stored); block_table: int32
    [batch, max_blocks]. Returns softmax(q K^T * scale) V per sequence, [batch, n_heads, head_dim] in q's dtype
    (into `out` when given: contiguous, that shape and dtype).

    scale: default head_dim ** -0.5. num_splits: None for `plan_decode`'s heuristic, an int >= 1 to force it.
    max_seq_len: a host int >= every length, for the heuristic; None reads seq_lens.max() (a device sync on CUDA: the
    runtime passes it). A too small max_seq_len on CUDA only costs speed (the last split takes the rest).
    window: sliding-window attention, each query sees its sequence's last `window` tokens; None: all. softcap: Gemma
    2's soft-capped scores (scale * q.k -> softcap * tanh(scale * q.k / softcap)); None: none.
    """
    _check_inputs(q, k_cache, v_cache, seq_lens, block_table, scale, out)
    check_window(window)
    check_softcap(softcap)
    batch, n_heads, head_dim = q.shape
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    elif q.device.type == "cpu" and isinstance(max_seq_len, int) and max_seq_len < int(seq_lens.max()):
        raise ValueError(f"max_seq_len = {max_seq_len} is below the longest sequence ({int(seq_lens.max())})")
    plan = plan_decode(batch, k_cache.shape[2], max_seq_len, q.device, num_splits=num_splits, config=config)
    log.debug("paged_decode_attention batch=%d heads=%d/%d head_dim=%d max_seq_len=%d: %s", batch, n_heads,
              k_cache.shape[2], head_dim, max_seq_len, plan)
    _launch(q, k_cache, v_cache, seq_lens, block_table, head_dim ** -0.5 if scale is None else float(scale), plan,
            out, window, softcap)
    return out


def _launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
            block_table: torch.Tensor, scale: float, plan: PagedDecodePlan, out: torch.Tensor,
            window: int | None = None, softcap: float | None = None) -> None:
    """The kernels on validated inputs, index contents unchecked (tests use it to see what CUDA does with bad block
    ids)."""
    batch, n_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    group = n_heads // kv_heads
    cfg, splits = plan.config, plan.num_splits
    block_d = max(16, next_power_of_2(head_dim))
    part_o = part_lse = out  # placeholders: the one-split kernel never touches them
    if splits > 1:
        part_o = torch.empty(batch, n_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, n_heads, splits, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(batch, kv_heads, splits)](
        out, part_o, part_lse, q, k_cache, v_cache, seq_lens, block_table, scale * LOG2E, window or 0,
        (softcap or 1.0) * LOG2E, num_blocks,
        block_size,
        block_table.shape[1], group, head_dim, plan.tokens_per_split, splits, q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        BLOCK_M=max(MIN_DOT_ROWS, next_power_of_2(group)), BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        SPLIT=splits > 1, DOT_PRECISION=dot_precision(q.dtype), SOFTCAP=softcap is not None, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    if splits > 1:
        _combine_kernel[(batch, n_heads)](out, part_o, part_lse, splits, head_dim, out.stride(0), out.stride(1),
                                          BLOCK_S=next_power_of_2(splits), BLOCK_D=block_d)


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                               block_table: torch.Tensor, *, scale: float | None = None,
                               window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """The reference: per sequence, its K and V gathered by paged.gather_kv (the last `window` of them with a
    window), softmax(q K^T * scale) V in float32 (scores soft-capped with softcap), rounded once to q's dtype."""
    _, n_heads, head_dim = q.shape
    group = n_heads // k_cache.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    pairs = zip(gather_kv(k_cache, block_table, seq_lens), gather_kv(v_cache, block_table, seq_lens), strict=True)
    for b, (k, v) in enumerate(pairs):
        if window is not None:
            k, v = k[-window:], v[-window:]
        k = k.float().repeat_interleave(group, dim=1)  # [seq_len, n_heads, head_dim]
        v = v.float().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        p = torch.softmax(s if softcap is None else torch.tanh(s / softcap) * softcap, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", p, v).to(q.dtype)
    return out
