"""The OpenAI-compatible server: FastAPI routes over one Engine whose loop runs in its background thread.

    server = Server(ServerConfig(model="smollm2", tenants="tenants.toml"))
    app = create_app(server)          # uvicorn.run(app): the model loads in the background, /health says when

Each request: authenticate (401), parse (400 naming the field), resolve `model` to the base model or an adapter the
tenant may use (404 `model_not_found` otherwise: another tenant's adapter is indistinguishable from a missing one),
refuse quickly when the engine's queue is full (503) or the tenant is over a limit (429 + Retry-After and OpenAI's
x-ratelimit-* headers), then add it to the engine and answer (SSE chunks as OpenAI sends them when `stream`). A
client that goes away cancels its request at once, which frees its KV blocks at the engine's next step. Prefix-cache
blocks are shared only within a tenant (each tenant's requests carry its salt).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from realm.runtime.engine import Engine, EngineConfig
from realm.runtime.generate import FinishReason

from .metrics import Metrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    UnsupportedField,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    error_body,
    finish_reason,
    new_id,
    usage_chunk,
)
from .tenants import Tenant, Tenants, unknown_adapters

log = logging.getLogger("realm.serve")

DEMO_PAGE = Path(__file__).with_name("demo.html")


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str  # a PEFT directory, a GGUF LoRA file, or a packaged adapter's name, on the server's machine


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status, self.headers)


@dataclass
class ServerConfig:
    model: str = "smollm2"  # a packaged model name or a GGUF path
    model_id: str | None = None  # the id clients name (default: the packaged name, or the file's stem)
    device: str | None = None
    backend: str = "torch"
    dtype: str | None = None
    loras: dict[str, str] = field(default_factory=dict)  # adapter name -> PEFT directory or GGUF LoRA file
    max_loras: int | None = None
    draft_model: str | None = None
    tenants: str | Tenants | None = None  # the tenants TOML (or its Tenants); None: open access (one tenant, no key)
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_waiting: int = 256  # requests waiting for the engine beyond which new ones get 503 at once
    default_max_tokens: int = 256  # for requests that leave max_tokens out
    drain_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish before they are aborted


class Server:
    """The state behind the routes: the tenants, the model and its engine (None until loaded), the metrics."""

    def __init__(self, config: ServerConfig, model=None):
        self.config = config
        tenants = config.tenants
        self.tenants = tenants if isinstance(tenants, Tenants) else Tenants.load(tenants) if tenants else \
            Tenants.open_access()
        self.model = model
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.model_id = config.model_id or _model_id(config.model)
        self.metrics = Metrics(lambda: self.engine)
        self.in_flight: dict[int, object] = {}  # request id -> engine Request, for the drain
        self.accepting = True
        self._loader: threading.Thread | None = None
        if model is not None:
            self._start_engine()

    # ---- lifecycle

    def start_loading(self) -> None:
        if self.engine is not None or self._loader is not None:
            return
        self._loader = threading.Thread(target=self._load, name="realm-serve-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            import torch

            from realm.runtime import load

            c = self.config
            dtype = None if c.dtype is None else getattr(torch, c.dtype)
            kwargs = {"lora": c.loras, **({"max_loras": c.max_loras} if c.max_loras else {})} if c.loras else {}
            self.model = load(c.model, device=c.device, backend=c.backend, dtype=dtype, draft_model=c.draft_model,
                              **kwargs)
            self._start_engine()
        except Exception as e:  # the server stays up to say why (/health), rather than exiting silently
            log.exception("loading %s failed", self.config.model)
            self.load_error = f"{type(e).__name__}: {e}"

    def _start_engine(self) -> None:
        self.engine = Engine(self.model, self.config.engine).start()
        missing = unknown_adapters(self.tenants, self.model.loras.names)
        if missing:
            log.warning("the tenants file grants adapters that are not loaded: %s", ", ".join(missing))
        log.info("realm serve: %s ready (%s)", self.model_id, self.engine)

    def ready(self) -> Engine:
        if self.engine is None:
            raise APIError(503, f"the model is not ready: {self.load_error or 'loading'}", "server_error",
                           code="model_loading" if self.load_error is None else "model_failed",
                           headers={"Retry-After": "5"})
        if not self.accepting:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        return self.engine

    def drain(self, deadline_s: float) -> None:
        """Stop accepting; wait up to deadline_s for in-flight requests, abort the rest, stop the engine."""
        self.accepting = False
        engine = self.engine
        if engine is None:
            return
        end = time.monotonic() + deadline_s
        while self.in_flight and time.monotonic() < end:
            time.sleep(0.05)
        for request in list(self.in_flight.values()):
            with contextlib.suppress(Exception):
                engine.cancel(request)
        engine.stop(timeout=10)

    # ---- requests

    def resolve_model(self, name: str, tenant: Tenant) -> str | None:
        """The adapter `name` means for this tenant (None: the base model); 404 when it may not use it."""
        if name == self.model_id:
            return None
        if self.model is not None and name in self.model.loras and tenant.may_use(name):
            return name
        raise APIError(404, f"The model '{name}' does not exist or you do not have access to it.",
                       param="model", code="model_not_found")

    def models_for(self, tenant: Tenant) -> list[dict]:
        created = int(time.time())
        out = [{"id": self.model_id, "object": "model", "created": created, "owned_by": "realm"}]
        names = self.model.loras.names if self.model is not None else []
        out += [{"id": name, "object": "model", "created": created, "owned_by": "realm", "parent": self.model_id}
                for name in sorted(names) if tenant.may_use(name)]
        return out


def _model_id(model: str) -> str:
    from realm.models import MODELS

    return model if model in MODELS else Path(model).stem


# ---- the app ---------------------------------------------------------------------------------------------------

def tenant_of(request: Request) -> Tenant:
    tenant = request.app.state.server.tenants.authenticate(request.headers.get("authorization"))
    if tenant is None:
        raise APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.",
                       code="invalid_api_key")
    return tenant


def admin(request: Request) -> None:
    if not request.app.state.server.tenants.is_admin(request.headers.get("authorization")):
        raise APIError(401, "the admin endpoints need an admin key", code="invalid_api_key")


TenantDep = Annotated[Tenant, Depends(tenant_of)]


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if server.tenants.open:
            log.warning("realm serve: no tenants file: open access (one tenant, no API key needed, no limits); "
                        "give --tenants FILE for keys and limits")
        server.start_loading()
        yield
        await asyncio.to_thread(server.drain, server.config.drain_s)

    app = FastAPI(title="realm", version="1", lifespan=lifespan,
                  description="realm's OpenAI-compatible server: completions and chat completions over realm's "
                              "continuously batched engine, per-tenant LoRA adapters and limits.")
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        if e.status >= 400:
            server.metrics.rejected.labels(str(e.status)).inc()
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        if err.get("type") == "json_invalid":
            return APIError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}".strip(),
                            code="invalid_json").response()
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        what = f"{param}: " if param else ""
        if err.get("type") == "extra_forbidden":
            return APIError(400, f"unknown field {param!r}", param=param, code="unknown_field").response()
        return APIError(400, f"{what}{err.get('msg', 'invalid request')}", param=param,
                        code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} not "
                   f"allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return APIError(e.status_code, message, code={404: "not_found", 405: "method_not_allowed"}
                        .get(e.status_code)).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error: {type(e).__name__}", "server_error").response()

    @app.get("/health")
    def health():
        if server.engine is None:
            status = "failed" if server.load_error else "loading"
            return JSONResponse({"status": status, "error": server.load_error}, 503)
        if not server.accepting:
            return JSONResponse({"status": "draining"}, 503)
        return {"status": "ok", "model": server.model_id}

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models(tenant: TenantDep):
        return {"object": "list", "data": server.models_for(tenant)}

    @app.get("/v1/models/{model_id}")
    def model(model_id: str, tenant: TenantDep):
        server.resolve_model(model_id, tenant)
        return next(m for m in server.models_for(tenant) if m["id"] == model_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, tenant: TenantDep):
        return await _serve(server, request, tenant, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, tenant: TenantDep):
        return await _serve(server, request, tenant, body, chat=True)

    @app.get("/admin/usage", dependencies=[Depends(admin)])
    def usage():
        return {"tenants": [t.summary() for t in server.tenants.tenants.values()]}

    @app.post("/admin/adapters", dependencies=[Depends(admin)])
    async def load_adapter(body: AdapterLoad):
        server.ready()
        from realm.lora.packaged import resolve_adapter

        try:
            await asyncio.to_thread(server.model.add_lora, body.name, resolve_adapter(body.path))
        except (ValueError, OSError) as e:
            raise APIError(400, f"adapter {body.name!r} could not be loaded: {e}", param="path",
                           code="adapter_not_loaded") from None
        return {"id": body.name, "object": "model", "owned_by": "realm", "parent": server.model_id}

    @app.delete("/admin/adapters/{name}", dependencies=[Depends(admin)])
    def unload_adapter(name: str):
        server.ready()
        if name not in server.model.loras:
            raise APIError(404, f"no adapter {name!r} is loaded", param="name", code="model_not_found")
        try:
            server.model.remove_lora(name)
        except ValueError as e:  # in use by requests in flight
            raise APIError(409, str(e), param="name", code="adapter_in_use") from None
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def demo():
        return HTMLResponse(DEMO_PAGE.read_text(encoding="utf-8")) if DEMO_PAGE.exists() else \
            HTMLResponse("<p>realm serve: the demo page is not installed</p>")

    return app


# ---- one request -----------------------------------------------------------------------------------------------

async def _serve(server: Server, http: Request, tenant: Tenant, body, chat: bool):
    engine = server.ready()
    adapter = server.resolve_model(body.model, tenant)
    try:
        body.check_inert()
        params = body.sampling(server.config.default_max_tokens)
    except UnsupportedField as e:
        raise APIError(400, str(e), param=e.param, code="unsupported_field") from None
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    model = server.model
    try:
        ids = model.chat_prompt([m.as_template() for m in body.messages]) if chat else \
            model.encode(body.prompt_input())
    except UnsupportedField as e:
        raise APIError(400, str(e), param=e.param, code="unsupported_field") from None
    except ValueError as e:
        raise APIError(400, str(e), param="messages" if chat else "prompt", code="invalid_prompt") from None
    waiting = engine.num_waiting
    if waiting >= server.config.max_waiting:
        raise APIError(503, f"the server is overloaded ({waiting} requests waiting); retry later", "server_error",
                       code="overloaded", headers={"Retry-After": "1"})
    reserved = len(ids) + params.max_tokens
    refusal = tenant.admit(reserved)
    if refusal is not None:
        retry = "3600" if math.isinf(refusal.retry_after_s) else str(max(1, math.ceil(refusal.retry_after_s)))
        raise APIError(429, refusal.message, "requests" if refusal.limit != "tokens_per_minute" else "tokens",
                       code="rate_limit_exceeded", headers={"Retry-After": retry, **tenant.rate_headers()})
    try:
        request = engine.add_request(ids, params, adapter=adapter, salt=f"tenant:{tenant.name}")
    except ValueError as e:
        tenant.release(reserved, 0, 0)
        raise APIError(400, str(e), param="messages" if chat else "prompt", code="invalid_prompt") from None
    arrival = time.perf_counter()
    server.in_flight[request.request_id] = request
    ticket = _Ticket(server, tenant, request, reserved, adapter, arrival)
    rid = new_id("chatcmpl" if chat else "cmpl")
    headers = tenant.rate_headers()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(engine, ticket, rid, body.model, chat, include_usage),
                                 media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
    try:
        await _until_done(engine, request, http)
    finally:
        ticket.done()
    completion = request.completion
    if completion.finish_reason is FinishReason.ERROR:
        raise APIError(500, f"generation failed: {completion.error}", "server_error")
    if completion.finish_reason is FinishReason.ABORT:
        raise APIError(503, "the request was aborted (the server is shutting down)", "server_error",
                       code="aborted")
    out = (chat_body if chat else completion_body)(rid, body.model, completion)
    return JSONResponse(out, headers=headers)


class _Ticket:
    """A request's bookkeeping, released once however it ends: the tenant's slot and tokens, metrics, the drain."""

    def __init__(self, server: Server, tenant: Tenant, request, reserved: int, adapter: str | None, arrival: float):
        self.server, self.tenant, self.request = server, tenant, request
        self.reserved, self.adapter, self.arrival = reserved, adapter, arrival
        self._done = False

    def done(self) -> None:
        if self._done:
            return
        self._done = True
        request, server = self.request, self.server
        if not request.finished:  # the client left (or the task was cancelled): stop it now, free its blocks
            with contextlib.suppress(Exception):
                server.engine.cancel(request)
        server.in_flight.pop(request.request_id, None)
        completion = request.completion
        generated = len(completion.token_ids) if completion is not None else len(request.seq.output_ids)
        self.tenant.release(self.reserved, len(request.prompt_ids), generated)
        if completion is not None:
            reason = completion.finish_reason.value
            server.metrics.finished(completion, reason, self.adapter, time.perf_counter() - self.arrival)
        else:
            server.metrics.request_success.labels("abort").inc()


async def _until_done(engine: Engine, request, http: Request) -> None:
    """Wait for the request's end, cancelling it as soon as the client disconnects."""
    async def consume():
        async for _ in engine.astream(request):
            pass

    task = asyncio.create_task(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                task.result()
                return
            if await http.is_disconnected():
                engine.cancel(request)
                await task
                return
    finally:
        task.cancel()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(engine: Engine, ticket: _Ticket, rid: str, model: str, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    request = ticket.request
    created = int(time.time())
    try:
        if chat:
            yield _sse(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None, include_usage))
        async for event in engine.astream(request):
            if not event.text:
                continue
            yield _sse(chat_chunk(rid, model, created, {"content": event.text}, None, include_usage) if chat
                       else completion_chunk(rid, model, created, event.text, None, include_usage))
        completion = request.completion
        if completion.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
            message = completion.error or "the request was aborted (the server is shutting down)"
            yield _sse(error_body(f"generation failed: {message}", "server_error"))
        else:
            reason = finish_reason(completion.finish_reason)
            yield _sse(chat_chunk(rid, model, created, {}, reason, include_usage) if chat
                       else completion_chunk(rid, model, created, "", reason, include_usage))
            if include_usage:
                yield _sse(usage_chunk(rid, model, created, "chat.completion.chunk" if chat else "text_completion",
                                       completion))
        yield "data: [DONE]\n\n"
    finally:
        ticket.done()
