"""bench/cpu_attention.py on a tiny random model's head layout: every method at every cell, rows written with the
kernel's error against the reference, plot, --plot-only."""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_bench_script
from tiny_gguf import write_tiny_llama

from realm.kernels.cpu_attention import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=f"the CPU attention kernel cannot be built here: {unavailable_reason()}")


def test_a_small_run_writes_rows_and_a_plot(tmp_path, capsys):
    bench = load_bench_script("cpu_attention")
    model = tmp_path / "tiny.gguf"
    write_tiny_llama(model)
    out = tmp_path / "a.jsonl"
    assert bench.main(["--model", str(model), "--batch", "1", "3", "--q-len", "1", "4", "--context", "40",
                       "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    methods = ("reference", "reference_gathers", "cpu_kernel")
    assert {(r["method"], r["batch"], r["q_len"]) for r in rows} == {(m, b, q) for m in methods for b in (1, 3)
                                                                       for q in (1, 4)}
    for r in rows:
        assert r["model"] == "tiny.gguf" and r["threads"] == 1 and r["ms"] > 0 and r["kv_mb"] > 0
        if r["method"] == "cpu_kernel":
            assert 0 <= r["max_abs_err"] < 1e-5
    assert out.with_suffix(".png").stat().st_size > 0
    out.with_suffix(".png").unlink()
    assert bench.main(["--plot-only", "--out", str(out)]) == 0
    assert out.with_suffix(".png").exists() and "cpu_kernel" in capsys.readouterr().out


def test_plot_only_needs_results(tmp_path):
    bench = load_bench_script("cpu_attention")
    with pytest.raises(SystemExit):
        bench.main(["--plot-only", "--out", str(tmp_path / "none.jsonl")])
