"""Logs: one JSON line per request with its id, and never a key or a prompt. Runs after the
modules that start gateways (file order) and reads every log they wrote."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest

from tests.harness import SECRETS, Gateway

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
