"""End-to-end generation speed: realm's tokens/s next to llama.cpp's (llama-cpp-python) on the same GGUF file.

Both engines get the same prompt ids (realm's tokenizer) and decode greedily exactly --tokens new tokens (end of
generation ignored), so both do the same work. Per engine and prompt, --repeats timed runs after --warmup untimed ones
give the median and 20/80 % quantiles of

- prefill tok/s: prompt tokens / (the prompt's forward + the first token), realm's `Timings.prefill_s`;
- decode tok/s: (new tokens - 1) / the time of every later token (one forward and one greedy pick each).

The repeats of the engines are interleaved (realm, llama.cpp, realm, ...), so a load that comes and goes on the
machine touches both sides of the ratio alike. Two prompts: a paragraph of a few dozen tokens, and --long-prompt
tokens (default 512) for prefill. Decode is memory-bound: each row also gives the weight bytes one decode step reads
(realm: the dequantized matrices in its compute dtype; llama.cpp: the GGUF blocks), the GB/s that makes, and its
fraction of the device's copy bandwidth measured in the same run (bytes read + written by a 256 MiB copy; a matvec
only reads, so the fraction can pass 1). Every realm row counts how many leading tokens agree with llama.cpp's: both
are greedy on the same weights, so they agree until a near tie (llama.cpp multiplies by 8-bit-quantized activations).

Threads: torch.set_num_threads and llama.cpp's n_threads / n_threads_batch get the same --threads (default
os.cpu_count()), recorded in each row. On --device cuda realm runs on the GPU and llama.cpp is skipped with a note
(this llama-cpp-python is a CPU build); without llama_cpp the script says so and measures realm alone. --backends
adds realm's Triton forward (GPU only: on CPU its kernels run under Triton's interpreter, which checks correctness,
not speed); its decode step reads the quantized weights themselves.

    python bench/generate.py                      # realm torch float32 vs llama.cpp, 128 tokens, 5 repeats
    python bench/generate.py --quick              # 32 tokens, 2 repeats
    python bench/generate.py --dtypes float32,bfloat16 --threads 2
    python bench/generate.py --device cuda        # realm on the GPU (no llama.cpp row)
    python bench/generate.py --device cuda --backends torch,triton --dtypes float16   # + realm's Triton kernels
    python bench/generate.py --plot-only          # generate.png, table and target from the JSONL
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from harness import (
    RESULTS,
    append_jsonl,
    comma_list,
    cpu_name,
    environment,
    latest,
    print_table,
    read_jsonl,
    replot,
    save_figure,
    shown,
    time_cpu,
    time_gpu,
)

import realm
from realm.models import resolve_model
from realm.runtime.weights import ModelWeights

JSONL = RESULTS / "generate.jsonl"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKENDS = ("torch", "triton")
DEFAULTS = {"tokens": 128, "repeats": 5}
QUICK = {"tokens": 32, "repeats": 2}
LONG_PROMPT = 512
TARGET_RATIO = 0.5  # realm decode tok/s >= 0.5x llama.cpp's, same prompt, same run
TARGET_TEXT = f"realm decode >= {TARGET_RATIO:g}x llama.cpp decode"
COPY_BYTES = 256 * 2**20  # bandwidth ceiling: far beyond any CPU cache
SHORT_TEXT = ("The history of the Roman Empire spans more than a thousand years, from the founding of the city on the "
              "banks of the Tiber to the fall of Constantinople in 1453. Historians usually divide it into")
# Repeated until LONG_PROMPT tokens and cut there; speed does not depend on the text, varied text keeps it ordinary.
LONG_TEXT = (
    "The Roman Republic grew from a small city state into the master of the Mediterranean through a long series of "
    "wars against its neighbours, the Samnites, the Greek cities of southern Italy and finally Carthage. "
    "Photosynthesis turns light, water and carbon dioxide into sugars and oxygen; the light reactions take place in "
    "the thylakoid membranes and the Calvin cycle in the stroma of the chloroplast. "
    "A compiler reads source code, builds a syntax tree, checks the types, lowers the tree to an intermediate "
    "representation, optimizes it and finally emits machine code for the target processor. "
    "The river rises in the mountains, runs through forests and farmland, and reaches the sea in a wide delta where "
    "fishermen have worked for centuries, mending their nets on the shore every evening. "
)


# ---- pure computations on plain values and dict rows (tested without a model) ------------------------------------

@dataclass(frozen=True)
class Sample:
    """One timed generation: prefill_s covers the prompt's forward and the first token, decode_s every later one."""

    prefill_s: float
    decode_s: float
    token_ids: tuple[int, ...]


