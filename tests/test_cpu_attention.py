"""realm.kernels.cpu_attention (the onednn backend's attention: chunks of up to 16 queries in a C kernel reading the
pages in place, longer chunks in SDPA) against the reference computed in float64, over head layouts, head sizes,
block sizes, windows and soft caps, in steps that mix decodes, verification chunks, short and long prompt chunks;
its checks, its fallback where no compiler works, and its build cache.

Tolerance: errors against magnitude = P @ |V| (the output's rounding-error scale), as tests/test_flash_attention.py
measures float32 attention: scores up to |s| ~ 30 here, whose exponentials carry ~|s| ulp of relative error in any
float32 softmax (the kernel's expf and SDPA's alike), so rtol 4e-6 rather than TOLERANCES' 1.3e-6.
"""

import ctypes
import warnings

import pytest
import torch
from kernel_build import fresh_kernel_build
from tolerances import assert_close, assert_equal

from realm.kernels import cpu_attention as ca
from realm.kernels.attention import AttentionMetadata, paged_attention_ref

pytestmark = pytest.mark.skipif(ca.unavailable_reason() is not None,
                                reason=f"the CPU attention kernel cannot be built here: {ca.unavailable_reason()}")

RTOL = 4e-6
HEADS = [(2, 2), (9, 3), (4, 1), (8, 1)]  # groups 1, 3 (SmolLM2: 9 / 3 heads), 4, 8
HEAD_IDS = ["mha", "gqa3", "gqa4", "gqa8"]
# (query_lens, context_lens): decodes first, then verification chunks, then longer chunks, as the engine orders a
# step; a fresh step (prompts only, one of them longer than the kernel takes); a lone sequence of one token.
STEPS = {
    "decodes": ([1, 1, 1], [1, 37, 100]),
    "mixed": ([1, 1, 16, 5, 2, 40, 3], [17, 64, 100, 21, 2, 90, 3]),
    "fresh": ([7, 30, 1], [7, 30, 1]),
    "one token": ([1], [1]),
}


