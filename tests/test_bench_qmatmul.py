"""bench/qmatmul.py on CPU: its roofline, target, family and latest-run computations on synthetic rows, its correctness
gate, the no-GPU exit, and --plot-only on a tiny JSONL. The GPU measurements themselves run only on a GPU."""

from __future__ import annotations

import json

import pytest
import torch
from bench_scripts import load_bench_script

from realm.quant import FORMATS, QTensor


def load_bench():
    return load_bench_script("qmatmul")


@pytest.fixture
def bench():
    return load_bench()


def measured(fmt="Q4_0", m=1, n=4096, k=4096, ms=0.02, torch_ms=0.1, date="2025-01-01T00:00:00+00:00", **extra):
    """A row as measure_row builds it, rates() included: 2-byte activations, 3000 GB/s and 600 TFLOP/s ceilings."""
    f = FORMATS[fmt]
    row = {"format": fmt, "bits_per_weight": f.bits_per_weight, "m": m, "n": n, "k": k, "dtype": "float16",
           "weight_bytes": n * f.row_bytes(k), "planes_bytes": n * f.row_bytes(k) + 1000, "x_bytes": 2 * m * k,
           "out_bytes": 2 * m * n, "ms": ms, "torch_ms": torch_ms, "bw_gbs": 3000.0, "matmul_tflops": 600.0,
           "date": date, "device": "test", "git_commit": "abc", **extra}
    return {**row, **load_bench().rates(row)}


def test_rates_memory_bound_row(bench):
    r = measured("Q4_0", m=1, ms=0.004)
    weight = 4096 * 4096 * 18 // 32  # 9.44 MB of GGUF blocks
    assert r["weight_bytes"] == weight
    assert r["bytes_moved"] == weight + 2 * 4096 + 2 * 4096
    assert r["weight_gbs"] == pytest.approx(weight / 4e-6 / 1e9)
    assert r["weight_bw_fraction"] == pytest.approx(weight / 4e-6 / 1e9 / 3000)
    assert r["planes_gbs"] > r["weight_gbs"]
    assert r["bound"] == "memory"
    assert r["roofline_ms"] == pytest.approx(r["bytes_moved"] / 3e12 * 1e3)
    assert r["roofline_fraction"] == pytest.approx(r["roofline_ms"] / 0.004)
    assert r["speedup"] == pytest.approx(0.1 / 0.004)
    assert r["tflops"] == pytest.approx(2 * 4096 * 4096 / 4e-6 / 1e12)


def test_rates_compute_bound_row(bench):
    r = measured("Q4_K", m=2048, ms=0.5, torch_ms=0.4)
    flops = 2 * 2048 * 4096 * 4096
    assert r["bound"] == "compute"
    assert r["roofline_ms"] == pytest.approx(flops / 600e12 * 1e3)
    assert r["roofline_fraction"] == pytest.approx(flops / 600e12 * 1e3 / 0.5)
    assert r["speedup"] == pytest.approx(0.8)


def test_family(bench):
    assert [bench.family(n) for n in ("Q4_0", "Q5_1", "Q8_0", "Q2_K", "Q6_K", "IQ4_XS", "MXFP4", "BF16", "F32")] == [
        "legacy", "legacy", "legacy", "kquants", "kquants", "nonlinear", "nonlinear", "float", "float"]
    assert {bench.family(n) for n in FORMATS} == set(bench.FAMILIES)  # every format has one
    with pytest.raises(ValueError, match="no family"):
        bench.family("Q1_0")


def test_rotation_sets(bench):
    l2 = 50 * 2**20
    assert bench.rotation_sets(10 * 2**20, l2) == 10  # 2 x L2 / 10 MB
    assert bench.rotation_sets(101 * 2**20, l2) == 1  # one weight beyond 2 x L2 is enough
    assert bench.rotation_sets(1, l2) == load_bench_script("harness").MAX_SETS


def _targets(bench, rows):
    return {res["target"]: res for res in bench.evaluate_targets(rows)}


def test_targets_pass(bench):
    bw = 0.9 * 3000e9 * 1e-3  # bytes per ms at 90% of the bandwidth
    rows = [measured(f, m=1, ms=measured(f)["weight_bytes"] / bw, torch_ms=1.0) for f in ("Q4_0", "Q5_1", "MXFP4")]
    rows += [measured("Q4_K", m=16, ms=0.01, torch_ms=0.03), measured("Q4_K", m=2048, ms=1.0, torch_ms=0.8)]
    res = _targets(bench, rows)
    assert [res[t]["status"] for t in "abc"] == ["PASS", "PASS", "PASS"]
    assert res["a"]["rows"] == 3 and res["b"]["rows"] == 4 and res["c"]["rows"] == 1
    assert res["a"]["worst"]["value"] == pytest.approx(0.9)


