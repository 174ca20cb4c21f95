"""Hostile model files and text that is not text: every failure is a clear ValueError naming the metadata key or the
chat template, never a traceback, and nothing hangs (issue 14, class 3, and class 4's lone surrogates).

Chat templates run with limits (realm.runtime.chat_template: TEMPLATE_SECONDS, TEMPLATE_MAX_CHARS, TEMPLATE_MAX_DEPTH);
metadata is read typed and range-checked (realm.runtime.config.Metadata); a fuzz test gives every key realm reads
random GGUF types and values.
"""

from __future__ import annotations

import math
import os
import re
import time

import pytest
from gguf import GGUFValueType as V
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tokenizer import _tiny_spm_metadata
from tiny_gguf import tiny_vocab_metadata, write_tiny_llama

import realm.runtime as rt
from realm.gguf_io import MetadataValue
from realm.models import default_model_path
from realm.runtime.chat_template import TEMPLATE_MAX_CHARS, TEMPLATE_SECONDS
from realm.runtime.config import Metadata
from realm.runtime.tokenizer import IdTokenizer, Tokenizer

# a hostile template must fail within its time limit plus this (a crowded 2-core CPU, tracing overhead)
SLACK_SECONDS = 3.0
# CI runs a fixed set of examples (reproducible); REALM_FUZZ_EXPLORE=1 draws new ones each run, to look for more
EXPLORE = os.environ.get("REALM_FUZZ_EXPLORE") == "1"


def _template_tokenizer(template) -> Tokenizer:
    return Tokenizer.from_metadata(_tiny_spm_metadata(**{"tokenizer.chat_template": template}))


# ---------------------------------------------------------------------------------------------------- chat templates

HOSTILE_TEMPLATES = {
    "divide by zero": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "floor divide by zero": ("{% set n = messages|length - 1 %}{{ 10 // n }}", "ZeroDivisionError"),
    "modulo by zero": ("{{ 7 % 0 }}", "ZeroDivisionError"),
    "recursive macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "nested deeper than the limit"),
    "mutually recursive macros": ("{% macro a() %}{{ b() }}{% endmacro %}{% macro b() %}{{ a() }}{% endmacro %}"
                                  "{{ a() }}", "nested deeper than the limit"),
    "str + int": ("{{ 'a' + 1 }}", "TypeError"),
    "int + str": ("{{ messages|length + bos_token }}", "TypeError"),
    "undefined attribute": ("{{ messages[0].nope.deeper }}", "has no attribute 'nope'"),
    "undefined function": ("{{ nothing() }}", "'nothing' is undefined"),
    "index out of range": ("{{ messages[5]['content'] }}", "has no element 5|undefined"),
    "nested loops": ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
                     "longer than the limit of"),
    "exponential macro": ("{% macro f(n) %}{% if n > 1 %}{{ f(n - 1) }}{{ f(n - 2) }}{% else %}x{% endif %}"
                          "{% endmacro %}{{ f(60)|length }}", "longer than the limit|larger than the limit"),
    "100 MB by loops": ("{% for a in range(100000) %}" + "x" * 1000 + "{% endfor %}",
                        "rendered prompt is longer than the limit"),
    "100 MB one character at a time": ("{% for a in range(100000) %}{% for b in range(1000) %}x{% endfor %}"
                                       "{% endfor %}", "longer than the limit"),
    "100 MB by repetition": ("{{ 'x' * 100000000 }}", "could build more than"),
    "repetition in steps": ("{{ 'x' * 1000 * 1000 * 100 }}", "could build more than|larger than the limit"),
    "list growth": ("{{ [0] * 100000000 }}", "could build more than"),
    "doubling concatenation": ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                               "{% endfor %}{{ ns.s|length }}", "longer than the limit"),
    "doubling addition": ("{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                          "{% endfor %}{{ ns.s|length }}", "larger than the limit"),
    "huge join": ("{{ range(100000)|join('x' * 100000) }}", "could build more than"),
    "huge center": ("{{ 'x'|center(1000000000) }}", "could build more than"),
    "huge method call": ("{{ 'x'.ljust(1000000000) }}", "could build more than"),
    "huge separator": ("{{ ('x' * 100000).join(range(100000)) }}", "could build more than"),
    "wide printf format": ("{{ '%0999999999d' % 1 }}", "width or precision"),
    "wide str.format": ("{{ '{:>999999999}'.format(1) }}", "width or precision"),
    "huge power": ("{{ 2 ** 100000000 }}", "too large a number"),
    "macro output": ("{% macro f() %}{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% endmacro %}{{ f() }}",
                     "longer than the limit"),
    "computed printf width": ("{{ ('%*s' % (2000000000, 'x'))|length }}", "width or precision is an argument"),
    "computed printf precision": ("{{ '%.*f' % (100000000, 1.0) }}", "width or precision is an argument"),
    "computed str.format width": ("{{ '{:{}}'.format('x', 2000000000)|length }}", "width or precision is an argument"),
    "lorem ipsum": ("{{ lipsum(1000000) }}", "'lipsum' is undefined"),
    "self-sharing list": ("{% set ns = namespace(s=[1]) %}{% for i in range(30) %}{% set ns.s = [ns.s, ns.s] %}"
                          "{% endfor %}{{ [ns.s|length, ns.s|length, ns.s|length, ns.s|length] }}",
                          "could build more than|larger than the limit"),
    "raise_exception": ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    "sandbox escape": ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "unsafe|not safely|__class__"),
    "syntax error": ("{% for %}", "Expected an expression"),
    "unclosed block": ("{% if true %}x", "Unexpected end of template"),
}


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
def test_hostile_template_is_a_clear_error_within_the_limits(name):
    template, problem = HOSTILE_TEMPLATES[name]
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"^chat template: ") as e:
        _template_tokenizer(template).apply_chat_template([{"role": "user", "content": "hi"}])
    elapsed = time.monotonic() - start
    assert re.search(problem, str(e.value)), f"{name}: {e.value}"
    assert elapsed < TEMPLATE_SECONDS + SLACK_SECONDS, f"{name} took {elapsed:.1f} s"


