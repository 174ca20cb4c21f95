"""Formats whose 4-bit codes index a non-linear value table: IQ4_NL, IQ4_XS and MXFP4.

IQ4_NL/IQ4_XS use ggml's `kvalues_iq4nl` table (denser near zero, where weights concentrate), quantized as ggml's
`quantize_iq4_nl` / `quantize_iq4_xs` without an importance matrix (weights x^2, 15 grid stretches). MXFP4 is the
OCP microscaling format: FP4 (E2M1) codes with a shared power-of-two (E8M0) scale per 32, quantized as ggml's
`quantize_row_mxfp4_ref` (exponent from the block max, nearest code per weight).
"""

from __future__ import annotations

import torch

from .bits import (
    argmax_abs,
    best_index,
    inverse_or_zero,
    nearest_int,
    pack_nibbles,
    table,
    to_fp16,
    unpack_bits,
    unpack_nibbles,
)
from .search import iq4_block_scales
from .spec import BlockFormat, Field

F16, U8 = torch.float16, torch.uint8

IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# E2M1 values times 2 (ggml's kvalues_mxfp4); the scale is halved to match (e8m0_to_fp32_half)
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


# ---- IQ4_NL: 32 weights, one fp16 scale -----------------------------------------------------------------------------

def _decode_iq4_nl(f):
    values = table(IQ4_VALUES, f["qs"].device)
    return f["d"].float() * values[unpack_nibbles(f["qs"])]


def _encode_iq4_nl(x):
    values = table(IQ4_VALUES, x.device)
    d = iq4_block_scales(x, values)
    return {"d": to_fp16(d), "qs": pack_nibbles(best_index(values, inverse_or_zero(d) * x))}


# ---- IQ4_XS: 256 weights, fp16 super-scale, 8 six-bit signed sub-scales --------------------------------------------

def iq4_xs_scales(f) -> torch.Tensor:
    """The 8 signed sub-block scales (-32..31) of each IQ4_XS block: int32 [n, 8]."""
    n = f["qs"].shape[0]
    high = f["scales_h"].to(torch.int32)
    high = unpack_bits((high[:, 0] | (high[:, 1] << 8)).unsqueeze(1), 8, 2).view(n, 8)  # uint16, 2 bits per scale
    low = unpack_nibbles(f["scales_l"]).view(n, 2, 4).transpose(1, 2).reshape(n, 8)  # byte i: scale 2i low, 2i+1 high
    return (low | (high << 4)) - 32


def _decode_iq4_xs(f):
    n = f["qs"].shape[0]
    dl = (f["d"].float() * iq4_xs_scales(f).float()).view(n, 8, 1)
    q = unpack_bits(f["qs"].view(n, 8, 16), 2, 4).reshape(n, 8, 32)
    return (dl * table(IQ4_VALUES, q.device)[q]).view(n, 256)


def _encode_iq4_xs(x):
    n = x.shape[0]
    values = table(IQ4_VALUES, x.device)
    sub = x.reshape(n * 8, 32)
    scales = iq4_block_scales(sub, values).view(n, 8)
    max_scale, _ = argmax_abs(scales)
    d = -max_scale / 32  # the super-scale is not rounded to fp16 before the sub-scales are fitted, as in ggml
    ls = nearest_int(inverse_or_zero(d) * scales).clamp(-32, 31)
    codes = best_index(values, inverse_or_zero(d * ls).view(n * 8, 1) * sub).view(n, 8, 32)
    ls = ls.to(torch.int32) + 32
    scales_l = ((ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)).to(U8)
    high = ((ls >> 4) << (2 * torch.arange(8, device=x.device, dtype=torch.int32))).sum(-1, keepdim=True)
    scales_h = torch.cat([high & 0xFF, high >> 8], dim=1).to(U8)
    qs = pack_nibbles(codes.reshape(n * 8, 32)).view(n, 128)
    return {"d": to_fp16(d), "scales_h": scales_h, "scales_l": scales_l, "qs": qs}


# ---- MXFP4: 32 E2M1 codes, one E8M0 exponent ------------------------------------------------------------------------

def e8m0_to_fp32_half(e: torch.Tensor) -> torch.Tensor:
    """ggml_e8m0_to_fp32_half: 2^(e - 128) as float32, built from its bits (subnormal for e < 2)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, 0x00200000 << e.clamp(max=1), (e - 1) << 23)
    return bits.view(torch.float32)


def _decode_mxfp4(f):
    values = table(MXFP4_VALUES, f["qs"].device)
    return e8m0_to_fp32_half(f["e"]) * values[unpack_nibbles(f["qs"])]


def _encode_mxfp4(x):
    amax = x.abs().amax(-1, keepdim=True)
    # C: (uint8_t)(floorf(log2f(amax)) - 2 + 127); clamped so that tiny blocks (amax < 2^-125) get the smallest scale
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2 + 127, 0).clamp(0, 255).to(U8)
    d = e8m0_to_fp32_half(exponent)
    values = table(MXFP4_VALUES, x.device)
    codes = (values * d.unsqueeze(-1) - x.unsqueeze(-1)).abs().argmin(dim=-1)  # first of equal errors, as ggml
    return {"e": exponent, "qs": pack_nibbles(codes)}


FORMATS_NONLINEAR: tuple[BlockFormat, ...] = (
    BlockFormat("IQ4_NL", 20, 32, (Field("d", F16, 1), Field("qs", U8, 16)), _decode_iq4_nl, _encode_iq4_nl,
                "4-bit codes into a non-linear table, one fp16 scale per 32"),
    BlockFormat("IQ4_XS", 23, 256,
                (Field("d", F16, 1), Field("scales_h", U8, 2), Field("scales_l", U8, 4), Field("qs", U8, 128)),
                _decode_iq4_xs, _encode_iq4_xs, "IQ4_NL codes, 8 sub-blocks of 32 with 6-bit scales"),
    BlockFormat("MXFP4", 39, 32, (Field("e", U8, 1), Field("qs", U8, 16)), _decode_mxfp4, _encode_mxfp4,
                "OCP MX FP4: E2M1 codes with an E8M0 power-of-two scale per 32"),
)
