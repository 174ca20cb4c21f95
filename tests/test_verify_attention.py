"""realm.kernels.verify_attention (k + 1 causal queries per sequence over a paged KV cache) against its reference,
against flash_attention_paged and paged_decode_attention (the kernels it stands beside), and realm.kernels.attention's
step layout that routes chunks of 2 .. MAX_VERIFY_QUERIES queries to it; on the `device` fixture (Triton's
interpreter on CPU, the same tests on CUDA).

Tolerances as tests/test_paged_attention.py: errors are measured against magnitude = P @ |V| (the scale of the
output's rounding error) and against the reference computed in float32 and not rounded to q's dtype; the 16-bit
kernel rounds P and the output, 2u * magnitude at most (float16: 9.8e-4 < rtol 1e-3; measured 5.5e-4 on the sweep).
float32 measured |error| <= 2.6e-6 * magnitude (exponents of scores up to ~30 rounded in kernel and reference alike,
as test_flash_attention explains), inside TOLERANCES' atol + rtol * magnitude through atol = 1e-5 (magnitudes ~1).
"""

import pytest
import torch
from tolerances import assert_close, poison

from realm.kernels import verify_attention as va
from realm.kernels.attention import AttentionMetadata, paged_attention, paged_attention_ref
from realm.kernels.flash_attention import flash_attention_paged
from realm.kernels.paged_attention import PagedDecodeConfig, paged_decode_attention
from realm.kernels.verify_attention import (
    MAX_VERIFY_QUERIES,
    PagedVerifyPlan,
    paged_verify_attention,
    paged_verify_attention_ref,
    plan_verify,
)

# Chunks of 2 (the whole sequence: nothing cached), 1 (a decode), 16 (MAX_VERIFY_QUERIES, after 84 cached tokens) and
# 5; lengths off and on block boundaries. With 16-token tiles and 3 splits (48 tokens each) the 16-query chunk's last
# split [96, 100) holds no key its first 12 queries see, and the 5-query chunk's last two splits are empty.
LENS_Q, LENS_K = [2, 1, 16, 5], [2, 37, 100, 21]
SMALL_TILES = PagedDecodeConfig(block_n=16)  # several tiles per split at interpreter-sized lengths
HEADS = [(2, 2), (9, 3), (4, 1), (8, 1)]  # groups 1, 3 (SmolLM2: 9 / 3 heads of 64), 4, 8 (few heads: the interpreter)
HEAD_IDS = ["mha", "gqa3", "gqa4", "gqa8"]


