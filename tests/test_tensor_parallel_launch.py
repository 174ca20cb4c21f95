"""Launching tensor-parallel ranks (realm.parallel.launch) on CPUs over gloo: realm.LLM(tensor_parallel=N) spawning
its workers (same tokens as one process, no orphans however it ends, bad rank counts refused before anything
starts), a worker killed mid-generation (every request fails with the RankFailure, promptly; the next is refused),
and `torchrun ... -m realm` on one node group and on two (two "machines" on loopback), generate and serve."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch.distributed as dist
from tiny_gguf import tiny_vocab_metadata, write_tiny_llama
from tp_worker import ENGINE_PROMPTS

import realm
from realm.parallel import ShardError
from realm.runtime import SamplingParams
from realm.runtime.engine import EngineFailure

TIMEOUT_S = 60  # every subprocess of these tests (a hang fails the test instead of stalling the suite)
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tp_launch") / "tiny.gguf"
    write_tiny_llama(path, metadata=tiny_vocab_metadata())  # 4 heads, 2 KV heads, vocabulary 50
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by its parent) is gone too
        return f.read().split(") ")[-1][0] != "Z"


def _gone_within(pids: list[int], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while any(_alive(p) for p in pids):
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def _tokens(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


# ------------------------------------------------------------------------------------------------- realm.LLM


def test_llm_spawns_its_ranks_and_gives_one_process_tokens(tiny):
    one = _tokens(realm.LLM(tiny, kv_blocks=64, max_num_seqs=4).generate(ENGINE_PROMPTS, GREEDY))
    with realm.LLM(tiny, kv_blocks=64, max_num_seqs=4, tensor_parallel=2, parallel_timeout=TIMEOUT_S) as llm:
        workers = llm._ranks.workers
        assert len(workers) == 1 and dist.is_initialized() and dist.get_world_size() == 2
        assert _tokens(llm.generate(ENGINE_PROMPTS, GREEDY)) == one
        assert _tokens(llm.generate(ENGINE_PROMPTS[:2], GREEDY)) == one[:2]  # the workers follow a second batch
    assert [w.returncode for w in workers] == [0]  # STOP: they left by themselves
    assert not dist.is_initialized()  # the group is left: the process can make another
    with pytest.raises(RuntimeError, match="was closed"):
        llm.generate(ENGINE_PROMPTS, GREEDY)


def test_llm_with_a_lora_adapter_over_two_ranks_gives_one_process_tokens(tiny):
    """Rank 0 loads the adapter; the worker receives it with the plans and applies its shard (lora_shard.py). A
    batch mixes rows with the adapter and without."""
    from test_lora_runtime import random_adapter

    from realm.runtime.weights import load_weights

    adapters = {"a": random_adapter(load_weights(tiny).config, "a", rank=8, seed=1)}
    params = [SamplingParams(max_tokens=12, ignore_eos=True, adapter="a" if i % 2 == 0 else None)
              for i in range(len(ENGINE_PROMPTS))]
    one = _tokens(realm.LLM(tiny, kv_blocks=64, max_num_seqs=4, lora=adapters).generate(ENGINE_PROMPTS, params))
    base = _tokens(realm.LLM(tiny, kv_blocks=64, max_num_seqs=4).generate(ENGINE_PROMPTS, GREEDY))
    assert one[0] != base[0] and one[1] == base[1]  # the adapter changes its rows' tokens, and only theirs
    with realm.LLM(tiny, kv_blocks=64, max_num_seqs=4, lora=adapters, tensor_parallel=2,
                   parallel_timeout=TIMEOUT_S) as llm:
        assert len(llm.model.loras) == 1
        assert _tokens(llm.generate(ENGINE_PROMPTS, params)) == one


@pytest.mark.parametrize("world", [0, -1, True, 2.0, "2"])
def test_a_rank_count_that_is_no_count_is_refused(tiny, world):
    with pytest.raises(ValueError, match=r"tensor_parallel must be an int >= 1 \(the number of ranks"):
        realm.LLM(tiny, tensor_parallel=world)


def test_a_rank_count_the_model_cannot_split_into_names_the_ones_that_work(tiny):
    # the first tensor that does not split is named (the vocabulary of 50), then what works for every tensor
    with pytest.raises(ShardError, match=r"^tensor_parallel=3: tiny.gguf cannot be split over 3 ranks \("
                                         r"output\.weight: a vocabulary of 50 does not split evenly over 3 ranks; "
                                         r".*\); rank counts that work for the whole model: 1, 2$"):
        realm.LLM(tiny, tensor_parallel=3)
    assert not dist.is_initialized()  # refused before any process or group started


def test_what_tensor_parallel_does_not_support_yet_is_refused(tiny):
    from realm.runtime.model import load

    with pytest.raises(ValueError, match="tensor_parallel=2 does not support a loaded Model"):
        realm.LLM(load(tiny, device="cpu"), tensor_parallel=2)
    with pytest.raises(ValueError, match="tensor_parallel=2 does not support draft_model"):
        realm.LLM(tiny, tensor_parallel=2, draft_model=tiny)
    with pytest.raises(ValueError, match="parallel_timeout is for tensor_parallel > 1"):
        realm.LLM(tiny, parallel_timeout=5)


def test_a_process_group_of_the_callers_own_is_refused(tiny, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match=r"torch.distributed is already initialized in this process \(world "
                                               r"size 1\)"):
            realm.LLM(tiny, tensor_parallel=2)
        assert dist.get_world_size() == 1  # the caller's group is untouched
    finally:
        dist.destroy_process_group()


ORPHAN_SCRIPT = """
import os, signal, sys, gc
import realm
llm = realm.LLM(sys.argv[1], kv_blocks=16, max_num_seqs=2, tensor_parallel=2, parallel_timeout=60)
print(llm._ranks.workers[0].pid, flush=True)
llm.generate([[1, 2, 3]], realm.runtime.SamplingParams(max_tokens=2))
how = sys.argv[2]
if how == "gc":
    worker = llm._ranks.workers[0]
    del llm
    gc.collect()
    print("reaped", worker.returncode, flush=True)
