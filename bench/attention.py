"""Speed of realm's attention kernels on the GPU: prefill next to torch's SDPA and the FLOP peak, decode next to HBM.

Prefill (`flash_attention`). For every shape, sequence length S (512 .. 16k), mask (causal or full) and dtype it times
realm's kernel on `batch = max(1, --tokens // S)` sequences of S tokens each (so every launch holds ~16k query tokens,
as a serving batch would), packed [batch * S, heads, head_dim] with cu_seqlens, and
torch.nn.functional.scaled_dot_product_attention on the very same q, k, v viewed as [batch, heads, S, head_dim]
(a free view of the packed tensors, the layout SDPA's flash backend reads natively; enable_gqa where there are fewer
KV heads; the row records which SDPA backend torch picked). FLOPs = 4 batch heads S^2 head_dim (the QK^T and PV
matmuls), halved when causal: only the unmasked half is counted (FlashAttention's convention). Rows give ms, TFLOP/s,
sdpa_ratio = sdpa_ms / ms (> 1: realm is faster), and the fractions of the matmul rate measured in the run and of the
datasheet's dense 16-bit tensor-core peak.

Decode (`paged_decode_attention`). For every shape, context length (512 .. 32k) and batch size (1, 4, 16, 64) it times
one query token per sequence against a paged KV cache of block_size 16 whose blocks are scattered (each sequence's
blocks are drawn from a random permutation of all block ids), every sequence holding `context` tokens. Bytes moved =
the K and V the kernel must read (sum over sequences of seq_len x kv_heads x head_dim x 2 x element size) + q + out
(block tables and split-K partials are not counted: they are overhead, not work); rows give GB/s, the fraction of the
bandwidth measured in the run (bw_fraction) and of the datasheet's HBM bandwidth, and the plan_decode plan that ran
(num_splits).

Verify (`paged_verify_attention`, speculative decoding's verification: k + 1 causal queries per sequence over its
pages). For every shape, context length (512 .. 32k), batch size (1, 8, 32) and q_len = k + 1 (2, 4, 8, 16) it times
realm's verification kernel and `flash_attention_paged` (the kernel that served such chunks before) on the very same
inputs: batch chunks of q_len queries packed [batch * q_len, heads, head_dim] with cu_seqlens, the last q_len of
`context` tokens each, in a paged cache scattered as decode's. Bytes moved = K and V of every cached token once per KV
head + q + out (as decode: the fewest any kernel must move); rows give GB/s and bw_fraction for both kernels, the
speedup flash_ms / ms (> 1: the verification kernel is faster) and the plan that ran (splits, row tile).

Shapes (SHAPES): mha-d128: 32 heads x 128 (Llama-2-7B); mha-d64: 32 heads x 64 (OPT-1.3B; Llama-3.2-1B's query
heads); gqa-d128: 32 query / 8 KV heads x 128 (Llama-3-8B); gqa-d64: 32 / 8 x 64 (Llama-3.2-1B). Prefill sweeps all
four, decode and verify the two GQA ones (what decodes in practice).

The ceilings are measured once per run on the same device: bandwidth from a 1 GiB device-to-device copy (bytes read +
written), the matmul rate from an 8192^3 torch.matmul per dtype; the datasheet peaks (PEAKS) are looked up by device
name. Before a shape is timed, the timed kernel's output (written into a NaN-poisoned buffer, with the inputs that are
timed) is compared with the float32 reference of realm.kernels on a slice (prefill: the first and last sequence, the
first and last head, SDPA's output too; decode: the first and last sequence; verify: the first and last chunk, of
both kernels); a wrong result stops the run.

The end of a run prints the tables and the issue's targets: (prefill) in bfloat16 at head_dim 128 and S >= 4096,
realm >= 0.9x SDPA's speed (the issue asks it on an H100; the verdict line names the device); (decode) at batch >= 16
and context >= 4096, >= 70 % of the measured copy bandwidth. Verify has no target yet (the issue asks for the
measurement against flash_attention_paged): its table shows the speedup and bandwidth fraction.

    python bench/attention.py                  # all parts, bfloat16 and float16: rows to bench/results/attention.jsonl
    python bench/attention.py --quick          # prefill mha-d128 gqa-d128 at 1k 4k 16k; decode gqa-d128; verify
                                               # gqa-d128 at 4k 32k, batches 1 32, q_len 4 16; bfloat16
    python bench/attention.py --part prefill --seqs 4096 16384 --masks causal --prefill-shapes gqa-d128
    python bench/attention.py --part decode --contexts 4096 32768 --batches 16 64 --dtypes float16
    python bench/attention.py --part verify --verify-contexts 8192 --verify-batches 8 --q-lens 4 8
    python bench/attention.py --plot-only      # attention.png (latest run per key), tables and targets; no GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import (
    RESULTS,
    Target,
    append_jsonl,
    copy_gbs,
    environment,
    l2_bytes,
    latest,
    matmul_tflops,
    plot_only_rows,
    positive_int,
    print_table,
    read_jsonl,
    require_gpu,
    rotation_sets,
    save_figure,
    shown,
    target_results,
    time_gpu,
)

from realm.kernels.flash_attention import default_config, flash_attention, flash_attention_paged, flash_attention_ref
from realm.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref, plan_decode
from realm.kernels.verify_attention import (
    MAX_VERIFY_QUERIES,
    paged_verify_attention,
    paged_verify_attention_ref,
    plan_verify,
)

JSONL = RESULTS / "attention.jsonl"
PARTS = ("prefill", "decode", "verify")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
MASKS = {"causal": True, "full": False}


@dataclass(frozen=True)
class AttnShape:
    name: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    model: str

    @property
    def gqa(self) -> bool:
        return self.n_kv_heads != self.n_heads


SHAPES = {s.name: s for s in (
    AttnShape("mha-d128", 32, 32, 128, "Llama-2-7B"),
    AttnShape("mha-d64", 32, 32, 64, "OPT-1.3B; Llama-3.2-1B's query heads"),
    AttnShape("gqa-d128", 32, 8, 128, "Llama-3-8B"),
    AttnShape("gqa-d64", 32, 8, 64, "Llama-3.2-1B"),
)}
PREFILL_SHAPES = ("mha-d128", "mha-d64", "gqa-d128", "gqa-d64")
DECODE_SHAPES = ("gqa-d128", "gqa-d64")
VERIFY_SHAPES = ("gqa-d128", "gqa-d64")
SEQS = (512, 1024, 2048, 4096, 8192, 16384)
CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCHES = (1, 4, 16, 64)
VERIFY_BATCHES = (1, 8, 32)
Q_LENS = (2, 4, 8, 16)  # k + 1 for k = 1, 3, 7, 15 draft tokens
TOKENS = 16384  # query tokens per prefill launch: batch = max(1, TOKENS // S)
BLOCK_SIZE = 16  # the paged cache's tokens per block
# --quick (the GPU suite's attention step, under its time cap): verify adds 8 rows, 2 kernels timed in each.
QUICK = {"prefill_shapes": ("mha-d128", "gqa-d128"), "seqs": (1024, 4096, 16384), "decode_shapes": ("gqa-d128",),
         "contexts": (512, 4096, 32768), "batches": (1, 16, 64), "verify_shapes": ("gqa-d128",),
         "verify_contexts": (4096, 32768), "verify_batches": (1, 32), "q_lens": (4, 16), "dtypes": ("bfloat16",)}
# Dense (no sparsity) 16-bit tensor-core peak and HBM bandwidth by device name (first match wins). Sources: NVIDIA H100
# Tensor Core GPU datasheet (bf16/fp16 with sparsity: SXM 1979, NVL 1671, PCIe 1513 TFLOP/s, half that dense; HBM
# 3.35, 3.9, 2.0 TB/s) and NVIDIA H200 datasheet (SXM 1979, NVL 1671 TFLOP/s with sparsity; 4.8 TB/s).
PEAKS = (
    ("H100 PCIe", 756.5, 2000.0, "NVIDIA H100 datasheet (PCIe)"),
    ("H100 NVL", 835.5, 3900.0, "NVIDIA H100 datasheet (NVL)"),
    ("H100", 989.5, 3350.0, "NVIDIA H100 datasheet (SXM5)"),  # "NVIDIA H100 80GB HBM3"
    ("H200 NVL", 835.5, 4800.0, "NVIDIA H200 datasheet (NVL)"),
    ("H200", 989.5, 4800.0, "NVIDIA H200 datasheet (SXM)"),
)
# Largest per-row relative L2 error ||y - ref|| / ||ref|| allowed on the checked rows. The kernels round the softmax
# probabilities to the input dtype for the PV product and the output once more (the reference rounds its output too):
# a torch emulation of that on N(0, 1) inputs gives 5e-4 (float16) and 4e-3 (bfloat16) at S = 512 and 4096, and
# float16 flash_attention under the interpreter 7e-4. A masking, indexing or offset bug gives errors of order 1.
TOLERANCE = {"float16": 1e-2, "bfloat16": 4e-2}
SEED = 0
# Each timed call reads a different input set: harness.rotation_sets gives enough sets to exceed the L2 cache
# together, so no call finds its operands in L2 from an earlier one. Large problems exceed L2 alone: one set.
COPY_BYTES = 1 << 30  # bandwidth ceiling: a 1 GiB device-to-device copy, far beyond any cache
MATMUL_SIZE = 8192  # matmul ceiling: 8192^3, large enough for cuBLAS's best tiles on every SM


# ---- pure computations on plain values and dict rows (tested on CPU) ---------------------------------------------

def prefill_batch(seq: int, tokens: int = TOKENS) -> int:
    """Sequences of seq tokens per prefill launch, so that the launch holds about `tokens` query tokens."""
    return max(1, tokens // seq)


def prefill_flops(batch: int, n_heads: int, seq: int, head_dim: int, causal: bool) -> int:
    """4 batch heads seq^2 head_dim (QK^T and PV, 2 FLOPs per multiply-add each), halved when causal."""
    flops = 4 * batch * n_heads * seq * seq * head_dim
    return flops // 2 if causal else flops


def decode_bytes(seq_lens: Sequence[int], n_heads: int, n_kv_heads: int, head_dim: int, elem: int) -> dict:
    """The fewest bytes a decode step moves: K and V of every cached token (read once per KV head, shared by its
    query heads), q read and out written."""
    kv = sum(seq_lens) * n_kv_heads * head_dim * 2 * elem
    q = len(seq_lens) * n_heads * head_dim * elem
    return {"kv_bytes": kv, "q_bytes": q, "out_bytes": q, "bytes_moved": kv + 2 * q}


def verify_bytes(seq_lens: Sequence[int], q_len: int, n_heads: int, n_kv_heads: int, head_dim: int, elem: int) -> dict:
    """The fewest bytes a verification step moves: K and V of every cached token (read once per KV head, shared by
    its query heads and the chunk's q_len queries), q read and out written (q_len rows per sequence)."""
    kv = sum(seq_lens) * n_kv_heads * head_dim * 2 * elem
    q = len(seq_lens) * q_len * n_heads * head_dim * elem
    return {"kv_bytes": kv, "q_bytes": q, "out_bytes": q, "bytes_moved": kv + 2 * q}


def datasheet_peak(device_name: str) -> dict:
    """{peak_tflops, peak_gbs, peak_source} of the first PEAKS entry whose key is in device_name; all None when no
    entry matches (the fractions of the peak are then None, the measured ceilings still apply)."""
    for key, tflops, gbs, source in PEAKS:
        if key in device_name:
            return {"peak_tflops": tflops, "peak_gbs": gbs, "peak_source": source}
    return {"peak_tflops": None, "peak_gbs": None, "peak_source": None}


def _fraction(value: float, ceiling: float | None) -> float | None:
    return value / ceiling if ceiling else None


def prefill_rates(row: dict) -> dict:
    """Derived figures of a prefill row. Needs flops, ms, sdpa_ms, matmul_tflops (measured) and peak_tflops (or
    None)."""
    tflops = row["flops"] / (row["ms"] * 1e9)
    sdpa_tflops = row["flops"] / (row["sdpa_ms"] * 1e9)
    return {"tflops": tflops, "sdpa_tflops": sdpa_tflops, "sdpa_ratio": row["sdpa_ms"] / row["ms"],
            "matmul_fraction": tflops / row["matmul_tflops"],
            "sdpa_matmul_fraction": sdpa_tflops / row["matmul_tflops"],
            "peak_fraction": _fraction(tflops, row["peak_tflops"]),
            "sdpa_peak_fraction": _fraction(sdpa_tflops, row["peak_tflops"])}


def decode_rates(row: dict) -> dict:
    """Derived figures of a decode row. Needs bytes_moved, kv_bytes, ms, bw_gbs (measured) and peak_gbs (or None)."""
    gbs = row["bytes_moved"] / (row["ms"] * 1e6)
    return {"gbs": gbs, "kv_gbs": row["kv_bytes"] / (row["ms"] * 1e6), "bw_fraction": gbs / row["bw_gbs"],
            "peak_bw_fraction": _fraction(gbs, row["peak_gbs"])}


def verify_rates(row: dict) -> dict:
    """Derived figures of a verify row: decode_rates of the verification kernel, the same of flash_attention_paged
    (flash_ms) and the speedup flash_ms / ms."""
    flash_gbs = row["bytes_moved"] / (row["flash_ms"] * 1e6)
    return {**decode_rates(row), "flash_gbs": flash_gbs, "flash_bw_fraction": flash_gbs / row["bw_gbs"],
            "speedup": row["flash_ms"] / row["ms"]}


def describe(row: dict) -> str:
    """A row's key in words, e.g. 'prefill gqa-d128 bfloat16 causal S=4096 x8', 'decode gqa-d128 bfloat16 B=16
    ctx=4096' or 'verify gqa-d128 bfloat16 B=8 ctx=4096 q=4'."""
    if row["kind"] == "prefill":
        mask = "causal" if row["causal"] else "full"
        return f"prefill {row['shape']} {row['dtype']} {mask} S={row['seq_len']} x{row['batch']}"
    if row["kind"] == "verify":
        return f"verify {row['shape']} {row['dtype']} B={row['batch']} ctx={row['context']} q={row['q_len']}"
    return f"decode {row['shape']} {row['dtype']} B={row['batch']} ctx={row['context']}"


TARGETS = (
    Target("prefill", "prefill, bfloat16, head_dim 128, S >= 4096: >= 0.9x SDPA's speed (issue: on an H100)",
           "sdpa_ratio", 0.9,
           lambda r: r["kind"] == "prefill" and r["dtype"] == "bfloat16" and r["head_dim"] == 128
           and r["seq_len"] >= 4096),
    Target("decode", "decode, batch >= 16, context >= 4096: >= 70% of the measured copy bandwidth", "bw_fraction", 0.7,
           lambda r: r["kind"] == "decode" and r["batch"] >= 16 and r["context"] >= 4096),
)


def evaluate_targets(rows: list[dict], targets=TARGETS) -> list[dict]:
    """harness.target_results, the worst row given as its description (and value)."""
    return target_results(rows, targets, lambda r: {"row": describe(r)})


def target_line(res: dict) -> str:
    line = f"{res['status']:4s} ({res['target']}) {res['text']}"
    if res["worst"]:
        line += (f": {res['misses']} of {res['rows']} rows below {res['threshold']:g} on {', '.join(res['devices'])}; "
                 f"worst {res['worst']['row']}: {res['metric']} {res['worst']['value']:.2f}")
    return line


# latest(rows, KEY): the newest row per key (q_len: verify rows only; None elsewhere)
KEY = ("kind", "shape", "dtype", "causal", "seq_len", "batch", "context", "q_len")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max over rows (all leading dims) of ||y - ref|| / ||ref|| along the last dim, in float32; NaN anywhere in y
    (an unwritten, poisoned output) gives NaN."""
    y, ref = y.float().flatten(0, -2), ref.float().flatten(0, -2)
    return float(((y - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max())


# ---- correctness gate ---------------------------------------------------------------------------------------------

def as_bhsd(t: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Packed [batch * seq, heads, head_dim] (equal lengths) viewed as SDPA's [batch, heads, seq, head_dim]."""
    return t.view(batch, seq, *t.shape[1:]).transpose(1, 2)


def run_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int, seq: int, causal: bool) -> torch.Tensor:
    """SDPA on packed q, k, v of equal-length sequences: [batch, heads, seq, head_dim]."""
    return F.scaled_dot_product_attention(as_bhsd(q, batch, seq), as_bhsd(k, batch, seq), as_bhsd(v, batch, seq),
                                          is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int, seq: int, causal: bool) -> str | None:
    """The SDPA backend torch dispatches these inputs to (FLASH_ATTENTION, CUDNN_ATTENTION, ..., MATH), from torch's
    private torch._fused_sdp_choice; None where that is unavailable."""
    from torch.nn.attention import SDPBackend

    try:
        choice = torch._fused_sdp_choice(as_bhsd(q, batch, seq), as_bhsd(k, batch, seq), as_bhsd(v, batch, seq), None,
                                         0.0, causal, enable_gqa=q.shape[1] != k.shape[1])
        return SDPBackend(choice).name
    except (AttributeError, RuntimeError, TypeError, ValueError):  # a private API: absent or changed in this torch
        return None


