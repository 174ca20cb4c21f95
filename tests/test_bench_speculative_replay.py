"""bench/speculative_replay.py: the replay's policies and pricing on synthetic outputs and cost tables, checked
against prompt lookup's step count (bench/speculative.py's lookup_steps); a real run on a tiny random model (rows,
plot, --plot-only)."""

from __future__ import annotations

import json

import pytest
import torch
from bench_scripts import load_bench_script
from tiny_gguf import TINY, StubTokenizer, write_tiny_llama

from realm.runtime import Backend, Model, load_weights

# A prompt that repeats itself and an output that copies long runs of it, with a few tokens of its own.
TEXT = [5, 9, 2, 7, 7, 3, 1, 8, 4, 6, 2, 9, 11, 13, 12, 10]
PROMPT = TEXT * 2
OUTPUT = [5, 9, 2, 7, 7, 3, 20, 1, 8, 4, 6, 2, 9, 21, 11, 13, 12, 10, 5, 9, 2, 22, 23, 7, 3]
DECODE = 0.02
# Rows cost more and more: the 2nd row adds 10% of a decode, every later one 5% more than the one before.
TABLE = {rows: DECODE * (1 + sum(0.1 + 0.05 * i for i in range(rows - 1))) for rows in range(1, 17)}


@pytest.fixture(scope="module")
def replay():
    return load_bench_script("speculative_replay")


@pytest.fixture(scope="module")
def spec_bench():
    return load_bench_script("speculative")


def run(replay, policy, row_cost=1.0, noise=0.0, seed=0, k_max=15, table=TABLE, outputs=(OUTPUT,), lockstep=True):
    return replay.replay([PROMPT] * len(outputs), list(outputs), policy, replay.step_price(table, row_cost), noise,
                         seed, k_max, max(len(o) for o in outputs),
                         replay.SpeculativeConfig("ngram", ngram_lockstep=lockstep))


def test_accepted_run_is_the_common_prefix_within_the_output(replay):
    assert replay.accepted_run([4, 5, 6], [1, 4, 5, 7], 1) == 2
    assert replay.accepted_run([4, 5, 6], [1, 4, 5, 6, 8], 1) == 3
    assert replay.accepted_run([4, 5, 6], [1, 4, 5], 1) == 2  # the output ends: no more to accept
    assert replay.accepted_run([], [1, 4], 1) == 0
    assert replay.accepted_run([9], [1, 4], 1) == 0


def test_fixed_takes_prompt_lookups_steps(replay, spec_bench):
    fixed = run(replay, "fixed")
    assert fixed.steps == spec_bench.lookup_steps(PROMPT, OUTPUT)
    assert fixed.steps < len(OUTPUT)  # the copied runs are accepted several tokens a step
    assert fixed.proposed > fixed.accepted > 0
    ngrams = run(replay, "fixed", lockstep=False)
    assert ngrams.steps == spec_bench.lookup_steps(PROMPT, OUTPUT, lookup=lambda: spec_bench.engine_lookup(False))


def test_the_oracle_verifies_only_what_is_accepted(replay):
    fixed, oracle = run(replay, "fixed"), run(replay, "oracle")
    assert oracle.proposed == oracle.accepted == fixed.accepted and oracle.steps == fixed.steps
    assert oracle.seconds < fixed.seconds  # no rejected rows priced


def test_free_rows_price_every_step_as_a_decode(replay):
    for policy in replay.POLICIES:
        r = run(replay, policy, row_cost=0.0)
        assert r.seconds == pytest.approx((r.steps - 1) * DECODE)  # the prefill's step is not priced
    plain = len(OUTPUT) - 1
    oracle, fixed = run(replay, "oracle", row_cost=0.0), run(replay, "fixed", row_cost=0.0)
    assert oracle.seconds == pytest.approx(fixed.seconds) and fixed.seconds < plain * DECODE


def test_adaptive_stops_proposing_where_rows_cost_a_decode_each(replay):
    dear = {rows: DECODE * rows for rows in range(1, 17)}
    outputs = [OUTPUT] * 6
    adaptive, fixed = run(replay, "adaptive", table=dear, outputs=outputs), run(replay, "fixed", table=dear,
                                                                                 outputs=outputs)
    plain = sum(len(o) - 1 for o in outputs) * DECODE
    assert fixed.seconds > 1.3 * plain  # proposing everything loses
    assert adaptive.seconds < 1.1 * plain  # the controller learns it (after exploring both step sizes)
    cheap = run(replay, "adaptive", outputs=outputs)  # and proposes where rows are cheap
    assert cheap.accepted > 0 and cheap.seconds < plain


