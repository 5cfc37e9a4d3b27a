"""The control API's REST routes, read from the proto's ``google.api.http`` annotations.

One definition (``protos/tollgate/admin/v1/admin.proto``) serves three readers: Envoy's
gRPC-JSON transcoder (the descriptor set from :func:`descriptor_set`), the processor (which
lets exactly these method/path pairs through to the transcoder, :func:`match`), and the OpenAPI
document (openapi.py). The processor also turns the control API's gRPC errors, which reach it
as response headers, into the gateway's error shape (:func:`error_from_headers`), refuses values
the transcoder would pass on undecodable (:func:`check_utf8`), and names the field of the
transcoder's own 400s (:func:`transcoder_error`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, unquote_to_bytes

import orjson
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor

from .errors import CODES, ENVOY_LOCAL_REPLIES, GatewayError, invalid
from .proto import admin_pb2

SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
SERVICE_NAME = SERVICE.full_name  # tollgate.admin.v1.Admin
GRPC_PREFIX = f"/{SERVICE_NAME}/"
ERROR_CODE_KEY = "tollgate-error-code"  # trailing metadata: the gateway's error code
ERROR_PARAM_KEY = "tollgate-error-param"


@dataclass(frozen=True, slots=True)
class Route:
    method: str  # GET, POST, PATCH, DELETE, PUT
    template: str  # /v1/keys/{id}
    body: str  # "*" or ""
    rpc: MethodDescriptor
    pattern: re.Pattern[str]

    @property
    def params(self) -> list[str]:
        return re.findall(r"{([^}=]+)", self.template)


def _routes() -> tuple[Route, ...]:
    out = []
    for rpc in SERVICE.methods:
        opts = descriptor_pb2.MethodOptions()
        opts.ParseFromString(rpc.GetOptions().SerializeToString())
        if not opts.HasExtension(annotations_pb2.http):
            continue
        rule: http_pb2.HttpRule = opts.Extensions[annotations_pb2.http]
        for r in (rule, *rule.additional_bindings):
            kind = r.WhichOneof("pattern")
            if kind is None or kind == "custom":
                continue
            template = getattr(r, kind)
            regex = re.sub(
                r"{[^}]+}", "[^/]+", re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
            )
            out.append(Route(kind.upper(), template, r.body, rpc, re.compile(f"^{regex}$")))
    return tuple(out)


ROUTES = _routes()
ROOTS = tuple(
    sorted({"/" + r.template.split("/")[1] + "/" + r.template.split("/")[2] for r in ROUTES})
)


def is_control_path(path: str) -> bool:
    return any(path == root or path.startswith(root + "/") for root in ROOTS)


def match(method: str, path: str) -> Route:
    """The route for a control path, or the 404/405 the client gets."""
    methods = [r for r in ROUTES if r.pattern.match(path)]
    for r in methods:
        if r.method == method:
            return r
    if methods:
        allowed = ", ".join(sorted({r.method for r in methods}))
        raise GatewayError("method_not_allowed", f"Use {allowed} for {path}.")
    raise GatewayError("not_found", f"Unknown path: {method} {path}.")


# gRPC status -> the gateway's code, for errors without the control API's own code (Envoy's
# or grpc's: unimplemented method, deadline, transport)
_BY_GRPC_STATUS = {
    "1": "internal_error",  # CANCELLED
    "3": "invalid_request_error",
    "4": "gateway_unavailable",  # DEADLINE_EXCEEDED
    "5": "not_found",
    "6": "conflict",
    "7": "permission_denied",
    "8": "rate_limit_exceeded",
    "12": "not_found",  # UNIMPLEMENTED
    "14": "gateway_unavailable",
    "16": "invalid_api_key",
}


# grpc's own message for an exception outside the handler, e.g. "Unexpected <class
# 'google.protobuf.message.DecodeError'>: Error parsing message ...": Python internals
_UNEXPECTED = re.compile(r"Unexpected <class '([\w.]+)'>")
_NOT_UTF8 = "A path segment or query value is not valid UTF-8 once percent-decoded."


def error_from_headers(headers: dict[str, str]) -> GatewayError | None:
    """The gateway's error for a transcoded control-API response, or None if it succeeded."""
    status = headers.get("grpc-status")
    if status is None or status == "0":
        return None
    message = unquote(headers.get("grpc-message", "")) or "The control API failed."
    own = headers.get(ERROR_CODE_KEY)
    unexpected = None if own else _UNEXPECTED.match(message)
    if unexpected is not None:  # never the exception's text to the client
        if unexpected.group(1).endswith("DecodeError"):
            # The transcoder copies a path or query value's bytes into a string field as they
            # are (it refuses a JSON body's bad UTF-8 itself): the worker's grpc cannot decode
            # the request. check_utf8 names the value first; this is what is left without it.
            return invalid(_NOT_UTF8)
        return GatewayError("internal_error", "The control API failed.")
    code = own or _BY_GRPC_STATUS.get(status, "internal_error")
    if code not in CODES:
        code = "internal_error"
    return GatewayError(code, message, headers.get(ERROR_PARAM_KEY) or None)


