"""bench/throughput.py: its workload generator, per-run figures, ratios and target on synthetic values, --plot-only on a
tiny JSONL, option errors, and real --quick runs on a tiny random model (realm's engine in both batching modes, and
transformers on the same weights when it is installed)."""

from __future__ import annotations

import itertools
import json
import math
import os
import sys

import pytest
import torch
from bench_scripts import load_bench_script
from tiny_gguf import TINY, StubTokenizer, write_tiny_llama

from realm.runtime import Backend, Model, load_weights
from realm.runtime.engine import EngineConfig

DATE, LATER = "2025-01-01T00:00:00+00:00", "2025-02-01T00:00:00+00:00"
CONTEXT = 128  # the tiny model's context: --quick's longest prompt (64) and output (32) fit


@pytest.fixture
def bench():
    return load_bench_script("throughput")


# ---- the workload ------------------------------------------------------------------------------------------------

def test_workload_is_seeded_nested_and_within_bounds(bench):
    w = bench.Workload(seed=3, prompt_min=16, prompt_max=256, output_min=8, output_max=256, output_median=32.0,
                       output_sigma=1.0)
    reqs = w.requests(500, vocab_size=1000)
    assert reqs == w.requests(500, vocab_size=1000)  # the same seed, the same requests
    assert w.requests(32, vocab_size=1000) == reqs[:32]  # N requests are the first N of one stream
    assert [r.max_tokens for r in w.requests(20, 50)] == [r.max_tokens for r in reqs[:20]]  # lengths: any vocabulary
    assert reqs != bench.Workload(seed=4).requests(500, 1000)
    prompts, outputs = [len(r.prompt_ids) for r in reqs], [r.max_tokens for r in reqs]
    assert 16 <= min(prompts) < 40 and 230 < max(prompts) <= 256  # uniform over the whole range
    assert min(outputs) == 8 and max(outputs) == 256  # clipped at both ends: the tail reaches the cap
    outputs.sort()
    assert 24 <= outputs[250] <= 40  # median ~32
    assert sum(o > 128 for o in outputs) >= 10  # a heavy tail: ~8% above 4x the median
    assert all(0 <= t < 1000 for r in reqs for t in r.prompt_ids)


def test_workload_rejects_bad_bounds(bench):
    for kwargs, message in (({"prompt_min": 0}, "prompt lengths"), ({"prompt_min": 9, "prompt_max": 8}, "prompt"),
                            ({"output_min": 9, "output_max": 8}, "output lengths"),
                            ({"output_median": 0.0}, "median must be > 0")):
        with pytest.raises(ValueError, match=message):
            bench.Workload(**kwargs)


