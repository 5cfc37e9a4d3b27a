"""One distributed trace per request: Envoy's spans and the processor's, linked, with the request
id on them. A small OTLP/gRPC receiver on loopback stands in for the collector."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.harness import Gateway, base_config, free_port_block, start_gateway

HELLO = [{"role": "user", "content": "trace me"}]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it is sent, flattened with its service name."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        rows = []
        for rs in request.resource_spans:
            service = next(
                (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"),
                "",
            )
            for ss in rs.scope_spans:
                for span in ss.spans:
                    attrs = {}
                    for a in span.attributes:
                        v = a.value
                        attrs[a.key] = (
                            getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
                        )
                    rows.append(
                        {
                            "service": service,
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "attrs": attrs,
                        }
                    )
        with self.lock:
            self.spans.extend(rows)
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.spans)


def _traced_gateway(tmp: Path, sample_ratio: float) -> Iterator[tuple[Gateway, Receiver]]:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = free_port_block()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    cfg = base_config()
    cfg["tracing"] = {
        "otlp_endpoint": f"127.0.0.1:{port}",
        "service_name": "tollgate",
        "sample_ratio": sample_ratio,
    }
    gw = start_gateway(tmp, cfg)
    try:
        yield gw, receiver
    finally:
        gw.stack.stop()
        server.stop(0)


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Receiver]]:
    yield from _traced_gateway(Path(tmp_path_factory.mktemp("traced")), 1.0)


@pytest.fixture(scope="module")
def half_traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Receiver]]:
    yield from _traced_gateway(Path(tmp_path_factory.mktemp("half")), 0.5)


def _wait_for(receiver: Receiver, rids: list[str], timeout: float = 20.0) -> list[dict[str, Any]]:
    """Spans once every request id shows up on both Envoy's and the processor's side."""
    deadline = time.monotonic() + timeout
    while True:
        spans = receiver.snapshot()
        envoy = {s["attrs"].get("guid:x-request-id") for s in spans}
        proc = {s["attrs"].get("tollgate.request_id") for s in spans}
        if all(r in envoy and r in proc for r in rids) or time.monotonic() > deadline:
            return spans
        time.sleep(0.2)


def test_one_trace_per_request_with_envoy_and_processor_spans_linked(
    traced: tuple[Gateway, Receiver],
) -> None:
    gw, receiver = traced
    client = openai.OpenAI(base_url=gw.v1, api_key=gw.key, max_retries=0, timeout=20)
    rids = [f"trace-{i}-{uuid.uuid4().hex[:8]}" for i in range(4)]
    for rid in rids[:3]:
        client.chat.completions.create(
            model="sim-chat", messages=HELLO, extra_headers={"X-Request-ID": rid}
        )
    stream = client.chat.completions.create(
        model="sim-chat", messages=HELLO, stream=True, extra_headers={"X-Request-ID": rids[3]}
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    spans = _wait_for(receiver, rids)
    deadline = time.monotonic() + 10  # the stream's settlement comes from Envoy's access log
    while not any(
        s["name"] == "tollgate.settle" and s["attrs"].get("tollgate.request_id") == rids[3]
        for s in spans
    ):
        assert time.monotonic() < deadline, "no settlement span for the stream"
        time.sleep(0.2)
        spans = receiver.snapshot()

    by_trace: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in spans:
        by_trace[s["trace_id"]].append(s)
    for rid in rids:
        ingress = [s for s in spans if s["attrs"].get("guid:x-request-id") == rid]
        assert ingress, f"no Envoy span for {rid}"
        trace_ids = {s["trace_id"] for s in ingress}
        assert len(trace_ids) == 1, f"{rid} spread over {len(trace_ids)} traces"
        trace = by_trace[trace_ids.pop()]
        services = {s["service"] for s in trace}
        assert services == {"tollgate-envoy", "tollgate-processor"}, services
        assert {s["attrs"].get("guid:x-request-id") for s in trace} <= {rid, None}
        ids = {s["span_id"]: s for s in trace}
        (process,) = [s for s in trace if s["name"] == "tollgate.process"]
        assert process["attrs"]["tollgate.request_id"] == rid
        assert process["attrs"]["gen_ai.request.model"] == "sim-chat"
        assert process["attrs"]["tollgate.backend"] == "vllm-chat"
        assert process["attrs"]["http.response.status_code"] == 200
        # The processor's root span is a child of one of Envoy's spans in the same trace.
        assert ids[process["parent"]]["service"] == "tollgate-envoy"
        children = {s["name"] for s in trace if s["parent"] == process["span_id"]}
        expected = {"tollgate.auth", "tollgate.reserve", "tollgate.translate", "tollgate.settle"}
        assert children == expected, children
        if rid != rids[3]:  # non-streaming: settled by the processor, tokens known
            assert process["attrs"]["gen_ai.usage.input_tokens"] > 0
            assert process["attrs"]["gen_ai.usage.output_tokens"] == 12
        else:  # a stream: settled from Envoy's access log, in a span of its own
            (settle,) = [s for s in trace if s["name"] == "tollgate.settle"]
            assert settle["attrs"]["gen_ai.usage.output_tokens"] == 12
            assert settle["attrs"]["gen_ai.usage.input_tokens"] > 0
            assert settle["attrs"]["tollgate.settle.reason"] == "settled"
            assert settle["attrs"]["tollgate.credits.charged_micro"] > 0
        for s in trace:
            if s["service"] == "tollgate-processor":
                assert s["attrs"]["tollgate.request_id"] == rid


def test_unauthenticated_request_is_traced_with_auth_only(
    traced: tuple[Gateway, Receiver],
) -> None:
    gw, receiver = traced
    rid = "trace-401-" + uuid.uuid4().hex[:8]
    r = httpx.post(
        gw.v1 + "/chat/completions", headers={"X-Request-ID": rid}, json={"model": "sim-chat"}
    )
    assert r.status_code == 401
    spans = [s for s in _wait_for(receiver, [rid]) if s["attrs"].get("tollgate.request_id") == rid]
    names = {s["name"] for s in spans}
    assert names == {"tollgate.process", "tollgate.auth"}
    (process,) = [s for s in spans if s["name"] == "tollgate.process"]
    assert process["attrs"]["http.response.status_code"] == 401


def test_sample_ratio_traces_a_share_and_honours_the_clients_decision(
    half_traced: tuple[Gateway, Receiver],
) -> None:
    """``sample_ratio: 0.5``: about half of the plain requests are traced (both services, or
    neither); a client's traceparent decides for its request, sampled or not."""
    gw, receiver = half_traced
    client = openai.OpenAI(base_url=gw.v1, api_key=gw.key, max_retries=0, timeout=20)
    plain = [f"half-{i}-{uuid.uuid4().hex[:8]}" for i in range(40)]
    for rid in plain:
        client.chat.completions.create(
            model="sim-chat", messages=HELLO, extra_headers={"X-Request-ID": rid}
        )
    chosen = [(uuid.uuid4().hex, f"chosen-{i}-{uuid.uuid4().hex[:8]}") for i in range(3)]
    refused = f"refused-{uuid.uuid4().hex[:8]}"
    for trace_id, rid in chosen:
        client.chat.completions.create(
            model="sim-chat",
            messages=HELLO,
            extra_headers={"X-Request-ID": rid, "traceparent": f"00-{trace_id}-{'1' * 16}-01"},
        )
    client.chat.completions.create(
        model="sim-chat",
        messages=HELLO,
        extra_headers={
            "X-Request-ID": refused,
            "traceparent": f"00-{uuid.uuid4().hex}-{'2' * 16}-00",
        },
    )
    spans = _wait_for(receiver, [rid for _, rid in chosen])
    time.sleep(2.5)  # both exporters flush every second: let the sampled plain ones arrive
    spans = receiver.snapshot()
    envoy = {s["attrs"].get("guid:x-request-id") for s in spans}
    proc = {s["attrs"].get("tollgate.request_id") for s in spans}
    traced_plain = [rid for rid in plain if rid in envoy]
    # Binomial(40, 0.5): outside 6..34 has a probability below 1e-5.
    assert 6 <= len(traced_plain) <= 34, len(traced_plain)
    assert {rid for rid in plain if rid in proc} == set(traced_plain)  # whole traces or none
    for trace_id, rid in chosen:
        mine = [s for s in spans if s["trace_id"] == trace_id]
        assert {s["service"] for s in mine} == {"tollgate-envoy", "tollgate-processor"}, rid
        assert rid in {s["attrs"].get("tollgate.request_id") for s in mine}
    assert refused not in envoy and refused not in proc
