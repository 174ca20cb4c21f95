"""Speed of realm's quantized matmul `qmatmul(x, w)` on the GPU, next to the device's ceilings and torch.matmul.

For every format, batch size M and Llama-3-8B weight shape [N, K] it times `y = x @ w.T` (x [M, K] float16 or
bfloat16, w a QTensor in the kernels' planes layout) and records, per row:

- time: median and 20/80 % quantiles (harness.time_gpu: triton.testing.do_bench with warm-up);
- GB/s of weight bytes: the GGUF bytes (`QTensor.nbytes`, the headline: what a model file holds) and the planes
  bytes the kernel actually reads (a little more for K-quants, whose 6-bit scales are widened to 8);
- TFLOP/s (2 M N K);
- the fraction of the roofline reached: roofline time = max(bytes moved / measured bandwidth, flops / measured matmul
  rate), bytes moved = GGUF weight bytes + x bytes + output bytes; and weight_bw_fraction = weight GB/s / bandwidth;
- the speedup over torch.matmul on 16-bit weights of the same shape and dtype, timed in the same run (t_torch / t).

The two ceilings are measured once per run on the same device: bandwidth from a 1 GiB device-to-device copy (bytes
read + written), matmul rate from an 8192^3 torch.matmul in the run's dtype. Every (format, shape, M) is checked
against `qmatmul_ref` on its first rows before it is timed, with the very inputs and config that are timed; a wrong
result stops the run. The end of a run prints a table and the issue's targets: (a) at M = 1 every 4..6-bit format
streams its weight bytes at >= 80 % of the measured bandwidth; (b) up to M = 16 those formats run >= 2.5x faster than
16-bit torch.matmul (an 8.5-bit Q8_0 could at best be 16 / 8.5 = 1.9x, so (b) is only asked of 4..6-bit formats);
(c) at M = 2048 every format keeps >= 70 % of torch.matmul's throughput.

Weights are random, of real model shapes (speed does not depend on their values): a pool of 2^20 seeded N(0, 0.02^2)
weights is quantized with realm's own quantizer on the GPU once per format, and each weight is drawn from the pool's
blocks at random. Quantizing all 525 M weights of the LM head with the K-quant and IQ4 searches would take minutes per
format (Q2_K takes 9 s per million weights on two CPU cores); drawing real blocks gives the same bytes at no cost.

    python bench/qmatmul.py                  # full sweep: rows appended to bench/results/qmatmul.jsonl, plots, table
    python bench/qmatmul.py --quick          # Q4_0 Q4_K Q8_0 Q6_K, M 1 16 2048, 4096x4096
    python bench/qmatmul.py --formats Q4_K --m 1 8 --shapes 4096x14336 --dtype bfloat16
    python bench/qmatmul.py --tune           # autotune every (format, shape, M) first, save configs/<gpu>.json
    python bench/qmatmul.py --plot-only      # plots (latest run per key), table and targets from the JSONL; no GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
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
    print_table,
    read_jsonl,
    require_gpu,
    rotation_sets,
    shown,
    target_results,
    time_gpu,
)

from realm.kernels import autotune, plan_qmatmul, qmatmul, qmatmul_ref, tuning
from realm.quant import FORMATS, BlockFormat, QTensor, QuantError, quantize
from realm.quant.planes import plane_spec

JSONL = RESULTS / "qmatmul.jsonl"
M_SWEEP = (1, 2, 4, 8, 16, 64, 256, 2048)
# Llama-3-8B: attention q/o projections, FFN gate/up, FFN down, LM head (vocabulary 128256).
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096))
QUICK = {"formats": ("Q4_0", "Q4_K", "Q8_0", "Q6_K"), "m": (1, 16, 2048), "shapes": ((4096, 4096),)}
FAMILIES = {
    "legacy": ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1"),
    "kquants": ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"),
    "nonlinear": ("IQ4_NL", "IQ4_XS", "MXFP4"),
    "float": ("F16", "BF16", "F32"),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# max |y - ref| / max |ref| allowed on the checked rows. Both results are rounded to x's dtype (2^-11 relative for
# float16, 2^-8 for bfloat16) and the kernel multiplies the weight rounded to that dtype; 20x the output rounding still
# catches any decode or indexing bug, which gives errors of order 1.
TOLERANCE = {"float16": 1e-2, "bfloat16": 8e-2}
CHECK_ROWS = 4
POOL_WEIGHTS = 1 << 20  # quantized once per format; weights are drawn from its blocks
WEIGHT_SCALE = 0.02  # the std of a trained LLM weight, roughly
SEED = 0
# Each timed call reads a different input set (x, w, out): harness.rotation_sets gives enough sets to exceed the L2
# cache together, so no call finds its weight in L2 from an earlier one. Large weights exceed L2 alone: one set.
COPY_BYTES = 1 << 30  # bandwidth ceiling: a 1 GiB device-to-device copy, far beyond any cache
MATMUL_SIZE = 8192  # matmul ceiling: 8192^3, large enough for cuBLAS's best tiles on every SM


# ---- pure computations on plain dict rows (tested on CPU) --------------------------------------------------------

def family(name: str) -> str:
    """The plot family of a format name: legacy, kquants, nonlinear or float."""
    for fam, names in FAMILIES.items():
        if name in names:
            return fam
    known = ", ".join(n for names in FAMILIES.values() for n in names)
    raise ValueError(f"format {name!r} belongs to no family; known: {known}")


def rates(row: dict) -> dict:
    """Derived figures of one measured row. Needs m, n, k, weight_bytes (GGUF), planes_bytes, x_bytes, out_bytes,
    ms, torch_ms, bw_gbs and matmul_tflops (the measured ceilings)."""
    flops = 2 * row["m"] * row["n"] * row["k"]
    bytes_moved = row["weight_bytes"] + row["x_bytes"] + row["out_bytes"]
    memory_ms = bytes_moved / (row["bw_gbs"] * 1e6)
    compute_ms = flops / (row["matmul_tflops"] * 1e9)
    roofline_ms = max(memory_ms, compute_ms)
    seconds = row["ms"] * 1e-3
    weight_gbs, planes_gbs = row["weight_bytes"] / seconds / 1e9, row["planes_bytes"] / seconds / 1e9
    return {
        "flops": flops,
        "bytes_moved": bytes_moved,
        "weight_gbs": weight_gbs,
        "planes_gbs": planes_gbs,
        "tflops": flops / seconds / 1e12,
        "roofline_ms": roofline_ms,
        "bound": "memory" if memory_ms >= compute_ms else "compute",
        "roofline_fraction": roofline_ms / row["ms"],
        "weight_bw_fraction": weight_gbs / row["bw_gbs"],
        "planes_bw_fraction": planes_gbs / row["bw_gbs"],
        "speedup": row["torch_ms"] / row["ms"],
    }


def _four_to_six_bits(row: dict) -> bool:
    return 4 <= row["bits_per_weight"] <= 6  # Q4_0 Q4_1 Q5_0 Q5_1 Q4_K Q5_K IQ4_NL IQ4_XS MXFP4


TARGETS = (
    Target("a", "M = 1, 4..6-bit formats: weight bytes at >= 80% of measured bandwidth", "weight_bw_fraction", 0.8,
           lambda r: r["m"] == 1 and _four_to_six_bits(r)),
    Target("b", "M <= 16, 4..6-bit formats: >= 2.5x the speed of 16-bit torch.matmul", "speedup", 2.5,
           lambda r: r["m"] <= 16 and _four_to_six_bits(r)),
    Target("c", "M = 2048, every format: >= 70% of 16-bit torch.matmul's throughput", "speedup", 0.7,
           lambda r: r["m"] == 2048),
)


def evaluate_targets(rows: list[dict], targets=TARGETS) -> list[dict]:
    """harness.target_results, the worst row given as format, shape, m (and value)."""
    return target_results(rows, targets, lambda r: {"format": r["format"], "shape": f"{r['n']}x{r['k']}", "m": r["m"]})


KEY = ("format", "n", "k", "m", "dtype")  # latest(rows, KEY): the most recent row per key


# ---- inputs and ceilings on the GPU ------------------------------------------------------------------------------

def measure_ceilings(dtype: torch.dtype, device: torch.device) -> dict:
    """The device's memory bandwidth (GB/s, bytes read + written by a copy) and matmul rate (TFLOP/s) in dtype."""
    return {"bw_gbs": copy_gbs(device, COPY_BYTES, SEED),
            "matmul_tflops": matmul_tflops(dtype, device, MATMUL_SIZE, SEED), "copy_bytes": COPY_BYTES,
            "matmul_size": MATMUL_SIZE}


