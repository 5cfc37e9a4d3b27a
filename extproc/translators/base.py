"""The interface every translator implements, and the choice of translator per backend kind.

Call order, per request (one translator instance each):

1. :meth:`Translator.request` (after validation; the processor has already set ``max_tokens``
   and, for streams, ``stream_options``) then :meth:`Translator.backend_path` (it may depend on
   what ``request`` saw, e.g. TGI's ``/generate`` vs ``/generate_stream``);
2. :meth:`Translator.response_headers` with the backend's headers (lowercase names), then
   :meth:`Translator.response_status` and :meth:`Translator.wants_response_body`;
3. status >= 400: :meth:`Translator.error` with the whole body; otherwise
   :meth:`Translator.response_body` once with the whole body (non-stream) or per chunk (stream).

Content types need no rewriting, except where :attr:`Translator.content_type` says: every
translated non-stream answer is JSON, as the backend's was (TGI ``/generate``, TEI ``/embed``
``/rerank`` ``/predict`` all answer ``application/json``), every stream stays
``text/event-stream``, and a transcript rendered as text says so (``openai_media``). Error
bodies become JSON even when the backend's were plain text; the processor sets ``content-type``
on those.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..config import MEDIA_BACKENDS, Backend, Model
from ..errors import GatewayError
from .openai_media import OpenAIMedia
from .openai_vllm import OpenAIToVLLM
from .tei import Tei
from .tgi_messages import TgiMessages
from .tgi_native import TgiNative


class Translator(Protocol):
    dropped: list[str]
    """Request fields removed because the backend cannot use them (for a response header)."""

    usage: dict[str, int] | None
    """``{"prompt_tokens", "completion_tokens"}`` once the response revealed them (or, for
    media priced by the request, from :meth:`request` on; in the request's unit)."""

    content_type: str | None
    """The translated body's content type when it differs from the backend's, else None."""

    @property
    def rewrites_stream(self) -> bool:
        """Whether a successful stream passes through :meth:`response_body` chunk by chunk.

        Known at request time; such a stream gets no HTTP/2 credit trailers (Envoy would hold
        back its end from the processor, see ``envoy_config._trailers_filter``)."""
        ...

    def request(self, op: str, body: dict[str, Any], stream: bool) -> bool:
        """Rewrite ``body`` (parsed) for the backend in place; True if anything changed."""
        ...

    def stream_recipe(self) -> dict[str, Any] | None:
        """After :meth:`request`, for a metered stream: what Envoy's Lua stream meter needs to
        translate this stream itself (then :attr:`rewrites_stream` is False), or None. Plain
        values, and ``errors``: a Struct the processor copies."""
        ...

    def backend_path(self, op: str, path: str) -> str | None:
        """The backend's path for this operation, or None to keep the client's."""
        ...

    def response_headers(self, status: int, headers: dict[str, str]) -> None:
        """The backend's response headers (lowercase names), before any body."""
        ...

    def wants_response_body(self, status: int, content_type: str) -> bool:
        """Whether the response body must pass through :meth:`response_body`."""
        ...

    def response_status(self, status: int) -> int | None:
        """The status the client gets instead of ``status``, or None to keep it."""
        ...

    def response_body(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        """The translated chunk, or None to pass it unchanged."""
        ...

    def error(self, status: int, body: bytes) -> GatewayError:
        """A backend error response in the gateway's terms."""
        ...


def for_backend(backend: Backend, model: Model, request_id: str = "") -> Translator:
    kind = backend.kind
    if model.kind in MEDIA_BACKENDS:  # audio and images (config allows only OpenAI-style ones)
        return OpenAIMedia(model, request_id)
    if kind == "vllm" or kind == "openai":
        return OpenAIToVLLM(model, request_id)
    if kind == "tgi":
        if backend.mode == "messages":
            return TgiMessages(model, request_id)
        return TgiNative(model, request_id)
    if kind == "tei":
        return Tei(model, request_id)
    raise GatewayError(
        "invalid_request_error",
        f"The model '{model.id}' is served by a '{kind}' backend, which this gateway"
        " version cannot translate to yet.",
        "model",
        status=501,
    )
