"""The gateway config: parsed once from YAML into frozen, typed objects.

Everything is validated at load time. A bad file raises :class:`ConfigError` naming the
field path (``backends[1].endpoints[0]``) and the problem, so ``tollgate up`` exits before
anything starts. The hot path reads these objects without further checks.

Durations are written as numbers of seconds (``2.5``) or strings with a unit
(``"500ms"``, ``"2s"``, ``"5m"``). Sizes are bytes or strings such as ``"1MiB"``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .money import FREE_PRICE, Price, parse_credits

BACKEND_KINDS = ("vllm", "tgi", "tei", "openai")
STREAM_METERS = ("auto", "native", "lua")
MODEL_KINDS = ("chat", "embedding", "rerank", "classify", "transcription", "speech", "image")
# Media model kinds, the backend kinds that serve them (OpenAI's wire format) and the prices
# that apply to them (see extproc/media.py for how each is metered).
MEDIA_BACKENDS: dict[str, tuple[str, ...]] = {
    "transcription": ("openai", "vllm"),
    "speech": ("openai",),
    "image": ("openai",),
}
MEDIA_PRICES: dict[str, tuple[str, ...]] = {
    "transcription": ("per_request", "per_audio_second"),
    "speech": ("per_request", "per_1m_characters"),
    "image": ("per_request", "per_image"),
}
TGI_MODES = ("native", "messages")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
}


class ConfigError(ValueError):
    """The config file is invalid; ``str()`` names the field and the problem."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str = "/health"
    interval_s: float = 2.0
    timeout_s: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1


@dataclass(frozen=True, slots=True)
class Simulator:
    """Knobs for a simulated backend that ``tollgate up`` starts itself (see backends/)."""

    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    output_tokens: int = 16
    max_running: int = 256
    max_queue: int = 256


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    kind: str
    endpoints: tuple[Endpoint, ...]
    connect_timeout_s: float = 1.0
    request_timeout_s: float = 300.0
    max_concurrent_requests: int = 1024
    health_check: HealthCheck = field(default_factory=HealthCheck)
    simulate: Simulator | None = None
    mode: str = "native"  # tgi only: "native" (/generate*) or "messages" (/v1/chat/completions)

    @property
    def cluster(self) -> str:
        """Envoy cluster name for this backend."""
        return f"backend_{self.name}"


@dataclass(frozen=True, slots=True)
class Model:
    id: str
    backend: str
    backend_model: str
    kind: str = "chat"
    context_length: int = 32768
    max_tokens: int = 4096
    owned_by: str = "tollgate"
    pricing: Price = FREE_PRICE  # micro-credits; FREE_PRICE with free=True
    free: bool = False
    chat_template: str | None = None  # Jinja; tgi native backends render chats with it
    max_audio_seconds: int = 3600  # transcription: the most audio one request is charged for

    @property
    def price(self) -> Price:
        """What a request is charged by (all zero for a free model)."""
        return FREE_PRICE if self.free else self.pricing

    @property
    def aliased(self) -> bool:
        """True when the backend answers with a different model id than the public one."""
        return self.backend_model != self.id


@dataclass(frozen=True, slots=True)
class Listener:
    host: str = "127.0.0.1"
    port: int = 8080
    max_request_body_bytes: int = 1024 * 1024
    max_upload_bytes: int = 25 * 1024 * 1024  # multipart uploads (audio transcriptions)
    # Proxies in front of Envoy whose X-Forwarded-For entries are trusted (Envoy's
    # xff_num_trusted_hops). 0: the client address is the TCP peer's, and X-Forwarded-For
    # cannot change it.
    trusted_proxy_hops: int = 0


@dataclass(frozen=True, slots=True)
class Processor:
    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 1
    message_timeout_s: float = 2.0
    max_inflight: int = 2048
    key_cache_ttl_s: float = 5.0
    metrics_port: int = 9464  # worker i serves Prometheus text on metrics_port + i
    metrics: bool = True  # false: no metrics kept or served (the loadtest's "off" figure)

    @property
    def bind_host(self) -> str:
        """Where workers listen: ``host`` if it is an IP address, else all interfaces (a DNS name
        such as a compose service name is how Envoy reaches them, not an address to bind)."""
        import ipaddress

        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return "0.0.0.0"
        return self.host


