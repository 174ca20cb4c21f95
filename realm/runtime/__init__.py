"""realm.runtime: running models. A GGUF loader, tokenizer, torch reference forward, KV cache, sampling, generation.

    model = realm.runtime.load("smollm2")        # also realm.load
    model.generate("Hello", max_tokens=20)

Modules, in the order data flows: config (hyperparameters from metadata), weights (QTensors from the file),
tokenizer, torch_model (the reference forward), kv_cache, sampling, generate (one sequence's loop), model (load()).
"""

from .config import ARCHITECTURES, Architecture, ModelConfig, ModelError
from .generate import Completion, FinishReason, GenerationStream, StopStrings, Timings, TokenEvent
from .kv_cache import KVCache
from .model import Backend, Model, load, resolve_device
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer
from .torch_model import TorchModel
from .weights import LayerWeights, ModelWeights, load_weights, unpermute_rope_rows

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "Backend",
    "Completion",
    "FinishReason",
    "GenerationStream",
    "KVCache",
    "LayerWeights",
    "Model",
    "ModelConfig",
    "ModelError",
    "ModelWeights",
    "Sampler",
    "SamplingParams",
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
