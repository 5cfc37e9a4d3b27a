"""GET /v1/models/{id}/health: ready | loading | unavailable from Envoy's health flags."""

from __future__ import annotations

import httpx
import pytest

from extproc.health import status_of
from tests.harness import Gateway


def _clusters(*flags: dict[str, object]) -> dict[str, object]:
    hosts = [{"health_status": {"eds_health_status": "HEALTHY", **f}} for f in flags]
    return {"cluster_statuses": [{"name": "backend_b", "host_statuses": hosts}]}


@pytest.mark.parametrize(
    ("flags", "status"),
    [
        ([{}], "ready"),
        ([{"failed_active_health_check": True}, {}], "ready"),
        ([{"failed_active_health_check": True, "pending_active_hc": True}], "loading"),
        ([{"failed_active_health_check": True}], "unavailable"),
        ([{"failed_outlier_check": True}], "unavailable"),
        ([{"eds_health_status": "UNHEALTHY"}], "unavailable"),
        ([], "unavailable"),
    ],
)
def test_flags_map_to_a_status(flags: list[dict[str, object]], status: str) -> None:
    assert status_of(_clusters(*flags), "backend_b")[0] == status


def _health(gw: Gateway, model: str, key: str | None = None) -> httpx.Response:
    return httpx.get(
        f"{gw.v1}/models/{model}/health", headers={"Authorization": f"Bearer {key or gw.key}"}
    )


def test_health_of_models_as_envoy_sees_them(gateway: Gateway) -> None:
    ready = _health(gateway, "sim-chat").json()
    assert ready == {
        "object": "model.health",
        "id": "sim-chat",
        "status": "ready",
        "backend": "vllm-chat",
        "endpoints": {"passing": 1, "total": 1},
    }
    assert _health(gateway, "down-chat").json()["status"] == "unavailable"
    r = _health(gateway, "no-such-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    pooled = gateway.new_key("pooled", models=["sim-embed"])
    r = _health(gateway, "sim-chat", pooled)
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    assert httpx.get(f"{gateway.v1}/models/sim-chat/health").status_code == 401


def test_envoy_admin_is_not_reachable_by_clients(gateway: Gateway) -> None:
    headers = {"Authorization": f"Bearer {gateway.key}", "x-tollgate-backend": ":admin"}
    for path in ("/clusters", "/clusters?format=json", "/quitquitquit", "/v1/models/sim-chat/x"):
        r = httpx.get(gateway.base_url + path, headers=headers)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] in ("not_found", "model_not_found")
