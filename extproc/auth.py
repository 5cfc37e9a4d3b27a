"""Who is calling: API keys, the operator's bootstrap admin key, or JWTs; and what they may do.

The hot path: the presented credential is hashed (SHA-256) and looked up in a per-worker cache,
so a busy key costs no store round trip; the cached Principal carries its expiry, checked on
every request. On a miss, one Lua script (``store_scripts.KEY_LOOKUP``) checks the client
address's failed-lookup count, reads the key and its account's limits, and counts the failure
if the key is unknown; ``auth.failed_lookups_per_minute`` unknown keys from one address block
further lookups from it for the rest of the minute (429), so keys cannot be guessed cheaply.

Revocation: the control API publishes every key change on ``store.keys_channel()``; each worker
follows it (``store.follow``, started by server.py) and drops the cached entry at once
(:meth:`Authenticator.invalidate`); after a lost subscription it drops everything. The TTL
(``processor.key_cache_ttl``) is only a backstop.

Comparison: the raw key is never compared with anything. Its SHA-256 is the store lookup key
and the cache key; the bootstrap admin key's digest is compared with ``hmac.compare_digest``.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog

from . import store, store_scripts
from .config import SCOPES, GatewayConfig, Limits
from .errors import GatewayError
from .jwt_auth import JwtVerifier, looks_like_jwt
from .keys import KEY_RE, LAST_USED_EVERY_S, LIMIT_FIELDS, decode_models, decode_scopes, hash_key

log = structlog.get_logger("tollgate.auth")

FAILURE_WINDOW_S = 60


def _limits(key: dict[str, str], account: list[str], default: Limits) -> Limits | None:
    """Per-key overrides, else per-account, else the config's defaults (None)."""
    values = []
    for i, name in enumerate(LIMIT_FIELDS):
        raw = key.get(name) or account[i]
        values.append(int(raw) if raw not in (None, "") else getattr(default, name))
    limits = Limits(*values)
    return None if limits == default else limits


