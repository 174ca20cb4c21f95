"""Schemathesis against the running server's own OpenAPI schema: generated requests (valid and invalid, for every
operation) must never get a 5xx, and every answer must come back within its timeout (no hang)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (the dev extra has it)")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from test_serve import TENANTS, LiveServer, Tenants, make_tiny_model  # noqa: E402

from realm.runtime.engine import EngineConfig  # noqa: E402
from realm.serve import Server, ServerConfig, create_app  # noqa: E402

ADMIN_KEY = TENANTS["admin"]["keys"][0]
ACME_KEY = TENANTS["tenants"]["acme"]["keys"][0]
RESPONSE_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    tiny_model = make_tiny_model(tmp_path_factory.mktemp("fuzz") / "tiny.gguf")
    tenants = Tenants.from_dict({**TENANTS, "tenants": {name: {**t, "requests_per_minute": 0}
                                                        for name, t in TENANTS["tenants"].items()}})
    server = Server(ServerConfig(model="tiny.gguf", tenants=tenants, default_max_tokens=8,
                                 engine=EngineConfig(kv_blocks=256, block_size=4)), model=tiny_model)
    with LiveServer(create_app(server)) as live:
        yield schemathesis.openapi.from_url(f"{live.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_no_hangs(case):
    # the admin endpoints unload adapters: keep them out of the fuzz (their own tests cover them)
    if case.path.startswith("/admin/adapters"):
        return
    key = ADMIN_KEY if case.path.startswith("/admin") else ACME_KEY
    response = case.call(headers={"Authorization": f"Bearer {key}"}, timeout=RESPONSE_TIMEOUT_S)
    case.validate_response(response, checks=[not_a_server_error])
