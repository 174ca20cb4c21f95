"""`realm.LLM`: the offline batch API. Many prompts in, one Completion per prompt out, continuously batched.

    llm = realm.LLM(model="smollm2", backend="torch", device="cpu", max_batch_tokens=512, kv_blocks=1024)
    outs = llm.generate(["Once upon a time", "The capital of France is"], SamplingParams(max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason, outs[0].timings
    llm = realm.LLM("smollm2", lora={"pirate": "realm/data/lora/pirate"})       # requests name their adapter
    llm.generate(["Hi", "Hi"], [SamplingParams(adapter="pirate"), SamplingParams()])   # one batch, two models
    for i, completion in llm.completions(prompts): ...        # as each finishes (realm batch writes them so)
    llm = realm.LLM("smollm2", speculative="ngram")           # speculative decoding: same output, faster
    with realm.LLM("smollm2", tensor_parallel=3) as llm: ...  # 3 ranks: this process and 2 workers it spawns

A request that cannot run (empty prompt, prompt over the context, more tokens than the KV cache holds, bad ids)
gets a Completion with finish reason "error" and the reason in `error`; the other prompts run as if it were not
there.
"""

from __future__ import annotations

import logging
import operator
import os
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .engine import Engine, EngineConfig, EngineFailure, Request
from .generate import Completion, FinishReason, Timings, TokenEvent
from .kv_cache import DEFAULT_BLOCK_SIZE
from .lora import DEFAULT_MAX_LORAS, LoraMode, parse_lora_specs
from .model import Backend, Model, load
from .sampling import SamplingParams
from .scheduler import Batching
from .speculative import SpeculativeConfig

log = logging.getLogger(__name__)

PROGRESS_FROM = 16  # prompts in a batch from which a progress bar is shown by default

Prompt = str | Sequence[int]


