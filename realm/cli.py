"""The `realm` command line.

    realm formats                                    # the block formats realm reads and writes
    realm quantize IN.gguf OUT.gguf --type Q4_K      # re-encode a model file (IN may be a packaged model: smollm2)
    realm generate "Once upon a time" --max-tokens 64    # stream a continuation, then tokens/s
    realm chat "What is the capital of France?"          # one answer through the chat template; no question: a loop
    realm batch requests.jsonl -o results.jsonl          # many JSONL requests, continuously batched, one result each
    realm serve --tenants tenants.toml --port 8000       # an OpenAI-compatible HTTP server (realm/serve)
    torchrun --nproc-per-node 2 -m realm serve ...       # tensor parallel: the model over 2 ranks (realm.parallel)

Under torchrun (RANK and WORLD_SIZE set, WORLD_SIZE > 1), generate and serve split the model over the ranks: every
rank checks the arguments and loads its shard; rank 0 runs the command, its engine sending each step plan to the
other ranks, which follow until it stops (realm.parallel.launch).

A subcommand is a `Command` (its arguments and what it runs) in `COMMANDS`; adding one there is all a new subcommand
needs. Expected failures (bad input, a missing or broken file) print `realm: error: ...` and exit with status 2;
Ctrl-C exits with 130 and SIGTERM with 143 (128 + the signal), after the same cleanup (no half-written files).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, batch_file
from .lora import cli as lora_cli
from .models import MODELS, resolve_model
from .quant import FORMATS
from .runtime.generate import GenerationError

if TYPE_CHECKING:
    pass

EXIT_ERROR = 2  # argparse's status for a usage error; realm uses it for every expected failure
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a process that SIGTERM ended


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
    parser.add_argument("--backend", default="torch", help="torch (the reference forward), onednn (the reference "
                        "with oneDNN-packed linear layers: faster on CPUs, not bit-exact with HF) or triton (realm's "
                        "kernels; on CPU under Triton's interpreter, slow)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="compute dtype (default: float32, the exact reference; float16 for triton on a GPU)")
    parser.add_argument("--lora", action="append", default=[], metavar="[NAME=]PATH",
                        help="load a LoRA adapter (a PEFT directory or a GGUF LoRA file; NAME defaults to its file "
                             "name); repeatable. generate and chat apply it (or the one --adapter names); batch "
                             'requests name theirs with "adapter"')
    parser.add_argument("--max-loras", type=int, default=None, metavar="N",
                        help="LoRA adapters resident on the device at once, and in one step (default: 4)")
    parser.add_argument("--draft-model", default=None, metavar="PATH",
                        help="a smaller GGUF model of the same vocabulary (or a packaged name) for --speculative "
                             "draft (implied when --speculative is not given); `realm draft` makes one from a model")


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
    _speculative_args(parser)
    parser.add_argument("--adapter", default=None, metavar="NAME",
                        help="the LoRA adapter (loaded with --lora) to generate with (default: none, or the only one "
                             "--lora loaded for generate and chat)")
    parser.add_argument("--quiet", action="store_true", help="no speed line on stderr")


def _speculative_args(parser: argparse.ArgumentParser) -> None:
    """The speculative decoding options, shared by generate, chat, batch and serve (for serve: the default of
    requests, which may choose their own)."""
    parser.add_argument("--speculative", choices=("none", "ngram", "draft"), default=None,
                        help="speculative decoding: ngram (proposals looked up in the text so far), draft (a draft "
                             "model's proposals, --draft-model), none (default). Output is unchanged (greedy: token "
                             "for token; sampled: in distribution)")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                        help="proposals per step at most (4); with adaptive k, fewer where they are rejected or "
                             "cost more than they save")
    parser.add_argument("--ngram-min", type=int, default=1, metavar="N", help="shortest n-gram looked up (1)")
    parser.add_argument("--ngram-max", type=int, default=4, metavar="N", help="longest n-gram looked up (4)")
    parser.add_argument("--no-ngram-lockstep", action="store_true",
                        help="n-gram proposals only where an n-gram matches (default: where the output departs from "
                             "the text it copies for a token, keep proposing that text in lockstep)")
    parser.add_argument("--fixed-k", action="store_true",
                        help="always propose K tokens (no adaptive k): to measure what adaptivity saves")


def _sampling(args: argparse.Namespace):
    from .runtime import SamplingParams

    for text in args.stop:
        _check_text("--stop text", text)
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=tuple(args.stop), adapter=args.adapter, speculative=_speculative(args))


def _speculative(args: argparse.Namespace, requests_choose: bool = False):
    """--speculative and its settings -> a SpeculativeConfig, or None (off); bad settings fail before the model
    loads. requests_choose (serve): the settings are the default of requests that may choose the draft model
    themselves, so --draft-model beside another default method is not an error."""
    from .runtime.speculative import SpeculativeConfig

    method = args.speculative
    draft = getattr(args, "draft_model", None)
    if method is None:
        method = "draft" if draft is not None else "none"
    if method == "draft" and draft is None:
        raise ValueError("--speculative draft needs --draft-model PATH (a smaller GGUF of the same vocabulary)")
    if draft is not None and method != "draft" and not requests_choose:
        raise ValueError(f"--draft-model is for --speculative draft, not {method}")
    config = SpeculativeConfig(method, num_speculative_tokens=args.num_speculative_tokens, ngram_min=args.ngram_min,
                               ngram_max=args.ngram_max, adaptive=not args.fixed_k,
                               ngram_lockstep=not args.no_ngram_lockstep)
    return config if config.enabled else None


def _loras(args: argparse.Namespace) -> dict:
    from .runtime.lora import parse_lora_specs

    return parse_lora_specs(args.lora)


def _one_adapter(args: argparse.Namespace):
    """generate and chat: the sampling parameters, with the adapter --adapter names or the only one --lora loads."""
    params = _sampling(args)
    loras = _loras(args)
    if params.adapter is None and len(loras) == 1:
        params = dataclasses.replace(params, adapter=next(iter(loras)))
    elif params.adapter is None and loras:
        raise ValueError(f"--lora loaded {len(loras)} adapters ({', '.join(loras)}): choose one with --adapter")
    return params


def _check_text(what: str, text: str) -> None:
    """Text from the command line or a terminal is UTF-8 bytes that Python decoded with surrogateescape: a byte that
    is not UTF-8 became a lone surrogate, which no tokenizer can take. Refuse it here, naming the byte."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the byte code - 0xDC00
            byte = code - 0xDC00
            raise ValueError(f"the {what} is not UTF-8 text: byte 0x{byte:02x} at character {e.start}") from None
        raise ValueError(f"the {what} is not text: a lone surrogate U+{code:04X} at character {e.start}") from None


