"""Serving throughput: realm's continuous batching next to static batching (same engine) and HF transformers.

For N concurrent requests (default 1, 8, 32, 128), all submitted at once, every mode generates each request's wanted
number of tokens greedily and exactly (SamplingParams(max_tokens=wanted, ignore_eos=True)), and a run is timed from
the first submission to the last token:

- continuous: realm's Engine with batching="continuous": sequences join and leave the batch at every step;
- static: the same engine, model and kernels with batching="static": the batch is refilled only once all of it has
  finished, so at N=128 and --max-num-seqs 32 it runs in waves, each as long as its longest request;
- transformers (when it is installed; --no-hf skips it): HF `generate` on the same GGUF (dequantized by transformers
  itself; float32 on CPU, float16 on CUDA), in batches of up to --max-num-seqs prompts in arrival order, left-padded,
  greedy, max_new_tokens = min_new_tokens = the longest wanted output of the batch. Only each request's own wanted
  tokens count as output: padding and the tokens past a request's length are the price of static batching.

Workload (`Workload`): one seeded stream of requests; N requests are the first N of it, so the runs at different N
share their requests. Prompt lengths are uniform integers in --prompt-lens (default 16..256, mean 136), prompt ids
uniform over the vocabulary (speed does not depend on the ids; no two prompts share a prefix, so prefix caching
finds nothing); wanted output lengths are lognormal, median --output-median (32) and log-sigma --output-sigma (1.0),
rounded and clipped to --output-lens (8..256): a heavy tail (mean ~52; about 1 request in 50 hits the 256 cap), as
chat outputs have. Every row records the distribution.

Engine (recorded in every row): --max-num-seqs (32) for both engines' batches; --max-batch-tokens, default the
engine's (EngineConfig().max_batch_tokens, 512: the static scheduler admits a whole batch whatever the budget and
prefills what it leaves out in the next steps; with the real scheduler on this workload, N=128 takes 315 steps
continuous and 786 static at 512 tokens, 312 and 763 at 8192: the budget hardly moves the step counts);
--kv-blocks, default enough for max_num_seqs sequences of the longest prompt and output plus a block each (the
workload never needs to preempt; preemptions are counted anyway); --block-size (16); prefix caching on (the engine's
default). One engine per (backend, mode) serves all its runs, each run under its own prefix-cache salt, so no run
finds another's blocks; its KV cache is written once before the first run (the pages' first-touch faults belong to
start-up, not to a timed run).

Per (engine, mode, N) a row holds: wall time, output tokens, output tok/s (the headline) and total (prompt + output)
tok/s, TTFT mean / p50 / p90 (queue + prefill: Completion.timings.queue_s + prefill_s; for transformers, the time
from the start to its batch's first token), per-request decode tok/s (mean and p50), steps (forwards), mean and
largest batch (sequences per forward), preemptions (engine.scheduler.stats), tokens found in the prefix cache, and
the fraction of requests whose tokens equal static's (continuous rows; greedy on the same engine: should be 1.0) or
realm's continuous ones (transformers rows: greedy on the same weights, equal up to near ties). Continuous rows also
carry static_ratio = continuous / static output tok/s, and hf_ratio = continuous / transformers.

With --repeats R every run is repeated R times, interleaved across the modes at each N (continuous, static,
transformers, continuous, ...), so a load that comes and goes touches both sides of each ratio; a row gives the
median over the repeats of each figure and the 20/80 % quantiles of output tok/s. --warmup untimed runs of two short
requests per mode come first. The default is one repeat: the full CPU run is long (see below).

Devices: --device cpu (default) measures realm's torch backend in float32 with --threads torch threads. --device cuda
measures --backends (default torch,triton) in each backend's default dtype (realm.runtime.model.default_dtype:
float32 for torch, float16 for triton). The issue's target, continuous >= 5x static's output tok/s at 128 mixed
requests, is asked on a GPU: PASS / MISS there; on the CPU the ratio is printed and the target says n/a. With the
same max_num_seqs in both modes the target has a ceiling: static takes at most (waves) x (the longest output) steps
and continuous at least the longest output, so their step ratio is at most N / max_num_seqs (4 at the defaults), and
this workload's is 786 / 315 = 2.5 (the scheduler alone, run on it); where a step's time hardly depends on its batch,
as on a GPU, the throughput ratio cannot be much more than that.

Run time on a 2-core Xeon (default model SmolLM2-135M Q4_1, torch float32): the full default run took 7.1 min on a
quiet machine (2 threads; transformers' 128 requests alone 2.8 min; continuous / static at N=128: 1.33x, and every
request's tokens were equal in the three modes) and 11.7 min with --threads 1 beside another busy process; --quick
takes ~25 s, most of it loading both models. Torch's threads wait on each other at every op when another process
holds one of their cores (a decode step took 1.4 s with 2 threads beside one busy process, 0.05 s with 1): the script
warns when other processes keep cores busy at the start, and every row records how many they kept busy at the start
and at the end (other_busy_cpus, other_busy_cpus_end).

    python bench/throughput.py                     # CPU: N 1 8 32 128, continuous, static, transformers
    python bench/throughput.py --quick             # N 1 8, small lengths, --max-num-seqs 4
    python bench/throughput.py --requests 128 --repeats 3 --no-hf
    python bench/throughput.py --device cuda       # torch and triton backends on the GPU, target PASS / MISS
    python bench/throughput.py --plot-only         # throughput.png, table and target from the JSONL
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from harness import (
    RESULTS,
    Target,
    append_jsonl,
    comma_list,
    cpu_name,
    environment,
    latest,
    positive_int,
    print_table,
    read_jsonl,
    replot,
    save_figure,
    shown,
    target_results,
)

import realm
from realm.models import resolve_model
from realm.runtime.engine import Engine, EngineConfig
from realm.runtime.generate import FinishReason
from realm.runtime.sampling import SamplingParams
from realm.runtime.scheduler import Batching

JSONL = RESULTS / "throughput.jsonl"
BACKENDS = ("torch", "triton")
MODES = ("continuous", "static")
REQUESTS = (1, 8, 32, 128)
MAX_NUM_SEQS = 32
BLOCK_SIZE = 16
QUICK = {"requests": (1, 8), "max_num_seqs": 4, "prompt_lens": (16, 64), "output_lens": (4, 32),
         "output_median": 8.0}
WARMUP_TOKENS = 4  # a warm-up run: the workload's first two prompts, this many tokens each
TARGET_RATIO = 5.0
TARGET_REQUESTS = 128
TARGETS = (
    Target("continuous", f"continuous >= {TARGET_RATIO:g}x static batching's output tok/s at {TARGET_REQUESTS} mixed "
           "requests (issue: on a GPU)", "static_ratio", TARGET_RATIO,
           lambda r: r["mode"] == "continuous" and r["device_kind"] == "cuda" and r["n_requests"] >= TARGET_REQUESTS
           and r.get("static_ratio") is not None),
)
KEY = ("engine", "mode", "device", "n_requests")  # latest(rows, KEY): the newest row per engine, mode, device, N


# ---- the workload ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_tokens: int  # the wanted output length: generated exactly (ignore_eos)


@dataclass(frozen=True)
class Workload:
    """A seeded stream of requests of mixed lengths: prompts uniform in [prompt_min, prompt_max] tokens of ids uniform
    in [0, vocab), wanted outputs lognormal(ln(output_median), output_sigma) rounded and clipped to [output_min,
    output_max]."""

    seed: int = 0
    prompt_min: int = 16
    prompt_max: int = 256
    output_min: int = 8
    output_max: int = 256
    output_median: float = 32.0
    output_sigma: float = 1.0

    def __post_init__(self):
        if not 1 <= self.prompt_min <= self.prompt_max:
            raise ValueError(f"prompt lengths need 1 <= min <= max, got {self.prompt_min}..{self.prompt_max}")
        if not 1 <= self.output_min <= self.output_max:
            raise ValueError(f"output lengths need 1 <= min <= max, got {self.output_min}..{self.output_max}")
        if self.output_median <= 0 or self.output_sigma < 0:
            raise ValueError(f"the output median must be > 0 and sigma >= 0, got {self.output_median}, "
                             f"{self.output_sigma}")

    def requests(self, n: int, vocab_size: int) -> list[Request]:
        """The first n requests of the stream (the same first requests for any n and vocabulary size)."""
        lengths = np.random.default_rng([self.seed, 0])  # lengths and ids from separate streams: the lengths do not
        ids = np.random.default_rng([self.seed, 1])  # depend on the vocabulary
        out = []
        for _ in range(n):
            prompt = int(lengths.integers(self.prompt_min, self.prompt_max + 1))
            wanted = round(float(lengths.lognormal(math.log(self.output_median), self.output_sigma)))
            out.append(Request(tuple(int(t) for t in ids.integers(0, vocab_size, prompt)),
                               min(self.output_max, max(self.output_min, wanted))))
        return out

    def fields(self) -> dict:
        return {"workload_seed": self.seed, "prompt_dist": f"uniform {self.prompt_min}..{self.prompt_max}",
                "output_dist": f"lognormal median {self.output_median:g} sigma {self.output_sigma:g}, clipped "
                               f"{self.output_min}..{self.output_max}",
                **{f"workload_{k}": v for k, v in asdict(self).items() if k != "seed"}}


def default_kv_blocks(max_num_seqs: int, workload: Workload, block_size: int) -> int:
    """Blocks for max_num_seqs sequences of the longest prompt and output, and the free block the scheduler keeps per
    running sequence."""
    return max_num_seqs * (-(-(workload.prompt_max + workload.output_max) // block_size) + 1)


# ---- one timed run and its figures -------------------------------------------------------------------------------

@dataclass
class RunResult:
    """One run of N requests: per request (in arrival order) its prompt length, wanted length, token ids (the wanted
    ones only), TTFT and decode tok/s (nan below 2 tokens); per step its batch (sequences in the forward)."""

    wall_s: float
    prompt_lens: list[int]
    wanted: list[int]
    token_ids: list[list[int]]
    ttft_s: list[float]
    decode_tok_s: list[float]
    batch_sizes: list[int]
    generated_tokens: int  # every token generated: transformers goes past a request's length to its batch's longest
    pad_tokens: int = 0  # prompt padding (transformers' left padding)
    preemptions: int | None = None
    cached_tokens: int | None = None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100, linear interpolation) of the finite values; nan when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.percentile(finite, q)) if finite else math.nan


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def run_metrics(run: RunResult) -> dict:
    """The figures of one run (useful output only: each request's wanted tokens)."""
    output, prompt = sum(run.wanted), sum(run.prompt_lens)
    return {"wall_s": run.wall_s, "output_tokens": output, "prompt_tokens": prompt,
            "generated_tokens": run.generated_tokens, "pad_tokens": run.pad_tokens,
            "output_tok_s": output / run.wall_s, "total_tok_s": (output + prompt) / run.wall_s,
            "ttft_mean_s": _mean(run.ttft_s), "ttft_p50_s": percentile(run.ttft_s, 50),
            "ttft_p90_s": percentile(run.ttft_s, 90), "decode_tok_s_mean": _mean(run.decode_tok_s),
            "decode_tok_s_p50": percentile(run.decode_tok_s, 50), "steps": len(run.batch_sizes),
            "mean_batch": _mean(run.batch_sizes) if run.batch_sizes else math.nan,
            "max_batch": max(run.batch_sizes, default=0), "preemptions": run.preemptions,
            "cached_tokens": run.cached_tokens}


def _median(values: list):
    if any(v is None for v in values):
        return None
    return statistics.median(values)


def build_row(fields: dict, n: int, runs: Sequence[RunResult]) -> dict:
    """One row: the engine's and run's fields, the median over the runs of every figure, and the 20/80 % quantiles
    of output tok/s."""
    if not runs:
        raise ValueError("a row needs at least one run")
    metrics = [run_metrics(r) for r in runs]
    row = {**fields, "n_requests": n, "repeats": len(runs)}
    row |= {k: _median([m[k] for m in metrics]) for k in metrics[0]}
    row = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}  # JSON has no NaN
    rates = [m["output_tok_s"] for m in metrics]
    row["output_tok_s_p20"], row["output_tok_s_p80"] = (float(v) for v in np.percentile(rates, [20, 80]))
    return row


