"""LoRA adapters: reading PEFT and GGUF adapters, converting between them, serving many in one batch.

    from realm.lora import read_peft, read_gguf_lora, write_gguf_lora, convert_peft_to_gguf, LoraAdapter

The names are imported on first use, so that `realm.lora.cli` (the `realm lora` command) loads without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AdapterError": "adapter", "LoraAdapter": "adapter", "LoraModule": "adapter", "Target": "adapter",
    "convert_peft_to_gguf": "convert", "read_gguf_lora": "gguf_lora", "write_gguf_lora": "gguf_lora",
    "read_peft": "peft", "packaged_adapters": "packaged", "resolve_adapter": "packaged",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'realm.lora' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = sorted(_EXPORTS)
