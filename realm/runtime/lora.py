"""Many LoRA adapters in one batch: the registry of a model's adapters and the device pool they are served from.

    model.loras.add("pirate", "realm/data/lora/pirate")       # PEFT dir or GGUF LoRA, checked against the model
    engine.add_request(prompt, SamplingParams(adapter="pirate"))
    ...  # each step: the engine activates the step's adapters (slots of the pool), rows carry their slot

Adapters are kept in host memory (float32, as read); `max_loras` of them at a time are resident on the device, in
a pool of slots with least-recently-used eviction (a slot used by the step being planned is never evicted). Every
adapted linear layer has one `LoraStack`: its slots' lora_A stacked along the rank, one slice per weight the layer
fuses (Q, K, V; gate, up), and lora_B block-diagonal over the slices, so that one shrink and one expand serve every
slice and every row's adapter (realm.kernels.lora):

    a     [slots, S * R, in]      slice s uses rows s * R .. s * R + r_s (the adapter's rank for it); the rest are 0
    b     [slots, out, S * R]     the columns of slice s use only its rank block
    scale float32 [slots, out]    the adapter's scale for that column's slice

R (`max_rank`) is the pool's rank: every adapter is padded to it. Padding costs reads of zeros, but keeps the kernels
to one launch per layer whatever ranks are mixed; per-adapter ranks would need a rank table per launch and change
nothing in the arithmetic (bench/lora.py measures the padding's cost).

Each adapter has a unique `uid`; requests with an adapter use `lora:<uid>` in their prefix-cache salt, so no KV is
ever shared between adapters, or with an adapter unloaded and loaded again under the same name.
"""

from __future__ import annotations

import enum
import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from realm.lora.adapter import AdapterError, LoraAdapter, LoraModule, Target
from realm.lora.packaged import packaged_adapters, resolve_adapter

from .config import ModelConfig

DEFAULT_MAX_LORAS = 4
DEFAULT_MAX_RANK = 16


class LoraMode(str, enum.Enum):
    """How the Triton backend adds a LoRA delta (the torch backend always runs the reference, PEFT's op order)."""

    FUSED = "fused"  # shrink kernel, then the expand in the quantized matmul's epilogue: y written once
    SEPARATE = "separate"  # shrink kernel, quantized matmul, then an expand kernel adding into y


def lora_mode_of(mode: LoraMode | str) -> LoraMode:
    try:
        return LoraMode(mode)
    except ValueError:
        raise ValueError(f"unknown lora_mode {mode!r}; choose one of: {', '.join(m.value for m in LoraMode)}") from None


@dataclass(frozen=True)
class LoraRows:
    """A step's rows and their adapters, for the linear layers (part of the ForwardBatch; None when no row has one).

    indices: int32 [tokens] on the device, each token's slot (-1: no adapter), for the kernels; groups: per slot,
    its rows (a slice when they are contiguous, else a long tensor of row indices), for the reference."""

    indices: torch.Tensor
    groups: tuple[tuple[int, slice | torch.Tensor], ...]
    mode: LoraMode = LoraMode.FUSED


