"""LoRA adapters under tensor parallelism (realm.parallel.lora_shard): an adapter's shards, applied per rank and
summed (row-parallel layers) or joined (column-parallel ones), give the whole adapter's layer outputs; and over gloo,
ranks spawned as processes give one process's logits and greedy tokens with two adapters and none mixed in every
batch, the other ranks receiving the adapters from rank 0."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from test_lora_runtime import random_adapter
from tiny_gguf import TINY, tiny_vocab_metadata, write_tiny_llama
from tolerances import assert_close, assert_same_predictions
from tp_lora_worker import ADAPTERS, PROMPTS, engine_tokens, named_adapters, plan_logits, run_rank

from realm.lora import AdapterError, LoraModule, Target
from realm.parallel import ShardError
from realm.parallel.lora_shard import (
    LoraSender,
    ShardedLoraRegistry,
    shard_adapter,
    shard_module,
    target_range,
)
from realm.parallel.tensor_parallel import PlanBroadcast, shard_weights
from realm.runtime.lora import LoraMode, LoraRegistry, LoraRows
from realm.runtime.model import load
from realm.runtime.plan import ChunkPlan, StepPlan
from realm.runtime.transformer import Transformer
from realm.runtime.weights import load_weights

# The ranks' partial sums (the base layer's and the LoRA delta's) are added in another order than one process adds
# them: float32 rounding of a few ulp of the largest partial sums (the base model alone: 4.8e-6 on logits up to 4.8,
# tests/test_tensor_parallel.py; with these two adapters, measured by hand on the 2-core CPU: 3.6e-6). The base
# model's bound, 1e-5, holds them.
ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------- shards, no processes


@pytest.fixture
def tiny48(tmp_path):
    """The tiny model with a vocabulary of 48, which splits over 2 and 4 ranks (4: one query head per rank, the 2 KV
    heads each shared by two ranks)."""
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, dims={"vocab": 48})
    return load_weights(path)


@pytest.mark.parametrize("world", [2, 4])
def test_module_shards_sum_to_the_whole_delta(tiny48, world):
    """Per target: scale * B_r @ (A_r @ x_r) on every rank; the row-parallel ranks' deltas summed, the column-parallel
    ranks' rows, equal the whole module's delta."""
    config = tiny48.config
    adapter = random_adapter(config, "a", rank=4, seed=5)
    g = torch.Generator().manual_seed(0)
    for target in Target:
        m = adapter.modules[(0, target)]
        x = torch.randn(5, target.shape(config)[1], generator=g)
        whole = m.scale * (x @ m.a.T) @ m.b.T
        parts = []
        for rank in range(world):
            shard = shard_module(m, target, config, rank, world)
            start, stop = target_range(target, config, rank, world)
            xs = x[:, start:stop] if target in (Target.O, Target.DOWN) else x
            parts.append(shard.scale * (xs @ shard.a.T) @ shard.b.T)
            if target not in (Target.O, Target.DOWN):
                assert_close(parts[-1], whole[:, start:stop], what=f"{target.value} rank {rank}")
        if target in (Target.O, Target.DOWN):
            assert_close(sum(parts), whole, what=f"{target.value}, {world} ranks summed")


def _rows(slot: int, tokens: int, with_adapter: int) -> SimpleNamespace:
    """A step whose first `with_adapter` rows use the adapter in slot, the rest none (what Linear reads)."""
    indices = torch.tensor([slot] * with_adapter + [-1] * (tokens - with_adapter), dtype=torch.int32)
    return SimpleNamespace(lora=LoraRows(indices, ((slot, slice(0, with_adapter)),), LoraMode.FUSED))


@pytest.mark.parametrize("world", [2, 4])
def test_layer_shards_with_an_adapter_give_the_whole_layer(tiny48, world):
    """One layer's linear layers on every rank, each with the rank's ShardedLoraRegistry pool: q/k/v and gate/up
    outputs are the whole layer's rows of the rank, o and down outputs summed over the ranks (what the all-reduce
    does after the epilogue) are the whole layer's, on a batch mixing rows with the adapter and without."""
    config, tokens, with_adapter = tiny48.config, 6, 4
    adapter = random_adapter(config, "a", rank=4, seed=6)
    whole = Transformer(tiny48)
    registry = LoraRegistry(whole)
    registry.add("a", adapter)
    batch = _rows(registry.activate(["a"])["a"], tokens, with_adapter)
    ranks = []
    for rank in range(world):
        net = Transformer(shard_weights(tiny48, rank, world))  # no collectives: the sums are taken here
        loras = ShardedLoraRegistry(net, config, rank, world)
        loras.add("a", adapter)
        ranks.append((net, _rows(loras.activate(["a"])["a"], tokens, with_adapter)))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, config.hidden, generator=g)
    layer = whole.layers[1]
    for name, targets in (("qkv", (Target.Q, Target.K, Target.V)), ("gate_up", (Target.GATE, Target.UP))):
        expected = getattr(layer, name)(x, batch).split([t.shape(config)[0] for t in targets], dim=-1)
        base = getattr(layer, name)(x).split([t.shape(config)[0] for t in targets], dim=-1)
        assert all((e - b)[:with_adapter].abs().max() > 0.1 for e, b in zip(expected, base, strict=True))
        for rank, (net, rows) in enumerate(ranks):
            got = getattr(net.layers[1], name)(x, rows)
            got = got.split([target_range(t, config, rank, world)[1] - target_range(t, config, rank, world)[0]
                             for t in targets], dim=-1)
            for t, part, full in zip(targets, got, expected, strict=True):
                start, stop = target_range(t, config, rank, world)
                assert_close(part, full[:, start:stop], what=f"{t.value} rank {rank}")
    for name, target in (("o", Target.O), ("down", Target.DOWN)):
        xin = torch.randn(tokens, target.shape(config)[1], generator=g)
        expected = getattr(layer, name)(xin, batch)
        partial = []
        for rank, (net, rows) in enumerate(ranks):
            start, stop = target_range(target, config, rank, world)
            partial.append(getattr(net.layers[1], name)(xin[:, start:stop].contiguous(), rows))
        assert_close(sum(partial), expected, atol=1e-5, rtol=1e-5, what=f"{name}, {world} ranks summed")


