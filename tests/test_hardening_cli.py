"""The command line against hostile input (issue 14): every bad input of a kind is refused with `realm: error: ...`
(status 2) or its own error row, naming what is wrong, before any work; the rest of a batch is unaffected; no
traceback, nothing hangs.

    nesting   a batch line nested 100000 deep (json.loads' RecursionError), and its variants
    output    -o that is the input (however spelled), a directory, in a missing or unwritable directory; rows that
              the output's encoding cannot hold
    bytes     command-line text and chat lines that are not UTF-8 (Python's surrogateescape)
    edges     quantize onto a directory or the input, SIGTERM mid-quantize, --device cpu:5, dequantize(shape=4.7)
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_gguf import write_model

import realm.quantize_file
import realm.runtime
from realm.batch_file import MAX_NESTING
from realm.cli import EXIT_TERMINATED, main
from realm.quant import QuantError, dequantize, quantize
from realm.runtime.model import resolve_device

TINY_VOCAB = 50
PROMPTS = [[7, 3, 30, 12], [4, 40, 11], [33]]  # the good requests of each batch below, token ids
MAX_TOKENS = [5, 3, 4]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random model without a vocabulary (prompts are token ids): batches of it run in well under a second."""
    from tiny_gguf import StubTokenizer, write_tiny_llama

    from realm.runtime import Backend, Model, load_weights

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_llama(path, context_length=64)
    return Model(load_weights(path), StubTokenizer(TINY_VOCAB), Backend.TORCH, torch.device("cpu"), torch.float32)


@pytest.fixture
def loads(monkeypatch, tiny_model):
    """The CLI's model loads, answered with the tiny model; the list of the loads asked for."""
    calls = []

    def fake_load(model, device=None, backend="torch", dtype=None):
        calls.append(model)
        return tiny_model

    monkeypatch.setattr(realm.runtime, "load", fake_load)
    return calls


