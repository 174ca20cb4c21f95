"""K-quants: 256-weight super-blocks with quantized per-sub-block scales (Q2_K .. Q6_K) and Q8_K activations.

Quantizers are ggml's `quantize_row_q*_K_ref` (llama-quantize without an importance matrix): a weighted scale/min
search per sub-block (realm.quant.search), then the sub-block scales themselves quantized to 4/6/8 bits against one
float16 super-scale, then every weight re-rounded against the scale it will really be decoded with.
Dequantizers evaluate in ggml's and gguf-py's order, so they are bit-identical to both.
"""

from __future__ import annotations

import torch

from .bits import argmax_abs, as_u8, nearest_int, pack_bits, rdiv, seq_sum, sqrt_f32, to_fp16, unpack_bits
from .search import GROUP_MAX_EPS, make_q3_quants, make_qkx2_quants, make_qx_quants
from .spec import BlockFormat, Field

QK_K = 256
F16, F32, I8, I16, U8 = torch.float16, torch.float32, torch.int8, torch.int16, torch.uint8


def _inverse(num: float, den: torch.Tensor) -> torch.Tensor:
    """C `den > 0 ? num/den : 0`."""
    ok = den > 0
    return torch.where(ok, rdiv(num, torch.where(ok, den, 1.0)), 0.0)


def _largest_positive(t: torch.Tensor) -> torch.Tensor:
    """C `float m = 0; for (...) if (v > m) m = v;`: +0.0 when nothing is positive (clamp would keep a -0.0, which
    then lands in the file as a negative-zero scale)."""
    m = t.amax(-1, keepdim=True)
    return torch.where(m > 0, m, 0.0)


def _requantize(x, levels, scale, offset, lo, hi):
    """Re-round every weight against the decoded (fp16-rounded) sub-block scale: l = round((x + offset) / scale).
    Sub-blocks whose decoded scale is 0 keep the levels of the search, as in ggml (`if (!d) continue`)."""
    live = scale != 0
    fresh = nearest_int((x + offset) / torch.where(live, scale, 1.0)).clamp(lo, hi)
    return torch.where(live, fresh, levels)


# ---- Q2_K: 16 x 16 weights, 2-bit levels, 4-bit scales and mins --------------------------------------------------

def _decode_q2_k(f):
    n = f["qs"].shape[0]
    sc = f["scales"].to(torch.int32)
    dl = (f["d"].float() * (sc & 0xF).float()).view(n, 16, 1)
    ml = (f["dmin"].float() * (sc >> 4).float()).view(n, 16, 1)
    q = unpack_bits(f["qs"].view(n, 2, 32), 4, 2).reshape(n, 16, 16).float()
    return (dl * q - ml).view(n, QK_K)


