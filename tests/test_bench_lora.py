"""bench/lora.py on a tiny model: the CPU run end to end (rows, their fields and baselines, the plot, --plot-only), the
Triton path's fused and separate rows under the interpreter (the code a GPU run takes, checked against the reference
delta), and its pure pieces: row slots, configs, loss, the target."""

from __future__ import annotations

import pytest
import torch
from bench_scripts import load_bench_script
from tiny_gguf import write_tiny_llama

from realm.runtime.lora import LoraMode
from realm.runtime.ops import Backend
from realm.runtime.transformer import Transformer
from realm.runtime.weights import load_weights


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("lora")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "tiny.gguf"
    write_tiny_llama(path, context_length=64)
    return path


def test_row_slots_round_robin_and_adapter_free_rows(bench):
    assert bench.row_slots(6, 4) == [0, 1, 2, 3, 0, 1]
    assert bench.row_slots(3, 1) == [0, 0, 0]
    assert bench.row_slots(8, 3, free_every=4) == [0, 1, 2, -1, 0, 1, 2, -1]


def test_configs_skip_more_adapters_than_rows(bench):
    sweep = bench.Sweep(ranks=(8,), adapters=(1, 4, 16), padded=(8, 64))
    got = bench.configs(sweep, batch=16, mixes=True)
    assert (8, 8, 16, 0) in got and (8, 64, 16, 0) in got
    assert (8, 8, 4, 4) in got and (8, 8, 16, 4) not in got  # 12 adapted rows cannot hold 16 adapters
    assert all(free == 0 for *_, free in bench.configs(sweep, batch=16, mixes=False))


def test_loss_and_target(bench):
    assert bench.loss_pct(1.0, 1.25) == pytest.approx(20.0)
    assert bench.loss_pct(1.0, 0.9) < 0

    def row(loss, **kw):
        r = {"device": "gpu", "device_kind": "cuda", "part": "decode_step", "mode": "fused", "n_adapters": 16,
             "rank": 16, "pool_rank": 16, "batch": 64, "adapter_free_rows": 0, "loss_pct": loss}
        return {**r, **kw, "neg_loss_pct": -loss}

    results = {r["target"]: r for r in bench.target_results(
        [row(8.0), row(30.0, rank=64), row(12.0, mode="separate"), row(50.0, device_kind="cpu")], bench.targets(),
        lambda r: r)}
    assert results["fused"]["status"] == "PASS" and results["fused"]["rows"] == 1
    assert results["separate"]["status"] == "MISS"


def test_cpu_run_writes_rows_and_plot(bench, tiny, tmp_path, capsys):
    out = tmp_path / "lora.jsonl"
    threads = torch.get_num_threads()
    assert bench.main(["--model", str(tiny), "--device", "cpu", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GPU part skipped" in printed and "no GPU rows" in printed
    assert torch.get_num_threads() == threads  # the run's --threads 1 is not left behind
    rows = bench.read_jsonl(out)
    linear = [r for r in rows if r["part"] == "linear"]
    steps = [r for r in rows if r["part"] == "decode_step"]
    quick = bench.QUICK
    # (2 ranks + the padded pool) x 3 n: per linear layer twice (every row adapted; every 4th row not), per step once
    assert len(linear) == 3 * 2 * 9 and len(steps) == 9
    for r in rows:
        assert r["backend"] == "torch" and r["mode"] == "reference" and r["device_kind"] == "cpu"
        for key in ("ms", "base_ms", "cpu_ms", "base_cpu_ms"):
            assert 0 < r[f"{key}_p20"] <= r[key] <= r[f"{key}_p80"], key
        assert r["threads"] == 1 and r["loss_basis"] == "thread CPU time"  # one torch thread: CPU time
        assert r["loss_pct"] == pytest.approx(100 * (1 - r["base_cpu_ms"] / r["cpu_ms"]))
        assert r["loss_pct_wall"] == pytest.approx(100 * (1 - r["base_ms"] / r["ms"]))
        assert r["git_commit"] and r["date"] and r["torch"] and r["quick"] is True and r["repeats"] == 2
        assert r["rank"] in quick.ranks and r["pool_rank"] >= r["rank"] and r["n_adapters"] in quick.adapters
    assert {r["layer"] for r in linear} == {"qkv", "gate_up", "down"}
    assert {r["batch"] for r in linear} == {8} and {r["adapter_free_rows"] for r in linear} == {0, 2}
    assert {(r["rank"], r["pool_rank"]) for r in linear} == {(4, 4), (8, 8), (4, 8)}
    for r in steps:
        assert r["batch"] == 4 and r["tokens_per_s"] == pytest.approx(4e3 / r["cpu_ms"]) and r["pool_bytes"] > 0
        assert r["modules"] == "q,k,v,o,gate,up,down"
    png = out.with_suffix(".png")
    assert png.stat().st_size > 10_000
    png.unlink()
    assert bench.main(["--plot-only", "--out", str(out)]) == 0
    assert png.exists()


def test_triton_modes_under_the_interpreter(bench, tiny):
    """The GPU run's path, fused and separate, on the CPU through Triton's interpreter; each layer is checked against
    the reference delta before it is timed."""
    weights = load_weights(tiny)
    sweep = bench.Sweep(ranks=(4,), adapters=(2,), padded=None, linear_batch=4, step_batch=2, prompt_tokens=3)
    timer = bench.cpu_timer(repeats=1, warmup=0)
    modes = [LoraMode.FUSED, LoraMode.SEPARATE]
    cpu = torch.device("cpu")
    rows = bench.measure_linear(weights, Backend.TRITON, cpu, torch.float32, modes, sweep, timer, layers=["qkv"],
                                check=True, log=lambda line: None)
    assert [(r["mode"], r["adapter_free_rows"]) for r in rows] == [("fused", 0), ("separate", 0), ("fused", 1),
                                                                    ("separate", 1)]
    steps = bench.measure_step(Transformer(weights, Backend.TRITON, cpu), modes, sweep, timer, log=lambda line: None)
    assert [r["mode"] for r in steps] == ["fused", "separate"] and all(r["backend"] == "triton" for r in steps)
