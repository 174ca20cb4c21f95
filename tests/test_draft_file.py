"""realm.draft_file: layer drafts of a tiny random llama. A draft of every layer is the source's model exactly; a draft
of some layers computes what the source's weights with only those layers (in that order) compute, built in memory;
the file's other tensors and metadata are the source's; layer lists parse; every refusal names its reason."""

from __future__ import annotations

import argparse
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from gguf import GGUFValueType
from tiny_gguf import tiny_vocab_metadata, write_tiny_llama

import realm.models
from realm.draft_file import draft_args, draft_run, format_layers, make_layer_draft, parse_layers
from realm.gguf_io import GGUFError, MetadataValue, open_gguf, read_metadata, tensor_bytes
from realm.runtime.config import ModelError
from realm.runtime.ops import Backend
from realm.runtime.transformer import Transformer
from realm.runtime.weights import load_weights

LAYERS = 3
TOKENS = [[3, 17, 42, 8, 8, 1, 29, 5]]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A 3-layer tiny llama, Q8_0 matrices (a quantized format: the copy must keep the stored bytes)."""
    path = tmp_path_factory.mktemp("draft") / "src.gguf"
    write_tiny_llama(path, dims={"layers": LAYERS}, formats={k: "Q8_0" for k in ("attn_q", "attn_k", "attn_v",
                                                                               "attn_output", "ffn_gate", "ffn_up",
                                                                               "ffn_down", "output")})
    return path


def logits_of(weights) -> torch.Tensor:
    """float32 [T, vocab] of the torch reference forward on TOKENS."""
    return Transformer(weights, Backend.TORCH, torch.device("cpu"), torch.float32).forward_tokens(TOKENS, None, 0,
                                                                                                  False)[0]


def with_layers(weights, layers):
    """The source's weights in memory, keeping `layers` in that order: what a draft of them should be."""
    config = dataclasses.replace(weights.config, n_layers=len(layers))
    return dataclasses.replace(weights, config=config, layers=tuple(weights.layers[i] for i in layers))


def test_draft_of_every_layer_is_the_source(src, tmp_path):
    dst = tmp_path / "all.gguf"
    summary = make_layer_draft(src, dst, range(LAYERS))
    assert summary.layers == (0, 1, 2) and summary.src_layers == LAYERS and summary.tensors == 2 + 1 + 9 * LAYERS
    assert summary.dst_bytes == dst.stat().st_size and "3 layers: source layers 0-2 as 0..2" in summary.table()
    a, b = open_gguf(src), open_gguf(dst)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert ta.tensor_type == tb.tensor_type and torch.equal(tensor_bytes(ta), tensor_bytes(tb)), ta.name
    ma, mb = read_metadata(a), read_metadata(b)
    assert list(ma) == list(mb) and all(ma[k] == mb[k] for k in ma)
    assert torch.equal(logits_of(load_weights(dst)), logits_of(load_weights(src)))


@pytest.mark.parametrize("layers", [[0], [2, 0], [1, 2]], ids=str)
def test_draft_computes_what_the_source_layers_compute(src, tmp_path, layers):
    dst = tmp_path / "draft.gguf"
    make_layer_draft(src, dst, layers)
    draft, source = load_weights(dst), load_weights(src)
    assert draft.config.n_layers == len(layers)
    assert draft.config == dataclasses.replace(source.config, n_layers=len(layers))
    for j, i in enumerate(layers):  # blk.i's stored bytes became blk.j's
        assert torch.equal(draft.layers[j].wq.data, source.layers[i].wq.data)
        assert torch.equal(draft.layers[j].ffn_norm, source.layers[i].ffn_norm)
    assert torch.equal(draft.token_embd.data, source.token_embd.data) and torch.equal(draft.output.data,
                                                                                      source.output.data)
    got = logits_of(draft)
    assert torch.equal(got, logits_of(with_layers(source, layers)))
    assert not torch.allclose(got, logits_of(source), atol=1e-3)  # fewer layers: another model (the test can fail)


def test_metadata_is_kept_except_block_count(src, tmp_path):
    dst = tmp_path / "draft.gguf"
    make_layer_draft(src, dst, [2])
    before, after = read_metadata(open_gguf(src)), read_metadata(open_gguf(dst))
    assert list(before) == list(after)
    assert after["llama.block_count"] == MetadataValue(1, before["llama.block_count"].type)
    assert all(before[k] == after[k] for k in before if k != "llama.block_count")
    names = [t.name for t in open_gguf(dst).tensors]
    source = [t.name for t in open_gguf(src).tensors]
    assert [n for n in names if not n.startswith("blk.")] == [n for n in source if not n.startswith("blk.")]
    assert [n for n in names if n.startswith("blk.")] == [n for n in source if n.startswith("blk.0.")]


