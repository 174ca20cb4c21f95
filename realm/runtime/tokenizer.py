"""Tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata, giving llama.cpp's token ids exactly.

    tok = Tokenizer.from_gguf("model.gguf")           # or Tokenizer.from_metadata(read_metadata(reader))
    ids = tok.encode("Hello world", add_bos=tok.add_bos_default)
    text = tok.decode(ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt, parse_special=True)     # <|im_start|> etc. become their ids

Three vocabulary types (`tokenizer.ggml.model`), each mirroring llama.cpp's `llama-vocab.cpp` (llama-cpp-python
0.3.36's vendored llama.cpp):
- "gpt2": BPE. The text is split by the regexes that `tokenizer.ggml.pre` names (`PRE_TOKENIZERS`: every name
  llama.cpp knows, with its regexes verbatim and the settings it gives the name), each piece is byte-level encoded
  and merged by merge rank. Runs on HF `tokenizers` (Split pre-tokenizers + ByteLevel + BPE, with `ignore_merges`
  where llama.cpp sets it). llama.cpp runs its regexes with C++ std::regex on a changed text (non-ASCII characters
  stand for their Unicode category, non-ASCII whitespace for "\v"), and a few through hand-written splitters (Kimi
  K2, AFMoE's digit groups); `_onig` turns each into the Oniguruma regex that splits real text the same way.
  SentencePiece-style BPE pre-tokenizers (Gemma 4's, sarvam-moe) merge raw UTF-8 with spaces as "▁" and `<0xNN>`
  byte fallback instead.
- "gemma4": Gemma 4's BPE, as llama.cpp runs it: "gpt2" with the gemma4 pre-tokenizer whatever the file names.
- "llama": SentencePiece-style (Llama 2, Phi-3, Gemma 2/3). Spaces become "▁", a space is prepended to every text
  fragment (unless `tokenizer.ggml.add_space_prefix` is false, as for Gemma), and adjacent pieces merge by the score of
  the merged piece, highest first, leftmost on ties; characters no piece covers become `<0xNN>` byte tokens. Runs on a
  `tokenizers` BPE model whose merge list is every split of every vocabulary piece, ranked by that piece's score (see
  `_spm_merges`; Gemma's 262k pieces load in about 3 s).
Other types are refused by name (`REFUSED_MODELS`: "bert" WordPiece, "t5" Unigram, "rwkv", "plamo2", ...), as are
the "whitespace" pre-tokenizer (`REFUSED_PRE_TOKENIZERS`) and a `tokenizer.ggml.pre` llama.cpp does not know: realm
never tokenizes with a guessed pre-tokenizer.

Special tokens (control, user-defined, unknown) are split out of the text before either model runs, by a port of
llama.cpp's `tokenizer_st_partition` (`_partition`): tokens in order of decreasing length, each found left to right in
the remaining text fragments. HF's added-token matcher is not used because it matches leftmost-longest in one pass and
strips Unicode (not ASCII) whitespace, which differs from llama.cpp in corner cases. With `parse_special=False`,
control and unknown tokens are plain text but user-defined ones are still split out, as in llama.cpp.

Decoding concatenates each token's bytes as llama.cpp's `token_to_piece` renders them, then decodes UTF-8 (invalid
bytes become U+FFFD). Two documented differences from `llama_detokenize`: its `clean_spaces` pass (" ," -> ",",
" 's" -> "'s", ... for the gpt-2/llama3 pre-tokenizers) is not applied, because it loses information and breaks
`decode(encode(s)) == s` (llama-cpp-python's `Llama.detokenize` skips it too); and for SPM, when skip_special hides a
leading BOS, the leading space of the text is removed (as llama-cpp-python does; `llama_detokenize` keeps it).
"""

from __future__ import annotations

import codecs
import itertools
import logging
import mmap
import operator
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum, IntFlag
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models as hf_models
from tokenizers import pre_tokenizers as hf_pre

from realm.gguf_io import GGUFError

from .chat_template import TEMPLATE_KEY, compile_template, render
from .config import MAX_VOCAB, Metadata

log = logging.getLogger(__name__)

SUPPORTED_MODELS = ("gpt2", "llama", "gemma4")
# tokenizer.ggml.model values llama.cpp knows and realm refuses: what each needs that realm does not implement
REFUSED_MODELS = {
    "bert": "WordPiece (llama.cpp's WPM) with BERT's normalizer, for embedding models",
    "t5": "Unigram (llama.cpp's UGM) with a precompiled SentencePiece normalizer",
    "rwkv": "RWKV's greedy trie tokenizer with escaped byte pieces",
    "plamo2": "PLaMo 2's Aho-Corasick tokenizer",
    "whitespace": "BPE on whitespace-separated, optionally lowercased words (Jina embeddings)",
    "hybriddna": "DNA k-mer tokenization",
    "no_vocab": "no vocabulary: give prompts as token ids",
    "none": "no vocabulary: give prompts as token ids",
}
MAX_MERGES = 2**24  # tokenizer.ggml.merges entries (Llama 3: 280147, Gemma 4: 514906)
_SURROGATE = re.compile("[\ud800-\udfff]")
_NEWLINE_RUNS = re.compile("(\n+)")


