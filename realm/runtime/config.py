"""ModelConfig: a llama-family model's hyperparameters, read from GGUF metadata (`<arch>.block_count`, ...).

    config = ModelConfig.from_metadata(read_metadata(open_gguf(path)))

Architectures are named data (`ARCHITECTURES`): which metadata prefix they use, whether the file stores Q/K rows
permuted for llama.cpp's interleaved rope, and whether attention projections carry biases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


class ModelError(ValueError):
    """A model file realm cannot run: unsupported architecture, missing or inconsistent tensors or metadata."""


# Upper bounds on sizes read from metadata, so that a hostile or corrupt file fails with the key's name instead of
# allocating absurd memory or overflowing downstream. Each is far above any released model.
MAX_CONTEXT = 2**24  # rope_cache computes positions in float32, exact only up to 2**24; the cos/sin table is
#                      context * head_dim * 4 bytes (8 GiB at head_dim 128). Llama 4 Scout's 10M context fits.
MAX_WIDTH = 2**20  # embedding_length, feed_forward_length (Llama 3.1 405B: 16384 and 53248)
MAX_HEADS = 2**12  # attention heads (405B: 128)
MAX_HEAD_DIM = 2**12  # key/value head size (largest released: 256)
MAX_LAYERS = 2**12  # block_count (405B: 126)
MAX_VOCAB = 2**24  # vocabulary entries (Gemma: 262144)
_MISSING: Any = object()


def _found(value: Any) -> str:
    """What a metadata value is, for an error message: its type and (briefly) its value."""
    if value is None:
        return "nothing"
    if isinstance(value, (bool, np.bool_)):
        return f"a bool ({bool(value)})"
    if isinstance(value, (int, np.integer)):
        return f"the integer {int(value)}"
    if isinstance(value, (float, np.floating)):
        return f"the float {float(value)!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, (list, tuple, np.ndarray)):
        return f"an array of {len(value)} items"
    return f"a {type(value).__name__}"


class Metadata:
    """Typed, range-checked reads of GGUF metadata (read_metadata's MetadataValues or plain values). Every failure is
    a ModelError naming the key, what was expected and what was found. A bool is not an integer; a key holding None
    counts as absent. Each read goes through `get`, the one place a key's raw value is fetched."""

    def __init__(self, metadata: Mapping[str, Any]):
        self._values = {k: getattr(v, "value", v) for k, v in metadata.items()}

    def get(self, key: str) -> Any:
        return self._values.get(key)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def _absent(self, key: str, default: Any) -> Any:
        if default is _MISSING:
            raise ModelError(f"GGUF metadata lacks {key}")
        return default

    @staticmethod
    def fail(key: str, expected: str, value: Any, found: str | None = None) -> ModelError:
        return ModelError(f"GGUF metadata {key}: expected {expected}, found {found or _found(value)}")

    def integer(self, key: str, lo: int, hi: int, default: Any = _MISSING) -> int:
        value = self.get(key)
        if value is None:
            return self._absent(key, default)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
            raise self.fail(key, f"an integer in [{lo}, {hi}]", value)
        return int(value)

    def number(self, key: str, lo: float, hi: float, default: Any = _MISSING, open_lo: bool = False) -> float:
        """A finite float (an integer is accepted) in [lo, hi], or (lo, hi] with open_lo."""
        value = self.get(key)
        if value is None:
            return self._absent(key, default)
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        if ok:
            value = float(value)
            ok = math.isfinite(value) and (lo < value if open_lo else lo <= value) and value <= hi
        if not ok:
            raise self.fail(key, f"a finite number in {'(' if open_lo else '['}{lo}, {hi}]", value)
        return value

    def string(self, key: str, default: Any = _MISSING) -> str:
        value = self.get(key)
        if value is None:
            return self._absent(key, default)
        if not isinstance(value, str):
            raise self.fail(key, "a string", value)
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self.get(key)
        if value is None:
            return self._absent(key, default)
        if not isinstance(value, (bool, np.bool_)):
            raise self.fail(key, "a bool", value)
        return bool(value)

    def strings(self, key: str, max_items: int, default: Any = _MISSING) -> list[str]:
        """An array of strings, at most max_items long."""
        value = self.get(key)
        if value is None:
            return self._absent(key, default)
        if not isinstance(value, (list, tuple)) or len(value) > max_items:
            raise self.fail(key, f"an array of at most {max_items} strings", value)
        bad = next((v for v in value if not isinstance(v, str)), None)
        if bad is not None:
            raise self.fail(key, "an array of strings", None, f"an array holding {_found(bad)}")
        return list(value)

    def numbers(self, key: str, kind: str, length: int, default: Any = _MISSING) -> np.ndarray:
        """A numeric array of exactly `length` items: kind "int" (integers) or "float" (any number, not NaN)."""
        value = self.get(key)
        if value is None:
            return self._absent(key, default)
        try:
            arr = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
        except (ValueError, TypeError):
            arr = None
        wanted = "iu" if kind == "int" else "iuf"
        expected = f"an array of {length} {'integers' if kind == 'int' else 'numbers'}"
        if arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in wanted):
            raise self.fail(key, expected, value)
        if arr.shape != (length,):
            raise self.fail(key, expected, value)
        if kind == "float" and np.isnan(arr.astype(np.float64)).any():
            raise self.fail(key, expected + " (no NaN)", None, "a NaN")
        return arr


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
    def from_metadata(cls, metadata: Mapping[str, Any] | Metadata, vocab_size: int | None = None) -> ModelConfig:
        """From read_metadata's dict (MetadataValue items) or a plain {key: value} dict. Every key is read typed and
        range-checked (`Metadata`): a wrong type, an impossible value or an inconsistency is a ModelError naming it.

        vocab_size: the embedding's row count, used when `<arch>.vocab_size` is absent (older files).
        """
        md = metadata if isinstance(metadata, Metadata) else Metadata(metadata)
        arch_name = md.string("general.architecture", default=None)
        if arch_name is None:
            raise ModelError("not a model file: GGUF metadata has no general.architecture")
        if arch_name not in ARCHITECTURES:
            raise ModelError(f"unsupported architecture {arch_name[:40]!r}; realm runs: {', '.join(ARCHITECTURES)} "
                             "(general.architecture)")
        a = arch_name
        _refuse_unsupported_rope(a, md)
        hidden = md.integer(f"{a}.embedding_length", 1, MAX_WIDTH)
        n_heads = md.integer(f"{a}.attention.head_count", 1, MAX_HEADS)
        n_kv_heads = md.integer(f"{a}.attention.head_count_kv", 1, n_heads, default=n_heads)
        if n_heads % n_kv_heads:
            raise ModelError(f"GGUF metadata {a}.attention.head_count_kv: {n_heads} query heads are not a multiple "
                             f"of {n_kv_heads} KV heads ({a}.attention.head_count = {n_heads})")
        key_length = f"{a}.attention.key_length"
        if key_length in md:
            head_dim = md.integer(key_length, 2, MAX_HEAD_DIM)
            if head_dim % 2:
                raise ModelError(f"GGUF metadata {key_length}: rope needs an even head size, found {head_dim}")
        else:
            head_dim = hidden // n_heads
            if hidden % n_heads or head_dim % 2:
                raise ModelError(f"GGUF metadata {a}.embedding_length = {hidden} / {a}.attention.head_count = "
                                 f"{n_heads} does not give an even head size (and there is no {key_length})")
        value_length = md.integer(f"{a}.attention.value_length", 1, MAX_HEAD_DIM, default=head_dim)
        if value_length != head_dim:
            raise ModelError(f"GGUF metadata {a}.attention.value_length = {value_length}: models whose value head "
                             f"size differs from the key head size ({head_dim}) are not supported")
        rope_dims = md.integer(f"{a}.rope.dimension_count", 1, MAX_HEAD_DIM, default=head_dim)
        if rope_dims != head_dim:
            raise ModelError(f"GGUF metadata {a}.rope.dimension_count = {rope_dims}: partial rotary embeddings "
                             f"(fewer rope dimensions than the head size {head_dim}) are not supported")
        return cls(
            arch=ARCHITECTURES[a],
            n_layers=md.integer(f"{a}.block_count", 1, MAX_LAYERS),
            hidden=hidden,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            ffn_hidden=md.integer(f"{a}.feed_forward_length", 1, MAX_WIDTH),
            vocab_size=md.integer(f"{a}.vocab_size", 1, MAX_VOCAB, _MISSING if vocab_size is None else vocab_size),
            context_length=md.integer(f"{a}.context_length", 1, MAX_CONTEXT),
            rms_eps=md.number(f"{a}.attention.layer_norm_rms_epsilon", 0.0, 1.0, open_lo=True),
            # theta < 1 is meaningless (frequencies above 1 per position) and tiny values overflow the rope table
            rope_theta=md.number(f"{a}.rope.freq_base", 1.0, 1e30, default=10000.0),
            name=md.string("general.name", default=""),
        )

    def size_keys(self, field: str) -> str:
        """The metadata keys a size field comes from, for messages about tensors whose shape disagrees."""
        a = self.arch.name
        head = f"{a}.attention.key_length or {a}.embedding_length / {a}.attention.head_count"
        return {
            "hidden": f"{a}.embedding_length",
            "ffn_hidden": f"{a}.feed_forward_length",
            "vocab_size": f"{a}.vocab_size or the rows of token_embd.weight",
            "q_size": f"{a}.attention.head_count x head size ({head})",
            "kv_size": f"{a}.attention.head_count_kv x head size ({head})",
        }[field]


def _refuse_unsupported_rope(arch: str, md: Metadata) -> None:
    """Rope scaling (YaRN, linear, Llama 3.1's frequency factors) changes every logit: refuse it, never ignore it."""
    key = f"{arch}.rope.scaling.type"
    scaling = md.string(key, default="none")
    if scaling != "none":
        raise ModelError(f"GGUF metadata {key}: rope scaling {scaling[:40]!r} is not supported yet")
    # llama.cpp reads the factor whatever the type (which defaults to linear when absent); 0 means none there
    for key in (f"{arch}.rope.scale_linear", f"{arch}.rope.scaling.factor"):
        factor = md.number(key, 0.0, math.inf, default=1.0)
        if factor not in (0.0, 1.0):
            raise ModelError(f"GGUF metadata {key}: rope scaling by {factor} is not supported yet")
