"""Rounding and bit-packing helpers shared by the codecs.

Every helper mirrors one C idiom of ggml's reference code (`ggml-quants.c`) so the quantizers give the same bytes:
`roundf`, the `nearest_int` float trick, truncating casts, fp16 storage of scales, the binary search over a
non-linear value table.
"""

from __future__ import annotations

import numpy as np
import torch


def f32(value: float) -> float:
    """A Python float rounded to float32, for scalar constants that C computes in float (e.g. `rmin + 0.1f*is`)."""
    return float(np.float32(value))


def rdiv(num: float, den: torch.Tensor) -> torch.Tensor:
    """num / den, correctly rounded. PyTorch evaluates `scalar / tensor` as `reciprocal(tensor) * scalar`, which can
    differ from C's division in the last bit; dividing two tensors does not."""
    return torch.div(torch.tensor(num, dtype=den.dtype, device=den.device), den)


def sqrt_f32(t: torch.Tensor) -> torch.Tensor:
    """C `sqrtf`, correctly rounded. torch's vectorised float32 sqrt on CPU is off by an ulp on ~0.7% of inputs; the
    float64 root rounded to float32 is exact (float64 carries more than the 2 * 24 + 2 bits that requires)."""
    return torch.sqrt(t.double()).float()


def inverse_or_zero(d: torch.Tensor) -> torch.Tensor:
    """C `d ? 1.0f/d : 0.0f`."""
    nonzero = d != 0
    return torch.where(nonzero, rdiv(1.0, torch.where(nonzero, d, 1.0)), 0.0)


def seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the first dimension, left to right, keepdim: [n, B] -> [1, B], as a C `for` loop accumulating in
    float. torch.sum's vectorised tree order rounds differently, which flips near-tie choices in the scale searches.
    The searches keep the element index first so that each step adds one contiguous row."""
    acc = t[0].clone()
    for row in t[1:]:
        acc += row
    return acc.unsqueeze(0)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C `roundf`: halves round away from zero. floor(a + 0.5) is wrong at 0.49999997, so split off the fraction."""
    a = x.abs()
    whole = a.floor()
    return torch.copysign(whole + (2 * (a - whole)).floor(), x)


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's `nearest_int` (add 1.5 * 2^23, read the mantissa) is round-half-to-even, i.e. `torch.round`."""
    return torch.round(x)


def to_fp16(x: torch.Tensor) -> torch.Tensor:
    """Store as float16 (round to nearest even, as GGML_FP32_TO_FP16)."""
    return x.to(torch.float16)


def fp16_value(x: torch.Tensor) -> torch.Tensor:
    """The float32 value a scale has after a float16 round trip, as ggml reads it back (GGML_FP16_TO_FP32)."""
    return x.to(torch.float16).to(torch.float32)


def as_u8(x: torch.Tensor) -> torch.Tensor:
    """C conversion of an integer to uint8_t: modulo 256."""
    return torch.remainder(x.to(torch.int32), 256).to(torch.uint8)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 2m] ints in 0..15 -> [n, m] bytes: element j in the low nibble of byte j, element m + j in the high."""
    half = q.shape[-1] // 2
    q = q.to(torch.int32)
    return (q[..., :half] | (q[..., half:] << 4)).to(torch.uint8)


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: [n, m] bytes -> [n, 2m] int32 (low nibbles first, then high)."""
    q = qs.to(torch.int32)
    return torch.cat([q & 0x0F, q >> 4], dim=-1)


def pack_bits(bits: torch.Tensor, shifts: int, width: int) -> torch.Tensor:
    """[..., shifts, m] ints of `width` bits -> [..., m] bytes, plane k shifted left by k * width."""
    q = bits.to(torch.int32)
    out = torch.zeros_like(q[..., 0, :])
    for k in range(shifts):
        out |= q[..., k, :] << (k * width)
    return out.to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shifts: int, width: int) -> torch.Tensor:
    """Inverse of `pack_bits`: [..., m] bytes -> [..., shifts, m] int32."""
    q = packed.to(torch.int32).unsqueeze(-2)
    k = torch.arange(shifts, device=packed.device, dtype=torch.int32).view(shifts, 1) * width
    return (q >> k) & ((1 << width) - 1)


def little_endian_u32(b: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes -> [n, 1] int64 (a uint32 read little-endian, as `memcpy(&qh, ...)`)."""
    b = b.to(torch.int64)
    return (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)).unsqueeze(1)


def u32_to_bytes(v: torch.Tensor) -> torch.Tensor:
    """[n, 1] int64 holding a uint32 -> [n, 4] bytes little-endian."""
    shifts = torch.tensor([0, 8, 16, 24], device=v.device, dtype=torch.int64)
    return ((v >> shifts) & 0xFF).to(torch.uint8)


def table(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def best_index(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ggml's `best_index_int8`: index of the entry of the sorted table `values` nearest to x (ties go up)."""
    n = values.numel()
    mu = torch.searchsorted(values, x.contiguous(), right=True).clamp(1, n - 1)
    lower, upper = values[mu - 1], values[mu]
    idx = torch.where(x - lower < upper - x, mu - 1, mu)
    idx = torch.where(x <= values[0], 0, idx)
    return torch.where(x >= values[n - 1], n - 1, idx)


def argmax_abs(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(signed value, |value|) of the first element of largest magnitude along dim (keepdim), as ggml's
    `if (amax < fabsf(v))` loop."""
    i = x.abs().argmax(dim=dim, keepdim=True)
    signed = x.gather(dim, i)
    return signed, signed.abs()
