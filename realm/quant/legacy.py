"""Unquantized types (F32, F16, BF16) and the legacy 32-weight block formats (Q4_0 .. Q8_1).

Quantizers follow ggml's `quantize_row_*_ref` (what llama-quantize runs without an importance matrix) operation for
operation, so they produce llama.cpp's bytes. Dequantizers evaluate in the same order as ggml and gguf-py
(`d * q`, then `+ m`), so they are bit-identical to both.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .bits import (
    argmax_abs,
    inverse_or_zero,
    little_endian_u32,
    pack_nibbles,
    round_half_away,
    to_fp16,
    u32_to_bytes,
    unpack_nibbles,
)
from .spec import BlockFormat, Field

F16, F32, I8, U8 = torch.float16, torch.float32, torch.int8, torch.uint8


# ---- unquantized -------------------------------------------------------------------------------------------------

def _scalar_format(name: str, ggml_type: int, dtype: torch.dtype, description: str) -> BlockFormat:
    def decode(f: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return f["value"].to(torch.float32)

    def encode(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"value": x.to(dtype)}  # round to nearest even, as ggml's fp32 -> fp16/bf16

    return BlockFormat(name, ggml_type, 1, (Field("value", dtype, 1),), decode, encode, description)


# ---- helpers -----------------------------------------------------------------------------------------------------

def _symmetric_scale(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0: d = max / -levels with max the signed value of largest magnitude, so max maps to q = 0."""
    signed_max, _ = argmax_abs(x)
    d = signed_max / -levels
    return d, inverse_or_zero(d)


def _affine_scale(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1: d = (max - min) / levels, offset m = min."""
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    d = (hi - lo) / levels
    return d, inverse_or_zero(d), lo


def _split_fifth_bit(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """5-bit q [n, 32] -> (qh: 4 bytes, bit j = bit 4 of q[j]; qs: low nibbles packed)."""
    bit = torch.arange(32, device=q.device, dtype=torch.int64)
    qh = (((q.to(torch.int64) >> 4) & 1) << bit).sum(dim=-1, keepdim=True)
    return u32_to_bytes(qh), pack_nibbles(q & 0x0F)


def _join_fifth_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    bit = torch.arange(32, device=qs.device, dtype=torch.int64)
    high = ((little_endian_u32(qh) >> bit) & 1).to(torch.int32)
    return unpack_nibbles(qs) | (high << 4)


# ---- Q4_0 / Q4_1 / Q5_0 / Q5_1 -------------------------------------------------------------------------------------

def _decode_q4_0(f):
    return f["d"].float() * (unpack_nibbles(f["qs"]) - 8).float()


def _encode_q4_0(x):
    d, inv = _symmetric_scale(x, 8)
    q = torch.trunc(x * inv + 8.5).clamp(max=15)  # C: MIN(15, (int8_t)(x*id + 8.5f))
    return {"d": to_fp16(d), "qs": pack_nibbles(q.to(torch.int32))}


def _decode_q4_1(f):
    return f["d"].float() * unpack_nibbles(f["qs"]).float() + f["m"].float()


def _encode_q4_1(x):
    d, inv, lo = _affine_scale(x, 15)
    q = torch.trunc((x - lo) * inv + 0.5).clamp(max=15)
    return {"d": to_fp16(d), "m": to_fp16(lo), "qs": pack_nibbles(q.to(torch.int32))}


def _decode_q5_0(f):
    return f["d"].float() * (_join_fifth_bit(f["qh"], f["qs"]) - 16).float()


def _encode_q5_0(x):
    d, inv = _symmetric_scale(x, 16)
    q = torch.trunc(x * inv + 16.5).clamp(max=31).to(torch.int32)
    qh, qs = _split_fifth_bit(q)
    return {"d": to_fp16(d), "qh": qh, "qs": qs}


def _decode_q5_1(f):
    return f["d"].float() * _join_fifth_bit(f["qh"], f["qs"]).float() + f["m"].float()


def _encode_q5_1(x):
    d, inv, lo = _affine_scale(x, 31)
    q = torch.trunc((x - lo) * inv + 0.5).clamp(max=31).to(torch.int32)
    qh, qs = _split_fifth_bit(q)
    return {"d": to_fp16(d), "m": to_fp16(lo), "qh": qh, "qs": qs}


# ---- Q8_0 / Q8_1 -------------------------------------------------------------------------------------------------

def _decode_q8(f):
    return f["d"].float() * f["qs"].float()


def _q8_levels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.abs().amax(dim=-1, keepdim=True) / 127
    return d, round_half_away(x * inverse_or_zero(d))


def _encode_q8_0(x):
    d, q = _q8_levels(x)
    return {"d": to_fp16(d), "qs": q.to(I8)}


def _encode_q8_1(x):
    # s = d * sum(q) lets a dot product with an offset format (Q4_1, Q5_1) fold in the offset once per block.
    d, q = _q8_levels(x)
    s = q.sum(dim=-1, keepdim=True) * d  # C: (float)(int sum) * d
    return {"d": to_fp16(d), "s": to_fp16(s), "qs": q.to(I8)}


def _legacy(name, ggml_type, fields, decode, encode, description, storage=True) -> BlockFormat:
    return BlockFormat(name, ggml_type, 32, fields, decode, encode, description, storage)


FORMATS_LEGACY: tuple[BlockFormat, ...] = (
    _scalar_format("F32", 0, F32, "IEEE float32"),
    _scalar_format("F16", 1, F16, "IEEE float16"),
    _scalar_format("BF16", 30, torch.bfloat16, "bfloat16 (float32 with the low 16 mantissa bits rounded off)"),
    _legacy("Q4_0", 2, (Field("d", F16, 1), Field("qs", U8, 16)), _decode_q4_0, _encode_q4_0,
            "4-bit symmetric: w = d * (q - 8)"),
    _legacy("Q4_1", 3, (Field("d", F16, 1), Field("m", F16, 1), Field("qs", U8, 16)), _decode_q4_1, _encode_q4_1,
            "4-bit affine: w = d * q + m"),
    _legacy("Q5_0", 6, (Field("d", F16, 1), Field("qh", U8, 4), Field("qs", U8, 16)), _decode_q5_0, _encode_q5_0,
            "5-bit symmetric: w = d * (q - 16), 5th bits in qh"),
    _legacy("Q5_1", 7, (Field("d", F16, 1), Field("m", F16, 1), Field("qh", U8, 4), Field("qs", U8, 16)),
            _decode_q5_1, _encode_q5_1, "5-bit affine: w = d * q + m, 5th bits in qh"),
    _legacy("Q8_0", 8, (Field("d", F16, 1), Field("qs", I8, 32)), _decode_q8, _encode_q8_0,
            "8-bit symmetric: w = d * q"),
    _legacy("Q8_1", 9, (Field("d", F16, 1), Field("s", F16, 1), Field("qs", I8, 32)), _decode_q8, _encode_q8_1,
            "8-bit activations: w = d * q, s = d * sum(q)", storage=False),
)
