"""The KV block manager alone (plain Python, no torch): sizes, allocation, reference counts, prefix caching, eviction,
truncation with copy-on-write, and a property test that random allocations, computations, draft tokens,
truncations, commits, copies and frees never leak or hand out wrong KV."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from realm.runtime.block_manager import BlockManager, CacheFullError, SequenceKV, block_hashes

PROMPT = list(range(10, 20))  # 10 tokens: two full blocks of 4 and a partial one


class KVContents:
    """What a real forward would leave in each cache slot: K and V of position p depend on the salt and on the tokens
    0..p. Writing and reading through this model catches a sequence that reads another's keys and values, a write
    into a shared or hashed block, and a hash index that points at a block whose contents changed."""

    def __init__(self, blocks: BlockManager):
        self.blocks = blocks
        self.slots: dict[tuple[int, int], tuple[str | None, tuple[int, ...]]] = {}  # (block, slot) -> what it holds

    def write(self, kv: SequenceKV, token_ids: list[int], salt: str | None, start: int, num_tokens: int) -> None:
        bs = self.blocks.block_size
        assert len(kv.blocks) * bs >= start + num_tokens, "writing past the sequence's blocks"
        for p in range(start, start + num_tokens):
            block = kv.blocks[p // bs]
            # a sequence only writes its own partial blocks: others may read shared and hashed ones at any time
            assert self.blocks.ref_count[block] == 1, f"write into block {block} shared by {self.blocks.ref_count}"
            assert self.blocks.block_hash[block] is None, f"write into hashed block {block}"
            self.slots[block, p % bs] = (salt, tuple(token_ids[: p + 1]))

    def verify(self, kv: SequenceKV, token_ids: list[int], salt: str | None) -> None:
        """The sequence's computed tokens are in its blocks (in a block that a pending copy fills: in its source)."""
        bs = self.blocks.block_size
        source = {dst: src for src, dst in self.blocks.pending_copies}
        for p in range(kv.length):
            block = source.get(kv.blocks[p // bs], kv.blocks[p // bs])
            assert self.slots.get((block, p % bs)) == (salt, tuple(token_ids[: p + 1])), \
                f"position {p} in block {block} holds another sequence's KV"

    def copy(self, copies: list[tuple[int, int]]) -> None:
        """What the model runner does with taken copies: one batched copy of whole blocks, so the destinations must
        be distinct, unused by anyone else, and none of them a source."""
        dsts = [dst for _, dst in copies]
        assert len(set(dsts)) == len(dsts) and not set(dsts) & {src for src, _ in copies}, f"copies {copies} overlap"
        for dst in dsts:
            assert self.blocks.ref_count[dst] == 1 and self.blocks.block_hash[dst] is None, f"copy into block {dst}"
        rows = {(src, dst): [self.slots.get((src, slot)) for slot in range(self.blocks.block_size)]
                for src, dst in copies}  # all read before any is written, as in one batched copy
        for (_, dst), values in rows.items():
            for slot, value in enumerate(values):
                if value is None:
                    self.slots.pop((dst, slot), None)
                else:
                    self.slots[dst, slot] = value

    def verify_index(self) -> None:
        """Every hashed block holds exactly the tokens its hash names."""
        bs = self.blocks.block_size
        for h, block in self.blocks.cached.items():
            salt, prefix = self.slots[block, bs - 1]
            assert len(prefix) % bs == 0 and block_hashes(prefix, bs, salt)[-1] == h, f"block {block} hash is stale"
            for slot in range(bs):
                assert self.slots[block, slot] == (salt, prefix[: len(prefix) - bs + slot + 1])


def computed(bm: BlockManager, token_ids: list[int], salt: str | None = None) -> SequenceKV:
    """A sequence that looked up its prefix, then computed and committed all of token_ids."""
    seq = SequenceKV()
    bm.match_prefix(seq, token_ids, salt)
    bm.allocate(seq, len(token_ids))
    seq.length = len(token_ids)
    bm.commit(seq, token_ids, salt)
    return seq


# ---------------------------------------------------------------------------------------------- sizes, allocation

@pytest.mark.parametrize("num_blocks,block_size", [(0, 4), (4, 0), (-1, 4)])
def test_rejects_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError, match=f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}"):
        BlockManager(num_blocks, block_size)


def test_sizes():
    bm = BlockManager(8, 4)
    assert [bm.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    seq = SequenceKV()
    assert bm.blocks_needed(seq, 9) == 3
    bm.allocate(seq, 9)
    assert seq.blocks == [0, 1, 2] and seq.length == 0  # allocation reserves; the forward advances the length
    assert (bm.num_free, bm.num_used) == (5, 3)
    assert bm.blocks_needed(seq, 12) == 0 and bm.blocks_needed(seq, 4) == 0 and bm.blocks_needed(seq, 13) == 1
    bm.allocate(seq, 12)  # has them: a no-op
    assert seq.blocks == [0, 1, 2]
    assert bm.can_allocate(seq, 32) and not bm.can_allocate(seq, 33)
    bm.check([seq])


def test_allocate_is_all_or_nothing():
    bm = BlockManager(4, 4)
    a, b = SequenceKV(), SequenceKV()
    bm.allocate(a, 8)
    with pytest.raises(CacheFullError, match=r"12 tokens need 3 more KV blocks of 4; 2 of 4 are free"):
        bm.allocate(b, 12)
    assert b.blocks == [] and bm.num_free == 2
    assert issubclass(CacheFullError, ValueError)
    bm.check([a, b])


def test_free_reuses_blocks_fifo_and_empties_the_sequence():
    bm = BlockManager(4, 2, prefix_caching=False)
    a, b, c = SequenceKV(), SequenceKV(), SequenceKV()
    bm.allocate(a, 4)
    bm.allocate(b, 2)
    a.length = 3
    bm.free(a)
    assert (a.blocks, a.length, a.hashes) == ([], 0, [])
    bm.allocate(c, 6)  # the never used block first, then a's in the order they came back (last block first)
    assert (b.blocks, c.blocks) == ([2], [3, 1, 0])
    bm.check([b, c])


def test_free_twice_is_a_no_op_and_over_freeing_raises():
    bm = BlockManager(4, 2)
    a = SequenceKV()
    bm.allocate(a, 3)
    alias = SequenceKV(blocks=list(a.blocks))  # a second holder the manager never counted
    bm.free(a)
    bm.free(a)
    assert bm.num_free == 4
    with pytest.raises(RuntimeError, match="freed more often than it was taken"):
        bm.free(alias)


def test_check_detects_broken_invariants():
    bm = BlockManager(4, 2)
    a = SequenceKV()
    bm.allocate(a, 2)
    bm.check([a])
    with pytest.raises(AssertionError, match="reference counts differ"):
        bm.check([a, SequenceKV(blocks=list(a.blocks))])
    bm.free_blocks.append(a.blocks[0])
    with pytest.raises(AssertionError, match="a block in two states"):
        bm.check()
    bm.free_blocks.pop()
    bm.free_blocks.popleft()
    with pytest.raises(AssertionError, match="leaked"):
        bm.check()


# ------------------------------------------------------------------------------------------------ prefix caching

def test_block_hashes_are_chained_salted_and_cover_full_blocks_only():
    tokens = list(range(10))
    hashes = block_hashes(tokens, 4)
    assert len(hashes) == 2 and block_hashes(tokens[:8], 4) == hashes and block_hashes(tokens[:7], 4) == hashes[:1]
    other_head = block_hashes([9, 9, 9, 9, *tokens[4:8]], 4)
    assert other_head[1] != hashes[1]  # same tokens in block 1, another prefix: another block
    assert block_hashes(tokens, 4, salt="a") != hashes and block_hashes(tokens, 4, salt="a")[0] != hashes[0]
    assert block_hashes(tokens, 4, salt="") != hashes  # an empty salt is a namespace of its own, not "no salt"


def test_second_sequence_shares_the_full_blocks():
    bm = BlockManager(8, 4)
    a = computed(bm, PROMPT)
    assert len(a.hashes) == 2 and len(bm.cached) == 2  # the partial third block is not findable
    b = SequenceKV()
    assert bm.match_prefix(b, PROMPT) == 8
    assert b.blocks == a.blocks[:2] and b.length == 8 and b.hashes == a.hashes
    assert [bm.ref_count[x] for x in a.blocks] == [2, 2, 1]
    bm.allocate(b, len(PROMPT))
    assert b.blocks[2] not in a.blocks
    bm.check([a, b])


@pytest.mark.parametrize("length,expected", [(1, 0), (4, 0), (5, 4), (8, 4), (9, 8), (10, 8)])
def test_match_leaves_at_least_one_token_to_compute(length, expected):
    """The last prompt token's logits give the first sampled token, so its block is never taken from the cache."""
    bm = BlockManager(8, 4)
    a = computed(bm, PROMPT)
    b = SequenceKV()
    assert bm.match_prefix(b, PROMPT[:length]) == expected
    assert b.blocks == a.blocks[: expected // 4]
    bm.check([a, b])


def test_match_stops_at_the_first_different_block():
    bm = BlockManager(8, 4)
    a = computed(bm, PROMPT)
    b, c = SequenceKV(), SequenceKV()
    assert bm.match_prefix(b, [*PROMPT[:4], 99, 99, 99, 99, 99]) == 4
    assert bm.match_prefix(c, [99, 99, 99, 99, *PROMPT[4:]]) == 0  # block 1's tokens alone do not match
    bm.check([a, b, c])


def test_commit_hashes_blocks_as_they_fill():
    bm = BlockManager(8, 4)
    seq = SequenceKV()
    bm.allocate(seq, len(PROMPT))
    for length, hashed in [(3, 0), (4, 1), (7, 1), (9, 2), (10, 2)]:
        seq.length = length
        bm.commit(seq, PROMPT)
        assert seq.hashes == block_hashes(PROMPT, 4)[:hashed] and len(bm.cached) == hashed
    bm.check([seq])


def test_salts_separate_namespaces():
    bm = BlockManager(8, 4)
    a = computed(bm, PROMPT)
    b = SequenceKV()
    assert bm.match_prefix(b, PROMPT, salt="adapter-1") == 0
    c = computed(bm, PROMPT, salt="adapter-1")
    d = SequenceKV()
    assert bm.match_prefix(d, PROMPT, salt="adapter-1") == 8
    assert d.blocks == c.blocks[:2] and not set(d.blocks) & set(a.blocks)
    bm.check([a, b, c, d])


def test_match_prefix_needs_an_empty_sequence():
    bm = BlockManager(8, 4)
    seq = SequenceKV()
    bm.allocate(seq, 4)
    with pytest.raises(ValueError, match="needs a sequence that holds no blocks"):
        bm.match_prefix(seq, PROMPT)


def test_prefix_caching_off_shares_nothing():
    bm = BlockManager(8, 4, prefix_caching=False)
    a = computed(bm, PROMPT)
    assert a.hashes == [] and bm.cached == {}
    b = SequenceKV()
    assert bm.match_prefix(b, PROMPT) == 0 and b.blocks == []
    bm.free(a)
    assert len(bm.free_blocks) == 8 and not bm.evictable
    bm.check()


def test_duplicate_block_is_registered_once():
    """Two sequences computed the same prompt in the same steps: the first to commit owns the hash."""
    bm = BlockManager(8, 4)
    a, b = SequenceKV(), SequenceKV()
    for seq in (a, b):
        bm.allocate(seq, len(PROMPT))
        seq.length = len(PROMPT)
    bm.commit(a, PROMPT)
    bm.commit(b, PROMPT)
    assert bm.cached == dict(zip(block_hashes(PROMPT, 4), a.blocks[:2], strict=True))
    assert b.hashes == a.hashes and [bm.block_hash[x] for x in b.blocks] == [None] * 3
    bm.check([a, b])
    owners = a.blocks[:2]
    bm.free(b)  # b's copies are plain free blocks again
    assert (len(bm.free_blocks), len(bm.evictable)) == (5, 0)
    bm.free(a)
    assert len(bm.evictable) == 2
    c = SequenceKV()
    assert bm.match_prefix(c, PROMPT) == 8 and c.blocks == owners
    bm.check([c])


def test_freed_prefix_stays_findable_until_evicted_tail_first():
    bm = BlockManager(4, 4)
    a = computed(bm, PROMPT)  # blocks 0, 1 hashed; 2 partial
    bm.free(a)
    assert list(bm.free_blocks) == [3, 2] and list(bm.evictable) == [1, 0]  # the prefix's tail is evicted first
    assert (bm.num_free, bm.num_used) == (4, 0)
    b = SequenceKV()
    bm.allocate(b, 8)  # never-hashed blocks go first
    assert b.blocks == [3, 2] and len(bm.cached) == 2
    bm.allocate(b, 12)  # none left: evicts the least recently used cached block
    assert b.blocks == [3, 2, 1] and list(bm.cached.values()) == [0] and bm.block_hash[1] is None
    c = SequenceKV()
    assert bm.match_prefix(c, PROMPT) == 4 and c.blocks == [0]
    assert bm.num_free == 0 and not bm.evictable
    bm.check([b, c])


def test_eviction_is_lru_and_spares_used_blocks():
    bm = BlockManager(4, 4)
    x, y = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]  # one full block each, and a token to compute
    sx, sy = computed(bm, x), computed(bm, y)
    assert (sx.blocks, sy.blocks) == ([0, 1], [2, 3])
    bm.free(sx)
    bm.free(sy)
    z = SequenceKV()
    assert bm.match_prefix(z, x) == 4  # using x's block again makes it the most recently used
    bm.free(z)
    assert list(bm.evictable) == [2, 0]
    w = SequenceKV()
    bm.allocate(w, 12)
    assert w.blocks == [1, 3, 2]  # fresh ones, then y's block, the least recently used
    assert bm.match_prefix(SequenceKV(), y) == 0
    v = SequenceKV()
    assert bm.match_prefix(v, x) == 4 and bm.num_free == 0
    with pytest.raises(CacheFullError):  # the only cached block is in use: it cannot be evicted
        bm.allocate(SequenceKV(), 1)
    bm.check([w, v])


# ---------------------------------------------------------------------------------- truncation, copy-on-write

def test_truncate_frees_the_tail_and_keeps_hashed_blocks_findable():
    bm = BlockManager(8, 4)
    seq = computed(bm, PROMPT)  # blocks 0, 1 hashed; 2 partial
    hashes = list(seq.hashes)
    bm.truncate(seq, 4)
    assert (seq.blocks, seq.length, seq.hashes) == ([0], 4, hashes[:1])
    assert list(bm.evictable) == [1] and 2 in bm.free_blocks and bm.pending_copies == []
    other = SequenceKV()
    assert bm.match_prefix(other, PROMPT) == 8 and other.blocks == [0, 1]  # block 1 still holds its tokens
    bm.check([seq, other])
    bm.truncate(seq, 0)
    assert (seq.blocks, seq.length, seq.hashes) == ([], 0, [])
    bm.free(other)
    bm.check([])
    assert bm.num_used == 0


def test_truncate_past_the_computed_tokens_frees_reserved_blocks():
    bm = BlockManager(8, 4)
    seq = SequenceKV()
    bm.allocate(seq, 16)
    seq.length = 6
    bm.truncate(seq, 16)  # all it holds: a no-op
    assert (seq.blocks, seq.length) == ([0, 1, 2, 3], 6)
    bm.truncate(seq, 9)  # more than it computed: the length stays, the blocks past 9 tokens go
    assert (seq.blocks, seq.length, bm.num_used) == ([0, 1, 2], 6, 3)
    bm.truncate(seq, 5)
    assert (seq.blocks, seq.length, bm.pending_copies) == ([0, 1], 5, [])
    bm.check([seq])


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_truncate_into_a_private_unhashed_block_writes_in_place(prefix_caching):
    bm = BlockManager(8, 4, prefix_caching)
    seq = computed(bm, PROMPT)
    bm.truncate(seq, 9)  # block 2: partial, never hashed
    assert (seq.blocks, seq.length, bm.pending_copies) == ([0, 1, 2], 9, [])
    if not prefix_caching:  # block 1 is full but unhashed and private: no copy either
        bm.truncate(seq, 6)
        assert (seq.blocks, seq.length, bm.pending_copies) == ([0, 1], 6, [])
    bm.check([seq])


def test_truncate_into_a_hashed_block_copies_it():
    bm = BlockManager(8, 4)
    seq = computed(bm, PROMPT)
    hashes = list(seq.hashes)
    bm.truncate(seq, 6)  # into block 1: in the prefix cache, so never written again
    assert seq.blocks == [0, 3] and seq.length == 6 and seq.hashes == hashes[:1]
    assert bm.pending_copies == [(1, 3)] and bm.block_hash[1] == hashes[1] and bm.cached[hashes[1]] == 1
    assert bm.ref_count[1] == 1 and 1 not in bm.evictable  # the copy's reference: not reusable until it ran
    bm.check([seq])
    with pytest.raises(AssertionError, match="reference counts differ"):  # the copy's reference is counted
        bm.check([seq, SequenceKV(blocks=[1])])
    assert bm.take_copies() == [(1, 3)] and bm.pending_copies == [] and bm.take_copies() == []
    bm.check([seq])
    bm.release_copies([(1, 3)])
    assert bm.ref_count[1] == 0 and list(bm.evictable) == [1]
    bm.check([seq])
    other = SequenceKV()
    assert bm.match_prefix(other, PROMPT) == 8 and other.blocks == [0, 1]
    bm.check([seq, other])


def test_truncate_into_a_shared_block_copies_it_once_per_writer():
    bm = BlockManager(8, 4)
    a = computed(bm, PROMPT)
    b = SequenceKV()
    bm.match_prefix(b, PROMPT)  # shares blocks 0 and 1 with a
    bm.truncate(b, 5)
    assert a.blocks == [0, 1, 2] and b.blocks == [0, 3] and bm.pending_copies == [(1, 3)]
    assert [bm.ref_count[x] for x in (0, 1, 2, 3)] == [2, 2, 1, 1]  # block 1: a and the copy
    bm.truncate(a, 7)
    assert a.blocks == [0, 4] and bm.pending_copies == [(1, 3), (1, 4)] and bm.ref_count[1] == 2
    bm.truncate(a, 4)  # its copy's destination goes: the copy is dropped, and its source let go
    assert a.blocks == [0] and bm.pending_copies == [(1, 3)] and bm.ref_count[1] == 1
    bm.check([a, b])
    bm.free(b)
    assert bm.pending_copies == [] and bm.ref_count[1] == 0 and 1 in bm.evictable
    bm.free(a)
    bm.check([])
    assert bm.num_used == 0


def test_truncate_at_a_block_boundary_copies_nothing():
    bm = BlockManager(8, 4)
    a = computed(bm, PROMPT)
    b = SequenceKV()
    bm.match_prefix(b, PROMPT)
    bm.truncate(b, 4)  # block 0 is kept whole: b writes its next tokens into a block of its own
    assert b.blocks == [0] and b.hashes == a.hashes[:1] and bm.pending_copies == []
    bm.check([a, b])


def test_truncate_rejects_bad_lengths_and_is_all_or_nothing():
    bm = BlockManager(2, 4)
    seq = computed(bm, PROMPT[:8])  # both blocks, hashed
    for tokens in (-1, 9):
        with pytest.raises(ValueError, match=f"cannot truncate a sequence holding 2 blocks of 4 to {tokens} tokens"):
            bm.truncate(seq, tokens)
    with pytest.raises(CacheFullError, match="needs a KV block for a copy of block 1"):
        bm.truncate(seq, 6)
    assert (seq.blocks, seq.length, len(seq.hashes), bm.pending_copies) == ([0, 1], 8, 2, [])
    bm.check([seq])
    bm.truncate(seq, 2)  # block 1 goes (to the cache), and block 0's copy evicts it: the only block left
    assert seq.blocks == [1] and bm.pending_copies == [(0, 1)] and bm.block_hash[1] is None
    bm.check([seq])


def test_commit_upto_keeps_unverified_tokens_out_of_the_cache():
    bm = BlockManager(8, 4)
    seq = SequenceKV()
    bm.allocate(seq, len(PROMPT))
    seq.length = 10  # the last 5 tokens are drafts
    bm.commit(seq, PROMPT, upto=5)
    assert seq.hashes == block_hashes(PROMPT, 4)[:1] and len(bm.cached) == 1
    bm.commit(seq, PROMPT, upto=3)  # never takes back what was committed
    assert len(seq.hashes) == 1
    bm.commit(seq, PROMPT, upto=20)  # no further than the computed tokens
    assert seq.hashes == block_hashes(PROMPT, 4) and len(bm.cached) == 2
    bm.check([seq])


def test_release_copies_only_once_and_only_taken_ones():
    bm = BlockManager(8, 4)
    seq = computed(bm, PROMPT)
    bm.truncate(seq, 6)
    with pytest.raises(ValueError, match=r"block copy \(1, 3\) was not taken, or was released already"):
        bm.release_copies([(1, 3)])  # pending, not taken
    copies = bm.take_copies()
    with pytest.raises(ValueError, match="was not taken"):
        bm.release_copies([*copies, *copies])  # all or nothing: nothing released
    assert bm.ref_count[1] == 1
    bm.release_copies(copies)
    with pytest.raises(ValueError, match="released already"):
        bm.release_copies(copies)
    bm.release_copies([])
    bm.check([seq])


# ------------------------------------------------------------------------------------------------- properties

BASES = ([1, 2, 3, 1, 2, 3, 1, 2, 3, 4, 5, 6], [7, 7, 7, 7, 8, 8, 8, 8, 9, 9, 9, 9])


@st.composite
def prompts(draw) -> list[int]:
    """Prompts that often share a prefix (so the cache hits), sometimes not."""
    base = draw(st.sampled_from(BASES))[: draw(st.integers(0, len(BASES[0])))]
    return base + draw(st.lists(st.integers(0, 3), min_size=0 if base else 1, max_size=4))


@dataclass
class Tracked:
    """A sequence of the state machine: its KV, its tokens, and how many of those are verified (the rest are draft
    tokens, which may be rejected: only verified tokens may ever enter the prefix cache)."""

    kv: SequenceKV
    token_ids: list[int]
    salt: str | None
    verified: int


class BlockManagerMachine(RuleBasedStateMachine):
    """Sequences look up their prefix, compute chunks (writing the KV model), grow by decoded or draft tokens, accept
    drafts, are truncated anywhere (into shared and hashed blocks too), commit and free, and block copies are taken
    (run on the KV model) and released, in any order. The manager's invariants, every sequence's KV contents and the
    reference counts (holders plus copies) hold throughout; the prefix cache holds only verified tokens, and never
    serves a block whose contents differ from the tokens asked for, in particular tokens that were truncated away."""

    @initialize(num_blocks=st.integers(1, 10), block_size=st.integers(1, 4), prefix_caching=st.booleans(),
                first=st.lists(prompts(), max_size=2))
    def setup(self, num_blocks, block_size, prefix_caching, first):
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.kv = KVContents(self.bm)
        self.seqs: list[Tracked] = []
        self.taken_copies: list[tuple[int, int]] = []  # taken (and run on the KV model), not released
        self.verified: set[tuple[str | None, tuple[int, ...]]] = set()  # every verified token prefix of full blocks
        self.cut: list[tuple[str | None, list[int], list[int]]] = []  # truncations: (salt, tokens before, after)
        for token_ids in first:  # computed and committed sequences to begin with: more sharing, sooner
            self.new_sequence(token_ids, None, compute=True)

    def track(self, seq: Tracked) -> None:
        bs = self.bm.block_size
        self.verified.update((seq.salt, tuple(seq.token_ids[: k * bs])) for k in range(1, seq.verified // bs + 1))

    def forward(self, seq: Tracked, n: int) -> bool:
        """Store seq's next n tokens, as a step does: blocks, then the pending copies, then the forward's writes."""
        blocks, free = list(seq.kv.blocks), self.bm.num_free
        if not self.bm.can_allocate(seq.kv, seq.kv.length + n):
            with pytest.raises(CacheFullError):
                self.bm.allocate(seq.kv, seq.kv.length + n)
            assert seq.kv.blocks == blocks and self.bm.num_free == free
            return False
        self.bm.allocate(seq.kv, seq.kv.length + n)
        self.take_copies()
        self.kv.write(seq.kv, seq.token_ids, seq.salt, seq.kv.length, n)
        seq.kv.length += n
        self.bm.commit(seq.kv, seq.token_ids, seq.salt, upto=seq.verified)
        return True

    def new(self, token_ids: list[int], salt: str | None) -> Tracked:
        seq = Tracked(SequenceKV(), token_ids, salt, len(token_ids))
        free = self.bm.num_free
        cached = self.bm.match_prefix(seq.kv, token_ids, salt)
        bs = self.bm.block_size
        assert cached == seq.kv.length == len(seq.kv.blocks) * bs and cached < max(1, len(token_ids))
        assert cached == 0 or self.bm.prefix_caching
        assert self.bm.num_free == free - sum(self.bm.ref_count[b] == 1 for b in seq.kv.blocks)  # revived ones
        for i, block in enumerate(seq.kv.blocks):  # what the cache serves is what was asked for
            for slot in range(bs):
                assert self.kv.slots.get((block, slot)) == (salt, tuple(token_ids[: i * bs + slot + 1])), \
                    f"block {block} served for {token_ids[: (i + 1) * bs]} holds other tokens"
        self.track(seq)
        return seq

    @rule(token_ids=prompts(), salt=st.sampled_from([None, "a"]), compute=st.booleans())
    def new_sequence(self, token_ids, salt, compute):
        seq = self.new(token_ids, salt)
        self.seqs.append(seq)
        if compute:
            self.forward(seq, len(token_ids) - seq.kv.length)

    @precondition(lambda self: self.cut)
    @rule(i=st.integers(0, 99), kept=st.booleans(), keep=st.booleans())
    def ask_again(self, i, kept, keep):
        """A new sequence asks for the tokens a truncation cut away, or for those it kept."""
        salt, before, after = self.cut[i % len(self.cut)]
        seq = self.new(list(after if kept else before), salt)
        if keep:
            self.seqs.append(seq)
        else:
            self.bm.free(seq.kv)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99), n=st.integers(1, 6), decoded=st.integers(0, 3))
    def compute(self, i, n, decoded):
        seq = self.seqs[i % len(self.seqs)]
        if seq.kv.length == len(seq.token_ids):
            if seq.verified == len(seq.token_ids):  # a sampled token is verified, unless it follows drafts
                seq.verified += 1
            seq.token_ids.append(decoded)
        self.forward(seq, min(n, len(seq.token_ids) - seq.kv.length))
        self.track(seq)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99), drafts=st.lists(st.integers(0, 3), min_size=1, max_size=5))
    def draft(self, i, drafts):
        """Draft tokens: stored with the tokens before them, but not verified, so not committed."""
        seq = self.seqs[i % len(self.seqs)]
        seq.token_ids += drafts
        if not self.forward(seq, len(seq.token_ids) - seq.kv.length):
            del seq.token_ids[-len(drafts) :]

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99), m=st.integers(0, 5))
    def accept(self, i, m):
        """The next m tokens are verified: their full, computed blocks enter the cache."""
        seq = self.seqs[i % len(self.seqs)]
        seq.verified = min(seq.verified + m, len(seq.token_ids))
        self.bm.commit(seq.kv, seq.token_ids, seq.salt, upto=seq.verified)
        self.track(seq)

    @precondition(lambda self: any(seq.kv.blocks for seq in self.seqs))
    @rule(i=st.integers(0, 99), block=st.integers(0, 99), offset=st.integers(0, 4))
    def truncate(self, i, block, offset):
        seq = [seq for seq in self.seqs if seq.kv.blocks][i % sum(bool(seq.kv.blocks) for seq in self.seqs)]
        kv, bs = seq.kv, self.bm.block_size
        tokens = block % len(kv.blocks) * bs + offset % (bs + 1)  # mostly into a block: a shared or hashed one too
        before = (list(kv.blocks), kv.length, list(kv.hashes), list(self.bm.pending_copies), self.bm.num_free)
        cached, hashed = dict(self.bm.cached), list(self.bm.block_hash)
        keep = self.bm.blocks_for(tokens)
        last = kv.blocks[keep - 1] if tokens % bs else None
        cow = last is not None and (self.bm.ref_count[last] > 1 or self.bm.block_hash[last] is not None)
        if cow and self.bm.num_free + sum(self.bm.ref_count[b] == 1 for b in kv.blocks[keep:]) == 0:
            with pytest.raises(CacheFullError):
                self.bm.truncate(kv, tokens)
            assert (kv.blocks, kv.length, kv.hashes, self.bm.pending_copies, self.bm.num_free) == before
            return
        self.bm.truncate(kv, tokens)
        blocks, length, hashes, _, _ = before
        assert kv.length == min(length, tokens) and kv.hashes == hashes[: tokens // bs]
        if cow:
            assert kv.blocks[:-1] == blocks[: keep - 1] and kv.blocks[-1] not in blocks[:keep]  # maybe a freed one
            assert self.bm.pending_copies[-1] == (last, kv.blocks[-1])
        else:
            assert kv.blocks == blocks[:keep]
        # what was findable stays findable, but for a cached block the copy took (evicted)
        lost = {h for h, b in cached.items() if self.bm.cached.get(h) != b}
        assert not lost or (cow and lost == {hashed[kv.blocks[-1]]}), "truncate dropped cached blocks"
        if tokens < length:  # computed tokens were cut away: ask for them again later
            self.cut.append((seq.salt, list(seq.token_ids), seq.token_ids[:tokens]))
        del seq.token_ids[tokens:]
        seq.verified = min(seq.verified, tokens)

    @rule()
    def take_copies(self):
        copies = self.bm.take_copies()
        self.kv.copy(copies)
        self.taken_copies += copies

    @precondition(lambda self: self.taken_copies)
    @rule(n=st.integers(1, 4))
    def release_copies(self, n):
        copies, self.taken_copies = self.taken_copies[:n], self.taken_copies[n:]
        self.bm.release_copies(copies)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99))
    def free(self, i):
        seq = self.seqs.pop(i % len(self.seqs))
        self.bm.free(seq.kv)
        assert seq.kv.blocks == [] and seq.kv.length == 0

    @invariant()
    def consistent(self):
        # an empty holder when there are none, so that check() still compares the reference counts (all 0)
        bm, bs = self.bm, self.bm.block_size
        bm.check([seq.kv for seq in self.seqs])
        # reference counts, counted here too: holders, plus a reference per copy that still has to read its source
        refs = [0] * bm.num_blocks
        for block in [b for seq in self.seqs for b in seq.kv.blocks]:
            refs[block] += 1
        for src, _ in [*bm.pending_copies, *self.taken_copies]:
            refs[src] += 1
        assert refs == bm.ref_count and bm.num_used == sum(r > 0 for r in refs)
        for seq in self.seqs:
            self.kv.verify(seq.kv, seq.token_ids, seq.salt)
            # the hashes of its computed, verified full blocks: none of a block cut away or rewritten since
            committed = seq.token_ids[: min(seq.kv.length, seq.verified)] if bm.prefix_caching else []
            assert seq.kv.hashes == block_hashes(committed, bs, seq.salt), "stale hashes"
        self.kv.verify_index()
        for block in bm.cached.values():  # only verified tokens: no draft token, nor one cut away since
            salt, prefix = self.kv.slots[block, bs - 1]
            assert (salt, prefix) in self.verified, f"block {block} holds unverified tokens {prefix}"
        if not bm.prefix_caching:
            assert not bm.cached and max(bm.ref_count) <= 1 and not bm.pending_copies and not self.taken_copies

    def teardown(self):
        self.take_copies()
        self.bm.release_copies(self.taken_copies)
        for seq in self.seqs:
            self.bm.free(seq.kv)
        self.bm.check([])
        assert self.bm.num_used == 0 and self.bm.num_free == self.bm.num_blocks


BlockManagerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_block_manager_properties = BlockManagerMachine.TestCase
