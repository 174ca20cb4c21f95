"""`quantize` and `dequantize`: validated entry points over the format codecs.

Both work on any torch device (the codecs are plain tensor ops) and process large tensors in chunks of blocks so the
search quantizers' temporaries stay bounded.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch

from .formats import get_format
from .spec import BlockFormat, QuantError, join_fields, split_fields

CHUNK_WEIGHTS = 1 << 20  # weights per codec call: bounds temporaries (MXFP4's search holds 16 floats per weight)


def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise QuantError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


def check_shape(shape, fmt: BlockFormat) -> tuple[int, ...]:
    """shape as sizes (`sizes`) whose rows split into whole blocks of fmt."""
    shape = sizes(shape)
    fmt.row_bytes(shape[-1])  # raises if the row does not split into whole blocks
    return shape


def sizes(shape) -> tuple[int, ...]:
    """shape as a non-empty tuple of ints >= 0; a float (4.7), a bool or a negative size is refused, never truncated
    or cast."""
    if isinstance(shape, (str, bytes, set, frozenset, dict)) or not hasattr(shape, "__iter__"):
        raise QuantError(f"shape must be a sequence of ints, got {shape!r}")
    items, dims = list(shape), []
    for i, s in enumerate(items):
        if isinstance(s, (bool, np.bool_)) or (isinstance(s, torch.Tensor) and s.dtype == torch.bool):
            raise QuantError(f"shape[{i}] must be an int, got {s!r} in shape {tuple(items)}")
        try:
            dims.append(operator.index(s))  # int, numpy and torch integers; not 4.7, nor 4.0
        except TypeError:
            raise QuantError(f"shape[{i}] must be an int, got {s!r} in shape {tuple(items)}") from None
    shape = tuple(dims)
    if not shape or any(s < 0 for s in shape):
        raise QuantError(f"shape must be non-empty and non-negative, got {shape}")
    return shape


def _chunks(n_blocks: int, fmt: BlockFormat):
    """Slices of at most CHUNK_WEIGHTS weights (whole blocks) covering n_blocks."""
    step = max(1, CHUNK_WEIGHTS // fmt.block_size)
    for start in range(0, n_blocks, step):
        yield slice(start, min(start + step, n_blocks))


def dequantize(data, fmt: str | BlockFormat, shape) -> torch.Tensor:
    """GGUF blocks -> float32 weights of the logical `shape`, on data's device.

    data: uint8 tensor (or numpy array) holding exactly prod(shape) / block_size blocks, in row-major order.
    """
    fmt = get_format(fmt)
    shape = check_shape(shape, fmt)
    data = _as_tensor(data, "data")
    if data.dtype != torch.uint8:
        raise QuantError(f"{fmt.name} data must be uint8 GGUF blocks, got {data.dtype}")
    n_blocks = math.prod(shape) // fmt.block_size
    if data.numel() != n_blocks * fmt.block_bytes:
        raise QuantError(
            f"{fmt.name} data for shape {shape} must be {n_blocks * fmt.block_bytes} bytes "
            f"({n_blocks} blocks of {fmt.block_bytes}), got {data.numel()}"
        )
    blocks = data.reshape(n_blocks, fmt.block_bytes)
    out = torch.empty(n_blocks, fmt.block_size, dtype=torch.float32, device=data.device)
    for part in _chunks(n_blocks, fmt):
        out[part] = fmt.decode(split_fields(fmt, blocks[part]))
    return out.view(shape)


def _check_finite(x: torch.Tensor, fmt: BlockFormat) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise QuantError(
            f"cannot quantize to {fmt.name}: {int(bad.sum())} non-finite values (NaN/Inf), first at index {idx}"
        )


def _check_scales(fields: dict[str, torch.Tensor], fmt: BlockFormat, start_block: int) -> None:
    """A block whose scale overflows its storage type (e.g. |x| > 65504 * 8 for Q4_0's fp16 d) would decode to
    Inf/NaN; refuse it instead of writing a broken weight."""
    for name, t in fields.items():
        if t.is_floating_point():
            bad = ~torch.isfinite(t)
            if bad.any():
                block = start_block + int(bad.nonzero()[0][0])
                raise QuantError(
                    f"cannot quantize to {fmt.name}: field {name} overflows {t.dtype} in block {block} "
                    "(values too large for the format)"
                )


def quantize(x, fmt: str | BlockFormat) -> torch.Tensor:
    """float weights [..., K] -> uint8 GGUF blocks [..., K / block_size * block_bytes], on x's device.

    K must be a multiple of the block size; computation is in float32 whatever x's float dtype.
    """
    fmt = get_format(fmt)
    x = _as_tensor(x, "x")
    if not (x.is_floating_point()):
        raise QuantError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise QuantError("x must have at least one dimension")
    shape = check_shape(x.shape, fmt)
    _check_finite(x, fmt)
    blocks = x.to(torch.float32).reshape(-1, fmt.block_size)
    n_blocks = blocks.shape[0]
    out = torch.empty(n_blocks, fmt.block_bytes, dtype=torch.uint8, device=x.device)
    for part in _chunks(n_blocks, fmt):
        fields = fmt.encode(blocks[part])
        _check_scales(fields, fmt, part.start)
        out[part] = join_fields(fmt, fields)
    return out.view(*shape[:-1], fmt.row_bytes(shape[-1]))
