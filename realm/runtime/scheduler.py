"""The scheduler: every step, which sequences run and how many of their tokens, under a token budget and the free
KV blocks. Iteration-level (a sequence joins or leaves the batch at any step), with chunked prefill. Plain Python.

    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=512), BlockManager(num_blocks, block_size))
    scheduler.add(seq)
    step = scheduler.schedule()        # Step: chunks (sequence, start, num_tokens), and who was preempted
    ...                                # the forward runs the chunks; the engine samples where chunk.completes
    scheduler.complete(step)           # the chunks are in the cache now
    scheduler.finish(seq)              # done or cancelled: its blocks are freed

A step is formed in two passes, older sequences first:
1. Running sequences, in arrival order, each get min(its remaining tokens, the budget left): one token for a
   decode, a chunk of the prompt for a prefill in progress (shrunk to the free blocks, if they are short). When
   even that does not fit, the newest running sequence is preempted (its blocks freed; it will recompute its prompt
   and output when resumed), until it fits, or until the sequence itself was the newest. Older sequences come
   first in everything: a resumed prefill takes the budget before newer sequences' decodes.
2. Waiting sequences, in arrival order (a preempted sequence keeps its place, ahead of later arrivals), are
   admitted while the budget, `max_num_seqs` and the blocks last, after taking what they can from the prefix cache.
   The first that does not fit stops admission (no overtaking: a long prompt is never starved by short ones), and
   so does a preemption in pass 1. A sequence is admitted only when the blocks for all its tokens (not just this
   step's chunk) are free, with one to spare per running sequence, so that the next steps' decodes do not at once
   preempt what was just admitted.

With `Batching.STATIC` (a baseline for benchmarks) pass 2 runs only when no sequence is running, and then admits a
whole batch (up to `max_num_seqs`, whatever the token budget; prompts the budget leaves out are prefilled in the next
steps): the batch is refilled only once all of it has finished.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


class Batching(str, enum.Enum):
    CONTINUOUS = "continuous"  # sequences join and leave at every step
    STATIC = "static"  # new sequences join only when every running one has finished


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 512  # tokens per forward step: decodes and prefill chunks together
    max_num_seqs: int = 64  # sequences in one step
    batching: Batching = Batching.CONTINUOUS

    def __post_init__(self):
        for name in ("max_batch_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        try:
            object.__setattr__(self, "batching", Batching(self.batching))
        except ValueError:
            raise ValueError(f"unknown batching {self.batching!r}; choose one of: "
                             f"{', '.join(b.value for b in Batching)}") from None


@dataclass(frozen=True)
class Chunk:
    """Tokens [start, start + num_tokens) of seq, to run through the model in this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start : self.start + self.num_tokens]

    @property
    def completes(self) -> bool:
        """The chunk reaches the sequence's last token: its logits give the next token."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class Step:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)


@dataclass
class SchedulerStats:
    steps: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0  # tokens looked up in the prefix cache at admissions (prompts and resumed outputs)
    cached_tokens: int = 0  # of those, found there


def _by_arrival(seq: Sequence) -> int:
    return seq.seq_id


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: list[Sequence] = []  # sorted by arrival
        self.running: list[Sequence] = []  # sorted by arrival
        self.ids: set[int] = set()  # of the sequences waiting or running
        self.stats = SchedulerStats()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def check_fits(self, seq: Sequence) -> None:
        """A sequence that could not fit in the cache even alone would never finish: refuse it up front."""
        need = self.blocks.blocks_for(seq.max_kv_tokens)
        if need > self.blocks.num_blocks:
            raise ValueError(f"the prompt ({seq.num_prompt_tokens} tokens) and max_tokens ({seq.max_tokens}) need "
                             f"{seq.max_kv_tokens} KV slots, {need} blocks of {self.blocks.block_size}; the cache "
                             f"has {self.blocks.num_blocks} blocks in all")

    def add(self, seq: Sequence) -> None:
        if seq.status is not SequenceStatus.WAITING or seq.kv.blocks or seq.num_computed:
            raise ValueError(f"only a new sequence can be added, got {seq!r}")
        if seq.seq_id in self.ids:
            raise ValueError(f"sequence id {seq.seq_id} is already scheduled")
        self.check_fits(seq)
        bisect.insort(self.waiting, seq, key=_by_arrival)
        self.ids.add(seq.seq_id)

    # ------------------------------------------------------------------------------------------------ schedule

    def schedule(self) -> Step:
        step = Step()
        budget = self.config.max_batch_tokens
        static_refill = self.config.batching is Batching.STATIC and not self.running
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._fit(seq, min(seq.remaining, budget))
            while not self.blocks.can_allocate(seq.kv, seq.num_computed + n) and self.running[-1] is not seq:
                step.preempted.append(self._preempt(self.running[-1]))
            if not self.blocks.can_allocate(seq.kv, seq.num_computed + n):
                step.preempted.append(self._preempt(seq))  # the newest running one: it waits for the others
                break
            self.blocks.allocate(seq.kv, seq.num_computed + n)
            step.chunks.append(Chunk(seq, seq.num_computed, n))
            budget -= n
            i += 1
        if self.config.batching is Batching.CONTINUOUS:
            self._admit(step, budget)
        elif static_refill:  # a whole batch at once: what the budget leaves out of this step is prefilled later
            self._admit(step, budget, whole_batch=True)
        self.stats.steps += bool(step)
        return step

    def _fit(self, seq: Sequence, n: int) -> int:
        """A prefill chunk shrinks to the room its blocks and the free ones have, rather than preempting others
        (a decode, 1 token, cannot shrink)."""
        room = (len(seq.kv.blocks) + self.blocks.num_free) * self.blocks.block_size - seq.num_computed
        return max(1, min(n, room))

    def _admit(self, step: Step, budget: int, whole_batch: bool = False) -> None:
        while (self.waiting and (budget > 0 or whole_batch) and not step.preempted
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            cached = self.blocks.match_prefix(seq.kv, seq.token_ids, seq.salt)
            n = min(seq.remaining, budget)
            # all its tokens must fit now (a prefill that could not finish would only be preempted), with a block
            # to spare per running sequence
            if self.blocks.blocks_needed(seq.kv, seq.num_tokens) + len(self.running) > self.blocks.num_free:
                self.blocks.free(seq.kv)  # gives back what the prefix match took
                break
            self.blocks.allocate(seq.kv, seq.num_computed + n)
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            seq.num_cached_tokens = cached
            self.stats.prompt_tokens += seq.num_tokens
            self.stats.cached_tokens += cached
            bisect.insort(self.running, seq, key=_by_arrival)
            if n:
                step.chunks.append(Chunk(seq, seq.num_computed, n))
                budget -= n

    def _preempt(self, seq: Sequence) -> Sequence:
        """Drop seq's KV blocks and send it back to wait; it recomputes its tokens when it is resumed."""
        self.running.remove(seq)
        self.blocks.free(seq.kv)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.stats.preemptions += 1
        bisect.insort(self.waiting, seq, key=_by_arrival)
        return seq

    # ---------------------------------------------------------------------------------------- after the step

    def complete(self, step: Step) -> None:
        """The forward has stored every chunk: the sequences' cached lengths move past them, and their newly full
        blocks enter the prefix cache."""
        for chunk in step.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING or seq.num_computed != chunk.start:
                raise RuntimeError(f"chunk {chunk.start}..{chunk.start + chunk.num_tokens} of {seq!r} is stale")
            seq.kv.length = chunk.start + chunk.num_tokens
            self.blocks.commit(seq.kv, seq.token_ids, seq.salt)

    def finish(self, seq: Sequence) -> None:
        """seq is done, or cancelled, whether running or waiting: its blocks are freed."""
        if seq.status is SequenceStatus.FINISHED:
            return
        queue = self.running if seq.status is SequenceStatus.RUNNING else self.waiting
        if seq not in queue:
            raise ValueError(f"{seq!r} is not in this scheduler")
        queue.remove(seq)
        self.ids.discard(seq.seq_id)
        self.blocks.free(seq.kv)
        seq.status = SequenceStatus.FINISHED
