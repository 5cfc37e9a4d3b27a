"""The two client dialects besides OpenAI's: the envelope (``/v1/inference/...``) and the
per-model proxy (``/models/{model}/proxy/v1/...``). Both run on the same core as the OpenAI
routes (auth, limits, reservation, routing, settlement, tracing in ``processor.py``); this module
knows their paths and shapes, the processor calls it at a few marked places.

Envelope (``/v1/inference/{name}``)
    ``chat`` -> chat completions, ``generate`` -> completions, ``embed`` -> embeddings, and
    ``images/generate``, ``audio/transcribe``, ``audio/synthesize`` -> the OpenAI media routes
    (:data:`ENVELOPE_ROUTES`; an entry whose OpenAI operation this build does not serve answers
    404 ``not_found`` saying so). The request body is the OpenAI one. A successful JSON answer
    is wrapped::

        {"status": "ok", "data": <the OpenAI-shaped answer>,
         "meta": {"request_id": "...", "model": "...", "backend": "...", "usage": {...}}}

    (``usage`` only when the backend reported it). Errors, whoever makes them (the processor,
    a backend, Envoy's local replies), keep the OpenAI dialect's status and carry the gateway's
    error object (``extproc/errors.py``)::

        {"status": "error", "error": {"message", "type", "param", "code"},
         "meta": {"request_id": "..."}}

    Streams pass through as OpenAI SSE, except that an error inside the stream becomes
    ``event: error`` + ``data: <the envelope error>``. ``audio/synthesize`` answers raw audio
    bytes (not wrapped); non-JSON answers (a transcript asked as text) are not wrapped either.

    ext_proc messages per envelope request: non-streaming 4 (request headers, request body,
    response headers, the BUFFERED response body to wrap; TGI/TEI-backed models read the body
    anyway, so the same 4 as in the OpenAI dialect); streams 3 + 1 per backend chunk (the
    response body is STREAMED to find in-stream errors; a chunk without one is answered with no
    mutation); errors the processor makes 1-2, backend errors 4. The OpenAI dialect is unchanged:
    the envelope asks for bodies with a mode override only on its own requests.

Per-model proxy (``/models/{model}/proxy/v1/{name}``)
    The backend's own paths and schema for one model (:data:`PROXY_ROUTES`, per backend kind:
    e.g. TGI ``generate`` -> ``/generate``, TEI ``predict``/``classify`` -> ``/predict``). The
    model in the path picks the backend; a ``model`` field in the body is rewritten to the
    backend's model name; everything else, responses included (errors too, status and body),
    passes through untouched. The gateway's auth, rate limits and credits apply: the reservation
    is estimated from the body (a TGI ``inputs`` / TEI ``inputs``/``texts`` is read as the
    matching OpenAI field), and settled from the backend's own usage: OpenAI-schema ``usage``
    (lifted by Envoy's json_to_metadata / sse_to_metadata), TGI's ``x-prompt-tokens`` and
    ``x-generated-tokens`` headers (``details.generated_tokens`` in the body if the header is
    missing; a ``/generate_stream``'s last ``details``, lifted by sse_to_metadata), TEI's
    ``x-compute-tokens`` header. Bodies the processor does not read (GET ``models``, multipart
    audio uploads) are routed from the headers phase and charged the model's per-request price.
    The gateway's own errors (401, 402, 429, unknown path...) use the OpenAI error shape.

    ext_proc messages per proxy request: 3 for JSON requests, streams included (no message per
    chunk); 4 for a TGI ``/generate`` whose answer lacks ``x-generated-tokens``; 2 for GET
    ``models`` and multipart uploads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

from .config import GatewayConfig, Model
from .errors import CODES, GatewayError, invalid
from .media import audio_seconds, transcript_seconds
from .operations import (
    CHAT,
    CLASSIFY,
    COMPLETIONS,
    EMBEDDINGS,
    POST_OPERATIONS,
    RERANK,
    Operation,
)
from .sse import EventSplitter, event_data
from .translators.errors_map import normalize_error
from .translators.tgi_native import generate_usage, int_header, usage_known

OPENAI = "openai"
ENVELOPE = "envelope"
PROXY = "proxy"
DIALECT_KEY = "dialect"  # in the "tollgate" dynamic metadata: Envoy's local replies read it

ENVELOPE_PREFIX = "/v1/inference/"
PROXY_PREFIX = "/models/"
_PROXY_MARK = "/proxy/v1"


def dialect_of(path: str) -> str:
    """The dialect a request path speaks (a path without its query)."""
    if path.startswith(ENVELOPE_PREFIX):
        return ENVELOPE
    if path.startswith(PROXY_PREFIX):
        return PROXY
    return OPENAI


def error_body(dialect: str, err: GatewayError, request_id: str) -> bytes:
    """``err`` in ``dialect``'s shape (the proxy uses the OpenAI one for the gateway's errors)."""
    if dialect == ENVELOPE:
        return err.envelope_body(request_id)
    return err.body(request_id)


# --------------------------------------------------------------------------------- envelope


@dataclass(frozen=True, slots=True)
class EnvelopeRoute:
    openai_path: str  # the OpenAI route (a key of POST_OPERATIONS) this name maps onto
    wrap: bool = True  # False: a successful answer passes as it is (raw audio bytes)


# name under /v1/inference/ -> the OpenAI route. An entry whose route is not in POST_OPERATIONS
# answers 404 until that operation exists: adding an operation there is all it takes.
ENVELOPE_ROUTES: dict[str, EnvelopeRoute] = {
    "chat": EnvelopeRoute("/v1/chat/completions"),
    "generate": EnvelopeRoute("/v1/completions"),
    "embed": EnvelopeRoute("/v1/embeddings"),
    "images/generate": EnvelopeRoute("/v1/images/generations"),
    "audio/transcribe": EnvelopeRoute("/v1/audio/transcriptions"),
    "audio/synthesize": EnvelopeRoute("/v1/audio/speech", wrap=False),
}


def envelope_route(path: str) -> tuple[EnvelopeRoute, Operation]:
    """The route and operation for an envelope path, or the 404 the client gets."""
    name = path[len(ENVELOPE_PREFIX) :]
    route = ENVELOPE_ROUTES.get(name)
    if route is None:
        served = ", ".join(ENVELOPE_PREFIX + n for n in ENVELOPE_ROUTES)
        raise GatewayError("not_found", f"Unknown path: {path}. The envelope dialect has {served}.")
    op = POST_OPERATIONS.get(route.openai_path)
    if op is None:
        raise GatewayError(
            "not_found",
            f"{path} maps onto POST {route.openai_path}, which this gateway does not serve yet.",
        )
    return route, op


_ERROR_EVENT = b"event: error\ndata: "
_SEP = b"\n\n"


class Envelope:
    """One envelope request's response side: wrap a JSON answer, or watch a stream for errors."""

    __slots__ = ("_splitter", "route", "wrapping")

    def __init__(self, route: EnvelopeRoute) -> None:
        self.route = route
        self.wrapping = False
        self._splitter: EventSplitter | None = None

    @property
    def streaming(self) -> bool:
        return self._splitter is not None

    def wants_body(self, content_type: str) -> bool:
        """For a successful answer: whether the body must pass through :meth:`wrap` (JSON) or
        :meth:`stream_chunk` (SSE)."""
        if content_type.startswith("text/event-stream"):
            self._splitter = EventSplitter()
            return True
        self.wrapping = self.route.wrap and content_type.startswith("application/json")
        return self.wrapping

    def wrap(
        self,
        data: bytes,
        request_id: str,
        model: Model | None,
        usage: dict[str, float] | None,
    ) -> bytes:
        """A successful JSON answer in the envelope."""
        meta: dict[str, Any] = {"request_id": request_id}
        if model is not None:
            meta["model"] = model.id
            meta["backend"] = model.backend
        if usage and "prompt_tokens" in usage and "completion_tokens" in usage:
            meta["usage"] = {
                "prompt_tokens": int(usage["prompt_tokens"]),
                "completion_tokens": int(usage["completion_tokens"]),
            }
        return b'{"status":"ok","data":' + data + b',"meta":' + orjson.dumps(meta) + b"}"

    def stream_chunk(self, chunk: bytes, end_of_stream: bool, request_id: str) -> bytes:
        """``chunk`` itself when it holds whole events and no error (the common case, no
        copy); else its whole events with error events rewritten, the tail held for the next
        chunk."""
        splitter = self._splitter
        assert splitter is not None
        if not splitter.pending and chunk.endswith(_SEP) and b'"error"' not in chunk:
            return chunk
        out = []
        for event in splitter.events(chunk, end_of_stream):
            error = _stream_error(event) if b'"error"' in event else None
            if error is None:
                out.append(event + _SEP)
            else:
                out.append(_ERROR_EVENT + error.envelope_body(request_id) + _SEP)
        return b"".join(out)