@dataclass(eq=False)
class LoraStack:
    """One linear layer's slots (see the module docstring). ranks / scales: host copies, per slot and slice."""

    layer: int
    targets: tuple[Target, ...]  # the layer's slices, in output order
    widths: tuple[int, ...]  # output columns of each slice
    a: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor
    ranks: list[list[int]]
    scales: list[list[float]]

    @classmethod
    def allocate(cls, layer: int, targets: tuple[Target, ...], widths: tuple[int, ...], in_features: int,
                 slots: int, rank: int, dtype: torch.dtype, device: torch.device) -> LoraStack:
        n, r = sum(widths), len(targets) * rank
        return cls(layer, targets, widths,
                   a=torch.zeros(slots, r, in_features, dtype=dtype, device=device),
                   b=torch.zeros(slots, n, r, dtype=dtype, device=device),
                   scale=torch.zeros(slots, n, dtype=torch.float32, device=device),
                   ranks=[[0] * len(targets) for _ in range(slots)],
                   scales=[[0.0] * len(targets) for _ in range(slots)])

    @property
    def rank(self) -> int:
        """The padded rank of each slice."""
        return self.a.shape[1] // len(self.targets)

    def columns(self, s: int) -> slice:
        start = sum(self.widths[:s])
        return slice(start, start + self.widths[s])

    def write(self, slot: int, adapter: LoraAdapter | None) -> None:
        """Put adapter's modules for this layer in slot (zeros where it has none); None empties the slot."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.scale[slot].zero_()
        for s, target in enumerate(self.targets):
            m = adapter.modules.get((self.layer, target)) if adapter is not None else None
            self.ranks[slot][s], self.scales[slot][s] = (m.rank, m.scale) if m is not None else (0, 0.0)
            if m is None:
                continue
            rows = slice(s * self.rank, s * self.rank + m.rank)
            self.a[slot, rows] = m.a.to(self.a.dtype)
            self.b[slot, self.columns(s), rows] = m.b.to(self.b.dtype)
            self.scale[slot, self.columns(s)] = m.scale

    def delta_ref(self, x: torch.Tensor, y: torch.Tensor, rows: LoraRows) -> None:
        """The reference: y[rows, slice] += (x[rows] @ A.T @ B.T) * scale for each slot and slice with a module, in
        PEFT's op order (`lora_B(lora_A(x)) * scaling`, then added) at the module's own rank, so that the float32
        forward is PEFT's."""
        for slot, where in rows.groups:
            xs = x[where]
            for s in range(len(self.targets)):
                r = self.ranks[slot][s]
                if not r:
                    continue
                block = slice(s * self.rank, s * self.rank + r)
                cols = self.columns(s)
                delta = F.linear(F.linear(xs, self.a[slot, block]), self.b[slot, cols, block]) * self.scales[slot][s]
                if isinstance(where, slice):
                    y[where, cols] += delta
                else:
                    y[where, cols] = y[where, cols] + delta


@dataclass(eq=False)
class _Entry:
    adapter: LoraAdapter
    uid: int
    slot: int | None = None
    users: int = 0  # requests in flight that name it


_uids = itertools.count(1)


