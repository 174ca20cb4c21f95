"""Record HF transformers' exact float32 greedy generations of the default model (tests/data/hf_reference.json).

HF loads the same GGUF offline and dequantizes it with gguf-py; its float32 forward is the reference realm's torch
backend must reproduce. The tests compare with this file, and with HF itself when transformers is installed.

    pip install transformers accelerate
    python scripts/record_hf_reference.py          # rewrites tests/data/hf_reference.json
"""

from __future__ import annotations

import json
import os
import platform
from importlib.metadata import version
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # the GGUF is local; nothing may be downloaded

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from realm.models import default_model_path

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "hf_reference.json"
MAX_NEW_TOKENS = 64
MIN_TOKENS = 40  # the acceptance bar: greedy must match for at least this many tokens
PROMPTS = [
    "The history of the Roman Empire",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "Photosynthesis is the process by which",
]
CHAT = "What is the capital of France?"


def load():
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return tokenizer, model.eval()


def greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out[0, len(ids):].tolist()


def main() -> None:
    torch.manual_seed(0)
    tokenizer, model = load()
    cases = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        generated = greedy(model, ids)
        if len(generated) < MIN_TOKENS:
            raise SystemExit(f"{prompt!r}: only {len(generated)} tokens before end of text; pick another prompt")
        cases.append({"prompt": prompt, "prompt_ids": ids, "generated_ids": generated,
                      "text": tokenizer.decode(generated)})
    chat_ids = tokenizer.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    answer = greedy(model, chat_ids)
    record = {
        "model": default_model_path().name,
        "made_by": "scripts/record_hf_reference.py",
        "versions": {p: version(p) for p in ("transformers", "torch", "gguf")} | {"python": platform.python_version()},
        "max_new_tokens": MAX_NEW_TOKENS,
        "greedy": cases,
        "chat": {"question": CHAT, "prompt_ids": chat_ids, "generated_ids": answer,
                 "text": tokenizer.decode(answer, skip_special_tokens=True)},
    }
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    for c in cases:
        print(f"{c['prompt']!r}: {len(c['generated_ids'])} tokens: {c['text'][:70]!r}")
    print(f"chat: {record['chat']['text']!r}\nwrote {OUT}")


if __name__ == "__main__":
    main()
