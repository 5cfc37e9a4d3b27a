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
the same 3, with no message per chunk. The common answers are built once and reused.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import orjson
import redis.exceptions
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse

from . import messages as m
from .auth import KeyAuthenticator, Principal
from .config import Backend, GatewayConfig, Model
from .envoy_config import ROUTE_HEADER
from .errors import GatewayError
from .operations import MODELS_PATH, POST_OPERATIONS, ModelCatalog, Operation
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


class RequestState:
    """What one request's phases share."""

    __slots__ = (
        "backend",
        "backend_status",
        "buffered",
        "model",
        "op",
        "principal",
        "request_id",
        "started",
        "translator",
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
        self.started = time.monotonic()


class Stats:
    """Counters a test or the loadtest runner can read (per worker)."""

    __slots__ = ("messages", "streams")

    def __init__(self) -> None:
        self.streams = 0
        self.messages: dict[str, int] = {}


class Processor(ep_grpc.ExternalProcessorServicer):
    def __init__(self, cfg: GatewayConfig, auth: KeyAuthenticator) -> None:
        self.cfg = cfg
        self.auth = auth
        self.catalog = ModelCatalog(cfg)
        self.max_body = cfg.listener.max_request_body_bytes
        self.max_inflight = cfg.processor.max_inflight
        self.inflight = 0
        self.stats = Stats()
        # Constant answers for the fast path, built once.
        self._route_to = {
            b.name: m.request_body_response(m.set_headers([(ROUTE_HEADER, b.name)]), None, True)
            for b in cfg.backends
        }
        self._model_headers = {
            model.id: m.response_headers_response(
                m.set_headers([("x-gateway-model", model.id), ("x-gateway-backend", model.backend)])
            )
            for model in cfg.models
        }
        self._models_list = m.immediate(200, self.catalog.list_body, "tollgate_models")

    # ------------------------------------------------------------------ gRPC entry
    async def Process(self, request_iterator: Any, context: Any) -> None:
        # The reader/writer form (context.read/write) costs less per message in grpc.aio than
        # an async-generator handler.
        st = RequestState()
        self.inflight += 1
        self.stats.streams += 1
        counts = self.stats.messages
        read, write, eof = context.read, context.write, grpc.aio.EOF
        try:
            while True:
                req = await read()
                if req is eof:
                    return
                phase = req.WhichOneof("request")
                counts[phase] = counts.get(phase, 0) + 1
                try:
                    if phase == "request_headers":
                        resp = await self._request_headers(req, st)
                    elif phase == "request_body":
                        resp = self._request_body(req, st)
                    elif phase == "response_headers":
                        resp = self._response_headers(req, st)
                    elif phase == "response_body":
                        resp = self._response_body(req, st)
                    else:
                        resp = _continue_other(phase)
                except GatewayError as err:
                    resp = m.error_response(err, st.request_id)
                except Exception:
                    log.exception("processor_error", request_id=st.request_id, phase=phase)
                    resp = m.error_response(_INTERNAL, st.request_id)
                await write(resp)
        finally:
            self.inflight -= 1

    # ------------------------------------------------------------------ phases
    async def _request_headers(
        self, req: ProcessingRequest, st: RequestState
    ) -> ProcessingResponse:
        msg = req.request_headers
        headers = m.header_map(msg.headers.headers)
        st.request_id = headers.get("x-request-id", "")
        if self.inflight > self.max_inflight:
            raise _OVERLOADED
        try:
            st.principal = await self.auth.authenticate(headers.get("authorization"))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            log.error("store_unreachable", request_id=st.request_id)
            raise _STORE_DOWN from None
        method = headers.get(":method", "")
        path = headers.get(":path", "").partition("?")[0]
        op = POST_OPERATIONS.get(path)
        if op is not None:
            if method != "POST":
                raise GatewayError("method_not_allowed", f"Use POST for {path}.")
            if msg.end_of_stream:
                raise _NO_BODY
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                raise GatewayError(
                    "request_too_large",
                    f"The request body is {length} bytes; the limit is {self.max_body}.",
                )
            st.op = op
            return m.CONTINUE_REQUEST_HEADERS
        if path == MODELS_PATH or path.startswith(MODELS_PATH + "/"):
            if method != "GET":
                raise GatewayError("method_not_allowed", f"Use GET for {path}.")
            if path == MODELS_PATH:
                return self._models_list
            model_id, card = self.catalog.card(path)
            if card is None:
                raise GatewayError(
                    "model_not_found", f"The model '{model_id}' does not exist.", "model"
                )
            return m.immediate(200, card, "tollgate_model")
        raise GatewayError("not_found", f"Unknown path: {method} {path}.")

    def _request_body(self, req: ProcessingRequest, st: RequestState) -> ProcessingResponse:
        op = st.op
        if op is None:  # a body on a route that the headers phase did not accept
            raise GatewayError("not_found", "Unknown path.")
        raw = req.request_body.body
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
        model_id = require_model(body)
        stream = op.validate(body)
        model = self.cfg.models_by_id.get(model_id)
        if model is None:
            raise GatewayError(
                "model_not_found", f"The model '{model_id}' does not exist.", "model"
            )
        if model.kind != op.model_kind:
            raise GatewayError(
                "invalid_request_error",
                f"The model '{model_id}' is a {model.kind} model and does not serve {op.name}.",
                "model",
            )
        backend = self.cfg.backends_by_name[model.backend]
        translator = for_backend(backend, model)
        st.model, st.backend, st.translator = model, backend, translator
        new_body = translator.request(op.name, body, raw, stream)
        if new_body is None:
            return self._route_to[backend.name]
        return m.request_body_response(
            m.set_headers([(ROUTE_HEADER, backend.name), ("content-length", str(len(new_body)))]),
            new_body,
            True,
        )

    def _response_headers(self, req: ProcessingRequest, st: RequestState) -> ProcessingResponse:
        model, translator = st.model, st.translator
        if model is None or translator is None:
            return m.CONTINUE_RESPONSE_HEADERS
        headers = m.header_map(req.response_headers.headers.headers)
        status = int(headers.get(":status", "0") or 0)
        content_type = headers.get("content-type", "")
        if not translator.wants_response_body(status, content_type):
            return self._model_headers[model.id]
        pairs: list[tuple[str, str]] = [
            ("x-gateway-model", model.id),
            ("x-gateway-backend", model.backend),
        ]
        if status >= 400:
            st.backend_status = status
            new_status = translator.response_status(status)
            if new_status is not None and new_status != status:
                pairs.append((":status", str(new_status)))
            return m.response_headers_response(m.set_headers(pairs), m.BUFFER_RESPONSE)
        if content_type.startswith("text/event-stream"):
            return m.response_headers_response(m.set_headers(pairs), m.STREAM_RESPONSE)
        st.buffered = True
        return m.response_headers_response(m.set_headers(pairs), m.BUFFER_RESPONSE)

    def _response_body(self, req: ProcessingRequest, st: RequestState) -> ProcessingResponse:
        translator = st.translator
        if translator is None:
            return m.CONTINUE_RESPONSE_BODY
        msg = req.response_body
        if st.backend_status:
            err = translator.error(st.backend_status, msg.body)
            body = err.body(st.request_id)
            pairs = [("content-type", "application/json"), ("content-length", str(len(body)))]
            if err.retry_after is not None:
                pairs.append(("retry-after", str(err.retry_after)))
            return m.response_body_response(body, m.set_headers(pairs))
        out = translator.response_body(msg.body, msg.end_of_stream)
        if out is None:
            return m.CONTINUE_RESPONSE_BODY
        headers = m.set_headers([("content-length", str(len(out)))]) if st.buffered else None
        return m.response_body_response(out, headers)


def _continue_other(phase: str | None) -> ProcessingResponse:
    from envoy.service.ext_proc.v3.external_processor_pb2 import TrailersResponse

    if phase == "request_trailers":
        return ProcessingResponse(request_trailers=TrailersResponse())
    return ProcessingResponse(response_trailers=TrailersResponse())
