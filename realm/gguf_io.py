"""GGUF files: validated, memory-mapped reading and streamed writing, on top of the `gguf` package.

    reader = open_gguf("model.gguf")              # header parsed and checked; tensor data stays on disk
    w = tensor_to_float(find_tensor(reader, "token_embd.weight"))   # float32 [vocab, hidden]
    q = tensor_to_qtensor(reader.tensors[2])      # QTensor in the file's block format, no copy
    write_gguf("out.gguf", read_metadata(reader), specs, tensor_bytes_iter)   # one tensor in memory at a time

Shapes: GGUF stores a tensor's dimensions as ggml's `ne`, row length first; `GGUFReader.tensors[i].shape` is that
order. realm uses the logical row-major (torch) order, `tensor_shape(t)`: [rows, row_length].
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.gguf_reader import ReaderField, ReaderTensor

from .quant import BlockFormat, QTensor, QuantError, dequantize, format_for_ggml_type

GGUF_MAGIC = b"GGUF"
PREAMBLE_BYTES = 24  # magic u32, version u32, tensor count u64, metadata count u64
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value (u8/i8/bool)
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
ARCHITECTURE_KEY = gguf.Keys.General.ARCHITECTURE
ALIGNMENT_KEY = gguf.Keys.General.ALIGNMENT


class GGUFError(QuantError):
    """A GGUF file that cannot be read or written: missing, not GGUF, truncated or corrupt."""


@dataclass(frozen=True)
class MetadataValue:
    """One metadata value with its GGUF type (and item type for arrays), enough to write it back unchanged."""

    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file to write. shape: logical row-major, [..., row_length]."""

    name: str
    shape: tuple[int, ...]
    fmt: BlockFormat

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-1], self.fmt.row_bytes(self.shape[-1]))

    @property
    def nbytes(self) -> int:
        return math.prod(self.byte_shape)


# ---------------------------------------------------------------------------------------------------------- reading


class _PastEnd(Exception):
    """A header read that runs past the end of the file (raised inside the reader, reported by open_gguf)."""

    def __init__(self, offset: int, end: int, size: int):
        super().__init__(offset, end, size)
        self.offset, self.end, self.size = offset, end, size