def run(argv, capsys) -> tuple[int, str, str]:
    rc = main([a if isinstance(a, str) else str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(rc: int, out: str, err: str, *words: str) -> None:
    """Status 2, one `realm: error:` line naming the problem, nothing on stdout, no traceback."""
    assert (rc, out) == (2, ""), (rc, out, err)
    assert err.startswith("realm: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def good_lines() -> list[str]:
    return [json.dumps({"prompt": p, "max_tokens": n}) for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)]


def run_batch(lines: list[str | bytes], tmp_path, capsys, *options) -> tuple[list[dict], str]:
    """The lines as a JSONL file through `realm batch`; its rows (status 0, no traceback) and stderr."""
    src = tmp_path / "requests.jsonl"
    src.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    rc, out, err = run(["batch", src, "--kv-blocks", "64", "--no-progress", "--quiet", *options], capsys)
    assert rc == 0 and "Traceback" not in err, err
    return [json.loads(line) for line in out.splitlines()], err


def assert_good_rows_equal_solo(rows: list[dict], tiny_model) -> None:
    """The rows of good_lines(), wherever they are: each what its prompt gives alone."""
    good = [r for r in rows if r["finish_reason"] != "error"]
    assert len(good) == len(PROMPTS), rows
    for r, prompt, n in zip(good, PROMPTS, MAX_TOKENS, strict=True):
        alone = tiny_model.generate(prompt, max_tokens=n)
        assert (r["token_ids"], r["text"]) == (alone.token_ids, alone.text)
        assert r["finish_reason"] == alone.finish_reason.value


# ------------------------------------------------------------------------------------------------ 1. deep nesting


def deep(n: int) -> str:
    return "[" * n + "]" * n


NESTED = [  # (line, what its error row says)
    ('{"prompt": ' + deep(100_000) + "}", "the value of 'prompt' nests arrays and objects more than 32 deep"),
    (deep(100_000), "the line nests arrays and objects more than 32 deep"),
    ("{" + '"a": {' * 5000 + "}" * 5000 + "}", "the value of 'a' nests arrays and objects more than 32 deep"),
    ('{"prompt": [1], "seed": ' + deep(MAX_NESTING) + "}", "the value of 'seed' nests"),
    ('{"messages": [{"role": "user", "content": ' + deep(40) + "}]}", "the value of 'messages' nests"),
    ('{"prompt": [1], "stop": ' + "[" * 200_000, "the value of 'stop' nests"),  # unclosed, too
    ('{"pr\\u006fmpt": ' + deep(50) + "}", "the value of 'prompt' nests"),  # the key as JSON reads it
    (deep(MAX_NESTING), "a request must be a JSON object"),  # just within the limit: the next check speaks
    ('{"prompt": [1], "seed": ' + deep(MAX_NESTING - 1) + "}", "seed must be an integer"),
    ('{"prompt": [1], "ignore_eos": "' + "[" * 100_000 + '"}', 'ignore_eos must be true or false, got "[[['),
    ('{"prompt": "\\"' + "[" * 100_000, "the line is not JSON: Unterminated string"),
    ('{"prompt": [1], "seed": "' + '\\"' * 100_000, "the line is not JSON"),  # linear, not quadratic, to scan
]


def test_batch_lines_nested_too_deep_fail_alone(tmp_path, capsys, loads, tiny_model, monkeypatch):
    """A line nested deeper than MAX_NESTING gets an error row naming the request's key (a chat needs 3 levels);
    json.loads' RecursionError never escapes, even on a thread with less stack left."""
    bad = [line for line, _ in NESTED]
    lines = [good_lines()[0], *bad[:6], good_lines()[1], *bad[6:], good_lines()[2]]
    start = time.perf_counter()
    rows, _ = run_batch(lines, tmp_path, capsys)
    assert time.perf_counter() - start < 30
    assert [(r["index"], r["line"]) for r in rows] == [(i, i + 1) for i in range(len(lines))]
    errors = [r for r in rows if r["finish_reason"] == "error"]
    for r, (_, message) in zip(errors, NESTED, strict=True):
        assert message in r["error"], (r["error"][:200], message)
    assert_good_rows_equal_solo(rows, tiny_model)


def test_batch_line_json_loads_cannot_parse_fails_alone(tmp_path, capsys, loads, tiny_model, monkeypatch):
    """Whatever json.loads raises on one line (here: RecursionError at a shallow depth, a number of more digits than
    Python converts, any other exception) is that line's error row."""
    import realm.batch_file

    real_loads = json.loads

    def shallow_stack(text, **kwargs):
        if text.endswith('"recurse": 1}'):
            raise RecursionError("maximum recursion depth exceeded while decoding a JSON array")
        if text.endswith('"boom": 1}'):
            raise TypeError("something unexpected")
        return real_loads(text, **kwargs)

    monkeypatch.setattr(realm.batch_file.json, "loads", shallow_stack)
    bad = [('{"prompt": [[[1]]], "recurse": 1}', "the line nests arrays and objects too deeply"),
           ('{"prompt": [1], "boom": 1}', "cannot read the request: TypeError: something unexpected"),
           ('{"prompt": [1], "seed": 1' + "0" * 5000 + "}", "the line cannot be read as JSON: Exceeds the limit"),
           ('{"prompt": [1], "temperature": 1' + "0" * 400 + "}", "temperature must be a finite number, got an "
                                                                  "integer of 401 digits"),
           ('{"prompt": [1], "top_p": -1' + "0" * 400 + "}", "top_p must be a finite number"),
           ("{" + ", ".join(f'"k{i}": {i}' for i in range(20_000)) + ', "k7": 0}', "duplicate key 'k7'"),
           ("{" + ", ".join(f'"k{i}": {i}' for i in range(20_000)) + "}", "unknown keys 'k0', 'k1', 'k2', 'k3', "
                                                                           "'k4' and 19995 more; a request takes")]
    lines = [good_lines()[0], *[b for b, _ in bad[:3]], *good_lines()[1:], *[b for b, _ in bad[3:]]]
    rows, _ = run_batch(lines, tmp_path, capsys)
    assert len(rows) == len(lines)
    errors = [r for r in rows if r["finish_reason"] == "error"]
    for r, (_, message) in zip(errors, bad, strict=True):
        assert r["error"].startswith(message), (r["error"][:200], message)
    assert_good_rows_equal_solo(rows, tiny_model)


# ------------------------------------------------------------------------------------------------------- 2. output


def test_batch_refuses_every_spelling_of_its_input_as_output(tmp_path, capsys, loads, monkeypatch):
    src = tmp_path / "requests.jsonl"
    text = "\n".join(good_lines()) + "\n"
    src.write_text(text)
    (tmp_path / "sub").mkdir()
    os.symlink(src, tmp_path / "symlink.jsonl")
    os.link(src, tmp_path / "hardlink.jsonl")
    os.symlink(tmp_path / "sub", tmp_path / "dirlink")
    monkeypatch.chdir(tmp_path)
    same = ["requests.jsonl", str(src), "./sub/../requests.jsonl", "symlink.jsonl", "hardlink.jsonl",
            str(tmp_path / "dirlink" / ".." / "requests.jsonl")]
    for out in same:
        rc, stdout, err = run(["batch", "requests.jsonl", "-o", out], capsys)
        assert_refused(rc, stdout, err, "is the input file; the results would overwrite the requests")
    for out in ("sub", "dirlink", ".", str(tmp_path)):
        rc, stdout, err = run(["batch", src, "-o", out], capsys)
        assert_refused(rc, stdout, err, f"{Path(out)}: is a directory")
    for out in ("missing/out.jsonl", str(tmp_path / "missing" / "deeper" / "out.jsonl")):
        rc, stdout, err = run(["batch", src, "-o", out], capsys)
        assert_refused(rc, stdout, err, "output directory", "does not exist")
    os.symlink(tmp_path / "missing" / "x.jsonl", tmp_path / "dangling.jsonl")  # open() finds it: still no model
    rc, stdout, err = run(["batch", src, "-o", "dangling.jsonl"], capsys)
    assert_refused(rc, stdout, err, "dangling.jsonl: No such file or directory")
    real_access = os.access  # root may write anywhere: the permission is what os.access says
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p).name == "sub" else real_access(p, mode))
    rc, stdout, err = run(["batch", src, "-o", "sub/out.jsonl"], capsys)
    assert_refused(rc, stdout, err, "sub/out.jsonl: not writable")
    assert src.read_text() == text and loads == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.jsonl", "dirlink", "hardlink.jsonl",
                                                          "requests.jsonl", "sub", "symlink.jsonl"]


