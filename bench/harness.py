"""The shared benchmark harness: environment record, JSONL output, GPU and CPU timers, GPU guard, result table.

Every `bench/<area>.py` imports it (`from harness import ...`; running a script puts bench/ on sys.path) so that all
results carry the same fields and every timing is a median with 20/80 quantiles (see shared/BENCHMARKING.md).
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


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


def require_gpu(script_name: str) -> None:
    """Returns if CUDA is available; otherwise says so and exits 0 (a GPU benchmark on a CPU machine is not a
    failure, it just has nothing to measure)."""
    if not torch.cuda.is_available():
        print(f"{script_name}: no GPU here, skipping (results need a CUDA device)")
        sys.exit(0)


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
    "RESULTS",
    "append_jsonl",
    "environment",
    "print_table",
    "read_jsonl",
    "require_gpu",
    "time_cpu",
    "time_gpu",
]
