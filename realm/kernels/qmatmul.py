"""Quantized matmul `y = x @ W.T` for every block format: W decoded tile by tile in registers, never in memory.

    y[m, n] = sum_k x[m, k] * w[n, k],   w[n, k] = scale * value(code) (+|-) offset   (realm.quant.planes)

Two kernels share the decode routine of `qdecode.py`, one per regime:

- decode (M <= 16 by default): memory-bound, so the kernel's job is to stream the weight bytes once at full
  bandwidth. Each program owns BLOCK_N output columns and one of SPLIT_K slices of K, so that even narrow layers
  (N = 576) launch enough programs to keep every SM's loads in flight; partial sums of the slices are added in
  float32 afterwards. Up to 4 rows multiply on CUDA cores in float32; 5..16 rows go through one padded tensor-core
  tile (`tl.dot` needs 16 rows) since the time is the weight stream either way.
- prefill (larger M): compute-bound, a tiled GEMM (the Triton tutorial's grouped ordering for L2 reuse) whose K loop
  decodes a [BLOCK_N, BLOCK_K] weight tile, casts it to x's dtype and feeds the tensor cores.

Accumulation is float32 everywhere. float32 activations use IEEE float32 dot products (not TF32), so the float32
path matches the reference to accumulation-order rounding; float16/bfloat16 activations multiply the weight rounded
to their dtype, as any tensor-core kernel does.

Multi-LoRA (realm.kernels.lora): `lora=LoraEpilogue(t, b, scale, indices)` adds each row's adapter delta
`scale[idx[m], n] * sum_j t[m, j] * b[idx[m], n, j]` to the float32 accumulator before the one rounding, so y is
written once. Those launches run `_qmatmul_*_lora_kernel`: the same K loop (shared jit helpers) plus the delta, which
starts the accumulator; with split-K only split 0 adds it. Separate kernels rather than a HAS_LORA constexpr keep the
plain kernels' arguments as they were (tests/compile_for_gpu.py compiles them by signature) and their code too
(compiled for sm_90: the same registers and PTX up to label names).

Which kernel and which tile sizes run is a `Plan` (`plan_qmatmul`), visible and overridable: pass `regime=` and/or
`config=`; tuned configs (realm.kernels.tuning) are used when loaded for the current GPU.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from realm.quant import Layout, QTensor

from . import tuning
from .checks import cdiv, next_power_of_2
from .lora import LoraEpilogue, lora_delta, lora_delta_ref
from .qdecode import check_block_k, check_runnable, dot_precision, load_weight_tile, weight_args, weight_planes

log = logging.getLogger(__name__)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Regime(str, enum.Enum):
    DECODE = "decode"  # split-K streaming kernel for few rows
    PREFILL = "prefill"  # tiled tensor-core GEMM


DECODE_MAX_M = 16  # the launcher's default boundary between the regimes
BROADCAST_MAX_M = 4  # decode kernel: rows multiplied on CUDA cores; more rows use one 16-row tl.dot tile


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 32
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        tuning.check_launch_fields(self, ("block_n", "block_k", "num_warps"))
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        tuning.check_launch_fields(self, ("block_m", "block_n", "block_k", "num_warps"),
                                   {"block_m": 16, "block_n": 16, "block_k": 16})
        if self.group_m < 1:
            raise ValueError(f"group_m must be >= 1, got {self.group_m}")


Config = DecodeConfig | PrefillConfig
CONFIG_TYPES = {Regime.DECODE: DecodeConfig, Regime.PREFILL: PrefillConfig}


@dataclass(frozen=True)
class Plan:
    """What qmatmul runs: the regime, its tile config, and where the config came from (given, tuned, default)."""

    regime: Regime
    config: Config
    source: str


# ---- kernels -----------------------------------------------------------------------------------------------------

@triton.jit
def _decode_partial(acc, x_ptr, p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr, offs_m, m_mask, offs_n, n_mask,
                    K, stride_xm, k_start, k_per_split,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    W0: tl.constexpr, W1: tl.constexpr, VALUE: tl.constexpr, BIAS: tl.constexpr,
                    QBLOCK: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
                    OFFSET: tl.constexpr, E8M0: tl.constexpr):
    """acc (float32 [BLOCK_M, BLOCK_N]) + sum over k_start .. k_start + k_per_split of x[m, k] * w[n, k]."""
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        w = load_weight_tile(p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr, offs_n, n_mask, k0, K,
                             BLOCK_N, BLOCK_K, W0, W1, VALUE, BIAS, QBLOCK, GROUP, CHUNK, SUB, OFFSET, E8M0)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        if USE_DOT:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    return acc


@triton.jit
def _qmatmul_decode_kernel(out_ptr, x_ptr, p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr,
                           M, N, K, stride_xm, stride_om, stride_split, k_per_split,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           W0: tl.constexpr, W1: tl.constexpr, VALUE: tl.constexpr, BIAS: tl.constexpr,
                           QBLOCK: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
                           OFFSET: tl.constexpr, E8M0: tl.constexpr):
    """out[split, m, n] = sum over this split's K slice of x[m, k] * w[n, k]."""
    pid_n, pid_split, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _decode_partial(acc, x_ptr, p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr, offs_m, m_mask, offs_n,
                          n_mask, K, stride_xm, pid_split * k_per_split, k_per_split, BLOCK_M, BLOCK_N, BLOCK_K,
                          USE_DOT, DOT_PRECISION, W0, W1, VALUE, BIAS, QBLOCK, GROUP, CHUNK, SUB, OFFSET, E8M0)
    out = out_ptr + pid_split.to(tl.int64) * stride_split + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _qmatmul_decode_lora_kernel(out_ptr, x_ptr, p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr,
                                M, N, K, stride_xm, stride_om, stride_split, k_per_split,
                                lora_t, lora_b, lora_scale, lora_idx, lora_rank, lora_slots,
                                stride_lt, stride_lbs, stride_lbn, stride_lss,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                W0: tl.constexpr, W1: tl.constexpr, VALUE: tl.constexpr, BIAS: tl.constexpr,
                                QBLOCK: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
                                OFFSET: tl.constexpr, E8M0: tl.constexpr,
                                LORA_BLOCK_R: tl.constexpr, LORA_GATHER_R: tl.constexpr, LORA_DOT: tl.constexpr):
    """_qmatmul_decode_kernel plus the LoRA delta (realm.kernels.lora.lora_delta), added by split 0 only: its
    accumulator starts at the delta, computed before the K loop so that the two never hold registers at once."""
    pid_n, pid_split, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if pid_split == 0:
        acc = lora_delta(lora_t, lora_b, lora_scale, lora_idx, offs_m, m_mask, offs_n, n_mask, lora_rank,
                         lora_slots, stride_lt, stride_lbs, stride_lbn, stride_lss, BLOCK_M, BLOCK_N, LORA_BLOCK_R,
                         LORA_GATHER_R, LORA_DOT)
    acc = _decode_partial(acc, x_ptr, p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr, offs_m, m_mask, offs_n,
                          n_mask, K, stride_xm, pid_split * k_per_split, k_per_split, BLOCK_M, BLOCK_N, BLOCK_K,
                          USE_DOT, DOT_PRECISION, W0, W1, VALUE, BIAS, QBLOCK, GROUP, CHUNK, SUB, OFFSET, E8M0)
    out = out_ptr + pid_split.to(tl.int64) * stride_split + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile) in grouped ordering: GROUP_M row tiles share each weight column tile
    while it is in L2."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _prefill_tile(acc, x_ptr, p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr, offs_m, m_mask, offs_n, n_mask,
                  K, stride_xm,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  W0: tl.constexpr, W1: tl.constexpr, VALUE: tl.constexpr, BIAS: tl.constexpr,
                  QBLOCK: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
                  OFFSET: tl.constexpr, E8M0: tl.constexpr):
    """acc (float32 [BLOCK_M, BLOCK_N]) + sum_k x[m, k] * w[n, k]."""
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        w = load_weight_tile(p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr, offs_n, n_mask, k0, K,
                             BLOCK_N, BLOCK_K, W0, W1, VALUE, BIAS, QBLOCK, GROUP, CHUNK, SUB, OFFSET, E8M0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _qmatmul_prefill_kernel(out_ptr, x_ptr, p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr,
                            M, N, K, stride_xm, stride_om,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            W0: tl.constexpr, W1: tl.constexpr, VALUE: tl.constexpr, BIAS: tl.constexpr,
                            QBLOCK: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
                            OFFSET: tl.constexpr, E8M0: tl.constexpr):
    """out[m, n] = sum_k x[m, k] * w[n, k] over one BLOCK_M x BLOCK_N tile."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _prefill_tile(acc, x_ptr, p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr, offs_m, m_mask, offs_n,
                        n_mask, K, stride_xm, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, W0, W1, VALUE, BIAS, QBLOCK,
                        GROUP, CHUNK, SUB, OFFSET, E8M0)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _qmatmul_prefill_lora_kernel(out_ptr, x_ptr, p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr,
                                 M, N, K, stride_xm, stride_om,
                                 lora_t, lora_b, lora_scale, lora_idx, lora_rank, lora_slots,
                                 stride_lt, stride_lbs, stride_lbn, stride_lss,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                 W0: tl.constexpr, W1: tl.constexpr, VALUE: tl.constexpr, BIAS: tl.constexpr,
                                 QBLOCK: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
                                 OFFSET: tl.constexpr, E8M0: tl.constexpr,
                                 LORA_BLOCK_R: tl.constexpr, LORA_GATHER_R: tl.constexpr, LORA_DOT: tl.constexpr):
    """_qmatmul_prefill_kernel plus the LoRA delta (realm.kernels.lora.lora_delta): the accumulator starts at the
    delta, computed before the K loop so that the two never hold registers at once."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = lora_delta(lora_t, lora_b, lora_scale, lora_idx, offs_m, m_mask, offs_n, n_mask, lora_rank, lora_slots,
                     stride_lt, stride_lbs, stride_lbn, stride_lss, BLOCK_M, BLOCK_N, LORA_BLOCK_R, LORA_GATHER_R,
                     LORA_DOT)
    acc = _prefill_tile(acc, x_ptr, p0, p1, d_ptr, sub_ptr, m_ptr, subm_ptr, table_ptr, offs_m, m_mask, offs_n,
                        n_mask, K, stride_xm, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, W0, W1, VALUE, BIAS, QBLOCK,
                        GROUP, CHUNK, SUB, OFFSET, E8M0)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ---- planning ----------------------------------------------------------------------------------------------------

