"""The ext_proc phase machine: one gRPC stream per HTTP request.

Messages per request (Envoy sends only what the route and the mode overrides ask for):

=====================  ===============================================================
request headers        auth, request id, route by path, size check; ``GET /v1/models``
                       answered here (1 message in all)
request body           parse once (orjson), validate, resolve model -> backend, let the
                       translator rewrite the body, set the routing header, clear the
                       route cache
response headers       status mapping, ``X-Gateway-*`` headers; asks for the body only
                       when the translator must see it (backend error, aliased model)
response body          only on request: error normalization or per-event rewriting
=====================  ===============================================================

So a non-streaming request costs 3 messages and a stream from an OpenAI-speaking backend costs
the same 3, with no message per chunk. The common answers are built once and reused. The
envelope and per-model proxy dialects run through the same phases; what differs (paths, shapes,
their message counts) is in ``dialects.py``.

Audio and images (``media.py``): speech and image generations cost 3 (charged by what the
request says; the audio or images never pass the processor); a transcription costs 3 when its
model is priced per request and 4 when per audio second (the transcript is read for its
duration). Of an upload the request-body message carries only the head of the form, whole only
when it fits Envoy's buffer limit; the rest streams to the backend.
"""

from __future__ import annotations

import re
import time
import uuid
from time import perf_counter, time_ns
from typing import Any

import grpc
import orjson
import redis.exceptions
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from google.protobuf.struct_pb2 import Struct

from . import control_routes, health, logs, openapi
from . import messages as m
from .auth import Authenticator, Principal
from .config import Backend, GatewayConfig, Model
from .dialects import (
    DIALECT_KEY,
    ENVELOPE,
    OPENAI,
    Envelope,
    ProxyTranslator,
    dialect_of,
    envelope_route,
    error_body,
    proxy_target,
)
from .envoy_config import (
    METADATA_NS,
    ROUTE_HEADER,
    TRAILERS_HEADER,
    USAGE_NS,
    stream_route_value,
)
from .errors import GatewayError
from .ledger import Reservation
from .media import FormUpload
from .metering import GENERATIVE, Meter, rate_headers, settled_headers
from .metrics import Metrics
from .operations import MODELS_PATH, POST_OPERATIONS, ModelCatalog, Operation
from .tracing import Phase, TraceParent, Tracing
from .translators import Translator, for_backend
from .validation import MALFORMED_JSON, json_object, require_model

log = structlog.get_logger("tollgate.processor")

_STORE_DOWN = GatewayError(
    "gateway_unavailable", "The gateway's store is unreachable; the request was not forwarded."
)
_OVERLOADED = GatewayError(
    "gateway_overloaded", "The gateway is at capacity; retry shortly.", retry_after=1
)
_INTERNAL = GatewayError("internal_error", "The gateway failed to process the request.")
_NO_BODY = GatewayError("invalid_request_error", "This endpoint needs a JSON request body.")

# A client's X-Request-ID is kept when it is 1-128 of these characters; otherwise the gateway
# makes one and says why in X-Request-ID-Replaced ("missing" is not reported: Envoy makes one).
_SANE_ID = re.compile(r"[A-Za-z0-9._:@/+=~-]{1,128}")
REPLACED_HEADER = "x-request-id-replaced"
HEALTH_SUFFIX = "/health"
_GRPC_HEADERS = ("grpc-status", "grpc-message", "grpc-accept-encoding")  # transcoded answers


