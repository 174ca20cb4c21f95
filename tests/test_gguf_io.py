"""realm.gguf_io (reading, validation, streamed writing) and realm.quantize_file (re-encoding a model file)."""

from __future__ import annotations

import math
import struct

import gguf
import numpy as np
import pytest
import torch
from fake_gguf import METADATA, TENSORS, source_bytes, write_model
from gguf import GGUFValueType

from realm.gguf_io import (
    GGUFError,
    MetadataValue,
    TensorSpec,
    find_tensor,
    open_gguf,
    read_metadata,
    tensor_bytes,
    tensor_format,
    tensor_shape,
    tensor_to_float,
    tensor_to_qtensor,
    write_gguf,
)
from realm.quant import FORMATS, QuantError, quantize
from realm.quantize_file import FALLBACK, FILE_TYPES, choose_format, quantize_gguf

STORAGE = [f.name for f in FORMATS.values() if f.storage]


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "tiny.gguf"
    return path, write_model(path)


def fields(path) -> dict[str, tuple]:
    """Every metadata key as (type, item type, value), read back with gguf-py's reader."""
    r = gguf.GGUFReader(path)
    out = {}
    for f in r.fields.values():
        if not f.name.startswith("GGUF."):
            sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
            out[f.name] = (f.types[0], sub, f.contents())
    return out


# ---------------------------------------------------------------------------------------------------------- reading


def test_tensor_shape_reverses_ggml_ne(model):
    path, _ = model
    reader = open_gguf(path)
    for t in reader.tensors:
        _, shape = TENSORS[t.name]
        assert tensor_shape(t) == shape
        assert tuple(int(d) for d in t.shape) == shape[::-1]  # gguf-py reports ggml's ne: row length first


def test_tensor_values_and_formats(model):
    path, stored = model
    reader = open_gguf(path)
    assert [t.name for t in reader.tensors] == list(TENSORS)
    for t in reader.tensors:
        fmt, shape = TENSORS[t.name]
        assert tensor_format(t).name == fmt
        w = tensor_to_float(t)
        assert w.dtype == torch.float32 and tuple(w.shape) == shape
        assert torch.equal(w, stored[t.name]), t.name
        assert torch.equal(tensor_bytes(t), source_bytes(t.name)), t.name


def test_qtensor_shares_the_file_bytes(model):
    path, stored = model
    reader = open_gguf(path)
    q = tensor_to_qtensor(find_tensor(reader, "blk.0.ffn_up.weight"))
    assert q.fmt.name == "Q4_K" and q.shape == (24, 256)
    assert torch.equal(q.dequantize(), stored["blk.0.ffn_up.weight"])
    with pytest.raises(GGUFError, match=r"'blk.0.attn_norm.weight' has shape \[256\]; a QTensor needs a 2-D"):
        tensor_to_qtensor(find_tensor(reader, "blk.0.attn_norm.weight"))
    with pytest.raises(GGUFError, match="no tensor named 'nope'"):
        find_tensor(reader, "nope")


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    path = tmp_path / "ids.gguf"
    write_model(path, extra={"blk.0.ids": ("I32", np.arange(6, dtype=np.int32))})
    t = find_tensor(open_gguf(path), "blk.0.ids")
    with pytest.raises(GGUFError, match=r"tensor 'blk.0.ids': GGUF type 26 \(I32\) is not supported"):
        tensor_to_float(t)


def test_metadata_read(model):
    path, _ = model
    meta = read_metadata(open_gguf(path))
    assert next(iter(meta)) == "general.architecture" and meta["general.architecture"].value == "llama"
    assert not any(k.startswith("GGUF.") for k in meta)
    for key, (value, vtype, sub_type) in METADATA.items():
        got = meta[key]
        assert (got.type, got.sub_type) == (vtype, sub_type), key
        if vtype in (GGUFValueType.FLOAT32,):
            assert got.value == pytest.approx(value, rel=1e-7), key
        else:
            assert got.value == value, key


# ---------------------------------------------------------------------------------------------------------- writing


def copy_file(src, dst) -> None:
    reader = open_gguf(src)
    specs = [TensorSpec(t.name, tensor_shape(t), tensor_format(t)) for t in reader.tensors]
    write_gguf(dst, read_metadata(reader), specs, (tensor_bytes(t) for t in reader.tensors))


