"""The GPU suite's report (bench/gpu_suite.sh): each step's status and every benchmark target's PASS / MISS.

The suite records one line per step in <out>/steps.tsv (name, status, exit code, seconds, timeout, note); the
benchmarks append their rows to <out>/<bench>.jsonl and pytest writes <out>/junit.xml. The targets are evaluated
here with each benchmark's own functions (bench/<name>.py: evaluate_targets / evaluate_target, or lora's targets()
with harness.target_results, on the harness's Target definitions), on the rows of this run, so the report and the
scripts never disagree. A MISS is a result, not a failure; a step that failed or ran out of time is.

    python bench/gpu_suite_report.py report OUT_DIR [--elapsed S --budget S]   # table, OUT_DIR/summary.json; exit 1
                                                  # when a step failed or timed out or a benchmark step wrote no rows
    python bench/gpu_suite_report.py check-plan OUT_DIR/plan.tsv   # each benchmark command parsed by its own parser
    python bench/gpu_suite_report.py self-test                     # the report on synthetic rows (CPU, no GPU)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent
STEPS = ("pytest", "qmatmul", "attention", "generate", "lora", "throughput")
BENCHMARKS = ("qmatmul", "attention", "generate", "lora", "throughput")  # steps: bench/<name>.py into <name>.jsonl
STATUSES = ("ok", "failed", "timeout", "skipped")
TIMEOUT_CODES = (124, 137)  # `timeout`: TERM sent (124), KILL sent after --kill-after (128 + 9)


# ---- steps, junit and rows ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One step of the suite as steps.tsv records it; rc is None for a skipped step."""

    name: str
    status: str
    rc: int | None
    seconds: float
    timeout: int | None
    note: str = ""


def step_status(rc: int) -> str:
    """ok (0), timeout (124 or 137, `timeout`'s codes) or failed."""
    return "ok" if rc == 0 else "timeout" if rc in TIMEOUT_CODES else "failed"


def _optional_int(text: str) -> int | None:
    return int(text) if text not in ("", "-") else None


def read_steps(path: Path) -> list[Step]:
    """steps.tsv: name, status, rc, seconds, timeout, note (tab separated; '-' for none)."""
    steps = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        name, status, rc, seconds, timeout, *note = line.split("\t")
        if status not in STATUSES:
            raise ValueError(f"{path}: step {name!r} has an unknown status {status!r}")
        steps.append(Step(name, status, _optional_int(rc), float(seconds), _optional_int(timeout),
                          note[0] if note else ""))
    return steps


def junit_counts(path: Path) -> dict | None:
    """{tests, passed, failures, errors, skipped} summed over the junit XML's test suites; None when it is missing or
    unreadable (pytest did not get as far as writing it)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def read_rows(path: Path) -> list[dict]:
    """The JSONL's rows; none when it does not exist. A line cut off by a killed run is dropped."""
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


# ---- targets, with the benchmarks' own definitions -----------------------------------------------------------------