@pytest.mark.parametrize("stored", [42, 3.5, True, ["{{ x }}", "{{ y }}"], [1, 2]])
def test_template_stored_as_a_non_string_is_refused_at_first_use(stored):
    tok = _template_tokenizer(stored)  # the model still loads: plain prompts need no template
    assert tok.encode("ab")
    with pytest.raises(ValueError, match=r"chat template: GGUF metadata tokenizer\.chat_template: expected a string"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_source_too_long_is_refused():
    with pytest.raises(ValueError, match=r"chat template: the template has .* characters, more than the limit"):
        _template_tokenizer("x" * (TEMPLATE_MAX_CHARS + 1)).apply_chat_template([])


def test_limits_leave_real_templates_alone(tmp_path):
    # tracing restored, messages of ordinary size render, and a long prompt under the limit renders whole
    import sys

    before = sys.gettrace()
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}{% endfor %}{{ '-' * 10 }}"
    tok = _template_tokenizer(template)
    long = "ab " * (TEMPLATE_MAX_CHARS // 4)
    assert tok.apply_chat_template([{"role": "user", "content": long}]) == f"<user>{long.strip()}" + "-" * 10
    assert sys.gettrace() is before


# ---------------------------------------------------------------------------------------------- text that is not text

NOT_TEXT = [
    ("\ud800", "U+D800 at character 0"),
    ("caf\udcc3", "U+DCC3 at character 3"),  # what Python makes of the bytes b"caf\xc3" (surrogateescape)
    ("ok then \udfff", "U+DFFF at character 8"),
    ("emoji 🦙 and \udc80\udc81", "U+DC80 at character 12"),
    ("x" * 100000 + "\ud83d", "U+D83D at character 100000"),  # half of a surrogate pair
]
NOT_STR = [b"bytes", bytearray(b"x"), 42, None, ["a"], 3.5]


@pytest.fixture(scope="module")
def smollm2_tok():
    try:
        return Tokenizer.from_gguf(default_model_path())
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _tokenizers(smollm2_tok):
    return [Tokenizer.from_metadata(_tiny_spm_metadata()), Tokenizer.from_metadata(
        {k: v.value for k, v in tiny_vocab_metadata().items()}), smollm2_tok, IdTokenizer(50)]


@pytest.mark.parametrize(("text", "where"), NOT_TEXT, ids=[w for _, w in NOT_TEXT])
def test_lone_surrogates_are_refused(smollm2_tok, text, where):
    for tok in _tokenizers(smollm2_tok):
        for special in (False, True):
            problem = rf"not valid Unicode text: lone surrogate {re.escape(where)} \(bytes that"
            with pytest.raises(ValueError, match=problem):
                tok.encode(text, parse_special=special)


@pytest.mark.parametrize("value", NOT_STR, ids=lambda v: type(v).__name__)
def test_non_str_text_is_refused(smollm2_tok, value):
    for tok in _tokenizers(smollm2_tok):
        with pytest.raises(ValueError, match=f"must be a str, got {type(value).__name__}"):
            tok.encode(value)


def test_id_tokenizer_refuses_text():
    with pytest.raises(ValueError, match="no vocabulary"):
        IdTokenizer(50).encode("hello")


def test_chat_messages_with_surrogates_fail_at_encoding(smollm2_tok):
    prompt = smollm2_tok.apply_chat_template([{"role": "user", "content": "caf\udcc3"}])
    with pytest.raises(ValueError, match=r"lone surrogate U\+DCC3"):
        smollm2_tok.encode(prompt, parse_special=True)


def test_long_valid_prompt_check_is_fast(smollm2_tok):
    text = "Hello world, ça va? 🦙 " * 50000  # ~1.1 M characters
    start = time.monotonic()
    with pytest.raises(ValueError, match="lone surrogate"):
        smollm2_tok.encode(text + "\udcff")
    assert time.monotonic() - start < 1.0


# ---------------------------------------------------------------------------------------------------- metadata

A = "llama"
BAD_METADATA = [
    (f"{A}.attention.head_count", MetadataValue(0, V.UINT32), "expected an integer in"),
    (f"{A}.attention.head_count", MetadataValue(-4, V.INT32), "found the integer -4"),
    (f"{A}.attention.head_count", MetadataValue(3, V.UINT32), "3 query heads are not a multiple of 2 KV heads"),
    (f"{A}.attention.head_count", MetadataValue(6, V.UINT32), "does not give an even head size"),
    (f"{A}.attention.head_count", MetadataValue(8, V.UINT32), "tensor 'blk.0.attn_k.weight' has shape"),
    (f"{A}.attention.head_count", MetadataValue(True, V.BOOL), "found a bool"),
    (f"{A}.block_count", MetadataValue([2, 2], V.ARRAY, V.UINT32), "found an array of 2 items"),
    (f"{A}.block_count", MetadataValue(0, V.UINT32), "expected an integer in"),
    (f"{A}.block_count", MetadataValue(3, V.UINT32), r"'blk\.2\.attn_q\.weight' is missing \(llama\.block_count"),
    (f"{A}.block_count", MetadataValue(2**64 - 1, V.UINT64), "found the integer 18446744073709551615"),
    (f"{A}.context_length", MetadataValue(2**62, V.UINT64), "expected an integer in \\[1, 16777216\\]"),
    (f"{A}.context_length", MetadataValue(0, V.UINT32), "expected an integer"),
    (f"{A}.context_length", MetadataValue(32.0, V.FLOAT32), "found the float 32.0"),
    (f"{A}.embedding_length", MetadataValue("64", V.STRING), "found the string '64'"),
    (f"{A}.embedding_length", MetadataValue(128, V.UINT32), "from llama.embedding_length"),
    (f"{A}.embedding_length", MetadataValue(2**40, V.UINT64), "expected an integer in"),
    (f"{A}.feed_forward_length", MetadataValue(97, V.UINT32), "'blk.0.ffn_gate.weight' has shape"),
    (f"{A}.feed_forward_length", MetadataValue([96, 96], V.ARRAY, V.INT32), "found an array"),
    (f"{A}.attention.layer_norm_rms_epsilon", MetadataValue(math.nan, V.FLOAT32), "found the float nan"),
    (f"{A}.attention.layer_norm_rms_epsilon", MetadataValue(-1e-6, V.FLOAT32), "finite number in \\(0.0, 1.0\\]"),
    (f"{A}.attention.layer_norm_rms_epsilon", MetadataValue(0.0, V.FLOAT64), "found the float 0.0"),
    (f"{A}.attention.layer_norm_rms_epsilon", MetadataValue(math.inf, V.FLOAT32), "found the float inf"),
    (f"{A}.rope.freq_base", MetadataValue(0.0, V.FLOAT32), "found the float 0.0"),
    (f"{A}.rope.freq_base", MetadataValue(-math.inf, V.FLOAT32), "finite number"),
    (f"{A}.rope.freq_base", MetadataValue("10000", V.STRING), "found the string"),
    (f"{A}.attention.head_count_kv", MetadataValue(3, V.UINT32), "not a multiple of 3 KV heads"),
    (f"{A}.attention.head_count_kv", MetadataValue(8, V.UINT32), "expected an integer in \\[1, 4\\]"),
    (f"{A}.attention.key_length", MetadataValue(15, V.UINT32), "rope needs an even head size, found 15"),
    (f"{A}.attention.key_length", MetadataValue(0, V.UINT32), "expected an integer in"),
    (f"{A}.attention.key_length", MetadataValue(32, V.UINT32), "key_length"),
    (f"{A}.attention.value_length", MetadataValue(8, V.UINT32), "value head size differs"),
    (f"{A}.rope.dimension_count", MetadataValue(8, V.UINT32), "partial rotary embeddings"),
    (f"{A}.vocab_size", MetadataValue(51, V.UINT32), "'token_embd.weight' has shape .* llama.vocab_size"),
    (f"{A}.vocab_size", MetadataValue(-1, V.INT64), "expected an integer"),
    (f"{A}.rope.scaling.type", MetadataValue("longrope", V.STRING), "rope scaling 'longrope' is not supported"),
    (f"{A}.rope.scaling.type", MetadataValue(1, V.UINT8), "expected a string"),
    (f"{A}.rope.scale_linear", MetadataValue(-4.0, V.FLOAT32), "rope.scale_linear: expected a finite number"),
    (f"{A}.rope.scaling.factor", MetadataValue(1e7, V.FLOAT32), "rope.scaling.factor: expected a finite number"),
    (f"{A}.rope.scaling.factor", MetadataValue("8", V.STRING), "rope.scaling.factor: expected a finite number"),
    ("general.architecture", MetadataValue("bert", V.STRING), "unsupported architecture 'bert'"),
    ("general.architecture", MetadataValue(7, V.UINT32), "expected a string, found the integer 7"),
    ("general.name", MetadataValue([1], V.ARRAY, V.INT8), "expected a string"),
    ("tokenizer.ggml.model", MetadataValue(2, V.UINT32), "expected a string"),
    ("tokenizer.ggml.tokens", MetadataValue([1, 2, 3], V.ARRAY, V.INT32), "an array holding the integer 1"),
    ("tokenizer.ggml.tokens", MetadataValue("abc", V.STRING), "expected an array of at most"),
    ("tokenizer.ggml.tokens", MetadataValue([f"t{i}" for i in range(60)], V.ARRAY, V.STRING),
     "has 60 tokens but the model only 50 embeddings"),
    ("tokenizer.ggml.token_type", MetadataValue([1] * 49, V.ARRAY, V.INT32), "an array of 50 integers"),
    ("tokenizer.ggml.token_type", MetadataValue([1.0] * 50, V.ARRAY, V.FLOAT32), "an array of 50 integers"),
    ("tokenizer.ggml.scores", MetadataValue([0.0] * 3, V.ARRAY, V.FLOAT32), "an array of 50 numbers"),
    ("tokenizer.ggml.scores", MetadataValue(["a"] * 50, V.ARRAY, V.STRING), "an array of 50 numbers"),
    ("tokenizer.ggml.scores", MetadataValue([math.nan] * 50, V.ARRAY, V.FLOAT32), "found a NaN"),
    ("tokenizer.ggml.merges", MetadataValue([1, 2], V.ARRAY, V.UINT8), "an array holding the integer 1"),
    ("tokenizer.ggml.add_bos_token", MetadataValue(1, V.UINT8), "expected a bool, found the integer 1"),
    ("tokenizer.ggml.add_space_prefix", MetadataValue("yes", V.STRING), "expected a bool"),
    ("tokenizer.ggml.bos_token_id", MetadataValue("1", V.STRING), "expected an integer"),
    ("tokenizer.ggml.eos_token_id", MetadataValue(2.0, V.FLOAT32), "expected an integer"),
    ("tokenizer.ggml.eot_token_id", MetadataValue(False, V.BOOL), "found a bool"),
    ("tokenizer.ggml.pre", MetadataValue(["gpt-2"], V.ARRAY, V.STRING), "expected a string"),
]


@pytest.mark.parametrize(("key", "value", "problem"), BAD_METADATA,
                         ids=[f"{k}={v.value!r}"[:60] for k, v, _ in BAD_METADATA])
def test_bad_metadata_is_a_model_error_naming_the_key(tmp_path, key, value, problem):
    path = tmp_path / "bad.gguf"
    write_tiny_llama(path, metadata={**tiny_vocab_metadata(), key: value})
    with pytest.raises(ValueError) as e:
        rt.load(path, device="cpu")
    assert key in str(e.value) and re.search(problem, str(e.value)), str(e.value)


def test_bos_id_outside_the_vocabulary_is_ignored_as_llama_cpp_does(tmp_path):
    path = tmp_path / "bos.gguf"
    write_tiny_llama(path, metadata={**tiny_vocab_metadata(),
                                     "tokenizer.ggml.bos_token_id": MetadataValue(10**6, V.UINT32)})
    assert rt.load(path, device="cpu").tokenizer.bos_id is None


# ---------------------------------------------------------------------------------------------------- fuzz

CONFIG_KEYS = [f"{A}.{k}" for k in (
    "embedding_length", "attention.head_count", "attention.head_count_kv", "attention.key_length",
    "attention.value_length", "rope.dimension_count", "block_count", "feed_forward_length", "vocab_size",
    "context_length", "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.type", "rope.scale_linear",
    "rope.scaling.factor", "attention.sliding_window", "attention.sliding_window_pattern", "attention.key_length_swa",
    "rope.freq_base_swa", "rope.dimension_count_swa", "attn_logit_softcapping", "final_logit_softcapping",
    "expert_count",
)] + ["general.architecture", "general.name"]
TOKENIZER_KEYS = [
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.add_space_prefix",
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.chat_template",
    *(f"tokenizer.ggml.{n}_token_id" for n in ("bos", "eos", "unknown", "padding", "eot", "eom", "fim_pre", "fim_suf",
                                                "fim_mid", "fim_pad", "fim_rep", "fim_sep", "prefix", "suffix",
                                                "middle")),
]
KEYS = CONFIG_KEYS + TOKENIZER_KEYS


def test_the_fuzzed_keys_are_every_key_realm_reads(tmp_path, monkeypatch):
    """Every metadata read goes through Metadata.get: record them while loading, chatting and building an SPM
    tokenizer, and compare with KEYS (a key realm starts reading must be added to the fuzz)."""
    read: set[str] = set()
    original = Metadata.get
    monkeypatch.setattr(Metadata, "get", lambda self, key: read.add(key) or original(self, key))
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, metadata=tiny_vocab_metadata())
    model = rt.load(path, device="cpu")
    model.chat_prompt("ab")
    Tokenizer.from_metadata(_tiny_spm_metadata(**{"tokenizer.chat_template": "x"})).apply_chat_template([])
    assert read - set(KEYS) == set(), "keys realm reads that the fuzz test does not cover"
    assert set(KEYS) - read == set(), "keys the fuzz test lists that realm no longer reads"


