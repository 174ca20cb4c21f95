"""Converting a PEFT LoRA adapter to llama.cpp's GGUF LoRA format, checked against the base model it is for.

    adapter = convert_peft_to_gguf("adapters/pirate", "pirate.gguf", base_model="smollm2")
    adapter.metadata["gguf"]      # WrittenLora: the file's alpha, the modules whose scale was folded into lora_b

The base model (a GGUF path, or a packaged model name) gives the architecture (written into the file, and deciding
whether Q/K rows are permuted) and the shapes every module must fit; only its header is read.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..gguf_io import GGUFError, find_tensor, open_gguf, read_metadata, tensor_shape
from ..runtime.config import Metadata, ModelConfig, ModelError
from ..runtime.weights import model_file
from .adapter import AdapterError, LoraAdapter
from .gguf_lora import TYPE_KEY, write_gguf_lora
from .peft import read_peft


def base_config(base_model: str | os.PathLike) -> tuple[Path, ModelConfig]:
    """The path and config of a base model (a GGUF path or a packaged model name), from its header alone."""
    path = model_file(base_model)
    reader = open_gguf(path)
    metadata = read_metadata(reader)
    if Metadata(metadata).get(TYPE_KEY) == "adapter":
        raise AdapterError(f"{path}: {TYPE_KEY} is 'adapter': this is an adapter, not a base model")
    try:
        rows = tensor_shape(find_tensor(reader, "token_embd.weight"))[0]
        return path, ModelConfig.from_metadata(metadata, vocab_size=rows)
    except (GGUFError, ModelError) as e:
        raise ModelError(f"{path}: not a base model realm runs: {e}") from None


def convert_peft_to_gguf(peft_dir: str | os.PathLike, out_path: str | os.PathLike,
                         base_model: str | os.PathLike = "smollm2", fmt: str = "F32",
                         name: str | None = None) -> LoraAdapter:
    """Read the PEFT adapter in peft_dir, check it against base_model and write it to out_path as a GGUF LoRA that
    llama.cpp loads onto that model (`llama-cli -m BASE.gguf --lora OUT.gguf`). Returns the adapter as read from
    PEFT, with `metadata["gguf"]` the WrittenLora. fmt: F32 (default, exact), F16 or BF16."""
    base_path, config = base_config(base_model)
    out = Path(out_path)
    if out.exists() and out.resolve() == base_path.resolve():
        raise AdapterError(f"{out}: the output would overwrite the base model")
    if out.is_dir():
        raise AdapterError(f"{out}: is a directory; give the GGUF file to write")
    adapter = read_peft(peft_dir, name=name, config=config)
    adapter.metadata["gguf"] = write_gguf_lora(adapter, config, out, fmt=fmt)
    return adapter


__all__ = ["base_config", "convert_peft_to_gguf"]
