"""bench/attention.py on CPU: its FLOP, byte, rate, peak, target and latest-run computations on synthetic rows, the
scattered block tables, the correctness gates (the kernels under the interpreter), measure/sweep with a stand-in
timer on tiny shapes, the no-GPU exit, option errors, and --plot-only on a tiny JSONL. The GPU measurements themselves
run only on a GPU."""

from __future__ import annotations

import json

import pytest
import torch
from bench_scripts import load_bench_script

DATE, LATER = "2025-01-01T00:00:00+00:00", "2025-02-01T00:00:00+00:00"
ENV = {"device": "NVIDIA H100 80GB HBM3", "torch": "t", "triton": "t", "git_commit": "abc", "date": DATE}
CEILINGS = {"bw_gbs": 3000.0, "matmul_tflops": 700.0, "peak_tflops": 989.5, "peak_gbs": 3350.0,
            "peak_source": "NVIDIA H100 datasheet (SXM5)"}


def load_bench():
    return load_bench_script("attention")


@pytest.fixture
def bench():
    return load_bench()


def prefill_row(shape="mha-d128", dtype="bfloat16", causal=True, seq=4096, ms=1.0, sdpa_ms=1.0, **extra):
    """A prefill row as measure_prefill builds it (rates included), environment fields merged."""
    b = load_bench()
    s = b.SHAPES[shape]
    batch = b.prefill_batch(seq)
    row = {**ENV, **CEILINGS, "kind": "prefill", "shape": shape, "n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads,
           "head_dim": s.head_dim, "dtype": dtype, "causal": causal, "seq_len": seq, "batch": batch,
           "tokens": batch * seq, "context": None, "flops": b.prefill_flops(batch, s.n_heads, seq, s.head_dim, causal),
           "ms": ms, "sdpa_ms": sdpa_ms, "sdpa_backend": "FLASH_ATTENTION", "max_rel_err": 1e-3, **extra}
    return {**row, **b.prefill_rates(row)}


def decode_row(shape="gqa-d128", dtype="bfloat16", batch=16, context=4096, fraction=0.8, **extra):
    """A decode row whose bytes move at `fraction` of the 3000 GB/s copy bandwidth."""
    b = load_bench()
    s = b.SHAPES[shape]
    counts = b.decode_bytes([context] * batch, s.n_heads, s.n_kv_heads, s.head_dim, 2)
    row = {**ENV, **CEILINGS, "kind": "decode", "shape": shape, "n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads,
           "head_dim": s.head_dim, "dtype": dtype, "causal": None, "seq_len": None, "batch": batch,
           "context": context, "num_splits": 1, **counts, "ms": counts["bytes_moved"] / (fraction * 3000e6),
           "max_rel_err": 1e-3, **extra}
    return {**row, **b.decode_rates(row)}


def verify_row(shape="gqa-d128", dtype="bfloat16", batch=8, context=4096, q_len=4, fraction=0.6, speedup=2.0,
               **extra):
    """A verify row whose bytes move at `fraction` of the 3000 GB/s copy bandwidth, flash_attention_paged `speedup`
    times slower."""
    b = load_bench()
    s = b.SHAPES[shape]
    counts = b.verify_bytes([context] * batch, q_len, s.n_heads, s.n_kv_heads, s.head_dim, 2)
    ms = counts["bytes_moved"] / (fraction * 3000e6)
    row = {**ENV, **CEILINGS, "kind": "verify", "shape": shape, "n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads,
           "head_dim": s.head_dim, "dtype": dtype, "causal": True, "seq_len": None, "batch": batch,
           "context": context, "q_len": q_len, "num_splits": 1, "row_tiles": 1, **counts, "ms": ms,
           "flash_ms": ms * speedup, "max_rel_err": 1e-3, "flash_max_rel_err": 1e-3, **extra}
    return {**row, **b.verify_rates(row)}


# ---- counts and rates --------------------------------------------------------------------------------------------

def test_prefill_batch_keeps_about_16k_tokens_per_launch(bench):
    assert [bench.prefill_batch(s) for s in bench.SEQS] == [32, 16, 8, 4, 2, 1]
    assert bench.prefill_batch(32768) == 1  # never 0
    assert bench.prefill_batch(1000, tokens=4096) == 4