def check_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, out: torch.Tensor, seq: int,
                  causal: bool, tol: float) -> dict:
    """Runs flash_attention into a poisoned out, and SDPA, on packed equal-length sequences; compares both with
    flash_attention_ref on the first and last sequence and the first and last query head (with its KV head). Returns
    {max_rel_err, sdpa_max_rel_err}; raises when either exceeds tol or is not finite."""
    batch, (n_heads, n_kv_heads) = cu.numel() - 1, (q.shape[1], k.shape[1])
    out.fill_(float("nan"))
    flash_attention(q, k, v, cu, cu, causal=causal, max_seqlen_q=seq, out=out)
    sdpa = run_sdpa(q, k, v, batch, seq, causal).transpose(1, 2)  # [batch, seq, heads, head_dim]
    one = torch.tensor([0, seq], dtype=torch.int32, device=q.device)
    errs = {"max_rel_err": 0.0, "sdpa_max_rel_err": 0.0}
    for b in sorted({0, batch - 1}):
        rows = slice(b * seq, (b + 1) * seq)
        for h in sorted({0, n_heads - 1}):
            g = h // (n_heads // n_kv_heads)
            ref = flash_attention_ref(q[rows, h:h + 1], k[rows, g:g + 1], v[rows, g:g + 1], one, one, causal=causal)
            for key, got, who in (("max_rel_err", out[rows, h:h + 1], "flash_attention is wrong"),
                                  ("sdpa_max_rel_err", sdpa[b, :, h:h + 1], "SDPA disagrees with flash_attention_ref")):
                err = rel_err(got, ref)
                if not err <= tol:
                    raise RuntimeError(f"{who} for {n_heads}/{n_kv_heads} heads x {q.shape[2]}, {q.dtype}, "
                                       f"{'causal' if causal else 'full'}, {batch} x {seq} tokens: sequence {b}, head "
                                       f"{h}: max row ||y - ref|| / ||ref|| = {err:.3g} > {tol:g}")
                errs[key] = max(errs[key], err)
    return errs


