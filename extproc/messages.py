"""Building and reading Envoy ext_proc messages (xds-protos, upb-backed).

Kept tiny and allocation-light: it runs several times per request.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    ImmediateResponse,
    ProcessingResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct

from .errors import DETAILS_PREFIX, GatewayError

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
JSON = b"application/json"

# Prebuilt answers that carry no change (never mutated after construction).
CONTINUE_REQUEST_HEADERS = ProcessingResponse(request_headers=HeadersResponse())
CONTINUE_RESPONSE_HEADERS = ProcessingResponse(response_headers=HeadersResponse())
CONTINUE_REQUEST_BODY = ProcessingResponse(request_body=BodyResponse())
CONTINUE_RESPONSE_BODY = ProcessingResponse(response_body=BodyResponse())

BUFFER_RESPONSE = ProcessingMode(response_body_mode=ProcessingMode.BUFFERED)
STREAM_RESPONSE = ProcessingMode(response_body_mode=ProcessingMode.STREAMED)
# Routed from the request headers: the body goes to the backend without passing through here.
SKIP_REQUEST_BODY = ProcessingMode(request_body_mode=ProcessingMode.NONE)


def header_map(headers: Iterable[HeaderValue]) -> dict[str, str]:
    """Envoy's header list as a dict (keys are already lower-case)."""
    return {h.key: (h.raw_value.decode("latin-1") if h.raw_value else h.value) for h in headers}


def set_headers(
    pairs: Iterable[tuple[str, str | bytes]], remove: Iterable[str] = ()
) -> HeaderMutation:
    # Plain dicts: upb builds the messages in C, about twice as fast as a HeaderValueOption and
    # a HeaderValue object per pair (a metered response sets 8-14 headers).
    return HeaderMutation(
        set_headers=[
            {
                "header": {"key": k, "raw_value": v if isinstance(v, bytes) else v.encode()},
                "append_action": _OVERWRITE,
            }
            for k, v in pairs
        ],
        remove_headers=list(remove),
    )


def immediate(
    status: int,
    body: bytes,
    details: str,
    headers: Iterable[tuple[str, str | bytes]] = (),
    content_type: bytes = JSON,
) -> ProcessingResponse:
    return ProcessingResponse(
        immediate_response=ImmediateResponse(
            status=HttpStatus(code=status),  # type: ignore[arg-type]
            headers=set_headers([("content-type", content_type), *headers]),
            body=body,
            details=details,
        )
    )


def error_response(
    err: GatewayError,
    request_id: str | None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
) -> ProcessingResponse:
    """``err`` as an immediate response; ``body`` is its rendering in the request's dialect
    (default: the OpenAI shape)."""
    extra: list[tuple[str, str]] = [*headers, *err.headers]
    if err.retry_after is not None:
        extra.append(("retry-after", str(err.retry_after)))
    if body is None:
        body = err.body(request_id)
    return immediate(err.status, body, DETAILS_PREFIX + err.code, extra)


def request_headers_response(
    headers: HeaderMutation,
    remove: Iterable[str] = (),
    clear_route_cache: bool = False,
    mode: ProcessingMode | None = None,
) -> ProcessingResponse:
    """Continue with ``headers`` set and the ``remove`` headers removed."""
    if remove:
        headers.remove_headers.extend(remove)
    common = CommonResponse(header_mutation=headers, clear_route_cache=clear_route_cache)
    resp = ProcessingResponse(request_headers=HeadersResponse(response=common))
    if mode is not None:
        resp.mode_override.CopyFrom(mode)
    return resp


def put_fields(fields: Any, values: dict[str, str | bool | int | float]) -> None:
    """Set flat scalar values on a Struct's ``fields`` (Struct.update recurses in Python,
    several times slower for the few values a request's metadata has)."""
    for key, value in values.items():
        if isinstance(value, bool):
            fields[key].bool_value = value
        elif isinstance(value, str):
            fields[key].string_value = value
        else:
            fields[key].number_value = value


def request_body_response(
    headers: HeaderMutation | None,
    body: bytes | None,
    clear_route_cache: bool,
    metadata: Struct | None = None,
) -> ProcessingResponse:
    common = CommonResponse(clear_route_cache=clear_route_cache)
    if headers is not None:
        common.header_mutation.CopyFrom(headers)
    if body is not None:
        common.body_mutation.CopyFrom(BodyMutation(body=body))
    resp = ProcessingResponse(request_body=BodyResponse(response=common))
    if metadata is not None:
        resp.dynamic_metadata.CopyFrom(metadata)
    return resp


def response_headers_response(
    headers: HeaderMutation | None, mode: ProcessingMode | None = None
) -> ProcessingResponse:
    common = CommonResponse()
    if headers is not None:
        common.header_mutation.CopyFrom(headers)
    resp = ProcessingResponse(response_headers=HeadersResponse(response=common))
    if mode is not None:
        resp.mode_override.CopyFrom(mode)
    return resp


def response_body_response(
    body: bytes | None, headers: HeaderMutation | None = None
) -> ProcessingResponse:
    common = CommonResponse()
    if body is not None:
        common.body_mutation.CopyFrom(BodyMutation(body=body))
    if headers is not None:
        common.header_mutation.CopyFrom(headers)
    return ProcessingResponse(response_body=BodyResponse(response=common))
