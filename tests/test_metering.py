"""Credits and rate limits through the real gateway: reserve, settle, ledger, headers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from extproc.errors import GatewayError
from extproc.money import format_credits, parse_credits, token_cost
from extproc.tokens import estimate_prompt_tokens
from tests import h2client
from tests.harness import ADMIN_KEY, Gateway, grant

HELLO = [{"role": "user", "content": "Count the toll booths"}]


def _account(gateway: Gateway, credits: str | None = None, **limits: int) -> tuple[str, str]:
    account = "acct-" + uuid.uuid4().hex[:8]
    key = gateway.new_key("metering", account, **limits)
    if credits:
        grant(str(gateway.stack.config_path), account, credits)
    return account, key


def _get(gateway: Gateway, key: str, path: str) -> dict:
    r = httpx.get(gateway.v1 + path, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()


def _wait_settled(gateway: Gateway, key: str, timeout: float = 10) -> dict:
    """Streams settle through Envoy's access log, a fraction of a second after they end."""
    deadline = time.monotonic() + timeout
    while True:
        credits = _get(gateway, key, "/credits")
        if parse_credits(credits["reserved"]) == 0 or time.monotonic() > deadline:
            return credits
        time.sleep(0.1)


def _ledger(gateway: Gateway, key: str) -> list[dict]:
    return _get(gateway, key, "/credits/transactions?limit=1000")["data"]


