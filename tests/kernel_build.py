"""A fresh build of one of realm's C kernels (realm.kernels.cpu_build), for the tests of its build and fallback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def fresh_kernel_build(tmp_path: Path, monkeypatch, *cached: Callable) -> Iterator[Path]:
    """The kernel built anew into the empty tmp_path ($REALM_KERNEL_DIR): its module's cached functions (the
    loader, the warn-once) cleared now and again after, so that other tests get the usual build back."""
    monkeypatch.setenv("REALM_KERNEL_DIR", str(tmp_path))
    for fn in cached:
        fn.cache_clear()
    try:
        yield tmp_path
    finally:
        for fn in cached:
            fn.cache_clear()