def check_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                 block_table: torch.Tensor, max_seq_len: int, out: torch.Tensor, tol: float) -> float:
    """Runs paged_decode_attention into a poisoned out and compares its first and last sequence with
    paged_decode_attention_ref; returns the max row relative error, raises when it exceeds tol or is not finite."""
    out.fill_(float("nan"))
    paged_decode_attention(q, k_cache, v_cache, seq_lens, block_table, max_seq_len=max_seq_len, out=out)
    idx = torch.tensor(sorted({0, q.shape[0] - 1}), device=q.device)
    ref = paged_decode_attention_ref(q[idx], k_cache, v_cache, seq_lens[idx], block_table[idx])
    err = rel_err(out[idx], ref)
    if not err <= tol:
        raise RuntimeError(f"paged_decode_attention is wrong for {q.shape[1]}/{k_cache.shape[2]} heads x "
                           f"{q.shape[2]}, {q.dtype}, batch {q.shape[0]}, lengths up to {max_seq_len}: max row "
                           f"||y - ref|| / ||ref|| = {err:.3g} > {tol:g} on sequences {idx.tolist()}")
    return err


def check_verify(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu: torch.Tensor,
                 seq_lens: torch.Tensor, block_table: torch.Tensor, q_len: int, max_seq_len: int, out: torch.Tensor,
                 flash_out: torch.Tensor, tol: float) -> dict:
    """Runs paged_verify_attention and flash_attention_paged into poisoned outputs on batch chunks of q_len queries
    each and compares their first and last chunk with paged_verify_attention_ref. Returns {max_rel_err,
    flash_max_rel_err}; raises when either exceeds tol or is not finite."""
    out.fill_(float("nan"))
    flash_out.fill_(float("nan"))
    paged_verify_attention(q, k_cache, v_cache, cu, seq_lens, block_table, max_seqlen_q=q_len, max_seq_len=max_seq_len,
                           out=out)
    flash_attention_paged(q, k_cache, v_cache, cu, seq_lens, block_table, max_seqlen_q=q_len, out=flash_out)
    batch, heads = seq_lens.shape[0], q.shape[1:]
    idx = torch.tensor(sorted({0, batch - 1}), device=q.device)

    def chunks(t: torch.Tensor) -> torch.Tensor:  # the checked chunks of packed t, packed
        return t.view(batch, q_len, *heads)[idx].flatten(0, 1)

    cu_idx = torch.arange(0, idx.numel() * q_len + 1, q_len, dtype=torch.int32, device=q.device)
    ref = paged_verify_attention_ref(chunks(q), k_cache, v_cache, cu_idx, seq_lens[idx], block_table[idx])
    errs = {}
    for key, got, who in (("max_rel_err", out, "paged_verify_attention is wrong"),
                          ("flash_max_rel_err", flash_out, "flash_attention_paged disagrees with the reference")):
        errs[key] = rel_err(chunks(got), ref)
        if not errs[key] <= tol:
            raise RuntimeError(f"{who} for {q.shape[1]}/{k_cache.shape[2]} heads x {q.shape[2]}, {q.dtype}, batch "
                               f"{batch} x {q_len} queries, lengths up to {max_seq_len}: max row ||y - ref|| / ||ref|| "
                               f"= {errs[key]:.3g} > {tol:g} on sequences {idx.tolist()}")
    return errs


