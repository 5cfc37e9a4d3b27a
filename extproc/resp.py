"""A small pipelined RESP client for the hot path's store scripts (reserve, settle).

redis-py's asyncio client spends most of a call on its pool, retry and health-check machinery;
measured here that cost more than the store round trip itself. This client keeps one connection
per worker, writes each call at once (calls from concurrent requests pipeline on the socket), and
matches replies to callers in order, with hiredis's C packer and reader. It speaks only what the
scripts need: EVALSHA, falling back to EVAL (which also loads the script) on NOSCRIPT, e.g.
after the store restarted. Errors are redis-py's exception types, so callers treat both clients
alike. Everything else (queries, the CLI, key lookups) uses redis-py.

Per call it costs a future and a packed command, nothing more: one watchdog timer per
connection expires calls the store has not answered in time (no timer per call), and
``evalsha_soon`` sends a call whose answer nobody awaits (a settlement) without a task.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import redis.exceptions

_pack = hiredis.pack_command  # a RESP command from str, bytes and int parts, in C


class AnswerLost(redis.exceptions.ConnectionError):
    """The connection closed after this call was sent and before its answer came: unlike a
    call that never went out, the store may have run it (metering voids such a reservation)."""


class _Connection(asyncio.Protocol):
    def __init__(self, timeout: float = 2.0) -> None:
        self.reader = hiredis.Reader(encoding="utf-8")
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.deadlines: deque[float] = deque()  # loop time by which each waiter expires
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.timeout = timeout
        self._out: list[bytes] = []  # calls made in this loop iteration, written together
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiters, deadlines = self.waiters, self.deadlines
        while (reply := self.reader.gets()) is not False:
            waiter = waiters.popleft()
            deadlines.popleft()
            if not waiter.done():  # an expired call's answer comes too, and is dropped
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(AnswerLost("store connection lost"))
        self.deadlines.clear()

    def call(self, *parts: Any) -> asyncio.Future[Any]:
        if self.closed or self.transport is None:
            raise redis.exceptions.ConnectionError("store connection closed")
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.waiters.append(waiter)
        self.deadlines.append(loop.time() + self.timeout)
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(_pack(parts))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout, self._watch)
        return waiter

    def _watch(self) -> None:
        """Expire the calls whose deadline passed (replies come in order: the oldest first), and
        look again at the next deadline while calls are outstanding."""
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = None
        for waiter, deadline in zip(self.waiters, self.deadlines, strict=True):
            if deadline > now:
                pending = deadline
                break
            if not waiter.done():
                waiter.set_exception(redis.exceptions.TimeoutError("store did not answer in time"))
        if pending is not None or self.waiters:
            delay = pending - now if pending is not None else self.timeout
            self._watchdog = loop.call_later(delay, self._watch)

    def _flush(self) -> None:
        # One write (one syscall, one read for the store) for every call of the iteration.
        out, self._out = self._out, []
        if self.transport is not None and not self.closed:
            self.transport.write(b"".join(out))


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

                def protocol() -> _Connection:
                    return _Connection(self._timeout)

                if self._unix:
                    make = loop.create_unix_connection(protocol, self._unix)
                else:
                    make = loop.create_connection(protocol, self._host, self._port)
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

    @staticmethod
    async def _wait(waiter: asyncio.Future[Any]) -> Any:
        return await waiter  # the connection's watchdog expires it (asyncio.wait_for: a task)

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
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connection()
        reply = await conn.call("EVALSHA", sha, len(keys), *keys, *args)
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            reply = await conn.call("EVAL", source, len(keys), *keys, *args)
        return self._check(reply)

    def evalsha_soon(
        self,
        sha: str,
        source: str,
        keys: list[Any],
        args: list[Any],
        done: Callable[[Any, BaseException | None], None],
    ) -> bool:
        """Send the call now and hand its reply (or error) to ``done`` later, without a task.
        False when there is no open connection: the caller awaits ``evalsha`` instead."""
        conn = self._conn
        if conn is None or conn.closed:
            return False
        conn.call("EVALSHA", sha, len(keys), *keys, *args).add_done_callback(
            _Answer(conn, source, keys, args, done)
        )
        return True

    async def aclose(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()


class _Answer:
    """The done callback of an ``evalsha_soon`` call: hands the reply to ``done``, after one
    EVAL when the store lost the script. An object, not a closure: a closure that passes itself
    as the EVAL's callback is a reference cycle, which (with its keys, args and ``done``) only
    the cyclic garbage collector frees, once per call on the hot path."""

    __slots__ = ("args", "conn", "done", "keys", "source")

    def __init__(
        self,
        conn: _Connection,
        source: str,
        keys: list[Any],
        args: list[Any],
        done: Callable[[Any, BaseException | None], None],
    ) -> None:
        self.conn, self.source, self.keys, self.args, self.done = conn, source, keys, args, done

    def __call__(self, f: asyncio.Future[Any]) -> None:
        try:
            reply = f.result()
            if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
                conn = self.conn
                if conn.closed:
                    raise redis.exceptions.ConnectionError("store connection lost")
                keys, args = self.keys, self.args
                conn.call("EVAL", self.source, len(keys), *keys, *args).add_done_callback(self)
                return
            self.done(ScriptClient._check(reply), None)
        except Exception as exc:
            self.done(None, exc)


class FastScript:
    """Called like redis-py's registered script: ``await script(keys=[...], args=[...])``."""

    def __init__(self, client: ScriptClient, source: str) -> None:
        self._client = client
        self._source = source
        self._sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, keys: list[Any], args: list[Any]) -> Coroutine[Any, Any, Any]:
        return self._client.evalsha(self._sha, self._source, keys, args)  # no coroutine of its own

    def soon(
        self, keys: list[Any], args: list[Any], done: Callable[[Any, BaseException | None], None]
    ) -> bool:
        """See ScriptClient.evalsha_soon."""
        return self._client.evalsha_soon(self._sha, self._source, keys, args, done)
