"""The rank processes of tests/test_tensor_parallel.py (a module of its own: spawned processes import it by name)."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from realm.parallel.tensor_parallel import tensor_parallel_transformer
from realm.runtime.weights import load_weights

PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
DECODE_STEPS = 3


def greedy_logits(net, prompts=PROMPTS, steps=DECODE_STEPS) -> list[torch.Tensor]:
    """The prompts' logits [batch, T, vocab], then `steps` greedy decode steps' logits [batch, 1, vocab], on a fresh
    KV cache."""
    cache = net.new_cache(len(prompts), len(prompts[0]) + steps)
    out = [net.forward_tokens(prompts, cache, 0)]
    for i in range(steps):
        nxt = out[-1][:, -1].argmax(-1)
        out.append(net.forward_tokens([[t] for t in nxt.tolist()], cache, len(prompts[0]) + i))
    return out


def run_rank(rank: int, world: int, port: int, model: str, backend: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        net = tensor_parallel_transformer(load_weights(model), rank, world, backend)
        logits = greedy_logits(net)
        torch.save(logits, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_rank_that_loses_a_peer(rank: int, world: int, port: int, model: str, out_dir: str) -> None:
    """The prefill on every rank; then the last rank's process ends without a word, and the others decode: their
    step must fail with RankFailure, soon. Rank 0 writes what it got and how long it took."""
    import json
    import os
    import time

    from realm.parallel.tensor_parallel import RankFailure

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    torch.set_num_threads(1)
    net = tensor_parallel_transformer(load_weights(model), rank, world)
    cache = net.new_cache(len(PROMPTS), len(PROMPTS[0]) + 1)
    net.forward_tokens(PROMPTS, cache, 0)
    dist.barrier()
    if rank == world - 1:
        os._exit(0)  # dies as a killed process would: no goodbye to the group
    began = time.monotonic()
    try:
        net.forward_tokens([[1]] * len(PROMPTS), cache, len(PROMPTS[0]))
        result = {"error": None}
    except RankFailure as e:
        result = {"error": str(e)}
    result["seconds"] = time.monotonic() - began
    if rank == 0:
        (Path(out_dir) / "failure.json").write_text(json.dumps(result))
    os._exit(0)  # the group is broken: leave without destroy_process_group's handshake


ENGINE_PROMPTS = [[1, 2, 3, 1, 2, 3, 1, 2], [7, 8, 9], [4, 5, 6, 4, 5, 6, 4], [10, 11]]
ENGINE_BLOCKS = 64


def engine_tokens(model, speculative=None, broadcast=False) -> tuple[list[list[int]], int]:
    """Greedy completions of ENGINE_PROMPTS, batched by realm.LLM over `model` (n-gram speculation if asked), and the
    proposals verified. broadcast: rank 0 of a group (its plans sent to the other ranks, then STOP)."""
    import realm
    from realm.parallel.tensor_parallel import PlanBroadcast
    from realm.runtime import SamplingParams

    llm = realm.LLM(model, kv_blocks=ENGINE_BLOCKS, max_num_seqs=4, speculative=speculative)
    sender = PlanBroadcast(llm.engine.runner) if broadcast else None
    outs = llm.generate(ENGINE_PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    if sender is not None:
        sender.stop()
    return [o.token_ids for o in outs], llm.engine.spec_stats.proposed


def run_engine_rank(rank: int, world: int, port: int, model: str, out_dir: str) -> None:
    """Rank 0 drives realm.LLM (plain, then n-gram speculation) and writes its tokens; the others follow its plans."""
    import json

    from realm.parallel.tensor_parallel import follow_plans, load_tensor_parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        m = load_tensor_parallel(model, rank, world)
        if rank:
            for _ in range(2):  # one engine per run on rank 0
                follow_plans(m, ENGINE_BLOCKS)
            return
        results = {}
        for name, speculative in (("plain", None), ("ngram", "ngram")):
            tokens, proposed = engine_tokens(m, speculative, broadcast=True)
            results[name], results[name + "_proposed"] = tokens, proposed
        (Path(out_dir) / "engine.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