def _entries(gateway: Gateway, key: str, rid: str, timeout: float = 10) -> list[dict]:
    """Request ``rid``'s ledger entries, once there is one (settlements may come batched)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = [e for e in _ledger(gateway, key) if e.get("request_id") == rid]
        if entries or time.monotonic() > deadline:
            return entries
        time.sleep(0.1)


def _sent(gateway: Gateway, rid: str) -> dict:
    """The body the simulator got for request ``rid``."""
    return next(
        x["body"] for x in gateway.sim_requests() if x["headers"].get("x-request-id") == rid
    )


def _reconciles(gateway: Gateway, key: str) -> None:
    credits = _get(gateway, key, "/credits")
    entries = _ledger(gateway, key)
    total = sum(parse_credits(e["amount"]) for e in entries)
    assert total == parse_credits(credits["balance"]), (entries, credits)
    assert parse_credits(credits["balance"]) >= 0


def test_non_stream_response_carries_credits_and_limits(gateway: Gateway) -> None:
    _, key = _account(gateway, "5", rpm=100, tpm=100000)
    client = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="sim-chat", messages=HELLO, max_tokens=8
    )
    reply = raw.parse()
    h = raw.headers
    price = gateway.cfg.models_by_id["sim-chat"].price
    cost = token_cost(price, reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert h["x-credits-used"] == format_credits(cost)
    assert h["x-credits-remaining"] == format_credits(parse_credits("5") - cost)
    assert h["x-ratelimit-limit"] == h["x-ratelimit-limit-requests"] == "100"
    assert h["x-ratelimit-remaining"] == h["x-ratelimit-remaining-requests"] == "99"
    assert 1 <= int(h["x-ratelimit-reset"]) <= 60
    used = reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert h["x-ratelimit-remaining-tokens"] == str(100000 - used)
    assert _get(gateway, key, "/credits")["balance"] == format_credits(parse_credits("5") - cost)
    [entry] = _ledger(gateway, key)[:1]
    assert entry["type"] == "debit" and entry["request_id"] == h["x-request-id"]
    assert (entry["tokens_in"], entry["tokens_out"]) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )
    _reconciles(gateway, key)
    usage = _get(gateway, key, "/usage?model=sim-chat")["data"]
    assert usage[0]["request_id"] == h["x-request-id"]
    assert usage[0]["status"] == 200 and usage[0]["cost"] == format_credits(cost)


def test_stream_final_comment_and_settlement(gateway: Gateway) -> None:
    _, key = _account(gateway, "5")
    client = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    with client.chat.completions.with_streaming_response.create(
        model="sim-chat", messages=HELLO, stream=True, max_tokens=6
    ) as resp:
        rid = resp.headers["x-request-id"]
        assert "x-tollgate-lua-meter" not in resp.headers  # the route's internal mark
        lines = [line for line in resp.iter_lines() if line]
    comments = [line for line in lines if line.startswith(": tollgate ")]
    assert len(comments) == 1
    figures = json.loads(comments[0][len(": tollgate ") :])
    assert figures["request_id"] == rid and figures["completion_tokens"] == 6
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    # the client asked for no usage: neither per-chunk usage nor the usage-only chunk reach it
    assert all("usage" not in e and e["choices"] for e in events)
    credits = _wait_settled(gateway, key)
    assert parse_credits(credits["reserved"]) == 0
    entry = _ledger(gateway, key)[0]
    assert entry["request_id"] == rid and entry["tokens_out"] == 6
    assert entry["amount"] == "-" + figures["credits_used"]
    assert credits["available"] == figures["credits_remaining"]
    _reconciles(gateway, key)


def test_stream_credits_as_http2_trailers(gateway: Gateway) -> None:
    """Over HTTP/2 the final figures also arrive as trailers; over HTTP/1.1 only as the comment."""
    _, key = _account(gateway, "5")
    body = {"model": "sim-chat", "messages": HELLO, "stream": True, "max_tokens": 5}
    auth = {"Authorization": f"Bearer {key}"}
    r = h2client.post(gateway.v1 + "/chat/completions", body, auth)
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = r.lines()
    assert lines[-1] == "data: [DONE]"
    figures = json.loads(
        next(x for x in lines if x.startswith(": tollgate "))[len(": tollgate ") :]
    )
    assert r.trailers == {
        "x-credits-used": figures["credits_used"],
        "x-credits-remaining": figures["credits_remaining"],
    }
    assert parse_credits(figures["credits_used"]) > 0
    credits = _wait_settled(gateway, key)
    assert credits["available"] == figures["credits_remaining"]
    # A JSON answer carries the figures as headers, and no trailers.
    r = h2client.post(gateway.v1 + "/chat/completions", {**body, "stream": False}, auth)
    assert r.status == 200 and r.trailers == {}
    assert parse_credits(r.headers["x-credits-used"]) > 0
    # Errors are not metered streams: no trailers either.
    r = h2client.post(gateway.v1 + "/chat/completions", {**body, "max_tokens": -1}, auth)
    assert r.status == 400 and r.trailers == {}


def test_stream_keeps_usage_chunk_when_asked(gateway: Gateway) -> None:
    _, key = _account(gateway, "5")
    client = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="sim-chat",
            messages=HELLO,
            stream=True,
            max_tokens=4,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


def test_two_hundred_concurrent_against_a_balance_for_fifty(gateway: Gateway) -> None:
    price = gateway.cfg.models_by_id["sim-chat"].price
    body = {"model": "sim-chat", "messages": HELLO, "max_tokens": 10}
    amount = token_cost(price, estimate_prompt_tokens("chat", body), 10)
    _, key = _account(gateway, format_credits(50 * amount))

    async def all_at_once() -> list[httpx.Response]:
        # all 200 in flight at once (each waits 3 s at the backend), so every reservation is
        # taken before the first one settles and frees the unused part of its reserve
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        gateway.v1 + "/chat/completions",
                        headers={"Authorization": f"Bearer {key}", "x-sim-ttft-ms": "3000"},
                        json=body,
                    )
                    for _ in range(200)
                )
            )

    responses = asyncio.run(all_at_once())
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 402]
    assert len(served) == 50 and len(refused) == 150, [r.status_code for r in responses]
    assert all(r.json()["error"]["code"] == "insufficient_credits" for r in refused)
    credits = _get(gateway, key, "/credits")
    assert parse_credits(credits["balance"]) >= 0 and parse_credits(credits["reserved"]) == 0
    debits = [e for e in _ledger(gateway, key) if e["type"] == "debit"]
    assert sorted(e["request_id"] for e in debits) == sorted(
        r.headers["x-request-id"] for r in served
    )
    charged = sum(parse_credits(r.headers["x-credits-used"]) for r in served)
    assert charged == -sum(parse_credits(e["amount"]) for e in debits)
    _reconciles(gateway, key)


def _start_of_a_minute() -> None:
    """Fixed one-minute windows: keep a rate test inside one window."""
    left = 60 - time.time() % 60
    if left < 12:
        time.sleep(left + 0.5)


def test_ten_requests_per_minute(gateway: Gateway) -> None:
    _, key = _account(gateway, "5", rpm=10, tpm=5000)
    client = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    _start_of_a_minute()
    tokens_left = 5000
    for i in range(10):
        raw = client.chat.completions.with_raw_response.create(
            model="sim-chat", messages=HELLO, max_tokens=5
        )
        usage = raw.parse().usage
        tokens_left -= usage.prompt_tokens + usage.completion_tokens
        assert raw.headers["x-ratelimit-remaining-requests"] == str(9 - i)
        assert raw.headers["x-ratelimit-remaining-tokens"] == str(tokens_left)
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="sim-chat", messages=HELLO, max_tokens=5)
    err = exc.value
    expected = 60 - int(time.time() % 60)
    retry_after = int(err.response.headers["retry-after"])
    assert abs(retry_after - expected) <= 2
    assert err.body["retry_after"] == retry_after
    assert err.code == "rate_limit_exceeded"
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_insufficient_credits_is_402(gateway: Gateway) -> None:
    _, key = _account(gateway)
    r = httpx.post(
        gateway.v1 + "/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "sim-chat", "messages": HELLO},
    )
    assert r.status_code == 402
    assert r.json()["error"]["code"] == "insufficient_credits"


def test_max_tokens_clamped_to_what_the_balance_pays(gateway: Gateway) -> None:
    price = gateway.cfg.models_by_id["sim-chat"].price
    body = {"model": "sim-chat", "messages": HELLO}
    prompt = estimate_prompt_tokens("chat", body)
    # enough for the prompt and exactly 7 output tokens
    _, key = _account(gateway, format_credits(token_cost(price, prompt, 7)))
    rid = uuid.uuid4().hex
    r = httpx.post(
        gateway.v1 + "/chat/completions",
        headers={
            "Authorization": f"Bearer {key}",
            "X-Request-ID": rid,
            "x-sim-output-tokens": "50",
        },
        json=body,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 7
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert _sent(gateway, rid)["max_tokens"] == 7


def test_n_choices_share_what_the_balance_pays(gateway: Gateway) -> None:
    """Every choice may run to max_tokens: a missing max_tokens is what the balance pays for
    divided among the n choices, so the backend stops where the money stops for all of them."""
    price = gateway.cfg.models_by_id["sim-chat"].price
    body = {"model": "sim-chat", "messages": HELLO, "n": 3}
    prompt = estimate_prompt_tokens("chat", body)
    _, key = _account(gateway, format_credits(token_cost(price, prompt, 21)))
    rid = uuid.uuid4().hex
    r = httpx.post(
        gateway.v1 + "/chat/completions",
        headers={
            "Authorization": f"Bearer {key}",
            "X-Request-ID": rid,
            "x-sim-output-tokens": "50",
        },
        json=body,
    )
    assert r.status_code == 200, r.text
    data = r.json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert {c["finish_reason"] for c in data["choices"]} == {"length"}
    assert data["usage"]["completion_tokens"] == 21
    assert _sent(gateway, rid)["max_tokens"] == 7
    entry = next(e for e in _ledger(gateway, key) if e.get("request_id") == rid)
    assert entry["type"] == "debit" and entry["tokens_out"] == 21
    assert parse_credits(entry["written_off"]) == 0  # all 21 were paid for, none written off
    _reconciles(gateway, key)


def test_n_choices_the_balance_cannot_pay_for_are_refused(gateway: Gateway) -> None:
    price = gateway.cfg.models_by_id["sim-chat"].price
    body = {"model": "sim-chat", "messages": HELLO, "n": 3, "max_tokens": 10}
    prompt = estimate_prompt_tokens("chat", body)
    # one choice of 10 tokens is paid for twice over, three are not
    _, key = _account(gateway, format_credits(token_cost(price, prompt, 20)))
    r = httpx.post(
        gateway.v1 + "/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body
    )
    assert r.status_code == 402, r.text
    assert r.json()["error"]["code"] == "insufficient_credits"
    body["n"] = 2
    r = httpx.post(
        gateway.v1 + "/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body
    )
    assert r.status_code == 200, r.text


def test_a_stream_of_several_choices_is_charged_for_all_of_them(gateway: Gateway) -> None:
    """vLLM's running usage counts the chunk's own choice only: with n > 1 the gateway does
    not ask for it, and a cut stream is charged the chunks of every choice the meter counted;
    one that ends, the backend's final usage (the sum)."""
    _, key = _account(gateway, "5")
    client = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    whole = client.chat.completions.create(
        model="sim-chat",
        messages=HELLO,
        stream=True,
        n=2,
        extra_headers={"x-sim-output-tokens": "6"},
    )
    rid = whole.response.headers["x-request-id"]
    texts = {0: 0, 1: 0}
    for chunk in whole:
        assert chunk.usage is None  # the client did not ask for it
        for choice in chunk.choices:
            if choice.delta.content:
                texts[choice.index] += 1
    assert texts == {0: 6, 1: 6}
    sent = _sent(gateway, rid)
    assert sent["n"] == 2 and sent["stream_options"] == {"include_usage": True}
    _wait_settled(gateway, key)
    entry = next(e for e in _ledger(gateway, key) if e.get("request_id") == rid)
    assert entry["type"] == "debit" and entry["tokens_out"] == 12 and "counted" not in entry

    cut = client.chat.completions.create(
        model="sim-chat",
        messages=HELLO,
        stream=True,
        n=2,
        max_tokens=200,
        extra_headers={"x-sim-itl-ms": "100", "x-sim-output-tokens": "200"},
    )
    rid = cut.response.headers["x-request-id"]
    got = 0
    for chunk in cut:
        got += sum(1 for c in chunk.choices if c.delta.content)
        if got == 6:  # 3 tokens of each choice
            break
    cut.close()
    _wait_settled(gateway, key)
    entry = next(e for e in _ledger(gateway, key) if e.get("request_id") == rid)
    assert entry["type"] == "debit" and entry["reason"] == "client_disconnected"
    # the chunks of both choices that passed Envoy (a loaded machine may pass a step more)
    assert 6 <= entry["tokens_out"] <= 10 and entry["counted"] is True, entry
    _reconciles(gateway, key)


