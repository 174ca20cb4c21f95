"""The onednn backend's linear layers for steps of few rows (decodes, speculative verification): a C kernel
streaming weights packed in panels near the memory's rate.

    panels = pack_panels(w)                       # w [N, K] float32 -> [ceil(N / 32), K, 32], once at load
    y = linear_panels(x, panels, n, bias=None)    # x [M, K] -> [M, N] = x @ w.T (+ bias)
    y = linear_ref(x, w, bias)                    # the reference: F.linear

Why: a decode step of a small model on the CPU is its weights read once (SmolLM2-135M: 538 MB of float32 per step),
so its time is the weights' bytes over the memory's rate, and a speculative verification of k + 1 rows should cost
about what a decode costs. oneDNN's packed GEMM (what the backend runs on prompt chunks) read one row's weights at
19.5 GB/s on this project's CPU; this kernel, one pass over each panel with the weights prefetched ahead, at 26 GB/s
(bench/results/cpu_linear.jsonl, commit 5095678). At 9d13ebd (same file, same Intel Xeon) it took 0.57-0.80x
oneDNN's time at every step size up to 64 rows, and its time grew slowly with the rows: within the one-row time's
noise up to 9 rows, 1.28x it for 16, 1.72x for 32 (1.6x and 2.5x at 5095678, before tiles of 12 rows shared one walk
of each panel). Above MAX_ROWS rows oneDNN's blocked GEMM runs (ops.py picks per step).

A row's result is one chain of fused multiply-adds over k, whatever rows are computed with it: a decode and the same
row inside a verification get the same bits (tests/test_cpu_linear.py). Not bit-exact with F.linear (another
summation order): held to the bound of a K-term float32 sum. Built by realm.kernels.cpu_build without -ffast-math (which
would let the compiler reorder the chain); where no kernel can be built, the backend keeps oneDNN for every step,
with one warning that says why.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .cpu_build import BASE_FLAGS, CpuKernelUnavailable, load, unavailable

SOURCE = Path(__file__).with_suffix(".c")
COMPILE_FLAGS = BASE_FLAGS  # no -ffast-math: each output's chain of FMAs keeps its order
PANEL = 32  # output columns per panel: cpu_linear.c's PANEL (checked against the built library)
# Steps of up to this many rows run in the kernel, longer ones (prompt chunks) in oneDNN's GEMM. On the one CPU
# measured (bench/results/cpu_linear.jsonl, commit 5095678, Intel Xeon) the kernel took 0.74-0.90x oneDNN's time for
# 1-64 rows and 0.90-0.96x at 128 and 256: prompt chunks, compute-bound, are what oneDNN's blocked GEMM is built for,
# and a 4-10% lead on one machine is not enough to rest them on this loop everywhere.
MAX_ROWS = 64


@functools.cache
def library() -> ctypes.CDLL:
    """The built kernel (realm.kernels.cpu_build.load). Raises CpuKernelUnavailable."""
    lib = load(SOURCE, COMPILE_FLAGS)
    if lib.realm_linear_panel_width() != PANEL:
        raise CpuKernelUnavailable(f"{SOURCE.name} packs {lib.realm_linear_panel_width()} columns per panel, "
                                   f"cpu_linear.py {PANEL}")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.realm_linear_f32.argtypes = [p, i64, p, p, p, i64, i32, i32, i64, i32]
    lib.realm_linear_f32.restype = None
    return lib


def unavailable_reason() -> str | None:
    """None when the kernel runs here; else why not (no compiler, a failed build)."""
    return unavailable(library)


@functools.cache
def warn_unavailable(reason: str) -> None:
    warnings.warn(f"realm's CPU linear kernel is unavailable ({reason}); the onednn backend runs every step's linear "
                  "layers in oneDNN (slower for decodes and verifications)", RuntimeWarning, stacklevel=3)


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] float32 -> [ceil(N / PANEL), K, PANEL]: panel p holds output columns p * PANEL .. + PANEL - 1, k-major
    (the kernel reads one panel as one stream), the last zero-padded."""
    if w.dim() != 2 or w.dtype != torch.float32:
        raise ValueError(f"pack_panels takes a float32 matrix [N, K], not {w.dtype} {list(w.shape)}")
    n, k = w.shape
    padded = F.pad(w, (0, 0, 0, -n % PANEL))
    return padded.view(-1, PANEL, k).transpose(1, 2).contiguous()


def linear_panels(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 (rows may be strided) @ the packed [N, K] weight's transpose (+ bias [N]) -> [M, N]."""
    if x.dtype != torch.float32 or panels.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"linear_panels computes float32 on the CPU, not x {x.dtype} on {x.device}, panels "
                         f"{panels.dtype}")
    if x.dim() != 2 or panels.dim() != 3 or panels.shape[2] != PANEL or not panels.is_contiguous():
        raise ValueError(f"expected x [M, K] and contiguous panels [P, K, {PANEL}], got {list(x.shape)} and "
                         f"{list(panels.shape)}")
    k = x.shape[1]
    if panels.shape[1] != k or not 0 < n <= panels.shape[0] * PANEL or n <= (panels.shape[0] - 1) * PANEL:
        raise ValueError(f"x has {k} columns and panels {list(panels.shape)} hold [N, {panels.shape[1]}]; N = {n} "
                         f"does not fit them")
    if bias is not None and (bias.shape != (n,) or bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous float32 [{n}], got {bias.dtype} {list(bias.shape)}")
    return linear_panels_unchecked(x, panels, n, bias)


def linear_panels_unchecked(x: torch.Tensor, panels: torch.Tensor, n: int,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear_panels for the onednn backend's forward, 121 calls a SmolLM2 step: its panels and bias were checked
    when packed and built (PackedWeight, Linear.build), so only what the step brings is checked here, x's width (a
    wrong one would read past the panels); linear_panels' full checks cost more than the kernel's own call."""
    m, k = x.shape
    if k != panels.shape[1]:
        raise ValueError(f"x has {k} columns, the packed weight reads {panels.shape[1]}")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    if m:
        library().realm_linear_f32(x.data_ptr(), x.stride(0), panels.data_ptr(),
                                   None if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0), m, n, k,
                                   torch.get_num_threads())
    return y


def linear_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, bias)