_INT_RANGES = {V.UINT8: (0, 2**8 - 1), V.INT8: (-(2**7), 2**7 - 1), V.UINT16: (0, 2**16 - 1),
               V.INT16: (-(2**15), 2**15 - 1), V.UINT32: (0, 2**32 - 1), V.INT32: (-(2**31), 2**31 - 1),
               V.UINT64: (0, 2**64 - 1), V.INT64: (-(2**63), 2**63 - 1)}
_SPECIAL_INTS = [0, 1, 2, 3, 4, 8, 15, 16, 32, 49, 50, 64, 96, 2**31, 2**62, -1]
_SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 1e-6, 1e30, 1e38, math.nan, math.inf, -math.inf, 10000.0]


def _ints(vtype: V):
    lo, hi = _INT_RANGES[vtype]
    return st.one_of(st.sampled_from([v for v in _SPECIAL_INTS if lo <= v <= hi] + [lo, hi]), st.integers(lo, hi))


def _scalar(vtype: V):
    if vtype in _INT_RANGES:
        return _ints(vtype)
    if vtype == V.BOOL:
        return st.booleans()
    if vtype == V.STRING:
        return st.one_of(st.sampled_from(["", "llama", "gpt2", "none", "yarn", "{{ 1 / 0 }}", "{{ x }}"]),
                         st.text(max_size=12))
    width = 32 if vtype == V.FLOAT32 else 64
    return st.one_of(st.sampled_from(_SPECIAL_FLOATS), st.floats(width=width))


