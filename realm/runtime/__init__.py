"""realm.runtime: running models. A GGUF loader, tokenizer, torch reference forward, KV cache, sampling, generation,
and the continuously batching engine.

    model = realm.runtime.load("smollm2")        # also realm.load
    model.generate("Hello", max_tokens=20)
    realm.runtime.LLM().generate(["Hello", "Bonjour"])   # also realm.LLM: many prompts, batched

Modules, in the order data flows: config (hyperparameters from metadata), weights (QTensors from the file),
tokenizer, kv_cache (the paged KV cache), batch (ForwardBatch: a ragged step), runner (what backends share),
torch_model (the reference forward), triton_model (the Triton forward; imported only when asked for, since it
imports Triton), sampling, generate (one sequence's loop), model (load()); then the engine: sequence, block_manager,
scheduler (these three plain Python, no torch), engine (steps the batch), llm (the offline API).

Names are imported on first use, so `import realm.runtime.scheduler` does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "batch": ("ForwardBatch", "Logits"),
    "block_manager": ("BlockManager", "CacheFullError", "SequenceKV"),
    "config": ("ARCHITECTURES", "Architecture", "ModelConfig", "ModelError"),
    "engine": ("Engine", "EngineConfig", "Request"),
    "generate": ("Completion", "FinishReason", "GenerationStream", "StopStrings", "Timings", "TokenEvent"),
    "kv_cache": ("KVCache", "PagedKVCache"),
    "llm": ("LLM",),
    "model": ("Backend", "Model", "load", "resolve_device"),
    "sampling": ("Sampler", "SamplingParams"),
    "scheduler": ("Batching", "Scheduler", "SchedulerConfig"),
    "sequence": ("Sequence", "SequenceStatus"),
    "tokenizer": ("Tokenizer",),
    "torch_model": ("TorchModel",),
    "weights": ("LayerWeights", "ModelWeights", "load_weights", "unpermute_rope_rows"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'realm.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