class RequestState:
    """What one request's phases share."""

    __slots__ = (
        "backend",
        "backend_status",
        "buffered",
        "client_path",
        "control",
        "defer_settle",
        "dialect",
        "envelope",
        "health",
        "http1",
        "id_note",
        "model",
        "op",
        "path",
        "phases",
        "principal",
        "proxy",
        "request_id",
        "reservation",
        "settled",
        "span_id",
        "started",
        "started_ms",
        "status",
        "stream",
        "t0_ns",
        "timeout_s",
        "trace",
        "trailers",
        "translator",
        "upload",
        "usage",
    )

    def __init__(self) -> None:
        self.request_id = ""
        self.principal: Principal | None = None
        self.op: Operation | None = None
        self.model: Model | None = None
        self.backend: Backend | None = None
        self.translator: Translator | None = None
        self.backend_status = 0
        self.buffered = False  # response body BUFFERED (whole body in one message)
        self.http1 = False  # the client speaks HTTP/1.x (trailers never reach it)
        self.trailers = False  # the stream's credits go out as HTTP/2 trailers too
        self.control = False  # a control-API call (transcoded by Envoy, served by a worker)
        self.health = False  # GET /v1/models/{id}/health: Envoy's admin /clusters, mapped
        self.reservation: Reservation | None = None
        self.settled = False  # settled here, or handed to Envoy's stream meter (streams)
        self.stream = False
        self.started = time.monotonic()
        self.started_ms = 0
        self.status = 0  # what the client was told (0: the stream ended before a response)
        self.id_note = ""  # why the client's X-Request-ID was replaced ("" if kept)
        self.trace: TraceParent | None = None  # Envoy's sampled span (tracing on), else None
        self.phases: list[Phase] | None = None  # (span, start_ns, end_ns) while traced
        self.span_id = b""  # the tollgate.process span's id while traced
        self.t0_ns = 0
        self.usage: dict[str, float] | None = None
        self.path = ""  # the operation's OpenAI path (the client's, in the OpenAI dialect)
        self.client_path = ""  # the client's path, without the query
        self.dialect = OPENAI
        self.envelope: Envelope | None = None  # the envelope dialect's response side
        self.proxy: ProxyTranslator | None = None  # the per-model proxy's route and translator
        self.timeout_s: float | None = None  # X-Request-Timeout
        self.defer_settle = False  # settle once the translator has read usage from the body
        self.upload: FormUpload | None = None  # a multipart upload (only its head is seen)

    def id_headers(self) -> list[tuple[str, str]]:
        """The request id (and why it was replaced) for a response the processor shapes."""
        if self.id_note:
            return [("x-request-id", self.request_id), (REPLACED_HEADER, self.id_note)]
        return [("x-request-id", self.request_id)]


