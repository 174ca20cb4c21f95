"""The `realm` command line.

    realm formats                                    # the block formats realm reads and writes
    realm quantize IN.gguf OUT.gguf --type Q4_K      # re-encode a model file (IN may be a packaged model: smollm2)
    realm generate "Once upon a time" --max-tokens 64    # stream a continuation, then tokens/s
    realm chat "What is the capital of France?"          # one answer through the chat template; no question: a loop
    realm batch requests.jsonl -o results.jsonl          # many JSONL requests, continuously batched, one result each

A subcommand is a `Command` (its arguments and what it runs) in `COMMANDS`; adding one there is all a new subcommand
needs. Expected failures (bad input, a missing or broken file) print `realm: error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .models import MODELS, resolve_model
from .quant import FORMATS
from .runtime.generate import GenerationError

if TYPE_CHECKING:
    from .runtime import Completion, SamplingParams

EXIT_ERROR = 2  # argparse's status for a usage error; realm uses it for every expected failure
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # returns the exit status


def _formats_args(parser: argparse.ArgumentParser) -> None:
    pass


def formats_table() -> str:
    header = f"{'name':<7} {'type':>4} {'block':>5} {'bytes':>5} {'bits/w':>7}  {'use':<10}  description"
    rows = [header]
    for f in FORMATS.values():
        use = "storage" if f.storage else "activation"
        rows.append(f"{f.name:<7} {f.ggml_type:>4} {f.block_size:>5} {f.block_bytes:>5} {f.bits_per_weight:>7g}  "
                    f"{use:<10}  {f.description}")
    return "\n".join(rows)


def _formats_run(args: argparse.Namespace) -> int:
    print(formats_table())
    return 0


def _quantize_args(parser: argparse.ArgumentParser) -> None:
    storable = ", ".join(f.name for f in FORMATS.values() if f.storage)
    names = ", ".join(MODELS)
    parser.add_argument("input", metavar="IN.gguf", help=f"GGUF model to read, or a packaged model: {names}")
    parser.add_argument("output", metavar="OUT.gguf", help="GGUF file to write (must differ from the input)")
    parser.add_argument("--type", required=True, metavar="FMT", help=f"target format, one of: {storable}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="GGUF file, or a packaged model: "
                        f"{', '.join(MODELS)} (default: smollm2)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present, else cpu)")
    parser.add_argument("--backend", default="torch", help="torch (the reference forward) or triton (realm's "
                        "kernels; on CPU under Triton's interpreter, slow)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="compute dtype (default: float32, the exact reference; float16 for triton on a GPU)")


def _sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help=f"new tokens at most ({max_tokens})")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top one (0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: random)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop before this text (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no speed line on stderr")


def _sampling(args: argparse.Namespace):
    from .runtime import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=tuple(args.stop))


def _load(args: argparse.Namespace):
    _interpret_triton_on_cpu(args)
    import torch

    from .runtime import load

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    return load(args.model, device=args.device, backend=args.backend, dtype=dtype)


def _interpret_triton_on_cpu(args: argparse.Namespace) -> None:
    """--backend triton without a GPU runs the kernels under Triton's interpreter, which must be switched on before
    Triton is imported; say so, since it is orders of magnitude slower than on a GPU."""
    if args.backend != "triton" or "triton" in sys.modules:
        return
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cpu") and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
        print("realm: running the Triton kernels under Triton's interpreter on the CPU (slow)", file=sys.stderr)


def _stream_to_terminal(model, prompt_ids, params, quiet: bool):
    """Print the text as it comes; then a speed line on stderr. Returns the Completion."""
    stream = model.stream(prompt_ids, params)
    for event in stream:
        print(event.text, end="", flush=True)
    print(flush=True)
    c = stream.completion
    if not quiet:
        t = c.timings
        print(f"[{t.prompt_tokens} prompt tokens, {t.prefill_tokens_per_s:.1f} tok/s prefill; "
              f"{t.generated_tokens} generated, {t.decode_tokens_per_s:.1f} tok/s decode; "
              f"finish: {c.finish_reason.value}]", file=sys.stderr)
    return c


def _generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the text to continue")
    _model_args(parser)
    _sampling_args(parser, max_tokens=128)


def _generate_run(args: argparse.Namespace) -> int:
    params = _sampling(args)  # invalid values fail before the model loads
    model = _load(args)
    _stream_to_terminal(model, model.encode(args.prompt), params, args.quiet)
    return 0


def _chat_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", nargs="?", help="answer this once; without it, an interactive chat")
    parser.add_argument("--system", default=None, help="a system message (default: the template's own)")
    _model_args(parser)
    _sampling_args(parser, max_tokens=512)


def _chat_run(args: argparse.Namespace) -> int:
    params = _sampling(args)
    model = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.question is not None:
        messages.append({"role": "user", "content": args.question})
        _stream_to_terminal(model, model.chat_prompt(messages), params, args.quiet)
        return 0
    print(f"{model!r}; an empty line or end of input ends the chat", file=sys.stderr)
    while True:
        try:
            question = input("> ")
        except EOFError:
            return 0
        if not question.strip():
            return 0
        messages.append({"role": "user", "content": question})
        try:
            answer = _stream_to_terminal(model, model.chat_prompt(messages), params, args.quiet)
        except (ValueError, GenerationError) as e:  # e.g. the conversation outgrew the context: this turn fails
            print(f"realm: error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer.text})


def _quantize_run(args: argparse.Namespace) -> int:
    from .quantize_file import quantize_gguf  # imports torch: only when the command runs

    summary = quantize_gguf(resolve_model(args.input), args.output, args.type, progress=not args.no_progress)
    print(summary.table())
    return 0


def _batch_args(parser: argparse.ArgumentParser) -> None:
    from .runtime.engine import EngineConfig
    from .runtime.sampling import SamplingParams
    from .runtime.scheduler import Batching

    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the epilog's examples as written
    parser.epilog = _batch_epilog([f.name for f in dataclasses.fields(SamplingParams)])
    parser.add_argument("file", metavar="FILE", help='JSONL requests, one per line ("-": standard input)')
    parser.add_argument("-o", "--output", metavar="OUT", default=None,
                        help="write the JSONL results here (default: standard output)")
    _model_args(parser)
    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-batch-tokens", type=int, default=EngineConfig.max_batch_tokens, metavar="N",
                        help=f"tokens per forward step, decodes and prefill chunks together "
                             f"({EngineConfig.max_batch_tokens})")
    engine.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs, metavar="N",
                        help=f"sequences per step ({EngineConfig.max_num_seqs})")
    engine.add_argument("--kv-blocks", type=int, default=None, metavar="N",
                        help="KV cache blocks (default: sized from the device's memory)")
    engine.add_argument("--block-size", type=int, default=EngineConfig.block_size, metavar="N",
                        help=f"tokens per KV cache block ({EngineConfig.block_size})")
    engine.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=EngineConfig.prefix_caching,
                        help="compute the full blocks of identical prompt prefixes once (default: on)")
    engine.add_argument("--batching", choices=[b.value for b in Batching], default=EngineConfig.batching.value,
                        help="continuous (default), or static: a baseline that refills the batch only when every "
                             "request in it has finished")
    sampling = parser.add_argument_group("sampling defaults", "for the requests that leave a field out")
    _sampling_args(sampling, max_tokens=SamplingParams.max_tokens)
    sampling.add_argument("--ignore-eos", action="store_true", help="go on past end-of-generation tokens")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _batch_epilog(sampling_fields: list[str]) -> str:
    return f"""\