def _min_value_bytes(raw_type: int) -> int:
    if raw_type == GGUFValueType.STRING:
        return 8
    if raw_type == GGUFValueType.ARRAY:
        return 12
    scalar = gguf.GGUFReader.gguf_scalar_to_np.get(raw_type)
    return np.dtype(scalar).itemsize if scalar is not None else 1


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader that reports reads past the end of the file instead of slicing short arrays, bounds array lengths
    by the bytes left (a corrupt length would otherwise loop for minutes), and checks each tensor's extent before
    mapping it. The overridden methods are gguf-py internals, stable since gguf 0.10."""

    def _get(self, offset, dtype, count=1, override_order=None):
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > self.data.size:
            raise _PastEnd(int(offset), end, self.data.size)
        return super()._get(offset, dtype, count, override_order)

    def _get_field_parts(self, orig_offs, raw_type):
        if int(raw_type) not in GGUFValueType._value2member_map_:
            raise GGUFError(f"corrupt header: unknown metadata value type {int(raw_type)} (value at byte {orig_offs})")
        if raw_type == GGUFValueType.ARRAY:
            item_type = int(self._get(orig_offs, np.uint32)[0])
            count = int(self._get(orig_offs + 4, np.uint64)[0])
            end = orig_offs + 12 + count * _min_value_bytes(item_type)
            if end > self.data.size:
                raise _PastEnd(orig_offs, end, self.data.size)
            if item_type == GGUFValueType.STRING or item_type in self.gguf_scalar_to_np:
                return self._flat_array_parts(orig_offs, item_type, count)
        return super()._get_field_parts(orig_offs, raw_type)

    def _flat_array_parts(self, orig_offs: int, item_type: int, count: int):
        """An array of scalars or strings in the parts ReaderField.contents() reads, built in one pass: gguf-py makes
        a memory-map view per item (two per string), which takes ~25 s for a 262k-token vocabulary's three arrays.
        Scalars: the whole array as one part. Strings: one memoryview per string (no length parts; contents() reads
        only the data parts)."""
        parts = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]
        types = [GGUFValueType.ARRAY, GGUFValueType(item_type)]
        offs = orig_offs + 12
        scalar = self.gguf_scalar_to_np.get(item_type)
        if scalar is not None:
            values = self._get(offs, scalar, count)
            return 12 + int(values.nbytes), [*parts, values], [2], types
        buf, size, idxs = memoryview(self.data), self.data.size, []
        for _ in range(count):
            if offs + 8 > size:
                raise _PastEnd(offs, offs + 8, size)
            (length,) = struct.unpack_from("<Q", buf, offs)
            end = offs + 8 + length
            if end > size:
                raise _PastEnd(offs, end, size)
            idxs.append(len(parts))
            parts.append(buf[offs + 8 : end])
            offs = end
        return offs - orig_offs, parts, idxs, types

    def _build_tensors(self, start_offs, fields):
        for field in fields:
            _check_tensor_extent(field, start_offs, int(self.alignment), self.data.size)
        super()._build_tensors(start_offs, fields)


def _check_tensor_extent(field: ReaderField, data_start: int, alignment: int, file_size: int) -> None:
    _, name_data, _, dims, raw_type, offset = field.parts
    name = bytes(name_data).decode("utf-8", errors="replace")
    try:
        ggml_type = GGMLQuantizationType(int(raw_type[0]))
    except ValueError:
        gguf_version = package_version("gguf")
        raise GGUFError(f"tensor {name!r} has GGML type id {int(raw_type[0])}, which gguf {gguf_version} does not "
                        "know (corrupt header, or a format newer than the installed gguf package)") from None
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    ne = [int(d) for d in dims]
    if not ne or ne[0] % block_size:
        raise GGUFError(f"corrupt header: tensor {name!r} of type {ggml_type.name} has dimensions {ne} "
                        f"(row length must be a multiple of the block size {block_size})")
    start = data_start + int(offset[0])
    if int(offset[0]) % alignment:
        raise GGUFError(f"corrupt header: tensor {name!r} data offset {int(offset[0])} is not a multiple of the "
                        f"alignment {alignment}")
    nbytes = math.prod(ne) // block_size * type_size
    if start + nbytes > file_size:
        raise GGUFError(f"truncated file: tensor {name!r} needs {nbytes} bytes at offset {start} (up to byte "
                        f"{start + nbytes}) but the file has only {file_size} bytes")


def _check_preamble(path: Path, size: int) -> None:
    """Magic, byte order and plausible counts, checked before the reader maps anything."""
    if size == 0:
        raise GGUFError("not a GGUF file: the file is empty")
    with open(path, "rb") as f:
        head = f.read(PREAMBLE_BYTES)
    if head[:4] != GGUF_MAGIC:
        raise GGUFError(f"not a GGUF file: it starts with {head[:4]!r} ({head[:4].hex(' ')}), expected {GGUF_MAGIC!r}")
    if len(head) < PREAMBLE_BYTES:
        raise GGUFError(f"truncated file: the GGUF header needs {PREAMBLE_BYTES} bytes, the file has {size}")
    (version,) = struct.unpack("<I", head[4:8])
    if version & 0xFFFF == 0:
        # gguf-py's own heuristic: a version that reads as 0 in its low half was written big-endian
        raise GGUFError("big-endian GGUF files are not supported (realm's block codecs read little-endian bytes)")
    n_tensors, n_kv = struct.unpack("<QQ", head[8:24])
    need = PREAMBLE_BYTES + n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES
    if need > size:
        raise GGUFError(f"truncated or corrupt header: it declares {n_tensors} tensors and {n_kv} metadata keys, "
                        f"which need at least {need} bytes, but the file has {size}")


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """Parse and validate a GGUF file's header; tensor data stays memory-mapped until used.

    The map is copy-on-write, so tensors are writable views (torch.from_numpy needs that) and the file is never
    modified. Raises GGUFError for a missing, non-GGUF, truncated or corrupt file.
    """
    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFError(f"{path}: not a regular file")
    size = path.stat().st_size
    try:
        _check_preamble(path, size)
        return _CheckedReader(path, "c")
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None
    except _PastEnd as e:
        raise GGUFError(f"{path}: truncated or corrupt header: a field at byte {e.offset} runs to byte {e.end} but "
                        f"the file has only {e.size} bytes") from None
    except Exception as e:
        raise GGUFError(f"{path}: corrupt GGUF header: {type(e).__name__}: {e}") from e


def read_metadata(reader: gguf.GGUFReader) -> dict[str, MetadataValue]:
    """Every metadata key of the file, in file order, without the reader's virtual `GGUF.*` fields."""
    return {f.name: _field_value(f) for f in reader.fields.values() if not f.name.startswith("GGUF.")}


def _field_value(field: ReaderField) -> MetadataValue:
    vtype = field.types[0]
    sub_type = None
    if vtype == GGUFValueType.ARRAY:
        # parts: key length, key, value type, item type, count, items...; the item type is read from parts
        # because `types` has no item type for an empty array
        sub_type = GGUFValueType(int(field.parts[3][0]))
        if sub_type == GGUFValueType.ARRAY:
            raise GGUFError(f"metadata {field.name!r}: nested arrays are not supported (gguf-py flattens them)")
    try:
        value = field.contents()
    except UnicodeDecodeError as e:
        raise GGUFError(f"metadata {field.name!r}: string is not valid UTF-8 ({e})") from None
    return MetadataValue(value, vtype, sub_type)


