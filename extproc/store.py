"""The store: a Redis-protocol server (embedded Valkey by default) and its key layout.

All shared state lives here; workers keep only short-lived caches. Key names are built by the
functions below and nowhere else, so a reader can see the whole layout in one place:

    tg:key:{sha256}        hash   one API key (fields: extproc/keys.py)
    tg:account:{id}:keys   set    sha256 of the account's keys
    tg:key-ids             hash   key id (key_ + 16 hex) -> sha256, for the control API
    tg:keys-changed        pubsub a key (sha256) or an account ("account:{id}") changed:
                                  workers drop their cached lookups (auth.py)
    tg:settled             pubsub a worker's settling log settled a batch (the message: that
                                  worker's token); the others look again at refusals waiting
                                  for one (metering.py; only with several workers)
    tg:authfail:{address}  string unknown-key lookups from one client address; expires 60 s
                                  after the first (the failed-lookup limit, auth.py)

Money (extproc/ledger.py, scripts in extproc/store_scripts.py; amounts in integer µcr):

    tg:acct:{account}           hash   balance, pending (reserved, not yet settled); the
                                       account's limits (rpm, tpm, concurrency), name,
                                       created_at
    tg:accounts                 set    every account that has a balance, a key or was created
    tg:rl:{key_hash}:{minute}   hash   req, tok in one fixed minute window; expires 120 s after
                                       its first request (keys with an rpm or tpm limit only)
    tg:cc:{key_hash}            zset   in-flight request ids -> reservation expiry (ms) (keys
                                       with a concurrency limit only)
    tg:resv:{request_id}        string one pending reservation, a JSON array of strings
                                       (store_scripts.RESV_FIELDS; earlier versions: a hash);
                                       once settled, the settlement's figures (a shorter
                                       array) that mark the id as used; expires in 30 d
    tg:resv-due                 zset   pending request ids -> expiry (ms), for the sweeper
    tg:done:{request_id}        string written by versions before 2026-12-05 when a request
                                       was settled (still read: the id stays used)
    tg:grant:{grant_id}         string the grant was applied (idempotency); expires in 30 d
    tg:ledger:{account}         zset   immutable ledger entries (JSON), scored by ts (ms); a
                                       request's entry is its usage record too (ledger.usage)

(Before 2026-11-23 usage records were also written to tg:usage:{account}; nothing reads it now.)

Request ids come from clients (X-Request-ID), so nothing else lives under tg:resv: or tg:done:
(hence tg:resv-due, not tg:resv:due), and grant ids have their own namespace: a client cannot
collide with a grant or block it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import redis as syncredis
import redis.asyncio as aioredis
import structlog

# Set by the supervisor for its workers: the embedded Valkey's unix socket, which the hot path's
# pipelined client (resp.py) uses instead of loopback TCP. Everything else keeps the TCP URL.
STORE_SOCKET_ENV = "TOLLGATE_STORE_SOCKET"


def fast_url(url: str) -> str:
    """The URL for the pipelined reserve/settle client: the embedded store's socket when the
    supervisor gave one, else ``url``."""
    socket_path = os.environ.get(STORE_SOCKET_ENV)
    return f"unix://{socket_path}" if socket_path else url


def key_record(key_hash: str) -> str:
    return f"tg:key:{key_hash}"


def account_keys(account: str) -> str:
    return f"tg:account:{account}:keys"


def key_index() -> str:
    return "tg:key-ids"


def keys_channel() -> str:
    return "tg:keys-changed"


def settled_channel() -> str:
    return "tg:settled"


def auth_failures(address: str) -> str:
    return f"tg:authfail:{address}"


def account_prefix() -> str:
    """Account hashes share this prefix; the key-lookup script appends the account id."""
    return "tg:acct:"


def account(account: str) -> str:
    return f"{account_prefix()}{account}"


def accounts() -> str:
    return "tg:accounts"


def rate_window_prefix(key_hash: str) -> str:
    """The rate windows of one key share this prefix; the Lua scripts append the minute."""
    return f"tg:rl:{key_hash}:"


def rate_window(key_hash: str, minute: int) -> str:
    return f"{rate_window_prefix(key_hash)}{minute}"


def in_flight(key_hash: str) -> str:
    return f"tg:cc:{key_hash}"


def reservation_prefix() -> str:
    """Reservations share this prefix; the sweeper appends the request id."""
    return "tg:resv:"


def reservation(request_id: str) -> str:
    return f"{reservation_prefix()}{request_id}"


def reservations_due() -> str:
    return "tg:resv-due"


def done_prefix() -> str:
    """An earlier version's done markers share this prefix (SETTLE_MANY appends the id)."""
    return "tg:done:"


def done(request_id: str) -> str:
    return f"{done_prefix()}{request_id}"


def grant_done(grant_id: str) -> str:
    return f"tg:grant:{grant_id}"


def fold_lock() -> str:
    return "tg:fold:lock"  # held by the worker folding ledgers (retention), for an interval


def ledger(account: str) -> str:
    return f"tg:ledger:{account}"


def connect(url: str) -> aioredis.Redis:
    """An asyncio client with a connection pool; replies decoded as str.

    A blocking pool: under load callers wait for a connection instead of failing with
    MaxConnectionsError once all are in use."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=2,
        socket_timeout=2,
        health_check_interval=30,
        max_connections=64,
        timeout=2,
    )
    return aioredis.Redis(connection_pool=pool)


async def follow(
    url: str, handlers: dict[str, Callable[[str], None]], subscribed: Callable[[], None]
) -> None:
    """Hand each message published on a channel of ``handlers`` to its handler, on one
    connection, until cancelled. After every (re)connection ``subscribed`` is called: whatever
    was published meanwhile was missed."""
    log = structlog.get_logger("tollgate.store")
    while True:
        client = aioredis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=2, health_check_interval=15
        )
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(*handlers)
            subscribed()
            while True:
                msg = await pubsub.get_message(timeout=5.0)
                if msg is not None and msg.get("type") == "message":
                    handler = handlers.get(str(msg["channel"]))
                    if handler is not None:
                        handler(str(msg["data"]))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("store_subscription_reconnect", error=type(exc).__name__)
            await asyncio.sleep(0.5)
        finally:
            try:
                await pubsub.aclose()
                await client.aclose()
            except Exception:
                pass


def connect_sync(url: str) -> syncredis.Redis:
    """A blocking client for the CLI and the supervisor."""
    return syncredis.from_url(
        url, decode_responses=True, socket_connect_timeout=2, socket_timeout=5
    )