def _is_utf8(value: str) -> bool:
    try:
        unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_utf8(path_and_query: str) -> GatewayError | None:
    """A 400 naming the first path variable or query value of a control request that is not
    UTF-8 once percent-decoded, or None.

    The transcoder copies such bytes into a proto string field, which the worker's grpc then
    refuses as a whole (naming no field): only the request line still tells which it was.
    """
    path, _, query = path_and_query.partition("?")
    route = next((r for r in ROUTES if r.pattern.match(path)), None)
    if route is not None:
        for part, value in zip(route.template.split("/"), path.split("/"), strict=True):
            if part.startswith("{") and not _is_utf8(value):
                name = part.strip("{}").partition("=")[0]
                return invalid(f"'{name}' must be valid UTF-8 once percent-decoded.", name)
    for pair in query.split("&") if query else ():
        name, _, value = pair.partition("=")
        if not _is_utf8(value):
            name = unquote(name.replace("+", " "))
            return invalid(f"'{name}' must be valid UTF-8 once percent-decoded.", name)
    return None


# ---------------------------------------------------------------- the transcoder's own 400s
# Envoy's transcoder refuses a request it cannot convert with a local reply (no grpc-status),
# which the local reply mapper renders as "<template>: <the transcoder's message>" (errors.py).
_TRANSCODER_MESSAGE = next(
    message for match, _, _, message in ENVOY_LOCAL_REPLIES if "grpc_json_transcode" in match
)
_TRANSCODER_PREFIX = _TRANSCODER_MESSAGE.partition("%LOCAL_REPLY_BODY%")[0]
# "limits.rpm: invalid value ...", "models[0]: ...", ": Root element must be a message."
_FIELD_PATH = re.compile(
    r"(?P<path>[A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*)?: (?P<rest>.*)", re.S
)
# protobuf's JSON parser names the field where its template says "type" for this one
_OBJECT_ON_SCALAR = re.compile(
    r"invalid value Starting an object on a scalar field for type (\w+)$"
)
_UNKNOWN_FIELD = re.compile(r'Could not find field "([^"]+)" in the type')


def _request_fields() -> frozenset[str]:
    """Every field name of the control API's requests, nested messages included."""
    names: set[str] = set()
    todo = [rpc.input_type for rpc in SERVICE.methods]
    seen: set[str] = set()
    while todo:
        msg = todo.pop()
        if msg.full_name in seen or msg.full_name.startswith("google.protobuf."):
            continue
        seen.add(msg.full_name)
        for f in msg.fields:
            names.add(f.name)
            if f.message_type is not None:
                todo.append(f.message_type)
    return frozenset(names)


_FIELDS = _request_fields()


def transcoder_param(detail: str) -> str | None:
    """The field the transcoder's message ``detail`` names (``limit``, ``limits.rpm``,
    ``models[0]``, an unknown query parameter), or None."""
    unknown = _UNKNOWN_FIELD.match(detail)
    if unknown is not None:  # the client's own name: no field of ours to check it against
        return unknown.group(1)
    found = _FIELD_PATH.fullmatch(detail)
    if found is None:
        return None
    path = found.group("path") or ""
    inner = _OBJECT_ON_SCALAR.match(found.group("rest"))
    if inner is not None:
        path = f"{path}.{inner.group(1)}" if path else inner.group(1)
    head = re.match(r"\w+", path)
    return path if head is not None and head.group(0) in _FIELDS else None


def is_transcoder_reply(headers: dict[str, str]) -> bool:
    """A control response that is the transcoder's 400 (no gRPC call was made)."""
    return headers.get(":status") == "400" and "grpc-status" not in headers


def transcoder_error(body: bytes) -> GatewayError:
    """The transcoder's 400, as rendered by Envoy's local reply mapper, with ``param`` naming
    the field its message names."""
    try:
        err = orjson.loads(body)["error"]
        message, param = err["message"], err.get("param")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = param = None
    if not isinstance(message, str):  # not the mapper's shape: still the transcoder's 400
        return invalid(_TRANSCODER_PREFIX.removesuffix(": ") + ".")
    if not isinstance(param, str) or not param:
        param = transcoder_param(message.removeprefix(_TRANSCODER_PREFIX))
    return invalid(message, param)


def descriptor_set() -> bytes:
    """A FileDescriptorSet of the control API and everything it imports, for Envoy's
    transcoder; built from the generated module (which tests keep equal to the proto)."""
    files: list[FileDescriptor] = []

    def visit(fd: FileDescriptor) -> None:
        if fd in files:
            return
        for dep in fd.dependencies:
            visit(dep)
        files.append(fd)

    visit(admin_pb2.DESCRIPTOR)
    out = descriptor_pb2.FileDescriptorSet()
    for fd in files:
        out.file.add().ParseFromString(fd.serialized_pb)
    return out.SerializeToString()
