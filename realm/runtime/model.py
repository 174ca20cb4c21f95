"""`realm.load()`: a model, its tokenizer and a backend, ready to generate.

    model = realm.load("smollm2", device="cpu", backend="torch")
    model.generate("The capital of France is", max_tokens=20).text
    for event in model.stream("Once upon a time", temperature=0.8, seed=0): print(event.text, end="")
    model.chat("What is the capital of France?").text
    logits = model.forward(torch.tensor([ids]))          # [1, len(ids), vocab]
"""

from __future__ import annotations

import operator
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from typing import TYPE_CHECKING

import torch

from .config import ModelConfig, ModelError
from .generate import Completion, FinishReason, GenerationError, TokenEvent
from .kv_cache import DEFAULT_BLOCK_SIZE, KVCache
from .lora import DEFAULT_MAX_LORAS, LoraAdapter, LoraRegistry, parse_lora_specs
from .ops import Backend, backend_of, check_onednn
from .sampling import SamplingParams
from .speculative import check_same_vocabulary
from .tokenizer import Tokenizer
from .transformer import Transformer, indexed_device
from .weights import ModelWeights, load_weights

if TYPE_CHECKING:
    from .engine import Engine, Request

SOLO_MIN_BLOCKS = 64  # the smallest KV cache of a Model's own engine (grown for longer requests)


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
    if device.type == "cpu" and device.index not in (None, 0):  # torch takes cpu:5, and runs it on the one CPU
        raise ValueError(f"device {str(device)!r} does not exist: torch has one CPU device, cpu (or cpu:0)")
    return indexed_device(device)


class Model:
    """A loaded model: `config`, `tokenizer`, `weights` (QTensors) and `transformer`, the forward on its backend.

    `generate`, `stream` and `chat` run one request at a time on the model's own engine (realm.runtime.engine, the
    same loop `realm.LLM` batches with), without prefix caching and with each prompt in one step, so that a
    request's tokens do not depend on what ran before it."""

    def __init__(self, weights: ModelWeights, tokenizer: Tokenizer, backend: Backend, device: torch.device,
                 dtype: torch.dtype, *, lora: Mapping[str, str | os.PathLike] | None = None,
                 max_loras: int = DEFAULT_MAX_LORAS, max_lora_rank: int | None = None):
        """lora: adapters to load, {name: PEFT directory or GGUF LoRA file}; max_loras: adapters resident on the
        device at once (and in one step); max_lora_rank: the device pool's rank (None: the largest adapter's rank
        loaded before the first step, at least 16)."""
        if tokenizer.vocab_size > weights.config.vocab_size:
            raise ModelError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{weights.config.vocab_size} embeddings")
        self.weights = weights
        self.config: ModelConfig = weights.config
        self.tokenizer = tokenizer
        self.backend = backend_of(backend)
        self.device = device
        self.dtype = dtype
        self.transformer = Transformer(weights, self.backend, device, dtype)
        self.loras = LoraRegistry(self.transformer, max_loras, max_lora_rank)
        for name, source in parse_lora_specs(lora).items():
            self.loras.add(name, source)
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self.draft: Model | None = None  # what speculative decoding's "draft" method proposes with (set_draft_model)

    def __repr__(self) -> str:
        return (f"Model({self.config.name or self.weights.path.name!r}, {self.config.arch.name}, "
                f"{self.config.n_layers} layers, backend={self.backend.value}, device={self.device}, "
                f"dtype={str(self.dtype).removeprefix('torch.')})")

    # ------------------------------------------------------------------------------------------------- forward

    def new_cache(self, batch: int, capacity: int, block_size: int = DEFAULT_BLOCK_SIZE) -> KVCache:
        """A paged cache for `batch` sequences of up to `capacity` tokens each, in the runner's dtype."""
        return self.transformer.new_cache(batch, capacity, block_size)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False, adapter: str | None = None) -> torch.Tensor:
        """tokens: int [batch, T] at positions [start, start + T) -> logits [batch, T, vocab] in the runner's dtype
        ([batch, 1, vocab] with last_only: what generation needs, skipping the output head for the other positions).

        With a cache, the tokens follow the `start` tokens it holds and are stored in it; without one, start must be
        0 and the T tokens attend only to each other. adapter: a loaded LoRA adapter's name, for every row.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, T], got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be int32/int64 ids, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        if adapter is None:
            return self.transformer.forward_tokens(tokens.tolist(), cache, start, last_only)
        with self.loras.lock:
            slot = self.loras.activate([adapter])[adapter]
            return self.transformer.forward_tokens(tokens.tolist(), cache, start, last_only, adapter=slot,
                                                   lora_slots=self.loras.max_loras)

    # ---------------------------------------------------------------------------------------------- generation

    def encode(self, prompt: str | Sequence[int], add_bos: bool | None = None) -> list[int]:
        """A prompt as ids: text is tokenized (BOS as the file says, unless add_bos is given); ids pass through."""
        if isinstance(prompt, str):
            bos = self.tokenizer.add_bos_default if add_bos is None else add_bos
            return self.tokenizer.encode(prompt, add_bos=bos)
        # a dict's keys or a set's order are no prompt
        if isinstance(prompt, (bytes, bytearray, Mapping, Set)) or not isinstance(prompt, Iterable):
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

    def set_draft_model(self, draft: Model | str | os.PathLike | None) -> Model | None:
        """The draft model for speculative decoding (SamplingParams(speculative="draft")): a loaded Model, or a
        packaged name or GGUF path loaded on this model's backend, device and dtype; None removes it. Its vocabulary
        must be this model's (ValueError otherwise). Returns it."""
        if draft is not None:
            if not isinstance(draft, Model):
                draft = load(draft, device=self.device, backend=self.backend, dtype=self.dtype)
            check_same_vocabulary(draft, self)
            if draft.device != self.device:
                raise ValueError(f"the draft model is on {draft.device}, this model on {self.device}")
        self.draft = draft
        return draft

    def add_lora(self, name: str, source: str | os.PathLike | LoraAdapter) -> LoraAdapter:
        """Load a LoRA adapter (PEFT directory, GGUF LoRA file, or LoraAdapter) for requests to name."""
        return self.loras.add(name, source)

    def remove_lora(self, name: str) -> None:
        self.loras.remove(name)

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               **sampling) -> GenerationStream:
        """Iterate over TokenEvents; the stream's `.completion` holds the result at the end."""
        params = _params(params, sampling)
        ids = self.encode(prompt)
        self.check_prompt(ids)
        engine = self.engine_for(len(ids) + min(params.max_tokens, self.config.context_length - len(ids)))
        return GenerationStream(engine, engine.add_request(ids, params))

    def engine_for(self, tokens: int) -> Engine:
        """The model's own engine, with KV room for a sequence of `tokens` tokens: grown (a new engine, KV blocks
        doubled past the need) when it has none, unless it is busy, then a separate one for this request."""
        from .engine import Engine, EngineConfig

        with self._engine_lock:
            engine = self._engine
            block = DEFAULT_BLOCK_SIZE
            if engine is not None and engine.runner.kv.num_blocks * block >= tokens:
                return engine
            blocks = SOLO_MIN_BLOCKS
            while blocks * block < tokens:
                blocks *= 2
            # max_batch_tokens: a whole prompt in one step, as a single sequence would run it
            fresh = Engine(self, EngineConfig(max_batch_tokens=self.config.context_length, max_num_seqs=1,
                                              kv_blocks=blocks, block_size=block, prefix_caching=False), seed=None)
            if engine is None or not engine.has_work:
                self._engine = fresh
            return fresh

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
    if backend_of(backend) is Backend.TRITON and device.type == "cuda":
        return torch.float16
    return torch.float32