class Processor(ep_grpc.ExternalProcessorServicer):
    def __init__(
        self,
        cfg: GatewayConfig,
        auth: Authenticator,
        meter: Meter,
        metrics: Metrics,
        tracing: Tracing | None = None,
    ) -> None:
        self.cfg = cfg
        self.tracing = tracing if tracing is not None and tracing.enabled else None
        self.metrics = metrics
        self.auth = auth
        self.meter = meter
        self.metered = cfg.metering.enabled  # off: no reservation, no settlement, no limits
        self.catalog = ModelCatalog(cfg)
        self.max_body = cfg.listener.max_request_body_bytes
        self.max_upload = cfg.listener.max_upload_bytes
        self.max_inflight = cfg.processor.max_inflight
        self.inflight = 0
        self.debug = logs.debug_enabled()  # one line per phase at debug level
        self.openapi_body = openapi.body(cfg)

    # ------------------------------------------------------------------ gRPC entry
    async def Process(self, request_iterator: Any, context: Any) -> None:
        # The reader/writer form (context.read/write); against an async-generator handler it
        # measured the same within noise. grpc.aio's own cost per message dominates either way.
        st = RequestState()
        self.inflight += 1
        if self.tracing is not None:
            st.trace = Tracing.parent_of(context.invocation_metadata())
            if st.trace is not None:
                st.phases = []
                st.span_id = Tracing.new_span_id()
                st.t0_ns = time_ns()
        read, write, eof = context.read, context.write, grpc.aio.EOF
        try:
            while True:
                req = await read()
                if req is eof:
                    return
                phase = req.WhichOneof("request")
                t0 = perf_counter()
                try:
                    if phase == "request_headers":
                        resp = await self._request_headers(req, st)
                    elif phase == "request_body":
                        resp = await self._request_body(req, st)
                    elif phase == "response_headers":
                        resp = self._response_headers(req, st)
                    elif phase == "response_body":
                        resp = self._response_body(req, st)
                    else:
                        resp = _continue_other(phase)
                except GatewayError as err:
                    st.status = err.status
                    resp = self._error(err, st)
                except Exception:
                    log.exception("processor_error", request_id=st.request_id, phase=phase)
                    st.status = _INTERNAL.status
                    resp = self._error(_INTERNAL, st)
                elapsed = perf_counter() - t0
                self.metrics.phase.observe(elapsed, phase)
                if self.debug:
                    self._log_phase(st, phase, elapsed, resp)
                await write(resp)
        finally:
            self.inflight -= 1
            if st.reservation is not None and not st.settled:
                await self._void(st, "no_response")
            self._log(st)
            if st.phases is not None:
                self._trace(st)

    @staticmethod
    def _error(err: GatewayError, st: RequestState) -> ProcessingResponse:
        body = error_body(st.dialect, err, st.request_id)
        return m.error_response(err, st.request_id, st.id_headers(), body)

    def _trace(self, st: RequestState) -> None:
        assert self.tracing is not None and st.phases is not None and st.trace is not None
        usage = st.usage or {}
        try:
            self.tracing.record(
                st.trace,
                st.t0_ns,
                time_ns(),
                st.phases,
                {
                    "tollgate.request_id": st.request_id,
                    "tollgate.account": st.principal.account if st.principal else None,
                    "tollgate.operation": st.op.name if st.op else None,
                    "tollgate.dialect": st.dialect,
                    "tollgate.backend": st.backend.name if st.backend else None,
                    "gen_ai.operation.name": st.op.name if st.op else None,
                    "gen_ai.request.model": st.model.id if st.model else None,
                    "gen_ai.usage.input_tokens": _int_or_none(usage.get("prompt_tokens")),
                    "gen_ai.usage.output_tokens": _int_or_none(usage.get("completion_tokens")),
                    "http.response.status_code": st.status or None,
                    "tollgate.stream": st.stream,
                },
                span_id=st.span_id,
            )
        except Exception:  # tracing must never fail a request
            log.exception("trace_failed", request_id=st.request_id)

    def _log_phase(
        self, st: RequestState, phase: str | None, elapsed: float, resp: ProcessingResponse
    ) -> None:
        """Debug level: what each ext_proc message did (never a header value or body text)."""
        log.debug(
            "phase",
            request_id=st.request_id,
            phase=phase,
            answer=resp.WhichOneof("response"),
            status=st.status or None,
            model=st.model.id if st.model else None,
            backend=st.backend.name if st.backend else None,
            reserved=st.reservation.amount if st.reservation else None,
            us=round(elapsed * 1e6, 1),
        )

    def _log(self, st: RequestState) -> None:
        """One line per request (never a key, token or prompt: the key's display prefix only),
        and the request's metrics."""
        if not st.request_id:
            return
        p = st.principal
        model = st.model.id if st.model else "-"
        elapsed = time.monotonic() - st.started
        self.metrics.requests.inc(
            model, st.backend.name if st.backend else "-", st.dialect, str(st.status)
        )
        self.metrics.duration.observe(elapsed, model)
        log.info(
            "request",
            request_id=st.request_id,
            account=p.account if p else None,
            key_prefix=p.key_prefix if p else None,
            op=st.op.name if st.op else None,
            model=st.model.id if st.model else None,
            backend=st.backend.name if st.backend else None,
            stream=st.stream,
            status=st.status,
            reserved=st.reservation.amount if st.reservation else None,
            request_id_replaced=st.id_note or None,
            dialect=st.dialect,
            ms=round(elapsed * 1000, 2),
        )

    # ------------------------------------------------------------------ phases
    async def _request_headers(
        self, req: ProcessingRequest, st: RequestState
    ) -> ProcessingResponse:
        msg = req.request_headers
        headers = m.header_map(msg.headers.headers)
        rid = headers.get("x-request-id", "")
        if _SANE_ID.fullmatch(rid) is None:
            st.id_note = "too_long" if len(rid) > 128 else "invalid_characters"
            rid = str(uuid.uuid4())
        st.request_id = rid
        st.http1 = client_protocol(req) in _HTTP1
        method = headers.get(":method", "")
        path = headers.get(":path", "").partition("?")[0]
        st.dialect = dialect_of(path)  # first: every refusal below comes in its shape
        if self.inflight > self.max_inflight:
            raise _OVERLOADED
        if path == openapi.OPENAPI_PATH:  # public: no credential needed (any query)
            if method != "GET":
                raise GatewayError("method_not_allowed", f"Use GET for {openapi.OPENAPI_PATH}.")
            st.status = 200
            return m.immediate(200, self.openapi_body, "tollgate_openapi", st.id_headers())
        phases = st.phases
        t = time_ns() if phases is not None else 0
        try:
            principal = st.principal = await self.auth.authenticate(
                headers.get("authorization"), headers.get("cookie"), lambda: client_address(req)
            )
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            log.error("store_unreachable", request_id=st.request_id)
            raise _STORE_DOWN from None
        finally:  # refused keys are traced too
            if phases is not None:
                phases.append(("tollgate.auth", t, time_ns()))
        op_path = path
        if st.dialect == OPENAI:
            op = POST_OPERATIONS.get(path)
        elif st.dialect == ENVELOPE:
            envelope, op = envelope_route(path)
            st.envelope = Envelope(envelope)
            op_path = envelope.openai_path
        else:
            model, route = proxy_target(path, method, self.cfg)
            # Per-key model pools: a key not allowed this model is refused here, as the other
            # dialects refuse it in the body phase once the model is known.
            _check_pool(st.principal, model.id)
            st.model, st.backend = model, self.cfg.backends_by_name[model.backend]
            st.proxy = st.translator = ProxyTranslator(model, route)
            op = route.op
            if op is None or not route.reads_body:  # GET models, multipart uploads
                st.client_path = st.path = path
                return await self._route_from_headers(st, headers)
        if op is not None:
            st.path, st.client_path = op_path, path
            st.timeout_s = _timeout_of(headers)
            if method != "POST":
                raise GatewayError("method_not_allowed", f"Use POST for {path}.")
            principal.require("models:use")
            if msg.end_of_stream:
                raise _NO_BODY
            length = headers.get("content-length")
            if op.upload:  # the processor gets the head of the form (Envoy's upload route)
                st.upload = FormUpload.from_headers(headers, self.max_upload)
            elif length is not None and length.isdigit() and int(length) > self.max_body:
                raise GatewayError(
                    "request_too_large",
                    f"The request body is {length} bytes; the limit is {self.max_body}.",
                )
            st.op = op
            if st.id_note:  # the backend, Envoy's log and later phases see the new id
                return m.request_headers_response(m.set_headers(st.id_headers()[:1]))
            return m.CONTINUE_REQUEST_HEADERS
        if control_routes.is_control_path(path):
            control_routes.match(method, path)  # 404/405 here, in the gateway's shape
            if (bad := control_routes.check_utf8(headers.get(":path", ""))) is not None:
                raise bad  # else the worker's grpc refuses the message naming no field
            st.control = True  # Envoy's transcoder calls the control API (control_api.py)
            return m.request_headers_response(
                m.set_headers(st.id_headers()[:1] if st.id_note else ()), [ROUTE_HEADER]
            )
        if path == MODELS_PATH or path.startswith(MODELS_PATH + "/"):
            if method != "GET":
                raise GatewayError("method_not_allowed", f"Use GET for {path}.")
            principal.require("models:use")
            st.status = 200
            if path == MODELS_PATH:
                body = self.catalog.list_for(principal.models)
                return m.immediate(200, body, "tollgate_models", st.id_headers())
            model_id, card = self.catalog.card(path)
            if card is None and path.endswith(HEALTH_SUFFIX):  # Envoy's admin answers
                model_id, card = self.catalog.card(path[: -len(HEALTH_SUFFIX)])
                st.health = card is not None
            if card is None:
                raise GatewayError(
                    "model_not_found", f"The model '{model_id}' does not exist.", "model"
                )
            _check_pool(principal, model_id)
            if st.health:  # see health.py: routed to Envoy's admin /clusters, mapped after
                st.model = self.cfg.models_by_id[model_id]
                pairs = [(":path", health.ADMIN_PATH), (ROUTE_HEADER, health.ADMIN_ROUTE)]
                return m.request_headers_response(m.set_headers(pairs), clear_route_cache=True)
            return m.immediate(200, card, "tollgate_model", st.id_headers())
        raise GatewayError("not_found", f"Unknown path: {method} {path}.")

    async def _request_body(self, req: ProcessingRequest, st: RequestState) -> ProcessingResponse:
        op = st.op
        if op is None or st.principal is None:  # a body on a route the headers phase refused
            raise GatewayError("not_found", "Unknown path.")
        raw = req.request_body.body
        if st.upload is not None:  # the form's text fields, from the head of the body
            body = st.upload.parse_head(raw, req.request_body.end_of_stream)
        else:
            if len(raw) > self.max_body:
                raise GatewayError(
                    "request_too_large",
                    f"The request body is {len(raw)} bytes; the limit is {self.max_body}.",
                )
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise MALFORMED_JSON from None
            json_object(body)
        if st.proxy is None:
            model_id = require_model(body)
            stream = op.validate(body)
            model = self.cfg.models_by_id.get(model_id)
            if model is None:
                raise GatewayError(
                    "model_not_found", f"The model '{model_id}' does not exist.", "model"
                )
            _check_pool(st.principal, model_id)
            if model.kind != op.model_kind:
                raise GatewayError(
                    "invalid_request_error",
                    f"The model '{model_id}' is a {model.kind} model and does not serve {op.name}.",
                    "model",
                )
            backend = self.cfg.backends_by_name[model.backend]
            st.translator = for_backend(backend, model, st.request_id)
            st.model, st.backend, view = model, backend, body
        else:  # per-model proxy: the path chose the model; metering reads OpenAI fields
            stream, view = st.proxy.prepare(body)
        st.stream = stream
        client_max = view.get("max_completion_tokens") or view.get("max_tokens")
        if not self.metered:
            return self._forward_traced(body, st, client_max, stream)
        await self._reserve(st, view)
        try:
            return self._forward_traced(body, st, client_max, stream)
        except Exception:
            await self._void(st, "gateway_error")
            raise

    async def _reserve(self, st: RequestState, view: dict[str, Any]) -> None:
        """The rate check, concurrency check and reservation: one store round trip. ``view``:
        the request body in OpenAI terms (what the token estimate reads)."""
        assert st.principal is not None and st.model is not None and st.backend is not None
        assert st.op is not None
        phases = st.phases
        t = time_ns() if phases is not None else 0
        try:
            st.reservation = await self.meter.reserve(
                st.request_id, st.principal, st.model, st.op.name, view, st.backend.name
            )
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            log.error("store_unreachable", request_id=st.request_id, phase="reserve")
            raise _STORE_DOWN from None
        # cancelled (the client left while the store reserved): Meter.reserve voids what this
        # call reserved, and nothing another request with the same id holds
        finally:  # refusals (402/429) are traced too
            if phases is not None:
                phases.append(("tollgate.reserve", t, time_ns()))
        st.started_ms = int(time.time() * 1000)

    async def _route_from_headers(
        self, st: RequestState, headers: dict[str, str]
    ) -> ProcessingResponse:
        """A proxy request whose body the processor does not read: GET ``models`` (not metered)
        and multipart uploads (reserved at the per-request price); routed from its headers."""
        assert st.proxy is not None and st.backend is not None
        st.timeout_s = _timeout_of(headers)
        op = st.op = st.proxy.route.op
        if op is not None and self.metered:
            await self._reserve(st, {})
        pairs = self._upstream(st, st.backend.name, st.proxy.route.path)
        if st.id_note:
            pairs += st.id_headers()[:1]
        return m.request_headers_response(
            m.set_headers(pairs), clear_route_cache=True, mode=m.SKIP_REQUEST_BODY
        )

    def _upstream(self, st: RequestState, route: str, path: str | None) -> list[tuple[str, str]]:
        """The routing header, the backend's path if it differs from the client's, and the
        upstream timeout (X-Request-Timeout, bounded by the route's own timeout)."""
        assert st.backend is not None
        pairs: list[tuple[str, str]] = [(ROUTE_HEADER, route)]
        if path is not None and path != st.client_path:
            pairs.append((":path", path))
        if st.timeout_s is not None:
            ms = int(min(st.timeout_s, st.backend.request_timeout_s) * 1000)
            pairs.append(("x-envoy-upstream-rq-timeout-ms", str(max(ms, 1))))
        return pairs

    def _forward_traced(
        self, body: dict[str, Any], st: RequestState, client_max: Any, stream: bool
    ) -> ProcessingResponse:
        if st.phases is None:
            return self._forward(body, st, client_max, stream)
        t = time_ns()
        resp = self._forward(body, st, client_max, stream)
        st.phases.append(("tollgate.translate", t, time_ns()))
        return resp

    def _forward(
        self, body: dict[str, Any], st: RequestState, client_max: Any, stream: bool
    ) -> ProcessingResponse:
        """The backend's body, the routing header and, for streams, the stream meter's cue."""
        assert st.translator is not None and st.backend is not None and st.op is not None
        res = st.reservation
        changed = False
        metadata = None
        marks: dict[str, Any] = {DIALECT_KEY: ENVELOPE} if st.envelope is not None else {}
        if st.op.name in GENERATIVE and res is not None:
            if client_max is None:  # stop the backend where the money (or the window) stops
                body["max_tokens"] = res.granted
                changed = True
            if stream:
                asked = body.get("stream_options") or {}
                # Usage on every chunk, so a stream cut short is charged for what it generated.
                # Not with several choices: vLLM's running usage then counts the chunk's own
                # choice only, so the stream meter counts the chunks of all of them instead.
                options: dict[str, Any] = {"include_usage": True}
                if st.backend.kind == "vllm" and res.sequences == 1:
                    options["continuous_usage_stats"] = True
                body["stream_options"] = options
                changed = True
                price = self.meter.prices[st.model.id] if st.model else None
                metadata = Struct()
                fields = metadata.fields[METADATA_NS].struct_value.fields
                m.put_fields(
                    fields,
                    {
                        **marks,
                        # for Envoy's Lua stream meter and the settling access log
                        "stream": True,
                        "request_id": st.request_id,
                        "model": st.model.id if st.model else "",
                        "keep_usage": bool(asked.get("include_usage")),
                        "price_in": price.input_per_1m if price else 0,
                        "price_out": price.output_per_1m if price else 0,
                        "price_req": price.per_request if price else 0,
                        "available": res.available + res.amount,
                        "balance": res.balance,  # what a charge is capped at
                        # a cut stream from a backend without running usage is charged this
                        # and the chunks the meter counted (stream_meter.c)
                        "prompt_estimate": res.prompt_estimate,
                    },
                )
                # which settling log takes its record: at once, or batched (envoy_config)
                fields["settle_now"].bool_value = self.meter.settles_now(st.principal, res)
                if st.trace is not None:  # the settling worker's span joins this trace
                    fields["trace_id"].string_value = st.trace[0].hex()
                    fields["span_id"].string_value = st.span_id.hex()
                st.settled = True  # from here on, Envoy's stream meter / access log settle it
        # The translator sees the body as the backend should get it in OpenAI terms (max_tokens
        # and stream_options set above) and rewrites it into the backend's schema.
        translator = st.translator
        changed = translator.request(st.op.name, body, stream) or changed
        if metadata is not None and st.envelope is None:
            recipe = translator.stream_recipe()  # Envoy translates this stream (TGI native)
            if recipe is not None:
                tgi = metadata.fields[METADATA_NS].struct_value.fields["tgi"].struct_value
                errors = recipe.pop("errors")  # a Struct, built once per kind of request
                tgi.update(recipe)
                tgi.fields["errors"].struct_value.CopyFrom(errors)
        route = stream_route_value(st.backend.name) if metadata is not None else st.backend.name
        if metadata is None and marks:  # Envoy's local replies on this request: envelope shape
            metadata = Struct()
            metadata.update({METADATA_NS: marks})
        # the backend's own path, else the operation's (the envelope's differs from the client's)
        path = translator.backend_path(st.op.name, st.path) or st.path
        pairs = self._upstream(st, route, path)
        # credits as HTTP/2 trailers (the stream meter), cued on the response (_response_headers)
        st.trailers = (
            metadata is not None
            and self.cfg.metering.stream_trailers
            and not st.http1  # HTTP/1.1 carries no trailers: the filter would work for nothing
        )
        new_body = None
        remove: tuple[str, ...] = ()
        if changed and st.upload is not None:  # the head of the form, rewritten: Envoy ignores
            new_body = st.upload.encode(body)  # a new Content-Length in this body mode, so the
            remove = ("content-length",)  # rest goes chunked
        elif changed:
            new_body = orjson.dumps(body)
            pairs.append(("content-length", str(len(new_body))))
        # An upload's route is cleared by Envoy's reroute filter instead (envoy_config: ext_proc
        # would clear it after the head has gone on, under the router's feet).
        clear = st.upload is None
        return m.request_body_response(m.set_headers(pairs, remove), new_body, clear, metadata)

    async def _void(self, st: RequestState, reason: str) -> None:
        st.settled = True
        try:
            await self.meter.settle(st.request_id, None, 0, st.started_ms, reason)
        except Exception as exc:  # sent again if the store was out of reach, else the sweeper's
            log.error("void_failed", request_id=st.request_id, reason=reason, error=str(exc))

    def _response_headers(self, req: ProcessingRequest, st: RequestState) -> ProcessingResponse:
        if st.health:
            headers = m.header_map(req.response_headers.headers.headers)
            if headers.get(":status") != "200":
                raise GatewayError("internal_error", "Envoy's admin did not answer.")
            return m.CONTINUE_RESPONSE_HEADERS  # the body (BUFFERED, per route) is mapped
        if st.control:
            headers = m.header_map(req.response_headers.headers.headers)
            err = control_routes.error_from_headers(headers)
            if err is not None:
                raise err
            st.status = int(headers.get(":status", "0") or 0)
            mutation = m.set_headers(st.id_headers())
            mutation.remove_headers.extend(_GRPC_HEADERS)
            if control_routes.is_transcoder_reply(headers):  # its body names the field
                return m.response_headers_response(mutation, m.BUFFER_RESPONSE)
            return m.response_headers_response(mutation)
        model, translator, res = st.model, st.translator, st.reservation
        if model is None or translator is None:
            return m.response_headers_response(m.set_headers(st.id_headers()))
        headers = m.header_map(req.response_headers.headers.headers)
        status = int(headers.get(":status", "0") or 0)
        content_type = headers.get("content-type", "")
        translator.response_headers(status, headers)
        st.status = translator.response_status(status) or status
        pairs: list[tuple[str, str]] = [
            ("x-gateway-model", model.id),
            ("x-gateway-backend", model.backend),
            *st.id_headers(),
        ]
        if translator.dropped:
            pairs.append(("x-gateway-dropped-params", ",".join(translator.dropped)))
        wants_body = translator.wants_response_body(status, content_type)
        if st.envelope is not None and status < 400 and st.envelope.wants_body(content_type):
            wants_body = True  # to wrap it, or to watch the stream for errors
        sse = content_type.startswith("text/event-stream")
        if res is not None:
            if st.stream and status < 400:
                pairs += rate_headers(res)
                if st.trailers:  # the trailers filter's cue (the stream meter removes it)
                    pairs.append((TRAILERS_HEADER, "1"))
            else:
                fm = req.metadata_context.filter_metadata
                if USAGE_NS in fm:
                    st.usage = {k: v.number_value for k, v in fm[USAGE_NS].fields.items()}
                elif status < 400 and translator.usage is not None:
                    # known from the request (speech, images) or the headers (proxy: TGI, TEI)
                    st.usage = dict(translator.usage)
                if wants_body and status < 400 and not sse:
                    st.defer_settle = True  # the translator reads usage from the body (TGI, TEI)
                elif st.usage is not None and "error" in st.usage:
                    # a 200 whose JSON is an error (json_to_metadata saw its "error" key): the
                    # client got the error, so it is voided as a backend error, not charged
                    st.usage = None
                    pairs += self._settle(st, 502)
                else:
                    pairs += self._settle(st, status)
        if not wants_body:
            return m.response_headers_response(m.set_headers(pairs))
        if status >= 400:
            st.backend_status = status
            new_status = translator.response_status(status)
            if new_status is not None and new_status != status:
                pairs.append((":status", str(new_status)))
            return m.response_headers_response(m.set_headers(pairs), m.BUFFER_RESPONSE)
        if sse:
            return m.response_headers_response(m.set_headers(pairs), m.STREAM_RESPONSE)
        st.buffered = True
        return m.response_headers_response(m.set_headers(pairs), m.BUFFER_RESPONSE)

    def _settle(self, st: RequestState, status: int) -> list[tuple[str, str]]:
        """Settle a non-streaming request now (the store call is queued) and return the credit
        and rate headers for its response."""
        assert st.model is not None and st.reservation is not None
        st.settled = True
        t = time_ns() if st.phases is not None else 0
        s = self.meter.settle_soon(
            st.request_id, st.model.id, st.reservation, st.usage, status, st.started_ms
        )
        if st.phases is not None:
            st.phases.append(("tollgate.settle", t, time_ns()))
        return settled_headers(st.reservation, s)

    def _response_body(self, req: ProcessingRequest, st: RequestState) -> ProcessingResponse:
        if st.health:
            assert st.model is not None
            backend = self.cfg.backends_by_name[st.model.backend]
            body = health.body(st.model, backend, req.response_body.body)
            st.status = 200
            pairs = [
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                *st.id_headers(),
            ]
            return m.response_body_response(body, m.set_headers(pairs))
        if st.control:  # the transcoder's 400 (buffered in _response_headers): name the field
            err = control_routes.transcoder_error(req.response_body.body)
            body = error_body(st.dialect, err, st.request_id)
            return m.response_body_response(
                body, m.set_headers([("content-length", str(len(body)))])
            )
        translator = st.translator
        if translator is None:
            return m.CONTINUE_RESPONSE_BODY
        msg = req.response_body
        if st.backend_status:
            err = translator.error(st.backend_status, msg.body)
            body = error_body(st.dialect, err, st.request_id)
            pairs = [("content-type", "application/json"), ("content-length", str(len(body)))]
            if err.status != st.status:  # only the body told (e.g. TEI's 424 for a wrong task)
                st.status = err.status
                pairs.append((":status", str(err.status)))
            if err.retry_after is not None:
                pairs.append(("retry-after", str(err.retry_after)))
            return m.response_body_response(body, m.set_headers(pairs))
        chunk = msg.body
        try:
            out = translator.response_body(chunk, msg.end_of_stream)
        except GatewayError as err:  # a 2xx answer the translator cannot read (buffered)
            return self._unreadable(st, err)
        envelope = st.envelope
        if not st.buffered:
            if envelope is not None and envelope.streaming:
                out = envelope.stream_chunk(
                    chunk if out is None else out, msg.end_of_stream, st.request_id
                )
            if out is None or out is chunk:
                return m.CONTINUE_RESPONSE_BODY
            return m.response_body_response(out)
        pairs = []
        if st.defer_settle:
            st.defer_settle = False
            if translator.usage is not None:
                st.usage = dict(translator.usage)
            pairs = self._settle(st, st.status)
        if envelope is not None and envelope.wrapping:
            out = envelope.wrap(chunk if out is None else out, st.request_id, st.model, st.usage)
        if out is not None:
            pairs.append(("content-length", str(len(out))))
            if translator.content_type is not None:  # e.g. a transcript rendered as text
                pairs.append(("content-type", translator.content_type))
        return m.response_body_response(out, m.set_headers(pairs) if pairs else None)

    def _unreadable(self, st: RequestState, err: GatewayError) -> ProcessingResponse:
        """A backend's 2xx answer that cannot be read (TGI or TEI JSON without its fields, or
        an error body sent with 200): the client gets the error and its status, and the
        request is voided (a failure with no usage known), not charged."""
        body = error_body(st.dialect, err, st.request_id)
        st.status = err.status
        pairs = [
            (":status", str(err.status)),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
        ]
        if st.defer_settle:
            st.defer_settle = False
            st.usage = None
            pairs += self._settle(st, err.status)
        return m.response_body_response(body, m.set_headers(pairs))


