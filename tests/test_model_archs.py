"""The GGUF architectures beyond plain llama and qwen2 (issue 18): each as a tiny random model written the way
llama.cpp's converter writes it, against HF transformers' own class on the original weights: the same argmax at every
position and KL under the model tolerance, on prompts longer than what each feature changes (the original context of
a scaled rope, the sliding window); and the Triton forward (interpreter) against the torch one."""

from __future__ import annotations

import dataclasses

import gguf
import pytest
import torch
from test_lora_runtime import random_adapter
from tiny_gguf import TINY, StubTokenizer, llama3_rope_factors, write_tiny_llama
from tolerances import assert_same_predictions

from realm.gguf_io import MetadataValue
from realm.runtime import LLM, Backend, Model
from realm.runtime.config import ModelError, RopeScalingType
from realm.runtime.sampling import SamplingParams
from realm.runtime.torch_model import TorchModel
from realm.runtime.triton_model import TritonModel
from realm.runtime.weights import load_weights

V = gguf.GGUFValueType
CONTEXT = 64
# a prompt as long as the context, so that scaled frequencies and windows all matter
PROMPT = torch.tensor([[(7 * i + 3) % TINY["vocab"] for i in range(CONTEXT)]])


def hf_model(cls_name: str, config_name: str, state: dict[str, torch.Tensor], **config):
    transformers = pytest.importorskip("transformers")
    t = TINY
    base = dict(vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["ffn"],
                num_hidden_layers=t["layers"], num_attention_heads=t["n_heads"], num_key_value_heads=t["n_kv_heads"],
                head_dim=t["head_dim"], rms_norm_eps=t["eps"], max_position_embeddings=CONTEXT,
                tie_word_embeddings=False)
    attn = config.pop("attn_implementation", None)
    hf_config = getattr(transformers, config_name)(**(base | config))
    if attn is not None:
        hf_config._attn_implementation = attn
    model = getattr(transformers, cls_name)(hf_config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert not unexpected and set(missing) == tied, (missing, unexpected)
    return model


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


# ----------------------------------------------------------------------------------------------------- rope scaling

LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)