def block_pool(fmt: BlockFormat, device: torch.device) -> torch.Tensor:
    """uint8 [POOL_WEIGHTS / block_size, block_bytes]: realm's quantizer on seeded N(0, WEIGHT_SCALE^2) weights."""
    gen = torch.Generator(device=device).manual_seed(SEED)
    w = torch.randn(POOL_WEIGHTS // fmt.block_size, fmt.block_size, device=device, generator=gen) * WEIGHT_SCALE
    return quantize(w, fmt).view(-1, fmt.block_bytes)


def draw_weight(pool: torch.Tensor, fmt: BlockFormat, n: int, k: int, seed: int) -> QTensor:
    """A QTensor [n, k] in the planes layout whose blocks are drawn at random from the pool (valid, varied blocks)."""
    gen = torch.Generator(device=pool.device).manual_seed(seed)
    idx = torch.randint(pool.shape[0], (n * k // fmt.block_size,), device=pool.device, generator=gen)
    return QTensor(pool[idx].view(n, -1), fmt, (n, k)).repack("planes")


def activations(m: int, k: int, dtype: torch.dtype, count: int, seed: int, device: torch.device) -> list:
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(m, k, dtype=dtype, device=device, generator=gen) for _ in range(count)]


def torch_baselines(n: int, k: int, ms: list[int], dtype: torch.dtype, l2: int, device: torch.device) -> dict:
    """{m: time_gpu result} of torch.matmul(x [m, k], w16.T) with 16-bit weights [n, k] of dtype."""
    esize = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=device).manual_seed(SEED + 1)
    ws = [torch.randn(n, k, dtype=dtype, device=device, generator=gen).mul_(WEIGHT_SCALE)
          for _ in range(rotation_sets(n * k * esize, l2))]
    out = {}
    for m in ms:
        sets = rotation_sets((n * k + m * k + m * n) * esize, l2)
        xs = activations(m, k, dtype, sets, SEED + m, device)
        outs = [torch.empty(m, n, dtype=dtype, device=device) for _ in range(sets)]
        inputs = [(xs[i], ws[i % len(ws)], outs[i]) for i in range(sets)]
        out[m] = {**time_gpu(lambda x, w, o: torch.matmul(x, w.t(), out=o), inputs), "sets": sets}
    return out


# ---- measurement -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """What every row of one run shares."""

    dtype: str
    device: torch.device
    l2_bytes: int
    ceilings: dict
    tuned_configs: int
    tune: bool = False


def check(x: torch.Tensor, w: QTensor, out: torch.Tensor, tol: float) -> float:
    """Runs qmatmul into a poisoned out and compares its first CHECK_ROWS rows with qmatmul_ref; returns
    max |y - ref| / max |ref| and raises when it exceeds tol or is not finite (rows the kernel did not write)."""
    out.fill_(float("nan"))
    qmatmul(x, w, out)
    rows = min(CHECK_ROWS, x.shape[0])
    ref = qmatmul_ref(x[:rows], w).float()
    err = float((out[:rows].float() - ref).abs().max() / ref.abs().max())
    if not err <= tol:
        raise RuntimeError(f"qmatmul is wrong for {w.fmt.name} {list(w.shape)} at M = {x.shape[0]}: max |y - ref| / "
                           f"max |ref| = {err:.3g} > {tol:g} on rows 0..{rows - 1}")
    return err


def measure_row(fmt: BlockFormat, ws: list[QTensor], m: int, run: Run, baseline: dict) -> dict:
    """Checks and times qmatmul for m rows against the weights ws (all [n, k], rotated) and returns the row."""
    n, k = ws[0].shape
    dtype = DTYPES[run.dtype]
    esize = torch.empty((), dtype=dtype).element_size()
    planes_bytes = ws[0].data.nbytes
    sets = rotation_sets(planes_bytes + (m * k + m * n) * esize, run.l2_bytes)
    xs = activations(m, k, dtype, sets, SEED + m, run.device)
    outs = [torch.empty(m, n, dtype=dtype, device=run.device) for _ in range(sets)]
    if run.tune:  # measure the candidate configs and record the fastest for this M bucket before timing
        autotune(xs[0], ws[0])
    plan = plan_qmatmul(m, ws[0], device=run.device)
    err = check(xs[0], ws[0], outs[0], TOLERANCE[run.dtype])  # also compiles the kernel before timing
    t = time_gpu(lambda x, w, o: qmatmul(x, w, o), [(xs[i], ws[i % len(ws)], outs[i]) for i in range(sets)])
    row = {"format": fmt.name, "family": family(fmt.name), "bits_per_weight": fmt.bits_per_weight,
           "planes_bits_per_weight": plane_spec(fmt).bits_per_weight, "block_size": fmt.block_size,
           "m": m, "n": n, "k": k, "shape": f"{n}x{k}", "dtype": run.dtype,
           "regime": plan.regime.value, "config": dataclasses.asdict(plan.config), "config_source": plan.source,
           "tuned_configs": run.tuned_configs, "ms": t["ms"], "ms_p20": t["ms_p20"], "ms_p80": t["ms_p80"],
           "weight_bytes": ws[0].nbytes, "planes_bytes": planes_bytes, "x_bytes": m * k * esize,
           "out_bytes": m * n * esize, "torch_ms": baseline["ms"], "torch_ms_p20": baseline["ms_p20"],
           "torch_ms_p80": baseline["ms_p80"], "torch_sets": baseline["sets"], "sets": sets, "weight_sets": len(ws),
           "max_rel_err": err, "tolerance": TOLERANCE[run.dtype], "weight_source": "pool", "pool_weights": POOL_WEIGHTS,
           "weight_scale": WEIGHT_SCALE, "l2_bytes": run.l2_bytes, **run.ceilings}
    row.update(rates(row))
    return row


def sweep(formats: list[BlockFormat], ms: list[int], shapes: list[tuple[int, int]], run: Run, out: Path,
          env: dict) -> list[dict]:
    """Measures every (shape, format, m), appending each (shape, format)'s rows to out as they complete (a long run
    that is cut off keeps what it measured). Returns the rows merged with env, as written."""
    rows, pools = [], {}
    for n, k in shapes:
        baselines = torch_baselines(n, k, ms, DTYPES[run.dtype], run.l2_bytes, run.device)
        for fmt in formats:
            if fmt.name not in pools:
                pools[fmt.name] = block_pool(fmt, run.device)
            count = rotation_sets(int(n * k * plane_spec(fmt).bits_per_weight / 8), run.l2_bytes)
            ws = [draw_weight(pools[fmt.name], fmt, n, k, seed=SEED + i) for i in range(count)]
            batch = [measure_row(fmt, ws, m, run, baselines[m]) for m in ms]
            append_jsonl(out, batch, env)
            rows += [{**env, **r} for r in batch]
            for r in batch:
                print(f"{r['format']:6s} {r['shape']:>11s} M={r['m']:<5d} {r['regime']:7s} {r['ms']:9.4f} ms  "
                      f"{r['weight_gbs']:7.0f} GB/s  {r['tflops']:6.1f} TFLOP/s  roofline {r['roofline_fraction']:.2f}"
                      f"  x{r['speedup']:.2f} vs torch", flush=True)
            del ws
            torch.cuda.empty_cache()
    return rows


# ---- plots and report --------------------------------------------------------------------------------------------

def plot(rows: list[dict], out_dir: Path, dtype: str) -> list[Path]:
    """One PNG per format family present, qmatmul_<family>.png in out_dir, from the latest row per key of dtype:
    speedup over torch.matmul (top) and fraction of the roofline (bottom) against M, one column per shape."""
    rows = [r for r in latest(rows, KEY) if r["dtype"] == dtype]
    paths = []
    for fam in FAMILIES:
        selected = [r for r in rows if family(r["format"]) == fam]
        if selected:
            paths.append(out_dir / f"qmatmul_{fam}.png")
            _plot_family(fam, selected, paths[-1])
    return paths


def _plot_family(fam: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = lambda s: (SHAPES.index(s) if s in SHAPES else len(SHAPES), s)  # noqa: E731 - the issue's order first
    shapes = sorted({(r["n"], r["k"]) for r in rows}, key=order)
    names = [f for f in FORMATS if any(r["format"] == f for r in rows)]
    ms = sorted({r["m"] for r in rows})
    fig, axes = plt.subplots(2, len(shapes), figsize=(max(8.0, 4.5 * len(shapes)), 7.5), sharex=True, squeeze=False)
    for col, (n, k) in enumerate(shapes):
        top, bottom = axes[0][col], axes[1][col]
        for name in names:
            pts = sorted((r for r in rows if r["format"] == name and (r["n"], r["k"]) == (n, k)), key=lambda r: r["m"])
            if pts:
                top.plot([r["m"] for r in pts], [r["speedup"] for r in pts], marker="o", ms=3, label=name)
                bottom.plot([r["m"] for r in pts], [r["roofline_fraction"] for r in pts], marker="o", ms=3, label=name)
        top.axhline(1.0, color="0.5", lw=0.8)
        top.axhline(2.5, color="tab:red", lw=0.8, ls="--", label="target, M <= 16")
        bottom.axhline(0.8, color="tab:red", lw=0.8, ls="--", label="target (weight bytes), M = 1")
        top.set(title=f"N x K = {n} x {k}", yscale="log")
        bottom.set(xlabel="M (rows of x)", ylim=(0, None))
        bottom.set_xscale("log", base=2)
        bottom.set_xticks(ms, [str(m) for m in ms])
        bottom.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("speedup vs 16-bit torch.matmul")
    axes[1][0].set_ylabel("fraction of roofline (bandwidth or matmul)")
    axes[0][-1].legend(fontsize=7)
    r0 = max(rows, key=lambda r: r["date"])
    devices = ", ".join(sorted({r["device"] for r in rows}))
    fig.suptitle(f"realm qmatmul, {fam}, x {r0['dtype']}: {devices}; latest {r0['git_commit']} {r0['date'][:10]}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TABLE = [("format", None), ("shape", None), ("m", None), ("regime", None), ("config_source", None), ("ms", ".4f"),
         ("weight_gbs", ".0f"), ("tflops", ".1f"), ("roofline_fraction", ".2f"), ("weight_bw_fraction", ".2f"),
         ("speedup", ".2f"), ("max_rel_err", ".1e")]


def print_summary(rows: list[dict]) -> None:
    """The table, then each target's PASS / MISS with its worst row."""
    if not rows:
        print("no rows")
        return
    r0 = rows[0]
    print(f"\n{r0['device']}, x {r0['dtype']}, torch {r0['torch']}, triton {r0['triton']}, {r0['git_commit']}, "
          f"{r0['date']}; ceilings: {r0['bw_gbs']:.0f} GB/s copy, {r0['matmul_tflops']:.0f} TFLOP/s matmul; "
          f"{r0['tuned_configs']} tuned configs loaded")
    print_table(rows, TABLE)
    print()
    for res in evaluate_targets(rows):
        line = f"{res['status']:4s} ({res['target']}) {res['text']}"
        if res["worst"]:
            w = res["worst"]
            line += (f": {res['misses']} of {res['rows']} rows below {res['threshold']:g}; worst {w['format']} "
                     f"{w['shape']} M={w['m']}: {res['metric']} {w['value']:.2f}")
        print(line)


# ---- command line ------------------------------------------------------------------------------------------------

def _shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be NxK, e.g. 4096x4096, got {text!r}") from None
    return n, k


def _format(text: str) -> BlockFormat:
    fmt = FORMATS.get(text.upper())
    if fmt is None:
        raise argparse.ArgumentTypeError(f"unknown format {text!r}; known: {', '.join(FORMATS)}")
    return fmt


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", type=_format,
                   help="default: every storage format (Q8_1 and Q8_K, activation formats, only when named)")
    p.add_argument("--m", nargs="+", type=int, help=f"rows of x; default {' '.join(map(str, M_SWEEP))}")
    p.add_argument("--shapes", nargs="+", type=_shape,
                   help=f"weight shapes NxK; default {' '.join(f'{n}x{k}' for n, k in SHAPES)}")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16", help="x's dtype (and torch.matmul's weights)")
    p.add_argument("--out", type=Path, default=JSONL, help="JSONL to append to; plots go to its directory")
    p.add_argument("--quick", action="store_true", help="a short run: Q4_0 Q4_K Q8_0 Q6_K, M 1 16 2048, 4096x4096 "
                   "(explicit --formats / --m / --shapes still win)")
    p.add_argument("--tune", action="store_true", help="autotune each (format, shape, M) before timing it and save "
                   "the table to realm/kernels/configs/<gpu>.json")
    p.add_argument("--plot-only", action="store_true", help="plots, table and targets from --out (works on CPU)")
    return p


