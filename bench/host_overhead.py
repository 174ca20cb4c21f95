"""Host time of one decode step: what the Python side of the engine and the kernel launchers costs per step.

On a GPU a decode step of a small model is a few hundred microseconds of kernels; when the host needs longer than
that to prepare the step and launch them, the GPU waits and no kernel speed-up shows. This measures the host side
alone, on the CPU, through the engine's public API (`Engine.add_request`, `Engine.step`), so the same script runs
on older realm trees (the "before" rows: point PYTHONPATH at an older checkout):

- the model has SmolLM2-135M's 30 layers but tiny matrices (hidden 64, Q8_0 weights), so the arithmetic is
  negligible and the step time is the host's: the engine, the scheduler, the forward's Python, the launchers;
- `--backends triton` runs the Triton forward with every kernel launch replaced by a no-op (`stub_triton_launches`):
  it times the Python side of the launchers (validation, planning, argument packing, allocation), without the
  kernels and without Triton's own launch path (binding arguments, cache lookup:
  not realm's code, and not measured here);
- `calls_per_step`: Python function calls per decode step (cProfile), a count that does not depend on the CPU.

    python bench/host_overhead.py                         # rows into bench/results/host_overhead.jsonl
    PYTHONPATH=/path/to/old/realm python bench/host_overhead.py --label before
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors: Triton functions must be the interpreter's

import gguf
import numpy as np
import torch
from harness import RESULTS, append_jsonl, comma_list, positive_int, print_table, shown

import realm
from realm.quant import FORMATS, quantize

try:
    from realm.runtime.tokenizer import IdTokenizer
except ImportError:  # an older realm tree (the "before" rows): its tests' stand-in of the time
    sys.path.insert(0, str(Path(realm.__file__).resolve().parent.parent / "tests"))
    from tiny_gguf import StubTokenizer as IdTokenizer

OUT = RESULTS / "host_overhead.jsonl"
DIMS = dict(layers=30, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn=128, vocab=256)
PROMPT_TOKENS = 8


def write_model(path: Path, dims: dict, fmt: str = "Q8_0", context: int = 1024) -> None:
    """A random llama model with `dims`, every matrix in `fmt`, norms in float32."""
    g = torch.Generator().manual_seed(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(dims["layers"])
    w.add_context_length(context)
    w.add_embedding_length(dims["hidden"])
    w.add_feed_forward_length(dims["ffn"])
    w.add_head_count(dims["n_heads"])
    w.add_head_count_kv(dims["n_kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    h, q, kv, f = dims["hidden"], dims["n_heads"] * dims["head_dim"], dims["n_kv_heads"] * dims["head_dim"], dims["ffn"]
    shapes = {"token_embd.weight": (dims["vocab"], h), "output_norm.weight": (h,), "output.weight": (dims["vocab"], h)}
    for i in range(dims["layers"]):
        shapes |= {f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.attn_q.weight": (q, h),
                   f"blk.{i}.attn_k.weight": (kv, h), f"blk.{i}.attn_v.weight": (kv, h),
                   f"blk.{i}.attn_output.weight": (h, q),
                   f"blk.{i}.ffn_norm.weight": (h,), f"blk.{i}.ffn_gate.weight": (f, h),
                   f"blk.{i}.ffn_up.weight": (f, h), f"blk.{i}.ffn_down.weight": (h, f)}
    for name, shape in shapes.items():
        value = torch.randn(shape, generator=g) * 0.2 + (1.0 if len(shape) == 1 else 0.0)
        if len(shape) == 1:
            w.add_tensor(name, value.numpy().astype(np.float32))
        else:
            kind = gguf.GGMLQuantizationType(FORMATS[fmt].ggml_type)
            w.add_tensor(name, quantize(value, fmt).numpy(), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def stub_triton_launches() -> None:
    """Every `kernel[grid](...)` becomes a no-op: what remains is the Python around the launches."""
    from triton.runtime.interpreter import InterpretedFunction

    InterpretedFunction.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)


def keep_logits_finite(model) -> None:
    """With the launches stubbed the logits are uninitialized memory, NaN at times, and realm ends a request whose
    logits are not finite: they are zeroed (one op a step, a few microseconds) so the requests keep decoding.
    Older trees measured through PYTHONPATH have no `transformer` here and no such check."""
    transformer = getattr(model, "transformer", None)
    if transformer is not None:
        forward = transformer.forward
        transformer.forward = lambda batch, kv: forward(batch, kv).nan_to_num(0.0, 0.0, 0.0)


def realm_commit() -> str:
    """The commit of the realm tree being measured (may differ from this script's tree: PYTHONPATH)."""
    tree = Path(realm.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "realm"], cwd=tree, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def decode_engine(model, batch: int, max_tokens: int):
    """An engine with `batch` sequences past their prefill, each decoding one token per step from now on."""
    from realm.runtime import Engine, EngineConfig, SamplingParams

    engine = Engine(model, EngineConfig(max_batch_tokens=max(64, batch * PROMPT_TOKENS), max_num_seqs=batch,
                                        kv_blocks=batch * (-(-(PROMPT_TOKENS + max_tokens) // 16) + 1)))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for b in range(batch):
        engine.add_request([(b * 7 + i) % model.config.vocab_size for i in range(PROMPT_TOKENS)], params)
    engine.step()  # every prompt in one step; from here on, decodes only
    return engine


def measure(model, batch: int, steps: int) -> dict:
    engine = decode_engine(model, batch, max_tokens=2 * steps + 8)
    for _ in range(3):  # warm-up: plans, caches
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t0) * 1e6)
    profile = cProfile.Profile()
    profile.enable()
    engine.step()
    profile.disable()
    calls = pstats.Stats(profile).total_calls
    q = statistics.quantiles(times, n=5)
    return {"step_us": statistics.median(times), "step_us_p20": q[0], "step_us_p80": q[3],
            "us_per_token": statistics.median(times) / batch, "calls_per_step": calls}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", type=comma_list("backends", ("torch", "triton")), default=["torch", "triton"])
    p.add_argument("--batches", default="1,16", help="comma list of decode batch sizes (default 1,16)")
    p.add_argument("--steps", type=positive_int, default=50, help="timed decode steps per row (default 50)")
    p.add_argument("--label", default="after", help="a name for these rows, e.g. before/after (default after)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", type=Path, default=OUT, help=f"JSONL to append to (default {shown(OUT)})")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    from realm.runtime import Backend, Model, load_weights

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "host.gguf"
        write_model(path, DIMS)
        weights = load_weights(path)
        for backend in args.backends:
            if backend == "triton":
                stub_triton_launches()
            model = Model(weights, IdTokenizer(DIMS["vocab"]), Backend(backend), torch.device("cpu"), torch.float32)
            if backend == "triton":
                keep_logits_finite(model)
            for batch in batches:
                row = {"bench": "host_overhead", "label": args.label, "realm_commit": realm_commit(),
                       "backend": backend, "batch": batch, "layers": DIMS["layers"], "hidden": DIMS["hidden"],
                       "kernels": "stubbed" if backend == "triton" else "torch ops (tiny)", **measure(model, batch,
                                                                                                    args.steps)}
                rows.append(row)
                print(f"{backend:6} batch {batch:3}: {row['step_us']:8.0f} us/step, {row['calls_per_step']} calls",
                      file=sys.stderr)
    append_jsonl(args.out, rows)
    print_table(rows, ["label", "realm_commit", "backend", "batch", ("step_us", ".0f"), ("us_per_token", ".0f"),
                       "calls_per_step"])
    print(f"appended {len(rows)} rows to {shown(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
