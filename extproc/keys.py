"""API keys: ``tg_`` + 43 URL-safe characters (256 random bits), and what a key may do.

Only the SHA-256 of a key and a short display prefix are stored; the raw key is shown once, at
creation. A lookup hashes the presented key and reads one hash from the store, so the raw key is
never compared with anything: equality is decided by the store's hash lookup of its digest.

A key's record (``tg:key:{sha256}``, see store.py):

    id            "key_" + the first 16 hex digits of the SHA-256: how the control API names it
    account, name, prefix, created_at, status (active | revoked), revoked_at
    scopes        space-separated (models:use keys:manage credits:manage usage:read)
    models        the model pool: space-separated public model ids, or "*" for every model
    expires_at    Unix seconds, or "" for never
    rpm, tpm, concurrency   per-key limits (absent: the account's, else the config's)
    last_used_at  Unix seconds, written by the workers at most every LAST_USED_EVERY_S

Every change that can narrow what a key may do is published on ``store.keys_channel()``, and
each worker drops its cached lookup at once (auth.py), so revocation takes effect everywhere in
well under a second rather than after the cache's TTL.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis as syncredis
import redis.asyncio as aioredis

from . import store
from .config import DEFAULT_SCOPES, SCOPES

KEY_PREFIX = "tg_"
KEY_RE = re.compile(r"^tg_[A-Za-z0-9_-]{43}$")
KEY_ID_RE = re.compile(r"^key_[0-9a-f]{16}$")
ACCOUNT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DISPLAY_CHARS = 8  # "tg_" + 8 characters are stored and shown in lists and logs
LIMIT_FIELDS = ("rpm", "tpm", "concurrency")
ALL_MODELS = "*"
LAST_USED_EVERY_S = 10.0


class FieldError(ValueError):
    """A key field that fails validation; ``param`` names it as the control API's clients
    write it (``name``, ``scopes``, ``limits.rpm``...), for the error's ``param``."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def display_prefix(raw: str) -> str:
    return raw[: len(KEY_PREFIX) + DISPLAY_CHARS]


def key_id(key_hash: str) -> str:
    return "key_" + key_hash[:16]


def check_name(name: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 100 or not name.isprintable():
        raise FieldError("key name must be 1-100 printable characters", "name")
    return name


def check_account(account: str) -> str:
    if not isinstance(account, str) or not ACCOUNT_RE.match(account):
        raise FieldError(
            f"account {account!r} must be 1-63 letters, digits, '.', '_' or '-' (not first)",
            "account",
        )
    return account


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(scopes))
    for s in out:
        if s not in SCOPES:
            raise FieldError(f"unknown scope {s!r} (scopes: {', '.join(SCOPES)})", "scopes")
    return out


def check_limits(limits: dict[str, int] | None) -> dict[str, int]:
    for name, value in (limits or {}).items():
        if name not in LIMIT_FIELDS or not isinstance(value, int) or value < 0:
            raise FieldError(
                f"invalid limit {name}={value} (rpm, tpm, concurrency; >= 0)", f"limits.{name}"
            )
    return dict(limits or {})


def encode_models(models: Iterable[str] | None) -> str:
    if models is None:
        return ALL_MODELS
    out = list(dict.fromkeys(models))
    if not out or any(not m or " " in m or m == ALL_MODELS for m in out):
        raise FieldError(
            "a model pool lists one or more model ids (or is omitted for all)", "models"
        )
    return " ".join(out)


def decode_models(raw: str | None) -> frozenset[str] | None:
    """None: every model."""
    if raw is None or raw == ALL_MODELS:
        return None
    return frozenset(raw.split()) if raw else frozenset()


def decode_scopes(raw: str | None) -> frozenset[str]:
    return frozenset(DEFAULT_SCOPES if raw is None else raw.split())


@dataclass(frozen=True, slots=True)
class CreatedKey:
    raw: str
    key_hash: str
    prefix: str
    name: str
    account: str

    @property
    def id(self) -> str:
        return key_id(self.key_hash)


