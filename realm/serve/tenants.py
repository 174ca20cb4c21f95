"""Tenants: who may call the server, with which adapters, how much.

    tenants = Tenants.load("tenants.toml")     # or Tenants.open() : one tenant, no key, no limits (local demos)
    tenant = tenants.authenticate("Bearer sk-...")      # None: 401
    verdict = tenant.admit(tokens=prompt + max_tokens)  # a Refusal (429 + Retry-After), or None and a slot taken

The file (TOML):

    [admin]
    keys = ["sk-admin-..."]               # the admin endpoints' keys (optional)

    [tenants.acme]
    keys = ["sk-acme-1", "sk-acme-2"]
    adapters = ["pirate"]                 # adapters it may name as `model` ("*": every adapter)
    requests_per_minute = 60              # token buckets, refilled continuously; 0 or absent: no limit
    tokens_per_minute = 20000             # prompt tokens + max_tokens, counted when a request is admitted
    max_concurrent = 4                    # requests in flight at once

Keys are compared in constant time (`hmac.compare_digest`, against every key of every tenant, so the time does not
depend on which tenant matched) and never logged or shown: a tenant's repr names it only.
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

OPEN_TENANT = "default"
ALL_ADAPTERS = "*"
_TENANT_FIELDS = {"keys", "adapters", "requests_per_minute", "tokens_per_minute", "max_concurrent"}


class TenantsError(ValueError):
    """A tenants file that cannot be used, with the file and the entry at fault."""


class TokenBucket:
    """`capacity` tokens, refilled at capacity per minute; `take(n)` takes n or says how long until it could."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self._clock = clock
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._at) * self.rate)
        self._at = now

    def wait_for(self, n: float) -> float:
        """Seconds until n tokens are there (0: now); inf when n exceeds the capacity (never)."""
        self._refill()
        if n > self.capacity:
            return math.inf
        return max(0.0, (n - self.level) / self.rate)

    def take(self, n: float) -> None:
        self._refill()
        self.level -= n

    def give_back(self, n: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + n)

    def remaining(self) -> float:
        self._refill()
        return max(0.0, self.level)

    def reset_s(self) -> float:
        """Seconds until the bucket is full again (OpenAI's x-ratelimit-reset-*)."""
        self._refill()
        return (self.capacity - self.level) / self.rate if self.rate else 0.0


@dataclass
class Refusal:
    """Why a tenant's request is refused now (429): which limit, and when to retry."""

    limit: str  # "requests_per_minute", "tokens_per_minute", "max_concurrent"
    message: str
    retry_after_s: float