def test_batch_keeps_an_existing_output_until_its_first_row(tmp_path, capsys, monkeypatch):
    """A model that will not load: an existing OUT keeps its contents (old results are not wiped for nothing), an OUT
    the batch would have created is not left behind empty; once a row is written, OUT holds only the new rows."""
    src, old, new = tmp_path / "requests.jsonl", tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    src.write_text("\n".join(good_lines()) + "\n")
    old.write_text("earlier results\n")

    def broken(*args, **kwargs):
        raise ValueError("not a GGUF file")

    monkeypatch.setattr(realm.runtime, "load", broken)
    for out in (old, new):
        rc, stdout, err = run(["batch", src, "-o", out], capsys)
        assert_refused(rc, stdout, err, "not a GGUF file")
    assert old.read_text() == "earlier results\n" and not new.exists()
    src.write_text("[1]\n\n")  # only a bad line: its row replaces the old contents, and no model loads
    rc, _, _ = run(["batch", src, "-o", old, "--quiet"], capsys)
    assert rc == 0 and [r["error"] for r in map(json.loads, old.read_text().splitlines())] == [
        "a request must be a JSON object, got [1]"]
    src.write_text("\n  \n")  # no request at all: an empty OUT
    rc, _, _ = run(["batch", src, "-o", old, "--quiet"], capsys)
    assert rc == 0 and old.read_text() == ""


UNENCODABLE = [  # lines whose error rows echo text that UTF-8 (or ASCII) cannot hold, or that splits lines
    '{"prompt": [1], "\\ud800": 1}',
    '{"prompt": [1], "caf\\udcc3": "\\udfff"}',
    '{"prompt": ["\\ud800", 1]}',
    '{"messages": [{"role": "\\udcff", "content": 5}]}',
    '{"prompt": [1], "stop": [1, "\\ud83d"]}',
    '{"prompt": [1], "ignore_eos": "\\udc80\\u00e9"}',
    '"line\\u2028separator"',  # line breaks to str.splitlines(): escaped in the row, which stays one line
    '{"prompt": [1], "next\\u0085line\\u2029": 1}',
    '{"prompt": [1], "\\u00e9t\\u00e9": 1}',
]