def test_prefill_flops_count_the_unmasked_half_when_causal(bench):
    full = bench.prefill_flops(2, 32, 4096, 128, causal=False)
    assert full == 4 * 2 * 32 * 4096 * 4096 * 128  # QK^T and PV: 2 * 2 * S^2 * D per head
    assert bench.prefill_flops(2, 32, 4096, 128, causal=True) * 2 == full
    assert bench.prefill_flops(1, 1, 3, 1, causal=True) == 18  # 36 / 2, an integer


def test_decode_bytes_read_kv_once_per_kv_head(bench):
    # Llama-3-8B, batch 16 x 4096 tokens, bfloat16: 4 KiB of K and V per token (8 KV heads x 128 x 2 x 2 bytes)
    c = bench.decode_bytes([4096] * 16, 32, 8, 128, 2)
    assert c["kv_bytes"] == 16 * 4096 * 8 * 128 * 2 * 2 == 256 * 2**20
    assert c["q_bytes"] == c["out_bytes"] == 16 * 32 * 128 * 2
    assert c["bytes_moved"] == c["kv_bytes"] + 2 * c["q_bytes"]
    ragged = bench.decode_bytes([1, 100, 27], 4, 2, 64, 4)  # the sum of the actual lengths, not max x batch
    assert ragged["kv_bytes"] == 128 * 2 * 64 * 2 * 4 and ragged["q_bytes"] == 3 * 4 * 64 * 4


def test_verify_bytes_read_kv_once_per_kv_head_for_all_queries(bench):
    c = bench.verify_bytes([4096] * 8, 4, 32, 8, 128, 2)
    assert c["kv_bytes"] == bench.decode_bytes([4096] * 8, 32, 8, 128, 2)["kv_bytes"]  # what decode reads: once
    assert c["q_bytes"] == c["out_bytes"] == 8 * 4 * 32 * 128 * 2
    assert c["bytes_moved"] == c["kv_bytes"] + 2 * c["q_bytes"]
    assert bench.verify_bytes([1, 100, 27], 1, 4, 2, 64, 4) == bench.decode_bytes([1, 100, 27], 4, 2, 64, 4)


def test_verify_rates(bench):
    r = verify_row(fraction=0.6, speedup=2.5)
    assert r["gbs"] == pytest.approx(1800.0) and r["bw_fraction"] == pytest.approx(0.6)
    assert r["flash_gbs"] == pytest.approx(720.0) and r["flash_bw_fraction"] == pytest.approx(0.24)
    assert r["speedup"] == pytest.approx(2.5) and r["peak_bw_fraction"] == pytest.approx(1800 / 3350)


def test_prefill_rates(bench):
    r = prefill_row("mha-d128", causal=False, seq=4096, ms=2.0, sdpa_ms=1.5)
    flops = 4 * 4 * 32 * 4096**2 * 128  # batch 4
    assert r["tflops"] == pytest.approx(flops / 2e-3 / 1e12)
    assert r["sdpa_tflops"] == pytest.approx(flops / 1.5e-3 / 1e12)
    assert r["sdpa_ratio"] == pytest.approx(0.75)  # realm is slower: below 1
    assert r["matmul_fraction"] == pytest.approx(r["tflops"] / 700)
    assert r["peak_fraction"] == pytest.approx(r["tflops"] / 989.5)
    assert r["sdpa_peak_fraction"] == pytest.approx(r["sdpa_tflops"] / 989.5)
    unknown = bench.prefill_rates({**r, "peak_tflops": None})
    assert unknown["peak_fraction"] is None and unknown["matmul_fraction"] == pytest.approx(r["matmul_fraction"])


def test_decode_rates(bench):
    r = decode_row(batch=16, context=4096, fraction=0.5)
    assert r["gbs"] == pytest.approx(1500.0) and r["bw_fraction"] == pytest.approx(0.5)
    assert r["peak_bw_fraction"] == pytest.approx(1500 / 3350)
    assert r["kv_gbs"] == pytest.approx(1500.0 * r["kv_bytes"] / r["bytes_moved"])
    assert bench.decode_rates({**r, "peak_gbs": None})["peak_bw_fraction"] is None