def test_a_batch_of_prompts_fits_the_context_by_its_longest(gateway: Gateway) -> None:
    """Each prompt of a completions batch runs on its own: the context check reads the longest,
    and the reservation covers all of them, a choice each."""
    long = "toll " * 1_800  # 3,000 tokens as estimated: two of them overflow short-chat's 4,096
    _, key = _account(gateway, "5")
    rid = uuid.uuid4().hex
    r = httpx.post(
        gateway.v1 + "/completions",
        headers={"Authorization": f"Bearer {key}", "X-Request-ID": rid},
        json={"model": "short-chat", "prompt": [long, long], "max_tokens": 4},
    )
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert r.json()["usage"]["completion_tokens"] == 8
    entry = next(e for e in _ledger(gateway, key) if e.get("request_id") == rid)
    assert entry["type"] == "debit" and entry["tokens_out"] == 8
    r = httpx.post(
        gateway.v1 + "/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "short-chat", "prompt": long + long, "max_tokens": 4},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    _reconciles(gateway, key)


def test_stream_cut_by_client_is_charged_for_what_was_generated(gateway: Gateway) -> None:
    _, key = _account(gateway, "5")
    client = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    stream = client.chat.completions.create(
        model="sim-chat",
        messages=HELLO,
        stream=True,
        max_tokens=200,
        extra_headers={"x-sim-itl-ms": "100", "x-sim-output-tokens": "200"},
    )
    rid = stream.response.headers["x-request-id"]
    got = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
        if got == 5:
            break
    stream.close()
    _wait_settled(gateway, key)
    entry = next(e for e in _ledger(gateway, key) if e.get("request_id") == rid)
    assert entry["type"] == "debit" and entry["reason"] == "client_disconnected"
    # what passed Envoy before it saw the cut (100 ms apart: a loaded machine may pass one more)
    assert 5 <= entry["tokens_out"] <= 8, entry
    price = gateway.cfg.models_by_id["sim-chat"].price
    assert entry["amount"] == "-" + format_credits(
        token_cost(price, entry["tokens_in"], entry["tokens_out"])
    )
    _reconciles(gateway, key)


def test_backend_error_is_not_charged(gateway: Gateway) -> None:
    _, key = _account(gateway, "5")
    r = httpx.post(
        gateway.v1 + "/chat/completions",
        headers={"Authorization": f"Bearer {key}", "x-sim-error": "500"},
        json={"model": "sim-chat", "messages": HELLO},
    )
    assert r.status_code == 502
    assert r.headers["x-credits-used"] == "0.00"
    [entry] = _ledger(gateway, key)[:1]
    assert entry["type"] == "void"
    _reconciles(gateway, key)


def test_a_voided_request_gives_its_reserved_tokens_back_in_the_headers(gateway: Gateway) -> None:
    """A backend error is voided and its reserved tokens released in the window: the tokens
    remaining on its own response say so (it said the whole reservation was used)."""
    _, key = _account(gateway, "5", tpm=10_000)
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": "sim-chat", "messages": HELLO, "max_tokens": 500}
    r = httpx.post(
        gateway.v1 + "/chat/completions", headers={**auth, "x-sim-error": "500"}, json=body
    )
    assert r.status_code == 502
    assert r.headers["x-ratelimit-remaining-tokens"] == "10000", r.headers
    r = httpx.post(gateway.v1 + "/chat/completions", headers=auth, json=body | {"max_tokens": 1})
    used = r.json()["usage"]["prompt_tokens"] + r.json()["usage"]["completion_tokens"]
    assert r.headers["x-ratelimit-remaining-tokens"] == str(10_000 - used)


def test_backend_down_is_voided(gateway: Gateway) -> None:
    _, key = _account(gateway, "5")
    r = httpx.post(
        gateway.v1 + "/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "down-chat", "messages": HELLO},
    )
    assert r.status_code == 503
    credits = _wait_settled(gateway, key)
    assert parse_credits(credits["reserved"]) == 0
    assert credits["balance"] == "5.00"


def test_reused_request_id_is_refused(gateway: Gateway) -> None:
    _, key = _account(gateway, "5")
    rid = uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {key}", "X-Request-ID": rid}
    body = {"model": "sim-chat", "messages": HELLO, "max_tokens": 3}
    assert (
        httpx.post(gateway.v1 + "/chat/completions", headers=headers, json=body).status_code == 200
    )
    again = httpx.post(gateway.v1 + "/chat/completions", headers=headers, json=body)
    assert again.status_code == 400 and again.json()["error"]["param"] == "x-request-id"
    assert len([e for e in _ledger(gateway, key) if e.get("request_id") == rid]) == 1


def test_settlement_replayed_through_the_access_log_charges_once(gateway: Gateway) -> None:
    import asyncio

    import grpc
    from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

    _, key = _account(gateway, "5")
    client = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    with client.chat.completions.with_streaming_response.create(
        model="sim-chat", messages=HELLO, stream=True, max_tokens=4
    ) as resp:
        rid = resp.headers["x-request-id"]
        list(resp.iter_lines())
    before = _wait_settled(gateway, key)

    entry = als_pb2.StreamAccessLogsMessage()
    log = entry.http_logs.log_entry.add()
    log.common_properties.metadata.filter_metadata["tollgate"].update(
        {"stream": True, "request_id": rid}
    )
    log.common_properties.metadata.filter_metadata["tollgate.usage"].update(
        {"prompt_tokens": 1000, "completion_tokens": 1000}
    )
    log.response.response_code.value = 200

    async def replay() -> None:
        port = gateway.cfg.processor.port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = als_pb2_grpc.AccessLogServiceStub(channel)
            await stub.StreamAccessLogs(iter([entry, entry]))

    asyncio.run(replay())
    assert _get(gateway, key, "/credits") == before
    assert len([e for e in _ledger(gateway, key) if e.get("request_id") == rid]) == 1


@pytest.mark.parametrize(
    ("max_tokens", "status", "param"),
    [
        (-5, 400, "max_tokens"),
        (1.5, 400, "max_tokens"),
        ("7", 400, "max_tokens"),
        (513, 400, "max_tokens"),
    ],
)
def test_bad_max_tokens(gateway: Gateway, max_tokens: object, status: int, param: str) -> None:
    # sim-chat's cap is 512: above it is a 400, never a silent clamp of an explicit value
    r = httpx.post(
        gateway.v1 + "/chat/completions",
        headers={"Authorization": f"Bearer {gateway.key}"},
        json={"model": "sim-chat", "messages": HELLO, "max_tokens": max_tokens},
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_account_endpoints_are_scoped_to_the_caller(gateway: Gateway) -> None:
    a, key_a = _account(gateway, "3")
    _, key_b = _account(gateway, "7")
    client = openai.OpenAI(base_url=gateway.v1, api_key=key_a, max_retries=0)
    client.chat.completions.create(model="sim-chat", messages=HELLO, max_tokens=2)
    assert _get(gateway, key_a, "/credits")["account"] == a
    assert _get(gateway, key_b, "/credits")["balance"] == "7.00"
    assert [e["type"] for e in _ledger(gateway, key_b)] == ["grant"]
    assert _get(gateway, key_b, "/usage")["data"] == []


def _cli(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args, "--config", str(gateway.stack.config_path)],
        env={**os.environ, "TOLLGATE_ADMIN_KEY": ADMIN_KEY},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_grant_show_and_usage(gateway: Gateway) -> None:
    account, key = _account(gateway)
    ok = _cli(gateway, "credits", "grant", account, "12.345678", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["balance"] == "12.345678"
    bad = _cli(gateway, "credits", "grant", account, "1.1234567")
    assert bad.returncode == 2 and "6 decimal" in bad.stderr
    for amount in ("-3", "0", "abc"):
        assert _cli(gateway, "credits", "grant", account, amount).returncode == 2
    show = _cli(gateway, "credits", "show", account)
    assert show.returncode == 0 and "12.345678" in show.stdout
    openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0).chat.completions.create(
        model="sim-chat", messages=HELLO, max_tokens=2
    )
    usage = _cli(gateway, "usage", "--account", account, "--json")
    rows = json.loads(usage.stdout)
    assert len(rows) == 1 and rows[0]["model"] == "sim-chat"
    assert _cli(gateway, "usage", "--since", "yesterday").returncode == 2


def test_store_layout_keeps_no_raw_key(gateway: Gateway, tmp_path: Path) -> None:
    from extproc.store import connect_sync

    _, key = _account(gateway, "1")
    client = connect_sync(gateway.cfg.store_url)
    for name in client.scan_iter("tg:*"):
        kind = client.type(name)
        dump = json.dumps(
            client.hgetall(name)
            if kind == "hash"
            else client.zrange(name, 0, -1)
            if kind == "zset"
            else client.get(name)
            if kind == "string"
            else []
        )
        assert key not in dump and key not in name


def test_account_limits_apply_to_keys_without_their_own(gateway: Gateway) -> None:
    account, key = _account(gateway, "5")
    own = gateway.new_key("own", account, rpm=50)
    r = _cli(gateway, "accounts", "set-limits", account, "--rpm", "3", "--concurrency", "2")
    assert r.returncode == 0, r.stderr
    assert _cli(gateway, "accounts", "set-limits", account).returncode == 2
    assert _cli(gateway, "accounts", "set-limits", account, "--rpm", "-1").returncode == 2
    time.sleep(0.3)  # the workers drop the account's cached keys when told (pub/sub)
    body = {"model": "sim-chat", "messages": HELLO, "max_tokens": 2}
    h = httpx.post(
        gateway.v1 + "/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body
    ).headers
    assert h["x-ratelimit-limit-requests"] == "3"
    h = httpx.post(
        gateway.v1 + "/chat/completions", headers={"Authorization": f"Bearer {own}"}, json=body
    ).headers
    assert h["x-ratelimit-limit-requests"] == "50"


def test_the_embedded_store_runs_on_mimalloc(gateway: Gateway) -> None:
    """store.allocator auto (the default): the embedded Valkey has mimalloc preloaded, where the
    cmeel-mimalloc wheel is installed (a dependency on Linux); "system" leaves it out."""
    from extproc.supervisor import mimalloc_library, store_allocator_env

    if not sys.platform.startswith("linux"):
        pytest.skip("mimalloc is preloaded on Linux only")
    assert mimalloc_library() is not None, "cmeel-mimalloc (a dependency on Linux) is missing"
    valkey = next(c for c in gateway.stack.children if c.name == "valkey")
    maps = Path(f"/proc/{valkey.pid}/maps").read_text()
    assert "libmimalloc" in maps
    assert store_allocator_env("system") is None


def test_the_store_allocator_keeps_an_operators_preload(monkeypatch: pytest.MonkeyPatch) -> None:
    from extproc.supervisor import mimalloc_library, store_allocator_env

    lib = mimalloc_library()
    if lib is None:
        pytest.skip("mimalloc is preloaded on Linux only")
    monkeypatch.setenv("LD_PRELOAD", "/opt/profiler/libprof.so")
    assert store_allocator_env("auto") == {"LD_PRELOAD": f"/opt/profiler/libprof.so {lib}"}
    monkeypatch.delenv("LD_PRELOAD")
    assert store_allocator_env("auto") == {"LD_PRELOAD": str(lib)}


def test_a_key_limited_to_one_at_a_time_can_stream_one_after_another(gateway: Gateway) -> None:
    """A stream's settlement frees its concurrency slot through Envoy's access log: for a key
    with a concurrency limit its record goes at once (not batched), and a refusal a settlement
    may be about to lift is checked once more. So a client that streams one request after the
    other never meets a 429; two at the same time still do."""
    _, key = _account(gateway, "5", concurrency=1)
    client = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    for _ in range(15):
        stream = client.chat.completions.create(
            model="sim-chat", messages=HELLO, max_tokens=4, stream=True
        )
        assert sum(1 for c in stream if c.choices and c.choices[0].delta.content) == 4
    headers = {"Authorization": f"Bearer {key}", "x-sim-itl-ms": "100"}
    body = {"model": "sim-chat", "messages": HELLO, "max_tokens": 10, "stream": True}
    with httpx.stream("POST", gateway.v1 + "/chat/completions", headers=headers, json=body) as r:
        assert r.status_code == 200
        second = httpx.post(gateway.v1 + "/chat/completions", headers=headers, json=body)
        assert second.status_code == 429, second.text
        assert second.json()["error"]["code"] == "rate_limit_exceeded"
        r.read()
    _reconciles(gateway, key)


def test_the_settling_log_carries_metered_streams_only(gateway: Gateway) -> None:
    """A record per finished stream (batched, or at once for a limited key) and none for the
    rest, which the processor settles itself: Envoy once built and sent one for every request."""

    def written() -> int:
        return gateway.envoy_stats("access_logs.grpc_access_log.logs_written").get(
            "access_logs.grpc_access_log.logs_written", 0
        )

    body = {"model": "sim-chat", "messages": HELLO, "max_tokens": 3}
    before = written()
    for limits in ({}, {"concurrency": 4}):
        _, key = _account(gateway, "1", **limits)
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.post(gateway.v1 + "/chat/completions", headers=auth, json=body).is_success
        with httpx.stream(
            "POST", gateway.v1 + "/chat/completions", headers=auth, json={**body, "stream": True}
        ) as r:
            r.read()
        assert parse_credits(_wait_settled(gateway, key)["reserved"]) == 0
    assert written() - before == 2


def test_which_refusals_are_checked_again_and_which_streams_settle_at_once() -> None:
    """Only a refusal a settlement on its way could lift waits (for the right log), and never
    for more than a quarter of Envoy's wait for the processor; a limited key's streams, and
    those reserved on a low balance, settle at once."""
    from types import SimpleNamespace

    from extproc.config import Limits, parse_config
    from extproc.ledger import Ledger, Reservation
    from extproc.metering import LOW_BALANCE_RESERVATIONS, RECHECK_BATCHED_S, RECHECK_NOW_S, Meter
    from tests.harness import base_config

    meter = Meter(parse_config(base_config()), Ledger.__new__(Ledger))
    plain = SimpleNamespace(limits=Limits())
    limited = SimpleNamespace(limits=Limits(concurrency=1))

    def res(
        status: str, amount: int = 10, balance: int = 100, pending: int = 50, available: int = 0
    ) -> Reservation:
        return Reservation(status, 0, amount, 0, -1, 0, -1, 0, 0, balance, pending, available)

    waits = meter._rechecks
    assert waits(res("concurrency"), limited) == (RECHECK_NOW_S,)
    assert waits(res("rate_limit_tokens"), limited) == (RECHECK_NOW_S,)
    assert waits(res("insufficient_credits"), limited) == (RECHECK_NOW_S,)
    # the money may be held by a stream reserved on a low balance (settled at once) or by one
    # settled in a batch (within 20 ms): one look, after both
    assert waits(res("insufficient_credits"), plain) == (RECHECK_BATCHED_S,)
    assert RECHECK_BATCHED_S > RECHECK_NOW_S
    assert waits(res("insufficient_credits", amount=101), plain) == ()  # the balance cannot pay
    assert waits(res("concurrency", pending=0), limited) == ()  # nothing reserved to release
    assert waits(res("rate_limit_requests"), limited) == ()  # a settlement never lifts it
    short = parse_config({**base_config(), "processor": {"message_timeout": "0.4s"}})
    assert Meter(short, Ledger.__new__(Ledger))._recheck_cap_s == 0.1

    low = LOW_BALANCE_RESERVATIONS * 10
    assert meter.settles_now(limited, res("ok", available=10**9))
    assert meter.settles_now(SimpleNamespace(limits=Limits(tpm=1000)), res("ok", available=10**9))
    assert not meter.settles_now(plain, res("ok", available=low))
    assert meter.settles_now(plain, res("ok", available=low - 1))
    assert not meter.settles_now(plain, res("ok", amount=0, available=0))  # free: nothing held


def test_a_recheck_looks_again_when_a_batch_settles_and_at_most_twice_early() -> None:
    """A credits refusal of a key without limits (its streams settle batched) is looked at
    again as soon as this worker's settling log settles a batch, not only when its wait runs
    out; early looks stop after EARLY_RECHECKS, and the last look comes at the end of the wait.
    A limited key's refusal is looked at once, at the end of its wait."""
    from types import SimpleNamespace

    from extproc import metering
    from extproc.config import Limits, parse_config
    from extproc.ledger import Reservation
    from tests.harness import base_config

    def res(status: str) -> Reservation:
        return Reservation(status, 16, 10, 0, -1, 0, -1, 0, 0, 100, 50, 40)

    class FakeLedger:
        def __init__(self, answers: list[str]) -> None:
            self.answers, self.calls = answers, 0
            self.batches: list[asyncio.Future[list[Any]]] = []

        async def reserve(self, req: Any, abandoned_reason: str = "") -> Reservation:
            self.calls += 1
            return res(self.answers.pop(0))

        def settle_many_soon(self, calls: list[Any]) -> asyncio.Future[list[Any]]:
            f = asyncio.get_running_loop().create_future()
            self.batches.append(f)
            return f

    cfg = parse_config({**base_config(), "processor": {"message_timeout": "240s"}})
    principal = SimpleNamespace(
        account="a", key_hash="h", key_prefix="tg_x", limits=Limits(), pool=None
    )
    body = {"model": "sim-chat", "messages": HELLO, "max_tokens": 16}

    async def scenario(
        answers: list[str], batches: int, wait: float, limits: Limits | None = None
    ) -> tuple[Any, int, float]:
        ledger = FakeLedger(answers)
        principal.limits = limits or Limits()
        meter = metering.Meter(cfg, ledger)  # type: ignore[arg-type]
        model = cfg.models_by_id["sim-chat"]
        old = metering.RECHECK_BATCHED_S, metering.RECHECK_NOW_S
        metering.RECHECK_BATCHED_S = metering.RECHECK_NOW_S = wait
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            task = asyncio.ensure_future(
                meter.reserve("r1", principal, model, "chat", body, model.backend)
            )
            for _ in range(batches):
                await asyncio.sleep(0.05)
                meter.settle_many([("s", None, 200, "settled")]).set_result([])
            try:
                out: Any = await asyncio.wait_for(task, 20)
            except Exception as exc:  # the refusal
                out = exc
            return out, ledger.calls, loop.time() - t0
        finally:
            metering.RECHECK_BATCHED_S, metering.RECHECK_NOW_S = old

    # a batch settles: the second look, at once, finds the credits (the wait is 30 s)
    out, calls, took = asyncio.run(scenario(["insufficient_credits", "ok"], 1, 30.0))
    assert isinstance(out, Reservation) and out.ok and calls == 2 and took < 15
    # batches that free nothing: two early looks, then the last one at the end of the wait
    out, calls, took = asyncio.run(scenario(["insufficient_credits"] * 3 + ["ok"], 3, 0.5))
    assert isinstance(out, Reservation) and out.ok
    assert calls == 1 + metering.EARLY_RECHECKS + 1 and took >= 0.5
    # no batch at all: one look, when the wait runs out, as before
    out, calls, took = asyncio.run(
        scenario(["insufficient_credits", "insufficient_credits"], 0, 0.3)
    )
    assert isinstance(out, GatewayError) and out.code == "insufficient_credits"
    assert calls == 2 and took >= 0.3
    # a limited key: batches do not bring early looks
    out, calls, took = asyncio.run(
        scenario(["insufficient_credits", "ok"], 2, 0.4, Limits(concurrency=4))
    )
    assert isinstance(out, Reservation) and out.ok and calls == 2 and took >= 0.4


def test_with_several_workers_a_batch_settled_elsewhere_wakes_a_recheck_here() -> None:
    """With several workers the batch that frees a refusal's credits may settle on another
    worker: each worker announces its batches (tg:settled, with its token), and an
    announcement from another worker wakes the rechecks waiting here; its own does not."""
    from types import SimpleNamespace

    from extproc import metering
    from extproc.config import Limits, parse_config
    from extproc.ledger import Reservation
    from tests.harness import base_config

    class FakeLedger:
        def __init__(self) -> None:
            self.answers = ["insufficient_credits", "ok"]
            self.announced: list[str] = []

        async def reserve(self, req: Any, abandoned_reason: str = "") -> Reservation:
            return Reservation(self.answers.pop(0), 16, 10, 0, -1, 0, -1, 0, 0, 100, 50, 40)

        def settle_many_soon(self, calls: list[Any]) -> asyncio.Future[list[Any]]:
            f = asyncio.get_running_loop().create_future()
            f.set_result([])
            return f

        async def announce_settled(self, token: str) -> None:
            self.announced.append(token)

    cfg = parse_config({**base_config(), "processor": {"message_timeout": "240s", "workers": 2}})
    principal = SimpleNamespace(account="a", key_hash="h", key_prefix="tg_x", limits=Limits())
    body = {"model": "sim-chat", "messages": HELLO, "max_tokens": 16}

    async def scenario() -> None:
        ledger = FakeLedger()
        meter = metering.Meter(cfg, ledger)  # type: ignore[arg-type]
        model = cfg.models_by_id["sim-chat"]
        old = metering.RECHECK_BATCHED_S
        metering.RECHECK_BATCHED_S = 30.0
        try:
            # a batch settled here is announced to the others, with this worker's token
            meter.settle_many([("s", None, 200, "settled")])
            for _ in range(10):
                await asyncio.sleep(0)
            assert ledger.announced == [meter._token]
            task = asyncio.ensure_future(
                meter.reserve("r1", principal, model, "chat", body, model.backend)
            )
            await asyncio.sleep(0.05)
            meter.settled_elsewhere(meter._token)  # its own announcement: no look
            await asyncio.sleep(0.05)
            assert not task.done() and ledger.answers == ["ok"]
            meter.settled_elsewhere("another-worker")
            res = await asyncio.wait_for(task, 5)
            assert res.ok
        finally:
            metering.RECHECK_BATCHED_S = old

    asyncio.run(scenario())
    one = metering.Meter(parse_config(base_config()), FakeLedger())  # type: ignore[arg-type]
    assert not one._announce  # one worker: its own batches are the only ones


def test_a_nearly_empty_balance_streams_one_request_after_another(gateway: Gateway) -> None:
    """Streams reserved on a low balance settle at once (the settling log that flushes every
    2 ms, not the batched one), so a client streaming one request after the other on the last
    of its credits finds each earlier stream settled and is served until they run out, then
    gets 402; nothing is lost on the way."""
    from extproc.tokens import estimate_prompt_tokens
    from tests.test_metrics import _value

    account, key = _account(gateway)
    auth = {"Authorization": f"Bearer {key}", "x-sim-output-tokens": "4"}
    body = {"model": "sim-chat", "messages": HELLO, "max_tokens": 200, "stream": True}
    price = gateway.cfg.models_by_id["sim-chat"].price
    reserved = token_cost(price, estimate_prompt_tokens("chat", body), 200)
    charged = token_cost(price, 8, 4)  # the simulator counts HELLO as 8 tokens
    # enough for two: after the second charge what is left cannot pay the reservation
    grant(str(gateway.stack.config_path), account, format_credits(reserved + charged * 3 // 2))
    before = _value(gateway.metrics(), "tollgate_settle_records_total", log="tollgate_settle_now")
    codes = []
    for _ in range(4):
        with httpx.stream("POST", gateway.v1 + "/chat/completions", headers=auth, json=body) as r:
            r.read()
            codes.append(r.status_code)
    assert codes == [200, 200, 402, 402], codes
    assert parse_credits(_wait_settled(gateway, key)["reserved"]) == 0
    served = [e for e in _ledger(gateway, key) if e["type"] == "debit"]
    assert [e["amount"] for e in served] == [f"-{format_credits(charged)}"] * 2
    after = _value(gateway.metrics(), "tollgate_settle_records_total", log="tollgate_settle_now")
    assert after - before == 2
    _reconciles(gateway, key)


def test_a_larger_request_right_after_a_batched_stream_is_served(gateway: Gateway) -> None:
    """A stream reserved while the account could pay 4 more like it settles through the batched
    log, within 20 ms of its end. A larger request right after it needs the credits the stream
    held: it is served, not answered 402. Mostly the store still holds them when it arrives,
    and the recheck (when the batch settles, at most 50 ms later) finds them released; three
    rounds, so that this fails without the recheck (a probe: 18 of 20 such requests needed
    it)."""
    from extproc.tokens import estimate_prompt_tokens
    from tests.test_metrics import _value

    price = gateway.cfg.models_by_id["sim-chat"].price
    stream = {"model": "sim-chat", "messages": HELLO, "max_tokens": 50, "stream": True}
    prompt = estimate_prompt_tokens("chat", stream)
    reserved = token_cost(price, prompt, 50)
    charged = token_cost(price, 8, 4)  # the simulator counts HELLO as 8 tokens
    balance = 5 * reserved + 10  # after the stream's reservation 4 more like it fit: batched
    big = max(m for m in range(1, 513) if token_cost(price, prompt, m) <= balance - charged)
    assert token_cost(price, prompt, big) > balance - reserved  # needs the stream's credits
    body = {"model": "sim-chat", "messages": HELLO, "max_tokens": big}
    before = _value(gateway.metrics(), "tollgate_settle_records_total", log="tollgate_settle")
    for _ in range(3):
        account, key = _account(gateway)
        auth = {"Authorization": f"Bearer {key}", "x-sim-output-tokens": "4"}
        grant(str(gateway.stack.config_path), account, format_credits(balance))
        with httpx.Client(headers=auth) as c:
            with c.stream("POST", gateway.v1 + "/chat/completions", json=stream) as r:
                r.read()
                assert r.status_code == 200
            r = c.post(gateway.v1 + "/chat/completions", json=body)
            assert r.status_code == 200, r.text
        assert parse_credits(_wait_settled(gateway, key)["reserved"]) == 0
        _reconciles(gateway, key)
    after = _value(gateway.metrics(), "tollgate_settle_records_total", log="tollgate_settle")
    assert after - before == 3  # the streams went through the batched log


def test_a_client_that_leaves_while_the_store_reserves_is_not_charged(gateway: Gateway) -> None:
    """The client gives up while the reservation is on its way to the store (held here with
    CLIENT PAUSE): the worker's request is cancelled, and the reservation the store makes
    afterwards is voided at once, not left for the sweeper to charge."""
    from tests.harness import connect_sync

    _, key = _account(gateway, "1")
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": "sim-chat", "messages": HELLO, "max_tokens": 5}
    assert httpx.post(gateway.v1 + "/chat/completions", headers=auth, json=body).is_success
    rid = "left-" + uuid.uuid4().hex
    store = connect_sync(gateway.cfg.store_url)
    store.execute_command("CLIENT", "PAUSE", "1500", "WRITE")  # the key lookup is cached
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            gateway.v1 + "/chat/completions",
            headers={**auth, "X-Request-ID": rid},
            json=body,
            timeout=0.5,
        )
    entries = _entries(gateway, key, rid)
    entry = entries[0] if entries else None
    assert entry is not None and entry["type"] == "void", entry
    assert entry["reason"] == "client_disconnected"
    assert parse_credits(_get(gateway, key, "/credits")["reserved"]) == 0
    _reconciles(gateway, key)


def test_a_duplicate_request_id_whose_client_leaves_does_not_void_the_served_one(
    gateway: Gateway,
) -> None:
    """A request served under an id, and a second request with the same id whose client leaves
    while the store answers its reservation (held here with CLIENT PAUSE): the second's void
    names its own reserve call, so the first is still charged. Before, the void went by the id
    alone and the served request's entry was a void: served for free, on demand."""
    from tests.harness import connect_sync

    _, key = _account(gateway, "1")
    auth = {"Authorization": f"Bearer {key}"}
    rid = "dup-" + uuid.uuid4().hex
    body = {"model": "sim-chat", "messages": HELLO, "max_tokens": 10, "stream": True}
    pace = {"x-sim-itl-ms": "100", "x-sim-output-tokens": "10"}
    store = connect_sync(gateway.cfg.store_url)
    with httpx.stream(
        "POST",
        gateway.v1 + "/chat/completions",
        headers={**auth, **pace, "X-Request-ID": rid},
        json=body,
        timeout=20,
    ) as served:
        assert served.status_code == 200
        chunks = served.iter_text()
        next(chunks)  # reserved and running
        store.execute_command("CLIENT", "PAUSE", "1500", "WRITE")
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                gateway.v1 + "/chat/completions",
                headers={**auth, "X-Request-ID": rid},
                json=body,
                timeout=0.5,
            )
        text = "".join(chunks)
    assert text.rstrip().endswith("data: [DONE]")
    entries = _entries(gateway, key, rid)
    assert len(entries) == 1 and entries[0]["type"] == "debit", entries
    assert entries[0]["tokens_out"] == 10
    _reconciles(gateway, key)


def test_a_failed_settlement_logs_its_request_id() -> None:
    """Every log line carries the request id: a settlement the store refused too (it was
    logged without one, found by an audit)."""
    import asyncio

    import redis.exceptions
    from structlog.testing import capture_logs

    from extproc.metering import _settled

    async def failed() -> None:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        future.set_exception(redis.exceptions.ConnectionError("store unreachable"))
        with capture_logs() as logs:
            _settled("req-42", future)
        assert logs[0]["event"] == "settle_failed" and logs[0]["request_id"] == "req-42"

    asyncio.run(failed())


def test_only_counts_a_backend_could_make_are_read_as_usage() -> None:
    from extproc.metering import _tokens
    from extproc.translators.tgi_native import int_header

    assert _tokens({"prompt_tokens": 9, "completion_tokens": 3.0}) == (9, 3)
    for bad in (1e18, 2**31, -1, 3.7, float("inf"), float("nan"), True, "3", None):
        assert _tokens({"prompt_tokens": 9, "completion_tokens": bad}) is None, bad
    assert int_header("12") == 12
    for bad in ("1000000000000000000000", "-3", "2147483648", "x"):
        assert int_header(bad) is None, bad
