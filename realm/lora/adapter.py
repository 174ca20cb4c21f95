"""A LoRA adapter as realm holds it: per (layer, target) module, the low-rank pair and its scale, rows in HF order.

    adapter = LoraAdapter("pirate", {(0, Target.Q): LoraModule(a, b, scale=2.0), ...}, source="adapters/pirate")
    adapter.check(config)                  # shapes against a base model: ValueError naming the module
    delta = module.scale * ((x @ module.a.T) @ module.b.T)       # what the module adds to the base layer's output

Whatever the file (PEFT's safetensors, llama.cpp's GGUF LoRA), an adapter becomes this: `a` is [rank, in_features],
`b` is [out_features, rank], both in the order of the HF model's rows, so a GGUF adapter's Q/K `lora_b` rows are
unpermuted as the base model's Q/K rows are (realm.runtime.weights.unpermute_rope_rows). `scale` is what PEFT calls
`scaling`: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA, per module (rank_pattern / alpha_pattern).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from realm.runtime.config import ModelConfig


class Target(str, enum.Enum):
    """The linear layers an adapter may adapt: attention's q, k, v, o and the MLP's gate, up, down."""

    Q = "q"
    K = "k"
    V = "v"
    O = "o"
    GATE = "gate"
    UP = "up"
    DOWN = "down"

    @property
    def peft_name(self) -> str:  # HF llama's module name
        return PEFT_NAMES[self]

    @property
    def gguf_name(self) -> str:  # llama.cpp's tensor name, blk.N.<gguf_name>.weight
        return GGUF_NAMES[self]

    def shape(self, config: ModelConfig) -> tuple[int, int]:
        """(out_features, in_features) of this layer in a model of config."""
        c = config
        return {Target.Q: (c.q_size, c.hidden), Target.K: (c.kv_size, c.hidden), Target.V: (c.kv_size, c.hidden),
                Target.O: (c.hidden, c.q_size), Target.GATE: (c.ffn_hidden, c.hidden),
                Target.UP: (c.ffn_hidden, c.hidden), Target.DOWN: (c.hidden, c.ffn_hidden)}[self]


PEFT_NAMES = {Target.Q: "q_proj", Target.K: "k_proj", Target.V: "v_proj", Target.O: "o_proj",
              Target.GATE: "gate_proj", Target.UP: "up_proj", Target.DOWN: "down_proj"}
GGUF_NAMES = {Target.Q: "attn_q", Target.K: "attn_k", Target.V: "attn_v", Target.O: "attn_output",
              Target.GATE: "ffn_gate", Target.UP: "ffn_up", Target.DOWN: "ffn_down"}


class AdapterError(ValueError):
    """An adapter that cannot be used: the message names the file, the field or module, and what was wrong."""


@dataclass(frozen=True, eq=False)
class LoraModule:
    a: torch.Tensor  # [rank, in_features], float32
    b: torch.Tensor  # [out_features, rank], float32, rows in HF order
    scale: float  # the delta is scale * (x @ a.T) @ b.T

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(eq=False)
class LoraAdapter:
    name: str
    modules: dict[tuple[int, Target], LoraModule]  # (layer, target) -> its pair; layers and targets not here: none
    source: str = ""  # where it was read from, for messages
    metadata: dict[str, object] = field(default_factory=dict)  # e.g. the PEFT config's base model name

    def __repr__(self) -> str:
        return (f"LoraAdapter({self.name!r}, {len(self.modules)} modules, rank {self.max_rank}, "
                f"targets {','.join(t.value for t in self.targets)})")

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def targets(self) -> list[Target]:
        present = {t for _, t in self.modules}
        return [t for t in Target if t in present]

    @property
    def nbytes(self) -> int:
        return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size() for m in self.modules.values())

    def check(self, config: ModelConfig) -> None:
        """Every module fits the base model: its layer exists, a is [r, in_features], b is [out_features, r], values
        are finite. AdapterError naming the first module that does not."""
        where = f"adapter {self.name!r}" + (f" ({self.source})" if self.source else "")
        if not self.modules:
            raise AdapterError(f"{where} adapts no layer")
        for (layer, target), m in self.modules.items():
            name = f"layer {layer} {target.peft_name}"
            if not 0 <= layer < config.n_layers:
                raise AdapterError(f"{where}: {name}: the base model has {config.n_layers} layers")
            out_features, in_features = target.shape(config)
            r = m.a.shape[0] if m.a.dim() == 2 else -1
            fits = m.a.dim() == 2 and r >= 1 and m.a.shape[1] == in_features and m.b.shape == (out_features, r)
            if not fits:
                raise AdapterError(f"{where}: {name}: lora_A {list(m.a.shape)} and lora_B {list(m.b.shape)} do not "
                                   f"fit the base model's [{out_features}, {in_features}] layer (expected lora_A "
                                   f"[r, {in_features}] and lora_B [{out_features}, r])")
            if not (torch.isfinite(m.a).all() and torch.isfinite(m.b).all()):
                raise AdapterError(f"{where}: {name}: lora_A or lora_B holds NaN or inf")
            if not (isinstance(m.scale, float) and abs(m.scale) < float("inf")):
                raise AdapterError(f"{where}: {name}: scale must be a finite float, got {m.scale!r}")
