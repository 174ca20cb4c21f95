"""The scheduler: every step, which sequences run and how many of their tokens, under a token budget and the free
KV blocks. Iteration-level (a sequence joins or leaves the batch at any step), with chunked prefill. Plain Python.

    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=512), BlockManager(num_blocks, block_size))
    scheduler.add(seq)
    step = scheduler.schedule()        # Step: chunks (sequence, start, num_tokens), block copies, who was preempted
    ...                                # step.copies run, then the forward runs the chunks; the engine samples
    scheduler.complete(step)           # the chunks are in the cache now (scheduler.abort(step) if the forward failed)
    scheduler.finish(seq)              # done or cancelled: its blocks are freed

Speculative decoding: a chunk's last `num_unverified` tokens are drafts; complete() stores their KV but keeps them out
of the prefix cache. After verification the engine drops the rejected drafts and commits the accepted ones:

    scheduler.truncate(seq, n)         # tokens and KV past the first n dropped (a shared block kept in part: copied)
    seq.append(token)                  # the token sampled after the last accepted one
    scheduler.commit(seq, n)           # the first n tokens are verified: their full blocks enter the prefix cache

Proposals (`seq.propose`, speculative decoding) ride along with their sequence's decode when the step has room for
them: after pass 1, from the budget and free blocks left (older sequences first), never by preempting anyone; the
engine drops those that found no room (`seq.drop_proposals`). Their chunk's `num_unverified` counts them.

A step is formed in two passes, older sequences first:
1. Running sequences, in arrival order, each get min(its remaining tokens, the budget left): one token for a
   decode, a chunk of the prompt for a prefill in progress (shrunk to the free blocks, if they are short). When
   even that does not fit, the newest running sequence is preempted (its blocks freed; it will recompute its prompt
   and output when resumed), until it fits (a prefill chunk then grows into the room that made), or until the
   sequence itself was the newest. Older sequences come first in everything: a resumed prefill takes the budget
   before newer sequences' decodes.
   A sequence whose LoRA adapter would exceed `max_loras` distinct adapters in the step skips it (an older
   sequence's adapter comes first); in pass 2 the sequences after it, without an adapter or with one the step has,
   are still admitted (a new adapter could not take the place either, so none overtakes it to a slot).
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
from collections.abc import Collection
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
    max_loras: int | None = None  # distinct LoRA adapters in one step (the device pool's slots); None: no limit

    def __post_init__(self):
        for name in ("max_batch_tokens", "max_num_seqs", "max_loras"):
            value = getattr(self, name)
            if value is None and name == "max_loras":
                continue
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
    num_unverified: int = 0  # the last tokens are drafts: their KV is stored but kept out of the prefix cache

    def __post_init__(self):
        if not 0 <= self.num_unverified <= self.num_tokens:
            raise ValueError(f"num_unverified must be in 0..{self.num_tokens}, got {self.num_unverified}")

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
    copies: list[tuple[int, int]] = field(default_factory=list)  # KV blocks (src, dst) to copy before the forward

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
            if not self._adapter_fits(step, seq):  # its adapter would be one too many: it waits a step
                i += 1
                continue
            need = seq.remaining - seq.num_draft  # proposals are optional: they take what is left (below)
            n = self._fit(seq, min(need, budget))
            while not self.blocks.can_allocate(seq.kv, seq.num_computed + n) and self.running[-1] is not seq:
                step.preempted.append(self._preempt(self.running[-1]))
                n = self._fit(seq, min(need, budget))  # a prefill chunk takes the room the preemption made
            if not self.blocks.can_allocate(seq.kv, seq.num_computed + n):
                step.preempted.append(self._preempt(seq))  # the newest running one: it waits for the others
                break
            self.blocks.allocate(seq.kv, seq.num_computed + n)
            step.chunks.append(Chunk(seq, seq.num_computed, n))
            budget -= n
            i += 1
        budget = self._add_proposals(step, budget)
        if self.config.batching is Batching.CONTINUOUS:
            self._admit(step, budget)
        elif static_refill:  # a whole batch at once: what the budget leaves out of this step is prefilled later
            self._admit(step, budget, whole_batch=True)
        if step:  # the engine skips an empty step: its copies wait for the next forward, which they must precede
            step.copies = self.blocks.take_copies()
        self.stats.steps += bool(step)
        return step

    def _add_proposals(self, step: Step, budget: int) -> int:
        """Speculative decoding: the decodes of the step take their sequences' proposals along, older sequences
        first, as far as the budget left and the free blocks go, never preempting. Returns the budget left."""
        for i, chunk in enumerate(step.chunks):
            seq = chunk.seq
            if budget <= 0:
                break
            if not seq.num_draft or chunk.start + chunk.num_tokens != seq.num_verified:
                continue
            room = (len(seq.kv.blocks) + self.blocks.num_free) * self.blocks.block_size - seq.num_verified
            extra = min(seq.num_draft, budget, room)
            if extra > 0:
                self.blocks.allocate(seq.kv, seq.num_verified + extra)
                step.chunks[i] = Chunk(seq, chunk.start, chunk.num_tokens + extra, num_unverified=extra)
                budget -= extra
        return budget

    def _adapter_fits(self, step: Step, seq: Sequence) -> bool:
        """At most max_loras distinct adapters per step: the pool holds that many at once."""
        limit = self.config.max_loras
        if seq.adapter is None or limit is None:
            return True
        used = {c.seq.adapter for c in step.chunks} - {None}
        return seq.adapter in used or len(used) < limit

    def _fit(self, seq: Sequence, n: int) -> int:
        """A prefill chunk shrinks to the room its blocks and the free ones have, rather than preempting others
        (a decode, 1 token, cannot shrink)."""
        room = (len(seq.kv.blocks) + self.blocks.num_free) * self.blocks.block_size - seq.num_computed
        return max(1, min(n, room))

    def _admit(self, step: Step, budget: int, whole_batch: bool = False) -> None:
        i = 0  # sequences before i wait for a LoRA slot: the step already has max_loras other adapters
        while (i < len(self.waiting) and (budget > 0 or whole_batch) and not step.preempted
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[i]
            if not self._adapter_fits(step, seq):  # while the step's adapters stay full, so does any new one's
                i += 1
                continue
            cached = self.blocks.match_prefix(seq.kv, seq.token_ids, seq.salt)
            n = min(seq.remaining, budget)
            # all its tokens must fit now (a prefill that could not finish would only be preempted), with a block
            # to spare per running sequence
            if self.blocks.blocks_needed(seq.kv, seq.num_tokens) + len(self.running) > self.blocks.num_free:
                self.blocks.free(seq.kv)  # gives back what the prefix match took
                break
            self.blocks.allocate(seq.kv, seq.num_computed + n)
            self.waiting.pop(i)
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
        seq.drop_proposals()  # it recomputes what it has when resumed: proposals are not part of that
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.stats.preemptions += 1
        bisect.insort(self.waiting, seq, key=_by_arrival)
        return seq

    # ---------------------------------------------------------------------------------------- after the step

    def complete(self, step: Step, failed: Collection[int] = ()) -> None:
        """The copies and the forward have run: the copies' source blocks are released, the sequences' cached
        lengths move past their chunks, and their newly full blocks of verified tokens enter the prefix cache.
        failed: ids of sequences whose chunk was not computed (its KV is garbage): left as they were, never cached;
        the engine finishes them."""
        self.blocks.release_copies(step.copies)  # ValueError the second time: a step is completed or aborted once
        for chunk in step.chunks:
            seq = chunk.seq
            if seq.seq_id in failed:
                continue
            if seq.status is not SequenceStatus.RUNNING or seq.num_computed != chunk.start:
                raise RuntimeError(f"chunk {chunk.start}..{chunk.start + chunk.num_tokens} of {seq!r} is stale")
            seq.kv.length = chunk.start + chunk.num_tokens
            self.blocks.commit(seq.kv, seq.token_ids, seq.salt, upto=seq.kv.length - chunk.num_unverified)

    def abort(self, step: Step) -> None:
        """The step's forward failed (its copies ran first): the copies' source blocks are released and every
        sequence's computed length is left as it was; the engine finishes the step's requests with an error."""
        self.blocks.release_copies(step.copies)

    def commit(self, seq: Sequence, upto: int) -> None:
        """seq's first `upto` tokens are verified (speculative decoding): its full blocks among them, computed,
        enter the prefix cache."""
        self.blocks.commit(seq.kv, seq.token_ids, seq.salt, upto=upto)

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep seq's first num_tokens tokens (never fewer than its prompt) and, if it runs, only the KV of those:
        rejected draft tokens go. Call it between steps; the engine appends the next token before the next
        schedule(). CacheFullError (nothing changed) when a shared or cached block kept in part needs a copy and no
        block is free."""
        if seq not in (self.running if seq.status is SequenceStatus.RUNNING else self.waiting):
            raise ValueError(f"{seq!r} is not in this scheduler")
        if seq.status is SequenceStatus.RUNNING and seq.num_prompt_tokens <= num_tokens <= seq.num_tokens:
            self.blocks.truncate(seq.kv, min(seq.num_computed, num_tokens))  # else seq.truncate raises: KV untouched
        seq.truncate(num_tokens)

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
