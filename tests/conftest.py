"""Shared test setup: the `device` fixture, Triton's interpreter on CPU, and the `gpu` marker.

Without CUDA, Triton kernels run under Triton's interpreter on CPU tensors. The interpreter is chosen when a kernel
is decorated, so TRITON_INTERPRET must be set before any module defining a kernel is imported: here, at collection.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """cuda when present, else cpu (with Triton kernels under the interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """The default model (SmolLM2-135M-Instruct, Q4_1) loaded once, torch backend, float32, on the CPU."""
    import realm

    return realm.load("smollm2", device="cpu")
