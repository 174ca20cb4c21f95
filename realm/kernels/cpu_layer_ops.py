"""The onednn backend's per-token layer ops on the CPU: RMSNorm (with the residual add), rotary embedding and
SiLU(gate) * up, each one C loop over its rows (`cpu_layer_ops.c`).

    y, h = rms_norm_cpu(x, weight, eps, residual=h)   # rms_norm_ref's contract (realm.kernels.rms_norm)
    q, k = apply_rope_cpu(q, k, positions, cos_sin)   # apply_rope's: q and k rotated in place (realm.kernels.rope)
    y = silu_mul_cpu(gate_up)                         # silu_mul_ref's (realm.kernels.silu_mul)

Why: the references are several torch ops each (RMSNorm eight, RoPE a dozen), and on a CPU a torch op on a few
rows costs its dispatch and allocation, not its arithmetic; a SmolLM2 step calls these three ops 121 times. With them
in C, plain decoding of bench/speculative.py's grounded prompts at batch 1 went from 26.0 to 28.7 output tok/s
(bench/results/speculative_batch1_kernels.jsonl, commits d2c83ed and 9d5e84e, one Intel Xeon). Triton has no CPU
code generation, so they are C, like the backend's attention and linear kernels, built on first use by
realm.kernels.cpu_build (`-O3 -march=native -ffast-math -fopenmp`).

Each row is computed alone and alike, so a row's bits do not depend on the rows in its step (a decode and the same
row inside a verification agree; tests/test_cpu_layer_ops.py). Not bit-exact with the references (a vectorised sum of
squares, fused multiply-adds, glibc's vector expf): held to a few float32 roundings of them. Other dtypes than
float32, tensors off the CPU, rows that are not contiguous along their last dimension, a weight or RoPE table that is
not contiguous, an `out` the kernel cannot write, or a machine where the kernel cannot be built run the reference,
with one warning per reason.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from pathlib import Path

import torch

from .cpu_build import BASE_FLAGS, CpuKernelUnavailable, load, unavailable
from .rms_norm import rms_norm_ref
from .rope import apply_rope_ref
from .silu_mul import silu_mul_ref

SOURCE = Path(__file__).with_suffix(".c")
# -ffast-math: glibc's vector expf in SiLU's loop, and a vectorised (fixed-order) sum of squares in RMSNorm's.
COMPILE_FLAGS = (*BASE_FLAGS, "-ffast-math")


@functools.cache
def library() -> ctypes.CDLL:
    """The built kernels (realm.kernels.cpu_build.load). Raises CpuKernelUnavailable."""
    lib = load(SOURCE, COMPILE_FLAGS)
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.realm_rms_norm_f32.argtypes = [p, i64, p, i64, p, p, i64, p, i64, i32, i32, f32, i32]
    lib.realm_rms_norm_f32.restype = None
    lib.realm_rope_f32.argtypes = [p, i64, i64, p, i64, i64, p, p, i64, i32, i32, i32, i32, i32]
    lib.realm_rope_f32.restype = i32
    lib.realm_silu_mul_f32.argtypes = [p, i64, p, i64, i32, i32, i32]
    lib.realm_silu_mul_f32.restype = None
    return lib


def unavailable_reason() -> str | None:
    """None when the kernels run here; else why not (no compiler, a failed build)."""
    return unavailable(library)


@functools.cache
def _warn_fallback(op: str, reason: str) -> None:
    warnings.warn(f"realm's CPU {op} kernel does not run here ({reason}); the onednn backend uses the reference "
                  "(slower on a few rows)", RuntimeWarning, stacklevel=3)


def _runnable(op: str, *tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The library when every tensor is float32 on the CPU with contiguous rows; else None, after saying why once."""
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1:
            _warn_fallback(op, f"it takes float32 CPU tensors with contiguous rows, not {t.dtype} on {t.device} "
                               f"with strides {t.stride()}")
            return None
    try:
        return library()
    except CpuKernelUnavailable as e:
        _warn_fallback(op, str(e))
        return None


