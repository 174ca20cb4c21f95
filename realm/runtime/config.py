"""ModelConfig: a llama-family model's hyperparameters, read from GGUF metadata (`<arch>.block_count`, ...).

    config = ModelConfig.from_metadata(read_metadata(open_gguf(path)))

Architectures are named data (`ARCHITECTURES`): which metadata prefix they use, whether the file stores Q/K rows
permuted for llama.cpp's interleaved rope, and whether attention projections carry biases.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


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


def _sliding_window(arch: str, md: Metadata) -> int | None:
    """`<arch>.attention.sliding_window` (Mistral, Phi-3: every layer; Gemma: its local layers); per-layer settings
    in the file are refused by name."""
    for key in (f"{arch}.attention.sliding_window_pattern", f"{arch}.attention.key_length_swa",
                f"{arch}.rope.freq_base_swa", f"{arch}.rope.dimension_count_swa"):
        if key in md:
            raise ModelError(f"GGUF metadata {key}: per-layer sliding-window settings are not supported yet")
    window = md.integer(f"{arch}.attention.sliding_window", 0, MAX_CONTEXT, default=0)
    return window or None  # llama.cpp reads 0 as no window


def _softcap(md: Metadata, key: str) -> float | None:
    cap = md.number(key, 0.0, 1e6, default=0.0)
    return cap or None  # 0: none, as llama.cpp reads it


class RopeScalingType(str, enum.Enum):
    NONE = "none"
    LINEAR = "linear"  # positions divided by the factor (HF "linear", llama.cpp's freq_scale)
    YARN = "yarn"  # NTK-by-parts interpolation and an attention factor on cos/sin (HF "yarn")
    LLAMA3 = "llama3"  # per-frequency factors from the file's rope_freqs.weight (HF "llama3"; Llama 3.1/3.2)


@dataclass(frozen=True)
class RopeScaling:
    """How a model stretches its rope beyond the trained context, as its GGUF metadata says."""

    type: RopeScalingType = RopeScalingType.NONE
    factor: float = 1.0
    original_context: int = 0  # YaRN: the context the model was trained at
    beta_fast: float = 32.0  # YaRN's ramp bounds, in rotations
    beta_slow: float = 1.0

    def inv_freq(self, head_dim: int, theta: float, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [head_dim // 2], computed as HF's rope initialisers compute it (modeling_rope_utils)."""
        base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if self.type is RopeScalingType.LINEAR:
            return base / self.factor
        if self.type is RopeScalingType.LLAMA3:
            # convert_hf_to_gguf.py stores HF's llama3 scaling as the divisors llama.cpp applies (rope_freqs)
            return base / freq_factors
        if self.type is RopeScalingType.YARN:
            return self._yarn(head_dim, theta)
        return base

    @property
    def attention_factor(self) -> float:
        """What cos and sin are multiplied by: YaRN's 0.1 ln(factor) + 1 (HF's default), else 1."""
        if self.type is RopeScalingType.YARN and self.factor > 1:
            return 0.1 * math.log(self.factor) + 1.0
        return 1.0

    def _yarn(self, head_dim: int, theta: float) -> torch.Tensor:
        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(self.original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(self.beta_fast)), 0)
        high = min(math.ceil(correction_dim(self.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001  # HF's guard against a zero-width ramp
        ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        return (1.0 / (self.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


# YaRN variants llama.cpp reads that change the result from HF's default YaRN: refused by name, never ignored
_YARN_UNSUPPORTED = ("rope.scaling.attn_factor", "rope.scaling.yarn_log_multiplier", "rope.scaling.yarn_ext_factor",
                     "rope.scaling.yarn_attn_factor", "rope.scaling.alpha")


def rope_scaling(arch: str, md: Metadata, context_length: int, has_freq_factors: bool) -> RopeScaling:
    """The file's rope scaling; anything realm does not implement is a ModelError naming the key."""
    key = f"{arch}.rope.scaling.type"
    kind = md.string(key, default=None)
    # llama.cpp reads the factor whatever the type (a factor without a type is linear); 0 means none there
    factor = 1.0
    factor_key = f"{arch}.rope.scaling.factor"
    for k in (f"{arch}.rope.scale_linear", factor_key):
        value = md.number(k, 0.0, 1e6, default=1.0)
        if value not in (0.0, 1.0):
            factor, factor_key = value, k
    if kind is None:
        kind = "linear" if factor != 1.0 else "none"
    elif kind == "none" and factor != 1.0:
        raise ModelError(f"GGUF metadata {factor_key} = {factor} with {key} = 'none': is the rope scaled or not?")
    if kind not in {t.value for t in RopeScalingType} - {RopeScalingType.LLAMA3.value}:
        raise ModelError(f"GGUF metadata {key}: rope scaling {kind[:40]!r} is not supported (realm implements none, "
                         "linear, yarn, and Llama 3's rope_freqs)")
    if has_freq_factors:
        if kind != "none":
            raise ModelError(f"rope_freqs.weight together with {key} = {kind!r}: realm implements Llama 3's rope "
                             "factors on an otherwise unscaled rope only")
        return RopeScaling(RopeScalingType.LLAMA3)
    if kind == "none":
        return RopeScaling()
    if factor <= 0:
        raise ModelError(f"GGUF metadata {factor_key}: a {kind} rope scaling needs a factor > 0, found {factor}")
    if kind == "linear":
        return RopeScaling(RopeScalingType.LINEAR, factor)
    for suffix in _YARN_UNSUPPORTED:
        if f"{arch}.{suffix}" in md:
            raise ModelError(f"GGUF metadata {arch}.{suffix}: this YaRN variant is not supported (realm implements "
                             "HF's default YaRN: factor, original context, beta_fast and beta_slow)")
    original = md.integer(f"{arch}.rope.scaling.original_context_length", 1, MAX_CONTEXT,
                          default=round(context_length / factor))
    return RopeScaling(RopeScalingType.YARN, factor, original,
                       md.number(f"{arch}.rope.scaling.yarn_beta_fast", 0.0, 1e6, default=32.0, open_lo=True),
                       md.number(f"{arch}.rope.scaling.yarn_beta_slow", 0.0, 1e6, default=1.0, open_lo=True))


class Activation(str, enum.Enum):
    SILU = "silu"  # SwiGLU: llama, qwen, phi3
    GELU_TANH = "gelu_tanh"  # GeGLU with GELU's tanh approximation: Gemma (HF's gelu_pytorch_tanh)


@dataclass(frozen=True)
class Architecture:
    name: str  # general.architecture
    # convert_hf_to_gguf.py permutes llama's Q/K rows so that ggml's interleaved ("normal") rope computes what HF's
    # rotate-half rope computes on the original rows; qwen2 uses the rotate-half ("neox") rope and is not permuted.
    rope_permuted: bool
    attention_bias: bool  # q/k/v projections have biases (qwen2)
    qk_norm: bool = False  # an RMSNorm over each Q and K head before rope (qwen3: attn_q_norm, attn_k_norm)
    fused_gate_up: bool = False  # ffn_up holds the gate rows then the up rows, and there is no ffn_gate (phi3)
    activation: Activation = Activation.SILU  # the MLP's gate
    # Gemma: RMSNorms on the attention and MLP outputs before they join the residual (post_attention_norm,
    # post_ffw_norm), and the embedding scaled by sqrt(hidden). Its norms' (1 + w) is already in the file: the
    # converter stores w + 1.
    post_norms: bool = False
    embed_scale: bool = False
    # Sliding window on some layers only: every swa_pattern-th layer (1-based) is global, the rest local, as
    # llama.cpp hard-codes for gemma3 (6; the file does not say); 0: the window (if any) on every layer.
    swa_pattern: int = 0
    local_rope_theta: float | None = None  # the local layers' rope base, unscaled (gemma3: 10000; not in the file)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("llama", rope_permuted=True, attention_bias=False),  # Llama 1-3, Mistral, SmolLM, TinyLlama
        Architecture("qwen2", rope_permuted=False, attention_bias=True),
        Architecture("qwen3", rope_permuted=False, attention_bias=False, qk_norm=True),
        # Phi-3/3.5: the Q, K, V rows in one attn_qkv tensor (separate ones are accepted too, as llama.cpp does)
        Architecture("phi3", rope_permuted=False, attention_bias=False, fused_gate_up=True),
        # Gemma 2: local and global layers alternate; scores and logits soft-capped (its file says by how much)
        Architecture("gemma2", rope_permuted=False, attention_bias=False, activation=Activation.GELU_TANH,
                     post_norms=True, embed_scale=True, swa_pattern=2),
        Architecture("gemma3", rope_permuted=False, attention_bias=False, qk_norm=True, activation=Activation.GELU_TANH,
                     post_norms=True, embed_scale=True, swa_pattern=6, local_rope_theta=10000.0),
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
    rope_scaling: RopeScaling = RopeScaling()
    sliding_window: int | None = None  # each query sees the last `sliding_window` keys (itself included); None: all
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the softmax (Gemma 2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)

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

    @property
    def rope_pairs(self) -> int:
        return self.head_dim // 2

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of a layer (None: global attention)."""
        pattern = self.arch.swa_pattern
        if self.sliding_window is None or (pattern and (layer + 1) % pattern == 0):
            return None
        return self.sliding_window

    def layer_rope(self, layer: int) -> tuple[float, RopeScaling]:
        """A layer's rope base and scaling: Gemma 3's local layers use their own base, unscaled."""
        if self.arch.local_rope_theta is not None and self.layer_window(layer) is not None:
            return self.arch.local_rope_theta, RopeScaling()
        return self.rope_theta, self.rope_scaling

    @property
    def attention_scale(self) -> float:
        # Gemma 2 and 3 27B (46 and 62 layers) scale queries by their query_pre_attn_scalar = hidden / heads, which
        # GGUF does not store; llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA2/3) hard-codes it the same way. Every other
        # model: head_dim.
        if (self.arch.name, self.n_layers) in (("gemma2", 46), ("gemma3", 62)):
            return (self.hidden / self.n_heads) ** -0.5
        return self.head_dim**-0.5

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def gate_up_size(self) -> int:
        return 2 * self.ffn_hidden

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any] | Metadata, vocab_size: int | None = None,
                      has_freq_factors: bool = False) -> ModelConfig:
        """From read_metadata's dict (MetadataValue items) or a plain {key: value} dict. Every key is read typed and
        range-checked (`Metadata`): a wrong type, an impossible value or an inconsistency is a ModelError naming it.

        vocab_size: the embedding's row count, used when `<arch>.vocab_size` is absent (older files);
        has_freq_factors: the file has rope_freqs.weight (Llama 3's rope scaling).
        """
        md = metadata if isinstance(metadata, Metadata) else Metadata(metadata)
        arch_name = md.string("general.architecture", default=None)
        if arch_name is None:
            raise ModelError("not a model file: GGUF metadata has no general.architecture")
        if arch_name not in ARCHITECTURES:
            raise ModelError(f"unsupported architecture {arch_name[:40]!r}; realm runs: {', '.join(ARCHITECTURES)} "
                             "(general.architecture)")
        a = arch_name
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
        context_length = md.integer(f"{a}.context_length", 1, MAX_CONTEXT)
        return cls(
            arch=ARCHITECTURES[a],
            n_layers=md.integer(f"{a}.block_count", 1, MAX_LAYERS),
            hidden=hidden,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            ffn_hidden=md.integer(f"{a}.feed_forward_length", 1, MAX_WIDTH),
            vocab_size=md.integer(f"{a}.vocab_size", 1, MAX_VOCAB, _MISSING if vocab_size is None else vocab_size),
            context_length=context_length,
            rms_eps=md.number(f"{a}.attention.layer_norm_rms_epsilon", 0.0, 1.0, open_lo=True),
            # theta < 1 is meaningless (frequencies above 1 per position) and tiny values overflow the rope table
            rope_theta=md.number(f"{a}.rope.freq_base", 1.0, 1e30, default=10000.0),
            name=md.string("general.name", default=""),
            rope_scaling=rope_scaling(a, md, context_length, has_freq_factors),
            sliding_window=_sliding_window(a, md),
            attn_softcap=_softcap(md, f"{a}.attn_logit_softcapping"),
            final_softcap=_softcap(md, f"{a}.final_logit_softcapping"),
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
            "rope_pairs": f"half the head size ({head})",
            "head_dim": f"the head size ({head})",
            "qkv_size": f"({a}.attention.head_count + 2 x {a}.attention.head_count_kv) x head size ({head})",
            "gate_up_size": f"2 x {a}.feed_forward_length",
        }[field]