_LOADED: dict[str, ModuleType] = {}


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py as a module of its own name (gpu_suite_bench_<name>), with bench/ on sys.path while it imports
    `harness`; sys.path and sys.modules are left as they were."""
    if name in _LOADED:
        return _LOADED[name]
    key = f"gpu_suite_bench_{name}"
    spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    added = str(BENCH) not in sys.path
    if added:
        sys.path.insert(0, str(BENCH))
    sys.modules[key] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[key]
        if added:
            sys.path.remove(str(BENCH))
    _LOADED[name] = module
    return module


def _number(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _harness_target(bench: str, res: dict) -> dict:
    """A harness.target_results entry as a report line."""
    detail = f"{res['rows']} rows in scope"
    if res["worst"]:
        worst = ", ".join(_number(v) if k == "row" else f"{k} {_number(v)}" for k, v in res["worst"].items()
                          if k != "value")
        detail = (f"{res['misses']} of {res['rows']} rows below {res['threshold']:g}; worst {worst}: {res['metric']} "
                  f"{_number(res['worst']['value'])}")
    return {"bench": bench, "target": res["target"], "text": res["text"], "status": res["status"], "detail": detail}


def _lora_row(r: dict) -> str:
    pool = f" (pool {r['pool_rank']})" if r["pool_rank"] != r["rank"] else ""
    return f"{r['mode']}, {r['n_adapters']} rank-{r['rank']}{pool} adapters, batch {r['batch']}"


def _lora_targets(module: ModuleType, rows: list[dict]) -> list[dict]:
    """bench/lora.py's targets() through its harness.target_results, on its rows scored as its print_summary scores
    them (neg_loss_pct = -loss_pct: the target is loss_pct <= 10 as metric >= -10)."""
    scored = [{**r, "neg_loss_pct": -r["loss_pct"]} for r in rows if r.get("loss_pct") is not None]

    def worst(r: dict) -> dict:
        return {"row": _lora_row(r), "tokens_per_s": r.get("tokens_per_s"),
                "base_tokens_per_s": r.get("base_tokens_per_s")}

    out = []
    for res in module.target_results(scored, module.targets(), worst):
        low = res["worst"]
        if low is None:
            detail = (f"no GPU decode-step row with {module.TARGET_ADAPTERS} rank-{module.TARGET_RANK} adapters in a "
                      f"batch of {module.TARGET_BATCH}")
        else:
            detail = (f"{res['misses']} of {res['rows']} rows over {-res['threshold']:g} %; worst {low['row']}: "
                      f"loss {-low['value']:.1f} %")
            if low["tokens_per_s"] is not None and low["base_tokens_per_s"] is not None:
                detail += f" ({low['tokens_per_s']:.0f} vs {low['base_tokens_per_s']:.0f} tok/s without adapters)"
        out.append({"bench": "lora", "target": res["target"], "text": res["text"], "status": res["status"],
                    "detail": detail})
    return out


def evaluate(bench: str, rows: list[dict]) -> list[dict]:
    """Every target of the benchmark on rows: {bench, target, text, status (PASS / MISS / n/a), detail}."""
    module = load_bench(bench)
    if bench == "generate":  # one target, realm vs llama.cpp, per realm row measured beside llama.cpp
        out = []
        for res in module.evaluate_target(rows):
            if res["ratio"] is None:
                detail = "no llama.cpp row beside realm (llama.cpp runs on the CPU only)"
            else:
                detail = (f"{res['ratio']:.2f}x: {res['engine']}, {res['prompt_tokens']}-token prompt, "
                          f"{res['decode_tok_s']:.1f} vs {res['llama_decode_tok_s']:.1f} tok/s")
            out.append({"bench": bench, "target": "llama.cpp", "text": module.TARGET_TEXT, "status": res["status"],
                        "detail": detail})
        return out
    if bench == "lora":  # no evaluate_targets: targets() and the harness's target_results, as its print_summary does
        return _lora_targets(module, rows)
    return [_harness_target(bench, res) for res in module.evaluate_targets(rows)]


def info(bench: str, rows: list[dict]) -> list[str]:
    """The figures worth a line beside the targets: decode tok/s per engine (generate), the loss per decode-step row
    and the range of losses per mode over the linear layers (lora), output tok/s and the ratio to static batching per
    engine (throughput)."""
    lines = []
    if bench == "generate":
        for r in rows:
            if r.get("engine_kind") == "realm":
                lines.append(f"generate: {r['engine']}, {r['prompt_tokens']}-token prompt: decode "
                             f"{r['decode_tok_s']:.1f} tok/s (batch 1), prefill {r['prefill_tok_s']:.0f} tok/s")
    elif bench == "lora":
        for r in rows:
            if r.get("part") == "decode_step":
                lines.append(f"lora: decode step, {_lora_row(r)}: loss {r['loss_pct']:.1f} %, "
                             f"{r['tokens_per_s']:.0f} tok/s ({r['base_tokens_per_s']:.0f} without adapters)")
        for mode in dict.fromkeys(r["mode"] for r in rows if r.get("part") == "linear"):
            losses = [r["loss_pct"] for r in rows if r.get("part") == "linear" and r["mode"] == mode]
            lines.append(f"lora: linear layers, {mode}: loss {min(losses):.1f} .. {max(losses):.1f} % over "
                         f"{len(losses)} rows")
    elif bench == "throughput":
        for r in rows:
            ratio = r.get("static_ratio")
            extra = f", {ratio:.2f}x static" if ratio is not None else ""
            extra += f", {r['hf_ratio']:.2f}x transformers" if r.get("hf_ratio") is not None else ""
            lines.append(f"throughput: {r['engine']} {r['mode']} N={r['n_requests']}: {r['output_tok_s']:.0f} "
                         f"output tok/s{extra}")
    return lines


# ---- the summary ----------------------------------------------------------------------------------------------------

def summarize(out_dir: Path, elapsed: float | None = None, budget: float | None = None) -> dict:
    """Steps, pytest's counts, targets and figures of the run in out_dir, as one JSON-able dict."""
    out_dir = Path(out_dir)
    steps_file = out_dir / "steps.tsv"
    steps = read_steps(steps_file) if steps_file.exists() else []
    status = {s.name: s.status for s in steps}
    targets, lines, devices, problems = [], [], set(), []
    for bench in BENCHMARKS:
        rows = read_rows(out_dir / f"{bench}.jsonl")
        devices |= {r["device"] for r in rows if r.get("device")}
        if not rows:
            if status.get(bench) == "ok":  # e.g. a benchmark that found no GPU: it says so and exits 0
                problems.append(f"{bench}: the step exited 0 but wrote no rows to {bench}.jsonl (see suite.log)")
            continue
        try:
            judged = evaluate(bench, rows)
            lines += info(bench, rows)
        except Exception as e:  # a report that cannot judge one benchmark still reports the others
            problems.append(f"{bench}: could not evaluate the targets: {type(e).__name__}: {e}")
            continue
        if status.get(bench) in ("failed", "timeout"):  # the rows written before it stopped
            how = "timed out" if status[bench] == "timeout" else "failed"
            judged = [{**t, "detail": f"{t['detail']} [partial: the step {how}]"} for t in judged]
        targets += judged
    missing = [s for s in STEPS if s not in status]
    return {"steps": [asdict(s) for s in steps], "missing_steps": missing,
            "pytest": junit_counts(out_dir / "junit.xml"), "targets": targets, "info": lines, "problems": problems,
            "devices": sorted(devices), "elapsed_s": elapsed, "budget_s": budget}


