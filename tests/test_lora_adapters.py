"""LoRA adapter files: PEFT directories made by the real peft library read exactly (tensors and peft's own scaling),
every unsupported case refused with an AdapterError naming the field, llama.cpp's GGUF LoRA format written and read
back (Q/K lora_b rows permuted as the base rows are), the `realm lora convert` command, and llama.cpp itself
applying a converted adapter to a tiny model as a float reference of base + delta does."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_gguf import TINY, gguf_permute, tiny_vocab_metadata, write_tiny_llama
from tolerances import assert_close, assert_equal, assert_same_predictions

from realm.gguf_io import MetadataValue, open_gguf, read_metadata, tensor_to_float
from realm.lora import (
    AdapterError,
    LoraAdapter,
    LoraModule,
    Target,
    convert_peft_to_gguf,
    gguf_lora,
    read_gguf_lora,
    read_peft,
)
from realm.lora import cli as lora_cli
from realm.lora.gguf_lora import write_gguf_lora
from realm.runtime.config import ARCHITECTURES, ModelConfig

peft = pytest.importorskip("peft", reason="the PEFT tests make adapters with the peft library")
transformers = pytest.importorskip("transformers", reason="peft adapts a transformers model")

# transformers' own deprecation, raised inside peft's get_peft_model
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
V = gguf.GGUFValueType
IDS = [3, 17, 42, 8, 8, 0, 49, 21, 5, 30, 11]


def tiny_config(arch: str = "llama", **changes) -> ModelConfig:
    t = {**TINY, **changes}
    return ModelConfig(arch=ARCHITECTURES[arch], n_layers=t["layers"], hidden=t["hidden"], n_heads=t["n_heads"],
                       n_kv_heads=t["n_kv_heads"], head_dim=t["head_dim"], ffn_hidden=t["ffn"],
                       vocab_size=t["vocab"], context_length=32, rms_eps=t["eps"], rope_theta=t["theta"])


CONFIG = tiny_config()


def hf_tiny(state: dict[str, torch.Tensor] | None = None):
    """TINY's llama as HF transformers builds it (random, or with `state`: write_tiny_llama's weights)."""
    t = TINY
    config = transformers.LlamaConfig(
        vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["ffn"], num_hidden_layers=t["layers"],
        num_attention_heads=t["n_heads"], num_key_value_heads=t["n_kv_heads"], head_dim=t["head_dim"],
        rms_norm_eps=t["eps"], rope_theta=t["theta"], max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
    return model


def make_peft(directory: Path, state=None, seed: int = 1, dtype: torch.dtype = torch.float32, **lora):
    """A PEFT LoRA adapter saved by peft itself into directory, with random nonzero lora_A and lora_B (peft starts
    lora_B at zero, which would hide a transposed or unscaled B). Returns the PeftModel."""
    model = peft.get_peft_model(hf_tiny(state), peft.LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model = model.to(dtype).eval()
    model.save_pretrained(directory)
    return model


def peft_modules(model) -> dict[tuple[int, Target], tuple[torch.Tensor, torch.Tensor, float]]:
    """Every adapted module of a PeftModel: (A, B, scaling) as peft holds them."""
    targets = {t.peft_name: t for t in Target}
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            out[(layer, targets[parts[-1]])] = (module.lora_A["default"].weight.detach(),
                                                module.lora_B["default"].weight.detach(), module.scaling["default"])
    return out


def merged_state(state: dict[str, torch.Tensor], adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The float reference of base + delta: W + scale * B @ A for every module, in HF names and row order."""
    out = dict(state)
    for (layer, target), m in adapter.modules.items():
        parent = "self_attn" if target in (Target.Q, Target.K, Target.V, Target.O) else "mlp"
        key = f"model.layers.{layer}.{parent}.{target.peft_name}.weight"
        out[key] = (state[key].double() + m.scale * (m.b.double() @ m.a.double())).float()
    return out


