"""X-Request-Timeout (alias OICM-Request-Timeout): the upstream timeout for one request, bounded
by the route's own timeout; a bad value is a 400 naming the header."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.harness import Gateway

HELLO = [{"role": "user", "content": "take your time"}]


def _post(gw: Gateway, model: str, **headers: str) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = httpx.post(
        gw.v1 + "/chat/completions",
        headers={"Authorization": f"Bearer {gw.key}", **headers},
        json={"model": model, "messages": HELLO},
        timeout=30,
    )
    return r, time.monotonic() - t0


@pytest.mark.parametrize("header", ["X-Request-Timeout", "OICM-Request-Timeout"])
def test_short_timeout_cuts_a_slow_backend(gateway: Gateway, header: str) -> None:
    r, took = _post(gateway, "sim-chat", **{header: "0.4", "x-sim-ttft-ms": "3000"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "backend_timeout"
    assert 0.3 < took < 2.5


def test_timeout_within_bound_lets_the_request_finish(gateway: Gateway) -> None:
    r, _ = _post(gateway, "sim-chat", **{"X-Request-Timeout": "5", "x-sim-ttft-ms": "300"})
    assert r.status_code == 200


def test_timeout_above_the_route_maximum_is_lowered_to_it(gateway: Gateway) -> None:
    # slow-chat's route times out after 1 s; asking for 60 s does not lift that.
    r, took = _post(gateway, "slow-chat", **{"X-Request-Timeout": "60"})
    assert r.status_code == 504
    assert took < 2.9


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", ""])
def test_bad_timeout_is_a_400_naming_the_header(gateway: Gateway, value: str) -> None:
    r, _ = _post(gateway, "sim-chat", **{"X-Request-Timeout": value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request_error" and err["param"] == "X-Request-Timeout"


def test_clients_cannot_set_envoys_own_timeout_header(gateway: Gateway) -> None:
    r, _ = _post(
        gateway, "sim-chat", **{"x-envoy-upstream-rq-timeout-ms": "50", "x-sim-ttft-ms": "300"}
    )
    assert r.status_code == 200