# ---- inputs and ceilings -----------------------------------------------------------------------------------------

def measure_ceilings(dtypes: Sequence[str], device: torch.device) -> dict:
    """The device's memory bandwidth (GB/s, bytes read + written by a copy) and matmul rate (TFLOP/s) per dtype."""
    return {"bw_gbs": copy_gbs(device, COPY_BYTES, SEED), "copy_bytes": COPY_BYTES, "matmul_size": MATMUL_SIZE,
            "matmul_tflops": {d: matmul_tflops(DTYPES[d], device, MATMUL_SIZE, SEED) for d in dtypes}}


def randn(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device, generator=gen)


def scattered_block_tables(sets: int, batch: int, blocks_per_seq: int, gen: torch.Generator,
                           device: torch.device) -> list[torch.Tensor]:
    """`sets` int32 block tables [batch, blocks_per_seq] over one cache of sets * batch * blocks_per_seq blocks: a
    random permutation of all block ids cut in order, so every block is used once and a sequence's blocks lie
    scattered over the whole cache."""
    perm = torch.randperm(sets * batch * blocks_per_seq, generator=gen, device=gen.device).to(device, torch.int32)
    return list(perm.view(sets, batch, blocks_per_seq).unbind(0))


# ---- measurement -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """What every row of one run shares."""

    device: torch.device
    l2_bytes: int
    ceilings: dict
    peak: dict
    tokens: int = TOKENS


def _shape_fields(shape: AttnShape) -> dict:
    return {"shape": shape.name, "model": shape.model, "n_heads": shape.n_heads, "n_kv_heads": shape.n_kv_heads,
            "head_dim": shape.head_dim, "gqa": shape.gqa}


def _ceiling_fields(run: Run, dtype: str) -> dict:
    c = run.ceilings
    return {"bw_gbs": c["bw_gbs"], "copy_bytes": c["copy_bytes"], "matmul_tflops": c["matmul_tflops"][dtype],
            "matmul_size": c["matmul_size"], "l2_bytes": run.l2_bytes, **run.peak}


