"""The control API: one proto, served as gRPC by the workers and as REST through Envoy's
transcoder; the admin key and scoped keys; tenant isolation."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import yaml

from extproc import control_routes, protogen
from extproc.proto import admin_pb2, admin_pb2_grpc
from tests.harness import ADMIN_KEY, SECRETS, Gateway

ROOT = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "hi"}]


def test_generated_code_matches_the_proto() -> None:
    for name, data in protogen.generate().items():
        assert (protogen.OUT / name).read_bytes() == data, f"{name} is stale: run `make protos`"


def test_envoy_transcodes_exactly_the_annotated_methods() -> None:
    from google.protobuf import descriptor_pb2

    bootstrap = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    [transcoder] = [
        f
        for f in hcm["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.grpc_json_transcoder"
    ]
    import base64

    fds = descriptor_pb2.FileDescriptorSet.FromString(
        base64.b64decode(transcoder["typed_config"]["proto_descriptor_bin"])
    )
    assert [f.name for f in fds.file][-1] == "tollgate/admin/v1/admin.proto"
    assert transcoder["typed_config"]["services"] == ["tollgate.admin.v1.Admin"]
    rest = {(r.method, r.template) for r in control_routes.ROUTES}
    assert ("DELETE", "/v1/keys/{id}") in rest and ("GET", "/v1/usage") in rest
    assert len(rest) == 13  # every RPC but ListModels (gRPC only)


# --------------------------------------------------------------------------- helpers


class Api:
    def __init__(self, gw: Gateway, credential: str) -> None:
        self.gw = gw
        self.headers = {"Authorization": f"Bearer {credential}"}

    def __call__(self, method: str, path: str, body: Any = None, **params: str) -> httpx.Response:
        return httpx.request(
            method,
            self.gw.base_url + path,
            headers=self.headers,
            json=body,
            params=params or None,
            timeout=10,
        )

    def ok(self, method: str, path: str, body: Any = None, **params: str) -> dict[str, Any]:
        r = self(method, path, body, **params)
        assert r.status_code == 200, r.text
        return r.json()


def _code(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def tenant(admin: Api, scopes: list[str] | None = None) -> tuple[str, str, str]:
    """A fresh account with credits and a key: (account, raw key, key id)."""
    account = "t-" + uuid.uuid4().hex[:10]
    admin.ok("POST", "/v1/accounts", {"id": account, "name": f"Tenant {account}"})
    admin.ok("POST", "/v1/credits/grants", {"account": account, "amount": "5"})
    body = {"name": "main", "account": account, "scopes": scopes or ["models:use", "usage:read"]}
    key = admin.ok("POST", "/v1/keys", body)
    SECRETS.append(key["key"])
    return account, key["key"], key["id"]


@pytest.fixture()
def admin(gateway: Gateway) -> Api:
    return Api(gateway, ADMIN_KEY)


# --------------------------------------------------------------------------- keys


def test_key_lifecycle_through_rest(gateway: Gateway, admin: Api) -> None:
    account, raw, key_id = tenant(admin)
    client = openai.OpenAI(base_url=gateway.v1, api_key=raw, max_retries=0)
    assert client.chat.completions.create(model="sim-chat", messages=HELLO, max_tokens=2)  # type: ignore[arg-type]

    listed = admin.ok("GET", "/v1/keys", account=account)["data"]
    assert [k["id"] for k in listed] == [key_id]
    assert "key" not in listed[0] and listed[0]["prefix"] == raw[:11]
    assert raw not in str(listed)
    shown = admin.ok("GET", f"/v1/keys/{key_id}")
    assert shown["status"] == "active" and shown["models"] == ["*"]
    assert shown["last_used_at"]  # the chat above

    changed = admin.ok(
        "PATCH",
        f"/v1/keys/{key_id}",
        {"name": "renamed", "models": ["sim-embed"], "limits": {"rpm": 7}},
    )
    assert changed["name"] == "renamed" and changed["models"] == ["sim-embed"]
    assert changed["limits"] == {"rpm": 7}
    with pytest.raises(openai.PermissionDeniedError):  # the pool changed on every worker
        client.chat.completions.create(model="sim-chat", messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    r = client.embeddings.with_raw_response.create(model="sim-embed", input="x")
    assert r.headers["x-ratelimit-limit-requests"] == "7"

    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1.2))
    assert admin.ok("PATCH", f"/v1/keys/{key_id}", {"expires_at": soon})["expires_at"]
    time.sleep(1.5)
    with pytest.raises(openai.AuthenticationError) as exc:
        client.embeddings.create(model="sim-embed", input="x")
    assert exc.value.body["code"] == "key_expired"  # type: ignore[index]
    assert admin.ok("GET", f"/v1/keys/{key_id}")["status"] == "expired"
    admin.ok("PATCH", f"/v1/keys/{key_id}", {"expires_at": ""})  # never again
    assert client.embeddings.create(model="sim-embed", input="x").data

    revoked = admin.ok("DELETE", f"/v1/keys/{key_id}")
    assert revoked["status"] == "revoked" and revoked["revoked_at"]
    with pytest.raises(openai.AuthenticationError) as exc:
        client.embeddings.create(model="sim-embed", input="x")
    assert exc.value.body["code"] == "key_revoked"  # type: ignore[index]
    assert _code(admin("PATCH", f"/v1/keys/{key_id}", {"name": "x"})) == (409, "conflict")


def test_bad_requests_name_the_problem(admin: Api) -> None:
    assert _code(admin("PUT", "/v1/keys")) == (405, "method_not_allowed")
    assert _code(admin("GET", "/v1/keys/a/b")) == (404, "not_found")
    r = admin("GET", "/v1/usage", colour="red")
    assert _code(r) == (400, "invalid_request_error") and "colour" in r.json()["error"]["message"]
    r = admin("POST", "/v1/keys", {"name": "x", "scopes": ["root"]})
    assert _code(r) == (400, "invalid_request_error") and "root" in r.json()["error"]["message"]
    r = admin("POST", "/v1/keys", {"name": "x", "models": ["no-such-model"]})
    assert r.json()["error"]["param"] == "models"
    r = admin("POST", "/v1/keys", {"name": "x", "expires_at": "2001-01-01T00:00:00Z"})
    assert r.json()["error"]["param"] == "expires_at"
    r = admin("POST", "/v1/credits/grants", {"account": "default", "amount": "1.1234567"})
    assert r.json()["error"]["param"] == "amount" and "6 decimal" in r.json()["error"]["message"]
    assert _code(admin("POST", "/v1/accounts", {"id": "default"})) == (409, "conflict")
    assert _code(admin("POST", "/v1/accounts", {"id": "bad:name"}))[0] == 400
    assert _code(admin("GET", "/v1/accounts/nobody-here")) == (404, "not_found")


def test_no_or_wrong_credential_is_401(gateway: Gateway) -> None:
    r = httpx.get(gateway.base_url + "/v1/keys")
    assert _code(r) == (401, "invalid_api_key")
    r = httpx.get(gateway.base_url + "/v1/keys", headers={"Authorization": "Bearer tg-admin-no"})
    assert _code(r) == (401, "invalid_api_key")


# --------------------------------------------------------------------------- who may do what


def test_tenant_isolation(gateway: Gateway, admin: Api) -> None:
    manage = ["models:use", "keys:manage", "usage:read"]
    a, key_a, id_a = tenant(admin, manage)
    b, key_b, id_b = tenant(admin, manage)
    api_a = Api(gateway, key_a)
    openai.OpenAI(base_url=gateway.v1, api_key=key_b, max_retries=0).chat.completions.create(
        model="sim-chat",
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=2,
    )

    # A sees its own
    assert [k["id"] for k in api_a.ok("GET", "/v1/keys")["data"]] == [id_a]
    assert api_a.ok("GET", "/v1/credits")["account"] == a
    assert api_a.ok("GET", f"/v1/accounts/{a}")["balance"] == "5.00"
    # ...and nothing of B's
    assert _code(api_a("GET", "/v1/keys", account=b)) == (403, "permission_denied")
    assert _code(api_a("GET", f"/v1/keys/{id_b}")) == (404, "not_found")
    assert _code(api_a("DELETE", f"/v1/keys/{id_b}")) == (404, "not_found")
    assert _code(api_a("PATCH", f"/v1/keys/{id_b}", {"name": "mine"})) == (404, "not_found")
    for path in ("/v1/credits", "/v1/credits/transactions", "/v1/usage"):
        assert _code(api_a("GET", path, account=b)) == (403, "permission_denied")
    assert _code(api_a("GET", f"/v1/accounts/{b}")) == (403, "permission_denied")
    assert _code(api_a("POST", "/v1/keys", {"name": "x", "account": b})) == (
        403,
        "permission_denied",
    )
    # operator-only
    grant = {"account": a, "amount": "1000"}
    assert _code(api_a("POST", "/v1/credits/grants", grant)) == (403, "permission_denied")
    assert _code(api_a("GET", "/v1/accounts")) == (403, "permission_denied")
    assert _code(api_a("POST", "/v1/accounts", {"id": "mine"})) == (403, "permission_denied")
    assert _code(api_a("PATCH", f"/v1/accounts/{a}", {"limits": {"rpm": 0}}))[0] == 403
    # B's key still works and its usage is untouched
    assert admin.ok("GET", f"/v1/keys/{id_b}")["status"] == "active"
    assert len(admin.ok("GET", "/v1/usage", account=b)["data"]) == 1
    assert api_a.ok("GET", "/v1/usage")["data"] == []


def test_tenants_cannot_escalate(gateway: Gateway, admin: Api) -> None:
    account, raw, _ = tenant(admin, ["models:use", "keys:manage"])
    admin.ok("PATCH", f"/v1/accounts/{account}", {"limits": {"rpm": 100}})
    api = Api(gateway, raw)
    child = api.ok("POST", "/v1/keys", {"name": "child", "scopes": ["models:use"]})
    SECRETS.append(child["key"])
    assert child["account"] == account
    r = api("POST", "/v1/keys", {"name": "x", "scopes": ["credits:manage"]})
    assert _code(r) == (403, "permission_denied") and "credits:manage" in r.text
    r = api("POST", "/v1/keys", {"name": "x", "scopes": ["usage:read"]})  # it lacks usage:read
    assert _code(r) == (403, "permission_denied")
    # limits no looser than its own (the account's rpm 100)
    assert _code(api("POST", "/v1/keys", {"name": "x", "limits": {"rpm": 0}}))[0] == 403
    assert _code(api("POST", "/v1/keys", {"name": "x", "limits": {"rpm": 101}}))[0] == 403
    tight = api.ok(
        "POST", "/v1/keys", {"name": "t", "scopes": ["models:use"], "limits": {"rpm": 5}}
    )
    SECRETS.append(tight["key"])
    # a pooled key hands out only models of its pool
    pooled = api.ok(
        "POST", "/v1/keys", {"name": "p", "scopes": ["keys:manage"], "models": ["sim-chat"]}
    )
    SECRETS.append(pooled["key"])
    r = Api(gateway, pooled["key"])(
        "POST", "/v1/keys", {"name": "x", "scopes": [], "models": ["sim-embed"]}
    )
    assert _code(r) == (403, "permission_denied")


def test_scoped_operator_keys(gateway: Gateway, admin: Api) -> None:
    """Keys of the admin account act on every account, within their scopes."""
    billing = admin.ok(
        "POST",
        "/v1/keys",
        {"name": "billing", "account": "admin", "scopes": ["credits:manage", "usage:read"]},
    )
    SECRETS.append(billing["key"])
    api = Api(gateway, billing["key"])
    assert api.ok(
        "POST", "/v1/credits/grants", {"account": "default", "amount": "1", "id": uuid.uuid4().hex}
    )
    assert api.ok("GET", "/v1/credits", account="default")["account"] == "default"
    assert _code(api("POST", "/v1/keys", {"name": "x", "account": "default"})) == (
        403,
        "permission_denied",
    )


def test_a_grant_names_its_account(admin: Api) -> None:
    """An omitted account elsewhere means the caller's own; for a grant that would put money
    in the operator's account by a typo. Refused, and nothing granted."""
    before = admin.ok("GET", "/v1/credits")["balance"]
    for body in ({"amount": "1"}, {"account": "", "amount": "1"}):
        r = admin("POST", "/v1/credits/grants", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "account", r.text
    assert admin.ok("GET", "/v1/credits")["balance"] == before


def test_grants_are_idempotent_by_id(admin: Api) -> None:
    account = "t-" + uuid.uuid4().hex[:10]
    grant = {"account": account, "amount": "2.5", "id": "invoice-" + account}
    assert admin.ok("POST", "/v1/credits/grants", grant)["balance"] == "2.50"
    assert admin.ok("POST", "/v1/credits/grants", grant)["balance"] == "2.50"
    page = admin.ok("GET", "/v1/credits/transactions", account=account)
    assert [e["type"] for e in page["data"]] == ["grant"] and page["next_before"] is None


# --------------------------------------------------------------------------- gRPC


def test_grpc_on_a_worker_port(gateway: Gateway) -> None:
    target = f"127.0.0.1:{gateway.cfg.processor.port}"
    with grpc.insecure_channel(target) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        auth = (("authorization", f"Bearer {gateway.key}"),)
        models = stub.ListModels(admin_pb2.ListModelsRequest(), metadata=auth)
        assert "sim-chat" in [m.id for m in models.data]
        credits = stub.GetCredits(admin_pb2.GetCreditsRequest(), metadata=auth)
        assert credits.account == "default"
        with pytest.raises(grpc.RpcError) as exc:
            stub.ListAccounts(admin_pb2.ListAccountsRequest(), metadata=auth)
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert ("tollgate-error-code", "permission_denied") in exc.value.trailing_metadata()
        with pytest.raises(grpc.RpcError) as exc:
            stub.ListModels(admin_pb2.ListModelsRequest())
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_keys_made_before_key_ids_get_one_when_listed(gateway: Gateway, admin: Api) -> None:
    from extproc.keys import hash_key
    from extproc.store import connect_sync

    account = "t-" + uuid.uuid4().hex[:10]
    raw = gateway.new_key("legacy", account)
    store = connect_sync(gateway.cfg.store_url)
    store.hdel(f"tg:key:{hash_key(raw)}", "id")
    store.hdel("tg:key-ids", "key_" + hash_key(raw)[:16])
    [listed] = admin.ok("GET", "/v1/keys", account=account)["data"]
    assert listed["id"] == "key_" + hash_key(raw)[:16]
    assert admin.ok("GET", f"/v1/keys/{listed['id']}")["prefix"] == raw[:11]


# --------------------------------------------------------------------------- error shape
# Values that are not UTF-8 once percent-decoded: Envoy's transcoder copies the bytes into a
# proto string field and the worker's grpc refuses the whole message (a 500 that named a Python
# exception). The request line still tells which value it was.
NOT_UTF8 = [
    ("/v1/credits/transactions?before=%ff", "before"),
    ("/v1/usage?model=%ff", "model"),
    ("/v1/usage?since=%c3%28", "since"),
    ("/v1/usage?model=caf%c3%a9&until=%e2%82", "until"),
    ("/v1/credits?account=%ff", "account"),
    ("/v1/keys/%ff", "id"),
    ("/v1/accounts/%ff", "id"),
]


@pytest.mark.parametrize(("path", "param"), NOT_UTF8)
def test_check_utf8_names_the_value(path: str, param: str) -> None:
    err = control_routes.check_utf8(path)
    assert err is not None and (err.status, err.code, err.param) == (
        400,
        "invalid_request_error",
        param,
    )
    assert "UTF-8" in err.message


@pytest.mark.parametrize(
    "path", ["/v1/usage?model=caf%c3%a9&limit=5", "/v1/keys/key_0123", "/v1/usage?x", "/v1/keys"]
)
def test_check_utf8_passes_utf8(path: str) -> None:
    assert control_routes.check_utf8(path) is None


def test_a_request_grpc_cannot_decode_is_a_400_without_python_internals() -> None:
    decode = (
        "Unexpected <class 'google.protobuf.message.DecodeError'>: Error parsing message with"
        " type 'tollgate.admin.v1.GetKeyRequest': String field had bad UTF-8"
    )
    for status in ("2", "13"):  # grpc's UNKNOWN (what the workers send), INTERNAL
        err = control_routes.error_from_headers(
            {"grpc-status": status, "grpc-message": decode.replace(" ", "%20")}
        )
        assert err is not None and (err.status, err.code) == (400, "invalid_request_error")
        assert "UTF-8" in err.message and "<class" not in err.message
    other = "Unexpected <class 'TypeError'>: bad argument"
    err = control_routes.error_from_headers({"grpc-status": "2", "grpc-message": other})
    assert err is not None and (err.status, err.code) == (500, "internal_error")
    assert err.message == "The control API failed."
    # the control API's own errors keep their message, code and param
    own = {"grpc-status": "3", "grpc-message": "'limit'%20must%20be%20...", "tollgate-error-code":
           "invalid_request_error", "tollgate-error-param": "limit"}  # fmt: skip
    err = control_routes.error_from_headers(own)
    assert err is not None and (err.message, err.param) == ("'limit' must be ...", "limit")


def test_values_not_utf8_are_a_400_without_python_internals(admin: Api) -> None:
    for path, _ in NOT_UTF8:
        r = admin("GET", path)
        assert _code(r) == (400, "invalid_request_error"), (path, r.text)
        assert "UTF-8" in r.json()["error"]["message"] and "<class" not in r.text


def test_values_not_utf8_name_the_param(admin: Api) -> None:
    """Refused before the transcoder (processor.py calls control_routes.check_utf8)."""
    for path, param in NOT_UTF8:
        r = admin("GET", path)
        assert (*_code(r), r.json()["error"]["param"]) == (400, "invalid_request_error", param)


# The transcoder's own 400s: its message names the field (errors.py renders it after
# "The request does not match the control API (see /openapi.json): ").
TRANSCODER = [
    ('limit: invalid value "abc" for type TYPE_INT32', "limit"),
    ('limit: invalid value "1.5" for type TYPE_INT32', "limit"),
    ("amount: invalid value 5 for type TYPE_STRING", "amount"),
    ('limits.rpm: invalid value "x" for type TYPE_INT32', "limits.rpm"),
    ("models[0]: invalid value 1 for type TYPE_STRING", "models[0]"),
    ("limits: invalid value 5 for type type.googleapis.com/tollgate.admin.v1.Limits", "limits"),
    ("limits: Proto field is not repeating, cannot start list.", "limits"),
    (": invalid value Starting an object on a scalar field for type name", "name"),
    ("limits: invalid value Starting an object on a scalar field for type rpm", "limits.rpm"),
    ('Could not find field "colour" in the type "tollgate.admin.v1.QueryUsageRequest".', "colour"),
    (": Proto field is not repeating, cannot start list.", None),
    (": Root element must be a message.", None),
    ("Unexpected end of string. Expected an object key or }.\n\n^", None),
    ("Expected : between key:value pair.\n{x}\n^", None),
    ("bogus: not a field of the control API", None),
]


@pytest.mark.parametrize(("detail", "param"), TRANSCODER)
def test_transcoder_messages_name_the_field(detail: str, param: str | None) -> None:
    assert control_routes.transcoder_param(detail) == param
    message = "The request does not match the control API (see /openapi.json): " + detail
    body = {"error": {"code": "invalid_request_error", "message": message, "param": None,
                      "request_id": "r1", "type": "invalid_request_error"}}  # fmt: skip
    err = control_routes.transcoder_error(json.dumps(body).encode())
    assert (err.status, err.code, err.message, err.param) == (
        400,
        "invalid_request_error",
        message,
        param,
    )


def test_transcoder_error_survives_an_unexpected_body() -> None:
    for body in (b"", b"not json", b'{"error": "x"}', b"[1]", b'{"error": {"message": 5}}'):
        err = control_routes.transcoder_error(body)
        assert (err.status, err.code, err.param) == (400, "invalid_request_error", None)
    assert control_routes.is_transcoder_reply({":status": "400"})
    assert not control_routes.is_transcoder_reply({":status": "400", "grpc-status": "3"})
    assert not control_routes.is_transcoder_reply({":status": "200"})


def test_transcoder_errors_name_the_field(admin: Api) -> None:
    """The transcoder's 400s (Envoy's local replies) are buffered by the processor, which
    fills in ``param`` (control_routes.transcoder_error)."""
    cases: list[tuple[str, str, Any, str]] = [
        ("GET", "/v1/credits/transactions?limit=abc", None, "limit"),
        ("GET", "/v1/usage?limit=1.5", None, "limit"),
        ("GET", "/v1/usage?colour=red", None, "colour"),
        ("POST", "/v1/credits/grants", {"account": "default", "amount": 5}, "amount"),
        ("PATCH", "/v1/accounts/default", {"limits": {"rpm": "x"}}, "limits.rpm"),
        ("POST", "/v1/keys", {"name": "x", "models": [1]}, "models[0]"),
        ("POST", "/v1/keys", {"name": {"a": 1}}, "name"),
    ]
    for method, path, body, param in cases:
        r = admin(method, path, body)
        assert _code(r) == (400, "invalid_request_error"), r.text
        error = r.json()["error"]
        assert error["param"] == param, (path, body, error)
        assert error["request_id"] == r.headers["x-request-id"]
        assert error["message"].startswith("The request does not match the control API")


def test_key_field_errors_name_the_field(admin: Api) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"name": "x", "limits": {"rpm": -1}}, "limits.rpm"),
        ({"name": "x", "limits": {"concurrency": -3}}, "limits.concurrency"),
        ({"name": "x", "scopes": ["root"]}, "scopes"),
        ({"name": ""}, "name"),
        ({"name": "a\nb"}, "name"),
        ({"name": "x" * 101}, "name"),
    ]
    for body, param in cases:
        r = admin("POST", "/v1/keys", body)
        assert (*_code(r), r.json()["error"]["param"]) == (400, "invalid_request_error", param)
    key = admin.ok("POST", "/v1/keys", {"name": "to-rename"})
    SECRETS.append(key["key"])
    r = admin("PATCH", f"/v1/keys/{key['id']}", {"name": ""})
    assert (*_code(r), r.json()["error"]["param"]) == (400, "invalid_request_error", "name")


def test_openapi_document_ignores_a_query(gateway: Gateway) -> None:
    r = httpx.get(gateway.base_url + "/openapi.json?x=1", timeout=10)
    assert r.status_code == 200 and r.json()["openapi"].startswith("3.")