def _stream_error(event: bytes) -> GatewayError | None:
    """The gateway error an SSE ``data: {"error": ...}`` event carries, or None if it is none.

    The translators already emit the gateway's error object (a known ``code``); a backend's
    own (vLLM's ``{"error": {"message", "type", "code": 500}}``) is normalized as its status."""
    data = event_data(event)
    if data is None:
        return None
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or "error" not in payload:
        return None
    err = payload["error"]
    if isinstance(err, dict):
        code, message, param = err.get("code"), err.get("message"), err.get("param")
        if code in CODES and isinstance(message, str):
            return GatewayError(code, message, param if isinstance(param, str) else None)
        if isinstance(code, int) and 400 <= code < 600:
            return normalize_error(code, data)
    return normalize_error(500, data)


# ------------------------------------------------------------------------------------ proxy

_SPEECH = Operation("speech", "", lambda body: False)
_IMAGES = Operation("images", "", lambda body: False)
_TRANSCRIPTION = Operation("transcription", "", lambda body: False)


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    path: str  # the backend's own path
    op: Operation | None = None  # what it is metered as; None: not metered (GET models)
    schema: str = "openai"  # the body's schema: openai | tgi | tei
    stream: bool = False  # tgi/tei: always a stream (/generate_stream); openai: the body says
    method: str = "POST"
    reads_body: bool = True  # False: the processor never sees the body (multipart uploads)