def test_datasheet_peak_by_device_name(bench):
    peak = bench.datasheet_peak
    assert peak("NVIDIA H100 80GB HBM3")["peak_tflops"] == 989.5 and peak("NVIDIA H100 80GB HBM3")["peak_gbs"] == 3350
    assert peak("NVIDIA H100 PCIe")["peak_tflops"] == 756.5  # not the SXM figure: PCIe is matched first
    assert peak("NVIDIA H100 NVL")["peak_gbs"] == 3900
    assert peak("NVIDIA H200")["peak_gbs"] == 4800 and "H200 datasheet" in peak("NVIDIA H200")["peak_source"]
    assert peak("NVIDIA A100-SXM4-80GB") == {"peak_tflops": None, "peak_gbs": None, "peak_source": None}


def test_rotation_sets(bench):
    l2 = 50 * 2**20
    assert bench.rotation_sets(10 * 2**20, l2) == 10
    assert bench.rotation_sets(128 * 2**20, l2) == 1  # a 16k-token prefill is far beyond L2 alone
    assert bench.rotation_sets(1, l2) == load_bench_script("harness").MAX_SETS


def test_describe(bench):
    assert bench.describe(prefill_row("gqa-d128", causal=False, seq=8192)) == "prefill gqa-d128 bfloat16 full S=8192 x2"
    assert bench.describe(decode_row(batch=64, context=32768)) == "decode gqa-d128 bfloat16 B=64 ctx=32768"
    assert bench.describe(verify_row(batch=8, context=512, q_len=16)) == "verify gqa-d128 bfloat16 B=8 ctx=512 q=16"


# ---- targets and latest run --------------------------------------------------------------------------------------

def _targets(bench, rows):
    return {res["target"]: res for res in bench.evaluate_targets(rows)}


def test_targets_pass(bench):
    rows = [prefill_row(seq=4096, ms=1.0, sdpa_ms=0.95), prefill_row("gqa-d128", causal=False, seq=16384, sdpa_ms=1.2),
            decode_row(batch=16, context=4096, fraction=0.75), decode_row(batch=64, context=32768, fraction=0.9)]
    res = _targets(bench, rows)
    assert res["prefill"]["status"] == "PASS" and res["prefill"]["rows"] == 2 and res["prefill"]["misses"] == 0
    assert res["prefill"]["worst"] == {"row": "prefill mha-d128 bfloat16 causal S=4096 x4",
                                       "value": pytest.approx(0.95)}
    assert res["decode"]["status"] == "PASS" and res["decode"]["rows"] == 2
    assert res["decode"]["worst"]["value"] == pytest.approx(0.75)
    assert res["decode"]["devices"] == ["NVIDIA H100 80GB HBM3"]


def test_targets_miss_names_the_worst_row(bench):
    rows = [prefill_row(seq=4096, sdpa_ms=0.85), prefill_row(seq=8192, sdpa_ms=0.6), prefill_row(seq=16384),
            decode_row(batch=16, context=8192, fraction=0.65), decode_row(batch=64, context=4096, fraction=0.72)]
    res = _targets(bench, rows)
    assert res["prefill"]["status"] == "MISS" and res["prefill"]["misses"] == 2 and res["prefill"]["rows"] == 3
    assert res["prefill"]["worst"] == {"row": "prefill mha-d128 bfloat16 causal S=8192 x2", "value": pytest.approx(0.6)}
    assert res["decode"]["status"] == "MISS" and res["decode"]["misses"] == 1
    assert res["decode"]["worst"]["row"] == "decode gqa-d128 bfloat16 B=16 ctx=8192"
    line = bench.target_line(res["decode"])
    assert line.startswith("MISS (decode) decode, batch >= 16, context >= 4096")
    assert "1 of 2 rows below 0.7 on NVIDIA H100 80GB HBM3" in line and "bw_fraction 0.65" in line


def test_targets_count_only_rows_in_scope(bench):
    """Slow rows outside the issue's scope (float16, head_dim 64, S < 4096; batch < 16, context < 4096) do not count."""
    rows = [prefill_row(dtype="float16", sdpa_ms=0.1), prefill_row("mha-d64", sdpa_ms=0.1),
            prefill_row(seq=2048, sdpa_ms=0.1), decode_row(batch=4, fraction=0.1),
            decode_row(context=2048, fraction=0.1)]
    res = _targets(bench, rows)
    assert res["prefill"]["status"] == "n/a" and res["decode"]["status"] == "n/a"
    assert bench.target_line(res["prefill"]).startswith("n/a  (prefill)")
    res = _targets(bench, [*rows, prefill_row("gqa-d128", seq=4096, sdpa_ms=0.5)])
    assert res["prefill"]["status"] == "MISS" and res["prefill"]["rows"] == 1


