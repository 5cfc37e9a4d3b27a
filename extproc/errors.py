"""The gateway's one error shape, and its stable codes.

Every error the gateway produces, in every phase, is a :class:`GatewayError`. The OpenAI dialect
renders it as OpenAI does::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages",
               "code": "invalid_request_error", "request_id": "..."}}

``code`` is stable and documented (README, "Errors"); ``type`` is OpenAI's coarse category so the
official SDKs map the status to their own exception classes; ``param`` names the offending field.
The envelope dialect (``/v1/inference/...``, ``extproc/dialects.py``) carries the same error
object, without the request id, inside its envelope::

    {"status": "error", "error": {"message": "...", "type": "...", "param": null, "code": "..."},
     "meta": {"request_id": "..."}}

The per-model proxy dialect uses the OpenAI shape for the gateway's own errors (and passes the
backend's errors through in the backend's schema). Envoy's own local replies (no healthy
upstream, upstream timeout, body too large, processor unreachable) are rendered in these shapes by
``local_reply_config`` mappers built from :data:`ENVOY_LOCAL_REPLIES` and :func:`local_reply_body`
in ``envoy_config.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

# code -> (HTTP status, OpenAI error type)
CODES: dict[str, tuple[int, str]] = {
    "invalid_api_key": (401, "authentication_error"),
    "key_expired": (401, "authentication_error"),
    "key_revoked": (401, "authentication_error"),
    # JWTs (auth.py): each way a token can be refused has its own code
    "invalid_token": (401, "authentication_error"),  # malformed, bad signature, unknown kid
    "token_algorithm_not_allowed": (401, "authentication_error"),  # alg none, HS/RS confusion
    "token_expired": (401, "authentication_error"),
    "token_not_yet_valid": (401, "authentication_error"),
    "invalid_issuer": (401, "authentication_error"),
    "invalid_audience": (401, "authentication_error"),
    "permission_denied": (403, "permission_error"),
    "model_not_found": (404, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "conflict": (409, "invalid_request_error"),
    "insufficient_credits": (402, "insufficient_credits"),
    "rate_limit_exceeded": (429, "rate_limit_error"),
    "invalid_request_error": (400, "invalid_request_error"),
    "context_length_exceeded": (400, "invalid_request_error"),
    "request_too_large": (413, "invalid_request_error"),
    "backend_unavailable": (503, "server_error"),
    "backend_timeout": (504, "server_error"),
    "gateway_overloaded": (503, "server_error"),
    "gateway_unavailable": (503, "server_error"),
    "internal_error": (500, "server_error"),
}

# Prefix of ImmediateResponse.details for replies the processor makes; Envoy's local reply
# mappers skip these so they never rewrite an error the processor already shaped.
DETAILS_PREFIX = "tollgate_"


@dataclass(slots=True)
class GatewayError(Exception):
    """An error the client sees. ``status`` defaults to the code's status."""

    code: str
    message: str
    param: str | None = None
    status: int = 0
    retry_after: int | None = None
    headers: tuple[tuple[str, str], ...] = ()  # extra response headers (X-RateLimit-*)

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown error code {self.code!r}")
        if not self.status:
            self.status = CODES[self.code][0]

    @property
    def type(self) -> str:
        return CODES[self.code][1]

    def _object(self) -> dict[str, object]:
        err: dict[str, object] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        if self.retry_after is not None:
            err["retry_after"] = self.retry_after
        return err

    def payload(self, request_id: str | None = None) -> dict[str, object]:
        err = self._object()
        if request_id:
            err["request_id"] = request_id
        return {"error": err}

    def body(self, request_id: str | None = None) -> bytes:
        return orjson.dumps(self.payload(request_id))

    def envelope_payload(self, request_id: str | None = None) -> dict[str, object]:
        """The envelope dialect's error: ``{"status": "error", "error": {...}, "meta": {...}}``."""
        return {"status": "error", "error": self._object(), "meta": {"request_id": request_id}}

    def envelope_body(self, request_id: str | None = None) -> bytes:
        return orjson.dumps(self.envelope_payload(request_id))


def invalid(message: str, param: str | None = None) -> GatewayError:
    """Shorthand for a 400 ``invalid_request_error`` naming ``param``."""
    return GatewayError("invalid_request_error", message, param)


def local_reply_body(code: str, message: str, envelope: bool) -> dict[str, object]:
    """The ``json_format`` of an Envoy local reply mapper: the same shapes as
    :meth:`GatewayError.payload` / :meth:`GatewayError.envelope_payload`, with Envoy's request
    id substituted."""
    err: dict[str, object] = {
        "message": message,
        "type": CODES[code][1],
        "param": None,
        "code": code,
    }
    request_id = "%REQ(X-REQUEST-ID)%"
    if envelope:
        return {"status": "error", "error": err, "meta": {"request_id": request_id}}
    return {"error": {**err, "request_id": request_id}}


# Envoy's own local replies, rendered by local_reply_config mappers (first match wins). Each entry:
# the match (a CEL expression on the stream, or "flags:XX,YY" for Envoy response flags), the status
# to send (0 keeps Envoy's), the code and the message.
ENVOY_LOCAL_REPLIES: tuple[tuple[str, int, str, str], ...] = (
    (
        "response.code_details.startsWith('ext_proc')",
        503,
        "gateway_unavailable",
        "The gateway's request processor is unavailable; the request was not completed.",
    ),
    (
        "response.code_details.contains('grpc_json_transcode_failure')",
        400,
        "invalid_request_error",
        "The request does not match the control API (see /openapi.json): %LOCAL_REPLY_BODY%",
    ),
    (
        "flags:UO",
        503,
        "backend_unavailable",
        "The model backend is at its concurrency limit; retry shortly.",
    ),
    (
        "response.code == 503 && !response.code_details.startsWith('tollgate')",
        503,
        "backend_unavailable",
        "The model backend is unavailable (no healthy endpoint or connection refused).",
    ),
    (
        "response.code == 504 && !response.code_details.startsWith('tollgate')",
        504,
        "backend_timeout",
        "The model backend did not answer in time.",
    ),
    (
        "response.code == 413 && !response.code_details.startsWith('tollgate')",
        413,
        "request_too_large",
        "The request body is larger than this gateway accepts.",
    ),
    (
        "response.code == 404 && !response.code_details.startsWith('tollgate')",
        404,
        "not_found",
        "No route for this path.",
    ),
    (
        "response.code >= 400 && response.code < 500"
        " && !response.code_details.startsWith('tollgate')",
        0,
        "invalid_request_error",
        "The request could not be read (malformed HTTP).",
    ),
    (
        # the backend closed or reset the connection, or broke HTTP, mid-answer
        "flags:UC,UR,UPE",
        502,
        "backend_unavailable",
        "The model backend closed the connection before its answer was complete.",
    ),
    (
        "response.code >= 500 && !response.code_details.startsWith('tollgate')",
        0,
        "internal_error",
        "The gateway failed to handle the request.",
    ),
)
