"""`realm batch`'s files: JSONL requests in (one per line, each parsed and checked alone), JSONL results out (one row
per request, in order, each written as soon as it and the rows before it are done).

    check_output(Path("results.jsonl"), "requests.jsonl")     # before any work: not the input, writable, ...
    items = read_requests("requests.jsonl", defaults)         # BatchItem per non-blank line: a prompt or an error
    with ResultWriter("results.jsonl", len(items)) as out:
        out.put(item.index, result_row(item, completion))

A line that is wrong in any way (not UTF-8, not JSON, nested deeper than MAX_NESTING, an unknown key, a bad value)
becomes that request's error row; the others are not affected. Every row is written, escaped where the output's
encoding cannot hold a character.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .paths import reads_from, same_file

if TYPE_CHECKING:
    from .runtime import Completion, SamplingParams


@dataclass
class BatchItem:
    """One request of a batch: where it came from, and what to run (prompt) or why it cannot (error)."""

    index: int  # among the requests, from 0
    line: int  # in the file, from 1
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None  # turned into the prompt once the model (its chat template) is loaded
    params: SamplingParams | None = None
    error: str | None = None


def read_requests(file: str, defaults: SamplingParams) -> list[BatchItem]:
    """FILE's requests, parsed and checked; a request that is wrong gets its error, the others are not affected."""
    if file == "-":
        data = sys.stdin.buffer.read()
    else:
        with open(file, "rb") as f:
            data = f.read()
    items = []
    for number, raw in enumerate(data.splitlines(), start=1):  # bytes: splits at \n, \r\n and \r only
        if not raw.strip():
            continue
        item = BatchItem(index=len(items), line=number)
        try:
            item.prompt, item.messages, item.params = parse_request(raw, defaults)
        except ValueError as e:
            item.error = str(e)
        except Exception as e:  # whatever else is wrong with one line fails that line, not the batch
            item.error = f"cannot read the request: {type(e).__name__}: {e}"
        items.append(item)
    return items


def parse_request(raw: bytes, defaults: SamplingParams):
    """One JSONL line -> (prompt, messages, SamplingParams); ValueError naming what is wrong. defaults: the
    SamplingParams whose fields a request may set."""
    fields = [f.name for f in dataclasses.fields(defaults)]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"the line is not UTF-8 text: {e.reason} at byte {e.start}") from None
    _check_nesting(text)  # before json.loads, whose recursion a deep line exhausts
    try:
        request = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f"the line is not JSON: {e.msg} at column {e.colno}") from None
    except _DuplicateKeys:
        raise
    except ValueError as e:  # e.g. an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise ValueError(f"the line cannot be read as JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"the line nests arrays and objects too deeply (a request needs at most "
                         f"{MAX_NESTING})") from None
    if not isinstance(request, dict):
        raise ValueError(f"a request must be a JSON object, got {_brief(request)}")
    unknown = [k for k in request if k not in ("prompt", "messages", *fields)]
    if unknown:
        names = ", ".join(repr(k) if len(k) <= 40 else repr(k[:37]) + "..." for k in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {names}{more}; a request takes prompt or "
                         f"messages, and {', '.join(fields)}")
    if ("prompt" in request) == ("messages" in request):
        raise ValueError("a request needs either 'prompt' or 'messages'" if "prompt" not in request
                         else "a request takes 'prompt' or 'messages', not both")
    prompt, messages = request.get("prompt"), request.get("messages")
    if "prompt" in request and not (isinstance(prompt, str) or _is_ids(prompt)):
        raise ValueError(f"prompt must be text or a list of token ids (integers), got {_brief(prompt)}")
    if "messages" in request:
        _check_messages(messages)
    sampling = {k: v for k, v in request.items() if k in fields}
    stop = sampling.get("stop", "")
    if not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise ValueError(f"stop must be a string or a list of strings, got {_brief(stop)}")
    if not isinstance(sampling.get("ignore_eos", False), bool):
        raise ValueError(f"ignore_eos must be true or false, got {_brief(sampling['ignore_eos'])}")
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        value = sampling.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_FLOAT:
            raise ValueError(f"{name} must be a finite number, got an integer of {len(str(abs(value)))} digits")
    return prompt, messages, dataclasses.replace(defaults, **sampling)  # SamplingParams checks the values


MAX_NESTING = 32  # arrays and objects in one request line: a chat needs 3 ({"messages": [{...}]})
_MAX_FLOAT = sys.float_info.max  # a larger JSON integer cannot become a float
# JSON's characters that nest or start a string, and a whole string (unrolled: linear, no backtracking blow-up)
_STRUCTURE = re.compile(r'["\[\]{}:]')
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def _check_nesting(text: str) -> None:
    """Refuse a line nested deeper than MAX_NESTING, naming the request's key under which it is, in one pass without
    recursion (json.loads recurses once per level: a line of 100000 brackets raised RecursionError from it)."""
    depth, key, last_string = 0, None, None
    match = _STRUCTURE.search(text)
    while match is not None:
        pos, char = match.end(), match.group()
        if char == '"':
            string = _STRING.match(text, match.start())
            if string is None:  # unterminated: json.loads says so
                return
            pos, last_string = string.end(), string.group()
        elif char in "[{":
            depth += 1
            if depth > MAX_NESTING:
                where = "the line" if key is None else f"the value of {key[:40]!r}"
                raise ValueError(f"{where} nests arrays and objects more than {MAX_NESTING} deep")
        elif char in "]}":
            depth -= 1
        elif depth == 1 and last_string is not None:  # ':' after one of the request's keys
            try:
                key = json.loads(last_string, strict=False)
            except ValueError:  # a bad escape: json.loads will say so, if the nesting does not
                key = last_string[1:-1]
        match = _STRUCTURE.search(text, pos)