@dataclass(frozen=True, slots=True)
class Envoy:
    admin_port: int = 9901
    concurrency: int = 1
    log_level: str = "warning"
    access_log: bool = False


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-key limits; 0 means unlimited. Written in the config as requests_per_minute,
    tokens_per_minute, concurrent_requests."""

    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0


@dataclass(frozen=True, slots=True)
class Metering:
    enabled: bool = True
    reservation_timeout_s: float = 600.0
    sweep_interval_s: float = 5.0
    # Ledger entries older than this are folded into one checkpoint entry (their sum), so the
    # store does not grow without bound (~0.4 KB a request); None keeps every entry.
    ledger_retention_s: float | None = 30 * 86400.0
    default_limits: Limits = field(default_factory=Limits)
    starting_credits: int = 0  # µcr `tollgate up` grants the 'default' account, once
    # a stream's credit figures also as HTTP/2 trailers (envoy_config._trailers_filter)
    stream_trailers: bool = True
    # which filter meters streams under `tollgate up` (native_meter.py): "auto" (the native
    # meter if it builds, else Lua), "native" (failing to build it is an error), "lua"
    stream_meter: str = "auto"


@dataclass(frozen=True, slots=True)
class Tracing:
    """OpenTelemetry: Envoy's tracer and the processor export spans over OTLP/gRPC."""

    otlp_endpoint: Endpoint | None = None  # None: tracing off (the default)
    sample_ratio: float = 1.0  # of requests Envoy starts a sampled trace for
    service_name: str = "tollgate"


SCOPES = ("models:use", "keys:manage", "credits:manage", "usage:read")
DEFAULT_SCOPES = ("models:use", "usage:read")  # a key created without scopes; legacy keys
JWT_ALGORITHMS = ("HS256", "RS256", "ES256")  # what may be pinned; "none" never is
ADMIN_KEY_ENV = "TOLLGATE_ADMIN_KEY"  # the bootstrap admin key (raw) for every worker


@dataclass(frozen=True, slots=True)
class Jwt:
    """Bearer (or cookie) JWTs from the operator's identity provider, verified with pyjwt."""

    issuer: str
    audience: str
    algorithms: tuple[str, ...]  # pinned: a token with any other "alg" is refused
    hs256_secret: str | None = None  # or from the environment variable named by secret_env
    secret_env: str | None = None
    jwks_file: str | None = None  # RS256/ES256 public keys; re-read when the file changes
    cookie: str | None = None  # also accept the token from this cookie
    account_claim: str = "sub"
    scopes_claim: str = "scope"  # a space-separated string or a list
    models_claim: str | None = None  # optional: the model pool (a list); absent = all
    default_scopes: tuple[str, ...] = DEFAULT_SCOPES  # when the token has no scopes claim
    leeway_s: float = 0.0

    def secret(self) -> str | None:
        if self.secret_env:
            return os.environ.get(self.secret_env) or None
        return self.hs256_secret


@dataclass(frozen=True, slots=True)
class Auth:
    """Who may call: API keys (always), an operator's bootstrap admin key, JWTs."""

    admin_account: str = "admin"  # keys of this account act on every account (operators)
    admin_key_sha256: str | None = None  # the bootstrap admin key's SHA-256; or $TOLLGATE_ADMIN_KEY
    failed_lookups_per_minute: int = 30  # unknown keys per client address; 0 = no limit
    jwt: Jwt | None = None

    def admin_key_hash(self) -> str | None:
        """The bootstrap admin key's SHA-256 (hex): from $TOLLGATE_ADMIN_KEY, else the file."""
        import hashlib

        raw = os.environ.get(ADMIN_KEY_ENV)
        if raw:
            return hashlib.sha256(raw.encode()).hexdigest()
        return self.admin_key_sha256


OTLP_ENV = "TOLLGATE_OTLP_ENDPOINT"  # `tollgate up --otlp HOST:PORT` sets it for its children


