"""The `realm` command line and (optionally) loading realm's files in llama.cpp."""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_gguf import write_model

from realm.cli import COMMANDS, Command, main
from realm.gguf_io import open_gguf, tensor_format
from realm.models import default_model_path
from realm.quantize_file import FILE_TYPES
from realm.runtime.speculative import SpecMethod

# ggml's type traits (ggml.c, ggml-common.h), written out independently of realm.quant: type id, block size, bytes
GGML_TYPES = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "BF16": (30, 1, 2),
    "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34), "Q8_1": (9, 32, 36),
    "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210), "Q8_K": (15, 256, 292),
    "IQ4_NL": (20, 32, 18), "IQ4_XS": (23, 256, 136), "MXFP4": (39, 32, 17),
}
ACTIVATION = {"Q8_1", "Q8_K"}


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_model(path)
    return path


def run(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_formats_lists_every_format(capsys):
    rc, out, err = run(["formats"], capsys)
    assert rc == 0 and err == ""
    header, *rows = out.strip().splitlines()
    assert header.split()[:6] == ["name", "type", "block", "bytes", "bits/w", "use"]
    assert len(rows) == 18
    seen = {}
    for row in rows:
        name, type_id, block, nbytes, bpw, use, *description = row.split()
        seen[name] = (int(type_id), int(block), int(nbytes))
        assert float(bpw) == 8 * int(nbytes) / int(block), name
        assert use == ("activation" if name in ACTIVATION else "storage"), name
        assert description, name
    assert seen == GGML_TYPES


def test_quantize(tmp_path, model, capsys):
    dst = tmp_path / "out.gguf"
    rc, out, err = run(["quantize", model, dst, "--type", "q4_k", "--no-progress"], capsys)
    assert rc == 0
    assert "fallback Q4_K -> Q5_0 for 3 tensors: row lengths 64, 96, 576" in err
    assert "blk.0.ffn_up_exps.weight" not in err  # a summary line per fallback kind, not a line per tensor
    assert "%|" not in err  # no progress bar
    lines = out.splitlines()
    assert lines[0].split() == ["format", "tensors", "bytes", "rel", "RMSE"]
    assert {line.split()[0] for line in lines[1:5]} == {"Q4_K", "Q5_0", "F16", "F32"}
    assert lines[5].split()[:2] == ["total", "10"]
    assert "Q4_K, 5 fallbacks" in lines[-1]
    formats = {t.name: tensor_format(t).name for t in open_gguf(dst).tensors}
    assert formats["blk.0.ffn_up.weight"] == "Q4_K" and formats["blk.0.odd.weight"] == "F16"


def test_quantize_shows_progress(tmp_path, model, capsys):
    rc, _, err = run(["quantize", model, tmp_path / "out.gguf", "--type", "Q8_0"], capsys)
    assert rc == 0
    assert "quantize Q8_0: 100%" in err and "10/10" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--type", "Q9_9"], "unknown format 'Q9_9'; known formats: F32, "),
    (["--type", "Q8_1"], "Q8_1 is an activation format"),
    (["--type", "Q8_K"], "Q8_K is an activation format"),
])
def test_quantize_bad_type(tmp_path, model, capsys, args, message):
    dst = tmp_path / "out.gguf"
    rc, out, err = run(["quantize", model, dst, *args], capsys)
    assert rc == 2 and out == ""
    assert err.startswith(f"realm: error: {message}") and err.count("\n") == 1
    assert not dst.exists()


def test_quantize_bad_input(tmp_path, capsys):
    missing = tmp_path / "missing.gguf"
    rc, _, err = run(["quantize", missing, tmp_path / "o.gguf", "--type", "Q4_0"], capsys)
    assert (rc, err) == (2, f"realm: error: {missing}: no such file\n")

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x7fELF" + bytes(100))
    rc, _, err = run(["quantize", junk, tmp_path / "o.gguf", "--type", "Q4_0"], capsys)
    assert rc == 2 and err.startswith(f"realm: error: {junk}: not a GGUF file: it starts with b'\\x7fELF'")


