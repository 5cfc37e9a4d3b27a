"""The envelope (/v1/inference/...) and per-model proxy (/models/{model}/proxy/v1/...) dialects,
end to end: real Envoy, Valkey, processor and the vLLM, TGI and TEI simulators."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from extproc.money import format_credits
from tests import h2client
from tests.harness import PRICE, Gateway, base_config, sim_backend, start_gateway

HELLO = [{"role": "user", "content": "Tell me about envelopes."}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    cfg = base_config()
    cfg["backends"] += [
        sim_backend("tgi", "tgi"),
        sim_backend("tei-embed", "tei"),
        sim_backend("tei-rerank", "tei"),
        sim_backend("media", "openai"),
    ]
    cfg["models"] += [
        # TGI's own limit (--max-total-tokens 4096) is the context the gateway reserves within
        {
            "id": "tgi-model",
            "backend": "tgi",
            "pricing": PRICE,
            "context_length": 4096,
            "max_tokens": 1024,
        },
        {"id": "tei-embed-model", "backend": "tei-embed", "kind": "embedding", "pricing": PRICE},
        {"id": "tei-rerank-model", "backend": "tei-rerank", "kind": "rerank", "pricing": PRICE},
        {"id": "media-model", "backend": "media", "pricing": PRICE},
        {
            "id": "whisper-1",
            "backend": "media",
            "kind": "transcription",
            "max_audio_seconds": 600,
            "pricing": {"per_audio_second": "0.0001", "per_request": "0.001"},
        },
        {"id": "tts-1", "backend": "media", "kind": "speech", "pricing": {"per_request": "0.001"}},
        {"id": "dall-e-2", "backend": "media", "kind": "image", "pricing": {"per_image": "0.02"}},
    ]
    g = start_gateway(Path(tmp_path_factory.mktemp("dialects")), cfg)
    try:
        yield g
    finally:
        g.stack.stop()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _post(gw: Gateway, path: str, body: Any, key: str | None = None, **headers: str):
    h = _auth(key or gw.key) if key != "" else {}
    h.update({k.replace("_", "-"): v for k, v in headers.items()})
    return httpx.post(gw.base_url + path, headers=h, json=body, timeout=20)


def _envelope_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"status", "error", "meta"}, body
    assert body["status"] == "error"
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert body["error"]["code"] == code, body
    assert body["meta"]["request_id"] == r.headers["x-request-id"]
    return body["error"]


def _debit(gw: Gateway, request_id: str) -> dict[str, Any]:
    for _ in range(50):  # streams settle through Envoy's access log, batched
        r = httpx.get(gw.v1 + "/credits/transactions?limit=200", headers=_auth(gw.key))
        found = [e for e in r.json()["data"] if e.get("request_id") == request_id]
        if found and found[0].get("type") == "debit":
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no ledger debit for {request_id}")


def _ext_proc_messages(gw: Gateway) -> int:
    return gw.ext_proc_stat("stream_msgs_sent")


# --------------------------------------------------------------------------------- envelope


@pytest.mark.parametrize("model", ["sim-chat", "tgi-model"])
def test_envelope_wraps_chat_generate_and_embed(gw: Gateway, model: str) -> None:
    r = _post(gw, "/v1/inference/chat", {"model": model, "messages": HELLO, "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and set(body) == {"status", "data", "meta"}
    assert body["data"]["object"] == "chat.completion"
    assert body["data"]["choices"][0]["message"]["content"]
    meta = body["meta"]
    assert meta["request_id"] == r.headers["x-request-id"]
    assert meta["model"] == model and meta["backend"] == r.headers["x-gateway-backend"]
    assert meta["usage"]["completion_tokens"] == body["data"]["usage"]["completion_tokens"] == 4
    assert float(r.headers["x-credits-used"]) > 0
    assert _debit(gw, meta["request_id"])["tokens_out"] == 4

    r = _post(gw, "/v1/inference/generate", {"model": model, "prompt": "Once", "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["data"]["object"] == "text_completion"
    assert r.json()["data"]["choices"][0]["text"]


def test_envelope_embed(gw: Gateway) -> None:
    for model in ("sim-embed", "tei-embed-model"):
        r = _post(gw, "/v1/inference/embed", {"model": model, "input": ["a", "b"]})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert data["object"] == "list" and [d["index"] for d in data["data"]] == [0, 1]


def test_envelope_errors_made_by_the_processor(gw: Gateway) -> None:
    chat = {"model": "sim-chat", "messages": HELLO}
    _envelope_error(_post(gw, "/v1/inference/chat", chat, key=""), 401, "invalid_api_key")
    err = _envelope_error(
        _post(gw, "/v1/inference/chat", {"model": "sim-chat"}), 400, "invalid_request_error"
    )
    assert err["param"] == "messages"
    err = _envelope_error(
        _post(gw, "/v1/inference/chat", {**chat, "model": "nope"}), 404, "model_not_found"
    )
    assert err["param"] == "model"
    err = _envelope_error(_post(gw, "/v1/inference/nope", chat), 404, "not_found")
    assert "/v1/inference/chat" in err["message"]
    for name in ("images/generate", "audio/synthesize"):  # media errors in the envelope too
        err = _envelope_error(_post(gw, "/v1/inference/" + name, {}), 400, "invalid_request_error")
        assert err["param"] == "model"
    r = httpx.get(gw.base_url + "/v1/inference/chat", headers=_auth(gw.key))
    _envelope_error(r, 405, "method_not_allowed")

    broke = gw.new_key("broke", account="broke-envelope")
    _envelope_error(_post(gw, "/v1/inference/chat", chat, key=broke), 402, "insufficient_credits")
    limited = gw.new_key("limited", rpm=1)
    assert _post(gw, "/v1/inference/chat", chat, key=limited).status_code == 200
    r = _post(gw, "/v1/inference/chat", chat, key=limited)
    err = _envelope_error(r, 429, "rate_limit_exceeded")
    assert err["retry_after"] >= 1 and int(r.headers["retry-after"]) >= 1


def test_envelope_backend_errors(gw: Gateway) -> None:
    chat = {"model": "sim-chat", "messages": HELLO}
    err = _envelope_error(
        _post(gw, "/v1/inference/chat", chat, x_sim_error="400"), 400, "context_length_exceeded"
    )
    assert err["param"] == "messages"
    r = _post(gw, "/v1/inference/chat", chat, x_sim_error="503")
    _envelope_error(r, 503, "backend_unavailable")
    assert r.headers["retry-after"] == "1"
    # TGI's own 422 for top_p 1.0 never happens (the translator drops it); n=2 is the gateway's
    tgi = {"model": "tgi-model", "messages": HELLO, "max_tokens": 2}
    _envelope_error(
        _post(gw, "/v1/inference/chat", tgi, x_sim_error="424"), 502, "backend_unavailable"
    )


def test_envelope_envoy_local_replies(gw: Gateway) -> None:
    """Envoy's own errors, after the processor rewrote the path to the backend's."""
    down = {"model": "down-chat", "messages": HELLO}
    _envelope_error(_post(gw, "/v1/inference/chat", down), 503, "backend_unavailable")
    slow = {"model": "slow-chat", "messages": HELLO, "max_tokens": 2}
    _envelope_error(_post(gw, "/v1/inference/chat", slow), 504, "backend_timeout")
    # the OpenAI dialect keeps its own shape for the same replies
    r = _post(gw, "/v1/chat/completions", down)
    assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"


def _sse(gw: Gateway, path: str, body: Any, **headers: str) -> tuple[str, str]:
    h = {**_auth(gw.key), **{k.replace("_", "-"): v for k, v in headers.items()}}
    with httpx.stream("POST", gw.base_url + path, headers=h, json=body, timeout=20) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return r.headers["x-request-id"], r.read().decode()


def _events(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e.strip()]


@pytest.mark.parametrize("model", ["sim-chat", "tgi-model"])
def test_envelope_stream_passes_sse_and_turns_errors_into_error_events(
    gw: Gateway, model: str
) -> None:
    chat = {"model": model, "messages": HELLO, "max_tokens": 6, "stream": True}
    _, text = _sse(gw, "/v1/inference/chat", chat)
    events = _events(text)
    assert events[-1] == "data: [DONE]"
    chunks = [orjson.loads(e[6:]) for e in events if e.startswith("data: {")]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "event: error" not in text

    rid, text = _sse(gw, "/v1/inference/chat", chat, x_sim_error_after="2")
    errors = [e for e in _events(text) if e.startswith("event: error\n")]
    assert len(errors) == 1, text
    payload = orjson.loads(errors[0].split("\ndata: ", 1)[1])
    assert payload["status"] == "error" and payload["meta"] == {"request_id": rid}
    assert payload["error"]["code"] == "backend_unavailable" and payload["error"]["message"]
    assert 'data: {"error"' not in text  # no OpenAI-shaped error left
    assert _events(text)[-1] == "data: [DONE]"


def test_envelope_message_counts(gw: Gateway) -> None:
    chat = {"model": "sim-chat", "messages": HELLO, "max_tokens": 3}
    m0 = _ext_proc_messages(gw)
    assert _post(gw, "/v1/inference/chat", chat).status_code == 200
    m1 = _ext_proc_messages(gw)
    assert m1 - m0 == 4  # headers, body, response headers, the response body to wrap
    assert _post(gw, "/v1/chat/completions", chat).status_code == 200
    assert _ext_proc_messages(gw) - m1 == 3  # the OpenAI dialect is unchanged


# ------------------------------------------------------------------------------------ proxy


def test_proxy_vllm_with_the_openai_sdk(gw: Gateway) -> None:
    # chat-alias is served by the backend as sim-chat: the body's model is rewritten
    sdk = openai.OpenAI(
        base_url=gw.base_url + "/models/chat-alias/proxy/v1", api_key=gw.key, max_retries=0
    )
    raw = sdk.chat.completions.with_raw_response.create(
        model="chat-alias", messages=HELLO, max_tokens=5
    )
    reply = raw.parse()
    assert reply.model == "sim-chat"  # the backend's own answer, untouched
    assert reply.usage.completion_tokens == 5
    assert raw.headers["x-gateway-model"] == "chat-alias"
    assert float(raw.headers["x-credits-used"]) > 0
    debit = _debit(gw, raw.headers["x-request-id"])
    assert debit["tokens_out"] == 5 and debit["tokens_in"] == reply.usage.prompt_tokens
    sent = gw.sim_requests()[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["body"]["model"] == "sim-chat"

    m0 = _ext_proc_messages(gw)
    chunks = list(
        sdk.chat.completions.create(model="chat-alias", messages=HELLO, max_tokens=4, stream=True)
    )
    assert _ext_proc_messages(gw) - m0 == 3  # no message per chunk
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 4
    models = sdk.models.list()  # GET, routed from the headers phase
    assert [m.id for m in models.data] == ["sim-chat"]


def test_proxy_tgi_native_generate_is_metered_from_tgi_headers(gw: Gateway) -> None:
    body = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 5}}
    m0 = _ext_proc_messages(gw)
    r = _post(gw, "/models/tgi-model/proxy/v1/generate", body)
    assert r.status_code == 200, r.text
    assert _ext_proc_messages(gw) - m0 == 3  # usage from TGI's headers: no body message
    assert isinstance(r.json()["generated_text"], str) and "choices" not in r.json()
    debit = _debit(gw, r.headers["x-request-id"])
    assert debit["tokens_out"] == int(r.headers["x-generated-tokens"]) == 5
    assert debit["tokens_in"] == int(r.headers["x-prompt-tokens"]) > 0

    # no max_new_tokens: the gateway clamps it to what the reservation granted
    r = _post(gw, "/models/tgi-model/proxy/v1/generate", {"inputs": "Hi", "stream": False})
    assert r.status_code == 200, r.text
    sent = gw.sim_requests("tgi")[-1]
    assert sent["path"] == "/generate" and sent["body"]["parameters"]["max_new_tokens"] >= 1
    # null is TGI's "no limit": the backend ran to its context (3,000 tokens here) on a
    # reservation of the model's cap
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": None}}
    r = _post(gw, "/models/tgi-model/proxy/v1/generate", body, x_sim_output_tokens="3000")
    assert r.status_code == 200, r.text
    granted = gw.sim_requests("tgi")[-1]["body"]["parameters"]["max_new_tokens"]
    assert granted == 1024
    assert _debit(gw, r.headers["x-request-id"])["tokens_out"] == granted


@pytest.mark.parametrize("pace", [{}, {"x_sim_ttft_ms": "300", "x_sim_itl_ms": "40"}])
def test_proxy_tgi_native_stream_is_metered_from_its_last_event(
    gw: Gateway, pace: dict[str, str]
) -> None:
    """Also when the events come one by one: the stream meter's first figures (the prompt
    estimate, for a stream cut before its first token) never hide the last event's."""
    body = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 6}}
    rid, text = _sse(gw, "/models/tgi-model/proxy/v1/generate_stream", body, **pace)
    events = [e for e in _events(text) if e.startswith("data:")]
    last = orjson.loads(events[-1][5:])
    assert last["details"]["generated_tokens"] == 6  # TGI's own events, no [DONE] added
    assert "[DONE]" not in text
    debit = _debit(gw, rid)
    assert debit["tokens_out"] == 6 and debit["tokens_in"] == last["details"]["input_length"]


