"""LoRA adapters under tensor parallelism: every adapter cut as its layer is (shard.py), and the same adapters in the
same pool slots (realm.runtime.lora) on every rank.

A module adds scale * B @ (A @ x) to its layer, A [r, in] and B [out, r]. Per rank:

- column-parallel layers (q, k, v by heads; gate, up by FFN channels) compute the rank's rows of the output: the rank
  takes B's rows of those outputs and A whole, so its delta is exactly its rows of the whole delta;
- row-parallel layers (o by heads, down by FFN channels) read the rank's columns x_r of the input: the rank takes A's
  columns of those inputs and B whole. A @ x = sum_r A_r @ x_r, so the ranks' deltas B @ (A_r @ x_r) are partial
  sums, added to the base layer's partial output before the layer's all-reduce (realm.runtime.linear: the LoRA term,
  then `reduce`) and summed by it. Added after the all-reduce, a whole delta would be counted world times.

K and V rows follow the rank's KV heads, shared (whole on each sharing rank) when ranks outnumber KV heads, as the
weights' are. The rank r of every module is kept: each rank runs the same shrink / expand at the pool's rank.

Who holds what: rank 0 reads and checks adapters against the whole model (`ShardedLoraRegistry`, the Model's
`loras` there); its pool holds rank 0's shards, its registry the whole adapters too. The other ranks load nothing
themselves: before a step whose rows use a slot they do not hold the right adapter in, rank 0 sends, with the plan
(tensor_parallel.PlanBroadcast), the pool's shape and each such slot's whole adapter (float32 tensors, plain data),
and every rank cuts its own shard into that slot (`LoraMirror`). The ranks' slots are thus rank 0's, adapters added
or removed while serving included, and a slot is sent again only when rank 0 puts another adapter in it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from realm.lora.adapter import LoraAdapter, LoraModule, Target
from realm.runtime.config import ModelConfig
from realm.runtime.lora import DEFAULT_MAX_LORAS, LoraRegistry, LoraStack, lora_mode_of, read_adapter

from .shard import Cut, ShardError, split_heads

ROW_PARALLEL = frozenset({Target.O, Target.DOWN})  # A cut by input columns; the other targets cut B by output rows


def target_range(target: Target, config: ModelConfig, rank: int, world: int) -> tuple[int, int]:
    """The rank's range of a target layer's split axis (output rows of q, k, v, gate, up; input columns of o, down),
    as shard_layer cuts the weights. config: the whole model's."""
    hd = config.head_dim
    if target in (Target.Q, Target.O, Target.K, Target.V):
        heads = split_heads(config.n_heads, config.n_kv_heads, rank, world)
        if target in (Target.K, Target.V):
            return heads.kv_begin * hd, heads.kv_end * hd
        return heads.q_begin * hd, heads.q_end * hd
    cut = Cut(config.ffn_hidden, 1, world)
    if not cut.works():
        raise ShardError(f"{config.ffn_hidden} FFN channels do not split evenly over {world} ranks")
    return cut.range(rank)


def shard_module(m: LoraModule, target: Target, config: ModelConfig, rank: int, world: int,
                 name: str = "LoRA module") -> LoraModule:
    """Rank `rank`'s part of one module: B's rows of the rank's outputs (column-parallel targets) or A's columns of
    the rank's inputs (row-parallel ones). ShardError, naming the module and the shapes, when the module does not fit
    the whole layer it would be cut as."""
    out_features, in_features = target.shape(config)
    r = m.a.shape[0] if m.a.dim() == 2 else -1
    if not (m.a.dim() == 2 and m.a.shape[1] == in_features and m.b.shape == (out_features, r)):
        raise ShardError(f"{name}: lora_A {list(m.a.shape)} and lora_B {list(m.b.shape)} do not fit the whole "
                         f"model's [{out_features}, {in_features}] layer (expected lora_A [r, {in_features}] and "
                         f"lora_B [{out_features}, r]), so they cannot be cut as it is over {world} ranks")
    start, stop = target_range(target, config, rank, world)
    if target in ROW_PARALLEL:
        return LoraModule(m.a[:, start:stop].contiguous(), m.b, m.scale)
    return LoraModule(m.a, m.b[start:stop].contiguous(), m.scale)


