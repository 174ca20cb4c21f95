"""Many LoRA adapters in one batch, through the runtime: realm's forward with an adapter equals HF + PEFT, a mixed
batch gives every request its solo output, the pool's slots and the scheduler's limit, and bad adapters or names."""

from __future__ import annotations

import pytest
import torch
from tiny_gguf import TINY, StubTokenizer, write_tiny_llama
from tolerances import assert_same_predictions

from realm.lora import AdapterError, LoraAdapter, LoraModule, Target
from realm.runtime import Backend, Model, load_weights
from realm.runtime.engine import Engine, EngineConfig
from realm.runtime.generate import FinishReason
from realm.runtime.lora import LoraMode, LoraRegistry, parse_lora_specs
from realm.runtime.sampling import SamplingParams

CONTEXT = 96
IDS = [3, 17, 42, 8, 8, 0, 49, 21, 5, 30, 11, 7, 2, 19]


def random_adapter(config, name: str, rank: int, targets=tuple(Target), seed: int = 0, scale: float = 2.0,
                   ranks: dict[Target, int] | None = None) -> LoraAdapter:
    """Random A and B (B nonzero, unlike a fresh PEFT adapter) on `targets` of every layer; `ranks` per target."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(config.n_layers):
        for t in targets:
            r = (ranks or {}).get(t, rank)
            out_features, in_features = t.shape(config)
            modules[(layer, t)] = LoraModule(torch.randn(r, in_features, generator=g) * 0.3,
                                             torch.randn(out_features, r, generator=g) * 0.3, scale / r ** 0.5)
    return LoraAdapter(name, modules, source="random")


@pytest.fixture
def tiny(tmp_path):
    state = write_tiny_llama(tmp_path / "tiny.gguf", context_length=CONTEXT)
    return tmp_path / "tiny.gguf", state


def tiny_model(path, backend=Backend.TORCH, **kwargs) -> Model:
    return Model(load_weights(path), StubTokenizer(TINY["vocab"]), backend, torch.device("cpu"), torch.float32,
                 **kwargs)


# ---------------------------------------------------------------------------------------------- HF + PEFT


def peft_model(state, adapter: LoraAdapter):
    """HF's LlamaForCausalLM on the tiny weights with PEFT's LoRA layers holding the adapter's tensors."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from test_model import hf_model

    ranks = {m.rank for m in adapter.modules.values()}
    assert len(ranks) == 1, "one rank: PEFT's rank_pattern is tested with the PEFT reader"
    r = ranks.pop()
    config = LoraConfig(r=r, lora_alpha=r, target_modules=[t.peft_name for t in adapter.targets], lora_dropout=0.0)
    model = get_peft_model(hf_model("llama", state, tied=False), config).eval()
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        target = next(t for t in Target if name.endswith(t.peft_name))
        m = adapter.modules[(layer, target)]
        module.lora_A["default"].weight.data.copy_(m.a)
        module.lora_B["default"].weight.data.copy_(m.b)
        module.scaling["default"] = m.scale
    return model


@pytest.mark.parametrize("targets", [tuple(Target), (Target.Q, Target.V), (Target.DOWN,)],
                         ids=["all", "q,v", "down"])
def test_forward_with_an_adapter_equals_hf_peft(tiny, targets):
    path, state = tiny
    model = tiny_model(path)
    adapter = random_adapter(model.config, "a", rank=4, targets=targets)
    model.add_lora("a", adapter)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        expected = peft_model(state, adapter)(ids).logits
    got = model.forward(ids, adapter="a")
    assert_same_predictions(got, expected)
    # the reference adds the delta in PEFT's op order: the same float32 operations, so the same bits
    assert torch.equal(got, expected), f"max |difference| {(got - expected).abs().max().item()}"
    base = model.forward(ids)
    assert (base - got).abs().max() > 0.1, "the adapter changed nothing"


# ------------------------------------------------------------------------------------------- mixed batches


def solo(model: Model, prompt, adapter, max_tokens: int) -> list[int]:
    return model.generate(prompt, max_tokens=max_tokens, adapter=adapter, ignore_eos=True).token_ids


