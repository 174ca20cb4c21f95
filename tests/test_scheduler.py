"""The scheduler and sequences alone (plain Python, no torch): budgets, chunked prefill, preemption and FIFO
resumption, static batching, prefix caching through admissions, errors, and a property test that drives a simulated
engine through random arrivals, steps and cancellations."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_block_manager import KVContents, prompts

from realm.runtime.block_manager import BlockManager, CacheFullError, SequenceKV
from realm.runtime.scheduler import Batching, Chunk, Scheduler, SchedulerConfig, Step
from realm.runtime.sequence import Sequence, SequenceStatus

WAITING, RUNNING, FINISHED = SequenceStatus.WAITING, SequenceStatus.RUNNING, SequenceStatus.FINISHED


def make(num_blocks: int = 16, block_size: int = 4, prefix_caching: bool = True, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, block_size, prefix_caching))


def next_token(token_ids: list[int]) -> int:
    """A deterministic "greedy" model: the same tokens always continue the same way."""
    return (sum(token_ids) * 31 + len(token_ids)) % 5


def step(scheduler: Scheduler) -> Step:
    """What the engine does each step: schedule, run (here: nothing), complete, sample where a chunk completes,
    finish what reached max_tokens."""
    out = scheduler.schedule()
    scheduler.complete(out)
    for chunk in out.chunks:
        if chunk.completes:
            chunk.seq.append(next_token(chunk.seq.token_ids))
            if chunk.seq.num_output_tokens == chunk.seq.max_tokens:
                scheduler.finish(chunk.seq)
    return out


def spans(out: Step) -> list[tuple[int, int, int]]:
    return [(c.seq.seq_id, c.start, c.num_tokens) for c in out.chunks]


def test_importing_the_scheduler_does_not_import_torch():
    code = ("import realm.runtime.scheduler, realm.runtime.block_manager, realm.runtime.sequence, sys; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,message", [
    ({"max_batch_tokens": 0}, r"max_batch_tokens must be an integer >= 1, got 0"),
    ({"max_batch_tokens": -3}, r"max_batch_tokens must be an integer >= 1, got -3"),
    ({"max_batch_tokens": 1.5}, r"max_batch_tokens must be an integer >= 1, got 1\.5"),
    ({"max_batch_tokens": "8"}, r"max_batch_tokens must be an integer >= 1, got '8'"),
    ({"max_batch_tokens": True}, r"max_batch_tokens must be an integer >= 1, got True"),
    ({"max_num_seqs": 0}, r"max_num_seqs must be an integer >= 1, got 0"),
    ({"batching": "dynamic"}, r"unknown batching 'dynamic'; choose one of: continuous, static"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**kwargs)


def test_config_takes_batching_by_name():
    assert SchedulerConfig(batching="static").batching is Batching.STATIC
    assert SchedulerConfig().batching is Batching.CONTINUOUS


@pytest.mark.parametrize("token_ids,max_tokens,message", [
    ([], 4, "a sequence needs at least one prompt token"),
    ([1], 0, "max_tokens must be >= 1, got 0"),
    ([1], -2, "max_tokens must be >= 1, got -2"),
])
def test_sequence_rejects_bad_values(token_ids, max_tokens, message):
    with pytest.raises(ValueError, match=message):
        Sequence(0, token_ids, max_tokens)


def test_sequence_counts_tokens():
    seq = Sequence(3, (5, 6, 7), max_tokens=2)
    assert (seq.num_tokens, seq.num_prompt_tokens, seq.num_output_tokens, seq.remaining) == (3, 3, 0, 3)
    assert seq.max_kv_tokens == 4 and seq.status is WAITING and seq.token_ids == [5, 6, 7]
    seq.kv.length = 3
    seq.append(9)
    assert (seq.output_ids, seq.remaining, seq.num_computed) == ([9], 1, 3)
    seq.append(8)
    with pytest.raises(ValueError, match="sequence 3 already has its 2 tokens"):
        seq.append(1)


def test_add_rejects_a_sequence_that_cannot_fit_even_alone():
    scheduler = make(num_blocks=4, block_size=4)
    scheduler.add(Sequence(0, [1] * 10, max_tokens=7))  # 16 slots: exactly the cache
    with pytest.raises(ValueError, match=r"the prompt \(10 tokens\) and max_tokens \(8\) need 17 KV slots, 5 blocks "
                                         r"of 4; the cache has 4 blocks in all"):
        scheduler.add(Sequence(1, [1] * 10, max_tokens=8))
    assert [s.seq_id for s in scheduler.waiting] == [0]


def test_add_rejects_a_sequence_twice():
    scheduler = make()
    seq = Sequence(0, [1, 2], max_tokens=4)
    scheduler.add(seq)
    with pytest.raises(ValueError, match="sequence id 0 is already scheduled"):
        scheduler.add(seq)
    with pytest.raises(ValueError, match="sequence id 0 is already scheduled"):
        scheduler.add(Sequence(0, [3], max_tokens=1))
    scheduler.schedule()
    with pytest.raises(ValueError, match="only a new sequence can be added"):
        scheduler.add(seq)
    assert scheduler.waiting == [] and scheduler.running == [seq]


# ------------------------------------------------------------------------------------------------ scheduling

def test_an_idle_scheduler_forms_an_empty_step():
    scheduler = make()
    assert not scheduler.has_work
    out = scheduler.schedule()
    assert not out and out.num_tokens == 0 and scheduler.stats.steps == 0


def test_chunked_prefill_runs_alongside_decodes():
    scheduler = make(max_batch_tokens=8)
    a, b = Sequence(0, [1, 2], max_tokens=10), Sequence(1, list(range(20)), max_tokens=2)
    scheduler.add(a)
    assert spans(step(scheduler)) == [(0, 0, 2)]
    scheduler.add(b)
    steps, outputs = [], []
    for _ in range(4):
        steps.append(spans(step(scheduler)))
        outputs.append((a.num_output_tokens, b.num_output_tokens))
    assert steps == [[(0, 2, 1), (1, 0, 7)], [(0, 3, 1), (1, 7, 7)], [(0, 4, 1), (1, 14, 6)], [(0, 5, 1), (1, 20, 1)]]
    assert outputs == [(2, 0), (3, 0), (4, 1), (5, 2)]  # b samples once its last prompt chunk ran
    assert b.status is FINISHED and a.status is RUNNING


def test_chunk_reads_its_tokens():
    seq = Sequence(0, [4, 5, 6, 7], max_tokens=1)
    assert Chunk(seq, 1, 2).token_ids == [5, 6] and not Chunk(seq, 1, 2).completes and Chunk(seq, 1, 3).completes


def test_running_sequences_go_before_waiting_ones():
    scheduler = make(max_batch_tokens=3)
    for i in range(3):
        scheduler.add(Sequence(i, [i + 1], max_tokens=4))
    assert spans(step(scheduler)) == [(0, 0, 1), (1, 0, 1), (2, 0, 1)]
    scheduler.add(Sequence(3, [9], max_tokens=4))
    assert spans(step(scheduler)) == [(0, 1, 1), (1, 1, 1), (2, 1, 1)]  # the budget went to the decodes
    assert [s.seq_id for s in scheduler.waiting] == [3]


def test_max_num_seqs_caps_the_batch():
    scheduler = make(max_num_seqs=2)
    seqs = [Sequence(i, [i + 1], max_tokens=2) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    assert spans(step(scheduler)) == [(0, 0, 1), (1, 0, 1)]
    assert spans(step(scheduler)) == [(0, 1, 1), (1, 1, 1)]  # both finish here
    assert spans(step(scheduler)) == [(2, 0, 1)]


def test_admission_keeps_a_free_block_per_running_sequence_and_never_overtakes():
    scheduler = make(num_blocks=3, block_size=2)
    scheduler.add(Sequence(0, [1], max_tokens=2))
    assert spans(step(scheduler)) == [(0, 0, 1)]
    assert scheduler.blocks.num_free == 2
    scheduler.add(Sequence(1, [3, 4, 5, 6], max_tokens=1))  # needs both free blocks: one is kept for sequence 0
    scheduler.add(Sequence(2, [7], max_tokens=1))  # would fit, but does not pass sequence 1
    assert spans(step(scheduler)) == [(0, 1, 1)]  # sequence 0 finishes
    assert [s.seq_id for s in scheduler.waiting] == [1, 2]
    assert spans(step(scheduler)) == [(1, 0, 4)]  # sequence 2 would leave no block for sequence 1
    assert spans(step(scheduler)) == [(2, 0, 1)]
    assert not scheduler.has_work and scheduler.blocks.num_used == 0


def test_preemption_takes_the_newest_running_sequence():
    scheduler = make(num_blocks=6, block_size=1)
    seqs = [Sequence(i, [i + 1], max_tokens=4) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    step(scheduler)
    step(scheduler)
    assert scheduler.blocks.num_free == 0
    out = step(scheduler)
    assert out.preempted == [seqs[2]] and spans(out) == [(0, 2, 1), (1, 2, 1)]  # not sequence 1, which is older
    assert seqs[2].status is WAITING and seqs[2].kv == SequenceKV() and seqs[2].num_preemptions == 1
    assert scheduler.stats.preemptions == 1 and scheduler.waiting == [seqs[2]]
    scheduler.blocks.check([s.kv for s in scheduler.running])


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preempted_sequence_resumes_before_later_arrivals(prefix_caching):
    scheduler = make(num_blocks=5, block_size=2, prefix_caching=prefix_caching)
    a, b, c = Sequence(0, [1, 2], max_tokens=5), Sequence(1, [3, 4], max_tokens=5), Sequence(2, [5], max_tokens=1)
    scheduler.add(a)
    scheduler.add(b)
    for _ in range(3):
        step(scheduler)
    scheduler.add(c)
    out = step(scheduler)  # b has no block for its next token: b, the newest, waits; c may not join
    assert out.preempted == [b] and spans(out) == [(0, 4, 1)]
    assert scheduler.waiting == [b, c] and (b.num_tokens, b.num_preemptions) == (5, 1)
    out = step(scheduler)  # a's last token; b does not fit beside it, and c does not pass b
    assert spans(out) == [(0, 5, 1)] and a.status is FINISHED
    out = step(scheduler)  # b recomputes its prompt and outputs, or finds their full blocks in the prefix cache
    cached = 4 if prefix_caching else 0
    assert spans(out) == [(1, cached, 5 - cached), (2, 0, 1)] and b.num_cached_tokens == cached
    while scheduler.has_work:
        step(scheduler)
    assert b.num_output_tokens == 5 and c.num_output_tokens == 1
    assert scheduler.blocks.num_used == 0


@pytest.mark.parametrize("batching,expected", [(Batching.STATIC, [[0], [0], [1]]),
                                               (Batching.CONTINUOUS, [[0, 1], [0], []])])
def test_static_batching_refills_only_when_all_have_finished(batching, expected):
    scheduler = make(batching=batching)
    scheduler.add(Sequence(0, [1], max_tokens=3))
    step(scheduler)
    scheduler.add(Sequence(1, [2], max_tokens=1))
    assert [[c.seq.seq_id for c in step(scheduler).chunks] for _ in range(3)] == expected


def test_static_batching_admits_a_whole_batch_whatever_the_budget():
    """The wave is max_num_seqs sequences, not what one step's token budget holds; their prompts are prefilled in
    the next steps."""
    scheduler = make(num_blocks=32, batching="static", max_batch_tokens=8, max_num_seqs=3)
    for i in range(4):
        scheduler.add(Sequence(i, [i + 1] * 6, max_tokens=2))
    first = step(scheduler)
    assert [s.seq_id for s in scheduler.running] == [0, 1, 2] and [s.seq_id for s in scheduler.waiting] == [3]
    assert spans(first) == [(0, 0, 6), (1, 0, 2)]  # seq 2 was admitted with no tokens this step
    assert spans(scheduler.schedule()) == [(0, 6, 1), (1, 2, 4), (2, 0, 3)]


def test_finish_cancels_waiting_and_running_sequences():
    scheduler = make(max_num_seqs=1)
    a, b = Sequence(0, [1, 2, 3, 4, 5], max_tokens=4), Sequence(1, [6], max_tokens=4)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    assert scheduler.blocks.num_used == 2
    scheduler.finish(b)  # waiting
    scheduler.finish(a)  # running
    scheduler.finish(a)  # already finished: a no-op
    assert a.status is FINISHED and b.status is FINISHED and a.kv == SequenceKV()
    assert scheduler.waiting == [] and scheduler.running == []
    assert not scheduler.has_work and scheduler.blocks.num_used == 0 and not scheduler.schedule()


def test_complete_rejects_a_chunk_of_a_cancelled_sequence():
    scheduler = make()
    seq = Sequence(0, [1, 2], max_tokens=2)
    scheduler.add(seq)
    out = scheduler.schedule()
    scheduler.finish(seq)
    with pytest.raises(RuntimeError, match=r"chunk 0\.\.2 of .* is stale"):
        scheduler.complete(out)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_admission_takes_committed_blocks_from_the_prefix_cache(prefix_caching):
    scheduler = make(block_size=4, prefix_caching=prefix_caching)
    prompt = list(range(10))
    a, b = Sequence(0, prompt, max_tokens=3), Sequence(1, prompt, max_tokens=3)
    scheduler.add(a)
    step(scheduler)  # a's full blocks are committed
    scheduler.add(b)
    out = step(scheduler)
    cached = 8 if prefix_caching else 0
    assert spans(out) == [(0, 10, 1), (1, cached, 10 - cached)] and b.num_cached_tokens == cached
    shared = a.kv.blocks[:2] if prefix_caching else []
    assert [x for x in b.kv.blocks if x in a.kv.blocks] == shared
    assert [scheduler.blocks.ref_count[x] for x in a.kv.blocks[:2]] == ([2, 2] if prefix_caching else [1, 1])
    assert (scheduler.stats.prompt_tokens, scheduler.stats.cached_tokens) == (20, cached)
    scheduler.blocks.check([a.kv, b.kv])


def test_salted_and_simultaneous_sequences_do_not_share():
    scheduler = make(block_size=4)
    prompt = list(range(10))
    a, b, c = Sequence(0, prompt, 2), Sequence(1, prompt, 2), Sequence(2, prompt, 2, salt="other")
    for seq in (a, b):
        scheduler.add(seq)
    step(scheduler)  # a and b computed the same blocks in one step: one copy each, a's are the ones hashed
    assert not set(a.kv.blocks) & set(b.kv.blocks) and b.num_cached_tokens == 0
    hashed = a.kv.blocks[:2]
    assert sorted(scheduler.blocks.cached.values()) == hashed
    scheduler.add(c)
    step(scheduler)  # a and b finish
    assert c.num_cached_tokens == 0 and not set(c.kv.blocks) & set(hashed)
    d = Sequence(3, prompt, 2)
    scheduler.add(d)
    step(scheduler)
    assert d.num_cached_tokens == 8 and d.kv.blocks[:2] == hashed  # a's blocks, found although a has finished
    scheduler.blocks.check([s.kv for s in scheduler.running])


def test_a_prefill_chunk_takes_the_room_a_preemption_made():
    """A prefill that finds no free block preempts the newest sequence, then takes the room that made, not just the
    one token it would have had before (the property test found this with a static batch)."""
    scheduler = make(num_blocks=4, block_size=2, max_batch_tokens=8)
    a, b = Sequence(0, [1] * 6, max_tokens=2), Sequence(1, [2] * 5, max_tokens=2)
    for seq, blocks_for, computed in ((a, 2, 2), (b, 6, 5)):  # a ran 2 prompt tokens; b, newer, took every block
        scheduler.add(seq)
        scheduler.waiting.remove(seq)
        scheduler.running.append(seq)
        seq.status = RUNNING
        scheduler.blocks.allocate(seq.kv, blocks_for)
        seq.kv.length = computed
    b.append(3)
    out = scheduler.schedule()
    assert out.preempted == [b] and spans(out) == [(0, 2, 4)]


# ------------------------------------------------------------------------------- speculative decoding, copies

def decode_to(scheduler: Scheduler, seq: Sequence, num_tokens: int) -> None:
    while seq.num_tokens < num_tokens:
        step(scheduler)


def test_chunk_checks_num_unverified():
    seq = Sequence(0, [4, 5, 6, 7], max_tokens=1)
    assert Chunk(seq, 1, 3).num_unverified == 0 and Chunk(seq, 1, 3, num_unverified=3).num_unverified == 3
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=f"num_unverified must be in 0..3, got {bad}"):
            Chunk(seq, 1, 3, num_unverified=bad)


def test_draft_tokens_are_stored_but_only_verified_ones_are_committed():
    scheduler = make(block_size=2)
    seq = Sequence(0, [1, 2, 3], max_tokens=8)
    scheduler.add(seq)
    step(scheduler)  # 3 computed, a 4th token sampled
    for draft in (5, 6, 7):
        seq.append(draft)
    out = scheduler.schedule()
    assert spans(out) == [(0, 3, 4)]
    out.chunks = [replace(out.chunks[0], num_unverified=3)]  # the engine's draft tokens
    scheduler.complete(out)
    assert seq.num_computed == 7 and len(seq.kv.hashes) == 2  # blocks [1, 2] and [3, 4]; not [5, 6]
    assert len(scheduler.blocks.cached) == 2
    scheduler.truncate(seq, 5)  # 5 accepted, 6 and 7 rejected
    assert seq.token_ids == [1, 2, 3, 4, 5] and seq.num_computed == 5 and len(seq.kv.blocks) == 3
    seq.append(9)  # the target model's token after 5
    scheduler.commit(seq, 5)  # nothing new: block [5, 9] is not full yet
    assert len(scheduler.blocks.cached) == 2
    assert spans(step(scheduler)) == [(0, 5, 1)]  # block [5, 9] is full and verified now
    assert len(seq.kv.hashes) == 3
    other = Sequence(1, [1, 2, 3, 4, 5, 6, 7], max_tokens=1)
    scheduler.add(other)
    step(scheduler)
    assert other.num_cached_tokens == 4  # the rejected drafts [5, 6] were never findable
    scheduler.blocks.check([s.kv for s in scheduler.running])


def test_commit_makes_verified_tokens_findable():
    scheduler = make(block_size=2)
    seq = Sequence(0, [1, 2, 3, 4, 5], max_tokens=4)
    scheduler.add(seq)
    out = scheduler.schedule()
    out.chunks = [replace(out.chunks[0], num_unverified=5)]
    scheduler.complete(out)
    assert seq.kv.hashes == [] and scheduler.blocks.cached == {}
    scheduler.commit(seq, 3)
    assert len(seq.kv.hashes) == 1
    scheduler.commit(seq, 99)  # no further than the computed tokens
    assert len(seq.kv.hashes) == 2 and len(scheduler.blocks.cached) == 2


def test_truncate_drops_tokens_and_kv():
    scheduler = make(block_size=2)
    seq = Sequence(0, [1, 2, 3], max_tokens=8)
    scheduler.add(seq)
    decode_to(scheduler, seq, 8)  # 7 computed, in 4 blocks
    blocks = list(seq.kv.blocks)
    scheduler.truncate(seq, 8)  # all it has: nothing changes
    assert (seq.num_tokens, seq.num_computed, seq.kv.blocks) == (8, 7, blocks)
    scheduler.truncate(seq, 6)
    assert seq.token_ids == [1, 2, 3, *seq.output_ids] and seq.num_output_tokens == 3
    assert (seq.num_tokens, seq.num_computed, seq.kv.blocks, seq.remaining) == (6, 6, blocks[:3], 0)
    assert len(seq.kv.hashes) == 3 and scheduler.blocks.pending_copies == []
    seq.append(4)  # the engine samples the next token before the next step
    assert spans(step(scheduler)) == [(0, 6, 1)]
    for bad in (2, 9):
        with pytest.raises(ValueError, match=f"sequence 0 can keep 3 to 8 tokens .*, not {bad}"):
            scheduler.truncate(seq, bad)
    assert (seq.num_tokens, seq.num_computed) == (8, 7)
    scheduler.blocks.check([seq.kv])


def test_truncate_a_waiting_sequence_keeps_only_tokens():
    scheduler = make()
    seq = Sequence(0, [1, 2, 3, 4, 5], max_tokens=4, num_prompt_tokens=3)  # e.g. preempted after two outputs
    scheduler.add(seq)
    scheduler.truncate(seq, 4)
    assert seq.token_ids == [1, 2, 3, 4] and seq.kv == SequenceKV() and scheduler.waiting == [seq]
    scheduler.finish(seq)
    with pytest.raises(ValueError, match="is not in this scheduler"):
        scheduler.truncate(seq, 3)
    with pytest.raises(ValueError, match="is not in this scheduler"):
        scheduler.truncate(Sequence(1, [1], max_tokens=1), 1)


def cow_setup() -> tuple[Scheduler, Sequence, int]:
    """A sequence truncated into a full block of its own that is in the prefix cache: it gets a copy."""
    scheduler = make(block_size=2)
    seq = Sequence(0, [1, 2, 3], max_tokens=8)
    scheduler.add(seq)
    decode_to(scheduler, seq, 8)
    cached = seq.kv.blocks[2]  # tokens 4 and 5, hashed
    scheduler.truncate(seq, 5)
    assert seq.num_computed == 5 and seq.kv.blocks[2] != cached and len(seq.kv.hashes) == 2
    assert scheduler.blocks.pending_copies == [(cached, seq.kv.blocks[2])]
    seq.append(4)
    return scheduler, seq, cached


def test_step_carries_the_copies_and_complete_releases_them():
    scheduler, seq, cached = cow_setup()
    out = scheduler.schedule()
    assert spans(out) == [(0, 5, 1)] and out.copies == [(cached, seq.kv.blocks[2])]
    assert scheduler.blocks.pending_copies == [] and scheduler.blocks.ref_count[cached] == 1  # the copy reads it
    scheduler.blocks.check([seq.kv])
    scheduler.complete(out)
    assert scheduler.blocks.ref_count[cached] == 0 and cached in scheduler.blocks.evictable
    assert not scheduler.schedule().copies
    scheduler.blocks.check([seq.kv])


def test_abort_releases_the_copies_and_keeps_the_computed_lengths():
    scheduler, seq, cached = cow_setup()
    out = scheduler.schedule()
    scheduler.abort(out)
    assert seq.num_computed == 5 and seq.status is RUNNING and cached in scheduler.blocks.evictable
    with pytest.raises(ValueError, match="released already"):
        scheduler.abort(out)
    scheduler.blocks.check([seq.kv])
    scheduler.finish(seq)  # the engine ends the step's requests with an error
    assert scheduler.blocks.num_used == 0
    scheduler.blocks.check([])


def test_a_copy_into_a_freed_block_is_dropped():
    scheduler, seq, _ = cow_setup()
    scheduler.finish(seq)
    assert scheduler.blocks.pending_copies == [] and scheduler.blocks.num_used == 0
    assert not scheduler.schedule()
    scheduler.blocks.check([])


# ------------------------------------------------------------------------------------------------- properties

class EngineMachine(RuleBasedStateMachine):
    """A simulated engine: requests arrive (prompts often sharing prefixes), steps run (schedule, run the step's
    block copies and write the KV model, complete, append a "greedy" token to each completing chunk's sequence,
    finish those at max_tokens), speculative steps run (draft tokens stored unverified, some rejected: truncated
    away), sequences are rolled back (truncated into their outputs, into cached blocks too), steps fail (aborted,
    their requests finished), and requests are cancelled, in any order. After every operation the blocks are
    consistent and every running sequence reads its own KV; every step keeps the budgets and the policy's order; at
    the end everything finishes within a bound on the steps and no block is leaked."""

    @initialize(num_blocks=st.integers(4, 24), block_size=st.integers(1, 4), max_batch_tokens=st.integers(1, 12),
                max_num_seqs=st.integers(1, 6), prefix_caching=st.booleans(), batching=st.sampled_from(Batching))
    def setup(self, num_blocks, block_size, max_batch_tokens, max_num_seqs, prefix_caching, batching):
        self.config = SchedulerConfig(max_batch_tokens, max_num_seqs, batching)
        self.scheduler = Scheduler(self.config, BlockManager(num_blocks, block_size, prefix_caching))
        self.blocks = self.scheduler.blocks
        self.kv = KVContents(self.blocks)
        self.seqs: list[Sequence] = []  # every one added
        self.cancelled: set[int] = set()  # and failed
        self.steps = 0
        self.extra_steps = 0  # allowed on top of the progress bound: computed tokens truncated away, failed steps
        self.next_id = 0

    @property
    def unfinished(self) -> list[Sequence]:
        return [s for s in self.seqs if s.status is not FINISHED]

    @rule(token_ids=prompts(), max_tokens=st.integers(1, 12), salt=st.sampled_from([None, "a"]))
    def arrive(self, token_ids, max_tokens, salt):
        seq = Sequence(self.next_id, token_ids, max_tokens, salt)
        self.next_id += 1  # a rejected request uses up its id too, as in the engine
        if self.blocks.blocks_for(seq.max_kv_tokens) > self.blocks.num_blocks:
            with pytest.raises(ValueError, match="KV slots"):
                self.scheduler.add(seq)
            assert seq not in self.scheduler.waiting
            return
        self.scheduler.add(seq)
        self.seqs.append(seq)

    @precondition(lambda self: self.unfinished)
    @rule(i=st.integers(0, 99))
    def cancel(self, i):
        seq = self.unfinished[i % len(self.unfinished)]
        self.scheduler.finish(seq)
        self.cancelled.add(seq.seq_id)
        assert seq.status is FINISHED and seq.kv == SequenceKV()
        assert seq not in self.scheduler.waiting and seq not in self.scheduler.running

    @rule()
    def run_step(self):
        self.step_once()

    @precondition(lambda self: any(EngineMachine.can_draft(s) for s in self.scheduler.running))
    @rule(i=st.integers(0, 99), drafts=st.lists(st.integers(0, 4), min_size=1, max_size=4), accepted=st.integers(0, 4))
    def speculate(self, i, drafts, accepted):
        """A decoding sequence gets draft tokens after its last one; the step stores them unverified; the first
        `accepted` are kept, the others truncated away, and the target's next token is appended."""
        seq = [s for s in self.scheduler.running if self.can_draft(s)][i % sum(map(self.can_draft,
                                                                                     self.scheduler.running))]
        verified = seq.num_tokens
        for token in drafts[: seq.max_tokens - seq.num_output_tokens - 1]:  # room for the target's token after them
            seq.append(token)
        self.step_once(spec=(seq, verified, accepted))

    @staticmethod
    def can_draft(seq: Sequence) -> bool:
        return seq.remaining == 1 and seq.num_output_tokens + 1 < seq.max_tokens

    @precondition(lambda self: any(s.num_output_tokens for s in self.unfinished))
    @rule(i=st.integers(0, 99), where=st.integers(0, 99), into_cached=st.booleans(), token=st.integers(0, 4))
    def roll_back(self, i, where, into_cached, token):
        """Truncate a sequence into its outputs (often into a block in the prefix cache: it gets a copy), then, if
        it runs, append another token (as after a rejected draft)."""
        candidates = [s for s in self.unfinished if s.num_output_tokens]
        seq = candidates[i % len(candidates)]
        bs = self.blocks.block_size
        cached = [n for n in range(seq.num_prompt_tokens, seq.num_tokens) if n % bs and n < len(seq.kv.hashes) * bs]
        n = seq.num_prompt_tokens + where % seq.num_output_tokens
        if cached and into_cached:
            n = cached[where % len(cached)]
        tokens, kv = list(seq.token_ids), (list(seq.kv.blocks), seq.num_computed)
        try:
            self.scheduler.truncate(seq, n)
        except CacheFullError:  # the copy of a shared block needs a free block
            assert seq.token_ids == tokens and (seq.kv.blocks, seq.num_computed) == kv
            return
        assert seq.token_ids == tokens[:n] and seq.num_computed == min(kv[1], n)
        self.extra_steps += kv[1] - seq.num_computed
        if seq.remaining == 0:
            seq.append(token)

    @precondition(lambda self: self.scheduler.has_work)
    @rule(fails=st.integers(0, 3))
    def failed_step(self, fails):
        """The forward fails (after the copies and maybe some of its writes), one time in four: the step is aborted
        and the engine finishes its requests."""
        if fails:
            self.step_once()
            return
        out = self.scheduler.schedule()
        if not out:
            return
        self.steps += 1
        self.extra_steps += 1
        self.kv.copy(out.copies)
        for c in out.chunks:
            self.kv.write(c.seq.kv, c.seq.token_ids, c.seq.salt, c.start, c.num_tokens)
        self.scheduler.abort(out)
        for c in out.chunks:
            assert c.seq.num_computed == c.start
            self.scheduler.finish(c.seq)
            self.cancelled.add(c.seq.seq_id)

    def step_once(self, spec: tuple[Sequence, int, int] | None = None):
        """One engine step; with `spec` (a sequence, its verified tokens, how many drafts after them to accept), that
        sequence's tokens past the verified ones are drafts."""
        sched, config = self.scheduler, self.config
        running, waiting = list(sched.running), list(sched.waiting)
        preemptions = sched.stats.preemptions
        out = sched.schedule()
        self.steps += bool(out)
        assert bool(out) == bool(running or waiting), "an empty step with work to do, or a step without work"
        # budgets, and every chunk where its sequence's cache ends, in blocks it holds
        assert out.num_tokens <= config.max_batch_tokens and len(out.chunks) <= config.max_num_seqs
        assert len({c.seq.seq_id for c in out.chunks}) == len(out.chunks), "two chunks of one sequence"
        for c in out.chunks:
            assert c.seq.status is RUNNING and c.start == c.seq.num_computed and c.num_tokens >= 1
            assert len(c.seq.kv.blocks) * self.blocks.block_size >= c.start + c.num_tokens
        # each chunk takes all its sequence's remaining tokens, or what is left of the budget, or (a prefill chunk
        # when blocks ran short) all the room its blocks have
        budget = config.max_batch_tokens
        for c in out.chunks:
            wanted = min(c.seq.num_tokens - c.start, budget)
            assert c.num_tokens == wanted or (
                1 <= c.num_tokens < wanted and len(c.seq.kv.blocks) * self.blocks.block_size == c.start + c.num_tokens)
            budget -= c.num_tokens
        # preemption: the newest running sequences, newest first; nothing admitted in that step
        assert sched.stats.preemptions == preemptions + len(out.preempted)
        assert [s.seq_id for s in out.preempted] == sorted((s.seq_id for s in out.preempted), reverse=True)
        assert all(s in running and s.status is WAITING and s.kv == SequenceKV() for s in out.preempted)
        if out.preempted:
            assert max((s.seq_id for s in sched.running), default=-1) < out.preempted[-1].seq_id
        # running sequences first, in arrival order; then the head of the waiting queue, in order
        old = [c.seq for c in out.chunks if c.seq in running]
        new = [c.seq for c in out.chunks if c.seq not in running]
        assert [c.seq for c in out.chunks] == old + new
        survivors = [s for s in running if s not in out.preempted]
        assert old == survivors[: len(old)]
        if len(old) < len(survivors):
            assert sum(c.num_tokens for c in out.chunks if c.seq in running) == config.max_batch_tokens
        assert new == waiting[: len(new)], "a waiting sequence was overtaken"
        if new:
            assert not out.preempted and (config.batching is Batching.CONTINUOUS or not running)
        assert not (out and self.blocks.pending_copies), "a step left copies behind"
        spec_seq, verified, accepted = spec or (None, 0, 0)
        out.chunks = [replace(c, num_unverified=max(0, min(c.num_tokens, c.start + c.num_tokens - verified)))
                      if c.seq is spec_seq else c for c in out.chunks]
        # the copies, then the forward
        self.kv.copy(out.copies)
        for c in out.chunks:
            self.kv.write(c.seq.kv, c.seq.token_ids, c.seq.salt, c.start, c.num_tokens)
        sched.complete(out)
        assert not self.blocks.taken_copies
        if spec_seq is not None:
            assert len(spec_seq.kv.hashes) <= verified // self.blocks.block_size, "a draft token was committed"
            if spec_seq not in [c.seq for c in out.chunks]:  # no room for it this step: its drafts go unverified
                sched.truncate(spec_seq, verified)
        for c in out.chunks:
            assert c.seq.num_computed == c.start + c.num_tokens
            if c.seq is spec_seq:  # verification: the accepted drafts stay, the target's next token follows
                keep = verified + min(accepted, max(0, c.start + c.num_tokens - verified))
                sched.truncate(c.seq, keep)
                self.extra_steps += c.start + c.num_tokens - keep
                assert c.seq.num_tokens == keep == c.seq.num_computed
                c.seq.append(next_token(c.seq.token_ids))
                sched.commit(c.seq, keep)
                if self.blocks.prefix_caching:
                    assert len(c.seq.kv.hashes) == keep // self.blocks.block_size
                if c.seq.num_output_tokens == c.seq.max_tokens:
                    sched.finish(c.seq)
            elif c.completes:
                c.seq.append(next_token(c.seq.token_ids))
                if c.seq.num_output_tokens == c.seq.max_tokens:
                    sched.finish(c.seq)
                    assert c.seq.kv == SequenceKV()

    @invariant()
    def consistent(self):
        sched = self.scheduler
        holders = [s.kv for s in sched.running]
        self.blocks.check(holders)
        sources = {src for src, _ in self.blocks.pending_copies}  # a pending copy holds its source
        assert self.blocks.num_used == len({b for kv in holders for b in kv.blocks} | sources)
        assert [s.seq_id for s in sched.waiting] == sorted(s.seq_id for s in sched.waiting)
        assert [s.seq_id for s in sched.running] == sorted(s.seq_id for s in sched.running)
        # preempted sequences are newer than all that still run, and admission is FIFO: the queues never interleave
        assert max((s.seq_id for s in sched.running), default=-1) < min((s.seq_id for s in sched.waiting),
                                                                       default=self.next_id)
        assert len(sched.running) <= self.config.max_num_seqs
        assert set(sched.running) | set(sched.waiting) == set(self.unfinished)
        for seq in sched.waiting:
            assert seq.status is WAITING and seq.kv == SequenceKV()
        for seq in sched.running:
            assert seq.status is RUNNING and seq.remaining >= 1 and seq.num_output_tokens < seq.max_tokens
            self.kv.verify(seq.kv, seq.token_ids, seq.salt)
        self.kv.verify_index()
        if not self.blocks.prefix_caching:
            assert max(self.blocks.ref_count) <= 1 and not self.blocks.cached
        assert sched.stats.preemptions == sum(s.num_preemptions for s in self.seqs)
        assert sched.stats.cached_tokens <= sched.stats.prompt_tokens

    def teardown(self):
        # progress: the oldest unfinished sequence is never preempted and gets a token every step, so it finishes
        # within max_kv_tokens steps of becoming the oldest, plus a step per computed token truncated away and per
        # failed step
        bound = sum(s.max_kv_tokens for s in self.seqs) + self.extra_steps
        while self.scheduler.has_work:
            assert self.steps <= bound, f"{self.steps} steps, more than {bound}"
            self.step_once()
            self.consistent()
        assert self.steps <= bound
        for seq in self.seqs:
            assert seq.status is FINISHED
            assert seq.seq_id in self.cancelled or seq.num_output_tokens == seq.max_tokens
        self.blocks.check()
        assert self.blocks.num_used == 0 and self.blocks.num_free == self.blocks.num_blocks


EngineMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_engine_properties = EngineMachine.TestCase