@pytest.mark.parametrize("alignment", [None, 64])
def test_copy_round_trips_metadata_and_tensors(tmp_path, alignment):
    src, dst = tmp_path / "src.gguf", tmp_path / "dst.gguf"
    write_model(src, alignment=alignment)
    copy_file(src, dst)
    assert fields(dst) == fields(src)
    assert list(gguf.GGUFReader(dst).fields) == list(gguf.GGUFReader(src).fields)  # key order too
    a, b = open_gguf(src), open_gguf(dst)
    assert b.alignment == (alignment or gguf.GGUF_DEFAULT_ALIGNMENT)
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert (ta.name, ta.tensor_type, list(ta.shape)) == (tb.name, tb.tensor_type, list(tb.shape))
        assert torch.equal(tensor_bytes(ta), tensor_bytes(tb))
        assert (tb.data_offset - b.data_offset) % b.alignment == 0
    assert dst.stat().st_size == src.stat().st_size  # same layout, byte for byte the same size


def test_write_keeps_empty_arrays(tmp_path):
    path = tmp_path / "empty.gguf"
    meta = {
        "general.architecture": MetadataValue("llama", GGUFValueType.STRING),
        "test.empty": MetadataValue([], GGUFValueType.ARRAY, GGUFValueType.INT32),
        "test.after": MetadataValue(7, GGUFValueType.UINT32),
    }
    write_gguf(path, meta, [], [])
    assert read_metadata(open_gguf(path)) == meta


def test_write_checks_data_against_specs(tmp_path):
    spec = TensorSpec("w", (2, 32), FORMATS["Q8_0"])
    meta = {"general.architecture": MetadataValue("llama", GGUFValueType.STRING)}
    with pytest.raises(GGUFError, match=r"tensor 'w': Q8_0 \[2, 32\] needs 68 bytes, got 10"):
        write_gguf(tmp_path / "a.gguf", meta, [spec], [np.zeros(10, np.uint8)])
    with pytest.raises(GGUFError, match="data ended before tensor 'w'"):
        write_gguf(tmp_path / "a.gguf", meta, [spec], [])
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


# ---------------------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match=r"nope\.gguf: no such file"):
        open_gguf(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="not a regular file"):
        open_gguf(tmp_path)


@pytest.mark.parametrize(("content", "message"), [
    (b"", "not a GGUF file: the file is empty"),
    (b"PK\x03\x04" + bytes(40), r"not a GGUF file: it starts with b'PK\\x03\\x04' \(50 4b 03 04\), expected b'GGUF'"),
    (b"GG", r"not a GGUF file: it starts with b'GG'"),
])
def test_not_gguf(tmp_path, content, message):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=message):
        open_gguf(path)


def test_truncated_in_tensor_data_names_the_tensor(model):
    path, _ = model
    size = path.stat().st_size
    last = open_gguf(path).tensors[-1]
    path.write_bytes(path.read_bytes()[: size - 10])
    with pytest.raises(GGUFError) as e:
        open_gguf(path)
    assert (f"truncated file: tensor 'output_norm.weight' needs {last.n_bytes} bytes at offset {last.data_offset} "
            f"(up to byte {last.data_offset + last.n_bytes}) but the file has only {size - 10} bytes") in str(e.value)


@pytest.mark.parametrize("keep", [4, 23, 24, 100, 600, "tensor_info"])
def test_truncated_header(model, keep):
    path, _ = model
    reader = open_gguf(path)
    if keep == "tensor_info":
        keep = reader.tensors[3].field.offset + 5  # inside the fourth tensor's name
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(GGUFError, match=r"tiny.gguf: truncated"):
        open_gguf(path)