def spread(values: Sequence[float]) -> dict:
    """{"median", "p20", "p80"} of values (linear interpolation, as the harness's timers)."""
    if not values:
        raise ValueError("spread of no values")
    q = torch.tensor(list(values), dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return dict(zip(("median", "p20", "p80"), (float(v) for v in q), strict=True))


def decode_weights(weights: ModelWeights) -> list:
    """The QTensors one decode step multiplies by: every layer's matrices and the output head (the token embedding
    is only gathered, one row per token)."""
    return [*(m for layer in weights.layers for m in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate,
                                                       layer.w_up, layer.w_down)), weights.output]


def decode_bytes(weights: ModelWeights, dtype: torch.dtype | None) -> int:
    """Weight bytes read per decode step: dequantized to dtype (realm's torch backend), or the GGUF blocks (None)."""
    matrices = decode_weights(weights)
    if dtype is None:
        return sum(m.nbytes for m in matrices)
    return sum(m.shape[0] * m.shape[1] for m in matrices) * torch.empty((), dtype=dtype).element_size()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):  # the shorter one bounds the prefix
        if x != y:
            break
        n += 1
    return n


def build_row(engine: dict, prompt: str, prompt_tokens: int, new_tokens: int, samples: Sequence[Sample],
              bytes_per_token: int, bw_gbs: float) -> dict:
    """One row: the engine's fields, the run's sizes, and the spread of prefill and decode tok/s over samples."""
    if new_tokens < 2:
        raise ValueError(f"decode speed needs at least 2 new tokens, got {new_tokens}")
    for s in samples:
        if len(s.token_ids) != new_tokens:
            raise RuntimeError(f"{engine['engine']} generated {len(s.token_ids)} tokens, not {new_tokens}")
    prefill = spread([prompt_tokens / s.prefill_s for s in samples])
    decode = spread([(new_tokens - 1) / s.decode_s for s in samples])
    weight_gbs = bytes_per_token * decode["median"] / 1e9
    return {**engine, "prompt": prompt, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "repeats": len(samples),
            "decode_tok_s": decode["median"], "decode_tok_s_p20": decode["p20"], "decode_tok_s_p80": decode["p80"],
            "prefill_tok_s": prefill["median"], "prefill_tok_s_p20": prefill["p20"],
            "prefill_tok_s_p80": prefill["p80"], "decode_ms_per_token": 1e3 / decode["median"],
            "prefill_ms": 1e3 * prompt_tokens / prefill["median"], "decode_bytes_per_token": bytes_per_token,
            "weight_gbs": weight_gbs, "bw_gbs": bw_gbs, "bw_fraction": weight_gbs / bw_gbs}


def add_ratios(rows: list[dict]) -> list[dict]:
    """Sets decode_ratio and prefill_ratio (realm / llama.cpp) on every realm row that has a llama.cpp row of the same
    run (date) and prompt length; None otherwise. Returns rows."""
    llama = {(r["date"], r["prompt_tokens"]): r for r in rows if r["engine_kind"] == "llama.cpp"}
    for r in rows:
        if r["engine_kind"] != "realm":
            continue
        ref = llama.get((r["date"], r["prompt_tokens"]))
        r["llama_decode_tok_s"] = ref["decode_tok_s"] if ref else None
        r["decode_ratio"] = r["decode_tok_s"] / ref["decode_tok_s"] if ref else None
        r["prefill_ratio"] = r["prefill_tok_s"] / ref["prefill_tok_s"] if ref else None
    return rows


