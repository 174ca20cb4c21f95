"""Reading a PEFT LoRA adapter directory (what `PeftModel.save_pretrained` writes) into a LoraAdapter.

    adapter = read_peft("adapters/pirate")                  # adapter_config.json + adapter_model.safetensors
    adapter = read_peft("adapters/pirate", config=config)   # and check every module against a base model

Each module's scale is what peft's `LoraLayer.update_layer` computes (peft/tuners/lora/layer.py):
`lora_alpha / r`, or `lora_alpha / math.sqrt(r)` with `use_rslora`, where r and lora_alpha come from
`rank_pattern` / `alpha_pattern` when a key there matches the module's name by peft's rule (`get_pattern_key` in
peft/utils/other.py: the first key k, in the file's order, for which `re.match(rf"(.*\\.)?({k})$", name)` matches,
where name is the module's name in the HF model, e.g. `model.layers.3.self_attn.q_proj`).

The tensors decide which modules exist; `target_modules` is only checked against them. Anything that changes what the
adapter computes beyond `scale * B @ A` (DoRA, biases, extra trained modules, other LoRA variants, a base model that
the adapter's initialisation rewrote) is refused with an AdapterError naming the field or tensor and the file.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .adapter import PEFT_NAMES, AdapterError, LoraAdapter, LoraModule, Target

if TYPE_CHECKING:
    from realm.runtime.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"

_TARGETS = {name: target for target, name in PEFT_NAMES.items()}
_PARENT = {Target.Q: "self_attn", Target.K: "self_attn", Target.V: "self_attn", Target.O: "self_attn",
           Target.GATE: "mlp", Target.UP: "mlp", Target.DOWN: "mlp"}
# base_model.model. (a PeftModel), then the module's name in the HF model (model.layers.N... for a *ForCausalLM,
# layers.N... for a bare LlamaModel), lora_A or lora_B, an optional adapter name (".default"), weight or bias
_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>(?:model\.)?layers\.(?P<layer>\d+)\.(?P<parent>\w+)\."
                  r"(?P<proj>\w+))\.lora_(?P<half>[AB])(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)")
# config fields that make a module compute something other than scale * B @ A (peft's LoRA variants and extras):
# refused when set to anything truthy
_VARIANTS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a trained bias on lora_B",
    "fan_in_fan_out": "transposed (Conv1D, GPT-2 style) weights",
    "modules_to_save": "fully trained extra modules",
    "trainable_token_indices": "trained token embeddings",
    "layer_replication": "replicated layers",
    "target_parameters": "LoRA on parameters (not modules)",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QALoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}
# init_lora_weights values with which peft rewrites the base weights (LoraLayer.pissa_init, corda_init, olora_init,
# lora_ga_init, loftq_init): the adapter fits only the rewritten model, unless it was saved converted to plain LoRA
# (save_pretrained's path_initial_model_for_weight_conversion, which resets the field to true)
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "lora_ga", "loftq")


def get_pattern_key(pattern_keys, name: str) -> str:
    """peft's rule (peft.utils.other.get_pattern_key): the first key whose regex matches the end of `name` at a dot
    boundary; `name` itself when none does (so a pattern dict's .get falls back to the default)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def read_peft(path: str | os.PathLike, name: str | None = None, config: ModelConfig | None = None) -> LoraAdapter:
    """A PEFT LoRA adapter directory as a LoraAdapter (float32 tensors, peft's per-module scaling).

    name: the adapter's name (default: the directory's name). config: a base model's config to check the modules
    against at once (LoraAdapter.check); without it, shapes are checked only for consistency (A [r, in], B [out, r]).
    AdapterError for anything realm cannot apply exactly as peft would.
    """
    directory = Path(path)
    if directory.is_file() and directory.name in (CONFIG_FILE, WEIGHTS_FILE):
        directory = directory.parent
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise AdapterError(f"{directory}: {what}; expected a PEFT adapter directory holding {CONFIG_FILE} and "
                           f"{WEIGHTS_FILE}")
    cfg = _read_config(directory / CONFIG_FILE)
    tensors = _read_tensors(directory)
    modules = _modules(tensors, cfg, directory / WEIGHTS_FILE)
    metadata = {k: cfg[k] for k in ("r", "lora_alpha", "use_rslora", "base_model_name_or_path", "target_modules",
                                    "peft_version") if k in cfg}
    adapter = LoraAdapter(name or directory.resolve().name, modules, source=str(directory),
                          metadata={"format": "peft", **metadata})
    if config is not None:
        adapter.check(config)
    return adapter


# ---------------------------------------------------------------------------------------------------------- config


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterError(f"{path}: no such file; a PEFT adapter directory holds {CONFIG_FILE} (written by "
                           "save_pretrained)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object, found {type(cfg).__name__}")

    def fail(key: str, problem: str) -> AdapterError:
        return AdapterError(f"{path}: {key}: {problem}")

    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise fail("peft_type", f"{peft_type!r} adapters are not supported, only 'LORA'")
    for key, what in _VARIANTS.items():
        if cfg.get(key):
            raise fail(key, f"{what} is not supported (found {_short(cfg[key])}); realm applies plain LoRA only")
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise fail("bias", f"{bias!r}: trained biases are not supported, only 'none'")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise fail("init_lora_weights", f"{init!r} rewrites the base model's weights, so this adapter only fits the "
                   "rewritten model, not the original one realm applies it to (PiSSA, CorDA, OLoRA and LoRA-GA "
                   "adapters can be saved converted to plain LoRA: save_pretrained(..., "
                   "path_initial_model_for_weight_conversion=...))")
    _positive_int(cfg.get("r"), "r", fail)
    _number(cfg.get("lora_alpha"), "lora_alpha", fail)
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise fail("use_rslora", f"expected true or false, found {_short(cfg['use_rslora'])}")
    for key, check in (("rank_pattern", _positive_int), ("alpha_pattern", _number)):
        patterns = cfg.get(key) or {}
        if not isinstance(patterns, Mapping):
            raise fail(key, f"expected an object mapping module-name patterns to values, found {_short(patterns)}")
        for pattern, value in patterns.items():
            check(value, f"{key}[{pattern!r}]", fail)
            try:
                re.compile(pattern)
            except re.error as e:
                raise fail(key, f"{pattern!r} is not a regular expression ({e})") from None
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise fail("target_modules", f"expected a list of module names or a regex string, found {_short(targets)}")
    return cfg


def _positive_int(value, key: str, fail) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(key, f"expected a positive integer, found {_short(value)}")


def _number(value, key: str, fail) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(key, f"expected a finite number, found {_short(value)}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _module_scale(cfg: Mapping[str, Any], module: str) -> tuple[int, float]:
    """(r, scaling) of a module, as peft's LoraModel._create_and_replace and LoraLayer.update_layer compute them."""
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), cfg["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora", False) else alpha / r
    return r, float(scale)


def _rank_source(cfg: Mapping[str, Any], module: str) -> str:
    """Where a module's r comes from, for a message; several matching rank_pattern keys are named, since peft takes
    the first in the file's order, and writes the file with sorted keys (so training may have taken another)."""
    keys = [k for k in cfg.get("rank_pattern") or {} if get_pattern_key([k], module) == k]
    if not keys:
        return "r"
    if len(keys) == 1:
        return f"rank_pattern[{keys[0]!r}]"
    return (f"rank_pattern (keys {', '.join(map(repr, keys))} all match it; peft takes the first in the file, "
            "which peft writes with sorted keys, so training may have used another)")


def _targeted(targets: str | list[str] | None, module: str) -> bool:
    """peft's check_target_module_exists for target_modules alone: a string is a regex matching the whole name
    ("all-linear": every linear layer), a list names modules by their full name or its last dot-separated parts."""
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


# --------------------------------------------------------------------------------------------------------- tensors


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        if (directory / PICKLE_WEIGHTS_FILE).is_file():
            raise AdapterError(f"{directory / PICKLE_WEIGHTS_FILE}: pickled adapters (adapter_model.bin) are not "
                               f"supported; save the adapter with safetensors (save_pretrained(..., "
                               f"safe_serialization=True), peft's default) to get {WEIGHTS_FILE}")
        raise AdapterError(f"{path}: no such file; a PEFT adapter directory holds {WEIGHTS_FILE}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{path}: truncated or corrupt safetensors file ({type(e).__name__}: {e})") from None


def _refusal(key: str) -> str:
    """Why a tensor that is not a linear layer's lora_A / lora_B is refused."""
    if "lora_magnitude_vector" in key:
        return "a DoRA magnitude vector (use_dora) is not supported"
    if "lora_embedding" in key or "embed_tokens" in key:
        return "adapting the token embedding (embed_tokens) is not supported"
    if "lm_head" in key:
        return "adapting the output head (lm_head) is not supported"
    if "modules_to_save" in key:
        return "fully trained extra modules (modules_to_save) are not supported"
    if key.endswith(".bias"):
        return "trained biases are not supported (bias / lora_bias)"
    return ("not a lora_A or lora_B weight of an adapted linear layer (model.layers.N.self_attn.{q,k,v,o}_proj or "
            "model.layers.N.mlp.{gate,up,down}_proj)")


def _in_order(item) -> tuple[int, int]:
    (layer, target), _ = item
    return layer, list(Target).index(target)


def _modules(tensors: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], path: Path
             ) -> dict[tuple[int, Target], LoraModule]:
    halves: dict[tuple[int, Target], dict[str, tuple[str, torch.Tensor]]] = {}
    names: dict[tuple[int, Target], str] = {}
    for key, tensor in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None or m["param"] == "bias":
            raise AdapterError(f"{path}: tensor {key!r}: {_refusal(key)}")
        target = _TARGETS.get(m["proj"])
        if target is None or _PARENT[target] != m["parent"]:
            raise AdapterError(f"{path}: tensor {key!r}: unknown module {m['parent']}.{m['proj']}; realm adapts "
                               + ", ".join(f"{_PARENT[t]}.{t.peft_name}" for t in Target))
        layer = int(m["layer"])
        pair = halves.setdefault((layer, target), {})
        if m["half"] in pair:
            raise AdapterError(f"{path}: tensors {pair[m['half']][0]!r} and {key!r} are both lora_{m['half']} of "
                               f"layer {layer} {target.peft_name}")
        pair[m["half"]] = (key, tensor)
        names[(layer, target)] = m["module"]  # the name peft matched its patterns against
    modules = {}
    for (layer, target), pair in sorted(halves.items(), key=_in_order):
        module = names[(layer, target)]
        for half in "AB":
            if half not in pair:
                other = "A" if half == "B" else "B"
                raise AdapterError(f"{path}: {module}: lora_{other} ({pair[other][0]!r}) has no lora_{half}")
        (a_key, a), (b_key, b) = pair["A"], pair["B"]
        for key, t in ((a_key, a), (b_key, b)):
            if not t.is_floating_point() or t.dim() != 2:
                raise AdapterError(f"{path}: tensor {key!r}: expected a 2-D float matrix, found {t.dtype} "
                                   f"{list(t.shape)}")
        r, scale = _module_scale(cfg, module)
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterError(f"{path}: {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not have "
                               f"the rank {r} that {_rank_source(cfg, module)} in {CONFIG_FILE} gives this module "
                               "(its scale depends on it)")
        if not _targeted(cfg.get("target_modules"), module):
            raise AdapterError(f"{path}: {module}: the file adapts it but target_modules "
                               f"{_short(cfg['target_modules'])} in {CONFIG_FILE} does not name it")
        modules[(layer, target)] = LoraModule(a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous(),
                                              scale)
    if not modules:
        raise AdapterError(f"{path}: the file holds no lora_A / lora_B tensors")
    return modules


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "get_pattern_key", "read_peft"]
