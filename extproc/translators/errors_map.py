"""Backend error responses, in every shape the backends send, -> :class:`GatewayError`.

Shapes understood (``shared/reference/backends.md`` §1.4, §2.5, §2.7, §3.5, §3.6):

* OpenAI / vLLM >= 0.10.1, nested: ``{"error": {"message", "type", "param", "code"}}``;
* vLLM < 0.10.1 and TEI's ``/v1/embeddings``, flat: ``{"message", "type", "param"?, "code"}``;
* TGI and TEI native: ``{"error": "<message>", "error_type": "<kind>"}`` (TGI's kinds are
  snake_case, TEI's PascalCase);
* TGI's Messages API mid-stream: ``{"error": {"message", "http_status_code"}}``;
* vLLM's 401 ``{"error": "Unauthorized"}``;
* axum's plain-text rejections (400 bad JSON, 413 body limit, 415 content type, 422 wrong
  types) and empty bodies (401 with an API key, 503).

The status mapping follows §6.3 and the README's "Errors" table: client-side mistakes become 400
(``context_length_exceeded`` when the backend says the prompt is too long), 404 stays 404
``model_not_found``, the backend's own 401/403 and failures (5xx, TGI 424 ``generation``, TEI 424
``Backend``) become 502 ``backend_unavailable``, backend capacity (429, 503) becomes 503
``backend_unavailable`` with ``Retry-After``. :func:`client_status` predicts the status from the
backend status alone (the processor needs it before the body arrives); :func:`normalize_error`
may refine it once the body is known (TEI's pre-2026 413 ``Validation`` -> 400, TEI 424 "not a
re-ranker model" -> 400).
"""

from __future__ import annotations

import re

import orjson

from ..errors import GatewayError

# TGI native error_type -> HTTP status (router/src/server.rs, `impl From<InferError>`); used for
# the in-band stream errors, which arrive inside a 200.
TGI_ERROR_STATUS: dict[str, int] = {
    "validation": 422,
    "template_error": 422,
    "missing_template_variable": 422,
    "tool_error": 422,
    "generation": 424,
    "overloaded": 429,
    "incomplete_generation": 500,
    "incomplete_generation_stream": 500,
    "stream_serialization_error": 500,
    "healthcheck": 503,
}

# TGI InferError Display prefixes (router/src/infer/mod.rs) -> the status of that error kind
_TGI_MESSAGE_STATUS: tuple[tuple[str, int], ...] = (
    ("Model is overloaded", 429),
    ("Request failed during generation", 424),
    ("Incomplete generation", 500),
)

# backend parameter names (backticked in TGI/TEI validation messages) -> the client's field
_PARAM_NAMES: dict[str, str] = {
    "max_new_tokens": "max_tokens",
    "top_n_tokens": "top_logprobs",
    "texts": "documents",
    "grammar": "response_format",
    "adapter_id": "model",
}
_BACKTICKED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")
# axum's 422 names the field by serde's path (``temperature``, ``messages[0].content``,
# ``parameters.max_new_tokens``), the gateway's own param form: "...target type: <path>: why"
_SERDE_PATH = re.compile(
    r"target type: ([A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*): (.*)", re.S
)
_MISSING_FIELD = re.compile(r"missing field `([A-Za-z_]\w*)`")
_NAME = re.compile(r"[A-Za-z_]\w*")
# vLLM/OpenAI "maximum context length", TGI "`inputs` tokens + `max_new_tokens` must be <= N",
# TGI/TEI "`inputs` must have less than N tokens"
_CONTEXT = re.compile(
    r"context length|maximum context|tokens \+ `max_new_tokens` must be"
    r"|must have less than \d+ tokens",
    re.IGNORECASE,
)


def parse_error(body: bytes) -> tuple[str, str | None, str]:
    """(message, param, backend error type) from any backend error body, or the raw text."""
    if not body:
        return "", None, ""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text[:500], None, ""
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, str):  # TGI/TEI native, or vLLM's 401 {"error": "Unauthorized"}
            kind = data.get("error_type")
            return err, None, kind if isinstance(kind, str) else ""
        if isinstance(err, dict):
            message = err.get("message") or err.get("detail") or ""
            param = err.get("param")
            return (
                str(message),
                param if isinstance(param, str) else None,
                str(err.get("type") or err.get("error_type") or ""),
            )
    if isinstance(data, str):
        return data[:500], None, ""
    return "", None, ""


