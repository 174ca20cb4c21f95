"""A model's linear layers on the CPU by the step's token count: F.linear (MKL, the torch reference backend) against
oneDNN on weights packed once, packed for several row counts, and realm's C kernel on weights packed in panels (the
onednn backend runs the kernel up to realm.kernels.cpu_linear.MAX_ROWS rows, oneDNN above).

Every linear layer of the model (each layer's Q/K/V, O, gate/up and down, and the output head: the dense float32
matrices of the torch backend's Transformer) is multiplied once per timed call by a [rows, in] float32 input: one
call is the matmul work of a forward step of `rows` tokens. Methods:
- f_linear: F.linear on the dense matrix (what the torch backend runs, bit for bit HF's op);
- onednn-<h>: torch.ops.mkldnn._linear_pointwise on the matrix reordered once by
  torch.ops.mkldnn._reorder_linear_weight(w, h) (h: the row count oneDNN packs for, a hint; realm's onednn backend
  uses realm.runtime.ops.ONEDNN_PACKED_ROWS);
- cpu_linear: realm.kernels.cpu_linear.linear_panels on the matrix packed once by pack_panels (absent where the kernel
  cannot be built here).

Why it matters: a decode step multiplies one row per sequence, and a speculative verification k + 1 rows. If a step
of 2-16 rows cost what one costs, verification is nearly free at batch 1; MKL's float32 GEMM for 2-3 rows costs more
than its GEMV for one (bench/results/speculative.jsonl, notebooks/speculative.ipynb), oneDNN's packed GEMM does not,
but it grows from about 5 rows on, and reads one row's weights below the memory's rate; cpu_linear is the one-pass
kernel written for this.

Rows (bench/results/cpu_linear.jsonl, via harness: device, versions, commit, date): model, method, hint, rows, ms
(median of --repeats calls; p20/p80), weight_gb (the matrices' float32 bytes), gbs (weight bytes / time: the
memory-bound rate), gflops (2 rows x weights / time), speedup (f_linear's ms / this method's at the same rows),
threads. cpu_linear.png: ms against rows, per method.

    python bench/cpu_linear.py                      # SmolLM2, rows 1 2 3 4 5 8 9 16 17 32 64 128 256
    python bench/cpu_linear.py --rows 1 9 --repeats 3 --out /tmp/l.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
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

from realm.kernels import cpu_linear
from realm.runtime import Backend
from realm.runtime.ops import ONEDNN_PACKED_ROWS
from realm.runtime.transformer import Transformer
from realm.runtime.weights import load_weights

JSONL = RESULTS / "cpu_linear.jsonl"
KEY = ("device", "model", "method", "rows", "threads")
SETUP = ("device", "model", "threads")  # --plot-only draws the last-measured one
ROWS = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 64, 128, 256)
HINTS = (1, ONEDNN_PACKED_ROWS, 16)
REPEATS = 7


def dense_matrices(model: str) -> tuple[str, list[torch.Tensor]]:
    """The torch backend's dense float32 matrices of every linear layer, in forward order (the head last)."""
    weights = load_weights(model)
    net = Transformer(weights, Backend.TORCH, "cpu", torch.float32)
    return weights.path.name, [lin.parts[0] for lin in net.linears()]


def methods(matrices: list[torch.Tensor], hints) -> dict[str, tuple[int | None, callable]]:
    """name -> (hint, a function of the inputs {in_features: x} running every layer once)."""

    def f_linear(xs):
        for w in matrices:
            F.linear(xs[w.shape[1]], w)

    out = {"f_linear": (None, f_linear)}
    for hint in dict.fromkeys(hints):
        packed = [(w.shape[1], torch.ops.mkldnn._reorder_linear_weight(w, hint)) for w in matrices]

        def onednn(xs, packed=packed):
            for k, p in packed:
                torch.ops.mkldnn._linear_pointwise(xs[k], p, None, "none", [], "")

        out[f"onednn-{hint}"] = (hint, onednn)
    if cpu_linear.unavailable_reason() is None:
        panels = [(w.shape[1], cpu_linear.pack_panels(w), w.shape[0]) for w in matrices]

        def realm_kernel(xs):
            for k, p, n in panels:
                cpu_linear.linear_panels(xs[k], p, n)

        out["cpu_linear"] = (None, realm_kernel)
    else:
        print(f"cpu_linear: not measured, the kernel cannot be built here ({cpu_linear.unavailable_reason()})")
    return out


