"""Where n-gram speculation's time goes at batch 1: realm's proposer and controller replayed on plain decoding's
outputs, each step priced from a measured table of the model's step time by its rows, with the verification rows'
cost as measured, cheaper, or free, and with an oracle's k.

Why: bench/speculative.py measures what speculation gains; this says what would gain more. A faster kernel helps
speculation only where it makes a verification's extra rows cheaper than a decode, and a better controller only
where it wastes fewer rows; the replay prices both before anyone writes them.

What it does, on the grounded workload of bench/speculative.py (the same prompts, engine settings and greedy
decoding):
1. runs plain decoding and adaptive n-gram speculation once each, through the engine: the outputs (greedy
   speculation emits the same tokens), the prefill's and decoding's times, and the measured speculative row the
   replay is checked against;
2. measures the step time of one sequence verifying 0 .. k proposals (1 .. k + 1 rows, logits on each) at the
   prompts' mean length plus half of --max-tokens, through the model runner alone: --repeats rounds over the row
   counts in turn (the machine's drift reaches every count alike), medians, and the spread (relative standard
   deviation, averaged over the counts) as the replay's noise;
3. replays every prompt's output step by step: the engine's PromptLookup proposes, a policy picks k, the accepted run
   is the proposal's common prefix with the output, and the step costs the table's time at 1 + k rows, scaled so
   that the rows beyond the first cost `row_cost` times their measured extra (1: as measured; 0: a verification
   costs a decode), times (1 + noise x a seeded normal draw). Policies: `adaptive` (the engine's
   SpeculationController, fed each step's time as the engine feeds it), `fixed` (every step verifies all the match
   proposes, up to k: prompt lookup's ceiling in steps), `oracle` (verifies exactly the run that will be accepted:
   the best any choice of k can do with these proposals). Every policy runs twice: with PromptLookup's lockstep
   proposals (the engine's default) and with n-grams only (`lockstep` false).
Speedups: decode_speedup = plain's decoding priced by the table (a decode per token) over the replay's, the mean of
--seeds replays; speedup = the measured plain run's time over its prefill plus its decoding divided by
decode_speedup: the prefill is the same in every mode and speculation cannot shorten it.

What it leaves out: the context grows along each output while the table is measured at one length, and the engine's
own time per step (scheduling, proposing, sampling) is folded into neither; the row `measured` (the engine's
adaptive run) against the replay's adaptive row at row_cost 1 says how far that takes it.

Rows (bench/results/speculative_replay.jsonl, via harness: device, versions, commit, date): model, backend, threads,
context, max_tokens, k_max, step_ms (the table: rows -> ms), noise, prefill_s and decode_s (the plain run's),
decode_tokens, then per (lockstep, policy, row_cost): steps, proposed, accepted, decode_speedup, speedup; and one row
of policy `measured` (the engine's adaptive n-gram run: its steps, proposals, decode_speedup and speedup against the
plain run). speculative_replay.png: the step time by rows, and the speedup against row_cost per policy (dashed: n-grams
only) with the measured run and bench/speculative.py's 1.8x target.

    python bench/speculative_replay.py               # SmolLM2, onednn float32 on the CPU (prints its run time)
    python bench/speculative_replay.py --plot-only
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from harness import (
    RESULTS,
    cpu_name,
    environment,
    positive_int,
    print_table,
    record,
    replot,
    save_figure,
    torch_threads,
)
from speculative import (
    BLOCK_SIZE,
    MAX_TOKENS,
    TARGET_SPEEDUP,
    ModeRunner,
    Prompt,
    kv_blocks,
    load_model,
    mode_of,
    workload_prompts,
)

from realm.models import resolve_model
from realm.runtime.engine import EngineConfig
from realm.runtime.plan import ChunkPlan, StepPlan
from realm.runtime.runner import ModelRunner
from realm.runtime.sampler import RowSampling
from realm.runtime.speculative import (
    MAX_SPECULATIVE_TOKENS,
    Candidate,
    PromptLookup,
    SpeculationController,
    SpeculativeConfig,
)

JSONL = RESULTS / "speculative_replay.jsonl"
POLICIES = ("adaptive", "fixed", "oracle")
ROW_COSTS = (1.0, 0.75, 0.5, 0.25, 0.0)
KEY = ("device", "backend", "model", "lockstep", "policy", "row_cost")
SETUP = ("device", "backend", "model")


# ---- the replay --------------------------------------------------------------------------------------------------

def accepted_run(proposal: Sequence[int], output: Sequence[int], at: int) -> int:
    """How many of the proposal greedy verification accepts: its common prefix with the output from `at` (at most
    what is left of the output)."""
    left = len(output) - at
    return next((i for i, (a, b) in enumerate(zip(proposal, output[at:], strict=False)) if a != b),
                min(len(proposal), left))


@dataclass
class Replay:
    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    seconds: float = 0.0


def step_price(step_s: dict[int, float], row_cost: float) -> Callable[[int], float]:
    """A step's seconds by its rows: the decode's, plus row_cost times the measured extra of the rows beyond it."""
    decode = step_s[1]
    return lambda rows: decode + row_cost * (step_s[rows] - decode)


def replay(prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], policy: str,
           price: Callable[[int], float], noise: float, seed: int, k_max: int, max_tokens: int,
           spec: SpeculativeConfig) -> Replay:
    """One replay of every (prompt, output) in turn at batch 1 (see the module docstring). Steps count as the
    engine's do: the prefill's (the output's first token, not priced: the prefill is the same in every mode), then
    one per verification or decode, each yielding the accepted run and one token more."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    rng, controller, out = random.Random(seed), SpeculationController(), Replay()
    for seq_id, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        lookup = PromptLookup(spec.ngram_min, spec.ngram_max, spec.ngram_lockstep)
        context, at = [*prompt, *output[:1]], 1
        out.steps += bool(output)
        while at < len(output):
            max_k = min(k_max, max_tokens - at - 1)  # the engine's bound: what max_tokens leaves after the bonus
            proposal, kind = lookup.propose(context, max_k) if max_k > 0 else ([], 0)
            run = accepted_run(proposal, output, at)
            if not proposal:
                k = 0
            elif policy == "adaptive":
                k = controller.choose([Candidate(seq_id, len(proposal), kind)], 1, 1).get(seq_id, 0)
            else:
                k = len(proposal) if policy == "fixed" else run
            accepted = min(run, k)
            if k:
                controller.observe_verification(seq_id, k, accepted, kind)
            seconds = price(1 + k) * (1.0 + noise * rng.gauss(0.0, 1.0))
            controller.observe_step(1 + k, seconds)
            out.steps, out.proposed, out.accepted = out.steps + 1, out.proposed + k, out.accepted + accepted
            out.seconds += seconds
            context += output[at : at + accepted + 1]
            at += accepted + 1
        controller.forget(seq_id)
    return out


def overall_speedup(prefill_s: float, decode_s: float, decode_speedup: float) -> float:
    """The run's speedup when only its decoding gets decode_speedup faster."""
    return (prefill_s + decode_s) / (prefill_s + decode_s / decode_speedup)


def replay_rows(prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], step_s: dict[int, float],
                noise: float, seeds: int, k_max: int, max_tokens: int, prefill_s: float, decode_s: float,
                row_costs: Sequence[float] = ROW_COSTS) -> list[dict]:
    """A row per (lockstep, policy, row_cost): the mean of `seeds` replays; lockstep on is the engine's default."""
    decode_tokens = sum(max(len(o) - 1, 0) for o in outputs)
    plain = decode_tokens * step_s[1]
    rows = []
    for lockstep in (True, False):
        spec = SpeculativeConfig("ngram", ngram_lockstep=lockstep)
        for policy in POLICIES:
            for row_cost in row_costs:
                runs = [replay(prompts, outputs, policy, step_price(step_s, row_cost), noise, seed, k_max, max_tokens,
                               spec) for seed in range(seeds)]
                decode_speedup = plain / statistics.fmean(r.seconds for r in runs)
                rows.append({"lockstep": lockstep, "policy": policy, "row_cost": row_cost,
                             "steps": statistics.fmean(r.steps for r in runs),
                             "proposed": statistics.fmean(r.proposed for r in runs),
                             "accepted": statistics.fmean(r.accepted for r in runs), "decode_speedup": decode_speedup,
                             "speedup": overall_speedup(prefill_s, decode_s, decode_speedup)})
    return rows