def _randn(*shape, seed, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _step(query_lens, context_lens, block_size, n_heads, n_kv_heads, head_dim, dtype=torch.float32, seed=0):
    """q, the pages (random contents; each sequence's blocks shuffled and interleaved, spare blocks unused) and the
    step's AttentionMetadata."""
    needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(needed) + 3
    ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    table = torch.zeros(len(needed), max(needed) + 1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(needed):
        table[b, :n] = ids[used : used + n]
        used += n
    k_cache = _randn(num_blocks, block_size, n_kv_heads, head_dim, seed=1000 + seed, dtype=dtype)
    v_cache = _randn(num_blocks, block_size, n_kv_heads, head_dim, seed=2000 + seed, dtype=dtype)
    q = _randn(sum(query_lens), n_heads, head_dim, seed=3000 + seed, scale=3.0, dtype=dtype)  # peaked softmax rows
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata.build(query_lens, context_lens, cu, torch.tensor(context_lens, dtype=torch.int32), table)
    return q, k_cache, v_cache, meta


def _expected(q, k_cache, v_cache, meta, scale, window=None, softcap=None):
    """(the reference in float64, P @ |V| in float64)."""
    d = [t.double() for t in (q, k_cache, v_cache)]
    exact = paged_attention_ref(d[0], None, None, d[1], d[2], meta, scale, window, softcap)
    magnitude = paged_attention_ref(d[0], None, None, d[1], d[2].abs(), meta, scale, window, softcap)
    return exact, magnitude


def _run(q, k_cache, v_cache, meta, scale, window=None, softcap=None):
    return ca.paged_attention_cpu(q, None, None, k_cache, v_cache, meta, scale, window, softcap)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("head_dim", [33, 64, 72, 256])  # 33, 72: tails of the vector loops
@pytest.mark.parametrize("block_size", [1, 16, 7])
def test_matches_the_reference(step, heads, head_dim, block_size):
    q, k_cache, v_cache, meta = _step(*STEPS[step], block_size, *heads, head_dim)
    scale = head_dim**-0.5
    exact, magnitude = _expected(q, k_cache, v_cache, meta, scale)
    assert_close(_run(q, k_cache, v_cache, meta, scale), exact, dtype=torch.float32, rtol=RTOL, magnitude=magnitude,
                 what=f"{step} heads {heads} head_dim {head_dim} block {block_size}")


# One key; inside a block; a block; across blocks; past every sequence.
@pytest.mark.parametrize("window", [1, 5, 16, 40, 1000])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_windows_and_softcaps(window, softcap):
    q, k_cache, v_cache, meta = _step(*STEPS["mixed"], 16, 9, 3, 64, seed=1)
    exact, magnitude = _expected(q, k_cache, v_cache, meta, 0.125, window, softcap)
    assert_close(_run(q, k_cache, v_cache, meta, 0.125, window, softcap), exact, dtype=torch.float32, rtol=RTOL,
                 magnitude=magnitude, what=f"window {window} softcap {softcap}")


def test_queries_inside_a_wider_row():
    """The model passes q as a view of its fused QKV projection (rows strided past the heads): read in place."""
    q, k_cache, v_cache, meta = _step(*STEPS["mixed"], 16, 9, 3, 64, seed=2)
    wide = torch.cat([q.reshape(q.shape[0], -1), torch.full((q.shape[0], 100), float("nan"))], dim=1)
    strided = wide[:, : q.shape[1] * q.shape[2]].view(q.shape)
    assert strided.stride(0) != q.shape[1] * q.shape[2]
    assert_equal(_run(strided, k_cache, v_cache, meta, 0.125), _run(q, k_cache, v_cache, meta, 0.125))


@pytest.mark.parametrize(("query_lens", "context_lens"), [
    ([1] * 6 + [9], [50, 3, 17, 80, 16, 1, 30]),  # many tasks: one per (sequence, KV head) at any thread count
    ([9, 16], [40, 70]),  # few tasks: with 2 threads or more, the 27 and 48 rows are cut into tiles of 24
    ([8], [90]),  # one chunk of 24 rows, 3 KV heads: 2 tiles of 12 each for 2 threads, 3 of 8 for 4 (even shares)
])
def test_the_same_result_on_any_thread_count(query_lens, context_lens):
    """Every row is summed in one order however the threads share the work (tiles included): bit for bit."""
    q, k_cache, v_cache, meta = _step(query_lens, context_lens, 16, 9, 3, 64, seed=3)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            results.append(_run(q, k_cache, v_cache, meta, 0.125))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert_equal(other, results[0])


def _meta_like(meta, query_lens, context_lens):
    """Metadata for other chunk lengths over the same block table (one sequence)."""
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    return AttentionMetadata.build(query_lens, context_lens, cu, torch.tensor(context_lens, dtype=torch.int32),
                                   meta.block_tables)


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (5, 20.0)])
@pytest.mark.parametrize("heads", [(9, 3), (8, 1)], ids=["gqa3", "gqa8"])
def test_a_query_gets_the_same_bits_as_a_decode_and_in_any_chunk(heads, window, softcap):
    """A verification chunk's query and the decode of the same position (and the same query in a shorter chunk)
    agree to the bit: every row is computed alone, whatever rows share its vector, so greedy speculation equals
    plain decoding without two summation orders having to agree."""
    n_heads, n_kv_heads = heads
    q, k_cache, v_cache, meta = _step([16], [70], 16, n_heads, n_kv_heads, 64, seed=7)
    chunk = _run(q, k_cache, v_cache, meta, 0.125, window, softcap)
    for i in range(16):
        decode = _run(q[i : i + 1], k_cache, v_cache, _meta_like(meta, [1], [55 + i]), 0.125, window, softcap)
        assert_equal(decode, chunk[i : i + 1])
    shorter = _run(q[:5], k_cache, v_cache, _meta_like(meta, [5], [59]), 0.125, window, softcap)
    assert_equal(shorter, chunk[:5])


