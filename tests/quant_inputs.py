"""Inputs for the quantization tests: random valid GGUF blocks and weight matrices that stress the quantizers."""

from __future__ import annotations

import torch

from realm.quant import BlockFormat, QTensor
from realm.quant.spec import join_fields, split_fields


def random_blocks(fmt: BlockFormat, n_blocks: int, seed: int = 0) -> torch.Tensor:
    """n_blocks random blocks: every byte random, float fields redrawn until finite (subnormals and signs included).

    float32 fields (Q8_K's d) are drawn as normal values over 10 decades instead: random float32 bits are mostly
    huge and would overflow every product.
    """
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n_blocks, fmt.block_bytes), dtype=torch.uint8, generator=g)
    fields = split_fields(fmt, raw)
    for f in fmt.fields:
        if f.dtype == torch.float32:
            scale = 10 ** (torch.rand(n_blocks, f.count, generator=g) * 10 - 5)
            fields[f.name] = torch.randn(n_blocks, f.count, generator=g) * scale
        elif f.dtype.is_floating_point:
            t = fields[f.name].clone()
            while not torch.isfinite(t).all():
                bad = ~torch.isfinite(t)
                redraw = torch.randint(0, 256, (n_blocks, f.nbytes), dtype=torch.uint8, generator=g)
                t = torch.where(bad, redraw.view(f.dtype), t)
            fields[f.name] = t
    return join_fields(fmt, fields)


def weights(kind: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """float32 [rows, cols] test weights.

    gauss: N(0, 1); student_t: heavy tails (3 dof), as real weight outliers; edge: rows that hit the quantizers'
    special cases (all zero, constant, one spike, tiny and large magnitudes, exact ties of the rounding, positive only).
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(rows, cols, generator=g)
    if kind == "student_t":
        # t = z / sqrt(chi2_3 / 3) with chi2_3 a sum of three squared normals
        z = torch.randn(rows, cols, generator=g)
        chi2 = (torch.randn(3, rows, cols, generator=g) ** 2).sum(0)
        return z / torch.sqrt(chi2 / 3)
    if kind == "edge":
        base = torch.randn(rows, cols, generator=g)
        cases = [
            torch.zeros(cols),
            torch.full((cols,), 0.75),
            torch.zeros(cols).index_fill_(0, torch.tensor([cols // 2]), 3.0),
            base[0] * 1e-20,
            base[0] * 1e3,
            torch.arange(cols, dtype=torch.float32) % 17 - 8.0,  # integers: many exact .5 ties after scaling
            base[0].abs() + 1.0,
            -base[0].abs(),
            torch.linspace(-1, 1, cols),
        ]
        for i in range(rows):
            base[i] = cases[i % len(cases)]
        return base
    raise ValueError(f"unknown kind {kind!r}")


def random_qtensor(fmt: BlockFormat, rows: int, cols: int, seed: int = 0) -> QTensor:
    """A weight [rows, cols] of random codes and random moderate scales (|d| in 1e-3 .. 1e-1, MXFP4 exponents
    2^-10 .. 2^-2), so every code and sub-scale occurs and products stay far from float16 overflow. Float formats
    get N(0, 1) values. Much faster than quantizing, for kernel tests whose result does not depend on the values."""
    g = torch.Generator().manual_seed(seed)
    if fmt.block_size == 1:
        return QTensor.from_float(torch.randn(rows, cols, generator=g), fmt)
    n_blocks = rows * cols // fmt.block_size
    fields = split_fields(fmt, torch.randint(0, 256, (n_blocks, fmt.block_bytes), dtype=torch.uint8, generator=g))
    for f in fmt.fields:
        shape = (n_blocks, f.count)
        if f.dtype.is_floating_point:
            magnitude = 10 ** (torch.rand(shape, generator=g) * 2 - 3)
            sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
            fields[f.name] = (sign * magnitude).to(f.dtype)
        elif fmt.name == "MXFP4" and f.name == "e":
            fields[f.name] = torch.randint(118, 127, shape, dtype=torch.uint8, generator=g)
    return QTensor(join_fields(fmt, fields).view(rows, -1), fmt, (rows, cols))