def default_config(regime: Regime, m: int, n: int, k: int, fmt_block: int, device: torch.device) -> Config:
    """Untuned tiles: a reasonable start on any GPU. Under the CPU interpreter, where each program costs a Python
    loop iteration, wide tiles keep the program count (and the test suite) small."""
    interpreter = device.type != "cuda"
    if regime is Regime.PREFILL:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        block_n = min(1024, max(16, next_power_of_2(n))) if interpreter else 64
        return PrefillConfig(block_m=block_m, block_n=block_n, block_k=64 if fmt_block <= 64 else 128)
    block_k = min(256, max(32, next_power_of_2(k)))
    block_n = min(1024, next_power_of_2(n)) if interpreter else 32
    split_k = 1
    if not interpreter:
        # Two waves of programs over the SMs: split K until the column tiles alone would not fill them.
        sms = tuning.sm_count(device)
        tiles = cdiv(n, block_n)
        while tiles * split_k < 2 * sms and k // (2 * split_k) >= block_k:
            split_k *= 2
    return DecodeConfig(block_n=block_n, block_k=block_k, split_k=split_k)


def plan_qmatmul(m: int, w: QTensor, *, regime: Regime | str | None = None, config: Config | None = None,
                 device: torch.device | None = None) -> Plan:
    """The kernel and tiles `qmatmul` runs for m rows of activations against w."""
    n, k = w.shape
    device = w.device if device is None else device
    if regime is None:
        regime = (Regime.DECODE if m <= DECODE_MAX_M else Regime.PREFILL) if config is None else \
            next(r for r, t in CONFIG_TYPES.items() if isinstance(config, t))
    regime = Regime(regime)
    if config is not None:
        if not isinstance(config, CONFIG_TYPES[regime]):
            raise ValueError(f"regime {regime.value} needs a {CONFIG_TYPES[regime].__name__}, "
                             f"got {type(config).__name__}")
        return Plan(regime, config, "given")
    tuned = tuning.lookup("qmatmul", w.fmt.name, regime.value, m, n, k, device)
    if tuned is not None:
        return Plan(regime, CONFIG_TYPES[regime](**tuned), "tuned")
    return Plan(regime, default_config(regime, m, n, k, w.fmt.block_size, device), "default")