def test_an_adapter_that_does_not_fit_its_layer_is_refused(tiny48):
    config = tiny48.config
    adapter = random_adapter(config, "bad", rank=4, targets=(Target.Q,))
    adapter.modules[(1, Target.Q)] = LoraModule(torch.zeros(4, TINY["hidden"]), torch.zeros(60, 4), 1.0)
    with pytest.raises(ShardError, match=r"adapter 'bad' \(random\): layer 1 q_proj: lora_A \[4, 64\] and lora_B "
                                         r"\[60, 4\] do not fit the whole model's \[64, 64\] layer .* over 2 ranks"):
        shard_adapter(adapter, config, 0, 2)
    net = Transformer(shard_weights(tiny48, 0, 2))
    loras = ShardedLoraRegistry(net, config, 0, 2)
    with pytest.raises(AdapterError, match=r"layer 1 q_proj: lora_A \[4, 64\] and lora_B \[60, 4\] do not fit the "
                                           r"base model's \[64, 64\] layer"):
        loras.add("bad", adapter)
    assert "bad" not in loras
    shard = random_adapter(net.config, "shard", rank=4)  # made for the rank's shard, not the whole model
    with pytest.raises(AdapterError, match=r"layer 0 q_proj: lora_A \[4, 64\] and lora_B \[32, 4\] do not fit the "
                                           r"base model's \[64, 64\] layer"):
        loras.add("shard", shard)


def test_a_plan_with_adapters_needs_the_registry_before_anything_is_sent(tiny48):
    """Without loras=, rank 0 refuses a plan whose rows use an adapter slot before it broadcasts anything (no
    process group here: a broadcast would fail otherwise); with a plain LoraRegistry too."""
    runner = SimpleNamespace(execute=None, lora_slots=4, lora_mode=LoraMode.FUSED)
    broadcast = PlanBroadcast(runner)
    plan = StepPlan(16, (ChunkPlan(0, 0, (1, 2), (0,), (1,), adapter=2),))
    with pytest.raises(ValueError, match=r"use LoRA slots \[2\], but this PlanBroadcast was not given the model's "
                                         r"adapters \(PlanBroadcast\(runner, loras=model.loras\)\)"):
        broadcast.execute(plan)
    with pytest.raises(ValueError, match="must be a ShardedLoraRegistry"):
        LoraSender(LoraRegistry(Transformer(tiny48)), runner)


