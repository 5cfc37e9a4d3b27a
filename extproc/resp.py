"""A small pipelined RESP client for the hot path's store scripts (reserve, settle).

redis-py's asyncio client spends most of a call on its pool, retry and health-check machinery;
measured here that cost more than the store round trip itself. This client keeps one connection
per worker, writes each call at once (calls from concurrent requests pipeline on the socket), and
matches replies to callers in order, parsing with hiredis's C reader. It speaks only what the
scripts need: EVALSHA, falling back to EVAL (which also loads the script) on NOSCRIPT, e.g.
after the store restarted. Errors are redis-py's exception types, so callers treat both clients
alike. Everything else (queries, the CLI, key lookups) uses redis-py.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import redis.exceptions


def _pack(parts: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        if isinstance(part, bytes):
            data = part
        elif isinstance(part, str):
            data = part.encode()
        else:
            data = str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8")
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._out: list[bytes] = []  # calls made in this loop iteration, written together

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(redis.exceptions.ConnectionError("store connection lost"))

    def call(self, *parts: Any) -> asyncio.Future[Any]:
        if self.closed or self.transport is None:
            raise redis.exceptions.ConnectionError("store connection closed")
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.waiters.append(waiter)
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(_pack(parts))
        return waiter

    def _flush(self) -> None:
        # One write (one syscall, one read for the store) for every call of the iteration.
        out, self._out = self._out, []
        if self.transport is not None and not self.closed:
            self.transport.write(b"".join(out))


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(redis.exceptions.TimeoutError("store did not answer in time"))


class ScriptClient:
    """EVALSHA over one lazily (re)connected, pipelined connection."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        u = urlsplit(url)
        if u.scheme not in ("redis", "unix"):
            raise ValueError(f"ScriptClient supports redis:// and unix:// URLs, not {u.scheme}")
        self._unix = u.path if u.scheme == "unix" else None
        self._host, self._port = u.hostname or "127.0.0.1", u.port or 6379
        self._user = unquote(u.username) if u.username else None
        self._password = unquote(u.password) if u.password else None
        db = u.path.strip("/") if u.scheme == "redis" else ""
        self._db = int(db) if db.isdigit() else 0
        self._timeout = timeout
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        async with self._lock:
            if self._conn is not None and not self._conn.closed:
                return self._conn
            loop = asyncio.get_running_loop()
            try:
                if self._unix:
                    make = loop.create_unix_connection(_Connection, self._unix)
                else:
                    make = loop.create_connection(_Connection, self._host, self._port)
                _, conn = await asyncio.wait_for(make, self._timeout)
            except (OSError, TimeoutError) as exc:
                raise redis.exceptions.ConnectionError(f"store unreachable: {exc}") from None
            if self._password is not None:
                auth = (self._user, self._password) if self._user else (self._password,)
                self._check(await self._wait(conn.call("AUTH", *auth)))
            if self._db:
                self._check(await self._wait(conn.call("SELECT", self._db)))
            self._conn = conn
            return conn

    async def _wait(self, waiter: asyncio.Future[Any]) -> Any:
        # A timer on the future itself: asyncio.wait_for would wrap every call in a task.
        timer = asyncio.get_running_loop().call_later(self._timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()

    @staticmethod
    def _check(reply: Any) -> Any:
        if isinstance(reply, hiredis.ReplyError):
            message = str(reply)
            if message.startswith(("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN")):
                # the store is (re)starting: unavailable, as redis-py reports it
                raise redis.exceptions.BusyLoadingError(message)
            raise redis.exceptions.ResponseError(message)
        return reply

    async def evalsha(self, sha: str, source: str, keys: list[Any], args: list[Any]) -> Any:
        conn = await self._connection()
        reply = await self._wait(conn.call("EVALSHA", sha, len(keys), *keys, *args))
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            reply = await self._wait(conn.call("EVAL", source, len(keys), *keys, *args))
        return self._check(reply)

    async def aclose(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()


class FastScript:
    """Called like redis-py's registered script: ``await script(keys=[...], args=[...])``."""

    def __init__(self, client: ScriptClient, source: str) -> None:
        self._client = client
        self._source = source
        self._sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: list[Any], args: list[Any]) -> Any:
        return await self._client.evalsha(self._sha, self._source, keys, args)
