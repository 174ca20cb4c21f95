"""realm.runtime.tokenizer: llama.cpp's token ids for GGUF vocabularies, decoding, streaming, chat templates.

Test vectors: llama.cpp's vocab-only GGUF files with their .inp/.out files (ids per string, no BOS, no special
parsing), from the llama.cpp that llama-cpp-python 0.3.36's sdist vendors, fetched by tests/llama_cpp_vocab.py
(scripts/setup.sh runs it) into ~/.cache/realm/llama-cpp-vocab-0.3.36 or $REALM_LLAMA_CPP_VOCAB; a missing file
fails the test that needs it, saying how to fetch it. Tests marked `llama_cpp` compare with llama.cpp itself through
llama-cpp-python.
"""

from __future__ import annotations

import ctypes
import random
import time
from pathlib import Path

import gguf
import jinja2
import pytest
from llama_cpp_vocab import vocab_cases, vocab_names, vocab_path
from tokenizers import Regex
from tokenizers import pre_tokenizers as hf_pre

from realm.gguf_io import GGUFError, open_gguf, read_metadata
from realm.models import MODELS, default_model_path
from realm.runtime.tokenizer import (
    PRE_TOKENIZERS,
    REFUSED_MODELS,
    REFUSED_PRE_TOKENIZERS,
    SUPPORTED_MODELS,
    Tokenizer,
    _read_tokenizer_metadata,
)

# every vocabulary of llama.cpp's tests that has test strings and a type realm supports (bert-bge's is refused)
VOCABS = (
    "gpt-2", "llama-bpe", "llama-spm", "phi-3", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4",
    "mpt", "qwen2", "qwen35", "refact", "starcoder",
)  # fmt: skip
UNTESTED_VOCABS = ("aquila", "baichuan", "gpt-neox")  # no test strings: compared with llama.cpp itself
REFUSED_VOCABS = {"bert-bge": "bert", "nomic-bert-moe": "t5"}  # file -> its tokenizer.ggml.model
# CPU seconds (time.process_time: other work on a shared runner does not count) to load a vocabulary. Measured on an
# idle 2-core CPU: Gemma 3's SentencePiece (262k pieces, 515k merges built from the scores) 2.7 s, Gemma 4's BPE (262k
# tokens, 515k merges) 2.0 s, command-r (256k) 1.0 s, llama-bpe (128k) 0.6 s; gguf's reader, which this avoids, takes
# 8-10 s for 128k tokens alone. Generous, for a slower CI runner.
LOAD_SECONDS = 8.0

# multi-byte UTF-8: emoji (4 bytes, byte-fallback tokens in SPM vocabularies), ZWJ sequences, CJK, Khmer, accents
UNICODE_TEXTS = (
    "🦙",
    " this is 🦙.cpp",
    "😶‍🌫️ and 👍🏽",
    "我想在apple工作1314151天～",
    "កាន់តែពិសេសអាច",
    "Cửa Việt, Äpfel, нещо",
)


class _Loaded(dict):
    """name -> Tokenizer, each loaded once, with the CPU seconds its load took."""

    def __init__(self):
        super().__init__()
        self.seconds: dict[str, float] = {}

    def load(self, name: str, path: Path) -> Tokenizer:
        if name not in self:
            start = time.process_time()
            self[name] = Tokenizer.from_gguf(path)
            self.seconds[name] = time.process_time() - start
        return self[name]


@pytest.fixture(scope="module")
def loaded() -> _Loaded:
    return _Loaded()


@pytest.fixture(scope="module")
def vocab(loaded):
    """name -> Tokenizer of llama.cpp's ggml-vocab-NAME.gguf (FileNotFoundError, with how to fetch it, if missing)."""
    return lambda name: loaded.load(name, vocab_path(name))


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def gemma3_path() -> Path:
    """Gemma 3 270M's GGUF (SentencePiece, 262k pieces), as `realm.models` fetches it (scripts/setup.sh does)."""
    try:
        return MODELS["gemma3-270m"].path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def gemma3_tok(loaded, gemma3_path) -> Tokenizer:
    return loaded.load("gemma3-270m", gemma3_path)


# ---------------------------------------------------------------------------------------------------- test vectors


def test_every_llama_cpp_vocab_file_is_covered():
    """Each vocabulary file of llama.cpp's tests is checked here: against its test strings, or against llama.cpp."""
    vocab_path("gpt-2")  # fails, saying how to fetch them, when the files are missing
    assert set(vocab_names(with_cases=True)) == {*VOCABS, "bert-bge"}
    assert set(vocab_names()) == {*VOCABS, *UNTESTED_VOCABS, *REFUSED_VOCABS}


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_test_vectors(vocab, name):
    tok = vocab(name)
    wrong = [
        f"{name} string {i} {text!r}: {got} != llama.cpp's {ids}"
        for i, (text, ids) in enumerate(vocab_cases(name))
        if (got := tok.encode(text)) != ids
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", VOCABS)
def test_decode_round_trips(vocab, name):
    tok = vocab(name)
    for text, ids in vocab_cases(name):
        assert tok.decode(ids) == text
        if tok.bos_id is not None:
            assert tok.decode([tok.bos_id, *ids], skip_special=True) == text


@pytest.mark.parametrize(("name", "model"), REFUSED_VOCABS.items())
def test_refused_vocab_files(name, model):
    """WordPiece (bert) and Unigram (t5) vocabularies are refused by name, not tokenized some other way."""
    with pytest.raises(ValueError, match=rf"unsupported tokenizer\.ggml\.model '{model}' \(.+\): supported are"):
        Tokenizer.from_gguf(vocab_path(name))


@pytest.mark.parametrize("name", ["llama-bpe", "command-r", "gemma-4"])
def test_load_time(vocab, loaded, name):
    tok = vocab(name)
    seconds = loaded.seconds[name]
    assert seconds < LOAD_SECONDS, f"{name}: {tok.vocab_size} tokens loaded in {seconds:.2f} CPU s"


def test_load_time_gemma3(gemma3_tok, loaded):
    """Gemma 3's SentencePiece vocabulary: the largest realm builds merges for (262144 pieces)."""
    seconds = loaded.seconds["gemma3-270m"]
    assert gemma3_tok.vocab_size == 262144
    assert seconds < LOAD_SECONDS, f"gemma3-270m: {gemma3_tok.vocab_size} pieces loaded in {seconds:.2f} CPU s"


def test_spm_cannot_round_trip_the_space_symbol(vocab):
    """SPM stores spaces as U+2581 '▁': a literal '▁' in the text decodes as a space (llama.cpp does the same)."""
    tok = vocab("llama-spm")
    assert tok.decode(tok.encode("a▁b")) == "a b"


# ---------------------------------------------------------------------------------------------------- special ids


@pytest.mark.parametrize(
    ("name", "bos", "eos", "eot", "stops", "add_bos"),
    [
        ("gpt-2", 50256, 50256, 50256, {50256}, False),
        ("llama-bpe", 128000, 128001, 128009, {128001, 128009}, True),
        ("llama-spm", 1, 2, None, {2}, True),
        ("phi-3", 1, 32000, 32007, {2, 32000, 32007}, True),  # llama.cpp makes "</s>" and "<|end|>" end generation
        ("deepseek-llm", 100000, 100001, 100001, {100001}, True),
        ("command-r", 5, 255001, None, {0, 255001}, True),
        # Gemma 4: <eos>, <turn|> and <|tool_response>, but not "</s>" (a normal token there); BOS always
        ("gemma-4", 2, 1, None, {1, 50, 106}, True),
    ],
)
def test_special_ids(vocab, name, bos, eos, eot, stops, add_bos):
    tok = vocab(name)
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.add_bos_default) == (bos, eos, eot, add_bos)
    assert tok.stop_ids == frozenset(stops)
    assert tok.encode("Hello", add_bos=True)[0] == bos


def test_gemma3_special_ids(gemma3_tok):
    tok = gemma3_tok
    assert (tok.model, tok.add_space_prefix, tok.add_bos_default, tok.add_eos_default) == ("llama", False, True, False)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (2, 1, 0, 3)
    assert tok.stop_ids == frozenset({1, 106, 212})  # <eos>, <end_of_turn>, and "</s>" by its text
    # user-defined pieces (runs of newlines and spaces, HTML tags) are always split out; no space is prepended
    ids = tok.encode("<table>\n\nHello  world<start_of_turn>", parse_special=True)
    assert [tok.token_text(i) for i in ids] == ["<table>", "\n\n", "Hello", "  ", "world", "<start_of_turn>"]
    assert tok.decode(ids) == "<table>\n\nHello  world<start_of_turn>"


def test_smollm2_special_ids(smollm2_tok):
    assert (smollm2_tok.bos_id, smollm2_tok.eos_id, smollm2_tok.pad_id, smollm2_tok.add_bos_default) == (1, 2, 2, False)
    # <|endoftext|>, <|im_end|>, and <reponame> as llama.cpp's fim_rep
    assert smollm2_tok.stop_ids == frozenset({0, 2, 4})
    assert smollm2_tok.vocab_size == 49152
    assert smollm2_tok.token_text(1) == "<|im_start|>"


# ---------------------------------------------------------------------------------------------------- streaming


def _stream(tok: Tokenizer, ids: list[int], skip_special: bool = False) -> list[str]:
    decoder = tok.stream_decoder(skip_special=skip_special)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("name", VOCABS)
@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_stream_decoder_equals_decode(vocab, name, text):
    tok = vocab(name)
    for ids, skip in ((tok.encode(text), False), ([tok.bos_id, *tok.encode(text)], True)):
        parts = _stream(tok, ids, skip)
        assert "".join(parts) == tok.decode(ids, skip_special=skip) == text
        assert "\ufffd" not in "".join(parts)


def test_stream_decoder_holds_split_characters(vocab):
    tok = vocab("llama-spm")
    ids = tok.encode("🦙!")  # "▁" then the four byte tokens <0xF0><0x9F><0xA6><0x99>, then "!"
    assert [tok.token_text(i) for i in ids[1:5]] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert _stream(tok, ids) == ["", "", "", "", "🦙", "!", ""]


@pytest.mark.parametrize("name", VOCABS)
def test_stream_decoder_continuation_keeps_the_leading_space(vocab, name):
    """Generated ids continue the prompt: their text is what decoding prompt + ids adds, leading space included
    (an SPM vocabulary would otherwise strip the space of "▁Paris" as if it began the text)."""
    tok = vocab(name)
    prompt = tok.encode("The capital of France is", add_bos=tok.bos_id is not None)
    full = tok.encode("The capital of France is Paris. It is", add_bos=tok.bos_id is not None)
    assert full[: len(prompt)] == prompt
    decoder = tok.stream_decoder(skip_special=True, continuation=True)
    text = "".join(decoder.push(i) for i in full[len(prompt) :]) + decoder.flush()
    assert text == " Paris. It is"
    assert tok.decode(prompt, skip_special=True) + text == tok.decode(full, skip_special=True)


def test_stream_decoder_invalid_utf8(vocab):
    tok = vocab("llama-spm")
    ids = [tok.encode("a")[0], *tok.encode("🦙")[1:3]]  # "a" then the first two bytes of a 4-byte character
    assert tok.decode(ids) == "a\ufffd"
    parts = _stream(tok, ids)
    assert parts[:-1] == ["a", "", ""] and "".join(parts) == "a\ufffd"


def test_decode_skip_special(smollm2_tok):
    ids = smollm2_tok.encode("<|im_start|>user\nHi<|im_end|>", parse_special=True)
    assert smollm2_tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert smollm2_tok.decode(ids, skip_special=True) == "user\nHi"
    assert "".join(_stream(smollm2_tok, ids, skip_special=True)) == "user\nHi"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smollm2_tok.decode([smollm2_tok.vocab_size])


# ---------------------------------------------------------------------------------------------------- special tokens


def test_parse_special(smollm2_tok):
    text = "<|im_start|>user\nHi<|im_end|>"
    parsed = smollm2_tok.encode(text, parse_special=True)
    assert parsed[0] == 1 and parsed[-1] == 2
    assert parsed[1:-1] == smollm2_tok.encode("user\nHi")
    plain = smollm2_tok.encode(text)
    assert not {0, 1, 2} & set(plain), "control token texts are plain text without parse_special"
    assert smollm2_tok.decode(plain) == text


def test_phi3_special_tokens_swallow_following_whitespace(vocab):
    tok = vocab("phi-3")
    user, end = tok.encode("<|user|>", parse_special=True), tok.encode("<|end|>", parse_special=True)
    assert (user, end) == ([32010], [32007])
    # llama.cpp gives Phi-3's special tokens the rstrip attribute: "\n  " after them is dropped
    assert tok.encode("<|user|>\n  Hi<|end|>\n", parse_special=True) == [32010, *tok.encode("Hi"), 32007]


def _tiny_spm_metadata(**extra) -> dict:
    """A small SentencePiece vocabulary: byte tokens, a few pieces, a control and a user-defined token."""
    pieces = ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "bc", "▁abc", "<ud>"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<ctl>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces), 3]
    types[tokens.index("<ud>")] = 4
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        **extra,
    }


def test_user_defined_tokens_are_split_out_without_parse_special():
    tok = Tokenizer.from_metadata(_tiny_spm_metadata())
    ud, ctl = tok.encode("<ud>", parse_special=True), tok.encode("<ctl>", parse_special=True)
    assert len(ud) == 1 and len(ctl) == 1
    assert ud[0] in tok.encode("abc<ud>c")  # user-defined: always a token of its own, as llama.cpp does
    assert ctl[0] not in tok.encode("abc<ctl>c") and ctl[0] in tok.encode("abc<ctl>c", parse_special=True)
    # each text fragment after a special token gets its own space prefix (llama.cpp's SPM)
    ids = tok.encode("ab<ud>ab")
    assert [tok.token_text(i) for i in ids] == ["▁ab", "<ud>", "▁ab"]
    assert tok.decode(ids) == "ab<ud> ab"


def test_spm_merges_by_score_and_falls_back_to_bytes():
    tok = Tokenizer.from_metadata(_tiny_spm_metadata())
    assert [tok.token_text(i) for i in tok.encode("abc")] == ["▁abc"]
    assert [tok.token_text(i) for i in tok.encode("bca")] == ["▁", "bc", "a"]
    assert [tok.token_text(i) for i in tok.encode("é")] == ["▁", "<0xC3>", "<0xA9>"]
    tok = Tokenizer.from_metadata(_tiny_spm_metadata(**{"tokenizer.ggml.add_space_prefix": False}))
    assert [tok.token_text(i) for i in tok.encode("abc")] == ["ab", "c"]


# ---------------------------------------------------------------------------------------------------- chat template


def test_apply_chat_template_smollm2(smollm2_tok):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = smollm2_tok.apply_chat_template(messages)
    assert prompt.startswith("<|im_start|>system\n")  # SmolLM2's template adds a default system message
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert not smollm2_tok.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")
    ids = smollm2_tok.encode(prompt, parse_special=True)
    assert ids[0] == smollm2_tok.encode("<|im_start|>", parse_special=True)[0] == 1
    assert ids.count(1) == prompt.count("<|im_start|>") == 3
    assert smollm2_tok.decode(ids) == prompt


def test_chat_template_helpers_and_errors(vocab):
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    template += "{{ bos_token }}{% for m in messages %}[{{ m['content'] | tojson }}]{% endfor %}{{ eos_token }}"
    tok = Tokenizer.from_metadata(_tiny_spm_metadata(**{"tokenizer.chat_template": template}))
    assert tok.apply_chat_template([{"role": "user", "content": "hé"}]) == '<s>["hé"]</s>'
    with pytest.raises(ValueError, match="chat template: user first") as e:
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    assert isinstance(e.value.__cause__, jinja2.TemplateError)
    sandboxed = "{{ messages.__class__.__mro__ }}"
    tok = Tokenizer.from_metadata(_tiny_spm_metadata(**{"tokenizer.chat_template": sandboxed}))
    with pytest.raises(ValueError, match="chat template: ") as e:
        tok.apply_chat_template([])
    assert isinstance(e.value.__cause__, jinja2.exceptions.SecurityError)
    with pytest.raises(ValueError, match="no chat template"):
        vocab("llama-spm").apply_chat_template([{"role": "user", "content": "x"}])
    # an undefined name through a filter: `default` supplies it (the bounded filters once tripped on jinja's Undefined)
    defaults = "{{ enable_thinking | default(false) }}/{{ (name | default('ab')) | upper }}/{{ messages | length }}"
    tok = Tokenizer.from_metadata(_tiny_spm_metadata(**{"tokenizer.chat_template": defaults}))
    assert tok.apply_chat_template([]) == "False/AB/0"
    assert tok.apply_chat_template([], enable_thinking=True) == "True/AB/0"


# ---------------------------------------------------------------------------------------------------- loading, errors


def _write_gguf(path: Path, metadata: dict) -> None:
    writer = gguf.GGUFWriter(path, arch="llama")
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_from_gguf_equals_from_read_metadata(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, {**_tiny_spm_metadata(), "tokenizer.chat_template": "{{ bos_token }}x"})
    a, b = Tokenizer.from_gguf(path), Tokenizer.from_metadata(read_metadata(open_gguf(path)))
    for text in ("abc<ud>bca é", "<s>ab</s>"):
        for special in (False, True):
            assert a.encode(text, parse_special=special) == b.encode(text, parse_special=special)
    assert (a.vocab_size, a.bos_id, a.eos_id, a.stop_ids) == (b.vocab_size, b.bos_id, b.eos_id, b.stop_ids)
    assert a.apply_chat_template([]) == b.apply_chat_template([]) == "<s>x"


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        Tokenizer.from_gguf(not_gguf)
    full = tmp_path / "full.gguf"
    _write_gguf(full, _tiny_spm_metadata())
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(full.read_bytes()[:2000])
    with pytest.raises(GGUFError, match="truncated"):
        Tokenizer.from_gguf(truncated)
    no_tokenizer = tmp_path / "weights_only.gguf"
    _write_gguf(no_tokenizer, {"general.name": "no tokenizer"})
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model"):
        Tokenizer.from_gguf(no_tokenizer)


def test_unsupported_types():
    with pytest.raises(ValueError, match=r"'bert' \(WordPiece.*\): supported are 'gpt2', 'llama', 'gemma4'"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match=r"'made-up-model': supported are"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "made-up-model", "tokenizer.ggml.tokens": ["a"]})
    assert SUPPORTED_MODELS == ("gpt2", "llama", "gemma4")
    for model in REFUSED_MODELS:
        with pytest.raises(ValueError, match=rf"unsupported tokenizer\.ggml\.model '{model}' \("):
            Tokenizer.from_metadata({"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": ["a"]})
    bpe = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(ValueError, match=r"'made-up'.*'llama-bpe'"):
        Tokenizer.from_metadata({**bpe, "tokenizer.ggml.pre": "made-up"})
    tok = Tokenizer.from_metadata({**bpe, "tokenizer.ggml.pre": "gpt-2"})
    assert tok.encode("abba") == [2, 1, 0]
    with pytest.raises(ValueError, match="merges"):
        Tokenizer.from_metadata({**bpe, "tokenizer.ggml.merges": None})
    with pytest.raises(ValueError, match="no BOS"):
        Tokenizer.from_metadata(bpe).encode("a", add_bos=True)


# ---------------------------------------------------------------------------------------------------- pre-tokenizers

# names from llama.cpp's table (llama_vocab::impl::load), some of each LLAMA_VOCAB_PRE_TYPE_*
LLAMA_CPP_PRE_NAMES = (
    "default", "llama3", "llama-bpe", "deepseek-llm", "deepseek-coder", "deepseek-v3", "falcon", "mpt", "starcoder",
    "gpt-2", "refact", "command-r", "qwen2", "qwen35", "stablelm2", "olmo", "dbrx", "smaug-bpe", "poro-chat",
    "chatglm-bpe", "glm4", "viking", "jais", "jais-2", "tekken", "smollm", "codeshell", "bloom", "gpt3-finnish",
    "exaone", "exaone4", "exaone-moe", "chameleon", "minerva-7b", "megrez", "gpt-4o", "llama4", "superbpe",
    "trillion", "bailingmoe", "seed-coder", "hunyuan", "hunyuan-dense", "kimi-k2", "grok-2", "afmoe", "minimax-m2",
    "tiny_aya", "youtu", "spark2_5", "laguna", "minicpm5", "gemma4", "sarvam-moe", "granite-docling",
    "granite-embed-multi-97m", "solar-open", "ufakzeka", "mellum2", "joyai-llm", "hy_v4",
)  # fmt: skip


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pre_tokenizer_builds(pre):
    """Each name llama.cpp knows builds (its regexes compile for Oniguruma) and tokenizes."""
    bpe = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    tok = Tokenizer.from_metadata({**bpe, "tokenizer.ggml.pre": pre})
    assert tok.encode("ab") == [2]
    assert tok.add_bos_default == PRE_TOKENIZERS[pre].add_bos


def test_llama_cpp_pre_names_are_known():
    assert set(LLAMA_CPP_PRE_NAMES) <= set(PRE_TOKENIZERS)
    assert len(PRE_TOKENIZERS) + len(REFUSED_PRE_TOKENIZERS) == 91  # every name in llama.cpp 0.3.36's table
    bpe = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre 'whitespace': Jina's"):
        Tokenizer.from_metadata({**bpe, "tokenizer.ggml.pre": "whitespace"})


# How llama.cpp's splitter (unicode_regex_split) cuts these texts, recorded from it (a build of llama.cpp 0.3.36's
# src/unicode.cpp); each covers a place where Oniguruma on the real text would cut differently without `_onig`.
LLAMA_CPP_SPLITS = [
    # \p{Lu} etc. stand for any letter in llama.cpp: no split at a case change
    ("youtu", "helloWorld ÉCOLEécole", ["helloWorld", " ÉCOLEécole"]),
    # AFMoE's digit groups (tiny_aya uses them too): the text before a run stays joined to its first group
    ("tiny_aya", "x1234567 camelCase", ["x", "1", "234", "567", " camelCase"]),
    ("afmoe", "ab1234 cd  56 x", ["ab", "1", "234", " cd", " ", " ", "56", " x"]),
    # a class of non-ASCII characters never matches non-ASCII whitespace (llama.cpp sees "\v" there)
    ("deepseek-coder", "中\u3000文 漢字", ["中", "\u3000", "文", " ", "漢字"]),
    ("deepseek-llm", "Ωmega \u3000。 a  \n", ["Ω", "mega", " ", "\u3000", "。", " a", "  ", "\n"]),
    # \d is ASCII only; a zero-width match splits
    ("superbpe", "a1234567b ١٢٣٤", ["a", "1", "234", "567", "b ", "١٢٣٤"]),
    # Kimi K2's hand-written splitter: its own Han ranges (not 〇), marks outside words
    ("kimi-k2", "中文Ωmega e\u0301t\u00e9's 〇々", ["中文", "Ωmega", " e", "\u0301t\u00e9's", " ", "〇", "々"]),
    ("jais-2", "a" + " " * 9 + "b", ["a", " " * 8, " b"]),
    ("bloom", "Hello,\u3000world!…ok", ["Hello", ",\u3000", "world", "!…", "ok"]),
    ("gpt-4o", "HTTPServer's ĞÜN", ["HTTPServer's", " ĞÜ", "N"]),
    ("exaone-moe", "New York City 1", ["New York City", " ", "1"]),
    ("chameleon", "<sentinel:12>IMGIMGABZ  x", ["<", "sentinel", ":", "1", "2", ">", "IMGIMGABZ", "  ", "x"]),
    ("gemma4", "a▁b\n\n▁c", ["a▁b", "\n\n", "▁c"]),
]


@pytest.mark.parametrize(("pre", "text", "pieces"), LLAMA_CPP_SPLITS)
def test_pre_tokenizer_splits_as_llama_cpp(pre, text, pieces):
    splits = [hf_pre.Split(Regex(r), behavior=b) for r, b in PRE_TOKENIZERS[pre].onig_splits()]
    assert [piece for piece, _ in hf_pre.Sequence(splits).pre_tokenize_str(text)] == pieces


def test_gemma4_takes_newline_runs_whole(vocab):
    """Gemma 4: a run of newlines that is a token is one id, as llama.cpp takes it (no merges lead to "\n" * 20)."""
    tok = vocab("gemma-4")
    run = "\n" * 20
    assert [tok.token_text(i) for i in tok.encode(f"a{run}b c")] == ["a", run, "b", "▁c"]


# ---------------------------------------------------------------------------------------------------- llama.cpp


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def _fuzz_texts(n: int, seed: int = 0) -> list[str]:
    alphabet = [
        *" \t\n\r\u00a0\u3000aAzZ09's.,!?-_()<>|/\"`~$+=ÄöéЖш中文日本한국ि🚀😁🦙👍🏽\u200d\ufe0f\x00",
        *"\x85\u2003\u2028\u202fİſǅʰΩ가ㄱㄅひカｶＡ１！，。、…“—\u0301ก١²½Ⅻ〇₿\ue000\u0378#@[]\\{}^;:&%*",
        *(" " * k for k in range(2, 20)), "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|end|>",
        "<|user|>", "<0x0A>", "'ll", "'RE", "123456", "1234567", "Hello", " world", "camelCase", "\n\n", "▁",
    ]  # fmt: skip
    rng = random.Random(seed)
    return ["".join(rng.choices(alphabet, k=rng.randint(1, 40))) for _ in range(n)]


def _test_strings() -> list[str]:
    """Every test string of llama.cpp's vocabulary tests, once."""
    return list(dict.fromkeys(text for name in VOCABS for text, _ in vocab_cases(name)))


def _llama_cpp_pieces(llama_cpp, vocab, ids: list[int], special: bool) -> bytes:
    """llama_token_to_piece of each id, concatenated (llama-cpp-python's detokenize uses a 32-byte buffer, too small
    for long whitespace pieces)."""
    out = b""
    buf = ctypes.create_string_buffer(1024)
    for i in ids:
        n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, special)
        assert 0 <= n <= len(buf)
        out += buf.raw[:n]
    return out


def _compare_decode(llama_cpp, llm, tok: Tokenizer, text: str) -> None:
    vocab = llm._model.vocab
    ids = tok.encode(text, parse_special=True)
    if ids and ids[0] == tok.bos_id:
        ids = [*tok.encode("x"), *ids]
    for special in (False, True):
        if tok.model == "llama":
            # llama_detokenize removes SPM's leading space from the first piece (and has no clean_spaces for SPM)
            buf = ctypes.create_string_buffer(8 * len(text) + 256)
            arr = (llama_cpp.llama_token * len(ids))(*ids)
            n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, len(buf), False, special)
            expected = buf.raw[:n]
        else:
            # llama_detokenize's clean_spaces pass (" ?" -> "?") is lossy and not applied: compare pieces
            expected = _llama_cpp_pieces(llama_cpp, vocab, ids, special)
        assert tok.decode(ids, skip_special=not special) == expected.decode("utf-8", errors="replace"), text
    if tok.model == "llama" and tok.add_space_prefix:
        # after a leading BOS that skip_special hides, the text's leading space goes, as in llama-cpp-python
        ids = [tok.bos_id, *tok.encode(text)]
        plain = text.replace("▁", " ")  # SPM's space symbol decodes as a space (see test_spm_cannot_round_trip...)
        assert tok.decode(ids, skip_special=True) == llm.detokenize(ids).decode("utf-8", errors="replace") == plain