def _skip_bf16_on_cpu(dtype, device):
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton's interpreter computes bfloat16 tl.dot wrongly; the kernel always uses tl.dot")


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def _cu(lens, device):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _paged(lens_k, block_size, kv_heads, head_dim, dtype, device, seed=0, spare_blocks=3):
    """k_cache, v_cache with random contents and a block table giving each sequence a shuffled (non-monotonic,
    interleaved) set of blocks; unused table columns hold 0."""
    needed = [-(-n // block_size) for n in lens_k]
    num_blocks = sum(needed) + spare_blocks
    ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    table = torch.zeros(len(lens_k), max(needed) + 1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(needed):
        table[b, :n] = ids[used : used + n]
        used += n
    # Seeds apart from the queries' (a query equal to a key would dominate its softmax).
    k_cache = _randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device, seed=1000 + 2 * seed)
    v_cache = _randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device, seed=1001 + 2 * seed)
    return k_cache, v_cache, torch.tensor(lens_k, dtype=torch.int32, device=device), table.to(device)


def _query(tokens, n_heads, head_dim, dtype, device, seed=10):
    # Scores of standard deviation ~3: peaked but not one-hot softmax rows.
    return _randn(tokens, n_heads, head_dim, dtype=dtype, device=device, seed=seed, scale=3.0)


def _expected(q, k_cache, v_cache, cu, seq_lens, table, scale=None):
    """(the reference in float32, not rounded to q's dtype; the error scale P @ |V|)."""
    exact = paged_verify_attention_ref(q.float(), k_cache.float(), v_cache.float(), cu, seq_lens, table, scale=scale)
    magnitude = paged_verify_attention_ref(q.double(), k_cache.double(), v_cache.double().abs(), cu, seq_lens, table,
                                           scale=scale)
    return exact, magnitude


def _check(q, k_cache, v_cache, cu, seq_lens, table, what="", scale=None, **kwargs):
    out = poison(torch.empty(q.shape, dtype=q.dtype, device=q.device))
    y = paged_verify_attention(q, k_cache, v_cache, cu, seq_lens, table, scale=scale, out=out, **kwargs)
    assert y.data_ptr() == out.data_ptr()
    expected, magnitude = _expected(q, k_cache, v_cache, cu, seq_lens, table, scale)
    assert_close(y, expected, magnitude=magnitude, what=what)
    return y


def _case(lens_q, lens_k, n_heads, n_kv_heads, head_dim, dtype, device, block_size=16, seed=0):
    k_cache, v_cache, seq_lens, table = _paged(lens_k, block_size, n_kv_heads, head_dim, dtype, device, seed=seed)
    q = _query(sum(lens_q), n_heads, head_dim, dtype, device, seed=seed + 10)
    return q, k_cache, v_cache, _cu(lens_q, device), seq_lens, table


# ---- against the reference -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_heads,n_kv_heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_matches_reference(num_splits, n_heads, n_kv_heads, dtype, device):
    """Chunks of 1, 2, 5 and 16 queries in one batch; float32 group 8 at 16 queries is 128 rows: two 64-row tiles."""
    _skip_bf16_on_cpu(dtype, device)
    args = _case(LENS_Q, LENS_K, n_heads, n_kv_heads, 64, dtype, device)
    y = _check(*args, num_splits=num_splits, config=SMALL_TILES,
               what=f"{n_heads}/{n_kv_heads} heads {dtype} splits={num_splits}")
    assert not y.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("block_size", [16, 1, 7])  # a power of two, one token per block, neither
@pytest.mark.parametrize("head_dim", [64, 96])  # 96: padded to a 128-wide tile
def test_block_sizes_and_head_dims(head_dim, block_size, dtype, device):
    args = _case([3, 16, 1], [40, 16, 9], 6, 2, head_dim, dtype, device, block_size=block_size, seed=3)
    _check(*args, num_splits=2, config=SMALL_TILES, what=f"block_size {block_size} head_dim {head_dim} {dtype}")


@pytest.mark.parametrize("dtype,num_splits", [(torch.float16, 1), (torch.float32, 2)], ids=["float16", "float32"])
def test_row_tiles(dtype, num_splits, device):
    """Group 16 (16 query heads on one KV head) at 16 queries: 256 rows, cut into 128-row (float16) or 64-row
    (float32) tiles that each read the keys again."""
    args = _case([16, 3], [30, 20], 16, 1, 64, dtype, device, seed=5)
    plan = plan_verify(2, 16, 1, 64, 16, 30, dtype, device, num_splits=num_splits, config=SMALL_TILES)
    assert (plan.block_m, plan.row_tiles) == ((128, 2) if dtype == torch.float16 else (64, 4))
    _check(*args, num_splits=num_splits, config=SMALL_TILES, what=f"group 16 {dtype}")


@pytest.mark.parametrize("num_splits", [8, 20])
def test_more_splits_than_a_sequence_has_tokens(num_splits, device):
    """Splits past a sequence's end (most of them here: at most 13 16-token tiles) contribute nothing, never NaN."""
    args = _case([2, 16, 4], [2, 200, 17], 2, 1, 64, torch.float32, device, seed=6)
    y = _check(*args, num_splits=num_splits, config=SMALL_TILES)
    assert not y.isnan().any()


def test_default_config_and_heuristic(device):
    """The launcher's own choices: default_config's tiles and plan_verify's split count on a long-enough context."""
    args = _case([16, 4, 2], [700, 5, 300], 4, 1, 64, torch.float16, device, seed=7)
    plan = plan_verify(3, 4, 1, 64, 16, 700, torch.float16, device)
    assert (plan.num_splits, plan.block_m, plan.row_tiles, plan.source) == (2, 64, 1, "heuristic")
    assert plan.config == va.default_config(64, 64, torch.float16) == PagedDecodeConfig(block_n=32, num_warps=8)
    _check(*args)
    _check(*args, max_seqlen_q=16, max_seq_len=700)


def test_strided_q_and_custom_scale(device):
    """q as a view into a fused [tokens, (n_heads + 2 * n_kv_heads) * head_dim] qkv output."""
    tokens, n_heads, kv_heads, head_dim = sum(LENS_Q), 4, 2, 64
    k_cache, v_cache, seq_lens, table = _paged(LENS_K, 16, kv_heads, head_dim, torch.float32, device, seed=9)
    qkv = _randn(tokens, (n_heads + 2 * kv_heads) * head_dim, device=device, seed=11, scale=3.0)
    q = qkv[:, : n_heads * head_dim].view(tokens, n_heads, head_dim)
    assert q.stride(0) == qkv.shape[1]
    for splits in (1, 2):
        _check(q, k_cache, v_cache, _cu(LENS_Q, device), seq_lens, table, scale=0.05, num_splits=splits,
               config=SMALL_TILES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_equals_flash_attention_paged(dtype, device):
    """The kernel these chunks went through before, on the same inputs (GQA 3, SmolLM2's attention shape)."""
    q, k_cache, v_cache, cu, seq_lens, table = _case(LENS_Q, LENS_K, 9, 3, 64, dtype, device, seed=12)
    y = paged_verify_attention(q, k_cache, v_cache, cu, seq_lens, table, num_splits=1, config=SMALL_TILES)
    flash = flash_attention_paged(q, k_cache, v_cache, cu, seq_lens, table)
    _, magnitude = _expected(q, k_cache, v_cache, cu, seq_lens, table)
    # Two roundings of each kernel's own (P to q's dtype, the output) on either side: twice the dtype's rtol
    # (float16 measured 9.3e-4 * magnitude, float32 5.7e-7).
    assert_close(y, flash, rtol=2 * (1e-3 if dtype == torch.float16 else 1.3e-6), magnitude=magnitude)


def test_one_query_chunks_equal_paged_decode(device):
    """Chunks of one query are decode: the same rows, the same tiles, the same online softmax."""
    lens = [1, 37, 80, 64]
    k_cache, v_cache, seq_lens, table = _paged(lens, 16, 2, 64, torch.float16, device, seed=13)
    q = _query(4, 4, 64, torch.float16, device, seed=14)
    y = paged_verify_attention(q, k_cache, v_cache, _cu([1] * 4, device), seq_lens, table, num_splits=3,
                               config=SMALL_TILES)
    decode = paged_decode_attention(q, k_cache, v_cache, seq_lens, table, num_splits=3, config=SMALL_TILES)
    assert_close(y, decode, magnitude=_expected(q, k_cache, v_cache, _cu([1] * 4, device), seq_lens, table)[1])


def test_empty_batches_and_chunks(device):
    k_cache, v_cache, _, table = _paged([4], 16, 2, 64, torch.float32, device)
    none = torch.empty(0, dtype=torch.int32, device=device)
    q = torch.empty(0, 4, 64, device=device)
    assert paged_verify_attention(q, k_cache, v_cache, _cu([], device), none, none.view(0, 1)).shape == (0, 4, 64)
    four = torch.tensor([4], dtype=torch.int32, device=device)
    assert paged_verify_attention(q, k_cache, v_cache, _cu([0], device), four, table).numel() == 0
    # A chunk of no queries between two others (its sequence's keys are not read).
    args = _case([3, 0, 2], [10, 4, 2], 4, 2, 64, torch.float32, device, seed=15)
    _check(*args, num_splits=2, config=SMALL_TILES)


# ---- the plan ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_heads,n_kv_heads,q_len,head_dim,dtype,block_m,row_tiles", [
    (9, 3, 1, 64, torch.float16, 16, 1),  # a decode: 3 rows padded to tl.dot's 16
    (9, 3, 5, 64, torch.float16, 16, 1),  # SmolLM2, k = 4: 15 rows
    (32, 8, 16, 128, torch.bfloat16, 64, 1),  # Llama-3-8B, k = 15: 64 rows
    (64, 8, 16, 128, torch.bfloat16, 64, 2),  # Llama-3-70B, k = 15: 128 rows > 64 at head_dim 128
    (64, 8, 16, 64, torch.float16, 128, 1),  # 128 rows fit at head_dim 64
    (64, 8, 16, 64, torch.float32, 64, 2),  # float32: half the tile
    (32, 1, 9, 128, torch.float16, 64, 5),  # multi-query: 288 rows
    (8, 1, 3, 256, torch.float16, 32, 1),  # head_dim 256: at most 32 rows
    (8, 1, 16, 256, torch.float16, 32, 4),
])
def test_plan_verify_tiles(n_heads, n_kv_heads, q_len, head_dim, dtype, block_m, row_tiles):
    plan = plan_verify(64, n_heads, n_kv_heads, head_dim, q_len, 100, dtype, "cpu")
    assert (plan.block_m, plan.row_tiles) == (block_m, row_tiles)
    assert plan.row_tiles * plan.block_m >= q_len * (n_heads // n_kv_heads)
    assert plan.config == va.default_config(block_m, max(16, head_dim), dtype)


def test_plan_verify_splits_count_every_program():
    """plan_decode's heuristic on batch x n_kv_heads x row_tiles programs: a 2-row-tile plan splits half as much."""
    one = plan_verify(1, 32, 8, 128, 8, 32768, torch.float16, "cpu")  # 32 rows: one tile, 8 programs per split
    two = plan_verify(1, 64, 8, 128, 16, 32768, torch.float16, "cpu")  # 128 rows: two tiles, 16 programs per split
    assert (one.num_splits, two.num_splits) == (32, 17)
    assert one.tokens_per_split == 1024 and one.source == "heuristic"
    assert plan_verify(200, 32, 8, 128, 8, 32768, torch.float16, "cpu").num_splits == 1  # the batch fills the GPU
    forced = plan_verify(2, 4, 2, 64, 4, 100, torch.float32, "cpu", num_splits=3, config=SMALL_TILES)
    assert forced == PagedVerifyPlan(3, 48, 16, 1, SMALL_TILES, "given")


def test_plan_verify_rejects_bad_arguments():
    good = dict(batch=1, n_heads=4, n_kv_heads=2, head_dim=64, max_seqlen_q=4, max_seq_len=10, dtype=torch.float16,
                device="cpu")
    cases = [
        (dict(max_seqlen_q=17), "max_seqlen_q = 17 is above MAX_VERIFY_QUERIES = 16"),
        (dict(max_seqlen_q=0), "max_seqlen_q must be an int >= 1"),
        (dict(n_heads=5), r"n_heads \(5\) must be a multiple of n_kv_heads \(2\)"),
        (dict(batch=0), "batch must be an int >= 1"),
        (dict(head_dim=2.0), "head_dim must be an int >= 1"),
        (dict(dtype=torch.float64), "dtype must be float16, bfloat16 or float32"),
        (dict(num_splits=0), "num_splits must be an int >= 1"),
        (dict(max_seq_len=0), "max_seq_len must be an int >= 1"),
        (dict(config=object()), "config must be a PagedDecodeConfig"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            plan_verify(**(good | change))


# ---- what CUDA does with unchecked index contents ------------------------------------------------------------------

@pytest.mark.parametrize("num_splits", [1, 3])
def test_bad_index_contents_give_nan_rows_only(num_splits, device):
    """On CUDA the launcher does not look at cu_seqlens_q, lengths and block ids: a chunk with an out-of-range block
    id, a length beyond its table row, fewer tokens than queries, or offsets past the tokens gets NaN rows; the
    others are unaffected and nothing is read out of bounds. (`_launch` skips the CPU checks to show this here.)"""
    lens_q, lens_k = [3, 3, 3, 3, 3], [24, 24, 24, 24, 2]
    q, k_cache, v_cache, cu, seq_lens, table = _case(lens_q, lens_k, 4, 2, 64, torch.float32, device, seed=18)
    expected, magnitude = _expected(q[:3], k_cache, v_cache, cu[:2], seq_lens[:1], table[:1])
    table[1, 1] = k_cache.shape[0]  # one past the last block
    seq_lens[2] = table.shape[1] * 16 + 1  # longer than its table row
    table[3, 0] = -5
    out = poison(torch.empty_like(q))
    plan = plan_verify(5, 4, 2, 64, 3, 24, q.dtype, device, num_splits=num_splits, config=SMALL_TILES)
    va._launch(q, k_cache, v_cache, cu, seq_lens, table, 64 ** -0.5, plan, out)
    assert out[3:].isnan().all()  # the last chunk: 2 tokens for 3 queries
    assert_close(out[:3], expected, magnitude=magnitude)

    bad_cu = cu.clone()
    bad_cu[-1] = 99  # the last chunk ends past the 15 tokens
    out = poison(torch.empty_like(q))
    seq_lens[4] = 24
    va._launch(q, k_cache, v_cache, bad_cu, seq_lens, table, 64 ** -0.5, plan, out)
    assert out[12:].isnan().all()
    assert_close(out[:3], expected, magnitude=magnitude)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_a_chunk_longer_than_the_tiles_gets_nan(num_splits, device):
    """On CUDA max_seqlen_q is not checked against cu_seqlens_q: a longer chunk comes out NaN, the rows its tiles
    hold and those past them (the output is zero-filled here, not poisoned, to see that they are written)."""
    q, k_cache, v_cache, cu, seq_lens, table = _case([2, 9], [20, 20], 4, 2, 64, torch.float32, device, seed=19)
    out = torch.zeros_like(q)
    plan = plan_verify(2, 4, 2, 64, 2, 20, q.dtype, device, num_splits=num_splits, config=SMALL_TILES)
    assert plan.block_m * plan.row_tiles == 16  # 8 queries of group 2
    va._launch(q, k_cache, v_cache, cu, seq_lens, table, 0.125, plan, out)
    assert out[2:].isnan().all()
    expected, magnitude = _expected(q[:2], k_cache, v_cache, cu[:2], seq_lens[:1], table[:1], 0.125)
    assert_close(out[:2], expected, magnitude=magnitude)


# ---- clear errors --------------------------------------------------------------------------------------------------

def test_rejects_bad_inputs(device):
    q, k_cache, v_cache, cu, seq_lens, table = _case([2, 5], [5, 20], 4, 2, 64, torch.float32, device)
    other = "meta" if device.type == "cpu" else "cpu"
    i32 = lambda *xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    cases = [
        (dict(q=q.double()), "q must be float16, bfloat16 or float32"),
        (dict(q=q[0]), r"q must be 3-D \[tokens, n_heads, head_dim\]"),
        (dict(q=q.transpose(1, 2)), "q must be contiguous along head_dim"),
        (dict(q=q.half()), "the KV cache is torch.float32 but q is torch.float16"),
        (dict(q=q[..., :32]), "q has head_dim 32 but the KV cache has 64"),
        (dict(q=q[:, :3]), "q has 3 heads, not a multiple of the KV cache's 2 heads"),
        (dict(k_cache=k_cache[0]), r"k_cache must be \[num_blocks, block_size, kv_heads, head_dim\]"),
        (dict(v_cache=v_cache.half()), "must match"),
        (dict(cu_seqlens_q=cu.long()), "cu_seqlens_q must be int32"),
        (dict(seq_lens=seq_lens.long()), "seq_lens must be int32"),
        (dict(seq_lens=seq_lens[:1], block_table=table[:1]), "cu_seqlens_q has 2 chunks but seq_lens has 1 lengths"),
        (dict(block_table=table[0]), "block_table must have 2 dimension"),
        (dict(seq_lens=seq_lens.to(other)), "seq_lens is on"),
        (dict(scale=0.0), "scale must be a positive finite float"),
        (dict(max_seqlen_q=17), "max_seqlen_q = 17 is above MAX_VERIFY_QUERIES = 16"),
        (dict(max_seqlen_q=2.5), "max_seqlen_q must be a non-negative int"),
        (dict(max_seq_len=0), "max_seq_len must be an int >= 1"),
        (dict(num_splits=0), "num_splits must be an int >= 1"),
        (dict(config=PagedVerifyPlan), "config must be a PagedDecodeConfig"),
        (dict(out=q.half()), r"out must be torch.float32 \[7, 4, 64\]"),
        (dict(k_cache=k_cache.to(other), v_cache=v_cache.to(other)), "tensors are on different devices"),
    ]
    if device.type == "cpu":  # index contents are checked on the host only for CPU tensors (see realm.kernels.paged)
        long_q = _query(2 + MAX_VERIFY_QUERIES + 1, 4, 64, torch.float32, device)
        bad_id = table.clone()
        bad_id[1, 1] = 99
        cases += [
            (dict(q=long_q, cu_seqlens_q=i32(0, 2, 19), seq_lens=i32(5, 20)),
             "chunk 1 has 17 queries, above MAX_VERIFY_QUERIES = 16"),
            (dict(block_table=bad_id), r"block_table\[1, 1\] = 99 is not a block id"),
            (dict(seq_lens=i32(5, 4)), "sequence 1 has len_q 5 > len_k 4"),
            (dict(seq_lens=i32(5, 49)), "sequence 1 has length 49"),
            (dict(cu_seqlens_q=i32(0, 2, 6)), "cu_seqlens_q must end at 7"),
            (dict(cu_seqlens_q=i32(1, 2, 7)), "cu_seqlens_q must start at 0"),
            (dict(max_seqlen_q=4), r"max_seqlen_q = 4 is less than the longest chunk \(5\)"),
            (dict(max_seq_len=19), "max_seq_len = 19 is below the longest sequence"),
        ]
    for change, message in cases:
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu, seq_lens=seq_lens, block_table=table)
        with pytest.raises(ValueError, match=message):
            paged_verify_attention(**(args | change))


# ---- a step's attention: decodes, verify chunks and the rest -------------------------------------------------------

def _meta(query_lens, context_lens, block_size=16, device="cpu"):
    needed = [-(-n // block_size) for n in context_lens]
    ids = torch.randperm(sum(needed) + 2, generator=torch.Generator().manual_seed(0))
    table = torch.zeros(len(needed), max(needed), dtype=torch.int32)
    used = 0
    for b, n in enumerate(needed):
        table[b, :n] = ids[used : used + n]
        used += n
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    meta = AttentionMetadata.build(query_lens, context_lens, _cu(query_lens, device), lens, table.to(device))
    return meta, sum(needed) + 2


def _offsets(t):
    return None if t is None else t.tolist()


@pytest.mark.parametrize("query_lens,context_lens,num_decode,num_verify,verify_cu,flash_cu", [
    ((1, 1, 3, 16, 2, 40, 4), (5, 30, 10, 50, 2, 60, 9), 2, 3, [0, 3, 19, 21], [0, 40, 44]),
    ((1, 1), (5, 9), 2, 0, None, None),  # decodes only
    ((4, 2), (10, 9), 0, 2, [0, 4, 6], None),  # verify chunks only
    ((1, 17, 3), (5, 30, 9), 1, 0, None, [0, 17, 20]),  # 17 > MAX_VERIFY_QUERIES: flash, and the 3 after it too
    ((16, 1, 2), (16, 9, 9), 0, 1, [0, 16], [0, 1, 3]),  # a decode after the verify run goes to flash
    ((3, 5), (3, 5), 0, 2, None, None),  # fresh prompts: flash_attention on the step's own K/V, as before
])
def test_metadata_routes_chunks(query_lens, context_lens, num_decode, num_verify, verify_cu, flash_cu):
    meta, _ = _meta(query_lens, context_lens)
    assert (meta.num_decode, meta.num_verify) == (num_decode, num_verify)
    assert (_offsets(meta.verify_cu_seqlens), _offsets(meta.flash_cu_seqlens)) == (verify_cu, flash_cu)
    assert meta.fresh == (query_lens == context_lens)
    if not meta.fresh and num_decode < len(query_lens):  # unchanged: every chunk after the decodes
        first = sum(query_lens[:num_decode])
        assert _offsets(meta.chunk_cu_seqlens) == [c - first for c in meta.cu_seqlens_q.tolist()[num_decode:]]
    assert meta.verify_tokens == sum(query_lens[num_decode : num_decode + num_verify])
    assert meta.chunk_max_seqlen_q == max(query_lens[num_decode + num_verify :], default=0)


def test_verify_plan_is_computed_once_per_step():
    meta, _ = _meta((1, 5, 16), (20, 40, 300))
    plan = meta.verify_plan(9, 3, 64, torch.float16, torch.device("cpu"))
    assert plan is meta.verify_plan(9, 3, 64, torch.float16, torch.device("cpu"))
    assert plan == plan_verify(2, 9, 3, 64, 16, 300, torch.float16, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_paged_attention_mixes_decodes_verify_chunks_and_prefill(dtype, device):
    """One step with two decodes, three verify chunks (3, 16 and 2 queries, the last with nothing cached) and two
    chunks for flash_attention_paged (40 queries, then 4 after it): the three launches together equal the torch
    reference of realm.kernels.attention."""
    query_lens, context_lens = (1, 1, 3, 16, 2, 40, 4), (5, 30, 10, 50, 2, 60, 9)
    meta, num_blocks = _meta(query_lens, context_lens, device=device)
    assert (meta.num_decode, meta.num_verify) == (2, 3)
    n_heads, n_kv_heads, head_dim = 9, 3, 64  # SmolLM2's attention
    k_cache = _randn(num_blocks, 16, n_kv_heads, head_dim, dtype=dtype, device=device, seed=30)
    v_cache = _randn(num_blocks, 16, n_kv_heads, head_dim, dtype=dtype, device=device, seed=31)
    q = _query(sum(query_lens), n_heads, head_dim, dtype, device, seed=32)
    # This step's K and V: the last query_len tokens of each sequence, as stored in the cache.
    slots = torch.cat([s[c - n :] for s, n, c in zip(meta.key_slots(16), query_lens, context_lens, strict=True)])
    k, v = k_cache.view(-1, n_kv_heads, head_dim)[slots], v_cache.view(-1, n_kv_heads, head_dim)[slots]
    y = paged_attention(q, k, v, k_cache, v_cache, meta, 0.125)
    f32 = [t.float() for t in (q, k, v, k_cache, v_cache)]
    expected = paged_attention_ref(*f32, meta, 0.125)
    magnitude = paged_attention_ref(*f32[:4], f32[4].abs(), meta, 0.125)
    assert_close(y, expected, magnitude=magnitude, what=f"step {dtype}")
    rows = slice(2, 2 + meta.verify_tokens)  # the verify rows: the kernel's own reference too
    cu = meta.verify_cu_seqlens
    ref = paged_verify_attention_ref(q[rows].float(), k_cache.float(), v_cache.float(), cu, meta.seq_lens[2:5],
                                     meta.block_tables[2:5], scale=0.125)
    assert_close(y[rows], ref, magnitude=magnitude[rows])


# ---- model sizes ---------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_long_contexts(batch, dtype, device):
    """Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128) at up to 8k context, ragged chunks of 1 .. 16
    queries, the heuristic's splits and row tiles (16 queries x group 4 = 64 rows: one tile in 16-bit, two in
    float32)."""
    g = torch.Generator().manual_seed(22)
    lens_q = [16, *torch.randint(1, MAX_VERIFY_QUERIES + 1, (batch - 1,), generator=g).tolist()]
    lens_k = [8192, *torch.randint(16, 8193, (batch - 1,), generator=g).tolist()]
    args = _case(lens_q, lens_k, 32, 8, 128, dtype, device, seed=23)
    _check(*args, max_seqlen_q=16, max_seq_len=8192, what=f"batch {batch} 8k {dtype}")