def test_quantize_truncated_input(tmp_path, model, capsys):
    model.write_bytes(model.read_bytes()[:-100])
    rc, _, err = run(["quantize", model, tmp_path / "o.gguf", "--type", "Q4_0"], capsys)
    assert rc == 2 and err.startswith(f"realm: error: {model}: truncated file: tensor 'output_norm.weight' needs")


def test_quantize_unwritable_output(tmp_path, model, capsys):
    dst = tmp_path / "no_such_dir" / "out.gguf"
    rc, _, err = run(["quantize", model, dst, "--type", "Q8_0", "--no-progress"], capsys)
    assert (rc, err) == (2, f"realm: error: {dst}: output directory {dst.parent} does not exist\n")


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["quantize", "a.gguf", "b.gguf"], ["nope"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "usage: realm" in capsys.readouterr().err


def test_console_errors_have_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "realm", "quantize", "nope.gguf", "out.gguf", "--type", "Q4_0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == "realm: error: nope.gguf: no such file\n"


def test_a_new_subcommand_is_one_registry_entry(monkeypatch, capsys):
    def add_arguments(parser):
        parser.add_argument("--name", required=True)

    def run_hello(args):
        print(f"hello {args.name}")
        return 3

    monkeypatch.setitem(COMMANDS, "hello", Command("hello", "say hello", add_arguments, run_hello))
    assert main(["hello", "--name", "realm"]) == 3
    assert capsys.readouterr().out == "hello realm\n"


# ---------------------------------------------------------------------------------------------------------- llama.cpp

PROMPTS = (b"The capital of France is", b"Once upon a time")
N_TOKENS = 16
# realm's argmax on a file realm wrote, teacher-forced on llama.cpp's greedy tokens from it: measured 32/32 (Q8_0),
# 31/32 (Q4_K, Q4_0) with llama-cpp-python 0.3.36 on x86-64; llama.cpp's 8-bit activations flip near ties only.
LLAMA_CPP_TEACHER_FORCED = 0.9


def _installed_model() -> Path:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _greedy(path: Path) -> tuple[list[list[int]], str, dict]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    tokens = []
    for prompt in PROMPTS:
        ids = llm.tokenize(prompt, add_bos=True)
        tokens.append(list(itertools.islice(llm.generate(ids, temp=0.0, top_k=1), N_TOKENS)))
    return tokens, llm.detokenize(tokens[0]).decode("utf-8", errors="replace"), dict(llm.metadata)


@pytest.fixture(scope="module")
def smollm2_greedy():
    path = _installed_model()
    return _greedy(path)[0]


@pytest.mark.llama_cpp
@pytest.mark.parametrize(("fmt", "agree"), [
    # Q8_0 of the Q4_1 model's weights is close to lossless (rel. RMSE 5e-3 against them). Measured with
    # llama-cpp-python 0.3.36 on x86-64 CPU: greedy runs agree on 5 and 16 tokens for these prompts (4 to 16 over
    # five prompts); 3 leaves room for a build whose near-ties round the other way.
    ("Q8_0", 3),
    ("Q4_K", 0),  # 4-bit: the continuation is text but drifts from the source model's within a few tokens
    ("Q4_0", 0),
])
def test_llama_cpp_loads_realm_files(tmp_path, capsys, smollm2_greedy, fmt, agree):
    """llama.cpp reads the file realm wrote as realm reads it: teacher-forced on llama.cpp's own greedy tokens,
    realm's forward on the same file picks the same next token at nearly every step (llama.cpp's 8-bit activations
    flip near ties only), which fails if realm wrote bytes that mean other weights to llama.cpp. Against the source
    model, the 8-bit file keeps the first greedy tokens."""
    import torch

    import realm

    dst = tmp_path / f"smollm2.{fmt}.gguf"
    assert main(["quantize", "smollm2", str(dst), "--type", fmt, "--no-progress"]) == 0
    err = capsys.readouterr().err
    if fmt == "Q4_K":  # every 576-wide row falls back; only ffn_down (1536 wide) is Q4_K
        assert err.splitlines() == ["fallback Q4_K -> Q5_0 for 181 tensors: row length 576 not a multiple of 256 "
                                    "(llama.cpp's rule), e.g. token_embd.weight, blk.0.ffn_gate.weight, ..."]
    tokens, text, metadata = _greedy(dst)
    assert text.strip(), f"{fmt}: empty continuation"
    assert all(len(t) == N_TOKENS for t in tokens)
    assert metadata["general.file_type"] == str(int(FILE_TYPES[fmt]))
    for got, ref in zip(tokens, smollm2_greedy, strict=True):
        assert got[:agree] == ref[:agree], f"{fmt}: greedy tokens {got} vs the source model's {ref}"
    ours = realm.load(dst, device="cpu")
    same = total = 0
    for prompt, got in zip(PROMPTS, tokens, strict=True):
        ids = ours.encode(prompt.decode())
        picks = ours.forward(torch.tensor([ids + got[:-1]]))[0, len(ids) - 1 :].argmax(-1).tolist()
        same += sum(a == b for a, b in zip(picks, got, strict=True))
        total += len(got)
    assert same / total >= LLAMA_CPP_TEACHER_FORCED, f"{fmt}: realm agrees with llama.cpp on {same}/{total} steps"


# ------------------------------------------------------------------------------------------------ generate and chat


@pytest.fixture
def loads(monkeypatch, smollm2):
    """The CLI's model loads, answered with the session's loaded model; records the options they asked for."""
    import realm.runtime

    calls = []

    def fake_load(model, device=None, backend="torch", dtype=None):
        calls.append({"model": model, "device": device, "backend": backend, "dtype": dtype})
        return smollm2

    monkeypatch.setattr(realm.runtime, "load", fake_load)
    return calls


def test_generate_streams_text_and_reports_speed(loads, capsys, smollm2):
    rc, out, err = run(["generate", "The capital of France is", "--max-tokens", "8", "--dtype", "float32"], capsys)
    assert rc == 0
    expected = smollm2.generate("The capital of France is", max_tokens=8).text
    assert out == expected + "\n"
    assert "8 generated" in err and "tok/s decode" in err and "finish: length" in err
    assert loads == [{"model": "smollm2", "device": None, "backend": "torch", "dtype": __import__("torch").float32}]


def test_generate_passes_sampling_options(loads, capsys, smollm2):
    argv = ["generate", "Once upon a time", "--max-tokens", "6", "--temperature", "0.8", "--top-k", "40", "--top-p",
            "0.9", "--min-p", "0.05", "--repetition-penalty", "1.1", "--seed", "5", "--quiet"]
    rc, out, err = run(argv, capsys)
    assert rc == 0 and err == ""
    same = smollm2.generate("Once upon a time", max_tokens=6, temperature=0.8, top_k=40, top_p=0.9, min_p=0.05,
                            repetition_penalty=1.1, seed=5)
    assert out == same.text + "\n"


SPECULATIVE_FLAGS = [
    (["--speculative", "ngram"], dict(method="ngram", ngram_lockstep=True, adaptive=True)),
    (["--speculative", "ngram", "--no-ngram-lockstep", "--fixed-k", "--num-speculative-tokens", "6", "--ngram-min",
      "2", "--ngram-max", "5"],
     dict(method="ngram", ngram_lockstep=False, adaptive=False, num_speculative_tokens=6, ngram_min=2, ngram_max=5)),
]


def _fields(config, expected: dict) -> dict:
    return {name: getattr(config, name) for name in expected}


@pytest.mark.parametrize(("flags", "expected"), SPECULATIVE_FLAGS)
@pytest.mark.parametrize("command", [["generate", "x"], ["chat", "x"], ["batch", "requests.jsonl"], ["serve"]])
def test_speculative_options_reach_the_config(command, flags, expected):
    from realm import cli

    config = cli._speculative(cli.build_parser().parse_args([*command, *flags]))
    assert _fields(config, expected) == {**expected, "method": SpecMethod(expected["method"])}


def _serve_config(monkeypatch, flags: list[str]):
    """The ServerConfig `realm serve` builds from flags (uvicorn stubbed: nothing listens, the model is not loaded)."""
    import uvicorn

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    assert main(["serve", "--port", "0", *flags]) == 0
    return apps[0].state.server.config


@pytest.mark.parametrize(("flags", "expected"), SPECULATIVE_FLAGS)
def test_realm_serve_gives_its_speculative_options_to_the_engine(flags, expected, monkeypatch):
    config = _serve_config(monkeypatch, flags).engine.speculative
    assert _fields(config, expected) == {**expected, "method": SpecMethod(expected["method"])}


def test_realm_serve_keeps_a_draft_model_for_requests_beside_another_default(monkeypatch, capsys):
    """Requests may choose the draft model whatever the default: serve loads it beside n-gram or no speculation
    (generate, which has no requests to choose, refuses the pair)."""
    config = _serve_config(monkeypatch, ["--speculative", "ngram", "--draft-model", "draft.gguf"])
    assert config.draft_model == "draft.gguf" and config.engine.speculative.method is SpecMethod.NGRAM
    config = _serve_config(monkeypatch, ["--speculative", "none", "--draft-model", "draft.gguf"])
    assert config.draft_model == "draft.gguf" and config.engine.speculative is None
    config = _serve_config(monkeypatch, ["--draft-model", "draft.gguf"])  # no default named: the draft's
    assert config.engine.speculative.method is SpecMethod.DRAFT
    capsys.readouterr()
    assert main(["generate", "x", "--speculative", "ngram", "--draft-model", "draft.gguf"]) == 2
    assert "--draft-model is for --speculative draft, not ngram" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--speculative", "draft"], "--speculative draft needs --draft-model PATH"),
    (["--speculative", "ngram", "--ngram-min", "3", "--ngram-max", "2"], "ngram_min"),
    (["--speculative", "ngram", "--num-speculative-tokens", "0"], "num_speculative_tokens"),
])
def test_realm_serve_refuses_bad_speculative_options_before_listening(flags, message, capsys):
    assert main(["serve", "--port", "0", *flags]) == 2
    assert message in capsys.readouterr().err


