"""Tensor-parallel decode on the CPU: decode-step time and tokens/s of a model split over 1, 2 and 3 gloo ranks
(processes on this machine), and each step's communication volume.

Per world size W: W processes (torch.multiprocessing, gloo on loopback) each build their shard
(realm.parallel.tensor_parallel), prefill `batch` sequences of `--context` random tokens, then time `--steps` greedy
decode steps of the whole batch (every rank the same step; rank 0 reports). Threads per rank: --threads // W (at least
1), so the ranks share the cores as they would share GPUs' work.

Communication, from the model's shape (not measured on the wire): a step of T tokens all-reduces two [T, hidden]
float32 tensors per layer (after the attention output and the down projection) and one more for the
vocabulary-parallel embedding's lookup, and gathers the head's [T, vocab / W] logits from every rank:
    allreduce_bytes = 2 x layers x T x hidden x 4          (a ring all-reduce sends 2 (W - 1) / W of it per rank)
    embed_bytes     = T x hidden x 4                       (the embedding's all-reduce: not in allreduce_mb, which
                                                            stays the layers' so rows measured before it compare)
    gather_bytes    = T x vocab x 4 x (W - 1) / W          (received per rank)

Rows (bench/results/tensor_parallel.jsonl, via harness: device, versions, commit, date): model, backend, world,
batch, context, threads_per_rank, step_ms (median decode step; p20/p80), tok_s (batch / step time), allreduce_mb and
gather_mb per step, speedup (the 1-rank step time / this one's). tensor_parallel.png: step time and tokens/s against
the world size, per batch.

    python bench/tensor_parallel.py                         # SmolLM2 (onednn), W 1 2 3, batch 1 8 32
    python bench/tensor_parallel.py --model tiny.gguf --world 1 2 --batch 1 --steps 3 --out /tmp/tp.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import RESULTS, environment, positive_int, print_table, record, replot, save_figure

JSONL = RESULTS / "tensor_parallel.jsonl"
KEY = ("device", "model", "backend", "world", "batch", "context", "threads_per_rank")
WORLDS = (1, 2, 3)
BATCHES = (1, 8, 32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, args: dict, out: str) -> None:
    """One rank: its shard, then per batch size a prefill and the timed decode steps; rank 0 writes the times."""
    from realm.parallel.tensor_parallel import tensor_parallel_transformer
    from realm.runtime.weights import load_weights

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.set_num_threads(args["threads_per_rank"])
        weights = load_weights(args["model"])
        net = tensor_parallel_transformer(weights, rank, world, args["backend"])
        results = []
        gen = torch.Generator().manual_seed(0)
        for batch in args["batches"]:
            prompts = torch.randint(0, weights.config.vocab_size, (batch, args["context"]), generator=gen).tolist()
            cache = net.new_cache(batch, args["context"] + args["steps"] + 1)
            logits = net.forward_tokens(prompts, cache, 0, last_only=True)
            times = []
            for i in range(args["steps"] + 1):  # the first step is a warm-up
                nxt = [[t] for t in logits[:, -1].argmax(-1).tolist()]
                dist.barrier()
                began = time.perf_counter()
                logits = net.forward_tokens(nxt, cache, args["context"] + i)
                if i:
                    times.append(time.perf_counter() - began)
            results.append({"batch": batch, "times": times})
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def measure(model: str, backend: str, worlds, batches, context: int, steps: int, threads: int) -> list[dict]:
    """Rows per (world, batch); a world size the model cannot be cut for is skipped, saying why (SmolLM2's 9 query
    heads do not split over 2 ranks)."""
    from realm.parallel import ShardError
    from realm.parallel.tensor_parallel import shard_weights
    from realm.runtime.weights import load_weights

    weights = load_weights(model)
    c = weights.config
    rows = []
    base = {}
    for world in worlds:
        try:
            shard_weights(weights, 0, world)  # every cut checked before any process starts
        except ShardError as e:
            print(f"world {world} skipped: {e}", file=sys.stderr)
            continue
        args = {"model": model, "backend": backend, "batches": list(batches), "context": context, "steps": steps,
                "threads_per_rank": max(1, threads // world)}
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rank0.json")
            mp.start_processes(_rank, args=(world, _free_port(), args, out), nprocs=world, start_method="spawn",
                               join=True)
            measured = json.loads(Path(out).read_text())
        for m in measured:
            times = sorted(m["times"])
            ms = statistics.median(times) * 1e3
            base.setdefault(m["batch"], ms)
            t = m["batch"]
            rows.append({"model": Path(model).name if os.path.sep in str(model) else model, "backend": backend,
                         "world": world, "batch": t, "context": context,
                         "threads_per_rank": args["threads_per_rank"], "steps": steps, "step_ms": ms,
                         "step_ms_p20": times[int(0.2 * (len(times) - 1))] * 1e3,
                         "step_ms_p80": times[int(0.8 * (len(times) - 1))] * 1e3, "tok_s": t / (ms / 1e3),
                         "allreduce_mb": 2 * c.n_layers * t * c.hidden * 4 / 1e6 if world > 1 else 0.0,
                         "gather_mb": t * c.vocab_size * 4 * (world - 1) / world / 1e6,
                         "speedup": base[t] / ms})
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for batch in sorted({r["batch"] for r in rows}):
        mine = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["world"])
        ws = [r["world"] for r in mine]
        ax.plot(ws, [r["step_ms"] for r in mine], marker="o", label=f"batch {batch}")
        ax.fill_between(ws, [r["step_ms_p20"] for r in mine], [r["step_ms_p80"] for r in mine], alpha=0.15)
        ax2.plot(ws, [r["tok_s"] for r in mine], marker="o", label=f"batch {batch}")
    ax.set(xlabel="ranks (processes)", ylabel="decode step, ms", title="step time", yscale="log")
    ax2.set(xlabel="ranks (processes)", ylabel="output tokens/s", title="throughput", yscale="log")
    for a in (ax, ax2):
        a.set_xticks(sorted({r["world"] for r in rows}))
        a.grid(alpha=0.3)
        a.legend()
    r0 = rows[0]
    title = (f"tensor parallel decode: {r0.get('model')} ({r0.get('backend')}), gloo ranks on {r0['device']}, "
             f"context {r0['context']}, {r0['git_commit']}")
    return save_figure(fig, path, title)


def summary(rows: list[dict]) -> None:
    print_table(sorted(rows, key=lambda r: (r["batch"], r["world"])),
                ["batch", "world", "threads_per_rank", ("step_ms", ".1f"), ("step_ms_p20", ".1f"),
                 ("step_ms_p80", ".1f"), ("tok_s", ".1f"), ("allreduce_mb", ".2f"), ("gather_mb", ".2f"),
                 ("speedup", ".2f")])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a packaged model name or a .gguf path (default smollm2)")
    p.add_argument("--backend", default="onednn", choices=["torch", "onednn"], help="each rank's backend (default "
                   "onednn)")
    p.add_argument("--world", nargs="+", type=positive_int, default=list(WORLDS), help="rank counts (default "
                   f"{' '.join(map(str, WORLDS))})")
    p.add_argument("--batch", nargs="+", type=positive_int, default=list(BATCHES), help="sequences per step "
                   f"(default {' '.join(map(str, BATCHES))})")
    p.add_argument("--context", type=positive_int, default=128, help="prompt tokens per sequence (default 128)")
    p.add_argument("--steps", type=positive_int, default=10, help="timed decode steps (default 10)")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="CPU threads shared by the ranks "
                   "(default os.cpu_count())")
    p.add_argument("--out", type=Path, default=JSONL, help="JSONL to append to; the PNG goes next to it")
    p.add_argument("--plot-only", action="store_true", help="plot and table from --out; measures nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.plot_only:
        return replot(args.out, KEY, p, plot, summary)
    rows = measure(args.model, args.backend, sorted(set(args.world)), sorted(set(args.batch)), args.context,
                   args.steps, args.threads)
    env = {**environment(), "threads": args.threads}
    return record(args.out, rows, env, plot, summary)


if __name__ == "__main__":
    sys.exit(main())
