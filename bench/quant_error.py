"""Quantization error of every format realm implements, next to llama.cpp's own quantizer on the same tensor.

For each format (F32 skipped: lossless) and two seeded distributions, N(0, 1) and the heavy-tailed Student-t with 3
degrees of freedom (outliers are what separates the formats' scale searches), it quantizes with realm, dequantizes and
records the relative RMSE ||x - x_hat|| / ||x||, the max abs error relative to max |x|, bits per weight and realm's
quantize time on the CPU. With llama-cpp-python installed it quantizes the same tensor with ggml (ggml_quantize_chunk,
or for the activation formats Q8_1/Q8_K their quantize_row_*_ref, which are their only quantizers) and records
llama.cpp's relative RMSE, its quantize time (single-threaded C) and the fraction of realm's blocks that are
byte-identical to llama.cpp's.

    python bench/quant_error.py [--rows N --cols K] [--repeats R]   # measure, write JSONL + plot, print table
    python bench/quant_error.py --plot-only                         # plot and table from the committed JSONL
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time

import numpy as np
import torch
from harness import REPO, RESULTS, append_jsonl, environment, print_table, read_jsonl, time_cpu

from realm.quant import FORMATS, BlockFormat, dequantize, quantize

JSONL = RESULTS / "quant_error.jsonl"
PNG = RESULTS / "quant_error.png"
DISTRIBUTIONS = {"gauss": "N(0, 1)", "t3": "Student-t, 3 d.o.f."}
SEEDS = {"gauss": 0, "t3": 1}


def make_data(dist: str, rows: int, cols: int) -> torch.Tensor:
    """Seeded float32 [rows, cols] from numpy's generator (stable across torch versions and platforms)."""
    rng = np.random.default_rng(SEEDS[dist])
    if dist == "gauss":
        x = rng.standard_normal((rows, cols), dtype=np.float32)
    elif dist == "t3":
        x = rng.standard_t(3, size=(rows, cols)).astype(np.float32)
    else:
        raise ValueError(f"unknown distribution {dist!r}; known: {', '.join(DISTRIBUTIONS)}")
    return torch.from_numpy(x)


