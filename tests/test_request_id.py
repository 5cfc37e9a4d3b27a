"""X-Request-ID: kept when sane, replaced (and said so) when not, on every kind of response."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.harness import Gateway

HELLO = [{"role": "user", "content": "which id am I?"}]
INSANE = {
    "too_long": "x" * 129,
    "invalid_characters": 'bad id with spaces and "quotes"',
}


def _auth(gw: Gateway, rid: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.key}", "X-Request-ID": rid}


@pytest.mark.parametrize("reason", sorted(INSANE))
def test_insane_id_is_replaced_everywhere(gateway: Gateway, reason: str) -> None:
    r = httpx.post(
        gateway.v1 + "/chat/completions",
        headers=_auth(gateway, INSANE[reason]),
        json={"model": "sim-chat", "messages": HELLO},
    )
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    uuid.UUID(rid)
    assert r.headers["x-request-id-replaced"] == reason
    # The backend, the completion id and the ledger all see the replacement.
    assert r.json()["id"] == f"chatcmpl-{rid}"
    seen = [x for x in gateway.sim_requests() if x["headers"].get("x-request-id") == rid]
    assert len(seen) == 1
    assert not [x for x in gateway.sim_requests() if INSANE[reason] in json.dumps(x["headers"])]
    usage = httpx.get(gateway.v1 + "/usage", headers={"Authorization": f"Bearer {gateway.key}"})
    assert rid in [u["request_id"] for u in usage.json()["data"]]


def test_sane_id_is_kept_at_the_limit(gateway: Gateway) -> None:
    rid = "a" * 100 + ".-_:@/+=~" + "Z" * 19
    assert len(rid) == 128
    r = httpx.get(gateway.v1 + "/models", headers=_auth(gateway, rid))
    assert r.status_code == 200
    assert r.headers["x-request-id"] == rid
    assert "x-request-id-replaced" not in r.headers


def test_replaced_on_replies_the_processor_makes_before_the_body(gateway: Gateway) -> None:
    # 401 (no key) and GET /v1/models are answered from the request headers.
    r = httpx.post(gateway.v1 + "/chat/completions", headers={"X-Request-ID": "x" * 300}, json={})
    assert r.status_code == 401
    assert r.headers["x-request-id-replaced"] == "too_long"
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"] != "x" * 300
    m = httpx.get(gateway.v1 + "/models", headers=_auth(gateway, "a b"))
    assert m.status_code == 200 and m.headers["x-request-id-replaced"] == "invalid_characters"
    uuid.UUID(m.headers["x-request-id"])


def test_replaced_on_errors_after_the_body(gateway: Gateway) -> None:
    r = httpx.post(
        gateway.v1 + "/chat/completions",
        headers=_auth(gateway, "x" * 200),
        json={"model": "no-such-model", "messages": HELLO},
    )
    assert r.status_code == 404
    assert r.headers["x-request-id-replaced"] == "too_long"
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]


def test_id_on_envoy_local_replies_and_streams(gateway: Gateway) -> None:
    rid = "local-" + uuid.uuid4().hex
    r = httpx.post(
        gateway.v1 + "/chat/completions",
        headers=_auth(gateway, rid),
        json={"model": "down-chat", "messages": HELLO},
    )
    assert r.status_code == 503  # Envoy's own reply: no healthy upstream / connect failure
    assert r.headers["x-request-id"] == rid
    assert r.json()["error"]["request_id"] == rid
    with httpx.stream(
        "POST",
        gateway.v1 + "/chat/completions",
        headers=_auth(gateway, "s" * 129),
        json={"model": "sim-chat", "messages": HELLO, "stream": True},
    ) as s:
        assert s.status_code == 200
        assert s.headers["x-request-id-replaced"] == "too_long"
        body = s.read().decode()
    assert f'"request_id":"{s.headers["x-request-id"]}"' in body  # the final credits comment
