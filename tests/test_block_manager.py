"""The KV block manager alone (plain Python, no torch): sizes, allocation, reference counts, prefix caching, eviction,
and a property test that random allocations, computations, commits and frees never leak or hand out wrong KV."""

from __future__ import annotations

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
        """The sequence's computed tokens are in its blocks."""
        bs = self.blocks.block_size
        for p in range(kv.length):
            assert self.slots.get((kv.blocks[p // bs], p % bs)) == (salt, tuple(token_ids[: p + 1])), \
                f"position {p} in block {kv.blocks[p // bs]} holds another sequence's KV"

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


# ------------------------------------------------------------------------------------------------- properties

BASES = ([1, 2, 3, 1, 2, 3, 1, 2, 3, 4, 5, 6], [7, 7, 7, 7, 8, 8, 8, 8, 9, 9, 9, 9])


@st.composite
def prompts(draw) -> list[int]:
    """Prompts that often share a prefix (so the cache hits), sometimes not."""
    base = draw(st.sampled_from(BASES))[: draw(st.integers(0, len(BASES[0])))]
    return base + draw(st.lists(st.integers(0, 3), min_size=0 if base else 1, max_size=4))


class BlockManagerMachine(RuleBasedStateMachine):
    """Sequences look up their prefix, compute chunks (writing the KV model), grow by decoded tokens, commit and
    free, in any order; the manager's invariants and every sequence's KV contents hold throughout."""

    @initialize(num_blocks=st.integers(1, 10), block_size=st.integers(1, 4), prefix_caching=st.booleans())
    def setup(self, num_blocks, block_size, prefix_caching):
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.kv = KVContents(self.bm)
        self.seqs: list[tuple[SequenceKV, list[int], str | None]] = []

    @rule(token_ids=prompts(), salt=st.sampled_from([None, "a"]))
    def new_sequence(self, token_ids, salt):
        seq = SequenceKV()
        free = self.bm.num_free
        cached = self.bm.match_prefix(seq, token_ids, salt)
        bs = self.bm.block_size
        assert cached == seq.length == len(seq.blocks) * bs and cached < len(token_ids)
        assert cached == 0 or self.bm.prefix_caching
        assert self.bm.num_free == free - sum(self.bm.ref_count[b] == 1 for b in seq.blocks)  # revived ones
        self.seqs.append((seq, token_ids, salt))

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99), n=st.integers(1, 6), decoded=st.integers(0, 3))
    def compute(self, i, n, decoded):
        seq, token_ids, salt = self.seqs[i % len(self.seqs)]
        if seq.length == len(token_ids):
            token_ids.append(decoded)
        n = min(n, len(token_ids) - seq.length)
        blocks, free = list(seq.blocks), self.bm.num_free
        if not self.bm.can_allocate(seq, seq.length + n):
            with pytest.raises(CacheFullError):
                self.bm.allocate(seq, seq.length + n)
            assert seq.blocks == blocks and self.bm.num_free == free
            return
        self.bm.allocate(seq, seq.length + n)
        self.kv.write(seq, token_ids, salt, seq.length, n)
        seq.length += n
        self.bm.commit(seq, token_ids, salt)
        assert len(seq.hashes) == (seq.length // self.bm.block_size if self.bm.prefix_caching else 0)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99))
    def free(self, i):
        seq, _, _ = self.seqs.pop(i % len(self.seqs))
        self.bm.free(seq)
        assert seq.blocks == [] and seq.length == 0

    @invariant()
    def consistent(self):
        # an empty holder when there are none, so that check() still compares the reference counts (all 0)
        self.bm.check([seq for seq, _, _ in self.seqs])
        held = {b for seq, _, _ in self.seqs for b in seq.blocks}
        assert self.bm.num_used == len(held)
        for seq, token_ids, salt in self.seqs:
            self.kv.verify(seq, token_ids, salt)
        self.kv.verify_index()
        if not self.bm.prefix_caching:
            assert not self.bm.cached and max(self.bm.ref_count) <= 1

    def teardown(self):
        for seq, _, _ in self.seqs:
            self.bm.free(seq)
        self.bm.check()
        assert self.bm.num_used == 0 and self.bm.num_free == self.bm.num_blocks


BlockManagerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_block_manager_properties = BlockManagerMachine.TestCase
