"""Launching tensor-parallel ranks: `realm.LLM(model, tensor_parallel=N)` spawning its own workers, and `torchrun`
running realm's commands (`torchrun --nproc-per-node N -m realm serve ...`, one machine or several with --nnodes).

Rank 0 runs the engine (and the server); the other ranks run `follow`: they receive the engine's KV cache size, then
every step plan (tensor_parallel.follow_plans) until rank 0 stops. Rank 0's engine runner is wrapped by `RankZero`:

- PlanBroadcast sends each plan before rank 0 runs it;
- the first RankFailure (a collective failed: a rank died, or did not answer within the group's timeout) is latched:
  every later forward on rank 0 raises it at once, without touching the broken group (the runner's retry of a failed
  step chunk by chunk would otherwise run collectives that can no longer pair up), and the runner's execute raises it
  even where the runner turned it into per-chunk errors. The engine then fails all its requests and refuses new ones
  (Engine.failure). An interrupt (Ctrl-C) inside a step leaves the ranks out of step, so it latches a RankFailure too;
- while the engine is idle, a keepalive sends an empty plan every timeout / 4 seconds: the other ranks wait for plans
  inside a collective, which would otherwise time out (and end them) after `timeout` seconds of an idle server.

Workers spawned by realm.LLM are `python -c` subprocesses (not multiprocessing's spawn, which re-imports the caller's
__main__), ignore SIGINT and SIGTERM (they end when rank 0 stops them, or when its process or connection goes), and
exit by themselves when their parent process is gone.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from realm.runtime.engine import Engine
from realm.runtime.lora import DEFAULT_MAX_LORAS
from realm.runtime.model import Model, default_dtype, resolve_device
from realm.runtime.ops import Backend, backend_of, check_onednn
from realm.runtime.plan import StepPlan
from realm.runtime.tokenizer import Tokenizer
from realm.runtime.transformer import _check_triton_device
from realm.runtime.weights import ModelWeights, load_weights

from .lora_shard import shard_lora_registry
from .shard import ShardError
from .tensor_parallel import PlanBroadcast, RankFailure, attach_collectives, follow_plans, shard_weights

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0  # a collective (or a worker's start) that takes longer fails with RankFailure
STOP_GRACE_S = 10.0  # after STOP, how long workers may take to exit before they are terminated
_KEY = "realm/tp"  # the rendezvous store's keys: f"{_KEY}/ready/{rank}", f"{_KEY}/error/{rank}"


# -------------------------------------------------------------------------------------------- the world size


def check_world(world) -> int:
    """tensor_parallel / WORLD_SIZE: an int >= 1."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"tensor_parallel must be an int >= 1 (the number of ranks; 1: no tensor parallelism), "
                         f"got {world!r}")
    return world


def _working_worlds(weights: ModelWeights) -> list[int]:
    """The rank counts (up to the query heads) that every tensor of the model splits over."""
    works = []
    for world in range(1, weights.config.n_heads + 1):
        try:
            shard_weights(weights, 0, world)  # the cuts are even: rank 0's shard fails where any rank's would
        except ShardError:
            continue
        works.append(world)
    return works


def shard_rank(weights: ModelWeights, rank: int, world: int, what: str) -> ModelWeights:
    """Rank `rank`'s shard; a world the model cannot be cut for raises ShardError naming the counts that work."""
    try:
        return shard_weights(weights, rank, world)
    except ShardError as e:
        works = ", ".join(map(str, _working_worlds(weights)))
        raise ShardError(f"{what}: {weights.config.name or weights.path.name} cannot be split over {world} ranks "
                         f"({e}); rank counts that work for the whole model: {works}") from None


def rank_model(weights: ModelWeights, rank: int, world: int, backend: Backend | str | None, device: torch.device,
               dtype: torch.dtype | None, what: str = "tensor_parallel", max_loras: int = DEFAULT_MAX_LORAS,
               max_lora_rank: int | None = None) -> Model:
    """This rank's Model (as load_tensor_parallel, from weights already read), its collectives on the default
    process group, its LoRA registry sharded (lora_shard.py: rank 0 adds adapters, the other ranks receive them with
    the plans; max_loras and max_lora_rank size rank 0's pool, which the others mirror)."""
    backend = backend_of(Backend.TORCH if backend is None else backend)
    dtype = default_dtype(backend, device) if dtype is None else dtype
    if backend is Backend.TRITON:  # as realm.load: a setup that cannot run fails before the weights are cut
        _check_triton_device(device, dtype)
    if backend is Backend.ONEDNN:
        check_onednn(device, dtype)
    model = Model(shard_rank(weights, rank, world, what), Tokenizer.from_metadata(weights.metadata), backend, device,
                  dtype, max_loras=max_loras, max_lora_rank=max_lora_rank)
    attach_collectives(model.transformer, weights.config, world)
    shard_lora_registry(model, weights.config, rank, world)
    return model