def candidate_configs(regime: Regime | str) -> list[Config]:
    """The configs `autotune` tries for a regime: tile shapes around the defaults, with split-K for decode."""
    if Regime(regime) is Regime.DECODE:
        return [DecodeConfig(block_n=bn, block_k=bk, split_k=s, num_warps=nw, num_stages=st)
                for bn, bk, nw in ((16, 256, 4), (32, 256, 4), (64, 128, 4), (64, 256, 8), (128, 128, 8))
                for s in (1, 2, 4, 8)
                for st in (2, 3)]
    return [PrefillConfig(block_m=bm, block_n=bn, block_k=bk, group_m=8, num_warps=nw, num_stages=st)
            for bm, bn, bk, nw, st in ((64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
                                       (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 256, 64, 8, 3),
                                       (64, 64, 128, 4, 3), (128, 128, 128, 8, 2))]


def autotune(x: torch.Tensor, w: QTensor, *, regime: Regime | str | None = None, configs: list[Config] | None = None,
             timer=None) -> Plan:
    """Times qmatmul(x, w) with every candidate config of the regime, records the fastest for x's M bucket on this
    device (used by later calls; `tuning.save()` writes the table) and returns its plan. timer: a callable taking a
    no-argument function and returning milliseconds; default triton.testing.do_bench (needs CUDA)."""
    regime = plan_qmatmul(x.reshape(-1, w.shape[1]).shape[0], w, regime=regime, device=x.device).regime
    if timer is None:
        timer = lambda call: triton.testing.do_bench(call, warmup=10, rep=50)  # noqa: E731
    out = torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)
    best, _ = tuning.tune(lambda cfg: qmatmul(x, w, out, config=cfg), configs or candidate_configs(regime), timer)
    n, k = w.shape
    tuning.record("qmatmul", w.fmt.name, regime.value, out.numel() // n, n, k, best, x.device)
    return Plan(regime, best, "tuned")


# ---- launcher ----------------------------------------------------------------------------------------------------

def _check_inputs(x: torch.Tensor, w: QTensor, out: torch.Tensor | None) -> None:
    if not isinstance(w, QTensor):
        raise TypeError(f"w must be a realm.quant.QTensor, got {type(w).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    n, k = w.shape
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K]")
    if x.shape[-1] % w.fmt.block_size:
        raise ValueError(f"x has K = {x.shape[-1]}, not a multiple of the {w.fmt.name} block size "
                         f"{w.fmt.block_size}")
    if x.shape[-1] != k:
        raise ValueError(f"x has K = {x.shape[-1]} but w is [{n}, {k}]")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but w is on {w.device}")
    if out is not None:
        expected = (*x.shape[:-1], n)
        if tuple(out.shape) != expected or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"out must be {x.dtype} {list(expected)} on {x.device}, "
                             f"got {out.dtype} {list(out.shape)} on {out.device}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")


