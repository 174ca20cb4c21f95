"""realm.kernels.paged_attention (decode attention over a paged KV cache) against its reference and against torch's
scaled_dot_product_attention, on the `device` fixture (Triton's interpreter on CPU, the same tests on CUDA).

Tolerances: the output is a softmax-weighted sum, so errors are measured against magnitude = P @ |V| (the scale of its
rounding error), with the dtype's TOLERANCES rtol, and against the reference's float32 result before its rounding to
q's dtype. float16/bfloat16 round P to the dtype for the tensor-core P @ V product and round the output: at most
u * magnitude + u * |out| <= 2u * magnitude (u = 2^-11 for float16: 9.8e-4 < rtol 1e-3; 2^-8 for bfloat16). Against
the *rounded* reference a third rounding enters (3u = 1.5e-3 worst case; measured 0.93e-3 for float16), hence the
unrounded one. float32 measured: |error| <= 1.7e-6 * magnitude, inside atol + rtol * magnitude through atol = 1e-5.
"""

import pytest
import torch
from tolerances import assert_close, poison

from realm.kernels import paged_attention as pa
from realm.kernels.paged import gather_kv
from realm.kernels.paged_attention import (
    PagedDecodeConfig,
    PagedDecodePlan,
    paged_decode_attention,
    paged_decode_attention_ref,
    plan_decode,
)
from realm.kernels.store_kv import store_kv

LENS = [1, 37, 129, 64, 100]  # ragged: length 1, lengths off and on block boundaries, unsorted
SMALL_TILES = PagedDecodeConfig(block_n=16)  # several tiles per split at interpreter-sized lengths


def _skip_bf16_on_cpu(dtype, device):
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton's interpreter computes bfloat16 tl.dot wrongly; the kernel always uses tl.dot")


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def _paged(lens, block_size, kv_heads, head_dim, dtype, device, seed=0, spare_blocks=3):
    """k_cache, v_cache with random contents and a block table giving each sequence a shuffled (non-monotonic,
    interleaved) set of blocks; unused table columns hold 0."""
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + spare_blocks
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(lens), max(needed) + 1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(needed):
        table[b, :n] = ids[used : used + n]
        used += n
    # Seeds apart from the queries' (a query equal to a key would dominate its softmax).
    k_cache = _randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device, seed=1000 + 2 * seed)
    v_cache = _randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device, seed=1001 + 2 * seed)
    return k_cache, v_cache, torch.tensor(lens, dtype=torch.int32, device=device), table.to(device)


def _query(batch, n_heads, head_dim, dtype, device, seed=10):
    # Scores of standard deviation ~3: peaked but not one-hot softmax rows.
    return _randn(batch, n_heads, head_dim, dtype=dtype, device=device, seed=seed, scale=3.0)


def _magnitude(q, k_cache, v_cache, seq_lens, block_table, scale=None):
    """P @ |V| per sequence and head: the scale of the output's rounding error."""
    return paged_decode_attention_ref(q.double(), k_cache.double(), v_cache.double().abs(), seq_lens, block_table,
                                      scale=scale)


def _exact(q, k_cache, v_cache, seq_lens, block_table, scale=None):
    """The reference computed in float32 and not rounded to q's dtype (see the module docstring)."""
    return paged_decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), seq_lens, block_table, scale=scale)


def _check(q, k_cache, v_cache, seq_lens, block_table, what="", scale=None, **kwargs):
    out = poison(torch.empty(q.shape, dtype=q.dtype, device=q.device))
    y = paged_decode_attention(q, k_cache, v_cache, seq_lens, block_table, scale=scale, out=out, **kwargs)
    assert y.data_ptr() == out.data_ptr()
    expected = _exact(q, k_cache, v_cache, seq_lens, block_table, scale)
    magnitude = _magnitude(q, k_cache, v_cache, seq_lens, block_table, scale)
    assert_close(y, expected, magnitude=magnitude, what=what)
    return y