def rope_case(kind: str) -> tuple[dict, dict, dict]:
    """(GGUF metadata, extra tensors, HF rope_parameters) for one kind of rope scaling."""
    theta = TINY["theta"]
    if kind == "llama3":
        factors = llama3_rope_factors(TINY["head_dim"], theta, LLAMA3["factor"], LLAMA3["low_freq_factor"],
                                      LLAMA3["high_freq_factor"], LLAMA3["original_max_position_embeddings"])
        return {}, {"rope_freqs.weight": factors}, {"rope_type": "llama3", "rope_theta": theta, **LLAMA3}
    if kind == "linear":
        md = {"llama.rope.scaling.type": MetadataValue("linear", V.STRING),
              "llama.rope.scaling.factor": MetadataValue(4.0, V.FLOAT32)}
        return md, {}, {"rope_type": "linear", "rope_theta": theta, "factor": 4.0}
    md = {"llama.rope.scaling.type": MetadataValue("yarn", V.STRING),
          "llama.rope.scaling.factor": MetadataValue(4.0, V.FLOAT32),
          "llama.rope.scaling.original_context_length": MetadataValue(16, V.UINT32)}
    return md, {}, {"rope_type": "yarn", "rope_theta": theta, "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("kind", ["llama3", "linear", "yarn"])
def test_rope_scaling_matches_hf(tmp_path, kind):
    md, extra, hf_rope = rope_case(kind)
    state = write_tiny_llama(tmp_path / "m.gguf", context_length=CONTEXT, metadata=md, extra_tensors=extra)
    weights = load_weights(tmp_path / "m.gguf")
    assert weights.config.rope_scaling.type is RopeScalingType(kind)
    expected = hf_logits(hf_model("LlamaForCausalLM", "LlamaConfig", state, rope_parameters=hf_rope))
    assert_same_predictions(TorchModel(weights).forward_tokens(PROMPT), expected)
    # the scaling changes the result: an unscaled rope on the same weights does not give HF's scaled logits
    plain = hf_logits(hf_model("LlamaForCausalLM", "LlamaConfig", state, rope_theta=TINY["theta"]))
    assert (plain - expected).abs().max() > 1e-3


def test_rope_freqs_must_be_positive_and_alone(tmp_path):
    bad = torch.ones(TINY["head_dim"] // 2)
    bad[3] = 0.0
    write_tiny_llama(tmp_path / "m.gguf", extra_tensors={"rope_freqs.weight": bad})
    with pytest.raises(ModelError, match=r"rope_freqs\.weight must hold finite factors > 0"):
        load_weights(tmp_path / "m.gguf")
    md, _, _ = rope_case("linear")
    write_tiny_llama(tmp_path / "m2.gguf", metadata=md, extra_tensors={"rope_freqs.weight": torch.ones(8)})
    with pytest.raises(ModelError, match=r"rope_freqs\.weight together with llama\.rope\.scaling\.type = 'linear'"):
        load_weights(tmp_path / "m2.gguf")
    write_tiny_llama(tmp_path / "m3.gguf", extra_tensors={"rope_freqs.weight": torch.ones(5)})
    with pytest.raises(ModelError, match=r"'rope_freqs.weight' has shape \[5\], expected \[8\]"):
        load_weights(tmp_path / "m3.gguf")


# ------------------------------------------------------------------------------------------ Qwen 3 and Phi-3


@pytest.mark.parametrize("arch,cls", [("qwen3", "Qwen3"), ("phi3", "Phi3")])
def test_architecture_matches_hf(tmp_path, arch, cls):
    """qwen3: RMSNorm over each Q and K head before rope; phi3: Q, K, V in one attn_qkv tensor and the gate and up
    rows in one ffn_up; both rotate-half rope on unpermuted rows."""
    state = write_tiny_llama(tmp_path / "m.gguf", arch, context_length=CONTEXT)
    weights = load_weights(tmp_path / "m.gguf")
    assert weights.config.arch.name == arch
    extra = {"rope_parameters": {"rope_type": "default", "rope_theta": TINY["theta"]}}
    if arch == "phi3":
        extra |= {"pad_token_id": 0, "sliding_window": None}
    expected = hf_logits(hf_model(f"{cls}ForCausalLM", f"{cls}Config", state, **extra))
    assert_same_predictions(TorchModel(weights).forward_tokens(PROMPT), expected)


def test_qk_norm_tensors_are_required_where_the_architecture_has_them_and_refused_elsewhere(tmp_path):
    write_tiny_llama(tmp_path / "q.gguf", "qwen3", drop="blk.1.attn_k_norm.weight")
    with pytest.raises(ModelError, match=r"'blk\.1\.attn_k_norm\.weight' is missing"):
        load_weights(tmp_path / "q.gguf")
    write_tiny_llama(tmp_path / "l.gguf", extra_tensors={"blk.0.attn_q_norm.weight": torch.ones(TINY["head_dim"])})
    with pytest.raises(ModelError, match=r"attn_q_norm\.weight in a llama file, whose architecture has no Q/K norm"):
        load_weights(tmp_path / "l.gguf")


def test_phi3_fused_tensors_are_checked(tmp_path):
    write_tiny_llama(tmp_path / "p.gguf", "phi3", extra_tensors={"blk.0.ffn_gate.weight": torch.ones(96, 64)})
    with pytest.raises(ModelError, match=r"ffn_gate\.weight in a phi3 file"):
        load_weights(tmp_path / "p.gguf")
    write_tiny_llama(tmp_path / "p2.gguf", "phi3", metadata={"phi3.feed_forward_length": MetadataValue(80, V.UINT32)})
    with pytest.raises(ModelError, match=r"'blk.0.ffn_up.weight' has shape \[192, 64\], expected \[160, 64\] .*2 x "
                                         r"phi3.feed_forward_length"):
        load_weights(tmp_path / "p2.gguf")


# ----------------------------------------------------------------------------------------------- sliding window

WINDOW = 12  # shorter than the prompt (64), longer than a decode step's chunk


def window_metadata(arch: str) -> dict:
    return {f"{arch}.attention.sliding_window": MetadataValue(WINDOW, V.UINT32)}


@pytest.mark.parametrize("arch,cls", [("llama", "Mistral"), ("phi3", "Phi3")])
def test_sliding_window_matches_hf(tmp_path, arch, cls):
    """Mistral (architecture llama, as convert_hf_to_gguf.py stores MistralForCausalLM) and Phi-3 with a window
    shorter than the prompt: every position past the window differs from full attention, and realm follows HF. The
    converter (llama.cpp as in llama-cpp-python 0.3.36) writes Phi-3's window but not Mistral's, so a converted
    Mistral file runs with full attention, in llama.cpp and in realm; this file sets llama.attention.sliding_window,
    as a file that wants HF's window must."""
    state = write_tiny_llama(tmp_path / "m.gguf", arch, context_length=CONTEXT, metadata=window_metadata(arch))
    weights = load_weights(tmp_path / "m.gguf")
    assert weights.config.sliding_window == WINDOW
    extra = {"rope_parameters": {"rope_type": "default", "rope_theta": TINY["theta"]}, "sliding_window": WINDOW}
    if arch == "phi3":
        extra["pad_token_id"] = 0
    expected = hf_logits(hf_model(f"{cls}ForCausalLM", f"{cls}Config", state, **extra))
    got = TorchModel(weights).forward_tokens(PROMPT)
    assert_same_predictions(got, expected)
    full = TorchModel(dataclasses.replace(weights, config=dataclasses.replace(weights.config, sliding_window=None)))
    unwindowed = full.forward_tokens(PROMPT)  # the window matters exactly where a position has more keys than it
    assert torch.equal(unwindowed[:, :WINDOW], got[:, :WINDOW])
    assert (unwindowed[:, WINDOW:] - got[:, WINDOW:]).abs().amax(-1).min() > 1e-4


def test_a_window_of_zero_is_none_and_per_layer_patterns_are_refused(tmp_path):
    write_tiny_llama(tmp_path / "z.gguf", metadata={"llama.attention.sliding_window": MetadataValue(0, V.UINT32)})
    assert load_weights(tmp_path / "z.gguf").config.sliding_window is None
    write_tiny_llama(tmp_path / "p.gguf", metadata={
        "llama.attention.sliding_window": MetadataValue(8, V.UINT32),
        "llama.attention.sliding_window_pattern": MetadataValue(6, V.UINT32)})
    with pytest.raises(ModelError, match="sliding_window_pattern: per-layer sliding-window settings"):
        load_weights(tmp_path / "p.gguf")


# ------------------------------------------------------------------------------------------------------ Gemma 3

GEMMA_DIMS = {"layers": 6, "theta": 1e6}  # layer 5 global (rope base 1e6), layers 0-4 local (window, base 10000)


def write_tiny_gemma3(path) -> dict[str, torch.Tensor]:
    return write_tiny_llama(path, "gemma3", tied=True, dims=GEMMA_DIMS, context_length=CONTEXT,
                            metadata=window_metadata("gemma3"))


def test_gemma3_matches_hf(tmp_path):
    """Embedding times sqrt(hidden), (1 + w) norms stored as the converter stores them, Q/K norms, norms on the
    attention and MLP outputs, GELU-tanh gating, five local layers (window 12, rope base 10000) then a global one
    (rope base 1e6), a tied head."""
    state = write_tiny_gemma3(tmp_path / "g.gguf")
    weights = load_weights(tmp_path / "g.gguf")
    c = weights.config
    assert [c.layer_window(i) for i in range(6)] == [WINDOW] * 5 + [None]
    assert [c.layer_rope(i)[0] for i in range(6)] == [10000.0] * 5 + [1e6]
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6}}
    model = hf_model("Gemma3ForCausalLM", "Gemma3TextConfig", state, num_hidden_layers=6, tie_word_embeddings=True,
                     rope_parameters=rope, query_pre_attn_scalar=TINY["head_dim"], sliding_window=WINDOW,
                     layer_types=["sliding_attention"] * 5 + ["full_attention"], hidden_activation="gelu_pytorch_tanh",
                     final_logit_softcapping=None, attn_logit_softcapping=None, pad_token_id=0)
    assert_same_predictions(TorchModel(weights).forward_tokens(PROMPT), hf_logits(model))


