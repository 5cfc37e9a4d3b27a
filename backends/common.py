"""Pieces every simulator personality shares.

* metrics: :class:`Histogram` and Prometheus number formatting;
* admission: :class:`Scheduler` (``max_running`` at once, ``max_queue`` waiting);
* per-request knobs read from ``x-sim-*`` headers (:func:`read_knobs`);
* simulator control: :class:`SimControl` keeps the request history behind
  ``GET|DELETE /sim/requests`` and the run-time settings behind ``GET|POST /sim/config``;
* the CLI flags every personality accepts (:func:`add_common_arguments`): ``--model``,
  ``--ttft-ms``, ``--itl-ms``, ``--output-tokens``, ``--max-running``, ``--max-queue``,
  ``--pod-name``, ``--history`` -- what ``tollgate up`` passes for a ``simulate:`` block;
* :mod:`serde`-style type checks and messages for the Rust (axum) personalities, TGI and
  TEI, whose JSON extractor rejects a wrongly typed body with a plain-text 4xx before the
  server's own code runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any, NoReturn

import orjson

from backends import textgen
from backends.http import App, Request, Response

__all__ = [
    "ADMITTED",
    "QUEUED",
    "REJECTED",
    "BadKnob",
    "Histogram",
    "Knobs",
    "RustMetrics",
    "Scheduler",
    "SerdeError",
    "SimControl",
    "add_common_arguments",
    "bearer_ok",
    "fmt_float",
    "json_or_text",
    "knob_float",
    "knob_int",
    "label_value",
    "plain_text",
    "read_knobs",
]


# --- metrics -------------------------------------------------------------------------


def fmt_float(value: float) -> str:
    """Prometheus client's float formatting (``1.0``, ``0.001``, ``+Inf``)."""
    if value == float("inf"):
        return "+Inf"
    return repr(float(value))