def _check_model_args(args: argparse.Namespace) -> None:
    """--device and --backend, checked before anything is read or loaded."""
    from .runtime.model import resolve_device
    from .runtime.ops import backend_of

    backend_of(args.backend)
    if args.device is not None:
        resolve_device(args.device)
    if args.max_loras is not None and args.max_loras < 1:
        raise ValueError(f"--max-loras must be >= 1, got {args.max_loras}")
    loras = _loras(args)
    from .lora.packaged import packaged_adapters, resolve_adapter

    missing = next((str(p) for p in loras.values() if not resolve_adapter(p).exists()), None)
    if missing is not None:  # before the model loads
        raise ValueError(f"no LoRA adapter at {missing!r}: --lora takes a PEFT directory, a GGUF LoRA file, or a "
                         f"packaged adapter's name ({', '.join(packaged_adapters()) or 'none installed'})")
    if getattr(args, "adapter", None) is not None and args.adapter not in loras:
        raise ValueError(f"--adapter {args.adapter!r} is not one of the adapters --lora loads "
                         f"({', '.join(loras) or 'none'})")


def _load(args: argparse.Namespace):
    """The command's model. Under torchrun: this rank's shard; a rank other than 0 then follows rank 0's engine and
    exits here (SystemExit with its status) when rank 0 stops."""
    _interpret_triton_on_cpu(args)
    if getattr(args, "torchrun", None) is not None:
        return _load_rank(args)
    import torch

    from .runtime import load
    from .runtime.lora import DEFAULT_MAX_LORAS

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    lora = {"lora": _loras(args), "max_loras": args.max_loras or DEFAULT_MAX_LORAS} if args.lora or args.max_loras \
        else {}
    draft = {"draft_model": args.draft_model} if args.draft_model is not None else {}
    return load(args.model, device=args.device, backend=args.backend, dtype=dtype, **lora, **draft)


def _load_rank(args: argparse.Namespace):
    import torch

    from .parallel import launch

    env = args.torchrun
    unsupported = [flag for flag, value in (("--lora", args.lora), ("--max-loras", args.max_loras),
                                            ("--draft-model", args.draft_model)) if value]
    if unsupported:
        raise ValueError(f"under torchrun (WORLD_SIZE={env.world}), {', '.join(unsupported)} is not supported yet")
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    model = launch.torchrun_model(env, args.model, args.backend, args.device, dtype)
    if env.rank:
        raise SystemExit(launch.torchrun_follow(env, model))
    return model


