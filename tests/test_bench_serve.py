"""bench/serve.py: its figures on synthetic results, and a small real run against `realm serve` (SmolLM2)."""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_bench_script


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("serve")


def test_summarise_and_compare(bench):
    results = [{"ttft_s": t, "itl_s": 0.01 * t, "e2e_s": 2 * t, "prompt_tokens": 10, "output_tokens": 5}
               for t in (1.0, 2.0, 3.0, 4.0)] + [{"error": "500: boom"}]
    s = bench.summarise(results, wall=4.0)
    assert s["requests"] == 5 and s["errors"] == 1 and s["first_error"] == "500: boom"
    assert s["output_tokens"] == 20 and s["output_tok_s"] == 5.0 and s["ttft_s"] == pytest.approx(2.5)
    assert s["ttft_s_p90"] == pytest.approx(3.7) and s["e2e_s"] == pytest.approx(5.0)
    day = "2026-01-01T00:00:00+00:00"
    rows = bench.with_comparison([{"device": "cpu", "date": day, "server": s, "concurrency": 32, "output_tok_s": v}
                                  for s, v in (("realm", 60.0), ("llama.cpp", 40.0))])
    assert rows[0]["vs_llama_cpp"] == pytest.approx(1.5) and rows[1]["vs_llama_cpp"] is None
    assert len(bench.prompt_mix()) == 24


def test_a_small_run_against_realm_serve(bench, tmp_path, capsys):
    out = tmp_path / "serve.jsonl"
    assert bench.main(["--servers", "realm", "--concurrency", "1", "2", "--requests", "2", "--max-tokens", "4",
                       "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["server"], r["concurrency"]) for r in rows] == [("realm", 1), ("realm", 2)]
    for r in rows:
        assert r["errors"] == 0 and r["requests"] == 2 and 0 < r["output_tokens"] <= 8
        assert r["output_tok_s"] > 0 and r["ttft_s"] > 0 and r["model"].endswith(".gguf")
        assert r["server_command"].startswith("python") and "--backend onednn" in r["server_command"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert "n/a (n32)" in capsys.readouterr().out  # no llama.cpp row: the target has nothing to judge


def test_a_small_run_against_both_servers(bench, tmp_path, capsys):
    """Both servers through the same client code (a kept-alive connection broke llama-server's second request once)."""
    binary = bench.default_llama_server()
    if binary is None:
        pytest.skip("llama.cpp's llama-server is not built (REALM_LLAMA_SERVER_BUILD=1 bash scripts/setup.sh, or bash "
                    "scripts/build_llama_server.sh)")
    out = tmp_path / "serve.jsonl"
    assert bench.main(["--llama-server", binary, "--concurrency", "1", "3", "--requests", "3", "--max-tokens", "4",
                       "--repeats", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["server"], r["concurrency"]) for r in rows] == [("realm", 1), ("llama.cpp", 1), ("realm", 3),
                                                               ("llama.cpp", 3)]
    for r in rows:
        assert r["errors"] == 0 and r["requests"] == 6 and 0 < r["output_tokens"] <= 24 and r["repeats"] == 2
        assert r["output_tok_s"] == pytest.approx(sum(r["output_tok_s_runs"]) / 2)  # the median of two
    assert rows[1]["server_command"].startswith("llama-server -m ") and "-np 3" in rows[1]["server_command"]
    assert "n/a (n32)" in capsys.readouterr().out  # compared at 1 and 3 clients; the target is judged at 32


def test_bad_llama_server_paths_are_refused(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--llama-server", str(tmp_path / "missing"), "--out", str(tmp_path / "x.jsonl")])
    assert "not an executable file" in capsys.readouterr().err