def test_a_nan_value_stays_out_of_the_rows_that_cannot_see_it():
    """A key the causal mask hides from a row adds nothing to it, not 0 * NaN: a non-finite value in a chunk's last
    position leaves its earlier queries' rows as they were."""
    q, k_cache, v_cache, meta = _step([16], [70], 16, 9, 3, 64, seed=8)
    clean = _run(q, k_cache, v_cache, meta, 0.125)
    last = meta.block_tables[0, 69 // 16].item()
    k_cache[last, 69 % 16], v_cache[last, 69 % 16] = float("nan"), float("inf")
    dirty = _run(q, k_cache, v_cache, meta, 0.125)
    assert_equal(dirty[:15], clean[:15])
    assert not torch.isfinite(dirty[15]).any()


def test_other_dtypes_run_the_reference_and_say_so():
    ca._warn_fallback.cache_clear()
    q, k_cache, v_cache, meta = _step(*STEPS["mixed"], 16, 9, 3, 64, dtype=torch.bfloat16, seed=4)
    with pytest.warns(RuntimeWarning, match=r"unavailable \(it computes float32 on the CPU, not torch\.bfloat16"):
        got = _run(q, k_cache, v_cache, meta, 0.125)
    assert_equal(got, paged_attention_ref(q, None, None, k_cache, v_cache, meta, 0.125))


def test_a_chunk_without_queries_has_no_rows():
    """As the reference: a sequence with 0 new queries in the step contributes no output rows."""
    q, k_cache, v_cache, meta = _step([1, 4], [20, 30], 16, 9, 3, 64, seed=7)
    cu = torch.tensor([0, 1, 1, 5], dtype=torch.int32)
    table = torch.cat([meta.block_tables[:1], meta.block_tables])
    empty = AttentionMetadata.build([1, 0, 4], [20, 20, 30], cu, torch.tensor([20, 20, 30], dtype=torch.int32), table)
    assert_equal(_run(q, k_cache, v_cache, empty, 0.125), _run(q, k_cache, v_cache, meta, 0.125))


def test_bad_input_is_refused_by_name():
    q, k_cache, v_cache, meta = _step(*STEPS["mixed"], 16, 9, 3, 64, seed=5)
    bad_table = meta.block_tables.clone()
    bad_table[2, 0] = k_cache.shape[0]  # one past the last block: the kernel would read outside the cache
    bad = AttentionMetadata.build(meta.query_lens, meta.context_lens, meta.cu_seqlens_q, meta.seq_lens, bad_table)
    with pytest.raises(ValueError, match=r"block_table\[2, 0\] .* is not a block id"):
        _run(q, k_cache, v_cache, bad, 0.125)
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        _run(q[:, :8], k_cache, v_cache, meta, 0.125)
    with pytest.raises(ValueError, match="query rows"):
        _run(q[:-1], k_cache, v_cache, meta, 0.125)
    with pytest.raises(ValueError, match="window"):
        _run(q, k_cache, v_cache, meta, 0.125, window=0)
    with pytest.raises(ValueError, match="must match"):
        _run(q, k_cache, v_cache[:-1], meta, 0.125)
    longer = AttentionMetadata.build([1, 5], [1, 3], torch.tensor([0, 1, 6], dtype=torch.int32),
                                     torch.tensor([1, 3], dtype=torch.int32), meta.block_tables[:2])
    with pytest.raises(ValueError, match="sequence 1 has 5 queries for 3 tokens"):
        _run(q[:6], k_cache, v_cache, longer, 0.125)


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """library() built anew into an empty directory; the cached library restored after."""
    with fresh_kernel_build(tmp_path, monkeypatch, ca.library, ca._warn_fallback) as path:
        yield path


def test_no_compiler_falls_back_to_the_reference_with_a_warning(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-cc"))
    q, k_cache, v_cache, meta = _step(*STEPS["mixed"], 16, 9, 3, 64, seed=6)
    with pytest.warns(RuntimeWarning, match=r"CPU attention kernel is unavailable \(.*no-such-cc"):
        got = _run(q, k_cache, v_cache, meta, 0.125)
    assert_equal(got, paged_attention_ref(q, None, None, k_cache, v_cache, meta, 0.125))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every layer of every step
        _run(q, k_cache, v_cache, meta, 0.125)
    assert "no-such-cc" in ca.unavailable_reason()


def test_a_failed_build_says_what_the_compiler_said(fresh_build, monkeypatch):
    fake = fresh_build / "cc"
    fake.write_text("#!/bin/sh\necho 'error: this compiler refuses' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    refusal = r"could not build cpu_attention\.c: error: this compiler refuses"
    with pytest.raises(ca.CpuKernelUnavailable, match=refusal):
        ca.library()
    assert [p.name for p in fresh_build.iterdir()] == ["cc"]  # no half-written library left behind


def test_loading_the_kernel_leaves_the_process_floating_point_mode_alone(fresh_build):
    """Linked with -ffast-math, GCC 12 adds crtfastmath.o, which turns on flush-to-zero for the whole process when the
    library loads: every torch op after it would turn subnormals into 0 (and other tests' numerics with them)."""
    subnormal = torch.tensor([1e-40])
    before = (subnormal * 3.0).item()
    ca.library()
    assert before > 0 and (subnormal * 3.0).item() == before  # not flushed to 0


def test_built_once_per_source_and_cpu(fresh_build):
    lib = ca.library()
    built = list(fresh_build.glob("cpu_attention-*.so"))
    assert len(built) == 1 and isinstance(lib, ctypes.CDLL)
    stamp = built[0].stat().st_mtime_ns
    ca.library.cache_clear()
    ca.library()  # another process: loads the built file
    assert built[0].stat().st_mtime_ns == stamp and list(fresh_build.glob("*.so")) == built
