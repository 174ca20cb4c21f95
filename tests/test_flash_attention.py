"""realm.kernels.flash_attention (contiguous and paged K/V) against its torch references, and the float32 kernel
against torch's scaled_dot_product_attention, on the `device` fixture (Triton's interpreter on CPU).

Error scale: the output is a weighted sum sum_j p_j v_j, so its rounding error is bounded by a few roundings of
P @ |v| (`_magnitude`), not of |out| (which may cancel to ~0); assert_close takes that as `magnitude`.

16-bit inputs: the kernel rounds twice, P to the input dtype for the tensor-core P @ V product (as every
flash-attention kernel does) and the output, each at most half an ulp of the magnitude, so it is within 2^-(mantissa)
of the exact attention of its inputs: within the dtype's TOLERANCES rtol (float16 1e-3 >= 2^-10 = 9.77e-4). The
expected values are therefore the references run on float32 copies of the inputs (exact to float32 rounding); the
references in the inputs' dtype would add a third rounding (measured: float16 kernel vs float16 reference differs by
up to 9.7e-4 * magnitude, too close to 1e-3 for a stable test).
"""

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close, poison

from realm.kernels.flash_attention import (
    AttentionConfig,
    _launch,
    default_config,
    flash_attention,
    flash_attention_paged,
    flash_attention_paged_ref,
    flash_attention_ref,
)

DTYPES = [torch.float16, torch.float32, torch.bfloat16]
# float32: softmax rounds each exponent to eps * |s| absolute, a relative error of ~eps * |s| in each probability, in
# the kernel and the reference alike; with these tests' peaked scores (|s| up to ~30) that is above TOLERANCES' 1.3e-6
# for the reference itself. Measured on the sweep against a float64 computation (x magnitude): reference 2.6e-6,
# kernel 1.95e-6, kernel vs reference 1.06e-6; torch SDPA vs kernel 8.3e-7. 4e-6 leaves room for the GPU's ex2.approx
# (2 ulp) and another summation order; a real error (a wrong mask, a missed rescale) is > 1e-3.
RTOL = {torch.float32: 4e-6}
LENS = [1, 17, 0, 64, 100]  # size 1, odd, an empty sequence, a power of two, not a multiple of any tile
SMALL_TILES = [AttentionConfig(block_m=16, block_n=32), AttentionConfig(block_m=32, block_n=16)]  # many key blocks


def _skip_bf16_on_cpu(dtype, device):
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton's interpreter computes bfloat16 tl.dot wrongly; bfloat16 runs on CUDA")