@contextmanager
def _rank_zero(args: argparse.Namespace, engine) -> Iterator[object]:
    """Under torchrun, rank 0's engine drives the other ranks (RankZero) until the command ends; else nothing."""
    if getattr(args, "torchrun", None) is None:
        yield None
        return
    from .parallel import launch

    rank_zero = launch.RankZero(engine)
    try:
        yield rank_zero
    finally:
        launch.leave(rank_zero)


def _torchrun(args: argparse.Namespace):
    """torchrun's environment when realm runs as one of several ranks (None otherwise); only generate and serve
    run split over ranks."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    from .parallel import launch

    env = launch.torchrun_env()
    if env.world == 1:
        return None
    if args.command not in ("generate", "serve"):
        raise ValueError(f"under torchrun (WORLD_SIZE={env.world}) realm runs generate and serve over the ranks; "
                         f"run `realm {args.command}` in one process")
    return env


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
        spec = (f"{t.accepted_tokens}/{t.proposed_tokens} proposals accepted "
                f"({t.mean_accepted_length:.2f} per verification); " if t.verifications else "")
        print(f"[{t.prompt_tokens} prompt tokens, {t.prefill_tokens_per_s:.1f} tok/s prefill; "
              f"{t.generated_tokens} generated, {t.decode_tokens_per_s:.1f} tok/s decode; {spec}"
              f"finish: {c.finish_reason.value}]", file=sys.stderr)
    return c


def _generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the text to continue")
    _model_args(parser)
    _sampling_args(parser, max_tokens=128)


def _generate_run(args: argparse.Namespace) -> int:
    _check_text("prompt", args.prompt)  # invalid values fail before the model loads
    params = _one_adapter(args)
    _check_model_args(args)
    model = _load(args)
    ids = model.encode(args.prompt)
    model.check_prompt(ids)
    # the model's own engine, as model.stream will take it (under torchrun: wrapped first, to drive the other ranks)
    engine = model.engine_for(len(ids) + min(params.max_tokens, model.config.context_length - len(ids)))
    with _rank_zero(args, engine):
        _stream_to_terminal(model, ids, params, args.quiet)
    return 0


def _chat_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", nargs="?", help="answer this once; without it, an interactive chat")
    parser.add_argument("--system", default=None, help="a system message (default: the template's own)")
    _model_args(parser)
    _sampling_args(parser, max_tokens=512)


def _chat_run(args: argparse.Namespace) -> int:
    if args.question is not None:
        _check_text("question", args.question)
    if args.system is not None:
        _check_text("system message (--system)", args.system)
    params = _one_adapter(args)
    _check_model_args(args)
    model = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.question is not None:
        messages.append({"role": "user", "content": args.question})
        _stream_to_terminal(model, model.chat_prompt(messages), params, args.quiet)
        return 0
    print(f"{model!r}; an empty line or end of input ends the chat", file=sys.stderr)
    while True:
        try:
            question = _ask("> ")
            _check_text("message", question)
        except EOFError:
            return 0
        except UnicodeDecodeError as e:  # a terminal read strictly
            print(f"realm: error: the message is not UTF-8 text: {e.reason} at byte {e.start}", file=sys.stderr)
            continue
        except ValueError as e:  # a line that is not UTF-8 fails this turn; the conversation stays as it was
            print(f"realm: error: {e}", file=sys.stderr)
            continue
        if not question.strip():
            return 0
        _chat_turn(model, messages, question, params, args.quiet)


def _chat_turn(model, messages: list[dict], question: str, params, quiet: bool) -> None:
    """One question and its answer added to messages; a turn that fails says why and leaves messages as they were."""
    messages.append({"role": "user", "content": question})
    try:
        answer = _stream_to_terminal(model, model.chat_prompt(messages), params, quiet)
    except (ValueError, GenerationError) as e:  # e.g. the conversation outgrew the context: this turn fails
        print(f"realm: error: {e}", file=sys.stderr)
        messages.pop()
        return
    messages.append({"role": "assistant", "content": answer.text})


def _ask(prompt: str) -> str:
    """input(prompt), except from a pipe or file read strictly: there a byte that is not UTF-8 would raise and drop the
    rest of what the stream had buffered (the next lines), so the line is read as bytes and decoded with
    surrogateescape, and _check_text refuses it alone. EOFError at the end of the input."""
    stdin = sys.stdin
    if not isinstance(stdin, io.TextIOWrapper) or stdin.errors != "strict" or stdin.isatty():
        return input(prompt)  # a terminal gives one line per read: a decoding error loses that line only
    print(prompt, end="", flush=True)
    line = stdin.buffer.readline()  # chat reads stdin only here: the text layer holds nothing buffered
    if not line:
        raise EOFError
    return line.decode(stdin.encoding, "surrogateescape").removesuffix("\n").removesuffix("\r")


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
  {{"prompt": "Tell me about the moon.", "adapter": "pirate"}}     (with --lora pirate=PATH)

The output has one JSON line per request, in the input's order (index: the request's, from 0;
line: FILE's, from 1):
  {{"index": 0, "line": 1, "text": "...", "token_ids": [...], "finish_reason": "length", "timings": {{...}}}}
A request that cannot run (not a JSON object, an unknown key, a bad value, an empty prompt, a
prompt over the model's context, more tokens than the KV cache holds) fails alone; the others run
as if it were not there:
  {{"index": 3, "line": 5, "finish_reason": "error", "error": "temperature must be >= 0 (...), got -1"}}

Exit status: 0 when the batch ran, even if some of its requests failed (each says so on its
line); 2 when the command cannot run (bad options, an unreadable FILE, a model that won't load)."""


