"""LoRA adapters as GGUF files, in the format llama.cpp's convert_lora_to_gguf.py writes and llama-adapter.cpp loads.

    adapter = read_gguf_lora("pirate.gguf", config)      # rows back in HF order, scales as llama.cpp applies them
    written = write_gguf_lora(adapter, config, "pirate.gguf")

The file: metadata general.type = "adapter", adapter.type = "lora", adapter.lora.alpha (FLOAT32), general.architecture
= the base model's; per adapted matrix `blk.N.<name>.weight` two tensors, `blk.N.<name>.weight.lora_a` [r, in] (ggml
ne (in, r)) and `.lora_b` [out, r] (ne (r, out)). llama.cpp adds `scale * lora_b @ (lora_a @ x)` to that matrix's
output, with (src/llama-adapter.h, llama_adapter_lora_weight::get_scale):

    rank = lora_b.ne[0];  scale = alpha ? adapter_scale * alpha / rank : adapter_scale

where adapter_scale is the user's multiplier (1 by default) and alpha is 0 when the key is absent. One alpha for the
whole file: the per-module scales of rsLoRA (alpha / sqrt(r)) or of alpha_pattern / rank_pattern cannot all be
written as alpha / r. The writer picks the alpha that expresses the most modules' scales exactly and folds the rest
of each other module's scale into its lora_b (lora_b * scale / (alpha / r)), so that llama.cpp computes the same
delta; read back, such a module has the file's scale and the folded lora_b (equal product, not equal parts).

llama's Q/K rows are permuted in GGUF for ggml's interleaved rope (convert_hf_to_gguf.py's permute), and an adapter's
Q/K lora_b rows with them (lora_a acts on the input side, which is not permuted): the writer permutes, the reader
undoes it, so a LoraAdapter always holds HF row order.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
import torch
from gguf import GGUFValueType

from ..gguf_io import (
    GGUFError,
    MetadataValue,
    TensorSpec,
    open_gguf,
    read_metadata,
    tensor_shape,
    tensor_to_float,
    write_gguf,
)
from ..quant import FORMATS, quantize
from .adapter import GGUF_NAMES, AdapterError, LoraAdapter, LoraModule, Target

if TYPE_CHECKING:
    from realm.runtime.config import ModelConfig

TYPE_KEY = gguf.Keys.General.TYPE  # "general.type" = "adapter"
ADAPTER_TYPE_KEY = gguf.Keys.Adapter.TYPE  # "adapter.type" = "lora"
ALPHA_KEY = gguf.Keys.Adapter.LORA_ALPHA  # "adapter.lora.alpha", FLOAT32 (llama.cpp reads it with gguf_get_val_f32)
ALORA_KEY = "adapter.alora.invocation_tokens"  # activated LoRA: applied only after these tokens
ARCH_KEY = gguf.Keys.General.ARCHITECTURE
WRITE_FORMATS = ("F32", "F16", "BF16")  # what convert_lora_to_gguf.py writes, less Q8_0 (ranks are rarely x32)
_TARGETS = {name: target for target, name in GGUF_NAMES.items()}


@dataclass(frozen=True)
class WrittenLora:
    """What write_gguf_lora wrote: the file's alpha and the modules whose scale was folded into lora_b."""

    path: Path
    alpha: float  # adapter.lora.alpha (a float32 value)
    folded: tuple[tuple[int, Target], ...]  # modules whose scale is not alpha / rank: lora_b carries the rest
    fmt: str  # tensor type
    nbytes: int  # the file's size


def llama_cpp_scale(alpha: float, rank: int) -> float:
    """The scale llama.cpp applies to a module of this rank (at the user's adapter scale 1): alpha / rank, or 1 when
    alpha is 0 (llama_adapter_lora_weight::get_scale). Computed in double; rounded to float32 it is llama.cpp's value
    exactly (the quotient of two float32s, correctly rounded)."""
    return float(alpha) / rank if alpha != 0 else 1.0


# ---------------------------------------------------------------------------------------------------- row order