def exit_code(summary: dict) -> int:
    """1 when a step failed or timed out, a benchmark step wrote no rows, or a target could not be evaluated; else 0
    (a MISS is not a failure)."""
    failed = any(s["status"] in ("failed", "timeout") for s in summary["steps"])
    return 1 if failed or summary["problems"] else 0


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def format_summary(summary: dict) -> str:
    """The step table, the target table, the figures and the verdict, as printed at the end of the suite."""
    lines = ["", "==== GPU suite summary" + (f": {', '.join(summary['devices'])}" if summary["devices"] else "")]
    counts = summary["pytest"]
    step_rows = [["step", "status", "seconds", "timeout", "note"]]
    for s in summary["steps"]:
        note = s["note"]
        if s["name"] == "pytest" and counts:
            tests = (f"{counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors, "
                     f"{counts['skipped']} skipped")
            note = f"{tests}; {note}" if note else tests
        step_rows.append([s["name"], s["status"], f"{s['seconds']:.0f}",
                          "-" if s["timeout"] is None else str(s["timeout"]), note])
    lines += _table(step_rows) if summary["steps"] else ["no steps recorded"]
    if summary["missing_steps"]:
        lines.append(f"steps not recorded: {', '.join(summary['missing_steps'])}")
    lines.append("")
    if summary["targets"]:
        width = max(len(f"{t['bench']} ({t['target']})") for t in summary["targets"])
        for t in summary["targets"]:
            lines.append(f"{t['status']:4s}  {t['bench'] + ' (' + t['target'] + ')':{width}s}  {t['text']}")
            lines.append(f"{'':4s}  {'':{width}s}    {t['detail']}")
    else:
        lines.append("no benchmark rows: no target evaluated")
    lines += summary["info"] + summary["problems"]
    failed = [s["name"] for s in summary["steps"] if s["status"] in ("failed", "timeout")]
    skipped = [s["name"] for s in summary["steps"] if s["status"] == "skipped"]
    status = {k: sum(t["status"] == k for t in summary["targets"]) for k in ("PASS", "MISS", "n/a")}
    verdict = "FAILED" if exit_code(summary) else "INCOMPLETE" if skipped or summary["missing_steps"] else "OK"
    lines.append("")
    lines.append(f"{verdict}: steps failed: {', '.join(failed) or 'none'}; skipped: {', '.join(skipped) or 'none'}; "
                 f"targets: {status['PASS']} PASS, {status['MISS']} MISS, {status['n/a']} n/a")
    if summary["elapsed_s"] is not None:
        budget = f" of a {summary['budget_s']:.0f} s budget" if summary["budget_s"] else ""
        lines.append(f"elapsed {summary['elapsed_s']:.0f} s{budget}")
    return "\n".join(lines)


