"""realm serve under load: time to first token, inter-token latency and output tokens/s at 1, 8, 32 and 64
concurrent streaming clients, against llama.cpp's own server on the same GGUF and machine.

Servers (each started by this script on a free loopback port and warmed up before any timed run, all stopped at the
end; each (N, repeat) runs them in turn, so that the machine's drift over the run hits both alike):
- realm: `python -m realm serve --model M --backend B` (default onednn on the CPU, triton on CUDA), the engine sized
  for the largest concurrency (max_num_seqs, KV blocks for every client's prompt and answer);
- llama.cpp: `llama-server -m GGUF -np N -c N*CTX --cont-batching -t THREADS` (it decodes its N slots in one batch,
  as realm does), the binary from --llama-server PATH, else $REALM_LLAMA_SERVER, else where
  `bash scripts/build_llama_server.sh` builds it (llama.cpp as vendored in llama-cpp-python 0.3.36's sdist, the source
  scripts/setup.sh's reference comes from; llama-server reports `version: 0.5.0-dev`, commit 0c1e570; Release, native
  CPU flags: llama.cpp at its fastest here). Without one, realm alone is measured and the target says n/a.

Both are measured the same way: a fresh connection per request (llama-server closes a streamed response's connection,
so a kept-alive one fails), the same prompts, greedy, the same max_tokens.

Clients: N asyncio tasks, each sending its share of the requests one after another (`--requests`, default max(24, 2N)
in all), streaming `POST /v1/chat/completions` (greedy, --max-tokens, `stream_options.include_usage`). The prompt mix
cycles through bench/speculative_texts.py's 24 prompts: 12 input-grounded (summarise, quote, edit a public-domain
passage: long prompts) and 12 open chat questions (short ones). Per request: TTFT (send to the first content chunk),
ITL (the time from the first to the last content chunk over the tokens after the first, from `usage`), end to end.

Rows (bench/results/serve.jsonl, via harness: device, versions, commit, date), one per server and N: repeats,
requests, prompt and output tokens and errors (summed over the repeats), wall_s, output_tok_s (all output tokens over
the wall time from the first request sent to the last answer), ttft_s and itl_s (p50, p90), e2e_s (p50), each the
median over the repeats, output_tok_s_runs (every repeat's), server_command. serve.png: the three against N.
Target (issue 17): at 32 clients on the CPU, realm's output tok/s >= llama.cpp's server's.

    bash scripts/build_llama_server.sh && python bench/serve.py      # both servers, N 1 8 32 64
    python bench/serve.py --concurrency 1 8 --requests 16 --max-tokens 32 --out /tmp/serve.jsonl   # realm only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from harness import (
    RESULTS,
    Target,
    append_jsonl,
    environment,
    positive_int,
    print_table,
    replot,
    save_figure,
    shown,
    target_results,
)
from speculative_texts import chat_prompts, grounded_prompts

from realm.models import resolve_model

JSONL = RESULTS / "serve.jsonl"
KEY = ("device", "server", "model", "concurrency", "max_tokens")
CONCURRENCY = (1, 8, 32, 64)
MAX_TOKENS = 64
CONTEXT = 1024  # per llama.cpp slot: the longest prompt (~400 tokens) and its answer
TARGETS = (Target("n32", "realm's output tok/s >= llama.cpp server's at 32 clients on the CPU", "vs_llama_cpp", 1.0,
                  lambda r: r["server"] == "realm" and r["concurrency"] == 32 and r.get("vs_llama_cpp") is not None),)


# ---- servers -----------------------------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launched:
    """A server process on a loopback port; ready once `ready_path` answers 200."""

    def __init__(self, name: str, command: list[str], port: int, ready_path: str = "/health"):
        self.name, self.command, self.port = name, command, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"realm-bench-serve-{name}-{port}.log"
        self._log = self.log.open("w")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode} before it was ready; see {self.log}")
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} was not ready in 10 minutes; see {self.log}")
            time.sleep(0.25)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def default_llama_server() -> str | None:
    """$REALM_LLAMA_SERVER, else scripts/build_llama_server.sh's binary if it was built, else None."""
    if os.environ.get("REALM_LLAMA_SERVER"):
        return os.environ["REALM_LLAMA_SERVER"]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    built = Path(os.environ.get("REALM_LLAMA_SERVER_DIR") or cache / "realm" / "llama-server-0.3.36")
    binary = built / "build" / "bin" / "llama-server"
    return str(binary) if os.access(binary, os.X_OK) else None


