"""Loading a benchmark script (bench/<name>.py) as a module, for tests of its pure functions."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@functools.cache
def load_bench_script(name: str) -> ModuleType:
    """bench/<name>.py loaded by path as `bench_<name>`, with bench/ on sys.path only while it imports harness."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        mp.setitem(sys.modules, f"bench_{name}", module)  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return module