def adapters_for(config):
    return {"a": random_adapter(config, "a", rank=8, seed=1),
            "b": random_adapter(config, "b", rank=4, targets=(Target.Q, Target.K, Target.V, Target.O), seed=2,
                                ranks={Target.K: 2}),
            "wide": random_adapter(config, "wide", rank=64, targets=(Target.GATE, Target.UP, Target.DOWN), seed=3)}


@pytest.mark.parametrize("kv_blocks", [64, 9], ids=["roomy", "preempting"])
def test_mixed_batch_gives_each_request_its_solo_output(tiny, kv_blocks):
    """Adapters a and b, the base model and a rank-64 adapter, interleaved, with prefix caching on (shared prompts
    across adapters must not share KV) and, with 9 blocks of 16, preemption."""
    path, _ = tiny
    model = tiny_model(path, max_loras=4)
    for name, adapter in adapters_for(model.config).items():
        model.add_lora(name, adapter)
    prompts = [IDS, IDS[:9], IDS[3:], IDS + IDS[:5], [1, 2, 3]]
    names = [None, "a", "b", "wide"]
    cases = [(p, names[(i + j) % 4]) for i, p in enumerate(prompts) for j in range(2)]
    expected = [solo(model, p, a, 12) for p, a in cases]
    assert len({tuple(e) for e in expected[:8]}) > 4, "the adapters do not change the outputs"
    engine = Engine(model, EngineConfig(max_batch_tokens=24, kv_blocks=kv_blocks, block_size=16))
    requests = [engine.add_request(p, SamplingParams(max_tokens=12, ignore_eos=True, adapter=a)) for p, a in cases]
    engine.run()
    assert [r.completion.token_ids for r in requests] == expected
    if kv_blocks == 9:
        assert engine.scheduler.stats.preemptions > 0
    assert all(not e.users for e in model.loras._entries.values()), "a finished request still holds its adapter"


def test_prefix_cache_is_salted_per_adapter(tiny):
    path, _ = tiny
    model = tiny_model(path)
    model.add_lora("a", random_adapter(model.config, "a", rank=4))
    engine = Engine(model, EngineConfig(kv_blocks=32, block_size=4))
    prompt = IDS * 2

    def run(adapter):
        r = engine.add_request(prompt, SamplingParams(max_tokens=2, adapter=adapter))
        engine.run()
        return r.completion.timings.cached_tokens

    assert run("a") == 0
    assert run(None) == 0, "the base model reused the adapter's KV"
    assert run("a") > 0 and run(None) > 0
    # an adapter loaded again under the same name is another adapter: its KV is not the old one's
    model.remove_lora("a")
    model.add_lora("a", random_adapter(model.config, "a", rank=4, seed=9))
    assert run("a") == 0


def test_more_adapters_than_slots_take_turns(tiny):
    """max_loras=2 with 3 adapters: the scheduler keeps each step to 2, the pool evicts the least recently used."""
    path, _ = tiny
    model = tiny_model(path, max_loras=2)
    for name, adapter in adapters_for(model.config).items():
        model.add_lora(name, adapter)
    cases = [(IDS[i:], name) for i, name in enumerate(["a", "b", "wide", "a", None, "wide"])]
    expected = [solo(model, p, a, 6) for p, a in cases]
    engine = Engine(model, EngineConfig(kv_blocks=64, block_size=16))
    seen = []
    original = model.loras.activate

    def activate(names):
        names = list(names)
        seen.append(set(names))
        return original(names)

    model.loras.activate = activate
    requests = [engine.add_request(p, SamplingParams(max_tokens=6, ignore_eos=True, adapter=a)) for p, a in cases]
    engine.run()
    assert [r.completion.token_ids for r in requests] == expected
    assert max(len(s) for s in seen) == 2 and set().union(*seen) == {"a", "b", "wide"}


