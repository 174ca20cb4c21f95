"""Record HF transformers' float32 greedy generations of Gemma 3 270M (tests/data/gemma3_270m_hf_reference.json).

The second real model (`gemma3-270m`, the base model in Q4_K_M): HF loads the same GGUF offline and dequantizes it to
float32 with gguf-py (its legacy GGUF loader; gemma3 is not among the architectures its newer loader keeps packed), and
that float32 forward is the reference realm's torch backend must reproduce, as scripts/record_hf_reference.py records
for the default model. Per prompt (plain text continuation, BOS added as the tokenizer adds it): HF's prompt ids,
llama.cpp's ids for the same text and whether they agree, 40 greedy tokens, and at each step the margin between the
best two raw logits (a divergence where it is small is a near tie, not a bug); for the first prompt also the top-5
raw logits at each step. The file also holds the model config as HF reads it (and which fields came from the GGUF
rather than from Gemma3TextConfig's defaults), the versions and the GGUF's sha256.

    python -m realm.models fetch gemma3-270m
    python scripts/record_gemma3_reference.py    # rewrites tests/data/gemma3_270m_hf_reference.json (~2 min, 2 cores)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # the GGUF is local; nothing may be downloaded

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

from realm.models import GEMMA3_270M, sha256_of

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "gemma3_270m_hf_reference.json"
MAX_NEW_TOKENS = 40  # the acceptance bar: greedy must match HF for 40 tokens
TOP_K = 5
PROMPTS = [
    "The history of the Roman Empire began",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:",
    "Once upon a time, in a small village by the sea, there lived",
    "The largest cities in Japan are:\n1. Tokyo (東京), population 14 million\n2.",
]
# What realm needs to implement the architecture; `None` where this transformers version has no such field (5.x keeps
# both rope bases in rope_parameters, per layer type, and no rope_theta / rope_local_base_freq).
CONFIG_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_activation", "rms_norm_eps", "max_position_embeddings",
    "sliding_window", "layer_types", "sliding_window_pattern", "_sliding_window_pattern", "rope_theta",
    "rope_local_base_freq", "rope_parameters", "query_pre_attn_scalar", "final_logit_softcapping",
    "attn_logit_softcapping", "attention_bias", "use_bidirectional_attention", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id",
)


def load():
    path = GEMMA3_270M.path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return tokenizer, model.eval()


def loader() -> str:
    """Which of HF's GGUF loaders ran: the legacy one dequantizes every tensor with gguf-py at load time."""
    try:
        from transformers.integrations.gguf import is_gguf_arch_supported
    except ImportError:  # before transformers 5.24 the legacy loader was the only one
        return "load_gguf_checkpoint (gguf-py dequantize)"
    if is_gguf_arch_supported("gemma3"):
        raise SystemExit("this transformers loads gemma3 GGUFs with its packed-weight loader; pass "
                         "quantization_config=GgufConfig(dequantize=True) and check what it computes in")
    return "load_gguf_checkpoint (gguf-py dequantize)"


def model_config(model) -> dict:
    config = model.config.to_dict()
    recorded = {k: config.get(k, getattr(model.config, k, None)) for k in CONFIG_KEYS}
    recorded["_attn_implementation"] = model.config._attn_implementation
    from_gguf = sorted({v for v in GGUF_CONFIG_MAPPING["gemma3"].values() if v})
    recorded["_read_from_gguf"] = from_gguf  # every other field is Gemma3TextConfig's default, not the file's
    return recorded


def llama_cpp_ids(path: Path, prompts: list[str]) -> list[list[int]]:
    """llama.cpp's tokenization, for comparison with HF's: `add_bos=True` is llama_tokenize's add_special, which adds
    BOS as the file's tokenizer.ggml.add_bos_token says; `special=False` reads "<bos>" in a prompt as text."""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return [vocab.tokenize(p.encode("utf-8"), add_bos=True, special=False) for p in prompts]


def greedy(model, ids: list[int]) -> tuple[list[int], list[dict]]:
    """The generated ids, and per step the top-k raw logits (before any logits processor), best first."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    generated = out.sequences[0, len(ids):].tolist()
    steps = []
    for logits in out.logits:  # [1, vocab] per step
        top = torch.topk(logits[0].float(), TOP_K)
        steps.append({"ids": top.indices.tolist(), "logits": top.values.tolist()})
    return generated, steps


def main() -> None:
    torch.manual_seed(0)
    path = GEMMA3_270M.path()
    hf_loader = loader()
    start = time.perf_counter()
    tokenizer, model = load()
    print(f"loaded in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    llama_ids = llama_cpp_ids(path, PROMPTS)
    cases = []
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt)["input_ids"]  # BOS as the tokenizer adds it
        generated, steps = greedy(model, ids)
        if len(generated) < MAX_NEW_TOKENS:
            raise SystemExit(f"{prompt!r}: only {len(generated)} tokens before end of text; pick another prompt")
        case = {"prompt": prompt, "prompt_ids": ids, "llama_cpp_prompt_ids": llama_ids[i],
                "tokenizers_agree": ids == llama_ids[i], "generated_ids": generated,
                "text": tokenizer.decode(generated),
                "top1_margins": [round(s["logits"][0] - s["logits"][1], 4) for s in steps]}
        if i == 0:
            case["top_logits"] = steps  # steps[j]: the raw logits that chose generated_ids[j], best first
        cases.append(case)
    record = {
        "model": GEMMA3_270M.filename,
        "packaged_as": GEMMA3_270M.name,
        "gguf_sha256": sha256_of(path),
        "made_by": "python scripts/record_gemma3_reference.py",
        "versions": {p: version(p) for p in ("transformers", "torch", "gguf", "tokenizers", "llama_cpp_python")}
        | {"python": platform.python_version()},
        "hf_loader": hf_loader,
        "dtype": "float32",
        "max_new_tokens": MAX_NEW_TOKENS,
        "top_k": TOP_K,
        "tokenizers_agree": all(c["tokenizers_agree"] for c in cases),
        "config": model_config(model),
        "greedy": cases,
    }
    OUT.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    for c in cases:
        agree = "tokens agree" if c["tokenizers_agree"] else "TOKENS DIFFER from llama.cpp"
        print(f"{c['prompt']!r}: {len(c['prompt_ids'])} prompt ids ({agree}): {c['text'][:70]!r}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