def match_fraction(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """The fraction of requests whose token ids are equal in both runs."""
    if len(a) != len(b) or not a:
        raise ValueError(f"runs of {len(a)} and {len(b)} requests")
    return sum(list(x) == list(y) for x, y in zip(a, b, strict=True)) / len(a)


def add_ratios(rows: list[dict]) -> list[dict]:
    """Sets static_ratio (continuous / static output tok/s, the same engine) and hf_ratio (continuous / transformers)
    on every continuous row, from the rows of the same run (date), device and N; None where there is none. Returns
    rows."""
    static = {(r["date"], r["device"], r["engine"], r["n_requests"]): r for r in rows if r["mode"] == "static"}
    hf = {(r["date"], r["device"], r["n_requests"]): r for r in rows if r["engine_kind"] == "transformers"}
    for r in rows:
        if r["mode"] != "continuous":
            continue
        s = static.get((r["date"], r["device"], r["engine"], r["n_requests"]))
        h = hf.get((r["date"], r["device"], r["n_requests"]))
        r["static_ratio"] = r["output_tok_s"] / s["output_tok_s"] if s else None
        r["hf_ratio"] = r["output_tok_s"] / h["output_tok_s"] if h else None
    return rows


def evaluate_targets(rows: list[dict]) -> list[dict]:
    return target_results(rows, TARGETS, lambda r: {"row": f"{r['engine']} N={r['n_requests']}"})


def target_lines(rows: list[dict]) -> list[str]:
    """The target's verdict; on a run without GPU rows, the CPU's ratios at the largest N instead."""
    lines = []
    for res in evaluate_targets(rows):
        line = f"{res['status']:4s} ({res['target']}) {res['text']}"
        if res["worst"]:
            line += (f": {res['misses']} of {res['rows']} rows below {res['threshold']:g}x on "
                     f"{', '.join(res['devices'])}; worst {res['worst']['row']}: {res['worst']['value']:.2f}x")
        else:
            cpu = [r for r in rows if r["mode"] == "continuous" and r.get("static_ratio") is not None]
            top = max((r["n_requests"] for r in cpu), default=None)
            measured = ", ".join(f"{r['engine']} {r['static_ratio']:.2f}x" for r in cpu if r["n_requests"] == top)
            line += ": the target applies to GPUs" + (f"; here ({cpu[0]['device']}, N={top}): {measured}"
                                                      if cpu else "")
        lines.append(line)
    return lines


# ---- engines -----------------------------------------------------------------------------------------------------

class RealmRunner:
    """realm's Engine in one batching mode; each run submits every request at once and steps until all finished."""

    def __init__(self, model, config: EngineConfig, device: torch.device):
        self.engine = Engine(model, config)
        with torch.inference_mode():  # first touch of the cache's pages now, not in a timed run
            self.engine.runner.kv.k.zero_()
            self.engine.runner.kv.v.zero_()
        dtype = str(model.dtype).removeprefix("torch.")
        self.fields = {"engine": f"realm {model.backend.value} {dtype}", "engine_kind": "realm",
                       "backend": model.backend.value, "dtype": dtype, "mode": Batching(config.batching).value,
                       "compute_device": device.type}
        self._runs = 0

    def run(self, requests: Sequence[Request]) -> RunResult:
        engine = self.engine
        salt = f"run {self._runs}"  # no run finds another's blocks in the prefix cache
        self._runs += 1
        before = engine.scheduler.stats
        preemptions0, cached0 = before.preemptions, before.cached_tokens
        batch_sizes = []
        start = time.perf_counter()
        handles = [engine.add_request(list(r.prompt_ids), SamplingParams(max_tokens=r.max_tokens, ignore_eos=True),
                                      salt=salt) for r in requests]
        while engine.has_work:
            finished = engine.step()
            # every sequence of the step is still running or has just finished (a preempted one did not run)
            batch_sizes.append(len(engine.scheduler.running) + len(finished))
        wall = time.perf_counter() - start
        completions = [h.completion for h in handles]
        for r, c in zip(requests, completions, strict=True):
            if c.finish_reason is not FinishReason.LENGTH or len(c.token_ids) != r.max_tokens:
                raise RuntimeError(f"{self.fields['engine']} {self.fields['mode']}: a request wanted {r.max_tokens} "
                                   f"tokens and got {len(c.token_ids)} ({c.finish_reason.value}, {c.error})")
        stats = engine.scheduler.stats
        return RunResult(wall, [len(r.prompt_ids) for r in requests], [r.max_tokens for r in requests],
                         [list(c.token_ids) for c in completions],
                         [c.timings.queue_s + c.timings.prefill_s for c in completions],
                         [c.timings.decode_tokens_per_s for c in completions], batch_sizes,
                         sum(len(c.token_ids) for c in completions), preemptions=stats.preemptions - preemptions0,
                         cached_tokens=stats.cached_tokens - cached0)


class HFRunner:
    """transformers' generate in static batches of up to max_num_seqs requests, left-padded, greedy, each batch run
    to its longest wanted output (min_new_tokens = max_new_tokens: no early end of text)."""

    def __init__(self, model, max_num_seqs: int, device: torch.device, pad_id: int):
        from transformers import LogitsProcessor

        self.model = model
        self.max_num_seqs = max_num_seqs
        self.device = device
        self.pad_id = pad_id
        dtype = str(model.dtype).removeprefix("torch.")
        self.fields = {"engine": f"transformers {dtype}", "engine_kind": "transformers", "backend": "transformers",
                       "dtype": dtype, "mode": "static", "compute_device": device.type,
                       "hf_attention": getattr(model.config, "_attn_implementation", None)}

        class Stamps(LogitsProcessor):
            """The time each step's logits are ready: step i gives the (i + 1)-th new token of every sequence."""

            def __init__(self, sync: bool):
                self.sync = sync
                self.times: list[float] = []

            def __call__(self, input_ids, scores):
                if self.sync:
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter())
                return scores

        self._stamps = Stamps

    def run(self, requests: Sequence[Request]) -> RunResult:
        from transformers import LogitsProcessorList

        n = len(requests)
        token_ids: list[list[int]] = []
        ttft, decode, batch_sizes = [], [], []
        generated = pad = 0
        start = time.perf_counter()
        for first in range(0, n, self.max_num_seqs):
            wave = requests[first : first + self.max_num_seqs]
            width = max(len(r.prompt_ids) for r in wave)
            longest = max(r.max_tokens for r in wave)
            ids = torch.tensor([[self.pad_id] * (width - len(r.prompt_ids)) + list(r.prompt_ids) for r in wave],
                               device=self.device)
            mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in wave],
                                device=self.device)
            stamps = self._stamps(self.device.type == "cuda")
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest,
                                          min_new_tokens=longest, do_sample=False, pad_token_id=self.pad_id,
                                          logits_processor=LogitsProcessorList([stamps]))
            new = out[:, width:].tolist()
            if len(stamps.times) != longest or any(len(t) != longest for t in new):
                raise RuntimeError(f"transformers generated {len(new[0])} tokens in {len(stamps.times)} steps, "
                                   f"not {longest}")
            t = stamps.times
            for r, got in zip(wave, new, strict=True):
                token_ids.append(got[: r.max_tokens])
                ttft.append(t[0] - start)
                decode.append((r.max_tokens - 1) / (t[r.max_tokens - 1] - t[0]) if r.max_tokens > 1 else math.nan)
            batch_sizes += [len(wave)] * longest
            generated += len(wave) * longest
            pad += sum(width - len(r.prompt_ids) for r in wave)
        wall = time.perf_counter() - start
        return RunResult(wall, [len(r.prompt_ids) for r in requests], [r.max_tokens for r in requests], token_ids,
                         ttft, decode, batch_sizes, generated, pad_tokens=pad)


