"""bench/gpu_suite.sh on the CPU: its dry run (the plan of the six steps, each benchmark's arguments parsed by the
script's own parser, `pytest -m gpu` collected, the report checked) and the report's verdicts on synthetic runs: PASS
and MISS per target, a failed and a timed-out step, a benchmark step that wrote no rows."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from bench_scripts import load_bench_script

REPO = Path(__file__).resolve().parent.parent
STEPS = ("pytest", "qmatmul", "attention", "generate", "lora", "throughput")


@pytest.fixture(scope="module")
def report():
    return load_bench_script("gpu_suite_report")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_dry_run_plans_and_checks_the_six_steps(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    text = proc.stdout
    for i, name in enumerate(STEPS, 1):
        assert f"[{i}/6] {name}: timeout <= " in text
    assert "bench/qmatmul.py --quick" in text and "bench/attention.py --quick" in text
    assert "--backends torch,triton --dtypes float16" in text and "--requests 128" in text
    assert "bench/lora.py --device cuda" in text and "--ranks 16" in text
    assert "benchmark arguments: ok" in text
    assert "report self-test on synthetic rows: ok" in text
    assert "tests collected (pytest step ok)" in text
    assert "dry run: ok" in text
    plan = [line.split("\t") for line in (out / "plan.tsv").read_text().splitlines()]
    plan = [[*row[:3], shlex.join(shlex.split(row[3]))] for row in plan]  # printf %q may escape commas
    # lora twice (1, 16 and 64 adapters; the target's 16 alone), throughput twice (with and without transformers)
    assert [row[0] for row in plan] == [*STEPS[:5], "lora", "throughput", "throughput"]
    assert "--no-hf" in plan[-1][3] and "--no-hf" not in plan[-2][3]
    full, small = plan[4][3], plan[5][3]
    assert "--adapters 1,16,64" in full and "--quick" not in full and "--out" in full
    assert "--quick --adapters 16 --linear-batch 64 --step-batch 64" in small  # the target's rows still measured
    assert all("--model " in row[3] for row in plan[3:])  # generate, lora and throughput get the model
    budget = int(re.search(r"plan: budget (\d+)s", text).group(1))
    assert budget + 10 <= 9 * 60  # the caps shrink to fit the budget; `timeout` kills 10 s after its TERM
    assert (out / "suite.log").read_text().startswith("realm GPU suite DRY RUN")


def test_dry_run_refuses_a_folder_with_results(tmp_path):
    (tmp_path / "qmatmul.jsonl").write_text("{}\n")
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not empty" in proc.stderr


def test_report_gives_pass_and_miss_and_fails_on_a_failed_step(report, tmp_path, capsys):
    report.synthetic_run(tmp_path, failed_step=True)
    assert report.report(tmp_path, elapsed=300.0, budget=525.0) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    got = {(t["bench"], t["target"]): t["status"] for t in summary["targets"]}
    assert got == {("qmatmul", "a"): "PASS", ("qmatmul", "b"): "PASS", ("qmatmul", "c"): "MISS",
                   ("attention", "prefill"): "PASS", ("attention", "decode"): "PASS",
                   ("generate", "llama.cpp"): "n/a", ("lora", "fused"): "PASS", ("lora", "separate"): "MISS",
                   ("throughput", "continuous"): "MISS"}
    steps = {s["name"]: s["status"] for s in summary["steps"]}
    assert steps == {"pytest": "ok", "qmatmul": "ok", "attention": "failed", "generate": "timeout", "lora": "ok",
                     "throughput": "ok"}
    assert summary["pytest"]["passed"] == 69
    printed = capsys.readouterr().out
    assert "FAILED: steps failed: attention, generate" in printed
    assert "MISS  throughput (continuous)" in printed and "PASS  qmatmul (a)" in printed
    assert "PASS  lora (fused)" in printed and "MISS  lora (separate)" in printed
    assert "1 of 1 rows over 10 %; worst separate, 16 rank-16 adapters, batch 64: loss 14.0 %" in printed
    assert "[partial: the step failed]" in printed  # the failed attention step's rows are still judged


def test_a_miss_alone_is_not_a_failure(report, tmp_path):
    report.synthetic_run(tmp_path, failed_step=False)
    summary = report.summarize(tmp_path)
    assert any(t["status"] == "MISS" for t in summary["targets"])
    assert report.exit_code(summary) == 0
    assert "\nOK: steps failed: none; skipped: none; targets: 5 PASS, 3 MISS, 1 n/a" in report.format_summary(summary)


def test_skipped_steps_make_the_run_incomplete_not_failed(report, tmp_path):
    report.synthetic_run(tmp_path, failed_step=False)
    model_steps = ("generate", "lora", "throughput")
    for bench in model_steps:
        (tmp_path / f"{bench}.jsonl").unlink()
    lines = (tmp_path / "steps.tsv").read_text().splitlines()[:3]
    lines += [f"{bench}\tskipped\t-\t0\t-\tno model" for bench in model_steps]
    (tmp_path / "steps.tsv").write_text("\n".join(lines) + "\n")
    summary = report.summarize(tmp_path)
    assert report.exit_code(summary) == 0
    assert "INCOMPLETE: steps failed: none; skipped: generate, lora, throughput" in report.format_summary(summary)


def test_a_benchmark_step_without_rows_is_a_problem(report, tmp_path):
    report.synthetic_run(tmp_path, failed_step=False)
    (tmp_path / "qmatmul.jsonl").unlink()  # e.g. the script found no GPU, said so and exited 0
    summary = report.summarize(tmp_path)
    assert report.exit_code(summary) == 1
    assert any("qmatmul: the step exited 0 but wrote no rows" in p for p in summary["problems"])


def test_lora_target_is_n_a_without_the_target_row(report, tmp_path):
    report.synthetic_run(tmp_path, failed_step=False)
    rows = [json.loads(line) for line in (tmp_path / "lora.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["n_adapters"] != 16 or r["part"] != "decode_step"]  # e.g. a smaller sweep
    (tmp_path / "lora.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    lora = [t for t in report.summarize(tmp_path)["targets"] if t["bench"] == "lora"]
    assert [(t["target"], t["status"]) for t in lora] == [("fused", "n/a"), ("separate", "n/a")]
    assert "no GPU decode-step row with 16 rank-16 adapters in a batch of 64" in lora[0]["detail"]


def test_step_status_follows_timeouts_exit_codes(report):
    assert [report.step_status(rc) for rc in (0, 1, 2, 124, 137)] == ["ok", "failed", "failed", "timeout", "timeout"]


def test_check_plan_rejects_an_option_a_script_lacks(report, tmp_path):
    plan = tmp_path / "plan.tsv"
    plan.write_text("qmatmul\t90\t30\tpython3 bench/qmatmul.py --quick --out x.jsonl\n"
                    "attention\t110\t30\tpython3 bench/attention.py --quick --no-such-option\n"
                    "lora\t120\t60\tpython3 bench/lora.py --device cuda --ranks 16 --adapters 1,16,64\n"
                    "lora\t99\t60\tpython3 bench/lora.py --ranks 16 --adapters 0\n"
                    "pytest\t150\t60\tpython3 -m pytest -m gpu\n")
    problems = report.check_plan(plan)
    assert len(problems) == 2 and problems[0].startswith("attention: bench/attention.py rejects its arguments")
    assert problems[1].startswith("lora: bench/lora.py rejects its arguments")