def report(out_dir: Path, elapsed: float | None = None, budget: float | None = None) -> int:
    """Prints the summary, writes out_dir/summary.json, returns the exit code."""
    summary = summarize(out_dir, elapsed, budget)
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(format_summary(summary))
    return exit_code(summary)


# ---- dry-run checks -------------------------------------------------------------------------------------------------

def check_plan(plan: Path) -> list[str]:
    """Parses the arguments of every benchmark command of the plan (plan.tsv: name, timeout, minimum, command as a
    shell-quoted string) with the script's own argparse parser; returns the problems (none: all parse)."""
    problems = []
    for line in Path(plan).read_text().splitlines():
        if not line.strip():
            continue
        name, _timeout, _minimum, command = line.split("\t", 3)
        if name not in BENCHMARKS:
            continue
        argv = shlex.split(command)
        script = next((i for i, a in enumerate(argv) if a.endswith(f"bench/{name}.py")), None)
        if script is None:
            problems.append(f"{name}: the command does not run bench/{name}.py: {command}")
            continue
        try:
            load_bench(name).parser().parse_args(argv[script + 1:])
        except SystemExit as e:  # argparse's usage error (its message went to stderr)
            problems.append(f"{name}: bench/{name}.py rejects its arguments (exit {e.code}): {command}")
        except Exception as e:
            problems.append(f"{name}: {type(e).__name__}: {e}")
    return problems