def load_realm(path: Path, device: torch.device, backend: str):
    """realm.load in the backend's default dtype; a function of its own so tests can give a tiny model instead."""
    return realm.load(path, device=device, backend=backend)


def load_hf(path: Path, device: torch.device, dtype: torch.dtype):
    """The same GGUF loaded (dequantized) by transformers, offline; a function of its own so tests can stub it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GGUF is local; nothing may be downloaded
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.to(device).eval()


def hf_note(skip: bool) -> str | None:
    """Why transformers is not measured, or None when it is."""
    if skip:
        return "transformers: not measured (--no-hf)"
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        return f"transformers: not measured, it is not importable ({e})"
    return None


def hf_pad_id(model) -> int:
    """The pad id transformers' generation config names (any id would do: the attention mask hides the padding)."""
    config = model.generation_config
    for value in (config.pad_token_id, config.eos_token_id):
        if isinstance(value, int):
            return value
        if isinstance(value, list) and value:
            return value[0]
    return 0


def other_busy_cpus(seconds: float = 0.5) -> float | None:
    """CPUs kept busy by other processes over the next `seconds` (0: a quiet machine; 2: both cores of a 2-core one),
    from /proc/stat less this process's own time; None where /proc/stat is missing."""
    def sample() -> tuple[float, float]:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
        own = os.times()
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system

    try:
        before = sample()
        time.sleep(seconds)
        after = sample()
    except (OSError, ValueError):
        return None
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / seconds


