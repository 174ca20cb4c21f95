"""The KV block manager: which cache blocks each sequence holds, reference counts, and prefix caching. Plain Python.

    bm = BlockManager(num_blocks=256, block_size=16, prefix_caching=True)
    seq = SequenceKV()
    cached = bm.match_prefix(seq, prompt_ids)     # full blocks another sequence already computed: shared, not copied
    bm.allocate(seq, len(prompt_ids))             # blocks for the rest (CacheFullError when too few are free)
    ...                                           # the forward stores K/V; seq.length moves on
    bm.commit(seq, prompt_ids)                    # its full blocks become findable by their tokens' hash
    bm.allocate(seq, len(token_ids))              # speculative decoding: draft tokens' K/V stored with the rest...
    bm.commit(seq, token_ids, upto=verified)      # ...but only verified tokens' blocks become findable
    bm.truncate(seq, verified)                    # the rejected drafts' tail dropped (a block to write is copied)
    copies = bm.take_copies()                     # (src, dst) block copies, run before the next forward
    bm.release_copies(copies)                     # once run: the source blocks may be reused
    bm.free(seq)                                  # references dropped; hashed blocks stay findable until reused

A block holds `block_size` consecutive tokens of one sequence. A full block's identity for prefix caching is the
hash of its tokens chained with the hash of every block before it (and a salt: requests that must not share cache,
e.g. different LoRA adapters, pass different salts), so a match of block i implies the whole prefix matches.
Hashes are SHA-256: Python's hash() of a tuple is not collision-resistant, and a collision would hand one request
another's keys and values.

Copy-on-write: a block that is shared or in the prefix cache is never written; its writer gets a copy. Only
truncation makes a sequence's last block partial again; when that block is shared or hashed, truncate() gives the
sequence a fresh block and records a copy (src, dst) for the model runner to run before the next forward. The source
keeps a reference for the copy until release_copies(), so it is neither reused nor evicted while it is read.

Every block is in exactly one state: free (unused, no hash), cached (no user, hash kept, reusable by a prefix match,
evicted least recently used first when fresh blocks run out), or used (ref_count > 0: its holders plus the copies
reading it). `check()` asserts that.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict, deque
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
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) recorded by truncate(), not taken yet
        self.taken_copies: Counter[tuple[int, int]] = Counter()  # taken, not released yet

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
            self._unref(block)
        seq.blocks.clear()
        seq.hashes.clear()
        seq.length = 0

    def _unref(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] < 0:
            raise RuntimeError(f"block {block} freed more often than it was taken")
        if self.ref_count[block] == 0:
            if self.block_hash[block] is None:
                self.free_blocks.append(block)
            else:
                self.evictable[block] = None
            if self.pending_copies:  # a copy into a block nobody holds is dropped, so a batch never repeats a dst
                dropped = [c for c in self.pending_copies if c[1] == block]
                if dropped:
                    self.pending_copies = [c for c in self.pending_copies if c[1] != block]
                    for src, _ in dropped:
                        self._unref(src)

    # ---------------------------------------------------------------------------------------------- truncation

    def truncate(self, seq: SequenceKV, tokens: int) -> None:
        """seq keeps its first `tokens` tokens (speculative decoding: the rejected drafts go). Blocks past them lose
        seq's reference (a hashed one still matches its hash, so it stays findable); seq.length and seq.hashes
        shrink to what remains (a hash only for blocks wholly kept). All or nothing.

        A block that is shared or in the prefix cache is never written; its writer gets a copy: when the new last
        block is partial and shared or hashed, seq gets a fresh block in its place and a pending copy (src, dst)
        is recorded (take_copies); seq's reference to src passes to the copy until release_copies."""
        bs = self.block_size
        if not 0 <= tokens <= len(seq.blocks) * bs:
            raise ValueError(f"cannot truncate a sequence holding {len(seq.blocks)} blocks of {bs} to {tokens} tokens")
        keep = self.blocks_for(tokens)
        tail = seq.blocks[keep:]
        last = seq.blocks[keep - 1] if tokens % bs else None
        cow = last is not None and (self.ref_count[last] > 1 or self.block_hash[last] is not None)
        if cow and self.num_free + sum(self.ref_count[b] == 1 for b in tail) == 0:
            raise CacheFullError(f"truncating to {tokens} tokens needs a KV block for a copy of block {last} (shared "
                                 f"or cached); none of {self.num_blocks} is free")
        for block in reversed(tail):
            self._unref(block)
        del seq.blocks[keep:]
        del seq.hashes[tokens // bs :]
        seq.length = min(seq.length, tokens)
        if cow:
            seq.blocks[-1] = self._take()
            self.pending_copies.append((last, seq.blocks[-1]))

    def take_copies(self) -> list[tuple[int, int]]:
        """The pending block copies (src, dst), now handed to the model runner: it copies every row of src into dst
        (rows past the sequence's kept tokens are rewritten before they are read) before the next forward, then
        calls release_copies. The dsts are distinct and none is a src, so one batched copy runs them all."""
        copies, self.pending_copies = self.pending_copies, []
        self.taken_copies.update(copies)
        return copies

    def release_copies(self, copies: Sequence[tuple[int, int]]) -> None:
        """The copies have run: their sources lose the reference that kept them for the copy. All or nothing."""
        if not copies:  # most steps
            return
        for copy, n in Counter(copies).items():
            if self.taken_copies[copy] < n:
                raise ValueError(f"block copy {copy} was not taken, or was released already")
        self.taken_copies.subtract(copies)
        self.taken_copies = +self.taken_copies  # drop the zeros
        for src, _ in copies:
            self._unref(src)

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

    def commit(self, seq: SequenceKV, token_ids: Sequence[int], salt: str | None = None,
               upto: int | None = None) -> None:
        """Make seq's full, computed blocks within its first `upto` tokens (None: all seq.length of them) findable
        by hash (token_ids: at least that many tokens). Only verified tokens enter the prefix cache: a caller that
        stored draft tokens commits up to the last verified one."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        tokens = seq.length if upto is None else min(seq.length, upto)
        for i in range(len(seq.hashes), tokens // bs):  # full blocks not looked at yet
            h = chain_hash(seq.hashes[-1] if seq.hashes else root_hash(salt), token_ids[i * bs : (i + 1) * bs])
            seq.hashes.append(h)
            block = seq.blocks[i]
            if self.block_hash[block] is None and h not in self.cached:  # else another block holds these tokens
                self.block_hash[block] = h
                self.cached[h] = block

    # ------------------------------------------------------------------------------------------------- checks

    def check(self, sequences: Sequence[SequenceKV] | None = None) -> None:
        """Assert the invariants (tests, debugging): every block in exactly one state; with `sequences` (all that
        hold blocks; [] when none should), reference counts equal the number of holders plus of copies reading
        the block (pending or running)."""
        free, evictable = set(self.free_blocks), set(self.evictable)
        used = {b for b in range(self.num_blocks) if self.ref_count[b] > 0}
        assert len(free) == len(self.free_blocks), "a block is twice in the free list"
        assert not (free & evictable) and not (free & used) and not (evictable & used), "a block in two states"
        assert len(free) + len(evictable) + len(used) == self.num_blocks, "a block in no state (leaked)"
        assert all(self.block_hash[b] is None for b in free), "a free block kept its hash"
        assert all(self.block_hash[b] is not None for b in evictable), "an evictable block has no hash"
        assert {b: h for h, b in self.cached.items()} == {b: h for b, h in enumerate(self.block_hash)
                                                           if h is not None}, "hash index out of sync"
        assert all(self.ref_count[b] <= 1 or self.block_hash[b] is not None for b in used), \
            "a shared block has no hash"  # blocks are shared by prefix matches only
        copies = [*self.pending_copies, *self.taken_copies.elements()]
        assert all(self.ref_count[src] > 0 for src, _ in copies), "a copy reads an unused block"
        dsts = [dst for _, dst in self.pending_copies]
        assert len(set(dsts)) == len(dsts), "two pending copies write one block"
        assert not set(dsts) & {src for src, _ in self.pending_copies}, "a pending copy reads another's destination"
        assert all(self.ref_count[d] > 0 and self.block_hash[d] is None for d in dsts), \
            "a pending copy writes a free or hashed block"
        if sequences is not None:
            held = [0] * self.num_blocks
            for src, _ in copies:
                held[src] += 1
            for seq in sequences:
                for b in seq.blocks:
                    held[b] += 1
            assert held == self.ref_count, "reference counts differ from the sequences and copies holding the blocks"
