"""The independent oracle that batched generation is compared with: one sequence, greedy, on the rectangular
forward (`Transformer.forward_tokens` on a KVCache of its own), with none of the engine's code (no scheduler, no
block manager, no step plan, no batched sampler). What `Model.generate` was before it ran on the engine."""

from __future__ import annotations

from collections.abc import Sequence


def greedy_alone(model, prompt_ids: Sequence[int], max_tokens: int, stop_ids=frozenset()) -> list[int]:
    """The greedy continuation of prompt_ids: max_tokens ids (fewer when one in stop_ids ends it, included), each
    the argmax over the tokenizer's vocabulary, prompt and output capped at the context."""
    net = model.transformer
    vocab = model.tokenizer.vocab_size
    ids = list(prompt_ids)
    max_new = min(max_tokens, model.config.context_length - len(ids))
    cache = net.new_cache(batch=1, capacity=len(ids) + max_new)
    logits = net.forward_tokens([ids], cache, start=0, last_only=True)
    out: list[int] = []
    while True:
        token = int(logits[0, -1, :vocab].argmax())
        out.append(token)
        if token in stop_ids or len(out) == max_new:
            return out
        logits = net.forward_tokens([[token]], cache, start=cache.length, last_only=True)
