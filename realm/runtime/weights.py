"""Loading a llama-family GGUF model: config, tokenizer metadata and weights, with matrices kept as QTensors.

    weights = load_weights("smollm2")        # a packaged model name or a path
    weights.layers[0].wq                      # QTensor [q_size, hidden], rows in HF (rotate-half rope) order

Tensor names follow llama.cpp (`token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output`); a missing `output`
means the output head is tied to the token embedding. GGUF stores llama's Q/K rows permuted for ggml's interleaved
rope (convert_hf_to_gguf.py's `permute`); the loader undoes it on the quantized rows (a row gather, exact), so every
backend applies the rotate-half rope of the original model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch

from ..gguf_io import (
    GGUFError,
    MetadataValue,
    open_gguf,
    read_metadata,
    tensor_shape,
    tensor_to_float,
    tensor_to_qtensor,
)
from ..models import MODELS, resolve_model
from ..quant import QTensor
from .config import Metadata, ModelConfig, ModelError


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: torch.Tensor  # float32 [hidden]
    wq: QTensor  # [q_size, hidden]
    wk: QTensor  # [kv_size, hidden]
    wv: QTensor  # [kv_size, hidden]
    wo: QTensor  # [hidden, q_size]
    ffn_norm: torch.Tensor  # float32 [hidden]
    w_gate: QTensor  # [ffn_hidden, hidden]
    w_up: QTensor  # [ffn_hidden, hidden]
    w_down: QTensor  # [hidden, ffn_hidden]
    bq: torch.Tensor | None = None  # float32 [q_size] (qwen2)
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # float32 [head_dim]: RMSNorm weights over each Q head (qwen3, gemma3)
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # float32 [hidden]: Gemma's norms on the attention and MLP outputs
    post_ffn_norm: torch.Tensor | None = None

    def qkv_bias(self) -> torch.Tensor | None:
        """float32 [q_size + 2 * kv_size]: the Q, K, V biases for a fused QKV projection (zeros for a missing one),
        or None when the layer has none."""
        biases = (self.bq, self.bk, self.bv)
        if all(b is None for b in biases):
            return None
        sizes = (self.wq.shape[0], self.wk.shape[0], self.wv.shape[0])
        return torch.cat([b if b is not None else torch.zeros(n) for b, n in zip(biases, sizes, strict=True)])


@dataclass(frozen=True)
class ModelWeights:
    config: ModelConfig
    metadata: dict[str, MetadataValue]
    token_embd: QTensor  # [vocab, hidden]
    layers: tuple[LayerWeights, ...]
    output_norm: torch.Tensor  # float32 [hidden]
    output: QTensor  # [vocab, hidden]; the token embedding itself when tied
    path: Path
    rope_freqs: torch.Tensor | None = None  # float32 [head_dim // 2]: Llama 3's rope factors (rope_freqs.weight)
    # The vocabulary id of token_embd's (and output's) first row: 0 for the whole model, v0 for a tensor-parallel
    # rank's shard, which holds rows [v0, v0 + rows) of the vocabulary (realm.parallel.tensor_parallel).
    vocab_start: int = 0

    @property
    def tied(self) -> bool:
        return self.output is self.token_embd

    def matrices(self) -> list[QTensor]:
        """Every distinct QTensor (the tied head once)."""
        seen = [self.token_embd] if self.tied else [self.token_embd, self.output]
        for layer in self.layers:
            seen += [layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up, layer.w_down]
        return seen


def unpermute_rope_rows(w: QTensor, n_heads: int) -> QTensor:
    """Undo convert_hf_to_gguf.py's Q/K permutation: per head, GGUF row (i, j) holds HF row (j, i), i < head_dim/2.

    The permutation moves whole rows, so it is a gather on the quantized rows and changes no value.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ModelError(f"a Q/K weight with {rows} rows cannot hold {n_heads} heads of even size")
    order = torch.arange(rows).view(n_heads, rows // n_heads // 2, 2).transpose(1, 2).reshape(-1)
    return QTensor(w.gguf_bytes()[order], w.fmt, w.shape)


class _Tensors:
    """The file's tensors by name, with shape checks against the config. Sizes are named by ModelConfig field
    ("hidden", "q_size", ...), so that a shape mismatch names the metadata keys the expected size came from."""

    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self.by_name = {t.name: t for t in reader.tensors}
        self.path = path
        self.config: ModelConfig | None = None
        self.read: set[str] = set()

    def check_all_read(self) -> None:
        """Every tensor of the file was used: one realm does not know (longrope's rope_factors_long, a bias of an
        architecture without biases, ...) would otherwise be ignored and change nothing it should change."""
        unread = sorted(set(self.by_name) - self.read)
        if unread:
            arch = self.config.arch.name if self.config is not None else "?"
            raise ModelError(f"{self.path}: {len(unread)} tensor(s) realm does not use for a {arch} model, e.g. "
                             f"{', '.join(map(repr, unread[:4]))}; refusing the file rather than ignoring them")

    def has(self, name: str) -> bool:
        return name in self.by_name

    def _get(self, name: str, fields: tuple[str, ...]):
        self.read.add(name)
        t = self.by_name.get(name)
        c = self.config
        if t is None:
            layer = f" ({c.arch.name}.block_count is {c.n_layers})" if c is not None and name.startswith("blk.") else ""
            raise ModelError(f"{self.path}: tensor {name!r} is missing{layer}")
        shape = tuple(getattr(c, f) for f in fields)
        if tensor_shape(t) != shape:
            sources = "; ".join(f"{getattr(c, f)} from {c.size_keys(f)}" for f in dict.fromkeys(fields))
            raise ModelError(f"{self.path}: tensor {name!r} has shape {list(tensor_shape(t))}, expected {list(shape)} "
                             f"from the metadata ({sources})")
        return t

    def matrix(self, name: str, rows: str, cols: str) -> QTensor:
        return tensor_to_qtensor(self._get(name, (rows, cols)))

    def vector(self, name: str, size: str) -> torch.Tensor:
        return tensor_to_float(self._get(name, (size,)))

    def optional_vector(self, name: str, size: str) -> torch.Tensor | None:
        return self.vector(name, size) if self.has(name) else None


def split_rows(w: QTensor, sizes: tuple[int, ...]) -> list[QTensor]:
    """A matrix cut into consecutive row ranges: quantized rows are independent, so each part is exact."""
    data, parts, start = w.gguf_bytes(), [], 0
    for n in sizes:
        parts.append(QTensor(data[start : start + n].contiguous(), w.fmt, (n, w.shape[1])))
        start += n
    return parts


def _qkv(tensors: _Tensors, p: str) -> tuple[QTensor, QTensor, QTensor]:
    """Q, K, V: three tensors, or one fused attn_qkv (phi3) cut into them."""
    if tensors.has(p + "attn_qkv.weight"):
        c = tensors.config
        fused = tensors.matrix(p + "attn_qkv.weight", "qkv_size", "hidden")
        return tuple(split_rows(fused, (c.q_size, c.kv_size, c.kv_size)))
    return (tensors.matrix(p + "attn_q.weight", "q_size", "hidden"),
            tensors.matrix(p + "attn_k.weight", "kv_size", "hidden"),
            tensors.matrix(p + "attn_v.weight", "kv_size", "hidden"))


def _gate_up(tensors: _Tensors, c: ModelConfig, p: str) -> tuple[QTensor, QTensor]:
    if c.arch.fused_gate_up:
        if tensors.has(p + "ffn_gate.weight"):
            raise ModelError(f"{tensors.path}: {p}ffn_gate.weight in a {c.arch.name} file, whose ffn_up holds the gate")
        gate, up = split_rows(tensors.matrix(p + "ffn_up.weight", "gate_up_size", "hidden"),
                              (c.ffn_hidden, c.ffn_hidden))
        return gate, up
    return (tensors.matrix(p + "ffn_gate.weight", "ffn_hidden", "hidden"),
            tensors.matrix(p + "ffn_up.weight", "ffn_hidden", "hidden"))


def _optional_norms(tensors: _Tensors, c: ModelConfig, p: str, names: tuple[str, ...], size: str, present: bool,
                    what: str) -> tuple[torch.Tensor | None, ...]:
    """Norm weights an architecture has (all of `names` required) or has not (any of them refused: never ignored)."""
    if present:
        return tuple(tensors.vector(f"{p}{name}.weight", size) for name in names)
    for name in names:
        if tensors.has(f"{p}{name}.weight"):
            raise ModelError(f"{tensors.path}: {p}{name}.weight in a {c.arch.name} file, whose architecture has no "
                             f"{what} (realm would ignore it)")
    return (None,) * len(names)


def _layer(tensors: _Tensors, c: ModelConfig, i: int) -> LayerWeights:
    p = f"blk.{i}."
    wq, wk, wv = _qkv(tensors, p)
    bq = tensors.optional_vector(p + "attn_q.bias", "q_size")
    bk = tensors.optional_vector(p + "attn_k.bias", "kv_size")
    if c.arch.rope_permuted:
        wq, wk = unpermute_rope_rows(wq, c.n_heads), unpermute_rope_rows(wk, c.n_kv_heads)
        if bq is not None or bk is not None:
            raise ModelError(f"{tensors.path}: Q/K biases on an architecture with permuted rope rows are not supported")
    w_gate, w_up = _gate_up(tensors, c, p)
    q_norm, k_norm = _optional_norms(tensors, c, p, ("attn_q_norm", "attn_k_norm"), "head_dim", c.arch.qk_norm,
                                     "Q/K norm")
    post_attn_norm, post_ffn_norm = _optional_norms(tensors, c, p, ("post_attention_norm", "post_ffw_norm"), "hidden",
                                                    c.arch.post_norms, "post-attention/post-FFN norm")
    return LayerWeights(
        attn_norm=tensors.vector(p + "attn_norm.weight", "hidden"),
        wq=wq,
        wk=wk,
        wv=wv,
        wo=tensors.matrix(p + "attn_output.weight", "hidden", "q_size"),
        ffn_norm=tensors.vector(p + "ffn_norm.weight", "hidden"),
        w_gate=w_gate,
        w_up=w_up,
        w_down=tensors.matrix(p + "ffn_down.weight", "hidden", "ffn_hidden"),
        bq=bq,
        bk=bk,
        bv=tensors.optional_vector(p + "attn_v.bias", "kv_size"),
        q_norm=q_norm,
        k_norm=k_norm,
        post_attn_norm=post_attn_norm,
        post_ffn_norm=post_ffn_norm,
    )


def _refuse_what_realm_does_not_run(path: Path, md: Metadata, tensors: _Tensors) -> None:
    """Mixture-of-experts layers and vision or audio towers, named, before anything else is read."""
    arch = md.get("general.architecture")
    experts = md.get(f"{arch}.expert_count") if isinstance(arch, str) else None
    expert_tensors = sorted(n for n in tensors.by_name if "_exps" in n or "_shexp" in n)
    if experts or expert_tensors:
        what = f"{arch}.expert_count = {experts}" if experts else f"tensor {expert_tensors[0]!r}"
        raise ModelError(f"{path}: a mixture-of-experts model ({what}) is not supported")
    towers = sorted(k for k in md._values if k.startswith(("clip.", f"{arch}.vision.", f"{arch}.audio.")))
    if towers or any(n.startswith(("v.", "mm.", "a.")) for n in tensors.by_name):
        what = f"metadata {towers[0]}" if towers else "vision/audio tensors (v.*, mm.*, a.*)"
        raise ModelError(f"{path}: a vision or audio tower ({what}) is not supported; realm runs the text model "
                         "(llama.cpp keeps towers in a separate mmproj file)")


def model_file(model: str | os.PathLike) -> Path:
    """The GGUF file of a packaged model name (`realm.models.MODELS`) or a path; FileNotFoundError naming both."""
    path = resolve_model(model)
    if not path.exists():
        raise FileNotFoundError(2, f"no such model file (and not a packaged model name: {', '.join(MODELS)})",
                                str(path))
    return path


def load_weights(model: str | os.PathLike = "smollm2") -> ModelWeights:
    """Read a llama-family GGUF: a packaged model name (`realm.models.MODELS`) or a path."""
    path = model_file(model)
    reader = open_gguf(path)
    metadata = read_metadata(reader)
    tensors = _Tensors(reader, path)
    if not tensors.has("token_embd.weight"):
        raise ModelError(f"{path}: no token_embd.weight; not a llama-family model file")
    embd_rows = tensor_shape(tensors.by_name["token_embd.weight"])[0]
    md = Metadata(metadata)
    _refuse_what_realm_does_not_run(path, md, tensors)
    try:
        config = ModelConfig.from_metadata(md, vocab_size=embd_rows, has_freq_factors=tensors.has("rope_freqs.weight"))
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None
    tensors.config = config
    rope_freqs = None
    if tensors.has("rope_freqs.weight"):  # Llama 3's rope scaling: a divisor per frequency
        rope_freqs = tensors.vector("rope_freqs.weight", "rope_pairs")
        if not bool(torch.isfinite(rope_freqs).all()) or not bool((rope_freqs > 0).all()):
            raise ModelError(f"{path}: rope_freqs.weight must hold finite factors > 0")
    token_embd = tensors.matrix("token_embd.weight", "vocab_size", "hidden")
    output = token_embd
    if tensors.has("output.weight"):
        output = tensors.matrix("output.weight", "vocab_size", "hidden")
    tokens = md.get("tokenizer.ggml.tokens")
    if isinstance(tokens, (list, tuple)) and len(tokens) > config.vocab_size:
        # the tokenizer's types are checked when it is built; here only that every token id has an embedding
        raise ModelError(f"{path}: GGUF metadata tokenizer.ggml.tokens has {len(tokens)} tokens but the model only "
                         f"{config.vocab_size} embeddings (token_embd.weight rows)")
    layers = tuple(_layer(tensors, config, i) for i in range(config.n_layers))
    output_norm = tensors.vector("output_norm.weight", "hidden")
    tensors.check_all_read()
    return ModelWeights(
        config=config,
        metadata=metadata,
        token_embd=token_embd,
        layers=layers,
        output_norm=output_norm,
        output=output,
        path=path,
        rope_freqs=rope_freqs,
    )


__all__ = ["GGUFError", "LayerWeights", "ModelWeights", "load_weights", "unpermute_rope_rows"]
