"""ModelConfig: a llama-family model's hyperparameters, read from GGUF metadata (`<arch>.block_count`, ...).

    config = ModelConfig.from_metadata(read_metadata(open_gguf(path)))

Architectures are named data (`ARCHITECTURES`): which metadata prefix they use, whether the file stores Q/K rows
permuted for llama.cpp's interleaved rope, and whether attention projections carry biases.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ModelError(ValueError):
    """A model file realm cannot run: unsupported architecture, missing or inconsistent tensors or metadata."""


@dataclass(frozen=True)
class Architecture:
    name: str  # general.architecture
    # convert_hf_to_gguf.py permutes llama's Q/K rows so that ggml's interleaved ("normal") rope computes what HF's
    # rotate-half rope computes on the original rows; qwen2 uses the rotate-half ("neox") rope and is not permuted.
    rope_permuted: bool
    attention_bias: bool  # q/k/v projections have biases (qwen2)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("llama", rope_permuted=True, attention_bias=False),  # Llama 1-3, Mistral, SmolLM, TinyLlama
        Architecture("qwen2", rope_permuted=False, attention_bias=True),
    )
}


@dataclass(frozen=True)
class ModelConfig:
    arch: Architecture
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_theta: float
    name: str = ""

    def __post_init__(self):
        for field in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "vocab_size",
                      "context_length"):
            if getattr(self, field) < 1:
                raise ModelError(f"model config: {field} must be >= 1, got {getattr(self, field)}")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"model config: {self.n_heads} query heads are not a multiple of "
                             f"{self.n_kv_heads} KV heads")
        if self.head_dim % 2:
            raise ModelError(f"model config: rope needs an even head_dim, got {self.head_dim}")
        if not self.rms_eps > 0 or not self.rope_theta > 0:
            raise ModelError(f"model config: rms_eps and rope_theta must be > 0, got {self.rms_eps}, "
                             f"{self.rope_theta}")

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], vocab_size: int | None = None) -> ModelConfig:
        """From read_metadata's dict (MetadataValue items) or a plain {key: value} dict.

        vocab_size: the embedding's row count, used when `<arch>.vocab_size` is absent (older files).
        """
        values = {k: getattr(v, "value", v) for k, v in metadata.items()}
        arch_name = values.get("general.architecture")
        if arch_name is None:
            raise ModelError("not a model file: GGUF metadata has no general.architecture")
        if arch_name not in ARCHITECTURES:
            raise ModelError(f"unsupported architecture {arch_name!r}; realm runs: {', '.join(ARCHITECTURES)}")

        def get(key: str, default: Any = None) -> Any:
            value = values.get(f"{arch_name}.{key}", default)
            if value is None:
                raise ModelError(f"GGUF metadata lacks {arch_name}.{key}")
            return value

        _refuse_unsupported_rope(arch_name, values)
        hidden = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", hidden // n_heads))
        if int(get("attention.value_length", head_dim)) != head_dim:
            raise ModelError("models whose value head size differs from the key head size are not supported")
        if int(get("rope.dimension_count", head_dim)) != head_dim:
            raise ModelError("partial rotary embeddings (rope.dimension_count < head size) are not supported")
        return cls(
            arch=ARCHITECTURES[arch_name],
            n_layers=int(get("block_count")),
            hidden=hidden,
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            ffn_hidden=int(get("feed_forward_length")),
            vocab_size=int(get("vocab_size", vocab_size)),
            context_length=int(get("context_length")),
            rms_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            name=str(values.get("general.name", "")),
        )


def _refuse_unsupported_rope(arch: str, values: Mapping[str, Any]) -> None:
    """Rope scaling (YaRN, linear, Llama 3.1's frequency factors) changes every logit: refuse it, never ignore it."""
    scaling = values.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ModelError(f"rope scaling {scaling!r} is not supported yet")
    factor = values.get(f"{arch}.rope.scale_linear", 1.0)
    if float(factor) != 1.0:
        raise ModelError(f"linear rope scaling (factor {factor}) is not supported yet")