_SCALAR_TYPES = [*_INT_RANGES, V.FLOAT32, V.FLOAT64, V.BOOL, V.STRING]


@st.composite
def gguf_values(draw) -> MetadataValue:
    vtype = draw(st.sampled_from([*_SCALAR_TYPES, V.ARRAY]))
    if vtype != V.ARRAY:
        return MetadataValue(draw(_scalar(vtype)), vtype)
    item = draw(st.sampled_from(_SCALAR_TYPES))
    # 50 items: the tiny vocabulary's size, so token arrays sometimes have the right length
    size = draw(st.sampled_from([0, 1, 2, 49, 50, 51]))
    return MetadataValue(draw(st.lists(_scalar(item), min_size=size, max_size=size)), V.ARRAY, item)


# The generation check is skipped when the fuzzed context is long: rope_cache's table (context x head_dim floats)
# is what a valid long context costs, not an error, and too big for a test.
FUZZ_MAX_RUN_CONTEXT = 4096


@settings(max_examples=120, deadline=None, derandomize=not EXPLORE,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), value=gguf_values())
def test_fuzz_metadata_gives_a_clear_error_or_a_model_that_runs(tmp_path, key, value):
    path = tmp_path / "fuzz.gguf"
    write_tiny_llama(path, metadata={**tiny_vocab_metadata(), key: value})
    try:
        model = rt.load(path, device="cpu")
    except ValueError as e:
        assert key in str(e) or _names_a_related_key(key, str(e)), (key, value, str(e))
        return
    context = model.config.context_length
    if context == 1:  # valid metadata, but no room for a prompt and an answer: a clear error
        with pytest.raises(ValueError, match="the model's context holds 1"):
            model.generate([1], max_tokens=2)
    elif context <= FUZZ_MAX_RUN_CONTEXT:
        assert len(model.generate([1, 2, 3][: context - 1], max_tokens=2).token_ids) >= 1
    for attempt in (lambda: model.tokenizer.encode("ab cd", parse_special=True), lambda: model.chat_prompt("ab")):
        try:
            attempt()
        except ValueError as e:
            assert key in str(e) or "chat template" in str(e) or "Unicode" in str(e), (key, value, str(e))