def _batch_run(args: argparse.Namespace) -> int:
    from .runtime.engine import EngineConfig
    from .runtime.llm import LLM

    # all that can be checked without the model is checked before it loads
    config = EngineConfig(max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs,
                          kv_blocks=args.kv_blocks, block_size=args.block_size, prefix_caching=args.prefix_caching,
                          batching=args.batching)
    defaults = dataclasses.replace(_sampling(args), ignore_eos=args.ignore_eos)
    _check_model_args(args)
    if args.output is None:
        batch_file.check_stdout()
    else:
        batch_file.check_output(Path(args.output), args.file)
    items = batch_file.read_requests(args.file, defaults)
    wall_s = 0.0
    with batch_file.ResultWriter(args.output, len(items)) as writer:
        for item in items:
            if item.error is not None:
                writer.put(item.index, batch_file.result_row(item, None))
        if writer.written < len(items):  # else nothing to run (an empty FILE, or only bad lines): no model
            model = _load(args)
            for item in items:
                if item.messages is not None and item.error is None:
                    try:
                        item.prompt = model.chat_prompt(item.messages)
                    except ValueError as e:  # a template that refuses these messages, or a vocabulary without one
                        item.error = str(e)
                        writer.put(item.index, batch_file.result_row(item, None))
            llm = LLM(model, backend=model.backend, **{f.name: getattr(config, f.name)
                                                        for f in dataclasses.fields(config)})
            runnable = [item for item in items if item.error is None]
            start = time.perf_counter()
            for i, completion in llm.completions([item.prompt for item in runnable],
                                                 [item.params for item in runnable], progress=not args.no_progress):
                writer.put(runnable[i].index, batch_file.result_row(runnable[i], completion))
            wall_s = time.perf_counter() - start
    if not args.quiet:
        print(batch_file.summary(writer.rows, wall_s), file=sys.stderr)
    return 0


def _draft_args(parser: argparse.ArgumentParser) -> None:
    from .draft_file import draft_args

    draft_args(parser)


def _draft_run(args: argparse.Namespace) -> int:
    from .draft_file import draft_run

    return draft_run(args)


def _serve_args(parser: argparse.ArgumentParser) -> None:
    from .serve import cli

    cli.add_arguments(parser, _model_args, _speculative_args)


def _serve_run(args: argparse.Namespace) -> int:
    from .serve import cli

    return cli.run(args, _check_model_args, _loras, functools.partial(_speculative, requests_choose=True), _load,
                   _rank_zero)


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
        Command("lora", lora_cli.HELP, lora_cli.add_arguments, lora_cli.run),
        Command("draft", "make a draft model for speculative decoding from some of a model's layers",
                _draft_args, _draft_run),
        Command("serve", "serve the model over an OpenAI-compatible HTTP API (completions, chat, models, metrics, "
                "a demo page)", _serve_args, _serve_run),
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so that the same cleanup runs (no
    OUT.partial left by `realm quantize`, a batch's finished results flushed)."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """For the command's duration, SIGTERM raises Terminated; a second one while cleaning up is ignored. Signal
    handlers belong to the main thread: elsewhere (main() called from a thread) SIGTERM keeps its handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _sigterm_raises():
            args.torchrun = _torchrun(args)
            return COMMANDS[args.command].run(args)
    # QuantError, GGUFError, ModelError: ValueErrors; FileNotFoundError: OSError; a failed forward: GenerationError
    except (ValueError, OSError, GenerationError) as e:
        print(f"realm: error: {_message(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Terminated:
        print("realm: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("realm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
