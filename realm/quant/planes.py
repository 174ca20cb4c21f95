"""The kernel layout: every block format as bit planes of codes plus scale arrays, one decode rule for all.

Every GGUF format decodes to the same shape of formula, evaluated in float32 in this order (ggml's and gguf-py's):

    scale  = d[k // D] * sub[k // G]            (sub = 1 when the format has no sub-block scales)
    w[k]   = scale * value(code[k]) (+|-) m[k // D] * sub_m[k // G]

where `value` is `code - bias` or a lookup table (IQ4_*, MXFP4), D is the block holding one `d` (32 or 256 weights)
and G the group sharing one sub-block scale (16 or 32). What differs between formats is only how GGUF scatters these
integers over its bytes (nibble halves, 5th-bit masks, 6-bit scales split over 12 bytes, ...). `to_planes` undoes that
once, at load time, into a format-independent structure of arrays:

- codes in natural order, split into at most two bit planes (e.g. Q5_K: a 4-bit plane and a 1-bit plane), each plane
  packing 32 / width consecutive codes into one int32 word, so a kernel unpacks any format with shifts and masks;
- `d` per block in its file encoding (float16, float32 or E8M0 bytes), the integer sub-block scales and mins as int8.

Why this and not GGUF's bytes: a kernel reading GGUF directly needs one decode routine per format (eighteen of them,
each with its own byte shuffles), while here one routine, parametrised by a `PlaneSpec`, serves every format. Why
not dequantized float32 scales: `d * sub` needs ~17 significant bits, so precomputing it would cost 32 bits per
group instead of 8 (Q4_K: 6 instead of 4.6 bits per weight), and the decode kernels are memory-bound.

The layout is lossless: `planes_dequantize(to_planes(q))` equals `realm.quant.dequantize` bit for bit (tests check
every format on random blocks). It costs a little more memory than GGUF where GGUF packs scales below 8 bits:
`PlaneSpec.bits_per_weight` gives the figure (Q4_K 4.625 vs 4.5; Q2_K 3.125 vs 2.625).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .bits import table, unpack_bits, unpack_nibbles
from .kquants import _unpack_q3_scales, _unpack_scale_min
from .legacy import _join_fifth_bit
from .nonlinear import IQ4_VALUES, MXFP4_VALUES, e8m0_to_fp32_half, iq4_xs_scales
from .spec import BlockFormat, QuantError, split_fields

I8 = torch.int8


class Value(str, enum.Enum):
    INT = "int"  # value = code - bias
    TABLE = "table"  # value = table[code]
    F32 = "f32"  # the code is the weight's IEEE bits; no scales
    F16 = "f16"
    BF16 = "bf16"

    @property
    def is_float(self) -> bool:
        return self in (Value.F32, Value.F16, Value.BF16)


class Offset(str, enum.Enum):
    NONE = "none"
    ADD = "add"  # w = scale * value + m            (Q4_1, Q5_1)
    SUB = "sub"  # w = scale * value - m * sub_m    (Q2_K, Q4_K, Q5_K)


class ScaleCode(str, enum.Enum):
    F16 = "f16"
    F32 = "f32"
    E8M0 = "e8m0"  # a power of two stored as its exponent byte (MXFP4), decoded as ggml_e8m0_to_fp32_half


@dataclass(frozen=True)
class PlaneSpec:
    """How one format maps onto the kernel layout. Widths are listed low bits first: (4, 1) means
    code = plane0 | plane1 << 4."""

    widths: tuple[int, ...]
    value: Value
    bias: int = 0
    table: tuple[int, ...] | None = None
    block: int = 32  # D: weights per `d` (and per `m`)
    group: int = 32  # G: weights per sub-block scale; equal to `block` when there are none
    sub_scales: bool = False
    offset: Offset = Offset.NONE
    scale_code: ScaleCode = ScaleCode.F16

    @property
    def code_bits(self) -> int:
        return sum(self.widths)

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight of the kernel layout (GGUF's is `BlockFormat.bits_per_weight`)."""
        if self.value.is_float:
            return float(self.code_bits)
        d_bits = {ScaleCode.F16: 16, ScaleCode.F32: 32, ScaleCode.E8M0: 8}[self.scale_code]
        per_block = d_bits + (16 if self.offset is not Offset.NONE else 0)
        per_group = (8 if self.sub_scales else 0) + (8 if self.offset is Offset.SUB else 0)
        return self.code_bits + per_block / self.block + per_group / self.group


@dataclass(frozen=True)
class Parts:
    """The integers and scales of n blocks of B weights, before packing. Shapes: codes [n, B] int32 (non-negative),
    d [n, B / D], sub / sub_m [n, B / G] int8, m [n, B / D]."""

    codes: torch.Tensor
    d: torch.Tensor | None = None
    sub: torch.Tensor | None = None
    m: torch.Tensor | None = None
    sub_m: torch.Tensor | None = None


Unpack = Callable[[Mapping[str, torch.Tensor]], Parts]


