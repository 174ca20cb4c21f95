"""`realm batch` fuzzed (issue 14): random JSONL lines, good and bad, through the command in-process on a tiny model
with a real vocabulary. Whatever the lines, the batch runs (status 0, no traceback), writes exactly one row per
non-blank line in the file's order, an error row (naming the field, where one field is wrong) for each line that
cannot run, and for each line that can, the result the same request gives alone.

The oracle for a line that parses: SamplingParams built from its fields (a refusal must come back as an error row
naming the field), then the request run alone (`Model.generate`; a ValueError or GenerationError there must be the
line's error row). Seeded and greedy requests must give the same tokens as alone; an unseeded sampled one only a
sane length and finish reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import realm.runtime
from realm.batch_file import MAX_NESTING
from realm.cli import main
from realm.runtime import Completion, GenerationError, SamplingParams

# CI runs a fixed set of examples (reproducible); REALM_FUZZ_EXPLORE=1 draws new ones each run, to look for more
EXPLORE = os.environ.get("REALM_FUZZ_EXPLORE") == "1"

CONTEXT = 96
DEFAULT_MAX_TOKENS = 3  # the command line's --max-tokens: for the requests that leave it out
FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random llama (hidden 64, 2 layers) with SmolLM2's vocabulary and chat template, so text prompts and
    chats go through the real tokenizer."""
    from tiny_gguf import write_tiny_llama

    from realm.gguf_io import open_gguf, read_metadata
    from realm.models import default_model_path
    from realm.runtime import Backend, Model, Tokenizer, load_weights

    try:
        vocabulary = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tokenizer = Tokenizer.from_metadata(read_metadata(open_gguf(vocabulary)))
    path = tmp_path_factory.mktemp("fuzz") / "tiny.gguf"
    write_tiny_llama(path, tied=True, dims={"vocab": tokenizer.vocab_size}, context_length=CONTEXT)
    return Model(load_weights(path), tokenizer, Backend.TORCH, torch.device("cpu"), torch.float32)


# ------------------------------------------------------------------------------------------------------ the lines


@dataclass
class Line:
    """One line of the file and what its row must be."""

    raw: bytes
    request: dict | None = None  # parses, and its fields have the right types: the oracle decides
    error: tuple[str, ...] | None = None  # must be an error row whose message holds each of these
    names_one_of: tuple[str, ...] = ()  # ... and one of these (the bad field, or a field with an edge value)
    blank: bool = False  # no row at all
    why: str = ""  # for the failure message
    edge_fields: list[str] = field(default_factory=list)  # given an edge value: SamplingParams may refuse them


# per field: values of the right kind and range ("ok"), edge values a fix may refuse or run ("edge": an error row
# naming the field, or the result alone), and values that must be refused naming the field ("bad")
VALUES = {
    "max_tokens": ([1, 2, 4], [10**30], [0, -3, 2.5, "3", True, None, [2]]),
    "temperature": ([0, 0.0, 0.7, 1, 2.5], [1e-300, 5e-324, 1e-30, 1e300, 10**400], [-1, -1e-300, "0.5", True, None,
                                                                                      math.nan, math.inf, -math.inf]),
    "top_k": ([0, 1, 5, 10**6], [10**30], [-1, 1.5, True, "5"]),
    "top_p": ([1, 1.0, 0.9, 0.5], [1e-300, 5e-324], [0, 1.5, -0.1, None, math.nan]),
    "min_p": ([0, 0.05, 1], [1e-300], [-0.1, 1.01, "0", math.inf]),
    "repetition_penalty": ([1, 1.2, 0.8], [1e-300, 1e300, 5e-324], [0, -1, None, math.nan, -(10**400)]),
    "seed": ([None, 0, 7, 2**63 - 1], [], [-1, 2**63, 1.5, "1", True, [1]]),
    "stop": (["x", "\n", ["a", "bc"], [], ["\u00e9t\u00e9"]], ["\ud800", ["a\udcc3"]], ["", [""], 5, [1], [["a"]],
                                                                                         {"a": 1}, True]),
    "ignore_eos": ([True, False], [], [1, 0, "true", None]),
    # no adapter is loaded in this batch: a name fails its line alone, with an error naming the adapter
    "adapter": ([None], ["pirate", "x" * 300, "\ud800"], ["", 3, True, ["a"], {"a": 1}]),
    # no draft model is loaded: "draft" fails its line alone, naming speculative decoding
    "speculative": ([None, "none", "ngram", {"method": "ngram", "num_speculative_tokens": 2}], ["draft"],
                    ["medusa", 3, True, ["ngram"], {"k": 2}, {"num_speculative_tokens": 0},
                     {"ngram_min": 3, "ngram_max": 2}]),
}
assert set(VALUES) == set(FIELDS), "a new SamplingParams field needs values here"

# text: anything, surrogates, controls and NUL included (json.dumps writes them as \u escapes)
TEXT = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=12),
    st.text(st.sampled_from("ab \x00\x01\x1b\t\n\r\u2028\u0085\ufeff\U0001f600\ud800\udfff\udcc3é"), max_size=8),
)
IDS = st.lists(st.integers(0, 49151), min_size=1, max_size=10)