def synthetic_run(out_dir: Path, failed_step: bool = True) -> None:
    """A run's files as the suite leaves them, with known verdicts: qmatmul (a) and (b) PASS, (c) MISS; attention
    both PASS; generate n/a (no llama.cpp on a GPU run); lora fused PASS (6 % loss), separate MISS (14 %); throughput
    MISS (3x < 5x); pytest 69 passed; the attention step failed (rc 1) when failed_step, the generate step timed out
    (124)."""
    out_dir = Path(out_dir)
    env = {"device": "NVIDIA H200", "device_kind": "cuda", "date": "2026-01-01T00:00:00+00:00", "git_commit": "abc"}
    lrow = {"bench": "lora", "backend": "triton", "rank": 16, "pool_rank": 16, "n_adapters": 16, "batch": 64,
            "adapter_free_rows": 0}
    lstep = {**env, **lrow, "part": "decode_step", "layer": None, "base_ms": 10.0, "base_tokens_per_s": 6400.0}
    qrow = {"format": "Q4_K", "n": 4096, "k": 4096, "shape": "4096x4096", "bits_per_weight": 4.5, "dtype": "float16"}
    rows = {
        "qmatmul": [{**env, **qrow, "m": 1, "weight_bw_fraction": 0.85, "speedup": 3.2},
                    {**env, **qrow, "m": 16, "weight_bw_fraction": 0.5, "speedup": 2.6},
                    {**env, **qrow, "m": 2048, "weight_bw_fraction": 0.1, "speedup": 0.5}],
        "attention": [{**env, "kind": "prefill", "shape": "gqa-d128", "dtype": "bfloat16", "head_dim": 128,
                       "causal": True, "seq_len": 4096, "batch": 4, "context": None, "sdpa_ratio": 1.05},
                      {**env, "kind": "decode", "shape": "gqa-d128", "dtype": "bfloat16", "head_dim": 128,
                       "causal": None, "seq_len": None, "batch": 16, "context": 4096, "bw_fraction": 0.8}],
        "lora": [{**env, **lrow, "part": "linear", "layer": "qkv", "mode": "fused", "loss_pct": 20.0},
                 {**lstep, "mode": "fused", "ms": 10.64, "loss_pct": 6.0, "tokens_per_s": 6016.0},
                 {**lstep, "mode": "separate", "ms": 11.63, "loss_pct": 14.0, "tokens_per_s": 5504.0},
                 {**lstep, "mode": "fused", "n_adapters": 64, "ms": 20.0, "loss_pct": 50.0, "tokens_per_s": 3200.0},
                 {**lstep, "device": "AMD EPYC", "device_kind": "cpu", "mode": "reference", "ms": 50.0,
                  "loss_pct": 80.0, "tokens_per_s": 1280.0}],
        "generate": [{**env, "engine": "realm triton float16 cuda", "engine_kind": "realm", "prompt_tokens": 40,
                      "decode_tok_s": 400.0, "prefill_tok_s": 5000.0, "decode_ratio": None}],
        "throughput": [{**env, "engine": "realm triton float16", "engine_kind": "realm", "mode": "continuous",
                        "n_requests": 128, "output_tok_s": 3000.0, "static_ratio": 3.0, "hf_ratio": None},
                       {**env, "engine": "realm triton float16", "engine_kind": "realm", "mode": "static",
                        "n_requests": 128, "output_tok_s": 1000.0}],
    }
    for bench, bench_rows in rows.items():
        (out_dir / f"{bench}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench_rows))
    (out_dir / "junit.xml").write_text('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" '
                                       'errors="0" failures="0" skipped="0" tests="69" time="90.0"/></testsuites>')
    steps = [("pytest", 0, 90.2, 150), ("qmatmul", 0, 40.1, 90), ("attention", 1 if failed_step else 0, 12.5, 110),
             ("generate", 124 if failed_step else 0, 75.0, 75), ("lora", 0, 70.4, 150), ("throughput", 0, 80.3, 120)]
    (out_dir / "steps.tsv").write_text("".join(f"{n}\t{step_status(rc)}\t{rc}\t{s}\t{t}\t\n" for n, rc, s, t in steps))


EXPECTED = {("qmatmul", "a"): "PASS", ("qmatmul", "b"): "PASS", ("qmatmul", "c"): "MISS",
            ("attention", "prefill"): "PASS", ("attention", "decode"): "PASS", ("generate", "llama.cpp"): "n/a",
            ("lora", "fused"): "PASS", ("lora", "separate"): "MISS", ("throughput", "continuous"): "MISS"}


def self_test() -> list[str]:
    """The report on synthetic runs (one with a failed and a timed-out step, one without); returns the problems."""
    problems = []
    for failed_step, want_code in ((True, 1), (False, 0)):
        with tempfile.TemporaryDirectory() as tmp:
            synthetic_run(Path(tmp), failed_step)
            summary = summarize(Path(tmp), elapsed=300.0, budget=525.0)
            got = {(t["bench"], t["target"]): t["status"] for t in summary["targets"]}
            if got != EXPECTED:
                problems.append(f"targets {got}, expected {EXPECTED}")
            statuses = {s["name"]: s["status"] for s in summary["steps"]}
            want = {"attention": "failed", "generate": "timeout"} if failed_step else {}
            if any(statuses[n] != want.get(n, "ok") for n in STEPS):
                problems.append(f"step statuses {statuses}")
            if exit_code(summary) != want_code:
                problems.append(f"exit code {exit_code(summary)}, expected {want_code} (failed step: {failed_step})")
            if summary["pytest"] != {"tests": 69, "failures": 0, "errors": 0, "skipped": 0, "passed": 69}:
                problems.append(f"junit counts {summary['pytest']}")
            problems += summary["problems"]
            if failed_step:
                print("\nthe report of a SYNTHETIC run (self-test: no measurement), as the suite prints it:")
                print(format_summary(summary))
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="print the summary of OUT_DIR, write OUT_DIR/summary.json")
    r.add_argument("out_dir", type=Path)
    r.add_argument("--elapsed", type=float, help="seconds the suite ran so far")
    r.add_argument("--budget", type=float, help="the suite's time budget in seconds")
    c = sub.add_parser("check-plan", help="parse every benchmark command of a plan.tsv with its script's parser")
    c.add_argument("plan", type=Path)
    sub.add_parser("self-test", help="the report on synthetic rows")
    args = p.parse_args(argv)
    if args.command == "report":
        return report(args.out_dir, args.elapsed, args.budget)
    problems = check_plan(args.plan) if args.command == "check-plan" else self_test()
    for line in problems:
        print(f"PROBLEM {line}")
    what = "benchmark arguments" if args.command == "check-plan" else "report self-test on synthetic rows"
    print(f"{what}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


__all__ = ["BENCHMARKS", "STEPS", "Step", "check_plan", "evaluate", "exit_code", "format_summary", "junit_counts",
           "read_rows", "read_steps", "report", "self_test", "step_status", "summarize", "synthetic_run"]


if __name__ == "__main__":
    sys.exit(main())
