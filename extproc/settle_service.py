"""Stream settlement inside each worker, fed by Envoy (no ext_proc message per chunk):

* ``AccessLogService`` — Envoy's gRPC access logger streams a record for every finished metered
  stream, batched (``envoy_config._settle_logs``). The record carries the last usage the
  stream meter read (vLLM reports it on every chunk; for other backends, a cut stream's counted
  chunks), so a stream that ran to the end and one the client cut off are both charged for what
  was generated. A message's records settle in one store call (``Ledger.settle_many``), each
  idempotent by request id. A third log sends a record for each request whose processor failed
  mid-way (a worker died; the client got a 503): its reservation is voided.
* ``sweep_forever`` — reservations nobody settled (a worker or the store died in between) are
  charged at the reserved amount once they time out, with a ledger entry saying so; and ledger
  entries older than the retention are folded into a checkpoint entry.
"""

from __future__ import annotations

import asyncio
import contextlib
from time import time, time_ns
from typing import Any

import structlog
from envoy.service.accesslog.v3 import als_pb2_grpc

from .envoy_config import FAILED_LOG, METADATA_NS, TIMING_NS, USAGE_NS
from .ledger import Ledger
from .metering import Meter
from .metrics import Metrics
from .tracing import Tracing

log = structlog.get_logger("tollgate.settle")
PROCESSOR_FAILED = "processor_failed"  # the void's reason for a request whose processor failed


def _string(fields: Any, key: str) -> str:
    """A string value of a metadata Struct's fields ("" when absent or not a string)."""
    return fields[key].string_value if key in fields else ""


def _usage(fields: Any) -> dict[str, float] | None:
    """prompt_tokens and completion_tokens of the tollgate.usage namespace (None: unknown), and
    "counted" when the stream meter counted them (the backend's usage never came)."""
    if "prompt_tokens" not in fields or "completion_tokens" not in fields:
        return None
    usage = {
        "prompt_tokens": fields["prompt_tokens"].number_value,
        "completion_tokens": fields["completion_tokens"].number_value,
    }
    if "counted" in fields and fields["counted"].number_value > 0:
        usage["counted"] = 1
    return usage