def test_envoy_parses_only_the_streams_the_stream_meter_does_not_read(gw: Gateway) -> None:
    """sse_to_metadata (one event JSON parse each) skips metered streams, whose usage the stream
    meters read: vLLM's, and TGI's own (passed by the proxy) too."""

    def parsed() -> dict[str, int]:
        return gw.envoy_stats("sse_to_metadata.resp.json")

    before = parsed()
    _sse(gw, "/v1/chat/completions", {"model": "sim-chat", "messages": HELLO, "stream": True})
    assert parsed() == before  # neither filter parsed the metered vLLM stream
    body = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 3}}
    rid, _ = _sse(gw, "/models/tgi-model/proxy/v1/generate_stream", body)
    assert parsed() == before
    assert _debit(gw, rid)["tokens_out"] == 3  # metered all the same


def test_proxy_tei_embed_and_rerank_are_metered_from_tei_headers(gw: Gateway) -> None:
    r = _post(gw, "/models/tei-embed-model/proxy/v1/embed", {"inputs": ["hello", "world"]})
    assert r.status_code == 200, r.text
    rows = r.json()
    assert isinstance(rows, list) and len(rows) == 2 and isinstance(rows[0][0], float)
    debit = _debit(gw, r.headers["x-request-id"])
    assert debit["tokens_in"] == int(r.headers["x-compute-tokens"]) > 0
    assert debit["tokens_out"] == 0

    docs = ["a gateway meters tokens", "bananas are yellow"]
    r = _post(gw, "/models/tei-rerank-model/proxy/v1/rerank", {"query": "gateway", "texts": docs})
    assert r.status_code == 200, r.text
    assert {x["index"] for x in r.json()} == {0, 1} and "score" in r.json()[0]
    assert _debit(gw, r.headers["x-request-id"])["tokens_in"] == int(r.headers["x-compute-tokens"])


