"""A minimal, fast HTTP/1.1 server for the backend simulators.

Built on ``asyncio.Protocol`` + ``httptools`` (the parser uvicorn uses) and meant to run
on uvloop. It does only what the simulators need, and does it cheaply:

* keep-alive (HTTP/1.1 default, HTTP/1.0 with ``Connection: keep-alive``), with an idle
  timeout like uvicorn's ``timeout_keep_alive`` (5 s by default, as in vLLM);
* request bodies framed by ``Content-Length`` or ``Transfer-Encoding: chunked`` (httptools
  de-chunks them); ``Expect: 100-continue`` is answered;
* responses with ``Content-Length`` (:class:`Response`) or streamed with
  ``Transfer-Encoding: chunked`` (:class:`StreamResponse`): every item the stream's async
  iterator yields is written as its own chunk at once, never buffered; an iterator that
  raises :class:`AbortStream` ends the response without its terminating chunk (a
  truncated body) and closes the connection;
* a route may take its request body as a stream: ``app.route(..., body_sink=factory)``
  makes the parser hand each piece of the body to ``factory(headers)``'s ``feed()`` as it
  arrives instead of buffering it (e.g. a multipart upload of any size), and the handler
  finds that sink in ``request.sink``;
* requests arriving while one is in flight on the same connection are queued and served
  in order (no concurrent pipelining).

Routing is a plain table ``(method, path) -> async handler(request)``. A handler returns a
:class:`Response` or a :class:`StreamResponse`. Handlers that finish without awaiting
anything run inline, without creating a task (the hot path of a zero-latency simulator).
A client that disconnects cancels the request's task (a stream stops generating), and a
stream's ``on_close`` callback always runs exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol, cast

import httptools
import orjson

__all__ = [
    "AbortStream",
    "App",
    "BodySink",
    "Handler",
    "Request",
    "Response",
    "ServerThread",
    "StreamResponse",
    "json_response",
    "not_found",
    "start_server",
]

log = logging.getLogger("backends.http")

Header = tuple[str, str]


class Request:
    """One parsed HTTP request. ``headers`` has lower-cased names (repeats joined by ", ").

    ``body`` is the whole body, except on a route with a ``body_sink``: there ``body`` is
    empty and ``sink`` is the object that consumed the body.
    """

    __slots__ = (
        "body",
        "headers",
        "http_version",
        "keep_alive",
        "method",
        "path",
        "query",
        "sink",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        *,
        http_version: str = "1.1",
        keep_alive: bool = True,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.sink: Any = None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path}>"


class Response:
    """A complete response, sent with ``Content-Length``.

    ``content_type`` None sends no Content-Type header (like Starlette's bare ``Response``).
    """

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        *,
        content_type: str | None = "application/json",
        headers: Iterable[Header] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers: list[Header] = list(headers) if headers else []


class StreamResponse:
    """A streamed response: each bytes item from ``iterator`` becomes one HTTP chunk.

    ``on_close`` is called exactly once when the stream is over for any reason (finished,
    failed, client gone, or never started), e.g. to release a concurrency slot.
    """

    __slots__ = ("content_type", "headers", "iterator", "on_close", "status")

    def __init__(
        self,
        iterator: AsyncIterator[bytes],
        *,
        status: int = 200,
        content_type: str | None = "text/event-stream; charset=utf-8",
        headers: Iterable[Header] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.iterator = iterator
        self.status = status
        self.content_type = content_type
        self.headers: list[Header] = list(headers) if headers else []
        self.on_close = on_close


Handler = Callable[[Request], Coroutine[Any, Any, Response | StreamResponse]]


class AbortStream(Exception):
    """Raised by a :class:`StreamResponse` iterator to cut the response short.

    The connection is closed without the final zero-length chunk, so the client sees a
    truncated body (like a server that died mid-response). Nothing is logged.
    """


class BodySink(Protocol):
    """Consumes a request body piece by piece (see ``App.route(..., body_sink=...)``).

    ``feed`` gets every piece as it arrives, ``finish`` is called once at the end of the
    message. Neither should raise: a sink records problems and lets the handler report.
    """

    def feed(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


BodySinkFactory = Callable[[dict[str, str]], BodySink]


def not_found() -> Response:
    """FastAPI's 404 for an unknown path."""
    return Response(404, _NOT_FOUND)


def json_response(obj: Any, status: int = 200, headers: Iterable[Header] | None = None) -> Response:
    """Serialize ``obj`` with orjson into an ``application/json`` response."""
    return Response(status, orjson.dumps(obj), headers=headers)


_NOT_FOUND = b'{"detail":"Not Found"}'
_NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'


class App:
    """A routing table plus server-wide settings, shared by every connection.

    ``server_header`` is sent as ``server:`` (vLLM runs under uvicorn, so the vLLM
    personality says ``uvicorn``). ``default_headers`` are added to every response.
    Unknown paths answer 404 and known paths with another method 405, in FastAPI's
    ``{"detail": ...}`` shape.
    """

    def __init__(
        self,
        *,
        server_header: str | None = "uvicorn",
        keep_alive_timeout: float = 5.0,
        default_headers: Iterable[Header] = (),
    ) -> None:
        self.routes: dict[str, dict[str, Handler]] = {}
        self.body_sinks: dict[tuple[str, str], BodySinkFactory] = {}
        self.server_header = server_header
        self.keep_alive_timeout = keep_alive_timeout
        self.default_headers: list[Header] = list(default_headers)
        self.connections: set[HttpProtocol] = set()
        #: Called for paths with no route (instead of the plain 404), e.g. to record them.
        self.fallback: Handler | None = None
        self._static = b""
        self._rebuild_static()

    def _rebuild_static(self) -> None:
        parts = []
        if self.server_header:
            parts.append(f"server: {self.server_header}\r\n")
        parts.extend(f"{k}: {v}\r\n" for k, v in self.default_headers)
        self._static = "".join(parts).encode("latin-1")

    def add_default_header(self, name: str, value: str) -> None:
        self.default_headers.append((name, value))
        self._rebuild_static()

    def route(
        self, method: str, path: str, handler: Handler, *, body_sink: BodySinkFactory | None = None
    ) -> None:
        """Serve ``method path`` with ``handler``; with ``body_sink``, stream the body into
        ``body_sink(headers)`` instead of buffering it (the handler reads ``request.sink``)."""
        self.routes.setdefault(path, {})[method.upper()] = handler
        if body_sink is not None:
            self.body_sinks[(method.upper(), path)] = body_sink

    def resolve(self, method: str, path: str) -> Handler | Response:
        methods = self.routes.get(path)
        if methods is None:
            return self.fallback or Response(404, _NOT_FOUND)
        handler = methods.get(method)
        if handler is None:
            if method == "HEAD" and "GET" in methods:
                return methods["GET"]
            allow = ", ".join(sorted(methods))
            return Response(405, _NOT_ALLOWED, headers=[("allow", allow)])
        return handler

    def close_connections(self) -> None:
        for conn in list(self.connections):
            conn.close()


# --- response encoding -------------------------------------------------------------

_STATUS_LINES: dict[int, bytes] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus
}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} Unknown\r\n".encode()
        _STATUS_LINES[status] = line
    return line