def permute_rope_rows(b: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rows -> GGUF rows (convert_hf_to_gguf.py's permute): per head, GGUF row (i, j) holds HF row (j, i),
    i < head_dim / 2, j < 2. b: [n_heads * head_dim, r]."""
    return b.reshape(n_heads, 2, b.shape[0] // n_heads // 2, *b.shape[1:]).transpose(1, 2).reshape(b.shape)


def unpermute_rope_rows(b: torch.Tensor, n_heads: int) -> torch.Tensor:
    """GGUF rows -> HF rows, the inverse of permute_rope_rows."""
    return b.reshape(n_heads, b.shape[0] // n_heads // 2, 2, *b.shape[1:]).transpose(1, 2).reshape(b.shape)


def _in_order(item) -> tuple[int, int]:
    """Sort key of a ((layer, target), value) item: by layer, then q, k, v, o, gate, up, down."""
    (layer, target), _ = item
    return layer, list(Target).index(target)


def _rope_heads(target: Target, config: ModelConfig) -> int | None:
    """Heads whose rows the file permutes for this target, or None."""
    if not config.arch.rope_permuted:
        return None
    return {Target.Q: config.n_heads, Target.K: config.n_kv_heads}.get(target)


# ---------------------------------------------------------------------------------------------------------- reading


def read_gguf_lora(path: str | os.PathLike, config: ModelConfig, name: str | None = None) -> LoraAdapter:
    """A llama.cpp GGUF LoRA adapter for a base model of `config`, as a LoraAdapter (float32, HF row order, each
    module's scale as llama.cpp applies it at adapter scale 1). AdapterError naming the key or tensor for a file that
    is not a LoRA adapter for this architecture, an unknown tensor, a pair missing a half, or shapes that do not fit.
    Tensors may be stored in any format realm reads (llama.cpp's converter writes F32, F16, BF16 or Q8_0)."""
    path = Path(path)
    try:
        reader = open_gguf(path)
        metadata = read_metadata(reader)
    except GGUFError as e:
        raise AdapterError(str(e)) from None
    alpha = _check_metadata(metadata, config, path)
    pairs: dict[tuple[int, Target], dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        layer, target, half = _parse_name(t.name, path)
        shape = tensor_shape(t)
        if len(shape) != 2:
            raise AdapterError(f"{path}: tensor {t.name!r} has shape {list(shape)}; expected a matrix")
        try:
            value = tensor_to_float(t).clone()  # cloned: the adapter outlives the file's map
        except (GGUFError, ValueError) as e:
            raise AdapterError(f"{path}: tensor {t.name!r}: {e}") from None
        pairs.setdefault((layer, target), {})[half] = value
    modules = {}
    for (layer, target), pair in sorted(pairs.items(), key=_in_order):
        base = f"blk.{layer}.{target.gguf_name}.weight"
        for half in ("lora_a", "lora_b"):
            if half not in pair:
                raise AdapterError(f"{path}: tensor {base}.{half} is missing (the file has only its other half)")
        a, b = pair["lora_a"], pair["lora_b"]
        out_features, in_features = target.shape(config)
        if a.shape[1] != in_features or b.shape[0] != out_features or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{path}: tensors {base}.lora_a {list(a.shape)} and {base}.lora_b {list(b.shape)} do "
                               f"not fit the base model's [{out_features}, {in_features}] {base} (expected lora_a "
                               f"[r, {in_features}] and lora_b [{out_features}, r])")
        heads = _rope_heads(target, config)
        if heads is not None:
            b = unpermute_rope_rows(b, heads)
        modules[(layer, target)] = LoraModule(a, b.contiguous(), llama_cpp_scale(alpha, a.shape[0]))
    adapter = LoraAdapter(name or path.stem, modules, source=str(path),
                          metadata={"format": "gguf", "alpha": alpha, "name": _string(metadata, "general.name")})
    adapter.check(config)  # layers in range, finite values
    return adapter


def _string(metadata: dict[str, MetadataValue], key: str) -> str | None:
    value = metadata.get(key)
    return value.value if value is not None and value.type == GGUFValueType.STRING else None


def _check_metadata(metadata: dict[str, MetadataValue], config: ModelConfig, path: Path) -> float:
    """The file is a LoRA adapter for config's architecture; returns adapter.lora.alpha (0 when absent)."""
    kind = _string(metadata, TYPE_KEY)
    if kind != "adapter":
        hint = " (this looks like a model file)" if ARCH_KEY in metadata and kind in (None, "model") else ""
        raise AdapterError(f"{path}: metadata {TYPE_KEY} is {kind!r}, expected 'adapter'{hint}")
    adapter_type = _string(metadata, ADAPTER_TYPE_KEY)
    if adapter_type != "lora":
        raise AdapterError(f"{path}: metadata {ADAPTER_TYPE_KEY} is {adapter_type!r}, expected 'lora'")
    arch = _string(metadata, ARCH_KEY)
    if arch != config.arch.name:
        raise AdapterError(f"{path}: metadata {ARCH_KEY} is {arch!r} but the base model is {config.arch.name!r}")
    if ALORA_KEY in metadata:
        raise AdapterError(f"{path}: metadata {ALORA_KEY}: activated LoRA (aLoRA) adapters are not supported")
    value = metadata.get(ALPHA_KEY)
    if value is None:
        return 0.0  # llama.cpp's default: scale 1
    if value.type != GGUFValueType.FLOAT32 or not math.isfinite(value.value):
        # llama.cpp reads it with gguf_get_val_f32, which aborts on any other type
        raise AdapterError(f"{path}: metadata {ALPHA_KEY} must be a finite FLOAT32, found {value.value!r} "
                           f"({value.type.name})")
    return float(value.value)


def _parse_name(name: str, path: Path) -> tuple[int, Target, str]:
    """blk.N.<gguf_name>.weight.lora_a / .lora_b -> (N, target, "lora_a" / "lora_b")."""
    parts = name.split(".")
    ok = (len(parts) == 5 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _TARGETS
          and parts[3] == "weight" and parts[4] in ("lora_a", "lora_b"))
    if ok:
        return int(parts[1]), _TARGETS[parts[2]], parts[4]
    if name.startswith("token_embd."):
        why = "adapting the token embedding is not supported"
    elif name.startswith("output."):
        why = "adapting the output head is not supported"
    elif name.endswith("_norm.weight"):
        why = "norm weights in an adapter (mergekit-extract-lora) are not supported"
    else:
        why = ("unknown tensor; expected blk.N.{" + ",".join(GGUF_NAMES.values()) + "}.weight.lora_a / .lora_b")
    raise AdapterError(f"{path}: tensor {name!r}: {why}")


# ---------------------------------------------------------------------------------------------------------- writing


def _encode(value: torch.Tensor, fmt: str, name: str) -> torch.Tensor:
    try:
        return quantize(value, fmt)
    except ValueError as e:  # QuantError: e.g. a value beyond F16's range
        raise AdapterError(f"tensor {name}: {e}") from None


def _choose_alpha(adapter: LoraAdapter) -> float:
    """The float32 alpha for which alpha / rank is the scale of the most modules (ties: the one met first); 0, which
    llama.cpp reads as scale 1, only when every module's scale is 0 (their lora_b is then zeroed by the fold)."""
    candidates = Counter(float(np.float32(m.scale * m.rank)) for m in adapter.modules.values() if m.scale != 0)
    return candidates.most_common(1)[0][0] if candidates else 0.0


def write_gguf_lora(adapter: LoraAdapter, config: ModelConfig, path: str | os.PathLike,
                    fmt: str = "F32") -> WrittenLora:
    """Write `adapter` (checked against config) as a llama.cpp GGUF LoRA for a base model of config.

    Every module's scale is reproduced exactly by llama.cpp's rule alpha / rank where one alpha can; a module whose
    scale it cannot express (rsLoRA, alpha_pattern, rank_pattern with rsLoRA) has the ratio folded into its lora_b
    (listed in the result's `folded`). fmt: the tensors' type, one of WRITE_FORMATS. The file appears at path only
    when complete."""
    if fmt not in WRITE_FORMATS:
        raise AdapterError(f"tensor type {fmt!r} is not supported for LoRA files; use one of "
                           f"{', '.join(WRITE_FORMATS)}")
    adapter.check(config)
    path = Path(path)
    alpha = _choose_alpha(adapter)
    specs: list[TensorSpec] = []
    data: list[torch.Tensor] = []
    folded = []
    for (layer, target), m in sorted(adapter.modules.items(), key=_in_order):
        b = m.b
        ratio = m.scale / llama_cpp_scale(alpha, m.rank)
        if ratio != 1.0:
            b = (b.double() * ratio).to(torch.float32)
            folded.append((layer, target))
        heads = _rope_heads(target, config)
        if heads is not None:
            b = permute_rope_rows(b, heads)
        base = f"blk.{layer}.{target.gguf_name}.weight"
        for half, value in (("lora_a", m.a), ("lora_b", b)):
            specs.append(TensorSpec(f"{base}.{half}", tuple(value.shape), FORMATS[fmt]))
            data.append(value.contiguous() if fmt == "F32" else _encode(value, fmt, f"{base}.{half}"))
    V = GGUFValueType
    metadata = {
        ARCH_KEY: MetadataValue(config.arch.name, V.STRING),
        TYPE_KEY: MetadataValue("adapter", V.STRING),
        "general.name": MetadataValue(adapter.name, V.STRING),
        ADAPTER_TYPE_KEY: MetadataValue("lora", V.STRING),
        ALPHA_KEY: MetadataValue(alpha, V.FLOAT32),
    }
    try:
        write_gguf(path, metadata, specs, data)
    except GGUFError as e:
        raise AdapterError(str(e)) from None
    return WrittenLora(path, alpha, tuple(folded), fmt, path.stat().st_size)


__all__ = [
    "WRITE_FORMATS",
    "WrittenLora",
    "llama_cpp_scale",
    "permute_rope_rows",
    "read_gguf_lora",
    "unpermute_rope_rows",
    "write_gguf_lora",
]