elif how == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
# "exit": the interpreter's exit, the LLM still referenced
"""


@pytest.mark.parametrize("how", ["exit", "gc", "sigkill"])
def test_no_worker_outlives_its_llm(tiny, how):
    """The worker ends with the LLM: collected, at the interpreter's exit, or when its parent is killed (no
    cleanup ran: the closed connection, or the worker's watch of its parent, ends it)."""
    run = subprocess.run([sys.executable, "-c", ORPHAN_SCRIPT, str(tiny), how], capture_output=True, text=True,
                         timeout=TIMEOUT_S, cwd=ROOT)
    lines = run.stdout.split()
    assert lines, run.stderr
    worker = int(lines[0])
    if how == "gc":
        assert lines[1:] == ["reaped", "0"], run.stdout
    assert run.returncode == (-signal.SIGKILL if how == "sigkill" else 0), run.stderr
    assert _gone_within([worker], 10), f"worker {worker} outlived its LLM ({how})"


def test_a_worker_killed_mid_generation_fails_every_request_and_refuses_the_next(tiny):
    """The worker is killed after the first token: the engine's next step fails with RankFailure (gloo sees the
    closed connection, well before the 60 s timeout), every request of the batch ends with it, and the next
    generate is refused with the same cause."""
    llm = realm.LLM(tiny, kv_blocks=64, max_num_seqs=4, tensor_parallel=2, parallel_timeout=TIMEOUT_S)
    try:
        worker = llm._ranks.workers[0]

        def kill(_i, _event):
            if worker.poll() is None:
                worker.send_signal(signal.SIGKILL)
                worker.wait()

        began = time.monotonic()
        outs = llm.generate(ENGINE_PROMPTS, GREEDY, on_event=kill)
        assert time.monotonic() - began < 30
        for out in outs:
            assert out.finish_reason.value == "error"
            assert out.error.startswith("the engine stopped: RankFailure: tensor parallel: ")
            assert "another rank stopped" in out.error
            assert len(out.token_ids) < GREEDY.max_tokens
        assert llm.engine.failure == outs[0].error
        with pytest.raises(EngineFailure) as refused:
            llm.generate(["ab"], GREEDY)
        assert str(refused.value) == outs[0].error
        with pytest.raises(EngineFailure):  # the engine's own API too
            llm.engine.add_request([1, 2], GREEDY)
    finally:
        began = time.monotonic()
        llm.close()
        assert time.monotonic() - began < 10
    assert not dist.is_initialized()


def test_the_runtime_does_not_load_tensor_parallelism():
    """The engine's RankFailure path looks the class up (sys.modules): realm.LLM without tensor_parallel loads no
    realm.parallel."""
    code = "import sys, realm.runtime.llm, realm.runtime.engine; print(any(m.startswith('realm.parallel') for m in " \
           "sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    assert run.stdout.strip() == "False", run.stderr


# -------------------------------------------------------------------------------------------------- torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, nnodes: int = 1, node_rank: int = 0, nproc: int = 2, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
            f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "realm", *args]


def _generate_args(tiny: Path) -> list[str]:
    return ["generate", "hello world", "--model", str(tiny), "--max-tokens", "12", "--quiet"]


def _realm_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


@pytest.mark.parametrize(("world", "message"), [
    ("2", "under torchrun (WORLD_SIZE=2) realm runs generate and serve over the ranks; run `realm formats` in one "
          "process"),
    ("x", "RANK, WORLD_SIZE and LOCAL_RANK must be integers, got RANK='0' WORLD_SIZE='x'"),
])
def test_under_torchrun_other_commands_and_bad_environments_are_refused(world, message):
    run = subprocess.run([sys.executable, "-m", "realm", "formats"], capture_output=True, text=True,
                         timeout=TIMEOUT_S, env=dict(_realm_env(), RANK="0", WORLD_SIZE=world))
    assert run.returncode == 2 and message in run.stderr, run.stderr