def realm_command(model: str, port: int, backend: str, concurrency: int, threads: int) -> list[str]:
    blocks = concurrency * (-(-CONTEXT // 16) + 1)
    return [sys.executable, "-m", "realm", "serve", "--model", model, "--port", str(port), "--backend", backend,
            "--max-num-seqs", str(max(concurrency, 2)), "--kv-blocks", str(blocks), "--max-waiting", "4096",
            "--log-level", "warning"]


def llama_command(binary: str, gguf: Path, port: int, concurrency: int, threads: int) -> list[str]:
    return [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(concurrency),
            "-c", str(CONTEXT * concurrency), "--cont-batching", "-t", str(threads), "-tb", str(threads)]


# ---- clients -----------------------------------------------------------------------------------------------------

def prompt_mix() -> list[str]:
    grounded, chat = grounded_prompts(), chat_prompts()
    return [t.text for pair in zip(grounded, chat, strict=True) for t in pair]


async def one_request(http: httpx.AsyncClient, url: str, model: str, text: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    usage = None
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    end = time.perf_counter()
    if first is None or usage is None:
        return {"error": "no content or no usage in the stream"}
    tokens = usage["completion_tokens"]
    return {"ttft_s": first - start, "itl_s": (last - first) / (tokens - 1) if tokens > 1 else None,
            "e2e_s": end - start, "prompt_tokens": usage["prompt_tokens"], "output_tokens": tokens}


async def load(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> tuple[list[dict], float]:
    prompts = prompt_mix()
    queue = list(range(requests))
    results: list[dict] = []
    # A fresh connection per request: llama-server closes a streamed response's connection, and httpx reusing it
    # fails with "Server disconnected"; both servers are measured the same way (loopback connects are ~0.1 ms).
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900), limits=limits) as http:
        async def client() -> None:
            while queue:
                i = queue.pop(0)
                results.append(await one_request(http, url, model, prompts[i % len(prompts)], max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return results, wall


def summarise(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if "error" not in r]

    def pct(key: str, q: float) -> float | None:
        values = sorted(r[key] for r in ok if r.get(key) is not None)
        return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else \
            (values[0] if values else None)

    out_tokens = sum(r["output_tokens"] for r in ok)
    return {"requests": len(results), "errors": len(results) - len(ok), "wall_s": wall,
            "prompt_tokens": sum(r["prompt_tokens"] for r in ok), "output_tokens": out_tokens,
            "output_tok_s": out_tokens / wall, "ttft_s": pct("ttft_s", 50), "ttft_s_p90": pct("ttft_s", 90),
            "itl_s": pct("itl_s", 50), "itl_s_p90": pct("itl_s", 90), "e2e_s": pct("e2e_s", 50),
            "first_error": next((r["error"] for r in results if "error" in r), None)}


# ---- report ------------------------------------------------------------------------------------------------------

def with_comparison(rows: list[dict]) -> list[dict]:
    """vs_llama_cpp on realm's rows: its output tok/s over llama.cpp's at the same N (None without one)."""
    base = {(r["device"], r["concurrency"], r["date"][:10]): r for r in rows if r["server"] == "llama.cpp"}
    for r in rows:
        b = base.get((r["device"], r["concurrency"], r["date"][:10]))
        r["vs_llama_cpp"] = r["output_tok_s"] / b["output_tok_s"] if (b and r["server"] == "realm") else None
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for server in dict.fromkeys(r["server"] for r in rows):
        mine = sorted((r for r in rows if r["server"] == server), key=lambda r: r["concurrency"])
        n = [r["concurrency"] for r in mine]
        axes[0].plot(n, [r["output_tok_s"] for r in mine], marker="o", label=server)
        axes[1].plot(n, [r["ttft_s"] for r in mine], marker="o", label=f"{server} p50")
        axes[1].plot(n, [r["ttft_s_p90"] for r in mine], marker="x", ls=":", label=f"{server} p90")
        axes[2].plot(n, [1e3 * (r["itl_s"] or 0) for r in mine], marker="o", label=f"{server} p50")
    for ax, title, ylabel in zip(axes, ("output tokens/s", "time to first token", "inter-token latency"),
                                 ("tok/s", "s", "ms"), strict=True):
        ax.set(xscale="log", xlabel="concurrent streaming clients", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    r0 = max(rows, key=lambda r: r["date"])
    return save_figure(fig, path, f"realm serve vs llama.cpp server, {r0.get('model')} on {r0['device']}, max_tokens "
                 f"{r0.get('max_tokens')}, {r0['git_commit']}")


def summary(rows: list[dict]) -> None:
    rows = with_comparison(sorted(rows, key=lambda r: (r["concurrency"], r["server"])))
    print_table(rows, ["server", "concurrency", "requests", "errors", "output_tokens", ("wall_s", ".1f"),
                       ("output_tok_s", ".1f"), ("ttft_s", ".2f"), ("ttft_s_p90", ".2f"), ("itl_s", ".3f"),
                       ("e2e_s", ".2f"), ("vs_llama_cpp", ".2f")])
    for res in target_results(rows, TARGETS, lambda r: {"row": f"realm N={r['concurrency']}"}):
        print(f"{res['status']} ({res['target']}) {res['text']}" +
              (f": {res['worst']['value']:.2f}x" if res["worst"] else ""))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a packaged model name or a .gguf path (default smollm2)")
    p.add_argument("--backend", default=None, help="realm's backend (default onednn on the CPU, triton on CUDA)")
    p.add_argument("--llama-server", default=default_llama_server(), metavar="PATH", help="llama.cpp's llama-server "
                   "binary (default: $REALM_LLAMA_SERVER, else scripts/build_llama_server.sh's build if there is one, "
                   "else realm alone)")
    p.add_argument("--servers", nargs="+", choices=("realm", "llama.cpp"), default=("realm", "llama.cpp"),
                   help="which servers to measure (default both; llama.cpp where its binary is found)")
    p.add_argument("--concurrency", nargs="+", type=positive_int, default=list(CONCURRENCY))
    p.add_argument("--requests", type=positive_int, default=None, help="requests per run (default max(24, 2N))")
    p.add_argument("--max-tokens", type=positive_int, default=MAX_TOKENS)
    p.add_argument("--repeats", type=positive_int, default=1, help="timed runs per server and N, the servers "
                   "alternating (default 1); rows hold the medians")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="llama.cpp's threads (realm uses "
                   "torch's default)")
    p.add_argument("--out", type=Path, default=JSONL)
    p.add_argument("--plot-only", action="store_true")
    return p


def measure(servers: list[Launched], model_id: str, args: argparse.Namespace, backend: str, env: dict) -> list[dict]:
    """Every (N, repeat) runs each server in turn (the machine's drift hits both alike); one row per (server, N):
    medians over the repeats, with each repeat's output tok/s. Rows are appended as each N completes."""
    rows = []
    for n in sorted(set(args.concurrency)):
        requests = args.requests or max(24, 2 * n)
        runs: dict[str, list[dict]] = {s.name: [] for s in servers}
        for _ in range(args.repeats):
            for server in servers:
                results, wall = asyncio.run(load(server.url, model_id, n, requests, args.max_tokens))
                run = summarise(results, wall)
                runs[server.name].append(run)
                print(f"{server.name:9s} N={n:<3d} {run['output_tok_s']:7.1f} output tok/s  TTFT p50 "
                      f"{run['ttft_s'] or 0:.2f} s  ITL p50 {1e3 * (run['itl_s'] or 0):.1f} ms  errors "
                      f"{run['errors']}", flush=True)
        for server in servers:
            row = {"server": server.name, "concurrency": n, "max_tokens": args.max_tokens,
                   "backend": backend if server.name == "realm" else None, "server_command": " ".join(
                       re.sub(r"^.*/", "", c) if i == 0 else c for i, c in enumerate(server.command)),
                   **median_run(runs[server.name])}
            rows.append(row)
            append_jsonl(args.out, [row], env)  # each N's rows as measured: a later failure loses nothing
    return [{**env, **r} for r in rows]


def median_run(runs: list[dict]) -> dict:
    """One row from a server's repeats at one N: the median of each timing, counts summed over the repeats."""
    row = {"repeats": len(runs), "output_tok_s_runs": [r["output_tok_s"] for r in runs]}
    for key in ("requests", "errors", "prompt_tokens", "output_tokens"):
        row[key] = sum(r[key] for r in runs)
    for key in ("wall_s", "output_tok_s", "ttft_s", "ttft_s_p90", "itl_s", "itl_s_p90", "e2e_s"):
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = statistics.median(values) if values else None
    row["first_error"] = next((r["first_error"] for r in runs if r["first_error"]), None)
    return row


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.plot_only:
        return replot(args.out, KEY, p, plot, summary)
    import torch

    cuda = torch.cuda.is_available()
    backend = args.backend or ("triton" if cuda else "onednn")
    gguf = resolve_model(args.model)
    model_id = args.model if not args.model.endswith(".gguf") else Path(args.model).stem
    top = max(args.concurrency)
    if args.llama_server and not os.access(args.llama_server, os.X_OK):
        p.error(f"--llama-server {args.llama_server}: not an executable file")
    if args.llama_server is None and "llama.cpp" in args.servers:
        if args.servers != p.get_default("servers"):
            p.error("--servers llama.cpp: no llama-server found (bash scripts/build_llama_server.sh, or --llama-server "
                    "PATH)")
        print("llama.cpp's llama-server not found (bash scripts/build_llama_server.sh, or --llama-server PATH): "
              "measuring realm alone", file=sys.stderr)
    servers = []
    if "realm" in args.servers:
        servers.append(("realm", lambda port: realm_command(args.model, port, backend, top, args.threads), "/health"))
    if args.llama_server and "llama.cpp" in args.servers:
        servers.append(("llama.cpp", lambda port: llama_command(args.llama_server, gguf, port, top, args.threads),
                        "/health"))
    env = {**environment(), "model": gguf.name}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    launched: list[Launched] = []
    try:
        for name, command, ready in servers:  # all up at once, so that their runs can alternate
            port = free_port()
            launched.append(Launched(name, command(port), port, ready))
            asyncio.run(load(launched[-1].url, model_id, 2, 2, 8))  # warm-up: first allocations, compiles
        rows = measure(launched, model_id, args, backend, env)
    finally:
        for server in launched:
            server.stop()
    print(f"wrote {shown(args.out)} and {shown(plot(with_comparison(rows), args.out.with_suffix('.png')))}")
    summary(rows)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