def test_targets_miss_names_the_worst_row(bench):
    bw = 3000e9 * 1e-3
    rows = [measured("Q4_0", m=1, ms=measured("Q4_0")["weight_bytes"] / (0.85 * bw), torch_ms=1.0),
            measured("IQ4_XS", m=1, ms=measured("IQ4_XS")["weight_bytes"] / (0.6 * bw), torch_ms=1.0),
            measured("Q5_K", m=1, n=14336, ms=measured("Q5_K", n=14336)["weight_bytes"] / (0.7 * bw), torch_ms=1.0),
            measured("Q4_K", m=8, ms=0.01, torch_ms=0.02),  # 2x: misses (b)
            measured("Q4_0", m=2048, ms=1.0, torch_ms=0.5)]  # half torch's throughput: misses (c)
    res = _targets(bench, rows)
    assert res["a"]["status"] == "MISS" and res["a"]["misses"] == 2
    assert res["a"]["worst"] == {"format": "IQ4_XS", "shape": "4096x4096", "m": 1, "value": pytest.approx(0.6)}
    assert res["b"]["status"] == "MISS" and res["b"]["worst"]["format"] == "Q4_K" and res["b"]["worst"]["m"] == 8
    assert res["c"]["status"] == "MISS" and res["c"]["worst"]["value"] == pytest.approx(0.5)


def test_targets_skip_formats_outside_their_scope(bench):
    """Q8_0 (8.5 bits) and Q6_K cannot reach 2.5x over 16-bit weights; (a) and (b) do not count them, (c) does."""
    rows = [measured("Q8_0", m=1, ms=1.0, torch_ms=1.0), measured("Q6_K", m=4, ms=1.0, torch_ms=1.0),
            measured("Q3_K", m=1, ms=1.0, torch_ms=1.0)]
    res = _targets(bench, rows)
    assert res["a"]["status"] == "n/a" and res["b"]["status"] == "n/a" and res["c"]["status"] == "n/a"
    res = _targets(bench, [*rows, measured("Q8_0", m=2048, ms=1.0, torch_ms=0.6)])
    assert res["c"]["status"] == "MISS" and res["c"]["worst"]["format"] == "Q8_0"


def test_latest_keeps_the_newest_row_per_key(bench):
    old, new = "2025-01-01T00:00:00+00:00", "2025-02-01T00:00:00+00:00"
    rows = [measured("Q4_0", m=1, ms=1.0, date=new), measured("Q4_0", m=1, ms=2.0, date=old),
            measured("Q4_0", m=16, ms=3.0, date=old), measured("Q4_0", m=16, ms=4.0, date=old),
            measured("Q4_0", m=1, ms=5.0, date=old, dtype="bfloat16")]
    got = {(r["m"], r["dtype"]): r["ms"] for r in bench.latest(rows, bench.KEY)}
    assert got == {(1, "float16"): 1.0, (16, "float16"): 4.0, (1, "bfloat16"): 5.0}  # equal dates: the later line


def test_check_accepts_the_kernel_and_rejects_a_wrong_result(bench, device, monkeypatch):
    """The gate before timing: qmatmul itself passes; an output off by 10% or left unwritten stops the run."""
    gen = torch.Generator().manual_seed(0)
    w = QTensor.from_float(torch.randn(64, 256, generator=gen) * 0.02, "Q4_0").repack("planes").to(device)
    x = torch.randn(3, 256, generator=gen).to(device, torch.float16)
    out = torch.empty(3, 64, dtype=torch.float16, device=device)
    assert bench.check(x, w, out, bench.TOLERANCE["float16"]) <= 2e-3
    real = bench.qmatmul
    monkeypatch.setattr(bench, "qmatmul", lambda x, w, out: out.copy_(real(x, w) * 1.1))
    with pytest.raises(RuntimeError, match="qmatmul is wrong for Q4_0"):
        bench.check(x, w, out, bench.TOLERANCE["float16"])
    monkeypatch.setattr(bench, "qmatmul", lambda x, w, out: out)  # writes nothing: the poison (NaN) remains
    with pytest.raises(RuntimeError, match="nan"):
        bench.check(x, w, out, bench.TOLERANCE["float16"])


def test_without_gpu_main_says_so_and_exits_0(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same outcome on a GPU machine
    with pytest.raises(SystemExit) as exc:
        bench.main([])
    assert exc.value.code == 0
    assert "no GPU" in capsys.readouterr().out


def test_plot_only_writes_pngs_next_to_the_jsonl(bench, tmp_path, capsys):
    rows = [measured(f, m=m, ms=0.01 * m, torch_ms=0.03 * m, tuned_configs=0, torch="t", triton="t", shape="4096x4096",
                     regime="decode" if m <= 16 else "prefill", config_source="default", max_rel_err=1e-4)
            for f in ("Q4_0", "Q4_K") for m in (1, 16, 2048)]
    path = tmp_path / "qmatmul.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench.main(["--plot-only", "--out", str(path)])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["qmatmul_kquants.png", "qmatmul_legacy.png"]
    assert all(p.stat().st_size > 10_000 for p in tmp_path.glob("*.png"))
    out = capsys.readouterr().out
    assert "PASS (b)" in out and "MISS (a)" in out  # 3x torch; at M = 1, 944 GB/s is 0.31 of 3000 GB/s
