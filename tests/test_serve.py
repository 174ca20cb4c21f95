"""realm serve end to end: the real server (uvicorn) on a free loopback port, driven by the official openai client and
plain HTTP: answers, streaming, usage, tenants and their adapters, limits, errors in OpenAI's shape, disconnects,
metrics, the admin endpoints, loading, many concurrent streams."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from test_lora_runtime import random_adapter
from tiny_gguf import StubTokenizer, write_tiny_llama

from realm.runtime import Model, SamplingParams, load_weights
from realm.runtime.engine import EngineConfig
from realm.serve import Server, ServerConfig, create_app
from realm.serve.tenants import Tenants

KEYS = {"acme": "sk-acme-0123456789", "globex": "sk-globex-0123456789", "tiny": "sk-tiny-0123456789",
        "admin": "sk-admin-0123456789"}
TENANTS = {
    "admin": {"keys": [KEYS["admin"]]},
    "tenants": {
        "acme": {"keys": [KEYS["acme"]], "adapters": ["a"]},
        "globex": {"keys": [KEYS["globex"]], "adapters": ["b"]},
        "tiny": {"keys": [KEYS["tiny"]], "requests_per_minute": 3, "tokens_per_minute": 100000},
    },
}
DIMS = dict(vocab=64)
CONTEXT = 256
PROMPTS = [[3, 17, 42, 8, 8, 0, 3, 17], [40, 41], [1, 2, 3, 1, 2, 3, 1, 2], [9], [7, 7, 7, 7], [12, 30, 12, 30, 5]]


class LiveServer:
    """uvicorn serving `app` in a thread on 127.0.0.1 and a free port; `url` once started."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the server did not stop"


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (r := httpx.get(f"{url}/health")).status_code != 200:
        assert r.json()["status"] == "loading", f"the model failed to load: {r.json()}"
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.05)


def client(url: str, key: str | None = None, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key or "none", max_retries=0, **kw)


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics").text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def make_tiny_model(path) -> Model:
    """A tiny random model (no vocabulary: prompts are token ids, output `<id>`s) with adapters "a" and "b"."""
    write_tiny_llama(path, dims=DIMS, formats={"attn_q": "Q8_0"}, context_length=CONTEXT)
    model = Model(load_weights(path), StubTokenizer(DIMS["vocab"]), "torch", torch.device("cpu"), torch.float32)
    for i, name in enumerate("ab"):
        model.add_lora(name, random_adapter(model.config, name, rank=4, seed=i + 1, scale=4.0))
    return model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("serve") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_server(tiny_model):
    server = Server(ServerConfig(model="tiny.gguf", tenants=Tenants.from_dict(TENANTS),
                                 engine=EngineConfig(kv_blocks=1024, block_size=4, max_num_seqs=64)), model=tiny_model)
    with LiveServer(create_app(server)) as live:
        yield live


def offline(model: Model, prompt, max_tokens: int, adapter: str | None = None) -> str:
    return model.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, adapter=adapter)).text