def _randn(*shape: int, dtype=torch.float32, device="cpu", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _cu(lens: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _inputs(lens_q, lens_k, n_heads, n_kv_heads, head_dim, dtype, device, seed=0):
    """q [sum(lens_q), n_heads, head_dim], k, v [sum(lens_k), n_kv_heads, head_dim]; scores of a few units, as in a
    trained model (q scaled by 2 so softmax rows are peaked, not uniform)."""
    q = (2 * _randn(sum(lens_q), n_heads, head_dim, seed=seed)).to(device=device, dtype=dtype)
    k = _randn(sum(lens_k), n_kv_heads, head_dim, dtype=dtype, device=device, seed=seed + 1)
    v = _randn(sum(lens_k), n_kv_heads, head_dim, dtype=dtype, device=device, seed=seed + 2)
    return q, k, v, _cu(lens_q, device), _cu(lens_k, device)


def _expected(q, k, v, cu_q, cu_k, **kw):
    """(exact attention of the inputs, to float32 rounding; the error scale P @ |v|), both float32."""
    qf, kf, vf = q.float(), k.float(), v.float()
    return flash_attention_ref(qf, kf, vf, cu_q, cu_k, **kw), flash_attention_ref(qf, kf, vf.abs(), cu_q, cu_k, **kw)


def _check(out, q, k, v, cu_q, cu_k, what="", **kw):
    expected, magnitude = _expected(q, k, v, cu_q, cu_k, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, expected, dtype=q.dtype, rtol=RTOL.get(q.dtype), magnitude=magnitude, what=what)


def _to_paged(k, v, lens_k, block_size, device, seed=0):
    """k, v packed [total_k, kv_heads, D] -> caches [num_blocks, block_size, kv_heads, D] whose sequences sit in
    shuffled, non-monotonic blocks among spare ones; every cache slot no sequence owns is NaN and table columns past
    a sequence's blocks are -1, so a kernel reading anything it should not shows NaN."""
    n_blocks = [-(-n // block_size) for n in lens_k]
    num_blocks = sum(n_blocks) + 3
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    table = torch.full((len(lens_k), max(n_blocks) + 1), -1, dtype=torch.int32)
    slots = []
    for b, nb in enumerate(n_blocks):
        table[b, :nb] = torch.tensor(order[:nb])
        order = order[nb:]
        t = torch.arange(lens_k[b])
        slots.append(table[b, t // block_size].long() * block_size + t % block_size)
    k_cache = torch.full((num_blocks, block_size, *k.shape[1:]), float("nan"), dtype=k.dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = torch.cat(slots)
    k_cache.view(-1, *k.shape[1:])[slots] = k.cpu()
    v_cache.view(-1, *k.shape[1:])[slots] = v.cpu()
    seq_lens = torch.tensor(lens_k, dtype=torch.int32)
    return k_cache.to(device), v_cache.to(device), seq_lens.to(device), table.to(device)


# ---- correctness -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("head_dim,n_heads,n_kv_heads", [(64, 2, 2), (128, 6, 2), (64, 8, 1)])
def test_matches_reference(head_dim, n_heads, n_kv_heads, causal, dtype, device):
    """Ragged batch (lengths 1, 17, 0, 64, 100) with GQA ratios 1, 3, 8, at the default tiles."""
    _skip_bf16_on_cpu(dtype, device)
    q, k, v, cu_q, cu_k = _inputs(LENS, LENS, n_heads, n_kv_heads, head_dim, dtype, device)
    out = poison(torch.empty_like(q))
    assert flash_attention(q, k, v, cu_q, cu_k, causal=causal, out=out) is out
    _check(out, q, k, v, cu_q, cu_k, causal=causal, what=f"{dtype} d={head_dim} {n_heads}/{n_kv_heads}")
    ref = flash_attention_ref(q, k, v, cu_q, cu_k, causal=causal)
    assert ref.dtype == dtype and ref.shape == q.shape


@pytest.mark.parametrize("config", [None, *SMALL_TILES], ids=["default", "16x32", "32x16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_chunked_prefill(dtype, causal, config, device):
    """Queries after a cached prefix (len_q < len_k): one query, a few (speculative verify), a chunk, none, a whole
    sequence; small tiles put the diagonal in several key blocks and queries in several programs."""
    lens_q, lens_k = [1, 3, 0, 17, 40], [50, 3, 9, 100, 40]
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, 6, 2, 64, dtype, device, seed=1)
    out = flash_attention(q, k, v, cu_q, cu_k, causal=causal, max_seqlen_q=40, config=config,
                          out=poison(torch.empty_like(q)))
    _check(out, q, k, v, cu_q, cu_k, causal=causal, what=f"{config}")


@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_paged_matches_contiguous_and_reference(causal, block_size, device):
    lens_q, lens_k = [1, 17, 0, 30], [20, 17, 6, 100]
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, 6, 2, 64, torch.float16, device, seed=2)
    k_cache, v_cache, seq_lens, table = _to_paged(k, v, lens_k, block_size, device)
    out = poison(torch.empty_like(q))
    cfg = AttentionConfig(block_m=16, block_n=16)
    assert flash_attention_paged(q, k_cache, v_cache, cu_q, seq_lens, table, causal=causal, out=out,
                                 config=cfg) is out
    contiguous = flash_attention(q, k, v, cu_q, cu_k, causal=causal, config=cfg)
    assert_close(out, contiguous, what="paged vs contiguous")  # same keys, same order: a rounding at most
    _check(out, q, k, v, cu_q, cu_k, causal=causal, what="paged")
    ref = flash_attention_paged_ref(q, k_cache, v_cache, cu_q, seq_lens, table, causal=causal)
    assert_close(ref, flash_attention_ref(q, k, v, cu_q, cu_k, causal=causal), what="paged ref vs contiguous ref")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_default_tiles(dtype, device):
    """Default tiles (BLOCK_N 64) over 12-token pages: one key block spans several pages."""
    _skip_bf16_on_cpu(dtype, device)
    lens_q, lens_k = [5, 70], [77, 70]
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, 8, 1, 128, dtype, device, seed=3)
    k_cache, v_cache, seq_lens, table = _to_paged(k, v, lens_k, 12, device, seed=1)
    out = flash_attention_paged(q, k_cache, v_cache, cu_q, seq_lens, table)
    _check(out, q, k, v, cu_q, cu_k, what="paged default")


def test_strided_views_of_a_fused_qkv(device):
    """q, k, v as the runtime has them: views into one [tokens, (H + 2 KV) * D] projection output, no copies."""
    lens, n_heads, n_kv_heads, head_dim = [7, 33], 6, 2, 64
    tokens = sum(lens)
    qkv = _randn(tokens, (n_heads + 2 * n_kv_heads) * head_dim, dtype=torch.float16, device=device, seed=4)
    q_size, kv_size = n_heads * head_dim, n_kv_heads * head_dim
    q = qkv[:, :q_size].view(tokens, n_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(tokens, n_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(tokens, n_kv_heads, head_dim)
    assert q.stride(0) == qkv.shape[1] and not k.is_contiguous()
    cu = _cu(lens, device)
    out = flash_attention(q, k, v, cu, cu, out=poison(torch.empty_like(q, memory_format=torch.contiguous_format)))
    _check(out, q, k, v, cu, cu)


@pytest.mark.parametrize("head_dim", [80, 256])
def test_head_dims_padded_to_a_power_of_two(head_dim, device):
    """head_dim 80 runs in a 128-wide tile with masked columns; 256 is the largest supported."""
    q, k, v, cu_q, cu_k = _inputs([3, 20], [3, 20], 2, 1, head_dim, torch.float16, device, seed=5)
    _check(flash_attention(q, k, v, cu_q, cu_k), q, k, v, cu_q, cu_k, what=f"d={head_dim}")


def test_explicit_scale(device):
    q, k, v, cu_q, cu_k = _inputs([9, 30], [9, 30], 4, 2, 64, torch.float32, device, seed=6)
    out = flash_attention(q, k, v, cu_q, cu_k, scale=0.3)
    _check(out, q, k, v, cu_q, cu_k, scale=0.3)


def test_float32_equals_torch_sdpa(device):
    """A second, independent reference: torch's scaled_dot_product_attention on one causal sequence."""
    n, n_heads, head_dim = 100, 4, 64
    q, k, v, cu, _ = _inputs([n], [n], n_heads, n_heads, head_dim, torch.float32, device, seed=7)
    out = flash_attention(q, k, v, cu, cu, causal=True)
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    _, magnitude = _expected(q, k, v, cu, cu)
    assert_close(out, sdpa.transpose(0, 1), rtol=RTOL[torch.float32], magnitude=magnitude, what="float32 vs SDPA")


def test_empty_batches(device):
    q, k, v, _, cu_k = _inputs([0], [4], 2, 2, 64, torch.float16, device)
    cu_q = _cu([0], device)
    assert flash_attention(q, k, v, cu_q, cu_k).shape == (0, 2, 64)
    none = torch.zeros(1, dtype=torch.int32, device=device)  # batch 0
    assert flash_attention(q, k[:0], v[:0], none, none).shape == (0, 2, 64)


def test_invalid_indices_give_nan_without_reading_out_of_bounds(device):
    """What CUDA does with index contents it does not check (here through `_launch`, which skips the CPU checks):
    a sequence with an out-of-range block id, or with cu_seqlens past the tensor, comes out NaN; the others are
    right. The spare cache slots are finite here, so the NaN comes from the kernel's check, not from the data."""
    lens = [4, 20]
    q, k, v, cu, _ = _inputs(lens, lens, 2, 2, 64, torch.float16, device, seed=8)
    k_cache, v_cache, seq_lens, table = _to_paged(k, v, lens, 16, device)
    k_cache, v_cache = k_cache.nan_to_num(), v_cache.nan_to_num()
    table[1, 1] = 10**6
    out = poison(torch.empty_like(q))
    _launch(out, q, k_cache, v_cache, cu, seq_lens, table, causal=True, scale=None, max_seqlen_q=20,
            config=default_config(64, q.dtype))
    assert out[4:].isnan().all()
    expected, magnitude = _expected(q[:4], k[:4], v[:4], cu[:2], cu[:2])
    assert_close(out[:4], expected, dtype=q.dtype, magnitude=magnitude)

    bad_cu = torch.tensor([0, 4, 90], dtype=torch.int32, device=device)  # ends past total_k = 24
    out = poison(torch.empty_like(q))
    _launch(out, q, k, v, cu, bad_cu, None, causal=False, scale=None, max_seqlen_q=20,
            config=default_config(64, q.dtype))
    assert out[4:].isnan().all() and not out[:4].isnan().any()


# ---- errors ------------------------------------------------------------------------------------------------------

def test_rejects_bad_inputs():
    """On CPU tensors, where the launchers also check index contents (every check runs before the launch, so this
    test needs no interpreter)."""
    q, k, v, cu_q, cu_k = _inputs([2, 5], [3, 5], 4, 2, 64, torch.float16, "cpu")
    i32 = lambda *xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    cases = [
        (dict(q=q.int()), "q must be float16, bfloat16 or float32"),
        (dict(q=q[0]), r"q must be 3-D \[tokens, heads, head_dim\]"),
        (dict(q=q.transpose(1, 2).contiguous().transpose(1, 2)), "q must be contiguous along head_dim"),
        (dict(k=k.float()), "k and v must have one shape and dtype"),
        (dict(k=k.float(), v=v.float()), "q and k must have one dtype"),
        (dict(k=k[..., :32], v=v[..., :32]), "q has head_dim 64 but k has 32"),
        (dict(q=q[:, :3]), r"n_heads \(3\) must be a positive multiple of n_kv_heads \(2\)"),
        (dict(q=q.new_zeros(7, 4, 320), k=k.new_zeros(8, 2, 320), v=v.new_zeros(8, 2, 320)),
         r"head_dim must be in 1 .. 256"),
        (dict(cu_seqlens_q=cu_q.long()), "cu_seqlens_q must be int32"),
        (dict(cu_seqlens_q=cu_q[None]), "cu_seqlens_q must have 1 dimension"),
        (dict(cu_seqlens_k=i32(0, 3, 4, 8)), "cu_seqlens_q has 2 sequences but cu_seqlens_k has 3"),
        (dict(cu_seqlens_q=i32(1, 2, 7)), "cu_seqlens_q must start at 0"),
        (dict(cu_seqlens_k=i32(0, 9, 8)), "cu_seqlens_k must be non-decreasing"),
        (dict(cu_seqlens_k=i32(0, 3, 7)), r"cu_seqlens_k must end at 8"),
        (dict(cu_seqlens_k=i32(0, 1, 8)), r"sequence 0 has len_q 2 > len_k 1"),
        (dict(cu_seqlens_k=i32(0, 0, 8), causal=False), "sequence 0 has 2 queries but no keys"),
        (dict(k=k.to("meta"), v=v.to("meta")), "flash_attention: tensors are on different devices"),
        (dict(cu_seqlens_q=cu_q.to("meta")), "cu_seqlens_q is on meta"),
        (dict(out=torch.empty(7, 4, 32, dtype=torch.float16)), r"out must be torch.float16 \[7, 4, 64\]"),
        (dict(out=torch.empty_like(q, dtype=torch.float32)), r"out must be torch.float16 \[7, 4, 64\]"),
        (dict(scale=float("nan")), "scale must be a positive finite float"),
        (dict(scale=-1.0), "scale must be a positive finite float"),
        (dict(max_seqlen_q=4), r"max_seqlen_q = 4 is less than the longest query run \(5\)"),
        (dict(config=(64, 64)), "config must be an AttentionConfig"),
    ]
    for change, message in cases:
        args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k) | change
        with pytest.raises(ValueError, match=message):
            flash_attention(**args)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        AttentionConfig(block_m=24)
    with pytest.raises(ValueError, match="must be >= 16"):
        AttentionConfig(block_n=8)


def test_paged_rejects_bad_inputs():
    lens_q, lens_k = [2, 5], [3, 9]
    q, k, v, cu_q, _ = _inputs(lens_q, lens_k, 4, 2, 64, torch.float16, "cpu")
    k_cache, v_cache, seq_lens, table = _to_paged(k, v, lens_k, 4, "cpu")
    i32 = lambda *xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    bad_id = table.clone()
    bad_id[1, 0] = 99
    cases = [
        (dict(k_cache=k_cache[0]), r"k_cache must be \[num_blocks, block_size, kv_heads, head_dim\]"),
        (dict(k_cache=k_cache.float(), v_cache=v_cache.float()), "q and k_cache must have one dtype"),
        (dict(k_cache=k_cache[..., :32].contiguous(), v_cache=v_cache[..., :32].contiguous()),
         "q has head_dim 64 but k_cache has 32"),
        (dict(q=q[:, :3]), r"n_heads \(3\) must be a positive multiple of n_kv_heads \(2\)"),
        (dict(block_table=bad_id), r"block_table\[1, 0\] = 99 is not a block id in \[0, "),
        (dict(block_table=table[:, :2].contiguous()), "sequence 1 has length 9; its block table row holds 2 blocks"),
        (dict(block_table=table[:1]), "block_table has 1 rows for 2 sequences"),
        (dict(seq_lens_k=i32(3, 9, 1), block_table=torch.cat([table, table[:1]])),
         "cu_seqlens_q has 2 sequences but seq_lens_k has 3"),
        (dict(seq_lens_k=seq_lens.long()), "seq_lens must be int32"),
        (dict(seq_lens_k=i32(1, 9)), r"sequence 0 has len_q 2 > len_k 1"),
        (dict(seq_lens_k=i32(0, 9), causal=False), "sequence 0 has 2 queries but no keys"),
        (dict(cu_seqlens_q=i32(0, 2, 6)), "cu_seqlens_q must end at 7"),
        (dict(block_table=table.to("meta")), "block_table is on meta"),
    ]
    for change, message in cases:
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu_q, seq_lens_k=seq_lens,
                    block_table=table) | change
        with pytest.raises(ValueError, match=message):
            flash_attention_paged(**args)


def test_default_configs():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in (64, 128, 256):
            cfg = default_config(head_dim, dtype)
            assert isinstance(cfg, AttentionConfig) and cfg.block_m >= 16 and cfg.block_n >= 16


# ---- model sizes (GPU) -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_long_sequences_bf16(layout, device):
    """Llama-3-8B's attention shapes (32 / 8 heads of 128) at 4096 tokens, plus a chunk after a 3000-token prefix."""
    lens_q, lens_k = [4096, 1000], [4096, 4000]
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, 32, 8, 128, torch.bfloat16, device, seed=9)
    out = poison(torch.empty_like(q))
    if layout == "paged":
        k_cache, v_cache, seq_lens, table = _to_paged(k, v, lens_k, 16, device)
        flash_attention_paged(q, k_cache, v_cache, cu_q, seq_lens, table, max_seqlen_q=4096, out=out)
    else:
        flash_attention(q, k, v, cu_q, cu_k, max_seqlen_q=4096, out=out)
    _check(out, q, k, v, cu_q, cu_k, what=f"{layout} 4096")