# ------------------------------------------------------------------------------------------------------- read_peft

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_CASES = {
    "r4-q-v": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-linear-r1": dict(r=1, lora_alpha=3, target_modules="all-linear"),
    "rslora-odd-rank": dict(r=3, lora_alpha=7, use_rslora=True, target_modules=["k_proj", "o_proj", "down_proj"]),
    # the first matching key wins: layer 1's q_proj takes 6, not "q_proj"'s 2 (keys in sorted order: peft writes
    # adapter_config.json with sorted keys, so another order would change on saving; see the ambiguous test)
    "patterns": dict(r=4, lora_alpha=8, target_modules=ALL,
                     rank_pattern={"layers.1.self_attn.q_proj": 6, r"layers\.1\.mlp\.(up|down)_proj": 5, "q_proj": 2},
                     alpha_pattern={"up_proj": 3, "model.layers.0.self_attn.k_proj": 2.5}),
    "rslora-patterns": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "gate_proj"],
                            rank_pattern={"v_proj": 2}, alpha_pattern={"gate_proj": 5}),
    "regex-targets-one-layer": dict(r=2, lora_alpha=2, target_modules=r".*\.layers\.1\.(self_attn\.o|mlp\.up)_proj"),
    "layers-to-transform": dict(r=4, lora_alpha=4, target_modules=["v_proj"], layers_to_transform=[1]),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_read_peft_gives_peft_tensors_and_scaling(tmp_path, case):
    model = make_peft(tmp_path / case, **PEFT_CASES[case])
    expected = peft_modules(model)
    adapter = read_peft(tmp_path / case, config=CONFIG)
    assert adapter.name == case and adapter.source == str(tmp_path / case)
    assert list(adapter.modules) == sorted(expected, key=lambda k: (k[0], list(Target).index(k[1])))
    for key, (a, b, scaling) in expected.items():
        m = adapter.modules[key]
        assert_equal(m.a, a, what=f"{key} lora_A")
        assert_equal(m.b, b, what=f"{key} lora_B")
        assert type(m.scale) is float and m.scale == scaling, (key, m.scale, scaling)