# ------------------------------------------------------------------------------------------------------ Gemma 2

GEMMA2_CAPS = {"gemma2.attn_logit_softcapping": MetadataValue(2.0, V.FLOAT32),  # small: most scores are capped
               "gemma2.final_logit_softcapping": MetadataValue(3.0, V.FLOAT32)}


def write_tiny_gemma2(path) -> dict[str, torch.Tensor]:
    return write_tiny_llama(path, "gemma2", tied=True, dims={"layers": 4}, context_length=CONTEXT,
                            metadata=window_metadata("gemma2") | GEMMA2_CAPS)


def test_gemma2_matches_hf(tmp_path):
    """Gemma 3's layer without Q/K norms, local and global layers alternating (one rope base), and soft-capped
    attention scores and logits (HF's eager attention)."""
    state = write_tiny_gemma2(tmp_path / "g.gguf")
    weights = load_weights(tmp_path / "g.gguf")
    c = weights.config
    assert [c.layer_window(i) for i in range(4)] == [WINDOW, None, WINDOW, None]
    assert (c.attn_softcap, c.final_softcap) == (2.0, 3.0)
    model = hf_model("Gemma2ForCausalLM", "Gemma2Config", state, num_hidden_layers=4, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": TINY["theta"]},
                     query_pre_attn_scalar=TINY["head_dim"], sliding_window=WINDOW,
                     layer_types=["sliding_attention", "full_attention"] * 2, hidden_activation="gelu_pytorch_tanh",
                     attn_logit_softcapping=2.0, final_logit_softcapping=3.0, pad_token_id=0,
                     attn_implementation="eager")
    expected = hf_logits(model)
    got = TorchModel(weights).forward_tokens(PROMPT)
    assert_same_predictions(got, expected)
    assert got.abs().max() <= 3.0  # the final cap holds


