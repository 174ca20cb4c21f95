"""The KV block manager: which cache blocks each sequence holds, reference counts, and prefix caching. Plain Python.

    bm = BlockManager(num_blocks=256, block_size=16, prefix_caching=True)
    seq = SequenceKV()
    cached = bm.match_prefix(seq, prompt_ids)     # full blocks another sequence already computed: shared, not copied
    bm.allocate(seq, len(prompt_ids))             # blocks for the rest (CacheFullError when too few are free)
    ...                                           # the forward stores K/V; seq.length moves on
    bm.commit(seq, prompt_ids)                    # its full blocks become findable by their tokens' hash
    bm.free(seq)                                  # references dropped; hashed blocks stay findable until reused

A block holds `block_size` consecutive tokens of one sequence. A full block's identity for prefix caching is the
hash of its tokens chained with the hash of every block before it (and a salt: requests that must not share cache,
e.g. different LoRA adapters, pass different salts), so a match of block i implies the whole prefix matches.
Hashes are SHA-256: Python's hash() of a tuple is not collision-resistant, and a collision would hand one request
another's keys and values.

Every block is in exactly one state: free (unused, no hash), cached (no user, hash kept, reusable by a prefix match,
evicted least recently used first when fresh blocks run out), or used (ref_count > 0). `check()` asserts that.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field


class CacheFullError(ValueError):
    """Not enough free blocks for a reservation."""


@dataclass
class SequenceKV:
    """One sequence's place in the cache: its blocks in token order and how many tokens are stored."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0
    hashes: list[bytes] = field(default_factory=list)  # chained hashes of its first full blocks (prefix caching)


def root_hash(salt: str | None) -> bytes:
    """The parent of a sequence's first block: no salt and every salt (even "") are different namespaces."""
    return hashlib.sha256(b"realm-kv" if salt is None else b"realm-kv:" + salt.encode()).digest()


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """A block's hash: its token ids chained to the hash of everything before it."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str | None = None) -> list[bytes]:
    """The chained hash of each full block of token_ids (a trailing partial block has none)."""
    parent, out = root_hash(salt), []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_hash(parent, token_ids[start : start + block_size])
        out.append(parent)
    return out


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))  # unused and unhashed
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unused but hashed: oldest use first
        self.cached: dict[bytes, int] = {}  # hash -> block

    # --------------------------------------------------------------------------------------------------- sizes

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: unused ones, hashed or not."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def blocks_needed(self, seq: SequenceKV, tokens: int) -> int:
        """More blocks seq needs to hold `tokens` tokens in all."""
        return max(0, self.blocks_for(tokens) - len(seq.blocks))

    def can_allocate(self, seq: SequenceKV, tokens: int) -> bool:
        return self.blocks_needed(seq, tokens) <= self.num_free

    # ------------------------------------------------------------------------------------------ allocate, free

    def allocate(self, seq: SequenceKV, tokens: int) -> None:
        """Give seq enough blocks to hold `tokens` tokens in all (a no-op when it has them); all or nothing."""
        need = self.blocks_needed(seq, tokens)
        if need > self.num_free:
            raise CacheFullError(f"{tokens} tokens need {need} more KV blocks of {self.block_size}; "
                                 f"{self.num_free} of {self.num_blocks} are free")
        for _ in range(need):
            seq.blocks.append(self._take())

    def _take(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:  # evict the least recently used cached block: its hash no longer finds it
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
        self.ref_count[block] = 1
        return block

    def free(self, seq: SequenceKV) -> None:
        """Drop seq's references (last block first, so a prefix's head is evicted last); seq becomes empty."""
        for block in reversed(seq.blocks):
            self.ref_count[block] -= 1
            if self.ref_count[block] < 0:
                raise RuntimeError(f"block {block} freed more often than it was taken")
            if self.ref_count[block] == 0:
                if self.block_hash[block] is None:
                    self.free_blocks.append(block)
                else:
                    self.evictable[block] = None
        seq.blocks.clear()
        seq.hashes.clear()
        seq.length = 0

    # ------------------------------------------------------------------------------------------ prefix caching

    def match_prefix(self, seq: SequenceKV, token_ids: Sequence[int], salt: str | None = None) -> int:
        """For an empty seq: share the cached blocks of token_ids' longest cached prefix of full blocks, leaving at
        least one token to compute (its logits are what the next token is sampled from). Returns the tokens found,
        now seq.length."""
        if seq.blocks or seq.length:
            raise ValueError("match_prefix needs a sequence that holds no blocks")
        if not self.prefix_caching:
            return 0
        usable = (len(token_ids) - 1) // self.block_size  # full blocks before the last token
        for h in block_hashes(token_ids[: usable * self.block_size], self.block_size, salt):
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref_count[block] == 0:
                del self.evictable[block]
            self.ref_count[block] += 1
            seq.blocks.append(block)
            seq.hashes.append(h)
        seq.length = len(seq.blocks) * self.block_size
        return seq.length

    def commit(self, seq: SequenceKV, token_ids: Sequence[int], salt: str | None = None) -> None:
        """Make seq's full, computed blocks findable by hash (token_ids: at least its seq.length tokens)."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.hashes), seq.length // bs):  # full blocks not looked at yet
            h = chain_hash(seq.hashes[-1] if seq.hashes else root_hash(salt), token_ids[i * bs : (i + 1) * bs])
            seq.hashes.append(h)
            block = seq.blocks[i]
            if self.block_hash[block] is None and h not in self.cached:  # else another block holds these tokens
                self.block_hash[block] = h
                self.cached[h] = block

    # ------------------------------------------------------------------------------------------------- checks

    def check(self, sequences: Sequence[SequenceKV] | None = None) -> None:
        """Assert the invariants (tests, debugging): every block in exactly one state; with `sequences` (all that
        hold blocks; [] when none should), reference counts equal the number of holders."""
        free, evictable = set(self.free_blocks), set(self.evictable)
        used = {b for b in range(self.num_blocks) if self.ref_count[b] > 0}
        assert len(free) == len(self.free_blocks), "a block is twice in the free list"
        assert not (free & evictable) and not (free & used) and not (evictable & used), "a block in two states"
        assert len(free) + len(evictable) + len(used) == self.num_blocks, "a block in no state (leaked)"
        assert all(self.block_hash[b] is None for b in free), "a free block kept its hash"
        assert all(self.block_hash[b] is not None for b in evictable), "an evictable block has no hash"
        assert {b: h for h, b in self.cached.items()} == {b: h for b, h in enumerate(self.block_hash)
                                                           if h is not None}, "hash index out of sync"
        if sequences is not None:
            held = [0] * self.num_blocks
            for seq in sequences:
                for b in seq.blocks:
                    held[b] += 1
            assert held == self.ref_count, "reference counts differ from the sequences holding the blocks"