# ---- per-format unpacking: GGUF fields of n blocks -> Parts ------------------------------------------------------

def _float_bits(f):
    v = f["value"]
    bits = {2: torch.int16, 4: torch.int32}[v.element_size()]
    return Parts(codes=v.reshape(-1, 1).view(bits))


def _nibbles(f):
    return Parts(unpack_nibbles(f["qs"]), d=f["d"])


def _nibbles_offset(f):
    return Parts(unpack_nibbles(f["qs"]), d=f["d"], m=f["m"])


def _fifth_bit(f):
    return Parts(_join_fifth_bit(f["qh"], f["qs"]), d=f["d"])


def _fifth_bit_offset(f):
    return Parts(_join_fifth_bit(f["qh"], f["qs"]), d=f["d"], m=f["m"])


def _int8(f):
    return Parts(f["qs"].to(torch.int32) + 128, d=f["d"])


def _mxfp4(f):
    return Parts(unpack_nibbles(f["qs"]), d=f["e"])


def _q2_k(f):
    n = f["qs"].shape[0]
    sc = f["scales"].to(torch.int32)
    codes = unpack_bits(f["qs"].view(n, 2, 32), 4, 2).reshape(n, 256)
    return Parts(codes, d=f["d"], sub=(sc & 0xF).to(I8), m=f["dmin"], sub_m=(sc >> 4).to(I8))


def _q3_k(f):
    n = f["qs"].shape[0]
    low = unpack_bits(f["qs"].view(n, 2, 32), 4, 2).reshape(n, 256)
    high = unpack_bits(f["hmask"], 8, 1).reshape(n, 256)
    return Parts(low | (high << 2), d=f["d"], sub=(_unpack_q3_scales(f["scales"]) - 32).to(I8))


def _q4_k(f):
    n = f["qs"].shape[0]
    sc, mn = _unpack_scale_min(f["scales"])
    codes = unpack_bits(f["qs"].view(n, 4, 32), 2, 4).reshape(n, 256)
    return Parts(codes, d=f["d"], sub=sc.to(I8), m=f["dmin"], sub_m=mn.to(I8))


def _q5_k(f):
    n = f["qs"].shape[0]
    sc, mn = _unpack_scale_min(f["scales"])
    low = unpack_bits(f["qs"].view(n, 4, 32), 2, 4).reshape(n, 256)
    high = unpack_bits(f["qh"], 8, 1).reshape(n, 256)
    return Parts(low | (high << 4), d=f["d"], sub=sc.to(I8), m=f["dmin"], sub_m=mn.to(I8))


def _q6_k(f):
    n = f["ql"].shape[0]
    low = unpack_bits(f["ql"].view(n, 2, 64), 2, 4).reshape(n, 256)
    high = unpack_bits(f["qh"].view(n, 2, 32), 4, 2).reshape(n, 256)
    return Parts(low | (high << 4), d=f["d"], sub=f["scales"])


def _q8_k(f):
    return Parts(f["qs"].to(torch.int32) + 128, d=f["d"])


def _iq4_xs(f):
    n = f["qs"].shape[0]
    codes = unpack_bits(f["qs"].view(n, 8, 16), 2, 4).reshape(n, 256)
    return Parts(codes, d=f["d"], sub=iq4_xs_scales(f).to(I8))


_FLOAT = {"block": 1, "group": 1}
_K = {"block": 256, "sub_scales": True}
PLANE_SPECS: dict[str, tuple[PlaneSpec, Unpack]] = {
    "F32": (PlaneSpec((32,), Value.F32, **_FLOAT), _float_bits),
    "F16": (PlaneSpec((16,), Value.F16, **_FLOAT), _float_bits),
    "BF16": (PlaneSpec((16,), Value.BF16, **_FLOAT), _float_bits),
    "Q4_0": (PlaneSpec((4,), Value.INT, bias=8), _nibbles),
    "Q4_1": (PlaneSpec((4,), Value.INT, offset=Offset.ADD), _nibbles_offset),
    "Q5_0": (PlaneSpec((4, 1), Value.INT, bias=16), _fifth_bit),
    "Q5_1": (PlaneSpec((4, 1), Value.INT, offset=Offset.ADD), _fifth_bit_offset),
    "Q8_0": (PlaneSpec((8,), Value.INT, bias=128), _int8),
    "Q8_1": (PlaneSpec((8,), Value.INT, bias=128), _int8),
    "Q2_K": (PlaneSpec((2,), Value.INT, group=16, offset=Offset.SUB, **_K), _q2_k),
    "Q3_K": (PlaneSpec((2, 1), Value.INT, bias=4, group=16, **_K), _q3_k),
    "Q4_K": (PlaneSpec((4,), Value.INT, group=32, offset=Offset.SUB, **_K), _q4_k),
    "Q5_K": (PlaneSpec((4, 1), Value.INT, group=32, offset=Offset.SUB, **_K), _q5_k),
    "Q6_K": (PlaneSpec((4, 2), Value.INT, bias=32, group=16, **_K), _q6_k),
    "Q8_K": (PlaneSpec((8,), Value.INT, bias=128, block=256, group=256, scale_code=ScaleCode.F32), _q8_k),
    "IQ4_NL": (PlaneSpec((4,), Value.TABLE, table=IQ4_VALUES), _nibbles),
    "IQ4_XS": (PlaneSpec((4,), Value.TABLE, table=IQ4_VALUES, group=32, **_K), _iq4_xs),
    "MXFP4": (PlaneSpec((4,), Value.TABLE, table=MXFP4_VALUES, scale_code=ScaleCode.E8M0), _mxfp4),
}