def test_step_output_says_which_lora_path_ran(tiny):
    path, _ = tiny
    model = tiny_model(path)
    model.add_lora("a", random_adapter(model.config, "a", rank=4))
    engine = Engine(model, EngineConfig(kv_blocks=16))
    outputs = []
    execute = engine.runner.execute
    engine.runner.execute = lambda plan, draft_probs=None: outputs.append(execute(plan, draft_probs)) or outputs[-1]
    engine.add_request(IDS, SamplingParams(max_tokens=1))
    engine.run()
    engine.add_request(IDS, SamplingParams(max_tokens=1, adapter="a"))
    engine.run()
    assert [o.lora for o in outputs] == [None, "reference"]


# ------------------------------------------------------------------------------------------------- the pool


def test_registry_pool_slots_and_lru(tiny):
    path, _ = tiny
    model = tiny_model(path)
    registry = LoraRegistry(model.transformer, max_loras=2, max_rank=8)
    for i, name in enumerate("xyz"):
        registry.add(name, random_adapter(model.config, name, rank=2 + i, seed=i))
    assert registry.activate(["x", "y"]) == {"x": 0, "y": 1}
    assert registry.activate(["z"]) == {"z": 0}  # x was used least recently
    assert registry.resident == {"y": 1, "z": 0}
    assert registry.activate(["y", "x"]) == {"y": 1, "x": 0}
    stack = model.transformer.layers[0].qkv.lora
    assert stack.a.shape == (2, 3 * 8, TINY["hidden"]) and stack.ranks[0] == [2, 2, 2]
    m = registry.adapter("x").modules[(0, Target.K)]
    k_cols = stack.columns(1)
    assert torch.equal(stack.a[0, 8:10], m.a) and torch.equal(stack.b[0, k_cols, 8:10], m.b)
    assert not stack.b[0, k_cols, :8].any() and not stack.b[0, k_cols, 10:].any(), "B is not block-diagonal"
    with pytest.raises(ValueError, match="max_loras=2"):
        registry.activate(["x", "y", "z"])
    registry.remove("x")
    assert "x" not in registry and not stack.a[0].any(), "a removed adapter's slot was not cleared"


def test_bad_adapters_and_names(tiny):
    path, _ = tiny
    model = tiny_model(path, max_lora_rank=8)
    config = model.config
    with pytest.raises(AdapterError, match="max_lora_rank=8"):
        model.add_lora("big", random_adapter(config, "big", rank=9))
    wrong = random_adapter(config, "wrong", rank=2, targets=(Target.Q,))
    wrong.modules[(1, Target.Q)] = LoraModule(torch.zeros(2, 7), torch.zeros(TINY["hidden"], 2), 1.0)
    with pytest.raises(AdapterError, match=r"layer 1 q_proj.*\[r, 64\]"):
        model.add_lora("wrong", wrong)
    nan = random_adapter(config, "nan", rank=2, targets=(Target.V,))
    nan.modules[(0, Target.V)].b[0, 0] = float("nan")
    with pytest.raises(AdapterError, match="NaN"):
        model.add_lora("nan", nan)
    with pytest.raises(AdapterError, match="no LoRA adapter at"):
        model.add_lora("missing", path.parent / "nowhere")
    assert model.loras.names == []
    model.add_lora("a", random_adapter(config, "a", rank=2))
    with pytest.raises(ValueError, match="already loaded"):
        model.add_lora("a", random_adapter(config, "a", rank=2))
    for bad in ("", 3, "x\n"):
        with pytest.raises(ValueError, match="adapter name"):
            model.add_lora(bad, random_adapter(config, "a", rank=2))
    with pytest.raises(ValueError, match="adapter must be the name"):
        SamplingParams(adapter=3)
    engine = Engine(model, EngineConfig(kv_blocks=16))
    with pytest.raises(ValueError, match=r"unknown LoRA adapter 'nope' \('a'\)"):
        engine.add_request(IDS, SamplingParams(adapter="nope"))
    r = engine.add_request(IDS, SamplingParams(max_tokens=50, adapter="a"))
    with pytest.raises(ValueError, match="used by 1 request"):
        model.remove_lora("a")
    engine.step()
    engine.cancel(r)
    engine.run()
    assert r.completion.finish_reason is FinishReason.ABORT
    model.remove_lora("a")  # its request ended: it can go
    with pytest.raises(ValueError, match="unknown LoRA adapter"):
        model.remove_lora("a")


