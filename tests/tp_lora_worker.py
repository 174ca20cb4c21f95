"""The rank processes of tests/test_tensor_parallel_lora.py (a module of its own: spawned processes import it by
name), and the runs they share with the one-process reference."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch
import torch.distributed as dist

from realm.lora import LoraAdapter, Target
from realm.runtime.plan import ChunkPlan, StepPlan
from realm.runtime.runner import ModelRunner

PROMPTS = [[1, 2, 3, 1, 2, 3, 1, 2], [7, 8, 9], [4, 5, 6, 4, 5, 6, 4], [10, 11], [3, 1, 4, 1, 5], [9, 2, 6]]
ADAPTERS = [None, "a", "b", "a", None, "b"]  # per prompt: rows with either adapter and without one, in every step
BLOCKS = 64
BLOCK_SIZE = 16
MAX_TOKENS = 10
DECODE_STEPS = 3


def tiny_adapters(config) -> dict[str, LoraAdapter]:
    """Two adapters of the whole tiny model: `a` on every target (rank 8), `b` on attention only with its own ranks
    per target (K rank 2): the pool pads them to one rank."""
    from test_lora_runtime import random_adapter

    return {"a": random_adapter(config, "a", rank=8, seed=1),
            "b": random_adapter(config, "b", rank=4, targets=(Target.Q, Target.K, Target.V, Target.O), seed=2,
                                ranks={Target.K: 2})}


def engine_tokens(model, prompts, adapters, broadcast: bool = False) -> list[list[int]]:
    """Greedy completions of the prompts, each with its adapter (None: the base model), batched by realm.LLM over
    `model` (its adapters already loaded). broadcast: rank 0 of a group (its plans sent to the other ranks, then
    STOP)."""
    import realm
    from realm.parallel.tensor_parallel import PlanBroadcast
    from realm.runtime import SamplingParams

    llm = realm.LLM(model, kv_blocks=BLOCKS, block_size=BLOCK_SIZE, max_num_seqs=len(prompts))
    sender = PlanBroadcast(llm.engine.runner, loras=model.loras) if broadcast else None
    outs = llm.generate(prompts, [SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, adapter=a)
                                  for a in adapters])
    if sender is not None:
        sender.stop()
    return [o.token_ids for o in outs]


def plan_logits(model, prompts, adapters, broadcast: bool = False) -> list[torch.Tensor]:
    """Every position's logits of the prompts in one step (one chunk per prompt, with its adapter's slot), then
    DECODE_STEPS greedy steps' logits, run by a ModelRunner (wrapped by PlanBroadcast on rank 0 of a group)."""
    from realm.parallel.tensor_parallel import PlanBroadcast

    runner = ModelRunner(model.transformer, BLOCKS, BLOCK_SIZE, lora_slots=model.loras.max_loras)
    sender = PlanBroadcast(runner, loras=model.loras) if broadcast else None
    blocks = [(2 * i, 2 * i + 1) for i in range(len(prompts))]
    out = []
    with model.loras.lock:  # the slots stay as planned until the forward has run (what the engine does)
        slots = model.loras.activate(a for a in adapters if a is not None)
        lora = [slots.get(a, -1) for a in adapters]
        chunks = tuple(ChunkPlan(i, 0, tuple(p), blocks[i], tuple(range(len(p))), adapter=lora[i])
                       for i, p in enumerate(prompts))
        logits = runner.execute(StepPlan(BLOCK_SIZE, chunks, return_logits=True)).logits
        out.append(logits)
        ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
        last, lengths = logits[ends], [len(p) for p in prompts]
        for _ in range(DECODE_STEPS):
            nxt = last.argmax(-1).tolist()
            chunks = tuple(ChunkPlan(i, lengths[i], (nxt[i],), blocks[i], (0,), adapter=lora[i])
                           for i in range(len(prompts)))
            last = runner.execute(StepPlan(BLOCK_SIZE, chunks, return_logits=True)).logits
            out.append(last)
            lengths = [n + 1 for n in lengths]
    if sender is not None:
        sender.stop()
    return out


def run_rank(rank: int, world: int, port: int, model: str, adapters: str, backend: str, out_dir: str) -> None:
    """Rank 0 loads the adapters (`tiny`: tiny_adapters of the model; else packaged names "a=pirate,b=robot"), runs
    plan_logits and then realm.LLM over the group, and writes both; the other ranks load no adapter: they follow the
    plans, receiving the adapters from rank 0."""
    from realm.parallel.tensor_parallel import follow_plans, load_tensor_parallel
    from realm.runtime.weights import load_weights

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        m = load_tensor_parallel(model, rank, world, backend)
        if rank:
            for _ in range(2):  # plan_logits, then the engine
                follow_plans(m, BLOCKS, BLOCK_SIZE)
            return
        for name, source in named_adapters(adapters, load_weights(model).config).items():
            m.add_lora(name, source)
        prompts, names = PROMPTS, ADAPTERS
        torch.save(plan_logits(m, prompts, names, broadcast=True), Path(out_dir) / "logits.pt")
        tokens = engine_tokens(m, prompts, names, broadcast=True)
        (Path(out_dir) / "engine.json").write_text(json.dumps(tokens))
    finally:
        dist.destroy_process_group()


def named_adapters(spec: str, config) -> dict[str, LoraAdapter | str]:
    if spec == "tiny":
        return tiny_adapters(config)
    return dict(item.split("=") for item in spec.split(","))