class _DateCache:
    second = 0
    header = b""


def _date_header() -> bytes:
    now = int(time.time())
    if now != _DateCache.second:
        _DateCache.second = now
        _DateCache.header = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    return _DateCache.header


def _encode_headers(headers: list[Header]) -> bytes:
    if not headers:
        return b""
    return "".join([f"{k}: {v}\r\n" for k, v in headers]).encode("latin-1")


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 11\r\nconnection: close\r\n\r\nBad Request"
)
_INTERNAL_ERROR = b"Internal Server Error"


class _Resume:
    """Await a coroutine that was already stepped once by hand (see ``_dispatch``).

    ``await coro`` is refused for a coroutine suspended mid-await, so this drives it like
    ``yield from`` would, starting by handing its first yielded future to the task.
    """

    __slots__ = ("coro", "first")

    def __init__(self, coro: Any, first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, None, Any]:
        coro, yielded = self.coro, self.first
        while True:
            try:
                yield yielded
            except BaseException as exc:  # e.g. CancelledError thrown in by the task
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(None)
                except StopIteration as stop:
                    return stop.value


class HttpProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, app: App, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body_parts: list[bytes] = []
        self.sink: BodySink | None = None
        self.pending: deque[Request] = deque()
        self.busy = False
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.last_active = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.app.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.last_active = self.loop.time()
        if self.app.keep_alive_timeout > 0:
            self.idle_timer = self.loop.call_later(self.app.keep_alive_timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.app.connections.discard(self)
        self.pending.clear()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._wake_writer()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject()
        except httptools.HttpParserError:
            self._reject()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        waiter = self.drain_waiter
        if waiter is not None:
            self.drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _drain(self) -> None:
        if self.write_paused and not self.closed:
            self.drain_waiter = self.loop.create_future()
            await self.drain_waiter

    def _check_idle(self) -> None:
        self.idle_timer = None
        if self.closed:
            return
        timeout = self.app.keep_alive_timeout
        idle_for = self.loop.time() - self.last_active
        if not self.busy and not self.pending and idle_for >= timeout:
            self.close()
            return
        delay = timeout - idle_for if idle_for < timeout else timeout
        self.idle_timer = self.loop.call_later(delay, self._check_idle)

    def _reject(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(_BAD_REQUEST)
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.body_parts = []
        self.sink = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        old = self.headers.get(key)
        self.headers[key] = val if old is None else f"{old}, {val}"

    def on_headers_complete(self) -> None:
        expect = self.headers.get("expect")
        if expect is not None and expect.lower() == "100-continue" and self.transport:
            self.transport.write(_CONTINUE)
        if self.app.body_sinks:
            method = self.parser.get_method().decode("ascii")
            path = self.url.partition(b"?")[0].decode("latin-1")
            factory = self.app.body_sinks.get((method, path))
            if factory is not None:
                self.sink = factory(self.headers)

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is None:
            self.body_parts.append(body)
        else:
            sink.feed(body)

    def on_message_complete(self) -> None:
        path, _, query = self.url.partition(b"?")
        parts = self.body_parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        request = Request(
            self.parser.get_method().decode("ascii"),
            path.decode("latin-1"),
            query.decode("latin-1"),
            self.headers,
            body,
            http_version=self.parser.get_http_version(),
            keep_alive=self.parser.should_keep_alive(),
        )
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.finish()
            request.sink = sink
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        if self.busy:
            self.pending.append(request)
        else:
            self._dispatch(request)

    # -- request handling ------------------------------------------------------------

    def _dispatch(self, request: Request) -> None:
        self.busy = True
        handler = self.app.resolve(request.method, request.path)
        if isinstance(handler, Response):
            self._send(request, handler)
            return
        try:
            coro = handler(request)
            try:
                yielded = coro.send(None)  # run inline until the first real await
            except StopIteration as stop:
                result = stop.value
            else:
                task = self.loop.create_task(self._finish_async(request, coro, yielded))
                # if the task is cancelled before it ever runs, still unwind the handler
                task.add_done_callback(lambda _t: coro.close())
                self.task = task
                return
        except Exception:
            log.exception("handler failed: %s %s", request.method, request.path)
            result = Response(500, _INTERNAL_ERROR, content_type="text/plain; charset=utf-8")
        self._respond(request, result)

    async def _finish_async(self, request: Request, coro: Any, yielded: Any) -> None:
        try:
            result = await _Resume(coro, yielded)
        except asyncio.CancelledError:
            return  # client went away
        except Exception:
            log.exception("handler failed: %s %s", request.method, request.path)
            result = Response(500, _INTERNAL_ERROR, content_type="text/plain; charset=utf-8")
        if isinstance(result, StreamResponse):
            await self._stream(request, result)
        else:
            self.task = None
            self._send(request, result)

    def _respond(self, request: Request, result: Response | StreamResponse) -> None:
        if isinstance(result, StreamResponse):
            if self.closed:
                _run_on_close(result)
                return
            task = self.loop.create_task(self._stream(request, result))
            task.add_done_callback(lambda _t: _run_on_close(result))  # even if never started
            self.task = task
        else:
            self._send(request, result)

    def _head(self, request: Request, status: int, content_type: str | None) -> list[bytes]:
        head = [_status_line(status), _date_header(), self.app._static]
        if content_type is not None:
            head.append(b"content-type: " + content_type.encode("latin-1") + b"\r\n")
        if not request.keep_alive:
            head.append(b"connection: close\r\n")
        elif request.http_version == "1.0":
            head.append(b"connection: keep-alive\r\n")
        return head

    def _send(self, request: Request, response: Response) -> None:
        if self.closed or self.transport is None:
            return
        body = response.body
        head = self._head(request, response.status, response.content_type)
        head.append(_encode_headers(response.headers))
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        if request.method != "HEAD":
            head.append(body)
        self.transport.write(b"".join(head))
        self._request_done(request)

    async def _stream(self, request: Request, response: StreamResponse) -> None:
        iterator = response.iterator
        chunked = request.http_version != "1.0"
        transport = self.transport
        completed = False
        try:
            if self.closed or transport is None:
                return
            head = self._head(request, response.status, response.content_type)
            head.append(_encode_headers(response.headers))
            head.append(b"transfer-encoding: chunked\r\n\r\n" if chunked else b"\r\n")
            transport.write(b"".join(head))
            async for chunk in iterator:
                if self.closed:
                    break
                if not chunk:
                    continue
                if chunked:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    transport.write(chunk)
                if self.write_paused:
                    await self._drain()
            else:
                if not self.closed and chunked:
                    transport.write(b"0\r\n\r\n")
                completed = not self.closed
        except (asyncio.CancelledError, AbortStream):
            pass  # client went away, or the handler cut the response short
        except Exception:
            log.exception("stream failed: %s %s", request.method, request.path)
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):  # cleanup must never raise
                    await aclose()
            _run_on_close(response)
        self.task = None
        if completed and chunked:
            self._request_done(request)
        else:
            self.close()  # an unfinished stream (or HTTP/1.0) ends with the connection

    def _request_done(self, request: Request) -> None:
        self.task = None
        self.last_active = self.loop.time()
        if not request.keep_alive:
            self.busy = False
            self.close()
            return
        if self.pending:  # pipelined requests: next one on the next loop pass (no recursion)
            self.loop.call_soon(self._dispatch_next)
        else:
            self.busy = False

    def _dispatch_next(self) -> None:
        if self.closed or not self.pending:
            self.busy = False
            return
        self._dispatch(self.pending.popleft())


def _run_on_close(response: StreamResponse) -> None:
    callback, response.on_close = response.on_close, None
    if callback is not None:
        try:
            callback()
        except Exception:
            log.exception("stream on_close callback failed")


async def start_server(
    app: App, host: str = "127.0.0.1", port: int = 0, *, backlog: int = 4096
) -> asyncio.AbstractServer:
    """Listen on ``host:port`` (port 0 picks a free one) in the running loop."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: HttpProtocol(app, loop), host, port, backlog=backlog, reuse_address=True
    )


def bound_port(server: asyncio.AbstractServer) -> int:
    sockets = getattr(server, "sockets", None)
    if not sockets:
        raise RuntimeError("server has no listening socket")
    return int(sockets[0].getsockname()[1])


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop if uvloop is importable, else the default asyncio loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ServerThread:
    """Run an :class:`App` on its own event loop in a daemon thread (for tests).

    >>> with ServerThread(app) as srv:   # doctest: +SKIP
    ...     httpx.get(f"{srv.url}/health")
    """

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> ServerThread:
        self._thread = threading.Thread(target=self._run, name="sim-http", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("simulator thread did not start")
        if self._error is not None:
            raise RuntimeError("simulator thread failed to start") from self._error
        return self

    def _run(self) -> None:
        loop = new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(start_server(self.app, self.host, self.port))
            self.port = bound_port(self._server)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self.loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        def _shutdown() -> None:
            if self._server is not None:
                self._server.close()
            self.app.close_connections()
            loop.call_later(0.05, loop.stop)

        loop.call_soon_threadsafe(_shutdown)
        thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