def test_proxy_media_routes(gw: Gateway) -> None:
    """Audio and images on an OpenAI-kind backend; an upload 96 times the JSON body limit and 6
    times Envoy's buffer limit passes without the processor reading it (routed from the
    headers), charged per request."""
    audio = os.urandom(6 * 1024 * 1024)  # max_request_body_bytes is 64 KiB here
    m0 = _ext_proc_messages(gw)
    r = httpx.post(
        gw.base_url + "/models/media-model/proxy/v1/transcript",
        headers=_auth(gw.key),
        data={"model": "media-model"},
        files={"file": ("a.wav", audio, "audio/wav")},
        timeout=20,
    )
    assert r.status_code == 200, r.text
    assert _ext_proc_messages(gw) - m0 == 2  # request headers, response headers
    assert r.json()["text"]
    sent = gw.sim_requests("media")[-1]
    assert sent["path"] == "/v1/audio/transcriptions"
    assert sent["body"]["files"]["file"]["size"] == len(audio)
    debit = _debit(gw, r.headers["x-request-id"])
    assert debit["amount"] == "-0.0001"  # PRICE's per_request, no tokens

    speech = {"model": "media-model", "input": "hello there", "voice": "alloy"}
    r = _post(gw, "/models/media-model/proxy/v1/generate-speech", speech)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/mpeg" and len(r.content) > 100
    image = {"model": "media-model", "prompt": "a red door", "response_format": "b64_json"}
    r = _post(gw, "/models/media-model/proxy/v1/generate-image", image)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["b64_json"]