@pytest.mark.parametrize("encoding", ["file", "utf-8", "ascii"])
def test_batch_rows_the_output_cannot_encode_are_escaped_not_lost(tmp_path, capsys, monkeypatch, loads, tiny_model,
                                                                  encoding):
    """Error rows echo the bad keys and values: a lone surrogate in UTF-8, or any non-ASCII text on an ASCII stdout,
    is written \\u-escaped; every row is there, valid JSON, in order, and the good requests ran."""
    lines = [good_lines()[0], *UNENCODABLE[:4], *good_lines()[1:], *UNENCODABLE[4:]]
    src, dst = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_text("\n".join(lines) + "\n")
    if encoding == "file":
        rc, _, err = run(["batch", src, "-o", dst, "--quiet", "--no-progress"], capsys)
        data = dst.read_bytes()
    else:
        stdout = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors="strict", write_through=True)
        monkeypatch.setattr(sys, "stdout", stdout)
        rc = main(["batch", str(src), "--quiet", "--no-progress"])
        data = stdout.buffer.getvalue()
        err = capsys.readouterr().err
    assert rc == 0 and err == ""
    rows = [json.loads(line) for line in data.decode(encoding if encoding != "file" else "utf-8").splitlines()]
    assert [(r["index"], r["line"]) for r in rows] == [(i, i + 1) for i in range(len(lines))]
    errors = [r["error"] for r in rows if r["finish_reason"] == "error"]
    assert len(errors) == len(UNENCODABLE) and all(errors)
    assert "'\\ud800'" in errors[0] and "é" in errors[-1]  # the key as the request wrote it
    assert_good_rows_equal_solo(rows, tiny_model)


# ---------------------------------------------------------------------------------------- 4. bytes that are not UTF-8

NOT_UTF8 = [  # argv as Python decodes it (surrogateescape), and what the error says
    (["generate", "caf\udcc3"], "the prompt is not UTF-8 text: byte 0xc3 at character 3"),
    (["generate", "\udcff\udcfe"], "the prompt is not UTF-8 text: byte 0xff at character 0"),
    (["generate", "ok", "--stop", "x", "--stop", "\udc80"], "the --stop text is not UTF-8 text: byte 0x80"),
    (["chat", "caf\udce9 au lait?"], "the question is not UTF-8 text: byte 0xe9 at character 3"),
    (["chat", "hi", "--system", "be \udcc3\udca9"], "the system message (--system) is not UTF-8 text: byte 0xc3"),
    (["chat", "--system", "\udcc0"], "the system message (--system) is not UTF-8 text: byte 0xc0"),
    (["batch", "-", "--stop", "\udce2\udc80"], "the --stop text is not UTF-8 text: byte 0xe2"),
    (["generate", "a\ud800b"], "the prompt is not text: a lone surrogate U+D800 at character 1"),
]


@pytest.mark.parametrize(("argv", "message"), NOT_UTF8)
def test_command_line_text_that_is_not_utf8_is_refused_before_the_model_loads(capsys, loads, argv, message):
    rc, out, err = run(argv, capsys)
    assert_refused(rc, out, err, message)
    assert loads == []


@pytest.mark.parametrize("env", [{}, {"LC_ALL": "C"}])
def test_the_real_command_refuses_argv_bytes_that_are_not_utf8(tmp_path, env):
    """The bytes as a shell passes them (`realm generate $'caf\\xc3'`), in a fresh process, whatever the locale."""
    proc = subprocess.run([sys.executable, "-m", "realm", "generate", b"caf\xc3", "--model", "/no/such.gguf"],
                          capture_output=True, timeout=120, env={**os.environ, **env},
                          cwd=Path(realm.__file__).parent.parent)
    assert proc.returncode == 2
    assert proc.stderr == b"realm: error: the prompt is not UTF-8 text: byte 0xc3 at character 3\n"


class EchoModel:
    """Stands in for a loaded model in the interactive chat: records each conversation it is asked to answer."""

    def __init__(self):
        self.conversations = []

    def __repr__(self) -> str:
        return "EchoModel"

    def chat_prompt(self, messages):
        self.conversations.append([dict(m) for m in messages])
        return [1]

    def stream(self, ids, params):
        from realm.runtime import Completion, FinishReason, Timings

        class Stream:
            text = f"answer {len(self.conversations)}"
            completion = Completion(text, [1], FinishReason.LENGTH, ids, Timings())

            def __iter__(self):
                return iter([type("Event", (), {"text": self.text})()])

        return Stream()


