"""The store: a Redis-protocol server (embedded Valkey by default) and its key layout.

All shared state lives here; workers keep only short-lived caches. Key names are built by the
functions below and nowhere else, so a reader can see the whole layout in one place:

    tg:key:{sha256}        hash   one API key: account, name, prefix, created_at, status
    tg:account:{id}:keys   set    sha256 of the account's keys
"""

from __future__ import annotations

import redis as syncredis
import redis.asyncio as aioredis


def key_record(key_hash: str) -> str:
    return f"tg:key:{key_hash}"


def account_keys(account: str) -> str:
    return f"tg:account:{account}:keys"


def connect(url: str) -> aioredis.Redis:
    """An asyncio client with a connection pool; replies decoded as str."""
    return aioredis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=2,
        socket_timeout=2,
        health_check_interval=30,
    )


def connect_sync(url: str) -> syncredis.Redis:
    """A blocking client for the CLI and the supervisor."""
    return syncredis.from_url(
        url, decode_responses=True, socket_connect_timeout=2, socket_timeout=5
    )