_OPENAI_ROUTES = {
    "chat/completions": ProxyRoute("/v1/chat/completions", CHAT),
    "completions": ProxyRoute("/v1/completions", COMPLETIONS),
    "embeddings": ProxyRoute("/v1/embeddings", EMBEDDINGS),
    "embed": ProxyRoute("/v1/embeddings", EMBEDDINGS),
    "models": ProxyRoute("/v1/models", method="GET"),
}
_AUDIO_ROUTES = {
    "transcript": ProxyRoute("/v1/audio/transcriptions", _TRANSCRIPTION, reads_body=False),
    "translate": ProxyRoute("/v1/audio/translations", _TRANSCRIPTION, reads_body=False),
}
# the proxy names of multipart uploads (Envoy's route for them: envoy_config._proxy_upload_route)
PROXY_UPLOADS = tuple(_AUDIO_ROUTES)

# backend kind -> name under /models/{model}/proxy/v1/ -> the backend's own route
PROXY_ROUTES: dict[str, dict[str, ProxyRoute]] = {
    "vllm": {
        **_OPENAI_ROUTES,
        "rerank": ProxyRoute("/v1/rerank", RERANK),
        "classify": ProxyRoute("/classify", CLASSIFY),
        **_AUDIO_ROUTES,
    },
    "openai": {
        **_OPENAI_ROUTES,
        **_AUDIO_ROUTES,
        "generate-speech": ProxyRoute("/v1/audio/speech", _SPEECH),
        "generate-image": ProxyRoute("/v1/images/generations", _IMAGES),
    },
    "tgi": {
        "generate": ProxyRoute("/generate", COMPLETIONS, "tgi"),
        "generate_stream": ProxyRoute("/generate_stream", COMPLETIONS, "tgi", stream=True),
        "chat/completions": _OPENAI_ROUTES["chat/completions"],
        "completions": _OPENAI_ROUTES["completions"],
        "models": _OPENAI_ROUTES["models"],
    },
    "tei": {
        "embed": ProxyRoute("/embed", EMBEDDINGS, "tei"),
        "embeddings": _OPENAI_ROUTES["embeddings"],
        "rerank": ProxyRoute("/rerank", RERANK, "tei"),
        "predict": ProxyRoute("/predict", CLASSIFY, "tei"),
        "classify": ProxyRoute("/predict", CLASSIFY, "tei"),
    },
}