def test_pattern_scales_are_the_ones_written_out():
    """The cases above compare with peft; here the rule itself, for the patterns case."""
    from realm.lora.peft import _module_scale

    cfg = {"r": 4, "lora_alpha": 8, **{k: PEFT_CASES["patterns"][k] for k in ("rank_pattern", "alpha_pattern")}}
    assert _module_scale(cfg, "model.layers.1.self_attn.q_proj") == (6, 8 / 6)  # the first key that matches
    assert _module_scale(cfg, "model.layers.0.self_attn.q_proj") == (2, 4.0)
    assert _module_scale(cfg, "model.layers.1.mlp.up_proj") == (5, 3 / 5)
    assert _module_scale(cfg, "model.layers.0.self_attn.k_proj") == (4, 2.5 / 4)
    assert _module_scale(cfg, "model.layers.0.mlp.down_proj") == (4, 2.0)
    assert _module_scale({**cfg, "use_rslora": True}, "model.layers.0.mlp.down_proj") == (4, 8 / 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_adapters_become_float32(tmp_path, dtype):
    model = make_peft(tmp_path / "half", dtype=dtype, r=2, lora_alpha=4, target_modules=["q_proj"])
    stored = load_file(tmp_path / "half" / "adapter_model.safetensors")
    assert {t.dtype for t in stored.values()} == {dtype}
    adapter = read_peft(tmp_path / "half")
    for key, (a, b, _) in peft_modules(model).items():
        assert adapter.modules[key].a.dtype == torch.float32
        assert_equal(adapter.modules[key].a, a.float())
        assert_equal(adapter.modules[key].b, b.float())


def test_adapter_name_suffix_and_bare_model_keys(tmp_path):
    """Keys with the adapter's name (`lora_A.default.weight`) and of a bare LlamaModel (no `model.` before layers)."""
    src = tmp_path / "src"
    make_peft(src, r=2, lora_alpha=2, target_modules=["q_proj"])
    reference = read_peft(src)
    tensors = load_file(src / "adapter_model.safetensors")
    dst = tmp_path / "renamed"
    shutil.copytree(src, dst)
    renamed = {k.replace("model.model.layers", "model.layers").replace(".weight", ".default.weight"): v
               for k, v in tensors.items()}
    assert all(".lora_A.default.weight" in k or ".lora_B.default.weight" in k for k in renamed)
    save_file(renamed, dst / "adapter_model.safetensors")
    adapter = read_peft(dst)
    for key, m in reference.modules.items():
        assert_equal(adapter.modules[key].b, m.b)
        assert adapter.modules[key].scale == m.scale


def test_peft_forward_equals_base_plus_delta(tmp_path):
    """What a LoraAdapter means (W + scale * B @ A on HF rows) is what peft computes: peft's logits equal HF's on the
    merged weights."""
    state = hf_tiny().state_dict()
    model = make_peft(tmp_path / "a", state=state, **PEFT_CASES["rslora-patterns"])
    adapter = read_peft(tmp_path / "a")
    ids = torch.tensor([IDS])
    with torch.no_grad():
        expected = model(ids).logits
        merged = hf_tiny(merged_state(state, adapter))(ids).logits
    assert_close(merged, expected, atol=1e-4, rtol=1e-4, what="merged vs peft")  # two summation orders of a delta


# -------------------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def good_peft(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("peft") / "good"
    make_peft(path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return path


def copy_of(good: Path, tmp_path: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of the good adapter with config keys replaced (None: removed) and/or its tensors rewritten."""
    dst = tmp_path / "bad"
    shutil.copytree(good, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        for k, v in config.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors(load_file(dst / "adapter_model.safetensors")), dst / "adapter_model.safetensors")
    return dst


def refused(path: Path, *needles: str, config: ModelConfig | None = None) -> str:
    with pytest.raises(AdapterError) as e:
        read_peft(path, config=config)
    message = str(e.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    return message


CONFIG_REFUSALS = {
    "peft_type": ({"peft_type": "PREFIX_TUNING"}, "'PREFIX_TUNING'"),
    "use_dora": ({"use_dora": True}, "DoRA"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, "lm_head"),
    "bias": ({"bias": "all"}, "'all'"),
    "lora_bias": ({"lora_bias": True}, "bias"),
    "fan_in_fan_out": ({"fan_in_fan_out": True}, "transposed"),
    "alora_invocation_tokens": ({"alora_invocation_tokens": [5, 6]}, "aLoRA"),
    "trainable_token_indices": ({"trainable_token_indices": [1]}, "token"),
    "layer_replication": ({"layer_replication": [[0, 2]]}, "replicated"),
    "init_lora_weights": ({"init_lora_weights": "pissa_niter_4"}, "rewrites the base model"),
    "init_lora_weights (LoftQ)": ({"init_lora_weights": "loftq"}, "rewrites the base model"),
    "r": ({"r": "4"}, "positive integer"),
    "lora_alpha": ({"lora_alpha": None}, "finite number"),
    "use_rslora": ({"use_rslora": "yes"}, "true or false"),
    "rank_pattern": ({"rank_pattern": {"q_proj": 0}}, "positive integer"),
    "alpha_pattern": ({"alpha_pattern": {"q_proj(": 2}}, "regular expression"),
    "target_modules": ({"target_modules": ["k_proj", "o_proj"]}, "does not name it"),
}


@pytest.mark.parametrize("field", CONFIG_REFUSALS)
def test_config_refusals_name_the_field_and_file(good_peft, tmp_path, field):
    changes, why = CONFIG_REFUSALS[field]
    refused(copy_of(good_peft, tmp_path, config=changes), field.split()[0], why, "adapter_config.json")


def test_patterns_whose_order_peft_changes_on_saving_are_refused_as_peft_refuses_them(tmp_path):
    """peft matches rank_pattern keys in order, first match wins, but writes adapter_config.json with sorted keys: here
    layer 1's q_proj is trained at rank 2 ("q_proj" first in memory) but the saved file gives it 6 (the longer key
    sorts first). peft cannot load its own file; realm refuses it too, naming the keys."""
    make_peft(tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"],
              rank_pattern={"q_proj": 2, "layers.1.self_attn.q_proj": 6})
    refused(tmp_path / "a", "model.layers.1.self_attn.q_proj", "rank 6", "'layers.1.self_attn.q_proj', 'q_proj'")
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(hf_tiny(), tmp_path / "a")


def test_rank_that_is_not_the_configs_is_refused(good_peft, tmp_path):
    refused(copy_of(good_peft, tmp_path, config={"r": 8}), "rank 8", "r in adapter_config.json")
    refused(copy_of(good_peft, tmp_path / "p", config={"rank_pattern": {"v_proj": 2}}), "v_proj", "rank_pattern")


def _rename(old: str, new: str):
    return lambda t: {k.replace(old, new): v for k, v in t.items()}


TENSOR_REFUSALS = {
    "unknown module": (_rename("q_proj", "qkv_proj"), "unknown module self_attn.qkv_proj"),
    "module under the wrong parent": (_rename("self_attn.v_proj", "mlp.v_proj"), "unknown module mlp.v_proj"),
    "A without B": (lambda t: {k: v for k, v in t.items() if "layers.1.self_attn.q_proj.lora_B" not in k},
                    "model.layers.1.self_attn.q_proj: lora_A"),
    "lora bias tensor": (lambda t: {**t, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias":
                                    torch.zeros(64)}, "bias"),
    "integer tensor": (lambda t: {k: v.to(torch.int32) if "lora_A" in k else v for k, v in t.items()},
                       "2-D float matrix"),
    "a vector": (lambda t: {k: v[0] if "lora_A" in k else v for k, v in t.items()}, "2-D float matrix"),
    "duplicate half": (lambda t: {**t, **{k.replace(".weight", ".default.weight"): v.clone() for k, v in t.items()}},
                       "are both lora_"),
}


@pytest.mark.parametrize("case", TENSOR_REFUSALS)
def test_tensor_refusals_name_the_tensor_and_file(good_peft, tmp_path, case):
    edit, why = TENSOR_REFUSALS[case]
    refused(copy_of(good_peft, tmp_path, tensors=edit), why, "adapter_model.safetensors")


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")
@pytest.mark.parametrize(("targets", "why"), [
    (["embed_tokens", "q_proj"], "token embedding (embed_tokens)"),
    (["lm_head", "q_proj"], "output head (lm_head)"),
])
def test_embedding_and_head_targets_made_by_peft_are_refused(tmp_path, targets, why):
    make_peft(tmp_path / "a", r=2, lora_alpha=2, target_modules=targets)
    refused(tmp_path / "a", why, "adapter_model.safetensors")


# peft's PeftWarnings about lora_bias on bias-free layers (not mergeable; a 1-D lora_B.bias "looks like a shard")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dora_and_lora_bias_made_by_peft_are_refused(tmp_path):
    make_peft(tmp_path / "dora", r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True)
    refused(tmp_path / "dora", "use_dora", "DoRA")
    make_peft(tmp_path / "bias", r=2, lora_alpha=2, target_modules=["q_proj"], lora_bias=True)
    path = copy_of(tmp_path / "bias", tmp_path, config={"lora_bias": False})  # the tensor alone is refused too
    refused(path, "lora_B.bias", "bias")


def test_shapes_and_layers_are_checked_against_the_base_model(good_peft, tmp_path):
    refused(good_peft, "layer 0 q_proj", "[64, 48]", config=tiny_config(hidden=48))
    message = refused(copy_of(good_peft, tmp_path, tensors=_rename("layers.1.", "layers.7.")), "layer 7",
                      config=CONFIG)
    assert "2 layers" in message
    read_peft(good_peft)  # without a config only consistency is checked


def test_file_level_refusals(good_peft, tmp_path):
    refused(tmp_path / "nowhere", "nowhere", "does not exist")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "adapter_config.json", "no such file")
    no_weights = copy_of(good_peft, tmp_path / "w")
    (no_weights / "adapter_model.safetensors").unlink()
    refused(no_weights, "adapter_model.safetensors", "no such file")
    torch.save({}, no_weights / "adapter_model.bin")
    refused(no_weights, "adapter_model.bin", "save the adapter with safetensors")
    truncated = copy_of(good_peft, tmp_path / "t")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) - 100])
    refused(truncated, "adapter_model.safetensors", "truncated or corrupt")
    (truncated / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    refused(truncated, "adapter_model.safetensors", "truncated or corrupt")
    (truncated / "adapter_config.json").write_text("{not json")
    refused(truncated, "adapter_config.json", "not valid JSON")
    empty = copy_of(good_peft, tmp_path / "e", tensors=lambda t: {})
    refused(empty, "no lora_A / lora_B")


# ------------------------------------------------------------------------------------------------------------ GGUF


def explicit_gguf_rows(b: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's Q/K row order, one row at a time: in head h, GGUF row 2i + j is HF row j * d/2 + i."""
    d = b.shape[0] // n_heads
    order = [h * d + j * (d // 2) + i for h in range(n_heads) for i in range(d // 2) for j in range(2)]
    return b[order]


def test_permutation_matches_the_converters():
    b = torch.randn(TINY["n_heads"] * TINY["head_dim"], 3)
    assert_equal(gguf_lora.permute_rope_rows(b, TINY["n_heads"]), explicit_gguf_rows(b, TINY["n_heads"]))
    assert_equal(gguf_lora.permute_rope_rows(b, TINY["n_heads"]), gguf_permute(b, TINY["n_heads"]))
    assert_equal(gguf_lora.unpermute_rope_rows(gguf_lora.permute_rope_rows(b, 2), 2), b)


@pytest.fixture(scope="module")
def all_linear(tmp_path_factory) -> LoraAdapter:
    path = tmp_path_factory.mktemp("peft") / "all"
    make_peft(path, r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"layers.1.mlp.down_proj": 2})
    return read_peft(path, config=CONFIG)


def test_gguf_round_trip_is_exact(tmp_path, all_linear):
    written = write_gguf_lora(all_linear, CONFIG, tmp_path / "a.gguf")
    assert written.alpha == 8.0 and written.folded == () and written.nbytes == (tmp_path / "a.gguf").stat().st_size
    back = read_gguf_lora(tmp_path / "a.gguf", CONFIG)
    assert list(back.modules) == list(all_linear.modules) and len(back.modules) == 14
    for key, m in all_linear.modules.items():
        assert_equal(back.modules[key].a, m.a, what=f"{key} a")
        assert_equal(back.modules[key].b, m.b, what=f"{key} b")
        assert back.modules[key].scale == m.scale


def test_gguf_file_layout(tmp_path, all_linear):
    """What llama.cpp reads: the metadata keys and types, tensor names, ggml shapes (ne) and Q/K rows permuted like
    the base model's."""
    write_gguf_lora(all_linear, CONFIG, tmp_path / "a.gguf")
    reader = open_gguf(tmp_path / "a.gguf")
    md = read_metadata(reader)
    assert md["general.type"].value == "adapter" and md["adapter.type"].value == "lora"
    assert md["general.architecture"].value == "llama"
    assert md["adapter.lora.alpha"] == MetadataValue(8.0, V.FLOAT32)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 28 and all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    heads = {Target.Q: TINY["n_heads"], Target.K: TINY["n_kv_heads"]}
    for (layer, target), m in all_linear.modules.items():
        name = f"blk.{layer}.{target.gguf_name}.weight"
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        out_features, in_features = target.shape(CONFIG)
        assert a.shape.tolist() == [in_features, m.rank] and b.shape.tolist() == [m.rank, out_features]  # ggml ne
        assert_equal(tensor_to_float(a), m.a)
        rows = explicit_gguf_rows(m.b, heads[target]) if target in heads else m.b
        assert_equal(tensor_to_float(b), rows, what=name)


def test_qwen2_rows_are_not_permuted(tmp_path, all_linear):
    config = tiny_config("qwen2")
    write_gguf_lora(all_linear, config, tmp_path / "q.gguf")
    reader = open_gguf(tmp_path / "q.gguf")
    assert read_metadata(reader)["general.architecture"].value == "qwen2"
    stored = {t.name: t for t in reader.tensors}["blk.0.attn_q.weight.lora_b"]
    assert_equal(tensor_to_float(stored), all_linear.modules[(0, Target.Q)].b)
    with pytest.raises(AdapterError, match=r"general.architecture is 'qwen2' but the base model is 'llama'"):
        read_gguf_lora(tmp_path / "q.gguf", CONFIG)


@pytest.mark.parametrize("case", ["rslora-odd-rank", "patterns", "rslora-patterns"])
def test_scales_llama_cpp_cannot_express_are_folded_into_lora_b(tmp_path, case):
    """One alpha per file (llama.cpp's scale is alpha / rank): the other modules carry the ratio in lora_b, so that
    scale * lora_b is unchanged."""
    make_peft(tmp_path / case, **PEFT_CASES[case])
    adapter = read_peft(tmp_path / case)
    written = write_gguf_lora(adapter, CONFIG, tmp_path / "a.gguf")
    back = read_gguf_lora(tmp_path / "a.gguf", CONFIG)
    alpha = np.float32(written.alpha)
    for key, m in adapter.modules.items():
        got = back.modules[key]
        assert got.scale == (float(alpha) / m.rank)  # the file's rule, alpha / rank
        assert (key in written.folded) == (got.scale != m.scale)
        assert_equal(got.a, m.a)
        if key in written.folded:  # one float32 rounding of b * ratio (compared in float64: no other rounding)
            assert_close(got.scale * got.b.double(), m.scale * m.b.double(), atol=0, rtol=2**-24,
                         dtype=torch.float32, what=str(key))
        else:
            assert_equal(got.b, m.b)
    assert written.folded, "these cases need a fold"


def test_zero_and_missing_alpha_mean_scale_one(tmp_path, all_linear):
    """llama.cpp: `alpha ? adapter_scale * alpha / rank : adapter_scale`, and alpha 0 when the key is absent."""
    path = tmp_path / "a.gguf"
    write_gguf_lora(all_linear, CONFIG, path)
    for alpha in (MetadataValue(0.0, V.FLOAT32), None):
        rewrite(path, tmp_path / "b.gguf", {"adapter.lora.alpha": alpha})
        back = read_gguf_lora(tmp_path / "b.gguf", CONFIG)
        assert {m.scale for m in back.modules.values()} == {1.0}
    zero = LoraAdapter("zero", {(0, Target.V): LoraModule(torch.ones(2, 64), torch.ones(32, 2), 0.0)})
    written = write_gguf_lora(zero, CONFIG, tmp_path / "z.gguf")
    back = read_gguf_lora(tmp_path / "z.gguf", CONFIG).modules[(0, Target.V)]
    assert written.alpha == 0.0 and back.scale == 1.0 and not back.b.any()  # scale 0: folded into a zero lora_b


def test_half_precision_gguf(tmp_path, all_linear):
    write_gguf_lora(all_linear, CONFIG, tmp_path / "h.gguf", fmt="F16")
    back = read_gguf_lora(tmp_path / "h.gguf", CONFIG)
    for key, m in all_linear.modules.items():
        assert_close(back.modules[key].b, m.b, dtype=torch.float16)
    with pytest.raises(AdapterError, match="tensor type 'Q4_0' is not supported"):
        write_gguf_lora(all_linear, CONFIG, tmp_path / "q.gguf", fmt="Q4_0")
    assert lora_cli.WRITE_FORMATS == gguf_lora.WRITE_FORMATS


def rewrite(src: Path, dst: Path, metadata: dict | None = None, tensors=None) -> None:
    """A copy of a GGUF file with metadata keys replaced (None: removed) and tensors edited {name: float32 array}."""
    reader = open_gguf(src)
    md = read_metadata(reader)
    values = {t.name: tensor_to_float(t).numpy() for t in reader.tensors}
    for k, v in (metadata or {}).items():
        md.pop(k, None)
        if v is not None:
            md[k] = v
    values = tensors(values) if tensors else values
    w = gguf.GGUFWriter(dst, md["general.architecture"].value if "general.architecture" in md else "")
    for k, v in md.items():
        if k != "general.architecture":
            w.add_key_value(k, v.value, v.type, sub_type=v.sub_type)
    for name, value in values.items():
        w.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_REFUSALS = {
    "not an adapter": (dict(metadata={"general.type": MetadataValue("model", V.STRING)}), "general.type is 'model'"),
    "not LoRA": (dict(metadata={"adapter.type": MetadataValue("control_vector", V.STRING)}), "adapter.type"),
    "alpha not f32": (dict(metadata={"adapter.lora.alpha": MetadataValue(8.0, V.FLOAT64)}), "adapter.lora.alpha"),
    "aLoRA": (dict(metadata={"adapter.alora.invocation_tokens": MetadataValue([1], V.ARRAY, V.UINT32)}),
              "adapter.alora.invocation_tokens"),
    "unknown tensor": (dict(tensors=lambda t: {**t, "blk.0.attn_qkv.weight.lora_a": np.zeros((4, 64))}),
                       "'blk.0.attn_qkv.weight.lora_a': unknown tensor"),
    "embedding": (dict(tensors=lambda t: {**t, "token_embd.weight.lora_a": np.zeros((4, 64))}), "token embedding"),
    "norm": (dict(tensors=lambda t: {**t, "blk.0.attn_norm.weight": np.ones(64)}), "norm weights"),
    "missing half": (dict(tensors=lambda t: {k: v for k, v in t.items() if k != "blk.1.ffn_up.weight.lora_b"}),
                     "blk.1.ffn_up.weight.lora_b is missing"),
    "bad shape": (dict(tensors=lambda t: {**t, "blk.0.attn_k.weight.lora_b": np.zeros((64, 4))}),
                  "blk.0.attn_k.weight.lora_b [64, 4]"),
    "rank mismatch": (dict(tensors=lambda t: {**t, "blk.0.attn_v.weight.lora_a": np.zeros((3, 64))}),
                      "blk.0.attn_v.weight.lora_a [3, 64]"),
    "layer out of range": (dict(tensors=lambda t: {k.replace("blk.1.", "blk.5."): v for k, v in t.items()}),
                           "layer 5"),
}


@pytest.mark.parametrize("case", GGUF_REFUSALS)
def test_gguf_refusals_name_the_key(tmp_path, all_linear, case):
    edit, why = GGUF_REFUSALS[case]
    write_gguf_lora(all_linear, CONFIG, tmp_path / "a.gguf")
    rewrite(tmp_path / "a.gguf", tmp_path / "bad.gguf", **edit)
    with pytest.raises(AdapterError) as e:
        read_gguf_lora(tmp_path / "bad.gguf", CONFIG)
    assert why in str(e.value) and "bad.gguf" in str(e.value), str(e.value)


def test_a_model_file_or_garbage_is_not_an_adapter(tmp_path):
    write_tiny_llama(tmp_path / "model.gguf")
    with pytest.raises(AdapterError, match=r"general.type is None, expected 'adapter' \(this looks like a model"):
        read_gguf_lora(tmp_path / "model.gguf", CONFIG)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(AdapterError, match=r"junk.gguf: not a GGUF file"):
        read_gguf_lora(tmp_path / "junk.gguf", CONFIG)


# ------------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny float32 llama GGUF with a vocabulary (llama.cpp needs one) and its HF-layout weights."""
    path = tmp_path_factory.mktemp("base") / "tiny.gguf"
    # 256: llama.cpp rounds a context up to 256 and warns when that exceeds the model's
    state = write_tiny_llama(path, context_length=256, metadata=tiny_vocab_metadata())
    return path, state


def lora_main(argv: list[str]) -> int:
    """realm's command line with only `lora` registered, as realm/cli.py will wire it."""
    parser = argparse.ArgumentParser(prog="realm")
    register_into = parser.add_subparsers(dest="command", required=True)
    lora_cli.register(register_into)
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli_convert(tmp_path, capsys, tiny_base, good_peft):
    out = tmp_path / "out.gguf"
    assert lora_main(["lora", "convert", str(good_peft), str(out), "--model", str(tiny_base[0])]) == 0
    text = capsys.readouterr().out
    size = out.stat().st_size
    assert text == f"wrote {out}: 4 modules (q_proj, v_proj; 2 layers 0-1), rank 4, alpha 8, F32, {size:,} bytes\n"
    back = read_gguf_lora(out, CONFIG)
    for key, m in read_peft(good_peft).modules.items():
        assert_equal(back.modules[key].b, m.b)


def test_cli_convert_reports_folds_and_types(tmp_path, capsys, tiny_base):
    make_peft(tmp_path / "rs", **PEFT_CASES["rslora-patterns"])
    out = tmp_path / "rs.gguf"
    assert lora_main(["lora", "convert", str(tmp_path / "rs"), str(out), "--model", str(tiny_base[0]),
                      "--type", "BF16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "ranks 2-8" in lines[0] and "BF16" in lines[0]
    assert lines[1].startswith("scale not alpha / rank (rsLoRA or alpha/rank patterns): folded into lora_b for ")


def test_cli_defaults_and_errors(tmp_path, tiny_base, good_peft):
    parser = argparse.ArgumentParser(prog="realm")
    lora_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["lora", "convert", "a", "b.gguf"])
    assert (args.model, args.type, args.name) == ("smollm2", "F32", None)
    with pytest.raises(SystemExit):  # argparse: a usage error
        parser.parse_args(["lora", "convert", "a", "b.gguf", "--type", "Q4_0"])
    with pytest.raises(AdapterError, match="does not exist"):
        lora_main(["lora", "convert", str(tmp_path / "missing"), str(tmp_path / "o.gguf"), "--model",
                   str(tiny_base[0])])
    with pytest.raises(AdapterError, match="would overwrite the base model"):
        lora_main(["lora", "convert", str(good_peft), str(tiny_base[0]), "--model", str(tiny_base[0])])
    with pytest.raises(FileNotFoundError, match="no such model file"):
        lora_main(["lora", "convert", str(good_peft), str(tmp_path / "o.gguf"), "--model", str(tmp_path / "x")])
    assert not (tmp_path / "o.gguf").exists()


def test_realm_cli_reports_errors_as_its_other_commands_do(tmp_path, capsys, monkeypatch, tiny_base):
    """Wired as realm.cli's Command table expects: an AdapterError prints `realm: error: ...` and exits 2."""
    from realm import cli

    monkeypatch.setitem(cli.COMMANDS, "lora", cli.Command("lora", lora_cli.HELP, lora_cli.add_arguments,
                                                          lora_cli.run))
    assert cli.main(["lora", "convert", str(tmp_path / "nope"), str(tmp_path / "o.gguf"), "--model",
                     str(tiny_base[0])]) == cli.EXIT_ERROR
    assert capsys.readouterr().err.startswith(f"realm: error: {tmp_path / 'nope'}: does not exist")


def test_convert_returns_the_adapter_and_what_it_wrote(tmp_path, tiny_base, good_peft):
    adapter = convert_peft_to_gguf(good_peft, tmp_path / "o.gguf", tiny_base[0], name="pirate")
    assert adapter.name == "pirate" and adapter.metadata["gguf"].path == tmp_path / "o.gguf"
    assert read_metadata(open_gguf(tmp_path / "o.gguf"))["general.name"].value == "pirate"
    with pytest.raises(AdapterError, match="layer 0 q_proj"):  # checked against the base before anything is written
        convert_peft_to_gguf(good_peft, tmp_path / "p.gguf", write_tiny_llama_dims(tmp_path, hidden=48))
    assert not (tmp_path / "p.gguf").exists()
    with pytest.raises(AdapterError, match="this is an adapter, not a base model"):
        convert_peft_to_gguf(good_peft, tmp_path / "p.gguf", tmp_path / "o.gguf")


def write_tiny_llama_dims(tmp_path: Path, **dims) -> Path:
    path = tmp_path / "other.gguf"
    write_tiny_llama(path, dims={**dims, "n_heads": 3, "n_kv_heads": 1, "head_dim": 16})
    return path


# ------------------------------------------------------------------------------------------------------- llama.cpp


@pytest.mark.llama_cpp
def test_llama_cpp_applies_the_converted_adapter(tmp_path, tiny_base):
    """llama.cpp loads the converted file onto the tiny base (names, shapes, alpha, Q/K row order, folded scales) and
    its logits move off the base model's to those of the float reference, HF on W + scale * B @ A."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path, state = tiny_base
    lora = dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"k_proj": 2},
                alpha_pattern={"v_proj": 3})  # v_proj's scale is folded into its lora_b
    model = make_peft(tmp_path / "peft", state=state, **lora)
    out = tmp_path / "lora.gguf"
    adapter = convert_peft_to_gguf(tmp_path / "peft", out, path)
    assert {t for _, t in adapter.metadata["gguf"].folded} == {Target.V}
    ids = torch.tensor([IDS])
    with torch.no_grad():
        reference = hf_tiny(merged_state(state, adapter))(ids).logits[0]
        assert_close(reference, model(ids).logits[0], atol=1e-4, rtol=1e-4)  # and it is what peft computes

    def logits(**kwargs) -> torch.Tensor:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False,
                              **kwargs)
        llm.eval(IDS)
        return torch.from_numpy(np.array(llm.scores[: len(IDS)]))

    base, adapted = logits(), logits(lora_path=str(out))
    moved = (adapted - base).abs().max().item()
    assert moved > 1.0, f"the adapter moved llama.cpp's logits by only {moved}"
    assert (adapted.argmax(-1) != base.argmax(-1)).any(), "the adapter changes no prediction; make it stronger"
    # float32 weights, but llama.cpp keeps K and V in an F16 cache, hence float16's KL bound and a loose logit
    # tolerance. Measured with llama-cpp-python 0.3.36 on x86-64: max |error| 5.6e-3, KL 1.9e-6, every argmax
    # equal; a file without the Q/K row permutation gives 2 of 11 argmax equal and KL 3.6, one without the v_proj
    # fold (what convert_lora_to_gguf.py writes for alpha_pattern) 1 of 11 and KL 1.4.
    assert_same_predictions(adapted, reference, dtype=torch.float16)
    assert_close(adapted, reference, atol=2e-2, rtol=1e-2, what="llama.cpp with the adapter vs base + delta")
