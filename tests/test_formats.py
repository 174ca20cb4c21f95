"""The format table: names, GGUF type ids, block sizes and byte layouts as ggml defines them."""

import gguf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from realm.quant import FORMATS, QuantError, format_for_ggml_type, get_format
from realm.quant.spec import join_fields, split_fields

# (block size, bytes per block) from ggml's structs in ggml-common.h (sizeof(block_*))
GGML_STRUCTS = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q8_1": (32, 36),  # fp16 d, fp16 s, 32 int8: gguf-py's table says 40
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "Q8_K": (256, 292),  # float32 d, 256 int8, 16 int16 block sums
    "IQ4_NL": (32, 18), "IQ4_XS": (256, 136), "MXFP4": (32, 17),
}


def test_names_are_exactly_the_required_list():
    assert list(FORMATS) == list(GGML_STRUCTS)


@pytest.mark.parametrize("name", list(GGML_STRUCTS))
def test_layout_matches_ggml_structs(name):
    fmt = FORMATS[name]
    assert (fmt.block_size, fmt.block_bytes) == GGML_STRUCTS[name]
    assert fmt.bits_per_weight == 8 * GGML_STRUCTS[name][1] / GGML_STRUCTS[name][0]


@pytest.mark.parametrize("name", list(GGML_STRUCTS))
def test_type_id_is_ggufs(name):
    fmt = FORMATS[name]
    assert fmt.ggml_type == gguf.GGMLQuantizationType[name].value
    assert format_for_ggml_type(fmt.ggml_type) is fmt
    if name != "Q8_1":
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == GGML_STRUCTS[name]


def test_only_activation_formats_are_not_storage():
    assert [f.name for f in FORMATS.values() if not f.storage] == ["Q8_1", "Q8_K"]


def test_lookup_is_case_insensitive_and_errors_name_the_problem():
    assert get_format("q4_k") is FORMATS["Q4_K"]
    with pytest.raises(QuantError, match=r"unknown format 'Q4_9'.*Q4_K"):
        get_format("Q4_9")
    with pytest.raises(QuantError, match=r"GGUF type 16 \(IQ2_XXS\) is not supported"):
        format_for_ggml_type(16)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(list(GGML_STRUCTS)), n=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_split_then_join_fields_is_identity(name, n, seed):
    fmt = FORMATS[name]
    raw = torch.randint(0, 256, (n, fmt.block_bytes), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    fields = split_fields(fmt, raw)
    assert [f.name for f in fmt.fields] == list(fields)
    assert torch.equal(join_fields(fmt, fields), raw)


def test_split_fields_rejects_wrong_block_bytes():
    with pytest.raises(QuantError, match=r"Q4_0 blocks must be uint8 \[n, 18\]"):
        split_fields(FORMATS["Q4_0"], torch.zeros(2, 17, dtype=torch.uint8))