CHAT_INPUT = [b"first question", b"caf\xc3", b"\xff\xfe\x00", b"second question", b"\xe2\x82", b"", b"never read"]


@pytest.mark.parametrize("errors", ["strict", "surrogateescape", "input"])
def test_interactive_chat_refuses_a_line_that_is_not_utf8_and_goes_on(capsys, monkeypatch, errors):
    """stdin read strictly (PYTHONIOENCODING=utf-8), with surrogateescape (the C or UTF-8 locale), or through input()
    (a terminal): each bad line is one `realm: error:` turn, the conversation goes on without it, the lines after it
    are not lost."""
    model = EchoModel()
    monkeypatch.setattr(realm.runtime, "load", lambda *args, **kwargs: model)
    data = b"\n".join(CHAT_INPUT) + b"\n"
    if errors == "input":  # a terminal: input() decodes with surrogateescape, or raises for that one line
        lines = iter([b.decode("utf-8", "surrogateescape") for b in CHAT_INPUT[:2]]
                     + [UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")]
                     + [b.decode("utf-8", "surrogateescape") for b in CHAT_INPUT[3:]])

        def fake_input(prompt=""):
            line = next(lines)
            if isinstance(line, Exception):
                raise line
            return line

        monkeypatch.setattr("builtins.input", fake_input)
    else:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors=errors))
    rc, out, err = run(["chat", "--quiet"], capsys)
    assert rc == 0 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("realm: error:")] == [
        "realm: error: the message is not UTF-8 text: byte 0xc3 at character 3",
        "realm: error: the message is not UTF-8 text: invalid start byte at byte 0" if errors == "input" else
        "realm: error: the message is not UTF-8 text: byte 0xff at character 0",
        "realm: error: the message is not UTF-8 text: byte 0xe2 at character 0"]
    first = {"role": "user", "content": "first question"}
    assert model.conversations == [[first], [first, {"role": "assistant", "content": "answer 1"},
                                            {"role": "user", "content": "second question"}]]
    assert "answer 1" in out and "answer 2" in out


# ---------------------------------------------------------------------------------------------------- 7. rough edges


@pytest.fixture
def gguf_model(tmp_path) -> Path:
    path = tmp_path / "model.gguf"
    write_model(path)
    return path


def test_quantize_refuses_an_output_it_could_not_write_before_any_work(tmp_path, capsys, monkeypatch, gguf_model):
    planned = []
    real_plan = realm.quantize_file._plan
    monkeypatch.setattr(realm.quantize_file, "_plan", lambda *a: planned.append(1) or real_plan(*a))
    (tmp_path / "outdir").mkdir()
    os.symlink(tmp_path / "outdir", tmp_path / "dirlink")
    os.symlink(gguf_model, tmp_path / "symlink.gguf")
    os.link(gguf_model, tmp_path / "hardlink.gguf")
    (tmp_path / "blocked.gguf.partial").mkdir()
    os.mkfifo(tmp_path / "fifo")
    os.symlink("/dev/null", tmp_path / "null")
    monkeypatch.chdir(tmp_path)
    cases = [
        ("outdir", "outdir: is a directory; the output must be a file path"),
        ("dirlink", "dirlink: is a directory"),
        (".", ".: is a directory"),
        ("symlink.gguf", "symlink.gguf: output is the input file"),
        ("hardlink.gguf", "hardlink.gguf: output is the input file"),
        ("./outdir/../model.gguf", "output is the input file"),
        (str(gguf_model), "output is the input file"),
        ("missing/out.gguf", "missing/out.gguf: output directory missing does not exist"),
        ("blocked.gguf", "blocked.gguf.partial: is a directory, in the way"),
        ("fifo", "fifo: is not a regular file (a device or a FIFO?)"),  # it would be replaced by the file
        ("null", "null: is not a regular file"),
        ("/dev/null", "/dev/null: is not a regular file"),
    ]
    for out, message in cases:
        rc, stdout, err = run(["quantize", "model.gguf", out, "--type", "Q8_0", "--no-progress"], capsys)
        assert_refused(rc, stdout, err, message)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p).name == "outdir" else real_access(p, mode))
    rc, stdout, err = run(["quantize", "model.gguf", "outdir/out.gguf", "--type", "Q8_0"], capsys)
    assert_refused(rc, stdout, err, "outdir/out.gguf: output directory outdir is not writable")
    assert planned == [] and list((tmp_path / "outdir").iterdir()) == []


