"""API keys: ``tg_`` + 43 URL-safe characters (256 random bits).

Only the SHA-256 of a key and a short display prefix are stored; the raw key is shown once, at
creation. A lookup hashes the presented key and reads one hash from the store, so comparison
never touches raw key material.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

import redis as syncredis

from . import store

KEY_PREFIX = "tg_"
KEY_RE = re.compile(r"^tg_[A-Za-z0-9_-]{43}$")
DISPLAY_CHARS = 8  # "tg_" + 8 characters are stored and shown in lists and logs


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def display_prefix(raw: str) -> str:
    return raw[: len(KEY_PREFIX) + DISPLAY_CHARS]


@dataclass(frozen=True, slots=True)
class CreatedKey:
    raw: str
    key_hash: str
    prefix: str
    name: str
    account: str


def create_key(
    client: syncredis.Redis,
    name: str,
    account: str = "default",
    limits: dict[str, int] | None = None,
) -> CreatedKey:
    """Create and store a key; the returned ``raw`` is the only copy of the secret.

    ``limits``: per-key overrides, any of ``rpm``, ``tpm``, ``concurrency`` (0 = unlimited)."""
    if not name or len(name) > 100:
        raise ValueError("key name must be 1-100 characters")
    for field_name, value in (limits or {}).items():
        if field_name not in ("rpm", "tpm", "concurrency") or value < 0:
            raise ValueError(f"invalid limit {field_name}={value}")
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key_hash = hash_key(raw)
    prefix = display_prefix(raw)
    pipe = client.pipeline(transaction=True)
    pipe.hset(
        store.key_record(key_hash),
        mapping={
            "account": account,
            "name": name,
            "prefix": prefix,
            "created_at": f"{time.time():.3f}",
            "status": "active",
            **{k: str(v) for k, v in (limits or {}).items()},
        },
    )
    pipe.sadd(store.account_keys(account), key_hash)
    pipe.execute()
    return CreatedKey(raw, key_hash, prefix, name, account)