# ------------------------------------------------------------------------------------------ pre-tokenizers
@dataclass(frozen=True)
class PreTokenizer:
    """One `tokenizer.ggml.pre` as llama.cpp 0.3.36 (llama-cpp-python's) tokenizes it: the regexes of its
    LLAMA_VOCAB_PRE_TYPE_* (llm_tokenizer_bpe), verbatim, and the settings llama_vocab::impl::load gives the name.

    The regexes apply in turn, each splitting the pieces the previous one left (text no regex matches stays a piece of
    its own); `onig_splits` are the same splits for HF tokenizers' Oniguruma (see `_onig`).
    """

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is a whole token is taken as is, without merging
    add_bos: bool = False  # BOS by default (tokenizer.ggml.add_bos_token overrides)
    byte_level: bool = True  # GPT-2's byte-to-unicode pieces; False: raw UTF-8 pieces, <0xNN> byte fallback tokens
    escape_spaces: bool = False  # " " -> "▁" before splitting (SentencePiece-style BPE)
    newline_tokens: bool = False  # a run of newlines that is a token is taken whole, without merging (Gemma 4)
    always_bos: bool = False  # BOS by default even where tokenizer.ggml.add_bos_token is false (Gemma 4)

    def onig_splits(self) -> tuple[tuple[str, str], ...]:
        """(Oniguruma regex, HF Split behavior) for each regex, in order."""
        return tuple(_onig(r) for r in self.regexes)


