"""The shared benchmark harness: environment record, JSONL output, GPU and CPU timers, device ceilings, input
rotation past L2, GPU guard, latest row per key, targets, result table.

Every `bench/<area>.py` imports it (`from harness import ...`; running a script puts bench/ on sys.path) so that all
results carry the same fields and every timing is a median with 20/80 quantiles (see shared/BENCHMARKING.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import itertools
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
# Each timed call reads a different input set until the sets together exceed ROTATE_L2 times the L2 cache (50 MB on
# an H100), so no call finds its operands in L2 from an earlier one (do_bench also flushes L2 between calls; rotation
# keeps the measurement honest should that change). Large problems exceed L2 alone: one set.
ROTATE_L2 = 2
MAX_SETS = 16
L2_FALLBACK = 50 * 2**20  # where torch does not report the L2 size: an H100's


def _git_commit() -> str:
    """Short commit, with `-dirty` when code differs from it (bench/results/ excluded: results do not make code
    dirty); "unknown" outside a git checkout."""
    try:
        run = functools.partial(subprocess.run, cwd=REPO, capture_output=True, text=True, check=True, timeout=10)
        commit = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        status = run(["git", "status", "--porcelain", "--", ".", ":(exclude)bench/results"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if status else commit


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _static_environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else cpu_name(),
        "device_kind": "cuda" if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
    }


def environment() -> dict:
    """Returns {device, device_kind, torch, triton (None if absent), python, git_commit, cpu_threads (torch's intra-op
    threads now), date (UTC ISO, now)}. Versions and commit are looked up once per process."""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {**_static_environment(), "cpu_threads": torch.get_num_threads(), "date": date}


def append_jsonl(path: str | Path, rows: Iterable[dict], env: dict | None = None) -> int:
    """Appends each row, merged with `env` (default environment()), as one JSON line; returns the number written.

    Row fields win over environment fields of the same name.
    """
    env = environment() if env is None else env
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({**env, **row}) + "\n")
            n += 1
    return n


def record(path: Path, rows: list[dict], env: dict, plot: Callable[[list[dict], Path], Path],
           summary: Callable[[list[dict]], object]) -> int:
    """A measured run's end: rows (merged with env) appended to the JSONL at path, the plot next to it, where both
    went and the summary printed. Returns the exit status, 0."""
    append_jsonl(path, rows, env)
    rows = [{**env, **r} for r in rows]
    print(f"wrote {shown(path)} and {shown(plot(rows, path.with_suffix('.png')))}")
    summary(rows)
    return 0


def save_figure(fig, path: Path, title: str, **title_options) -> Path:
    """A plot's end: the figure's title (title_options: suptitle's, e.g. fontsize), a tight layout, the PNG at path
    (110 dpi), the figure closed. Returns path."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, **title_options)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's CPU threads set to n inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_jsonl(path: str | Path) -> list[dict]:
    """Returns the rows of a JSONL file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _summary(ms: Sequence[float]) -> dict:
    q20, q50, q80 = (float(v) for v in torch.tensor(list(ms), dtype=torch.float64).quantile(
        torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)))
    return {"ms": q50, "ms_p20": q20, "ms_p80": q80}


def _rotating(fn: Callable, inputs: Sequence[tuple] | None) -> Callable[[], object]:
    """A no-argument call that runs fn on the next input set each time (fn itself when inputs is None)."""
    if not inputs:
        return fn
    cycle = itertools.cycle(inputs)
    return lambda: fn(*next(cycle))


def time_gpu(fn: Callable, inputs: Sequence[tuple] | None = None, warmup: int = 25, rep: int = 100) -> dict:
    """Times fn on the GPU with triton.testing.do_bench (warm-up, L2 flush between calls, CUDA events).

    inputs: several argument tuples to rotate through, so that repeated calls do not find their operands in cache;
    give enough sets that together they exceed the L2 cache. Returns {"ms": median, "ms_p20", "ms_p80"} in ms.
    """
    import triton.testing

    if not torch.cuda.is_available():
        raise RuntimeError("time_gpu needs a CUDA device; call require_gpu() first")
    med, q20, q80 = triton.testing.do_bench(_rotating(fn, inputs), warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "ms_p20": q20, "ms_p80": q80}


def time_cpu(fn: Callable, repeats: int = 5, inputs: Sequence[tuple] | None = None, warmup: int = 1) -> dict:
    """Times fn on the CPU with time.perf_counter: `warmup` untimed calls, then `repeats` timed ones, rotating
    through `inputs` as time_gpu does. Returns {"ms": median, "ms_p20", "ms_p80"} in ms."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    call = _rotating(fn, inputs)
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return _summary(samples)


def l2_bytes(device: torch.device) -> int:
    """The L2 cache size of a CUDA device in bytes (L2_FALLBACK where torch does not report it)."""
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or L2_FALLBACK


def rotation_sets(bytes_per_set: int, l2_bytes: int) -> int:
    """How many input sets to rotate through so that together they exceed ROTATE_L2 x the L2 cache (1..MAX_SETS)."""
    return max(1, min(MAX_SETS, math.ceil(ROTATE_L2 * l2_bytes / max(1, bytes_per_set))))


def copy_gbs(device: torch.device, nbytes: int, seed: int) -> float:
    """Memory bandwidth in GB/s (bytes read + written) of a device-to-device copy of nbytes seeded random bytes, timed
    with time_gpu."""
    gen = torch.Generator(device=device).manual_seed(seed)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device, generator=gen)
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_gpu(lambda: dst.copy_(src))["ms"] * 1e6)


