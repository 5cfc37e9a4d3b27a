"""The processor's OpenTelemetry spans, children of Envoy's span for the request.

Envoy's OpenTelemetry tracer starts the request's trace and, for the ext_proc gRPC call, a client
span whose context it sends in the ``traceparent`` metadata of the ``Process`` stream (Envoy
>= 1.31). The processor reads it once per stream and, when the trace is sampled, records:

==================  ===========================================================================
tollgate.process    the whole ext_proc stream (server span); request id, model, backend, status,
                    gen_ai token counts when the processor saw them (non-streaming requests)
tollgate.auth       key lookup (store or per-worker cache)
tollgate.reserve    limits, concurrency and the credit reservation: one store round trip
tollgate.translate  the translator's rewrite of the request body and its serialization
tollgate.settle     settlement of a non-streaming request (queued to the store in a batch)
==================  ===========================================================================

A stream is settled later, by the worker that receives Envoy's access-log record for it
(``settle_service``). The processor puts the trace id and its ``tollgate.process`` span id in the
stream's dynamic metadata, and that worker records a ``tollgate.settle`` span under it, carrying
the tokens in and out, the credits charged and why the stream ended.

Why not the OpenTelemetry SDK: measured on the loadtest runner, its span objects, processor
queue and OTLP exporter cost ~70 µs of worker CPU per span (five spans a request: +35% CPU).
Here a phase only notes ``(name, start_ns, end_ns)`` while the request runs; at the end one tuple
per request joins a buffer, and a background task encodes the buffer straight into OTLP protobuf
(upb) and exports it over gRPC every second (or sooner at 2,048 requests). When the collector is
down, at most 50,000 requests' spans wait; older ones are dropped and counted. Unsampled or
untraced requests cost one metadata lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from random import getrandbits
from typing import Any

import grpc
import structlog
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from .config import GatewayConfig

log = structlog.get_logger("tollgate.tracing")

Phase = tuple[str, int, int]  # (span name, start, end) in ns since the epoch
TraceParent = tuple[bytes, bytes]  # (trace id, Envoy's span id)

FLUSH_INTERVAL_S = 1.0
FLUSH_AT = 2048  # requests buffered before an early flush
MAX_BUFFERED = 50_000  # requests kept while the collector is unreachable

_SERVER = trace_pb2.Span.SpanKind.SPAN_KIND_SERVER
_INTERNAL = trace_pb2.Span.SpanKind.SPAN_KIND_INTERNAL


def parse_traceparent(value: str) -> TraceParent | None:
    """A sampled W3C ``traceparent`` as (trace id, parent span id); None if absent, malformed or
    not sampled (then the processor records nothing)."""
    if len(value) != 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    try:
        trace_id = bytes.fromhex(value[3:35])
        span_id = bytes.fromhex(value[36:52])
        flags = int(value[53:55], 16)
    except ValueError:
        return None
    if not (flags & 1) or not any(trace_id) or not any(span_id):
        return None
    return trace_id, span_id


def _value(v: Any) -> common_pb2.AnyValue:
    if isinstance(v, bool):
        return common_pb2.AnyValue(bool_value=v)
    if isinstance(v, int):
        return common_pb2.AnyValue(int_value=v)
    if isinstance(v, float):
        return common_pb2.AnyValue(double_value=v)
    return common_pb2.AnyValue(string_value=str(v))


def _attrs(attributes: dict[str, Any]) -> list[common_pb2.KeyValue]:
    return [
        common_pb2.KeyValue(key=k, value=_value(v)) for k, v in attributes.items() if v is not None
    ]


class Tracing:
    """Buffers the processor's spans and exports them over OTLP/gRPC (when configured)."""

    def __init__(self, cfg: GatewayConfig, worker: int = 0) -> None:
        endpoint = cfg.otlp_endpoint
        self.enabled = endpoint is not None
        self.target = f"{endpoint.host}:{endpoint.port}" if endpoint else ""
        self.dropped = 0
        self._buffer: list[
            tuple[TraceParent, bytes, str, int, int, list[Phase], dict[str, Any]]
        ] = []
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._channel: grpc.aio.Channel | None = None
        if not self.enabled:
            return
        if not hasattr(common_pb2, "InstrumentationScope"):
            # xds-protos ships an old copy of opentelemetry/proto; whichever wheel is installed
            # last wins (the Makefile reinstalls opentelemetry-proto after everything else).
            raise RuntimeError(
                "opentelemetry.proto is the outdated copy from xds-protos; run "
                "`pip install --force-reinstall --no-deps opentelemetry-proto`"
            )
        self._resource = resource_pb2.Resource(
            attributes=_attrs(
                {
                    "service.name": f"{cfg.tracing.service_name}-processor",
                    "service.instance.id": f"worker-{worker}",
                    "process.pid": os.getpid(),
                }
            )
        )
        self._scope = common_pb2.InstrumentationScope(name="tollgate.processor")

    # ------------------------------------------------------------------ hot path
    @staticmethod
    def parent_of(metadata: Any) -> TraceParent | None:
        """Envoy's span context from the gRPC stream's invocation metadata."""
        for key, value in metadata or ():
            if key == "traceparent":
                return parse_traceparent(value)
        return None

    @staticmethod
    def new_span_id() -> bytes:
        return getrandbits(64).to_bytes(8, "big")

    def record(
        self,
        parent: TraceParent,
        start_ns: int,
        end_ns: int,
        phases: list[Phase],
        attributes: dict[str, Any],
        span_id: bytes | None = None,
        name: str = "tollgate.process",
    ) -> None:
        """Queue a span under ``parent`` (encoded at the next flush): the request's
        ``tollgate.process`` span with one child per phase, or (``name``, no phases) a span of
        its own, such as a stream's settlement."""
        buf = self._buffer
        if len(buf) >= MAX_BUFFERED:
            self.dropped += 1
            return
        buf.append(
            (parent, span_id or self.new_span_id(), name, start_ns, end_ns, phases, attributes)
        )
        if len(buf) == FLUSH_AT and self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------------ export
    def start(self) -> None:
        """Start the exporter task (inside the worker's event loop)."""
        if not self.enabled or self._task is not None:
            return
        self._wake = asyncio.Event()
        self._channel = grpc.aio.insecure_channel(self.target)
        self._task = asyncio.create_task(self._export_forever())

    def encode(self) -> trace_service_pb2.ExportTraceServiceRequest | None:
        """The buffered requests as one OTLP export request (and the buffer emptied)."""
        batch, self._buffer = self._buffer, []
        if not batch:
            return None
        spans: list[trace_pb2.Span] = []
        for (trace_id, parent_id), root_id, root_name, t0, t1, phases, attributes in batch:
            spans.append(
                trace_pb2.Span(
                    trace_id=trace_id,
                    span_id=root_id,
                    parent_span_id=parent_id,
                    name=root_name,
                    kind=_SERVER if root_name == "tollgate.process" else _INTERNAL,
                    start_time_unix_nano=t0,
                    end_time_unix_nano=t1,
                    attributes=_attrs(attributes),
                )
            )
            rid = _attrs({"tollgate.request_id": attributes.get("tollgate.request_id")})
            for name, p0, p1 in phases:
                spans.append(
                    trace_pb2.Span(
                        trace_id=trace_id,
                        span_id=self.new_span_id(),
                        parent_span_id=root_id,
                        name=name,
                        kind=_INTERNAL,
                        start_time_unix_nano=p0,
                        end_time_unix_nano=p1,
                        attributes=rid,
                    )
                )
        return trace_service_pb2.ExportTraceServiceRequest(
            resource_spans=[
                trace_pb2.ResourceSpans(
                    resource=self._resource,
                    scope_spans=[trace_pb2.ScopeSpans(scope=self._scope, spans=spans)],
                )
            ]
        )

    async def _export_forever(self) -> None:
        assert self._channel is not None and self._wake is not None
        stub = trace_service_pb2_grpc.TraceServiceStub(self._channel)
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_INTERVAL_S)
            self._wake.clear()
            failing = not await self._flush(stub, failing)

    async def _flush(self, stub: Any, failing: bool = False) -> bool:
        request = self.encode()
        if request is None:
            return True
        try:
            await stub.Export(request, timeout=5)
        except grpc.aio.AioRpcError as exc:
            if not failing:  # one line per outage, not one per batch
                log.warning("trace_export_failed", target=self.target, code=exc.code().name)
            return False
        return True

    async def aclose(self) -> None:
        """Flush what is buffered and stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            stub = trace_service_pb2_grpc.TraceServiceStub(self._channel)
            await self._flush(stub)
        if self._channel is not None:
            await self._channel.close()
