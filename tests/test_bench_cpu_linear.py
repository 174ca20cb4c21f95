"""bench/cpu_linear.py on a tiny random model: every method at every row count, rows written, plot, --plot-only."""

from __future__ import annotations

import json

import pytest
import torch
from bench_scripts import load_bench_script
from tiny_gguf import write_tiny_llama

from realm.kernels import cpu_linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def test_a_small_run_writes_rows_and_a_plot(tmp_path, capsys):
    bench = load_bench_script("cpu_linear")
    model = tmp_path / "tiny.gguf"
    write_tiny_llama(model)
    out = tmp_path / "l.jsonl"
    assert bench.main(["--model", str(model), "--rows", "1", "3", "--hints", "1", "2", "--repeats", "1",
                       "--threads", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kernel = ("cpu_linear",) if cpu_linear.unavailable_reason() is None else ()
    assert {(r["method"], r["rows"]) for r in rows} == {(m, n) for m in ("f_linear", "onednn-1", "onednn-2", *kernel)
                                                        for n in (1, 3)}
    for r in rows:
        assert r["model"] == "tiny.gguf" and r["threads"] == 1 and r["ms"] > 0 and r["weight_gb"] > 0
        assert r["speedup"] == pytest.approx(
            next(b["ms"] for b in rows if b["method"] == "f_linear" and b["rows"] == r["rows"]) / r["ms"])
    assert out.with_suffix(".png").stat().st_size > 0
    out.with_suffix(".png").unlink()
    assert bench.main(["--plot-only", "--out", str(out)]) == 0
    assert out.with_suffix(".png").exists() and "onednn-2" in capsys.readouterr().out


def test_plot_only_needs_results(tmp_path):
    bench = load_bench_script("cpu_linear")
    with pytest.raises(SystemExit):
        bench.main(["--plot-only", "--out", str(tmp_path / "none.jsonl")])