def test_sigterm_exits_143_after_the_same_cleanup_as_ctrl_c(capsys, monkeypatch):
    """In-process: SIGTERM during a command raises Terminated (a KeyboardInterrupt, so every cleanup for Ctrl-C
    runs), main() says so and returns 143; the previous handler is back afterwards."""
    from realm.cli import COMMANDS, Command

    cleaned = []

    def run_until_killed(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        except KeyboardInterrupt:
            cleaned.append(True)
            raise
        return 0

    monkeypatch.setitem(COMMANDS, "slow", Command("slow", "wait", lambda parser: None, run_until_killed))
    before = signal.getsignal(signal.SIGTERM)
    start = time.perf_counter()
    rc, out, err = run(["slow"], capsys)
    assert (rc, out, err) == (EXIT_TERMINATED, "", "realm: terminated\n") and rc == 143
    assert cleaned == [True] and time.perf_counter() - start < 4
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_during_quantize_leaves_no_partial_output(tmp_path):
    """A real `realm quantize` of the packaged model, terminated once OUT.partial exists: status 143, and neither
    OUT.partial nor OUT is left."""
    from realm.models import default_model_path

    try:
        src = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path / "out.gguf"
    partial = tmp_path / "out.gguf.partial"
    proc = subprocess.Popen([sys.executable, "-m", "realm", "quantize", str(src), str(out), "--type", "Q8_0",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(realm.__file__).parent.parent)
    try:
        deadline = time.monotonic() + 120
        while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert partial.exists(), "the quantize never started writing"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and err == b"realm: terminated\n"
    assert not partial.exists() and not out.exists()


@pytest.mark.parametrize("device", ["cpu:5", "cpu:1", "cuda:7", "cuda:-1", "meta", "tpu:0", "", "cpu:x"])
def test_a_device_that_cannot_work_is_refused_before_the_model_loads(capsys, loads, device, tmp_path):
    src = tmp_path / "requests.jsonl"
    src.write_text(good_lines()[0] + "\n")
    for argv in (["generate", "x"], ["chat", "x"], ["batch", str(src)]):
        rc, out, err = run([*argv, "--device", device], capsys)
        assert_refused(rc, out, err, f"{device!r}")
    assert loads == []


def test_resolve_device_names_the_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cpu:0") == torch.device("cpu")  # as CPU tensors report their device
    assert resolve_device(None).type in ("cpu", "cuda")
    for device in ("cpu:5", torch.device("cpu", 1), "cpu:1"):
        with pytest.raises(ValueError, match=r"device 'cpu:\d' does not exist: torch has one CPU device"):
            resolve_device(device)
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"device 'cuda:{n}' requested, but torch sees"):
        resolve_device(f"cuda:{n}")


BAD_SHAPES = [(4.7, 256), (4, 256.0), (True, 256), (4, False), (-4, 256), (4, -256), "4,256", b"x", 256, 4.7, None,
              {4, 256}, (), (np.float64(4), 256), (np.bool_(True), 256), (torch.tensor(4.0), 256),
              (torch.tensor([4, 1]), 256), ("4", 256)]


@pytest.mark.parametrize("shape", BAD_SHAPES, ids=repr)
def test_dequantize_refuses_shapes_that_are_not_sizes(shape):
    data = quantize(torch.randn(4, 256), "Q8_0")
    with pytest.raises(QuantError, match="shape"):
        dequantize(data, "Q8_0", shape)


@pytest.mark.parametrize("shape", [(4.7, 256), (4, 256.0), (True, 256), (-4, 256), (np.float64(4), 256)], ids=repr)
def test_qtensor_refuses_shapes_that_are_not_sizes(shape):
    from realm.quant import QTensor

    with pytest.raises(QuantError, match=r"shape"):
        QTensor(quantize(torch.randn(4, 256), "Q8_0").reshape(4, -1), "Q8_0", shape)


def test_dequantize_takes_any_integer_sizes():
    x = torch.randn(4, 256)
    data = quantize(x, "Q8_0")
    want = dequantize(data, "Q8_0", (4, 256))
    for shape in ([4, 256], torch.Size([4, 256]), (np.int64(4), np.int32(256)), (torch.tensor(4), 256),
                  iter([4, 256])):
        assert torch.equal(dequantize(data, "Q8_0", shape), want)
    assert dequantize(quantize(torch.randn(0, 32), "Q4_0"), "Q4_0", (0, 32)).shape == (0, 32)


def test_text_and_chat_requests_to_a_model_without_a_vocabulary_fail_alone(tmp_path, capsys, loads, tiny_model):
    lines = [*good_lines(), json.dumps({"prompt": "hello"}),
             json.dumps({"messages": [{"role": "user", "content": "hi"}]}), json.dumps({"prompt": "caf\udcc3"})]
    rows, _ = run_batch(lines, tmp_path, capsys)
    assert [r["line"] for r in rows] == list(range(1, len(lines) + 1))
    assert_good_rows_equal_solo(rows, tiny_model)
    errors = [r["error"] for r in rows[len(PROMPTS):]]
    assert "has no vocabulary (tokenizer.ggml.tokens): give the prompt as token ids" in errors[0]
    assert "has no vocabulary (tokenizer.ggml.tokens), hence no chat template" in errors[1]
    assert "lone surrogate U+DCC3 at character 3" in errors[2]


@pytest.mark.parametrize("how", ["redirected", "/dev/stdin"])
def test_batch_refuses_to_overwrite_its_standard_input(tmp_path, how):
    """`realm batch - -o FILE < FILE`, and `-o /dev/stdin`: the output is what standard input reads."""
    src = tmp_path / "requests.jsonl"
    src.write_text('{"prompt": [1, 2], "max_tokens": 2}\n')
    out = src if how == "redirected" else Path("/dev/stdin")
    with open(src, "rb") as stdin:
        proc = subprocess.run([sys.executable, "-m", "realm", "batch", "-", "-o", str(out), "--model", "/no/such.gguf"],
                              stdin=stdin, capture_output=True, timeout=120, cwd=Path(realm.__file__).parent.parent)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.decode() == (f"realm: error: {out}: is the input (standard input); the results would "
                                    "overwrite the requests\n")
    assert src.read_text() == '{"prompt": [1, 2], "max_tokens": 2}\n'


def test_batch_without_standard_output_is_refused_before_any_work(tmp_path, capsys, loads, monkeypatch):
    src = tmp_path / "requests.jsonl"
    src.write_text('{"prompt": [1, 2]}\n')
    monkeypatch.setattr(sys, "stdout", None)  # `realm batch FILE >&-`
    rc = main(["batch", str(src)])
    assert rc == 2 and loads == []
    assert capsys.readouterr().err == "realm: error: standard output is closed: give -o FILE for the results\n"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_batch_output_that_fails_to_write_names_the_file(tmp_path, capsys, loads):
    src = tmp_path / "requests.jsonl"
    src.write_text('{"prompt": [1, 2], "max_tokens": 2}\n')
    rc, out, err = run(["batch", src, "-o", "/dev/full", "--no-progress", "--quiet"], capsys)
    assert_refused(rc, out, err, "/dev/full: No space left on device")


def test_batch_output_to_dev_null_runs(tmp_path, capsys, loads):
    src = tmp_path / "requests.jsonl"
    src.write_text('{"prompt": [1, 2], "max_tokens": 2}\n')
    assert run(["batch", src, "-o", "/dev/null", "--no-progress", "--quiet"], capsys) == (0, "", "")


def test_a_model_on_cpu_0_generates_as_on_cpu(tiny_model):
    from realm.runtime import Backend, Model

    on_cpu0 = Model(tiny_model.weights, tiny_model.tokenizer, Backend.TORCH, resolve_device("cpu:0"), torch.float32)
    out = on_cpu0.generate([1, 2, 3], max_tokens=3)
    assert out.error is None and out.token_ids == tiny_model.generate([1, 2, 3], max_tokens=3).token_ids