def test_a_bad_adapter_name_fails_that_request_alone(tiny):
    import realm

    path, _ = tiny
    model = tiny_model(path)
    model.add_lora("a", random_adapter(model.config, "a", rank=4))
    llm = realm.LLM(model, kv_blocks=32)
    params = [SamplingParams(max_tokens=4, ignore_eos=True, adapter=a) for a in ("a", "missing", None)]
    outs = llm.generate([IDS, IDS, IDS], params)
    assert [o.finish_reason for o in outs] == [FinishReason.LENGTH, FinishReason.ERROR, FinishReason.LENGTH]
    assert "unknown LoRA adapter 'missing'" in outs[1].error
    assert outs[0].token_ids == solo(model, IDS, "a", 4) and outs[2].token_ids == solo(model, IDS, None, 4)


def test_parse_lora_specs():
    assert parse_lora_specs(["pirate=/x/pirate", "/y/shout"]) == {"pirate": "/x/pirate", "shout": "/y/shout"}
    with pytest.raises(ValueError, match="two adapters are named 'a'"):
        parse_lora_specs(["a=/x", "a=/y"])
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_lora_specs(["=x"])


# -------------------------------------------------------------------------------------- the Triton backend


@pytest.mark.parametrize("mode", list(LoraMode))
def test_triton_backend_matches_torch_with_adapters(tiny, mode):
    """The kernels (interpreter on CPU): a mixed step of two adapters and the base model, prefill and decode."""
    path, _ = tiny
    adapters = adapters_for(load_weights(path).config)
    results = {}
    for backend in (Backend.TORCH, Backend.TRITON):
        model = tiny_model(path, backend)
        for name in ("a", "b"):
            model.add_lora(name, adapters[name])
        engine = Engine(model, EngineConfig(kv_blocks=32, block_size=16, lora_mode=mode))
        requests = [engine.add_request(IDS[i:], SamplingParams(max_tokens=4, ignore_eos=True, adapter=a))
                    for i, a in enumerate(["a", None, "b"])]
        engine.run()
        results[backend] = [r.completion.token_ids for r in requests]
    assert results[Backend.TRITON] == results[Backend.TORCH]


# ------------------------------------------------------------------------------------- review regressions


def test_a_callers_salt_never_meets_an_adapters(tiny):
    """A base request salted "lora:<uid>" (the adapter's own namespace, spelled by a caller) gets no adapter KV."""
    path, _ = tiny
    model = tiny_model(path)
    model.add_lora("a", random_adapter(model.config, "a", rank=4))
    engine = Engine(model, EngineConfig(kv_blocks=32, block_size=4))
    prompt = IDS * 2
    engine.add_request(prompt, SamplingParams(max_tokens=2, adapter="a"))
    engine.run()
    uid = model.loras.uid("a")
    for salt in (f"lora:{uid}", f"lora:{uid}|x"):
        r = engine.add_request(prompt, SamplingParams(max_tokens=2), salt=salt)
        engine.run()
        assert r.completion.timings.cached_tokens == 0 and r.completion.token_ids == solo(model, prompt, None, 2)