# ------------------------------------------------------------------------------------------ the Triton backend

TRITON_CASES = {
    "llama3-rope": dict(arch="llama", extra_tensors=rope_case("llama3")[1]),
    "yarn-rope": dict(arch="llama", metadata=rope_case("yarn")[0]),
    "qwen3": dict(arch="qwen3"),
    "phi3": dict(arch="phi3", formats={"attn_qkv": "Q8_0", "ffn_up": "Q4_0"}),
    "mistral-window": dict(arch="llama", metadata=window_metadata("llama")),
    "gemma3": dict(arch="gemma3", tied=True, dims=GEMMA_DIMS, metadata=window_metadata("gemma3")),
    "gemma2": dict(arch="gemma2", tied=True, dims={"layers": 4}, metadata=window_metadata("gemma2") | GEMMA2_CAPS),
}
# pieces of the prompt run one after another on the cache: a prefill chunk, a decode, a verification-sized chunk
# and a longer chunk, so every attention kernel (flash, paged decode, paged verify, flash over pages) runs
PIECES = ((0, 30), (30, 31), (31, 35), (35, CONTEXT))


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_forward_follows_the_torch_one(tmp_path, case):
    write_tiny_llama(tmp_path / "m.gguf", context_length=CONTEXT, **TRITON_CASES[case])
    weights = load_weights(tmp_path / "m.gguf")
    expected = TorchModel(weights).forward_tokens(PROMPT)
    triton = TritonModel(weights, "cpu", torch.float32)
    assert_same_predictions(triton.forward_tokens(PROMPT), expected)
    cache = triton.new_cache(batch=1, capacity=CONTEXT)
    pieces = [triton.forward_tokens(PROMPT[:, a:b], cache, start=a) for a, b in PIECES]
    assert_same_predictions(torch.cat(pieces, dim=1), expected)


# ------------------------------------------------------------------------------------------------- the engine