def crowded_cpu(threads: int, busy: float | None, cpus: int) -> str | None:
    """A warning when other processes keep busy cores that torch's threads need: its threads then wait on each other
    at every op (measured on 2 cores beside one busy process: a decode step 1.4 s with 2 threads, 0.05 s with 1)."""
    free = max(1, cpus - round(busy or 0.0))
    if threads <= free:
        return None
    return (f"warning: other processes keep {busy:.1f} of {cpus} cores busy and torch has {threads} threads: the "
            f"timings will be far off; use --threads {free} or a quiet machine")


# ---- measurement -------------------------------------------------------------------------------------------------

@dataclass
class Measured:
    runner: object
    runs: dict[int, list[RunResult]] = field(default_factory=dict)  # N -> its runs


def measure(runners: Sequence, workload: Workload, vocab_size: int, ns: Sequence[int], repeats: int, warmup: int,
            log: Callable[[str], None] = print) -> list[dict]:
    """Warm-up runs of every runner, then per N the repeats interleaved across runners. Returns the rows (no
    environment fields yet)."""
    pool = workload.requests(max(ns), vocab_size)
    warm = [Request(r.prompt_ids, min(r.max_tokens, WARMUP_TOKENS)) for r in pool[:2]]
    for runner in runners:
        for _ in range(warmup):
            runner.run(warm)
    measured = [Measured(r) for r in runners]
    for n in ns:
        for _ in range(repeats):
            for m in measured:
                run = m.runner.run(pool[:n])
                m.runs.setdefault(n, []).append(run)
                f = m.runner.fields
                log(f"{f['engine']:22s} {f['mode']:10s} N={n:<4d} {run.wall_s:8.2f} s  "
                    f"{sum(run.wanted) / run.wall_s:8.1f} output tok/s  TTFT p50 {percentile(run.ttft_s, 50):7.2f} s"
                    f"  {len(run.batch_sizes)} steps")
    rows = []
    for n in ns:
        first = {(m.runner.fields["engine"], m.runner.fields["mode"]): m.runs[n][0].token_ids for m in measured}
        reference = next((ids for (engine, mode), ids in first.items() if engine.startswith("realm")
                          and mode == "continuous"), None)
        for m in measured:
            f = m.runner.fields
            row = build_row({**f, **workload.fields()}, n, m.runs[n])
            if f["engine_kind"] == "realm" and f["mode"] == "continuous" and (f["engine"], "static") in first:
                row["static_match"] = match_fraction(m.runs[n][0].token_ids, first[(f["engine"], "static")])
            if f["engine_kind"] == "transformers" and reference is not None:
                row["realm_match"] = match_fraction(m.runs[n][0].token_ids, reference)
            rows.append(row)
    return rows