class LoraRegistry:
    """A model's adapters by name, and the device pool (`max_loras` slots of rank `max_rank`) they run from.

    Thread-safe. `lock` (the pool's) is held by an engine from activating a step's adapters until its forward has run,
    so that no slot the step uses changes under it (several engines may share one model); the names and their users
    have a lock of their own, so that adding a request never waits for a step. Order: `lock`, then the names'."""

    def __init__(self, transformer, max_loras: int = DEFAULT_MAX_LORAS, max_rank: int | None = None):
        for name, value in (("max_loras", max_loras), ("max_rank", max_rank)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.transformer = transformer
        self.config: ModelConfig = transformer.config
        self.max_loras = max_loras
        self.max_rank = max_rank  # None: the largest rank added so far (at least DEFAULT_MAX_RANK), fixed once used
        self.lock = threading.RLock()
        self._names = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._slots: OrderedDict[int, str | None] = OrderedDict((i, None) for i in range(max_loras))  # LRU first
        self._stacks: list[LoraStack] | None = None

    def __repr__(self) -> str:
        return f"LoraRegistry({len(self)} adapters, {self.max_loras} slots of rank {self.pool_rank})"

    def __contains__(self, name: object) -> bool:
        with self._names:
            return name in self._entries

    def __len__(self) -> int:
        with self._names:
            return len(self._entries)

    @property
    def names(self) -> list[str]:
        with self._names:
            return list(self._entries)

    @property
    def pool_rank(self) -> int:
        if self.max_rank is not None:
            return self.max_rank
        if self._stacks is not None:
            return self._stacks[0].rank
        with self._names:
            return max([DEFAULT_MAX_RANK, *(e.adapter.max_rank for e in self._entries.values())])

    def adapter(self, name: str) -> LoraAdapter:
        return self._entry(name).adapter

    def uid(self, name: str) -> int:
        return self._entry(name).uid

    def _entry(self, name: str) -> _Entry:
        with self._names:
            entry = self._entries.get(name) if isinstance(name, str) else None
            if entry is None:
                known = ", ".join(repr(n) for n in self._entries) or "none are loaded"
                raise ValueError(f"unknown LoRA adapter {name!r} ({known})")
            return entry

    # ------------------------------------------------------------------------------------------ load / unload

    def add(self, name: str, source: str | os.PathLike | LoraAdapter) -> LoraAdapter:
        """Load an adapter (a PEFT directory, a GGUF LoRA file, or a LoraAdapter) under name, checked against the
        model. AdapterError (a ValueError) when it cannot be used; nothing changes then."""
        if not isinstance(name, str) or not name or len(name) > 256 or not name.isprintable():
            raise ValueError(f"an adapter name must be a non-empty printable string of up to 256 characters, got "
                             f"{name!r}")
        adapter = source if isinstance(source, LoraAdapter) else read_adapter(source, self.config, name)
        adapter.check(self.config)
        with self.lock, self._names:  # a pool rebuilt for a larger rank must wait for a step using it
            if name in self._entries:
                raise ValueError(f"a LoRA adapter named {name!r} is already loaded; remove it first")
            if self.max_rank is not None and adapter.max_rank > self.max_rank:
                raise AdapterError(f"adapter {name!r} has rank {adapter.max_rank}, more than this model's LoRA pool "
                                   f"holds (max_lora_rank={self.max_rank})")
            if self._stacks is not None and adapter.max_rank > self._stacks[0].rank:
                self._drop_pool()  # allocated for smaller ranks: rebuilt at the next activation
            self._entries[name] = _Entry(adapter, next(_uids))
        return adapter

    def remove(self, name: str) -> None:
        """Unload an adapter. Refused while requests that name it are in flight (cancel them first)."""
        with self.lock, self._names:
            entry = self._entry(name)
            if entry.users:
                raise ValueError(f"LoRA adapter {name!r} is used by {entry.users} request(s) in flight; cancel "
                                 "them or wait for them to finish first")
            if entry.slot is not None:
                self._slots[entry.slot] = None
                self._slots.move_to_end(entry.slot, last=False)
                for stack in self._stacks or ():
                    stack.write(entry.slot, None)
            del self._entries[name]

    def acquire(self, name: str) -> int:
        """A request names the adapter: it cannot be removed until `release`. Returns its uid."""
        with self._names:
            entry = self._entry(name)
            entry.users += 1
            return entry.uid

    def release(self, name: str) -> None:
        with self._names:
            entry = self._entries.get(name)
            if entry is not None and entry.users:
                entry.users -= 1

    # ----------------------------------------------------------------------------------------------- the pool

    def activate(self, names: Iterable[str]) -> dict[str, int]:
        """Make the adapters resident, evicting the least recently used others -> their slots. Call with `lock`
        held until the forward that uses the slots has run."""
        names = list(dict.fromkeys(names))
        if not names:  # a step without adapters: the pool is not even allocated for it
            return {}
        if len(names) > self.max_loras:
            raise ValueError(f"a step uses {len(names)} adapters; the pool holds max_loras={self.max_loras}")
        entries = [self._entry(n) for n in names]
        if self._stacks is None:
            self._stacks = self._allocate()
        slots = {}
        for name, entry in zip(names, entries, strict=True):
            if entry.slot is None:
                slot = next(s for s, held in self._slots.items() if held not in names)  # the least recently used
                self._load_slot(slot, name, entry)
            self._slots.move_to_end(entry.slot)
            slots[name] = entry.slot
        return slots

    def _load_slot(self, slot: int, name: str, entry: _Entry) -> None:
        """The adapter into slot, evicting its holder. A write that fails (device memory?) leaves the slot empty."""
        with self._names:
            evicted = self._slots[slot]
            if evicted is not None and evicted in self._entries:
                self._entries[evicted].slot = None
            self._slots[slot] = None
        try:
            for stack in self._stacks:
                stack.write(slot, entry.adapter)
        except BaseException:
            for stack in self._stacks:
                stack.write(slot, None)
            raise
        with self._names:
            self._slots[slot], entry.slot = name, slot

    @property
    def resident(self) -> dict[str, int]:
        with self._names:
            return {name: e.slot for name, e in self._entries.items() if e.slot is not None}

    def _allocate(self) -> list[LoraStack]:
        """A stack for every adaptable linear layer of the model (all targets: adapters loaded later may adapt any)."""
        t = self.transformer
        stacks = []
        for layer, targets, linear in t.lora_layers():
            stack = LoraStack.allocate(layer, targets, linear.sizes, linear.in_features, self.max_loras,
                                       self.pool_rank, t.dtype, t.device)
            linear.lora = stack
            stacks.append(stack)
        return stacks

    def _drop_pool(self) -> None:
        for _, _, linear in self.transformer.lora_layers():
            linear.lora = None
        self._stacks = None
        for entry in self._entries.values():
            entry.slot = None
        self._slots = OrderedDict((i, None) for i in range(self.max_loras))

    @property
    def pool_bytes(self) -> int:
        return sum(s.a.nbytes + s.b.nbytes + s.scale.nbytes for s in self._stacks or ())


def read_adapter(source: str | os.PathLike, config: ModelConfig, name: str | None = None) -> LoraAdapter:
    """A PEFT directory (adapter_config.json + adapter_model.safetensors), a GGUF LoRA file, or the name of an adapter
    realm ships (`realm.lora.packaged_adapters()`: pirate, robot)."""
    path = resolve_adapter(source)
    if path.is_dir():
        from realm.lora.peft import read_peft

        return read_peft(path, name=name, config=config)
    if path.is_file():
        from realm.lora.gguf_lora import read_gguf_lora

        return read_gguf_lora(path, config, name=name)
    raise AdapterError(f"no LoRA adapter at {str(path)!r}: expected a PEFT directory (adapter_config.json + "
                       "adapter_model.safetensors), a GGUF LoRA file, or a packaged adapter's name "
                       f"({', '.join(packaged_adapters()) or 'none installed'})")


def parse_lora_specs(specs: str | os.PathLike | Iterable[str] | Mapping[str, str | os.PathLike] | None,
                     ) -> dict[str, str | os.PathLike]:
    """`NAME=PATH` strings (the CLI's --lora) or bare paths, named after their file or directory (`x.gguf` -> x), or a
    {name: path} mapping. A spec that is an existing path, or whose part before `=` holds a path separator, is a
    path even with an `=` in it."""
    if specs is None:
        return {}
    if isinstance(specs, Mapping):
        return dict(specs)
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    out: dict[str, str | os.PathLike] = {}
    for spec in specs:
        if not isinstance(spec, (str, os.PathLike)):
            raise ValueError(f"a LoRA adapter is NAME=PATH or a path, got {spec!r}")
        name, sep, path = os.fspath(spec).partition("=")
        if not sep or os.path.exists(os.fspath(spec)) or "/" in name or "\\" in name:
            path = spec
            name = Path(spec).name.removesuffix(".gguf")
        if not name or not path:
            raise ValueError(f"--lora takes NAME=PATH or PATH, got {spec!r}")
        if name in out:
            raise ValueError(f"two adapters are named {name!r}")
        out[name] = path
    return out


__all__ = ["LoraMode", "LoraModule", "LoraRegistry", "LoraRows", "LoraStack", "lora_mode_of", "parse_lora_specs",
           "read_adapter"]
