"""`realm.load()`: a model, its tokenizer and a backend, ready to generate.

    model = realm.load("smollm2", device="cpu", backend="torch")
    model.generate("The capital of France is", max_tokens=20).text
    for event in model.stream("Once upon a time", temperature=0.8, seed=0): print(event.text, end="")
    model.chat("What is the capital of France?").text
    logits = model.forward(torch.tensor([ids]))          # [1, len(ids), vocab]
"""

from __future__ import annotations

import enum
import operator
import os
from collections.abc import Iterable, Sequence

import torch

from .config import ModelConfig, ModelError
from .generate import Completion, GenerationStream
from .kv_cache import DEFAULT_BLOCK_SIZE, KVCache
from .runner import indexed_device
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .torch_model import TorchModel
from .weights import ModelWeights, load_weights


class Backend(str, enum.Enum):
    TORCH = "torch"  # the torch reference forward (float32 by default)
    TRITON = "triton"  # realm's Triton kernels: quantized matmuls, flash / paged attention, fused layer ops


def resolve_device(device: torch.device | str | None) -> torch.device:
    """None: CUDA when there is one, else the CPU. Asking for CUDA without one is an error, not a fallback."""
    if device is None:
        return indexed_device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"invalid device {str(device)!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} requested, but torch sees {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported; use cpu or cuda")
    return indexed_device(device)


def _backend(backend: Backend | str) -> Backend:
    try:
        backend = Backend(backend)
    except ValueError:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(b.value for b in Backend)}") from None
    return backend


def _runner(weights: ModelWeights, backend: Backend, device: torch.device, dtype: torch.dtype):
    if backend is Backend.TORCH:
        return TorchModel(weights, device=device, dtype=dtype)
    from .triton_model import TritonModel  # imports Triton: only when asked for

    return TritonModel(weights, device=device, dtype=dtype)


class Model:
    """A loaded model: `config`, `tokenizer`, `weights` (QTensors) and the backend that runs the forward."""

    def __init__(self, weights: ModelWeights, tokenizer: Tokenizer, backend: Backend, device: torch.device,
                 dtype: torch.dtype):
        if tokenizer.vocab_size > weights.config.vocab_size:
            raise ModelError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{weights.config.vocab_size} embeddings")
        self.weights = weights
        self.config: ModelConfig = weights.config
        self.tokenizer = tokenizer
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.runner = _runner(weights, backend, device, dtype)

    def __repr__(self) -> str:
        return (f"Model({self.config.name or self.weights.path.name!r}, {self.config.arch.name}, "
                f"{self.config.n_layers} layers, backend={self.backend.value}, device={self.device}, "
                f"dtype={str(self.dtype).removeprefix('torch.')})")

    # ------------------------------------------------------------------------------------------------- forward

    def new_cache(self, batch: int, capacity: int, block_size: int = DEFAULT_BLOCK_SIZE) -> KVCache:
        """A paged cache for `batch` sequences of up to `capacity` tokens each, in the runner's dtype."""
        return self.runner.new_cache(batch, capacity, block_size)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """tokens: int [batch, T] at positions [start, start + T) -> logits [batch, T, vocab] in the runner's dtype
        ([batch, 1, vocab] with last_only: what generation needs, skipping the output head for the other positions).

        With a cache, the tokens follow the `start` tokens it holds and are stored in it; without one, start must be
        0 and the T tokens attend only to each other.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, T], got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be int32/int64 ids, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        return self.runner.forward_tokens(tokens.tolist(), cache, start, last_only)

    def run(self, tokens: Sequence[Sequence[int]], cache: KVCache | None = None, start: int = 0,
            last_only: bool = False) -> torch.Tensor:
        """`forward` on host ids [batch][T] that are known to be in range (generation's own tokens)."""
        return self.runner.forward_tokens(tokens, cache, start, last_only)

    # ---------------------------------------------------------------------------------------------- generation

    def encode(self, prompt: str | Sequence[int], add_bos: bool | None = None) -> list[int]:
        """A prompt as ids: text is tokenized (BOS as the file says, unless add_bos is given); ids pass through."""
        if isinstance(prompt, str):
            bos = self.tokenizer.add_bos_default if add_bos is None else add_bos
            return self.tokenizer.encode(prompt, add_bos=bos)
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Iterable):
            raise ValueError(f"a prompt is text or a sequence of integer token ids; got {type(prompt).__name__}")
        return [_token_id(t) for t in prompt]

    def check_prompt(self, ids: Sequence[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.config.context_length:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context holds "
                             f"{self.config.context_length}, with room for at least one new token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.config.vocab_size}): {bad[:5]}")

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               **sampling) -> GenerationStream:
        """Iterate over TokenEvents; the stream's `.completion` holds the result at the end."""
        return GenerationStream(self, self.encode(prompt), _params(params, sampling))

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **sampling) -> Completion:
        """Generate from a text prompt or a list of ids; sampling: SamplingParams' fields (max_tokens=...)."""
        stream = self.stream(prompt, params, **sampling)
        for _ in stream:
            pass
        return stream.completion

    def chat_prompt(self, messages: str | Sequence[dict]) -> list[int]:
        """Ids of the chat template applied to messages (a str is one user message), ready for the answer."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        return self.tokenizer.encode(text, add_bos=False, parse_special=True)

    def chat(self, messages: str | Sequence[dict], params: SamplingParams | None = None, **sampling) -> Completion:
        return self.generate(self.chat_prompt(messages), params, **sampling)


def _token_id(t) -> int:
    """An integer id (Python, numpy or a 0-d tensor); floats, strings and bools are refused, not converted."""
    if not isinstance(t, bool):
        try:
            return operator.index(t)
        except TypeError:
            pass
    raise ValueError(f"a prompt is text or a sequence of integer token ids; got the element {t!r}")


def _params(params: SamplingParams | None, sampling: dict) -> SamplingParams:
    if params is not None and sampling:
        raise ValueError("pass either a SamplingParams or keyword sampling options, not both")
    if params is not None:
        return params
    try:
        return SamplingParams(**sampling)
    except TypeError as e:  # an unknown keyword
        raise ValueError(f"invalid sampling option: {e}") from None


def default_dtype(backend: Backend | str, device: torch.device) -> torch.dtype:
    """float32 for the torch reference and for Triton's CPU interpreter; float16 for the Triton kernels on a GPU."""
    if _backend(backend) is Backend.TRITON and device.type == "cuda":
        return torch.float16
    return torch.float32


def load(model: str | os.PathLike = "smollm2", device: torch.device | str | None = None,
         backend: Backend | str = Backend.TORCH, dtype: torch.dtype | None = None) -> Model:
    """Load a GGUF model (a packaged name such as "smollm2", the default, or a path) for generation.

    device: "cpu", "cuda" or None (CUDA when present); backend: "torch" (the reference) or "triton" (realm's
    kernels; on CPU they run under Triton's interpreter, which needs TRITON_INTERPRET=1 set before Triton is
    imported); dtype: the compute dtype, None for the backend's default (`default_dtype`; float32 is the exact
    reference).
    """
    backend = _backend(backend)
    device = resolve_device(device)
    dtype = default_dtype(backend, device) if dtype is None else dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    weights = load_weights(model)
    tokenizer = Tokenizer.from_metadata(weights.metadata)
    return Model(weights, tokenizer, backend, device, dtype)