class LLM:
    def __init__(self, model: str | os.PathLike | Model = "smollm2", backend: Backend | str | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 max_batch_tokens: int = 512, max_num_seqs: int = 64, kv_blocks: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, prefix_caching: bool = True,
                 batching: Batching | str = Batching.CONTINUOUS, lora: Mapping[str, str | os.PathLike] | None = None,
                 max_loras: int | None = None, max_lora_rank: int | None = None,
                 lora_mode: LoraMode | str = LoraMode.FUSED, speculative: SpeculativeConfig | str | None = None,
                 draft_model: str | os.PathLike | Model | None = None, tensor_parallel: int = 1,
                 parallel_timeout: float | None = None):
        """model: a packaged model name, a GGUF path, or a loaded Model (then device and dtype must be left out, and
        backend, if given, be the model's); backend: None is the torch reference; lora: LoRA adapters to load,
        {name: PEFT directory or GGUF LoRA file}, that requests name in SamplingParams(adapter=...); max_loras,
        max_lora_rank: the device pool (realm.runtime.lora; default 4 slots; a loaded Model has its own);
        speculative: the requests' default speculative decoding ("ngram", "draft", or a SpeculativeConfig; requests
        may choose their own in SamplingParams); draft_model: the draft model for "draft" (a path, a packaged name, or a
        loaded Model of the same vocabulary); the rest configures the engine (EngineConfig).

        tensor_parallel=N > 1: the model split over N ranks (realm.parallel), rank 0 in this process driving the
        engine, ranks 1 .. N-1 worker processes it spawns on this machine (gloo on the CPU; NCCL on CUDA, rank r on
        cuda:r). N must split the model's heads, FFN and vocabulary (ShardError names the counts that work).
        The ranks form torch.distributed's default process group of this process, so a process that already has
        one is refused (RuntimeError; under torchrun, use `torchrun ... -m realm`): replacing it would break the
        caller's own collectives, and sharing it would pair realm's collectives with the caller's. One
        tensor-parallel LLM per process at a time; close() (or `with`, or garbage collection, or the process's
        exit) stops the workers and leaves the group. parallel_timeout: seconds a collective may wait for another
        rank before it fails (default realm.parallel.launch.DEFAULT_TIMEOUT_S); a rank that dies fails at once. When a
        rank fails, every request fails with the RankFailure's message and new ones raise EngineFailure. A model
        given as a loaded Model and draft models are not supported with tensor_parallel > 1 yet; LoRA adapters are
        (realm.parallel.lora_shard: rank 0 loads them, each rank uses its shard)."""
        config = EngineConfig(max_batch_tokens=max_batch_tokens, max_num_seqs=max_num_seqs, kv_blocks=kv_blocks,
                              block_size=block_size, prefix_caching=prefix_caching, batching=batching,
                              lora_mode=lora_mode, speculative=speculative)
        self._ranks = None
        if type(tensor_parallel) is not int or tensor_parallel != 1:  # True and 1.0 are refused, not 1
            self._start_ranks(model, tensor_parallel, parallel_timeout, backend, device, dtype, config, lora,
                              max_loras, max_lora_rank, draft_model=draft_model)
            return
        if parallel_timeout is not None:
            raise ValueError("parallel_timeout is for tensor_parallel > 1")
        if isinstance(model, Model):
            if device is not None or dtype is not None or (backend is not None and Backend(backend) is not
                                                            model.backend):
                raise ValueError(f"a loaded Model brings its backend ({model.backend.value}), device and dtype; do "
                                 "not pass others")
            pool = model.loras
            if (max_loras not in (None, pool.max_loras)) or (max_lora_rank not in (None, pool.max_rank)):
                raise ValueError(f"a loaded Model has its LoRA pool (max_loras={pool.max_loras}, max_lora_rank="
                                 f"{pool.max_rank}): pass max_loras and max_lora_rank to realm.load instead")
            for name, source in parse_lora_specs(lora).items():
                model.add_lora(name, source)
            if draft_model is not None:
                model.set_draft_model(draft_model)
        else:
            model = load(model, device=device, backend=Backend.TORCH if backend is None else backend, dtype=dtype,
                         lora=lora, max_loras=max_loras or DEFAULT_MAX_LORAS, max_lora_rank=max_lora_rank,
                         draft_model=draft_model)
        self.model = model
        self.engine = Engine(model, config)

    def _start_ranks(self, model, world, timeout, backend, device, dtype, config, lora, max_loras, max_lora_rank,
                     **unsupported) -> None:
        from realm.parallel import launch

        launch.check_world(world)
        given = [name for name, value in unsupported.items() if value]
        if isinstance(model, Model):
            given.insert(0, "a loaded Model (pass its path or packaged name)")
        if given:
            raise ValueError(f"tensor_parallel={world} does not support {', '.join(given)} yet")
        ranks = launch.spawn_ranks(model, world, backend, device, dtype,
                                   launch.DEFAULT_TIMEOUT_S if timeout is None else timeout,
                                   max_loras or DEFAULT_MAX_LORAS, max_lora_rank)
        self._ranks = ranks
        self._finalizer = weakref.finalize(self, ranks.close)  # also at exit: no worker outlives this process
        try:
            self.model = ranks.model
            for name, source in parse_lora_specs(lora).items():  # rank 0's: the plans carry them to the others
                ranks.model.add_lora(name, source)
            self.engine = Engine(ranks.model, config)
            ranks.attach(self.engine)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop a tensor-parallel LLM's worker processes and leave its process group (nothing otherwise); the LLM
        cannot generate afterwards. Idempotent; also run when the LLM is garbage collected and at exit."""
        if self._ranks is not None:
            self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LLM({self.engine!r})"

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 progress: bool | None = None,
                 on_event: Callable[[int, TokenEvent], None] | None = None) -> list[Completion]:
        """One Completion per prompt, in order. prompts: texts or token-id lists (one text alone is a batch of one);
        sampling: one SamplingParams for all, one per prompt, or None for the defaults; progress: a bar on stderr
        (None: for batches of PROGRESS_FROM prompts or more); on_event(prompt index, TokenEvent): streaming."""
        prompts = _prompt_list(prompts)
        outputs: list[Completion | None] = [None] * len(prompts)
        for i, completion in self.completions(prompts, sampling, progress=progress, on_event=on_event):
            outputs[i] = completion
        return outputs  # type: ignore[return-value]

    def completions(self, prompts: Prompt | Sequence[Prompt],
                    sampling: SamplingParams | Sequence[SamplingParams] | None = None, *,
                    progress: bool | None = None,
                    on_event: Callable[[int, TokenEvent], None] | None = None) -> Iterator[tuple[int, Completion]]:
        """(prompt index, Completion) as each request finishes, requests that cannot run first; arguments as
        `generate`. Leaving the iteration early cancels what is still running."""
        prompts = _prompt_list(prompts)
        params = self._params(sampling, len(prompts))
        if self._ranks is not None and self._ranks.closed:
            raise RuntimeError("this tensor-parallel LLM was closed: its ranks have stopped")
        if self.engine.failure is not None:  # every request would fail alike: say it once
            raise EngineFailure(self.engine.failure)
        running: dict[int, Request] = {}  # prompt index -> its request
        show = len(prompts) >= PROGRESS_FROM if progress is None else progress
        try:
            failed = []
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
                callback = None if on_event is None else (lambda _request, event, i=i: on_event(i, event))
                try:
                    running[i] = self.engine.add_request(prompt, p, on_event=callback)
                except ValueError as e:  # this request alone fails
                    failed.append((i, _failed(prompt, e)))
                except EngineFailure:  # the engine stopped (a rank failed) while the batch was being added
                    raise
                except Exception as e:  # not a refusal but a fault (a tokenizer bug?): still this request's alone
                    log.exception("request %d could not be added", i)
                    failed.append((i, _failed(prompt, f"the request could not be added: {type(e).__name__}: {e}")))
            with tqdm(total=len(prompts), disable=not show, unit="req", file=sys.stderr) as bar:
                bar.update(len(failed))
                yield from failed
                while running:
                    self.engine.wait(list(running.values()), timeout=1.0)  # steps here, unless the loop runs
                    for i in [i for i, r in running.items() if r.ended]:
                        bar.update()
                        yield i, running.pop(i).completion
        finally:  # an interrupted batch leaves nothing behind in the engine
            for request in running.values():
                self.engine.cancel(request)

    @staticmethod
    def _params(sampling, n: int) -> list[SamplingParams]:
        if sampling is None:
            return [SamplingParams()] * n
        if isinstance(sampling, SamplingParams):
            return [sampling] * n
        if not isinstance(sampling, Sequence):
            raise ValueError(f"sampling must be a SamplingParams or a list of them, got {type(sampling).__name__}")
        if len(sampling) != n:
            raise ValueError(f"sampling must be one SamplingParams or one per prompt ({n}), got {len(sampling)}")
        bad = next((p for p in sampling if not isinstance(p, SamplingParams)), None)
        if bad is not None:
            raise ValueError(f"sampling holds a {type(bad).__name__}, not a SamplingParams")
        return list(sampling)


def _prompt_list(prompts) -> list:
    """A batch of prompts; one text, or one sequence of ids (a list, a tuple, a 1-D array or tensor), alone is a
    batch of one."""
    if hasattr(prompts, "tolist"):  # numpy arrays, tensors: 1-D is one prompt, 2-D a batch of them
        prompts = prompts.tolist()
    if isinstance(prompts, (str, bytes, bytearray)) or not isinstance(prompts, Sequence):
        if isinstance(prompts, str):
            return [prompts]
        raise ValueError(f"prompts must be a text, a list of token ids, or a list of those; got "
                         f"{type(prompts).__name__}")
    if prompts and all(_is_id(t) for t in prompts):
        return [list(prompts)]
    return [p.tolist() if hasattr(p, "tolist") else p for p in prompts]


def _is_id(t) -> bool:
    try:
        operator.index(t)
    except TypeError:
        return False
    return not isinstance(t, bool)


def _failed(prompt: Prompt, error: Exception | str) -> Completion:
    """The output of a request that could not run: its ids if it had any valid ones, else none."""
    ids = list(prompt) if isinstance(prompt, Sequence) and not isinstance(prompt, str) and all(
        _is_id(t) for t in prompt) else []
    return Completion("", [], FinishReason.ERROR, ids, Timings(prompt_tokens=len(ids)), error=str(error))