def qmatmul(x: torch.Tensor, w: QTensor, out: torch.Tensor | None = None, *, regime: Regime | str | None = None,
            config: Config | None = None, lora: LoraEpilogue | None = None) -> torch.Tensor:
    """x [..., K] (float16, bfloat16 or float32) @ w.T, w a QTensor [N, K] of any format -> [..., N] in x's dtype.

    w is best given in `Layout.PLANES` (`w.repack("planes")` once at load); other layouts are repacked on every call.
    regime / config override the launcher's choice (see `plan_qmatmul`). lora: a per-row adapter delta added in the
    epilogue, for the M = prod(x.shape[:-1]) rows and the N columns of w (see `LoraEpilogue`).
    """
    _check_inputs(x, w, out)
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError("qmatmul has no backward: x requires grad (call it under torch.no_grad() or detach x)")
    n, k = w.shape
    x2 = x.reshape(-1, k)  # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    _check_lora(lora, m, n, x)
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device) if out is None else out
    out2 = out.view(-1, n)  # [M, N]
    planes = weight_planes(w)
    check_runnable([x2, out2, *planes.tensors()], "qmatmul")
    if m == 0 or n == 0:
        return out
    plan = plan_qmatmul(m, w, regime=regime, config=config, device=x.device)
    check_block_k(planes, plan.config.block_k)
    log.debug("qmatmul %s M=%d N=%d K=%d: %s", w.fmt.name, m, n, k, plan)
    args = {"M": m, "N": n, "K": k, "stride_xm": x2.stride(0), "DOT_PRECISION": dot_precision(x.dtype),
            **weight_args(planes, plan.config.block_k)}
    if plan.regime is Regime.DECODE:
        _launch_decode(out2, x2, plan.config, args, lora)
    else:
        _launch_prefill(out2, x2, plan.config, args, lora)
    return out


