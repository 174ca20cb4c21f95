"""One layer's attention of a decode or verification step on the CPU: the reference (per sequence, keys and values
gathered from the pages, then SDPA: the torch backend's op and, before realm.kernels.cpu_attention, the onednn
backend's) against the C kernel that reads the pages in place (the onednn backend's op now), and the reference's
gathers alone (the copies the kernel avoids).

A step: `batch` sequences, each with `q_len` new queries (1: decode; k + 1: verification) at the end of its context
(lengths drawn uniformly from [context / 2, 3 context / 2], seeded), blocks of 16 tokens scattered over a cache, the
head layout of --model (default SmolLM2: 9 query heads, 3 KV heads of 64), float32. Each method is timed on the same
step, interleaved per step; the kernel's output is checked against the reference's first (max_abs_err).

Rows (bench/results/cpu_attention.jsonl, via harness: device, versions, commit, date): method, batch, q_len, context
(the mean), kv_mb (the K and V bytes the step's sequences hold), ms (median of --repeats calls; p20/p80), gbs (kv_mb /
ms: the memory-bound rate), speedup (the reference's ms / this method's), max_abs_err (kernel vs reference), threads.
cpu_attention.png: ms against batch per method, one panel per q_len.

    python bench/cpu_attention.py                          # batch 1 8 32 64, q_len 1 and 16, context 300
    python bench/cpu_attention.py --batch 32 --q-len 1 --repeats 5 --out /tmp/a.jsonl
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import torch
from harness import (
    RESULTS,
    environment,
    positive_int,
    print_table,
    record,
    replot,
    save_figure,
    time_cpu,
    torch_threads,
)

from realm.kernels.attention import AttentionMetadata, paged_attention_ref
from realm.kernels.cpu_attention import paged_attention_cpu, unavailable_reason
from realm.runtime.config import ModelConfig
from realm.runtime.weights import load_weights

JSONL = RESULTS / "cpu_attention.jsonl"
KEY = ("device", "model", "method", "batch", "q_len", "context", "threads")
SETUP = ("device", "model", "threads")  # --plot-only draws the last-measured one
BATCHES = (1, 8, 32, 64)
Q_LENS = (1, 16)
BLOCK_SIZE = 16
REPEATS = 7


def head_layout(model: str) -> tuple[str, ModelConfig]:
    weights = load_weights(model)
    return weights.path.name, weights.config


def make_step(config: ModelConfig, batch: int, q_len: int, context: int, seed: int = 0):
    """q, k_cache, v_cache, meta for one step (see the module's docstring)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(q_len, context // 2), context * 3 // 2 + 1, (batch,), generator=gen).tolist()
    needed = [-(-n // BLOCK_SIZE) for n in lens]
    num_blocks = sum(needed) + 1
    ids = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(batch, max(needed), dtype=torch.int32)
    used = 0
    for b, n in enumerate(needed):
        table[b, :n] = ids[used : used + n]
        used += n
    shape = (num_blocks, BLOCK_SIZE, config.n_kv_heads, config.head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    q = torch.randn(batch * q_len, config.n_heads, config.head_dim, generator=gen)
    cu = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32)
    meta = AttentionMetadata.build([q_len] * batch, lens, cu, torch.tensor(lens, dtype=torch.int32), table)
    kv_bytes = 2 * sum(lens) * config.n_kv_heads * config.head_dim * 4
    return q, k_cache, v_cache, meta, kv_bytes


def gathers(k_cache, v_cache, meta):
    """What paged_attention_ref copies before its SDPA calls: each sequence's keys and values, through the slots the
    step computes once (AttentionMetadata.key_slots)."""
    k_flat, v_flat = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
    return [(k_flat[slots], v_flat[slots]) for slots in meta.key_slots(k_cache.shape[1])]


def measure(config: ModelConfig, batches, q_lens, context: int, repeats: int) -> list[dict]:
    out = []
    for q_len in q_lens:
        for batch in batches:
            q, k_cache, v_cache, meta, kv_bytes = make_step(config, batch, q_len, context)
            scale = config.head_dim**-0.5
            ref = paged_attention_ref(q, None, None, k_cache, v_cache, meta, scale)
            err = (paged_attention_cpu(q, None, None, k_cache, v_cache, meta, scale) - ref).abs().max().item()
            runs = {
                "reference": functools.partial(paged_attention_ref, q, None, None, k_cache, v_cache, meta, scale),
                "reference_gathers": functools.partial(gathers, k_cache, v_cache, meta),
                "cpu_kernel": functools.partial(paged_attention_cpu, q, None, None, k_cache, v_cache, meta, scale),
            }
            base = None
            for method, fn in runs.items():
                t = time_cpu(fn, repeats=repeats)
                base = t["ms"] if method == "reference" else base
                out.append({"method": method, "batch": batch, "q_len": q_len, "context": context,
                            "kv_mb": kv_bytes / 1e6, **t, "gbs": kv_bytes / (t["ms"] * 1e6),
                            "speedup": base / t["ms"], "max_abs_err": err if method == "cpu_kernel" else None})
    return out


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q_lens = sorted({r["q_len"] for r in rows})
    fig, axes = plt.subplots(1, len(q_lens), figsize=(6 * len(q_lens), 4.5), squeeze=False)
    for ax, q_len in zip(axes[0], q_lens, strict=True):
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = sorted((r for r in rows if r["method"] == method and r["q_len"] == q_len), key=lambda r: r["batch"])
            if not mine:
                continue
            xs = [r["batch"] for r in mine]
            ax.plot(xs, [r["ms"] for r in mine], marker="o", label=method)
            ax.fill_between(xs, [r["ms_p20"] for r in mine], [r["ms_p80"] for r in mine], alpha=0.15)
        ax.set(xscale="log", yscale="log", xlabel="sequences in the step", ylabel="ms per layer",
               title=f"{q_len} quer{'y' if q_len == 1 else 'ies'} per sequence")
        ax.grid(alpha=0.3)
        ax.legend()
    r0 = rows[0]
    return save_figure(fig, path, f"{r0.get('model')} attention, one layer, context ~{r0['context']}, {r0['device']}, "
                 f"{r0.get('threads')} threads, {r0['git_commit']}")


def summary(rows: list[dict]) -> None:
    print_table(sorted(rows, key=lambda r: (r["q_len"], r["batch"], r["method"])),
                ["q_len", "batch", "method", ("kv_mb", ".1f"), ("ms", ".3f"), ("ms_p20", ".3f"), ("ms_p80", ".3f"),
                 ("gbs", ".1f"), ("speedup", ".2f"), ("max_abs_err", ".2g")])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="the head layout of this packaged model or .gguf (default "
                   "smollm2)")
    p.add_argument("--batch", nargs="+", type=positive_int, default=list(BATCHES), help="sequences per step (default "
                   f"{' '.join(map(str, BATCHES))})")
    p.add_argument("--q-len", nargs="+", type=positive_int, default=list(Q_LENS), help="queries per sequence (default "
                   f"{' '.join(map(str, Q_LENS))})")
    p.add_argument("--context", type=positive_int, default=300, help="mean tokens per sequence (default 300)")
    p.add_argument("--repeats", type=positive_int, default=REPEATS, help=f"timed calls per cell (default {REPEATS})")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="torch CPU threads (default "
                   "os.cpu_count())")
    p.add_argument("--out", type=Path, default=JSONL, help="JSONL to append to; the PNG goes next to it")
    p.add_argument("--plot-only", action="store_true", help="plot and table from --out; measures nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.plot_only:
        return replot(args.out, KEY, p, plot, summary, SETUP)
    reason = unavailable_reason()
    if reason:
        p.error(f"the CPU attention kernel is unavailable ({reason}): nothing to compare")
    with torch_threads(args.threads):
        model, config = head_layout(args.model)
        rows = measure(config, sorted(set(args.batch)), sorted(set(args.q_len)), args.context, args.repeats)
    env = {**environment(), "model": model, "threads": args.threads, "repeats": args.repeats}
    return record(args.out, rows, env, plot, summary)


if __name__ == "__main__":
    sys.exit(main())