@dataclass
class Usage:
    requests: int = 0  # admitted
    refused: int = 0  # 429s
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class Tenant:
    name: str
    keys: tuple[str, ...] = field(default=(), repr=False)
    adapters: frozenset[str] = frozenset()
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent: int = 0
    usage: Usage = field(default_factory=Usage)
    in_flight: int = 0

    def __post_init__(self):
        self._lock = threading.Lock()
        self._requests = TokenBucket(self.requests_per_minute) if self.requests_per_minute else None
        self._tokens = TokenBucket(self.tokens_per_minute) if self.tokens_per_minute else None

    def may_use(self, adapter: str) -> bool:
        return ALL_ADAPTERS in self.adapters or adapter in self.adapters

    def admit(self, tokens: int) -> Refusal | None:
        """Take one request and `tokens` tokens from the buckets and a concurrency slot, or none of them and say
        which limit refused (the longest wait of the limits that are short)."""
        with self._lock:
            waits = []
            if self.max_concurrent and self.in_flight >= self.max_concurrent:
                waits.append(("max_concurrent", f"{self.max_concurrent} concurrent requests", 1.0))
            if self._requests is not None:
                waits.append(("requests_per_minute", f"{self.requests_per_minute} requests per minute",
                              self._requests.wait_for(1)))
            if self._tokens is not None:
                waits.append(("tokens_per_minute", f"{self.tokens_per_minute} tokens per minute",
                              self._tokens.wait_for(tokens)))
            short = [w for w in waits if w[2] > 0]
            if short:
                limit, text, wait = max(short, key=lambda w: w[2])
                self.usage.refused += 1
                if math.isinf(wait):
                    return Refusal(limit, f"this request needs {tokens} tokens (prompt and max_tokens), more than "
                                          f"the tenant's limit of {text}", math.inf)
                return Refusal(limit, f"rate limit reached: {text} for tenant {self.name!r}; retry in "
                                      f"{math.ceil(wait)} s", wait)
            if self._requests is not None:
                self._requests.take(1)
            if self._tokens is not None:
                self._tokens.take(tokens)
            self.in_flight += 1
            self.usage.requests += 1
            return None

    def release(self, reserved_tokens: int, prompt_tokens: int, completion_tokens: int) -> None:
        """A request admitted with `reserved_tokens` ended: its slot back, and the tokens it did not use."""
        with self._lock:
            self.in_flight -= 1
            self.usage.prompt_tokens += prompt_tokens
            self.usage.completion_tokens += completion_tokens
            if self._tokens is not None:
                self._tokens.give_back(max(0, reserved_tokens - prompt_tokens - completion_tokens))

    def rate_headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the limits this tenant has."""
        headers = {}
        with self._lock:
            for kind, bucket, limit in (("requests", self._requests, self.requests_per_minute),
                                        ("tokens", self._tokens, self.tokens_per_minute)):
                if bucket is None:
                    continue
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(math.floor(bucket.remaining()))
                headers[f"x-ratelimit-reset-{kind}"] = f"{bucket.reset_s():.3f}s"
        return headers

    def summary(self) -> dict:
        return {"tenant": self.name, "adapters": sorted(self.adapters), "in_flight": self.in_flight,
                "limits": {"requests_per_minute": self.requests_per_minute or None,
                           "tokens_per_minute": self.tokens_per_minute or None,
                           "max_concurrent": self.max_concurrent or None},
                "usage": vars(self.usage).copy()}


@dataclass
class Tenants:
    tenants: dict[str, Tenant]
    admin_keys: tuple[str, ...] = field(default=(), repr=False)
    open: bool = False  # no tenants file: one tenant, no key needed
    source: str | None = None

    @classmethod
    def open_access(cls) -> Tenants:
        return cls({OPEN_TENANT: Tenant(OPEN_TENANT, adapters=frozenset({ALL_ADAPTERS}))}, open=True)

    @classmethod
    def load(cls, path: str | Path) -> Tenants:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TenantsError(f"tenants file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise TenantsError(f"tenants file {path} is not valid TOML: {e}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "tenants") -> Tenants:
        unknown = sorted(set(data) - {"tenants", "admin"})
        if unknown:
            raise TenantsError(f"{source}: unknown table {unknown[0]!r} (expected [tenants.NAME] and [admin])")
        entries = data.get("tenants")
        if not isinstance(entries, Mapping) or not entries:
            raise TenantsError(f"{source}: no tenants: add a [tenants.NAME] table with keys = [...]")
        tenants = {name: _tenant(name, entry, source) for name, entry in entries.items()}
        admin = data.get("admin", {})
        if not isinstance(admin, Mapping) or set(admin) - {"keys"}:
            raise TenantsError(f"{source}: [admin] takes only keys = [...]")
        admin_keys = _keys(admin.get("keys", []), f"{source}: [admin] keys")
        seen: dict[str, str] = {}
        for who, keys in [*((t.name, t.keys) for t in tenants.values()), ("[admin]", admin_keys)]:
            for key in keys:
                if key in seen and seen[key] != who:
                    raise TenantsError(f"{source}: tenants {seen[key]!r} and {who!r} share a key")
                seen[key] = who
        return cls(tenants, admin_keys, source=source)

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant whose key the `Authorization: Bearer KEY` header carries; None for a wrong or missing key.
        Open access: the one tenant, whatever the header says."""
        if self.open:
            return self.tenants[OPEN_TENANT]
        key = _bearer(authorization)
        found = None
        for tenant in self.tenants.values():  # every key compared: the time does not say which tenant matched
            for candidate in tenant.keys:
                if hmac.compare_digest(candidate.encode(), key.encode()):
                    found = tenant
        return found

    def is_admin(self, authorization: str | None) -> bool:
        if self.open and not self.admin_keys:
            return True  # a local demo: no keys anywhere
        key = _bearer(authorization)
        return any([hmac.compare_digest(k.encode(), key.encode()) for k in self.admin_keys])

    def adapters_named(self) -> set[str]:
        return {a for t in self.tenants.values() for a in t.adapters if a != ALL_ADAPTERS}


def _bearer(authorization: str | None) -> str:
    scheme, _, key = (authorization or "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def _keys(value, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(k, str) and k.strip() for k in value):
        raise TenantsError(f"{where} must be a list of non-empty strings")
    if any(len(k) < 8 for k in value):
        raise TenantsError(f"{where}: a key shorter than 8 characters is too easy to guess")
    return tuple(value)


def _limit(entry: Mapping, name: str, where: str) -> int:
    value = entry.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TenantsError(f"{where}: {name} must be an integer >= 0 (0: no limit), got {value!r}")
    return value


def _tenant(name: str, entry, source: str) -> Tenant:
    where = f"{source}: [tenants.{name}]"
    if not isinstance(entry, Mapping):
        raise TenantsError(f"{where} must be a table")
    unknown = sorted(set(entry) - _TENANT_FIELDS)
    if unknown:
        raise TenantsError(f"{where}: unknown field {unknown[0]!r}; known: {', '.join(sorted(_TENANT_FIELDS))}")
    if "keys" not in entry:
        raise TenantsError(f"{where} has no keys")
    adapters = entry.get("adapters", [])
    if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
        raise TenantsError(f"{where}: adapters must be a list of adapter names")
    return Tenant(name, _keys(entry["keys"], f"{where} keys"), frozenset(adapters),
                  _limit(entry, "requests_per_minute", where), _limit(entry, "tokens_per_minute", where),
                  _limit(entry, "max_concurrent", where))


def unknown_adapters(tenants: Tenants, loaded: Iterable[str]) -> list[str]:
    """Adapters the tenants file grants that the server has not loaded (said on start, not an error: the admin
    endpoint may load them later)."""
    return sorted(tenants.adapters_named() - set(loaded))
