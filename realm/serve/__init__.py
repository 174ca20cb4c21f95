"""realm serve: an OpenAI-compatible, multi-tenant HTTP server over the engine (FastAPI + uvicorn).

    realm serve --model smollm2 --lora pirate=PATH --tenants tenants.toml --port 8000

    from realm.serve import Server, ServerConfig, create_app
    app = create_app(Server(ServerConfig(model="smollm2")))      # any ASGI server runs it

See realm/serve/app.py (routes and request handling), protocol.py (OpenAI's shapes), tenants.py (keys, adapters,
limits) and metrics.py (Prometheus).
"""

from .app import APIError, Server, ServerConfig, create_app
from .tenants import Tenant, Tenants, TenantsError

__all__ = ["APIError", "Server", "ServerConfig", "Tenant", "Tenants", "TenantsError", "create_app"]