def shard_adapter(adapter: LoraAdapter, config: ModelConfig, rank: int, world: int) -> LoraAdapter:
    """Rank `rank`'s shard of a whole adapter (every module cut by shard_module); config: the whole model's."""
    where = f"adapter {adapter.name!r}" + (f" ({adapter.source})" if adapter.source else "")
    modules = {(layer, target): shard_module(m, target, config, rank, world,
                                             f"{where}: layer {layer} {target.peft_name}")
               for (layer, target), m in adapter.modules.items()}
    return LoraAdapter(adapter.name, modules, adapter.source, adapter.metadata)


class ShardedLoraRegistry(LoraRegistry):
    """A rank's adapters (rank 0's: the ones its engine serves). `add` reads and checks an adapter against the whole
    model, keeps it whole (what rank 0 sends the other ranks) and registers the rank's shard: `adapter(name)` and the
    pool's slots hold the shard. The rest is LoraRegistry's (slots, LRU, locks)."""

    def __init__(self, transformer, config: ModelConfig, rank: int, world: int,
                 max_loras: int = DEFAULT_MAX_LORAS, max_rank: int | None = None):
        """transformer: the rank's (sharded) one; config: the whole model's."""
        super().__init__(transformer, max_loras, max_rank)
        self.whole_config, self.rank, self.world = config, rank, world
        self._whole: dict[int, LoraAdapter] = {}  # uid -> the whole adapter

    def __repr__(self) -> str:
        return f"ShardedLoraRegistry(rank {self.rank} of {self.world}, {super().__repr__()})"

    def add(self, name: str, source: str | os.PathLike | LoraAdapter) -> LoraAdapter:
        """As LoraRegistry.add, the adapter read and checked against the whole model; returns it whole."""
        whole = source if isinstance(source, LoraAdapter) else read_adapter(source, self.whole_config, name)
        whole.check(self.whole_config)
        shard = shard_adapter(whole, self.whole_config, self.rank, self.world)
        with self.lock:
            super().add(name, shard)
            self._whole[self.uid(name)] = whole
        return whole

    def remove(self, name: str) -> None:
        with self.lock:
            uid = self.uid(name)
            super().remove(name)
            self._whole.pop(uid, None)

    def whole(self, uid: int) -> LoraAdapter:
        """The whole adapter loaded with this uid."""
        return self._whole[uid]


def shard_lora_registry(model, config: ModelConfig, rank: int, world: int) -> ShardedLoraRegistry:
    """Give a rank's Model (its transformer sharded) a ShardedLoraRegistry with its pool's size, before any adapter
    is added (adapters checked against the shard's config could not be sharded). config: the whole model's."""
    old = model.loras
    if len(old):
        raise ValueError(f"the model already has LoRA adapters ({', '.join(old.names)}), checked against its shard: "
                         "give it a sharded registry before adding any")
    model.loras = ShardedLoraRegistry(model.transformer, config, rank, world, old.max_loras, old.max_rank)
    return model.loras


# ------------------------------------------------------------------------------------ rank 0 to the other ranks


@dataclass(frozen=True)
class LoraPool:
    """The shape of rank 0's device pool, for the other ranks to allocate theirs alike."""

    config: ModelConfig  # the whole model's: where every rank's cuts come from
    slots: int
    rank: int
    mode: str  # the runner's LoraMode (how the Triton backend adds the deltas)

    @property
    def shape(self) -> tuple[int, int, str]:
        return self.slots, self.rank, self.mode


@dataclass(frozen=True)
class SlotLoad:
    slot: int
    uid: int  # rank 0's id of the adapter (LoraRegistry.uid)
    adapter: LoraAdapter  # whole


@dataclass(frozen=True)
class LoraSync:
    """What the other ranks need before a step: the pool's shape when it is new or changed (then every slot the step
    uses is loaded again), and the adapters new to the step's slots."""

    pool: LoraPool | None
    loads: tuple[SlotLoad, ...]