def find_tensor(reader: gguf.GGUFReader, name: str) -> ReaderTensor:
    for t in reader.tensors:
        if t.name == name:
            return t
    raise GGUFError(f"no tensor named {name!r} in the file ({len(reader.tensors)} tensors)")


def tensor_shape(t: ReaderTensor) -> tuple[int, ...]:
    """The logical row-major shape [..., row_length]: ggml's `ne` (GGUFReader's `shape`) reversed."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def tensor_format(t: ReaderTensor) -> BlockFormat:
    try:
        return format_for_ggml_type(int(t.tensor_type), what=f"tensor {t.name!r}")
    except QuantError as e:
        raise GGUFError(str(e)) from None


def tensor_bytes(t: ReaderTensor) -> torch.Tensor:
    """The tensor's stored bytes as uint8 [..., row_bytes], a view of the file's map (no copy)."""
    fmt = tensor_format(t)
    shape = tensor_shape(t)
    data = t.data
    if not data.flags.writeable:
        # a reader opened read-only (not by open_gguf): torch cannot wrap it without a copy
        data = np.array(data)
    raw = torch.from_numpy(data.reshape(-1).view(np.uint8))
    return raw.view(*shape[:-1], fmt.row_bytes(shape[-1]))


def tensor_to_qtensor(t: ReaderTensor) -> QTensor:
    """A 2-D tensor as a QTensor in the file's format, sharing the file's bytes."""
    shape = tensor_shape(t)
    if len(shape) != 2:
        raise GGUFError(f"tensor {t.name!r} has shape {list(shape)}; a QTensor needs a 2-D weight")
    return QTensor(tensor_bytes(t), tensor_format(t), shape)


def tensor_to_float(t: ReaderTensor) -> torch.Tensor:
    """The tensor dequantized to float32, in its logical shape."""
    return dequantize(tensor_bytes(t), tensor_format(t), tensor_shape(t))


# ---------------------------------------------------------------------------------------------------------- writing


class _Writer(gguf.GGUFWriter):
    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        # gguf-py refuses empty arrays, but the format allows them and a copy must keep every key
        if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _add_metadata(writer: gguf.GGUFWriter, metadata: Mapping[str, MetadataValue]) -> None:
    for key, val in metadata.items():
        if key == ARCHITECTURE_KEY:
            continue  # the writer's constructor adds it
        if key == ALIGNMENT_KEY:
            if val.type != GGUFValueType.UINT32 or val.value <= 0 or val.value & (val.value - 1):
                raise GGUFError(f"{ALIGNMENT_KEY} must be a UINT32 power of two, got {val.value!r} ({val.type.name})")
            writer.add_custom_alignment(int(val.value))  # also pads tensor data to it
            continue
        writer.add_key_value(key, val.value, val.type, sub_type=val.sub_type)


def _as_bytes(data: np.ndarray | torch.Tensor, spec: TensorSpec) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().contiguous().numpy()
    data = np.ascontiguousarray(data)
    if data.nbytes != spec.nbytes:
        raise GGUFError(f"tensor {spec.name!r}: {spec.fmt.name} {list(spec.shape)} needs {spec.nbytes} bytes, "
                        f"got {data.nbytes}")
    return data.reshape(-1).view(np.uint8)


def write_gguf(
    path: str | os.PathLike,
    metadata: Mapping[str, MetadataValue],
    specs: Sequence[TensorSpec],
    data: Iterable[np.ndarray | torch.Tensor],
) -> None:
    """Write a GGUF file, streaming: `data` yields each tensor's bytes in `specs` order and only one is held at a time.

    metadata: every key to write, in order (`read_metadata` of another file copies it); `general.alignment` is
    honoured. The file appears at `path` only when complete (written to `<path>.partial`, then renamed).
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    arch = metadata.get(ARCHITECTURE_KEY)
    writer = _Writer(partial, arch=arch.value if arch is not None else "")
    try:
        _add_metadata(writer, metadata)
        for spec in specs:
            writer.add_tensor_info(spec.name, spec.byte_shape, np.dtype(np.uint8), spec.nbytes,
                                   raw_dtype=GGMLQuantizationType(spec.fmt.ggml_type))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        tensors = iter(data)
        for spec in specs:
            tensor = next(tensors, None)
            if tensor is None:
                raise GGUFError(f"{path}: data ended before tensor {spec.name!r}; expected {len(specs)} tensors")
            writer.write_tensor_data(_as_bytes(tensor, spec))
        if next(tensors, None) is not None:
            raise GGUFError(f"{path}: got data for more than the {len(specs)} tensors declared")
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise


__all__ = [
    "GGUFError",
    "MetadataValue",
    "TensorSpec",
    "find_tensor",
    "open_gguf",
    "read_metadata",
    "tensor_bytes",
    "tensor_format",
    "tensor_shape",
    "tensor_to_float",
    "tensor_to_qtensor",
    "write_gguf",
]