def test_latest_keeps_the_newest_row_per_key(bench):
    rows = [prefill_row(ms=1.0, date=LATER), prefill_row(ms=2.0), prefill_row(ms=3.0, causal=False),
            prefill_row(ms=4.0, causal=False), prefill_row(ms=5.0, dtype="float16"),
            decode_row(batch=16, fraction=0.1), decode_row(batch=16, fraction=0.2), decode_row(batch=64, fraction=0.3),
            verify_row(q_len=4, fraction=0.1), verify_row(q_len=4, fraction=0.4), verify_row(q_len=16, fraction=0.5)]
    got = {bench.describe(r): r.get("tflops") or r["bw_fraction"] for r in bench.latest(rows, bench.KEY)}
    assert len(got) == 7
    assert got["verify gqa-d128 bfloat16 B=8 ctx=4096 q=4"] == pytest.approx(0.4)  # q_len is part of the key
    assert got["verify gqa-d128 bfloat16 B=8 ctx=4096 q=16"] == pytest.approx(0.5)
    assert got["prefill mha-d128 bfloat16 causal S=4096 x4"] == prefill_row(ms=1.0)["tflops"]  # the later date
    assert got["prefill mha-d128 bfloat16 full S=4096 x4"] == prefill_row(ms=4.0, causal=False)["tflops"]  # later line
    assert got["decode gqa-d128 bfloat16 B=16 ctx=4096"] == pytest.approx(0.2)


# ---- inputs and correctness gates (kernels under the interpreter on CPU) -----------------------------------------

def test_scattered_block_tables_use_every_block_once(bench):
    tables = bench.scattered_block_tables(3, 2, 5, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert len(tables) == 3 and all(t.shape == (2, 5) and t.dtype == torch.int32 for t in tables)
    ids = torch.cat([t.flatten() for t in tables])
    assert torch.equal(ids.sort().values, torch.arange(30, dtype=torch.int32))
    assert not torch.equal(ids, torch.arange(30, dtype=torch.int32))  # scattered, not in order


def _prefill_inputs(device, batch=2, seq=24, heads=4, kv_heads=2, head_dim=16):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch * seq, h, head_dim, generator=gen).to(device, torch.float16)
               for h in (heads, kv_heads, kv_heads))
    cu = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device=device)
    return q, k, v, cu, torch.empty_like(q), seq


@pytest.mark.parametrize("causal", [True, False])
def test_check_prefill_accepts_the_kernel_and_sdpa(bench, device, causal):
    errs = bench.check_prefill(*_prefill_inputs(device), causal, bench.TOLERANCE["float16"])
    assert 0 < errs["max_rel_err"] <= 5e-3 and 0 < errs["sdpa_max_rel_err"] <= 5e-3


def test_check_prefill_rejects_wrong_results(bench, device, monkeypatch):
    """A 10% error, an unwritten output (the NaN poison stays) and an SDPA with the other mask all stop the run."""
    inputs, tol = _prefill_inputs(device), bench.TOLERANCE["float16"]
    real = bench.flash_attention
    monkeypatch.setattr(bench, "flash_attention", lambda *a, out, **kw: out.copy_(real(*a, **kw) * 1.1))
    with pytest.raises(RuntimeError, match=r"flash_attention is wrong for 4/2 heads x 16.*causal, 2 x 24 tokens"):
        bench.check_prefill(*inputs, True, tol)
    monkeypatch.setattr(bench, "flash_attention", lambda *a, out, **kw: out)
    with pytest.raises(RuntimeError, match="= nan >"):
        bench.check_prefill(*inputs, True, tol)

    def off_in(rows, head):  # right everywhere but in these rows of this head
        def run(*a, out, **kw):
            out.copy_(real(*a, **kw))
            out[rows, head] *= 1.1
            return out
        return run

    monkeypatch.setattr(bench, "flash_attention", off_in(slice(24, 48), 0))
    with pytest.raises(RuntimeError, match="sequence 1, head 0"):  # the last sequence is checked
        bench.check_prefill(*inputs, True, tol)
    monkeypatch.setattr(bench, "flash_attention", off_in(slice(0, 24), 3))
    with pytest.raises(RuntimeError, match="sequence 0, head 3"):  # the last head (of the second KV head)
        bench.check_prefill(*inputs, True, tol)
    monkeypatch.setattr(bench, "flash_attention", real)
    sdpa = bench.run_sdpa
    monkeypatch.setattr(bench, "run_sdpa", lambda q, k, v, b, s, causal: sdpa(q, k, v, b, s, not causal))
    with pytest.raises(RuntimeError, match="SDPA disagrees with flash_attention_ref"):
        bench.check_prefill(*inputs, True, tol)