def evaluate_target(rows: list[dict]) -> list[dict]:
    """Per realm row with a llama.cpp row beside it: the status (PASS when decode_ratio >= TARGET_RATIO, else MISS),
    the ratio and both speeds. One n/a entry when no realm row has a llama.cpp row to compare with."""
    results = [{"status": "PASS" if r["decode_ratio"] >= TARGET_RATIO else "MISS", "ratio": r["decode_ratio"],
                "engine": r["engine"], "prompt_tokens": r["prompt_tokens"], "decode_tok_s": r["decode_tok_s"],
                "llama_decode_tok_s": r["llama_decode_tok_s"]}
               for r in rows if r["engine_kind"] == "realm" and r.get("decode_ratio") is not None]
    return results or [{"status": "n/a", "ratio": None}]


def target_line(res: dict) -> str:
    if res["ratio"] is None:
        return f"target: {TARGET_TEXT}: n/a (no llama.cpp row measured beside realm)"
    return (f"target: {TARGET_TEXT}: {res['status']} ({res['ratio']:.2f}x; {res['engine']}, "
            f"{res['prompt_tokens']}-token prompt: {res['decode_tok_s']:.1f} vs {res['llama_decode_tok_s']:.1f} tok/s)")


KEY = ("engine", "device", "prompt_tokens")  # latest(rows, KEY): the newest row per engine, device, prompt length


# ---- engines -----------------------------------------------------------------------------------------------------

class RealmEngine:
    """realm.load(...).generate with greedy sampling and ignore_eos; timings from realm's own Timings."""

    def __init__(self, model, device: torch.device):
        self.model = model
        dtype = str(model.dtype).removeprefix("torch.")
        self.fields = {"engine": f"realm {model.backend.value} {dtype}" + (" cuda" if device.type == "cuda" else ""),
                       "engine_kind": "realm", "backend": model.backend.value, "dtype": dtype,
                       "compute_device": device.type}
        # the torch backend reads dequantized matrices; the Triton one decodes the quantized blocks in registers
        quantized = model.backend.value == "triton"
        self.bytes_per_token = decode_bytes(model.weights, None if quantized else model.dtype)

    def run(self, ids: list[int], new_tokens: int) -> Sample:
        c = self.model.generate(ids, max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        return Sample(c.timings.prefill_s, c.timings.decode_s, tuple(c.token_ids))


class LlamaCppEngine:
    """llama_cpp.Llama.generate with temp=0 (greedy), which never stops by itself: it yields exactly the tokens
    taken. Each step is timed where the generator hands its token out (one eval and one greedy pick)."""

    def __init__(self, llama_cpp, path: Path, weights: ModelWeights, threads: int, n_ctx: int, n_batch: int):
        # n_batch = n_ubatch >= the longest prompt: the prompt is one forward, as realm's is
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                   n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, verbose=False)
        self.fields = {"engine": "llama.cpp", "engine_kind": "llama.cpp", "backend": "llama.cpp", "dtype": "gguf",
                       "compute_device": "cpu", "n_batch": n_batch}
        self.bytes_per_token = decode_bytes(weights, None)

    def run(self, ids: list[int], new_tokens: int) -> Sample:
        self.llm.reset()  # no prefix reuse from the last run: every run computes the whole prompt
        tokens: list[int] = []
        steps: list[float] = []
        t0 = time.perf_counter()
        for token in self.llm.generate(ids, temp=0.0, repeat_penalty=1.0):
            now = time.perf_counter()
            steps.append(now - t0)
            tokens.append(token)
            if len(tokens) == new_tokens:
                break
            t0 = time.perf_counter()
        return Sample(steps[0], sum(steps[1:]), tuple(tokens))


def load_realm(model: str | Path, device: torch.device, dtype: torch.dtype, backend: str = "torch"):
    """realm.load; a function of its own so tests can cache the model between runs."""
    return realm.load(model, device=device, backend=backend, dtype=dtype)