@dataclass(frozen=True, slots=True)
class Principal:
    account: str
    key_prefix: str  # what logs show: "tg_" + 8 characters, "admin", or "jwt:" + 8 hex
    key_name: str
    key_hash: str = ""  # rate windows and concurrency are counted under this
    limits: Limits | None = None  # None: the config's default limits
    scopes: frozenset[str] = frozenset(("models:use", "usage:read"))
    models: frozenset[str] | None = None  # the model pool; None: every model
    expires_at: float = 0.0  # Unix seconds; 0: never
    kind: str = "key"  # key | admin | jwt
    operator: bool = False  # may act on every account (admin key, keys of auth.admin_account)

    @property
    def key_id(self) -> str:
        return "key_" + self.key_hash[:16] if self.kind == "key" else ""

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise GatewayError(
                "permission_denied", f"This credential lacks the '{scope}' scope.", None
            )

    def may_use(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models


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
_EXPIRED = GatewayError("key_expired", "This API key has expired.")
_TOKEN_EXPIRED = GatewayError("token_expired", "The token has expired.")


def cookie_value(header: str, name: str) -> str | None:
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name and v:
            return v.strip('"')
    return None


class Authenticator:
    """Resolves a request's credential to a Principal, or raises GatewayError (401/429).

    Lookups (accepted and refused keys) are cached for ``processor.key_cache_ttl``; a refused
    JWT is not cached (verifying costs CPU, not a store round trip)."""

    def __init__(
        self,
        client: aioredis.Redis,
        cfg: GatewayConfig | None = None,
        max_entries: int = 100_000,
    ) -> None:
        from .config import Auth

        self._client = client
        auth = cfg.auth if cfg is not None else Auth()
        self._default = cfg.metering.default_limits if cfg is not None else Limits()
        self._ttl = cfg.processor.key_cache_ttl_s if cfg is not None else 5.0
        self._max = max_entries
        self._cache: dict[str, tuple[float, Principal | GatewayError]] = {}
        self._touched: dict[str, float] = {}  # key hash -> when last_used_at may be written next
        self._tasks: set[asyncio.Task[object]] = set()
        self._generation = 0  # bumped by every invalidation; see _resolve's caller
        self._fail_limit = auth.failed_lookups_per_minute
        self._admin_hash = auth.admin_key_hash()
        self._admin_account = auth.admin_account
        self._jwt = JwtVerifier(auth.jwt) if auth.jwt is not None else None
        self._cookie = auth.jwt.cookie if auth.jwt is not None else None
        self._lookup = client.register_script(store_scripts.KEY_LOOKUP)

    # ------------------------------------------------------------------ the request path
    async def authenticate(
        self,
        authorization: str | None,
        cookie: str | None = None,
        address: Callable[[], str] | None = None,
    ) -> Principal:
        """``address``: the client's address, asked for only when the store is consulted."""
        if authorization:
            scheme, _, token = authorization.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise _MALFORMED
        elif cookie and self._cookie and (found := cookie_value(cookie, self._cookie)):
            token = found
        else:
            raise _NO_KEY
        digest = hash_key(token)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            result = hit[1]
        else:
            generation = self._generation
            result, ttl = await self._resolve(token, digest, address)
            # A change announced while the store was being read may not be in this reply:
            # use it for this request, but don't cache it.
            if ttl > 0 and generation == self._generation:
                if len(self._cache) >= self._max:
                    self._cache.clear()
                self._cache[digest] = (now + ttl, result)
        if isinstance(result, GatewayError):
            raise result
        if result.expires_at and time.time() >= result.expires_at:
            raise _EXPIRED if result.kind == "key" else _TOKEN_EXPIRED
        if result.kind == "key" and self._touched.get(digest, 0.0) <= now:
            self._touched[digest] = now + LAST_USED_EVERY_S
            self._spawn(self._touch(digest))
        return result

    async def _resolve(
        self, token: str, digest: str, address: Callable[[], str] | None
    ) -> tuple[Principal | GatewayError, float]:
        """(result, seconds to cache it; 0 = do not cache)."""
        if self._jwt is not None and looks_like_jwt(token):
            try:
                principal = await self._from_jwt(token)
            except GatewayError as err:
                return err, 0.0
            return principal, min(self._ttl, max(principal.expires_at - time.time(), 0.0))
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return self._admin(digest), self._ttl
        if not KEY_RE.match(token):
            return _UNKNOWN, self._ttl
        addr = address() if address is not None else ""
        reply = await self._lookup(
            keys=[store.key_record(digest), store.auth_failures(addr or "-")],
            args=[self._fail_limit if addr else 0, store.account_prefix(), FAILURE_WINDOW_S],
        )
        status = reply[0]
        if status == "blocked":
            log.warning("auth_failures_blocked", address=addr)
            return (
                GatewayError(
                    "rate_limit_exceeded",
                    "Too many unknown API keys from this address; retry later.",
                    retry_after=int(reply[1]),
                ),
                0.0,
            )
        if status == "unknown":
            return _UNKNOWN, self._ttl
        flat = reply[1]
        record = dict(zip(flat[::2], flat[1::2], strict=True))
        if record.get("status") != "active":
            return _REVOKED, self._ttl
        account = record["account"]
        expires = record.get("expires_at") or ""
        return (
            Principal(
                account=account,
                key_prefix=record["prefix"],
                key_name=record.get("name", ""),
                key_hash=digest,
                limits=_limits(record, list(reply[2:5]), self._default),
                scopes=decode_scopes(record.get("scopes")),
                models=decode_models(record.get("models")),
                expires_at=float(expires) if expires else 0.0,
                operator=account == self._admin_account,
            ),
            self._ttl,
        )

    def _admin(self, digest: str) -> Principal:
        return Principal(
            account=self._admin_account,
            key_prefix="admin",
            key_name="bootstrap admin key",
            key_hash=digest,
            scopes=frozenset(SCOPES),
            kind="admin",
            operator=True,
        )

    async def _from_jwt(self, token: str) -> Principal:
        assert self._jwt is not None
        claims = self._jwt.verify(token)
        account, scopes, models, exp, subject = self._jwt.claims_to_identity(claims)
        limits = await self._client.hmget(store.account(account), list(LIMIT_FIELDS))
        return Principal(
            account=account,
            key_prefix="jwt:" + subject[:8],
            key_name="jwt",
            key_hash="jwt-" + subject[:40],
            limits=_limits({}, list(limits), self._default),
            scopes=scopes,
            models=models,
            expires_at=exp,
            kind="jwt",
            operator=account == self._admin_account,
        )

    # ------------------------------------------------------------------ last used
    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _touch(self, key_hash: str) -> None:
        try:
            await self._client.hset(
                store.key_record(key_hash), "last_used_at", f"{time.time():.3f}"
            )
        except Exception:  # best effort: last_used_at is informational
            log.warning("last_used_write_failed", key_prefix=None)

    # ------------------------------------------------------------------ invalidation
    def invalidate(self, message: str) -> None:
        """``*``: everything; ``account:{id}``: that account's entries; else a key's hash."""
        self._generation += 1
        if message == "*":
            self._cache.clear()
        elif message.startswith("account:"):
            account = message[len("account:") :]
            for digest, (_, result) in list(self._cache.items()):
                if isinstance(result, Principal) and result.account == account:
                    self._cache.pop(digest, None)
        else:
            self._cache.pop(message, None)


async def announce(client: aioredis.Redis, *messages: str) -> None:
    """Tell every worker to drop cached lookups (see :meth:`Authenticator.invalidate`)."""
    for message in messages:
        await client.publish(store.keys_channel(), message)
