"""realm.runtime: running models. A GGUF loader, tokenizer, torch reference forward, KV cache, sampling, generation,
and the continuously batching engine.

    model = realm.runtime.load("smollm2")        # also realm.load
    model.generate("Hello", max_tokens=20)
    realm.runtime.LLM().generate(["Hello", "Bonjour"])   # also realm.LLM: many prompts, batched

Modules, in the order data flows: config (hyperparameters from metadata), weights (QTensors from the file),
tokenizer; the model: ops (the op table: Triton kernels or their references), linear (a linear layer and its
epilogue), transformer (the llama-family forward, written once over ops), kv_cache (the paged KV tensors), batch
(ForwardBatch: a step on the device); the engine: sequence, block_manager, scheduler (these three plain Python, no
torch), plan (the step plan: plain data), runner (plan -> forward -> sampled tokens), sampler (batched sampling),
sampling (per-request parameters, the per-row reference sampler), generate (text, stop strings, completions),
engine (the loop, its inbox and event queues), model (load(), Model), llm (the offline API), lora (a model's LoRA
adapters and the device pool a step's rows take theirs from), speculative (proposers, adaptive k, and the metrics of
speculative decoding).

Names are imported on first use, so `import realm.runtime.scheduler` does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "batch": ("ForwardBatch",),
    "block_manager": ("BlockManager", "CacheFullError", "SequenceKV"),
    "config": ("ARCHITECTURES", "Architecture", "ModelConfig", "ModelError"),
    "engine": ("Engine", "EngineConfig", "Request"),
    "generate": ("Completion", "FinishReason", "GenerationError", "StopStrings", "Timings", "TokenEvent"),
    "kv_cache": ("KVCache", "PagedKVCache"),
    "linear": ("Linear",),
    "llm": ("LLM",),
    "lora": ("LoraMode", "LoraRegistry"),
    "model": ("GenerationStream", "Model", "load", "resolve_device"),
    "ops": ("Backend", "Ops", "backends_for", "ops_for"),
    "plan": ("ChunkPlan", "StepOutput", "StepPlan"),
    "runner": ("ModelRunner",),
    "sampler": ("BatchSampler", "RowSampling"),
    "sampling": ("Sampler", "SamplingParams"),
    "scheduler": ("Batching", "Scheduler", "SchedulerConfig"),
    "sequence": ("Sequence", "SequenceStatus"),
    "speculative": ("SpecMethod", "SpeculativeConfig", "SpeculativeStats"),
    "tokenizer": ("IdTokenizer", "Tokenizer"),
    "torch_model": ("TorchModel",),
    "transformer": ("Transformer",),
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
