"""bench/generate.py: its row, ratio, target and latest-run computations on synthetic rows, --plot-only on a tiny
JSONL, the notes when llama.cpp is not measured, and two real runs with tiny settings (realm alone with llama_cpp
hidden, then realm beside llama.cpp) that load the default model once."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from bench_scripts import load_bench_script

DATE, LATER = "2025-01-01T00:00:00+00:00", "2025-02-01T00:00:00+00:00"


def load_bench():
    return load_bench_script("generate")


@pytest.fixture
def bench():
    return load_bench()


def measured(engine="realm torch float32", kind="realm", prompt_tokens=40, decode=40.0, prefill=400.0, date=DATE,
             **extra):
    """A row as main() writes it (environment fields included), with a +-10% spread around the medians."""
    row = {"engine": engine, "engine_kind": kind, "backend": "torch" if kind == "realm" else "llama.cpp",
           "dtype": "float32" if kind == "realm" else "gguf", "compute_device": "cpu", "prompt": "short",
           "prompt_tokens": prompt_tokens, "new_tokens": 128, "repeats": 5, "decode_tok_s": decode,
           "decode_tok_s_p20": 0.9 * decode, "decode_tok_s_p80": 1.1 * decode, "prefill_tok_s": prefill,
           "prefill_tok_s_p20": 0.9 * prefill, "prefill_tok_s_p80": 1.1 * prefill, "weight_gbs": 10.0,
           "bw_gbs": 10.0, "bw_fraction": 1.0, "device": "test cpu", "device_kind": "cpu", "date": date,
           "git_commit": "abc", "torch": "t", "llama_cpp": "0.0", "model": "m.gguf", "threads": 2, **extra}
    if kind == "realm":
        row.setdefault("agree_prefix", 7)
    return row


def test_spread_is_median_and_20_80_quantiles(bench):
    assert bench.spread([5.0, 1.0, 3.0, 2.0, 4.0]) == {"median": 3.0, "p20": pytest.approx(1.8),
                                                       "p80": pytest.approx(4.2)}
    assert bench.spread([7.0]) == {"median": 7.0, "p20": 7.0, "p80": 7.0}
    with pytest.raises(ValueError, match="no values"):
        bench.spread([])


def test_build_row_counts_decode_after_the_first_token(bench):
    """11 new tokens: the first comes out of the prefill, the 10 others take decode_s."""
    engine = {"engine": "realm torch float32", "engine_kind": "realm"}
    samples = [bench.Sample(prefill_s=0.5, decode_s=d, token_ids=tuple(range(11))) for d in (1.0, 0.5, 2.0)]
    row = bench.build_row(engine, "short", 40, 11, samples, bytes_per_token=500_000_000, bw_gbs=10.0)
    assert row["engine"] == "realm torch float32" and row["repeats"] == 3
    assert row["decode_tok_s"] == pytest.approx(10.0)  # median of 10, 20, 5 tok/s
    assert row["decode_tok_s_p20"] == pytest.approx(7.0) and row["decode_tok_s_p80"] == pytest.approx(16.0)
    assert row["prefill_tok_s"] == pytest.approx(80.0) and row["prefill_ms"] == pytest.approx(500.0)
    assert row["decode_ms_per_token"] == pytest.approx(100.0)
    assert row["weight_gbs"] == pytest.approx(5.0) and row["bw_fraction"] == pytest.approx(0.5)


def test_build_row_rejects_a_short_generation(bench):
    engine = {"engine": "llama.cpp", "engine_kind": "llama.cpp"}
    with pytest.raises(RuntimeError, match="generated 3 tokens, not 4"):
        bench.build_row(engine, "short", 40, 4, [bench.Sample(0.1, 0.1, (1, 2, 3))], 1, 1.0)
    with pytest.raises(ValueError, match="at least 2 new tokens"):
        bench.build_row(engine, "short", 40, 1, [bench.Sample(0.1, 0.0, (1,))], 1, 1.0)


def test_decode_bytes_counts_layer_matrices_and_the_head(bench):
    q = lambda rows, cols: SimpleNamespace(shape=(rows, cols), nbytes=rows * cols // 2)  # noqa: E731 - 4 bits
    layer = SimpleNamespace(wq=q(8, 16), wk=q(4, 16), wv=q(4, 16), wo=q(16, 8), w_gate=q(32, 16), w_up=q(32, 16),
                            w_down=q(16, 32))
    weights = SimpleNamespace(layers=[layer, layer], output=q(100, 16), token_embd=q(100, 16))
    per_layer = 16 * (8 + 4 + 4 + 8 + 32 + 32 + 32)
    assert bench.decode_bytes(weights, torch.float32) == 4 * (2 * per_layer + 1600)
    assert bench.decode_bytes(weights, torch.bfloat16) == 2 * (2 * per_layer + 1600)
    assert bench.decode_bytes(weights, None) == (2 * per_layer + 1600) // 2


def test_common_prefix(bench):
    assert bench.common_prefix([1, 2, 3, 4], [1, 2, 5, 4]) == 2
    assert bench.common_prefix([1, 2], [1, 2, 3]) == 2
    assert bench.common_prefix([9], [1]) == 0


def test_other_load_subtracts_our_own_cpu_time(bench):
    assert bench.other_load((100.0, 10.0), (130.0, 30.0), wall_s=10.0) == pytest.approx(1.0)  # 30 s busy, 20 ours
    assert bench.other_load((100.0, 10.0), (119.0, 30.0), wall_s=10.0) == 0.0  # clock ticks vs os.times rounding
    assert bench.other_load(None, (1.0, 1.0), 10.0) is None
    before = bench.busy_cpu_s()
    if sys.platform == "linux":  # /proc/stat
        assert before is not None and before[0] >= before[1] >= 0


def test_ratios_pair_rows_of_one_run_and_prompt(bench):
    rows = [measured(decode=40.0, prefill=400.0), measured("llama.cpp", "llama.cpp", decode=100.0, prefill=200.0),
            measured(prompt_tokens=512, decode=30.0),
            measured("llama.cpp", "llama.cpp", prompt_tokens=512, decode=50.0),
            measured("realm torch bfloat16", decode=20.0, date=LATER)]  # a later run without llama.cpp
    bench.add_ratios(rows)
    assert rows[0]["decode_ratio"] == pytest.approx(0.4) and rows[0]["prefill_ratio"] == pytest.approx(2.0)
    assert rows[0]["llama_decode_tok_s"] == 100.0
    assert rows[2]["decode_ratio"] == pytest.approx(0.6)
    assert rows[4]["decode_ratio"] is None and rows[4]["llama_decode_tok_s"] is None
    assert "decode_ratio" not in rows[1]


def test_target_pass_miss_and_na(bench):
    rows = bench.add_ratios([measured(decode=40.0), measured("llama.cpp", "llama.cpp", decode=100.0),
                             measured(prompt_tokens=512, decode=60.0),
                             measured("llama.cpp", "llama.cpp", prompt_tokens=512, decode=100.0)])
    results = bench.evaluate_target(rows)
    assert [(r["status"], r["prompt_tokens"]) for r in results] == [("MISS", 40), ("PASS", 512)]
    line = bench.target_line(results[0])
    assert line.startswith("target: realm decode >= 0.5x llama.cpp decode: MISS (0.40x")
    assert "40.0 vs 100.0 tok/s" in line
    assert bench.target_line(results[1]).startswith("target: realm decode >= 0.5x llama.cpp decode: PASS (0.60x")
    assert bench.evaluate_target(bench.add_ratios([measured()])) == [{"status": "n/a", "ratio": None}]
    assert "n/a" in bench.target_line({"status": "n/a", "ratio": None})


def test_latest_keeps_the_newest_row_per_engine_device_and_prompt(bench):
    rows = [measured(decode=1.0, date=LATER), measured(decode=2.0), measured(decode=3.0, prompt_tokens=512),
            measured(decode=4.0, prompt_tokens=512), measured(decode=5.0, device="other cpu")]
    got = {(r["prompt_tokens"], r["device"]): r["decode_tok_s"] for r in bench.latest(rows, bench.KEY)}
    assert got == {(40, "test cpu"): 1.0, (512, "test cpu"): 4.0, (40, "other cpu"): 5.0}  # equal dates: later line


def test_plot_only_writes_the_png_table_and_target(bench, tmp_path, capsys):
    rows = bench.add_ratios([measured(decode=40.0, prefill=300.0),
                             measured("llama.cpp", "llama.cpp", decode=100.0, prefill=900.0),
                             measured(prompt_tokens=512, decode=35.0, prefill=250.0),
                             measured("llama.cpp", "llama.cpp", prompt_tokens=512, decode=90.0, prefill=800.0)])
    path = tmp_path / "generate.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench.main(["--plot-only", "--out", str(path)])
    png = tmp_path / "generate.png"
    assert png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "target: realm decode >= 0.5x llama.cpp decode: MISS (0.40x" in out
    assert "MISS (0.39x" in out and "llama.cpp" in out


def test_plot_only_without_the_jsonl_is_an_error(bench, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--plot-only", "--out", str(tmp_path / "none.jsonl")])
    assert exc.value.code == 2


def test_llama_cpp_notes(bench, monkeypatch):
    assert bench.import_llama_cpp(torch.device("cpu"), skip=True) == (None, "llama.cpp: not measured (--no-llama)")
    module, note = bench.import_llama_cpp(torch.device("cuda"), skip=False)
    assert module is None and "CPU build" in note
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    module, note = bench.import_llama_cpp(torch.device("cpu"), skip=False)
    assert module is None and "not importable" in note and "realm alone" in note


def test_bad_options_are_errors(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, message in ((["--device", "cuda"], "no CUDA device"), (["--tokens", "1"], "--tokens must be >= 2"),
                          (["--dtypes", "float8"], "dtypes must be"), (["--repeats", "0"], "--repeats must be >= 1"),
                          (["--backends", "torch,tensorrt"], "backends must be a comma list of torch, triton"),
                          (["--backends", "triton"], "--backends triton needs --device cuda")):
        with pytest.raises(SystemExit) as exc:
            load_bench().main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


# ---- real runs with tiny settings: the default model is loaded once for both -------------------------------------

_MODELS: dict[tuple, object] = {}  # (path, device, dtype) -> the loaded model, shared by the runs below


TINY = ["--tokens", "4", "--repeats", "1", "--warmup", "0", "--long-prompt", "16", "--threads", "2"]


def _run(bench, monkeypatch, tmp_path, *extra) -> list[dict]:
    load = bench.load_realm

    def cached(*key):
        if key not in _MODELS:
            _MODELS[key] = load(*key)
        return _MODELS[key]

    monkeypatch.setattr(bench, "load_realm", cached)
    monkeypatch.setattr(bench, "COPY_BYTES", 16 * 2**20)  # the bandwidth ceiling's size does not matter here
    threads = torch.get_num_threads()
    try:
        bench.main([*TINY, "--out", str(tmp_path / "generate.jsonl"), *extra])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "generate.png").stat().st_size > 10_000
    return bench.read_jsonl(tmp_path / "generate.jsonl")


def test_run_realm_alone_when_llama_cpp_is_missing(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    rows = _run(bench, monkeypatch, tmp_path)
    out = capsys.readouterr().out
    assert "llama_cpp is not importable" in out and "n/a (no llama.cpp row" in out
    assert [(r["engine"], r["prompt"], r["prompt_tokens"]) for r in rows] == [
        ("realm torch float32", "short", rows[0]["prompt_tokens"]), ("realm torch float32", "long", 16)]
    for r in rows:
        assert r["new_tokens"] == 4 and r["threads"] == 2 and r["cpu_threads"] == 2 and r["llama_cpp"] is None
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["decode_ratio"] is None
        assert r["decode_bytes_per_token"] > 400e6  # 134 M float32 weights per token: SmolLM2-135M's matrices
        assert r["git_commit"] and r["device"] and r["date"] and "other_load" in r


@pytest.mark.llama_cpp
def test_run_beside_llama_cpp(bench, monkeypatch, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    rows = _run(bench, monkeypatch, tmp_path)
    assert [r["engine"] for r in rows] == ["realm torch float32", "llama.cpp"] * 2
    realm_rows = [r for r in rows if r["engine_kind"] == "realm"]
    llama_rows = [r for r in rows if r["engine_kind"] == "llama.cpp"]
    assert all(r["llama_cpp"] for r in rows) and all(r["n_batch"] >= 16 for r in llama_rows)
    assert [r["prompt_tokens"] for r in realm_rows] == [r["prompt_tokens"] for r in llama_rows]
    for r in realm_rows:
        assert r["decode_ratio"] > 0
        assert r["agree_prefix"] >= 1  # same ids in, same weights: the first greedy token agrees
    assert llama_rows[0]["decode_bytes_per_token"] < realm_rows[0]["decode_bytes_per_token"] / 4  # Q4_1 vs float32
    out = capsys.readouterr().out
    assert out.count("target: realm decode >= 0.5x llama.cpp decode: ") == 2
