"""Block-format specs: what a GGUF block holds, byte for byte.

A format is data: its block size, its fields in storage order (name, element type, count) and two codecs that map
between field tensors and float32 weights. Byte layouts follow ggml's structs in `ggml-common.h` (not gguf-py's size
table, which lists Q8_1 as 40 bytes where `block_q8_1` is 36).

`split_fields` turns a uint8 tensor of blocks into one tensor per field (a view per field, no copy of the weights'
meaning); `join_fields` is its inverse. Both are exact, so a field-wise ("structure of arrays") layout of a weight is a
lossless repacking of the GGUF bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

Fields = dict[str, torch.Tensor]
# decode: fields of n blocks -> float32 [n, block_size]; encode: float32 [n, block_size] -> fields of n blocks
Decoder = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
Encoder = Callable[[torch.Tensor], Fields]


class QuantError(ValueError):
    """Invalid input to quantization, dequantization or a GGUF file operation."""


@dataclass(frozen=True)
class Field:
    """One member of a block struct: `count` elements of `dtype`, stored little-endian."""

    name: str
    dtype: torch.dtype
    count: int

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize

    def __str__(self) -> str:
        return f"{self.name}: {str(self.dtype).removeprefix('torch.')}[{self.count}]"


@dataclass(frozen=True)
class BlockFormat:
    """A GGUF tensor type: `block_size` weights stored in `block_bytes` bytes laid out as `fields`.

    storage: llama.cpp can hold weights in this type. Q8_1 and Q8_K are activation formats: ggml quantizes
    activations to them for its integer dot products, and a model file with Q8_1/Q8_K weights does not load.
    """

    name: str
    ggml_type: int
    block_size: int
    fields: tuple[Field, ...]
    decode: Decoder = field(repr=False, compare=False)
    encode: Encoder = field(repr=False, compare=False)
    description: str = ""
    storage: bool = True

    @property
    def block_bytes(self) -> int:
        return sum(f.nbytes for f in self.fields)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_size

    def row_bytes(self, row_length: int) -> int:
        """Bytes of one row of `row_length` weights; raises if the row does not split into whole blocks."""
        if row_length % self.block_size:
            raise QuantError(
                f"row length {row_length} is not a multiple of the {self.name} block size {self.block_size}"
            )
        return row_length // self.block_size * self.block_bytes

    def layout(self) -> str:
        """The block struct in one line, e.g. `d: float16[1], qs: uint8[16]`."""
        return ", ".join(str(f) for f in self.fields)

    def __str__(self) -> str:
        return self.name


def split_fields(fmt: BlockFormat, blocks: torch.Tensor) -> Fields:
    """uint8 [n, block_bytes] -> {field name: [n, count] tensor of the field's dtype}."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != fmt.block_bytes:
        raise QuantError(
            f"{fmt.name} blocks must be uint8 [n, {fmt.block_bytes}], got {blocks.dtype} {tuple(blocks.shape)}"
        )
    out: Fields = {}
    offset = 0
    for f in fmt.fields:
        raw = blocks[:, offset : offset + f.nbytes]
        # Reinterpreting bytes needs a contiguous last dimension; a copy of the slice is cheap next to decoding.
        out[f.name] = raw.contiguous().view(f.dtype) if f.dtype != torch.uint8 else raw
        offset += f.nbytes
    return out


def join_fields(fmt: BlockFormat, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """{field name: [n, count]} -> uint8 [n, block_bytes], the exact inverse of `split_fields`."""
    missing = [f.name for f in fmt.fields if f.name not in fields]
    extra = sorted(set(fields) - {f.name for f in fmt.fields})
    if missing or extra:
        raise QuantError(f"{fmt.name} fields mismatch: missing {missing}, unexpected {extra}")
    parts = []
    for f in fmt.fields:
        t = fields[f.name]
        if t.dtype != f.dtype or t.dim() != 2 or t.shape[1] != f.count:
            raise QuantError(
                f"{fmt.name} field {f.name} must be {f.dtype} [n, {f.count}], got {t.dtype} {tuple(t.shape)}"
            )
        # flatten first: a [n, 1] tensor may count as contiguous with a last stride != 1, which view(uint8) rejects
        parts.append(t.contiguous().view(-1).view(torch.uint8).view(t.shape[0], f.nbytes))
    return torch.cat(parts, dim=1)