class LoraSender:
    """Rank 0's record of what the other ranks' slots hold (only what it sent them), and the LoraSync a plan needs."""

    def __init__(self, loras: LoraRegistry | None, runner):
        if loras is not None and not isinstance(loras, ShardedLoraRegistry):
            raise ValueError(f"tensor parallel: rank 0's LoRA registry must be a ShardedLoraRegistry (its adapters "
                             f"kept whole for the other ranks; see shard_lora_registry), got {type(loras).__name__}")
        self.loras, self.runner = loras, runner
        self._shape: tuple[int, int, str] | None = None  # the other ranks' pool
        self._held: dict[int, int] = {}  # slot -> uid of the adapter the other ranks hold there

    def pending(self, plan) -> LoraSync | None:
        """The LoraSync to send with plan (None: nothing to send). Call with the registry's lock held from here until
        the plan's forward has run (the engine does), so that the slots do not change in between."""
        used = sorted({c.adapter for c in plan.chunks if isinstance(c.adapter, int) and c.adapter >= 0})
        if not used:
            return None
        if self.loras is None:
            raise ValueError(f"the step's rows use LoRA slots {used}, but this PlanBroadcast was not given the "
                             "model's adapters (PlanBroadcast(runner, loras=model.loras)): the other ranks could not "
                             "hold them")
        with self.loras.lock:
            pool = LoraPool(self.loras.whole_config, self.runner.lora_slots, self.loras.pool_rank,
                            self.runner.lora_mode.value)
            held = {} if pool.shape != self._shape else self._held
            by_slot = {slot: self.loras.uid(name) for name, slot in self.loras.resident.items()}
            loads = []
            for slot in used:
                if slot not in by_slot:
                    raise ValueError(f"the step's rows use LoRA slot {slot}, which holds no adapter in rank 0's pool "
                                     f"({self.runner.lora_slots} slots)")
                if held.get(slot) != by_slot[slot]:
                    loads.append(SlotLoad(slot, by_slot[slot], self.loras.whole(by_slot[slot])))
        if pool.shape == self._shape and not loads:
            return None
        return LoraSync(pool if pool.shape != self._shape else None, tuple(loads))

    def sent(self, sync: LoraSync | None) -> None:
        """The other ranks received sync: record what their slots hold now."""
        if sync is None:
            return
        if sync.pool is not None:
            self._shape, self._held = sync.pool.shape, {}
        self._held.update((load.slot, load.uid) for load in sync.loads)


class LoraMirror:
    """A rank other than 0: its pool, kept as rank 0's by the LoraSyncs that come with the plans. Its stacks are
    attached to the rank's linear layers (one pool per transformer: a rank that follows does not serve adapters of
    its own)."""

    def __init__(self, transformer, rank: int, world: int):
        self.transformer, self.rank, self.world = transformer, rank, world
        self.pool: LoraPool | None = None
        self.stacks: list[LoraStack] = []

    def apply(self, sync: LoraSync, runner) -> None:
        """Allocate the pool when sync brings its shape (the runner's slots and mode set to match), then cut each
        loaded adapter's shard into its slot."""
        if sync.pool is not None:
            self._allocate(sync.pool)
            runner.lora_slots, runner.lora_mode = sync.pool.slots, lora_mode_of(sync.pool.mode)
        if self.pool is None:
            raise RuntimeError("tensor parallel: rank 0 sent LoRA adapters before the shape of its pool")
        for load in sync.loads:
            shard = shard_adapter(load.adapter, self.pool.config, self.rank, self.world)
            for stack in self.stacks:
                stack.write(load.slot, shard)

    def _allocate(self, pool: LoraPool) -> None:
        t = self.transformer
        self.stacks = []
        for layer, targets, linear in t.lora_layers():
            linear.lora = None  # the old pool's memory goes before the new one is allocated
            stack = LoraStack.allocate(layer, targets, linear.sizes, linear.in_features, pool.slots, pool.rank,
                                       t.dtype, t.device)
            linear.lora = stack
            self.stacks.append(stack)
        self.pool = pool


__all__ = ["ROW_PARALLEL", "LoraMirror", "LoraPool", "LoraSender", "LoraSync", "ShardedLoraRegistry", "SlotLoad",
           "shard_adapter", "shard_lora_registry", "shard_module", "target_range"]
