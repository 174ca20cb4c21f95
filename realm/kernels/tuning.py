"""Tuned kernel configs: candidates per regime, a tuner, and JSON tables per GPU name, loaded explicitly.

A table maps (op, format, regime, M bucket, N, K) to the fields of a config dataclass. M is bucketed to the next
power of two (a decode step with 5 rows uses the config tuned for 8) so a handful of tuning runs covers every batch
size. Nothing is loaded at import: `load()` reads `configs/<gpu name>.json` (or a given file) into the in-process
table that the launchers consult, `tune()` measures candidates and records the fastest, `save()` writes the table.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def check_launch_fields(config, powers_of_two: Iterable[str], min_tile: dict[str, int] | None = None) -> None:
    """Validation every config dataclass shares: the named fields are positive powers of two (tile sizes, warps),
    tiles are at least their minimum (tl.dot needs 16), num_stages >= 1. Raises ValueError naming the field."""
    for name in powers_of_two:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value!r}")
    for name, least in (min_tile or {}).items():
        if getattr(config, name) < least:
            raise ValueError(f"{name} must be >= {least} (tl.dot), got {getattr(config, name)}")
    stages = getattr(config, "num_stages", 1)
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {stages!r}")
_TABLE: dict[str, dict[str, dict]] = {}  # device name -> key -> config fields


def bucket_m(m: int) -> int:
    """The smallest power of two >= m (>= 1)."""
    return 1 << max(0, int(m) - 1).bit_length()


def _key(op: str, fmt: str, regime: str, m: int, n: int, k: int) -> str:
    return f"{op}|{fmt}|{regime}|m{bucket_m(m)}|n{n}|k{k}"


def device_name(device: torch.device | str | None = None) -> str:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu-interpreter"
    return _cuda_name(torch.cuda.current_device() if device.index is None else device.index)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (looked up once per device: plans ask on the hot path)."""
    device = torch.device(device)
    return _cuda_sms(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _cuda_name(index: int) -> str:
    """A device's name never changes; asking the driver costs tens of microseconds, on every launch's plan."""
    return torch.cuda.get_device_name(index)


def config_path(name: str) -> Path:
    """configs/<name with every run of non-alphanumerics replaced by '_'>.json, e.g. NVIDIA_H100_80GB_HBM3.json."""
    return CONFIG_DIR / (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".json")


def lookup(op: str, fmt: str, regime: str, m: int, n: int, k: int, device: torch.device) -> dict | None:
    """The tuned config fields for this problem on this device, or None."""
    return _TABLE.get(device_name(device), {}).get(_key(op, fmt, regime, m, n, k))


def record(op: str, fmt: str, regime: str, m: int, n: int, k: int, config, device: torch.device) -> None:
    _TABLE.setdefault(device_name(device), {})[_key(op, fmt, regime, m, n, k)] = asdict(config)


def load(path: str | Path | None = None, device: torch.device | str | None = None) -> int:
    """Loads a JSON table ({"device": name, "configs": {key: fields}}) into the in-process table; by default the
    one saved for the current GPU. Returns the number of configs loaded (0 when no file exists for this GPU)."""
    name = device_name(device) if path is None else None
    path = config_path(name) if path is None else Path(path)
    if not path.exists():
        return 0
    data = json.loads(path.read_text())
    _TABLE.setdefault(data["device"], {}).update(data["configs"])
    return len(data["configs"])


def save(path: str | Path | None = None, device: torch.device | str | None = None) -> Path:
    """Writes the in-process table of one device to JSON (by default configs/<gpu name>.json); returns the path."""
    name = device_name(device)
    path = config_path(name) if path is None else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    configs = dict(sorted(_TABLE.get(name, {}).items()))
    path.write_text(json.dumps({"device": name, "configs": configs}, indent=1) + "\n")
    return path


def clear() -> None:
    _TABLE.clear()


def tune(run: Callable[[object], object], candidates: Iterable, timer: Callable[[Callable], float]) -> tuple:
    """Times run(config) for each candidate with timer (a callable -> milliseconds) and returns (best config, list of
    (config, ms)). A candidate that fails to compile or launch (too much shared memory, ...) is skipped and listed
    with ms = inf; if every candidate fails, raises the last error."""
    results, error = [], None
    for config in candidates:
        try:
            ms = timer(lambda config=config: run(config))
        except Exception as exc:
            error = exc
            ms = float("inf")
        results.append((config, ms))
    best = min(results, key=lambda r: r[1])
    if best[1] == float("inf"):
        raise RuntimeError("every candidate config failed") from error
    return best[0], results