# llama.cpp's adapted regexes (llama-vocab.cpp, llm_tokenizer_bpe), verbatim: case-insensitive contractions spelled out
# as '[sS]', which also keeps onig's Unicode case folding (e.g. 'ſ' ~ 's') out of them.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_RE = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35_RE = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_JAIS2_RE = _CONTRACTIONS + (
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)"
    r"|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"
)
# [^a-z] after a \p{L} lookahead: a letter that is not ASCII lowercase (llama.cpp's stand-in for \p{Lu} etc.)
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_GPT4O_RE = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_RE = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER_M, _LOWER_M = r"((?=[\p{L}\p{M}])([^a-z]))", r"((?=[\p{L}\p{M}])([^A-Z]))"
_GRANITE_EMB_RE = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER_M}*{_LOWER_M}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER_M}+{_LOWER_M}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CASED_WORDS = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
)
_TINY_AYA_RE = _CASED_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_YOUTU_RE = _CASED_WORDS + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_YOUTU_CJK_RE = "[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥\u3040-ゟ゠-ヿ]+"
_DEEPSEEK_CJK_RE = "[一-龥ࠀ-一가-\ud7ff]+"
# NFC-variant characters escaped (U+1F7D, U+2126 ...): an editor that normalizes the file would change them
_DEEPSEEK_LLM_LETTERS_RE = (
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7d"
    "ᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎ"
    "ꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"
)
_AFMOE_WORDS_RE = (
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"""
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# the same with carriage return and line feed themselves in place of \r and \n, as llama.cpp's source has it
_DEEPSEEK_V3_RES = (r"\p{N}{1,3}", "[一-龥\u3040-ゟ゠-ヿ]+", _AFMOE_WORDS_RE.replace(r"\r\n", "\r\n"))
_BLOOM_RE = r" ?[^(\s|.,!?…。，、।۔،)]+"
_NEWLINES_RE = r"[^\n]+|[\n]+"

_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2 = PreTokenizer((_GPT2_RE,))
_STARCODER = PreTokenizer((r"\p{N}", _GPT2_RE))
_LLAMA3 = PreTokenizer((_LLAMA3_RE,), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer((_QWEN2_RE,))
_DEEPSEEK_V3 = PreTokenizer(_DEEPSEEK_V3_RES)
_GPT4O = PreTokenizer((_GPT4O_RE,))
_TINY_AYA = PreTokenizer((r"\d{1,3}(?=(?:\d{3})*\b)", _TINY_AYA_RE))
_BAILINGMOE_RE = (
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]"
    r"|\s+(?!\S)|\s+"
)
_CHATGLM4 = PreTokenizer((_LLAMA3_RE,))
# SentencePiece-style BPE: spaces become "▁", merges run on each line's raw UTF-8 text
_GEMMA4 = PreTokenizer(
    (_NEWLINES_RE,), add_bos=True, byte_level=False, escape_spaces=True, newline_tokens=True, always_bos=True
)

# tokenizer.ggml.pre -> how llama.cpp tokenizes it: every name of llama_vocab::impl::load's table
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(
        ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
         "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais", "exaone4", "trillion",
         "granite-docling"),
        _GPT2,
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
        _LLAMA3,
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer((_LLAMA3_RE,))),
    "jais-2": PreTokenizer((_JAIS2_RE,)),
    "minicpm5": PreTokenizer((r"\p{N}{1,3}", _QWEN2_RE.replace(r"|\p{N}|", r"|\p{N}+|")), ignore_merges=True),
    "deepseek-llm": PreTokenizer(
        ("[\r\n]", _DEEPSEEK_LLM_LETTERS_RE, r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", _DEEPSEEK_CJK_RE, r"\p{N}+")
    ),
    "deepseek-coder": PreTokenizer(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK_RE, r"\p{N}")),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "hy_v4", "joyai-llm"), _DEEPSEEK_V3),
    "spark2_5": PreTokenizer((*_DEEPSEEK_V3_RES[:2], _DEEPSEEK_V3_RES[2].replace("[\r\n]*|\\s*[\r\n]+", "|[\r\n]"),
                              r"\p{N}")),
    "youtu": PreTokenizer((_YOUTU_CJK_RE, _YOUTU_RE), ignore_merges=True),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_RE, r"[0-9][0-9][0-9]")),
    **dict.fromkeys(
        ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"), _STARCODER
    ),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open", "grok-2"),
        _QWEN2,
    ),
    "qwen35": PreTokenizer((_QWEN35_RE,)),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), PreTokenizer((_BLOOM_RE,))),
    "chatglm-bpe": _CHATGLM4,
    **dict.fromkeys(("glm4", "glm5"), PreTokenizer((_LLAMA3_RE,), ignore_merges=True)),
    "viking": PreTokenizer((_BLOOM_RE, r"\p{N}")),
    "tekken": PreTokenizer((_TEKKEN_RE,), ignore_merges=True, add_bos=True),
    "chameleon": PreTokenizer(
        (r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
         r"[\p{P}!-/:-@\[-`{-~]", _GPT2_RE),
        add_bos=True,
    ),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
    "granite-embed-multi-97m": PreTokenizer((_GRANITE_EMB_RE,), ignore_merges=True),
    **dict.fromkeys(("tiny_aya", "cohere2moe"), _TINY_AYA),
    "superbpe": PreTokenizer((r"\p{N}+", r"(?=(\d{3})+(?!\d))")),
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), PreTokenizer((_BAILINGMOE_RE,))),
    "seed-coder": PreTokenizer((
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
    )),
    "kimi-k2": PreTokenizer((r"\p{Han}+",)),  # llama.cpp's hand-written splitter (see _CUSTOM)
    "ufakzeka": PreTokenizer((_QWEN2_RE[len(_CONTRACTIONS) + 1 :],)),
    "afmoe": PreTokenizer((
        r"\p{AFMoE_digits}",  # llama.cpp's hand-written splitter (see _CUSTOM)
        # "\u8c48-": llama.cpp's source has U+8C48 where U+F900 (its canonical equivalent) was meant
        "[一-鿿㐀-䶿\u8c48-\ufaff\u3040-ゟ゠-ヿ･-ﾟ⼀-\u2fdfเ-\u0e7f\u0e80-\u0effក-\u17ffက-႟ꩠ-ꩿꧠ-\ua9ff가-\ud7afᄀ-ᇿ]+",
        _AFMOE_WORDS_RE,
    )),
    "laguna": PreTokenizer((_NEWLINES_RE, _QWEN2_RE)),
    "exaone-moe": PreTokenizer((
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
        r"|\s*[\r\n]|\s+(?!\S)|\s+",
    )),
    **dict.fromkeys(("gemma4", "granite-embed-multi-311m"), _GEMMA4),
    "sarvam-moe": PreTokenizer((_NEWLINES_RE,), byte_level=False, escape_spaces=True),
}  # fmt: skip
# names llama.cpp knows that realm refuses, and why
REFUSED_PRE_TOKENIZERS = {
    # LLAMA_VOCAB_PRE_TYPE_WHITESPACE ("\S+", raw UTF-8) is meant for the "whitespace" model (refused), which drops the
    # whitespace; with a gpt2 model llama.cpp keeps it and aborts on a piece of two spaces (find_bpe_rank's assert)
    "whitespace": "Jina's whitespace pre-tokenizer, which llama.cpp runs only with its 'whitespace' model",
}

# llama.cpp's hand-written splitters (unicode_regex_split_custom), which it picks by the regex's exact text, as regexes
# unicode_cpt_is_han's ranges (Onig's \p{Han} is the Unicode script, which differs)
_HAN = (
    r"\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}\x{2B740}-\x{2B81F}"
    r"\x{2B820}-\x{2CEAF}\x{2CEB0}-\x{2EBEF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}"
)
# digits in groups of 3 from the right, each group merged with the text before it: the first group of a run takes the
# text since the previous run (AFMoE's splitter, linear: the lookahead runs at the start of a run only)
_DIGIT_GROUPS = (r"(?<!\p{N})\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))|\p{N}{3}", "merged_with_previous")
_CUSTOM: dict[str, tuple[str, str]] = {
    # Kimi K2: Han runs; words of non-Han letters (not marks, upper and lower case alike) with a contraction
    r"\p{Han}+": (
        rf"[{_HAN}]+|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}&&[^{_HAN}]]+(?:'[sStTmMdD]|'[rR][eE]|'[vV][eE]|'[lL][lL])?"
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "isolated",
    ),
    r"\p{AFMoE_digits}": _DIGIT_GROUPS,
    r"\d{1,3}(?=(?:\d{3})*\b)": _DIGIT_GROUPS,  # tiny_aya: llama.cpp runs AFMoE's splitter for it
}
# llama.cpp runs a regex with a Unicode category (\p{L} ...) on a copy of the text where each non-ASCII character is
# one byte standing for its category, and \p{Lu}, \p{Ll}, \p{Lt}, \p{Lm}, \p{Lo} all stand for every letter
_CATEGORY = re.compile(r"\\p\{(?:N|L|P|M|S|Lu|Ll|Lt|Lm|Lo)\}")
_UNICODE_SPACES = r"\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}"  # not ASCII


def _onig(regex: str) -> tuple[str, str]:
    """llama.cpp's pre-tokenizer regex as an Oniguruma regex, and the HF Split behavior, that split text the same way
    (checked against llama.cpp's own splitter for every PRE_TOKENIZERS entry, tests/test_tokenizer.py).

    llama.cpp runs its regexes with C++ std::regex (ECMAScript), on a changed text: non-ASCII whitespace becomes "\\v",
    and, in a regex with a Unicode category, every other non-ASCII character becomes its category. So \\d, \\w and
    class ranges are ASCII-only there, `$` is the end of the piece, \\p{Lu} etc. are any letter, and a character class
    of non-ASCII characters never matches non-ASCII whitespace. Oniguruma sees the real text: this spells those out.
    """
    if regex in _CUSTOM:
        return _CUSTOM[regex]
    collapsed = _CATEGORY.search(regex) is not None
    out: list[str] = []
    i, n = 0, len(regex)
    klass: int | None = None  # index in out where the open character class starts
    while i < n:
        c = regex[i]
        if c == "\\":
            esc = regex[i : i + 2]
            cat = re.match(r"\\p\{L[ultmo]\}", regex[i:])
            if collapsed and cat:
                out.append(r"\p{L}")
                i += len(cat.group())
                continue
            if esc == r"\d":
                out.append("0-9" if klass is not None else "[0-9]")
            elif esc == r"\D" and klass is None:
                out.append("[^0-9]")
            elif esc in (r"\w", r"\W", r"\b", r"\B", r"\D"):
                raise ValueError(f"pre-tokenizer regex {regex!r}: {esc} has no Oniguruma equivalent here")
            else:
                out.append(esc)
            i += 2
            continue
        if klass is None and c == "[":
            klass = len(out)
            out.append(c)
        elif klass is not None and c == "]":
            body = "".join(out[klass + 1 :])
            if not collapsed and not body.startswith("^") and any(ord(ch) > 127 for ch in body):
                out.append(f"&&[^{_UNICODE_SPACES}]")
            out.append(c)
            klass = None
        elif klass is None and c == "$":
            out.append(r"\z")
        else:
            out.append(c)
        i += 1
    return "".join(out), "isolated"


# ------------------------------------------------------------------------------------------ token types and attrs
class TokenAttr(IntFlag):
    """llama.cpp's `llama_token_attr` bits."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8


# tokenizer.ggml.token_type values (gguf TokenType: 0 undefined .. 6 byte) -> attribute
_TYPE_TO_ATTR = np.array(
    [TokenAttr.UNDEFINED, TokenAttr.NORMAL, TokenAttr.UNKNOWN, TokenAttr.CONTROL, TokenAttr.USER_DEFINED,
     TokenAttr.UNUSED, TokenAttr.BYTE],
    dtype=np.int32,
)  # fmt: skip
_SPECIAL = TokenAttr.CONTROL | TokenAttr.UNKNOWN  # not parsed without parse_special, not rendered by skip_special
_PARTITIONED = _SPECIAL | TokenAttr.USER_DEFINED  # llama.cpp's cache_special_tokens
_ASCII_SPACE = " \t\n\v\f\r"  # C isspace, which llama.cpp's lstrip/rstrip use

# special ids llama.cpp finds by token text when the metadata lacks their key (llama_vocab::impl::load)
_AUTO_IDS: dict[str, tuple[str, ...]] = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
            "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}  # fmt: skip
_DEPRECATED_ID_KEYS = {"fim_pre": "prefix", "fim_suf": "suffix", "fim_mid": "middle"}
# token texts llama.cpp treats as end of generation (and forces to control type)
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
))  # fmt: skip
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss: forced user-defined


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table for byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


