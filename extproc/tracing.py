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

Phases only note ``(name, start_ns, end_ns)`` in the request's state while it runs; the spans are
built when the stream ends, off the request's latency path. An unsampled or untraced request
costs one metadata lookup. Streams are settled later from Envoy's access log, outside any span.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    TraceFlags,
    set_span_in_context,
)

from .config import GatewayConfig

Phase = tuple[str, int, int]  # (span name, start, end) in ns since the epoch


def parse_traceparent(value: str) -> SpanContext | None:
    """A sampled W3C ``traceparent`` as a remote span context; None if absent, malformed or not
    sampled (then the processor records nothing)."""
    if len(value) != 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    try:
        trace_id = int(value[3:35], 16)
        span_id = int(value[36:52], 16)
        flags = int(value[53:55], 16)
    except ValueError:
        return None
    if not (flags & 1) or trace_id == 0 or span_id == 0:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))


class Tracing:
    """Exports the processor's spans over OTLP/gRPC when an endpoint is configured."""

    def __init__(self, cfg: GatewayConfig, worker: int = 0) -> None:
        endpoint = cfg.otlp_endpoint
        self.enabled = endpoint is not None
        self._provider: TracerProvider | None = None
        if endpoint is None:
            return
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        resource = Resource.create(
            {
                "service.name": f"{cfg.tracing.service_name}-processor",
                "service.instance.id": f"worker-{worker}",
            }
        )
        self._provider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(
            endpoint=f"http://{endpoint.host}:{endpoint.port}", insecure=True
        )
        self._provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=1000, max_export_batch_size=512)
        )
        self._tracer = self._provider.get_tracer("tollgate.processor")

    @staticmethod
    def parent_of(metadata: Any) -> SpanContext | None:
        """Envoy's span context from the gRPC stream's invocation metadata."""
        for key, value in metadata or ():
            if key == "traceparent":
                return parse_traceparent(value)
        return None

    def record(
        self,
        parent: SpanContext,
        start_ns: int,
        end_ns: int,
        phases: list[Phase],
        attributes: dict[str, Any],
    ) -> None:
        """Emit the request's span tree under ``parent``."""
        tracer = self._tracer
        root = tracer.start_span(
            "tollgate.process",
            context=set_span_in_context(NonRecordingSpan(parent)),
            kind=SpanKind.SERVER,
            attributes={k: v for k, v in attributes.items() if v is not None},
            start_time=start_ns,
        )
        ctx = set_span_in_context(root)
        rid = attributes.get("tollgate.request_id")
        for name, t0, t1 in phases:
            child = tracer.start_span(
                name,
                context=ctx,
                attributes={"tollgate.request_id": rid} if rid else None,
                start_time=t0,
            )
            child.end(end_time=t1)
        root.end(end_time=end_ns)

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