@pytest.mark.parametrize(
    ("fmt", "amount"),
    [
        ("json", 1_200),  # usage.seconds: 0.001 a request + 2 s x 0.0001
        ("verbose_json", 1_200),  # duration
        ("text", 61_000),  # names no duration: the reservation (600 s at most)
    ],
)
def test_proxy_transcript_priced_per_second_is_charged_its_duration(
    gw: Gateway, fmt: str, amount: int
) -> None:
    """A transcription through the proxy keeps the client's format; when the answer is JSON
    its duration is read (a body message), else the reservation is charged. Before, every
    such request was charged its whole max_audio_seconds."""
    audio = b"\x00\x01" * 32000  # 2 s at the simulator's 32,000 bytes a second
    r = httpx.post(
        gw.base_url + "/models/whisper-1/proxy/v1/transcript",
        headers=_auth(gw.key),
        data={"model": "whisper-1", "response_format": fmt},
        files={"file": ("a.wav", audio, "audio/wav")},
        timeout=20,
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-credits-used"] == format_credits(amount)
    assert _debit(gw, r.headers["x-request-id"])["amount"] == "-" + format_credits(amount)
    if fmt == "text":
        assert not r.text.startswith("{")  # the client's format, untouched


def _entry(gw: Gateway, request_id: str) -> dict[str, Any]:
    for _ in range(50):  # streams settle through Envoy's access log, batched
        r = httpx.get(gw.v1 + "/credits/transactions?limit=200", headers=_auth(gw.key))
        found = [e for e in r.json()["data"] if e.get("request_id") == request_id]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no ledger entry for {request_id}")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/inference/chat"])