# ------------------------------------------------------------------------------------------ GGUF metadata reading
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


def _read_tokenizer_metadata(path: Path) -> dict[str, Any]:
    """The `tokenizer.*` and `general.*` metadata of a GGUF file, read straight from its header.

    gguf-py's GGUFReader builds Python objects for every item of every array (about 10 s for a 128k-token
    vocabulary); this reads string arrays in one loop and numeric arrays with numpy (about 0.15 s). Tensor data is
    never touched. Raises GGUFError for a file that is not GGUF or whose header is cut short or corrupt.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise GGUFError(f"{path}: not a GGUF file: {size} bytes, shorter than a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            magic, version, _, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
            if magic != b"GGUF":
                raise GGUFError(f"{path}: not a GGUF file: it starts with {magic!r}, expected b'GGUF'")
            if version & 0xFFFF == 0:
                raise GGUFError(f"{path}: big-endian GGUF files are not supported")
            if version < 2:
                raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or later)")
            try:
                return _read_kv(buf, 24, n_kv, size)
            except (struct.error, ValueError, OverflowError, MemoryError) as e:
                msg = e.args[0] if isinstance(e, GGUFError) else f"{type(e).__name__}: {e}"
                raise GGUFError(f"{path}: corrupt or truncated GGUF header: {msg}") from None


def _read_kv(buf: mmap.mmap, off: int, n_kv: int, size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(n_kv):
        key, off = _read_str(buf, off, size)
        (vtype,) = struct.unpack_from("<I", buf, off)
        keep = key.startswith(("tokenizer.", "general."))
        value, off = _read_value(buf, off + 4, vtype, size, keep)
        if keep:
            out[key] = value
    return out


def _read_str(buf: mmap.mmap, off: int, size: int) -> tuple[str, int]:
    (n,) = _U64.unpack_from(buf, off)
    end = off + 8 + n
    if end > size:
        raise GGUFError(f"a string at byte {off} runs to byte {end}, past the end of the file ({size} bytes)")
    return str(buf[off + 8 : end], "utf-8"), end


def _read_value(buf: mmap.mmap, off: int, vtype: int, size: int, keep: bool) -> tuple[Any, int]:
    if vtype in _SCALARS:
        s = struct.Struct(_SCALARS[vtype])
        return s.unpack_from(buf, off)[0], off + s.size
    if vtype == _STRING:
        return _read_str(buf, off, size)
    if vtype != _ARRAY:
        raise GGUFError(f"unknown metadata value type {vtype} at byte {off - 4}")
    item_type, n = struct.unpack_from("<IQ", buf, off)
    off += 12
    if item_type in _SCALARS:
        dtype = np.dtype(_SCALARS[item_type])
        end = off + n * dtype.itemsize
        if end > size:
            raise GGUFError(f"an array at byte {off - 12} runs to byte {end}, past the end of the file ({size} bytes)")
        return (np.frombuffer(buf, dtype, n, off).copy() if keep else None), end
    if item_type != _STRING:
        raise GGUFError(f"unsupported array item type {item_type} at byte {off - 12}")
    if off + 8 * n > size:
        raise GGUFError(f"a string array at byte {off - 12} declares {n} items, more than the file can hold")
    items: list[str] | None = [""] * n if keep else None
    unpack = _U64.unpack_from
    for i in range(n):  # lengths are interleaved with the bytes: one pass, no per-item bound check (done below)
        (length,) = unpack(buf, off)
        if items is not None:
            items[i] = str(buf[off + 8 : off + 8 + length], "utf-8")
        off += 8 + length
    if off > size:
        raise GGUFError(f"a string array runs to byte {off}, past the end of the file ({size} bytes)")
    return items, off



# ------------------------------------------------------------------------------------------ the tokenizer
class _Strip(Enum):
    """Which leading space decoding removes: the one SPM encoding prepends to the text."""

    NONE = "none"
    FIRST_TOKEN = "first token"  # from the first token's piece, as llama_detokenize
    TEXT = "text"  # from the decoded text, as llama-cpp-python's detokenize when skip_special hides a leading BOS


class Tokenizer:
    """llama.cpp-exact tokenizer for a GGUF vocabulary; see the module docstring. Thread-safe for encode/decode."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos_default: bool
    stop_ids: frozenset[int]
    chat_template: str | None

    def __init__(self, metadata: Mapping[str, Any]):
        """metadata: key -> value (plain or MetadataValue); use from_gguf / from_metadata."""
        md = Metadata({k: v for k, v in metadata.items() if k.startswith(("tokenizer.", "general."))})
        model = md.string("tokenizer.ggml.model", default=None)
        if model is None:
            raise ValueError("the metadata has no tokenizer.ggml.model: this GGUF file carries no tokenizer")
        if model not in SUPPORTED_MODELS:
            what = f" ({REFUSED_MODELS[model]})" if model in REFUSED_MODELS else ""
            raise ValueError(
                f"unsupported tokenizer.ggml.model {model[:40]!r}{what}: supported are "
                f"{', '.join(map(repr, SUPPORTED_MODELS))}"
            )
        self.model = model
        # llama.cpp reads no pre-tokenizer for SPM, and always takes Gemma 4's for the gemma4 model
        self.pre = "gemma4" if model == "gemma4" else md.string("tokenizer.ggml.pre", default="") or "default"
        if model != "llama" and self.pre in REFUSED_PRE_TOKENIZERS:
            raise ValueError(f"unsupported tokenizer.ggml.pre {self.pre!r}: {REFUSED_PRE_TOKENIZERS[self.pre]}")
        if model != "llama" and self.pre not in PRE_TOKENIZERS:
            raise ValueError(
                f"unsupported tokenizer.ggml.pre {self.pre[:40]!r} for a {model} (BPE) vocabulary: llama.cpp "
                f"0.3.36 knows {', '.join(map(repr, PRE_TOKENIZERS))}"
            )
        if model == "gpt2" and "tokenizer.ggml.pre" not in md:
            log.warning("tokenizer.ggml.pre is missing: using the 'default' pre-tokenizer, as llama.cpp does")
        self._pre: PreTokenizer | None = None if model == "llama" else PRE_TOKENIZERS[self.pre]

        tokens = md.strings("tokenizer.ggml.tokens", MAX_VOCAB, default=None)
        if not tokens:
            raise ValueError("the metadata has no tokenizer.ggml.tokens (the vocabulary)")
        # llama.cpp renames empty pieces, which would otherwise be unreachable
        self._tokens: list[str] = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.vocab_size = len(self._tokens)
        self._token_to_id = {t: i for i, t in enumerate(self._tokens)}
        if len(self._token_to_id) != self.vocab_size:
            raise ValueError(f"tokenizer.ggml.tokens has duplicate pieces ({self.vocab_size - len(self._token_to_id)})")
        scores = md.numbers("tokenizer.ggml.scores", "float", self.vocab_size, default=None)
        self._scores = None if scores is None else scores.astype(np.float32)
        types = md.numbers("tokenizer.ggml.token_type", "int", self.vocab_size, default=None)
        if types is None:
            self._attrs = np.full(self.vocab_size, TokenAttr.NORMAL, dtype=np.int32)
        else:  # an unknown type is "undefined", as in llama.cpp
            known = (types >= 0) & (types < len(_TYPE_TO_ATTR))
            self._attrs = _TYPE_TO_ATTR[np.where(known, types, 0).astype(np.int64)]

        is_spm = model == "llama"
        self.add_space_prefix = md.boolean("tokenizer.ggml.add_space_prefix", default=is_spm)
        pre = self._pre
        self.add_bos_default = md.boolean("tokenizer.ggml.add_bos_token", default=is_spm or pre.add_bos)
        self.add_bos_default |= pre is not None and pre.always_bos
        # llama.cpp appends EOS when it adds special tokens and this is set (realm's encode never does)
        self.add_eos_default = md.boolean("tokenizer.ggml.add_eos_token", default=False)
        # llama.cpp's defaults when the keys are missing: 1/2/0 for SPM; for BPE it uses 11/11, a real piece in most
        # vocabularies (',' in GPT-2), so realm reports no BOS/EOS instead
        self.bos_id = self._id(md, "bos", 1 if is_spm else None)
        self.eos_id = self._id(md, "eos", 2 if is_spm else None)
        self.unk_id = self._id(md, "unknown", 0 if is_spm else None)
        self.pad_id = self._id(md, "padding", None)
        # a template of the wrong type is refused when it is used (apply_chat_template), so that the model still runs
        template = md.get(TEMPLATE_KEY)
        self.chat_template = template if isinstance(template, str) or template is None else None
        self._template_error = None if isinstance(template, str) or template is None else Metadata.fail(
            TEMPLATE_KEY, "a string (a jinja2 chat template)", template)
        self._llama_cpp_attrs(md)

        # special tokens in llama.cpp's partition order: longest first (its std::sort leaves ties unordered; here by id)
        partitioned = np.flatnonzero(self._attrs & _PARTITIONED).tolist()
        partitioned.sort(key=lambda i: (-len(self._tokens[i].encode()), i))
        self._partition_all = [(self._tokens[i], i, int(self._attrs[i])) for i in partitioned]
        self._partition_plain = [s for s in self._partition_all if not s[2] & _SPECIAL]

        self._hf = self._build_spm(md) if is_spm else self._build_bpe(md)
        self._pieces: list[bytes | None] = [None] * self.vocab_size
        self._template = None

    # -------------------------------------------------------------------------------------- construction
    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Read the vocabulary from a GGUF file's metadata (tensors are not read).

        FileNotFoundError: no such file; GGUFError: not a GGUF file, or a corrupt header; ValueError: no tokenizer
        in the metadata, or an unsupported one.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        if not path.is_file():
            raise GGUFError(f"{path}: not a regular file")
        return cls(_read_tokenizer_metadata(path))

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """From `realm.gguf_io.read_metadata`'s dict (name -> MetadataValue) or a dict of plain values."""
        return cls(metadata)

    def _id(self, md: Metadata, name: str, default: int | None) -> int | None:
        """A special token id: an integer (else ModelError); one outside the vocabulary is ignored with a warning
        (the default is used if it fits), as llama.cpp does."""
        key = f"tokenizer.ggml.{name}_token_id"
        value = md.integer(key, -(2**63), 2**64 - 1, default=None)
        if value is None:
            return default if default is not None and default < self.vocab_size else None
        if not 0 <= value < self.vocab_size:
            log.warning("%s = %s is outside the vocabulary (%d)", key, value, self.vocab_size)
            return default if default is not None and default < self.vocab_size else None
        return value

    def _llama_cpp_attrs(self, md: Metadata) -> None:
        """Special ids and token attributes that llama.cpp derives from token texts (llama_vocab::impl::load)."""
        attrs, ids = self._attrs, self._token_to_id
        found: dict[str, int | None] = {}
        for name, texts in _AUTO_IDS.items():
            old_key = _DEPRECATED_ID_KEYS.get(name)
            key_id = self._id(md, name, None)
            if key_id is None and old_key is not None:
                key_id = self._id(md, old_key, None)
            if key_id is None:
                # llama.cpp takes the first candidate it meets in a hash map (an unspecified order); realm takes the
                # first in the list above, which agrees with it on Llama 3 and Phi-3 (not on SmolLM2's eot: 0 vs 2)
                key_id = next((ids[t] for t in texts if t in ids), None)
                if key_id is not None:
                    attrs[key_id] |= TokenAttr.CONTROL
            found[name] = key_id
        self.eot_id = found["eot"]
        self.eom_id = found["eom"]

        eog = {found[n] for n in ("fim_pad", "fim_rep", "fim_sep") if found[n] is not None}
        for text in _EOG_TEXTS:
            if text in ids:
                eog.add(ids[text])
                attrs[ids[text]] |= TokenAttr.CONTROL
        for text in _ALWAYS_RENDERED:
            if text in ids:
                attrs[ids[text]] = TokenAttr.USER_DEFINED
        eog.update(i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None)
        eog_texts = {self._tokens[i] for i in eog}
        # gpt-oss (harmony) and solar-open: "<|end|>" ends a message, not the generation
        if "<|end|>" in eog_texts and (
            {"<|return|>", "<|call|>"} <= eog_texts or {"<|calls|>", "<|flush|>"} <= eog_texts
        ):
            eog.discard(ids["<|end|>"])
            attrs[ids["<|end|>"]] = TokenAttr.USER_DEFINED
        # Gemma 4 and PLaMo: "</s>" is a normal token
        if "</s>" in eog_texts and eog_texts & {"<|tool_response>", "<|plamo:eos|>"}:
            eog.discard(ids["</s>"])
            attrs[ids["</s>"]] = TokenAttr.NORMAL
        self.stop_ids = frozenset(eog)

        name = md.string("general.name", default="").lower()
        if "phi-3" in name or "phi3" in name:
            # llama.cpp: Phi-3's special tokens swallow the whitespace after them
            attrs[np.flatnonzero(attrs & _PARTITIONED)] |= TokenAttr.RSTRIP
            if "</s>" in ids:
                attrs[ids["</s>"]] |= TokenAttr.RSTRIP
            for text in ("<unk>", "<s>", "<|endoftext|>"):
                if text in ids:
                    attrs[ids[text]] &= ~TokenAttr.RSTRIP

    def _build_bpe(self, md: Metadata) -> HFTokenizer:
        merges = md.strings("tokenizer.ggml.merges", MAX_MERGES, default=None)
        if merges is None:
            raise ValueError("a gpt2 (BPE) vocabulary needs tokenizer.ggml.merges, which the metadata lacks")
        # llama.cpp splits "a b" at the first space after the first character; no byte-level piece holds a space
        pairs = list(map(tuple, map(operator.methodcaller("split", " ", 1), merges)))
        if (pairs and min(map(len, pairs)) < 2) or any(map(str.startswith, merges, itertools.repeat(" "))):
            pairs = [(m[: m.find(" ", 1)], m[m.find(" ", 1) + 1 :]) for m in merges if m.find(" ", 1) > 0]
        if len(set(pairs)) != len(pairs):
            pairs = list(dict.fromkeys(pairs))  # llama.cpp keeps a pair's first rank
        vocab, pre = self._token_to_id, self._pre
        # raw UTF-8 pieces: a character no token covers becomes its <0xNN> byte tokens, as in llama.cpp
        options = dict(ignore_merges=pre.ignore_merges, byte_fallback=not pre.byte_level)
        try:
            model = hf_models.BPE(vocab, pairs, **options)
        except Exception as e:  # tokenizers' BPE cannot hold a merge of pieces outside the vocabulary
            if "out of vocabulary" not in str(e):
                raise
            # llama.cpp applies them, then falls back to bytes for the piece it cannot find: drop them, and say so
            pairs = [p for p in pairs if p[0] in vocab and p[1] in vocab and p[0] + p[1] in vocab]
            log.warning(
                "%d merges name pieces that are not in the vocabulary: dropped; ids may differ from llama.cpp's "
                "for text that needs them",
                len(merges) - len(pairs),
            )
            model = hf_models.BPE(vocab, pairs, **options)
        hf = HFTokenizer(model)
        steps = [hf_pre.Split(Regex(r), behavior=behavior) for r, behavior in pre.onig_splits()]
        if pre.byte_level:
            steps.append(hf_pre.ByteLevel(add_prefix_space=False, use_regex=False))
        hf.pre_tokenizer = hf_pre.Sequence(steps)
        return hf

    def _build_spm(self, md: Metadata) -> HFTokenizer:
        unk = self._tokens[self.unk_id] if self.unk_id is not None else None
        merges = _spm_merges(self._tokens, self._token_to_id, self._scores)
        return HFTokenizer(hf_models.BPE(self._token_to_id, merges, unk_token=unk, byte_fallback=True))

    # -------------------------------------------------------------------------------------- encoding
    def encode(self, text: str, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as llama.cpp's llama_tokenize(text, add_special=False, parse_special).

        add_bos: prepend bos_id (ValueError if the vocabulary has none). parse_special: control/unknown token
        texts become their ids (chat templates need this); otherwise they are tokenized as plain text. A text that is
        not a str, or holds lone surrogates (what Python makes of bytes that are not UTF-8), is a ValueError.
        """
        check_text(text)
        ids: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True, but the vocabulary has no BOS token (tokenizer.ggml.bos_token_id)")
            ids.append(self.bos_id)
        for fragment in self._partition(text, parse_special):
            if isinstance(fragment, int):
                ids.append(fragment)
            elif self.model == "llama":
                # every text fragment follows the start or a special token: llama.cpp prefixes each with a space
                prefix = " " if self.add_space_prefix else ""
                ids.extend(self._hf.encode((prefix + fragment).replace(" ", "▁"), add_special_tokens=False).ids)
            else:
                ids.extend(self._encode_bpe(fragment))
        return ids

    def _encode_bpe(self, text: str) -> list[int]:
        if self._pre.escape_spaces:
            text = text.replace(" ", "▁")
        if not self._pre.newline_tokens:
            return self._hf.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for part in _NEWLINE_RUNS.split(text):  # lines and runs of newlines, the pieces the regex splits out
            if part[:1] == "\n" and part in self._token_to_id:
                ids.append(self._token_to_id[part])  # llama.cpp takes it whole, even where no merges lead to it
            elif part:
                ids.extend(self._hf.encode(part, add_special_tokens=False).ids)
        return ids

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Text fragments and special-token ids: llama.cpp's tokenizer_st_partition, on str instead of bytes."""
        fragments: list[str | int] = [text] if text else []
        for tok, tok_id, attr in self._partition_all if parse_special else self._partition_plain:
            if not any(isinstance(f, str) and tok in f for f in fragments):
                continue
            out: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int) or tok not in frag:
                    out.append(frag)
                    continue
                start, end = 0, len(frag)
                while (match := frag.find(tok, start)) >= 0:
                    left = frag[start:match]
                    if attr & TokenAttr.LSTRIP:
                        left = left.rstrip(_ASCII_SPACE)
                    if left:
                        out.append(left)
                    out.append(tok_id)
                    start = match + len(tok)
                    if attr & TokenAttr.RSTRIP:
                        while start < end and frag[start] in _ASCII_SPACE:
                            start += 1
                if start < end:
                    out.append(frag[start:])
            fragments = out
        return fragments

    # -------------------------------------------------------------------------------------- decoding
    def token_text(self, id: int) -> str:
        """The vocabulary piece of `id` as stored (e.g. 'Ġworld', '▁world', '<0x0A>', '<|im_start|>')."""
        return self._tokens[self._check_id(id)]

    def _check_id(self, id: int) -> int:
        if not 0 <= id < self.vocab_size:
            raise ValueError(f"token id {id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return id

    def _piece(self, id: int, skip_special: bool) -> bytes:
        """The bytes llama.cpp's token_to_piece renders for `id` (special=not skip_special)."""
        attr = int(self._attrs[self._check_id(id)])
        if skip_special and attr & _SPECIAL:
            return b""
        piece = self._pieces[id]
        if piece is None:
            piece = self._pieces[id] = self._render(id, attr)
        return piece

    def _render(self, id: int, attr: int) -> bytes:
        text = self._tokens[id]
        if attr & (_SPECIAL | TokenAttr.USER_DEFINED):
            return text.encode()
        if attr & TokenAttr.NORMAL:
            if self.model == "llama" or self._pre.escape_spaces:
                return text.replace("▁", " ").encode()
            # a character outside the byte alphabet is kept as its UTF-8 (llama.cpp writes "[UNK_BYTE_0x..]")
            return b"".join(bytes((_BYTE_DECODER[c],)) if c in _BYTE_DECODER else c.encode() for c in text)
        if attr & TokenAttr.BYTE:
            try:
                return bytes((int(text[3:5], 16),))
            except ValueError:
                return b"\x00"  # llama.cpp's strtol of a malformed <0xNN> gives 0
        return b""  # unused and undefined pieces render as nothing in llama.cpp

    def _strip_mode(self, first_id: int, skip_special: bool) -> _Strip:
        """Where decode removes the leading space that SPM encoding added (see _Strip)."""
        if not (self.model == "llama" and self.add_space_prefix):
            return _Strip.NONE
        return _Strip.TEXT if skip_special and first_id == self.bos_id else _Strip.FIRST_TOKEN

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; skip_special drops control/unknown tokens (BOS, EOS, <|im_start|>...)."""
        ids = [int(i) for i in ids]
        pieces = [self._piece(i, skip_special) for i in ids]
        data = b"".join(pieces)
        strip = self._strip_mode(ids[0], skip_special) if ids else _Strip.NONE
        if (strip == _Strip.FIRST_TOKEN and pieces[0].startswith(b" ")) or (
            strip == _Strip.TEXT and data.startswith(b" ")
        ):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False, continuation: bool = False) -> StreamDecoder:
        """Incremental decoding for generation: the pushes' texts, then flush(), concatenate to decode(all ids).

        continuation: the ids continue a text (a prompt), so an SPM vocabulary's leading space is part of the text and
        is kept (decode(prompt + ids) == decode(prompt) + the stream's text), instead of being stripped as a prefix.
        """
        return StreamDecoder(self, skip_special, continuation)

    # -------------------------------------------------------------------------------------- chat templates
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render `messages` with the GGUF's tokenizer.chat_template (jinja2, sandboxed, as HF transformers does).

        kwargs become template variables (tools=..., etc.). Encode the result with parse_special=True.
        Every failure is a ValueError starting "chat template:": a template stored as something other than a string
        (refused here, at first use, so that the model still generates from plain prompts), a syntax error, an error
        while rendering (division by zero, "a" + 1, an undefined attribute, raise_exception, a sandbox violation),
        or a limit: TEMPLATE_SECONDS of rendering, TEMPLATE_MAX_CHARS of output or of any value built on the way,
        TEMPLATE_MAX_DEPTH nested macro calls.
        """
        if self._template_error is not None:
            raise ValueError(f"chat template: {self._template_error}")
        if self.chat_template is None:
            raise ValueError("this vocabulary has no chat template (tokenizer.chat_template is missing)")
        special = {
            "bos_token": self.token_text(self.bos_id) if self.bos_id is not None else "",
            "eos_token": self.token_text(self.eos_id) if self.eos_id is not None else "",
        }
        if self._template is None:
            self._template = compile_template(self.chat_template)
        context = dict(messages=messages, add_generation_prompt=add_generation_prompt, **{**special, **kwargs})
        return render(self._template, context)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, stop_ids={sorted(self.stop_ids)})"
        )