def test_default_kv_blocks_hold_a_whole_batch(bench):
    w = bench.Workload()
    assert bench.default_kv_blocks(32, w, 16) == 32 * (512 // 16 + 1)
    short = bench.Workload(prompt_max=20, output_min=2, output_max=5)
    assert bench.default_kv_blocks(4, short, 8) == 4 * (4 + 1)  # 25 tokens: 4 blocks of 8


# ---- figures, ratios, target -------------------------------------------------------------------------------------

def a_run(bench, wall=2.0, ttft=(0.5, 1.0, 1.5, 2.0), decode=(10.0, 20.0, math.nan, 40.0)):
    return bench.RunResult(wall_s=wall, prompt_lens=[10, 20, 30, 40], wanted=[5, 5, 1, 9],
                           token_ids=[[1] * 5, [2] * 5, [3], [4] * 9], ttft_s=list(ttft), decode_tok_s=list(decode),
                           batch_sizes=[4, 4, 3, 1], generated_tokens=20, preemptions=2, cached_tokens=0)


def test_run_metrics(bench):
    m = bench.run_metrics(a_run(bench))
    assert m["output_tokens"] == 20 and m["prompt_tokens"] == 100
    assert m["output_tok_s"] == pytest.approx(10.0) and m["total_tok_s"] == pytest.approx(60.0)
    assert m["ttft_mean_s"] == pytest.approx(1.25) and m["ttft_p50_s"] == pytest.approx(1.25)
    assert m["ttft_p90_s"] == pytest.approx(1.85)
    assert m["decode_tok_s_p50"] == pytest.approx(20.0)  # the request of one token has no decode speed
    assert m["decode_tok_s_mean"] == pytest.approx(70 / 3)
    assert m["steps"] == 4 and m["mean_batch"] == pytest.approx(3.0) and m["max_batch"] == 4
    assert m["preemptions"] == 2


def test_build_row_takes_medians_over_repeats(bench):
    runs = [a_run(bench, wall=w) for w in (2.0, 1.0, 4.0)]
    row = bench.build_row({"engine": "e", "mode": "static"}, 4, runs)
    assert row["engine"] == "e" and row["n_requests"] == 4 and row["repeats"] == 3
    assert row["wall_s"] == 2.0 and row["output_tok_s"] == pytest.approx(10.0)
    assert row["output_tok_s_p20"] == pytest.approx(7.0) and row["output_tok_s_p80"] == pytest.approx(16.0)
    hf_like = a_run(bench, decode=(math.nan,) * 4)
    hf_like.preemptions = None
    row = bench.build_row({}, 4, [hf_like])
    assert row["decode_tok_s_mean"] is None and row["preemptions"] is None  # JSON has no NaN
    with pytest.raises(ValueError, match="at least one run"):
        bench.build_row({}, 4, [])


def test_match_fraction(bench):
    assert bench.match_fraction([[1, 2], [3]], [[1, 2], [4]]) == 0.5
    with pytest.raises(ValueError, match="runs of 1 and 2 requests"):
        bench.match_fraction([[1]], [[1], [2]])


def row(engine="realm torch float32", mode="continuous", n=128, tok_s=100.0, kind="realm", date=DATE,
        device="test gpu", device_kind="cuda", **extra):
    """A row as main() writes it (environment fields included)."""
    return {"engine": engine, "engine_kind": kind, "mode": mode, "n_requests": n, "output_tok_s": tok_s,
            "output_tok_s_p20": 0.9 * tok_s, "output_tok_s_p80": 1.1 * tok_s, "wall_s": 10.0, "output_tokens": 1000,
            "total_tok_s": 3 * tok_s, "ttft_p50_s": 1.0, "ttft_p90_s": 2.0, "decode_tok_s_p50": 5.0, "steps": 300,
            "mean_batch": 20.0, "preemptions": 0, "device": device, "device_kind": device_kind, "date": date,
            "git_commit": "abc", "torch": "t", "transformers": "5", "model": "m.gguf", "threads": 2,
            "prompt_dist": "uniform 16..256", "output_dist": "lognormal", "max_num_seqs": 32,
            "max_batch_tokens": 8192, "kv_blocks": 1056, "block_size": 16, **extra}


def test_ratios_pair_rows_of_one_run_engine_and_n(bench):
    rows = bench.add_ratios([row(tok_s=600.0), row(mode="static", tok_s=100.0),
                             row("transformers float16", "static", tok_s=200.0, kind="transformers"),
                             row(n=8, tok_s=50.0), row(n=8, mode="static", tok_s=40.0),
                             row("realm triton float16", tok_s=900.0),  # no static row of its own
                             row(tok_s=1.0, date=LATER)])  # a later run, alone
    assert rows[0]["static_ratio"] == pytest.approx(6.0) and rows[0]["hf_ratio"] == pytest.approx(3.0)
    assert rows[3]["static_ratio"] == pytest.approx(1.25) and rows[3]["hf_ratio"] is None
    assert rows[5]["static_ratio"] is None and rows[5]["hf_ratio"] == pytest.approx(4.5)
    assert rows[6]["static_ratio"] is None
    assert "static_ratio" not in rows[1] and "static_ratio" not in rows[2]


def test_target_pass_miss_on_gpu_and_na_on_cpu(bench):
    rows = bench.add_ratios([row(tok_s=600.0), row(mode="static", tok_s=100.0), row(n=32, tok_s=200.0),
                             row(n=32, mode="static", tok_s=100.0)])  # N=32 is not in the target's scope
    [res] = bench.evaluate_targets(rows)
    assert res["status"] == "PASS" and res["rows"] == 1
    rows = bench.add_ratios([row(tok_s=300.0), row(mode="static", tok_s=100.0)])
    [line] = bench.target_lines(rows)
    assert line.startswith("MISS (continuous) continuous >= 5x static") and "worst realm torch float32 N=128: 3.00x" \
        in line
    cpu = dict(device="test cpu", device_kind="cpu")
    rows = bench.add_ratios([row(tok_s=150.0, **cpu), row(mode="static", tok_s=100.0, **cpu)])
    [line] = bench.target_lines(rows)
    assert line.startswith("n/a") and "applies to GPUs; here (test cpu, N=128): realm torch float32 1.50x" in line


def test_plot_only_writes_the_png_table_and_target(bench, tmp_path, capsys):
    rows = []
    for n, cont, static, hf in ((1, 10.0, 10.0, 8.0), (8, 60.0, 40.0, 30.0), (32, 150.0, 60.0, 50.0),
                                (128, 200.0, 70.0, 55.0)):
        rows += [row(n=n, tok_s=cont), row(n=n, mode="static", tok_s=static),
                 row("transformers float16", "static", n=n, tok_s=hf, kind="transformers")]
    rows.append(row(n=128, tok_s=1.0, date="2024-01-01T00:00:00+00:00"))  # an older run: not the latest
    path = tmp_path / "throughput.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in bench.add_ratios(rows)))
    bench.main(["--plot-only", "--out", str(path)])
    assert (tmp_path / "throughput.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "MISS (continuous)" in out and "2.86x" in out  # 200 / 70 at N=128, the latest run
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("engine "))
    assert "static_ratio" in lines[header] and "hf_ratio" in lines[header]
    assert len(lines) - header == 2 + 12 + 2  # header, rule, the latest 12 rows (not the older one), blank, target


def test_plot_only_without_the_jsonl_is_an_error(bench, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--plot-only", "--out", str(tmp_path / "none.jsonl")])
    assert exc.value.code == 2


def test_bad_options_are_errors(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, message in ((["--device", "cuda"], "no CUDA device"), (["--requests", "0"], "must be an integer >= 1"),
                          (["--backends", "triton"], "--backends triton needs --device cuda"),
                          (["--backends", "torch,tensorrt"], "backends must be a comma list of torch, triton"),
                          (["--prompt-lens", "9", "8"], "prompt lengths need 1 <= min <= max"),
                          (["--warmup", "-1"], "--warmup must be >= 0")):
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_crowded_cpu_warning(bench):
    assert bench.crowded_cpu(threads=2, busy=0.3, cpus=2) is None  # a quiet machine
    assert bench.crowded_cpu(threads=1, busy=1.0, cpus=2) is None  # one core for us, one for the other process
    assert bench.crowded_cpu(threads=1, busy=3.0, cpus=2) is None  # nothing better to suggest
    assert bench.crowded_cpu(threads=2, busy=None, cpus=2) is None  # not known
    warning = bench.crowded_cpu(threads=2, busy=1.2, cpus=2)
    assert warning.startswith("warning: other processes keep 1.2 of 2 cores busy and torch has 2 threads")
    assert "use --threads 1" in warning
    busy = bench.other_busy_cpus(0.05)
    if sys.platform == "linux":  # /proc/stat
        assert busy is not None and 0 <= busy <= os.cpu_count()  # a share of the machine's cores


def test_hf_notes(bench, monkeypatch):
    assert bench.hf_note(skip=True) == "transformers: not measured (--no-hf)"
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    assert "not importable" in bench.hf_note(skip=False)


# ---- real runs on a tiny random model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the GGUF path, its HF-layout weights) of a tiny random llama."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    return path, write_tiny_llama(path, context_length=CONTEXT)


def tiny_model(path, device="cpu", backend="torch"):
    return Model(load_weights(path), StubTokenizer(TINY["vocab"]), Backend(backend), torch.device(device),
                 torch.float32)


def tiny_hf(state):
    transformers = pytest.importorskip("transformers")
    t = TINY
    config = transformers.LlamaConfig(
        vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["ffn"], num_hidden_layers=t["layers"],
        num_attention_heads=t["n_heads"], num_key_value_heads=t["n_kv_heads"], head_dim=t["head_dim"],
        rms_norm_eps=t["eps"], rope_theta=t["theta"], max_position_embeddings=CONTEXT, eos_token_id=2,
        pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(state)
    return model


def test_continuous_and_static_give_the_same_greedy_tokens(bench, tiny):
    """Only the scheduling differs: every request gets the same ids; static runs in waves of max_num_seqs."""
    model = tiny_model(tiny[0])
    requests = bench.Workload(prompt_min=8, prompt_max=40, output_min=2, output_max=30, output_median=8.0).requests(
        10, TINY["vocab"])
    runs = {}
    for mode in bench.MODES:
        config = EngineConfig(max_batch_tokens=4 * 40, max_num_seqs=4, kv_blocks=4 * 5, block_size=16, batching=mode)
        runner = bench.RealmRunner(model, config, torch.device("cpu"))
        runs[mode] = runner.run(requests)
        assert runner.fields["mode"] == mode
        assert [len(t) for t in runs[mode].token_ids] == [r.max_tokens for r in requests]
        assert not runner.engine.has_work and runner.engine.blocks.num_used == 0
    assert runs["continuous"].token_ids == runs["static"].token_ids
    static, continuous = runs["static"].batch_sizes, runs["continuous"].batch_sizes
    assert max(static) == 4 and max(continuous) == 4
    # static: the batch only shrinks between refills (3 waves of 4, 4, 2); continuous refills as requests finish
    refills = sum(b > a for a, b in itertools.pairwise(static))
    assert refills == 2
    assert len(continuous) < len(static)


def run_quick(bench, monkeypatch, tmp_path, tiny, *extra) -> list[dict]:
    path, state = tiny
    monkeypatch.setattr(bench, "load_realm", lambda p, device, backend: tiny_model(p, device, backend))
    monkeypatch.setattr(bench, "load_hf", lambda p, device, dtype: tiny_hf(state))
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--model", str(path), "--threads", "2", "--out", str(tmp_path / "throughput.jsonl"),
                    *extra])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "throughput.png").stat().st_size > 10_000
    return bench.read_jsonl(tmp_path / "throughput.jsonl")


def test_quick_run_writes_rows_and_a_plot(bench, monkeypatch, tmp_path, tiny, capsys):
    pytest.importorskip("transformers")
    rows = run_quick(bench, monkeypatch, tmp_path, tiny, "--repeats", "2")
    assert [(r["engine"], r["mode"], r["n_requests"]) for r in rows] == [
        (engine, mode, n) for n in (1, 8) for engine, mode in (("realm torch float32", "continuous"),
                                                               ("realm torch float32", "static"),
                                                               ("transformers float32", "static"))]
    wanted = [r.max_tokens for r in bench.Workload(**{"prompt_min": 16, "prompt_max": 64, "output_min": 4,
                                                      "output_max": 32, "output_median": 8.0}).requests(8, 50)]
    for r in rows:
        assert r["output_tokens"] == sum(wanted[: r["n_requests"]]) and r["repeats"] == 2
        assert r["output_tok_s_p20"] <= r["output_tok_s"] <= r["output_tok_s_p80"]
        assert r["output_tok_s"] > 0 and r["total_tok_s"] > r["output_tok_s"]
        assert 0 < r["ttft_p50_s"] <= r["ttft_p90_s"] <= r["wall_s"]
        assert r["max_num_seqs"] == 4 and r["max_batch_tokens"] == 512 and r["kv_blocks"] == 4 * (96 // 16 + 1)
        assert r["max_batch"] <= 4 and r["block_size"] == 16 and r["threads"] == 2 and r["device_kind"] == "cpu"
        assert r["prompt_dist"] == "uniform 16..64" and r["workload_output_max"] == 32
        assert r["git_commit"] and r["date"] and r["transformers"] and r["model"] == "tiny.gguf"
        assert "other_busy_cpus" in r and "other_busy_cpus_end" in r
    by = {(r["engine_kind"], r["mode"], r["n_requests"]): r for r in rows}
    for n in (1, 8):
        cont = by[("realm", "continuous", n)]
        assert cont["static_match"] == 1.0  # greedy, same engine: identical tokens
        assert cont["static_ratio"] == pytest.approx(cont["output_tok_s"] / by[("realm", "static", n)]["output_tok_s"])
        assert cont["hf_ratio"] > 0 and cont["preemptions"] == 0 and cont["pad_tokens"] == 0
        hf = by[("transformers", "static", n)]
        assert 0 <= hf["realm_match"] <= 1 and hf["preemptions"] is None
        assert hf["generated_tokens"] >= hf["output_tokens"]
    hf8 = by[("transformers", "static", 8)]
    assert hf8["pad_tokens"] > 0 and hf8["generated_tokens"] > hf8["output_tokens"]  # padding and overrun
    assert hf8["steps"] == max(wanted[:4]) + max(wanted[4:8])  # two batches of 4, each to its longest
    assert by[("realm", "static", 8)]["steps"] > by[("realm", "continuous", 8)]["steps"]
    out = capsys.readouterr().out
    assert "n/a  (continuous)" in out and "applies to GPUs" in out
    assert out.count("N=8 ") == 2 * 3  # progress: 2 repeats x 3 engines and modes


def test_quick_run_without_transformers(bench, monkeypatch, tmp_path, tiny, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)
    rows = run_quick(bench, monkeypatch, tmp_path, tiny, "--requests", "3")
    assert [(r["mode"], r["n_requests"]) for r in rows] == [("continuous", 3), ("static", 3)]
    assert rows[0]["hf_ratio"] is None and rows[0]["transformers"] is None and "not importable" in rows[0]["note"]
    assert "transformers: not measured" in capsys.readouterr().out