def label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Histogram:
    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect_left(self.buckets, value)] += times
        self.sum += value * times
        self.count += times

    def render(self, name: str, labels: str, out: list[str]) -> None:
        """Append the ``_bucket`` / ``_count`` / ``_sum`` lines (``labels`` may be empty)."""
        prefix = labels + "," if labels else ""
        plain = "{" + labels + "}" if labels else ""
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            cumulative += n
            out.append(f'{name}_bucket{{{prefix}le="{fmt_float(bound)}"}} {fmt_float(cumulative)}')
        out.append(f'{name}_bucket{{{prefix}le="+Inf"}} {fmt_float(self.count)}')
        out.append(f"{name}_count{plain} {fmt_float(self.count)}")
        out.append(f"{name}_sum{plain} {fmt_float(self.sum)}")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class RustMetrics:
    """Counters and histograms rendered like the Rust ``metrics-exporter-prometheus`` crate
    that TGI and TEI use: ``# TYPE`` lines without ``# HELP``, a blank line between
    families, integer-looking values without ``.0``."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self.histograms: dict[str, Histogram] = {}

    def declare_counter(self, name: str, **labels: str) -> None:
        self.counters.setdefault(name, {}).setdefault(tuple(sorted(labels.items())), 0)

    def declare_histogram(self, name: str, buckets: tuple[float, ...]) -> None:
        self.histograms.setdefault(name, Histogram(buckets))

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        series = self.counters.setdefault(name, {})
        key = tuple(sorted(labels.items()))
        series[key] = series.get(key, 0) + value

    def observe(self, name: str, value: float) -> None:
        self.histograms[name].observe(value)

    def render(self, gauges: Mapping[str, float]) -> bytes:
        out: list[str] = []
        for name, series in self.counters.items():
            out.append(f"# TYPE {name} counter")
            for key, value in series.items():
                labels = ",".join(f'{k}="{label_value(v)}"' for k, v in key)
                series_name = f"{name}{{{labels}}}" if labels else name
                out.append(f"{series_name} {_num(value)}")
            out.append("")
        for name, value in gauges.items():
            out.extend((f"# TYPE {name} gauge", f"{name} {_num(value)}", ""))
        for name, hist in self.histograms.items():
            out.append(f"# TYPE {name} histogram")
            cumulative = 0
            for bound, n in zip(hist.buckets, hist.counts, strict=False):
                cumulative += n
                out.append(f'{name}_bucket{{le="{bound!r}"}} {cumulative}')
            out.append(f'{name}_bucket{{le="+Inf"}} {hist.count}')
            out.append(f"{name}_sum {_num(hist.sum)}")
            out.append(f"{name}_count {hist.count}")
            out.append("")
        return "\n".join(out).encode()


# --- concurrency ---------------------------------------------------------------------

ADMITTED, QUEUED, REJECTED = 0, 1, 2


class Scheduler:
    """At most ``max_running`` generations at once, ``max_queue`` more waiting (FIFO).

    ``admit()`` is synchronous: ``ADMITTED`` takes a running slot now, ``QUEUED`` means the
    caller must ``await wait()`` for one, ``REJECTED`` means both are full. Every admitted
    request must call ``release()`` exactly once.
    """

    def __init__(self, max_running: int, max_queue: int) -> None:
        self.max_running = max_running
        self.max_queue = max_queue
        self.running = 0
        self.waiting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def admit(self) -> int:
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return ADMITTED
        if self.waiting < self.max_queue:
            return QUEUED
        return REJECTED

    async def wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self.waiting += 1
        try:
            await fut
        except BaseException:  # cancelled, or the coroutine closed (GeneratorExit)
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was already handed over: pass it on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise
        finally:
            self.waiting -= 1

    async def acquire(self) -> bool:
        """``admit()`` and, if queued, ``wait()``; False when rejected (nothing to release)."""
        state = self.admit()
        if state == REJECTED:
            return False
        if state == QUEUED:
            await self.wait()
        return True

    def release(self) -> None:
        self.running -= 1
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.running < self.max_running:
            fut = self._waiters.popleft()
            if not fut.done():
                self.running += 1
                fut.set_result(None)

    def resize(self, max_running: int, max_queue: int) -> None:
        self.max_running = max_running
        self.max_queue = max_queue
        self._grant()


# --- per-request knobs ---------------------------------------------------------------


class BadKnob(ValueError):
    pass


def knob_float(headers: Mapping[str, str], name: str, default: float) -> float:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadKnob(f"invalid {name} header: {raw!r}") from None
    if not value >= 0:
        raise BadKnob(f"invalid {name} header: {raw!r}")
    return value


def knob_int(
    headers: Mapping[str, str], name: str, default: int | None, minimum: int
) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadKnob(f"invalid {name} header: {raw!r}") from None
    if value < minimum:
        raise BadKnob(f"invalid {name} header: {raw!r} (minimum {minimum})")
    return value


class Knobs:
    """The ``x-sim-*`` timing / length knobs of one request (seconds and tokens)."""

    __slots__ = ("error_after", "itl", "output_tokens", "ttft")

    def __init__(self, ttft: float, itl: float, output_tokens: int, error_after: int | None):
        self.ttft = ttft
        self.itl = itl
        self.output_tokens = output_tokens
        self.error_after = error_after


def read_knobs(headers: Mapping[str, str], config: Any) -> Knobs:
    """``x-sim-ttft-ms``, ``x-sim-itl-ms``, ``x-sim-output-tokens``, ``x-sim-error-after``
    over the defaults in ``config`` (``ttft_ms``, ``itl_ms``, ``output_tokens``).
    Raises :class:`BadKnob` for a malformed header."""
    ttft = knob_float(headers, "x-sim-ttft-ms", config.ttft_ms) / 1000.0
    itl = knob_float(headers, "x-sim-itl-ms", config.itl_ms) / 1000.0
    out = knob_int(headers, "x-sim-output-tokens", config.output_tokens, 1)
    error_after = knob_int(headers, "x-sim-error-after", None, 0)
    assert out is not None
    return Knobs(ttft, itl, out, error_after)


def forced_status(headers: Mapping[str, str]) -> int | str | None:
    """The status asked for by ``x-sim-error`` (an int in 400..599), the raw header when it
    is malformed, or None when absent."""
    raw = headers.get("x-sim-error")
    if raw is None:
        return None
    try:
        status = int(raw)
    except ValueError:
        return raw
    return status if 400 <= status <= 599 else raw


# --- small helpers -------------------------------------------------------------------


def json_or_text(body: bytes) -> Any:
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


def plain_text(status: int, text: str, headers: list[tuple[str, str]] | None = None) -> Response:
    """A ``text/plain; charset=utf-8`` response (axum's rejections look like this)."""
    return Response(
        status, text.encode(), content_type="text/plain; charset=utf-8", headers=headers
    )


def bearer_ok(headers: Mapping[str, str], api_key: str | None) -> bool:
    """True when no key is configured or ``Authorization: Bearer <key>`` matches."""
    if not api_key:
        return True
    return headers.get("authorization", "") == f"Bearer {api_key}"


# --- axum / serde request checks ------------------------------------------------------


class SerdeError(ValueError):
    """A body serde would not deserialize; ``str(exc)`` is serde's message (with position)."""


def serde_unexpected(value: Any) -> str:
    """serde's description of an unexpected JSON value (``invalid type: <this>, ...``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        text = repr(value)
        return f"floating point `{text}`"
    if isinstance(value, str):
        return f'string "{value}"'
    if isinstance(value, list):
        return "sequence"
    return "map"


_EXPECTED = {
    "str": "a string",
    "bool": "a boolean",
    "f32": "f32",
    "u32": "u32",
    "u64": "u64",
    "usize": "usize",
    "i32": "i32",
    "vec_str": "a sequence",
    "vec_f32": "a sequence",
    "map": "a map",
}
_UNSIGNED = {"u32": 2**32 - 1, "u64": 2**64 - 1, "usize": 2**64 - 1}


def _position(raw: bytes, path: tuple[Any, ...], value: Any) -> str:
    """An approximation of serde_json's ``line L column C`` for an error at ``path``."""
    pos = 0
    for key in path:
        if not isinstance(key, str):
            continue
        found = raw.find(b'"' + key.encode() + b'"', pos)
        if found < 0:
            pos = len(raw)
            break
        pos = found + len(key) + 2
        colon = raw.find(b":", pos)
        if colon >= 0:
            pos = colon + 1
            while pos < len(raw) and raw[pos : pos + 1] in b" \t\r\n":
                pos += 1
    else:
        if path:
            with contextlib.suppress(TypeError):
                pos += len(orjson.dumps(value))
    line = raw.count(b"\n", 0, pos) + 1
    column = pos - (raw.rfind(b"\n", 0, pos) + 1)
    return f"line {line} column {column}"


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


def serde_check(
    raw: bytes, obj: dict[str, Any], schema: Mapping[str, tuple[str, bool]], prefix: tuple = ()
) -> None:
    """Check the fields of ``obj`` against ``schema`` (``name -> (kind, optional)``).

    Kinds: ``str``, ``bool``, ``f32``, ``u32``, ``u64``, ``usize``, ``i32``, ``vec_str``,
    ``vec_f32``, ``map``, ``any``. Only present fields are checked; null is fine for an
    optional one. Unknown fields are ignored (serde's default). Raises :class:`SerdeError`
    with serde_path_to_error's message, e.g. ``stop: invalid type: string "x", expected a
    sequence at line 1 column 30``.
    """
    for name, (kind, optional) in schema.items():
        if name not in obj or kind == "any":
            continue
        value = obj[name]
        path = (*prefix, name)
        if value is None:
            if optional:
                continue
            _fail(raw, path, value, f"invalid type: null, expected {_EXPECTED.get(kind, kind)}")
        if kind in ("vec_str", "vec_f32"):
            if not isinstance(value, list):
                _fail(raw, path, value, _type_msg(value, kind))
            inner = "str" if kind == "vec_str" else "f32"
            for i, item in enumerate(value):
                if not _scalar_ok(item, inner):
                    _fail(raw, (*path, i), item, _type_msg(item, inner))
            continue
        if not _scalar_ok(value, kind):
            if kind in _UNSIGNED and isinstance(value, int) and not isinstance(value, bool):
                _fail(raw, path, value, f"invalid value: integer `{value}`, expected {kind}")
            _fail(raw, path, value, _type_msg(value, kind))


def _type_msg(value: Any, kind: str) -> str:
    return f"invalid type: {serde_unexpected(value)}, expected {_EXPECTED.get(kind, kind)}"


def _scalar_ok(value: Any, kind: str) -> bool:
    if kind.startswith("struct ") or kind == "map":
        return isinstance(value, dict)
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "f32":
        return isinstance(value, int | float)
    if kind == "i32":
        return isinstance(value, int) and -(2**31) <= value < 2**31
    if kind in _UNSIGNED:
        return isinstance(value, int) and 0 <= value <= _UNSIGNED[kind]
    return True


def _fail(raw: bytes, path: tuple[Any, ...], value: Any, message: str) -> NoReturn:
    raise SerdeError(f"{_dotted(path)}: {message} at {_position(raw, path, value)}")


def serde_missing(raw: bytes, field: str, prefix: tuple = ()) -> SerdeError:
    where = f"{_dotted(prefix)}: " if prefix else ""
    line = raw.count(b"\n") + 1
    column = len(raw) - (raw.rfind(b"\n") + 1)
    return SerdeError(f"{where}missing field `{field}` at line {line} column {column}")


def serde_custom(raw: bytes, path: tuple[Any, ...], value: Any, message: str) -> SerdeError:
    where = f"{_dotted(path)}: " if path else ""
    return SerdeError(f"{where}{message} at {_position(raw, path, value)}")


def axum_json(
    req: Request, headers: list[tuple[str, str]] | None = None
) -> dict[str, Any] | Response:
    """What axum's ``Json<T>`` extractor does before the handler runs.

    415 without ``Content-Type: application/json``, 400 for a syntax error, 422 when the
    body is not a JSON object (all plain text); else the parsed object.
    """
    media = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    is_json = media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )
    if not is_json:
        return plain_text(415, "Expected request with `Content-Type: application/json`", headers)
    try:
        body = orjson.loads(req.body)
    except orjson.JSONDecodeError as exc:
        pos = exc.pos
        line = req.body.count(b"\n", 0, pos) + 1
        column = pos - (req.body.rfind(b"\n", 0, pos) + 1) + 1
        reason = "EOF while parsing a value" if pos >= len(req.body) else "expected value"
        return plain_text(
            400,
            f"Failed to parse the request body as JSON: {reason} at line {line} column {column}",
            headers,
        )
    if not isinstance(body, dict):
        return plain_text(
            422,
            "Failed to deserialize the JSON body into the target type: invalid type: "
            f"{serde_unexpected(body)}, expected a map at line 1 column {len(req.body)}",
            headers,
        )
    return body