# ---- plot and report ---------------------------------------------------------------------------------------------

def _label(r: dict, several_devices: bool) -> str:
    name = r["engine"] if r["engine_kind"] == "transformers" else f"{r['engine']} {r['mode']}"
    return f"{name} on {r['device']}" if several_devices else name


def plot(rows: list[dict], path: Path) -> Path:
    """throughput.png from the latest row per key: output tok/s against N, one line per engine and mode (error bars:
    20/80 % over the repeats); continuous / static and continuous / transformers against N, with the GPU target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = latest(rows, KEY)
    several = len({r["device"] for r in rows}) > 1
    names = list(dict.fromkeys(_label(r, several) for r in rows))
    engines = list(dict.fromkeys((r["engine"], r["device"]) for r in rows))
    colour = {e: f"C{i}" for i, e in enumerate(engines)}  # one colour per engine: continuous solid, static dashed
    ns = sorted({r["n_requests"] for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for name in names:
        pts = sorted((r for r in rows if _label(r, several) == name), key=lambda r: r["n_requests"])
        r0 = pts[0]
        c = colour[(r0["engine"], r0["device"])]
        style = "-" if r0["mode"] == "continuous" else ("--" if r0["engine_kind"] == "realm" else ":")
        med = [r["output_tok_s"] for r in pts]
        err = [[r["output_tok_s"] - r.get("output_tok_s_p20", r["output_tok_s"]) for r in pts],
               [r.get("output_tok_s_p80", r["output_tok_s"]) - r["output_tok_s"] for r in pts]]
        left.errorbar([r["n_requests"] for r in pts], med, yerr=err, color=c, ls=style, marker="o", ms=4, capsize=3,
                      label=name)
        if r0["mode"] == "continuous":
            for key, ls, what in (("static_ratio", "-", "/ static"), ("hf_ratio", ":", "/ transformers")):
                got = [r for r in pts if r.get(key) is not None]
                if got:
                    right.plot([r["n_requests"] for r in got], [r[key] for r in got], color=c, ls=ls, marker="o",
                               ms=4, label=f"{name} {what}")
    right.axhline(TARGET_RATIO, color="tab:red", lw=0.8, ls="--",
                  label=f"target {TARGET_RATIO:g}x at N={TARGET_REQUESTS} (GPU)")
    right.axhline(1.0, color="0.5", lw=0.8)
    for ax, ylabel, title in ((left, "output tokens / s", "output tok/s (all N requests submitted at once)"),
                              (right, "ratio of output tok/s", "continuous batching's speed-up")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set(xlabel="concurrent requests N", ylabel=ylabel, title=title, ylim=(0, None))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    r0 = max(rows, key=lambda r: r["date"])
    devices = ", ".join(sorted({r["device"] for r in rows}))
    title = (f"realm serving throughput, {r0.get('model', '?')}: {devices}; latest {r0['git_commit']} "
             f"{r0['date'][:10]}\nprompts {r0['prompt_dist']}, outputs {r0['output_dist']}; max_num_seqs "
             f"{r0['max_num_seqs']}, max_batch_tokens {r0['max_batch_tokens']}, {r0.get('threads')} threads")
    return save_figure(fig, path, title, fontsize=9)


TABLE = [("engine", None), ("mode", None), ("n_requests", None), ("wall_s", ".1f"), ("output_tokens", None),
         ("output_tok_s", ".1f"), ("total_tok_s", ".1f"), ("ttft_p50_s", ".2f"), ("ttft_p90_s", ".2f"),
         ("decode_tok_s_p50", ".1f"), ("steps", None), ("mean_batch", ".1f"), ("preemptions", None),
         ("static_ratio", ".2f"), ("hf_ratio", ".2f"), ("static_match", ".2f"), ("realm_match", ".2f")]


def print_summary(rows: list[dict]) -> None:
    """The table, then the target's verdict."""
    if not rows:
        print("no rows")
        return
    r0 = rows[0]
    print(f"\n{r0['device']}, {r0.get('threads')} threads, torch {r0['torch']}, transformers "
          f"{r0.get('transformers')}, {r0.get('model')}, {r0['git_commit']}, {r0['date']}")
    print(f"prompts {r0['prompt_dist']}, outputs {r0['output_dist']}; max_num_seqs {r0['max_num_seqs']}, "
          f"max_batch_tokens {r0['max_batch_tokens']}, {r0['kv_blocks']} KV blocks of {r0['block_size']}")
    print_table(rows, TABLE)
    print()
    for line in target_lines(rows):
        print(line)


