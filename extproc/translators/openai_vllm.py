"""OpenAI client schema -> vLLM (and any OpenAI-compatible backend) and back.

The schemas match, so the fast path forwards the client's bytes untouched and never sees the
response body. The translator only steps in when:

* the public model id differs from the backend's (``backend_model``): the request's ``model`` is
  rewritten, and so is every ``"model":"..."`` in the response (per SSE event on streams);
* a non-streaming request carries ``stream_options`` (vLLM answers 400 where OpenAI ignores it):
  it is dropped;
* the backend answers an error status: its body (vLLM's nested shape since v0.10.1, flat before,
  or ``{"error": "Unauthorized"}``) becomes the gateway's error shape, with the status mapped as
  in ``shared/reference/backends.md`` §6.3.

Errors that vLLM sends *inside* a 200 stream (``data: {"error": {...}}`` then ``[DONE]``) pass
through as they are on the fast path: the OpenAI SDK raises on them.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..config import Model
from ..errors import GatewayError
from ..sse import EventSplitter


class OpenAIToVLLM:
    __slots__ = ("_alias_from", "_alias_to", "_model", "_splitter")

    def __init__(self, model: Model) -> None:
        self._model = model
        self._splitter: EventSplitter | None = None
        if model.aliased:
            self._alias_from = (
                b'"model":' + orjson.dumps(model.backend_model),
                b'"model": ' + orjson.dumps(model.backend_model),
            )
            self._alias_to = b'"model":' + orjson.dumps(model.id)
        else:
            self._alias_from = ()
            self._alias_to = b""

    # ------------------------------------------------------------------ request
    def backend_path(self, op: str, path: str) -> str | None:
        return None

    def request(self, op: str, body: dict[str, Any], stream: bool) -> bool:
        changed = False
        if self._model.aliased:
            body["model"] = self._model.backend_model
            changed = True
        if not stream and "stream_options" in body:
            del body["stream_options"]
            changed = True
        return changed

    # ----------------------------------------------------------------- response
    def response_status(self, status: int) -> int | None:
        return normalize_error(status, b"").status if status >= 400 else None

    def wants_response_body(self, status: int, content_type: str) -> bool:
        if status >= 400:
            return True  # the processor hands the body to error()
        if self._alias_from:
            if content_type.startswith("text/event-stream"):
                self._splitter = EventSplitter()
            return True
        return False

    def response_body(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        if self._splitter is not None:
            out = self._splitter.feed(chunk)
            if end_of_stream:
                out += self._splitter.flush()
            return self._rename(out)
        return self._rename(chunk)

    def _rename(self, data: bytes) -> bytes:
        # A JSON string value can never contain the unescaped byte sequence "model":"..." (its
        # quotes would be escaped), so this only ever hits the object key.
        for pattern in self._alias_from:
            if pattern in data:
                data = data.replace(pattern, self._alias_to)
        return data

    # ------------------------------------------------------------------- errors
    def error(self, status: int, body: bytes) -> GatewayError:
        return normalize_error(status, body)


def _parse_error(body: bytes) -> tuple[str, str | None, str]:
    """(message, param, backend type) from any OpenAI/vLLM error body, or the raw text."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text[:500] or "", None, ""
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, str):  # vLLM's 401: {"error": "Unauthorized"}
            return err, None, ""
        if isinstance(err, dict):
            message = err.get("message") or err.get("detail") or ""
            param = err.get("param")
            return (
                str(message),
                param if isinstance(param, str) else None,
                str(err.get("type") or ""),
            )
    return "", None, ""


def normalize_error(status: int, body: bytes) -> GatewayError:
    message, param, _backend_type = _parse_error(body)
    lowered = message.lower()
    if status == 404:
        return GatewayError(
            "model_not_found", message or "The backend does not serve this model.", param or "model"
        )
    if status in (400, 422, 501):
        if "context length" in lowered or "maximum context" in lowered:
            return GatewayError("context_length_exceeded", message, param or "messages")
        return GatewayError(
            "invalid_request_error", message or "The backend rejected the request.", param
        )
    if status == 413:
        return GatewayError(
            "request_too_large", message or "The request is too large for the backend."
        )
    if status in (401, 403):
        return GatewayError(
            "backend_unavailable",
            "The gateway could not authenticate to the model backend.",
            status=502,
        )
    if status == 429 or status == 503:
        return GatewayError(
            "backend_unavailable",
            "The model backend is overloaded or not ready; retry shortly.",
            retry_after=1,
        )
    if status == 504:
        return GatewayError("backend_timeout", "The model backend timed out.")
    if status >= 500:
        return GatewayError(
            "backend_unavailable",
            f"The model backend failed: {message}" if message else "The model backend failed.",
            status=502,
        )
    return GatewayError("invalid_request_error", message or f"Backend answered {status}.", param)
