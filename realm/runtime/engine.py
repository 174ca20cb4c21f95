"""The engine: requests in, tokens out, one batched forward per step for every running sequence.

    engine = Engine(model, EngineConfig(max_batch_tokens=512, kv_blocks=1024))
    a = engine.add_request("The capital of France is", SamplingParams(max_tokens=16))
    b = engine.add_request([1, 2, 3], SamplingParams(temperature=0.8, seed=0), on_event=print)
    for event in engine.stream(a):       # steps the engine (b advances too) until a has news
        print(event.text, end="")
    engine.run()                         # step until every request has finished
    a.completion, b.completion           # Completion(text, token_ids, finish_reason, prompt_ids, timings)

A step: the scheduler picks the chunks (realm.runtime.scheduler), the chunks are packed into one ForwardBatch
(decodes first) and run through the model's runner (either backend) on the shared paged KV cache, then every
sequence whose chunk reached its last token samples its next one with its own sampler. Per request: sampling
parameters, stop strings, max_tokens, finish reasons, streaming (the `stream` iterator or an `on_event` callback),
cancellation (`cancel`, which frees its blocks at once). A bad request fails in `add_request` with a ValueError
and never enters the batch.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .batch import ForwardBatch, Logits
from .generate import Completion, FinishReason, OutputText, Timings, TokenEvent
from .kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache
from .sampling import Sampler, SamplingParams
from .scheduler import Batching, Scheduler, SchedulerConfig
from .sequence import Sequence as Seq

if TYPE_CHECKING:
    from .model import Model

CPU_KV_BYTES = 4 << 30  # default KV cache on the CPU (at most a quarter of the RAM)
GPU_KV_FRACTION = 0.85  # default KV cache on a GPU: this share of the memory free after loading the weights


@dataclass(frozen=True)
class EngineConfig:
    max_batch_tokens: int = 512  # tokens per forward step: decodes and prefill chunks together
    max_num_seqs: int = 64  # sequences per step
    kv_blocks: int | None = None  # KV cache blocks; None: sized from the device's memory (default_kv_blocks)
    block_size: int = DEFAULT_BLOCK_SIZE
    prefix_caching: bool = True  # full blocks of identical prefixes are computed once and shared
    batching: Batching = Batching.CONTINUOUS  # STATIC: a baseline that refills only when all have finished

    def __post_init__(self):
        object.__setattr__(self, "batching", self.scheduler_config().batching)  # validated, and an enum
        for name in ("kv_blocks", "block_size"):
            value = getattr(self, name)
            if value is None and name == "kv_blocks":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.prefix_caching, bool):
            raise ValueError(f"prefix_caching must be True or False, got {self.prefix_caching!r}")

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_batch_tokens, self.max_num_seqs, self.batching)


def default_kv_blocks(model: Model, config: EngineConfig) -> int:
    """As many blocks as the memory budget holds (GPU_KV_FRACTION of the free GPU memory; on the CPU CPU_KV_BYTES,
    at most a quarter of the RAM), and no more than max_num_seqs sequences of the full context need."""
    per_block = PagedKVCache.bytes_per_block(model.config, config.block_size, model.dtype)
    if model.device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(model.device)[0] * GPU_KV_FRACTION)
    else:
        budget = min(CPU_KV_BYTES, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)
    most = config.max_num_seqs * -(-model.config.context_length // config.block_size)
    blocks = min(budget // per_block, most)
    if blocks < 1:
        raise ValueError(f"no room for a KV cache block ({per_block} bytes) on {model.device}")
    return blocks


@dataclass(eq=False)
class Request:
    """One request's state in the engine. `completion` is set when it finishes."""

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    seq: Seq
    sampler: Sampler
    output: OutputText
    on_event: Callable[[Request, TokenEvent], None] | None = None
    events: deque[TokenEvent] = field(default_factory=deque)  # not yet taken by `Engine.stream`
    arrival_s: float = field(default_factory=time.perf_counter)
    scheduled_s: float | None = None  # first step it ran in
    first_token_s: float | None = None
    completion: Completion | None = None

    @property
    def finished(self) -> bool:
        return self.completion is not None