def matmul_tflops(dtype: torch.dtype, device: torch.device, size: int, seed: int) -> float:
    """TFLOP/s of torch.matmul on seeded random [size, size] matrices of dtype (2 size^3 FLOPs), timed with
    time_gpu."""
    gen = torch.Generator(device=device).manual_seed(seed)
    a, b = (torch.randn(size, size, dtype=dtype, device=device, generator=gen) for _ in range(2))
    c = torch.empty_like(a)
    return 2 * size**3 / (time_gpu(lambda: torch.matmul(a, b, out=c))["ms"] * 1e9)


def require_gpu(script_name: str) -> None:
    """Returns if CUDA is available; otherwise says so and exits 0 (a GPU benchmark on a CPU machine is not a
    failure, it just has nothing to measure)."""
    if not torch.cuda.is_available():
        print(f"{script_name}: no GPU here, skipping (results need a CUDA device)")
        sys.exit(0)


def latest(rows: Iterable[dict], key: Sequence[str]) -> list[dict]:
    """The most recent row per value of the key fields (a missing field counts as None): latest date, and on equal
    dates the later one in the file (rows are appended in order). Keeps first-seen key order."""
    best: dict[tuple, dict] = {}
    for r in rows:
        k = tuple(r.get(f) for f in key)
        if k not in best or r["date"] >= best[k]["date"]:
            best[k] = r
    return list(best.values())


def last_setup(rows: Sequence[dict], fields: Sequence[str]) -> list[dict]:
    """The rows of the setup measured last: those whose fields (device, model, threads, ...) equal the latest-dated
    row's. One plot per setup: another machine's rows drawn on the same lines make jumps that are not there."""
    if not rows:
        return list(rows)
    last = max(rows, key=lambda r: r["date"])
    return [r for r in rows if all(r.get(f) == last.get(f) for f in fields)]


def plot_only_rows(path: Path, key: Sequence[str], p: argparse.ArgumentParser) -> list[dict]:
    """--plot-only's rows: latest(rows, key) of the JSONL at path; a usage error (p.error, exit 2) when it does not
    exist."""
    if not path.exists():
        p.error(f"{path} does not exist: run the benchmark first")
    return latest(read_jsonl(path), key)


def replot(path: Path, key: Sequence[str], p: argparse.ArgumentParser, plot: Callable[[list[dict], Path], Path],
           summary: Callable[[list[dict]], object], setup: Sequence[str] = ()) -> int:
    """--plot-only: the PNG (next to the JSONL at path) and the summary from the latest rows per key (of the setup
    measured last, when setup names its fields: last_setup), measuring nothing. Returns the exit status, 0."""
    rows = plot_only_rows(path, key, p)
    if setup:
        rows = last_setup(rows, setup)
    print(f"wrote {shown(plot(rows, path.with_suffix('.png')))}")
    summary(rows)
    return 0


@dataclass(frozen=True)
class Target:
    """A benchmark's goal: every row for which applies(row) holds must have row[metric] >= threshold."""

    name: str
    text: str
    metric: str
    threshold: float
    applies: Callable[[dict], bool]


def target_results(rows: Sequence[dict], targets: Iterable[Target], worst: Callable[[dict], dict]) -> list[dict]:
    """Per target: status PASS / MISS (any row in scope below the threshold) / n/a (no row in scope), the number of
    rows in scope and below, the devices of those rows, and the worst row (lowest metric) as worst(row) plus its
    value under "value"."""
    results = []
    for t in targets:
        scope = [r for r in rows if t.applies(r)]
        res = {"target": t.name, "text": t.text, "metric": t.metric, "threshold": t.threshold, "rows": len(scope),
               "misses": sum(r[t.metric] < t.threshold for r in scope), "status": "n/a", "worst": None,
               "devices": sorted({r["device"] for r in scope})}
        if scope:
            low = min(scope, key=lambda r, metric=t.metric: r[metric])
            res["status"] = "MISS" if res["misses"] else "PASS"
            res["worst"] = {**worst(low), "value": low[t.metric]}
        results.append(res)
    return results


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def comma_list(what: str, choices: Iterable[str]) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated, non-empty list of names among `choices`."""
    choices = tuple(choices)

    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"{what} must be a comma list of {', '.join(choices)}, got {text!r}")
        return names

    return parse


def shown(path: str | Path) -> str:
    """path relative to the repository when inside it (shorter lines), else as given (resolved)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _cell(value, spec: str | None) -> str:
    if value is None:
        return "-"
    if spec:
        return format(value, spec)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(rows: Sequence[dict], columns: Sequence[str | tuple[str, str]]) -> None:
    """Prints rows as an aligned text table. columns: keys, or (key, format spec) pairs such as ("rel_rmse", ".4f");
    a missing or None value prints as "-". Returns nothing."""
    cols = [(c, None) if isinstance(c, str) else c for c in columns]
    cells = [[key for key, _ in cols]] + [[_cell(row.get(key), spec) for key, spec in cols] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    for i, r in enumerate(cells):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


__all__ = [
    "L2_FALLBACK",
    "MAX_SETS",
    "RESULTS",
    "ROTATE_L2",
    "Target",
    "append_jsonl",
    "copy_gbs",
    "environment",
    "l2_bytes",
    "latest",
    "matmul_tflops",
    "plot_only_rows",
    "print_table",
    "read_jsonl",
    "replot",
    "require_gpu",
    "rotation_sets",
    "shown",
    "target_results",
    "time_cpu",
    "time_gpu",
]
