"""``GET /openapi.json``: an OpenAPI 3.1 document of the gateway's whole public surface.

Generated, never written by hand, from the same tables that route requests, so it cannot
drift: the OpenAI-compatible operations (``operations.POST_OPERATIONS``), the model paths the
processor answers, and the control API's REST routes with their request and answer schemas,
read from the proto's descriptors (``control_routes.ROUTES``). tests/test_openapi.py calls
every path and method of the document on a running gateway, and probes that nothing else is
routed. Served without a credential (it holds no model ids and no account data).
"""

from __future__ import annotations

from typing import Any

import orjson
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from . import control_routes
from .config import GatewayConfig
from .errors import CODES
from .operations import MODELS_PATH, POST_OPERATIONS

OPENAPI_PATH = "/openapi.json"
HEALTH_PATH = MODELS_PATH + "/{model}/health"

_SCALARS = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},  # proto3 JSON
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
}
_WELL_KNOWN = {
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
}
_OP_SUMMARIES = {
    "chat": "Chat completion (OpenAI-compatible; `stream: true` for SSE)",
    "completions": "Text completion (OpenAI-compatible)",
    "embeddings": "Embeddings (OpenAI-compatible)",
    "rerank": "Rerank documents against a query (Cohere/Jina shape)",
    "classify": "Classify inputs",
}


def _field_schema(f: FieldDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        assert f.message_type is not None
        name = f.message_type.full_name
        item = _WELL_KNOWN.get(name)
        if item is None:
            _message_schema(f.message_type, schemas)
            item = {"$ref": f"#/components/schemas/{f.message_type.name}"}
    else:
        item = dict(_SCALARS.get(f.type, {"type": "string"}))
    if f.is_repeated:
        return {"type": "array", "items": item}
    return item


def _message_schema(msg: Descriptor, schemas: dict[str, Any]) -> None:
    if msg.name in schemas:
        return
    schemas[msg.name] = {}  # placeholder against recursion
    props = {f.name: _field_schema(f, schemas) for f in msg.fields}
    schemas[msg.name] = {"type": "object", "properties": props}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {"$ref": f"#/components/responses/{s}"}
        for s in sorted({401, 403, 429, 500, 503, *statuses})
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _control_paths(schemas: dict[str, Any]) -> dict[str, dict[str, Any]]:
    paths: dict[str, dict[str, Any]] = {}
    for r in control_routes.ROUTES:
        rpc = r.rpc
        _message_schema(rpc.input_type, schemas)
        _message_schema(rpc.output_type, schemas)
        params: list[dict[str, Any]] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in r.params
        ]
        if r.body != "*":
            for f in rpc.input_type.fields:
                if f.name not in r.params:
                    params.append(
                        {"name": f.name, "in": "query", "schema": _field_schema(f, schemas)}
                    )
        op: dict[str, Any] = {
            "operationId": rpc.name,
            "tags": ["control"],
            "summary": rpc.name,
            "parameters": params,
            "responses": {
                "200": {
                    "description": rpc.output_type.name,
                    **_json({"$ref": f"#/components/schemas/{rpc.output_type.name}"}),
                },
                **_errors(400, 404, 409),
            },
        }
        if r.body == "*":
            op["requestBody"] = {
                "required": True,
                **_json({"$ref": f"#/components/schemas/{rpc.input_type.name}"}),
            }
        paths.setdefault(r.template, {})[r.method.lower()] = op
    return paths