class Engine:
    def __init__(self, model: Model, config: EngineConfig | None = None):
        self.model = model
        self.config = config = config or EngineConfig()
        num_blocks = config.kv_blocks or default_kv_blocks(model, config)
        self.cache = PagedKVCache.allocate(model.config, num_blocks, config.block_size, model.dtype, model.device,
                                           prefix_caching=config.prefix_caching)
        self.scheduler = Scheduler(config.scheduler_config(), self.cache.blocks)
        self.requests: dict[int, Request] = {}  # unfinished, by id
        self._next_id = 0
        self._delivering: deque[tuple[Request, TokenEvent | None]] | None = None  # a step's events, being emitted
        self._vocab = model.tokenizer.vocab_size  # the embedding may have more rows (padding) than tokens

    def __repr__(self) -> str:
        blocks = self.cache.blocks
        return (f"Engine({self.model!r}, {blocks.num_blocks} KV blocks of {blocks.block_size} "
                f"({self.cache.nbytes / 2**20:.0f} MiB), {self.config})")

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ------------------------------------------------------------------------------------------------ requests

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                    on_event: Callable[[Request, TokenEvent], None] | None = None,
                    salt: str | None = None) -> Request:
        """Queue a prompt (text, or token ids) for generation. ValueError, and nothing queued, when the request
        cannot run: an empty prompt, ids out of range, a prompt that fills the context, or one whose tokens could
        not fit in the KV cache even alone. salt: requests with different salts never share prefix-cache blocks."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str) and not prompt:
            raise ValueError("the prompt is empty")
        ids = self.model.encode(prompt)
        self.model.check_prompt(ids)
        max_new = min(params.max_tokens, self.model.config.context_length - len(ids))
        seq = Seq(self._next_id, ids, max_new, salt=salt)
        self.scheduler.add(seq)  # checks that it fits in the cache
        request = Request(seq.seq_id, ids, params, seq, Sampler(params), OutputText(self.model.tokenizer, params),
                          on_event)
        self.requests[request.request_id] = request
        self._next_id += 1
        return request

    def cancel(self, request: Request | int) -> None:
        """Stop a request now (finish reason "abort") and free its KV blocks; a finished one is left as it is."""
        if isinstance(request, int):
            if not 0 <= request < self._next_id:
                raise ValueError(f"no request {request} was ever added to this engine")
            request = self.requests.get(request)
            if request is None:  # finished already
                return
        if not request.finished:
            self._check_own(request)
            self._deliver(request, self._finish(request, FinishReason.ABORT))

    # ------------------------------------------------------------------------------------------------- running

    def step(self) -> list[Request]:
        """One forward over every scheduled chunk; returns the requests that finished in it."""
        step = self.scheduler.schedule()
        if not step:
            if self.scheduler.has_work:
                raise RuntimeError("the scheduler formed an empty step with requests waiting")
            return []
        now = time.perf_counter()
        for chunk in step.chunks:
            request = self.requests[chunk.seq.seq_id]
            if request.scheduled_s is None:
                request.scheduled_s = now
        chunks = sorted(step.chunks, key=lambda c: c.num_tokens > 1)  # decodes first (stable: arrival order)
        batch = ForwardBatch.build(self.cache, [(c.seq.kv, c.token_ids) for c in chunks], self.model.device,
                                   Logits.LAST, self.model.config.context_length)
        logits = self.model.runner.forward(batch, self.cache)  # [chunks, vocab]: each chunk's last token
        self.scheduler.complete(step)
        sampling = [(row, self.requests[c.seq.seq_id]) for row, c in enumerate(chunks) if c.completes]
        tokens = self._sample(logits, sampling)
        now = time.perf_counter()
        # The engine's state first (every token appended, every finished request completed and its blocks freed),
        # user callbacks last: whatever a callback does (raise, cancel), no sequence is left half-updated.
        finished, events = [], []
        for (_, request), token in zip(sampling, tokens, strict=True):
            if request.first_token_s is None:
                request.first_token_s = now
            reason, event = self._accept(request, token)
            tail = None
            if reason is not None:
                tail = self._finish(request, reason, now)
                finished.append(request)
            events.append((request, event, tail))
        self._delivering = deque((request, e) for request, *news in events for e in news)
        try:
            while self._delivering:
                self._emit(*self._delivering.popleft())
        finally:
            self._delivering = None
        return finished

    def run(self) -> None:
        """Step until every request has finished."""
        while self.scheduler.has_work:
            self.step()

    def stream(self, request: Request) -> Iterator[TokenEvent]:
        """The request's TokenEvents as they come, stepping the engine (every request advances) when it has none
        left; ends when the request has finished."""
        while True:
            while request.events:
                yield request.events.popleft()
            if request.finished:
                return
            self._check_own(request)
            self.step()

    # ---------------------------------------------------------------------------------------------- internals

    def _sample(self, logits: torch.Tensor, sampling: list[tuple[int, Request]]) -> list[int]:
        """The next token of each (row, request): plain greedy rows in one argmax, the others by their sampler."""
        tokens: list[int | None] = [None] * len(sampling)
        plain = [i for i, (_, r) in enumerate(sampling) if r.params.greedy and r.params.repetition_penalty == 1.0]
        if plain:
            rows = torch.tensor([sampling[i][0] for i in plain], device=logits.device)
            for i, token in zip(plain, logits[rows, : self._vocab].argmax(-1).tolist(), strict=True):
                tokens[i] = token
        for i, (row, request) in enumerate(sampling):
            if tokens[i] is None:
                p = request.params
                history = (torch.tensor(request.seq.token_ids, dtype=torch.int64) if p.repetition_penalty != 1.0
                           else torch.empty(0, dtype=torch.int64))
                tokens[i] = request.sampler.sample(logits[row, : self._vocab], history)
        return tokens

    def _accept(self, request: Request, token: int) -> tuple[FinishReason | None, TokenEvent | None]:
        """Append a sampled token -> (the finish reason if it ends the request, the event to emit)."""
        seq = request.seq
        seq.append(token)
        event = request.output.add(token)
        if event is None:  # end of generation
            return FinishReason.STOP, None
        if request.output.stopped:
            return FinishReason.STOP, event
        if seq.num_output_tokens == seq.max_tokens:
            return FinishReason.LENGTH, event
        return None, event

    def _finish(self, request: Request, reason: FinishReason, now: float | None = None,
                error: str | None = None) -> TokenEvent | None:
        """Complete the request and free its blocks -> the held-back text's event, for the caller to emit."""
        now = time.perf_counter() if now is None else now
        self.scheduler.finish(request.seq)
        tail = request.output.close()
        seq = request.seq
        first = request.first_token_s
        timings = Timings(
            prompt_tokens=seq.num_prompt_tokens,
            generated_tokens=seq.num_output_tokens,
            prefill_s=(first - request.scheduled_s) if first is not None else 0.0,
            decode_s=(now - first) if first is not None else 0.0,
            queue_s=(request.scheduled_s or now) - request.arrival_s,
            cached_tokens=seq.num_cached_tokens,
            preemptions=seq.num_preemptions,
        )
        request.completion = Completion(request.output.text, seq.output_ids, reason, request.prompt_ids, timings,
                                        error)
        del self.requests[request.request_id]
        return tail

    def _deliver(self, request: Request, event: TokenEvent | None) -> None:
        """Emit now, or after the events of the step being delivered (so a callback that cancels another request
        cannot put that request's last text before its token's)."""
        if self._delivering is None:
            self._emit(request, event)
        else:
            self._delivering.append((request, event))

    def _emit(self, request: Request, event: TokenEvent | None) -> None:
        """Queue the event for `stream` and call on_event. A callback that raises ends its request with finish
        reason "error" and the exception in `error` (the other requests go on)."""
        if event is None:
            return
        request.events.append(event)
        if request.on_event is None:
            return
        try:
            request.on_event(request, event)
        except Exception as e:
            message = f"on_event raised {type(e).__name__}: {e}"
            if request.finished:
                request.completion.finish_reason, request.completion.error = FinishReason.ERROR, message
                return
            tail = self._finish(request, FinishReason.ERROR, error=message)
            if tail is not None:
                request.events.append(tail)  # for `stream`; the failing callback is not called again

    def _check_own(self, request: Request) -> None:
        if self.requests.get(request.request_id) is not request:
            raise ValueError(f"request {request.request_id} is not one of this engine's unfinished requests")
