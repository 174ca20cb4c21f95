"""bench/tensor_parallel.py run as a script (its ranks are spawned processes that import it as the main module) on a
tiny random model: rows for every world size and batch, communication volumes from the model's shape, the plot,
--plot-only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tiny_gguf import TINY, write_tiny_llama

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "tensor_parallel.py"


def test_a_small_run_writes_rows_and_a_plot(tmp_path):
    model = tmp_path / "tiny.gguf"
    write_tiny_llama(model)
    out = tmp_path / "tp.jsonl"
    run = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model), "--backend", "torch", "--world", "1",
                          "2", "--batch", "1", "3", "--context", "4", "--steps", "2", "--threads", "2", "--out",
                          str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["world"], r["batch"]) for r in rows} == {(1, 1), (1, 3), (2, 1), (2, 3)}
    for r in rows:
        assert r["step_ms"] > 0 and r["tok_s"] > 0 and r["threads_per_rank"] == 2 // r["world"]
        expected = 2 * TINY["layers"] * r["batch"] * TINY["hidden"] * 4 / 1e6 if r["world"] > 1 else 0.0
        assert r["allreduce_mb"] == expected
        assert r["gather_mb"] == r["batch"] * TINY["vocab"] * 4 * (r["world"] - 1) / r["world"] / 1e6
        one_rank = next(b for b in rows if b["world"] == 1 and b["batch"] == r["batch"])
        assert r["speedup"] == one_rank["step_ms"] / r["step_ms"]
    assert out.with_suffix(".png").stat().st_size > 0
    out.with_suffix(".png").unlink()
    replot = subprocess.run([sys.executable, str(SCRIPT), "--plot-only", "--out", str(out)], capture_output=True,
                            text=True, timeout=120)
    assert replot.returncode == 0 and out.with_suffix(".png").exists() and "allreduce_mb" in replot.stdout