def load(model: str | os.PathLike = "smollm2", device: torch.device | str | None = None,
         backend: Backend | str = Backend.TORCH, dtype: torch.dtype | None = None, *,
         lora: Mapping[str, str | os.PathLike] | None = None, max_loras: int = DEFAULT_MAX_LORAS,
         max_lora_rank: int | None = None, draft_model: str | os.PathLike | Model | None = None) -> Model:
    """Load a GGUF model (a packaged name such as "smollm2", the default, or a path) for generation.

    device: "cpu", "cuda" or None (CUDA when present); backend: "torch" (the reference), "triton" (realm's
    kernels; on CPU they run under Triton's interpreter, which needs TRITON_INTERPRET=1 set before Triton is
    imported) or "onednn" (the reference with oneDNN-packed linear layers: the fast one on CPUs);
    dtype: the compute dtype, None for the backend's default (`default_dtype`; float32 is the exact
    reference); lora, max_loras, max_lora_rank: LoRA adapters to load and the device pool (see Model);
    draft_model: a smaller model of the same vocabulary for speculative decoding (Model.set_draft_model).
    """
    backend = backend_of(backend)
    device = resolve_device(device)
    dtype = default_dtype(backend, device) if dtype is None else dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if backend is Backend.TRITON:
        from .transformer import _check_triton_device

        _check_triton_device(device, dtype)  # before the weights load: a wrong setup fails at once
    if backend is Backend.ONEDNN:
        check_onednn(device, dtype)
    weights = load_weights(model)
    tokenizer = Tokenizer.from_metadata(weights.metadata)
    model = Model(weights, tokenizer, backend, device, dtype, lora=lora, max_loras=max_loras,
                  max_lora_rank=max_lora_rank)
    model.set_draft_model(draft_model)
    return model


class GenerationStream:
    """One request's TokenEvents as they come (iterating steps the model's engine when no loop runs it);
    `completion` is set once the iteration ends. Leaving the iteration early cancels the request. A request the
    engine ended with an error (its step failed) raises GenerationError at the end, with the engine's message: one
    request has no batch to protect, and its caller should not mistake the text so far for an answer."""

    def __init__(self, engine: Engine, request: Request):
        self.engine = engine
        self.request = request
        self.prompt_ids = request.prompt_ids
        self.params = request.params

    @property
    def completion(self) -> Completion | None:
        return self.request.completion

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            yield from self.engine.stream(self.request)
        finally:
            if not self.request.finished:
                self.engine.cancel(self.request)
        c = self.request.completion
        if c is not None and c.finish_reason is FinishReason.ERROR:
            raise GenerationError(f"generation failed: {c.error}")
