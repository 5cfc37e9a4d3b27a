"""The rendered Envoy bootstrap is valid for the real Envoy binary, and the checked-in copy is
the render of the sample config."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from extproc.config import load_config
from extproc.envoy_config import ROUTE_HEADER, render, render_yaml
from extproc.supervisor import envoy_binary
from tests.harness import base_config

ROOT = Path(__file__).resolve().parent.parent


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_sample_render_passes_envoy_validate(tmp_path: Path) -> None:
    out = tmp_path / "envoy.yaml"
    out.write_text(render_yaml(load_config(ROOT / "tollgate.yaml")))
    proc = _validate(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout + proc.stderr


def test_test_config_render_passes_envoy_validate(tmp_path: Path) -> None:
    from extproc.config import parse_config

    out = tmp_path / "envoy.yaml"
    out.write_text(render_yaml(parse_config(base_config(workers=2))))
    proc = _validate(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_checked_in_bootstrap_is_current() -> None:
    checked_in = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    assert checked_in == render(load_config(ROOT / "tollgate.yaml")), (
        "envoy/envoy.yaml is stale: run `make render-envoy`"
    )


def test_checked_in_trailers_module_is_built_from_its_source() -> None:
    import wasmtime

    source = (ROOT / "extproc" / "stream_trailers.wat").read_text()
    built = (ROOT / "extproc" / "stream_trailers.wasm").read_bytes()
    assert wasmtime.wat2wasm(source) == built, "stream_trailers.wasm is stale: run `make wasm`"


def test_one_cluster_per_backend_with_health_checks() -> None:
    cfg = load_config(ROOT / "tollgate.yaml")
    boot = render(cfg)
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    for b in cfg.backends:
        c = clusters[b.cluster]
        assert c["health_checks"][0]["http_health_check"]["path"] == b.health_check.path
        assert c["circuit_breakers"]["thresholds"][0]["max_requests"] == b.max_concurrent_requests
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    for b in cfg.backends:
        to_backend = [r for r in routes if r.get("route", {}).get("cluster") == b.cluster]
        # metered streams (Lua stream meter) and the rest (Lua disabled on the route)
        assert len(to_backend) == 2
        for r in to_backend:
            assert r["match"]["headers"][0]["name"] == ROUTE_HEADER
            assert r["route"]["timeout"] == f"{b.request_timeout_s:g}s"
        lua = [
            r.get("typed_per_filter_config", {}).get("envoy.filters.http.lua") for r in to_backend
        ]
        assert lua[0] is None and lua[1]["disabled"] is True
    filters = {f["name"]: f["typed_config"] for f in hcm["http_filters"]}
    assert filters["envoy.filters.http.ext_proc"]["failure_mode_allow"] is False
    names = [f["name"] for f in hcm["http_filters"]]
    # Lua first: on the response path it must run after ext_proc (see envoy_config._lua_filter)
    assert names.index("envoy.filters.http.lua") < names.index("envoy.filters.http.ext_proc")
    assert names[-1] == "envoy.filters.http.router"


def test_one_sse_filter_with_or_without_tgi_backends() -> None:
    """The stream meters read TGI's own streams: no second sse_to_metadata for TGI's rules.
    Which responses the usage filters read is tested through Envoy in test_dialects.py."""
    from extproc.config import parse_config

    def sse_filters(cfg_dict: dict) -> list[str]:
        hcm = render(parse_config(cfg_dict))["static_resources"]["listeners"][0]
        filters = hcm["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        return [f["name"] for f in filters if "v3.SseToMetadata" in json.dumps(f)]

    cfg = base_config()
    assert sse_filters(cfg) == ["envoy.filters.http.sse_to_metadata"]
    cfg["backends"].append(
        {"name": "tgi-b", "kind": "tgi", "endpoints": ["127.0.0.1:9"], "request_timeout": "10s"}
    )
    assert sse_filters(cfg) == ["envoy.filters.http.sse_to_metadata"]


def test_two_settling_logs_split_by_the_settle_now_mark() -> None:
    """Streams of limited keys (settle_now) go to the log that flushes within 2 ms, the others
    to the one that waits up to 20 ms; requests that are not metered streams go to neither
    (but for those whose processor failed, which a third log takes)."""
    from extproc.config import parse_config

    hcm = render(parse_config(base_config()))["static_resources"]["listeners"][0]
    logs = hcm["filter_chains"][0]["filters"][0]["typed_config"]["access_log"]
    settling = {
        log["typed_config"]["common_config"]["log_name"]: log
        for log in logs
        if log["name"] == "envoy.access_loggers.http_grpc"
    }
    failed = settling.pop("tollgate_settle_failed")
    assert set(settling) == {"tollgate_settle", "tollgate_settle_now"}
    # requests whose processor failed: Envoy's 503 of an ext_proc error, the status tested first
    first, then = failed["filter"]["and_filter"]["filters"]
    assert first["status_code_filter"]["comparison"]["op"] == "EQ"
    assert first["status_code_filter"]["comparison"]["value"]["default_value"] == 503
    cel = then["extension_filter"]["typed_config"]["expression"]
    assert cel == "response.code_details.startsWith('ext_proc_error')"
    retry = failed["typed_config"]["common_config"]["grpc_service"]["retry_policy"]
    assert "connect-failure" in retry["retry_on"]  # its stream may meet the dead worker
    assert failed["typed_config"]["common_config"]["buffer_flush_interval"] == "0.002s"
    for name, log in settling.items():
        only = log["filter"]["metadata_filter"]
        assert only["matcher"]["path"] == [{"key": "settle_now"}]
        assert only["match_if_key_not_found"] is False  # set on metered streams only
        now = name == "tollgate_settle_now"
        assert only["matcher"]["value"] == {"bool_match": now}
        common = log["typed_config"]["common_config"]
        assert common["buffer_size_bytes"] == 16384  # batched, both
        assert common["buffer_flush_interval"] == ("0.002s" if now else "0.02s")