def _timeout_of(headers: dict[str, str]) -> float | None:
    value = headers.get("x-request-timeout")
    if value is None:
        value = headers.get("oicm-request-timeout")
    return None if value is None else _request_timeout(value)


def _request_timeout(value: str) -> float:
    """``X-Request-Timeout`` (or ``OICM-Request-Timeout``): seconds, > 0. Above the backend
    route's own timeout it is lowered to it (the route's maximum is the operator's bound)."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (0 < seconds < 1e9):  # also rejects nan and inf
        raise GatewayError(
            "invalid_request_error",
            f"X-Request-Timeout must be a positive number of seconds, got {value[:40]!r}.",
            "X-Request-Timeout",
        )
    return seconds


def _check_pool(principal: Principal, model_id: str) -> None:
    if not principal.may_use(model_id):
        raise GatewayError(
            "permission_denied",
            f"This credential may not use the model '{model_id}'.",
            "model",
        )


def client_address(req: ProcessingRequest) -> str:
    """The client's IP address as Envoy sees it (``source.address``: the TCP peer, or the
    address listener.trusted_proxy_hops picks from X-Forwarded-For); never a header the client
    wrote itself."""
    attrs = req.attributes.get("envoy.filters.http.ext_proc")
    if attrs is None:
        return ""
    value = attrs.fields["source.address"].string_value if "source.address" in attrs.fields else ""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        return value
    return host.strip("[]")


_HTTP1 = frozenset(("HTTP/1.0", "HTTP/1.1"))


def client_protocol(req: ProcessingRequest) -> str:
    """The client's HTTP version as Envoy names it (``request.protocol``: "HTTP/1.1", "HTTP/2",
    "HTTP/3"), or "" if Envoy did not say."""
    attrs = req.attributes.get("envoy.filters.http.ext_proc")
    if attrs is None or "request.protocol" not in attrs.fields:
        return ""
    return attrs.fields["request.protocol"].string_value


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def _continue_other(phase: str | None) -> ProcessingResponse:
    from envoy.service.ext_proc.v3.external_processor_pb2 import TrailersResponse

    if phase == "request_trailers":
        return ProcessingResponse(request_trailers=TrailersResponse())
    return ProcessingResponse(response_trailers=TrailersResponse())