def errors(x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    """Returns {"rel_rmse": ||x - x_hat|| / ||x||, "rel_max_err": max |x - x_hat| / max |x|}, in float64."""
    x, diff = x.double(), (x.double() - x_hat.double())
    return {"rel_rmse": float(diff.norm() / x.norm()), "rel_max_err": float(diff.abs().max() / x.abs().max())}


def load_ggml():
    """tests/ggml_ref.py loaded by path (bench/ and tests/ are not packages; sys.path is left alone), then its
    load(): the ggml wrapper, or None without llama-cpp-python."""
    spec = importlib.util.spec_from_file_location("ggml_ref", REPO / "tests" / "ggml_ref.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load()


def llama_quantizer(g, fmt: BlockFormat):
    """(path name, fn: float32 numpy [rows, k] -> uint8 numpy blocks) for llama.cpp's quantizer of fmt.

    Storage formats: ggml_quantize_chunk (what llama-quantize runs without an importance matrix). The activation
    formats Q8_1 and Q8_K have no such path; their reference row quantizer is their only quantizer (ggml_ref finds
    Q8_K's by its exported name, quantize_row_q8_K_ref, as its type traits carry no from_float_ref)."""
    if fmt.storage:
        return "ggml_quantize_chunk", lambda x: g.quantize(x, fmt.ggml_type)
    return f"quantize_row_{g.traits(fmt.ggml_type).type_name.decode()}_ref", lambda x: g.quantize_row_ref(
        x, fmt.ggml_type)


def llama_dequantize(g, fmt: BlockFormat, blocks: np.ndarray, shape) -> tuple[str, torch.Tensor]:
    """llama.cpp's blocks -> (which dequantizer ran, float32 [shape]): ggml's own (to_float, or Q8_K's exported
    dequantize_row_q8_K), an independent check of realm's decoders; realm's where ggml has none (F32, Q8_1)."""
    out = g.dequantize(blocks, fmt.ggml_type, int(np.prod(shape)))
    if out is not None:
        return "ggml", torch.from_numpy(out).view(shape)
    return "realm", dequantize(torch.from_numpy(blocks), fmt, shape)


def measure(fmt: BlockFormat, dist: str, x: torch.Tensor, g, repeats: int) -> dict:
    """One row: realm's error and quantize time, and llama.cpp's error, time and byte agreement when g is given."""
    blocks = quantize(x, fmt)  # also the warm-up of the timing below
    row = {"format": fmt.name, "ggml_type": fmt.ggml_type, "storage": fmt.storage, "bits_per_weight":
           fmt.bits_per_weight, "block_size": fmt.block_size, "dist": dist, "seed": SEEDS[dist],
           "rows": x.shape[0], "cols": x.shape[1], "repeats": repeats}
    row.update(errors(x, dequantize(blocks, fmt, x.shape)))
    t = time_cpu(lambda: quantize(x, fmt), repeats=repeats, warmup=0)
    row.update({"quant_ms": t["ms"], "quant_ms_p20": t["ms_p20"], "quant_ms_p80": t["ms_p80"]})
    if g is None:
        return {**row, "llama_path": None, "llama_note": "llama-cpp-python not installed"}
    path, llama_fn = llama_quantizer(g, fmt)
    x_np = np.ascontiguousarray(x.numpy())
    ref = llama_fn(x_np).reshape(-1)
    t = time_cpu(lambda: llama_fn(x_np), repeats=repeats, warmup=0)
    dequantizer, x_ref = llama_dequantize(g, fmt, ref, x.shape)
    llama_err = errors(x, x_ref)
    same = (blocks.numpy().reshape(-1, fmt.block_bytes) == ref.reshape(-1, fmt.block_bytes)).all(axis=1)
    return {**row, "llama_path": path, "llama_dequantizer": dequantizer, "llama_rel_rmse": llama_err["rel_rmse"],
            "llama_rel_max_err": llama_err["rel_max_err"], "llama_quant_ms": t["ms"],
            "llama_quant_ms_p20": t["ms_p20"], "llama_quant_ms_p80": t["ms_p80"],
            "identical_blocks": float(same.mean())}


FAMILY_MARKERS = {"legacy": ("o", "tab:blue"), "K-quant": ("s", "tab:red"), "non-linear": ("D", "tab:green"),
                  "float": ("^", "tab:gray")}


def family(name: str) -> str:
    if name in ("F16", "BF16"):
        return "float"
    if name.endswith("_K"):
        return "K-quant"
    return "non-linear" if name in ("IQ4_NL", "IQ4_XS", "MXFP4") else "legacy"


def _label_positions(points: list[tuple[str, float, float]], gap: float) -> list[tuple[str, float, float, float, int]]:
    """(name, bpw, err) -> (name, bpw, err, label log10 y, side). A label goes left of its point when the next larger
    size is within 8% (4.25 next to 4.5), else right; labels on one side within 12% in x are pushed up to at least
    `gap` decades apart (formats of equal size and near-equal error would print on top of each other)."""
    sizes = sorted({b for _, b, _ in points})
    placed: list[tuple[str, float, float, float, int]] = []
    for name, b, err in sorted(points, key=lambda p: p[2]):
        side = -1 if any(b < o <= 1.08 * b for o in sizes) else 1
        y = math.log10(err)
        for _, pb, _, py, ps in placed:
            if ps == side and abs(math.log(pb / b)) < math.log(1.12):
                y = max(y, py + gap)
        placed.append((name, b, err, y, side))
    return placed


TAIL_BPW = 9.5  # the x axis is logarithmic up to here and 4x compressed above, so F16/BF16 do not squeeze the rest


def _x_forward(b):
    lb = np.log10(np.maximum(b, 1e-3))
    return np.where(lb <= np.log10(TAIL_BPW), lb, np.log10(TAIL_BPW) + (lb - np.log10(TAIL_BPW)) / 4)


def _x_inverse(v):
    return 10 ** np.where(v <= np.log10(TAIL_BPW), v, np.log10(TAIL_BPW) + (v - np.log10(TAIL_BPW)) * 4)


def plot(rows: list[dict], path=PNG) -> None:
    """rel. RMSE vs bits per weight (log-log), one panel per distribution, marker per format family, points
    labelled. llama.cpp's errors are not drawn: they equal realm's (see the table's same_blocks column)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r0 = rows[0]
    errs = [r["rel_rmse"] for r in rows if r["rel_rmse"] > 0]
    ylim = (min(errs) / 2, max(errs) * 2)
    gap = 0.045 * math.log10(ylim[1] / ylim[0]) / 3.5  # about 9 points of a 5.5-inch panel spanning 3.5 decades
    ticks = sorted({r["bits_per_weight"] for r in rows})
    fig, axes = plt.subplots(1, len(DISTRIBUTIONS), figsize=(15, 6.5), sharey=True)
    for ax, (dist, title) in zip(axes, DISTRIBUTIONS.items(), strict=True):
        pts = [r for r in rows if r["dist"] == dist and r["rel_rmse"] > 0]
        for fam, (marker, colour) in FAMILY_MARKERS.items():
            sel = [r for r in pts if family(r["format"]) == fam]
            ax.scatter([r["bits_per_weight"] for r in sel], [r["rel_rmse"] for r in sel], marker=marker, c=colour,
                       s=36, label=fam, zorder=3)
        for name, b, err, y, side in _label_positions([(r["format"], r["bits_per_weight"], r["rel_rmse"])
                                                       for r in pts], gap):
            moved = abs(y - math.log10(err)) > 1e-9
            ax.annotate(name, (b, err), xytext=(b * 1.015**side, 10**y), fontsize=7, va="center",
                        ha="left" if side > 0 else "right", color=FAMILY_MARKERS[family(name)][1],
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6"} if moved else None)
        ax.set_xscale("function", functions=(_x_forward, _x_inverse))
        ax.set(yscale="log", ylim=ylim, xlim=(2.4, 40), xlabel=f"bits per weight (axis compressed above {TAIL_BPW})",
               title=title)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7, rotation=60)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("relative RMSE  ||x - x̂|| / ||x||")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"realm quantizers (= llama.cpp's): error vs size, {r0['rows']} x {r0['cols']} seeded weights; "
                 f"{r0['git_commit']}, {r0['date'][:10]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(rows: list[dict]) -> list[dict]:
    """One line per format: both distributions side by side (realm and llama.cpp), identical-block fraction (the
    smaller of the two distributions) and quantize times on the Gaussian tensor."""
    by = {(r["format"], r["dist"]): r for r in rows}
    out = []
    for name in dict.fromkeys(r["format"] for r in rows):
        g, t = by.get((name, "gauss"), {}), by.get((name, "t3"), {})
        same = [r["identical_blocks"] for r in (g, t) if r.get("identical_blocks") is not None]
        out.append({"format": name, "bpw": g.get("bits_per_weight"), "rmse_gauss": g.get("rel_rmse"),
                    "rmse_t3": t.get("rel_rmse"), "llama_gauss": g.get("llama_rel_rmse"),
                    "llama_t3": t.get("llama_rel_rmse"), "maxerr_t3": t.get("rel_max_err"),
                    "same_blocks": min(same) if same else None, "realm_ms": g.get("quant_ms"),
                    "llama_ms": g.get("llama_quant_ms")})
    return out


def print_summary(rows: list[dict]) -> None:
    r0 = rows[0]
    print(f"\n{r0['rows']} x {r0['cols']} per distribution; {r0['device']} ({r0['cpu_threads']} torch threads), "
          f"torch {r0['torch']}, {r0['git_commit']}, {r0['date']}; times: median ms of quantize (gauss)")
    print_table(summary(rows), [("format", None), ("bpw", ".5g"), ("rmse_gauss", ".5f"), ("rmse_t3", ".5f"),
                                ("llama_gauss", ".5f"), ("llama_t3", ".5f"), ("maxerr_t3", ".4f"),
                                ("same_blocks", ".5f"), ("realm_ms", ".1f"), ("llama_ms", ".1f")])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=4096, help="a multiple of 256 (the K-quant super-block)")
    p.add_argument("--repeats", type=int, default=3, help="timed quantize calls per format and distribution")
    # One thread by default: ggml_quantize_chunk is single-threaded, so realm vs llama.cpp times compare like with
    # like; and on a shared 2-core machine torch's 2 OpenMP threads stall whenever another process holds a core
    # (measured: Q2_K on 256 x 4096 took 0.25 s with 1 thread, 12 s with 2 while another job ran).
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for realm's quantizers")
    p.add_argument("--plot-only", action="store_true", help=f"redraw {PNG.name} and the table from {JSONL.name}")
    args = p.parse_args()
    if args.plot_only:
        rows = read_jsonl(JSONL)
        plot(rows)
        print_summary(rows)
        return
    if args.cols % 256:
        p.error(f"--cols must be a multiple of 256, got {args.cols}")

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    g = load_ggml()
    print(f"llama.cpp reference: {'ggml via llama-cpp-python' if g else 'not available (llama-cpp-python absent)'}")
    env = environment()  # one record (and the start date) for every row of the run
    rows = []
    for dist in DISTRIBUTIONS:
        x = make_data(dist, args.rows, args.cols)
        for fmt in FORMATS.values():
            if fmt.name == "F32":
                continue  # lossless: nothing to measure
            rows.append(measure(fmt, dist, x, g, args.repeats))
            r = rows[-1]
            print(f"{dist:5s} {fmt.name:6s} rel_rmse {r['rel_rmse']:.5f}  quantize {r['quant_ms']:8.1f} ms"
                  + (f"  identical blocks {r['identical_blocks']:.5f}" if g else ""), flush=True)
    # The file is rewritten, not appended to: the committed JSONL, plot and table are then exactly one run's numbers
    # (earlier runs live in git history). append_jsonl onto an empty file keeps the row format of every benchmark.
    JSONL.unlink(missing_ok=True)
    append_jsonl(JSONL, rows, env)
    rows = read_jsonl(JSONL)
    plot(rows)
    print(f"wrote {JSONL.relative_to(REPO)} and {PNG.relative_to(REPO)} in {time.perf_counter() - start:.0f} s")
    print_summary(rows)


if __name__ == "__main__":
    main()
