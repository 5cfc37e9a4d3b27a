"""The control API's REST routes, read from the proto's ``google.api.http`` annotations.

One definition (``protos/tollgate/admin/v1/admin.proto``) serves three readers: Envoy's
gRPC-JSON transcoder (the descriptor set from :func:`descriptor_set`), the processor (which
lets exactly these method/path pairs through to the transcoder, :func:`match`), and the OpenAPI
document (openapi.py). The processor also turns the control API's gRPC errors, which reach it
as response headers, into the gateway's error shape (:func:`error_from_headers`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor

from .errors import CODES, GatewayError
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


def error_from_headers(headers: dict[str, str]) -> GatewayError | None:
    """The gateway's error for a transcoded control-API response, or None if it succeeded."""
    status = headers.get("grpc-status")
    if status is None or status == "0":
        return None
    code = headers.get(ERROR_CODE_KEY) or _BY_GRPC_STATUS.get(status, "internal_error")
    if code not in CODES:
        code = "internal_error"
    message = unquote(headers.get("grpc-message", "")) or "The control API failed."
    return GatewayError(code, message, headers.get(ERROR_PARAM_KEY) or None)


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
