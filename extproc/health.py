"""``GET /v1/models/{id}/health``: ready | loading | unavailable, from Envoy's own view.

The processor does not guess and does not probe backends itself: it routes the request to
Envoy's admin ``/clusters?format=json`` (a cluster pointing at Envoy's own admin port, chosen
only by the processor's routing header) and maps the health flags of the model's backend
cluster, which Envoy's active health checks and outlier detection keep:

* ``ready``: at least one endpoint passes (no failure flag: active health check, outlier
  ejection, EDS status).
* ``loading``: none passes yet, and at least one has not had its first health check
  (``pending_active_hc``: a backend just added or resolved, still starting).
* ``unavailable``: every endpoint fails its health checks or is ejected.
"""

from __future__ import annotations

from typing import Any

import orjson

from .config import Backend, Model

ADMIN_ROUTE = ":admin"  # routing-header value for Envoy's admin cluster (no backend is named so)
ADMIN_PATH = "/clusters?format=json"
_FAILED = (
    "failed_active_health_check",
    "failed_outlier_check",
    "failed_eds_health",
    "excluded_via_immediate_hc_fail",
    "pending_dynamic_removal",
)


def host_passes(flags: dict[str, Any]) -> bool:
    if any(flags.get(f) for f in _FAILED):
        return False
    return flags.get("eds_health_status", "HEALTHY") in ("HEALTHY", "DEGRADED", "UNKNOWN")


def status_of(clusters: dict[str, Any], cluster: str) -> tuple[str, int, int]:
    """(status, endpoints passing, endpoints) of one cluster in admin /clusters JSON."""
    for c in clusters.get("cluster_statuses", []):
        if c.get("name") != cluster:
            continue
        hosts = [h.get("health_status", {}) for h in c.get("host_statuses", [])]
        passing = sum(1 for h in hosts if host_passes(h))
        if passing:
            return "ready", passing, len(hosts)
        if any(h.get("pending_active_hc") for h in hosts):
            return "loading", 0, len(hosts)
        return "unavailable", 0, len(hosts)
    return "unavailable", 0, 0


def body(model: Model, backend: Backend, admin_json: bytes) -> bytes:
    status, passing, total = status_of(orjson.loads(admin_json), backend.cluster)
    return orjson.dumps(
        {
            "object": "model.health",
            "id": model.id,
            "status": status,
            "backend": backend.name,
            "endpoints": {"passing": passing, "total": total},
        }
    )