def dist_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device | str | None, local_rank: int) -> torch.device:
    """The rank's device: its own GPU (cuda:local_rank) where the device is CUDA, else the CPU."""
    device = resolve_device(device)
    if device.type == "cuda":
        device = resolve_device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    return device


# ------------------------------------------------------------------------------------------- rank 0 and the rest


def _collective(what: str, run) -> None:
    try:
        run()
    except (RuntimeError, dist.DistError) as e:
        raise RankFailure(f"tensor parallel: {what} failed: another rank stopped or did not answer within the "
                          f"process group's timeout ({str(e).splitlines()[0]})") from e


class _QuietEmptyPlans(logging.Filter):
    """The keepalive's empty plans make the runner log a failed 0-chunk step on every rank: not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("a step of 0 chunks failed")


def _quiet_empty_plans() -> None:
    runner_log = logging.getLogger("realm.runtime.runner")
    if not any(isinstance(f, _QuietEmptyPlans) for f in runner_log.filters):
        runner_log.addFilter(_QuietEmptyPlans())


class RankZero:
    """Rank 0's side of one engine over the default process group: sends the engine's KV cache size, then every step
    plan (PlanBroadcast); latches the first RankFailure (see the module's docstring); keeps the other ranks from
    timing out while the engine is idle. `close()` sends STOP (unless the group has failed). on_failure(RankFailure)
    runs once, in the thread that saw the failure (a server ends its process with it)."""

    def __init__(self, engine: Engine, timeout_s: float = DEFAULT_TIMEOUT_S, on_failure=None):
        self.engine, self.timeout_s, self.on_failure = engine, timeout_s, on_failure
        self.failure: RankFailure | None = None
        self._lock = threading.RLock()  # one broadcast at a time: the engine's steps and the keepalive's
        self._last = time.monotonic()
        self._closed = threading.Event()
        _quiet_empty_plans()
        runner = engine.runner
        header = {"num_blocks": runner.kv.num_blocks, "block_size": runner.block_size}
        self._guard(lambda: _collective("sending the KV cache size", lambda: dist.broadcast_object_list(
            [header], src=0)))
        self.broadcast = PlanBroadcast(runner, loras=engine.loras)
        self._execute = runner.execute  # the broadcast's
        runner.execute = self.execute
        net = runner.transformer
        self._forward = net.forward
        net.forward = self._latched_forward
        self._keepalive = threading.Thread(target=self._keep_alive, name="realm-tp-keepalive", daemon=True)
        self._keepalive.start()

    def _fail(self, failure: RankFailure) -> RankFailure:
        if self.failure is None:
            self.failure = failure
            log.error("%s", failure)
            if self.on_failure is not None:
                self.on_failure(failure)
        return self.failure

    def _guard(self, run):
        """Run a step or a collective: a RankFailure, or an interrupt in the middle (the other ranks went on), is
        latched; once latched, nothing runs."""
        if self.failure is not None:
            raise self.failure
        try:
            return run()
        except RankFailure as e:
            raise self._fail(e) from None
        except BaseException as e:
            if self.failure is None and not isinstance(e, Exception):
                self._fail(RankFailure(f"tensor parallel: a step was interrupted ({type(e).__name__}) while the "
                                       "other ranks ran it: the ranks are out of step"))
            raise

    def _latched_forward(self, *args, **kwargs):
        return self._guard(lambda: self._forward(*args, **kwargs))

    def execute(self, plan: StepPlan, draft_probs=None):
        with self._lock:
            self._last = time.monotonic()
            out = self._guard(lambda: self._execute(plan, draft_probs))
            if self.failure is not None:  # the runner ran the chunks alone and reported per-chunk errors
                raise self.failure
            return out

    def _keep_alive(self) -> None:
        interval = self.timeout_s / 4
        while not self._closed.wait(min(interval, 5.0)):
            if self.failure is not None:
                return
            with self._lock:
                if time.monotonic() - self._last < interval or self._closed.is_set():
                    continue
                with contextlib.suppress(RankFailure):  # latched: the engine's next step raises it
                    self.execute(StepPlan(self.engine.runner.block_size, ()))

    def close(self) -> None:
        """End the other ranks' follow (STOP), unless the group has failed; idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._keepalive.join()
        with self._lock, contextlib.suppress(RankFailure):
            self._guard(self.broadcast.stop)


def follow(model: Model) -> int:
    """A rank other than 0: the engine's KV cache size from rank 0, then its step plans until STOP (follow_plans).
    Returns the number of plans run (RankFailure if rank 0 goes)."""
    _quiet_empty_plans()
    box: list = [None]
    _collective("receiving the KV cache size", lambda: dist.broadcast_object_list(box, src=0))
    return follow_plans(model, box[0]["num_blocks"], box[0]["block_size"])


# --------------------------------------------------------------------------------------- realm.LLM's own workers


@dataclass
class SpawnedRanks:
    """realm.LLM(tensor_parallel=N)'s ranks: rank 0's model in this process, the worker processes, and (once the
    engine is made) its RankZero. `close()` stops and reaps the workers and leaves the process group."""

    model: Model
    workers: list[subprocess.Popen]
    timeout_s: float
    rank_zero: RankZero | None = None
    closed: bool = False

    def attach(self, engine: Engine) -> RankZero:
        self.rank_zero = RankZero(engine, self.timeout_s)
        return self.rank_zero

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.rank_zero is not None:
            self.rank_zero.close()
        end = time.monotonic() + (STOP_GRACE_S if self.rank_zero is not None and self.rank_zero.failure is None
                                  else 0.0)
        for proc in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, end - time.monotonic()))
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(model: str | os.PathLike, world: int, backend: Backend | str | None = None,
                device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                timeout_s: float = DEFAULT_TIMEOUT_S, max_loras: int = DEFAULT_MAX_LORAS,
                max_lora_rank: int | None = None) -> SpawnedRanks:
    """Rank 0 here (its shard loaded first: a world the model cannot be cut for fails before any process starts),
    ranks 1 .. world - 1 as worker processes on this machine, all joined in the default process group (gloo; NCCL
    on CUDA, rank r on cuda:r). Refused when this process already has a default process group: realm would have to
    replace or share it (see realm.LLM)."""
    if dist.is_initialized():
        raise RuntimeError(f"realm.LLM(tensor_parallel={world}) starts its own process group, but torch.distributed "
                           f"is already initialized in this process (world size {dist.get_world_size()}): call "
                           "torch.distributed.destroy_process_group() first, or launch realm under torchrun "
                           "(`torchrun --nproc-per-node N -m realm serve ...`)")
    device0 = rank_device(device, 0)
    if device0.type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"tensor_parallel={world} puts one rank on each GPU, but torch sees "
                         f"{torch.cuda.device_count()}")
    weights = load_weights(model)
    rank0 = rank_model(weights, 0, world, backend, device0, dtype, f"tensor_parallel={world}", max_loras,
                       max_lora_rank)
    store = dist.TCPStore("127.0.0.1", 0, world, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    spec = {"model": str(weights.path), "world": world, "port": store.port, "backend": rank0.backend.value,
            "device": device0.type, "dtype": str(rank0.dtype).removeprefix("torch."), "timeout_s": timeout_s,
            "threads": max(1, (os.cpu_count() or 1) // world), "parent": os.getpid()}
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the realm package
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    workers = [subprocess.Popen([sys.executable, "-c", "from realm.parallel.launch import _worker; _worker()",
                                 json.dumps({**spec, "rank": rank})], env=env, stdin=subprocess.DEVNULL)
               for rank in range(1, world)]
    ranks = SpawnedRanks(rank0, workers, timeout_s)
    try:
        _wait_ready(store, workers, timeout_s)
        dist.init_process_group(dist_backend(device0), store=store, rank=0, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except BaseException:
        ranks.close()
        raise
    return ranks


def _wait_ready(store: dist.TCPStore, workers: list[subprocess.Popen], timeout_s: float) -> None:
    """Until every worker has loaded its shard; a worker that fails or exits first raises with its reason."""
    end = time.monotonic() + timeout_s
    pending = {rank: proc for rank, proc in enumerate(workers, 1)}
    while pending:
        for rank, proc in list(pending.items()):
            if store.check([f"{_KEY}/error/{rank}"]):
                raise RuntimeError(f"tensor parallel: rank {rank} could not start: "
                                   f"{store.get(f'{_KEY}/error/{rank}').decode()}")
            if store.check([f"{_KEY}/ready/{rank}"]):
                del pending[rank]
            elif proc.poll() is not None:
                raise RuntimeError(f"tensor parallel: rank {rank}'s process exited with status {proc.returncode} "
                                   "before it had loaded its shard")
        if pending and time.monotonic() > end:
            raise RuntimeError(f"tensor parallel: ranks {sorted(pending)} did not load their shards within "
                               f"{timeout_s:g} s")
        time.sleep(0.05)


def _watch_parent(parent: int) -> None:
    """A worker whose parent is gone (killed: no STOP, and maybe no closed connection yet) ends itself."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _worker() -> None:
    """A worker process of spawn_ranks (argv[1]: its JSON spec)."""
    spec = json.loads(sys.argv[1])
    for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 ends the workers; a terminal's Ctrl-C reaches it alone
        signal.signal(sig, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(spec["parent"],), daemon=True).start()
    torch.set_num_threads(spec["threads"])
    rank, world, timeout = spec["rank"], spec["world"], datetime.timedelta(seconds=spec["timeout_s"])
    store = dist.TCPStore("127.0.0.1", spec["port"], world, False, timeout)
    try:
        device = rank_device(spec["device"], rank)
        model = rank_model(load_weights(spec["model"]), rank, world, spec["backend"], device,
                           getattr(torch, spec["dtype"]))
    except Exception as e:
        store.set(f"{_KEY}/error/{rank}", f"{type(e).__name__}: {e}")
        sys.exit(1)
    store.set(f"{_KEY}/ready/{rank}", "1")
    sys.exit(_follow_and_leave(model, dist_backend(device), store, rank, world, timeout))


def _follow_and_leave(model: Model, backend: str, store, rank: int, world: int,
                      timeout: datetime.timedelta) -> int:
    """Join the group, follow rank 0 until STOP (0) or a failure (1: the group is broken, left without
    destroy_process_group's handshake)."""
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        follow(model)
    except RankFailure as e:
        print(f"realm: rank {rank}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------------------------ torchrun


@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun tells each process it starts (RANK, WORLD_SIZE, LOCAL_RANK; MASTER_ADDR/PORT for the group)."""

    rank: int
    world: int
    local_rank: int


def torchrun_env(environ=os.environ) -> TorchrunEnv | None:
    """The torchrun environment, or None outside torchrun (no RANK / WORLD_SIZE)."""
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        env = TorchrunEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got RANK={environ['RANK']!r} "
                         f"WORLD_SIZE={environ['WORLD_SIZE']!r} LOCAL_RANK={environ.get('LOCAL_RANK')!r}") from None
    check_world(env.world)
    if not 0 <= env.rank < env.world:
        raise ValueError(f"RANK={env.rank} is not in [0, WORLD_SIZE={env.world})")
    return env


def torchrun_model(env: TorchrunEnv, model: str | os.PathLike, backend: Backend | str | None,
                   device: torch.device | str | None, dtype: torch.dtype | None,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> Model:
    """This torchrun process's shard (a world the model cannot be cut for fails on every rank alike, before the
    group forms), then the default process group from torchrun's environment (env://)."""
    device = rank_device(device, env.local_rank)
    model = rank_model(load_weights(model), env.rank, env.world, backend, device, dtype, f"WORLD_SIZE={env.world}")
    dist.init_process_group(dist_backend(device), rank=env.rank, world_size=env.world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return model


def torchrun_follow(env: TorchrunEnv, model: Model) -> int:
    """A torchrun rank other than 0: follow rank 0 until it stops; the exit status (1: the group failed)."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # torchrun forwards signals to every rank: rank 0 drains and stops us
        signal.signal(sig, signal.SIG_IGN)
    try:
        follow(model)
    except RankFailure as e:
        print(f"realm: rank {env.rank}: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # the group is broken: leave without destroy_process_group's handshake
    dist.destroy_process_group()
    return 0


def leave(rank_zero: RankZero | None) -> None:
    """Rank 0 under torchrun: stop the other ranks and leave the group (without the handshake after a failure)."""
    if rank_zero is not None:
        rank_zero.close()
    if dist.is_initialized() and (rank_zero is None or rank_zero.failure is None):
        dist.destroy_process_group()


__all__ = ["DEFAULT_TIMEOUT_S", "RankZero", "SpawnedRanks", "TorchrunEnv", "check_world", "follow", "leave",
           "rank_model", "spawn_ranks", "torchrun_env", "torchrun_follow", "torchrun_model"]