def test_a_slot_that_fails_to_load_fails_its_requests_alone_and_the_pool_recovers(tiny, monkeypatch):
    """The write into a slot raises (device memory): the requests with that adapter fail, with the reason, outside
    the pool's lock (their callbacks can reach it); the slot is left empty and the pool works afterwards."""
    import threading

    from realm.runtime.lora import LoraStack

    path, _ = tiny
    model = tiny_model(path, max_loras=1)
    for name in ("a", "b"):
        model.add_lora(name, random_adapter(model.config, name, rank=4, seed=ord(name)))
    engine = Engine(model, EngineConfig(kv_blocks=32, block_size=16))
    engine.add_request(IDS, SamplingParams(max_tokens=1, adapter="a"))
    engine.run()
    write = LoraStack.write
    monkeypatch.setattr(LoraStack, "write", lambda self, slot, adapter: (_ for _ in ()).throw(
        RuntimeError("out of memory")) if adapter is not None else write(self, slot, adapter))
    free = []
    fail_requests = engine._fail_requests

    def failing(failures):  # ends the requests (their callbacks run): another thread can take the pool's lock
        t = threading.Thread(target=lambda: free.append(model.loras.lock.acquire(timeout=5) and
                                                        model.loras.lock.release() is None))
        t.start()
        t.join()
        return fail_requests(failures)

    engine._fail_requests = failing
    bad = engine.add_request(IDS, SamplingParams(max_tokens=3, adapter="b"))
    base = engine.add_request(IDS, SamplingParams(max_tokens=3, ignore_eos=True))
    engine.run()
    assert bad.completion.finish_reason is FinishReason.ERROR and "out of memory" in bad.completion.error
    assert "device pool" in bad.completion.error and free == [True]
    assert base.completion.token_ids == solo(model, IDS, None, 3)
    monkeypatch.setattr(LoraStack, "write", write)
    assert model.loras.resident == {}
    model.remove_lora("a")
    assert solo(model, IDS, "b", 3) == solo(tiny_model(path, lora={"b": model.loras.adapter("b")}), IDS, "b", 3)


def test_a_request_waiting_for_a_lora_slot_does_not_block_the_base_model():
    """max_loras=1: a waiting request with a second adapter waits; a base request behind it is admitted."""
    from realm.runtime.block_manager import BlockManager
    from realm.runtime.scheduler import Scheduler, SchedulerConfig
    from realm.runtime.sequence import Sequence

    scheduler = Scheduler(SchedulerConfig(max_loras=1), BlockManager(64, 16))
    seqs = [Sequence(i, [1, 2, 3], 4, adapter=a) for i, a in enumerate(["a", "b", None, "a", "c"])]
    for seq in seqs:
        scheduler.add(seq)
    step = scheduler.schedule()
    assert [c.seq.seq_id for c in step.chunks] == [0, 2, 3]
    assert [s.seq_id for s in scheduler.waiting] == [1, 4]


def test_packaged_adapter_names_and_paths(tmp_path, monkeypatch):
    from realm.lora import packaged_adapters, resolve_adapter

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pirate").mkdir()  # an unrelated directory of that name does not hide the packaged adapter
    assert resolve_adapter("pirate") == packaged_adapters()["pirate"]
    (tmp_path / "pirate" / "adapter_config.json").write_text("{}")  # an adapter there does
    assert resolve_adapter("pirate").resolve() == (tmp_path / "pirate").resolve()
    assert parse_lora_specs(["./runs/lr=1e-4/ckpt", "out/llama-3.1-lora", "x/pirate.gguf", "a=b/c"]) == {
        "ckpt": "./runs/lr=1e-4/ckpt", "llama-3.1-lora": "out/llama-3.1-lora", "pirate": "x/pirate.gguf", "a": "b/c"}
    assert parse_lora_specs("robot") == {"robot": "robot"} and parse_lora_specs(None) == {}


def test_no_adapter_in_a_step_allocates_no_pool(tiny):
    """Steps without adapters (and a model that never runs one) hold no LoRA pool: no memory, no per-layer check."""
    path, _ = tiny
    model = tiny_model(path)
    model.add_lora("a", random_adapter(model.config, "a", rank=4))
    engine = Engine(model, EngineConfig(kv_blocks=16))
    engine.add_request(IDS, SamplingParams(max_tokens=2))
    engine.run()
    assert model.loras.pool_bytes == 0 and all(lin.lora is None for _, _, lin in model.transformer.lora_layers())
    engine.add_request(IDS, SamplingParams(max_tokens=2, adapter="a"))
    engine.run()
    assert model.loras.pool_bytes > 0 and model.loras.resident == {"a": 0}