def _client_param(path: str, input_param: str) -> str | None:
    """A backend field path in the client's terms: TGI's ``parameters.`` wrapper (the
    translator's, not the client's) dropped, the first name mapped (``inputs`` -> the input
    field, ``max_new_tokens`` -> ``max_tokens``), the rest (``[0].content``) kept."""
    found = _NAME.match(path)
    if found is None:
        return None
    head, rest = found.group(), path[found.end() :]
    if head == "parameters":
        return _client_param(rest[1:], input_param) if rest.startswith(".") else None
    if head == "inputs" or head == "input":
        return input_param + rest
    return _PARAM_NAMES.get(head, head) + rest


def _param_from_message(message: str, input_param: str) -> str | None:
    found = _SERDE_PATH.search(message)
    if found is not None:
        path, why = found.groups()
        missing = _MISSING_FIELD.match(why)  # "messages[0]: missing field `role`"
        return _client_param(f"{path}.{missing.group(1)}" if missing else path, input_param)
    found = _BACKTICKED.search(message)
    if found is None:
        return None
    return _client_param(found.group(1), input_param)


def normalize_error(status: int, body: bytes, input_param: str = "messages") -> GatewayError:
    """The gateway's error for a backend answer ``status`` with ``body``.

    ``input_param`` names the client field that carried the input (``messages``, ``prompt``,
    ``input``, ``documents``); TGI/TEI call it ``inputs`` in their messages.
    """
    message, param, kind = parse_error(body)
    lowered = message.lower()
    kind_l = kind.lower()
    if status == 404:
        return GatewayError(
            "model_not_found", message or "The backend does not serve this model.", param or "model"
        )
    if status == 413 and kind_l != "validation":  # axum's body limit (plain text)
        return GatewayError(
            "request_too_large", message or "The request is too large for the backend."
        )
    if status in (400, 413, 415, 422, 501) or (status == 424 and "model is not a" in lowered):
        if param is None and kind_l in ("validation", "empty", "tokenizer", ""):
            param = _param_from_message(message, input_param)
        if kind_l == "empty" and param is None:
            param = input_param
        if _CONTEXT.search(message):
            return GatewayError("context_length_exceeded", message, param or input_param)
        return GatewayError(
            "invalid_request_error", message or "The backend rejected the request.", param
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
    if status >= 500 or status == 424:
        return GatewayError(
            "backend_unavailable",
            f"The model backend failed: {message}" if message else "The model backend failed.",
            status=502,
        )
    return GatewayError("invalid_request_error", message or f"Backend answered {status}.", param)


def client_status(status: int) -> int | None:
    """The client's status for a backend error ``status`` before its body is known; None < 400.

    It can differ from :func:`normalize_error`'s once the body is read: TEI's 413 ``Validation``
    and its 424 "model is not a ..." both become 400.
    """
    if status < 400:
        return None
    return normalize_error(status, b"").status


def tgi_stream_error(data: dict[str, object], input_param: str = "messages") -> GatewayError:
    """A TGI in-band stream error event (native or Messages API) as a gateway error."""
    err = data.get("error")
    if isinstance(err, dict):  # Messages API: {"error": {"message", "http_status_code"}}
        message = err.get("message")
        message = message if isinstance(message, str) else ""
        # TGI says 422 whatever the failure; its InferError message prefix tells them apart.
        status = next((s for prefix, s in _TGI_MESSAGE_STATUS if message.startswith(prefix)), 0)
        if not status:
            code = err.get("http_status_code")
            status = code if isinstance(code, int) and code >= 400 else 422
        body = orjson.dumps({"error": {"message": message}})
        return normalize_error(status, body, input_param)
    kind = data.get("error_type")
    status = TGI_ERROR_STATUS.get(kind, 500) if isinstance(kind, str) else 500
    return normalize_error(status, orjson.dumps(data), input_param)