def _patch(path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_corrupt_value_type(model):
    path, _ = model
    field = gguf.GGUFReader(path).fields["general.name"]
    type_offset = field.offset + 8 + len("general.name")
    _patch(path, type_offset, struct.pack("<I", 99))
    with pytest.raises(GGUFError, match=r"tiny\.gguf: corrupt header: unknown metadata value type 99 \(value at"):
        open_gguf(path)


def test_corrupt_version(model):
    path, _ = model
    _patch(path, 4, struct.pack("<I", 7))
    with pytest.raises(GGUFError, match=r"corrupt GGUF header: .*version 7"):
        open_gguf(path)


def test_corrupt_counts_and_lengths(model):
    path, _ = model
    good = path.read_bytes()
    _patch(path, 8, struct.pack("<Q", 2**40))  # tensor count
    with pytest.raises(GGUFError, match=r"truncated or corrupt header: it declares 1099511627776 tensors"):
        open_gguf(path)
    path.write_bytes(good)
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.token_type"]
    count_offset = field.offset + 8 + len(field.name) + 4 + 4
    _patch(path, count_offset, struct.pack("<Q", 2**50))  # array length: must fail at once, not loop
    with pytest.raises(GGUFError, match="truncated or corrupt header: a field at byte"):
        open_gguf(path)


def test_corrupt_tensor_info(model):
    path, _ = model
    good = path.read_bytes()
    t = gguf.GGUFReader(path).tensors[2]
    type_offset = t.field.offset + 8 + len(t.name) + 4 + 8 * len(t.shape)
    _patch(path, type_offset, struct.pack("<I", 999))
    with pytest.raises(GGUFError, match=r"tensor 'blk\.0\.attn_q\.weight' has GGML type id 999"):
        open_gguf(path)
    path.write_bytes(good)
    _patch(path, type_offset + 4, struct.pack("<Q", 3))  # data offset off the alignment
    with pytest.raises(GGUFError, match=r"tensor 'blk\.0\.attn_q\.weight' data offset 3 is not a multiple of the"):
        open_gguf(path)


# ---------------------------------------------------------------------------------------------------- re-encoding

# Written out by hand from llama.cpp's tensor_type_fallback (not computed from realm's table):
# row length -> the format each target falls back to (None: the target itself).
EXPECTED_FALLBACK = {
    96: {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"},
    64: {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"},
    576: {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"},
    256: {},
    33: {f: "F16" for f in STORAGE if f not in ("F32", "F16", "BF16")},
    40: {f: "F16" for f in STORAGE if f not in ("F32", "F16", "BF16")},
}


def expected_format(name: str, target: str) -> str:
    shape = TENSORS[name][1]
    if len(shape) == 1:
        return "F32"
    return EXPECTED_FALLBACK[shape[-1]].get(target, target)


def test_fallback_table_is_llamas():
    assert dict(FALLBACK) == {"IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1",
                              "Q6_K": "Q8_0"}
    # llama.cpp throws for a >32-weight block type without an entry; realm's storage formats all have one
    assert all(f.block_size <= 32 for f in FORMATS.values() if f.storage and f.name not in FALLBACK)
    assert choose_format(576, FORMATS["Q4_K"]).name == "Q5_0"
    assert choose_format(512, FORMATS["Q4_K"]).name == "Q4_K"
    assert choose_format(40, FORMATS["Q4_K"]).name == "F16"  # Q5_0 does not divide 40 either
    assert choose_format(33, FORMATS["IQ4_NL"]).name == "F16"
    assert choose_format(33, FORMATS["BF16"]).name == "BF16"


def test_file_types():
    assert set(FILE_TYPES) == set(STORAGE)
    assert FILE_TYPES["F32"] == gguf.LlamaFileType.ALL_F32
    assert FILE_TYPES["Q4_K"] == gguf.LlamaFileType.MOSTLY_Q4_K_S
    assert FILE_TYPES["Q3_K"] == gguf.LlamaFileType.MOSTLY_Q3_K_S
    assert FILE_TYPES["Q5_K"] == gguf.LlamaFileType.MOSTLY_Q5_K_S
    assert FILE_TYPES["MXFP4"] == gguf.LlamaFileType.MOSTLY_MXFP4_MOE
    for name, ftype in FILE_TYPES.items():
        if name not in ("F32", "MXFP4"):
            assert ftype.name.removeprefix("MOSTLY_").removesuffix("_S") == name


@pytest.mark.parametrize("target", STORAGE)
def test_reencode_matches_quantize(tmp_path, model, target):
    src, stored = model
    dst = tmp_path / f"out.{target}.gguf"
    summary = quantize_gguf(src, dst, target, progress=False)
    out = open_gguf(dst)
    err_sq, ref_sq = {}, {}
    for t in out.tensors:
        fmt = expected_format(t.name, target)
        assert tensor_format(t).name == fmt, t.name
        assert tensor_shape(t) == TENSORS[t.name][1]
        ref = stored[t.name]
        assert torch.equal(tensor_bytes(t), quantize(ref, fmt)), f"{t.name} ({fmt})"
        err = (tensor_to_float(t) - ref).double()
        err_sq[fmt] = err_sq.get(fmt, 0.0) + float(err.square().sum())
        ref_sq[fmt] = ref_sq.get(fmt, 0.0) + float(ref.double().square().sum())
    assert set(summary.formats) == set(err_sq)
    for fmt, stats in summary.formats.items():
        assert stats.rel_rmse == pytest.approx(math.sqrt(err_sq[fmt] / ref_sq[fmt]), rel=1e-9, abs=1e-12)
    assert summary.total.tensors == len(TENSORS)
    assert summary.dst_bytes == dst.stat().st_size and summary.src_bytes == src.stat().st_size


def test_reencode_metadata(tmp_path, model):
    src, _ = model
    dst = tmp_path / "out.gguf"
    quantize_gguf(src, dst, "Q4_K", progress=False)
    before, after = fields(src), fields(dst)
    assert list(after) == list(before)  # same keys, same order
    assert after.pop("general.file_type") == (GGUFValueType.UINT32, None, int(gguf.LlamaFileType.MOSTLY_Q4_K_S))
    assert after.pop("general.quantization_version") == (GGUFValueType.UINT32, None, 2)
    before.pop("general.file_type"), before.pop("general.quantization_version")
    assert after == before


def test_reencode_respects_alignment(tmp_path):
    src, dst = tmp_path / "src.gguf", tmp_path / "dst.gguf"
    write_model(src, alignment=128)
    quantize_gguf(src, dst, "Q8_0", progress=False)
    out = open_gguf(dst)
    assert out.alignment == 128 and fields(dst)["general.alignment"] == (GGUFValueType.UINT32, None, 128)
    assert all((t.data_offset - out.data_offset) % 128 == 0 for t in out.tensors)


def test_reencode_prints_fallbacks(tmp_path, model, capsys):
    src, _ = model
    summary = quantize_gguf(src, tmp_path / "out.gguf", "Q4_K", progress=False)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [  # one line per (target -> fallback), not one per tensor
        "fallback Q4_K -> Q5_0 for 3 tensors: row lengths 64, 96, 576 not a multiple of 256 (llama.cpp's rule), "
        "e.g. blk.0.attn_k.weight, blk.0.ffn_down.weight, ...",
        "fallback Q4_K -> F16 for 2 tensors: row lengths 33, 40 not a multiple of 256, nor of Q5_0's 32 "
        "(llama.cpp's rule), e.g. blk.0.attn_output.weight, blk.0.odd.weight",
    ]
    assert [str(f) for f in summary.fallbacks] == [  # every tensor is still recorded
        "blk.0.attn_k.weight: row 576 not a multiple of 256 for Q4_K -> Q5_0",
        "blk.0.attn_output.weight: row 40 not a multiple of 256 for Q4_K -> F16",
        "blk.0.ffn_down.weight: row 96 not a multiple of 256 for Q4_K -> Q5_0",
        "blk.0.ffn_up_exps.weight: row 64 not a multiple of 256 for Q4_K -> Q5_0",
        "blk.0.odd.weight: row 33 not a multiple of 256 for Q4_K -> F16",
    ]
    table = summary.table()
    for name in ("Q4_K", "Q5_0", "F16", "F32", "total", "5 fallbacks"):
        assert name in table


@pytest.mark.parametrize("target", ["Q8_1", "Q8_K", "q8_k"])
def test_activation_formats_refused(tmp_path, model, target):
    src, _ = model
    dst = tmp_path / "out.gguf"
    with pytest.raises(QuantError, match=r"Q8_[1K] is an activation format: .*llama.cpp cannot load weights"):
        quantize_gguf(src, dst, target, progress=False)
    assert not dst.exists()


def test_reencode_errors_leave_no_output(tmp_path):
    src, dst = tmp_path / "src.gguf", tmp_path / "dst.gguf"
    write_model(src, extra={"blk.0.ids": ("I32", np.arange(6, dtype=np.int32))})
    with pytest.raises(GGUFError, match=r"'blk.0.ids': GGUF type 26 \(I32\)"):
        quantize_gguf(src, dst, "Q4_0", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]
    with pytest.raises(GGUFError, match="output is the input file"):
        quantize_gguf(src, src, "Q4_0", progress=False)
    with pytest.raises(QuantError, match="unknown format 'Q9_9'"):
        quantize_gguf(src, dst, "Q9_9", progress=False)


def test_reencode_names_tensor_on_bad_values(tmp_path):
    src, dst = tmp_path / "src.gguf", tmp_path / "dst.gguf"
    write_model(src, extra={"blk.0.bad.weight": ("F32", np.array([[1.0] * 31 + [np.inf]], np.float32))})
    with pytest.raises(QuantError, match=r"tensor 'blk\.0\.bad\.weight': cannot quantize to Q4_0: 1 non-finite"):
        quantize_gguf(src, dst, "Q4_0", progress=False)
    assert not dst.exists() and not (tmp_path / "dst.gguf.partial").exists()



@pytest.mark.parametrize("vocab", ["llama-spm", "gpt-2"])
def test_metadata_arrays_read_in_one_pass_equal_gguf_pys(vocab):
    """Arrays of strings and numbers (a vocabulary's tokens, scores, token types, merges) are read in one pass, not a
    memory-map view per item as gguf-py does (~25 s for Gemma's 262k tokens): the values must be gguf-py's."""
    from pathlib import Path

    path = Path(__file__).parent / "data" / "tokenizer" / f"ggml-vocab-{vocab}.gguf"
    ours = read_metadata(open_gguf(path))
    theirs = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].value == value, key
    assert any(isinstance(v.value, list) and len(v.value) > 1000 for v in ours.values())
