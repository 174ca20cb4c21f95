"""A model's forward split over the ranks of a torch.distributed process group (Megatron-style tensor parallelism),
on the one model definition: each rank builds realm's Transformer from its shard of the weights (shard.py) and
attaches the collectives to the linear layers' epilogue contract (realm.runtime.linear: `reduce`).

    net = tensor_parallel_transformer(load_weights(path), rank, world)    # in every rank, after init_process_group
    logits = net.forward_tokens(tokens, cache)                            # every rank: the same call, the same logits

Per layer: Q/K/V and gate/up are column-parallel (the rank's heads and FFN channels: no communication), the
attention output and down projections row-parallel (partial sums: one all-reduce each, in their epilogue), so a
layer costs two all-reduces of [tokens, hidden]. Each rank's KV cache holds only its KV heads (the rank's config has
its own head counts). The token embedding and the output head are vocabulary-parallel, on the same rows: rank r holds
the rows of ids [v0, v1), its 1 / world of the vocabulary (the tied head shares them). The embedding looks up the ids
in that range (zeros for the others) and one all-reduce in its epilogue sums the ranks' lookups into the whole
[tokens, hidden] (exact: each id's row comes from one rank; Gemma's sqrt(hidden) scale follows the sum). The head
computes the logits of the rank's ids, gathered in its epilogue into the whole row. Norms are whole on every rank.

The communication per step, in elements: (2 x layers + 1) x tokens x hidden all-reduced, plus rows x vocab gathered.

LoRA adapters shard with their layers (lora_shard.py): B by output rows on the column-parallel layers, A by input
columns on the row-parallel ones, whose partial deltas the same all-reduce sums. Rank 0's Model checks and keeps the
adapters (a ShardedLoraRegistry); its PlanBroadcast sends the other ranks each adapter new to a slot a step uses.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

from realm.runtime.config import ModelConfig
from realm.runtime.kv_cache import DEFAULT_BLOCK_SIZE
from realm.runtime.lora import DEFAULT_MAX_LORAS, parse_lora_specs
from realm.runtime.model import Model
from realm.runtime.ops import Backend, backend_of
from realm.runtime.plan import StepPlan
from realm.runtime.runner import ModelRunner
from realm.runtime.tokenizer import Tokenizer
from realm.runtime.transformer import Transformer
from realm.runtime.weights import ModelWeights, load_weights

from .lora_shard import LoraMirror, LoraSender, ShardedLoraRegistry, shard_lora_registry
from .shard import Cut, ShardError, shard_config, shard_layer, take_rows, working_worlds


def shard_weights(weights: ModelWeights, rank: int, world: int) -> ModelWeights:
    """Rank `rank`'s weights: every layer sharded (shard_layer), the token embedding's and the output head's rows of
    its vocabulary range (one shard, still tied, when the head is the embedding; vocab_start: the range's first id),
    the norms whole; with the rank's config (its head and FFN sizes)."""
    c = weights.config
    # the head's name: the embedding takes the same cut, so the head's error stands for both
    names = "token_embd.weight (the tied output head)" if weights.tied else "output.weight"
    vocab = Cut(c.vocab_size, 1, world)
    if not vocab.works():
        raise ShardError(f"{names}: a vocabulary of {c.vocab_size} does not split evenly over {world} ranks; "
                         f"rank counts that work: {', '.join(map(str, working_worlds(c.vocab_size, 1)))}")
    start, stop = vocab.range(rank)
    token_embd = take_rows(weights.token_embd, start, stop)
    output = token_embd if weights.tied else take_rows(weights.output, start, stop)
    layers = tuple(shard_layer(layer, c, rank, world, i) for i, layer in enumerate(weights.layers))
    return dataclasses.replace(weights, config=shard_config(c, rank, world), layers=layers, token_embd=token_embd,
                               output=output, vocab_start=start)


class RankFailure(RuntimeError):
    """A collective failed: another rank stopped (its process died, its connection closed) or the group's timeout
    passed. The forward cannot finish on any rank."""


def _collective(what: str, run) -> None:
    try:
        run()
    except (RuntimeError, dist.DistError) as e:  # gloo: connection closed by peer, or the timeout
        raise RankFailure(f"tensor parallel: {what} failed, so this step cannot finish: another rank stopped or did "
                          f"not answer within the process group's timeout ({str(e).splitlines()[0]})") from e


class AllReduce:
    """A row-parallel layer's epilogue: the ranks' partial outputs summed, in place, on every rank."""

    def __init__(self, name: str, group: dist.ProcessGroup | None = None):
        self.name, self.group = name, group

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        _collective(f"the all-reduce of {self.name}", lambda: dist.all_reduce(y, group=self.group))
        return y


class GatherColumns:
    """The vocabulary-parallel head's epilogue: every rank's logits [rows, vocab / world] joined into [rows, vocab]
    in rank order, on every rank."""

    def __init__(self, world: int, group: dist.ProcessGroup | None = None):
        self.world, self.group = world, group

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(y) for _ in range(self.world)]
        _collective("the gather of the output head's logits",
                    lambda: dist.all_gather(parts, y.contiguous(), group=self.group))
        return torch.cat(parts, dim=-1)