ENGINE_CASES = {
    "qwen3 + llama3 rope": dict(arch="qwen3", extra_tensors=rope_case("llama3")[1]),
    "phi3 + window": dict(arch="phi3", metadata=window_metadata("phi3")),
    "mistral window + yarn": dict(arch="llama", metadata=window_metadata("llama") | rope_case("yarn")[0]),
    "gemma3": dict(arch="gemma3", tied=True, dims=GEMMA_DIMS, metadata=window_metadata("gemma3")),
    "gemma2": dict(arch="gemma2", tied=True, dims={"layers": 4}, metadata=window_metadata("gemma2") | GEMMA2_CAPS),
}
ENGINE_PROMPTS = [[(5 * i + 1) % TINY["vocab"] for i in range(n)] for n in (21, 3, 14, 30)]
ENGINE_TOKENS = [14, 9, 18, 12]


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_batched_generation_adapters_and_speculation(tmp_path, case):
    """Through the engine, on the torch backend: a batch (chunked prefill beside decodes, preemption on a small
    cache) gives every prompt its solo greedy output, with and without a LoRA adapter on the same batch, and n-gram
    speculation gives the plain outputs."""
    write_tiny_llama(tmp_path / "m.gguf", context_length=CONTEXT, **ENGINE_CASES[case])
    model = Model(load_weights(tmp_path / "m.gguf"), StubTokenizer(TINY["vocab"]), Backend.TORCH, torch.device("cpu"),
                  torch.float32)
    model.add_lora("a", random_adapter(model.config, "a", rank=4, seed=3))

    def params(n, **kw):
        return SamplingParams(max_tokens=n, ignore_eos=True, **kw)

    adapters = [None, "a", "a", None]
    alone = [model.generate(p, params(n, adapter=a)).token_ids
             for p, n, a in zip(ENGINE_PROMPTS, ENGINE_TOKENS, adapters, strict=True)]
    assert alone[0] != model.generate(ENGINE_PROMPTS[0], params(ENGINE_TOKENS[0], adapter="a")).token_ids
    llm = LLM(model, max_batch_tokens=8, kv_blocks=14, block_size=4)
    outs = llm.generate(ENGINE_PROMPTS, [params(n, adapter=a) for n, a in zip(ENGINE_TOKENS, adapters, strict=True)])
    assert [o.token_ids for o in outs] == alone
    assert llm.engine.scheduler.stats.preemptions > 0
    spec = llm.generate(ENGINE_PROMPTS, [params(n, adapter=a, speculative="ngram")
                                         for n, a in zip(ENGINE_TOKENS, adapters, strict=True)])
    assert [o.token_ids for o in spec] == alone


# ------------------------------------------------------------------------------------------ refused by name

@pytest.mark.parametrize("change,message", [
    (dict(metadata={"llama.expert_count": MetadataValue(8, V.UINT32)}),
     r"a mixture-of-experts model \(llama.expert_count = 8\) is not supported"),
    (dict(extra_tensors={"blk.0.ffn_gate_exps.weight": torch.ones(4, 8)}),
     r"a mixture-of-experts model \(tensor 'blk.0.ffn_gate_exps.weight'\)"),
    (dict(metadata={"clip.vision.image_size": MetadataValue(224, V.UINT32)}),
     r"a vision or audio tower \(metadata clip.vision.image_size\) is not supported"),
    (dict(extra_tensors={"v.patch_embd.weight": torch.ones(4, 8)}), r"a vision or audio tower \(vision/audio tensors"),
    (dict(metadata={"llama.rope.scaling.type": MetadataValue("dynamic", V.STRING)}),
     r"rope scaling 'dynamic' is not supported"),
])
def test_unsupported_features_are_named(tmp_path, change, message):
    write_tiny_llama(tmp_path / "m.gguf", **change)
    with pytest.raises(ModelError, match=message):
        load_weights(tmp_path / "m.gguf")


def test_post_norms_are_refused_where_the_architecture_has_none(tmp_path):
    write_tiny_llama(tmp_path / "q.gguf", "qwen3", extra_tensors={"blk.1.post_ffw_norm.weight": torch.ones(64)})
    with pytest.raises(ModelError, match=r"post_ffw_norm\.weight in a qwen3 file, whose architecture has no post-"):
        load_weights(tmp_path / "q.gguf")


def test_tensors_realm_does_not_use_are_refused(tmp_path):
    """Phi-3's longrope factors, or any tensor realm has no use for, would otherwise be silently ignored."""
    write_tiny_llama(tmp_path / "p.gguf", "phi3", extra_tensors={"rope_factors_long.weight": torch.ones(8)})
    with pytest.raises(ModelError, match=r"1 tensor\(s\) realm does not use for a phi3 model, e.g. "
                                         r"'rope_factors_long.weight'; refusing the file"):
        load_weights(tmp_path / "p.gguf")
