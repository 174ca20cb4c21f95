"""The step plan: what one forward step computes, as plain data (no tensors), so that it can be logged, pickled, and
sent to other processes (tensor-parallel ranks run the same plan).

    plan = StepPlan(block_size=16, chunks=(
        ChunkPlan(seq_id=0, start=0, token_ids=(1, 2, 3), block_table=(4,), logits=(2,), sampling=RowSampling()),
        ChunkPlan(seq_id=1, start=7, token_ids=(9,), block_table=(0, 5), logits=(0,), sampling=RowSampling(...),
                  adapter=2),                  # rows of this chunk add the LoRA delta of the adapter in slot 2
        ChunkPlan(seq_id=2, start=30, token_ids=(5, 8, 8), block_table=(6, 7), logits=(0, 1, 2),
                  sampling=RowSampling(), num_draft=2),   # token 5, then two proposals (8, 8) to verify
    ))
    out = runner.execute(plan)        # StepOutput: sampled tokens per chunk, optionally probabilities and logits
    out = runner.execute(plan, draft_probs={2: q})   # a draft model's distributions [num_draft, vocab] per sequence

A chunk is a run of new tokens of one sequence after the `start` tokens it already has in the KV cache: a whole
prompt, a prefill chunk, one decode token, or a token and the draft tokens to verify after it. Its logits rows are
any subset of its positions (`logits`: offsets in the chunk): the last one to sample the next token, every one to
verify drafts, none for a prefill chunk that does not reach the end of its prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sampler import RowSampling


@dataclass(frozen=True)
class ChunkPlan:
    seq_id: int
    start: int  # tokens of the sequence already in the KV cache: the chunk's first position
    token_ids: tuple[int, ...]  # the new tokens, at positions start .. start + len - 1
    block_table: tuple[int, ...]  # the sequence's KV blocks, in token order, covering start + len tokens
    logits: tuple[int, ...] = ()  # offsets in the chunk whose logits the step needs, increasing
    # Sampling of each logits row; None: the rows' logits are returned, not sampled. `sampling.position` is the
    # position of the token drawn from the chunk's LAST token (start + len(token_ids)): a row at another offset
    # draws for its own position. `sampling.history` (repetition penalty) holds the tokens before the chunk; a row's
    # history is that plus the chunk's tokens up to the row.
    sampling: RowSampling | None = None
    adapter: int = -1  # the LoRA pool slot of the sequence's adapter (realm.runtime.lora); -1: none
    # Speculative decoding: the chunk's last num_draft tokens are proposals to verify. Its logits rows are then its last
    # num_draft + 1 offsets, verified (BatchSampler.verify) instead of sampled one by one: the step's tokens for the
    # chunk are the accepted proposals followed by one more token (the correction, or the bonus when all pass).
    num_draft: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        """Tokens of the sequence in the cache after this step."""
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class StepPlan:
    block_size: int
    chunks: tuple[ChunkPlan, ...]
    copies: tuple[tuple[int, int], ...] = ()  # KV blocks to copy (src, dst) before the forward: copy-on-write
    return_logits: bool = False  # StepOutput.logits: every logits row
    return_probs: bool = False  # StepOutput.probs: the distribution each sampled token was drawn from

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def num_logits(self) -> int:
        return sum(len(c.logits) for c in self.chunks)


@dataclass
class StepOutput:
    # Per chunk: one sampled token per logits row (or none); for a chunk with proposals (num_draft), the accepted
    # proposals followed by the token sampled after them.
    tokens: list[list[int]] = field(default_factory=list)
    logits: object | None = None  # torch.Tensor [num_logits, vocab] when return_logits
    probs: object | None = None  # torch.Tensor float32 [sampled rows, vocab] when return_probs
    # Per chunk: None, or why it failed (its logits are not finite; the forward or sampling raised with it alone).
    # A failed chunk has no tokens and NaN logits and probability rows; its sequence must not go on.
    errors: list[str | None] = field(default_factory=list)
    lora: str | None = None  # how LoRA deltas were added when a row had an adapter: "reference", "fused", "separate"
    accepted: list[int] = field(default_factory=list)  # per chunk: proposals accepted (0 for a chunk without any)