def test_chat_once(loads, capsys):
    rc, out, _err = run(["chat", "What is the capital of France?", "--quiet"], capsys)
    assert rc == 0 and out == "The capital of France is Paris.\n"


def test_chat_interactive_keeps_the_conversation(loads, capsys, monkeypatch, smollm2):
    questions = iter(["What is the capital of France?", "And of Italy?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(questions))
    rc, out, _err = run(["chat", "--quiet", "--max-tokens", "16"], capsys)
    assert rc == 0
    first, second = out.splitlines()[:2]
    assert first == "The capital of France is Paris."
    history = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And of Italy?"}]
    assert second == smollm2.chat(history, max_tokens=16).text


@pytest.mark.parametrize("argv,message", [
    (["generate", "x", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "x", "--top-p", "2"], r"top_p must be in (0, 1]"),
    (["generate", "x", "--max-tokens", "0"], "max_tokens must be >= 1"),
    (["generate", "x", "--model", "/no/such.gguf"], "/no/such.gguf: no such model file"),
    (["chat", "x", "--backend", "tensorrt"], "unknown backend 'tensorrt'; choose one of: torch, triton, onednn"),
])
def test_generate_errors(argv, message, capsys):
    rc, out, err = run(argv, capsys)
    assert rc == 2 and out == ""
    assert err.startswith("realm: error: ") and message in err


def test_generate_rejects_a_non_gguf_file(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("not a model\n" * 10)
    rc, _out, err = run(["generate", "x", "--model", path], capsys)
    assert rc == 2 and "realm: error:" in err and "GGUF" in err


def test_realm_chat_command_answers_paris():
    """The installed command, end to end in a fresh process, on the default model, on whatever device there is."""
    proc = subprocess.run(["realm", "chat", "What is the capital of France?"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "tok/s decode" in proc.stderr


def test_triton_on_cpu_switches_the_interpreter_on(monkeypatch, capsys):
    """--backend triton without a GPU: Triton's interpreter must be on before Triton is imported; the CLI does it and
    says so (a fresh `realm` process has not imported Triton yet, which the test stands in for)."""
    import argparse
    import os

    from realm import cli

    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cli._interpret_triton_on_cpu(argparse.Namespace(backend="torch", device="cpu"))
    assert "TRITON_INTERPRET" not in os.environ
    cli._interpret_triton_on_cpu(argparse.Namespace(backend="triton", device="cpu"))
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert "under Triton's interpreter" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------ batch

TINY_VOCAB, TINY_CONTEXT = 50, 64


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random model (no vocabulary: prompts are token ids), fast enough for batches with preemption."""
    import torch
    from tiny_gguf import StubTokenizer, write_tiny_llama

    from realm.runtime import Backend, Model, load_weights

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_llama(path, context_length=TINY_CONTEXT)
    return Model(load_weights(path), StubTokenizer(TINY_VOCAB), Backend.TORCH, torch.device("cpu"), torch.float32)


@pytest.fixture
def engines(monkeypatch):
    """The EngineConfig of every LLM the CLI makes."""
    import realm.runtime.llm

    configs = []

    class RecordingLLM(realm.runtime.llm.LLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            configs.append(self.engine.config)

    monkeypatch.setattr(realm.runtime.llm, "LLM", RecordingLLM)
    return configs


def _jsonl(*requests) -> str:
    """Requests as JSONL lines; a str is written as it is (a blank or broken line)."""
    import json

    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in requests)


def _results(text: str) -> list[dict]:
    import json

    return [json.loads(line) for line in text.splitlines()]


# ids prompts for the tiny model: mixed lengths, three sharing a 12-token prefix (three full blocks of 4)
SHARED = [7, 3, 30, 12, 44, 9, 1, 25, 16, 38, 5, 21]
TINY_PROMPTS = [[*SHARED, 2, 8], [4, 40, 11], [*SHARED, 19], list(range(1, 23)), [33], [*SHARED, 6, 6, 27, 13]]
TINY_MAX_TOKENS = [10, 14, 6, 9, 12, 8]


@pytest.mark.parametrize("options", [
    [],  # continuous, prefix caching on
    ["--no-prefix-caching"],
    ["--batching", "static", "--max-num-seqs", "3"],
])
def test_batch_equals_each_prompt_alone(tmp_path, capsys, monkeypatch, tiny_model, engines, options):
    """Results in the file's order, each equal to that prompt generated alone; 9 blocks of 4 tokens cannot hold the
    six sequences at once (preemption, recomputation), and 8 tokens a step split the longer prompts into chunks."""
    import realm.runtime
    from realm.runtime import EngineConfig

    monkeypatch.setattr(realm.runtime, "load", lambda *args, **kwargs: tiny_model)
    requests = [{"prompt": p, "max_tokens": n} for p, n in zip(TINY_PROMPTS, TINY_MAX_TOKENS, strict=True)]
    src, dst = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_text(_jsonl(*requests[:2], "", "   ", *requests[2:]))  # blank lines: skipped, still counted
    argv = ["batch", src, "-o", dst, "--kv-blocks", "9", "--block-size", "4", "--max-batch-tokens", "8",
            "--no-progress", *options]
    rc, out, err = run(argv, capsys)
    assert rc == 0 and out == ""
    results = _results(dst.read_text())
    assert [(r["index"], r["line"]) for r in results] == [(0, 1), (1, 2), (2, 5), (3, 6), (4, 7), (5, 8)]
    for r, prompt, n in zip(results, TINY_PROMPTS, TINY_MAX_TOKENS, strict=True):
        alone = tiny_model.generate(prompt, max_tokens=n)
        assert (r["token_ids"], r["text"], r["finish_reason"]) == (alone.token_ids, alone.text, "length")
        assert r["timings"]["prompt_tokens"] == len(prompt) and r["timings"]["generated_tokens"] == n
    timings = [r["timings"] for r in results]
    assert sum(t["preemptions"] for t in timings) > 0
    prefix_caching = "--no-prefix-caching" not in options
    assert (sum(t["cached_tokens"] for t in timings) > 0) == prefix_caching
    static = "static" in options
    assert engines == [EngineConfig(max_batch_tokens=8, max_num_seqs=3 if static else 64, kv_blocks=9, block_size=4,
                                    prefix_caching=prefix_caching, batching="static" if static else "continuous")]
    assert err.startswith(f"[6 requests, 0 failed; {sum(TINY_MAX_TOKENS)} output tokens in ") and "tok/s]" in err


def test_batch_bad_requests_fail_alone(capsys, monkeypatch, loads, smollm2):
    """From standard input, on the default model: every bad line gets its own error line, the good ones (a text, a
    chat, token ids) what they give alone. 16 blocks of 4 tokens: 64 KV slots."""
    import io

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    good = [{"prompt": "The capital of France is"}, {"messages": chat, "max_tokens": 8},
            {"prompt": [1, 9038, 2115], "max_tokens": 3, "stop": ["zzz"], "ignore_eos": True}]
    bad = [
        ("not json", "the line is not JSON: Expecting value at column 1"),
        ("[1, 2]", "a request must be a JSON object, got [1, 2]"),
        ({"prompt": "x", "temprature": 0.5}, "unknown key 'temprature'; a request takes prompt or messages, and "
                                             "max_tokens, temperature, top_k, "),
        ({"max_tokens": 3}, "a request needs either 'prompt' or 'messages'"),
        ({"prompt": "x", "messages": chat}, "a request takes 'prompt' or 'messages', not both"),
        ({"prompt": "x", "temperature": -1}, "temperature must be >= 0 (0 is greedy), got -1"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens must be an integer, got 2.5"),
        ({"prompt": "x", "stop": 5}, "stop must be a string or a list of strings, got 5"),
        ({"prompt": "x", "ignore_eos": "yes"}, 'ignore_eos must be true or false, got "yes"'),
        ('{"prompt": "x", "seed": 1, "seed": 2}', "duplicate key 'seed'"),
        ({"prompt": [1, True]}, "prompt must be text or a list of token ids (integers), got [1, true]"),
        ({"messages": [{"role": "user"}]}, "messages[0] must be an object with string 'role' and 'content'"),
        ({"prompt": ""}, "the prompt is empty"),
        ({"prompt": []}, "the prompt is empty"),
        ({"prompt": [1] * 8192}, "the prompt has 8192 tokens; the model's context holds 8192"),
        ({"prompt": [1] * 62}, "the prompt (62 tokens) and max_tokens (5) need 66 KV slots, 17 blocks of 4; the "
                               "cache has 16 blocks in all"),
        ({"prompt": [49152]}, "prompt token ids out of range [0, 49152): [49152]"),
    ]
    lines = [good[0], *[b for b, _ in bad[:9]], good[1], *[b for b, _ in bad[9:]], good[2]]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(_jsonl(*lines).encode())))
    argv = ["batch", "-", "--max-tokens", "5", "--kv-blocks", "16", "--block-size", "4", "--no-progress", "--quiet"]
    rc, out, err = run(argv, capsys)
    assert rc == 0 and err == ""
    results = _results(out)
    assert [(r["index"], r["line"]) for r in results] == [(i, i + 1) for i in range(len(lines))]
    errors = [r for r in results if r["finish_reason"] == "error"]
    assert len(errors) == len(bad)
    for r, (_, message) in zip(errors, bad, strict=True):
        assert set(r) == {"index", "line", "finish_reason", "error"}
        assert r["error"].startswith(message), (r, message)
    texts = [r for r in results if r["finish_reason"] != "error"]
    alone = [smollm2.generate("The capital of France is", max_tokens=5), smollm2.chat(chat, max_tokens=8),
             smollm2.generate([1, 9038, 2115], max_tokens=3, stop=("zzz",), ignore_eos=True)]
    assert [r["index"] for r in texts] == [0, 10, len(lines) - 1]
    for r, a in zip(texts, alone, strict=True):
        assert (r["text"], r["token_ids"], r["finish_reason"]) == (a.text, a.token_ids, a.finish_reason.value)
    assert texts[1]["text"] == "The capital of France is Paris."


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-batch-tokens", "0"], "max_batch_tokens must be an integer >= 1, got 0"),
    (["--max-num-seqs", "0"], "max_num_seqs must be an integer >= 1, got 0"),
    (["--kv-blocks", "0"], "kv_blocks must be an integer >= 1, got 0"),
    (["--block-size", "0"], "block_size must be an integer >= 1, got 0"),
    (["--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
    (["-o", "/no/such/dir/out.jsonl"], "/no/such/dir/out.jsonl: output directory /no/such/dir does not exist"),
])
def test_batch_option_errors_exit_2_before_the_model_loads(tmp_path, capsys, loads, argv, message):
    src = tmp_path / "requests.jsonl"
    src.write_text(_jsonl({"prompt": "x"}))
    rc, out, err = run(["batch", src, *argv], capsys)
    assert (rc, out, err) == (2, "", f"realm: error: {message}\n")
    assert loads == []


def test_batch_refuses_to_overwrite_its_input_or_an_unwritable_output(tmp_path, capsys, loads, monkeypatch):
    src = tmp_path / "requests.jsonl"
    src.write_text(_jsonl({"prompt": "x"}))
    rc, out, err = run(["batch", src, "-o", tmp_path / "." / "requests.jsonl"], capsys)
    assert (rc, out) == (2, "") and "is the input file; the results would overwrite the requests" in err
    assert src.read_text() == _jsonl({"prompt": "x"}) and loads == []
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # root may write anywhere (as CI runs): the permission is what os.access says
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    rc, out, err = run(["batch", src, "-o", locked / "out.jsonl"], capsys)
    assert rc == 2 and err.endswith("out.jsonl: not writable\n") and loads == []


def test_a_failed_forward_is_an_error_not_an_answer(capsys, monkeypatch, loads):
    """realm generate on one request: when its step's forward raises, the command says so and exits 2 (the engine
    contains the failure; a single request has nothing else to protect, so it is not passed off as text)."""
    from realm.runtime.runner import ModelRunner

    def broken(self, plan, draft_probs=None):
        raise RuntimeError("device lost")

    monkeypatch.setattr(ModelRunner, "execute", broken)
    rc, _out, err = run(["generate", "Hello", "--max-tokens", "3"], capsys)
    assert rc == 2 and "realm: error: generation failed: the step failed: RuntimeError: device lost" in err


def test_batch_writes_each_result_as_soon_as_those_before_it_are_done(tmp_path, capsys, monkeypatch, tiny_model):
    """Results leave in request order, each as soon as it and every one before it are done: when the batch stops
    (here an interrupt after the third completion), what finished before is in the file, in order, flushed."""
    import json

    import realm.runtime
    import realm.runtime.llm

    monkeypatch.setattr(realm.runtime, "load", lambda *args, **kwargs: tiny_model)
    src, dst = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    lengths = [2, 30, 3, 4, 40]  # 0 ends first; 2 and 3 end before 1, so they wait for it; 4 ends last
    src.write_text(_jsonl(*({"prompt": TINY_PROMPTS[i], "max_tokens": n} for i, n in enumerate(lengths))))
    original = realm.runtime.llm.LLM.completions
    seen, on_disk = [], []

    def interrupted(self, *args, **kwargs):
        for i, completion in original(self, *args, **kwargs):
            on_disk.append([json.loads(line)["index"] for line in dst.read_text().splitlines()])
            seen.append(i)
            yield i, completion
            if len(seen) == 4:
                raise KeyboardInterrupt

    monkeypatch.setattr(realm.runtime.llm.LLM, "completions", interrupted)
    rc, _out, err = run(["batch", src, "-o", dst, "--kv-blocks", "64", "--no-progress"], capsys)
    assert rc == 130 and "interrupted" in err
    assert seen == [0, 2, 3, 1]
    assert on_disk == [[], [0], [0], [0]]  # 2 and 3 wait for 1
    results = _results(dst.read_text())
    assert [r["index"] for r in results] == [0, 1, 2, 3]  # 1 arrived: 2 and 3 followed it; 4 never finished
    assert [len(r["token_ids"]) for r in results] == lengths[:4]


def test_batch_rows_that_utf8_cannot_hold_are_escaped_not_lost():
    from realm.batch_file import json_line

    assert json_line({"text": "é"}) == '{"text": "é"}\n'
    assert json_line({"error": "bad \ud800 here"}) == '{"error": "bad \\ud800 here"}\n'


def test_batch_missing_file_and_usage_errors(tmp_path, capsys, loads):
    missing = tmp_path / "missing.jsonl"
    rc, _out, err = run(["batch", missing], capsys)
    assert (rc, err) == (2, f"realm: error: {missing}: No such file or directory\n")
    with pytest.raises(SystemExit) as e:
        main(["batch", str(missing), "--batching", "dynamic"])
    assert e.value.code == 2 and "invalid choice: 'dynamic'" in capsys.readouterr().err
    assert loads == []


def test_batch_help_documents_the_format_and_exit_status(capsys):
    with pytest.raises(SystemExit) as e:
        main(["batch", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for text in ("--prefix-caching, --no-prefix-caching", "blank lines are skipped", '"messages"',
                 "max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, ignore_eos",
                 "Exit status: 0 when the batch ran, even if some of its requests failed"):
        assert text in out, text


def test_batch_on_the_triton_backend(tmp_path, capsys, monkeypatch, tiny_model):
    """--backend triton: the loaded Model brings its backend to the engine (on CPU: under Triton's interpreter)."""
    import realm.runtime
    from realm.runtime import Backend, Model

    triton_model = Model(tiny_model.weights, tiny_model.tokenizer, Backend.TRITON, tiny_model.device, tiny_model.dtype)
    backends = []

    def fake_load(model, device=None, backend="torch", dtype=None):
        backends.append(backend)
        return triton_model

    monkeypatch.setattr(realm.runtime, "load", fake_load)
    src = tmp_path / "requests.jsonl"
    src.write_text(_jsonl(*({"prompt": p, "max_tokens": 3} for p in TINY_PROMPTS[:2])))
    rc, out, _err = run(["batch", src, "--backend", "triton", "--kv-blocks", "16", "--no-progress", "--quiet"], capsys)
    assert rc == 0 and backends == ["triton"]
    assert [r["token_ids"] for r in _results(out)] == [tiny_model.generate(p, max_tokens=3).token_ids
                                                       for p in TINY_PROMPTS[:2]]