def proxy_target(path: str, method: str, cfg: GatewayConfig) -> tuple[Model, ProxyRoute]:
    """The model and backend route of a ``/models/{model}/proxy/v1/{name}`` path, or the
    404/405 the client gets."""
    rest = path[len(PROXY_PREFIX) :]
    model_part, mark, name = rest.partition(_PROXY_MARK + "/")
    if not mark:
        if not rest.endswith(_PROXY_MARK):
            raise GatewayError(
                "not_found",
                f"Unknown path: {path}. Per-model proxy paths are"
                f" {PROXY_PREFIX}{{model}}{_PROXY_MARK}/{{path}}.",
            )
        model_part, name = rest[: -len(_PROXY_MARK)], ""
    model_id = unquote(model_part)
    model = cfg.models_by_id.get(model_id)
    if model is None:
        raise GatewayError("model_not_found", f"The model '{model_id}' does not exist.", "model")
    kind = cfg.backends_by_name[model.backend].kind
    routes = PROXY_ROUTES.get(kind, {})
    route = routes.get(name)
    if route is None:
        raise GatewayError(
            "not_found",
            f"No proxy path '{name}' for the model '{model_id}' (a {kind} backend); it has: "
            + ", ".join(sorted(routes))
            + ".",
        )
    if method != route.method:
        raise GatewayError("method_not_allowed", f"Use {route.method} for {path}.")
    return model, route


def _flat(value: Any) -> Any:
    """A TEI ``inputs`` (a string, strings, pairs, token ids) as an OpenAI ``input`` to count."""
    if not isinstance(value, list):
        return value
    return [s for item in value for s in (item if isinstance(item, list) else [item])]


