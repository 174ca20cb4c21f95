"""The `realm` command line.

    realm formats                                    # the block formats realm reads and writes
    realm quantize IN.gguf OUT.gguf --type Q4_K      # re-encode a model file (IN may be a packaged model: smollm2)
    realm generate "Once upon a time" --max-tokens 64    # stream a continuation, then tokens/s
    realm chat "What is the capital of France?"          # one answer through the chat template; no question: a loop

A subcommand is a `Command` (its arguments and what it runs) in `COMMANDS`; adding one there is all a new subcommand
needs. Expected failures (bad input, a missing or broken file) print `realm: error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from . import __version__
from .models import MODELS, resolve_model
from .quant import FORMATS

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
        except ValueError as e:  # e.g. the conversation outgrew the context: this turn fails, the chat goes on
            print(f"realm: error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer.text})


def _quantize_run(args: argparse.Namespace) -> int:
    from .quantize_file import quantize_gguf  # imports torch: only when the command runs

    summary = quantize_gguf(resolve_model(args.input), args.output, args.type, progress=not args.no_progress)
    print(summary.table())
    return 0


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("formats", "list the block formats (GGUF tensor types) realm supports", _formats_args, _formats_run),
        Command("quantize", "re-encode every weight of a GGUF model to one format", _quantize_args, _quantize_run),
        Command("generate", "continue a prompt with a model, streaming the text", _generate_args, _generate_run),
        Command("chat", "answer through the model's chat template (no question: interactive)", _chat_args,
                _chat_run),
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
    except (ValueError, OSError) as e:  # QuantError, GGUFError, ModelError: ValueErrors; FileNotFoundError: OSError
        print(f"realm: error: {_message(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("realm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