def resolve(args: argparse.Namespace, p: argparse.ArgumentParser) -> tuple[list, list, list]:
    """The formats, Ms and shapes of the run: explicit options, else --quick's subset, else the full sweep."""
    quick = args.quick
    formats = args.formats or ([FORMATS[f] for f in QUICK["formats"]] if quick else
                               [f for f in FORMATS.values() if f.storage])
    ms = args.m or list(QUICK["m"] if quick else M_SWEEP)
    shapes = args.shapes or list(QUICK["shapes"] if quick else SHAPES)
    if any(m < 1 for m in ms):
        p.error(f"--m values must be >= 1, got {ms}")
    for fmt in formats:
        for _, k in shapes:
            try:
                fmt.row_bytes(k)
            except QuantError as e:
                p.error(str(e))
    return formats, ms, shapes


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.plot_only:
        rows = [r for r in plot_only_rows(args.out, KEY, p) if r["dtype"] == args.dtype]
        paths = plot(rows, args.out.parent, args.dtype)
        print("wrote " + ", ".join(shown(path) for path in paths))
        print_summary(rows)
        return
    require_gpu("bench/qmatmul.py")
    formats, ms, shapes = resolve(args, p)
    start = time.perf_counter()
    device = torch.device("cuda")
    tuned = tuning.load()  # tuned configs for this GPU, if realm/kernels/configs/ has them; rows say which ran
    env = environment()  # one record (and start date) for every row of the run: the key of "latest run"
    ceilings = measure_ceilings(DTYPES[args.dtype], device)
    print(f"{env['device']}: {ceilings['bw_gbs']:.0f} GB/s (copy), {ceilings['matmul_tflops']:.0f} TFLOP/s "
          f"({args.dtype} matmul); {tuned} tuned configs loaded", flush=True)
    run = Run(args.dtype, device, l2_bytes(device), ceilings, tuned, args.tune)
    rows = sweep(formats, ms, shapes, run, args.out, env)
    if args.tune:
        print(f"saved tuned configs to {shown(tuning.save())}")
    paths = plot(read_jsonl(args.out), args.out.parent, args.dtype)
    print(f"wrote {shown(args.out)} and {', '.join(shown(path) for path in paths)} in "
          f"{time.perf_counter() - start:.0f} s")
    print_summary(rows)


if __name__ == "__main__":
    main()
