"""What a request's generated tokens become: text events, stop strings, finish reasons, timings, the completion.

    out = OutputText(tokenizer, SamplingParams(stop=["\n\n"]))
    event = out.add(token)            # TokenEvent(token_id, text): text is what may be shown now; None: end of text
    out.close()                       # the text held back, as a last event
    Completion(text, token_ids, finish_reason, prompt_ids, timings)

Stop strings are matched on the decoded text. Text that could be the start of a stop string is held back until the
next tokens settle it, so a stream never shows a stop string, nor anything after it. The engine
(realm.runtime.engine) runs this for every request; `Model.generate` is one request on it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sampling import SamplingParams


class GenerationError(RuntimeError):
    """A single request's generation failed inside the engine (its step's forward raised); the message says how."""


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an end-of-generation token or a stop string
    LENGTH = "length"  # max_tokens reached, or the context is full
    ABORT = "abort"  # cancelled
    ERROR = "error"  # a bad request (batched generation reports it in the output instead of raising)


@dataclass(frozen=True)
class TokenEvent:
    token_id: int | None  # None for text released at the end (held back for a stop string, or a last partial char)
    text: str  # newly shown text: may be "" (an incomplete UTF-8 character, or text held back for a stop string)


@dataclass
class Timings:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0  # the prompt's forward and the first token (batched: from its first scheduled step)
    decode_s: float = 0.0  # every later token
    queue_s: float = 0.0  # batched: from arrival to the first step it was scheduled in
    cached_tokens: int = 0  # batched: tokens found in the prefix cache at its (last) admission
    preemptions: int = 0  # batched: times its KV blocks were taken back (its tokens were then recomputed)
    proposed_tokens: int = 0  # speculative decoding: proposals verified
    accepted_tokens: int = 0  # of those, accepted
    verifications: int = 0  # steps that verified proposals of it

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed tokens (nan without speculation)."""
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Accepted proposals per verification (nan without speculation)."""
        return self.accepted_tokens / self.verifications if self.verifications else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first one (the first comes out of the prefill); nan with fewer than 2."""
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")


@dataclass
class Completion:
    text: str  # the generated text, without end-of-generation tokens and cut before a stop string
    token_ids: list[int]  # every generated id, including an end-of-generation token that ended it
    finish_reason: FinishReason
    prompt_ids: list[int]
    timings: Timings = field(default_factory=Timings)
    error: str | None = None  # with finish_reason "error": what was wrong with the request


class StopStrings:
    """Finds the first stop string in text that arrives in pieces; holds back what may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return the part that is certain to come before any stop string."""
        if self.stopped:
            return ""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        keep = self._longest_stop_prefix_suffix()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _longest_stop_prefix_suffix(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best


class OutputText:
    """A request's generated ids as the text to show: incremental detokenization, end-of-generation tokens, stop
    strings. `add` returns the TokenEvent to emit, or None when the token ends generation (end-of-generation)."""

    def __init__(self, tokenizer, params: SamplingParams):
        self.decoder = tokenizer.stream_decoder(skip_special=True, continuation=True)
        self.stops = StopStrings(params.stop)
        self.stop_ids = frozenset() if params.ignore_eos else frozenset(tokenizer.stop_ids)
        self.pieces: list[str] = []

    @property
    def stopped(self) -> bool:
        """A stop string was found: generation ends, and nothing after it is shown."""
        return self.stops.stopped

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, token: int) -> TokenEvent | None:
        if token in self.stop_ids:
            return None
        shown = self.stops.push(self.decoder.push(token))
        self.pieces.append(shown)
        return TokenEvent(token, shown)

    def close(self) -> TokenEvent | None:
        """The text still held back (a partial character, a possible stop string's start), as a last event."""
        if self.stops.stopped:
            return None
        tail = self.stops.push(self.decoder.flush()) + self.stops.flush()
        if not tail:
            return None
        self.pieces.append(tail)
        return TokenEvent(None, tail)