class SettleLog(als_pb2_grpc.AccessLogServiceServicer):
    """Settles finished metered streams from Envoy's gRPC access log."""

    def __init__(self, meter: Meter, metrics: Metrics, tracing: Tracing | None = None) -> None:
        self.meter = meter
        self.metrics = metrics
        self.tracing = tracing if tracing is not None and tracing.enabled else None

    async def StreamAccessLogs(self, request_iterator: Any, context: Any) -> Any:
        from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsResponse

        log_name = "-"  # the logger's name comes in a stream's first message
        async for message in request_iterator:
            if message.HasField("identifier"):
                log_name = message.identifier.log_name or "-"
            # A batch's records are settled in one store call (SETTLE_MANY), then each is
            # counted. Only the fields used are read.
            records: list[tuple[str, dict[str, float] | None, int, str]] = []
            seen: list[tuple[Any, Any, Any, dict[str, float] | None, int, str]] = []
            failed = log_name == FAILED_LOG
            for entry in message.http_logs.log_entry:
                fm = entry.common_properties.metadata.filter_metadata
                if failed:
                    # its processor failed (a worker died) and the client got a 503: void
                    # what it reserved (the request id is the x-request-id the processor read
                    # or set). A metered stream's record comes in its settling log as well,
                    # which settles it: not here.
                    rid = entry.request.request_id
                    if rid and not (METADATA_NS in fm and "settle_now" in fm[METADATA_NS].fields):
                        status = entry.response.response_code.value
                        records.append((rid, None, status, PROCESSOR_FAILED))
                        seen.append((entry, fm, {}, None, status, PROCESSOR_FAILED))
                    continue
                if METADATA_NS not in fm:
                    continue
                md = fm[METADATA_NS].fields
                rid = _string(md, "request_id")
                if not rid:
                    continue
                usage_md = fm[USAGE_NS].fields if USAGE_NS in fm else None
                usage = _usage(usage_md) if usage_md is not None else None
                status = entry.response.response_code.value
                if usage_md is not None and "failed" in usage_md:
                    # the backend's stream failed (an error event) before its first token:
                    # nothing was generated, and a failed request with no tokens is voided
                    status = 502
                flags = entry.common_properties.response_flags
                # HTTP/1.1 clients give up by closing the connection, HTTP/2+ ones by resetting
                # the stream (RST_STREAM)
                if flags.downstream_connection_termination or flags.downstream_remote_reset:
                    reason = "client_disconnected"
                elif (
                    flags.upstream_request_timeout
                    or flags.upstream_connection_termination
                    or flags.upstream_remote_reset
                ):
                    reason = "backend_cut_off"
                else:
                    reason = "settled"
                records.append((rid, usage, status, reason))
                seen.append((entry, fm, md, usage, status, reason))
            if not records:
                continue
            self.metrics.settle_records.inc(log_name, amount=len(records))
            t0 = time_ns()

            def count(results: list[Any], seen: list[Any] = seen, t0: int = t0) -> None:
                self._count(seen, results, t0)

            try:
                # a batch the store was out of reach for goes again later; then count()
                results = await self.meter.settle_many(records, then=count)
            except Exception as exc:
                log.error(
                    "log_settle_failed",
                    records=len(records),
                    request_ids=[r[0] for r in records],
                    error=str(exc),
                )
                continue
            count(results)
        return StreamAccessLogsResponse()

    def _count(self, seen: list[Any], results: list[Any], t0: int) -> None:
        """A settled batch's metrics (and traces), record by record."""
        for (entry, fm, md, usage, status, reason), settled in zip(seen, results, strict=True):
            if isinstance(settled, Exception):  # the sweeper charges this one later
                log.error(
                    "log_settle_failed",
                    request_id=_string(md, "request_id"),
                    error=str(settled),
                )
                continue
            model = _string(md, "model") or "-"
            if self.tracing is not None and _string(md, "trace_id"):
                self._trace(md, t0, usage, status, reason, settled.charged)
            if TIMING_NS in fm and status == 200:
                self._observe_timing(entry.common_properties, fm[TIMING_NS], usage, model)
            if settled.status == "ok":
                self.metrics.credits.inc("settled", amount=settled.charged)
                if usage:
                    for kind, field in (
                        ("input", "prompt_tokens"),
                        ("output", "completion_tokens"),
                    ):
                        if isinstance(usage.get(field), int | float):
                            self.metrics.tokens.inc(model, kind, amount=usage[field])

    def _trace(
        self,
        md: Any,
        t0: int,
        usage: dict[str, Any] | None,
        status: int,
        reason: str,
        charged: int,
    ) -> None:
        """The stream's ``tollgate.settle`` span, a child of the processor's span for it."""
        assert self.tracing is not None
        try:
            parent = (bytes.fromhex(_string(md, "trace_id")), bytes.fromhex(_string(md, "span_id")))
        except ValueError:
            return
        if not parent[0] or not parent[1]:
            return
        usage = usage or {}
        self.tracing.record(
            parent,
            t0,
            time_ns(),
            [],
            {
                "tollgate.request_id": _string(md, "request_id"),
                "gen_ai.request.model": _string(md, "model") or None,
                "gen_ai.usage.input_tokens": _int(usage.get("prompt_tokens")),
                "gen_ai.usage.output_tokens": _int(usage.get("completion_tokens")),
                "http.response.status_code": status or None,
                "tollgate.settle.reason": reason,
                "tollgate.credits.charged_micro": charged,
            },
            name="tollgate.settle",
        )

    def _observe_timing(
        self, props: Any, timing: Any, usage: dict[str, Any] | None, model: str
    ) -> None:
        """Time to first token and time per output token of a stream that ran to the end."""
        first = timing.fields.get("first_chunk_us")
        if first is None or not first.string_value.isdigit():
            return
        start_us = props.start_time.seconds * 1_000_000 + props.start_time.nanos // 1000
        ttft = (int(first.string_value) - start_us) / 1e6
        if ttft < 0:
            return
        self.metrics.ttft.observe(ttft, model)
        last = props.time_to_last_upstream_rx_byte
        tokens = (usage or {}).get("completion_tokens")
        if isinstance(tokens, int | float) and tokens > 1 and (last.seconds or last.nanos):
            span = last.seconds + last.nanos / 1e9 - ttft
            if span >= 0:
                self.metrics.tpot.observe(span / (tokens - 1), model)


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) else None


async def sweep_forever(
    ledger: Ledger, interval_s: float, metrics: Metrics, retention_s: float | None = None
) -> None:
    """Every ``interval_s``: charge expired reservations. And, with a retention, fold ledger
    entries older than it into checkpoints (``Ledger.fold_all``) every tenth of the retention
    (at most hourly), by one worker at a time (a lock in the store)."""
    next_fold = 0.0
    while True:
        await asyncio.sleep(interval_s)
        with contextlib.suppress(Exception):
            n = await ledger.sweep()
            if n:
                metrics.expired.inc(amount=n)
                log.warning("reservations_expired", count=n)
        if not retention_s or time() < next_fold:
            continue
        fold_every = min(retention_s / 10, 3600.0)
        next_fold = time() + fold_every
        try:
            if await ledger.claim_fold(fold_every):
                folded = await ledger.fold_all(int((time() - retention_s) * 1000))
                if folded:
                    log.info("ledger_folded", entries=folded)
        except Exception as exc:  # the next interval tries again
            log.warning("ledger_fold_failed", error=str(exc))