class StreamDecoder:
    """Decodes one token at a time, holding back the bytes of an incomplete UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False, continuation: bool = False):
        self._tok = tokenizer
        self._skip_special = skip_special
        self._continuation = continuation
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # decided by the first id; NONE once the leading space is handled, or from the start for a continuation
        self._strip: _Strip | None = _Strip.NONE if continuation else None

    def push(self, token_id: int) -> str:
        """The new text `token_id` completes; "" while a multi-byte character is still incomplete."""
        token_id = int(token_id)
        piece = self._tok._piece(token_id, self._skip_special)
        if self._strip is None:
            self._strip = self._tok._strip_mode(token_id, self._skip_special)
        if self._strip == _Strip.FIRST_TOKEN or (self._strip == _Strip.TEXT and piece):
            piece = piece[1:] if piece.startswith(b" ") else piece
            self._strip = _Strip.NONE
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Text of any bytes still held (U+FFFD for an incomplete character); the decoder then starts afresh."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._strip = _Strip.NONE if self._continuation else None
        return text


def _spm_merges(tokens: list[str], token_to_id: dict[str, int], scores: np.ndarray | None) -> list[tuple[str, str]]:
    """Merge list that makes a rank-ordered BPE reproduce llama.cpp's score-ordered SPM merging.

    llama.cpp merges the adjacent pair whose concatenation is the highest-scoring piece, leftmost first on ties,
    whatever the piece's type. A BPE that knows every split (a, b) of every piece, ranked by the piece's score,
    picks the same pair, except between equal scores, where BPE goes by rank and llama.cpp by position. Within equal
    scores the longer left part ranks first: that reproduces llama.cpp's left-to-right growth of runs, the one tie
    that occurs in practice (Llama's whitespace pieces "▁▁" .. "▁"*16 all score -1e9). Other ties between
    overlapping candidates of equal score could still merge in another order.

    Gemma 3's 262k pieces have 1.2M splits (515k of them merges): about 1 s here, most of its vocabulary's load time.
    """
    if scores is None:
        scores = np.zeros(len(tokens), dtype=np.float32)
    lefts: list[str] = []
    rights: list[str] = []
    pids: list[int] = []
    ks: list[int] = []
    add_left, add_right, add_pid, add_k = lefts.append, rights.append, pids.append, ks.append
    for piece, pid in token_to_id.items():
        for k in range(1, len(piece)):
            if piece[:k] in token_to_id and piece[k:] in token_to_id:
                add_left(piece[:k])
                add_right(piece[k:])
                add_pid(pid)
                add_k(k)
    pid_array = np.array(pids, dtype=np.int64)
    # rank by score (highest first), then longer left part, then piece id
    order = np.lexsort((pid_array, -np.array(ks, dtype=np.int64), -scores.astype(np.float64)[pid_array]))
    return [(lefts[i], rights[i]) for i in order.tolist()]


def check_text(text: Any, what: str = "the prompt") -> str:
    """`text` if it is a str of Unicode text; ValueError for another type or for lone surrogates (U+D800..U+DFFF),
    which is what Python makes of bytes that are not UTF-8 (surrogateescape) and which no tokenizer can encode."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a str, got {type(text).__name__}")
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise ValueError(f"{what} is not valid Unicode text: lone surrogate U+{ord(bad.group()):04X} at character "
                         f"{bad.start()} (bytes that are not UTF-8?)")
    return text


class IdTokenizer:
    """What generation needs of a tokenizer, for a model file without a vocabulary (random test and benchmark models):
    prompts are token ids, and each generated id is shown as `<id>`."""

    stop_ids = frozenset()
    add_bos_default = False

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        """There is no vocabulary to encode text with: always a ValueError (naming a text that is not text first)."""
        check_text(text)
        raise ValueError("this model file has no vocabulary (tokenizer.ggml.tokens): give the prompt as token ids")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        raise ValueError("this model file has no vocabulary (tokenizer.ggml.tokens), hence no chat template: give the "
                         "prompt as token ids")

    def stream_decoder(self, skip_special: bool = False, continuation: bool = False) -> _IdDecoder:
        return _IdDecoder()


class _IdDecoder:
    def push(self, token_id: int) -> str:
        return f"<{token_id}>"

    def flush(self) -> str:
        return ""


__all__ = [
    "PRE_TOKENIZERS",
    "REFUSED_MODELS",
    "REFUSED_PRE_TOKENIZERS",
    "SUPPORTED_MODELS",
    "IdTokenizer",
    "PreTokenizer",
    "StreamDecoder",
    "TokenAttr",
    "Tokenizer",
]