def deserialize_error(exc: SerdeError, headers: list[tuple[str, str]] | None = None) -> Response:
    """axum's 422 for a body of the wrong shape."""
    return plain_text(
        422, f"Failed to deserialize the JSON body into the target type: {exc}", headers
    )


def payload_too_large(headers: list[tuple[str, str]] | None = None) -> Response:
    """axum's ``DefaultBodyLimit`` rejection."""
    return plain_text(413, "Failed to buffer the request body: length limit exceeded", headers)


# --- simulator control ---------------------------------------------------------------

CONFIG_KEYS: dict[str, type] = {
    "ttft_ms": float,
    "itl_ms": float,
    "output_tokens": int,
    "max_running": int,
    "max_queue": int,
    "error_status": int,
    "error_count": int,
    "health_status": int,
}


class SimControl:
    """Request history and run-time settings shared by all personalities.

    ``config`` is the personality's dataclass; it must have ``ttft_ms``, ``itl_ms``,
    ``output_tokens``, ``max_running``, ``max_queue`` and ``history``.

    ``GET /sim/requests`` lists the recorded requests, oldest first, each
    ``{"time", "method", "path", "query", "headers", "body"}`` (``body`` parsed JSON, the
    raw text when it is not JSON, or the personality's summary, e.g. of a multipart form);
    ``DELETE`` clears it. ``GET /sim/config`` shows the settings plus ``running`` /
    ``waiting``; ``POST /sim/config`` changes them (see :meth:`sim_config_update`).
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.scheduler = Scheduler(config.max_running, config.max_queue)
        self.history: deque[dict[str, Any]] = deque(maxlen=config.history)
        self.started = int(time.time())
        self.error_status: int | None = None
        self.error_count: int | None = None
        self.health_status = 200

    def add_control_routes(self, app: App) -> None:
        app.route("GET", "/sim/requests", self.sim_requests)
        app.route("DELETE", "/sim/requests", self.sim_requests_clear)
        app.route("GET", "/sim/config", self.sim_config)
        app.route("POST", "/sim/config", self.sim_config_update)

    def _record(self, req: Request, body: Any) -> None:
        self.history.append(
            {
                "time": time.time(),
                "method": req.method,
                "path": req.path,
                "query": req.query,
                "headers": req.headers,
                "body": body,
            }
        )

    def _configured_error(self) -> int | None:
        status = self.error_status
        if status is None:
            return None
        if self.error_count is not None:
            self.error_count -= 1
            if self.error_count <= 0:
                self.error_status = self.error_count = None
        return status

    def _control_error(self, message: str) -> Response:
        """The 400 a bad ``/sim/config`` request gets (personalities may restyle it)."""
        return Response(400, orjson.dumps({"error": message}))

    def _config_view(self) -> dict[str, Any]:
        view = asdict(self.config)
        view.update(
            error_status=self.error_status,
            error_count=self.error_count,
            health_status=self.health_status,
            running=self.scheduler.running,
            waiting=self.scheduler.waiting,
        )
        return view

    async def sim_requests(self, req: Request) -> Response:
        return Response(200, orjson.dumps(list(self.history)))

    async def sim_requests_clear(self, req: Request) -> Response:
        self.history.clear()
        return Response(200, b'{"cleared":true}')

    async def sim_config(self, req: Request) -> Response:
        return Response(200, orjson.dumps(self._config_view()))

    async def sim_config_update(self, req: Request) -> Response:
        """Change knobs at run time: ``{"ttft_ms": 50, "error_status": 503, ...}``.

        ``error_status`` makes every inference request fail with that status, or only the
        next ``error_count`` ones; ``null`` clears it. ``health_status`` is what ``/health``
        answers. Unknown keys are a 400.
        """
        try:
            update = orjson.loads(req.body or b"{}")
        except orjson.JSONDecodeError:
            return self._control_error("body must be a JSON object")
        if not isinstance(update, dict):
            return self._control_error("body must be a JSON object")
        unknown = sorted(set(update) - set(CONFIG_KEYS))
        if unknown:
            return self._control_error(f"unknown config keys: {', '.join(unknown)}")
        for key, value in update.items():
            nullable = key in ("error_status", "error_count")
            if value is None and nullable:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                return self._control_error(f"{key} must be a number")
            if value < 0 or (key == "output_tokens" and value < 1):
                return self._control_error(f"{key} out of range: {value}")
            if key == "error_status" and not 400 <= value <= 599:
                return self._control_error("error_status must be within 400..599")
        c = self.config
        for key, value in update.items():
            kind: Callable[[Any], Any] = CONFIG_KEYS[key]
            value = None if value is None else kind(value)
            if key == "error_status":
                self.error_status = value
            elif key == "error_count":
                self.error_count = value
            elif key == "health_status":
                self.health_status = int(value) if value else 200
            else:
                setattr(c, key, value)
        if "error_status" in update and "error_count" not in update:
            self.error_count = None
        self.scheduler.resize(c.max_running, c.max_queue)
        return Response(200, orjson.dumps(self._config_view()))


# --- CLI -----------------------------------------------------------------------------


def add_common_arguments(
    group: argparse._ArgumentGroup, defaults: Any, default_model: str, model_help: str = ""
) -> None:
    """The flags every personality takes (``tollgate up`` passes them for ``simulate:``)."""
    group.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help=model_help
        or "served model name; repeatable, the first is the one reported "
        f"(default {default_model})",
    )
    group.add_argument(
        "--ttft-ms",
        type=float,
        default=defaults.ttft_ms,
        help="time to first token / processing latency (x-sim-ttft-ms)",
    )
    group.add_argument(
        "--itl-ms", type=float, default=defaults.itl_ms, help="inter-token latency (x-sim-itl-ms)"
    )
    group.add_argument(
        "--output-tokens",
        type=int,
        default=defaults.output_tokens,
        help="natural output length in tokens (x-sim-output-tokens)",
    )
    group.add_argument("--max-running", type=int, default=defaults.max_running)
    group.add_argument("--max-queue", type=int, default=defaults.max_queue)
    group.add_argument(
        "--pod-name",
        default=os.environ.get("POD_NAME"),
        help="sent as x-inference-pod on every response (default $POD_NAME)",
    )
    group.add_argument(
        "--history", type=int, default=defaults.history, help="requests kept for /sim/requests"
    )


def common_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields every personality takes from the common flags (checked)."""
    if args.output_tokens < 1:
        raise SystemExit("--output-tokens must be >= 1")
    return {
        "ttft_ms": args.ttft_ms,
        "itl_ms": args.itl_ms,
        "output_tokens": args.output_tokens,
        "max_running": args.max_running,
        "max_queue": args.max_queue,
        "keep_alive_timeout": args.keep_alive_timeout,
        "pod_name": args.pod_name,
        "history": args.history,
    }


