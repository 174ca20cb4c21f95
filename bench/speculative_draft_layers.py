"""Greedy acceptance of layer drafts of SmolLM2 (realm.draft_file.make_layer_draft), the table in
bench/speculative.py's docstring: for each layer subset, two grounded prompts (the Gettysburg Address to summarise,
Alice's opening with 'Alice' to be replaced), SpeculativeConfig("draft", num_speculative_tokens=4, adaptive=False),
accepted / proposed proposals over both requests. One torch thread; prints one line per subset.

    python bench/speculative_draft_layers.py 32 0-3,8-29 0-7 0-5,28-29
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

import realm
from realm.draft_file import make_layer_draft, parse_layers
from realm.runtime.engine import Engine, EngineConfig
from realm.runtime.sampling import SamplingParams
from realm.runtime.speculative import SpeculativeConfig

GETTYSBURG = ("Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
              "Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great "
              "civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure. "
              "We are met on a great battle-field of that war. We have come to dedicate a portion of that field, as a "
              "final resting place for those who here gave their lives that that nation might live. It is altogether "
              "fitting and proper that we should do this.")
ALICE = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
         "once or twice she had peeped into the book her sister was reading, but it had no pictures or "
         "conversations in it, 'and what is the use of a book,' thought Alice 'without pictures or conversations?'")
PROMPTS = [f"Summarize the following passage in two sentences.\n\n{GETTYSBURG}",
           f"Rewrite the following text, replacing 'Alice' with 'Mary':\n\n{ALICE}"]


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    max_tokens, subsets = int(argv[0]), argv[1:]
    torch.set_num_threads(1)
    model = realm.load("smollm2", device="cpu")
    ids = [model.chat_prompt(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=max_tokens,
                            speculative=SpeculativeConfig("draft", num_speculative_tokens=4, adaptive=False))
    with tempfile.TemporaryDirectory() as tmp:
        for text in subsets:
            path = Path(tmp) / f"{text}.gguf"
            layers = parse_layers(text)
            make_layer_draft("smollm2", path, layers)
            model.set_draft_model(path)
            engine = Engine(model, EngineConfig(kv_blocks=64))
            began = time.perf_counter()
            handles = []
            for x in ids:
                handles.append(engine.add_request(x, params))
                engine.run()
            accepted = sum(h.completion.timings.accepted_tokens for h in handles)
            proposed = sum(h.completion.timings.proposed_tokens for h in handles)
            print(f"{text:24s} {len(layers):3d} layers  acceptance {accepted / max(proposed, 1):.3f} "
                  f"({accepted}/{proposed})  {time.perf_counter() - began:.1f} s", flush=True)
            model.set_draft_model(None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
