"""The interface every translator implements, and the choice of translator per backend kind."""

from __future__ import annotations

from typing import Any, Protocol

from ..config import Backend, Model
from ..errors import GatewayError


class Translator(Protocol):
    def request(self, op: str, body: dict[str, Any], stream: bool) -> bool:
        """Rewrite ``body`` (parsed) for the backend in place; True if anything changed."""
        ...

    def backend_path(self, op: str, path: str) -> str | None:
        """The backend's path for this operation, or None to keep the client's."""
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


def for_backend(backend: Backend, model: Model) -> Translator:
    from .openai_vllm import OpenAIToVLLM

    if backend.kind in ("vllm", "openai"):
        return OpenAIToVLLM(model)
    raise GatewayError(
        "invalid_request_error",
        f"The model '{model.id}' is served by a '{backend.kind}' backend, which this gateway"
        " version cannot translate to yet.",
        "model",
        status=501,
    )