def _encode_q2_k(x):
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    scales, mins, levels = make_qkx2_quants(sub, sub.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.view(n, 16), mins.view(n, 16)
    max_scale = _largest_positive(scales)
    max_min = _largest_positive(mins)
    ls = torch.where(max_scale > 0, nearest_int(_inverse(15.0, max_scale) * scales), 0).to(torch.int32)
    lm = torch.where(max_min > 0, nearest_int(_inverse(15.0, max_min) * mins), 0).to(torch.int32)
    packed = as_u8(ls | (lm << 4))
    d, dmin = to_fp16(max_scale / 15), to_fp16(max_min / 15)
    p = packed.to(torch.int32)
    dq = (d.float() * (p & 0xF).float()).view(n * 16, 1)
    dm = (dmin.float() * (p >> 4).float()).view(n * 16, 1)
    levels = _requantize(sub, levels, dq, dm, 0, 3).view(n, 2, 4, 32)
    return {"scales": packed, "qs": pack_bits(levels, 4, 2).view(n, 64), "d": d, "dmin": dmin}


# ---- Q3_K: 16 x 16 weights, 3-bit levels (2 low bits + a high-bit mask), 6-bit signed scales -----------------------

def _unpack_q3_scales(scales: torch.Tensor) -> torch.Tensor:
    """12 bytes -> 16 scales in 0..63: low nibbles in bytes 0..7 (j < 8 low, j >= 8 high), 2 high bits in 8..11."""
    s = scales.to(torch.int32)
    low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
    high = unpack_bits(s[:, 8:], 4, 2).reshape(-1, 16)
    return low | (high << 4)


def _pack_q3_scales(l6: torch.Tensor) -> torch.Tensor:
    low = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    high = pack_bits((l6 >> 4).view(-1, 4, 4), 4, 2)
    return torch.cat([low.to(U8), high], dim=1)


def _decode_q3_k(f):
    n = f["qs"].shape[0]
    dl = (f["d"].float() * (_unpack_q3_scales(f["scales"]) - 32).float()).view(n, 16, 1)
    low = unpack_bits(f["qs"].view(n, 2, 32), 4, 2).reshape(n, 16, 16)
    high = unpack_bits(f["hmask"], 8, 1).reshape(n, 16, 16)
    q = (low - ((high ^ 1) << 2)).float()  # a set mask bit means no -4 offset
    return (dl * q).view(n, QK_K)


def _encode_q3_k(x):
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    scales, levels = make_q3_quants(sub, 4)
    scales = scales.view(n, 16)
    max_scale, _ = argmax_abs(scales)
    live = max_scale != 0
    iscale = rdiv(-32.0, torch.where(live, max_scale, 1.0))
    l6 = torch.where(live, nearest_int(iscale * scales).clamp(-32, 31) + 32, 0).to(torch.int32)
    d = to_fp16(torch.where(live, rdiv(1.0, iscale), 0.0))
    dq = (d.float() * (l6 - 32).float()).view(n * 16, 1)
    levels = _requantize(sub, levels - 4, dq, 0.0, -4, 3).to(torch.int32).view(n, QK_K) + 4
    high = levels > 3
    hmask = pack_bits(high.view(n, 8, 32), 8, 1)
    low = (levels - 4 * high.to(torch.int32)).view(n, 2, 4, 32)
    return {"hmask": hmask, "qs": pack_bits(low, 4, 2).view(n, 64), "scales": _pack_q3_scales(l6), "d": d}


# ---- Q4_K / Q5_K: 8 x 32 weights, 4/5-bit levels, 6-bit scales and mins -------------------------------------------

def _unpack_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml get_scale_min_k4: 12 bytes -> 8 six-bit scales and 8 six-bit mins."""
    s = scales.to(torch.int32)
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _pack_scale_min(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    first = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    second = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([first, second, third], dim=1).to(U8)


def _decode_affine_k(f, q):
    n = q.shape[0]
    sc, mn = _unpack_scale_min(f["scales"])
    d = (f["d"].float() * sc.float()).view(n, 8, 1)
    dm = (f["dmin"].float() * mn.float()).view(n, 8, 1)
    return (d * q.float() - dm).view(n, QK_K)


def _decode_q4_k(f):
    n = f["qs"].shape[0]
    return _decode_affine_k(f, unpack_bits(f["qs"].view(n, 4, 32), 2, 4).reshape(n, 8, 32))


def _decode_q5_k(f):
    n = f["qs"].shape[0]
    low = unpack_bits(f["qs"].view(n, 4, 32), 2, 4).reshape(n, 8, 32)
    high = unpack_bits(f["qh"], 8, 1).reshape(n, 8, 32)
    return _decode_affine_k(f, low | (high << 4))


def _affine_k_levels(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """Shared Q4_K/Q5_K search: weights av_x + |x| (av_x the sub-block's RMS), 6-bit scales and mins."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    av_x = sqrt_f32(seq_sum((sub * sub).t()).t() / 32)
    scales, mins, levels = make_qkx2_quants(sub, av_x + sub.abs(), nmax, rmin, 0.1, nstep, use_mad=False)
    scales, mins = scales.view(n, 8), mins.view(n, 8)
    max_scale = _largest_positive(scales)
    max_min = _largest_positive(mins)
    ls = as_u8(nearest_int(_inverse(63.0, max_scale) * scales)).to(torch.int32).clamp(max=63)
    lm = as_u8(nearest_int(_inverse(63.0, max_min) * mins)).to(torch.int32).clamp(max=63)
    d, dmin = to_fp16(max_scale / 63), to_fp16(max_min / 63)
    dq = (d.float() * ls.float()).view(n * 8, 1)
    dm = (dmin.float() * lm.float()).view(n * 8, 1)
    levels = _requantize(sub, levels, dq, dm, 0, nmax).to(torch.int32).view(n, 4, 2, 32)
    return {"d": d, "dmin": dmin, "scales": _pack_scale_min(ls, lm)}, levels


def _encode_q4_k(x):
    fields, levels = _affine_k_levels(x, 15, -1.0, 20)
    fields["qs"] = pack_bits(levels, 2, 4).view(x.shape[0], 128)
    return fields


def _encode_q5_k(x):
    n = x.shape[0]
    fields, levels = _affine_k_levels(x, 31, -0.5, 15)
    fields["qh"] = pack_bits((levels >> 4).view(n, 8, 32), 8, 1)
    fields["qs"] = pack_bits(levels & 0xF, 2, 4).view(n, 128)
    return fields


# ---- Q6_K: 16 x 16 weights, 6-bit levels (4 low + 2 high bits), int8 scales ----------------------------------------

def _decode_q6_k(f):
    n = f["ql"].shape[0]
    d = (f["d"].float() * f["scales"].float()).view(n, 16, 1)
    low = unpack_bits(f["ql"].view(n, 2, 64), 2, 4).reshape(n, 8, 32)
    high = unpack_bits(f["qh"].view(n, 2, 32), 4, 2).reshape(n, 8, 32)
    q = ((low | (high << 4)) - 32).view(n, 16, 16).float()
    return (d * q).view(n, QK_K)


def _encode_q6_k(x):
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    scales, levels = make_qx_quants(sub, 32)
    scales = scales.view(n, 16)
    max_scale, max_abs = argmax_abs(scales)
    live = max_abs >= GROUP_MAX_EPS
    iscale = rdiv(-128.0, torch.where(live, max_scale, 1.0))
    d = to_fp16(torch.where(live, rdiv(1.0, iscale), 0.0))
    sc = torch.where(live, nearest_int(iscale * scales).clamp(max=127), 0).to(I8)
    dq = (d.float() * sc.float()).view(n * 16, 1)
    levels = _requantize(sub, levels - 32, dq, 0.0, -32, 31).to(torch.int32) + 32
    levels = torch.where(live.repeat_interleave(16, 0), levels, 0).view(n, 2, 4, 32)  # dead blocks are all zero bytes
    low = levels & 0xF
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=-1)
    qh = pack_bits(levels >> 4, 4, 2)
    return {"ql": ql.to(U8).view(n, 128), "qh": qh.view(n, 64), "scales": sc, "d": d}


# ---- Q8_K: 256 int8 with a float32 scale and 16-element sums --------------------------------------------------------

def _decode_q8_k(f):
    return f["d"] * f["qs"].float()


def _encode_q8_k(x):
    n = x.shape[0]
    signed_max, amax = argmax_abs(x)
    live = amax != 0
    # -127 (not -128) keeps |q| <= 127, which ggml's AVX dot products rely on
    iscale = rdiv(-127.0, torch.where(live, signed_max, 1.0))
    q = torch.where(live, nearest_int(iscale * x).clamp(max=127), 0).to(torch.int32)
    bsums = q.view(n, 16, 16).sum(-1).to(I16)
    return {"d": torch.where(live, rdiv(1.0, iscale), 0.0), "qs": q.to(I8), "bsums": bsums}


def _kquant(name, ggml_type, fields, decode, encode, description, storage=True) -> BlockFormat:
    return BlockFormat(name, ggml_type, QK_K, fields, decode, encode, description, storage)


FORMATS_K: tuple[BlockFormat, ...] = (
    _kquant("Q2_K", 10,
            (Field("scales", U8, 16), Field("qs", U8, 64), Field("d", F16, 1), Field("dmin", F16, 1)),
            _decode_q2_k, _encode_q2_k, "2-bit levels, 16 sub-blocks of 16 with 4-bit scale and min"),
    _kquant("Q3_K", 11,
            (Field("hmask", U8, 32), Field("qs", U8, 64), Field("scales", U8, 12), Field("d", F16, 1)),
            _decode_q3_k, _encode_q3_k, "3-bit levels, 16 sub-blocks of 16 with 6-bit scale"),
    _kquant("Q4_K", 12,
            (Field("d", F16, 1), Field("dmin", F16, 1), Field("scales", U8, 12), Field("qs", U8, 128)),
            _decode_q4_k, _encode_q4_k, "4-bit levels, 8 sub-blocks of 32 with 6-bit scale and min"),
    _kquant("Q5_K", 13,
            (Field("d", F16, 1), Field("dmin", F16, 1), Field("scales", U8, 12), Field("qh", U8, 32),
             Field("qs", U8, 128)),
            _decode_q5_k, _encode_q5_k, "5-bit levels, 8 sub-blocks of 32 with 6-bit scale and min"),
    _kquant("Q6_K", 14,
            (Field("ql", U8, 128), Field("qh", U8, 64), Field("scales", I8, 16), Field("d", F16, 1)),
            _decode_q6_k, _encode_q6_k, "6-bit levels, 16 sub-blocks of 16 with int8 scale"),
    _kquant("Q8_K", 15,
            (Field("d", F32, 1), Field("qs", I8, 256), Field("bsums", I16, 16)),
            _decode_q8_k, _encode_q8_k, "8-bit activations: w = d * q, with sums of each 16", storage=False),
)
