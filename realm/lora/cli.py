"""`realm lora`: LoRA adapter tools.

    realm lora convert adapters/pirate pirate.gguf                 # PEFT -> llama.cpp GGUF LoRA, for smollm2
    realm lora convert adapters/pirate pirate.gguf --model base.gguf --type F16

Wiring into realm/cli.py: `register(subparsers)` adds the command to an argparse subparsers object and sets
`run` as its default; or, in realm.cli's table, `Command("lora", HELP, add_arguments, run)`. Expected failures
raise (AdapterError and ModelError are ValueErrors, a missing file an OSError), for realm.cli.main to print as
`realm: error: ...` with exit status 2.
"""

from __future__ import annotations

import argparse

from ..models import MODELS

HELP = "LoRA adapters: convert a PEFT adapter to llama.cpp's GGUF LoRA format"
CONVERT_HELP = "convert a PEFT LoRA adapter directory to a GGUF LoRA file for a base model"
WRITE_FORMATS = ("F32", "F16", "BF16")  # realm.lora.gguf_lora.WRITE_FORMATS, without importing torch here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lora_command", metavar="SUBCOMMAND", required=True)
    convert = sub.add_parser("convert", help=CONVERT_HELP, description=CONVERT_HELP)
    convert.add_argument("peft_dir", metavar="PEFT_DIR",
                         help="directory holding adapter_config.json and adapter_model.safetensors")
    convert.add_argument("output", metavar="OUT.gguf", help="GGUF LoRA file to write")
    convert.add_argument("--model", default="smollm2", help="the base model the adapter is for: a GGUF file, or a "
                         f"packaged model: {', '.join(MODELS)} (default: smollm2)")
    convert.add_argument("--type", default="F32", choices=WRITE_FORMATS,
                         help="tensor type (default: F32, exact)")
    convert.add_argument("--name", default=None, help="the adapter's name (default: PEFT_DIR's name)")
    convert.set_defaults(lora_run=convert_run)


def run(args: argparse.Namespace) -> int:
    return args.lora_run(args)


def register(subparsers) -> argparse.ArgumentParser:
    """Add `lora` to an argparse subparsers object (realm.cli's); args.run(args) runs it."""
    parser = subparsers.add_parser("lora", help=HELP, description=HELP)
    add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def convert_run(args: argparse.Namespace) -> int:
    from .convert import convert_peft_to_gguf  # imports torch: only when the command runs

    adapter = convert_peft_to_gguf(args.peft_dir, args.output, args.model, fmt=args.type, name=args.name)
    print(convert_summary(adapter))
    return 0


def convert_summary(adapter) -> str:
    """What convert wrote: modules, targets and layers, ranks, alpha, type and bytes; and any folded scales."""
    written = adapter.metadata["gguf"]
    layers = sorted({layer for layer, _ in adapter.modules})
    ranks = sorted({m.rank for m in adapter.modules.values()})
    rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    span = f"layer {layers[0]}" if len(layers) == 1 else f"{len(layers)} layers {layers[0]}-{layers[-1]}"
    lines = [f"wrote {written.path}: {len(adapter.modules)} modules ({', '.join(t.peft_name for t in adapter.targets)}"
             f"; {span}), {rank}, alpha {written.alpha:g}, {written.fmt}, {written.nbytes:,} bytes"]
    if written.folded:
        shown = ", ".join(f"layer {layer} {t.peft_name}" for layer, t in written.folded[:3])
        more = f", ... ({len(written.folded)} in all)" if len(written.folded) > 3 else ""
        lines.append(f"scale not alpha / rank (rsLoRA or alpha/rank patterns): folded into lora_b for {shown}{more}")
    return "\n".join(lines)


__all__ = ["HELP", "add_arguments", "convert_run", "convert_summary", "register", "run"]
