"""The engine: requests in, tokens out, one batched forward per step for every running sequence; safe to drive from
other threads and from asyncio while its loop runs in a background thread.

    engine = Engine(model, EngineConfig(max_batch_tokens=512, kv_blocks=1024))
    a = engine.add_request("The capital of France is", SamplingParams(max_tokens=16))   # from any thread
    for event in engine.stream(a):       # no loop running: stepping it here (every request advances)
        print(event.text, end="")

    with engine:                         # start(): the loop steps in its thread, waits when idle
        b = engine.add_request([1, 2, 3], SamplingParams(temperature=0.8, seed=0))
        async for event in engine.astream(b): ...       # or `for event in engine.stream(b)`: waits, never steps
        engine.cancel(b)                 # from any thread

One step (`step`): the inbox's adds and cancels are applied, the scheduler picks the chunks
(realm.runtime.scheduler), the engine turns them into a plain `StepPlan` (decodes first; each chunk that reaches its
sequence's last token asks for that row's logits, sampled with the request's parameters) and the model runner
executes it (realm.runtime.runner: the copies, one forward, one batched sampling). Then each sampled token is
appended, detokenized and checked against stop strings and max_tokens, and its event queued for the request's
consumers. Per request: a LoRA adapter (`adapter`, one of the model's: requests with different adapters and none
share every step, realm.runtime.lora), sampling parameters, stop strings, max_tokens, finish reasons, events (`stream`,
`astream`, an `on_event` callback run in the stepping thread), cancellation (its blocks are freed at the next step
boundary, at once when nothing is stepping).

Failures stay with their requests: a bad request fails in `add_request` with a ValueError and never enters the
batch. When a step's forward or sampling raises, the runner runs each of its chunks alone, and only the chunks that
fail alone end their requests (finish reason "error", with the message); so do requests whose logits are not finite
(NaN or inf: the model never samples from them), and a request whose token cannot be detokenized. A failed chunk's
KV never enters the prefix cache. A callback that raises ends its own request; one that tries to step the engine
(step, run, stream, wait) is refused, since it would interleave two steps' deliveries; an interrupt (Ctrl-C) in a
callback or the forward reaches the caller with every other event of the step still delivered, and the engine can
go on stepping.

Threads: every change of the engine's state (scheduler, blocks, requests) happens under one lock, in the thread
that steps: the loop thread once `start` has run, else whichever thread calls `step`, `run` or `stream`.
`add_request` and `cancel` only put an entry in the inbox (applied at once when no step is in progress and no loop
runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from realm.kernels.verify_attention import MAX_VERIFY_QUERIES

from .block_manager import BlockManager
from .generate import Completion, FinishReason, OutputText, Timings, TokenEvent
from .kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache
from .lora import LoraMode, lora_mode_of
from .plan import ChunkPlan, StepPlan
from .runner import BlockCopyError, ModelRunner
from .sampler import RowSampling
from .sampling import SamplingParams
from .scheduler import Batching, Chunk, Scheduler, SchedulerConfig, Step
from .sequence import Sequence as Seq
from .speculative import (
    Candidate,
    DraftProposer,
    DraftRequest,
    PromptLookup,
    SpecMethod,
    SpeculationController,
    SpeculativeConfig,
    SpeculativeStats,
    speculative_config_of,
)

if TYPE_CHECKING:
    from .model import Model

log = logging.getLogger(__name__)

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
    lora_mode: LoraMode = LoraMode.FUSED  # how the Triton backend adds LoRA deltas (realm.runtime.lora)
    # Speculative decoding for requests that do not choose (SamplingParams.speculative): a method name or a
    # SpeculativeConfig (realm.runtime.speculative); None: off.
    speculative: SpeculativeConfig | None = None

    def __post_init__(self):
        object.__setattr__(self, "batching", self.scheduler_config().batching)  # validated, and an enum
        object.__setattr__(self, "lora_mode", lora_mode_of(self.lora_mode))
        object.__setattr__(self, "speculative", speculative_config_of(self.speculative))
        for name in ("kv_blocks", "block_size"):
            value = getattr(self, name)
            if value is None and name == "kv_blocks":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.prefix_caching, bool):
            raise ValueError(f"prefix_caching must be True or False, got {self.prefix_caching!r}")

    def scheduler_config(self, max_loras: int | None = None) -> SchedulerConfig:
        return SchedulerConfig(self.max_batch_tokens, self.max_num_seqs, self.batching, max_loras)


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


def check_kv_memory(model: Model, config: EngineConfig, num_blocks: int) -> None:
    """A KV cache larger than the device's memory (all of the RAM; the free memory of a GPU) is refused with the
    numbers, before anything is allocated (a CPU allocation can succeed lazily and fail pages later, or not at all)."""
    need = PagedKVCache.bytes_per_block(model.config, config.block_size, model.dtype) * num_blocks
    if model.device.type == "cuda":
        have, what = torch.cuda.mem_get_info(model.device)[0], "free"
    else:
        have, what = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "in all"
    if need > have:
        raise ValueError(f"kv_blocks={num_blocks} of block_size={config.block_size} tokens need {need / 2**30:.3g} "
                         f"GiB of KV cache; {model.device} has {have / 2**30:.3g} GiB {what}")


_END = object()  # what a request's event queue gives once it has finished and every event was taken


def _attention_group(chunk: Chunk) -> int:
    return 0 if chunk.num_tokens == 1 else 1 if chunk.num_tokens <= MAX_VERIFY_QUERIES else 2


class EventQueue:
    """A request's events, from the stepping thread to waiting consumers: threads (`get`) and asyncio tasks (`aget`,
    woken through their own event loop). After `close`, and once its events are taken, it gives _END to everyone who
    asks, as often as they ask: a consumer that arrives late, or a second one, sees the end too."""

    def __init__(self):
        self._items: deque[TokenEvent] = deque()
        self._cond = threading.Condition()
        self._async_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.ended = False  # closed: no event follows

    def __len__(self) -> int:
        return len(self._items)

    def put(self, event: TokenEvent) -> None:
        with self._cond:
            if self.ended:
                raise RuntimeError("an event after the request's end")
            self._items.append(event)
        self.wake()

    def close(self) -> None:
        with self._cond:
            self.ended = True
        self.wake()

    def wake(self) -> None:
        """Wake every waiting consumer to look again (an event, the end, or the engine's loop stopping)."""
        with self._cond:
            self._cond.notify_all()
            waiters = list(self._async_waiters)
        for loop, ready in waiters:
            with contextlib.suppress(RuntimeError):  # that event loop has closed: its consumer is gone
                loop.call_soon_threadsafe(ready.set)

    def _next(self):
        """Under the lock: the next event, _END, or None (nothing yet)."""
        if self._items:
            return self._items.popleft()
        return _END if self.ended else None

    def get_nowait(self):
        with self._cond:
            return self._next()

    def get(self, timeout: float | None = None):
        """The next event or _END, waiting for it; None after `timeout` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self.ended, timeout)
            return self._next()

    async def aget(self):
        """The next event or _END; None when woken with neither (the caller looks at why)."""
        loop = asyncio.get_running_loop()
        waiter = (loop, asyncio.Event())
        with self._cond:
            item = self._next()
            if item is not None:
                return item
            self._async_waiters.add(waiter)
        try:
            await waiter[1].wait()
            with self._cond:
                return self._next()
        finally:
            with self._cond:
                self._async_waiters.discard(waiter)

    def snapshot(self) -> list[TokenEvent]:
        """The queued events, left in the queue."""
        with self._cond:
            return list(self._items)


@dataclass(eq=False)
class Request:
    """One request's state in the engine. `completion` is set when it finishes; `events` holds its TokenEvents until a
    consumer takes them."""

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    seq: Seq
    output: OutputText
    on_event: Callable[[Request, TokenEvent], None] | None = None
    events: EventQueue = field(default_factory=EventQueue)
    arrival_s: float = field(default_factory=time.perf_counter)
    scheduled_s: float | None = None  # first step it ran in
    first_token_s: float | None = None
    completion: Completion | None = None
    engine: Engine | None = field(default=None, repr=False)
    on_event_failed: bool = False  # its callback raised: it is not called again
    adapter: str | None = None  # its LoRA adapter's name
    holds_adapter: bool = False  # the adapter cannot be removed from the model's registry until the request ends
    speculative: SpeculativeConfig | None = None  # its speculative decoding (None: plain)
    spec_stats: SpeculativeStats = field(default_factory=SpeculativeStats)

    @property
    def finished(self) -> bool:
        """Its completion is set (its last events may still be on their way to the queue: see `ended`)."""
        return self.completion is not None

    @property
    def ended(self) -> bool:
        """Finished, and every event of it queued: what a consumer waits for."""
        return self.events.ended


class _PlanError(Exception):
    def __init__(self, failures: list[tuple[Request, str]]):
        super().__init__(f"{len(failures)} requests could not be planned")
        self.failures = failures


class EngineFailure(RuntimeError):
    """The engine can run no step any more (a rank of its tensor-parallel model stopped): every request it held
    failed with this cause, and new ones are refused with it."""


def _fatal_errors() -> tuple[type[BaseException], ...]:
    """The step failures that end the engine, not just the step's requests: tensor parallelism's RankFailure (the
    other ranks cannot run this step or any later one). Looked up, not imported: a process that never loaded
    realm.parallel.tensor_parallel has no such failure (and realm.runtime stays free of torch.distributed)."""
    tp = sys.modules.get("realm.parallel.tensor_parallel")
    return () if tp is None else (tp.RankFailure,)


class Engine:
    failure: str | None = None  # why the engine can run no more steps (EngineFailure); None while it can

    def __init__(self, model: Model, config: EngineConfig | None = None, *, seed: int | None = None):
        """seed: of the sampler's generator for requests without their own seed (None: random)."""
        self.model = model
        self.config = config = config or EngineConfig()
        num_blocks = config.kv_blocks or default_kv_blocks(model, config)
        check_kv_memory(model, config, num_blocks)
        self.loras = model.loras  # the model's adapters: shared by every engine on the model
        self.runner = ModelRunner(model.transformer, num_blocks, config.block_size, model.tokenizer.vocab_size, seed,
                                  lora_slots=self.loras.max_loras, lora_mode=config.lora_mode)
        self.blocks = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(config.scheduler_config(self.loras.max_loras), self.blocks)
        self.requests: dict[int, Request] = {}  # unfinished and in the scheduler, by id
        self._live: dict[int, Request] = {}  # unfinished, wherever they are (the inbox too): for cancel by id
        self._ids = itertools.count()
        self._next_id = 0  # ids handed out so far
        self._id_lock = threading.Lock()
        self._inbox: deque[tuple[str, Request]] = deque()
        self._lock = threading.RLock()  # held while the engine's state changes
        self._wake = threading.Condition()  # the loop's idle wait
        self._in_step = False
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._delivering: deque[tuple[Request, TokenEvent | None]] | None = None  # a step's events, being emitted
        self._ended = threading.Condition()  # notified when a request's end is queued (`wait`)
        self.speculation = SpeculationController()  # adaptive k: acceptance per sequence, the step-cost model
        self.spec_stats = SpeculativeStats()  # every request's speculation, summed
        self._draft: DraftProposer | None = None  # made at the first request that asks for the draft model
        self._draft_probs: dict[int, torch.Tensor] = {}  # seq_id -> q of its proposals, until verified
        self._lookup: dict[int, PromptLookup] = {}  # seq_id -> its prompt lookup (n-gram proposals), kept across steps
        self._proposal_kind: dict[int, object] = {}  # seq_id -> what proposed its last proposals (n-gram length)

    def __repr__(self) -> str:
        kv = self.runner.kv
        return (f"Engine({self.model!r}, {kv.num_blocks} KV blocks of {kv.block_size} ({kv.nbytes / 2**20:.0f} MiB), "
                f"{self.config})")

    @property
    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_work

    @property
    def num_waiting(self) -> int:
        """Requests added and not yet running: in the inbox or the scheduler's queue (a server's queue length)."""
        return len(self._inbox) + len(self.scheduler.waiting)

    # ------------------------------------------------------------------------------------------------ requests

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                    on_event: Callable[[Request, TokenEvent], None] | None = None,
                    salt: str | None = None, adapter: str | None = None) -> Request:
        """Queue a prompt (text, or token ids) for generation; any thread. ValueError, and nothing queued, when the
        request cannot run: an empty prompt, ids out of range, a prompt that fills the context, or one whose tokens
        could not fit in the KV cache even alone. salt: requests with different salts never share prefix-cache
        blocks. adapter: the name of a LoRA adapter loaded in the model (`model.loras`), overriding params.adapter;
        its requests share prefix-cache blocks only with each other. on_event(request, event) runs in the thread that
        steps the engine."""
        if self.failure is not None:
            raise EngineFailure(self.failure)
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str) and not prompt:
            raise ValueError("the prompt is empty")
        if salt is not None and not isinstance(salt, str):
            raise ValueError(f"salt must be a string or None, got {salt!r}")
        adapter = params.adapter if adapter is None else adapter
        ids = self.model.encode(prompt)
        self.model.check_prompt(ids)
        speculative = self._speculative(params)
        max_new = min(params.max_tokens, self.model.config.context_length - len(ids))
        # The prefix-cache namespace: callers' salts and adapters' never meet (a caller's "lora:1" is not adapter 1's)
        salt = None if salt is None else f"salt:{salt}"
        if adapter is not None:  # unknown: ValueError; else it cannot be removed until the request ends
            uid = self.loras.acquire(adapter)
            salt = f"lora:{uid}" if salt is None else f"lora:{uid}|{salt}"
        try:
            with self._id_lock:
                request_id = next(self._ids)
                seq = Seq(request_id, ids, max_new, salt=salt, adapter=adapter)
                self.scheduler.check_fits(seq)  # reads only the cache's size: safe outside the lock
                self._next_id = request_id + 1
                request = Request(request_id, ids, params, seq, OutputText(self.model.tokenizer, params), on_event,
                                  engine=self, adapter=adapter, holds_adapter=adapter is not None,
                                  speculative=speculative)
                self._live[request_id] = request
        except BaseException:
            if adapter is not None:
                self.loras.release(adapter)
            raise
        self._submit("add", request)
        return request

    def _speculative(self, params: SamplingParams) -> SpeculativeConfig | None:
        """The request's speculation (its own, else the engine's); a draft is only there when the model has one."""
        spec = params.speculative if params.speculative is not None else self.config.speculative
        if spec is None or not spec.enabled:
            return None
        if spec.method is SpecMethod.DRAFT and getattr(self.model, "draft", None) is None:
            raise ValueError("speculative method 'draft' needs a draft model: load the model with "
                             "draft_model=PATH (realm.load, realm.LLM, --draft-model), or use 'ngram'")
        return spec

    def cancel(self, request: Request | int) -> None:
        """Stop a request (finish reason "abort") and free its KV blocks; any thread. A finished one is left as it
        is. Applied at once when nothing is stepping, else at the next step boundary."""
        if isinstance(request, bool) or not isinstance(request, (Request, int)):
            raise ValueError(f"cancel takes a Request or a request id (int), got {type(request).__name__} "
                             f"{request!r:.60}")
        if isinstance(request, int):
            if not 0 <= request < self._next_id:
                raise ValueError(f"no request {request} was ever added to this engine")
            with self._id_lock:
                found = self._live.get(request)
            if found is None:  # finished already
                return
            request = found
        self._check_own(request)
        if not request.finished:
            self._submit("cancel", request)

    def _submit(self, kind: str, request: Request) -> None:
        with self._wake:
            self._inbox.append((kind, request))
            self._wake.notify()
        if self._thread is None and self._lock.acquire(blocking=False):
            try:
                if not self._in_step:  # a callback's cancel waits for the step's end
                    self._drain_inbox()
            finally:
                self._lock.release()

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, request = self._inbox.popleft()
            if kind == "add":
                try:
                    self.scheduler.add(request.seq)
                except Exception as e:  # it cannot be scheduled: it alone ends, with the reason
                    self._end_unscheduled(request, f"the request could not be scheduled: {type(e).__name__}: {e}")
                    continue
                self.requests[request.request_id] = request
            elif not request.finished:
                self._deliver_end(request, self._finish(request, FinishReason.ABORT))

    def _check_own(self, request: Request) -> None:
        if request.engine is not self:
            raise ValueError(f"request {request.request_id} is not one of this engine's requests")

    # ------------------------------------------------------------------------------------------------- running

    def step(self) -> list[Request]:
        """One forward over every scheduled chunk; returns the requests that finished in it. Not while the loop
        thread runs (it steps), and not from inside a step (an on_event callback): that would interleave two steps'
        deliveries."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("the engine's loop runs in its own thread (start()): it steps; stop() it first")
        with self._lock:
            if self._in_step:  # only this thread can hold the lock inside a step: a callback stepping
                raise RuntimeError("the engine is stepped from inside its own step (an on_event callback calling "
                                   "step, run, stream or wait?); a callback may add or cancel requests, not step")
            self._in_step = True
            try:
                return self._step()
            finally:
                self._in_step = False

    def _step(self) -> list[Request]:
        self._drain_inbox()
        self._propose()
        step = self.scheduler.schedule()
        self._keep_scheduled_proposals(step)
        if not step:
            if self.scheduler.has_work:
                raise RuntimeError("the scheduler formed an empty step with requests waiting")
            return []
        now = time.perf_counter()
        # decodes first, then short chunks (verifications), then the rest (stable: arrival order): the attention
        # kernels take them in these three groups (realm.kernels.attention)
        chunks = sorted(step.chunks, key=_attention_group)
        requests = [self.requests[c.seq.seq_id] for c in chunks]
        for request in requests:
            if request.scheduled_s is None:
                request.scheduled_s = now
        # The step's adapter slots stay as planned until its forward has run. Failures are delivered after the lock is
        # released: their callbacks must not run while it blocks other engines on the model.
        failed_plan = failed_step = None
        fatal = None
        with self.loras.lock:
            try:
                plan = self._plan(step, chunks, requests)
                began = time.perf_counter()
                # draft distributions only when a draft model proposed for sampled requests: wrappers of execute(plan)
                # written before speculation stay valid
                output = (self.runner.execute(plan, self._draft_probs) if self._draft_probs
                          else self.runner.execute(plan))
                if plan.num_logits == plan.num_tokens:  # decodes and verifications only (SpeculationController)
                    self.speculation.observe_step(plan.num_tokens, time.perf_counter() - began)
            except _PlanError as e:  # those requests fail; the others are scheduled again by the next step
                failed_plan = e.failures
            except _fatal_errors() as e:  # no step can run any more: every request fails (_fail_engine)
                fatal = e
            except Exception as e:  # a step of one chunk, or the copies: these requests fail, the engine goes on
                if isinstance(e, BlockCopyError):  # and so does any sequence whose copied block was not written
                    requests += [r for r in self.requests.values() if r not in requests
                                 and e.destinations.intersection(r.seq.kv.blocks)]
                log.exception("engine step failed; its %d requests end with an error", len(requests))
                failed_step = f"the step failed: {type(e).__name__}: {e}"
            except BaseException:  # an interrupt: the step did not happen, and the engine stays usable
                self.scheduler.abort(step)
                raise
        if failed_plan is not None:
            self.scheduler.abort(step)
            return self._fail_requests(failed_plan)
        if fatal is not None:
            self.scheduler.abort(step)
            return self._fail_engine(fatal)
        if failed_step is not None:
            return self._fail_step(step, requests, failed_step)
        failed = {r.seq.seq_id: (r, error) for r, error in zip(requests, output.errors or (), strict=False)
                  if error is not None}
        self.scheduler.complete(step, failed)
        self._draft_probs.clear()
        now = time.perf_counter()
        # The engine's state first (every token appended, every finished request completed and its blocks freed),
        # user callbacks last: whatever a callback does (raise, cancel), no sequence is left half-updated.
        finished = []
        self._delivering = deque()
        try:
            for chunk, request, tokens in zip(chunks, requests, output.tokens, strict=True):
                if chunk.seq.seq_id in failed:
                    self._delivering.extend(((request, self._finish(request, FinishReason.ERROR, now, error=(
                        f"the step failed for this request: {failed[chunk.seq.seq_id][1]}"))), (request, _END)))
                    finished.append(request)
                    continue
                if not chunk.completes:
                    continue
                if request.first_token_s is None:
                    request.first_token_s = now
                try:
                    if chunk.num_unverified:
                        reason, events = self._accept_verified(chunk, request, tokens)
                    else:
                        reason, event = self._accept(request, tokens[0])
                        events = [event]
                except Exception as e:  # e.g. detokenizing: this request alone ends
                    log.exception("request %d: accepting its token failed", request.request_id)
                    reason, events = FinishReason.ERROR, []
                    error = f"the step failed for this request: {type(e).__name__}: {e}"
                else:
                    error = None
                self._delivering.extend((request, event) for event in events)
                if reason is not None:
                    self._delivering.extend(((request, self._finish(request, reason, now, error)), (request, _END)))
                    finished.append(request)
            while self._delivering:
                self._emit(*self._delivering.popleft())
        finally:
            undelivered, self._delivering = self._delivering, None
            for request, event in undelivered or ():  # an interrupt in a callback: the others' events still go out
                self._emit(request, event, callback=False)
        return finished

    # ------------------------------------------------------------------------------------- speculative decoding

    def _propose(self) -> None:
        """Proposals (Sequence.propose) for the running sequences about to decode whose requests speculate, k per
        sequence from the controller (adaptive) or the request's k."""
        candidates, found, fixed = [], {}, {}
        decoding = 0
        longest = self._longest_budget()
        for seq in self.scheduler.running:
            if seq.num_draft:  # left by a step that did not run: proposed afresh
                seq.drop_proposals()
                self._draft_probs.pop(seq.seq_id, None)
            request = self.requests.get(seq.seq_id)
            if seq.remaining != 1 or request is None:
                continue
            decoding += 1
            spec = request.speculative
            max_k = 0 if spec is None else min(spec.num_speculative_tokens, seq.max_tokens - seq.num_output_tokens - 1)
            if max_k < 1:
                continue
            kind = "draft"
            if spec.method is SpecMethod.DRAFT and getattr(self.model, "draft", None) is None:
                continue  # the model's draft was removed after the request came: it decodes plainly
            if spec.method is SpecMethod.NGRAM:
                began = time.perf_counter()
                proposal, kind = self._match_ngram(seq, spec, max_k)
                self.spec_stats.propose_s += time.perf_counter() - began
                if not proposal:
                    continue
                found[seq.seq_id] = proposal
                max_k = len(proposal)
            self._proposal_kind[seq.seq_id] = kind
            # A seeded sampled request keeps its k: adaptive k follows measured step times, and its draws (keyed by
            # position, realm.runtime.sampler) depend on which positions were proposals; its output must not.
            params = request.params
            if spec.adaptive and (params.temperature == 0 or params.seed is None):
                setup = 1 if spec.method is SpecMethod.NGRAM else self._draft_proposer().setup_tokens(
                    seq.seq_id, seq.token_ids)
                critical = longest is None or longest == seq.max_tokens - seq.num_output_tokens
                candidates.append((Candidate(seq.seq_id, max_k, kind, setup, critical), spec.method))
            else:
                fixed[seq.seq_id] = max_k
        if not candidates and not fixed:
            return
        # The step's rows that yield a token, priced as a step of only those: the cost model knows decode and
        # verification steps alone (a prefill chunk's tokens cost less than rows with logits; see choose)
        base = decoding + sum(fixed.values())
        uses_draft = any(method is SpecMethod.DRAFT for _, method in candidates)
        chosen = self.speculation.choose([c for c, _ in candidates], base, decoding,
                                         self._draft.costs if uses_draft and self._draft is not None else None)
        chosen.update(fixed)
        self._apply_proposals(chosen, found)

    def _longest_budget(self) -> int | None:
        """None while requests wait (a freed slot is taken at once: every accepted token is worth a decoded one);
        else the tokens left to the one running sequence with the largest budget, the one expected to finish last
        (-1 when several tie for it: SpeculationController._worth)."""
        if self.scheduler.waiting:
            return None
        budgets = [seq.max_tokens - seq.num_output_tokens for seq in self.scheduler.running]
        if not budgets:
            return None
        top = max(budgets)
        return top if budgets.count(top) == 1 else -1

    def _match_ngram(self, seq: Seq, spec: SpeculativeConfig, k: int) -> tuple[list[int], object]:
        """The sequence's n-gram proposals and their kind, from its PromptLookup (kept across steps)."""
        settings = (spec.ngram_min, spec.ngram_max, spec.ngram_lockstep)
        lookup = self._lookup.get(seq.seq_id)
        if lookup is None or (lookup.ngram_min, lookup.ngram_max, lookup.lockstep) != settings:
            lookup = self._lookup[seq.seq_id] = PromptLookup(*settings)
        return lookup.propose(seq.token_ids, k)

    def _apply_proposals(self, chosen: dict[int, int], found: dict[int, list[int]]) -> None:
        wants = []
        for seq_id, k in chosen.items():
            request = self.requests[seq_id]
            if seq_id in found:
                request.seq.propose(found[seq_id][:k])
            else:
                wants.append(DraftRequest(seq_id, request.seq.token_ids, k, request.params))
        if not wants:
            return
        began = time.perf_counter()
        draft = self._draft_proposer()
        steps = draft.steps
        for seq_id, proposal in draft.propose(wants).items():
            self.requests[seq_id].seq.propose(proposal.tokens)
            if proposal.probs is not None:
                self._draft_probs[seq_id] = proposal.probs
        self.spec_stats.draft_steps += draft.steps - steps
        self.spec_stats.propose_s += time.perf_counter() - began

    def _draft_proposer(self) -> DraftProposer:
        """The draft model's proposer, on its own KV cache of this engine's size; made anew when the model's draft
        changed (Model.set_draft_model)."""
        if self._draft is not None and self._draft.model is not self.model.draft:
            self._draft = None  # its cache goes with it: the next call catches every sequence up
        if self._draft is None:
            self._draft = DraftProposer(self.model.draft, self.model, self.runner.kv.num_blocks, self.runner.block_size,
                                        seed=None)
        return self._draft

    def _keep_scheduled_proposals(self, step: Step) -> None:
        """Proposals the step found no room for are dropped (the scheduler ran them only as far as it could)."""
        scheduled = {c.seq.seq_id: c for c in step.chunks}
        for seq in self.scheduler.running:
            if not seq.num_draft:
                continue
            chunk = scheduled.get(seq.seq_id)
            keep = chunk.num_unverified if chunk is not None else 0
            if keep < seq.num_draft:
                seq.drop_proposals(keep)
                probs = self._draft_probs.pop(seq.seq_id, None)
                if probs is not None and keep:
                    self._draft_probs[seq.seq_id] = probs[:keep]

    def _accept_verified(self, chunk: Chunk, request: Request,
                         tokens: list[int]) -> tuple[FinishReason | None, list[TokenEvent | None]]:
        """A verified chunk: its rejected proposals and their KV go; the accepted ones and the token after them are
        accepted one by one, exactly as plain decoding would have produced them (a stop string or max_tokens ends the
        run where it would have ended it); the verified tokens' full blocks enter the prefix cache."""
        seq = chunk.seq
        k, accepted = chunk.num_unverified, len(tokens) - 1
        keep = chunk.start + chunk.num_tokens - k + accepted  # the token before the proposals, and the accepted
        self.scheduler.truncate(seq, keep)
        seq.drop_proposals()  # their KV stays: the tokens are appended again below, one by one
        request.spec_stats.add(k, accepted)
        self.spec_stats.add(k, accepted)
        self.speculation.observe_verification(seq.seq_id, k, accepted, self._proposal_kind.get(seq.seq_id))
        events = []
        for token in tokens:
            reason, event = self._accept(request, token)
            events.append(event)
            if reason is not None:
                return reason, events
        self.scheduler.commit(seq, keep)
        return None, events

    def _plan(self, step: Step, chunks: list[Chunk], requests: list[Request]) -> StepPlan:
        plans, failures = [], []
        try:  # the step's adapters into the device pool (the scheduler kept them to max_loras)
            slots = self.loras.activate(r.adapter for r in requests if r.adapter is not None)
        except Exception as e:
            log.exception("the step's LoRA adapters could not be made resident")
            raise _PlanError([(r, f"its LoRA adapter could not be put in the model's device pool: "
                                  f"{type(e).__name__}: {e}") for r in requests if r.adapter is not None]) from e
        for chunk, request in zip(chunks, requests, strict=True):
            try:
                plans.append(self._chunk_plan(chunk, request, slots.get(request.adapter, -1)))
            except Exception as e:
                log.exception("request %d: its step plan could not be made", request.request_id)
                failures.append((request, f"the step could not be planned for this request: {type(e).__name__}: {e}"))
        if failures:
            raise _PlanError(failures)
        return StepPlan(self.runner.block_size, tuple(plans), copies=tuple(step.copies))

    @staticmethod
    def _chunk_plan(chunk: Chunk, request: Request, adapter: int) -> ChunkPlan:
        seq = chunk.seq
        n = chunk.num_tokens
        k = chunk.num_unverified  # proposals: verified by the logits of the token before each, and of the last
        sampling = None
        if chunk.completes:
            params = request.params
            history = seq.token_ids[: chunk.start] if params.repetition_penalty != 1.0 else ()
            sampling = RowSampling.of(params, position=chunk.start + n, history=history)
        return ChunkPlan(seq.seq_id, chunk.start, tuple(chunk.token_ids), tuple(seq.kv.blocks),
                         tuple(range(n - 1 - k, n)) if chunk.completes else (), sampling, adapter, num_draft=k)

    def _fail_step(self, step: Step, requests: list[Request], message: str) -> list[Request]:
        self.scheduler.abort(step)
        return self._fail_requests([(request, message) for request in requests])

    def _fail_requests(self, failures: list[tuple[Request, str]]) -> list[Request]:
        for request, message in failures:
            self._deliver_end(request, self._finish(request, FinishReason.ERROR, error=message))
        return [request for request, _ in failures]

    def _fail_engine(self, cause: BaseException) -> list[Request]:
        """A fatal step failure (_fatal_errors): every request fails with it, those in the inbox too, and add_request
        refuses new ones (EngineFailure) with the same message."""
        self.failure = f"the engine stopped: {type(cause).__name__}: {cause}"
        log.error("%s; failing its %d requests and refusing new ones", self.failure, len(self.requests))
        failed = self._fail_requests([(request, self.failure) for request in list(self.requests.values())])
        with self._wake:
            inbox, self._inbox = self._inbox, deque()
        for kind, request in inbox:
            if kind == "add":
                self._end_unscheduled(request, self.failure)
                failed.append(request)
        return failed

    def run(self) -> None:
        """Step until every request has finished (in this thread; not while the loop runs)."""
        while self.has_work:
            self.step()

    # ---------------------------------------------------------------------------------------------------- loop

    @property
    def loop_running(self) -> bool:
        return self._thread is not None

    def start(self) -> Engine:
        """Run the engine's loop in a background thread: it steps while there is work and sleeps on a condition
        when there is none (no polling). Consumers then only wait (`stream`, `astream`); add and cancel from any
        thread. Returns the engine."""
        with self._lock:
            old = self._thread
            if old is not None and self._stopping and old is not threading.current_thread():
                old.join()  # a loop told to stop (from a callback) that has not ended yet
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="realm-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """End the loop after its current step; unfinished requests stay (step them, or start again). From the
        loop's own thread (a callback), the loop ends once the step is over."""
        thread = self._thread
        if thread is None:
            return
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"the engine loop did not stop within {timeout} s")

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        try:
            self._loop_steps()
        finally:
            if self._thread is threading.current_thread():
                self._thread = None
            for request in list(self._live.values()):  # async consumers of unfinished requests: the loop is gone
                request.events.wake()

    def _loop_steps(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._stopping or self.has_work)
                if self._stopping:
                    return
            try:
                with self._lock:
                    self._in_step = True
                    try:
                        self._step()
                    finally:
                        self._in_step = False
            except Exception as e:  # a bug outside the forward: fail what is in flight rather than hang consumers
                log.exception("engine loop: step failed outside the forward")
                self._fail_all(f"engine error: {type(e).__name__}: {e}")

    def _fail_all(self, message: str) -> None:
        with self._lock:
            self._delivering = None  # what the failed step had not delivered goes out now, directly
            for request in list(self.requests.values()):
                try:
                    self._deliver_end(request, self._finish(request, FinishReason.ERROR, error=message))
                except Exception:  # the scheduler's state is broken: still release the consumer
                    log.exception("engine loop: could not finish request %d", request.request_id)
                    self.requests.pop(request.request_id, None)
                    self._end_unscheduled(request, message)

    def _end_unscheduled(self, request: Request, message: str) -> None:
        """End a request with an error without the scheduler (it never entered it, or its state is broken)."""
        with self._id_lock:
            self._live.pop(request.request_id, None)
        self._release_adapter(request)
        if request.completion is None:
            request.completion = Completion(request.output.text, request.seq.output_ids, FinishReason.ERROR,
                                            request.prompt_ids, Timings(prompt_tokens=len(request.prompt_ids)),
                                            error=message)
        self._put_end(request)

    # ------------------------------------------------------------------------------------------------ consuming

    def wait(self, requests: Sequence[Request], timeout: float | None = None) -> bool:
        """Until one of `requests` has ended (True: finished, every event queued), or `timeout` seconds with the
        loop running (False). Without the loop this steps the engine until then."""
        if not requests:
            raise ValueError("wait needs at least one request")
        for request in requests:
            self._check_own(request)
        while self._thread is None:  # (a callback may start the loop meanwhile: then wait for it)
            if any(r.ended for r in requests):
                return True
            self.step()
        with self._ended:
            return self._ended.wait_for(lambda: any(r.ended for r in requests) or self._thread is None, timeout) \
                and any(r.ended for r in requests)

    def stream(self, request: Request) -> Iterator[TokenEvent]:
        """The request's TokenEvents as they come; ends after its last one. With the loop running this waits for
        them; without, it steps the engine itself (every request advances) when none are queued."""
        self._check_own(request)
        while True:
            item = request.events.get_nowait()
            if item is None and self._thread is not None:
                item = request.events.get(timeout=1.0)  # None again: look whether the loop still runs
            if item is _END:
                return
            if item is not None:
                yield item
            elif self._thread is None:
                self.step()

    async def astream(self, request: Request) -> AsyncIterator[TokenEvent]:
        """`async for event in engine.astream(request)`: the request's TokenEvents, waiting for the engine's loop
        (`start()` it first); RuntimeError if the loop stops before the request has ended."""
        self._check_own(request)
        while True:
            if self._thread is None and not request.ended:
                raise RuntimeError(f"request {request.request_id} waits for the engine's loop, which is not running: "
                                   "start() it (or iterate stream(), which steps the engine)")
            item = await request.events.aget()
            if item is _END:
                return
            if item is not None:
                yield item

    # ---------------------------------------------------------------------------------------------- internals

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
        spec = request.spec_stats
        timings.proposed_tokens, timings.accepted_tokens, timings.verifications = (spec.proposed, spec.accepted,
                                                                                   spec.verifications)
        request.completion = Completion(request.output.text, seq.output_ids, reason, request.prompt_ids, timings,
                                        error)
        self._release_adapter(request)
        self.speculation.forget(seq.seq_id)
        self._proposal_kind.pop(seq.seq_id, None)
        self._lookup.pop(seq.seq_id, None)
        self._draft_probs.pop(seq.seq_id, None)
        if self._draft is not None:
            self._draft.release(seq.seq_id)
        del self.requests[request.request_id]
        with self._id_lock:
            self._live.pop(request.request_id, None)
        return tail

    def _release_adapter(self, request: Request) -> None:
        """The request no longer holds its adapter (once, however it ended)."""
        if request.holds_adapter:
            request.holds_adapter = False
            self.loras.release(request.adapter)

    def _deliver_end(self, request: Request, tail: TokenEvent | None) -> None:
        """Emit a finished request's held-back text and its end now, or after the events of the step being
        delivered (so a callback that cancels another request cannot put that request's end before its token)."""
        if self._delivering is None:
            try:
                self._emit(request, tail)
            finally:  # even if its callback is interrupted: a request that finished always ends
                self._emit(request, _END)
        else:
            self._delivering.extend(((request, tail), (request, _END)))

    def _emit(self, request: Request, event, callback: bool = True) -> None:
        """Queue the event (a TokenEvent, or _END) for the request's consumers and call on_event (unless `callback`
        is False). A callback that raises ends its request with finish reason "error" and the exception in `error`
        (the other requests go on)."""
        if event is None or request.events.ended:  # nothing, or the request's end is out already (its callback failed)
            return
        if event is _END:
            self._put_end(request)
            return
        request.events.put(event)
        if request.on_event is None or request.on_event_failed or not callback:
            return
        try:
            request.on_event(request, event)
        except BaseException as e:  # an interrupt too: the callback did not finish, and is not called again
            request.on_event_failed = True
            message = f"on_event raised {type(e).__name__}: {e}"
            if request.finished:  # its end is not queued yet: its consumers will see this
                request.completion.finish_reason, request.completion.error = FinishReason.ERROR, message
            else:
                tail = self._finish(request, FinishReason.ERROR, error=message)
                if tail is not None:
                    request.events.put(tail)  # for `stream`
                self._put_end(request)
            if not isinstance(e, Exception):
                if threading.current_thread() is not self._thread:
                    raise  # Ctrl-C, SystemExit: to whoever is stepping (the step's other events still go out)
                log.warning("engine loop: request %d's callback raised %s; the request ended", request.request_id,
                            type(e).__name__)

    def _put_end(self, request: Request) -> None:
        """The request's end: its consumers stop after its events, and `wait` wakes."""
        request.events.close()
        with self._ended:
            self._ended.notify_all()
