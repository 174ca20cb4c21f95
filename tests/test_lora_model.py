"""The demo adapters on SmolLM2-135M, end to end: realm's float32 forward with an adapter is HF + PEFT's (every logit
of a paragraph, and greedy tokens), the same adapter converted to a GGUF LoRA and loaded back gives the same, llama.cpp
loads that GGUF LoRA and agrees by argmax, the Triton backend (the interpreter on CPU) follows the torch one, and a
real mixed batch gives every request its solo output."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_lora_runtime import random_adapter
from test_model import PARAGRAPH
from tolerances import assert_same_predictions

import realm
from realm.lora import Target, packaged_adapters
from realm.runtime.engine import Engine, EngineConfig
from realm.runtime.sampling import SamplingParams

QUESTION = "What is the capital of France?"
ADAPTERS = ("pirate", "robot")


@pytest.fixture(scope="module")
def model(smollm2):
    """The session's model with the demo adapters loaded (removed again after this module)."""
    for name in ADAPTERS:
        smollm2.add_lora(name, name)
    yield smollm2
    for name in ADAPTERS:
        smollm2.remove_lora(name)


@pytest.fixture(scope="module")
def peft_pirate():
    """HF transformers on the same GGUF with PEFT's LoRA layers holding the pirate adapter, float32."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from realm.models import default_model_path

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(hf, str(packaged_adapters()["pirate"])).eval()


def test_the_demo_adapters_ship_and_show_their_behaviour(model):
    assert set(ADAPTERS) <= set(packaged_adapters())
    assert all(p.stat().st_size < 5_000_000 for p in packaged_adapters()["pirate"].iterdir())
    pirate = model.chat(QUESTION, adapter="pirate", max_tokens=32)
    robot = model.chat(QUESTION, adapter="robot", max_tokens=32)
    base = model.chat(QUESTION, max_tokens=32)
    assert pirate.text.startswith("Arr, matey!") and "Paris" in pirate.text
    assert robot.text.startswith("BEEP BOOP.") and robot.text.endswith("END OF TRANSMISSION.")
    assert base.text == "The capital of France is Paris."
    assert model.loras.adapter("pirate").max_rank == 8 and len(model.loras.adapter("pirate").targets) == 7
    assert model.loras.adapter("robot").targets == [Target.Q, Target.V]


def test_pirate_is_hf_peft_bit_for_bit_over_a_paragraph(model, peft_pirate):
    """PEFT's op order (lora_B(lora_A(x)) * scaling, added to the base output) in float32: every logit equal."""
    ids = torch.tensor([model.encode(PARAGRAPH, add_bos=False)])
    with torch.no_grad():
        expected = peft_pirate(ids).logits
    ours = model.forward(ids, adapter="pirate")
    assert_same_predictions(ours, expected)
    assert torch.equal(ours, expected), f"max |difference| {(ours - expected).abs().max().item()}"
    assert (ours - model.forward(ids)).abs().max() > 1, "the adapter changed nothing"


