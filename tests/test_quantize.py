"""Quantizers: llama.cpp's bytes, gguf-py's round trip, independent references for Q8_1/Q8_K, and clear errors."""

import ggml_ref
import gguf
import numpy as np
import pytest
import torch
from quant_inputs import weights
from tolerances import assert_equal

from realm.quant import FORMATS, QuantError, dequantize, quantize
from realm.quantize_file import Fallback, group_fallbacks, quantize_gguf

GGUF_PY_QUANTIZES = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4"]
GGUF_PY_DEQUANTIZES = [n for n in FORMATS if n not in ("Q8_1", "Q8_K")]
KINDS = ["gauss", "student_t", "edge"]


def _gguf_type(name):
    return gguf.GGMLQuantizationType[name]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", GGUF_PY_QUANTIZES)
def test_bytes_equal_gguf_py_quantizer(name, kind, device):
    x = weights(kind, 19, 512, seed=1)
    expected = gguf.quants.quantize(x.numpy(), _gguf_type(name))
    actual = quantize(x.to(device), name).cpu()
    assert_equal(actual, torch.from_numpy(np.ascontiguousarray(expected).view(np.uint8)).view(actual.shape), name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", GGUF_PY_DEQUANTIZES)
def test_round_trip_through_gguf_py_dequantizer(name, kind, device):
    """gguf.quants.dequantize(realm.quantize(x, f)) == realm.dequantize(realm.quantize(x, f))."""
    x = weights(kind, 11, 1024, seed=2)
    q = quantize(x.to(device), name)
    assert q.dtype == torch.uint8 and q.shape == (11, FORMATS[name].row_bytes(1024))
    ours = dequantize(q, name, x.shape).cpu()
    theirs = gguf.quants.dequantize(q.cpu().numpy(), _gguf_type(name))
    assert_equal(ours, torch.from_numpy(np.ascontiguousarray(theirs, dtype=np.float32)), name)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", [n for n in FORMATS if n != "F32"])
def test_bytes_equal_llama_cpp_quantizer(name, kind):
    """The same bytes as llama.cpp's quantizers (ggml_quantize_chunk without an importance matrix, or the activation
    formats' from_float_ref): realm's error is llama.cpp's error, and realm writes the files llama-quantize writes."""
    ggml = ggml_ref.load()
    if ggml is None:
        pytest.skip("llama-cpp-python is not installed")
    fmt = FORMATS[name]
    x = weights(kind, 24, 1024, seed=3)
    if fmt.storage:
        expected = ggml.quantize(x.numpy(), fmt.ggml_type)
    else:
        expected = ggml.quantize_row_ref(x.numpy(), fmt.ggml_type)
    assert_equal(quantize(x, fmt), torch.from_numpy(expected), name)


# ---- Q8_1 and Q8_K: gguf-py has no code for them, so the reference is written here, from ggml's C -------------------

def _round_half_away(v: np.ndarray) -> np.ndarray:
    a = np.abs(v)
    return np.sign(v) * (np.floor(a) + np.floor(2 * (a - np.floor(a))))


def _q8_1_reference(x: np.ndarray) -> np.ndarray:
    blocks = x.reshape(-1, 32).astype(np.float32)
    d = (np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = _round_half_away((blocks * inv).astype(np.float32)).astype(np.int8)
    s = (q.astype(np.int32).sum(axis=1, keepdims=True).astype(np.float32) * d).astype(np.float32)
    halves = [d.astype(np.float16).view(np.uint8), s.astype(np.float16).view(np.uint8)]
    out = np.concatenate([*halves, q.view(np.uint8)], axis=1)
    return out.reshape(x.shape[0], -1)


def _q8_k_reference(x: np.ndarray) -> np.ndarray:
    blocks = x.reshape(-1, 256).astype(np.float32)
    first_max = np.abs(blocks).argmax(axis=1)
    signed_max = blocks[np.arange(len(blocks)), first_max][:, None]
    live = signed_max != 0
    iscale = np.where(live, np.float32(-127) / np.where(live, signed_max, 1), 0).astype(np.float32)
    q = np.minimum(127, np.rint((iscale * blocks).astype(np.float32))).astype(np.int8)  # rint: half to even
    d = np.where(live, np.float32(1) / np.where(live, iscale, 1), 0).astype(np.float32)
    bsums = q.reshape(-1, 16, 16).astype(np.int16).sum(axis=2, dtype=np.int16)
    out = np.concatenate([d.view(np.uint8), q.view(np.uint8), bsums.view(np.uint8)], axis=1)
    return out.reshape(x.shape[0], -1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,reference", [("Q8_1", _q8_1_reference), ("Q8_K", _q8_k_reference)])
def test_activation_formats_match_reference_in_test(name, reference, kind, device):
    x = weights(kind, 13, 768, seed=4)
    assert_equal(quantize(x.to(device), name).cpu(), torch.from_numpy(reference(x.numpy())), name)


def test_q8_1_sum_field_is_d_times_sum_of_quants():
    """s = d * sum(q) with ggml's float32 d (amax / 127), before d itself is rounded to fp16."""
    x = weights("gauss", 4, 64, seed=5)
    blocks = quantize(x, "Q8_1").view(-1, 36)
    s = blocks[:, 2:4].contiguous().view(torch.float16)
    q = blocks[:, 4:].contiguous().view(torch.int8).float()
    d = x.view(-1, 32).abs().amax(1, keepdim=True) / 127
    assert_equal(s, (q.sum(1, keepdim=True) * d).half())


# ---- error handling ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "x,fmt,message",
    [
        (torch.ones(64), "Q4_9", "unknown format 'Q4_9'"),
        (torch.ones(2, 48), "Q4_0", "row length 48 is not a multiple of the Q4_0 block size 32"),
        (torch.ones(2, 128), "Q4_K", "row length 128 is not a multiple of the Q4_K block size 256"),
        (torch.ones(64, dtype=torch.int32), "Q8_0", "must be a floating-point tensor, got torch.int32"),
        (torch.tensor(1.0), "F32", "at least one dimension"),
        (torch.tensor([1.0, float("nan")] * 16), "Q4_0", r"16 non-finite values \(NaN/Inf\), first at index \(1,\)"),
        (torch.tensor([[0.0] * 31 + [float("inf")]]), "Q8_0", r"first at index \(0, 31\)"),
        (torch.full((32,), 1e6), "Q4_0", "field d overflows torch.float16 in block 0"),
        (torch.full((2, 4), 7e4), "F16", "field value overflows torch.float16 in block 0"),
        ("not a tensor", "Q4_0", "x must be a torch.Tensor or numpy array, got str"),
    ],
)
def test_bad_input_gets_a_clear_error(x, fmt, message):
    with pytest.raises(QuantError, match=message):
        quantize(x, fmt)


def test_accepts_numpy_and_low_precision_input():
    x = weights("gauss", 3, 256, seed=6)
    expected = quantize(x, "Q4_K")
    assert torch.equal(quantize(x.numpy(), "Q4_K"), expected)
    half = x.half()
    assert torch.equal(quantize(half, "Q4_K"), quantize(half.float(), "Q4_K"))


def test_chunked_quantization_equals_one_shot(monkeypatch):
    """Large tensors are quantized in chunks of blocks; the chunk boundary must not change a byte."""
    import realm.quant.api as api

    x = weights("student_t", 16, 512, seed=7)
    whole = quantize(x, "Q5_K")
    monkeypatch.setattr(api, "CHUNK_WEIGHTS", 3 * 256)  # 3 blocks per chunk, so chunks split rows
    assert torch.equal(quantize(x, "Q5_K"), whole)
    assert torch.equal(dequantize(whole, "Q5_K", x.shape), dequantize(whole.clone(), "Q5_K", x.shape))


def test_sqrt_is_correctly_rounded():
    """Q4_K/Q5_K weight their error by a block RMS; ggml takes it with sqrtf (correctly rounded), torch.sqrt on
    float32 CPU tensors is not (an ulp off on ~0.6% of inputs), which once changed a Q4_K scale in 1 of 16384 blocks."""
    from realm.quant.bits import sqrt_f32

    t = torch.rand(1 << 20, generator=torch.Generator().manual_seed(0)) * 100
    assert_equal(sqrt_f32(t), torch.from_numpy(np.sqrt(t.numpy())))


@pytest.mark.llama_cpp
@pytest.mark.parametrize("name", ["Q4_K", "Q5_K"])
def test_bytes_equal_llama_cpp_on_a_large_heavy_tailed_matrix(name):
    """16384 super-blocks: enough to hit the rare near-ties (the sqrt rounding above showed up only at this size)."""
    ggml = ggml_ref.load()
    if ggml is None:
        pytest.skip("llama-cpp-python is not installed")
    x = weights("student_t", 1024, 4096, seed=0)
    assert_equal(quantize(x, name), torch.from_numpy(ggml.quantize(x.numpy(), FORMATS[name].ggml_type)), name)


# ---- re-encoding a file: fallbacks reported once per kind, not once per tensor --------------------------------------

def _write_f32_model(path, shapes):
    w = gguf.GGUFWriter(path, "llama")
    for i, (name, shape) in enumerate(shapes.items()):
        w.add_tensor(name, weights("gauss", int(np.prod(shape[:-1])), shape[-1], seed=i).reshape(shape).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_fallbacks_are_summarised_one_line_per_kind(tmp_path, capsys):
    """SmolLM2 to Q4_K: 181 tensors of 576-wide rows fall back to Q5_0; the report is one line, not 181."""
    shapes = {"token_embd.weight": (3, 576), "blk.0.attn_norm.weight": (576,)}
    shapes |= {f"blk.{i}.attn_q.weight": (2, 576) for i in range(5)}
    shapes |= {"blk.0.ffn_down.weight": (2, 256), "blk.0.odd.weight": (2, 40), "blk.1.attn_k.weight": (2, 96)}
    src = tmp_path / "src.gguf"
    _write_f32_model(src, shapes)
    summary = quantize_gguf(src, tmp_path / "out.gguf", "Q4_K", progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fallback")]
    assert lines == [
        "fallback Q4_K -> Q5_0 for 7 tensors: row lengths 96, 576 not a multiple of 256 (llama.cpp's rule), "
        "e.g. token_embd.weight, blk.0.attn_q.weight, ...",
        "fallback Q4_K -> F16 for 1 tensor: row length 40 not a multiple of 256, nor of Q5_0's 32 (llama.cpp's rule), "
        "e.g. blk.0.odd.weight",
    ]
    assert err.count("fallback") == 2  # printed once, not again around the progress bar
    assert "quantize Q4_K: 100%" in err
    assert len(summary.fallbacks) == 8  # every tensor is still recorded
    assert {name: s.tensors for name, s in summary.formats.items()} == {"Q5_0": 7, "F16": 1, "Q4_K": 1, "F32": 1}
    table = summary.table()
    assert "Q4_K, 8 fallbacks" in table
    for name in ("Q4_K", "Q5_0", "F16", "F32", "total"):
        assert name in table


def test_fallback_report_shortens_long_lists():
    q4_0, f16 = FORMATS["Q4_0"], FORMATS["F16"]
    fallbacks = [Fallback(f"t{i}", 33 + i, q4_0, f16) for i in range(6)]
    [group] = group_fallbacks(fallbacks)
    assert group.tensors == tuple(f"t{i}" for i in range(6)) and group.row_lengths == tuple(range(33, 39))
    assert str(group) == ("fallback Q4_0 -> F16 for 6 tensors: row lengths 33, 34, 35, 36, ... not a multiple of 32 "
                          "(llama.cpp's rule), e.g. t0, t1, ...")
    assert group_fallbacks([]) == []
