"""The `realm` command line.

    realm formats                                    # the block formats realm reads and writes
    realm quantize IN.gguf OUT.gguf --type Q4_K      # re-encode a model file (IN may be a packaged model: smollm2)

A subcommand is a `Command` (its arguments and what it runs) in `COMMANDS`; adding one there is all a new subcommand
needs. Expected failures (bad input, a missing or broken file) print `realm: error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from . import __version__
from .models import MODELS, resolve_model
from .quant import FORMATS, QuantError

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
    except (QuantError, OSError) as e:  # GGUFError is a QuantError; FileNotFoundError an OSError
        print(f"realm: error: {_message(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("realm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