def _inference_paths() -> dict[str, dict[str, Any]]:
    paths: dict[str, dict[str, Any]] = {}
    for path, op in POST_OPERATIONS.items():
        body = {
            "type": "object",
            "required": ["model"],
            "properties": {"model": {"type": "string"}},
            "additionalProperties": True,
        }
        answer: dict[str, Any] = {"description": "The backend's answer in the OpenAI schema"}
        answer.update(_json({"type": "object", "additionalProperties": True}))
        if op.name in ("chat", "completions"):
            answer["content"]["text/event-stream"] = {"schema": {"type": "string"}}
        paths[path] = {
            "post": {
                "operationId": op.name,
                "tags": ["inference"],
                "summary": _OP_SUMMARIES.get(op.name, op.name),
                "requestBody": {"required": True, **_json(body)},
                "responses": {
                    "200": answer,
                    **_errors(400, 402, 404, 413, 502, 504),
                },
            }
        }
    model = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    card = {"$ref": "#/components/schemas/ModelCard"}
    paths[MODELS_PATH] = {
        "get": {
            "operationId": "listModels",
            "tags": ["models"],
            "summary": "The models this credential may use",
            "responses": {
                "200": {
                    "description": "A list of models",
                    **_json(
                        {
                            "type": "object",
                            "properties": {
                                "object": {"const": "list"},
                                "data": {"type": "array", "items": card},
                            },
                        }
                    ),
                },
                **_errors(),
            },
        }
    }
    paths[MODELS_PATH + "/{model}"] = {
        "get": {
            "operationId": "getModel",
            "tags": ["models"],
            "parameters": model,
            "responses": {"200": {"description": "A model", **_json(card)}, **_errors(404)},
        }
    }
    paths[HEALTH_PATH] = {
        "get": {
            "operationId": "getModelHealth",
            "tags": ["models"],
            "summary": "ready | loading | unavailable, from Envoy's health checks",
            "parameters": model,
            "responses": {
                "200": {
                    "description": "The model's backend health",
                    **_json({"$ref": "#/components/schemas/ModelHealth"}),
                },
                **_errors(404),
            },
        }
    }
    paths[OPENAPI_PATH] = {
        "get": {
            "operationId": "openapi",
            "tags": ["meta"],
            "summary": "This document",
            "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1", **_json({"type": "object"})}},
        }
    }
    return paths


def document(cfg: GatewayConfig) -> dict[str, Any]:
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": "string", "enum": sorted(CODES)},
                        "request_id": {"type": "string"},
                        "retry_after": {"type": "integer"},
                    },
                }
            },
        },
        "ModelCard": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "model"},
                "created": {"type": "integer"},
                "owned_by": {"type": "string"},
                "kind": {"type": "string"},
                "context_length": {"type": "integer"},
                "max_tokens": {"type": "integer"},
            },
        },
        "ModelHealth": {
            "type": "object",
            "properties": {
                "object": {"const": "model.health"},
                "id": {"type": "string"},
                "status": {"enum": ["ready", "loading", "unavailable"]},
                "backend": {"type": "string"},
                "endpoints": {
                    "type": "object",
                    "properties": {"passing": {"type": "integer"}, "total": {"type": "integer"}},
                },
            },
        },
    }
    paths = {**_inference_paths(), **_control_paths(schemas)}
    statuses = sorted({int(s) for p in paths.values() for o in p.values() for s in o["responses"]})
    responses = {
        str(s): {"description": "An error", **_json({"$ref": "#/components/schemas/Error"})}
        for s in statuses
        if s >= 400
    }
    security_schemes: dict[str, Any] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (tg_...), a JWT, or the operator's admin key",
        }
    }
    security: list[dict[str, list[str]]] = [{"bearer": []}]
    if cfg.auth.jwt is not None and cfg.auth.jwt.cookie:
        security_schemes["cookie"] = {"type": "apiKey", "in": "cookie", "name": cfg.auth.jwt.cookie}
        security.append({"cookie": []})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tollgate",
            "version": "1",
            "description": "OpenAI-compatible inference and the Tollgate control API."
            " Errors: one shape, a stable `code` (README, Errors).",
        },
        "security": security,
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "responses": responses,
            "securitySchemes": security_schemes,
        },
    }


def body(cfg: GatewayConfig) -> bytes:
    return orjson.dumps(document(cfg))