Each non-blank line of FILE is one request, a JSON object (blank lines are skipped; the "line" of
a result still counts them). A request has "prompt" (text, or a list of token ids) or "messages"
(a chat, run through the model's chat template), and any of the sampling fields:
  {", ".join(sampling_fields)}
(stop: a string or a list of strings); a field left out takes the command line's value. E.g.:
  {{"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0.8, "seed": 1}}
  {{"prompt": [1, 9038, 2115], "stop": ["\\n"]}}
  {{"messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}

The output has one JSON line per request, in the input's order (index: the request's, from 0;
line: FILE's, from 1):
  {{"index": 0, "line": 1, "text": "...", "token_ids": [...], "finish_reason": "length", "timings": {{...}}}}
A request that cannot run (not a JSON object, an unknown key, a bad value, an empty prompt, a
prompt over the model's context, more tokens than the KV cache holds) fails alone; the others run
as if it were not there:
  {{"index": 3, "line": 5, "finish_reason": "error", "error": "temperature must be >= 0 (...), got -1"}}

Exit status: 0 when the batch ran, even if some of its requests failed (each says so on its
line); 2 when the command cannot run (bad options, an unreadable FILE, a model that won't load)."""


@dataclass
class _BatchItem:
    """One request of a batch: where it came from, and what to run (prompt) or why it cannot (error)."""

    index: int  # among the requests, from 0
    line: int  # in the file, from 1
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None  # turned into the prompt once the model (its chat template) is loaded
    params: SamplingParams | None = None
    error: str | None = None


def _read_batch(file: str, defaults: SamplingParams) -> list[_BatchItem]:
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
        item = _BatchItem(index=len(items), line=number)
        try:
            item.prompt, item.messages, item.params = _parse_request(raw, defaults)
        except ValueError as e:
            item.error = str(e)
        items.append(item)
    return items


def _parse_request(raw: bytes, defaults: SamplingParams):
    """One JSONL line -> (prompt, messages, SamplingParams); ValueError naming what is wrong. defaults: the
    SamplingParams whose fields a request may set."""
    fields = [f.name for f in dataclasses.fields(defaults)]
    try:
        request = json.loads(raw.decode("utf-8-sig"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as e:
        raise ValueError(f"the line is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"the line is not JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(request, dict):
        raise ValueError(f"a request must be a JSON object, got {_brief(request)}")
    unknown = [k for k in request if k not in ("prompt", "messages", *fields)]
    if unknown:
        raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; a request "
                         f"takes prompt or messages, and {', '.join(fields)}")
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
    return prompt, messages, dataclasses.replace(defaults, **sampling)  # SamplingParams checks the values


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:  # json.loads would keep the last one silently
        raise ValueError(f"duplicate key{'s' if len(twice) > 1 else ''} {', '.join(map(repr, twice))}")
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


def _batch_result(item: _BatchItem, completion: Completion | None) -> dict:
    error = item.error if completion is None else completion.error
    if error is not None:
        return {"index": item.index, "line": item.line, "finish_reason": "error", "error": error}
    return {"index": item.index, "line": item.line, "text": completion.text, "token_ids": completion.token_ids,
            "finish_reason": completion.finish_reason.value, "timings": dataclasses.asdict(completion.timings)}


def _batch_run(args: argparse.Namespace) -> int:
    from .runtime.engine import EngineConfig
    from .runtime.llm import LLM

    # all that can be checked without the model is checked before it loads
    config = EngineConfig(max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs,
                          kv_blocks=args.kv_blocks, block_size=args.block_size, prefix_caching=args.prefix_caching,
                          batching=args.batching)
    defaults = dataclasses.replace(_sampling(args), ignore_eos=args.ignore_eos)
    if args.output is not None:
        _check_output(Path(args.output), args.file)
    items = _read_batch(args.file, defaults)
    wall_s = 0.0
    with _BatchWriter(args.output, len(items)) as writer:
        for item in items:
            if item.error is not None:
                writer.put(item.index, _batch_result(item, None))
        if writer.written < len(items):  # else nothing to run (an empty FILE, or only bad lines): no model
            model = _load(args)
            for item in items:
                if item.messages is not None and item.error is None:
                    try:
                        item.prompt = model.chat_prompt(item.messages)
                    except ValueError as e:  # a template that refuses these messages, or a vocabulary without one
                        item.error = str(e)
                        writer.put(item.index, _batch_result(item, None))
            llm = LLM(model, backend=model.backend, **{f.name: getattr(config, f.name)
                                                        for f in dataclasses.fields(config)})
            runnable = [item for item in items if item.error is None]
            start = time.perf_counter()
            for i, completion in llm.completions([item.prompt for item in runnable],
                                                 [item.params for item in runnable], progress=not args.no_progress):
                writer.put(runnable[i].index, _batch_result(runnable[i], completion))
            wall_s = time.perf_counter() - start
    if not args.quiet:
        print(_batch_summary(writer.rows, wall_s), file=sys.stderr)
    return 0


class _BatchWriter:
    """Writes result rows in request order, each as soon as it and every row before it are done, one flushed line at
    a time: a batch that stops (an interrupt, a crash) leaves every result finished before that in the file."""

    def __init__(self, output: str | None, total: int):
        self.output, self.total = output, total
        self.pending: dict[int, dict] = {}
        self.rows: list[dict] = []
        self.file = None

    @property
    def written(self) -> int:
        return len(self.rows) + len(self.pending)

    def __enter__(self) -> _BatchWriter:
        self.file = sys.stdout if self.output is None else open(self.output, "w", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not sys.stdout:
            self.file.close()

    def put(self, index: int, row: dict) -> None:
        self.pending[index] = row
        while len(self.rows) in self.pending:
            row = self.pending.pop(len(self.rows))
            self.file.write(_json_line(row))
            self.file.flush()
            self.rows.append(row)


def _json_line(row: dict) -> str:
    """One JSONL line; text that UTF-8 cannot hold (a lone surrogate) is written \\u-escaped, never lost."""
    line = json.dumps(row, ensure_ascii=False) + "\n"
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(row) + "\n"
    return line


def _check_output(out: Path, source: str) -> None:
    """Before the batch runs, rather than after, when its results would be lost."""
    if out.is_dir():
        raise ValueError(f"{out}: is a directory")
    if not out.absolute().parent.is_dir():
        raise ValueError(f"{out}: output directory {out.absolute().parent} does not exist")
    if source != "-" and out.exists() and Path(source).exists() and out.samefile(source):
        raise ValueError(f"{out}: is the input file; the results would overwrite the requests")
    if not os.access(out if out.exists() else out.absolute().parent, os.W_OK):
        raise ValueError(f"{out}: not writable")


def _batch_summary(results: list[dict], wall_s: float) -> str:
    failed = sum(r["finish_reason"] == "error" for r in results)
    tokens = sum(len(r.get("token_ids", ())) for r in results)
    speed = tokens / wall_s if wall_s > 0 else float("nan")
    return (f"[{len(results)} request{'' if len(results) == 1 else 's'}, {failed} failed; {tokens} output tokens in "
            f"{wall_s:.2f} s: {speed:.1f} tok/s]")


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("formats", "list the block formats (GGUF tensor types) realm supports", _formats_args, _formats_run),
        Command("quantize", "re-encode every weight of a GGUF model to one format", _quantize_args, _quantize_run),
        Command("generate", "continue a prompt with a model, streaming the text", _generate_args, _generate_run),
        Command("chat", "answer through the model's chat template (no question: interactive)", _chat_args,
                _chat_run),
        Command("batch", "run many JSONL requests, continuously batched; one JSONL result per request", _batch_args,
                _batch_run),
    )
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realm", description="Quantized (GGUF) LLM inference research tools.")
    parser.add_argument("--version", action="version", version=f"realm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        cmd.add_arguments(sub.add_parser(cmd.name, help=cmd.help, description=cmd.help))
    return parser


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    # QuantError, GGUFError, ModelError: ValueErrors; FileNotFoundError: OSError; a failed forward: GenerationError
    except (ValueError, OSError, GenerationError) as e:
        print(f"realm: error: {_message(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("realm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