def _names_a_related_key(key: str, message: str) -> bool:
    """A tokenizer key may make another required tokenizer key's absence or the vocabulary the reported problem."""
    return key.startswith("tokenizer.") and "tokenizer.ggml" in message


@settings(max_examples=400, deadline=None, derandomize=not EXPLORE)
@given(key=st.sampled_from(TOKENIZER_KEYS), value=gguf_values(), spm=st.booleans())
def test_fuzz_tokenizer_metadata(key, value, spm):
    """The tokenizer keys on their own (no file, so many more examples): a clear error or a tokenizer that encodes."""
    base = _tiny_spm_metadata() if spm else {k: v.value for k, v in tiny_vocab_metadata().items()}
    try:
        tok = Tokenizer.from_metadata({**base, key: value.value})
    except ValueError as e:
        assert key in str(e) or _names_a_related_key(key, str(e)), (key, value, str(e))
        return
    for text in ("ab cd", "<s>ab</s> é", ""):
        ids = tok.encode(text, parse_special=True)
        assert all(0 <= i < tok.vocab_size for i in ids)
        tok.decode(ids)
    try:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    except ValueError as e:
        assert "chat template" in str(e) or "no chat template" in str(e), (key, value, str(e))


def test_tiny_vocabulary_model_runs(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, metadata=tiny_vocab_metadata())
    model = rt.load(path, device="cpu")
    assert isinstance(model.tokenizer, Tokenizer) and model.tokenizer.vocab_size == 50
    assert len(model.generate("ab cd", max_tokens=2).token_ids) >= 1

