"""Draft models for speculative decoding, made from the target itself: a GGUF copy that keeps some of its layers.

    summary = make_layer_draft("smollm2", "draft.gguf", parse_layers("0-5,28-29"))
    print(summary.table())
    model = realm.load("smollm2", draft_model="draft.gguf")

    realm draft smollm2 draft.gguf --layers 0-5,28-29       # the same from the command line

A draft must speak the target's vocabulary, and no second model of SmolLM2's vocabulary ships with realm; a copy of
the target with fewer transformer layers is one, and costs less per token in proportion to the layers dropped (the
token embedding and the output head stay: at SmolLM2-135M's size they are a fifth of the weights). Requantizing to
fewer bits would not make a cheaper draft on the CPU: the torch backend computes on dequantized float32 weights.

The copy keeps the given layers in the given order, renumbered 0..n-1 (`blk.{layers[j]}.*` becomes `blk.{j}.*`); the
token embedding, output norm, output head and every other tensor, the tokenizer and all other metadata are kept;
only `<arch>.block_count` changes. Tensors are copied byte for byte in their stored format (no requantization), so
a draft of all layers in order is the source file's model exactly, and a draft's layer j computes what source layer
layers[j] computes on the same input.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf.gguf_reader import ReaderTensor

from .gguf_io import (
    MetadataValue,
    TensorSpec,
    open_gguf,
    read_metadata,
    tensor_bytes,
    tensor_format,
    tensor_shape,
    write_gguf,
)
from .models import MODELS
from .quantize_file import _check_output  # the checks `realm quantize` makes on its output, before any work
from .runtime.config import ARCHITECTURES, ModelError
from .runtime.weights import model_file

LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")  # llama.cpp's name of a transformer layer's tensor: blk.N.<kind>
_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


@dataclass(frozen=True)
class DraftSummary:
    src: Path
    dst: Path
    arch: str
    layers: tuple[int, ...]  # the source layer of each draft layer
    src_layers: int
    tensors: int  # written
    src_bytes: int
    dst_bytes: int
    seconds: float

    def table(self) -> str:
        ratio = self.dst_bytes / self.src_bytes if self.src_bytes else float("nan")
        return "\n".join([
            f"input  {self.src}: {self.src_bytes:,} bytes, {self.src_layers} layers ({self.arch})",
            f"output {self.dst}: {self.dst_bytes:,} bytes ({ratio:.2f}x), {len(self.layers)} layers: source layers "
            f"{format_layers(self.layers)} as 0..{len(self.layers) - 1}; {self.tensors} tensors copied byte for byte "
            f"in {self.seconds:.1f} s",
        ])


def parse_layers(text: str) -> list[int]:
    """"0-5,26-29" -> [0, 1, 2, 3, 4, 5, 26, 27, 28, 29]: comma-separated indices and inclusive ranges, in the order
    written (make_layer_draft checks them against the model: range, duplicates)."""
    layers: list[int] = []
    for part in str(text).split(","):
        m = _RANGE.fullmatch(part)
        if m is None:
            raise ValueError(f"layers must be comma-separated indices or ranges such as 0-5,26-29; got {part.strip()!r}"
                             f" in {text!r}")
        first, last = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if last < first:
            raise ValueError(f"layer range {first}-{last} runs backwards in {text!r}; write {last}-{first} as "
                             "separate indices if that order is meant")
        layers.extend(range(first, last + 1))
    return layers


def format_layers(layers: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (runs of consecutive ascending layers as ranges): parse_layers' inverse."""
    parts: list[str] = []
    i = 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(parts)


def _check_layers(layers: Sequence[int], n_layers: int, src: Path) -> tuple[int, ...]:
    if isinstance(layers, (str, bytes)):
        raise ValueError(f"layers must be a sequence of integers, got the string {layers!r} (parse_layers reads "
                         "one)")
    layers = tuple(layers)
    if not layers:
        raise ValueError("a draft needs at least one layer; the layer list is empty")
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int)]
    if bad:
        raise ValueError(f"layers must be integers, got {bad[0]!r}")
    out = [x for x in layers if not 0 <= x < n_layers]
    if out:
        raise ValueError(f"layer {out[0]} is out of range: {src} has {n_layers} layers (0..{n_layers - 1})")
    seen: set[int] = set()
    dups = [x for x in layers if x in seen or seen.add(x)]
    if dups:
        raise ValueError(f"layer {dups[0]} is listed twice in {format_layers(layers)}; a layer can be kept once")
    return layers


