"""The onednn backend's attention on the CPU: short chunks (decodes, speculative verification) by a C kernel that
reads K and V in place from the pages, longer chunks by the reference's SDPA.

    o = paged_attention_cpu(q, k, v, k_cache, v_cache, meta, scale, window=None, softcap=None)
    o = paged_attention_ref(...)        # the reference (realm.kernels.attention): SDPA per sequence on gathered keys

Why: the reference gathers every key and value of every sequence into new tensors before each SDPA call. At 32
decoding sequences of SmolLM2 the gathers are more than half of its time, and attention was most of a step
(bench/cpu_attention.py measures the reference, its gathers alone, and this kernel). Triton, realm's kernel
language, has no CPU code generation (its interpreter runs the GPU kernels as numpy, for tests), so this op is C:
`cpu_attention.c`, the paged decode / verify kernels' computation (one task per sequence and KV head, cut into tiles
of query rows only when the tasks are too few for the threads; all of a task's query rows in one online softmax pass,
each key and value read once per task) with OpenMP over the tasks.

It is built on first use by realm.kernels.cpu_build (the system C compiler, `-O3 -march=native -ffast-math -fopenmp`,
cached by a hash of the source, flags, compiler and CPU).
Where no compiler works, or for dtypes other than float32, the reference runs instead, with one warning per reason
that says why. Not bit-exact with the reference (another summation order): tests/test_cpu_attention.py holds it to the
attention tolerance of the Triton kernels. Bit-exact with itself across chunk lengths: a task's rows are the lanes of
vectors, each computed alike and alone, so a query gets the same bits in a decode as inside any verification chunk.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import AttentionMetadata, attend_sequence, paged_attention_ref
from .checks import check_softcap, check_window
from .cpu_build import BASE_FLAGS, CpuKernelUnavailable, load, unavailable
from .paged import check_block_table, check_kv_cache
from .verify_attention import MAX_VERIFY_QUERIES

SOURCE = Path(__file__).with_suffix(".c")
# -ffast-math: glibc's vector expf and tanhf in the `omp simd` loops (masked scores are finite, see the source).
COMPILE_FLAGS = (*BASE_FLAGS, "-ffast-math")
# Chunks up to this many queries run in the kernel (a task keeps q_len x group accumulators); longer ones, prompt
# chunks, are compute-bound and run in SDPA's tiled kernel.
MAX_KERNEL_QUERIES = MAX_VERIFY_QUERIES


@functools.cache
def library() -> ctypes.CDLL:
    """The built kernel, built now if this source, compiler and CPU have none yet. Raises CpuKernelUnavailable."""
    lib = load(SOURCE, COMPILE_FLAGS)
    f = lib.realm_paged_attention_f32
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    f.argtypes = [p, i64, p, p, p, p, i64, p, p, p, i32, i32, i32, i32, i32, f32, i32, f32, i32]
    f.restype = i32
    return lib


def unavailable_reason() -> str | None:
    """None when the kernel runs here; else why not (no compiler, a failed build)."""
    return unavailable(library)


@functools.cache
def _warn_fallback(reason: str) -> None:
    warnings.warn(f"realm's CPU attention kernel is unavailable ({reason}); the onednn backend uses the reference "
                  "attention (slower at many sequences)", RuntimeWarning, stacklevel=3)


@dataclass(frozen=True)
class CpuAttentionPlan:
    """One step's split: the sequences the kernel takes (their query offsets and lengths, context lengths and block
    table rows as int32 tensors) and the rest, for SDPA."""

    q_start: torch.Tensor
    q_len: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    rest: tuple[tuple[int, int, int], ...]  # (first query row, q_len, sequence) of each longer chunk

    @property
    def batch(self) -> int:
        return self.q_start.shape[0]


def plan_cpu_attention(meta: AttentionMetadata, num_blocks: int, block_size: int) -> CpuAttentionPlan:
    """The split for this step, checked once: the kernel reads the pages through raw pointers, so every block id
    and length it sees is checked against the cache here (as the Triton launchers check CPU tables)."""
    key = ("cpu", num_blocks, block_size)
    plan = meta._cpu_plans.get(key)
    if plan is not None:
        return plan
    check_block_table(meta.block_tables, meta.seq_lens, num_blocks, block_size, meta.block_tables.device)
    starts = meta.cu_seqlens_q.tolist()
    short, rest = [], []
    for b, (q_len, seq_len) in enumerate(zip(meta.query_lens, meta.context_lens, strict=True)):
        if not 0 <= q_len <= seq_len:
            raise ValueError(f"sequence {b} has {q_len} queries for {seq_len} tokens in the cache")
        if q_len:  # a chunk without queries has no output rows (the reference's empty slice)
            (short if q_len <= MAX_KERNEL_QUERIES else rest).append(b)
    rows = torch.tensor(short, dtype=torch.long)
    i32 = functools.partial(torch.tensor, dtype=torch.int32)
    tables = meta.block_tables if len(short) == len(starts) - 1 else meta.block_tables[rows]
    plan = CpuAttentionPlan(q_start=i32([starts[b] for b in short]), q_len=i32([meta.query_lens[b] for b in short]),
                            seq_lens=i32([meta.context_lens[b] for b in short]), block_tables=tables.contiguous(),
                            rest=tuple((starts[b], meta.query_lens[b], b) for b in rest))
    meta._cpu_plans[key] = plan
    return plan


def paged_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, window: int | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """paged_attention_ref's contract (q [tokens, n_heads, head_dim] -> [tokens, n_heads, head_dim]) on the CPU:
    chunks of up to MAX_KERNEL_QUERIES queries in the C kernel, longer ones in SDPA. Other dtypes than float32, or a
    machine where the kernel cannot be built, run the reference."""
    num_blocks, block_size, n_kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    if q.dtype != torch.float32 or k_cache.dtype != torch.float32 or q.device.type != "cpu":
        _warn_fallback(f"it computes float32 on the CPU, not {q.dtype} on {q.device}")
        return paged_attention_ref(q, k, v, k_cache, v_cache, meta, scale, window, softcap)
    try:
        lib = library()
    except CpuKernelUnavailable as e:
        _warn_fallback(str(e))
        return paged_attention_ref(q, k, v, k_cache, v_cache, meta, scale, window, softcap)
    tokens, n_heads, q_dim = q.shape
    if q_dim != head_dim or n_heads % n_kv_heads or sum(meta.query_lens) != tokens:
        raise ValueError(f"q {list(q.shape)} does not fit the KV cache's {n_kv_heads} heads of {head_dim} and the "
                         f"step's {sum(meta.query_lens)} query rows")
    check_window(window)
    check_softcap(softcap)
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    plan = plan_cpu_attention(meta, num_blocks, block_size)
    out = torch.empty(q.shape, dtype=q.dtype)
    if plan.batch:
        failed = lib.realm_paged_attention_f32(
            q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
            plan.block_tables.data_ptr(), plan.block_tables.stride(0), plan.q_start.data_ptr(), plan.q_len.data_ptr(),
            plan.seq_lens.data_ptr(), plan.batch, n_heads, n_kv_heads, head_dim, block_size, scale, window or 0,
            softcap or 0.0, torch.get_num_threads())
        if failed:
            raise MemoryError("the CPU attention kernel could not allocate its scratch memory")
    if plan.rest:
        k_flat = k_cache.view(-1, n_kv_heads, head_dim)
        v_flat = v_cache.view(-1, n_kv_heads, head_dim)
        slots = meta.key_slots(block_size)
        for first, q_len, b in plan.rest:
            out[first : first + q_len] = attend_sequence(q[first : first + q_len], k_flat[slots[b]],
                                                         v_flat[slots[b]], scale, window, softcap)
    return out
