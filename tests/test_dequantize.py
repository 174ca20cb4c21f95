"""Dequantization is bit-identical to gguf-py (and to llama.cpp's ggml where installed) on random valid blocks."""

import ggml_ref
import gguf
import numpy as np
import pytest
import torch
from quant_inputs import random_blocks
from tolerances import assert_equal

from realm.quant import FORMATS, QuantError, dequantize

GGUF_PY_DEQUANTIZES = [n for n in FORMATS if n not in ("Q8_1", "Q8_K")]
# (rows, blocks per row): one block, odd row counts, many blocks
SHAPES = [(1, 1), (37, 3), (1023, 2), (5, 33)]


def _shape(fmt, rows, blocks):
    return (rows, blocks * fmt.block_size)


# random E8M0 exponents up to 255 make MXFP4 values overflow to inf in gguf-py too (and compare equal)
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("rows,blocks", SHAPES)
@pytest.mark.parametrize("name", GGUF_PY_DEQUANTIZES)
def test_bit_identical_to_gguf_py(name, rows, blocks, device):
    fmt = FORMATS[name]
    data = random_blocks(fmt, rows * blocks, seed=rows * 7 + blocks).view(rows, -1)
    expected = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType(fmt.ggml_type))
    actual = dequantize(data.to(device), fmt, _shape(fmt, rows, blocks))
    assert actual.device.type == device.type and actual.dtype == torch.float32
    assert_equal(actual.cpu(), torch.from_numpy(np.ascontiguousarray(expected, dtype=np.float32)), name)


def _q8_reference(fmt, data: np.ndarray) -> np.ndarray:
    """Independent reference for the activation formats (gguf-py has none): d * q, read straight from the structs."""
    if fmt.name == "Q8_1":
        blocks = data.reshape(-1, 36)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        return d * blocks[:, 4:36].copy().view(np.int8).astype(np.float32)
    blocks = data.reshape(-1, 292)
    d = blocks[:, 0:4].copy().view(np.float32)
    return d * blocks[:, 4:260].copy().view(np.int8).astype(np.float32)


@pytest.mark.parametrize("rows,blocks", SHAPES)
@pytest.mark.parametrize("name", ["Q8_1", "Q8_K"])
def test_activation_formats_match_independent_reference(name, rows, blocks, device):
    fmt = FORMATS[name]
    data = random_blocks(fmt, rows * blocks, seed=rows + blocks)
    expected = _q8_reference(fmt, data.numpy()).reshape(_shape(fmt, rows, blocks))
    actual = dequantize(data.to(device), fmt, _shape(fmt, rows, blocks))
    assert_equal(actual.cpu(), torch.from_numpy(expected), name)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("name", list(FORMATS))
def test_bit_identical_to_llama_cpp(name):
    ggml = ggml_ref.load()
    if ggml is None:
        pytest.skip("llama-cpp-python is not installed")
    fmt = FORMATS[name]
    data = random_blocks(fmt, 300, seed=3)
    expected = ggml.dequantize(data.numpy(), fmt.ggml_type, 300 * fmt.block_size)
    if expected is None:
        pytest.skip(f"ggml has no to_float for {name}")
    actual = dequantize(data, fmt, (300 * fmt.block_size,))
    assert_equal(actual, torch.from_numpy(expected), name)


def test_keeps_any_leading_shape():
    fmt = FORMATS["Q4_0"]
    data = random_blocks(fmt, 2 * 3 * 4)
    out = dequantize(data, fmt, (2, 3, 128))
    assert out.shape == (2, 3, 128)
    assert torch.equal(out.view(-1), dequantize(data, fmt, (24 * 32,)))


def test_accepts_numpy_bytes():
    fmt = FORMATS["Q6_K"]
    data = random_blocks(fmt, 4)
    assert torch.equal(dequantize(data.numpy(), "Q6_K", (4, 256)), dequantize(data, fmt, (4, 256)))


@pytest.mark.parametrize(
    "data,fmt,shape,message",
    [
        (torch.zeros(18, dtype=torch.uint8), "Q4_9", (32,), "unknown format 'Q4_9'"),
        (torch.zeros(17, dtype=torch.uint8), "Q4_0", (32,), r"must be 18 bytes \(1 blocks of 18\), got 17"),
        (torch.zeros(36, dtype=torch.uint8), "Q4_0", (1, 32), r"must be 18 bytes"),
        (torch.zeros(18, dtype=torch.uint8), "Q4_0", (33,), "row length 33 is not a multiple of the Q4_0 block"),
        (torch.zeros(18, dtype=torch.int8), "Q4_0", (32,), "must be uint8 GGUF blocks, got torch.int8"),
        (torch.zeros(18, dtype=torch.uint8), "Q4_0", (), "shape must be non-empty"),
        (torch.zeros(18, dtype=torch.uint8), "Q4_0", "32", "shape must be a sequence of ints"),
        ([0] * 18, "Q4_0", (32,), "data must be a torch.Tensor or numpy array, got list"),
    ],
)
def test_bad_input_gets_a_clear_error(data, fmt, shape, message):
    with pytest.raises(QuantError, match=message):
        dequantize(data, fmt, shape)
