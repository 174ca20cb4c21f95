"""Sampling: per-request parameters, validated, and the logits -> token step.

    params = SamplingParams(temperature=0.7, top_p=0.9, seed=0, stop=("\\n\\n",), max_tokens=64)
    sampler = Sampler(params)
    token = sampler.sample(logits, history)      # logits: [vocab]; history: the prompt and generated ids

The order of operations is HF transformers' (repetition penalty, temperature, top-k, top-p, min-p, then a draw);
temperature 0 is greedy decoding (argmax after the repetition penalty). Each request owns its seeded generator, so
a seed reproduces a sample whatever else runs in the same process or batch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch

from .tokenizer import check_text


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256  # new tokens at most (finish reason "length")
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p; 1: off
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one; 0: off
    repetition_penalty: float = 1.0  # CTRL-style, on every token of the prompt and output; 1: off
    seed: int | None = None  # None: a fresh random draw each run
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these (finish reason "stop")
    ignore_eos: bool = False  # keep going past end-of-generation tokens (benchmarks)
    adapter: str | None = None  # the LoRA adapter (a name loaded in the model's registry); None: the base model
    # Speculative decoding (realm.runtime.speculative): "ngram", "draft" (the model's draft model), "none", or a
    # SpeculativeConfig (k, n-gram bounds, adaptivity); None: the engine's default. Output is the same either way
    # (greedy: token for token; sampled: in distribution), only faster where proposals are accepted.
    speculative: object = None

    def __post_init__(self):
        if isinstance(self.stop, str):  # a single string is one stop string, not a tuple of characters
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {type(self.stop).__name__}")
        object.__setattr__(self, "stop", tuple(self.stop))
        for name in ("max_tokens", "top_k", "seed"):  # numpy integers are integers: stored as int
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
                object.__setattr__(self, name, int(value))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):  # numpy floats too: stored as float
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
                object.__setattr__(self, name, float(value) if not isinstance(value, int) else value)
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("top_k", self.top_k, minimum=0)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.temperature != 0:
            _check_float32("temperature", self.temperature, "use 0 for greedy decoding")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}")
        _check_float32("repetition_penalty", self.repetition_penalty, "1 is off")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
            if self.seed >= 2**63:
                raise ValueError(f"seed must be < 2**63 (torch.Generator's range), got {self.seed}")
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter):
            raise ValueError(f"adapter must be the name of a loaded LoRA adapter (a non-empty string) or None, got "
                             f"{self.adapter!r}")
        from .speculative import speculative_config_of

        object.__setattr__(self, "speculative", speculative_config_of(self.speculative))
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
            check_text(s, "a stop string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


_FLOAT32 = torch.finfo(torch.float32)


def _check_float32(name: str, value: float, hint: str) -> None:
    """Logits are scaled in float32: a positive value that float32 rounds to 0 or to inf (1e-300, 1e39) would divide
    by zero or multiply by infinity there, and give NaN; refuse it here, where the field can be named."""
    if not _FLOAT32.tiny <= value <= _FLOAT32.max:
        raise ValueError(f"{name} {value} is outside float32's normal range [{_FLOAT32.tiny:.3g}, {_FLOAT32.max:.3g}], "
                         f"in which logits are scaled ({hint})")


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token in `history` less likely: positive logits divided by the penalty, negative ones multiplied."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(-1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, history, seen)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (all of them on ties with the k-th), -inf elsewhere."""
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their total probability reaches p (always at least the most likely one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass of the tokens ranked above each one
    drop_sorted = before >= p
    drop_sorted[..., 0] = False  # the most likely token stays, even for a p that float32 rounds to 0
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's."""
    if min_p == 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, -math.inf)


@dataclass
class Sampler:
    """One request's sampling state: its parameters and its random generator."""

    params: SamplingParams
    generator: torch.Generator = field(init=False)

    def __post_init__(self):
        self.generator = torch.Generator()  # on the CPU: the same draws on every device
        if self.params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.params.seed)

    def distribution(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """The filtered, temperature-scaled logits [vocab] (float32) that `sample` draws from."""
        p = self.params
        logits = apply_repetition_penalty(logits.float(), history.to(logits.device), p.repetition_penalty)
        if p.greedy:
            return logits
        # shifted so the top logit is 0 before dividing: a tiny temperature then gives -inf, never inf - inf = nan
        logits = filter_top_k((logits - logits.max()) / p.temperature, p.top_k)
        return filter_min_p(filter_top_p(logits, p.top_p), p.min_p)

    def sample(self, logits: torch.Tensor, history: torch.Tensor) -> int:
        """logits: [vocab]; history: int64 [n] ids the repetition penalty applies to -> the next token id."""
        logits = self.distribution(logits, history)
        if self.params.greedy:
            return int(logits.argmax())
        probs = logits.softmax(-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))
