"""A tiny random llama-family model written as a GGUF file, for tests that need a whole model quickly: the loader
and forward against HF transformers, generation limits, and the Triton forward against the torch reference."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from realm.gguf_io import MetadataValue, _Writer
from realm.quant import FORMATS, quantize
from realm.runtime.tokenizer import IdTokenizer


def gguf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's `LlamaModel.permute`, written out: per head, rows [2, head_dim/2] -> [head_dim/2, 2]."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GEMMAS = ("gemma2", "gemma3")
TINY = dict(hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn=96, vocab=50, layers=2, theta=10000.0, eps=1e-6)


def write_tiny_llama(path: Path, arch: str = "llama", tied: bool = False, drop: str | None = None,
                     seed: int = 0, dims: dict | None = None, formats: dict[str, str] | None = None,
                     context_length: int = 32,
                     metadata: dict[str, MetadataValue | None] | None = None,
                     extra_tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A random llama-family model (TINY's sizes, updated by `dims`) stored as GGUF, with Q/K rows permuted as the
    converter does. Matrices are float32 unless `formats` names a block format for their GGUF kind ("attn_q",
    "ffn_down", "token_embd", "output", ...). `metadata` adds or replaces keys with values of any GGUF type (empty
    arrays too), or removes them (None); `tiny_vocab_metadata` gives a vocabulary. `extra_tensors` are written as
    they are, float32 (e.g. rope_freqs.weight). Returns the HF-layout weights (HF state-dict names), before
    quantization."""
    t = {**TINY, **(dims or {})}
    formats = formats or {}
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(shape, generator=g) * scale

    # Gemma multiplies the embedding by sqrt(hidden): scaled down here so that the tied head does not just echo the
    # last token
    embed_scale = t["hidden"] ** -0.5 if arch in GEMMAS else 1.0
    hf: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(t["vocab"], t["hidden"], scale=embed_scale),
                                   "model.norm.weight": 1 + rnd(t["hidden"])}
    if not tied:
        hf["lm_head.weight"] = rnd(t["vocab"], t["hidden"])
    q, kv = t["n_heads"] * t["head_dim"], t["n_kv_heads"] * t["head_dim"]
    for i in range(t["layers"]):
        p = f"model.layers.{i}."
        hf |= {p + "input_layernorm.weight": 1 + rnd(t["hidden"]), p + "post_attention_layernorm.weight": 1 + rnd(
            t["hidden"]), p + "self_attn.q_proj.weight": rnd(q, t["hidden"]), p + "self_attn.k_proj.weight": rnd(
            kv, t["hidden"]), p + "self_attn.v_proj.weight": rnd(kv, t["hidden"]), p + "self_attn.o_proj.weight": rnd(
            t["hidden"], q), p + "mlp.gate_proj.weight": rnd(t["ffn"], t["hidden"]), p + "mlp.up_proj.weight": rnd(
            t["ffn"], t["hidden"]), p + "mlp.down_proj.weight": rnd(t["hidden"], t["ffn"])}
        if arch == "qwen2":
            hf |= {p + "self_attn.q_proj.bias": rnd(q), p + "self_attn.k_proj.bias": rnd(kv),
                   p + "self_attn.v_proj.bias": rnd(kv)}
        if arch == "qwen3":
            hf |= {p + "self_attn.q_norm.weight": 1 + rnd(t["head_dim"]), p + "self_attn.k_norm.weight": 1 + rnd(
                t["head_dim"])}
        if arch in GEMMAS:  # norms on the attention and MLP outputs (gemma3: Q/K norms); weights w of HF's (1 + w)
            hf |= {p + "pre_feedforward_layernorm.weight": rnd(t["hidden"]), p + "post_feedforward_layernorm.weight":
                   rnd(t["hidden"])}
            if arch == "gemma3":
                hf |= {p + "self_attn.q_norm.weight": rnd(t["head_dim"]), p + "self_attn.k_norm.weight": rnd(
                    t["head_dim"])}
            for name in ("input_layernorm", "post_attention_layernorm"):
                hf[p + name + ".weight"] -= 1  # rnd around 0, as Gemma's are
        if arch == "phi3":  # HF's Phi3 fuses these itself; the converter writes them as they are
            hf[p + "self_attn.qkv_proj.weight"] = torch.cat([hf.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
            hf[p + "mlp.gate_up_proj.weight"] = torch.cat([hf.pop(p + f"mlp.{x}_proj.weight") for x in ("gate", "up")])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "self_attn.qkv_proj": "attn_qkv",
             "mlp.gate_up_proj": "ffn_up"}
    if arch in GEMMAS:  # HF's post_attention_layernorm is Gemma's norm on the attention output, not the MLP's input
        hf["model.norm.weight"] -= 1
        names |= {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                  "post_feedforward_layernorm": "post_ffw_norm"}
    w = _Writer(path, arch)
    w.add_block_count(t["layers"])
    w.add_context_length(context_length)
    w.add_embedding_length(t["hidden"])
    w.add_feed_forward_length(t["ffn"])
    w.add_head_count(t["n_heads"])
    w.add_head_count_kv(t["n_kv_heads"])
    if t["head_dim"] * t["n_heads"] != t["hidden"]:
        w.add_key_length(t["head_dim"])
        w.add_value_length(t["head_dim"])
    w.add_rope_freq_base(t["theta"])
    w.add_layer_norm_rms_eps(t["eps"])
    for key, value in (metadata or {}).items():
        w.kv_data[0].pop(key, None)
        if value is not None:
            w.add_key_value(key, value.value, value.type, sub_type=value.sub_type)
    tensors = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if not tied:
        tensors["output.weight"] = hf["lm_head.weight"]
    for name, value in hf.items():
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = t["n_heads"] if module == "self_attn.q_proj" else t["n_kv_heads"]
                value = gguf_permute(value, heads)
            tensors[f"blk.{i}.{names[module]}.{kind}"] = value
    if arch in GEMMAS:  # convert_hf_to_gguf.py stores Gemma's norm weights as 1 + w
        tensors = {k: v + 1 if k.endswith("norm.weight") else v for k, v in tensors.items()}
    tensors |= extra_tensors or {}
    for name, value in tensors.items():
        fmt = formats.get(name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0])
        if name == drop:
            continue
        if fmt is None or value.dim() == 1:
            w.add_tensor(name, value.numpy().astype(np.float32))
        else:
            data = quantize(value, fmt)
            w.add_tensor(name, data.numpy(), raw_dtype=GGMLQuantizationType(FORMATS[fmt].ggml_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def tiny_vocab_metadata(vocab: int = TINY["vocab"]) -> dict[str, MetadataValue]:
    """A byte-level BPE (gpt2) vocabulary of `vocab` tokens for the tiny model: three control tokens (<|endoftext|>,
    <|im_start|>, <|im_end|>), "Ġ", the letters a-z and merged pairs "ab", "cd", ..., with a ChatML template."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pairs = [a + b for a in letters for b in letters]
    tokens = (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "Ġ", *letters, *pairs])[:vocab]
    merges = [f"{t[0]} {t[1]}" for t in tokens[30:]]
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    V = gguf.GGUFValueType
    return {
        "tokenizer.ggml.model": MetadataValue("gpt2", V.STRING),
        "tokenizer.ggml.pre": MetadataValue("gpt-2", V.STRING),
        "tokenizer.ggml.tokens": MetadataValue(tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": MetadataValue([3, 3, 3] + [1] * (len(tokens) - 3), V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": MetadataValue(merges, V.ARRAY, V.STRING),
        "tokenizer.ggml.bos_token_id": MetadataValue(0, V.UINT32),
        "tokenizer.ggml.eos_token_id": MetadataValue(2, V.UINT32),
        "tokenizer.ggml.add_bos_token": MetadataValue(False, V.BOOL),
        "tokenizer.chat_template": MetadataValue(template, V.STRING),
    }


StubTokenizer = IdTokenizer  # what generation needs of a tokenizer, for the tiny GGUF (no vocabulary)


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low_freq_factor: float, high_freq_factor: float,
                        original_context: int) -> torch.Tensor:
    """rope_freqs.weight as convert_hf_to_gguf.py's LlamaModel writes it for HF's llama3 rope scaling: per frequency
    the divisor llama.cpp applies (1 for short wavelengths, `factor` for long ones, smoothed between)."""
    import math

    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_wavelen, high_wavelen = original_context / low_freq_factor, original_context / high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)
