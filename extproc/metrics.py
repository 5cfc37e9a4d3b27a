"""Prometheus metrics of one worker, served as text on ``processor.metrics_port + index``.

A deliberately small registry (no locks: a worker is one asyncio thread), cheap enough for the
hot path: a counter increment is a dict update, a histogram observation a bisect. Envoy's own
statistics (ext_proc, clusters, health checks) are at its admin port's
``/stats/prometheus``; these are the gateway's.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Sequence

import httptools

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
PHASE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(
        f'{n}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for n, v in zip(names, values, strict=True)
    )
    return "{" + pairs + "}"


class Counter:
    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = name, help_text, tuple(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *label_values: str, amount: float = 1) -> None:
        self.values[label_values] = self.values.get(label_values, 0) + amount

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for values, n in self.values.items():
            out.append(f"{self.name}{_labels(self.labels, values)} {n:g}")
        return out


class Histogram:
    def __init__(
        self, name: str, help_text: str, labels: Sequence[str] = (), buckets=LATENCY_BUCKETS
    ) -> None:
        self.name, self.help, self.labels = name, help_text, tuple(labels)
        self.buckets = tuple(buckets)
        self.series: dict[tuple[str, ...], list[float]] = {}  # counts per bucket + [sum, count]

    def observe(self, value: float, *label_values: str) -> None:
        s = self.series.get(label_values)
        if s is None:
            s = self.series[label_values] = [0.0] * (len(self.buckets) + 2)
        i = bisect_left(self.buckets, value)
        if i < len(self.buckets):  # above the last bucket: only +Inf (the count) holds it
            s[i] += 1
        s[-2] += value
        s[-1] += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        names = (*self.labels, "le")
        for values, s in self.series.items():
            cumulative = 0.0
            for i, bound in enumerate(self.buckets):
                cumulative += s[i]
                out.append(
                    f"{self.name}_bucket{_labels(names, (*values, f'{bound:g}'))} {cumulative:g}"
                )
            out.append(f"{self.name}_bucket{_labels(names, (*values, '+Inf'))} {s[-1]:g}")
            out.append(f"{self.name}_sum{_labels(self.labels, values)} {s[-2]:.6f}")
            out.append(f"{self.name}_count{_labels(self.labels, values)} {s[-1]:g}")
        return out


def _noop(*_args: object, **_kwargs: object) -> None:
    return None


class Metrics:
    """Everything a worker exports. ``enabled=False`` (``processor.metrics: false``) makes every
    update a no-op: the loadtest runner measures what metrics cost against it."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.requests = Counter(
            "tollgate_requests_total",
            "Requests by model, backend, dialect and the status the client got.",
            ("model", "backend", "dialect", "status"),
        )
        self.tokens = Counter(
            "tollgate_tokens_total",
            "Settled tokens (gen_ai.client.token.usage): type is input or output.",
            ("model", "type"),
        )
        self.duration = Histogram(
            "tollgate_request_duration_seconds",
            "Time from the request's headers to the end of the processor's part (for streams:"
            " until the response headers).",
            ("model",),
        )
        self.ttft = Histogram(
            "tollgate_time_to_first_token_seconds",
            "Metered streams: from the request's arrival at Envoy to the backend's first chunk.",
            ("model",),
            TOKEN_BUCKETS,
        )
        self.tpot = Histogram(
            "tollgate_time_per_output_token_seconds",
            "Metered streams: (last chunk - first chunk) / (output tokens - 1).",
            ("model",),
            TOKEN_BUCKETS,
        )
        self.phase = Histogram(
            "tollgate_processor_phase_seconds",
            "Processor time per ext_proc message, by phase.",
            ("phase",),
            PHASE_BUCKETS,
        )
        self.credits = Counter(
            "tollgate_credits_micro_total",
            "Micro-credits by movement: reserved, settled (charged).",
            ("movement",),
        )
        self.expired = Counter(
            "tollgate_reservations_expired_total",
            "Reservations nobody settled in time, charged at the reserved amount by the sweeper.",
        )
        self.refusals = Counter(
            "tollgate_refusals_total", "Requests refused by metering, by code.", ("code",)
        )
        self.settle_resends = Counter(
            "tollgate_settle_resends_total",
            "Settlements sent again because the store was out of reach (settle_retry.py), by"
            " outcome: settled (the store took it), failed (it answered an error), expired (the"
            " reservation timed out first: the sweeper's), dropped (too many waiting).",
            ("outcome",),
        )
        self.settle_records = Counter(
            "tollgate_settle_records_total",
            "Finished metered streams from Envoy's settling access logs, by log: tollgate_settle"
            " (batched, up to 20 ms) or tollgate_settle_now (2 ms batches); and requests whose"
            " processor failed, voided (tollgate_settle_failed).",
            ("log",),
        )

        if not enabled:
            for metric in self._all():
                if isinstance(metric, Counter):
                    metric.inc = _noop  # type: ignore[method-assign]
                else:
                    metric.observe = _noop  # type: ignore[method-assign]

    def _all(self) -> tuple[Counter | Histogram, ...]:
        return (
            self.requests,
            self.tokens,
            self.duration,
            self.ttft,
            self.tpot,
            self.phase,
            self.credits,
            self.expired,
            self.settle_resends,
            self.refusals,
            self.settle_records,
        )

    def render(self) -> bytes:
        lines: list[str] = []
        for metric in self._all():
            lines += metric.render()
        return ("\n".join(lines) + "\n").encode()


class _MetricsProtocol(asyncio.Protocol):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport:
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        if self.transport is None:
            return
        if self.url.split(b"?")[0] == b"/metrics":
            status, ctype, body = b"200 OK", b"text/plain; version=0.0.4", self.metrics.render()
        else:
            status, ctype, body = b"404 Not Found", b"text/plain", b"not found\n"
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: " + ctype
            + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )  # fmt: skip


async def serve_metrics(metrics: Metrics, host: str, port: int) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _MetricsProtocol(metrics), host, port)