# ---- command line ------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a packaged model name or a .gguf path (default smollm2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where realm and transformers run")
    p.add_argument("--backends", type=comma_list("backends", BACKENDS),
                   help="realm backends, comma separated (default torch on cpu, torch,triton on cuda; triton: cuda)")
    p.add_argument("--requests", nargs="+", type=positive_int, help=f"values of N, concurrent requests (default "
                   f"{' '.join(map(str, REQUESTS))}; --quick {' '.join(map(str, QUICK['requests']))})")
    p.add_argument("--max-num-seqs", type=positive_int, help=f"sequences per batch, both engines (default "
                   f"{MAX_NUM_SEQS}; --quick {QUICK['max_num_seqs']})")
    p.add_argument("--max-batch-tokens", type=positive_int, help=f"tokens per step (default the engine's, "
                   f"{EngineConfig().max_batch_tokens})")
    p.add_argument("--kv-blocks", type=positive_int, help="KV cache blocks (default: max-num-seqs sequences of the "
                   "longest prompt and output, plus one block each)")
    p.add_argument("--block-size", type=positive_int, default=BLOCK_SIZE, help=f"tokens per KV block (default "
                   f"{BLOCK_SIZE})")
    p.add_argument("--prompt-lens", nargs=2, type=positive_int, metavar=("MIN", "MAX"),
                   help="prompt lengths, uniform (default 16 256; --quick 16 64)")
    p.add_argument("--output-lens", nargs=2, type=positive_int, metavar=("MIN", "MAX"),
                   help="wanted output lengths are clipped to these (default 8 256; --quick 4 32)")
    p.add_argument("--output-median", type=float, help="median of the lognormal output lengths (default 32; --quick 8)")
    p.add_argument("--output-sigma", type=float, default=1.0, help="log-sigma of the output lengths (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="the workload's seed (default 0)")
    p.add_argument("--repeats", type=positive_int, default=1, help="timed runs per engine, mode and N, interleaved "
                   "(default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed short runs per engine and mode first (default 1)")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="torch CPU threads (default "
                   "os.cpu_count())")
    p.add_argument("--no-hf", action="store_true", help="do not measure transformers")
    p.add_argument("--out", type=Path, default=JSONL, help="JSONL to append to; the PNG goes next to it")
    p.add_argument("--quick", action="store_true", help="N 1 8, --max-num-seqs 4, prompts 16..64, outputs median 8 "
                   "clipped 4..32 (explicit options still win)")
    p.add_argument("--plot-only", action="store_true", help="plot, table and target from --out; measures nothing")
    return p