@st.composite
def field_values(draw) -> tuple[dict, list[str], list[str]]:
    """Some sampling fields: (values, the fields given an edge value, the fields given a bad value): at most one
    bad field, so that its error row must name it."""
    values, edge, bad = {}, [], []
    for name in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=4)):
        ok, edges, bads = VALUES[name]
        kind = draw(st.sampled_from(["ok", "ok", "edge", "bad"] if not bad else ["ok", "edge"]))
        if kind == "edge" and not edges:
            kind = "ok"
        if kind == "ok" and name == "stop" and draw(st.booleans()):  # any text: a lone surrogate is refused
            values[name] = draw(st.one_of(TEXT.filter(bool), st.lists(TEXT.filter(bool), max_size=2)))
            edge.append(name)
            continue
        values[name] = draw(st.sampled_from({"ok": ok, "edge": edges, "bad": bads}[kind]))
        (edge if kind == "edge" else bad if kind == "bad" else []).append(name)
    return values, edge, bad


def dumps(request, ascii_only: bool = True) -> bytes:
    text = json.dumps(request, ensure_ascii=ascii_only)  # NaN, Infinity: JSON extensions json.loads reads
    return text.encode("utf-8", "surrogatepass" if not ascii_only else "strict")


@st.composite
def good_request(draw) -> Line:
    """A request whose fields have the right types; the prompt may still fail (empty, too long, a lone surrogate,
    ids out of range) as it fails alone."""
    fields, edge, bad = draw(field_values())
    kind = draw(st.sampled_from(["ids", "ids", "text", "messages", "edge ids"]))
    if kind == "ids":
        request = {"prompt": draw(IDS)}
    elif kind == "edge ids":
        request = {"prompt": draw(st.sampled_from([[], [49152], [-1], [0, 10**30], [2**63]]))}
    elif kind == "text":
        request = {"prompt": draw(TEXT)}
    else:
        roles = st.sampled_from(["user", "user", "assistant", "system", "tool", ""])
        request = {"messages": draw(st.lists(st.fixed_dictionaries({"role": roles, "content": TEXT}), min_size=1,
                                             max_size=3))}
    items = list({**request, **fields}.items())
    request = dict(draw(st.permutations(items)))
    raw_unicode = draw(st.booleans()) and not any(0xD800 <= ord(c) <= 0xDFFF for c in json.dumps(request,
                                                                                                ensure_ascii=False))
    raw = dumps(request, ascii_only=not raw_unicode)
    if draw(st.integers(0, 9)) == 0:
        raw = b"\xef\xbb\xbf" + raw  # a BOM, as some editors write
    if bad:
        return Line(raw, error=(), names_one_of=(bad[0], *edge), why=f"bad {bad[0]}")
    # the request as JSON reads it: "\ud800\udc00" in the line is one character, U+10000
    request = json.loads(raw.decode("utf-8-sig"))
    return Line(raw, request=request, why=f"{kind}, edge {edge}", edge_fields=edge)


@st.composite
def bad_request(draw) -> Line:
    good = draw(good_request())
    kind = draw(st.sampled_from(["unknown", "duplicate", "not object", "not json", "control", "deep", "not utf8",
                                 "prompt type", "messages type", "prompt and messages", "neither"]))
    if kind == "unknown":
        key = draw(TEXT.filter(lambda k: k not in ("prompt", "messages", *FIELDS)))
        return Line(dumps({"prompt": [1], key: draw(st.integers())}), error=("unknown key",), why=kind)
    if kind == "duplicate":
        name = draw(st.sampled_from(["prompt", *FIELDS]))
        return Line(f'{{"prompt": [1], "{name}": 1, "{name}": 1}}'.replace('"prompt": [1], "prompt"', '"prompt"')
                    .encode(), error=("duplicate key", name), why=kind)
    if kind == "not object":
        value = draw(st.one_of(st.integers(), st.none(), st.booleans(), TEXT, st.lists(st.integers(), max_size=3)))
        return Line(dumps(value), error=("must be a JSON object",), why=kind)
    if kind == "not json":
        raw = good.raw.removeprefix(b"\xef\xbb\xbf")
        raw = raw[: draw(st.integers(1, len(raw) - 1))]
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:  # cut inside a character
            return Line(raw, error=("not UTF-8",), why=kind)
        return Line(raw, error=("not JSON",), why=kind)
    if kind == "control":  # a raw control character (not \n or \r, which end the line) inside a string
        char = draw(st.sampled_from([c for c in map(chr, range(32)) if c not in "\n\r"]))
        return Line(b'{"prompt": "a' + char.encode() + b'b"}', error=("not JSON", "control character"), why=kind)
    if kind == "deep":
        depth = draw(st.integers(MAX_NESTING + 1, 3000))
        name = draw(st.sampled_from(["prompt", "messages", "stop", "seed", "unknown"]))
        return Line(f'{{"{name}": {"[" * depth}{"]" * depth}}}'.encode(), error=(f"'{name}' nests",), why=kind)
    if kind == "not utf8":
        return Line(b'{"prompt": "caf\xc3"}', error=("not UTF-8",), why=kind)
    if kind == "prompt type":
        value = draw(st.sampled_from([5, None, {}, [1.5], [True], ["a"], [[1]], 1.0]))
        return Line(dumps({"prompt": value}), error=("prompt must be text or a list of token ids",), why=kind)
    if kind == "messages type":
        value = draw(st.sampled_from([[], "hi", [{"role": "user"}], [{"role": 1, "content": "x"}], [None], {}]))
        return Line(dumps({"messages": value}), error=("messages",), why=kind)
    if kind == "prompt and messages":
        return Line(dumps({"prompt": [1], "messages": [{"role": "user", "content": "x"}]}), error=("not both",),
                    why=kind)
    return Line(dumps({"max_tokens": 2}), error=("needs either 'prompt' or 'messages'",), why=kind)