def test_a_stream_that_fails_before_its_first_token_is_voided_in_every_dialect(
    gw: Gateway, path: str
) -> None:
    """The backend's error event before any token: voided, on the OpenAI route and on the
    envelope (which rewrites the event as ``event: error`` before the stream meter reads it;
    it was charged its prompt there)."""
    rid = "fail-" + uuid.uuid4().hex
    body = {"model": "sim-chat", "messages": HELLO, "max_tokens": 5, "stream": True}
    headers = {"X-Request-ID": rid, "x-sim-error-after": "0"}
    with httpx.stream(
        "POST", gw.base_url + path, headers={**_auth(gw.key), **headers}, json=body, timeout=20
    ) as r:
        assert r.status_code == 200
        text = r.read().decode()
    assert "error" in text
    entry = _entry(gw, rid)
    assert entry["type"] == "void", entry


def test_proxy_errors(gw: Gateway) -> None:
    r = _post(gw, "/models/tgi-model/proxy/v1/embed", {"inputs": "x"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "not_found"
    for name in ("chat/completions", "completions", "generate", "generate_stream", "models"):
        assert name in err["message"]
    r = _post(gw, "/models/nope/proxy/v1/chat/completions", {"messages": HELLO})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = _post(gw, "/models/sim-chat/proxy/v1/chat/completions", {"messages": HELLO}, key="")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = _post(gw, "/models/tgi-model/proxy/v1/generate", {"parameters": {}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "inputs"
    # the backend's own errors pass through in its own schema and status
    r = _post(
        gw,
        "/models/tgi-model/proxy/v1/generate",
        {"inputs": "Hi", "parameters": {"top_p": 1.0, "max_new_tokens": 2}},
    )
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and isinstance(r.json()["error"], str)
    # Envoy's own reply (no healthy upstream) in the gateway's shape
    r = _post(gw, "/models/down-chat/proxy/v1/chat/completions", {"messages": HELLO})
    assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"


# ---------------------------------------------------------------------------------- metrics


def test_dialect_label_of_requests_total(gw: Gateway) -> None:
    chat = {"model": "sim-chat", "messages": HELLO, "max_tokens": 2}
    for path in ("/v1/chat/completions", "/v1/inference/chat"):
        assert _post(gw, path, chat).status_code == 200
    proxy = "/models/sim-chat/proxy/v1/chat/completions"
    assert _post(gw, proxy, {"messages": HELLO, "max_tokens": 2}).status_code == 200
    series = [
        f'tollgate_requests_total{{model="sim-chat",backend="vllm-chat",dialect="{d}",status="200"}}'
        for d in ("openai", "envelope", "proxy")
    ]
    deadline = time.monotonic() + 5  # counted when the ext_proc stream closes, just after
    while not all(s in (text := gw.metrics()) for s in series):
        assert time.monotonic() < deadline, [s for s in series if s not in text]
        time.sleep(0.05)


def test_envelope_media(gw: Gateway) -> None:
    """images/generate and audio/transcribe answer in the envelope; audio/synthesize returns the
    raw audio; each is metered like its OpenAI route."""
    r = _post(
        gw, "/v1/inference/images/generate", {"model": "dall-e-2", "prompt": "a gate", "n": 2}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and len(body["data"]["data"]) == 2
    assert body["meta"]["request_id"] == r.headers["x-request-id"]
    assert _debit(gw, r.headers["x-request-id"])["amount"] == "-" + format_credits(40_000)

    r = _post(
        gw, "/v1/inference/audio/synthesize", {"model": "tts-1", "input": "hi", "voice": "alloy"}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("audio/") and not r.content.startswith(b"{")

    audio = b"\x00\x01" * 32000  # 2 s at the simulator's 32,000 bytes a second
    r = httpx.post(
        gw.base_url + "/v1/inference/audio/transcribe",
        headers=_auth(gw.key),
        data={"model": "whisper-1"},
        files={"file": ("a.wav", audio, "audio/wav")},
        timeout=20,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and isinstance(body["data"]["text"], str)
    debit = _debit(gw, r.headers["x-request-id"])
    assert debit["amount"] == "-" + format_credits(1_200)  # 0.001 a request + 2 s x 0.0001


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/inference/chat", {"model": "sim-chat", "messages": HELLO, "max_tokens": 4}),
        ("/v1/inference/chat", {"model": "tgi-model", "messages": HELLO, "max_tokens": 4}),
        (
            "/models/tgi-model/proxy/v1/generate_stream",
            {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 4}},
        ),
    ],
    ids=["envelope-vllm", "envelope-tgi", "proxy-tgi"],
)
def test_http2_streams_of_every_dialect_end_in_credit_trailers(
    gw: Gateway, path: str, body: dict[str, Any]
) -> None:
    """Envelope streams (chunks the processor watches) and the proxy's (the backend's own
    stream) end in the same credit trailers as the OpenAI dialect's, matching the ledger."""
    if path.startswith("/v1/inference"):
        body = {**body, "stream": True}
    r = h2client.post(gw.base_url + path, body, _auth(gw.key))
    assert r.status == 200, r.body
    assert set(r.trailers) == {"x-credits-used", "x-credits-remaining"}, r.trailers
    assert "x-tollgate-trailers" not in r.headers
    if path.startswith("/v1/inference"):  # the stream ended whole before its trailers
        assert r.lines()[-1] == "data: [DONE]"
    debit = _debit(gw, r.headers["x-request-id"])
    assert r.trailers["x-credits-used"] == debit["amount"].removeprefix("-")