def resolve(args: argparse.Namespace, p: argparse.ArgumentParser) -> tuple[torch.device, Workload]:
    """Fills the unset options (--quick's or the defaults), checks them; returns the device and the workload."""
    quick = args.quick
    args.requests = sorted(set(args.requests or (QUICK["requests"] if quick else REQUESTS)))
    args.max_num_seqs = args.max_num_seqs or (QUICK["max_num_seqs"] if quick else MAX_NUM_SEQS)
    prompt_lens = args.prompt_lens or (QUICK["prompt_lens"] if quick else (16, 256))
    output_lens = args.output_lens or (QUICK["output_lens"] if quick else (8, 256))
    median = args.output_median if args.output_median is not None else (QUICK["output_median"] if quick else 32.0)
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    try:
        workload = Workload(args.seed, *prompt_lens, *output_lens, median, args.output_sigma)
    except ValueError as e:
        p.error(str(e))
    args.max_batch_tokens = args.max_batch_tokens or EngineConfig().max_batch_tokens
    args.kv_blocks = args.kv_blocks or default_kv_blocks(args.max_num_seqs, workload, args.block_size)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    args.backends = args.backends or (["torch", "triton"] if args.device == "cuda" else ["torch"])
    if "triton" in args.backends and args.device != "cuda":
        p.error("--backends triton needs --device cuda: on CPU Triton's interpreter runs the kernels, which checks "
                "them but measures nothing worth comparing")
    return torch.device(args.device), workload


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.plot_only:
        replot(args.out, KEY, p, plot, print_summary)
        return
    device, workload = resolve(args, p)
    path = resolve_model(args.model)
    torch.set_num_threads(args.threads)
    busy = other_busy_cpus()
    if device.type == "cpu" and (warning := crowded_cpu(args.threads, busy, os.cpu_count() or 1)):
        print(warning, flush=True)
    start = time.perf_counter()
    note = hf_note(args.no_hf)
    if note:
        print(note, flush=True)
    models = [load_realm(path, device, b) for b in args.backends]
    settings = {"max_num_seqs": args.max_num_seqs, "max_batch_tokens": args.max_batch_tokens,
                "kv_blocks": args.kv_blocks, "block_size": args.block_size, "prefix_caching": True}
    runners: list = [RealmRunner(m, EngineConfig(max_batch_tokens=args.max_batch_tokens,
                                                 max_num_seqs=args.max_num_seqs, kv_blocks=args.kv_blocks,
                                                 block_size=args.block_size, batching=mode), device)
                     for m in models for mode in MODES]
    hf_version = None
    if note is None:
        import transformers

        hf_version = transformers.__version__
        hf = load_hf(path, device, torch.float32 if device.type == "cpu" else torch.float16)
        runners.append(HFRunner(hf, args.max_num_seqs, device, hf_pad_id(hf)))
    env = {**environment(), "transformers": hf_version, "model": path.name, "threads": args.threads,
           "warmup": args.warmup, "note": note, "other_busy_cpus": busy, **settings,
           "device": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
           "device_kind": device.type}
    print(f"{env['device']}: {args.threads} threads; N {' '.join(map(str, args.requests))}; prompts "
          f"{workload.fields()['prompt_dist']}, outputs {workload.fields()['output_dist']}; max_num_seqs "
          f"{args.max_num_seqs}, max_batch_tokens {args.max_batch_tokens}, {args.kv_blocks} KV blocks of "
          f"{args.block_size}; {args.repeats} repeats, {args.warmup} warm-up; load {time.perf_counter() - start:.0f} s",
          flush=True)
    rows = measure(runners, workload, models[0].tokenizer.vocab_size, args.requests, args.repeats, args.warmup,
                   log=lambda line: print(line, flush=True))
    busy_end = other_busy_cpus()
    rows = add_ratios([{**env, **r, "other_busy_cpus_end": busy_end} for r in rows])
    append_jsonl(args.out, rows, env={})
    png = plot(read_jsonl(args.out), args.out.with_suffix(".png"))
    print(f"wrote {shown(args.out)} and {shown(png)} in {time.perf_counter() - start:.0f} s")
    print_summary(rows)


if __name__ == "__main__":
    main()
