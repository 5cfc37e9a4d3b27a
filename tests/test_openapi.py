"""/openapi.json describes the real routes: every documented path and method is served, other
methods on them are refused, and undocumented paths are not routed."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from extproc import control_routes
from extproc.operations import POST_OPERATIONS
from tests.harness import ADMIN_KEY, Gateway

METHODS = ("get", "post", "patch", "delete", "put")
SAMPLE = {"model": "sim-embed", "id": "key_0000000000000000"}


@pytest.fixture(scope="module")
def doc(gateway: Gateway) -> dict[str, Any]:
    r = httpx.get(gateway.base_url + "/openapi.json")  # no credential needed
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    return r.json()


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [
            r for v in node.values() for r in _refs(v)
        ]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_is_openapi_31_and_every_ref_resolves(doc: dict[str, Any]) -> None:
    assert doc["openapi"] == "3.1.0"
    for ref in _refs(doc):
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert isinstance(node, dict), ref
    key = doc["components"]["schemas"]["Key"]["properties"]
    assert key["models"] == {"type": "array", "items": {"type": "string"}}
    assert doc["paths"]["/v1/keys"]["post"]["requestBody"]["content"]["application/json"]


def test_every_route_of_the_gateway_is_documented(doc: dict[str, Any]) -> None:
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    expected = {("POST", p) for p in POST_OPERATIONS}
    expected |= {(r.method, r.template) for r in control_routes.ROUTES}
    expected |= {
        ("GET", "/v1/models"),
        ("GET", "/v1/models/{model}"),
        ("GET", "/v1/models/{model}/health"),
        ("GET", "/openapi.json"),
    }
    assert documented == expected


def _routing_refusal(r: httpx.Response) -> bool:
    """True if the gateway has no route for the method and path (not a handler's answer)."""
    if r.status_code not in (404, 405):
        return False
    err = r.json()["error"]
    return err["code"] == "method_not_allowed" or err["message"].startswith(
        ("Unknown path", "No route for this path")
    )


def test_documented_routes_are_served_and_nothing_else(
    gateway: Gateway, doc: dict[str, Any]
) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for template, ops in doc["paths"].items():
        path = template.format(**SAMPLE)
        for method in METHODS:
            body = {"model": "sim-embed"} if method in ("post", "patch", "put") else None
            r = httpx.request(method, gateway.base_url + path, headers=headers, json=body)
            if method in ops:
                assert not _routing_refusal(r), (method, path, r.text)
            else:
                assert _routing_refusal(r), (method, path, r.status_code, r.text)
    for path in (
        "/v1/keys/key_0000000000000000/x",
        "/v1/accounts/a/keys",
        "/v1/nothing",
        "/v2/models",
        "/admin",
        "/clusters",
        "/tollgate.admin.v1.Admin/ListKeys",
    ):
        r = httpx.get(gateway.base_url + path, headers=headers)
        assert r.status_code == 404 and _routing_refusal(r), (path, r.text)