def _check_lora(lora: LoraEpilogue | None, m: int, n: int, x: torch.Tensor) -> None:
    if lora is None:
        return
    if not isinstance(lora, LoraEpilogue):
        raise TypeError(f"lora must be a realm.kernels.lora.LoraEpilogue, got {type(lora).__name__}")
    lora.check(m, n, x.dtype, x.device)


class PreparedWeight:
    """A weight made ready for many launches, as a model's linear layers use it: the planes layout on its device, and
    per M bucket (the next power of two, as tuned configs are keyed) the plan and the kernel arguments, worked out
    on first use and reused. `qmatmul` re-validates and re-plans on every call, which on a GPU costs more host time
    than a small decode kernel takes to run.

        wq = PreparedWeight(w, device)      # once, at load
        y = wq(x)                            # x [M, K] (rows contiguous) -> [M, N] in x's dtype
        y = wq(x, lora=LoraEpilogue(...))    # ... plus each row's LoRA delta, in the kernel's epilogue
    """

    def __init__(self, w: QTensor, device: torch.device | str | None = None):
        if not isinstance(w, QTensor):
            raise TypeError(f"w must be a realm.quant.QTensor, got {type(w).__name__}")
        w = w if w.layout is Layout.PLANES else w.repack(Layout.PLANES)
        self.w = w if device is None else w.to(device)
        self.shape = self.w.shape
        self.device = self.w.device
        self.planes = weight_planes(self.w)
        check_runnable(self.planes.tensors(), "qmatmul")
        self._launches: dict[tuple[int, torch.dtype], tuple[Plan, dict]] = {}
        self._decodes: dict[tuple[int, torch.dtype], _DecodeLaunch] = {}  # exact M: a decode step's M repeats

    def __repr__(self) -> str:
        return f"PreparedWeight({self.w.fmt.name}, {list(self.shape)}, {self.device})"

    def plan(self, m: int, dtype: torch.dtype) -> tuple[Plan, dict]:
        """The plan and the launch arguments (all but M and the stride of x) for m rows of dtype."""
        key = (tuning.bucket_m(m), dtype)
        entry = self._launches.get(key)
        if entry is None:
            plan = plan_qmatmul(key[0], self.w, device=self.device)
            check_block_k(self.planes, plan.config.block_k)
            log.debug("qmatmul %s N=%d K=%d, M bucket %d %s: %s", self.w.fmt.name, *self.shape, key[0], dtype, plan)
            entry = self._launches[key] = (plan, {"N": self.shape[0], "K": self.shape[1],
                                                  "DOT_PRECISION": dot_precision(dtype),
                                                  **weight_args(self.planes, plan.config.block_k)})
        return entry

    def __call__(self, x: torch.Tensor, lora: LoraEpilogue | None = None) -> torch.Tensor:
        """x: [M, K], float16/bfloat16/float32, stride 1 along K, on the weight's device -> [M, N] in x's dtype;
        lora: a per-row adapter delta added in the epilogue (checked on every call; its tensors change per step)."""
        n, k = self.shape
        if x.dim() != 2 or x.shape[1] != k or x.dtype not in DTYPES or x.device != self.device or x.stride(1) != 1:
            raise ValueError(f"x must be [M, {k}] float16/bfloat16/float32 with contiguous rows on {self.device}, got "
                             f"{x.dtype} {list(x.shape)} (strides {x.stride()}) on {x.device}")
        m = x.shape[0]
        _check_lora(lora, m, n, x)
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        if not m:
            return out
        decode = self._decodes.get((m, x.dtype))
        if decode is not None:  # the same decode launch as last time: only x, the output and lora differ
            decode.run(out, x, lora)
            return out
        plan, args = self.plan(m, x.dtype)
        args = {**args, "M": m, "stride_xm": x.stride(0)}
        if plan.regime is Regime.DECODE:
            decode = _DecodeLaunch(plan.config, args)
            if len(self._decodes) < MAX_DECODE_LAUNCHES:
                self._decodes[(m, x.dtype)] = decode
            decode.run(out, x, lora)
        else:
            _launch_prefill(out, x, plan.config, args, lora)
        return out


