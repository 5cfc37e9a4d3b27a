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
from .errors_map import client_status, normalize_error

__all__ = ["OpenAIToVLLM", "normalize_error"]


class OpenAIToVLLM:
    __slots__ = ("_alias_from", "_alias_to", "_model", "_splitter")

    # Nothing is ever dropped and usage is read by Envoy's stream meter / the access log, so these
    # are shared class attributes (never mutated) and the fast path stays allocation-free.
    dropped: list[str] = []
    usage: dict[str, int] | None = None
    content_type: str | None = None  # the backend's content type is kept (always JSON or SSE)

    def __init__(self, model: Model, request_id: str = "") -> None:
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

    @property
    def rewrites_stream(self) -> bool:
        return bool(self._alias_from)  # an aliased model's name is rewritten in every chunk

    def stream_recipe(self) -> dict[str, Any] | None:
        return None

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
    def response_headers(self, status: int, headers: dict[str, str]) -> None:
        return None

    def response_status(self, status: int) -> int | None:
        return client_status(status)

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
