"""QTensor: the weight container later kernels consume, and its lossless field-wise repacking."""

import pytest
import torch
from quant_inputs import random_blocks, weights
from tolerances import assert_equal

from realm.quant import FORMATS, Layout, QTensor, QuantError, dequantize, quantize

MATRIX_FORMATS = [n for n in FORMATS if FORMATS[n].block_size > 1]


@pytest.mark.parametrize("name", MATRIX_FORMATS)
def test_from_float_holds_the_quantizers_bytes(name, device):
    w = weights("gauss", 7, 512, seed=1).to(device)
    qt = QTensor.from_float(w, name)
    assert qt.layout is Layout.GGUF and qt.shape == (7, 512) and qt.device.type == device.type
    assert qt.nbytes == 7 * FORMATS[name].row_bytes(512) == qt.data.numel()
    assert torch.equal(qt.data, quantize(w, name))
    assert_equal(qt.dequantize(), dequantize(qt.data, name, (7, 512)))


@pytest.mark.parametrize("name", MATRIX_FORMATS)
def test_field_layout_is_lossless(name, device):
    fmt = FORMATS[name]
    n, k = 5, 3 * fmt.block_size
    qt = QTensor(random_blocks(fmt, n * 3, seed=2).view(n, -1).to(device), fmt, (n, k))
    packed = qt.repack(Layout.FIELDS)
    assert packed.layout is Layout.FIELDS and packed.shape == qt.shape
    for f in fmt.fields:
        t = packed.data[f.name]
        assert t.dtype == f.dtype and t.shape == (n, 3, f.count) and t.is_contiguous()
    assert torch.equal(packed.gguf_bytes(), qt.data)
    assert torch.equal(packed.repack("gguf").data, qt.data)
    assert_equal(packed.dequantize(), qt.dequantize())


def test_to_moves_every_field():
    qt = QTensor.from_float(weights("gauss", 2, 256), "Q4_K").repack("fields")
    moved = qt.to("cpu")
    assert moved.layout is Layout.FIELDS and all(t.device.type == "cpu" for t in moved.data.values())


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: QTensor(torch.zeros(2, 18, dtype=torch.uint8), "Q4_0", (2, 32, 1)), r"shape must be \[N, K\]"),
        (lambda: QTensor(torch.zeros(2, 18, dtype=torch.uint8), "Q4_0", (2, 48)), "row length 48 is not a multiple"),
        (lambda: QTensor(torch.zeros(2, 17, dtype=torch.uint8), "Q4_0", (2, 32)), r"must be uint8 \[2, 18\]"),
        (lambda: QTensor(torch.zeros(2, 18), "Q4_0", (2, 32)), r"must be uint8 \[2, 18\], got torch.float32"),
        (lambda: QTensor([1, 2], "Q4_0", (2, 32)), "must be a uint8 tensor or a dict of fields, got list"),
        (lambda: QTensor({"d": torch.zeros(2, 1, 1, dtype=torch.float16)}, "Q4_0", (2, 32)),
         r"fields must be \['d', 'qs'\]"),
        (lambda: QTensor.from_float(torch.zeros(64), "Q4_0"), "needs a 2-D weight"),
    ],
)
def test_bad_construction_gets_a_clear_error(make, message):
    with pytest.raises(QuantError, match=message):
        make()


def test_wrong_field_dtype_is_named():
    fields = QTensor.from_float(weights("gauss", 2, 32), "Q4_0").repack("fields").data
    fields = {**fields, "d": fields["d"].float()}
    with pytest.raises(QuantError, match=r"field d must be torch.float16 \[2, 1, 1\], got torch.float32"):
        QTensor(fields, "Q4_0", (2, 32))