def _decode_inputs(bench, device, batch=3, context=40, heads=4, kv_heads=2, head_dim=32):
    gen = torch.Generator().manual_seed(0)
    blocks = -(-context // bench.BLOCK_SIZE)
    table = bench.scattered_block_tables(1, batch, blocks, gen, device)[0]
    k_cache, v_cache = (torch.randn(batch * blocks, bench.BLOCK_SIZE, kv_heads, head_dim, generator=gen)
                        .to(device, torch.float16) for _ in range(2))
    q = torch.randn(batch, heads, head_dim, generator=gen).to(device, torch.float16)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, seq_lens, table, context, torch.empty_like(q)


def test_check_decode_accepts_the_kernel_and_rejects_a_wrong_result(bench, device, monkeypatch):
    inputs, tol = _decode_inputs(bench, device), bench.TOLERANCE["float16"]
    assert 0 < bench.check_decode(*inputs, tol) <= 5e-3
    real = bench.paged_decode_attention
    monkeypatch.setattr(bench, "paged_decode_attention", lambda *a, out, **kw: out.copy_(real(*a, **kw).flip(0)))
    with pytest.raises(RuntimeError, match=r"paged_decode_attention is wrong for 4/2 heads x 32.*sequences \[0, 2\]"):
        bench.check_decode(*inputs, tol)  # sequences swapped: the first and last rows are checked
    monkeypatch.setattr(bench, "paged_decode_attention", lambda *a, out, **kw: out)
    with pytest.raises(RuntimeError, match="= nan >"):
        bench.check_decode(*inputs, tol)


def _verify_inputs(bench, device, batch=3, context=40, q_len=3, heads=4, kv_heads=2, head_dim=32):
    gen = torch.Generator().manual_seed(0)
    blocks = -(-context // bench.BLOCK_SIZE)
    table = bench.scattered_block_tables(1, batch, blocks, gen, device)[0]
    k_cache, v_cache = (torch.randn(batch * blocks, bench.BLOCK_SIZE, kv_heads, head_dim, generator=gen)
                        .to(device, torch.float16) for _ in range(2))
    q = torch.randn(batch * q_len, heads, head_dim, generator=gen).to(device, torch.float16)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    cu = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, cu, seq_lens, table, q_len, context, torch.empty_like(q), torch.empty_like(q)


def test_check_verify_accepts_both_kernels_and_rejects_a_wrong_result(bench, device, monkeypatch):
    inputs, tol = _verify_inputs(bench, device), bench.TOLERANCE["float16"]
    errs = bench.check_verify(*inputs, tol)
    assert 0 < errs["max_rel_err"] <= 5e-3 and 0 < errs["flash_max_rel_err"] <= 5e-3
    real = bench.paged_verify_attention
    monkeypatch.setattr(bench, "paged_verify_attention", lambda *a, out, **kw: out.copy_(real(*a, **kw).flip(0)))
    with pytest.raises(RuntimeError, match=r"paged_verify_attention is wrong for 4/2 heads x 32.*batch 3 x 3 queries"
                                           r".*sequences \[0, 2\]"):
        bench.check_verify(*inputs, tol)  # rows reversed: the first and last chunks are checked
    monkeypatch.setattr(bench, "paged_verify_attention", lambda *a, out, **kw: out)
    with pytest.raises(RuntimeError, match="= nan >"):
        bench.check_verify(*inputs, tol)
    monkeypatch.setattr(bench, "paged_verify_attention", real)
    flash = bench.flash_attention_paged
    monkeypatch.setattr(bench, "flash_attention_paged", lambda *a, out, **kw: out.copy_(flash(*a, **kw) * 1.1))
    with pytest.raises(RuntimeError, match="flash_attention_paged disagrees with the reference"):
        bench.check_verify(*inputs, tol)


# ---- measurement and sweeps with a stand-in timer -----------------------------------------------------------------

class FakeTimer:
    """Stands in for harness.time_gpu: calls fn once on every input set (so the timed lambdas run) and returns the
    next of `ms` as the median (p20 = 0.9 ms, p80 = 1.1 ms)."""

    def __init__(self, *ms: float):
        self.ms, self.calls, self.sets = list(ms), 0, []

    def __call__(self, fn, inputs=None):
        for args in inputs or [()]:
            fn(*args)
        self.sets.append(len(inputs or [()]))
        ms = self.ms[self.calls % len(self.ms)]
        self.calls += 1
        return {"ms": ms, "ms_p20": 0.9 * ms, "ms_p80": 1.1 * ms}


TINY_PREFILL = ("tiny", 4, 2, 16)
TINY_DECODE = ("tiny", 4, 2, 32)


def _run(bench, l2_bytes=1, tokens=48):
    ceilings = {"bw_gbs": 100.0, "copy_bytes": 1, "matmul_size": 1, "matmul_tflops": {"float16": 2.0}}
    return bench.Run(torch.device("cpu"), l2_bytes, ceilings, bench.datasheet_peak("cpu"), tokens)


@pytest.fixture
def cpu_only(device):
    if device.type != "cpu":
        pytest.skip("the stand-in timer runs the kernels on CPU tensors")


def test_measure_prefill_row(bench, monkeypatch, cpu_only):
    timer = FakeTimer(2.0, 3.0)  # realm, then SDPA
    monkeypatch.setattr(bench, "time_gpu", timer)
    shape = bench.AttnShape(*TINY_PREFILL, "test")
    # one set is 48 tokens x (2 x 4 + 2 x 2) heads x 16 x 2 bytes = 18432 bytes; an "L2" of that size gives 2 sets
    row = bench.measure_prefill(shape, 16, True, "float16", _run(bench, l2_bytes=18432))
    assert timer.sets == [2, 2] and row["sets"] == 2
    assert (row["batch"], row["tokens"], row["seq_len"], row["gqa"]) == (3, 48, 16, True)
    assert row["flops"] == 4 * 3 * 4 * 16 * 16 * 16 // 2
    assert row["ms"] == 2.0 and row["sdpa_ms"] == 3.0 and row["sdpa_ratio"] == pytest.approx(1.5)
    assert row["ms_p20"] == pytest.approx(1.8) and row["sdpa_ms_p80"] == pytest.approx(3.3)
    assert row["tflops"] == pytest.approx(row["flops"] / 2e-3 / 1e12)
    assert row["matmul_fraction"] == pytest.approx(row["tflops"] / 2.0) and row["peak_fraction"] is None
    assert 0 < row["max_rel_err"] <= 5e-3 and 0 < row["sdpa_max_rel_err"] <= 5e-3
    assert row["sdpa_backend"] is None or isinstance(row["sdpa_backend"], str)
    json.dumps(row)  # a JSONL row: every field serializes


def test_measure_decode_row(bench, monkeypatch, cpu_only):
    timer = FakeTimer(0.5)
    monkeypatch.setattr(bench, "time_gpu", timer)
    shape = bench.AttnShape(*TINY_DECODE, "test")
    row = bench.measure_decode(shape, 600, 2, "float16", _run(bench))  # 600 tokens: a partial last block
    assert row["sets"] == 1 and timer.sets == [1]
    assert row["num_blocks"] == 2 * 38 and row["block_size"] == 16
    assert row["kv_bytes"] == 2 * 600 * 2 * 32 * 2 * 2 and row["q_bytes"] == 2 * 4 * 32 * 2
    plan = bench.plan_decode(2, 2, 600, "cpu")
    assert (row["num_splits"], row["tokens_per_split"]) == (plan.num_splits, plan.tokens_per_split)
    assert row["gbs"] == pytest.approx(row["bytes_moved"] / 0.5e-3 / 1e9)
    assert row["bw_fraction"] == pytest.approx(row["gbs"] / 100.0) and row["peak_bw_fraction"] is None
    assert 0 < row["max_rel_err"] <= 5e-3
    json.dumps(row)


def test_measure_verify_row(bench, monkeypatch, cpu_only):
    timer = FakeTimer(0.5, 2.0)  # the verification kernel, then flash_attention_paged
    monkeypatch.setattr(bench, "time_gpu", timer)
    shape = bench.AttnShape(*TINY_DECODE, "test")
    row = bench.measure_verify(shape, 70, 2, 3, "float16", _run(bench))  # 70 tokens: a partial last block
    assert row["sets"] == 1 and timer.sets == [1, 1]
    assert (row["q_len"], row["tokens"], row["num_blocks"], row["causal"]) == (3, 6, 2 * 5, True)
    assert row["kv_bytes"] == 2 * 70 * 2 * 32 * 2 * 2 and row["q_bytes"] == 2 * 3 * 4 * 32 * 2
    plan = bench.plan_verify(2, 4, 2, 32, 3, 70, torch.float16, "cpu")
    assert (row["num_splits"], row["block_m"], row["row_tiles"]) == (plan.num_splits, plan.block_m, plan.row_tiles)
    assert row["ms"] == 0.5 and row["flash_ms"] == 2.0 and row["speedup"] == pytest.approx(4.0)
    assert row["gbs"] == pytest.approx(row["bytes_moved"] / 0.5e-3 / 1e9)
    assert row["flash_bw_fraction"] == pytest.approx(row["bw_fraction"] / 4)
    assert 0 < row["max_rel_err"] <= 5e-3 and 0 < row["flash_max_rel_err"] <= 5e-3
    json.dumps(row)


def test_sweeps_append_rows_and_the_plot_reads_them(bench, monkeypatch, tmp_path, capsys, cpu_only):
    """Two-row prefill, decode and verify sweeps into a tmp JSONL, then --plot-only on it."""
    monkeypatch.setattr(bench, "time_gpu", FakeTimer(1.0))
    prefill, decode = bench.AttnShape(*TINY_PREFILL, "test"), bench.AttnShape("tiny-dec", *TINY_DECODE[1:], "test")
    run, out = _run(bench, l2_bytes=1, tokens=32), tmp_path / "attention.jsonl"
    env = {**ENV, "device": "cpu"}
    rows = bench.sweep_prefill([prefill], [16, 32], ["causal"], ["float16"], run, out, env)
    rows += bench.sweep_decode([decode], [16, 40], [2], ["float16"], run, out, env)
    rows += bench.sweep_verify([decode], [16], [2], [2, 5], ["float16"], run, out, env)
    written = bench.read_jsonl(out)
    assert [bench.describe(r) for r in written] == [bench.describe(r) for r in rows] == [
        "prefill tiny float16 causal S=16 x2", "prefill tiny float16 causal S=32 x1",
        "decode tiny-dec float16 B=2 ctx=16", "decode tiny-dec float16 B=2 ctx=40",
        "verify tiny-dec float16 B=2 ctx=16 q=2", "verify tiny-dec float16 B=2 ctx=16 q=5"]
    assert all(r["device"] == "cpu" and r["git_commit"] == "abc" for r in written)
    capsys.readouterr()
    bench.main(["--plot-only", "--out", str(out), "--dtypes", "float16"])
    assert (tmp_path / "attention.png").stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "n/a  (prefill)" in text and "n/a  (decode)" in text  # tiny shapes are outside the targets' scope
    assert "\nverify\n" in text and "speedup" in text  # the verify table


# ---- command line ------------------------------------------------------------------------------------------------

def test_without_gpu_main_says_so_and_exits_0(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same outcome on a GPU machine
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick"])
    assert exc.value.code == 0
    assert "bench/attention.py: no GPU here" in capsys.readouterr().out


def test_resolve_quick_full_and_explicit(bench):
    p = bench.parser()
    args = p.parse_args(["--quick", "--batches", "8"])
    bench.resolve(args)
    assert args.seqs == [1024, 4096, 16384] and args.batches == [8] and args.dtypes == ["bfloat16"]
    assert [s.name for s in args.prefill_shapes] == ["mha-d128", "gqa-d128"]
    args = p.parse_args([])
    bench.resolve(args)
    assert args.seqs == list(bench.SEQS) and args.contexts == list(bench.CONTEXTS) and args.masks == ["causal", "full"]
    assert args.dtypes == ["bfloat16", "float16"] and [s.name for s in args.decode_shapes] == ["gqa-d128", "gqa-d64"]
    assert args.part == ["prefill", "decode", "verify"] and args.tokens == 16384
    assert [s.name for s in args.verify_shapes] == ["gqa-d128", "gqa-d64"] and args.verify_batches == [1, 8, 32]
    assert args.q_lens == [2, 4, 8, 16] and args.verify_contexts == list(bench.CONTEXTS)
    args = p.parse_args(["--quick"])  # the GPU suite's run: a small verify sweep (8 rows) with the other parts
    bench.resolve(args)
    assert "verify" in args.part and [s.name for s in args.verify_shapes] == ["gqa-d128"]
    assert (args.verify_contexts, args.verify_batches, args.q_lens) == ([4096, 32768], [1, 32], [4, 16])


@pytest.mark.parametrize("argv, message", [(["--seqs", "0"], "must be an integer >= 1"),
                                           (["--prefill-shapes", "mha-d96"], "unknown shape 'mha-d96'"),
                                           (["--dtypes", "float32"], "invalid choice"),
                                           (["--part", "backward"], "invalid choice"),
                                           (["--q-lens", "17"], "q_len 17 is above MAX_VERIFY_QUERIES = 16"),
                                           (["--verify-contexts", "0"], "must be an integer >= 1")])
def test_bad_options_are_errors(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_plot_only_without_the_jsonl_is_an_error(bench, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--plot-only", "--out", str(tmp_path / "none.jsonl")])
    assert exc.value.code == 2


def test_plot_only_writes_the_png_tables_and_targets(bench, tmp_path, capsys):
    rows = [prefill_row(shape, dtype, causal, seq, ms=1.0, sdpa_ms=ratio)
            for shape, ratio in (("mha-d128", 1.1), ("gqa-d64", 0.7)) for dtype in ("bfloat16", "float16")
            for causal in (True, False) for seq in (1024, 4096, 16384)]
    rows += [decode_row(shape, batch=b, context=c, fraction=0.6 if b == 64 else 0.8)
             for shape in ("gqa-d128", "gqa-d64") for b in (1, 16, 64) for c in (512, 4096, 32768)]
    rows += [verify_row(batch=b, context=c, q_len=q, speedup=1.5) for b in (1, 32) for q in (4, 16)
             for c in (512, 4096, 32768)]
    rows.append(prefill_row("mha-d128", seq=4096, sdpa_ms=0.1, date="2024-01-01T00:00:00+00:00"))  # older: ignored
    path = tmp_path / "attention.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench.main(["--plot-only", "--out", str(path)])
    assert (tmp_path / "attention.png").stat().st_size > 30_000
    out = capsys.readouterr().out
    assert "wrote " in out and "(bfloat16)" in out  # bfloat16 plotted first
    assert "PASS (prefill)" in out and "0 of 4 rows below 0.9" in out  # mha-d128 bf16 S >= 4096, causal and full
    assert "MISS (decode)" in out and "4 of 8 rows below 0.7" in out and "B=64" in out  # batch 16, 64; ctx 4k, 32k
    lines = [line.split()[:2] for line in out.splitlines()]
    assert lines.count(["gqa-d64", "float16"]) == 6 and lines.count(["gqa-d64", "bfloat16"]) == 6 + 9  # both dtypes
    assert lines.count(["gqa-d128", "bfloat16"]) == 9 + 12 and "\nverify\n" in out  # decode, then verify rows
    bench.main(["--plot-only", "--out", str(path), "--dtypes", "float16"])
    out = capsys.readouterr().out
    lines = [line.split()[:2] for line in out.splitlines()]
    assert "(float16)" in out and lines.count(["mha-d128", "float16"]) == 6
    assert not any(line[1:] == ["bfloat16"] for line in lines)  # only the dtypes asked for
    assert "n/a  (prefill)" in out and "n/a  (decode)" in out