# ---- measurements ------------------------------------------------------------------------------------------------

def step_table(model, context: int, max_rows: int, repeats: int) -> tuple[dict[int, float], float]:
    """Seconds of a step of one sequence verifying rows - 1 proposals (logits on every row) at `context` tokens
    cached, for rows 1 .. max_rows: medians over `repeats` rounds, each round every count once in turn. Returns the
    table and the mean relative standard deviation."""
    size = context + max_rows
    blocks = -(-size // BLOCK_SIZE)
    runner = ModelRunner(model.transformer, blocks, BLOCK_SIZE, model.tokenizer.vocab_size)
    tokens = torch.randint(0, model.tokenizer.vocab_size, (size,), generator=torch.Generator().manual_seed(0)).tolist()
    table = tuple(range(blocks))
    runner.execute(StepPlan(BLOCK_SIZE, (ChunkPlan(0, 0, tuple(tokens[:context]), table, logits=(context - 1,),
                                                   sampling=RowSampling()),)))

    def plan(rows: int) -> StepPlan:
        return StepPlan(BLOCK_SIZE, (ChunkPlan(0, context, tuple(tokens[context : context + rows]), table,
                                               logits=tuple(range(rows)), sampling=RowSampling(position=context + rows),
                                               num_draft=rows - 1),))

    plans = {rows: plan(rows) for rows in range(1, max_rows + 1)}
    for p in plans.values():  # first touches, the kernels' builds
        runner.execute(p)
    times: dict[int, list[float]] = {rows: [] for rows in plans}
    for _ in range(repeats):
        for rows, p in plans.items():
            began = time.perf_counter()
            runner.execute(p)
            times[rows].append(time.perf_counter() - began)
    medians = {rows: statistics.median(t) for rows, t in times.items()}
    spread = statistics.fmean(statistics.pstdev(t) / medians[rows] for rows, t in times.items())
    return medians, spread


@dataclass
class EngineRuns:
    outputs: list[list[int]]
    prefill_s: float  # the plain run's time to first tokens
    decode_s: float  # and after them
    measured: dict  # the adaptive n-gram run's row


def engine_runs(model, prompts: Sequence[Prompt], max_tokens: int, k: int, device: torch.device) -> EngineRuns:
    """Plain decoding and adaptive n-gram speculation over the prompts at batch 1, as bench/speculative.py runs them
    (after a warm-up of each)."""
    config = EngineConfig(max_num_seqs=2, kv_blocks=kv_blocks({"grounded": list(prompts)}, 2, max_tokens, k),
                          block_size=BLOCK_SIZE)
    plain, ngram = (ModeRunner(model, mode_of(m), config, k, device) for m in ("plain", "ngram"))
    for runner in (plain, ngram):
        runner.run(list(prompts[:2]), 2, 8)
    base, spec = plain.run(prompts, 1, max_tokens), ngram.run(prompts, 1, max_tokens)
    if spec.token_ids != base.token_ids:
        raise RuntimeError("adaptive n-gram speculation's output differs from plain decoding's: the replay of plain's "
                           "outputs would not be speculation's")
    decode_speedup = (spec.decode_tokens / spec.decode_s) / (base.decode_tokens / base.decode_s)
    measured = {"lockstep": True, "policy": "measured", "row_cost": None, "steps": spec.steps,
                "proposed": spec.proposed, "accepted": spec.accepted, "decode_speedup": decode_speedup,
                "speedup": base.wall_s / spec.wall_s}
    return EngineRuns(base.token_ids, base.wall_s - base.decode_s, base.decode_s, measured)


# ---- figures -----------------------------------------------------------------------------------------------------

def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = same_run(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    table = {int(r): ms for r, ms in rows[0]["step_ms"].items()}
    left.plot(list(table), list(table.values()), "o-")
    left.set(xlabel="rows in the step (1 + proposals)", ylabel="ms per step",
             title=f"step time at {rows[0]['context']} tokens of context")
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    for policy, color in zip(POLICIES, ("C0", "C1", "C2"), strict=True):
        for lockstep, style in ((True, "o-"), (False, "x--")):
            mine = sorted((r for r in rows if r["policy"] == policy and r.get("lockstep") is lockstep),
                          key=lambda r: r["row_cost"])
            right.plot([r["row_cost"] for r in mine], [r["speedup"] for r in mine], style, color=color,
                       label=f"replay: {policy}" + ("" if lockstep else ", n-grams only (no lockstep)"))
    for r in rows:
        if r["policy"] == "measured":
            right.plot([1.0], [r["speedup"]], "k*", markersize=12, label="measured (engine, adaptive)")
    right.axhline(TARGET_SPEEDUP, color="red", linestyle="--", linewidth=1, label=f"target {TARGET_SPEEDUP:g}x")
    right.set(xlabel="cost of a verification's extra rows (1: as measured, 0: free)",
              ylabel="speedup over plain (prefill included)", title="n-gram speculation, grounded work, batch 1")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    r0 = rows[0]
    return save_figure(fig, path, f"realm speculative replay: {r0['model']} ({r0['backend']}), {r0['device']}; "
                                  f"{r0['git_commit']} {r0['date'][:10]}")


def same_run(rows: list[dict]) -> list[dict]:
    """The rows of the latest run (one date per run): older runs' rows, of fewer fields, are not drawn with them."""
    last = max(r["date"] for r in rows)
    return [r for r in rows if r["date"] == last]


def summary(rows: list[dict]) -> None:
    order = ("measured", *POLICIES)
    rows = sorted(same_run(rows), key=lambda r: (not r.get("lockstep"), order.index(r["policy"]),
                                                 -(r["row_cost"] if r["row_cost"] is not None else 1)))
    print_table(rows, ["lockstep", "policy", ("row_cost", ".2f"), ("steps", ".1f"), ("proposed", ".0f"),
                       ("accepted", ".0f"), ("decode_speedup", ".3f"), ("speedup", ".3f")])
    r0 = rows[0]
    print(f"prefill {r0['prefill_s']:.2f} s and decoding {r0['decode_s']:.2f} s of the plain run; step noise "
          f"{r0['noise']:.1%}; step ms by rows: "
          + ", ".join(f"{r}: {ms:.1f}" for r, ms in r0["step_ms"].items()))


# ---- command line ------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a packaged model name or a .gguf path (default smollm2)")
    p.add_argument("--backend", choices=("torch", "onednn"), default="onednn", help="CPU backend (default onednn)")
    p.add_argument("--prompts", type=positive_int, help="the first this many grounded prompts (default all)")
    p.add_argument("--max-tokens", type=positive_int, default=MAX_TOKENS, help=f"default {MAX_TOKENS}")
    p.add_argument("--k", type=positive_int, default=MAX_SPECULATIVE_TOKENS,
                   help=f"proposals per step at most (default {MAX_SPECULATIVE_TOKENS})")
    p.add_argument("--repeats", type=positive_int, default=15, help="rounds of the step table (default 15)")
    p.add_argument("--seeds", type=positive_int, default=3, help="replays per policy and cost (default 3)")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="torch CPU threads (default all)")
    p.add_argument("--out", type=Path, default=JSONL, help="JSONL to append to; the PNG goes next to it")
    p.add_argument("--plot-only", action="store_true", help="plot and table from --out; measures nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.plot_only:
        return replot(args.out, KEY, p, plot, summary, SETUP)
    if args.k > MAX_SPECULATIVE_TOKENS:
        p.error(f"--k must be <= {MAX_SPECULATIVE_TOKENS} (the verification tile), got {args.k}")
    if args.max_tokens < 2:
        p.error(f"--max-tokens must be >= 2 (the first token is the prefill's: nothing to replay), "
                f"got {args.max_tokens}")
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    path = resolve_model(args.model)
    device = torch.device("cpu")
    model = load_model(path, device, args.backend)
    prompts = workload_prompts(model, "grounded")[: args.prompts]
    with torch.inference_mode():
        runs = engine_runs(model, prompts, args.max_tokens, args.k, device)
        context = round(statistics.fmean(len(p.ids) for p in prompts) + args.max_tokens / 2)
        step_s, noise = step_table(model, context, args.k + 1, args.repeats)
    rows = replay_rows([p.ids for p in prompts], runs.outputs, step_s, noise, args.seeds, args.k, args.max_tokens,
                       runs.prefill_s, runs.decode_s)
    rows.append(runs.measured)
    env = {**environment(), "device": cpu_name(), "device_kind": "cpu", "model": path.name,
           "backend": model.backend.value, "threads": args.threads, "context": context, "max_tokens": args.max_tokens,
           "k_max": args.k, "prompts": len(prompts), "repeats": args.repeats, "seeds": args.seeds,
           "step_ms": {rows: s * 1e3 for rows, s in step_s.items()}, "noise": noise, "prefill_s": runs.prefill_s,
           "decode_s": runs.decode_s, "decode_tokens": sum(max(len(o) - 1, 0) for o in runs.outputs)}
    status = record(args.out, rows, env, plot, summary)
    print(f"in {time.perf_counter() - start:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