class ProxyTranslator:
    """One proxy request, in the :class:`~extproc.translators.Translator` interface: the body
    passes to the backend's own route with ``model`` rewritten; the response passes untouched
    (errors too) while the usage is read from the backend's headers (or body) where its schema
    puts it there."""

    __slots__ = ("_buf", "_generated", "_prompt", "_stream", "_timed", "model", "route", "usage")

    dropped: list[str] = []  # nothing is ever dropped (shared, never mutated)
    rewrites_stream = False  # the backend's own stream passes as it is

    def stream_recipe(self) -> dict[str, Any] | None:
        return None

    def __init__(self, model: Model, route: ProxyRoute) -> None:
        self.model = model
        self.route = route
        self.usage: dict[str, int] | None = None
        self._stream = route.stream
        self._prompt: int | None = None
        self._generated: int | None = None
        self._buf = b""
        # a transcript priced per audio second: its answer is read for the duration (the
        # client's format, untouched: verbose_json's duration, or json's usage.seconds)
        self._timed = route.op is _TRANSCRIPTION and bool(model.price.per_audio_second)

    # ------------------------------------------------------------------ request
    def prepare(self, body: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """(stream flag, the body as the OpenAI fields metering reads): raises the 400 for a
        field metering needs but cannot read."""
        route, op = self.route, self.route.op
        assert op is not None
        if route.schema == "openai":
            self._stream = op.validate(body)
            return self._stream, body
        if route.schema == "tgi":
            inputs = body.get("inputs")
            if not isinstance(inputs, str) or not inputs:
                raise invalid("'inputs' must be a non-empty string.", "inputs")
            params = body.get("parameters")
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise invalid("'parameters' must be an object.", "parameters")
            view: dict[str, Any] = {"prompt": inputs}
            max_new = params.get("max_new_tokens")
            if max_new is not None:
                if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
                    raise invalid(
                        "'parameters.max_new_tokens' must be a positive integer.",
                        "parameters.max_new_tokens",
                    )
                view["max_tokens"] = max_new
            best_of = params.get("best_of")
            if best_of is not None:  # TGI generates every candidate (each up to max_new_tokens)
                if isinstance(best_of, bool) or not isinstance(best_of, int) or best_of < 1:
                    raise invalid(
                        "'parameters.best_of' must be a positive integer.", "parameters.best_of"
                    )
                view["best_of"] = best_of
            return route.stream, view
        if op is RERANK:
            query, texts = body.get("query"), body.get("texts")
            if not isinstance(query, str) or not isinstance(texts, list):
                raise invalid("'query' must be a string and 'texts' an array of strings.", "texts")
            return False, {"query": query, "documents": texts}
        inputs = body.get("inputs")
        if not isinstance(inputs, str | list) or not inputs:
            raise invalid("'inputs' must be a non-empty string or array.", "inputs")
        return False, {"input": _flat(inputs)}

    def request(self, op: str, body: dict[str, Any], stream: bool) -> bool:
        changed = False
        if "model" in body and body["model"] != self.model.backend_model:
            body["model"] = self.model.backend_model
            changed = True
        if self.route.schema != "tgi":
            return changed
        # What the processor added in OpenAI terms (usage on the stream, the clamp of a missing
        # max_tokens to what the balance pays for), in TGI's: TGI reports a stream's counts in
        # the last event's details only when asked.
        asked_usage = body.pop("stream_options", None) is not None
        granted = body.pop("max_tokens", None)
        if granted is None and not asked_usage:
            return changed
        params = body.get("parameters")
        if not isinstance(params, dict):
            params = body["parameters"] = {}
        if granted is not None and params.get("max_new_tokens") is None:
            # absent or null (TGI's "no limit": up to the context): the granted amount
            params["max_new_tokens"] = granted
        if asked_usage:
            params["details"] = True
        return True

    def backend_path(self, op: str, path: str) -> str | None:
        return self.route.path

    # ----------------------------------------------------------------- response
    def response_headers(self, status: int, headers: dict[str, str]) -> None:
        if status >= 400:
            return
        schema = self.route.schema
        if schema == "tgi" and not self._stream:
            self._prompt = int_header(headers.get("x-prompt-tokens"))
            self._generated = int_header(headers.get("x-generated-tokens"))
            if self._generated is not None and self._prompt is not None:
                self.usage = generate_usage(None, self._prompt, self._generated)
        elif schema == "tei":
            tokens = int_header(headers.get("x-compute-tokens"))
            if tokens is not None:
                self.usage = {"prompt_tokens": tokens, "completion_tokens": 0}

    def response_status(self, status: int) -> int | None:
        return None  # the backend's status, as it is

    def wants_response_body(self, status: int, content_type: str) -> bool:
        # A TGI /generate answer whose headers lacked the generated-token count, and a
        # transcript priced per second whose answer is JSON (text, srt, vtt name no duration)
        if status >= 400:
            return False
        if self._timed:
            return content_type.startswith("application/json")
        return self.route.schema == "tgi" and not self._stream and self.usage is None

    def response_body(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        self._buf += chunk
        if end_of_stream and self._timed:
            raw, self._buf = self._buf, b""
            seconds = transcript_seconds(raw)
            if seconds is not None:  # else unknown: charged the reservation
                self.usage = {
                    "prompt_tokens": audio_seconds(self.model, seconds),
                    "completion_tokens": 0,
                }
            return None
        if end_of_stream:
            raw, self._buf = self._buf, b""
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError:
                data = None
            if isinstance(data, list) and data:
                data = data[0]
            details = data.get("details") if isinstance(data, dict) else None
            if usage_known(details, self._prompt, self._generated):  # else the reservation
                self.usage = generate_usage(details, self._prompt, self._generated)
        return None  # passed through untouched

    def error(self, status: int, body: bytes) -> GatewayError:
        return normalize_error(status, body)  # unused: backend errors pass through