def new_key_record(
    name: str,
    account: str,
    limits: dict[str, int] | None = None,
    scopes: Iterable[str] | None = None,
    models: Iterable[str] | None = None,
    expires_at: float | None = None,
) -> tuple[str, dict[str, str]]:
    """A fresh raw key and the store record for it (validated; nothing written)."""
    check_name(name)
    check_account(account)
    limits = check_limits(limits)
    scope_list = check_scopes(DEFAULT_SCOPES if scopes is None else scopes)
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key_hash = hash_key(raw)
    record = {
        "id": key_id(key_hash),
        "account": account,
        "name": name,
        "prefix": display_prefix(raw),
        "created_at": f"{time.time():.3f}",
        "status": "active",
        "scopes": " ".join(scope_list),
        "models": encode_models(models),
        "expires_at": "" if expires_at is None else f"{expires_at:.3f}",
        **{k: str(v) for k, v in limits.items()},
    }
    return raw, record


def create_key(
    client: syncredis.Redis,
    name: str,
    account: str = "default",
    limits: dict[str, int] | None = None,
    scopes: Iterable[str] | None = None,
    models: Iterable[str] | None = None,
    expires_at: float | None = None,
) -> CreatedKey:
    """Create and store a key; the returned ``raw`` is the only copy of the secret.

    ``limits``: per-key overrides, any of ``rpm``, ``tpm``, ``concurrency`` (0 = unlimited).
    ``scopes``: default ``models:use usage:read``; ``models``: the pool (None = every model)."""
    raw, record = new_key_record(name, account, limits, scopes, models, expires_at)
    key_hash = hash_key(raw)
    pipe = client.pipeline(transaction=True)
    stage_new_key(pipe, key_hash, record)
    pipe.execute()
    return CreatedKey(raw, key_hash, record["prefix"], name, account)


def stage_new_key(pipe: Any, key_hash: str, record: dict[str, str]) -> None:
    """Queue the commands that save a new key on a MULTI/EXEC pipeline (redis-py's sync or
    asyncio pipeline: both queue synchronously)."""
    pipe.hset(store.key_record(key_hash), mapping=record)
    pipe.sadd(store.account_keys(record["account"]), key_hash)
    pipe.sadd(store.accounts(), record["account"])
    pipe.hset(store.key_index(), record["id"], key_hash)


# --------------------------------------------------------------------------- management (asyncio)
# Used by the control API (control_api.py). Every change is announced so workers drop their
# cached lookups of the key at once (auth.Authenticator.listen).


async def find(client: aioredis.Redis, key_id: str) -> tuple[str, dict[str, str]] | None:
    """(sha256, record) of the key with this id, or None."""
    if not KEY_ID_RE.match(key_id):
        return None
    key_hash = await client.hget(store.key_index(), key_id)
    if not key_hash:
        return None
    record = await client.hgetall(store.key_record(key_hash))
    return (key_hash, record) if record else None


async def of_account(client: aioredis.Redis, account: str) -> list[tuple[str, dict[str, str]]]:
    hashes = sorted(await client.smembers(store.account_keys(account)))
    pipe = client.pipeline(transaction=False)
    for h in hashes:
        pipe.hgetall(store.key_record(h))
    records = await pipe.execute()
    out = [(h, r) for h, r in zip(hashes, records, strict=True) if r]
    legacy = [(h, r) for h, r in out if "id" not in r]  # keys made before key ids existed
    if legacy:
        pipe = client.pipeline(transaction=True)
        for h, r in legacy:
            r["id"] = key_id(h)
            pipe.hset(store.key_record(h), "id", r["id"])
            pipe.hset(store.key_index(), r["id"], h)
        await pipe.execute()
    return out


async def change(
    client: aioredis.Redis, key_hash: str, fields: dict[str, str], remove: Iterable[str] = ()
) -> dict[str, str]:
    """Write ``fields`` (and delete ``remove``) on a key's record, tell the workers, and return
    the record as it is now."""
    pipe = client.pipeline(transaction=True)
    if fields:
        pipe.hset(store.key_record(key_hash), mapping=fields)
    removed = list(remove)
    if removed:
        pipe.hdel(store.key_record(key_hash), *removed)
    pipe.publish(store.keys_channel(), key_hash)
    pipe.hgetall(store.key_record(key_hash))
    replies = await pipe.execute()
    return replies[-1]


async def revoke(client: aioredis.Redis, key_hash: str) -> dict[str, str]:
    return await change(client, key_hash, {"status": "revoked", "revoked_at": f"{time.time():.3f}"})