class _DuplicateKeys(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    counts = Counter(k for k, _ in pairs)  # not keys.count(k) per key: quadratic in a line of many keys
    twice = sorted(k for k, n in counts.items() if n > 1)
    if twice:  # json.loads would keep the last one silently
        raise _DuplicateKeys(f"duplicate key{'s' if len(twice) > 1 else ''} {', '.join(map(repr, twice))}")
    return dict(pairs)


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{\"role\": ..., \"content\": ...}} objects, got "
                         f"{_brief(messages)}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content', got {_brief(m)}")


def _brief(value, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def result_row(item: BatchItem, completion: Completion | None) -> dict:
    error = item.error if completion is None else completion.error
    if error is not None:
        return {"index": item.index, "line": item.line, "finish_reason": "error", "error": error}
    return {"index": item.index, "line": item.line, "text": completion.text, "token_ids": completion.token_ids,
            "finish_reason": completion.finish_reason.value, "timings": dataclasses.asdict(completion.timings)}


class ResultWriter:
    """Writes result rows in request order, each as soon as it and every row before it are done, one flushed line at
    a time: a batch that stops (an interrupt, a crash) leaves every result finished before that in the file.

    OUT is opened before the model loads (an unwritable path fails at once) but emptied only when the first row is
    written, or when the batch ends with no row: a batch that fails before its first result (a model that will not
    load) leaves an existing OUT as it was, and removes an OUT it created."""

    def __init__(self, output: str | None, total: int):
        self.output, self.total = output, total
        self.pending: dict[int, dict] = {}
        self.rows: list[dict] = []
        self.file = None
        self.created = False
        self.emptied = output is None

    @property
    def written(self) -> int:
        return len(self.rows) + len(self.pending)

    def __enter__(self) -> ResultWriter:
        if self.output is None:
            self.file = sys.stdout
        else:
            self.created = not os.path.lexists(self.output)
            self.file = open(self.output, "a", encoding="utf-8")  # "a": not emptied yet
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.file is sys.stdout:
            return
        if exc_type is None:
            self._empty()  # a batch of no rows: an empty OUT
            self.file.close()
        else:
            with contextlib.suppress(OSError):  # the write that failed would fail again, hiding the first error
                self.file.close()
        if not self.emptied and self.created:
            with contextlib.suppress(OSError):
                os.unlink(self.output)

    def _empty(self) -> None:
        if not self.emptied:
            if os.path.isfile(self.output):  # not a pipe or a device (-o /dev/null)
                self.file.truncate(0)  # in "a" mode every write goes to the end, which is now 0
            self.emptied = True

    def put(self, index: int, row: dict) -> None:
        self.pending[index] = row
        while len(self.rows) in self.pending:
            row = self.pending.pop(len(self.rows))
            try:
                self._empty()
                self.file.write(json_line(row, getattr(self.file, "encoding", None) or "utf-8"))
                self.file.flush()
            except OSError as e:  # -o /dev/full, a full disk: say which file
                raise OSError(e.errno, e.strerror, self.output or "standard output") from e
            self.rows.append(row)


def json_line(row: dict, encoding: str = "utf-8") -> str:
    """One JSONL line; text that the output's encoding cannot hold (a lone surrogate in UTF-8, or an "é" on an ASCII
    stdout) is written \\u-escaped, never lost (a row that fails to encode would stop the writer)."""
    line = json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"
    try:
        line.encode(encoding)  # strict, whatever the file's errors mode: surrogateescape would write broken UTF-8
    except UnicodeEncodeError:
        line = json.dumps(row) + "\n"
    return line


# characters that str.splitlines() (and JavaScript before ES2019) take for line ends, which json.dumps leaves raw:
# escaped, a row is one line to every reader (json.dumps escapes the ones below U+0020 itself)
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def check_output(out: Path, source: str) -> None:
    """Before the batch runs, rather than after, when its results would be lost."""
    if out.is_dir():
        raise ValueError(f"{out}: is a directory")
    if not out.absolute().parent.is_dir():
        raise ValueError(f"{out}: output directory {out.absolute().parent} does not exist")
    if reads_from(out) if source == "-" else same_file(out, source):
        raise ValueError(f"{out}: is the input{' (standard input)' if source == '-' else ' file'}; the results would "
                         "overwrite the requests")
    if not os.access(out if out.exists() else out.absolute().parent, os.W_OK):
        raise ValueError(f"{out}: not writable")


def check_stdout() -> None:
    """Results without -o go to standard output: it must be there (`realm batch ... >&-` closes it)."""
    if sys.stdout is None:
        raise ValueError("standard output is closed: give -o FILE for the results")


def summary(results: list[dict], wall_s: float) -> str:
    failed = sum(r["finish_reason"] == "error" for r in results)
    tokens = sum(len(r.get("token_ids", ())) for r in results)
    speed = tokens / wall_s if wall_s > 0 else float("nan")
    return (f"[{len(results)} request{'' if len(results) == 1 else 's'}, {failed} failed; {tokens} output tokens in "
            f"{wall_s:.2f} s: {speed:.1f} tok/s]")