def test_the_sender_sends_each_slot_once_and_again_when_it_changes(tiny48):
    """What rank 0 sends with each plan: the pool's shape and the adapters first; nothing while the slots hold what the
    other ranks have; an adapter again when its slot was given another one."""
    config = tiny48.config
    net = Transformer(shard_weights(tiny48, 0, 2))
    loras = ShardedLoraRegistry(net, config, 0, 2, max_loras=1)
    for name, seed in (("a", 1), ("b", 2)):
        loras.add(name, random_adapter(config, name, rank=4, seed=seed))
    sender = LoraSender(loras, SimpleNamespace(lora_slots=1, lora_mode=LoraMode.FUSED))

    def step(name):
        slot = loras.activate([name])[name]
        plan = StepPlan(16, (ChunkPlan(0, 0, (1,), (0,), (0,), adapter=slot), ChunkPlan(1, 0, (1,), (1,), (0,))))
        sync = sender.pending(plan)
        sender.sent(sync)
        return sync

    first = step("a")
    assert first.pool.shape == (1, 16, "fused") and first.pool.config == config
    assert [(s.slot, s.adapter) for s in first.loads] == [(0, loras.whole(loras.uid("a")))]
    assert step("a") is None
    second = step("b")  # evicts a from the one slot
    assert second.pool is None and [s.adapter.name for s in second.loads] == ["b"]
    assert [s.adapter.name for s in step("a").loads] == ["a"]
    assert sender.pending(StepPlan(16, (ChunkPlan(0, 0, (1,), (0,), (0,)),))) is None  # no adapter in the step


# ------------------------------------------------------------------------------------------ ranks over gloo


def _run_ranks(world: int, model: str, adapters: str, backend: str, out_dir) -> tuple[list, list]:
    mp.start_processes(run_rank, args=(world, _free_port(), model, adapters, backend, str(out_dir)), nprocs=world,
                       start_method="spawn", join=True)
    return torch.load(out_dir / "logits.pt"), json.loads((out_dir / "engine.json").read_text())


def _one_process(model, adapters: str, backend: str) -> tuple[list, list]:
    m = load(model, device="cpu", backend=backend)
    for name, source in named_adapters(adapters, m.config).items():
        m.add_lora(name, source)
    return plan_logits(m, PROMPTS, ADAPTERS), engine_tokens(m, PROMPTS, ADAPTERS)


def test_two_ranks_with_two_adapters_give_one_rank_logits_and_tokens(tmp_path):
    """The tiny model over 2 ranks, two adapters and the base model mixed in every batch (rank 1 loads none: rank 0
    sends them): every position's logits of a prefill and 3 decode steps within float32 reordering of one process's,
    the same argmax; and realm.LLM's greedy tokens equal."""
    model = tmp_path / "tiny.gguf"
    write_tiny_llama(model, metadata=tiny_vocab_metadata())
    logits, tokens = _one_process(model, "tiny", "torch")
    base = engine_tokens(load(model, device="cpu"), PROMPTS, [None] * len(PROMPTS))
    assert all(tokens[i] != base[i] for i, a in enumerate(ADAPTERS) if a is not None), "an adapter changed nothing"
    got_logits, got_tokens = _run_ranks(2, str(model), "tiny", "torch", tmp_path)
    assert len(got_logits) == len(logits)
    for step, (got, expected) in enumerate(zip(got_logits, logits, strict=True)):
        assert_close(got, expected, atol=ATOL, rtol=0, what=f"step {step}")
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert got_tokens == tokens


def test_smollm2_over_three_ranks_with_pirate_and_robot(tmp_path):
    """SmolLM2 over 3 ranks with its two packaged adapters (pirate: r 8 on every target; robot: r 16 on q, v): the
    same argmax and a KL within the model tolerance of one process's logits at every position (as the base model in
    tests/test_tensor_parallel.py: 30 layers carry the reordering of the partial sums), and the same greedy tokens."""
    backend = "onednn" if torch.backends.mkldnn.is_available() else "torch"
    logits, tokens = _one_process("smollm2", "a=pirate,b=robot", backend)
    got_logits, got_tokens = _run_ranks(3, "smollm2", "a=pirate,b=robot", backend, tmp_path)
    for got, expected in zip(got_logits, logits, strict=True):
        assert_same_predictions(got, expected)
    assert got_tokens == tokens
