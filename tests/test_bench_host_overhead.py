"""bench/host_overhead.py end to end, briefly: it runs (in a subprocess, since it stubs Triton's launches for the whole
process), times decode steps on both backends and writes one row per backend and batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_host_overhead_writes_rows(tmp_path):
    out = tmp_path / "host.jsonl"
    proc = subprocess.run([sys.executable, "bench/host_overhead.py", "--steps", "3", "--batches", "1,2", "--label",
                           "test", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["backend"], r["batch"]) for r in rows] == [("torch", 1), ("torch", 2), ("triton", 1), ("triton", 2)]
    for r in rows:
        assert r["label"] == "test" and r["layers"] == 30 and r["step_us"] > 0 and r["calls_per_step"] > 100
        assert r["step_us_p20"] <= r["step_us"] <= r["step_us_p80"] and r["git_commit"] and r["realm_commit"]
    assert rows[2]["kernels"] == "stubbed"
    assert "calls_per_step" in proc.stdout and f"appended 4 rows to {out}" in proc.stdout