def import_llama_cpp(device: torch.device, skip: bool):
    """(llama_cpp module or None, the note saying why it is not measured)."""
    if skip:
        return None, "llama.cpp: not measured (--no-llama)"
    if device.type != "cpu":
        return None, (f"llama.cpp: skipped on {device.type}: this llama-cpp-python is a CPU build, and its CPU speed "
                      f"next to realm on a GPU compares no like with like")
    try:
        import llama_cpp
    except ImportError as e:
        return None, f"llama.cpp: not measured, llama_cpp is not importable ({e}); measuring realm alone"
    return llama_cpp, None


# ---- measurement -------------------------------------------------------------------------------------------------

def prompts(model, long_tokens: int) -> dict[str, list[int]]:
    """{"short": a paragraph's ids, "long": long_tokens ids (absent when 0)}, from realm's tokenizer, without BOS."""
    out = {"short": model.encode(SHORT_TEXT, add_bos=False)}
    if long_tokens:
        piece = model.encode(LONG_TEXT, add_bos=False)
        out["long"] = (piece * (long_tokens // len(piece) + 1))[:long_tokens]
    return out


def measure_bandwidth(device: torch.device) -> float:
    """GB/s of a COPY_BYTES copy on device, bytes read + written (random data, not zeros)."""
    src = torch.rand(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    timer = time_gpu if device.type == "cuda" else lambda fn: time_cpu(fn, repeats=5)
    return 2 * COPY_BYTES / (timer(lambda: dst.copy_(src))["ms"] * 1e6)


def busy_cpu_s() -> tuple[float, float] | None:
    """(seconds of busy CPU time on the machine, of this process incl. llama.cpp's threads) so far; None where
    /proc/stat is missing. Their growth over a run, less ours, is the load other work put on the machine."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def other_load(before: tuple[float, float] | None, after: tuple[float, float] | None, wall_s: float) -> float | None:
    """CPUs kept busy by other processes during wall_s, on average (0: a quiet machine; 2: both cores of this one)."""
    if before is None or after is None or wall_s <= 0:
        return None
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall_s


def measure(engines: list, prompt_ids: dict[str, list[int]], new_tokens: int, repeats: int, warmup: int,
            bw: dict[str, float], devices: dict[str, str]) -> list[dict]:
    """Per prompt: warm-up runs of every engine, then the repeats interleaved across engines. Returns the rows (no
    environment fields yet), realm rows with agree_prefix against llama.cpp's tokens when it ran."""
    rows = []
    for prompt, ids in prompt_ids.items():
        for engine in engines:
            for _ in range(warmup):
                engine.run(ids, new_tokens)
        samples: list[list[Sample]] = [[] for _ in engines]
        for _ in range(repeats):
            for engine, got in zip(engines, samples, strict=True):
                got.append(engine.run(ids, new_tokens))
        llama_ids = next((got[0].token_ids for e, got in zip(engines, samples, strict=True)
                          if e.fields["engine_kind"] == "llama.cpp"), None)
        for engine, got in zip(engines, samples, strict=True):
            kind = engine.fields["compute_device"]
            row = build_row(engine.fields, prompt, len(ids), new_tokens, got, engine.bytes_per_token, bw[kind])
            row["device"] = devices[kind]
            row["device_kind"] = kind
            if engine.fields["engine_kind"] == "realm":
                row["agree_prefix"] = None if llama_ids is None else common_prefix(got[0].token_ids, llama_ids)
            rows.append(row)
            print(f"{row['engine']:24s} prompt {len(ids):4d}  prefill {row['prefill_tok_s']:8.1f} tok/s  decode "
                  f"{row['decode_tok_s']:6.1f} tok/s [{row['decode_tok_s_p20']:.1f}, {row['decode_tok_s_p80']:.1f}]",
                  flush=True)
    return rows


# ---- plot and report ---------------------------------------------------------------------------------------------

def plot(rows: list[dict], path: Path) -> Path:
    """generate.png: decode tok/s (left) and prefill tok/s (right) per engine, grouped by prompt length, from the
    latest row per (engine, device, prompt length); error bars span the 20/80 % quantiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = latest(rows, KEY)
    several = len({r["device"] for r in rows}) > 1
    name_of = lambda r: f"{r['engine']} on {r['device']}" if several else r["engine"]  # noqa: E731
    engines = list(dict.fromkeys(name_of(r) for r in rows))
    lengths = sorted({r["prompt_tokens"] for r in rows})
    width = 0.8 / len(engines)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric, title in ((axes[0], "decode_tok_s", "decode"), (axes[1], "prefill_tok_s", "prefill")):
        for i, name in enumerate(engines):
            pts = {r["prompt_tokens"]: r for r in rows if name_of(r) == name}
            xs = [j + (i - (len(engines) - 1) / 2) * width for j, n in enumerate(lengths) if n in pts]
            med = [pts[n][metric] for n in lengths if n in pts]
            err = [[pts[n][metric] - pts[n][f"{metric}_p20"] for n in lengths if n in pts],
                   [pts[n][f"{metric}_p80"] - pts[n][metric] for n in lengths if n in pts]]
            bars = ax.bar(xs, med, width, yerr=err, capsize=3, label=name)
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
        ax.set_xticks(range(len(lengths)), [f"{n}-token prompt" for n in lengths])
        ax.set(title=f"{title} tok/s (median, 20/80 %)", ylabel="tokens / s")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    r0 = max(rows, key=lambda r: r["date"])
    devices = ", ".join(sorted({r["device"] for r in rows}))
    title = (f"realm vs llama.cpp generation, {r0.get('model', '?')}: {devices}, {r0.get('threads')} threads; "
             f"latest {r0['git_commit']} {r0['date'][:10]}")
    return save_figure(fig, path, title, fontsize=10)


TABLE = [("engine", None), ("prompt_tokens", None), ("new_tokens", None), ("decode_tok_s", ".1f"),
         ("decode_tok_s_p20", ".1f"), ("decode_tok_s_p80", ".1f"), ("prefill_tok_s", ".1f"),
         ("prefill_tok_s_p20", ".1f"), ("prefill_tok_s_p80", ".1f"), ("decode_ratio", ".2f"), ("prefill_ratio", ".2f"),
         ("weight_gbs", ".1f"), ("bw_fraction", ".2f"), ("agree_prefix", None)]


def print_summary(rows: list[dict]) -> None:
    """The table, then the target line of every realm row measured beside llama.cpp."""
    if not rows:
        print("no rows")
        return
    r0 = rows[0]
    print(f"\n{r0['device']}, {r0.get('threads')} threads, torch {r0['torch']}, llama_cpp {r0.get('llama_cpp')}, "
          f"{r0.get('model')}, {r0['git_commit']}, {r0['date']}; copy bandwidth {r0['bw_gbs']:.1f} GB/s")
    if r0.get("other_load") is not None:
        print(f"other processes kept {r0['other_load']:.2f} CPUs busy on average during the run "
              f"(1-minute load average at the start: {r0['loadavg_1m']:.2f})")
    print_table(rows, TABLE)
    print()
    for res in evaluate_target(rows):
        print(target_line(res))


# ---- command line ------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a packaged model name or a .gguf path (default smollm2)")
    p.add_argument("--dtypes", type=comma_list("dtypes", DTYPES), default=["float32"],
                   help=f"realm compute dtypes, comma separated ({', '.join(DTYPES)}); default float32")
    p.add_argument("--backends", type=comma_list("backends", BACKENDS), default=["torch"],
                   help="realm backends, comma separated (torch, triton: GPU only); default torch")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="realm's device (llama.cpp runs on CPU "
                   "only, and only beside realm on CPU)")
    p.add_argument("--tokens", type=int, help=f"new tokens per run (default {DEFAULTS['tokens']}, "
                   f"--quick {QUICK['tokens']})")
    p.add_argument("--repeats", type=int, help=f"timed runs per engine and prompt (default {DEFAULTS['repeats']}, "
                   f"--quick {QUICK['repeats']})")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per engine and prompt first (default 1)")
    p.add_argument("--long-prompt", type=int, default=LONG_PROMPT, help="tokens of the second, long prompt (prefill); "
                   f"0: the short prompt only (default {LONG_PROMPT})")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and llama.cpp CPU threads "
                   "(default os.cpu_count())")
    p.add_argument("--no-llama", action="store_true", help="measure realm alone")
    p.add_argument("--out", type=Path, default=JSONL, help="JSONL to append to; the PNG goes next to it")
    p.add_argument("--quick", action="store_true", help=f"{QUICK['tokens']} tokens, {QUICK['repeats']} repeats "
                   "(explicit --tokens / --repeats still win)")
    p.add_argument("--plot-only", action="store_true", help="plot, table and target from --out; measures nothing")
    return p


def _check(args: argparse.Namespace, p: argparse.ArgumentParser) -> torch.device:
    sizes = QUICK if args.quick else DEFAULTS
    args.tokens = sizes["tokens"] if args.tokens is None else args.tokens
    args.repeats = sizes["repeats"] if args.repeats is None else args.repeats
    for name, value, minimum in (("--tokens", args.tokens, 2), ("--repeats", args.repeats, 1),
                                 ("--warmup", args.warmup, 0), ("--long-prompt", args.long_prompt, 0),
                                 ("--threads", args.threads, 1)):
        if value < minimum:
            p.error(f"{name} must be >= {minimum}, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if "triton" in args.backends and args.device != "cuda":
        p.error("--backends triton needs --device cuda: on CPU Triton's interpreter runs the kernels, which checks "
                "them but measures nothing worth comparing")
    return torch.device(args.device)


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.plot_only:
        replot(args.out, KEY, p, plot, print_summary)
        return
    device = _check(args, p)
    path = resolve_model(args.model)
    torch.set_num_threads(args.threads)
    llama_cpp, note = import_llama_cpp(device, args.no_llama)
    if note:
        print(note, flush=True)
    start = time.perf_counter()
    models = [load_realm(path, device, DTYPES[d], b) for b in args.backends for d in args.dtypes]
    engines = [RealmEngine(m, device) for m in models]
    prompt_ids = prompts(models[0], args.long_prompt)
    if llama_cpp is not None:
        longest = max(len(ids) for ids in prompt_ids.values())
        engines.append(LlamaCppEngine(llama_cpp, path, models[0].weights, args.threads,
                                      n_ctx=longest + args.tokens + 8, n_batch=max(512, longest)))
    env = {**environment(), "llama_cpp": getattr(llama_cpp, "__version__", None), "model": path.name,
           "model_bytes": path.stat().st_size, "threads": args.threads, "warmup": args.warmup, "note": note,
           "loadavg_1m": os.getloadavg()[0]}  # other work on the machine at the start: a busy CPU slows both sides
    bw = {"cpu": measure_bandwidth(torch.device("cpu"))}
    devices = {"cpu": cpu_name()}  # env's device is the GPU's name whenever one exists
    if device.type == "cuda":
        bw["cuda"], devices["cuda"] = measure_bandwidth(device), torch.cuda.get_device_name(device)
    print(f"{devices[device.type]}: {bw[device.type]:.1f} GB/s copy; {args.threads} threads; "
          f"prompts {', '.join(f'{k} {len(v)}' for k, v in prompt_ids.items())} tokens; {args.tokens} new tokens, "
          f"{args.repeats} repeats, {args.warmup} warm-up", flush=True)
    cpu0, t0 = busy_cpu_s(), time.perf_counter()
    rows = measure(engines, prompt_ids, args.tokens, args.repeats, args.warmup, bw, devices)
    load = other_load(cpu0, busy_cpu_s(), time.perf_counter() - t0)
    rows = add_ratios([{**env, **r, "other_load": load} for r in rows])
    append_jsonl(args.out, rows, env={})
    png = plot(read_jsonl(args.out), args.out.with_suffix(".png"))
    print(f"wrote {shown(args.out)} and {shown(png)} in {time.perf_counter() - start:.0f} s")
    print_summary(rows)


if __name__ == "__main__":
    main()