# ---- against the reference -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (6, 2), (16, 2)], ids=["mha", "gqa3", "gqa8"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_matches_reference(num_splits, n_heads, n_kv_heads, dtype, device):
    _skip_bf16_on_cpu(dtype, device)
    k_cache, v_cache, seq_lens, table = _paged(LENS, 16, n_kv_heads, 64, dtype, device)
    q = _query(len(LENS), n_heads, 64, dtype, device)
    _check(q, k_cache, v_cache, seq_lens, table, num_splits=num_splits, config=SMALL_TILES,
           what=f"{n_heads}/{n_kv_heads} heads {dtype} splits={num_splits}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [16, 5])  # a power of two and not
@pytest.mark.parametrize("head_dim", [64, 80, 128])  # 80: padded to a 128-wide tile
def test_block_sizes_and_head_dims(head_dim, block_size, dtype, device):
    _skip_bf16_on_cpu(dtype, device)
    k_cache, v_cache, seq_lens, table = _paged([100, 1, 23], block_size, 2, head_dim, dtype, device, seed=3)
    q = _query(3, 6, head_dim, dtype, device, seed=4)
    _check(q, k_cache, v_cache, seq_lens, table, num_splits=2, config=SMALL_TILES,
           what=f"block_size {block_size} head_dim {head_dim} {dtype}")


@pytest.mark.parametrize("num_splits", [8, 20])
def test_more_splits_than_a_sequence_has_tokens(num_splits, device):
    """Splits past a sequence's end hold no tokens (all of them for 20 splits of 16-token tiles over <= 200 tokens
    where only 13 tiles exist): they must contribute nothing, and never NaN."""
    k_cache, v_cache, seq_lens, table = _paged([1, 2, 200, 17], 16, 2, 64, torch.float32, device, seed=5)
    q = _query(4, 4, 64, torch.float32, device, seed=6)
    plan = plan_decode(4, 2, 200, device, num_splits=num_splits, config=SMALL_TILES)
    assert plan.num_splits == num_splits and plan.tokens_per_split == 16 * -(-13 // num_splits)
    y = _check(q, k_cache, v_cache, seq_lens, table, num_splits=num_splits, config=SMALL_TILES)
    assert not y.isnan().any()


def test_default_config_and_heuristic(device):
    """The launcher's own choices (64-token tiles, plan_decode's split count) on a long-enough context."""
    k_cache, v_cache, seq_lens, table = _paged([700, 3, 300], 16, 2, 64, torch.float16, device, seed=7)
    q = _query(3, 8, 64, torch.float16, device, seed=8)
    assert plan_decode(3, 2, 700, device).num_splits == 2  # >= 256 tokens per split
    _check(q, k_cache, v_cache, seq_lens, table)
    _check(q, k_cache, v_cache, seq_lens, table, max_seq_len=700)


def test_strided_q_and_custom_scale(device):
    """q as a view into a fused [batch, (n_heads + 2 * n_kv_heads) * head_dim] qkv output."""
    batch, n_heads, kv_heads, head_dim = 5, 6, 2, 64
    k_cache, v_cache, seq_lens, table = _paged(LENS, 16, kv_heads, head_dim, torch.float32, device, seed=9)
    qkv = _randn(batch, (n_heads + 2 * kv_heads) * head_dim, device=device, seed=11, scale=3.0)
    q = qkv[:, : n_heads * head_dim].view(batch, n_heads, head_dim)
    assert q.stride(0) == qkv.shape[1]
    for splits in (1, 2):
        _check(q, k_cache, v_cache, seq_lens, table, scale=0.05, num_splits=splits, config=SMALL_TILES)


def test_float32_equals_sdpa(device):
    """An independent reference: torch's scaled_dot_product_attention on the gathered K and V of each sequence."""
    n_heads, kv_heads, head_dim = 8, 2, 128
    k_cache, v_cache, seq_lens, table = _paged(LENS, 16, kv_heads, head_dim, torch.float32, device, seed=12)
    q = _query(len(LENS), n_heads, head_dim, torch.float32, device, seed=13)
    y = paged_decode_attention(q, k_cache, v_cache, seq_lens, table, num_splits=3, config=SMALL_TILES)
    ks, vs = gather_kv(k_cache, table, seq_lens), gather_kv(v_cache, table, seq_lens)
    magnitude = _magnitude(q, k_cache, v_cache, seq_lens, table)
    for b, (k, v) in enumerate(zip(ks, vs, strict=True)):
        k = k.transpose(0, 1).repeat_interleave(n_heads // kv_heads, dim=0)  # [n_heads, seq_len, head_dim]
        v = v.transpose(0, 1).repeat_interleave(n_heads // kv_heads, dim=0)
        expected = torch.nn.functional.scaled_dot_product_attention(q[b][:, None], k, v)[:, 0]
        assert_close(y[b], expected, magnitude=magnitude[b], what=f"sequence {b}")


def test_a_decode_step_after_store_kv(device):
    """The runtime's order: store the new token's K/V at its slot (position seq_len - 1), then attend over all."""
    lens, block_size, kv_heads, head_dim = [1, 40, 17], 16, 2, 64
    k_cache, v_cache, seq_lens, table = _paged(lens, block_size, kv_heads, head_dim, torch.float16, device, seed=14)
    pos = seq_lens.long() - 1
    slots = (table.long().gather(1, (pos // block_size)[:, None])[:, 0] * block_size + pos % block_size).int()
    k_new = _randn(3, kv_heads, head_dim, dtype=torch.float16, device=device, seed=15)
    v_new = _randn(3, kv_heads, head_dim, dtype=torch.float16, device=device, seed=16)
    store_kv(k_new, v_new, k_cache, v_cache, slots)
    for b, n in enumerate(lens):
        assert torch.equal(gather_kv(k_cache, table, seq_lens)[b][n - 1], k_new[b])
    q = _query(3, 4, head_dim, torch.float16, device, seed=17)
    y = _check(q, k_cache, v_cache, seq_lens, table, num_splits=2, config=SMALL_TILES)
    # A one-token sequence attends only to its new token: out = v_new exactly.
    assert torch.equal(y[0], v_new[0].repeat_interleave(2, dim=0))


def test_empty_batch(device):
    k_cache, v_cache, _, _ = _paged([4], 16, 2, 64, torch.float32, device)
    q = torch.empty(0, 4, 64, device=device)
    none = torch.empty(0, dtype=torch.int32, device=device)
    y = paged_decode_attention(q, k_cache, v_cache, none, none.view(0, 1))
    assert y.shape == (0, 4, 64)


# ---- the split heuristic -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,kv_heads,max_len,splits,tokens", [
    (1, 8, 8192, 32, 256),  # one long sequence: 8 programs -> split to 2 per SM, capped at 32
    (32, 8, 8192, 2, 4096),  # 256 programs: just short of 2 per SM -> 2 splits
    (64, 8, 8192, 1, 8192),  # 512 programs fill the GPU: no split
    (1, 8, 300, 1, 320),  # too short for two splits of >= 256 tokens
    (1, 2, 1000, 3, 384),  # 3 splits of 256 tokens rounded up to whole 64-token tiles
    (4, 4, 2048, 8, 256),  # 17 wanted, limited by 2048 / 256
    (1, 32, 100000, 9, 11136),  # 32 programs -> 9 splits
])
def test_plan_decode_heuristic(batch, kv_heads, max_len, splits, tokens):
    plan = plan_decode(batch, kv_heads, max_len, "cpu")
    assert plan == PagedDecodePlan(splits, tokens, PagedDecodeConfig(), "heuristic")
    assert (plan.num_splits - 1) * plan.tokens_per_split < max_len <= plan.num_splits * plan.tokens_per_split


def test_plan_decode_forced_and_configured():
    assert plan_decode(2, 2, 100, "cpu", num_splits=5) == PagedDecodePlan(5, 64, PagedDecodeConfig(), "given")
    cfg = PagedDecodeConfig(block_n=32, num_warps=8, num_stages=3)
    assert plan_decode(1, 1, 100, "cpu", num_splits=2, config=cfg) == PagedDecodePlan(2, 64, cfg, "given")
    assert plan_decode(1, 1, 8192, "cpu", config=cfg).tokens_per_split == 256


def test_plan_decode_rejects_bad_arguments():
    cases = [
        (dict(num_splits=0), "num_splits must be an int >= 1"),
        (dict(max_seq_len=2.5), "max_seq_len must be an int >= 1"),
        (dict(num_splits=2.0), "num_splits must be an int >= 1"),
        (dict(max_seq_len=0), "max_seq_len must be an int >= 1"),
        (dict(batch=0), "batch must be an int >= 1"),
        (dict(n_kv_heads=True), "n_kv_heads must be an int >= 1"),
        (dict(config=object()), "config must be a PagedDecodeConfig"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            plan_decode(**(dict(batch=1, n_kv_heads=2, max_seq_len=10, device="cpu") | change))
    for kwargs, message in [(dict(block_n=8), "block_n must be >= 16"), (dict(block_n=48), "block_n must be a power"),
                            (dict(num_warps=3), "num_warps must be a power"), (dict(num_stages=0), "num_stages")]:
        with pytest.raises(ValueError, match=message):
            PagedDecodeConfig(**kwargs)


# ---- what CUDA does with unchecked index contents ------------------------------------------------------------------

@pytest.mark.parametrize("num_splits", [1, 3])
def test_bad_index_contents_give_nan_rows_only(num_splits, device):
    """On CUDA the launcher does not look at lengths and block ids: a sequence with an out-of-range block id, a length
    beyond its table row, or a length of 0 gets NaN rows; the others are unaffected and nothing is read out of
    bounds. (`_launch` skips the CPU checks to show this here.)"""
    k_cache, v_cache, seq_lens, table = _paged([40, 40, 40, 40, 0], 16, 2, 64, torch.float32, device, seed=18)
    q = _query(5, 4, 64, torch.float32, device, seed=19)
    expected = paged_decode_attention_ref(q[:1], k_cache, v_cache, seq_lens[:1], table[:1])
    magnitude = _magnitude(q[:1], k_cache, v_cache, seq_lens[:1], table[:1])
    table[1, 2] = k_cache.shape[0]  # one past the last block
    table[2, 0] = -5
    seq_lens[3] = table.shape[1] * 16 + 1  # longer than its table row
    out = poison(torch.empty_like(q))
    plan = plan_decode(5, 2, 40, device, num_splits=num_splits, config=SMALL_TILES)
    pa._launch(q, k_cache, v_cache, seq_lens, table, 64 ** -0.5, plan, out)
    assert out[1:].isnan().all()
    assert_close(out[:1], expected, magnitude=magnitude)


def test_a_too_small_max_seq_len_still_reads_every_token(device):
    """On CUDA max_seq_len is not checked: the last split takes the tokens past num_splits * tokens_per_split."""
    k_cache, v_cache, seq_lens, table = _paged([200, 20], 16, 2, 64, torch.float32, device, seed=20)
    q = _query(2, 2, 64, torch.float32, device, seed=21)
    out = poison(torch.empty_like(q))
    pa._launch(q, k_cache, v_cache, seq_lens, table, 0.125, plan_decode(2, 2, 50, device, num_splits=2,
                                                                          config=SMALL_TILES), out)
    assert_close(out, paged_decode_attention_ref(q, k_cache, v_cache, seq_lens, table),
                 magnitude=_magnitude(q, k_cache, v_cache, seq_lens, table))


# ---- clear errors --------------------------------------------------------------------------------------------------

def test_rejects_bad_inputs(device):
    k_cache, v_cache, seq_lens, table = _paged([5, 20], 16, 2, 64, torch.float32, device)
    q = _query(2, 4, 64, torch.float32, device)
    other = "meta" if device.type == "cpu" else "cpu"
    cases = [
        (dict(q=q.double()), "q must be float16, bfloat16 or float32"),
        (dict(q=q[0]), r"q must be 3-D \[batch, n_heads, head_dim\]"),
        (dict(q=q.transpose(1, 2)), "q must be contiguous along head_dim"),
        (dict(q=q.half()), "the KV cache is torch.float32 but q is torch.float16"),
        (dict(q=q[..., :32]), "q has head_dim 32 but the KV cache has 64"),
        (dict(q=q[:, :3]), "q has 3 heads, not a multiple of the KV cache's 2 heads"),
        (dict(k_cache=k_cache[0]), r"k_cache must be \[num_blocks, block_size, kv_heads, head_dim\]"),
        (dict(v_cache=v_cache[:, :8].contiguous()), "k_cache .* and v_cache .* must match"),
        (dict(v_cache=v_cache.half()), "must match"),
        (dict(k_cache=k_cache.transpose(0, 1)), "k_cache must be contiguous"),
        (dict(seq_lens=seq_lens.long()), "seq_lens must be int32"),
        (dict(seq_lens=seq_lens[:1]), "block_table has 2 rows for 1 sequences"),
        (dict(seq_lens=seq_lens[:1], block_table=table[:1]), r"seq_lens must be \[2\]"),
        (dict(block_table=table[0]), "block_table must have 2 dimension"),
        (dict(block_table=table.t().contiguous().t()), "block_table must be contiguous"),
        (dict(seq_lens=seq_lens.to(other)), "seq_lens is on"),
        (dict(scale=0.0), "scale must be a positive finite float"),
        (dict(scale=float("nan")), "scale must be a positive finite float"),
        (dict(num_splits=0), "num_splits must be an int >= 1"),
        (dict(max_seq_len=2.5), "max_seq_len must be an int >= 1"),
        (dict(config=PagedDecodePlan), "config must be a PagedDecodeConfig"),
        (dict(out=q.half()), r"out must be torch.float32 \[2, 4, 64\]"),
        (dict(out=torch.empty(2, 64, 4, device=device).transpose(1, 2)), "out must be contiguous"),
        (dict(k_cache=k_cache.to(other), v_cache=v_cache.to(other)), "tensors are on different devices"),
    ]
    if device.type == "cpu":  # index contents are checked on the host only for CPU tensors (see realm.kernels.paged)
        cases += [
            (dict(seq_lens=torch.tensor([5, 0], dtype=torch.int32)), r"seq_lens\[1\] = 0: every sequence must hold"),
            (dict(seq_lens=torch.tensor([5, 49], dtype=torch.int32)), "sequence 1 has length 49"),
            (dict(block_table=table.clone().index_fill_(1, torch.tensor([0]), 99)), r"block_table\[0, 0\] = 99"),
            (dict(max_seq_len=19), "max_seq_len = 19 is below the longest sequence"),
        ]
    for change, message in cases:
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens, block_table=table) | change
        with pytest.raises(ValueError, match=message):
            paged_decode_attention(**args)


# ---- model sizes ---------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_long_contexts(batch, dtype, device):
    """Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128) at 8k context, ragged, the heuristic's
    splits (batch 1: 32 splits; batch 32: 2 on an H100)."""
    g = torch.Generator().manual_seed(22)
    lens = [8192, *torch.randint(1, 8193, (batch - 1,), generator=g).tolist()]
    k_cache, v_cache, seq_lens, table = _paged(lens, 16, 8, 128, dtype, device, seed=23)
    q = _query(batch, 32, 128, dtype, device, seed=24)
    _check(q, k_cache, v_cache, seq_lens, table, max_seq_len=8192, what=f"batch {batch} 8k {dtype}")


@pytest.mark.gpu
def test_plan_decode_counts_this_gpus_sms(device):
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    assert plan_decode(1, sms, 1 << 20, device).num_splits == 2  # sms programs per split: 2 splits fill 2 per SM
    assert plan_decode(1, 2 * sms, 1 << 20, device).num_splits == 1