@dataclass(frozen=True, slots=True)
class Store:
    url: str | None = None
    data_dir: str = ".tollgate/data"
    port: int = 6390
    # the embedded Valkey's malloc: "auto" preloads mimalloc (the cmeel-mimalloc wheel) where
    # it is installed, on Linux; "system" keeps libc's (README, "Speed")
    allocator: str = "auto"
    # the embedded Valkey's appendfsync: "everysec" (a crash of the machine can lose the last
    # second of writes) or "always" (every write answered is on disk first; README, "Credits
    # and limits")
    fsync: str = "everysec"


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listener: Listener
    processor: Processor
    envoy: Envoy
    store: Store
    backends: tuple[Backend, ...]
    models: tuple[Model, ...]
    metering: Metering = field(default_factory=Metering)
    tracing: Tracing = field(default_factory=Tracing)
    auth: Auth = field(default_factory=Auth)
    source: str = "<memory>"
    backends_by_name: dict[str, Backend] = field(default_factory=dict, compare=False)
    models_by_id: dict[str, Model] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.backends_by_name.update({b.name: b for b in self.backends})
        self.models_by_id.update({m.id: m for m in self.models})

    @property
    def store_url(self) -> str:
        """REDIS_URL wins over the file; else the embedded Valkey's URL."""
        env = os.environ.get("REDIS_URL")
        if env:
            return env
        if self.store.url:
            return self.store.url
        return f"redis://127.0.0.1:{self.store.port}/0"

    @property
    def otlp_endpoint(self) -> Endpoint | None:
        """Where spans go: $TOLLGATE_OTLP_ENDPOINT wins over ``tracing.otlp_endpoint``."""
        env = os.environ.get(OTLP_ENV)
        if env:
            return _endpoint(env, OTLP_ENV)
        return self.tracing.otlp_endpoint

    @property
    def embedded_store(self) -> bool:
        return not (os.environ.get("REDIS_URL") or self.store.url)


# --------------------------------------------------------------------------- parsing


class _Reader:
    """Reads one mapping, tracks the field path, and rejects unknown keys."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(path, f"expected a mapping, got {_kind(data)}")
        self.data = data
        self.path = path
        self.used: set[str] = set()

    def _p(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.data.get(key, default)

    def has(self, key: str) -> bool:
        return key in self.data

    def str(self, key: str, default: str | None = None, *, pattern: re.Pattern[str] | None = None):
        value = self.get(key, default)
        if value is None:
            if default is None:
                raise ConfigError(self._p(key), "is required")
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(self._p(key), f"expected a non-empty string, got {_kind(value)}")
        if pattern is not None and not pattern.match(value):
            raise ConfigError(self._p(key), f"{value!r} has characters that are not allowed")
        return value

    def int(self, key: str, default: int, *, low: int = 0, high: int | None = None) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self._p(key), f"expected an integer, got {_kind(value)}")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ConfigError(self._p(key), f"must be {bound}, got {value}")
        return value

    def port(self, key: str, default: int) -> int:
        return self.int(key, default, low=1, high=65535)

    def duration(self, key: str, default: float) -> float:
        value = self.get(key, default)
        seconds = parse_duration(value)
        if seconds is None or seconds <= 0:
            raise ConfigError(
                self._p(key),
                f"expected a positive duration such as 2.5, '500ms' or '2s', got {value!r}",
            )
        return seconds

    def size(self, key: str, default: int) -> int:
        value = self.get(key, default)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        if isinstance(value, str) and (m := _SIZE_RE.match(value)):
            n = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
            if n > 0:
                return n
        raise ConfigError(self._p(key), f"expected a size such as 1048576 or '1MiB', got {value!r}")

    def child(self, key: str) -> _Reader:
        return _Reader(self.get(key), self._p(key))

    def list(self, key: str) -> list[Any]:
        value = self.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(self._p(key), f"expected a list, got {_kind(value)}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(self._p(str(unknown[0])), "unknown field")


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _retention(mr: _Reader) -> float | None:
    """metering.ledger_retention: a duration ("30d"), or 0 / "forever" to keep every entry."""
    if mr.get("ledger_retention", "30d") in (0, "0", "forever"):
        return None
    return mr.duration("ledger_retention", 30 * 86400.0)


def parse_duration(value: Any) -> float | None:
    """Seconds from ``2``, ``2.5``, ``"500ms"``, ``"2s"``, ``"5m"``, ``"30d"``; None if not a
    duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and (m := _DURATION_RE.match(value)):
        n = float(m.group(1))
        units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
        return n * units[m.group(2)]
    return None


def _endpoint(value: Any, path: str) -> Endpoint:
    if not isinstance(value, str) or value.count(":") != 1:
        raise ConfigError(path, f"expected 'host:port', got {value!r}")
    host, _, port = value.partition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(path, f"expected 'host:port' with a port 1-65535, got {value!r}")
    return Endpoint(host, int(port))


def _backend(data: Any, path: str) -> Backend:
    r = _Reader(data, path)
    name = r.str("name", pattern=_NAME_RE)
    kind = r.str("kind")
    if kind not in BACKEND_KINDS:
        raise ConfigError(
            f"{path}.kind", f"must be one of {', '.join(BACKEND_KINDS)}, got {kind!r}"
        )
    raw_endpoints = r.list("endpoints")
    if not raw_endpoints:
        raise ConfigError(f"{path}.endpoints", "needs at least one 'host:port'")
    endpoints = tuple(_endpoint(e, f"{path}.endpoints[{i}]") for i, e in enumerate(raw_endpoints))
    hc = r.child("health_check")
    health = HealthCheck(
        path=hc.str("path", "/health"),
        interval_s=hc.duration("interval", 2.0),
        timeout_s=hc.duration("timeout", 1.0),
        unhealthy_threshold=hc.int("unhealthy_threshold", 2, low=1),
        healthy_threshold=hc.int("healthy_threshold", 1, low=1),
    )
    hc.done()
    if not health.path.startswith("/"):
        raise ConfigError(f"{path}.health_check.path", "must start with '/'")
    simulate = None
    if r.has("simulate"):
        s = r.child("simulate")
        simulate = Simulator(
            ttft_ms=float(s.int("ttft_ms", 0)),
            itl_ms=float(s.int("itl_ms", 0)),
            output_tokens=s.int("output_tokens", 16, low=1),
            max_running=s.int("max_running", 256, low=1),
            max_queue=s.int("max_queue", 256),
        )
        s.done()
        if len(endpoints) != 1 or endpoints[0].host not in ("127.0.0.1", "localhost"):
            raise ConfigError(
                f"{path}.simulate", "a simulated backend needs exactly one 127.0.0.1 endpoint"
            )
    backend = Backend(
        name=name,
        kind=kind,
        endpoints=endpoints,
        connect_timeout_s=r.duration("connect_timeout", 1.0),
        request_timeout_s=r.duration("request_timeout", 300.0),
        max_concurrent_requests=r.int("max_concurrent_requests", 1024, low=1),
        health_check=health,
        simulate=simulate,
        mode=r.str("mode", "native"),
    )
    r.done()
    if backend.mode not in TGI_MODES:
        raise ConfigError(f"{path}.mode", f"must be one of {', '.join(TGI_MODES)}")
    if backend.mode != "native" and kind != "tgi":
        raise ConfigError(f"{path}.mode", "only tgi backends have a mode")
    return backend


def _credits(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(
            path, f"expected an amount of credits such as 0.5 or '1.25', got {value!r}"
        )
    try:
        micro = parse_credits(value)
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None
    if micro < 0:
        raise ConfigError(path, "prices cannot be negative")
    return micro


def _pricing(data: Any, path: str) -> Price:
    r = _Reader(data, path)
    fields = (
        "input_per_1m",
        "output_per_1m",
        "per_request",
        "per_image",
        "per_audio_second",
        "per_1m_characters",
    )
    values = {f: _credits(r.get(f), f"{path}.{f}") for f in fields if r.has(f)}
    for f in fields:
        r.get(f)
    r.done()
    if not values:
        raise ConfigError(path, f"set at least one of {', '.join(fields)}")
    return Price(**values)


def _limits(data: Any, path: str) -> Limits:
    r = _Reader(data, path)
    limits = Limits(
        rpm=r.int("requests_per_minute", 0),
        tpm=r.int("tokens_per_minute", 0),
        concurrency=r.int("concurrent_requests", 0),
    )
    r.done()
    return limits


def _model(data: Any, path: str, backends: dict[str, Backend]) -> Model:
    r = _Reader(data, path)
    model_id = r.str("id", pattern=_MODEL_ID_RE)
    backend = r.str("backend")
    if backend not in backends:
        known = ", ".join(sorted(backends)) or "none defined"
        raise ConfigError(f"{path}.backend", f"no backend named {backend!r} (backends: {known})")
    kind = r.str("kind", "chat")
    if kind not in MODEL_KINDS:
        raise ConfigError(f"{path}.kind", f"must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    model = Model(
        id=model_id,
        backend=backend,
        backend_model=r.str("backend_model", model_id),
        kind=kind,
        context_length=r.int("context_length", 32768, low=1),
        max_tokens=r.int("max_tokens", 4096, low=1),
        owned_by=r.str("owned_by", "tollgate"),
        pricing=_pricing(r.get("pricing"), f"{path}.pricing") if r.has("pricing") else FREE_PRICE,
        free=r.get("free", False),
        chat_template=r.get("chat_template"),
        max_audio_seconds=r.int("max_audio_seconds", 3600, low=1, high=7 * 24 * 3600),
    )
    r.done()
    if kind in MEDIA_BACKENDS:
        _media_model(model, backends[backend], path)
    if model.chat_template is not None and not (
        isinstance(model.chat_template, str) and model.chat_template.strip()
    ):
        raise ConfigError(f"{path}.chat_template", "expected a Jinja template string")
    if not isinstance(model.free, bool):
        raise ConfigError(f"{path}.free", "expected true or false")
    if model.free and r.has("pricing"):
        raise ConfigError(f"{path}.free", "a model is either free or priced, not both")
    if not model.free and not r.has("pricing"):
        raise ConfigError(
            f"{path}.pricing", "set a price, or 'free: true' to serve this model without charge"
        )
    if model.max_tokens > model.context_length:
        raise ConfigError(f"{path}.max_tokens", "cannot exceed context_length")
    return model


def _media_model(model: Model, backend: Backend, path: str) -> None:
    """A media model: served by a backend speaking OpenAI's media API, priced in its own units,
    and with a worst-case reservation that integer arithmetic in the store stays exact for."""
    kind = model.kind
    if backend.kind not in MEDIA_BACKENDS[kind]:
        allowed = " or ".join(MEDIA_BACKENDS[kind])
        raise ConfigError(
            f"{path}.backend",
            f"a {kind} model needs a backend of kind {allowed}, not {backend.kind}",
        )
    price = model.pricing
    allowed_prices = MEDIA_PRICES[kind]
    for name in Price.__slots__:
        if getattr(price, name) and name not in allowed_prices:
            raise ConfigError(
                f"{path}.pricing.{name}",
                f"does not apply to a {kind} model (use {' and/or '.join(allowed_prices)})",
            )
    # The reservation is units x price per unit x 1e6 in the store's Lua (exact below 2^53).
    worst = {
        "transcription": model.max_audio_seconds * price.per_audio_second * 1_000_000,
        "speech": MAX_SPEECH_CHARACTERS * price.per_1m_characters,
        "image": MAX_IMAGES * price.per_image * 1_000_000,
    }[kind]
    if worst >= 2**53:
        raise ConfigError(f"{path}.pricing", "too large for exact arithmetic; lower the price")


MAX_SPEECH_CHARACTERS = 4096  # OpenAI's limit on /v1/audio/speech input
MAX_IMAGES = 10  # OpenAI's limit on n for /v1/images/generations


def _scopes(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ConfigError(path, "expected a list of scopes")
    unknown = [s for s in value if s not in SCOPES]
    if unknown:
        raise ConfigError(path, f"unknown scope {unknown[0]!r} (scopes: {', '.join(SCOPES)})")
    return tuple(value)


def _jwt(data: Any, path: str) -> Jwt:
    r = _Reader(data, path)
    algorithms = r.get("algorithms")
    if not isinstance(algorithms, list) or not algorithms:
        raise ConfigError(f"{path}.algorithms", f"pin at least one of {', '.join(JWT_ALGORITHMS)}")
    for i, alg in enumerate(algorithms):
        if alg not in JWT_ALGORITHMS:
            raise ConfigError(
                f"{path}.algorithms[{i}]",
                f"{alg!r} is not accepted (one of {', '.join(JWT_ALGORITHMS)}; never 'none')",
            )
    jwt = Jwt(
        issuer=r.str("issuer"),
        audience=r.str("audience"),
        algorithms=tuple(algorithms),
        hs256_secret=r.get("hs256_secret"),
        secret_env=r.get("hs256_secret_env"),
        jwks_file=r.get("jwks_file"),
        cookie=r.get("cookie"),
        account_claim=r.str("account_claim", "sub"),
        scopes_claim=r.str("scopes_claim", "scope"),
        models_claim=r.get("models_claim"),
        default_scopes=_scopes(
            r.get("default_scopes", list(DEFAULT_SCOPES)), f"{path}.default_scopes"
        ),
        leeway_s=parse_duration(r.get("leeway", 0)) or 0.0,
    )
    r.done()
    for name in ("hs256_secret", "hs256_secret_env", "jwks_file", "cookie", "models_claim"):
        value = getattr(jwt, "secret_env" if name == "hs256_secret_env" else name)
        if value is not None and not (isinstance(value, str) and value):
            raise ConfigError(f"{path}.{name}", "expected a non-empty string")
    if "HS256" in jwt.algorithms:
        if not (jwt.hs256_secret or jwt.secret_env):
            raise ConfigError(
                f"{path}.hs256_secret", "HS256 needs hs256_secret or hs256_secret_env"
            )
        if jwt.hs256_secret is not None and len(jwt.hs256_secret) < 32:
            raise ConfigError(f"{path}.hs256_secret", "must be at least 32 characters")
    elif jwt.hs256_secret or jwt.secret_env:
        raise ConfigError(f"{path}.hs256_secret", "set, but HS256 is not in algorithms")
    if {"RS256", "ES256"} & set(jwt.algorithms) and not jwt.jwks_file:
        raise ConfigError(f"{path}.jwks_file", "RS256/ES256 need a JWKS file with the public keys")
    if jwt.cookie is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", jwt.cookie):
        raise ConfigError(f"{path}.cookie", f"{jwt.cookie!r} is not a cookie name")
    return jwt


def _auth(data: Any, path: str) -> Auth:
    r = _Reader(data, path)
    auth = Auth(
        admin_account=r.str("admin_account", "admin", pattern=_NAME_RE),
        admin_key_sha256=r.get("admin_key_sha256"),
        failed_lookups_per_minute=r.int("failed_lookups_per_minute", 30),
        jwt=_jwt(r.get("jwt"), f"{path}.jwt") if r.get("jwt") is not None else None,
    )
    r.done()
    digest = auth.admin_key_sha256
    if digest is not None and not (
        isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)
    ):
        raise ConfigError(
            f"{path}.admin_key_sha256",
            "expected the key's SHA-256 as 64 lower-case hex digits"
            ' (printf %s "$KEY" | sha256sum)',
        )
    return auth


def parse_config(data: Any, source: str = "<memory>") -> GatewayConfig:
    """Validate a config mapping (as loaded from YAML) into a GatewayConfig."""
    root = _Reader(data, "")
    lr = root.child("listener")
    listener = Listener(
        host=lr.str("host", "127.0.0.1"),
        port=lr.port("port", 8080),
        max_request_body_bytes=lr.size("max_request_body_bytes", 1024 * 1024),
        max_upload_bytes=lr.size("max_upload_bytes", 25 * 1024 * 1024),
        trusted_proxy_hops=lr.int("trusted_proxy_hops", 0, high=10),
    )
    lr.done()
    pr = root.child("processor")
    processor = Processor(
        host=pr.str("host", "127.0.0.1"),
        port=pr.port("port", 50051),
        workers=pr.int("workers", 1, low=1, high=64),
        message_timeout_s=pr.duration("message_timeout", 2.0),
        max_inflight=pr.int("max_inflight", 2048, low=1),
        key_cache_ttl_s=pr.duration("key_cache_ttl", 5.0),
        metrics_port=pr.port("metrics_port", 9464),
        metrics=pr.get("metrics", True),
    )
    pr.done()
    if not isinstance(processor.metrics, bool):
        raise ConfigError("processor.metrics", "expected true or false")
    er = root.child("envoy")
    envoy = Envoy(
        admin_port=er.port("admin_port", 9901),
        concurrency=er.int("concurrency", 1, low=1, high=64),
        log_level=er.str("log_level", "warning"),
        access_log=bool(er.get("access_log", False)),
    )
    er.done()
    if envoy.log_level not in ("trace", "debug", "info", "warning", "error", "critical", "off"):
        raise ConfigError("envoy.log_level", f"unknown level {envoy.log_level!r}")
    mr = root.child("metering")
    enabled = mr.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError("metering.enabled", "expected true or false")
    trailers = mr.get("stream_trailers", True)
    if not isinstance(trailers, bool):
        raise ConfigError("metering.stream_trailers", "expected true or false")
    metering = Metering(
        enabled=enabled,
        reservation_timeout_s=mr.duration("reservation_timeout", 600.0),
        sweep_interval_s=mr.duration("sweep_interval", 5.0),
        ledger_retention_s=_retention(mr),
        default_limits=_limits(mr.get("default_limits"), "metering.default_limits"),
        starting_credits=_credits(mr.get("starting_credits", 0), "metering.starting_credits"),
        stream_trailers=trailers,
        stream_meter=mr.str("stream_meter", "auto"),
    )
    mr.done()
    if metering.stream_meter not in STREAM_METERS:
        raise ConfigError(
            "metering.stream_meter",
            f"expected one of {', '.join(STREAM_METERS)}, got {metering.stream_meter!r}",
        )
    tr = root.child("tracing")
    ratio = tr.get("sample_ratio", 1.0)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
        raise ConfigError("tracing.sample_ratio", f"expected a number from 0 to 1, got {ratio!r}")
    tracing = Tracing(
        otlp_endpoint=(
            _endpoint(tr.get("otlp_endpoint"), "tracing.otlp_endpoint")
            if tr.get("otlp_endpoint") is not None
            else None
        ),
        sample_ratio=float(ratio),
        service_name=tr.str("service_name", "tollgate"),
    )
    tr.done()
    auth = _auth(root.get("auth"), "auth")
    sr = root.child("store")
    store = Store(
        url=sr.get("url"),
        data_dir=sr.str("data_dir", ".tollgate/data"),
        port=sr.port("port", 6390),
        allocator=sr.str("allocator", "auto"),
        fsync=sr.str("fsync", "everysec"),
    )
    sr.done()
    if store.allocator not in ("auto", "system"):
        raise ConfigError("store.allocator", f"expected auto or system, got {store.allocator!r}")
    if store.fsync not in ("everysec", "always"):
        raise ConfigError("store.fsync", f"expected everysec or always, got {store.fsync!r}")
    if store.url is not None and not (
        isinstance(store.url, str) and store.url.startswith(("redis://", "rediss://", "unix://"))
    ):
        raise ConfigError("store.url", "expected a redis://, rediss:// or unix:// URL")

    backends: dict[str, Backend] = {}
    raw_backends = root.list("backends")
    if not raw_backends:
        raise ConfigError("backends", "define at least one backend")
    for i, raw in enumerate(raw_backends):
        b = _backend(raw, f"backends[{i}]")
        if b.name in backends:
            raise ConfigError(f"backends[{i}].name", f"duplicate backend name {b.name!r}")
        backends[b.name] = b

    models: dict[str, Model] = {}
    for i, raw in enumerate(root.list("models")):
        m = _model(raw, f"models[{i}]", backends)
        if m.id in models:
            raise ConfigError(f"models[{i}].id", f"duplicate model id {m.id!r}")
        models[m.id] = m
    if not models:
        raise ConfigError("models", "define at least one model")
    root.done()

    longest = max(b.request_timeout_s for b in backends.values())
    if metering.reservation_timeout_s <= longest:
        raise ConfigError(
            "metering.reservation_timeout",
            f"must be longer than the longest backend request_timeout ({longest:g}s), or the"
            " sweeper would charge requests that are still running",
        )

    ports = {
        "listener.port": listener.port,
        "envoy.admin_port": envoy.admin_port,
    }
    for w in range(processor.workers):
        ports[f"processor.port (worker {w})"] = processor.port + w
        ports[f"processor.metrics_port (worker {w})"] = processor.metrics_port + w
    if store.url is None:
        ports["store.port"] = store.port
    for b in backends.values():
        if b.simulate is not None:
            ports[f"backends[{b.name}].endpoints[0]"] = b.endpoints[0].port
    seen: dict[int, str] = {}
    for where, port in ports.items():
        if port in seen:
            raise ConfigError(where, f"port {port} is already used by {seen[port]}")
        seen[port] = where

    return GatewayConfig(
        listener=listener,
        processor=processor,
        envoy=envoy,
        store=store,
        backends=tuple(backends.values()),
        models=tuple(models.values()),
        metering=metering,
        tracing=tracing,
        auth=auth,
        source=source,
    )


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read {p}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{p} is not valid YAML: {exc}") from None
    return parse_config(data, source=str(p))
