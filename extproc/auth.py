"""Who is calling: Bearer API keys, looked up by SHA-256 and cached per worker for seconds."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from . import store
from .config import Limits
from .errors import GatewayError
from .keys import KEY_RE, hash_key

_LIMIT_FIELDS = ("rpm", "tpm", "concurrency")


def _limits(key: dict[str, str], account: list[str | None], default: Limits) -> Limits | None:
    """Per-key overrides, else per-account, else the config's defaults (None)."""
    values = []
    for i, name in enumerate(_LIMIT_FIELDS):
        raw = key.get(name) or account[i]
        values.append(int(raw) if raw not in (None, "") else getattr(default, name))
    limits = Limits(*values)
    return None if limits == default else limits


@dataclass(frozen=True, slots=True)
class Principal:
    account: str
    key_prefix: str
    key_name: str
    key_hash: str = ""
    limits: Limits | None = None  # None: the config's default limits


_NO_KEY = GatewayError(
    "invalid_api_key",
    "Missing API key: send 'Authorization: Bearer tg_...'.",
)
_MALFORMED = GatewayError(
    "invalid_api_key",
    "Malformed Authorization header: expected 'Bearer <API key>'.",
)
_UNKNOWN = GatewayError("invalid_api_key", "Incorrect API key provided.")
_REVOKED = GatewayError("key_revoked", "This API key has been revoked.")


class KeyAuthenticator:
    """Resolves an Authorization header to a Principal, or raises GatewayError (401).

    Positive and negative lookups are cached for ``ttl`` seconds, so a busy key costs no store
    round trip; a revoked key keeps working on a worker for at most ``ttl`` seconds.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        ttl: float = 5.0,
        max_entries: int = 100_000,
        default_limits: Limits | None = None,
    ):
        self._client = client
        self._default = default_limits or Limits()
        self._ttl = ttl
        self._max = max_entries
        self._cache: dict[str, tuple[float, Principal | GatewayError]] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise _NO_KEY
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _MALFORMED
        now = time.monotonic()
        hit = self._cache.get(token)
        if hit is not None and hit[0] > now:
            result = hit[1]
        else:
            result = await self._lookup(token)
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[token] = (now + self._ttl, result)
        if isinstance(result, GatewayError):
            raise result
        return result

    async def _lookup(self, token: str) -> Principal | GatewayError:
        if not KEY_RE.match(token):
            return _UNKNOWN
        key_hash = hash_key(token)
        record = await self._client.hgetall(store.key_record(key_hash))
        if not record:
            return _UNKNOWN
        if record.get("status") != "active":
            return _REVOKED
        account = await self._client.hmget(store.account(record["account"]), list(_LIMIT_FIELDS))
        return Principal(
            account=record["account"],
            key_prefix=record["prefix"],
            key_name=record.get("name", ""),
            key_hash=key_hash,
            limits=_limits(record, account, self._default),
        )
