"""Re-encode a GGUF model file to one block format, as `llama-quantize --pure` does, with realm's quantizers.

    summary = quantize_gguf("model.gguf", "model.Q4_K.gguf", "Q4_K")
    print(summary.table())

Every tensor of two or more dimensions is dequantized from whatever it is stored as and quantized to the target
(rows of the last dimension); 1-D tensors (norms, biases) become F32. A row length the target's block does not divide
falls back to another type exactly as llama.cpp does. Metadata is copied unchanged except `general.file_type` and
`general.quantization_version`, which llama-quantize also sets.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import gguf
import numpy as np
import torch
from gguf import GGUFValueType, LlamaFileType
from gguf.gguf_reader import ReaderTensor
from tqdm import tqdm

from .gguf_io import (
    GGUFError,
    MetadataValue,
    TensorSpec,
    open_gguf,
    read_metadata,
    tensor_bytes,
    tensor_format,
    tensor_shape,
    write_gguf,
)
from .paths import same_file
from .quant import FORMATS, BlockFormat, QuantError, dequantize, get_format, quantize

log = logging.getLogger(__name__)

# llama.cpp's `tensor_type_fallback` (llama-cpp-python 0.3.36, vendor/llama.cpp/src/llama-quant.cpp): the type used
# when a tensor's row length is not a multiple of the target's block size. A type not listed here has blocks of 32
# (or 1) and keeps itself; if the fallback's block does not divide the row either, llama.cpp uses F16.
FALLBACK: MappingProxyType[str, str] = MappingProxyType({
    "IQ4_XS": "IQ4_NL",
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
})
LAST_RESORT = "F16"

# `general.file_type` for a file whose weights are all one type: llama.cpp's `llama_ftype_get_default_type` read
# backwards. A K-quant without a plain file type takes the "small" (_S) one, the mix closest to pure.
FILE_TYPES: MappingProxyType[str, LlamaFileType] = MappingProxyType({
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "BF16": LlamaFileType.MOSTLY_BF16,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": LlamaFileType.MOSTLY_Q5_1,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q2_K": LlamaFileType.MOSTLY_Q2_K,
    "Q3_K": LlamaFileType.MOSTLY_Q3_K_S,
    "Q4_K": LlamaFileType.MOSTLY_Q4_K_S,
    "Q5_K": LlamaFileType.MOSTLY_Q5_K_S,
    "Q6_K": LlamaFileType.MOSTLY_Q6_K,
    "IQ4_NL": LlamaFileType.MOSTLY_IQ4_NL,
    "IQ4_XS": LlamaFileType.MOSTLY_IQ4_XS,
    "MXFP4": LlamaFileType.MOSTLY_MXFP4_MOE,
})
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION, written by llama-quantize
CHUNK_WEIGHTS = 1 << 22  # weights re-encoded per step: bounds the float32 temporaries to 16 MiB each


@dataclass(frozen=True)
class Fallback:
    tensor: str
    row_length: int
    target: BlockFormat
    chosen: BlockFormat

    def __str__(self) -> str:
        return (f"{self.tensor}: row {self.row_length} not a multiple of {self.target.block_size} for "
                f"{self.target.name} -> {self.chosen.name}")


@dataclass(frozen=True)
class FallbackGroup:
    """The tensors that fell back from one target to one format, for the same reason: one line of the report."""

    target: BlockFormat
    chosen: BlockFormat
    tensors: tuple[str, ...]  # in file order
    row_lengths: tuple[int, ...]  # distinct, ascending

    EXAMPLES = 2  # tensor names shown per line
    ROW_LENGTHS = 4  # row lengths shown per line

    @property
    def reason(self) -> str:
        reason = f"not a multiple of {self.target.block_size}"
        fallback = FORMATS[FALLBACK.get(self.target.name, self.target.name)]
        if self.chosen is not fallback and fallback is not self.target:  # the fallback's block did not fit either
            reason += f", nor of {fallback.name}'s {fallback.block_size}"
        return reason

    def __str__(self) -> str:
        n = len(self.tensors)
        lengths = ", ".join(map(str, self.row_lengths[: self.ROW_LENGTHS]))
        if len(self.row_lengths) > self.ROW_LENGTHS:
            lengths += ", ..."
        examples = ", ".join(self.tensors[: self.EXAMPLES]) + (", ..." if n > self.EXAMPLES else "")
        return (f"fallback {self.target.name} -> {self.chosen.name} for {n} tensor{'s' * (n != 1)}: row length"
                f"{'s' * (len(self.row_lengths) != 1)} {lengths} {self.reason} (llama.cpp's rule), e.g. {examples}")


def group_fallbacks(fallbacks: list[Fallback]) -> list[FallbackGroup]:
    """One group per (target, chosen format), in order of first appearance."""
    groups: dict[tuple[str, str], list[Fallback]] = {}
    for fb in fallbacks:
        groups.setdefault((fb.target.name, fb.chosen.name), []).append(fb)
    return [FallbackGroup(fbs[0].target, fbs[0].chosen, tuple(f.tensor for f in fbs),
                          tuple(sorted({f.row_length for f in fbs}))) for fbs in groups.values()]


@dataclass
class FormatStats:
    """What went into one output format; the error is the re-encoded weights against the dequantized source."""

    tensors: int = 0
    nbytes: int = 0
    err_sq: float = 0.0
    ref_sq: float = 0.0

    @property
    def rel_rmse(self) -> float:
        return math.sqrt(self.err_sq / self.ref_sq) if self.ref_sq > 0 else 0.0

    def add(self, other: FormatStats) -> None:
        self.tensors += other.tensors
        self.nbytes += other.nbytes
        self.err_sq += other.err_sq
        self.ref_sq += other.ref_sq


@dataclass
class Summary:
    src: Path
    dst: Path
    target: BlockFormat
    src_bytes: int = 0
    dst_bytes: int = 0
    seconds: float = 0.0
    formats: dict[str, FormatStats] = field(default_factory=dict)  # output format name -> stats
    fallbacks: list[Fallback] = field(default_factory=list)

    @property
    def fallback_groups(self) -> list[FallbackGroup]:
        return group_fallbacks(self.fallbacks)

    @property
    def total(self) -> FormatStats:
        total = FormatStats()
        for stats in self.formats.values():
            total.add(stats)
        return total

    def table(self) -> str:
        rows = [f"{'format':<8} {'tensors':>7} {'bytes':>15} {'rel RMSE':>10}"]
        for name, s in sorted(self.formats.items(), key=lambda kv: -kv[1].nbytes):
            rows.append(f"{name:<8} {s.tensors:>7} {s.nbytes:>15,} {s.rel_rmse:>10.3e}")
        t = self.total
        rows.append(f"{'total':<8} {t.tensors:>7} {t.nbytes:>15,} {t.rel_rmse:>10.3e}")
        ratio = self.dst_bytes / self.src_bytes if self.src_bytes else float("nan")
        rows.append(f"input  {self.src}: {self.src_bytes:,} bytes")
        rows.append(f"output {self.dst}: {self.dst_bytes:,} bytes ({ratio:.2f}x), {self.target.name}, "
                    f"{len(self.fallbacks)} fallbacks, {self.seconds:.1f} s")
        return "\n".join(rows)


def storage_format(fmt: str | BlockFormat) -> BlockFormat:
    """The target format, refusing the activation-only ones."""
    fmt = get_format(fmt)
    if not fmt.storage:
        storable = ", ".join(f.name for f in FORMATS.values() if f.storage)
        raise QuantError(
            f"{fmt.name} is an activation format: ggml quantizes activations to it for its integer dot products, "
            f"and llama.cpp cannot load weights stored in it. Choose a storage format: {storable}"
        )
    return fmt


def choose_format(row_length: int, target: BlockFormat) -> BlockFormat:
    """The format a row of `row_length` weights is stored in when the target is `target` (llama.cpp's rule)."""
    if row_length % target.block_size == 0:
        return target
    fallback = FORMATS[FALLBACK.get(target.name, target.name)]
    return fallback if row_length % fallback.block_size == 0 else FORMATS[LAST_RESORT]


def _plan(reader: gguf.GGUFReader, target: BlockFormat) -> tuple[list[TensorSpec], list[Fallback]]:
    specs, fallbacks = [], []
    for t in reader.tensors:
        tensor_format(t)  # an unknown source type fails here, before anything is written
        shape = tensor_shape(t)
        if len(shape) < 2:
            specs.append(TensorSpec(t.name, shape, FORMATS["F32"]))
            continue
        fmt = choose_format(shape[-1], target)
        if fmt is not target:
            fallbacks.append(Fallback(t.name, shape[-1], target, fmt))
        specs.append(TensorSpec(t.name, shape, fmt))
    return specs, fallbacks


def _encode(t: ReaderTensor, spec: TensorSpec) -> tuple[np.ndarray, FormatStats]:
    """One tensor re-encoded to spec.fmt, a slab of rows at a time: uint8 spec.byte_shape, and its error."""
    src_fmt = tensor_format(t)
    k = spec.shape[-1]
    src = tensor_bytes(t).reshape(-1, src_fmt.row_bytes(k))  # [rows, src row bytes]
    out = np.empty((src.shape[0], spec.fmt.row_bytes(k)), dtype=np.uint8)
    stats = FormatStats(tensors=1, nbytes=out.nbytes)
    step = max(1, CHUNK_WEIGHTS // k)
    for r in range(0, src.shape[0], step):
        ref = dequantize(src[r : r + step], src_fmt, (min(step, src.shape[0] - r), k))  # [n, k]
        try:
            q = quantize(ref, spec.fmt)
        except QuantError as e:
            raise QuantError(f"tensor {t.name!r}: {e}") from None
        err = dequantize(q, spec.fmt, ref.shape) - ref
        stats.err_sq += float(torch.sum(err.double().square()))
        stats.ref_sq += float(torch.sum(ref.double().square()))
        out[r : r + ref.shape[0]] = q.numpy()
    return out.reshape(spec.byte_shape), stats


def _output_metadata(reader: gguf.GGUFReader, target: BlockFormat) -> dict[str, MetadataValue]:
    metadata = read_metadata(reader)
    metadata[gguf.Keys.General.FILE_TYPE] = MetadataValue(int(FILE_TYPES[target.name]), GGUFValueType.UINT32)
    metadata[gguf.Keys.General.QUANTIZATION_VERSION] = MetadataValue(QUANTIZATION_VERSION, GGUFValueType.UINT32)
    return metadata


def _check_output(src: Path, dst: Path) -> None:
    """Before any work, rather than after it all, when the file could not be written."""
    if same_file(src, dst):
        raise GGUFError(f"{dst}: output is the input file; write to another path")
    if dst.is_dir():
        raise GGUFError(f"{dst}: is a directory; the output must be a file path")
    if dst.exists() and not dst.is_file():  # the finished file replaces OUT: never a device node or a FIFO
        raise GGUFError(f"{dst}: is not a regular file (a device or a FIFO?); the output must be a file path")
    if not dst.absolute().parent.is_dir():
        raise GGUFError(f"{dst}: output directory {dst.parent} does not exist")
    partial = dst.with_name(dst.name + ".partial")  # what write_gguf writes, then renames to dst
    if partial.is_dir():
        raise GGUFError(f"{partial}: is a directory, in the way of the file written before it becomes {dst.name}")
    if not os.access(dst.absolute().parent, os.W_OK | os.X_OK):
        raise GGUFError(f"{dst}: output directory {dst.parent} is not writable")


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, fmt: str | BlockFormat,
                  progress: bool = True) -> Summary:
    """Write `dst`, a copy of the GGUF model `src` with every weight re-encoded to `fmt`; see the module docstring.

    Fallbacks are printed to stderr before encoding starts, one line per (target -> fallback format) with the count
    and a few example tensors (each tensor is logged at debug level); `progress` shows a bar over tensors
    (stderr). The error in the summary is measured against the dequantized source weights.
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    target = storage_format(fmt)
    reader = open_gguf(src)
    _check_output(src, dst)
    specs, fallbacks = _plan(reader, target)
    summary = Summary(src, dst, target, src_bytes=src.stat().st_size, fallbacks=fallbacks)
    for fb in fallbacks:
        log.debug("%s", fb)
    for group in summary.fallback_groups:
        tqdm.write(str(group), file=sys.stderr)

    def tensors():
        with tqdm(total=len(specs), desc=f"quantize {target.name}", unit="tensor", file=sys.stderr,
                  disable=not progress) as bar:
            for t, spec in zip(reader.tensors, specs, strict=True):
                bar.set_postfix_str(t.name, refresh=False)
                data, stats = _encode(t, spec)
                summary.formats.setdefault(spec.fmt.name, FormatStats()).add(stats)
                yield data
                bar.update()

    write_gguf(dst, _output_metadata(reader, target), specs, tensors())
    summary.dst_bytes = dst.stat().st_size
    summary.seconds = time.perf_counter() - start
    return summary
