"""A tiny llama-like GGUF file for tests, written with gguf-py's own writer (independent of realm.gguf_io).

Row lengths cover the fallback cases: 256 (every block divides it), 96 and 576 (32 divides, 256 does not: real
SmolLM2 width), 33 and 40 (no 32-weight block divides them). Sources are stored in several formats, so re-encoding
dequantizes F32, F16, BF16, legacy and K-quant blocks.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType

from realm.quant import dequantize, get_format, quantize

ARCH = "llama"

# name -> (stored format, logical shape [..., row_length])
TENSORS: dict[str, tuple[str, tuple[int, ...]]] = {
    "token_embd.weight": ("F16", (8, 256)),
    "blk.0.attn_norm.weight": ("F32", (256,)),
    "blk.0.attn_q.weight": ("Q8_0", (16, 256)),
    "blk.0.attn_k.weight": ("BF16", (4, 576)),
    "blk.0.attn_output.weight": ("F32", (5, 40)),
    "blk.0.ffn_up.weight": ("Q4_K", (24, 256)),
    "blk.0.ffn_down.weight": ("Q4_1", (32, 96)),
    "blk.0.ffn_up_exps.weight": ("Q8_0", (2, 3, 64)),
    "blk.0.odd.weight": ("F32", (3, 33)),
    "output_norm.weight": ("F16", (96,)),
}

# key -> (value, type, item type for arrays); every scalar type and arrays of strings and numbers
METADATA: dict[str, tuple[object, GGUFValueType, GGUFValueType | None]] = {
    "general.name": ("tiny test model", GGUFValueType.STRING, None),
    "general.file_type": (int(gguf.LlamaFileType.MOSTLY_Q8_0), GGUFValueType.UINT32, None),
    "general.quantization_version": (2, GGUFValueType.UINT32, None),
    "llama.block_count": (1, GGUFValueType.UINT32, None),
    "llama.context_length": (128, GGUFValueType.UINT64, None),
    "llama.rope.freq_base": (10000.5, GGUFValueType.FLOAT32, None),
    "llama.attention.layer_norm_rms_epsilon": (1e-5, GGUFValueType.FLOAT64, None),
    "test.int8": (-3, GGUFValueType.INT8, None),
    "test.uint8": (250, GGUFValueType.UINT8, None),
    "test.int16": (-30000, GGUFValueType.INT16, None),
    "test.uint16": (60000, GGUFValueType.UINT16, None),
    "test.int32": (-2_000_000_000, GGUFValueType.INT32, None),
    "test.int64": (-(2**40), GGUFValueType.INT64, None),
    "tokenizer.ggml.add_bos_token": (True, GGUFValueType.BOOL, None),
    "tokenizer.ggml.tokens": (["<s>", "</s>", "hello", " world", "é", ""], GGUFValueType.ARRAY, GGUFValueType.STRING),
    "tokenizer.ggml.token_type": ([3, 3, 1, 1, 1, 1], GGUFValueType.ARRAY, GGUFValueType.INT32),
    "tokenizer.ggml.scores": ([0.0, -1.5, 2.25], GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
    "tokenizer.chat_template": ("{{ messages }}", GGUFValueType.STRING, None),
}


def weights(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w.view(-1)[::37] *= 8  # a few outliers, as real weights have
    return w


def source_bytes(name: str) -> torch.Tensor:
    """The bytes write_model stores for tensor `name` (re-quantizing its values need not reproduce them: ggml's
    search quantizers are not idempotent)."""
    fmt, shape = TENSORS[name]
    return quantize(weights(shape, seed=list(TENSORS).index(name)), fmt)


def write_model(
    path: Path, alignment: int | None = None, extra: dict[str, tuple[str, np.ndarray]] | None = None
) -> dict[str, torch.Tensor]:
    """Write the fake model; returns the float32 weights each tensor decodes to (its stored values).

    extra: more tensors stored as-is, name -> (GGML type name, numpy array), e.g. an I32 tensor realm cannot read.
    """
    w = gguf.GGUFWriter(path, ARCH)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, (value, vtype, sub_type) in METADATA.items():
        w.add_key_value(key, value, vtype, sub_type=sub_type)
    stored = {}
    for name, (fmt, shape) in TENSORS.items():
        fmt = get_format(fmt)
        data = source_bytes(name)
        w.add_tensor(name, data.numpy(), raw_dtype=GGMLQuantizationType(fmt.ggml_type))
        stored[name] = dequantize(data, fmt, shape)
    for name, (type_name, array) in (extra or {}).items():
        w.add_tensor(name, array, raw_dtype=GGMLQuantizationType[type_name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored
