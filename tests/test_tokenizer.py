"""realm.runtime.tokenizer: llama.cpp's token ids for GGUF vocabularies, decoding, streaming, chat templates.

Test vectors: llama.cpp's vocab-only GGUF files with their .inp/.out files (ids per string, no BOS, no special
parsing), in tests/data/tokenizer (a copy of shared/data/tokenizer) or $REALM_TOKENIZER_DATA; missing files fail.
Tests marked `llama_cpp` compare with llama.cpp itself through llama-cpp-python.
"""

from __future__ import annotations

import ctypes
import os
import random
import time
from pathlib import Path

import gguf
import jinja2
import pytest

from realm.gguf_io import GGUFError, open_gguf, read_metadata
from realm.models import default_model_path
from realm.runtime.tokenizer import PRE_TOKENIZERS, SUPPORTED_MODELS, Tokenizer, _read_tokenizer_metadata

DATA = Path(os.environ.get("REALM_TOKENIZER_DATA", Path(__file__).parent / "data" / "tokenizer"))
VOCABS = ("gpt-2", "llama-bpe", "llama-spm", "phi-3")
SEPARATOR = "\n__ggml_vocab_test__\n"
# measured 0.1-0.6 s (llama-bpe, 128k tokens, 280k merges) on an idle 2-core CPU; gguf's reader, which this avoids,
# takes 8-10 s there. Generous, so a busy CI runner does not fail it.
LOAD_SECONDS = 5.0


def _vocab_path(name: str) -> Path:
    return DATA / f"ggml-vocab-{name}.gguf"


def _cases(name: str) -> list[tuple[str, list[int]]]:
    path = _vocab_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer test vectors missing: {path}")
    texts = Path(f"{path}.inp").read_text(encoding="utf-8").split(SEPARATOR)
    ids = Path(f"{path}.out").read_text(encoding="utf-8").split("\n")
    assert len(ids) == len(texts), f"{path}: {len(texts)} strings but {len(ids)} id lines"
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids, strict=True)]


CASES = {name: _cases(name) for name in VOCABS}
CASE_PARAMS = [pytest.param(name, i, id=f"{name}-{i:02d}") for name in VOCABS for i in range(len(CASES[name]))]

# multi-byte UTF-8: emoji (4 bytes, byte-fallback tokens in SPM vocabularies), ZWJ sequences, CJK, Khmer, accents
UNICODE_TEXTS = (
    "🦙",
    " this is 🦙.cpp",
    "😶‍🌫️ and 👍🏽",
    "我想在apple工作1314151天～",
    "កាន់តែពិសេសអាច",
    "Cửa Việt, Äpfel, нещо",
)


@pytest.fixture(scope="module")
def vocab():
    """name -> Tokenizer, loaded once per module."""
    loaded: dict[str, Tokenizer] = {}

    def get(name: str) -> Tokenizer:
        if name not in loaded:
            path = _vocab_path(name)
            if not path.is_file():
                pytest.skip(f"no {path}")
            loaded[name] = Tokenizer.from_gguf(path)
        return loaded[name]

    return get


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path)


# ---------------------------------------------------------------------------------------------------- test vectors


@pytest.mark.parametrize(("name", "index"), CASE_PARAMS)
def test_llama_cpp_test_vectors(vocab, name, index):
    text, expected = CASES[name][index]
    assert vocab(name).encode(text) == expected, f"{name} string {index}: {text!r}"


@pytest.mark.parametrize(("name", "index"), CASE_PARAMS)
def test_decode_round_trips(vocab, name, index):
    tok = vocab(name)
    text, expected = CASES[name][index]
    assert tok.decode(expected) == text
    if tok.bos_id is not None:
        assert tok.decode([tok.bos_id, *expected], skip_special=True) == text


@pytest.mark.parametrize("name", VOCABS)
def test_load_time(name):
    path = _vocab_path(name)
    if not path.is_file():
        pytest.skip(f"no {path}")
    start = time.perf_counter()
    tok = Tokenizer.from_gguf(path)
    seconds = time.perf_counter() - start
    assert seconds < LOAD_SECONDS, f"{name}: {tok.vocab_size} tokens loaded in {seconds:.2f} s"


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
    ],
)
def test_special_ids(vocab, name, bos, eos, eot, stops, add_bos):
    tok = vocab(name)
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.add_bos_default) == (bos, eos, eot, add_bos)
    assert tok.stop_ids == frozenset(stops)
    assert tok.encode("Hello", add_bos=True)[0] == bos


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
    with pytest.raises(ValueError, match=r"'bert'.*'gpt2', 'llama'"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    assert SUPPORTED_MODELS == ("gpt2", "llama")
    bpe = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(ValueError, match=r"'made-up'.*'llama-bpe'"):
        Tokenizer.from_metadata({**bpe, "tokenizer.ggml.pre": "made-up"})
    tok = Tokenizer.from_metadata({**bpe, "tokenizer.ggml.pre": "gpt-2"})
    assert tok.encode("abba") == [2, 1, 0]
    for pre in ("default", "smollm", "qwen2", "gpt-4o"):
        assert pre in PRE_TOKENIZERS
        assert Tokenizer.from_metadata({**bpe, "tokenizer.ggml.pre": pre}).encode("ab") == [2]
    with pytest.raises(ValueError, match="merges"):
        Tokenizer.from_metadata({**bpe, "tokenizer.ggml.merges": None})
    with pytest.raises(ValueError, match="no BOS"):
        Tokenizer.from_metadata(bpe).encode("a", add_bos=True)


# ---------------------------------------------------------------------------------------------------- llama.cpp


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def _fuzz_texts(n: int, seed: int = 0) -> list[str]:
    alphabet = [
        *" \t\n\r\u00a0\u3000aAzZ09's.,!?-_()<>|/\"`~$+=ÄöéЖш中文日本한국ि🚀😁🦙👍🏽\u200d\ufe0f\x00",
        *(" " * k for k in range(2, 20)), "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|end|>",
        "<|user|>", "<0x0A>", "'ll", "'RE", "123456", "Hello", " world",
    ]  # fmt: skip
    rng = random.Random(seed)
    return ["".join(rng.choices(alphabet, k=rng.randint(1, 40))) for _ in range(n)]


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
    if tok.model == "llama":
        # after a leading BOS that skip_special hides, the text's leading space goes, as in llama-cpp-python
        ids = [tok.bos_id, *tok.encode(text)]
        assert tok.decode(ids, skip_special=True) == llm.detokenize(ids).decode("utf-8", errors="replace") == text


def _compare_with_llama_cpp(llama_cpp, path: Path, tok: Tokenizer) -> None:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    texts = [text for name in VOCABS for text, _ in CASES[name]] + _fuzz_texts(150)
    if tok.chat_template:
        messages = [
            {"role": "user", "content": "Hi there! 你好 <s> </s>"},
            {"role": "assistant", "content": "Hello.\n  How can I help?"},
            {"role": "user", "content": "A joke,\tplease 😁"},
        ]
        texts += [tok.apply_chat_template(messages), tok.apply_chat_template(messages, add_generation_prompt=False)]
    for text in texts:
        for special in (False, True):
            expected = llm.tokenize(text.encode(), add_bos=False, special=special)
            assert tok.encode(text, parse_special=special) == expected, f"{path.name}, special={special}: {text!r}"
        _compare_decode(llama_cpp, llm, tok, text)
    vocab = llm._model.vocab
    eog = {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert tok.stop_ids == eog
    assert (tok.bos_id, tok.eos_id) == (llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab))
    assert tok.add_bos_default == llama_cpp.llama_vocab_get_add_bos(vocab)


@pytest.mark.llama_cpp
def test_smollm2_matches_llama_cpp(llama_cpp, smollm2_path, smollm2_tok):
    _compare_with_llama_cpp(llama_cpp, smollm2_path, smollm2_tok)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("name", VOCABS)
def test_vocab_matches_llama_cpp(llama_cpp, vocab, name):
    _compare_with_llama_cpp(llama_cpp, _vocab_path(name), vocab(name))


# one name per distinct (regexes, ignore_merges) entry of PRE_TOKENIZERS
PRE_GROUPS = list({spec: name for name, spec in reversed(PRE_TOKENIZERS.items())}.values())


@pytest.mark.llama_cpp
@pytest.mark.parametrize("pre", PRE_GROUPS)
def test_pre_tokenizer_matches_llama_cpp(llama_cpp, tmp_path, pre):
    """Every pre-tokenizer, on GPT-2's vocabulary relabelled with its name (llama.cpp has no other test vocab)."""
    source = _vocab_path("gpt-2")
    if not source.is_file():
        pytest.skip(f"no {source}")
    md = _read_tokenizer_metadata(source)
    path = tmp_path / f"gpt-2-as-{pre}.gguf"
    _write_gguf(
        path,
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": md["tokenizer.ggml.tokens"],
            "tokenizer.ggml.token_type": md["tokenizer.ggml.token_type"].tolist(),
            "tokenizer.ggml.merges": md["tokenizer.ggml.merges"],
            "tokenizer.ggml.eos_token_id": 50256,
        },
    )
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    tok = Tokenizer.from_gguf(path)
    for text in [text for name in VOCABS for text, _ in CASES[name]] + _fuzz_texts(150, seed=1):
        assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=False), f"{pre}: {text!r}"
    assert tok.add_bos_default == llama_cpp.llama_vocab_get_add_bos(llm._model.vocab)