def measure_prefill(shape: AttnShape, seq: int, causal: bool, dtype_name: str, run: Run) -> dict:
    """Checks, then times flash_attention and SDPA on the same packed q, k, v of prefill_batch(seq) sequences."""
    dtype, device = DTYPES[dtype_name], run.device
    esize = torch.empty((), dtype=dtype).element_size()
    batch = prefill_batch(seq, run.tokens)
    total, (h, kvh, d) = batch * seq, (shape.n_heads, shape.n_kv_heads, shape.head_dim)
    sets = rotation_sets(total * (2 * h + 2 * kvh) * d * esize, run.l2_bytes)  # q, out, k, v
    gen = torch.Generator(device=device).manual_seed(SEED + seq)
    qs = [randn((total, h, d), dtype, gen, device) for _ in range(sets)]
    ks = [randn((total, kvh, d), dtype, gen, device) for _ in range(sets)]
    vs = [randn((total, kvh, d), dtype, gen, device) for _ in range(sets)]
    outs = [torch.empty_like(q) for q in qs]
    cu = torch.arange(0, total + 1, seq, dtype=torch.int32, device=device)
    errs = check_prefill(qs[0], ks[0], vs[0], cu, outs[0], seq, causal, TOLERANCE[dtype_name])  # compiles too
    t = time_gpu(lambda q, k, v, o: flash_attention(q, k, v, cu, cu, causal=causal, max_seqlen_q=seq, out=o),
                 list(zip(qs, ks, vs, outs, strict=True)))
    ts = time_gpu(lambda q, k, v: run_sdpa(q, k, v, batch, seq, causal), list(zip(qs, ks, vs, strict=True)))
    row = {"kind": "prefill", **_shape_fields(shape), "dtype": dtype_name, "causal": causal, "seq_len": seq,
           "batch": batch, "tokens": total, "context": None,
           "flops": prefill_flops(batch, h, seq, d, causal), "ms": t["ms"], "ms_p20": t["ms_p20"],
           "ms_p80": t["ms_p80"], "sdpa_ms": ts["ms"], "sdpa_ms_p20": ts["ms_p20"], "sdpa_ms_p80": ts["ms_p80"],
           "config": dataclasses.asdict(default_config(d, dtype)),  # flash_attention's tiles when config=None
           "sdpa_backend": sdpa_backend(qs[0], ks[0], vs[0], batch, seq, causal), "sets": sets, **errs,
           "tolerance": TOLERANCE[dtype_name], **_ceiling_fields(run, dtype_name)}
    row.update(prefill_rates(row))
    return row


def measure_decode(shape: AttnShape, context: int, batch: int, dtype_name: str, run: Run) -> dict:
    """Checks, then times paged_decode_attention for batch sequences of `context` tokens in scattered blocks."""
    dtype, device = DTYPES[dtype_name], run.device
    esize = torch.empty((), dtype=dtype).element_size()
    h, kvh, d = shape.n_heads, shape.n_kv_heads, shape.head_dim
    counts = decode_bytes([context] * batch, h, kvh, d, esize)
    sets = rotation_sets(counts["bytes_moved"], run.l2_bytes)
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = sets * batch * blocks_per_seq
    gen = torch.Generator(device=device).manual_seed(SEED + context + batch)
    k_cache = randn((num_blocks, BLOCK_SIZE, kvh, d), dtype, gen, device)
    v_cache = randn((num_blocks, BLOCK_SIZE, kvh, d), dtype, gen, device)
    tables = scattered_block_tables(sets, batch, blocks_per_seq, torch.Generator().manual_seed(SEED), device)
    qs = [randn((batch, h, d), dtype, gen, device) for _ in range(sets)]
    outs = [torch.empty_like(q) for q in qs]
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    plan = plan_decode(batch, kvh, context, device)  # what the launcher plans for the same arguments
    err = check_decode(qs[0], k_cache, v_cache, seq_lens, tables[0], context, outs[0], TOLERANCE[dtype_name])
    t = time_gpu(lambda q, bt, o: paged_decode_attention(q, k_cache, v_cache, seq_lens, bt, max_seq_len=context,
                                                         out=o), list(zip(qs, tables, outs, strict=True)))
    row = {"kind": "decode", **_shape_fields(shape), "dtype": dtype_name, "causal": None, "seq_len": None,
           "batch": batch, "context": context, "block_size": BLOCK_SIZE, "num_blocks": num_blocks,
           "num_splits": plan.num_splits, "tokens_per_split": plan.tokens_per_split,
           "plan_config": dataclasses.asdict(plan.config), "plan_source": plan.source, **counts, "ms": t["ms"],
           "ms_p20": t["ms_p20"], "ms_p80": t["ms_p80"], "sets": sets, "max_rel_err": err,
           "tolerance": TOLERANCE[dtype_name], **_ceiling_fields(run, dtype_name)}
    row.update(decode_rates(row))
    return row


def measure_verify(shape: AttnShape, context: int, batch: int, q_len: int, dtype_name: str, run: Run) -> dict:
    """Checks, then times paged_verify_attention and flash_attention_paged on batch chunks of q_len queries, the
    last q_len of `context` tokens in scattered blocks each."""
    dtype, device = DTYPES[dtype_name], run.device
    esize = torch.empty((), dtype=dtype).element_size()
    h, kvh, d = shape.n_heads, shape.n_kv_heads, shape.head_dim
    counts = verify_bytes([context] * batch, q_len, h, kvh, d, esize)
    sets = rotation_sets(counts["bytes_moved"], run.l2_bytes)
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = sets * batch * blocks_per_seq
    gen = torch.Generator(device=device).manual_seed(SEED + context + batch + q_len)
    k_cache = randn((num_blocks, BLOCK_SIZE, kvh, d), dtype, gen, device)
    v_cache = randn((num_blocks, BLOCK_SIZE, kvh, d), dtype, gen, device)
    tables = scattered_block_tables(sets, batch, blocks_per_seq, torch.Generator().manual_seed(SEED), device)
    qs = [randn((batch * q_len, h, d), dtype, gen, device) for _ in range(sets)]
    outs = [torch.empty_like(q) for q in qs]
    flash_outs = [torch.empty_like(q) for q in qs]
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    cu = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device=device)
    plan = plan_verify(batch, h, kvh, d, q_len, context, dtype, device)  # what the launcher plans for these arguments
    errs = check_verify(qs[0], k_cache, v_cache, cu, seq_lens, tables[0], q_len, context, outs[0], flash_outs[0],
                        TOLERANCE[dtype_name])  # compiles both too
    t = time_gpu(lambda q, bt, o: paged_verify_attention(q, k_cache, v_cache, cu, seq_lens, bt, max_seqlen_q=q_len,
                                                         max_seq_len=context, out=o),
                 list(zip(qs, tables, outs, strict=True)))
    tf = time_gpu(lambda q, bt, o: flash_attention_paged(q, k_cache, v_cache, cu, seq_lens, bt, max_seqlen_q=q_len,
                                                         out=o), list(zip(qs, tables, flash_outs, strict=True)))
    row = {"kind": "verify", **_shape_fields(shape), "dtype": dtype_name, "causal": True, "seq_len": None,
           "batch": batch, "context": context, "q_len": q_len, "tokens": batch * q_len, "block_size": BLOCK_SIZE,
           "num_blocks": num_blocks, "num_splits": plan.num_splits, "tokens_per_split": plan.tokens_per_split,
           "block_m": plan.block_m, "row_tiles": plan.row_tiles, "plan_config": dataclasses.asdict(plan.config),
           "plan_source": plan.source, "flash_config": dataclasses.asdict(default_config(d, dtype)), **counts,
           "ms": t["ms"], "ms_p20": t["ms_p20"], "ms_p80": t["ms_p80"], "flash_ms": tf["ms"],
           "flash_ms_p20": tf["ms_p20"], "flash_ms_p80": tf["ms_p80"], "sets": sets, **errs,
           "tolerance": TOLERANCE[dtype_name], **_ceiling_fields(run, dtype_name)}
    row.update(verify_rates(row))
    return row