def _compare_with_llama_cpp(llama_cpp, path: Path, tok: Tokenizer, n_fuzz: int = 150) -> None:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    texts = _test_strings() + _fuzz_texts(n_fuzz)
    if tok.chat_template:
        messages = [
            {"role": "user", "content": "Hi there! 你好 <s> </s>"},
            {"role": "assistant", "content": "Hello.\n  How can I help?"},
            {"role": "user", "content": "A joke,\tplease 😁"},
        ]
        texts += [
            tok.apply_chat_template(messages),  # Gemma 4's reads enable_thinking through `| default(false)`
            tok.apply_chat_template(messages, add_generation_prompt=False, enable_thinking=False),
        ]
    for text in texts:
        for special in (False, True):
            expected = llm.tokenize(text.encode(), add_bos=False, special=special)
            assert tok.encode(text, parse_special=special) == expected, f"{path.name}, special={special}: {text!r}"
        _compare_decode(llama_cpp, llm, tok, text)
    vocab = llm._model.vocab
    eog = {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert tok.stop_ids == eog
    bos, eos = llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab)
    assert (tok.bos_id, tok.eos_id) == (None if bos < 0 else bos, None if eos < 0 else eos)
    assert tok.add_bos_default == llama_cpp.llama_vocab_get_add_bos(vocab)
    assert tok.add_eos_default == llama_cpp.llama_vocab_get_add_eos(vocab)


@pytest.mark.llama_cpp
def test_smollm2_matches_llama_cpp(llama_cpp, smollm2_path, smollm2_tok):
    _compare_with_llama_cpp(llama_cpp, smollm2_path, smollm2_tok)


@pytest.mark.llama_cpp
def test_gemma3_matches_llama_cpp(llama_cpp, gemma3_path, gemma3_tok):
    _compare_with_llama_cpp(llama_cpp, gemma3_path, gemma3_tok)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("name", VOCABS + UNTESTED_VOCABS)
def test_vocab_matches_llama_cpp(llama_cpp, vocab, name):
    _compare_with_llama_cpp(llama_cpp, vocab_path(name), vocab(name), n_fuzz=100)


# one name per distinct PreTokenizer of PRE_TOKENIZERS
PRE_GROUPS = list({spec: name for name, spec in reversed(PRE_TOKENIZERS.items())}.values())


def _relabelled(tmp_path: Path, source: str, pre: str, n_tokens: int | None = None) -> Path:
    """llama.cpp's ggml-vocab-SOURCE.gguf as a gpt2 (BPE) vocabulary with tokenizer.ggml.pre = pre: its first n_tokens
    tokens (all by default), with the merges among them."""
    md = _read_tokenizer_metadata(vocab_path(source))
    tokens = md["tokenizer.ggml.tokens"][:n_tokens]
    merges = md["tokenizer.ggml.merges"]
    if n_tokens is not None:
        kept = set(tokens)
        pairs = (m.split(" ", 1) for m in merges)
        merges = [f"{a} {b}" for a, b in pairs if a in kept and b in kept and a + b in kept]
    path = tmp_path / f"{source}-as-{pre}.gguf"
    _write_gguf(
        path,
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": md["tokenizer.ggml.token_type"][: len(tokens)].tolist(),
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.eos_token_id": md["tokenizer.ggml.eos_token_id"],
            "tokenizer.ggml.bos_token_id": md.get("tokenizer.ggml.bos_token_id", md["tokenizer.ggml.eos_token_id"]),
        },
    )
    return path


@pytest.mark.llama_cpp
@pytest.mark.parametrize("pre", PRE_GROUPS)
def test_pre_tokenizer_matches_llama_cpp(llama_cpp, tmp_path, pre):
    """Every pre-tokenizer, on a vocabulary relabelled with its name (llama.cpp ships test files for few of them):
    GPT-2's for byte-level BPE, Gemma 4's first 32768 tokens for the SentencePiece-style ones (raw UTF-8 pieces, byte
    tokens <0x00>..<0xFF> among them)."""
    if PRE_TOKENIZERS[pre].byte_level:
        path = _relabelled(tmp_path, "gpt-2", pre)
    else:
        path = _relabelled(tmp_path, "gemma-4", pre, n_tokens=32768)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    tok = Tokenizer.from_gguf(path)
    for text in _test_strings() + _fuzz_texts(150, seed=1):
        assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=False), f"{pre}: {text!r}"
    assert tok.add_bos_default == llama_cpp.llama_vocab_get_add_bos(llm._model.vocab)
