"""The worker's Prometheus metrics, scraped after real traffic."""

from __future__ import annotations

import re
import time

import httpx
import openai

from tests.harness import Gateway

HELLO = [{"role": "user", "content": "metrics please"}]


def _value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_follow_requests(gateway: Gateway, client: openai.OpenAI) -> None:
    before = gateway.metrics()
    reply = client.chat.completions.create(model="sim-chat", messages=HELLO, max_tokens=4)
    list(
        client.chat.completions.create(model="sim-chat", messages=HELLO, stream=True, max_tokens=3)
    )
    httpx.post(gateway.v1 + "/chat/completions", json={})  # 401
    time.sleep(1.0)  # the stream settles through Envoy's access log
    after = gateway.metrics()

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    ok = {"model": "sim-chat", "backend": "vllm-chat", "dialect": "openai", "status": "200"}
    assert delta("tollgate_requests_total", **ok) == 2
    assert delta("tollgate_requests_total", status="401") == 1
    assert delta("tollgate_tokens_total", model="sim-chat", type="output") == (
        reply.usage.completion_tokens + 3
    )
    assert delta("tollgate_credits_micro_total", movement="reserved") > 0
    assert delta("tollgate_credits_micro_total", movement="settled") > 0
    for phase in ("request_headers", "request_body", "response_headers"):
        assert delta("tollgate_processor_phase_seconds_count", phase=phase) >= 2
    assert delta("tollgate_request_duration_seconds_count", model="sim-chat") == 2
    # the stream's record came through the batched settling log (no limits, a large balance)
    assert delta("tollgate_settle_records_total", log="tollgate_settle") == 1
    assert delta("tollgate_settle_records_total", log="tollgate_settle_now") == 0
    assert re.search(
        r'tollgate_processor_phase_seconds_bucket\{phase="request_body",le="\+Inf"\}', after
    )
    assert "# TYPE tollgate_requests_total counter" in after


def test_time_to_first_token_and_per_output_token(gateway: Gateway, client: openai.OpenAI) -> None:
    before = gateway.metrics()
    stream = client.chat.completions.create(
        model="sim-chat",
        messages=HELLO,
        stream=True,
        max_tokens=6,
        extra_headers={"x-sim-ttft-ms": "300", "x-sim-itl-ms": "40"},
    )
    assert len([c for c in stream if c.choices and c.choices[0].delta.content]) == 6
    time.sleep(1.0)  # settled (and timed) through Envoy's access log
    after = gateway.metrics()

    def delta(name: str) -> float:
        return _value(after, name, model="sim-chat") - _value(before, name, model="sim-chat")

    assert delta("tollgate_time_to_first_token_seconds_count") == 1
    assert 0.3 <= delta("tollgate_time_to_first_token_seconds_sum") < 1.0
    assert delta("tollgate_time_per_output_token_seconds_count") == 1
    assert 0.03 <= delta("tollgate_time_per_output_token_seconds_sum") < 0.2