def _emit(batch: list[dict], out: Path, env: dict, rows: list[dict]) -> None:
    append_jsonl(out, batch, env)
    rows += [{**env, **r} for r in batch]


def sweep_prefill(shapes: Sequence[AttnShape], seqs: Sequence[int], masks: Sequence[str], dtypes: Sequence[str],
                  run: Run, out: Path, env: dict) -> list[dict]:
    """Measures every (dtype, shape, mask, seq), appending each (dtype, shape, mask)'s rows to out as they complete
    (a run that is cut off keeps what it measured). Returns the rows merged with env, as written."""
    rows: list[dict] = []
    for dtype in dtypes:
        for shape in shapes:
            for mask in masks:
                batch = []
                for seq in seqs:
                    r = measure_prefill(shape, seq, MASKS[mask], dtype, run)
                    batch.append(r)
                    print(f"prefill {shape.name:8s} {dtype:8s} {mask:6s} S={seq:<5d} x{r['batch']:<3d} "
                          f"{r['ms']:9.4f} ms  {r['tflops']:6.1f} TFLOP/s  SDPA {r['sdpa_tflops']:6.1f} "
                          f"({r['sdpa_backend']})  x{r['sdpa_ratio']:.2f}", flush=True)
                _emit(batch, out, env, rows)
                _free(run.device)
    return rows


def sweep_decode(shapes: Sequence[AttnShape], contexts: Sequence[int], batches: Sequence[int], dtypes: Sequence[str],
                 run: Run, out: Path, env: dict) -> list[dict]:
    """Measures every (dtype, shape, batch, context), appending each (dtype, shape, batch)'s rows to out as they
    complete. Returns the rows merged with env, as written."""
    rows: list[dict] = []
    for dtype in dtypes:
        for shape in shapes:
            for b in batches:
                batch = []
                for context in contexts:
                    r = measure_decode(shape, context, b, dtype, run)
                    batch.append(r)
                    print(f"decode  {shape.name:8s} {dtype:8s} B={b:<3d} ctx={context:<6d} splits={r['num_splits']:<3d}"
                          f" {r['ms']:9.4f} ms  {r['gbs']:7.0f} GB/s  {r['bw_fraction']:.2f} of copy", flush=True)
                    _free(run.device)
                _emit(batch, out, env, rows)
    return rows


def sweep_verify(shapes: Sequence[AttnShape], contexts: Sequence[int], batches: Sequence[int], q_lens: Sequence[int],
                 dtypes: Sequence[str], run: Run, out: Path, env: dict) -> list[dict]:
    """Measures every (dtype, shape, batch, q_len, context), appending each (dtype, shape, batch, q_len)'s rows to out
    as they complete. Returns the rows merged with env, as written."""
    rows: list[dict] = []
    for dtype in dtypes:
        for shape in shapes:
            for b in batches:
                for q_len in q_lens:
                    batch = []
                    for context in contexts:
                        r = measure_verify(shape, context, b, q_len, dtype, run)
                        batch.append(r)
                        print(f"verify  {shape.name:8s} {dtype:8s} B={b:<3d} q={q_len:<2d} ctx={context:<6d} "
                              f"splits={r['num_splits']:<3d} {r['ms']:9.4f} ms  {r['gbs']:7.0f} GB/s  "
                              f"{r['bw_fraction']:.2f} of copy; flash {r['flash_ms']:9.4f} ms  x{r['speedup']:.2f}",
                              flush=True)
                        _free(run.device)
                    _emit(batch, out, env, rows)
    return rows


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- plot and report ---------------------------------------------------------------------------------------------