# --- tool calls (function calling), shared by the vLLM and TGI Messages personalities ---------


def pick_tool(tools: Any, tool_choice: Any) -> dict[str, Any] | None:
    """The function a tool call should use: the named one (``tool_choice`` as a name or
    ``{"type": "function", "function": {"name": ...}}``), else the first for ``auto`` and
    ``required``; None without tools or for ``none``. LookupError(name) for an unknown name.
    ``tools`` must already be a list of ``{"function": {...}}`` objects."""
    if not tools or tool_choice == "none":
        return None
    name: str | None = None
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
    elif isinstance(tool_choice, str) and tool_choice not in ("auto", "required"):
        name = tool_choice
    functions = [t["function"] for t in tools]
    if name is None:
        return functions[0]
    for fn in functions:
        if fn.get("name") == name:
            return fn
    raise LookupError(name)


def tool_arguments(tool: dict[str, Any], prompt: str) -> str:
    """Deterministic arguments that satisfy the function's JSON-schema ``parameters``."""
    schema = tool.get("parameters") or tool.get("arguments") or {}
    props = schema.get("properties") if isinstance(schema, dict) else None
    props = props if isinstance(props, dict) else {}
    words = textgen.generate_tokens("tool:" + prompt, max(1, len(props)))
    args: dict[str, Any] = {}
    for i, (name, spec) in enumerate(props.items()):
        spec = spec if isinstance(spec, dict) else {}
        kind = spec.get("type")
        if isinstance(spec.get("enum"), list) and spec["enum"]:
            args[name] = spec["enum"][0]
        elif kind == "integer":
            args[name] = i + 1
        elif kind == "number":
            args[name] = i + 1.5
        elif kind == "boolean":
            args[name] = True
        elif kind == "array":
            args[name] = []
        elif kind == "object":
            args[name] = {}
        else:
            args[name] = words[i].strip()
    return orjson.dumps(args).decode()