def tensor_parallel_transformer(weights: ModelWeights, rank: int, world: int, backend: Backend | str = Backend.TORCH,
                                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                                group: dist.ProcessGroup | None = None) -> Transformer:
    """This rank's Transformer: its shard of the weights, the all-reduces and the vocabulary gather in the linear
    layers' epilogues. Every rank must call forward with the same steps (the collectives pair up in layer order).
    A rank that stops makes the others' forward raise RankFailure (at once where its connection closes, else after
    the group's timeout), never wait forever."""
    net = Transformer(shard_weights(weights, rank, world), backend, device, dtype)
    attach_collectives(net, weights.config, world, group)
    return net


def attach_collectives(net: Transformer, config: ModelConfig, world: int, group: dist.ProcessGroup | None = None):
    """A sharded Transformer's epilogues: all-reduce after the embedding's lookup and after each row-parallel layer,
    the vocabulary gather after the head; the attention scale of the whole model (config: the unsharded one; Gemma
    27B's scale depends on its head count)."""
    net.scale = config.attention_scale
    net.embed.reduce = AllReduce("token_embd", group)
    for layer in net.layers:
        layer.o.reduce = AllReduce(layer.o.name, group)
        layer.down.reduce = AllReduce(layer.down.name, group)
    net.head.reduce = GatherColumns(world, group)


def load_tensor_parallel(model: str | os.PathLike, rank: int, world: int, backend: Backend | str = Backend.TORCH,
                         device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                         group: dist.ProcessGroup | None = None, *,
                         lora: Mapping[str, str | os.PathLike] | None = None, max_loras: int = DEFAULT_MAX_LORAS,
                         max_lora_rank: int | None = None) -> Model:
    """realm.load for one rank of `world`: a Model (tokenizer, engine API) whose transformer is this rank's shard.
    Rank 0's drives an Engine through `PlanBroadcast`; the other ranks run `follow_plans`. Its `loras` is a
    ShardedLoraRegistry: adapters (lora, or add_lora later; rank 0's only: the other ranks receive them) are read
    against the whole model and sharded; max_loras and max_lora_rank size the pool as realm.load's."""
    weights = load_weights(model)
    m = Model(shard_weights(weights, rank, world), Tokenizer.from_metadata(weights.metadata), backend_of(backend),
              torch.device(device), dtype, max_loras=max_loras, max_lora_rank=max_lora_rank)
    attach_collectives(m.transformer, weights.config, world, group)
    loras = shard_lora_registry(m, weights.config, rank, world)
    for name, source in parse_lora_specs(lora).items():
        loras.add(name, source)
    return m


STOP = "stop"  # what rank 0 broadcasts instead of a plan when it is done


class PlanBroadcast:
    """Rank 0's side: wraps its engine's runner so that every step plan (StepPlan: plain data) goes to the other
    ranks before rank 0 runs it; they run the same plan on their shards, and the forward's collectives pair up.
    Sampling is rank 0's (the other ranks' samples are not used).

    loras: rank 0's ShardedLoraRegistry (model.loras of load_tensor_parallel), needed when plans use adapter slots:
    with a plan goes a LoraSync (lora_shard.py) when the plan's slots hold adapters the other ranks do not have there
    yet. Call execute with the registry's lock held until the forward has run, as the engine does."""

    def __init__(self, runner: ModelRunner, group: dist.ProcessGroup | None = None,
                 loras: ShardedLoraRegistry | None = None):
        self.runner, self.group = runner, group
        self.loras = LoraSender(loras, runner)
        self._execute = runner.execute
        runner.execute = self.execute

    def execute(self, plan: StepPlan, draft_probs=None):
        sync = self.loras.pending(plan)  # an error here is rank 0's alone: raised before the other ranks hear of it
        _collective("sending the step plan",
                    lambda: dist.broadcast_object_list([plan, sync], src=0, group=self.group))
        self.loras.sent(sync)
        return self._execute(plan, draft_probs)

    def stop(self) -> None:
        """Ends the other ranks' follow_plans."""
        _collective("sending stop", lambda: dist.broadcast_object_list([STOP, None], src=0, group=self.group))


def follow_plans(model: Model, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 group: dist.ProcessGroup | None = None) -> int:
    """The other ranks' side: a runner on this rank's shard (num_blocks and block_size as rank 0's engine), running
    each plan rank 0 sends until it sends STOP, with the LoRA pool rank 0's plans need (LoraMirror: attached to the
    rank's linear layers for the call). Returns the number of steps run."""
    runner = ModelRunner(model.transformer, num_blocks, block_size, model.tokenizer.vocab_size, seed=0)
    mirror = LoraMirror(model.transformer, dist.get_rank(group), dist.get_world_size(group))
    steps = 0
    while True:
        box: list = [None, None]  # the plan, and the LoraSync that comes with it (None: nothing new)
        _collective("receiving the step plan", functools.partial(dist.broadcast_object_list, box, src=0, group=group))
        plan, sync = box
        if isinstance(plan, str) and plan == STOP:
            return steps
        if sync is not None:
            mirror.apply(sync, runner)
        runner.execute(plan)
        steps += 1