def plot(rows: list[dict], path: Path, dtype: str) -> Path:
    """attention.png from the latest row per key of dtype, one row of panels per part measured: prefill TFLOP/s
    against S per shape (realm solid, SDPA dashed, one colour per mask; the measured matmul rate and the datasheet
    peak as lines); decode GB/s against context per shape, one line per batch, with the measured copy bandwidth and
    the 70 % target; verify's speedup over flash_attention_paged against context per shape, one colour per q_len and
    one line style per batch, with 1x as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in latest(rows, KEY) if r["dtype"] == dtype]
    order = lambda name: (list(SHAPES).index(name) if name in SHAPES else len(SHAPES), name)  # noqa: E731
    panels = {kind: sorted({r["shape"] for r in rows if r["kind"] == kind}, key=order) for kind in PARTS}
    kinds = [k for k in PARTS if panels[k]]
    cols = max(1, *(len(panels[k]) for k in kinds)) if kinds else 1
    fig, axes = plt.subplots(max(1, len(kinds)), cols, figsize=(max(8.0, 4.5 * cols), 4.2 * max(1, len(kinds))),
                             squeeze=False)
    for i, kind in enumerate(kinds):
        for j in range(cols):
            ax = axes[i][j]
            if j >= len(panels[kind]):
                ax.set_visible(False)
                continue
            pts = [r for r in rows if r["kind"] == kind and r["shape"] == panels[kind][j]]
            {"prefill": _prefill_panel, "decode": _decode_panel, "verify": _verify_panel}[kind](ax, pts)
            ax.grid(True, alpha=0.3)
            # away from the lines; verify's 12 lines (4 q_len x 3 batches) in two columns wherever they leave room
            ax.legend(fontsize=6 if kind == "verify" else 7, ncols=2 if kind == "verify" else 1,
                      loc={"prefill": "upper left", "decode": "lower right", "verify": "best"}[kind])
    r0 = max(rows, key=lambda r: r["date"]) if rows else None
    devices = ", ".join(sorted({r["device"] for r in rows})) or "no rows"
    latest_run = f"; latest {r0['git_commit']} {r0['date'][:10]}" if r0 else ""
    return save_figure(fig, path, f"realm attention, {dtype}: {devices}{latest_run}", fontsize=11)


def _log2_axis(ax, xs: list[int], label: str) -> None:
    import matplotlib.ticker

    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x // 1024}k" if x >= 1024 else str(x) for x in xs])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set(xlabel=label, ylim=(0, None))


def _prefill_panel(ax, rows: list[dict]) -> None:
    r0 = rows[0]
    for color, causal in (("tab:blue", True), ("tab:orange", False)):
        pts = sorted((r for r in rows if r["causal"] == causal), key=lambda r: r["seq_len"])
        if pts:
            mask = "causal" if causal else "full"
            seqs = [r["seq_len"] for r in pts]
            ax.plot(seqs, [r["tflops"] for r in pts], color=color, marker="o", ms=3, label=f"realm {mask}")
            ax.plot(seqs, [r["sdpa_tflops"] for r in pts], color=color, marker="s", ms=3, ls="--",
                    label=f"SDPA {mask}")
    ax.axhline(r0["matmul_tflops"], color="0.4", lw=0.8, ls="-.", label=f"matmul {r0['matmul_tflops']:.0f}")
    if r0.get("peak_tflops"):
        ax.axhline(r0["peak_tflops"], color="0.6", lw=0.8, ls=":", label=f"datasheet {r0['peak_tflops']:.0f}")
    _log2_axis(ax, sorted({r["seq_len"] for r in rows}), f"sequence length (batch x S = {rows[0]['tokens']} tokens)")
    ax.set(title=f"prefill {r0['shape']}: {r0['n_heads']}/{r0['n_kv_heads']} heads x {r0['head_dim']}",
           ylabel="TFLOP/s")


def _decode_panel(ax, rows: list[dict]) -> None:
    r0 = rows[0]
    for b in sorted({r["batch"] for r in rows}):
        pts = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["context"])
        ax.plot([r["context"] for r in pts], [r["gbs"] for r in pts], marker="o", ms=3, label=f"batch {b}")
    ax.axhline(r0["bw_gbs"], color="k", lw=0.8, label=f"copy {r0['bw_gbs']:.0f} GB/s")
    ax.axhline(0.7 * r0["bw_gbs"], color="tab:red", lw=0.8, ls="--", label="target 70%, B >= 16, ctx >= 4k")
    if r0.get("peak_gbs"):
        ax.axhline(r0["peak_gbs"], color="0.6", lw=0.8, ls=":", label=f"datasheet {r0['peak_gbs']:.0f}")
    _log2_axis(ax, sorted({r["context"] for r in rows}), "context (tokens per sequence)")
    ax.set(title=f"decode {r0['shape']}: {r0['n_heads']}/{r0['n_kv_heads']} heads x {r0['head_dim']}",
           ylabel="GB/s (K + V + q + out)")


def _verify_panel(ax, rows: list[dict]) -> None:
    r0 = rows[0]
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    styles = ("-", "--", ":", "-.")
    batches = sorted({r["batch"] for r in rows})
    for i, q_len in enumerate(sorted({r["q_len"] for r in rows})):
        for j, b in enumerate(batches):
            pts = sorted((r for r in rows if r["q_len"] == q_len and r["batch"] == b), key=lambda r: r["context"])
            if pts:
                ax.plot([r["context"] for r in pts], [r["speedup"] for r in pts], color=colors[i % len(colors)],
                        ls=styles[j % len(styles)], marker="o", ms=3, label=f"q {q_len}, batch {b}")
    ax.axhline(1.0, color="k", lw=0.8)
    _log2_axis(ax, sorted({r["context"] for r in rows}), "context (tokens per sequence)")
    ax.set(title=f"verify {r0['shape']}: {r0['n_heads']}/{r0['n_kv_heads']} heads x {r0['head_dim']}",
           ylabel="speedup over flash_attention_paged")


PREFILL_TABLE = [("shape", None), ("dtype", None), ("causal", None), ("seq_len", None), ("batch", None),
                 ("ms", ".4f"), ("tflops", ".1f"), ("sdpa_tflops", ".1f"), ("sdpa_ratio", ".2f"),
                 ("matmul_fraction", ".2f"), ("peak_fraction", ".2f"), ("sdpa_backend", None), ("max_rel_err", ".1e")]
DECODE_TABLE = [("shape", None), ("dtype", None), ("batch", None), ("context", None), ("num_splits", None),
                ("ms", ".4f"), ("gbs", ".0f"), ("bw_fraction", ".2f"), ("peak_bw_fraction", ".2f"),
                ("max_rel_err", ".1e")]
VERIFY_TABLE = [("shape", None), ("dtype", None), ("batch", None), ("context", None), ("q_len", None),
                ("num_splits", None), ("row_tiles", None), ("ms", ".4f"), ("gbs", ".0f"), ("bw_fraction", ".2f"),
                ("flash_ms", ".4f"), ("flash_bw_fraction", ".2f"), ("speedup", ".2f"), ("max_rel_err", ".1e"),
                ("flash_max_rel_err", ".1e")]


def print_summary(rows: list[dict]) -> None:
    """The prefill, decode and verify tables, then each target's PASS / MISS / n/a with its worst row."""
    if not rows:
        print("no rows")
        return
    r0 = rows[0]
    matmul = ", ".join(sorted({f"{r['matmul_tflops']:.0f} ({r['dtype']})" for r in rows}))
    print(f"\n{r0['device']}, torch {r0['torch']}, triton {r0['triton']}, {r0['git_commit']}, {r0['date']}; ceilings: "
          f"{r0['bw_gbs']:.0f} GB/s copy, {matmul} TFLOP/s matmul; datasheet: {r0.get('peak_source') or 'unknown'}")
    for kind, table in (("prefill", PREFILL_TABLE), ("decode", DECODE_TABLE), ("verify", VERIFY_TABLE)):
        selected = [r for r in rows if r["kind"] == kind]
        if selected:
            print(f"\n{kind}")
            print_table(selected, table)
    print()
    for res in evaluate_targets(rows):
        print(target_line(res))


