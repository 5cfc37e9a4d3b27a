"""Logs: one JSON line per request with its id, and never a key or a prompt. Runs after the
modules that start gateways (file order) and reads every log they wrote."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import openai
import pytest

from tests.harness import SECRETS, Gateway, base_config, start_gateway

PROMPTS = ["Say hello to the gateway", "Count the toll booths", "Tell me about toll gates"]


def test_one_line_per_request_with_its_id(gateway: Gateway, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="sim-chat", messages=[{"role": "user", "content": "Say hello to the gateway"}]
    )
    rid = raw.headers["x-request-id"]
    deadline = time.monotonic() + 5  # written when the ext_proc stream closes, just after
    while True:
        lines = []
        for path in (gateway.stack.run_dir / "logs").glob("worker-*.log"):
            for line in path.read_text().splitlines():
                if line.startswith("{") and rid in line:
                    lines.append(json.loads(line))
        found = [e for e in lines if e["event"] == "request"]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    [entry] = found
    assert entry["request_id"] == rid and entry["status"] == 200
    assert entry["model"] == "sim-chat" and entry["backend"] == "vllm-chat"
    assert entry["key_prefix"] == gateway.key[:11] and entry["level"] == "info"


def _lines(gateway: Gateway, rid: str) -> list[dict]:
    out = []
    for path in (gateway.stack.run_dir / "logs").glob("worker-*.log"):
        for line in path.read_text().splitlines():
            if line.startswith("{") and rid in line:
                out.append(json.loads(line))
    return out


def test_debug_level_adds_one_line_per_phase(tmp_path: Path) -> None:
    os.environ["TOLLGATE_LOG_LEVEL"] = "debug"  # the workers inherit it
    try:
        gw = start_gateway(tmp_path, base_config())
    finally:
        del os.environ["TOLLGATE_LOG_LEVEL"]
    try:
        client = openai.OpenAI(base_url=gw.v1, api_key=gw.key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="sim-chat", messages=[{"role": "user", "content": PROMPTS[1]}]
        )
        rid = raw.headers["x-request-id"]
        deadline = time.monotonic() + 5
        while not any(e["event"] == "request" for e in _lines(gw, rid)):
            assert time.monotonic() < deadline, "no request line"
            time.sleep(0.05)
        lines = _lines(gw, rid)
    finally:
        gw.stack.stop()
    phases = [e for e in lines if e["event"] == "phase"]
    assert [e["phase"] for e in phases] == [
        "request_headers",
        "request_body",
        "response_headers",
    ]
    assert all(e["level"] == "debug" and e["us"] > 0 for e in phases)
    assert phases[1]["model"] == "sim-chat" and phases[1]["reserved"] > 0
    assert [e["event"] for e in lines].count("request") == 1


def test_no_key_or_prompt_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = Path(tmp_path_factory.getbasetemp())
    logs = [p for p in base.rglob("*.log") if p.is_file()]
    assert logs and SECRETS
    for path in logs:
        text = path.read_text(errors="replace")
        for secret in SECRETS:
            assert secret not in text, f"an API key is in {path}"
        if "sim-" in path.name:
            continue  # the simulated backend, not the gateway
        for prompt in PROMPTS:
            assert prompt not in text, f"prompt text is in {path}"


def test_workers_freeze_what_they_made_at_startup(gateway: Gateway) -> None:
    """The startup objects are moved out of the collector's reach (gc.freeze), so its full
    passes, which pause every request in flight, scan only what was made since."""
    ready = _lines(gateway, '"worker_ready"')
    assert ready
    assert all(e["frozen_objects"] > 10_000 for e in ready), ready