def plane_spec(fmt: BlockFormat) -> PlaneSpec:
    try:
        return PLANE_SPECS[fmt.name][0]
    except KeyError:
        raise QuantError(f"format {fmt.name} has no kernel layout") from None


# ---- packing -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Planes:
    """A weight [N, K] in the kernel layout. planes[i]: int32 [N, K * width_i / 32] (for FLOAT formats the raw bits,
    int16/int32 [N, K]); d, m: [N, K / D]; sub, sub_m: int8 [N, K / G]; absent members are None."""

    spec: PlaneSpec
    planes: tuple[torch.Tensor, ...]
    d: torch.Tensor | None
    sub: torch.Tensor | None
    m: torch.Tensor | None
    sub_m: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.planes, self.d, self.sub, self.m, self.sub_m) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str) -> Planes:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Planes(self.spec, tuple(move(p) for p in self.planes), *(move(t) for t in
                                                                         (self.d, self.sub, self.m, self.sub_m)))


def pack_codes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """[n, K] ints of `width` bits -> int32 [n, K * width / 32]: code k in bits (k % per_word) * width of word
    k // per_word, per_word = 32 / width."""
    per_word = 32 // width
    n, k = codes.shape
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * width
    words = (codes.to(torch.int64).view(n, k // per_word, per_word) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_codes(words: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of `pack_codes`: int32 [n, W] -> int32 [n, W * 32 / width]."""
    per_word = 32 // width
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * width
    return ((words.unsqueeze(-1) >> shifts) & ((1 << width) - 1)).flatten(-2)


def to_planes(data: torch.Tensor, fmt: BlockFormat, shape: tuple[int, int]) -> Planes:
    """GGUF bytes uint8 [N, row_bytes] of a weight [N, K] -> Planes (exact)."""
    spec, unpack = PLANE_SPECS[fmt.name]
    n, k = shape
    parts = unpack(split_fields(fmt, data.reshape(-1, fmt.block_bytes)))
    rows = lambda t: None if t is None else t.reshape(n, -1).contiguous()  # noqa: E731
    if spec.value.is_float:
        planes = (rows(parts.codes),)
    else:
        codes = parts.codes.reshape(n, k)
        planes, shift = [], 0
        for width in spec.widths:
            planes.append(pack_codes((codes >> shift) & ((1 << width) - 1), width))
            shift += width
        planes = tuple(planes)
    return Planes(spec, planes, rows(parts.d), rows(parts.sub), rows(parts.m), rows(parts.sub_m))


def planes_dequantize(p: Planes, shape: tuple[int, int]) -> torch.Tensor:
    """The torch reference decode of the kernel layout: float32 [N, K], in the module docstring's order."""
    spec, (n, k) = p.spec, shape
    if spec.value.is_float:
        bits = p.planes[0]
        if spec.value is Value.F32:
            return bits.view(torch.float32).clone()
        if spec.value is Value.BF16:
            return (bits.to(torch.int32) << 16).view(torch.float32)
        return bits.view(torch.float16).float()
    codes, shift = torch.zeros(n, k, dtype=torch.int32, device=p.planes[0].device), 0
    for plane, width in zip(p.planes, spec.widths, strict=True):
        codes |= unpack_codes(plane, width) << shift
        shift += width
    values = table(spec.table, codes.device)[codes] if spec.value is Value.TABLE else (codes - spec.bias).float()
    d = e8m0_to_fp32_half(p.d) if spec.scale_code is ScaleCode.E8M0 else p.d.float()
    scale = _per_group(d, spec.block // spec.group)
    if spec.sub_scales:
        scale = scale * p.sub.float()
    w = scale.unsqueeze(-1) * values.view(n, -1, spec.group)
    if spec.offset is not Offset.NONE:
        off = _per_group(p.m.float(), spec.block // spec.group)
        if p.sub_m is not None:
            off = off * p.sub_m.float()
        w = w + off.unsqueeze(-1) if spec.offset is Offset.ADD else w - off.unsqueeze(-1)
    return w.view(n, k)


def _per_group(per_block: torch.Tensor, groups_per_block: int) -> torch.Tensor:
    return per_block.repeat_interleave(groups_per_block, dim=1) if groups_per_block > 1 else per_block