def test_noise_is_seeded(replay):
    a, b = run(replay, "adaptive", noise=0.05, seed=3), run(replay, "adaptive", noise=0.05, seed=3)
    assert a == b and a.seconds != run(replay, "adaptive", noise=0.05, seed=4).seconds


def test_unknown_policy(replay):
    with pytest.raises(ValueError, match="unknown policy 'greedy'"):
        run(replay, "greedy")


def test_overall_speedup_keeps_the_prefill(replay):
    assert replay.overall_speedup(1.0, 2.0, 2.0) == pytest.approx(1.5)
    assert replay.overall_speedup(0.0, 2.0, 2.0) == pytest.approx(2.0)
    assert replay.overall_speedup(1.0, 2.0, 1.0) == pytest.approx(1.0)


def test_replay_rows(replay):
    rows = replay.replay_rows([PROMPT], [OUTPUT], TABLE, 0.0, 2, 15, len(OUTPUT), 0.5, 1.0, row_costs=(1.0, 0.0))
    assert [(r["lockstep"], r["policy"], r["row_cost"]) for r in rows] == [
        (lock, p, c) for lock in (True, False) for p in replay.POLICIES for c in (1.0, 0.0)]
    by = {(r["policy"], r["row_cost"]): r for r in rows if r["lockstep"]}
    plain = (len(OUTPUT) - 1) * DECODE
    oracle = by[("oracle", 0.0)]
    assert oracle["decode_speedup"] == pytest.approx(plain / ((oracle["steps"] - 1) * DECODE))
    assert oracle["speedup"] == pytest.approx(1.5 / (0.5 + 1.0 / oracle["decode_speedup"]))
    assert by[("fixed", 1.0)]["decode_speedup"] < by[("oracle", 1.0)]["decode_speedup"]


# ---- a real run on a tiny random model ---------------------------------------------------------------------------

def tiny_prompts(model, workload):
    assert workload == "grounded"
    g = torch.Generator().manual_seed(1)
    parts = [torch.randint(0, TINY["vocab"], (12 + i,), generator=g).tolist() for i in range(2)]
    return [load_bench_script("speculative").Prompt(f"p{i}", "edit", tuple(p * 3)) for i, p in enumerate(parts)]


def test_a_run_writes_rows_a_plot_and_replots(replay, tmp_path, monkeypatch, capsys):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, context_length=256)
    monkeypatch.setattr(replay, "load_model", lambda p, device, backend: Model(
        load_weights(p), StubTokenizer(TINY["vocab"]), Backend(backend), device, torch.float32))
    monkeypatch.setattr(replay, "workload_prompts", tiny_prompts)
    out = tmp_path / "replay.jsonl"
    args = ["--model", str(path), "--max-tokens", "12", "--k", "4", "--repeats", "2", "--seeds", "1", "--threads",
            "1", "--out", str(out)]
    assert replay.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["lockstep"], r["policy"], r["row_cost"]) for r in rows] == [
        *((lock, p, c) for lock in (True, False) for p in replay.POLICIES for c in replay.ROW_COSTS),
        (True, "measured", None)]
    for r in rows:
        assert r["model"] == "tiny.gguf" and r["backend"] == "onednn" and r["k_max"] == 4 and r["git_commit"]
        assert sorted(map(int, r["step_ms"])) == [1, 2, 3, 4, 5] and r["decode_tokens"] > 0
        assert r["steps"] > 0 and r["decode_speedup"] > 0 and r["speedup"] > 0
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "measured" in capsys.readouterr().out
    assert replay.main(["--plot-only", "--out", str(out)]) == 0
    assert "adaptive" in capsys.readouterr().out


def test_bad_options(replay, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        replay.main(["--k", "16", "--out", str(tmp_path / "r.jsonl")])
    assert exc.value.code == 2 and "--k must be <= 15" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        replay.main(["--max-tokens", "1", "--out", str(tmp_path / "r.jsonl")])
    assert exc.value.code == 2 and "--max-tokens must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        replay.main(["--plot-only", "--out", str(tmp_path / "none.jsonl")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