MAX_DECODE_LAUNCHES = 64  # per weight: one per decode batch size seen (M <= DECODE_MAX_M unless a plan says more)


class _DecodeLaunch:
    """The decode kernel's grid and arguments for one M, worked out once."""

    def __init__(self, cfg: DecodeConfig, args: dict):
        m, n, k = args["M"], args["N"], args["K"]
        block_m = next_power_of_2(m) if m <= BROADCAST_MAX_M else 16
        k_per_split = cdiv(cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
        self.m, self.n, self.splits = m, n, cdiv(k, k_per_split)
        self.block_m, self.block_n = block_m, cfg.block_n
        self.grid = (cdiv(n, cfg.block_n), self.splits, cdiv(m, block_m))
        self.kwargs = {**args, "stride_om": n, "stride_split": m * n, "k_per_split": k_per_split, "BLOCK_M": block_m,
                       "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "USE_DOT": block_m >= 16,
                       "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": True}

    def run(self, out2: torch.Tensor, x2: torch.Tensor, lora: LoraEpilogue | None = None) -> None:
        kwargs = self.kwargs if x2.stride(0) == self.kwargs["stride_xm"] else {**self.kwargs,
                                                                                "stride_xm": x2.stride(0)}
        # One slice writes the output directly; several write float32 partials that are summed afterwards.
        target = out2 if self.splits == 1 else torch.empty(self.splits, self.m, self.n, dtype=torch.float32,
                                                           device=out2.device)
        if lora is None:
            _qmatmul_decode_kernel[self.grid](target, x2, **kwargs)
        else:  # the LoRA tensors change every step: their arguments are not cached
            _qmatmul_decode_lora_kernel[self.grid](target, x2, **kwargs,
                                                   **lora.kernel_args(self.block_m, self.block_n, self.block_m >= 16))
        if self.splits > 1:
            torch.sum(target, dim=0, out=out2) if out2.dtype == torch.float32 else out2.copy_(target.sum(0))


def _launch_decode(out2: torch.Tensor, x2: torch.Tensor, cfg: DecodeConfig, args: dict,
                   lora: LoraEpilogue | None = None) -> None:
    _DecodeLaunch(cfg, args).run(out2, x2, lora)


def _launch_prefill(out2: torch.Tensor, x2: torch.Tensor, cfg: PrefillConfig, args: dict,
                    lora: LoraEpilogue | None = None) -> None:
    m, n = args["M"], args["N"]
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),)
    kwargs = {**args, "stride_om": n, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
              "GROUP_M": cfg.group_m, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
              "enable_fp_fusion": True}
    if lora is None:
        _qmatmul_prefill_kernel[grid](out2, x2, **kwargs)
    else:
        _qmatmul_prefill_lora_kernel[grid](out2, x2, **kwargs, **lora.kernel_args(cfg.block_m, cfg.block_n, True))


def qmatmul_ref(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """The reference: dequantize w (realm.quant's decoder), matmul in float32, cast to x's dtype. x [..., K]."""
    _check_inputs(x, w, None)
    return (x.float() @ w.dequantize().to(x.device).t()).to(x.dtype)


def qmatmul_lora_ref(x: torch.Tensor, w: QTensor, lora: LoraEpilogue) -> torch.Tensor:
    """The reference of qmatmul(x, w, lora=lora): qmatmul_ref's float32 product plus realm.kernels.lora's
    lora_delta_ref, rounded once to x's dtype. x [..., K]."""
    _check_inputs(x, w, None)
    n, k = w.shape
    x2 = x.reshape(-1, k)
    _check_lora(lora, x2.shape[0], n, x)
    y = x2.float() @ w.dequantize().to(x.device).t() + lora_delta_ref(lora.t, lora.b, lora.scale, lora.indices)
    return y.to(x.dtype).view(*x.shape[:-1], n)
