"""realm.runtime: running models. A GGUF loader, tokenizer, torch reference forward, KV cache, sampling, generation.

    model = realm.runtime.load("smollm2")        # also realm.load
    model.generate("Hello", max_tokens=20)

Modules, in the order data flows: config (hyperparameters from metadata), weights (QTensors from the file),
tokenizer, kv_cache (the paged KV cache), batch (ForwardBatch: a ragged step), runner (what backends share),
torch_model (the reference forward), triton_model (the Triton forward; imported only when asked for, since it
imports Triton), sampling, generate (one sequence's loop), model (load()).
"""

from .batch import ForwardBatch, Logits
from .config import ARCHITECTURES, Architecture, ModelConfig, ModelError
from .generate import Completion, FinishReason, GenerationStream, StopStrings, Timings, TokenEvent
from .kv_cache import CacheFullError, KVCache, PagedKVCache, SequenceKV
from .model import Backend, Model, load, resolve_device
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer
from .torch_model import TorchModel
from .weights import LayerWeights, ModelWeights, load_weights, unpermute_rope_rows

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "Backend",
    "CacheFullError",
    "Completion",
    "FinishReason",
    "ForwardBatch",
    "GenerationStream",
    "KVCache",
    "LayerWeights",
    "Logits",
    "Model",
    "ModelConfig",
    "ModelError",
    "ModelWeights",
    "PagedKVCache",
    "Sampler",
    "SamplingParams",
    "SequenceKV",
    "StopStrings",
    "Timings",
    "TokenEvent",
    "Tokenizer",
    "TorchModel",
    "load",
    "load_weights",
    "resolve_device",
    "unpermute_rope_rows",
]
