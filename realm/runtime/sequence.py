"""A sequence's state in the engine: its tokens (prompt, then generated), its place in the KV cache, its status.
Plain Python: the scheduler and block manager never touch tensors.

    seq = Sequence(seq_id=7, token_ids=[1, 2, 3], max_tokens=16)
    seq.remaining          # 3: tokens not yet in the KV cache (computed by the next forward steps)
    seq.append(42)         # a sampled token; it enters the cache in the next step
    seq.truncate(4)        # drop the tokens past the 4th (rejected draft tokens); Scheduler.truncate drops their KV
    seq.propose([7, 8])    # speculative decoding: proposals after the last token, run with it and verified
    seq.drop_proposals()   # the proposals not (or no longer) scheduled go

`seq_id` is the arrival order: the scheduler serves older sequences first, preempts the newest, and resumes the
preempted in arrival order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .block_manager import SequenceKV


class SequenceStatus(str, enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its KV dropped, to be recomputed)
    RUNNING = "running"  # holds KV blocks; gets a chunk in steps while the token budget lasts
    FINISHED = "finished"  # done or cancelled; holds nothing


@dataclass(eq=False)
class Sequence:
    seq_id: int
    token_ids: list[int]  # the prompt, then the generated tokens
    max_tokens: int  # generated tokens at most
    salt: str | None = None  # prefix-cache namespace: sequences with different salts never share KV blocks
    adapter: str | None = None  # its LoRA adapter's name (the scheduler limits distinct adapters per step)
    num_prompt_tokens: int = -1  # set from token_ids at creation
    kv: SequenceKV = field(default_factory=SequenceKV)
    status: SequenceStatus = SequenceStatus.WAITING
    num_cached_tokens: int = 0  # tokens found in the prefix cache at its (last) admission
    num_preemptions: int = 0
    num_draft: int = 0  # trailing tokens that are proposals (speculative decoding), not yet verified

    def __post_init__(self):
        self.token_ids = list(self.token_ids)
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)
        if self.num_prompt_tokens < 1:
            raise ValueError("a sequence needs at least one prompt token")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.salt is not None and not isinstance(self.salt, str):
            raise ValueError(f"salt must be a string or None, got {self.salt!r}")

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, {self.status.value}, {self.num_prompt_tokens}+{self.num_output_tokens} "
                f"tokens, {self.num_computed} computed, blocks {self.kv.blocks})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_computed(self) -> int:
        """Tokens whose K and V are in the cache."""
        return self.kv.length

    @property
    def remaining(self) -> int:
        """Tokens the next steps must run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def max_kv_tokens(self) -> int:
        """Cache slots the sequence may ever need: the last generated token is never fed back, so never stored."""
        return self.num_prompt_tokens + self.max_tokens - 1

    def append(self, token: int) -> None:
        if self.num_draft:
            raise ValueError(f"sequence {self.seq_id} holds {self.num_draft} unverified proposals: verify them first")
        if self.num_output_tokens >= self.max_tokens:
            raise ValueError(f"sequence {self.seq_id} already has its {self.max_tokens} tokens")
        self.token_ids.append(token)

    @property
    def num_verified(self) -> int:
        """Tokens that are not proposals."""
        return self.num_tokens - self.num_draft

    @property
    def draft_ids(self) -> list[int]:
        return self.token_ids[self.num_verified :]

    def propose(self, tokens: list[int]) -> None:
        """Append proposals after the last token (a decode's): the step runs them with it and verifies them. They
        must leave room for the token sampled after them within max_tokens."""
        if self.num_draft:
            raise ValueError(f"sequence {self.seq_id} already holds {self.num_draft} proposals")
        if self.remaining != 1:
            raise ValueError(f"sequence {self.seq_id} has {self.remaining} tokens to compute; proposals follow a "
                             "decode's one token")
        if self.num_output_tokens + len(tokens) >= self.max_tokens:
            raise ValueError(f"{len(tokens)} proposals leave sequence {self.seq_id} no room within max_tokens "
                             f"{self.max_tokens} ({self.num_output_tokens} generated)")
        self.token_ids.extend(tokens)
        self.num_draft = len(tokens)

    def drop_proposals(self, keep: int = 0) -> None:
        """Keep only the first `keep` proposals (those a step runs); the tokens of the others go."""
        if not 0 <= keep <= self.num_draft:
            raise ValueError(f"sequence {self.seq_id} holds {self.num_draft} proposals, cannot keep {keep}")
        del self.token_ids[self.num_verified + keep :]
        self.num_draft = keep

    def truncate(self, num_tokens: int) -> None:
        """Keep only the first num_tokens tokens (never fewer than the prompt). The KV cache is not touched:
        Scheduler.truncate also drops their KV."""
        if not self.num_prompt_tokens <= num_tokens <= self.num_tokens:
            raise ValueError(f"sequence {self.seq_id} can keep {self.num_prompt_tokens} to {self.num_tokens} tokens "
                             f"(its prompt, up to all it has), not {num_tokens}")
        self.num_draft = max(0, num_tokens - self.num_verified)  # proposals kept, if it keeps any
        del self.token_ids[num_tokens:]