def test_a_tied_model_and_a_vocabulary_are_kept(tmp_path):
    src, dst = tmp_path / "tied.gguf", tmp_path / "tied-draft.gguf"
    write_tiny_llama(src, tied=True, metadata=tiny_vocab_metadata())
    make_layer_draft(src, dst, [1])
    weights = load_weights(dst)
    assert weights.tied and weights.config.n_layers == 1
    tokens = read_metadata(open_gguf(dst))["tokenizer.ggml.tokens"]
    assert tokens.value == tiny_vocab_metadata()["tokenizer.ggml.tokens"].value


def test_parse_and_format_layers():
    assert parse_layers("0-5,26-29") == [0, 1, 2, 3, 4, 5, 26, 27, 28, 29]
    assert parse_layers(" 3 , 1 ,7 - 8") == [3, 1, 7, 8]
    assert parse_layers("4") == [4] and parse_layers("2-2") == [2]
    for bad, message in (("", "comma-separated"), ("a", "comma-separated"), ("1,,2", "comma-separated"),
                         ("-1", "comma-separated"), ("1-2-3", "comma-separated"), ("5-3", "runs backwards")):
        with pytest.raises(ValueError, match=message):
            parse_layers(bad)
    assert format_layers([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and format_layers([3, 2, 1]) == "3,2,1"
    for text in ("0-3,8-11,14-29", "29,0-5", "7"):
        assert format_layers(parse_layers(text)) == text


def test_refusals(src, tmp_path):
    dst = tmp_path / "out.gguf"
    for layers, message in (([], "at least one layer"), ([0, 3], "layer 3 is out of range: .* has 3 layers"),
                            ([-1], "layer -1 is out of range"), ([1, 0, 1], "layer 1 is listed twice"),
                            ([0.5], "must be integers"), ([True], "must be integers"), ("0-1", "parse_layers")):
        with pytest.raises(ValueError, match=message):
            make_layer_draft(src, dst, layers)
    assert not dst.exists()
    with pytest.raises(GGUFError, match="output is the input file"):
        make_layer_draft(src, src, [0])
    with pytest.raises(FileNotFoundError, match="no such model file"):
        make_layer_draft(tmp_path / "missing.gguf", dst, [0])
    lora_like = tmp_path / "lora.gguf"  # a GGUF that is not a model: no architecture
    write_tiny_llama(lora_like, metadata={"general.architecture": MetadataValue("gpt2", GGUFValueType.STRING)})
    with pytest.raises(ModelError, match=r"not a llama-family model file .*'gpt2'"):
        make_layer_draft(lora_like, dst, [0])
    no_embd = tmp_path / "no-embd.gguf"
    write_tiny_llama(no_embd, drop="token_embd.weight")
    with pytest.raises(ModelError, match=r"no token_embd\.weight"):
        make_layer_draft(no_embd, dst, [0])
    short = tmp_path / "short.gguf"  # block_count says 3, the tensors are of 2 layers
    write_tiny_llama(short, metadata={"llama.block_count": MetadataValue(3, GGUFValueType.UINT32)})
    with pytest.raises(ModelError, match="layer 2 has no tensors"):
        make_layer_draft(short, dst, [0])
    assert not dst.exists() and not (tmp_path / "out.gguf.partial").exists()


def test_cli_functions(src, tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    draft_args(parser)
    # SRC may be a packaged model's name, as for `realm quantize`
    monkeypatch.setitem(realm.models.MODELS, "tinymodel", SimpleNamespace(path=lambda: src))
    dst = tmp_path / "cli.gguf"
    assert draft_run(parser.parse_args(["tinymodel", str(dst), "--layers", "2,0"])) == 0
    out = capsys.readouterr().out
    assert f"input  {src}" in out and "2 layers: source layers 2,0 as 0..1" in out
    assert load_weights(dst).config.n_layers == 2
    with pytest.raises(ValueError, match="runs backwards"):
        draft_run(parser.parse_args([str(src), str(tmp_path / "x.gguf"), "--layers", "2-1"]))
    with pytest.raises(SystemExit):  # --layers is required
        parser.parse_args([str(src), str(dst)])