# ---- command line ------------------------------------------------------------------------------------------------

def _shape(text: str) -> AttnShape:
    if text not in SHAPES:
        raise argparse.ArgumentTypeError(f"unknown shape {text!r}; known: {', '.join(SHAPES)}")
    return SHAPES[text]


def _q_len(text: str) -> int:
    value = positive_int(text)
    if value > MAX_VERIFY_QUERIES:
        raise argparse.ArgumentTypeError(f"q_len {value} is above MAX_VERIFY_QUERIES = {MAX_VERIFY_QUERIES}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default all)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                   help="default bfloat16 float16 (--quick bfloat16); --plot-only: the dtypes shown, the first plotted")
    p.add_argument("--prefill-shapes", nargs="+", type=_shape, help=f"default {' '.join(PREFILL_SHAPES)}")
    p.add_argument("--seqs", nargs="+", type=positive_int, help=f"prefill lengths; default {' '.join(map(str, SEQS))}")
    p.add_argument("--masks", nargs="+", choices=list(MASKS), default=list(MASKS), help="prefill masks (default both)")
    p.add_argument("--tokens", type=positive_int, default=TOKENS,
                   help=f"query tokens per prefill launch: batch = max(1, tokens // S) (default {TOKENS})")
    p.add_argument("--decode-shapes", nargs="+", type=_shape, help=f"default {' '.join(DECODE_SHAPES)}")
    p.add_argument("--contexts", nargs="+", type=positive_int,
                   help=f"decode tokens per sequence; default {' '.join(map(str, CONTEXTS))}")
    p.add_argument("--batches", nargs="+", type=positive_int, help=f"decode batch sizes; default "
                   f"{' '.join(map(str, BATCHES))}")
    p.add_argument("--verify-shapes", nargs="+", type=_shape, help=f"default {' '.join(VERIFY_SHAPES)}")
    p.add_argument("--verify-contexts", nargs="+", type=positive_int,
                   help=f"verify tokens per sequence; default {' '.join(map(str, CONTEXTS))}")
    p.add_argument("--verify-batches", nargs="+", type=positive_int,
                   help=f"verify batch sizes; default {' '.join(map(str, VERIFY_BATCHES))}")
    p.add_argument("--q-lens", nargs="+", type=_q_len, help=f"verify queries per sequence (k + 1, at most "
                   f"{MAX_VERIFY_QUERIES}); default {' '.join(map(str, Q_LENS))}")
    p.add_argument("--out", type=Path, default=JSONL, help="JSONL to append to; the PNG goes next to it")
    p.add_argument("--quick", action="store_true", help="a short run: prefill mha-d128 gqa-d128 at 1k 4k 16k, decode "
                   "gqa-d128 at contexts 512 4k 32k and batches 1 16 64, verify gqa-d128 at contexts 4k 32k, batches "
                   "1 32 and q_len 4 16, bfloat16 (explicit options still win)")
    p.add_argument("--plot-only", action="store_true", help="plot, tables and targets from --out (works on CPU)")
    return p


def resolve(args: argparse.Namespace) -> None:
    """Fills the sweep's unset options: --quick's subset, else the full sweep."""
    sizes = QUICK if args.quick else {"prefill_shapes": PREFILL_SHAPES, "seqs": SEQS, "decode_shapes": DECODE_SHAPES,
                                      "contexts": CONTEXTS, "batches": BATCHES, "verify_shapes": VERIFY_SHAPES,
                                      "verify_contexts": CONTEXTS, "verify_batches": VERIFY_BATCHES,
                                      "q_lens": Q_LENS, "dtypes": tuple(DTYPES)}
    for name in ("seqs", "contexts", "batches", "verify_contexts", "verify_batches", "q_lens", "dtypes"):
        if getattr(args, name) is None:
            setattr(args, name, list(sizes[name]))
    for name in ("prefill_shapes", "decode_shapes", "verify_shapes"):
        if getattr(args, name) is None:
            setattr(args, name, [SHAPES[s] for s in sizes[name]])


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.plot_only:
        dtypes = args.dtypes or list(DTYPES)
        rows = [r for r in plot_only_rows(args.out, KEY, p) if r["dtype"] in dtypes]
        plotted = next((d for d in dtypes if any(r["dtype"] == d for r in rows)), dtypes[0])
        print(f"wrote {shown(plot(rows, args.out.with_suffix('.png'), plotted))} ({plotted})")
        print_summary(rows)
        return
    require_gpu("bench/attention.py")
    resolve(args)
    start = time.perf_counter()
    device = torch.device("cuda")
    env = environment()  # one record (and start date) for every row of the run: the key of "latest run"
    ceilings = measure_ceilings(args.dtypes, device)
    run = Run(device, l2_bytes(device), ceilings, datasheet_peak(env["device"]), args.tokens)
    print(f"{env['device']}: {ceilings['bw_gbs']:.0f} GB/s (copy), "
          + ", ".join(f"{v:.0f} TFLOP/s ({d} matmul)" for d, v in ceilings["matmul_tflops"].items())
          + f"; datasheet {run.peak['peak_tflops']} TFLOP/s, {run.peak['peak_gbs']} GB/s", flush=True)
    rows = []
    if "prefill" in args.part:
        rows += sweep_prefill(args.prefill_shapes, args.seqs, args.masks, args.dtypes, run, args.out, env)
    if "decode" in args.part:
        rows += sweep_decode(args.decode_shapes, args.contexts, args.batches, args.dtypes, run, args.out, env)
    if "verify" in args.part:
        rows += sweep_verify(args.verify_shapes, args.verify_contexts, args.verify_batches, args.q_lens, args.dtypes,
                             run, args.out, env)
    png = plot(read_jsonl(args.out), args.out.with_suffix(".png"), args.dtypes[0])
    print(f"wrote {shown(args.out)} and {shown(png)} ({args.dtypes[0]}) in {time.perf_counter() - start:.0f} s")
    print_summary(rows)


if __name__ == "__main__":
    main()