def test_torchrun_generate_on_two_ranks_prints_one_process_text(tiny):
    one = subprocess.run([sys.executable, "-m", "realm", *_generate_args(tiny)], capture_output=True, text=True,
                         timeout=TIMEOUT_S, env=_realm_env())
    assert one.returncode == 0, one.stderr
    two = subprocess.run(_torchrun(*_generate_args(tiny), port=_free_port()), capture_output=True, text=True,
                         timeout=TIMEOUT_S, env=_realm_env())
    assert two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and one.stdout.strip()


def test_two_node_groups_on_loopback_print_one_process_text(tiny):
    """Two "machines": two torchrun node groups of one process each, meeting at 127.0.0.1 (static rendezvous)."""
    one = subprocess.run([sys.executable, "-m", "realm", *_generate_args(tiny)], capture_output=True, text=True,
                         timeout=TIMEOUT_S, env=_realm_env())
    port = _free_port()
    nodes = [subprocess.Popen(_torchrun(*_generate_args(tiny), nnodes=2, node_rank=r, nproc=1, port=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_realm_env())
             for r in (0, 1)]
    try:
        results = [n.communicate(timeout=TIMEOUT_S) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
                n.wait()
    assert [n.returncode for n in nodes] == [0, 0], results[0][1] + results[1][1]
    assert results[0][0] == one.stdout and one.stdout.strip()
    assert results[1][0] == ""  # rank 1 follows: it prints nothing


def _rank_pids(torchrun: subprocess.Popen, world: int) -> dict[int, int]:
    """{rank: pid} of torchrun's rank processes (its children, told apart by the RANK in their environment)."""
    end = time.monotonic() + TIMEOUT_S
    while True:
        found = {}
        children = subprocess.run(["pgrep", "-P", str(torchrun.pid)], capture_output=True, text=True).stdout.split()
        for pid in map(int, children):
            with contextlib.suppress(OSError):
                env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
                if "RANK" in env:
                    found[int(env["RANK"])] = pid
        if len(found) == world or time.monotonic() > end:
            return found
        time.sleep(0.2)


@contextlib.contextmanager
def _torchrun_server(tiny: Path, http: int):
    cmd = _torchrun("serve", "--model", str(tiny), "--port", str(http), "--kv-blocks", "64", "--log-level", "warning",
                    port=_free_port())
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_realm_env(),
                              start_new_session=True)
    try:
        yield server
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        assert not subprocess.run(["pgrep", "-s", str(server.pid)], capture_output=True).stdout  # no rank left


def test_torchrun_serve_answers_then_every_rank_exits_on_sigterm(tiny):
    """`torchrun --nproc-per-node 2 -m realm serve`: one completion over HTTP equals one process's; SIGTERM to rank 0
    (the server) drains it and exits it with 143 as `realm serve` always does (realm.cli), after its STOP ended rank 1
    (which ignores signals: it follows rank 0) without a failure; then torchrun ends, no rank left."""
    expected = realm.LLM(tiny, kv_blocks=64).generate(["abcd"], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    http = _free_port()
    with _torchrun_server(tiny, http) as server:
        body = _complete_when_ready(http, server)
        assert body["choices"][0]["text"] == expected.text
        ranks = _rank_pids(server, 2)
        os.kill(ranks[0], signal.SIGTERM)
        _, err = server.communicate(timeout=TIMEOUT_S)
        assert "realm: terminated" in err, err
        assert "realm: rank 1:" not in err, err  # rank 1 saw no RankFailure: it was stopped


def test_torchrun_serve_exits_when_a_rank_dies(tiny):
    """Rank 1 killed: the next request fails (an error, not a hang), and the ranks exit, torchrun with a failure."""
    http = _free_port()
    with _torchrun_server(tiny, http) as server:
        _complete_when_ready(http, server)
        os.kill(_rank_pids(server, 2)[1], signal.SIGKILL)
        began = time.monotonic()
        with contextlib.suppress(OSError):  # refused, failed, or the server already gone: anything but an answer
            body = _complete_when_ready(http, server, wait=False)
            pytest.fail(f"a completion without rank 1: {body}")
        _, err = server.communicate(timeout=TIMEOUT_S)
        assert server.returncode != 0, err
        assert time.monotonic() - began < 30


def _complete_when_ready(port: int, server: subprocess.Popen, wait: bool = True) -> dict:
    request = json.dumps({"model": "tiny", "prompt": "abcd", "max_tokens": 6, "temperature": 0,
                          "ignore_eos": True}).encode()
    end = time.monotonic() + TIMEOUT_S
    while True:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}: {server.stderr.read()}")
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", request,
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as response:
                return json.loads(response.read())
        except OSError:
            if not wait or time.monotonic() > end:
                raise
            time.sleep(0.3)