def _architecture(metadata: dict[str, MetadataValue], src: Path) -> tuple[str, int]:
    """The file's llama-family architecture and its block count; ModelError for anything else."""
    arch = metadata.get(gguf.Keys.General.ARCHITECTURE)
    name = arch.value if arch is not None else None
    if name not in ARCHITECTURES:
        found = "no general.architecture" if name is None else f"general.architecture {str(name)[:40]!r}"
        raise ModelError(f"{src}: not a llama-family model file ({found}); layer drafts are made of: "
                         f"{', '.join(ARCHITECTURES)}")
    count = metadata.get(f"{name}.block_count")
    if count is None or isinstance(count.value, bool) or not isinstance(count.value, int) or count.value < 1:
        raise ModelError(f"{src}: GGUF metadata {name}.block_count is missing or not a positive integer")
    return name, int(count.value)


def _layer_tensors(reader: gguf.GGUFReader, n_layers: int, src: Path):
    """(tensors before the first layer's, per layer its tensors in file order, tensors after): what is not a layer's
    keeps its place around the layers."""
    head: list[ReaderTensor] = []
    tail: list[ReaderTensor] = []
    per_layer: list[list[ReaderTensor]] = [[] for _ in range(n_layers)]
    for t in reader.tensors:
        m = LAYER_TENSOR.fullmatch(t.name)
        if m is None:
            (tail if any(per_layer) else head).append(t)
            continue
        i = int(m[1])
        if i >= n_layers:
            raise ModelError(f"{src}: tensor {t.name!r} belongs to layer {i}, but block_count is {n_layers}")
        per_layer[i].append(t)
    if not any(t.name == "token_embd.weight" for t in head + tail):
        raise ModelError(f"{src}: no token_embd.weight; not a llama-family model file")
    empty = [i for i, ts in enumerate(per_layer) if not ts]
    if empty:
        raise ModelError(f"{src}: layer {empty[0]} has no tensors (block_count is {n_layers})")
    return head, per_layer, tail


def make_layer_draft(src: str | os.PathLike, dst: str | os.PathLike, layers: Sequence[int]) -> DraftSummary:
    """Write dst, the GGUF model src keeping only the transformer layers `layers` (source indices, kept in this
    order and renumbered 0..len-1); everything else is copied unchanged except `<arch>.block_count` (see the module
    docstring). src: a GGUF path or a packaged model name. Raises ValueError (GGUFError, ModelError) for an empty
    list, a layer out of range or listed twice, dst naming src, or a file that is not a llama-family model."""
    start = time.perf_counter()
    src, dst = model_file(src), Path(dst)
    reader = open_gguf(src)
    metadata = read_metadata(reader)
    arch, n_layers = _architecture(metadata, src)
    layers = _check_layers(layers, n_layers, src)
    _check_output(src, dst)
    head, per_layer, tail = _layer_tensors(reader, n_layers, src)
    renamed: list[tuple[str, ReaderTensor]] = [(t.name, t) for t in head]
    for j, i in enumerate(layers):
        renamed += [(f"blk.{j}.{LAYER_TENSOR.fullmatch(t.name)[2]}", t) for t in per_layer[i]]
    renamed += [(t.name, t) for t in tail]
    specs = [TensorSpec(name, tensor_shape(t), tensor_format(t)) for name, t in renamed]
    key = f"{arch}.block_count"
    metadata[key] = MetadataValue(len(layers), metadata[key].type)  # in its place and type: only the value changes
    write_gguf(dst, metadata, specs, (tensor_bytes(t) for _, t in renamed))
    return DraftSummary(src, dst, arch, layers, n_layers, len(specs), src.stat().st_size, dst.stat().st_size,
                        time.perf_counter() - start)


# ---- `realm draft` -----------------------------------------------------------------------------------------------

def draft_args(parser: argparse.ArgumentParser) -> None:
    """`realm draft SRC DST --layers 0-5,28-29`'s arguments (realm.cli's Command for it)."""
    names = ", ".join(MODELS)
    parser.add_argument("input", metavar="SRC", help=f"GGUF model to read, or a packaged model: {names}")
    parser.add_argument("output", metavar="DST", help="GGUF file to write (must differ from SRC)")
    parser.add_argument("--layers", required=True, metavar="LIST",
                        help="the source layers to keep, in this order, renumbered from 0: comma-separated indices "
                             "and inclusive ranges, e.g. 0-5,28-29")


def draft_run(args: argparse.Namespace) -> int:
    """Writes the draft and prints what was written; errors raise (ValueError, OSError) for realm.cli to report."""
    summary = make_layer_draft(args.input, args.output, parse_layers(args.layers))
    print(summary.table())
    return 0


__all__ = ["DraftSummary", "draft_args", "draft_run", "format_layers", "make_layer_draft", "parse_layers"]