LINES = st.lists(st.one_of(good_request(), good_request(), bad_request(),
                           st.sampled_from([b"", b"   ", b"\t", b" \x0b\x0c "]).map(lambda b: Line(b, blank=True))),
                 min_size=1, max_size=7)
ENGINE = st.sampled_from([[], ["--max-batch-tokens", "8"], ["--max-num-seqs", "2"], ["--batching", "static"],
                          ["--no-prefix-caching", "--block-size", "4"]])


# -------------------------------------------------------------------------------------------------------- the test


def expected(model, line: Line) -> Completion | tuple[str, str]:
    """What the line's request gives alone: a Completion, or ("params", why SamplingParams refused its fields), or
    ("alone", the message of the error it ended with alone)."""
    request = line.request
    fields = {k: v for k, v in request.items() if k in FIELDS}
    try:
        params = SamplingParams(**{"max_tokens": DEFAULT_MAX_TOKENS, **fields})
    except (ValueError, TypeError, ArithmeticError) as e:  # the row must name the field SamplingParams refused
        return ("params", str(e))
    try:
        prompt = model.chat_prompt(request["messages"]) if "messages" in request else request["prompt"]
        return model.generate(prompt, params)
    except (ValueError, GenerationError) as e:
        return ("alone", str(e))


@settings(max_examples=500, deadline=None, database=None, derandomize=not EXPLORE,  # ~10 s on 2 CPU cores
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(lines=LINES, engine=ENGINE)
def test_batch_fuzz(model, monkeypatch, lines, engine):
    monkeypatch.setattr(realm.runtime, "load", lambda *args, **kwargs: model)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "requests.jsonl", Path(tmp) / "results.jsonl"
        src.write_bytes(b"".join(line.raw + b"\n" for line in lines))
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main(["batch", str(src), "-o", str(dst), "--max-tokens", str(DEFAULT_MAX_TOKENS), "--kv-blocks", "64",
                       "--no-progress", "--quiet", *engine])
        err = stderr.getvalue()
        assert rc == 0 and "Traceback" not in err and stdout.getvalue() == "", err
        rows = [json.loads(row) for row in dst.read_bytes().decode("utf-8").splitlines()]
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if not line.blank]
    assert [(r["index"], r["line"]) for r in rows] == [(i, n) for i, (n, _) in enumerate(numbered)]
    for row, (_, line) in zip(rows, numbered, strict=True):
        context = f"{line.why}: {line.raw[:300]!r} -> {json.dumps(row)[:300]}"
        if row["finish_reason"] == "error":
            assert set(row) == {"index", "line", "finish_reason", "error"} and row["error"].strip(), context
        if line.error is not None:
            event(f"bad line: {line.why}")
            assert row["finish_reason"] == "error", context
            for word in line.error:
                assert word in row["error"], context
            assert not line.names_one_of or any(name in row["error"] for name in line.names_one_of), context
            continue
        want = expected(model, line)
        if isinstance(want, tuple):
            kind, message = want
            event(f"error as alone ({kind}): {line.why.split(',')[0]}: {message[:45]}")
            assert row["finish_reason"] == "error", f"{context}; alone: {message}"
            if kind == "params":  # refused up front: the message names the field
                assert any(f in row["error"] for f in line.edge_fields), f"{context}; alone: {message}"
            else:
                assert row["error"] == message, f"{context}; alone: {message}"
            continue
        assert row["finish_reason"] != "error", f"{context}; alone: {want.finish_reason.value} {want.token_ids}"
        assert row["timings"]["prompt_tokens"] == len(want.prompt_ids), context
        max_tokens = line.request.get("max_tokens", DEFAULT_MAX_TOKENS)
        seeded = line.request.get("seed") is not None or line.request.get("temperature", 0) == 0
        event(f"result, {'seeded or greedy' if seeded else 'sampled'}: {line.why.split(',')[0]}")
        if seeded:  # same tokens, text and ending as alone
            assert (row["token_ids"], row["text"], row["finish_reason"]) == (
                want.token_ids, want.text, want.finish_reason.value), context
        else:  # a fresh random draw: only its shape
            assert row["finish_reason"] in ("length", "stop"), context
            assert len(row["token_ids"]) <= min(max_tokens, CONTEXT - len(want.prompt_ids)), context