def complete(url: str, key: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


# ---- the real model through the official client --------------------------------------------------------------

def test_chat_answers_paris_streamed_equals_whole_usage_is_right(smollm2):
    server = Server(ServerConfig(model="smollm2", engine=EngineConfig(kv_blocks=64)), model=smollm2)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with LiveServer(create_app(server)) as live:
        c = client(live.url)
        whole = c.chat.completions.create(model="smollm2", messages=question, temperature=0, max_tokens=24)
        answer = whole.choices[0].message.content
        assert "Paris" in answer and whole.choices[0].message.role == "assistant"
        want = smollm2.chat(question, max_tokens=24)
        assert answer == want.text
        assert whole.usage.prompt_tokens == len(smollm2.chat_prompt(question))
        assert whole.usage.completion_tokens == len(want.token_ids)
        assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
        assert whole.choices[0].finish_reason == ("stop" if want.finish_reason.value == "stop" else "length")
        chunks = list(c.chat.completions.create(model="smollm2", messages=question, temperature=0, max_tokens=24,
                                                stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == answer
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
        text = c.completions.create(model="smollm2", prompt="The capital of France is", temperature=0,
                                    max_tokens=8)
        assert text.choices[0].text == smollm2.generate("The capital of France is", max_tokens=8).text
        assert [m.id for m in c.models.list().data] == ["smollm2"]


def test_speculative_on_and_off_give_the_same_greedy_answers(smollm2):
    server = Server(ServerConfig(model="smollm2", engine=EngineConfig(kv_blocks=64)), model=smollm2)
    text = "Repeat exactly: the quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog."
    with LiveServer(create_app(server)) as live:
        c = client(live.url)
        answers = {}
        for spec in ("none", "ngram", {"method": "ngram", "num_speculative_tokens": 6, "adaptive": False}):
            r = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": text}],
                                          temperature=0, max_tokens=40, extra_body={"speculative": spec})
            answers[json.dumps(spec)] = r.choices[0].message.content
        assert len(set(answers.values())) == 1, answers
        assert metric(live.url, "realm:spec_decode_num_draft_tokens_total") > 0


# ---- tenants and adapters ------------------------------------------------------------------------------------

def test_models_lists_what_each_tenant_may_use(tiny_server):
    ids = {name: [m.id for m in client(tiny_server.url, KEYS[name]).models.list().data] for name in ("acme", "tiny")}
    assert ids == {"acme": ["tiny", "a"], "tiny": ["tiny"]}
    adapter = client(tiny_server.url, KEYS["acme"]).models.retrieve("a")
    assert adapter.id == "a" and adapter.model_extra["parent"] == "tiny"


def test_two_tenants_with_their_adapters_in_one_batch_get_their_offline_output(tiny_server, tiny_model):
    want = {name: [offline(tiny_model, p, 12, adapter) for p in PROMPTS] for name, adapter in (("acme", "a"),
                                                                                                ("globex", "b"))}
    assert want["acme"] != want["globex"]  # the adapters matter

    async def ask(name: str, adapter: str, prompt):
        c = openai.AsyncOpenAI(base_url=f"{tiny_server.url}/v1", api_key=KEYS[name], max_retries=0)
        r = await c.completions.create(model=adapter, prompt=prompt, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
        return r.choices[0].text

    async def both():
        return await asyncio.gather(*(ask(n, a, p) for n, a in (("acme", "a"), ("globex", "b")) for p in PROMPTS))

    got = asyncio.run(both())
    assert got == want["acme"] + want["globex"]
    assert metric(tiny_server.url, "realm:lora_requests_total", '{adapter="a"}') >= len(PROMPTS)


def test_another_tenants_adapter_is_not_found_and_a_bad_key_is_401(tiny_server):
    c = client(tiny_server.url, KEYS["acme"])
    for name in ("b", "no-such-adapter"):
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model=name, prompt=[1, 2], max_tokens=2)
        assert e.value.body == {"message": f"The model '{name}' does not exist or you do not have access to it.",
                                "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    for key in ("sk-wrong-0123456789", None):
        with pytest.raises(openai.AuthenticationError) as e:
            client(tiny_server.url, key).completions.create(model="tiny", prompt=[1, 2], max_tokens=2)
        assert e.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{tiny_server.url}/v1/models").status_code == 401


def test_a_burst_over_the_limit_gets_429_with_retry_after(tiny_server):
    statuses, last = [], None
    for _ in range(5):
        last = complete(tiny_server.url, KEYS["tiny"], {"model": "tiny", "prompt": [1, 2], "max_tokens": 1})
        statuses.append(last.status_code)
    assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]
    assert int(last.headers["retry-after"]) >= 1
    assert last.headers["x-ratelimit-limit-requests"] == "3" and last.headers["x-ratelimit-remaining-requests"] == "0"
    assert last.json()["error"]["code"] == "rate_limit_exceeded"
    # another tenant is not held back
    assert complete(tiny_server.url, KEYS["acme"], {"model": "tiny", "prompt": [1], "max_tokens": 1}).status_code \
        == 200


# ---- bad input -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "status", "param", "code"), [
    ({"model": "tiny", "prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": "tiny", "prompt": [1, 2], "n": 2}, 400, "n", "unsupported_field"),
    ({"model": "tiny", "prompt": [1, 2], "logprobs": 3}, 400, "logprobs", "unsupported_field"),
    ({"model": "tiny", "prompt": [1, 2], "frobnicate": 1}, 400, "frobnicate", "unknown_field"),
    ({"model": "tiny", "prompt": [1, 2], "temperature": 3}, 400, "temperature", "invalid_value"),
    ({"model": "tiny", "prompt": [1, 999]}, 400, "prompt", "invalid_prompt"),
    ({"model": "tiny", "prompt": list(range(1, 60)) * 5}, 400, "prompt", "invalid_prompt"),
    ({"model": "tiny", "prompt": "text, but the model has no vocabulary"}, 400, "prompt", "invalid_prompt"),
    ({"model": "tiny", "prompt": [1, 2], "speculative": "bogus"}, 400, None, "invalid_value"),
    ({"prompt": [1, 2]}, 400, "model", "invalid_value"),
])
def test_bad_requests_get_400_naming_the_field(tiny_server, body, status, param, code):
    r = complete(tiny_server.url, KEYS["acme"], body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code and error["message"]


def test_malformed_json_unknown_routes_and_methods_get_openai_errors(tiny_server):
    r = httpx.post(f"{tiny_server.url}/v1/completions", content=b'{"model": "tiny", "prompt": [1,',
                   headers={"Authorization": f"Bearer {KEYS['acme']}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(f"{tiny_server.url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{tiny_server.url}/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# ---- streams, disconnects, metrics ---------------------------------------------------------------------------

def test_64_concurrent_streams_each_get_their_whole_answer_and_disconnects_free_their_blocks(tiny_server,
                                                                                             tiny_model):
    prompts = [PROMPTS[i % len(PROMPTS)] + [i % 50] for i in range(64)]
    want = [offline(tiny_model, p, 24) for p in prompts]

    async def stream(i: int, leave_early: bool):
        async with httpx.AsyncClient(timeout=120) as http:
            body = {"model": "tiny", "prompt": prompts[i], "max_tokens": 24 if not leave_early else 200,
                    "temperature": 0, "stream": True, "ignore_eos": True}
            async with http.stream("POST", f"{tiny_server.url}/v1/completions", json=body,
                                   headers={"Authorization": f"Bearer {KEYS['acme']}"}) as r:
                assert r.status_code == 200
                text, done = "", False
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if leave_early and text.count("<") >= 5:
                        return None  # closes the connection halfway
                assert done
                return text

    async def everyone():
        return await asyncio.gather(*(stream(i, leave_early=i % 8 == 7) for i in range(64)))

    got = asyncio.run(everyone())
    for i, text in enumerate(got):
        if i % 8 != 7:
            assert text == want[i], f"stream {i}"
    deadline = time.monotonic() + 30
    while metric(tiny_server.url, "realm:kv_blocks_used") or metric(tiny_server.url, "realm:num_requests_running"):
        assert time.monotonic() < deadline, "the disconnected clients' requests still hold KV blocks"
        time.sleep(0.1)
    assert metric(tiny_server.url, "realm:request_success_total", '{finished_reason="abort"}') >= 8


def test_metrics_names_and_counts(tiny_server):
    before = metric(tiny_server.url, "realm:generation_tokens_total")
    assert complete(tiny_server.url, KEYS["acme"], {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4,
                                                    "ignore_eos": True}).status_code == 200
    assert metric(tiny_server.url, "realm:generation_tokens_total") == before + 4
    text = httpx.get(f"{tiny_server.url}/metrics").text
    for name in ("realm:num_requests_running", "realm:num_requests_waiting", "realm:kv_blocks_free",
                 "realm:kv_cache_usage_perc", "realm:prompt_tokens_total", "realm:prefix_cache_hits_total",
                 "realm:time_to_first_token_seconds_bucket", "realm:inter_token_latency_seconds_bucket",
                 "realm:e2e_request_latency_seconds_count", "realm:request_queue_time_seconds_sum",
                 "realm:request_success_total", "realm:spec_decode_num_accepted_tokens_total"):
        assert name in text, name


# ---- admin ---------------------------------------------------------------------------------------------------

def test_admin_loads_and_unloads_adapters_and_lists_usage(tiny_server, tiny_model, tmp_path):
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}
    assert httpx.get(f"{tiny_server.url}/admin/usage", headers={"Authorization": f"Bearer {KEYS['acme']}"}) \
        .status_code == 401
    usage = httpx.get(f"{tiny_server.url}/admin/usage", headers=admin).json()["tenants"]
    assert {u["tenant"] for u in usage} == {"acme", "globex", "tiny"}
    assert next(u for u in usage if u["tenant"] == "acme")["usage"]["requests"] >= 1
    r = httpx.post(f"{tiny_server.url}/admin/adapters", json={"name": "c", "path": str(tmp_path / "missing")},
                   headers=admin)
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_not_loaded"
    r = httpx.delete(f"{tiny_server.url}/admin/adapters/a", headers=admin)
    assert r.status_code == 200 and "a" not in tiny_model.loras
    r = complete(tiny_server.url, KEYS["acme"], {"model": "a", "prompt": [1], "max_tokens": 1})
    assert r.status_code == 404
    tiny_model.add_lora("a", random_adapter(tiny_model.config, "a", rank=4, seed=1, scale=4.0))  # as before
    assert httpx.delete(f"{tiny_server.url}/admin/adapters/zzz", headers=admin).status_code == 404


# ---- loading -------------------------------------------------------------------------------------------------

def test_health_is_503_while_the_model_loads(tiny_model, monkeypatch):
    import realm.runtime

    release = threading.Event()

    def slow_load(*args, **kwargs):
        assert release.wait(30)
        return tiny_model

    monkeypatch.setattr(realm.runtime, "load", slow_load)
    server = Server(ServerConfig(model="tiny.gguf", engine=EngineConfig(kv_blocks=64)))
    with LiveServer(create_app(server)) as live:
        r = httpx.get(f"{live.url}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(f"{live.url}/v1/completions", json={"model": "tiny", "prompt": [1], "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        release.set()
        wait_ready(live.url)
        assert complete(live.url, "x", {"model": "tiny", "prompt": [1], "max_tokens": 1}).status_code == 200


# ---- the command ---------------------------------------------------------------------------------------------

def test_realm_serve_drains_in_flight_streams_on_sigterm_and_exits_cleanly():
    """`realm serve` in its own process: a stream in flight when SIGTERM arrives still gets its whole answer, new
    connections are refused, and the process exits with status 0 within the drain deadline."""
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "realm", "serve", "--model", "smollm2", "--port", "0",
                             "--kv-blocks", "64", "--drain-timeout", "30", "--log-level", "info"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url, lines = None, []
        while url is None:
            line = proc.stdout.readline()
            assert line, "realm serve exited before listening:\n" + "".join(lines)
            lines.append(line)
            m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        assert any("open access" in line for line in lines)
        wait_ready(url)
        got = []

        def stream():
            body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 60, "stream": True,
                    "ignore_eos": True, "temperature": 0, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                got.extend(line for line in r.iter_lines() if line)

        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(0.3)  # the stream has begun
        proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert got and got[-1] == "data: [DONE]"
        chunks = [json.loads(g[6:]) for g in got if g.startswith("data: {")]
        assert chunks[-1]["usage"]["completion_tokens"] == 60 and chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_realm_serve_refuses_a_backend_that_cannot_run_before_listening(capsys):
    from realm.cli import main

    assert main(["serve", "--backend", "onednn", "--dtype", "float16", "--port", "0"]) == 2
    assert "the onednn backend computes in float32 or bfloat16, not torch.float16" in capsys.readouterr().err
