"""The config is validated at load: a bad file names the field and the problem."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from extproc.config import ConfigError, load_config, parse_config, parse_duration

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = yaml.safe_load((ROOT / "tollgate.yaml").read_text())


def test_sample_config_loads() -> None:
    cfg = load_config(ROOT / "tollgate.yaml")
    assert cfg.listener.port == 8080
    assert {b.kind for b in cfg.backends} <= {"vllm", "tgi", "tei", "openai"}
    assert all(m.backend in cfg.backends_by_name for m in cfg.models)


@pytest.mark.parametrize(
    ("mutate", "path", "problem"),
    [
        (lambda c: c["backends"][0].update(kind="llama"), "backends[0].kind", "must be one of"),
        (
            lambda c: c["backends"][0].update(endpoints=["nohost"]),
            "backends[0].endpoints[0]",
            "host:port",
        ),
        (lambda c: c["backends"][0].update(endpoints=[]), "backends[0].endpoints", "at least one"),
        (
            lambda c: c.setdefault("metering", {}).update(stream_trailers="yes"),
            "metering.stream_trailers",
            "true or false",
        ),
        (
            lambda c: c["backends"][0].update(request_timeout="soon"),
            "backends[0].request_timeout",
            "duration",
        ),
        (lambda c: c["backends"][0].update(colour="red"), "backends[0].colour", "unknown field"),
        (
            lambda c: c["models"][0].update(backend="nowhere"),
            "models[0].backend",
            "no backend named",
        ),
        (lambda c: c["models"][0].pop("id"), "models[0].id", "is required"),
        (lambda c: c["models"][0].update(max_tokens=-1), "models[0].max_tokens", "must be"),
        (lambda c: c["models"][0].update(max_tokens="lots"), "models[0].max_tokens", "integer"),
        (lambda c: c["models"].append(dict(c["models"][0])), "models[3].id", "duplicate"),
        (lambda c: c["listener"].update(port=70000), "listener.port", "between 1 and 65535"),
        (
            lambda c: c["listener"].update(max_request_body_bytes="big"),
            "listener.max_request_body_bytes",
            "size",
        ),
        (lambda c: c["processor"].update(workers=0), "processor.workers", "between 1 and 64"),
        (lambda c: c["envoy"].update(admin_port=8080), "envoy.admin_port", "already used"),
        (lambda c: c.update(models=[]), "models", "at least one"),
        (lambda c: c.update(extra=1), "extra", "unknown field"),
        (
            lambda c: c.setdefault("store", {}).update(allocator="jemalloc"),
            "store.allocator",
            "auto or system",
        ),
        (
            lambda c: c.setdefault("store", {}).update(fsync="never"),
            "store.fsync",
            "everysec or always",
        ),
        (
            lambda c: c.setdefault("metering", {}).update(ledger_retention="a while"),
            "metering.ledger_retention",
            "duration",
        ),
    ],
)
def test_bad_config_names_field(mutate, path: str, problem: str) -> None:
    data = copy.deepcopy(SAMPLE)
    mutate(data)
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert exc.value.path == path
    assert problem in exc.value.problem


def test_durations() -> None:
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2s") == 2.0
    assert parse_duration("5m") == 300.0
    assert parse_duration("30d") == 30 * 86400.0
    assert parse_duration(1.5) == 1.5
    assert parse_duration("fast") is None
    assert parse_duration(True) is None


def test_cli_exits_2_naming_the_field(tmp_path: Path) -> None:
    data = copy.deepcopy(SAMPLE)
    data["backends"][0]["kind"] = "llama"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    for command in ("check-config", "up", "render-envoy"):
        proc = subprocess.run(
            [sys.executable, "-m", "extproc", command, "--config", str(bad)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 2, proc.stderr
        assert "backends[0].kind" in proc.stderr
    assert not (tmp_path / "run").exists(), "nothing may half-start on a bad config"


def test_cli_rejects_unparseable_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listener: [unclosed\n")
    proc = subprocess.run(
        [sys.executable, "-m", "extproc", "check-config", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "not valid YAML" in proc.stderr


def test_tracing_config_and_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    from extproc.config import OTLP_ENV
    from extproc.envoy_config import OTLP_CLUSTER, render

    monkeypatch.delenv(OTLP_ENV, raising=False)
    cfg = parse_config(copy.deepcopy(SAMPLE))
    assert cfg.otlp_endpoint is None
    assert (
        "tracing"
        not in render(cfg)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"
        ]
    )
    data = copy.deepcopy(SAMPLE)
    data["tracing"] = {"otlp_endpoint": "collector:4317", "sample_ratio": 0.25}
    cfg = parse_config(data)
    assert (cfg.otlp_endpoint.host, cfg.otlp_endpoint.port) == ("collector", 4317)
    boot = render(cfg)
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    otel = hcm["typed_config"]["tracing"]["provider"]["typed_config"]
    ratio = otel["sampler"]["typed_config"]["wrapped_sampler"]["typed_config"]
    assert ratio["sampling_percentage"] == {"numerator": 250_000, "denominator": "MILLION"}
    assert OTLP_CLUSTER in {c["name"] for c in boot["static_resources"]["clusters"]}
    monkeypatch.setenv(OTLP_ENV, "127.0.0.1:4999")  # `tollgate up --otlp` sets it
    assert parse_config(data).otlp_endpoint.port == 4999
    for bad, problem in (({"sample_ratio": 2}, "0 to 1"), ({"otlp_endpoint": "x"}, "host:port")):
        data["tracing"] = bad
        with pytest.raises(ConfigError) as e:
            parse_config(data)
        assert problem in str(e.value) and "tracing." in str(e.value)


def test_ledger_retention() -> None:
    def retention(value: object) -> float | None:
        data = copy.deepcopy(SAMPLE)
        if value is not None:
            data.setdefault("metering", {})["ledger_retention"] = value
        return parse_config(data).metering.ledger_retention_s

    assert retention(None) == 30 * 86400.0  # the default: 30 days
    assert retention("90d") == 90 * 86400.0
    assert retention("2h") == 7200.0
    assert retention(0) is None and retention("forever") is None  # keep every entry