def measure(matrices: list[torch.Tensor], rows: list[int], hints, repeats: int) -> list[dict]:
    """Rows of the table: each method at each row count, the methods interleaved per row count (so that a slower
    stretch of a shared machine does not fall on one method only)."""
    weight_bytes = sum(w.numel() * w.element_size() for w in matrices)
    params = sum(w.numel() for w in matrices)
    gen = torch.Generator().manual_seed(0)
    runs = methods(matrices, hints)
    out = []
    for n in rows:
        xs = {k: torch.randn(n, k, generator=gen) for k in {w.shape[1] for w in matrices}}
        base = None
        for name, (hint, fn) in runs.items():
            t = time_cpu(lambda fn=fn, xs=xs: fn(xs), repeats=repeats)
            base = t["ms"] if name == "f_linear" else base
            out.append({"method": name, "hint": hint, "rows": n, **t, "weight_gb": weight_bytes / 1e9,
                        "gbs": weight_bytes / (t["ms"] * 1e6), "gflops": 2 * n * params / (t["ms"] * 1e6),
                        "speedup": base / t["ms"]})
    return out


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == name), key=lambda r: r["rows"])
        ns = [r["rows"] for r in mine]
        ax.plot(ns, [r["ms"] for r in mine], marker="o", label=name)
        ax.fill_between(ns, [r["ms_p20"] for r in mine], [r["ms_p80"] for r in mine], alpha=0.15)
        small = [r for r in mine if r["rows"] <= 17]
        ax2.plot([r["rows"] for r in small], [r["ms"] / small[0]["ms"] for r in small], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="rows (tokens in the step)", ylabel="ms per pass over every linear layer",
           title="time by rows")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set(xlabel="rows (tokens in the step)", ylabel="ms / ms at the fewest rows", title="a step of k + 1 tokens "
            "against one (small steps)")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.legend()
    r0 = rows[0]
    return save_figure(fig, path, f"{r0.get('model')}: linear layers on {r0['device']}, {r0.get('threads')} threads, "
                 f"{r0['git_commit']}")


def summary(rows: list[dict]) -> None:
    print_table(sorted(rows, key=lambda r: (r["rows"], r["method"])),
                ["rows", "method", ("ms", ".2f"), ("ms_p20", ".2f"), ("ms_p80", ".2f"), ("gbs", ".1f"),
                 ("gflops", ".1f"), ("speedup", ".2f")])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a packaged model name or a .gguf path (default smollm2)")
    p.add_argument("--rows", nargs="+", type=positive_int, default=list(ROWS), help="row counts (default "
                   f"{' '.join(map(str, ROWS))})")
    p.add_argument("--hints", nargs="+", type=positive_int, default=list(HINTS), help="oneDNN packing row counts "
                   f"(default {' '.join(map(str, HINTS))})")
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
    if not torch.backends.mkldnn.is_available():
        p.error("this torch has no oneDNN (torch.backends.mkldnn.is_available() is False): nothing to compare")
    with torch_threads(args.threads):
        model, matrices = dense_matrices(args.model)
        rows = measure(matrices, sorted(set(args.rows)), args.hints, args.repeats)
    env = {**environment(), "model": model, "threads": args.threads, "repeats": args.repeats}
    return record(args.out, rows, env, plot, summary)


if __name__ == "__main__":
    sys.exit(main())
