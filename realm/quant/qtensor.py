"""QTensor: a quantized weight matrix [N, K] that kernels consume.

It holds the GGUF block bytes as read from a file (`Layout.GGUF`) or a lossless repacking of them. The one repacked
layout defined here, `Layout.FIELDS`, stores each block field as its own contiguous tensor [N, K / block_size, count]
(structure of arrays), so a kernel loads scales and codes with unit-stride vector loads instead of striding over
18..292-byte structs; `.repack()` and back are exact, so dequantized values never change.

`Layout.PLANES` is what realm's kernels read: `realm.quant.planes.Planes`, the same weight unpacked into bit planes
of codes and integer scales, one layout for every format (see that module for why). Its dequantized values equal
the GGUF ones bit for bit; it is a one-way repacking (kept in memory for the kernels, never written to a file).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .api import dequantize, quantize, sizes
from .formats import get_format
from .planes import Planes, plane_spec, planes_dequantize, to_planes
from .spec import BlockFormat, QuantError, join_fields, split_fields


class Layout(str, enum.Enum):
    GGUF = "gguf"  # the file's bytes: uint8 [N, K / block_size * block_bytes]
    FIELDS = "fields"  # {field: [N, K / block_size, count]}, each contiguous, of the field's dtype
    PLANES = "planes"  # realm.quant.planes.Planes: code bit planes and scale arrays, the kernels' layout


@dataclass(frozen=True)
class QTensor:
    data: torch.Tensor | Mapping[str, torch.Tensor] | Planes
    fmt: BlockFormat
    shape: tuple[int, int]

    def __init__(self, data, fmt: str | BlockFormat, shape):
        fmt = get_format(fmt)
        shape = sizes(shape)  # ints only: a float size is refused, never truncated
        if len(shape) != 2:
            raise QuantError(f"QTensor shape must be [N, K], got {shape}")
        n, k = shape
        blocks_per_row = fmt.row_bytes(k) // fmt.block_bytes
        if isinstance(data, Planes):
            _check_planes(data, fmt, n, k)
        elif isinstance(data, Mapping):
            _check_fields(data, fmt, n, blocks_per_row)
            data = dict(data)
        elif isinstance(data, torch.Tensor):
            if data.dtype != torch.uint8 or data.shape != (n, blocks_per_row * fmt.block_bytes):
                raise QuantError(
                    f"{fmt.name} QTensor data for shape {shape} must be uint8 "
                    f"[{n}, {blocks_per_row * fmt.block_bytes}], got {data.dtype} {tuple(data.shape)}"
                )
        else:
            raise QuantError(f"QTensor data must be a uint8 tensor or a dict of fields, got {type(data).__name__}")
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "fmt", fmt)
        object.__setattr__(self, "shape", shape)

    @classmethod
    def from_float(cls, w: torch.Tensor, fmt: str | BlockFormat) -> QTensor:
        if w.dim() != 2:
            raise QuantError(f"QTensor.from_float needs a 2-D weight [N, K], got shape {tuple(w.shape)}")
        return cls(quantize(w, fmt), fmt, w.shape)

    @property
    def layout(self) -> Layout:
        if isinstance(self.data, Planes):
            return Layout.PLANES
        return Layout.FIELDS if isinstance(self.data, dict) else Layout.GGUF

    @property
    def device(self) -> torch.device:
        if self.layout is Layout.GGUF:
            return self.data.device
        tensors = self.data.tensors() if self.layout is Layout.PLANES else self.data.values()
        return next(iter(tensors)).device

    @property
    def nbytes(self) -> int:
        """Bytes of the GGUF encoding, whatever the layout (`planes().nbytes` is what the kernels read)."""
        return self.shape[0] * self.fmt.row_bytes(self.shape[1])

    def gguf_bytes(self) -> torch.Tensor:
        """The GGUF block bytes [N, row_bytes], whatever the layout."""
        if self.layout is Layout.GGUF:
            return self.data
        if self.layout is Layout.PLANES:
            raise QuantError("a QTensor in the planes layout cannot give back GGUF bytes; keep the GGUF QTensor it "
                             "was repacked from")
        n = self.shape[0]
        flat = {name: t.reshape(-1, t.shape[-1]) for name, t in self.data.items()}
        return join_fields(self.fmt, flat).view(n, -1)

    def repack(self, layout: Layout | str = Layout.FIELDS) -> QTensor:
        """The same weight in another layout (lossless)."""
        layout = Layout(layout)
        if layout is self.layout:
            return self
        if layout is Layout.PLANES:
            return QTensor(self.planes(), self.fmt, self.shape)
        if layout is Layout.GGUF:
            return QTensor(self.gguf_bytes(), self.fmt, self.shape)
        n = self.shape[0]
        blocks = self.data.reshape(-1, self.fmt.block_bytes)
        fields = {
            name: t.reshape(n, -1, t.shape[-1]).contiguous() for name, t in split_fields(self.fmt, blocks).items()
        }
        return QTensor(fields, self.fmt, self.shape)

    def planes(self) -> Planes:
        """The weight in the kernel layout (computed from the GGUF bytes unless already held)."""
        if self.layout is Layout.PLANES:
            return self.data
        return to_planes(self.gguf_bytes(), self.fmt, self.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]."""
        if self.layout is Layout.PLANES:
            return planes_dequantize(self.data, self.shape)
        return dequantize(self.gguf_bytes(), self.fmt, self.shape)

    def to(self, device: torch.device | str) -> QTensor:
        if isinstance(self.data, Planes):
            return QTensor(self.data.to(device), self.fmt, self.shape)
        if isinstance(self.data, dict):
            return QTensor({k: v.to(device) for k, v in self.data.items()}, self.fmt, self.shape)
        return QTensor(self.data.to(device), self.fmt, self.shape)

    def __repr__(self) -> str:
        return f"QTensor({self.fmt.name}, shape={list(self.shape)}, layout={self.layout.value}, device={self.device})"


def _check_planes(p: Planes, fmt: BlockFormat, n: int, k: int) -> None:
    expected = plane_spec(fmt)
    if p.spec != expected:
        raise QuantError(f"planes were made for another format than {fmt.name}")
    rows = {t.shape[0] for t in p.tensors()}
    if rows != {n}:
        raise QuantError(f"{fmt.name} planes hold rows {sorted(rows)}, expected {n}")
    words = [k if expected.value.is_float else k * w // 32 for w in expected.widths]
    if [t.shape[1] for t in p.planes] != words:
        raise QuantError(f"{fmt.name} planes for K={k} must have {words} words per row, got "
                         f"{[t.shape[1] for t in p.planes]}")


def _check_fields(fields: Mapping[str, torch.Tensor], fmt: BlockFormat, n: int, blocks_per_row: int) -> None:
    names = [f.name for f in fmt.fields]
    if sorted(fields) != sorted(names):
        raise QuantError(f"{fmt.name} QTensor fields must be {names}, got {sorted(fields)}")
    for f in fmt.fields:
        t = fields[f.name]
        if t.dtype != f.dtype or tuple(t.shape) != (n, blocks_per_row, f.count):
            raise QuantError(
                f"{fmt.name} field {f.name} must be {f.dtype} [{n}, {blocks_per_row}, {f.count}], "
                f"got {t.dtype} {tuple(t.shape)}"
            )