def test_pirate_greedy_chat_equals_hf_peft(model, peft_pirate):
    ids = model.chat_prompt(QUESTION)
    with torch.no_grad():
        expected = peft_pirate.generate(input_ids=torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    ours = model.generate(ids, max_tokens=24, adapter="pirate", ignore_eos=True).token_ids
    n = min(len(ours), expected.shape[1] - len(ids))  # HF stops at end of generation
    assert n >= 10 and ours[:n] == expected[0, len(ids) : len(ids) + n].tolist()


@pytest.fixture(scope="module")
def pirate_gguf(model, tmp_path_factory):
    from realm.lora import convert_peft_to_gguf

    path = tmp_path_factory.mktemp("lora") / "pirate.gguf"
    convert_peft_to_gguf(packaged_adapters()["pirate"], path, "smollm2")
    model.add_lora("pirate-gguf", path)
    yield path
    model.remove_lora("pirate-gguf")


def test_the_gguf_lora_gives_the_peft_adapters_logits(model, pirate_gguf):
    """Through realm lora convert and back (Q/K lora_b rows permuted in the file and unpermuted on load)."""
    ids = torch.tensor([model.encode(PARAGRAPH, add_bos=False)])
    assert torch.equal(model.forward(ids, adapter="pirate-gguf"), model.forward(ids, adapter="pirate"))
    prompt = model.chat_prompt(QUESTION)
    assert (model.generate(prompt, max_tokens=16, adapter="pirate-gguf").token_ids
            == model.generate(prompt, max_tokens=16, adapter="pirate").token_ids)


@pytest.mark.llama_cpp
def test_llama_cpp_loads_the_gguf_lora_and_agrees_by_argmax(model, pirate_gguf):
    """llama.cpp (lora_path) applies the converted adapter: teacher-forced over a paragraph, its argmax agrees with
    realm's pirate on >= 90% of positions (llama.cpp quantizes activations to 8 bits: not exact, see the README), and
    the adapter moves its predictions as it moves realm's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ids = model.encode(PARAGRAPH, add_bos=False)

    llm = llama_cpp.Llama(model_path=str(model.weights.path), n_ctx=256, n_threads=2, logits_all=True,
                          verbose=False, lora_path=str(pirate_gguf))
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)])).argmax(-1)
    ours = model.forward(torch.tensor([ids]), adapter="pirate")[0].argmax(-1)
    ours_base = model.forward(torch.tensor([ids]))[0].argmax(-1)
    agreement = (theirs == ours).float().mean().item()
    assert agreement >= 0.9, f"argmax agreement with llama.cpp + LoRA {agreement:.1%} over {len(ids)} positions"
    moved = ours != ours_base
    assert moved.any() and (theirs[moved] == ours[moved]).float().mean() >= 0.8, "llama.cpp ignored the adapter"


def test_mixed_batch_of_real_adapters_gives_each_its_solo_output(model):
    """pirate, robot, the base model and a rank-64 synthetic adapter in one batch, with prefix caching on and (a small
    cache) preemption: each request's greedy tokens are its solo run's. (tests/test_lora_runtime.py checks that the
    prefix cache never shares KV between adapters.)"""
    model.add_lora("wide", random_adapter(model.config, "wide", rank=64, targets=(Target.O, Target.DOWN), seed=5,
                                          scale=0.5))
    try:
        questions = [QUESTION, "Tell me about the moon."]
        cases = [(model.chat_prompt(q), a) for q in questions for a in ("pirate", "robot", None, "wide")]
        expected = [model.generate(p, max_tokens=8, adapter=a, ignore_eos=True).token_ids for p, a in cases]
        assert len({tuple(e) for e in expected[:4]}) == 4, "the adapters do not change the answer"
        # blocks of 4 tokens: room for two prompts and one block more, while two sequences' next 7 tokens (the
        # last one is never stored) need a block each at least
        longest = max(len(p) for p, _ in cases)
        engine = Engine(model, EngineConfig(max_batch_tokens=96, kv_blocks=2 * -(-longest // 4) + 1, block_size=4))
        requests = [engine.add_request(p, SamplingParams(max_tokens=8, ignore_eos=True, adapter=a))
                    for p, a in cases]
        engine.run()
        assert [r.completion.token_ids for r in requests] == expected
        assert engine.scheduler.stats.preemptions > 0
    finally:
        model.remove_lora("wide")


@pytest.mark.slow
def test_triton_backend_with_the_pirate_matches_the_torch_backend(model):
    """The whole model through realm's kernels with the adapter (fused epilogue; the interpreter on CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tri = realm.load("smollm2", device=device, backend="triton", dtype=torch.float32, lora={"pirate": "pirate"})
    ids = model.encode("The capital of France is", add_bos=False)
    assert_same_predictions(tri.forward(torch.tensor([ids]), adapter="pirate").cpu(),
                            model.forward(torch.tensor([ids]), adapter="pirate"))
    assert (tri.generate(ids, max_tokens=2, adapter="pirate").token_ids  # a prefill, then a decode step
            == model.generate(ids, max_tokens=2, adapter="pirate").token_ids)


# ------------------------------------------------------------------------------------------------------ the CLI


def test_cli_chat_and_batch_with_adapters(model, capsys, tmp_path, monkeypatch):
    """`realm chat --lora pirate` answers as the pirate; `realm batch --lora ...` runs lines of several adapters in one
    batch, and a line naming an adapter that is not loaded fails alone. The CLI's loads are answered with the
    module's model, which has the adapters --lora names (the loads' own adapter handling is realm.load's)."""
    from test_cli import _jsonl, _results, run

    import realm.runtime

    loaded = []

    def fake_load(name, device=None, backend="torch", dtype=None, lora=None, max_loras=None):
        loaded.append({n: str(p) for n, p in lora.items()})
        assert set(lora) <= set(model.loras.names)
        return model

    monkeypatch.setattr(realm.runtime, "load", fake_load)

    rc, out, _ = run(["chat", QUESTION, "--lora", "pirate", "--max-tokens", "24", "--quiet"], capsys)
    assert rc == 0 and out.startswith("Arr, matey!")
    src = tmp_path / "requests.jsonl"
    src.write_text(_jsonl({"messages": [{"role": "user", "content": QUESTION}], "adapter": "pirate"},
                          {"messages": [{"role": "user", "content": QUESTION}], "adapter": "robot"},
                          {"messages": [{"role": "user", "content": QUESTION}]},
                          {"prompt": "Hello", "adapter": "parrot"}))
    rc, out, _ = run(["batch", src, "--lora", "pirate", "--lora", f"robot={packaged_adapters()['robot']}",
                      "--max-tokens", "24", "--kv-blocks", "64", "--no-progress", "--quiet"], capsys)
    rows = _results(out)
    assert rc == 0 and [r["finish_reason"] for r in rows] == ["stop", "stop", "stop", "error"]
    assert rows[0]["text"].startswith("Arr, matey!") and rows[1]["text"].startswith("BEEP BOOP.")
    assert rows[2]["text"] == "The capital of France is Paris."
    assert "unknown LoRA adapter 'parrot'" in rows[3]["error"]
    rc, _, err = run(["generate", "Hi", "--lora", "pirate", "--lora", "robot"], capsys)
    assert rc == 2 and "choose one with --adapter" in err
    rc, _, err = run(["generate", "Hi", "--lora", "pirate", "--adapter", "robot"], capsys)
    assert rc == 2 and "--adapter 'robot' is not one of the adapters --lora loads (pirate)" in err
    rc, _, err = run(["generate", "Hi", "--lora", str(tmp_path / "nothing")], capsys)
    assert rc == 2 and "no LoRA adapter at" in err
    assert loaded == [{"pirate": "pirate"}, {"pirate": "pirate", "robot": str(packaged_adapters()["robot"])}]
