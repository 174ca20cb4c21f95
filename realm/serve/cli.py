"""`realm serve`: its arguments and what it runs (registered in realm.cli)."""

from __future__ import annotations

import argparse
import sys

HELP = "serve the model over an OpenAI-compatible HTTP API (completions, chat, models, metrics, a demo page)"


def add_arguments(parser: argparse.ArgumentParser, model_args, speculative_args) -> None:
    """model_args(parser), speculative_args(parser): realm.cli's, so that serve's options mean what generate's do."""
    from realm.runtime.engine import EngineConfig

    model_args(parser)
    net = parser.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    net.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    net.add_argument("--tenants", default=None, metavar="FILE",
                     help="tenants TOML: API keys, adapters and limits per tenant (default: open access, no keys)")
    net.add_argument("--model-id", default=None, help="the id clients name as `model` (default: the packaged name "
                     "or the GGUF file's stem)")
    net.add_argument("--max-waiting", type=int, default=256, metavar="N",
                     help="requests waiting for the engine beyond which new ones are refused with 503 (256)")
    net.add_argument("--default-max-tokens", type=int, default=256, metavar="N",
                     help="max_tokens of requests that leave it out (256)")
    net.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                     help="on SIGTERM, seconds in-flight requests may take to finish before they are aborted (30)")
    net.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-batch-tokens", type=int, default=EngineConfig.max_batch_tokens, metavar="N",
                        help=f"tokens per forward step ({EngineConfig.max_batch_tokens})")
    engine.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs, metavar="N",
                        help=f"sequences per step ({EngineConfig.max_num_seqs})")
    engine.add_argument("--kv-blocks", type=int, default=None, metavar="N",
                        help="KV cache blocks (default: sized from the device's memory)")
    speculative_args(parser.add_argument_group(
        "speculative decoding", "the default of requests: each may choose its own with the `speculative` field"))


def _check_backend(args: argparse.Namespace) -> None:
    import torch

    from realm.runtime.model import default_dtype, resolve_device
    from realm.runtime.ops import Backend, backend_of, check_onednn

    if backend_of(args.backend) is Backend.ONEDNN:
        device = resolve_device(args.device)
        dtype = default_dtype(Backend.ONEDNN, device) if args.dtype is None else getattr(torch, args.dtype)
        check_onednn(device, dtype)


def run(args: argparse.Namespace, check_model_args, loras, speculative, load=None, rank_zero=None) -> int:
    """speculative(args): realm.cli's SpeculativeConfig or None; load(args), rank_zero(args, engine): realm.cli's, for
    torchrun (args.torchrun: run_ranks)."""
    import uvicorn

    from realm.runtime.engine import EngineConfig

    from .app import Server, ServerConfig, create_app

    check_model_args(args)
    _check_backend(args)  # before anything listens: a backend that cannot run fails here, not in /health later
    for name, value in (("--max-waiting", args.max_waiting), ("--default-max-tokens", args.default_max_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {args.port}")
    engine = EngineConfig(max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs,
                          kv_blocks=args.kv_blocks, speculative=speculative(args))
    config = ServerConfig(model=args.model, model_id=args.model_id, device=args.device, backend=args.backend,
                          dtype=args.dtype, loras={k: str(v) for k, v in loras(args).items()},
                          max_loras=args.max_loras, draft_model=args.draft_model, tenants=args.tenants,
                          engine=engine, max_waiting=args.max_waiting, default_max_tokens=args.default_max_tokens,
                          drain_s=args.drain_timeout)
    server = Server(config)  # the tenants file is read and checked here, before anything listens or loads
    if getattr(args, "torchrun", None) is not None:
        return run_ranks(args, config, load, rank_zero)
    print(f"realm serve: {config.model} as {server.model_id!r} on http://{args.host}:{args.port} "
          f"({'open access: no tenants file' if server.tenants.open else f'{len(server.tenants.tenants)} tenants'}"
          "); the model loads in the background, GET /health says when it is ready", file=sys.stderr)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.drain_timeout)
    return 0


def run_ranks(args: argparse.Namespace, config, load, rank_zero) -> int:
    """Under torchrun: every rank loads its shard (before anything listens); ranks other than 0 follow rank 0's
    engine inside `load` and exit there. Rank 0 serves; a rank that fails ends its server (every request in flight
    fails with the RankFailure, new ones are refused) and the process exits with status 1; SIGTERM drains it, then
    the other ranks are stopped."""
    import uvicorn

    from .app import Server, create_app

    model = load(args)
    server = Server(config, model=model)
    web = uvicorn.Server(uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                                        timeout_graceful_shutdown=args.drain_timeout))

    def shut_down(_failure) -> None:
        web.should_exit = True

    with rank_zero(args, server.engine) as ranks:
        ranks.on_failure = shut_down
        print(f"realm serve: {config.model} over {args.torchrun.world} ranks as {server.model_id!r} on "
              f"http://{args.host}:{args.port}", file=sys.stderr)
        web.run()
    if ranks.failure is not None:
        print(f"realm: error: {ranks.failure}", file=sys.stderr)
        return 1
    return 0