def _fits(op: str, out: torch.Tensor | None, shape) -> bool:
    """Whether the kernel can write an `out` given by the caller; if not, says so once (the reference copies into
    it, and raises for one of another shape)."""
    if out is None or (out.shape == shape and out.dtype == torch.float32 and out.device.type == "cpu"
                       and out.stride(-1) == 1):
        return True
    _warn_fallback(op, f"it writes float32 CPU rows of {list(shape)}, not an out of {out.dtype} {list(out.shape)} "
                       f"on {out.device} with strides {out.stride()}")
    return False


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """rms_norm_ref's contract: x [tokens, hidden] -> y; with residual [tokens, hidden], (y, x + residual)."""
    if x.dim() != 2 or weight.shape != (x.shape[1],) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm takes x [tokens, hidden], weight [hidden] and a residual shaped as x, got "
                         f"{list(x.shape)}, {list(weight.shape)}"
                         + ("" if residual is None else f" and {list(residual.shape)}"))
    lib = _runnable("rms_norm", x, weight, *(() if residual is None else (residual,)))
    if lib is not None and not weight.is_contiguous():
        _warn_fallback("rms_norm", "the weight is not contiguous")
        lib = None
    if lib is not None and not _fits("rms_norm", out, x.shape):
        lib = None
    if lib is None:
        return rms_norm_ref(x, weight, eps, residual, out)
    rows, dim = x.shape
    y = torch.empty(rows, dim) if out is None else out
    h = None if residual is None else torch.empty(rows, dim)
    if rows:
        lib.realm_rms_norm_f32(x.data_ptr(), x.stride(0), None if residual is None else residual.data_ptr(),
                               0 if residual is None else residual.stride(0), weight.data_ptr(), y.data_ptr(),
                               y.stride(0), None if h is None else h.data_ptr(), dim, rows, dim, eps,
                               torch.get_num_threads())
    return y if residual is None else (y, h)


def apply_rope_cpu(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope's contract: q [tokens, n_heads, head_dim] and k [tokens, n_kv_heads, head_dim] rotated in place
    (views into a fused qkv output as they are) by positions [tokens], each in [0, max_positions) of cos_sin."""
    tokens, n_heads, head_dim = q.shape
    if k.dim() != 3 or k.shape[0] != tokens or k.shape[2] != head_dim or head_dim % 2 or positions.shape != (tokens,):
        raise ValueError(f"rope takes q [tokens, heads, head_dim], k [tokens, kv_heads, head_dim] (head_dim even) and "
                         f"positions [tokens], got {list(q.shape)}, {list(k.shape)}, {list(positions.shape)}")
    if cos_sin.shape[1:] != (2, head_dim // 2):
        raise ValueError(f"the RoPE table must be [max_positions, 2, {head_dim // 2}], got {list(cos_sin.shape)}")
    lib = _runnable("rope", q, k, cos_sin)
    if lib is not None and not cos_sin.is_contiguous():
        _warn_fallback("rope", "the RoPE table is not contiguous")
        lib = None
    if lib is None:
        return apply_rope_ref(q, k, positions, cos_sin)
    if positions.dtype != torch.int32 or not positions.is_contiguous():
        positions = positions.to(torch.int32).contiguous()
    if tokens:
        bad = lib.realm_rope_f32(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
                                 positions.data_ptr(), cos_sin.data_ptr(), cos_sin.shape[0], tokens, n_heads,
                                 k.shape[1], head_dim // 2, torch.get_num_threads())
        if bad:
            t = -1 - bad
            raise ValueError(f"token {t} has position {int(positions[t])}, outside the RoPE table's "
                             f"[0, {cos_sin.shape[0]})")
    return q, k


def silu_mul_cpu(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu_mul_ref's contract: gate_up [tokens, 2 * ffn] -> silu(gate) * up [tokens, ffn]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul takes gate_up [tokens, 2 * ffn] (an even width), got {list(gate_up.shape)}")
    lib = _runnable("silu_mul", gate_up)
    if lib is not None and not _fits("silu_mul", out, (gate_up.shape[0], gate_up.shape[1] // 2)):
        lib = None
    if lib is None:
        return silu_mul_ref(gate_up, out)
    rows, ffn = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty(rows, ffn) if out is None else out
    if rows:
        lib.realm_silu_mul_f32(gate_up.data_ptr(), gate_up.stride(0), y.data_ptr(), y.stride(0), rows, ffn,
                               torch.get_num_threads())
    return y
