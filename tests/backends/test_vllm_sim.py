"""The vLLM simulator (backends/), driven as a subprocess with the official openai SDK."""

from __future__ import annotations

import base64
import itertools
import json
import math
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from backends import textgen
from backends.http import ServerThread
from backends.process import SimulatorProcess
from backends.vllm import VllmConfig, build_app

MODEL = "sim-model"
ALIAS = "alias-model"
DIM = 64
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about rivers and stones"},
]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    args = ["--model", MODEL, "--model", ALIAS, "--embedding-dim", str(DIM)]
    args += ["--output-tokens", "16", "--max-model-len", "4096"]
    with SimulatorProcess(args) as proc:
        yield proc


@pytest.fixture(scope="module")
def oai(sim: SimulatorProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0, timeout=10)


@pytest.fixture(scope="module")
def http(sim: SimulatorProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def tight() -> Iterator[SimulatorProcess]:
    """One running slot, no queue: the second concurrent request is a 429."""
    with SimulatorProcess(["--model", MODEL, "--max-running", "1", "--max-queue", "0"]) as proc:
        yield proc


def sse_data(
    client: httpx.Client,
    body: dict[str, Any],
    path: str = "/v1/chat/completions",
    **headers: str,
) -> list[str]:
    """POST a stream request and return the raw ``data:`` payloads."""
    out = []
    with client.stream("POST", path, json=body, headers=headers) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert resp.headers["transfer-encoding"] == "chunked"
        for line in resp.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
    return out


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} {labels} not found")


# --- textgen --------------------------------------------------------------------------


def test_textgen_is_deterministic_and_prefix_stable() -> None:
    a = textgen.generate_tokens("hello world", 20)
    assert a == textgen.generate_tokens("hello world", 20)
    assert textgen.generate_tokens("hello world", 5) == a[:5]
    assert a != textgen.generate_tokens("hello worlds", 20)
    assert all(t.startswith(" ") and t[1:] in textgen.VOCAB for t in a)
    assert len(textgen.VOCAB) == 200
    _, tokens = textgen.chat_prompt(MESSAGES)
    assert tokens == 3 + 6 + 2 * 4  # words + 4 per message
    vec = textgen.embedding("x", 32)
    assert math.isclose(math.fsum(v * v for v in vec), 1.0, rel_tol=1e-5)


# --- models, health, version ----------------------------------------------------------


def test_models_list(oai: openai.OpenAI) -> None:
    models = oai.models.list().data
    assert [m.id for m in models] == [MODEL, ALIAS]
    card = models[0].model_dump()
    assert card["object"] == "model"
    assert card["owned_by"] == "vllm"
    assert card["root"] == MODEL
    assert card["parent"] is None
    assert card["max_model_len"] == 4096
    assert card["permission"][0]["object"] == "model_permission"


def test_health_version_and_unknown_route(http: httpx.Client) -> None:
    r = http.get("/health")
    assert r.status_code == 200 and r.content == b""
    assert http.get("/version").json() == {"version": "0.11.0"}
    r = http.get("/v1/nope")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405


# --- chat -----------------------------------------------------------------------------


def test_chat_non_stream_shape(oai: openai.OpenAI, http: httpx.Client) -> None:
    resp = oai.chat.completions.create(model=ALIAS, messages=MESSAGES)
    choice = resp.choices[0]
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == MODEL  # the served name, not the alias asked for
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == textgen.generate_text(textgen.chat_prompt(MESSAGES)[0], 16)
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (17, 16)
    assert resp.usage.total_tokens == 33

    raw = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES}).json()
    c0 = raw["choices"][0]
    assert c0["message"]["tool_calls"] == [] and c0["logprobs"] is None
    assert c0["stop_reason"] is None and raw["prompt_logprobs"] is None
    assert c0["message"]["content"] == choice.message.content  # same prompt, same text


def test_max_tokens_cuts_with_length(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 4
    full = oai.chat.completions.create(model=MODEL, messages=MESSAGES)
    short = resp.choices[0].message.content or "-"
    assert (full.choices[0].message.content or "").startswith(short)
    mct = oai.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=50, max_completion_tokens=3
    )
    assert mct.usage is not None and mct.usage.completion_tokens == 3


def test_stream_concatenation_equals_non_stream(oai: openai.OpenAI) -> None:
    full = oai.chat.completions.create(model=MODEL, messages=MESSAGES)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert len(chunks) == 1 + 16  # role chunk + one per token (the last carries finish_reason)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id}


def test_stream_usage_semantics(http: httpx.Client) -> None:
    base = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 3}
    plain = sse_data(http, base)
    assert plain[-1] == "[DONE]"
    events = [json.loads(d) for d in plain[:-1]]
    assert len(events) == 4 and all("usage" not in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"

    for options in ({"include_usage": True}, {}):  # vLLM: {} means include_usage=true
        data = sse_data(http, {**base, "stream_options": options})
        assert data[-1] == "[DONE]"
        usage_chunk = json.loads(data[-2])
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"] == {
            "prompt_tokens": 17,
            "total_tokens": 20,
            "completion_tokens": 3,
        }
        assert all("usage" not in json.loads(d) for d in data[:-2])

    off = sse_data(http, {**base, "stream_options": {"include_usage": False}})
    assert all(json.loads(d)["choices"] for d in off[:-1])

    cont = sse_data(
        http, {**base, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    )
    events = [json.loads(d) for d in cont[:-1]]
    assert [e["usage"]["completion_tokens"] for e in events] == [0, 1, 2, 3, 3]


def test_stream_with_sdk_include_usage(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_options_without_stream_is_400(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream_options={"include_usage": True}
        )
    body: Any = err.value.body
    assert body["message"] == "Stream options can only be defined when `stream=True`."
    assert body["type"] == "BadRequestError" and body["code"] == 400
    assert body["param"] == "stream_options"


def test_unknown_model_is_404(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="nope", messages=MESSAGES)
    body: Any = err.value.body
    assert body == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


def test_validation_errors(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"model": MODEL})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "Bad Request" and err["code"] == 400
    assert err["param"] == "body.messages" and "Field required" in err["message"]

    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["type"] == "Bad Request"

    r = http.post(
        "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "Bad Request"

    r = http.post("/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "Unsupported Media Type" in r.json()["error"]["message"]

    parts = [{"role": "user", "content": [{"type": "text", "text": "a b c"}]}]
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": parts})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3 + 4

    r = http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5000}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (403, openai.PermissionDeniedError),
        (404, openai.NotFoundError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
def test_injected_errors(oai: openai.OpenAI, status: int, exc: type[Exception]) -> None:
    with pytest.raises(exc) as err:
        oai.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"x-sim-error": str(status)}
        )
    assert isinstance(err.value, openai.APIStatusError)
    assert err.value.status_code == status
    body: Any = err.value.body
    assert body["code"] == status
    expected_type = {
        400: "BadRequestError",
        401: "AuthenticationError",
        403: "PermissionDeniedError",
        404: "NotFoundError",
        429: "RateLimitError",
    }.get(status, "InternalServerError")
    assert body["type"] == expected_type
    if status == 503:
        assert body["message"] == "The server is overloaded or not ready yet."


def test_error_after_in_stream(oai: openai.OpenAI, http: httpx.Client) -> None:
    got = []
    with pytest.raises(openai.APIError) as err:
        for chunk in oai.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, extra_headers={"x-sim-error-after": "3"}
        ):
            got.append(chunk.choices[0].delta.content)
    assert not isinstance(err.value, openai.APIStatusError)  # HTTP status was 200
    assert got[1:] == list(textgen.generate_tokens(textgen.chat_prompt(MESSAGES)[0], 3))

    with pytest.raises(openai.InternalServerError):  # non-stream: a 500 after generating
        oai.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"x-sim-error-after": "3"}
        )

    data = sse_data(
        http, {"model": MODEL, "messages": MESSAGES, "stream": True}, **{"x-sim-error-after": "2"}
    )
    assert len(data) == 1 + 2 + 2
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2]) == {
        "error": {
            "message": "The request failed during generation (x-sim-error-after).",
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
    }


def test_request_id_echo(oai: openai.OpenAI, http: httpx.Client) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, extra_headers={"X-Request-ID": "req-123"}
    )
    assert raw.headers["x-request-id"] == "req-123"
    assert raw.parse().id == "chatcmpl-req-123"
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
    generated = r.headers["x-request-id"]
    assert len(generated) == 32 and r.json()["id"] == f"chatcmpl-{generated}"
    data = sse_data(
        http, {"model": MODEL, "messages": MESSAGES, "stream": True}, **{"x-request-id": "s-1"}
    )
    assert json.loads(data[0])["id"] == "chatcmpl-s-1"


def test_header_knobs(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": MESSAGES}
    r = http.post("/v1/chat/completions", json=body, headers={"x-sim-output-tokens": "5"})
    assert r.json()["usage"]["completion_tokens"] == 5
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    t0 = time.perf_counter()
    r = http.post(
        "/v1/chat/completions",
        json={**body, "max_tokens": 3},
        headers={"x-sim-ttft-ms": "100", "x-sim-itl-ms": "20"},
    )
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200 and 0.15 <= elapsed < 1.5  # 100 + 3 * 20 ms
    r = http.post("/v1/chat/completions", json=body, headers={"x-sim-itl-ms": "fast"})
    assert r.status_code == 400


def test_stream_pacing(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 4}
    stamps = []
    headers = {"x-sim-ttft-ms": "150", "x-sim-itl-ms": "60"}
    t0 = time.perf_counter()
    with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                stamps.append(time.perf_counter() - t0)
    assert len(stamps) == 1 + 4 + 1
    assert stamps[0] >= 0.14  # nothing before the first token
    assert all(a <= b for a, b in itertools.pairwise(stamps))
    # each token is flushed as it is made (a buffered stream would arrive all at once)
    assert stamps[4] - stamps[1] >= 0.15, stamps


def test_client_disconnect_mid_stream(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 50}
    headers = {"x-sim-itl-ms": "100"}
    with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        lines = resp.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert http.get("/sim/config").json()["running"] == 1
    deadline = time.monotonic() + 3
    while http.get("/sim/config").json()["running"] != 0:
        assert time.monotonic() < deadline, "slot not released after disconnect"
        time.sleep(0.05)
    assert metric(http.get("/metrics").text, "vllm:request_success_total", finished_reason="abort")


# --- completions ------------------------------------------------------------------------


def test_completions(oai: openai.OpenAI, http: httpx.Client) -> None:
    resp = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.choices[0].text == textgen.generate_text("Once upon a time", 6)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.prompt_tokens == 4
    default = oai.completions.create(model=MODEL, prompt="Once upon a time")
    assert default.usage is not None and default.usage.completion_tokens == 16

    stream = oai.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == resp.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6

    multi = oai.completions.create(model=MODEL, prompt=["a b", "c d e"], max_tokens=2)
    assert [c.index for c in multi.choices] == [0, 1]
    assert multi.usage is not None and multi.usage.prompt_tokens == 5
    ids = http.post(
        "/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}
    ).json()
    assert ids["usage"]["prompt_tokens"] == 3
    r = http.post("/v1/completions", json={"model": MODEL})
    assert r.status_code == 400


# --- n: several choices per request ------------------------------------------------------

CONTINUOUS = {"include_usage": True, "continuous_usage_stats": True}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def test_chat_n_choices(oai: openai.OpenAI, http: httpx.Client) -> None:
    one = oai.chat.completions.create(model=MODEL, messages=MESSAGES)
    before = http.get("/metrics").text
    resp = oai.chat.completions.create(model=MODEL, messages=MESSAGES, n=3)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    texts = [c.message.content or "" for c in resp.choices]
    assert len(set(texts)) == 3  # each choice generates its own text
    assert texts[0] == one.choices[0].message.content  # choice 0 is the n=1 answer
    assert all(len(t.split()) == 16 for t in texts)
    assert all(c.finish_reason == "stop" for c in resp.choices)
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (17, 3 * 16)  # prompt once
    assert resp.usage.total_tokens == 17 + 48
    again = oai.chat.completions.create(model=MODEL, messages=MESSAGES, n=3)
    assert [c.message.content for c in again.choices] == texts  # deterministic
    after = http.get("/metrics").text
    gen = "vllm:generation_tokens_total"
    assert metric(after, gen) == metric(before, gen) + 2 * 48  # every choice's tokens count

    short = oai.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=4)
    assert [c.finish_reason for c in short.choices] == ["length", "length"]
    prefixes = [" " + " ".join(t.split()[:4]) for t in texts[:2]]
    assert [c.message.content for c in short.choices] == prefixes  # each choice cut at 4
    assert short.usage is not None and short.usage.completion_tokens == 8


def test_completions_n_with_prompt_list(oai: openai.OpenAI, http: httpx.Client) -> None:
    resp = oai.completions.create(model=MODEL, prompt=["a b", "c d e"], n=2, max_tokens=3)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]  # prompt_index * n + j
    texts = [c.text for c in resp.choices]
    assert texts[0] == textgen.generate_text("a b", 3)  # each prompt's choice 0 is its n=1 text
    assert texts[2] == textgen.generate_text("c d e", 3)
    assert len(set(texts)) == 4
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (2 + 3, 4 * 3)

    body = {"model": MODEL, "prompt": ["a b", "c d e"], "n": 2, "max_tokens": 3}
    data = sse_data(
        http, {**body, "stream": True, "stream_options": CONTINUOUS}, path="/v1/completions"
    )
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    chunks, final = events[:-1], events[-1]
    assert all(len(e["choices"]) == 1 for e in chunks)
    assert [e["choices"][0]["index"] for e in chunks] == [0, 1, 2, 3] * 3
    usage = [(e["usage"]["prompt_tokens"], e["usage"]["completion_tokens"]) for e in chunks]
    assert usage == [(2, k) if i < 2 else (3, k) for k in (1, 2, 3) for i in range(4)]
    for i, text in enumerate(texts):
        assert (
            "".join(e["choices"][0]["text"] for e in chunks if e["choices"][0]["index"] == i)
            == text
        )
    assert final["choices"] == []
    assert final["usage"] == {"prompt_tokens": 5, "total_tokens": 17, "completion_tokens": 12}


def test_chat_stream_n_continuous_usage(http: httpx.Client) -> None:
    base = {"model": MODEL, "messages": MESSAGES, "n": 2, "max_tokens": 3}
    full = http.post("/v1/chat/completions", json=base).json()
    data = sse_data(http, {**base, "stream": True, "stream_options": CONTINUOUS})
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert len(events) == 2 + 2 * 3 + 1
    roles, tokens, final = events[:2], events[2:-1], events[-1]
    for i, event in enumerate(roles):  # one role chunk per choice, before any token
        assert event["choices"] == [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
        assert event["usage"] == {"prompt_tokens": 17, "total_tokens": 17, "completion_tokens": 0}
    assert all(len(e["choices"]) == 1 for e in tokens)  # one choice per chunk, interleaved
    assert [e["choices"][0]["index"] for e in tokens] == [0, 1, 0, 1, 0, 1]
    # vLLM's continuous usage is the choice's own running count, not the request's total
    assert [e["usage"]["completion_tokens"] for e in tokens] == [1, 1, 2, 2, 3, 3]
    assert all(e["usage"]["prompt_tokens"] == 17 for e in tokens)
    finishes = [(e["choices"][0]["index"], e["choices"][0]["finish_reason"]) for e in tokens]
    assert [f for f in finishes if f[1] is not None] == [(0, "length"), (1, "length")]
    assert finishes[-2:] == [(0, "length"), (1, "length")]  # each on its choice's last token
    for choice in full["choices"]:
        i = choice["index"]
        streamed = "".join(
            e["choices"][0]["delta"]["content"] for e in tokens if e["choices"][0]["index"] == i
        )
        assert streamed == choice["message"]["content"]
    assert final["choices"] == []
    assert final["usage"] == {"prompt_tokens": 17, "total_tokens": 23, "completion_tokens": 6}
    assert full["usage"]["completion_tokens"] == 6 and full["usage"]["prompt_tokens"] == 17


def test_chat_stream_n_error_after_and_tools(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "n": 2, "stream": True}
    data = sse_data(http, body, **{"x-sim-error-after": "2"})
    assert data[-1] == "[DONE]" and "error" in json.loads(data[-2])
    tokens = [json.loads(d) for d in data[2:-2]]  # after the two role chunks
    assert [e["choices"][0]["index"] for e in tokens] == [0, 1, 0, 1]  # 2 steps of each choice
    assert all(e["choices"][0]["finish_reason"] is None for e in tokens)

    calls = http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "n": 2, "tools": TOOLS}
    ).json()["choices"]
    assert [c["finish_reason"] for c in calls] == ["tool_calls", "tool_calls"]
    fns = [c["message"]["tool_calls"][0] for c in calls]
    assert fns[0]["function"] == fns[1]["function"]  # the same call in every choice
    assert fns[0]["function"]["name"] == "get_weather"
    assert fns[0]["id"] != fns[1]["id"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_n_validation(http: httpx.Client, path: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 2}
    body.update({"messages": MESSAGES} if "chat" in path else {"prompt": "a b"})
    r = http.post(path, json={**body, "n": 0})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "n must be at least 1, got 0.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
    for bad in (1.5, "two", True):
        r = http.post(path, json={**body, "n": bad})
        assert r.status_code == 400, bad
        err = r.json()["error"]
        assert err["type"] == "Bad Request" and err["param"] == "body.n"
        assert "valid integer" in err["message"]
    r = http.post(path, json={**body, "n": 2, "temperature": 0})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "n must be 1 when using greedy sampling, got 2."
    for ok, count in ((None, 1), (1, 1), (2.0, 2)):
        r = http.post(path, json={**body, "n": ok})
        assert r.status_code == 200 and len(r.json()["choices"]) == count, ok
    assert http.post(path, json={**body, "n": 1, "temperature": 0}).status_code == 200


# --- embeddings -------------------------------------------------------------------------


def test_embeddings_float_and_base64(oai: openai.OpenAI, http: httpx.Client) -> None:
    inputs = ["first text", "second text here"]
    floats = oai.embeddings.create(model=MODEL, input=inputs, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    assert floats.usage.prompt_tokens == 5
    raw = http.post(
        "/v1/embeddings", json={"model": MODEL, "input": inputs, "encoding_format": "base64"}
    ).json()
    assert raw["object"] == "list" and raw["id"].startswith("embd-")
    for item, ref in zip(raw["data"], floats.data, strict=True):
        decoded = struct.unpack(f"<{DIM}f", base64.b64decode(item["embedding"]))
        assert list(decoded) == ref.embedding
        assert math.isclose(math.fsum(v * v for v in decoded), 1.0, rel_tol=1e-5)
    assert floats.data[0].embedding != floats.data[1].embedding
    again = oai.embeddings.create(model=MODEL, input="first text", encoding_format="float")
    assert again.data[0].embedding == floats.data[0].embedding

    short = oai.embeddings.create(model=MODEL, input="first text", dimensions=16)
    vec = short.data[0].embedding
    assert len(vec) == 16
    assert math.isclose(math.fsum(v * v for v in vec), 1.0, rel_tol=1e-5)

    tokens = http.post("/v1/embeddings", json={"model": MODEL, "input": [[1, 2], [3]]}).json()
    assert len(tokens["data"]) == 2 and tokens["usage"]["prompt_tokens"] == 3
    r = http.post("/v1/embeddings", json={"model": MODEL, "input": "x", "dimensions": DIM + 1})
    assert r.status_code == 400
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="nope", input="x")


# --- metrics, recording, transport -------------------------------------------------------


def test_metrics(oai: openai.OpenAI, http: httpx.Client) -> None:
    before = http.get("/metrics").text
    oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    r = http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
    ):
        assert f"{name}{{" in text, name
    assert f'model_name="{MODEL}"' in text
    gen = "vllm:generation_tokens_total"
    assert metric(text, gen) == metric(before, gen) + 2
    ttft = "vllm:time_to_first_token_seconds_count"
    assert metric(text, ttft) == metric(before, ttft) + 1
    length = metric(text, "vllm:request_success_total", finished_reason="length")
    assert length >= 1


def test_sim_requests_records_bodies(oai: openai.OpenAI, http: httpx.Client) -> None:
    assert http.delete("/sim/requests").status_code == 200
    assert http.get("/sim/requests").json() == []
    oai.chat.completions.create(
        model=ALIAS,
        messages=MESSAGES,
        extra_headers={"X-Request-Id": "rec-1"},
        extra_body={"custom_field": 7},
    )
    http.get("/health")  # probes are not recorded
    records = http.get("/sim/requests").json()
    assert len(records) == 1
    rec = records[0]
    assert (rec["method"], rec["path"]) == ("POST", "/v1/chat/completions")
    assert rec["body"]["model"] == ALIAS and rec["body"]["custom_field"] == 7
    assert rec["body"]["messages"] == MESSAGES
    assert rec["headers"]["x-request-id"] == "rec-1"
    assert rec["headers"]["authorization"] == "Bearer x"


def test_chunked_request_body_and_keep_alive(sim: SimulatorProcess) -> None:
    payload = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 2}).encode()

    def body() -> Iterator[bytes]:
        yield payload[:10]
        yield payload[10:]

    with httpx.Client(base_url=sim.url) as client:
        r = client.post(
            "/v1/chat/completions", content=body(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2

    # two requests written back to back on one connection are answered in order
    req = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(payload), payload)
    )
    with socket.create_connection(("127.0.0.1", sim.port), timeout=5) as s:
        s.sendall(req + req + b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 3


def test_runtime_config(http: httpx.Client, oai: openai.OpenAI) -> None:
    r = http.post("/sim/config", json={"error_status": 503, "error_count": 1})
    assert r.status_code == 200 and r.json()["error_status"] == 503
    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(model=MODEL, messages=MESSAGES)
    oai.chat.completions.create(model=MODEL, messages=MESSAGES)  # only the next one failed
    assert http.post("/sim/config", json={"bogus": 1}).status_code == 400
    http.post("/sim/config", json={"health_status": 503})
    assert http.get("/health").status_code == 503
    http.post("/sim/config", json={"health_status": 200})
    assert http.get("/health").status_code == 200


# --- admission ----------------------------------------------------------------------------


def test_queue_full_is_429_then_queueing(tight: SimulatorProcess) -> None:
    oai = openai.OpenAI(base_url=tight.base_url, api_key="x", max_retries=0, timeout=10)
    slow = {"x-sim-ttft-ms": "800"}
    results: list[Any] = []

    def call() -> None:
        try:
            results.append(
                oai.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers=slow)
            )
        except Exception as exc:
            results.append(exc)

    with httpx.Client(base_url=tight.url, timeout=10) as http:

        def wait_for(key: str, value: int) -> None:
            deadline = time.monotonic() + 3
            while http.get("/sim/config").json()[key] != value:
                assert time.monotonic() < deadline, f"{key} never reached {value}"
                time.sleep(0.02)

        first = threading.Thread(target=call)
        first.start()
        wait_for("running", 1)
        with pytest.raises(openai.RateLimitError) as err:
            oai.chat.completions.create(model=MODEL, messages=MESSAGES)
        body: Any = err.value.body
        assert body["type"] == "RateLimitError" and body["code"] == 429 and body["param"] is None
        first.join()
        assert not isinstance(results[0], Exception)

        # with one queue slot the second request waits instead, and both succeed
        http.post("/sim/config", json={"max_queue": 1})
        threads = [threading.Thread(target=call) for _ in range(2)]
        threads[0].start()
        wait_for("running", 1)
        threads[1].start()
        wait_for("waiting", 1)
        assert metric(http.get("/metrics").text, "vllm:num_requests_waiting") == 1
        for t in threads:
            t.join()
        assert all(not isinstance(r, Exception) for r in results[1:]), results


def test_in_process_server_thread_and_idle_timeout() -> None:
    app = build_app(VllmConfig(models=["thread-model"], output_tokens=3, keep_alive_timeout=0.3))
    with ServerThread(app) as srv:
        oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        resp = oai.chat.completions.create(model="thread-model", messages=MESSAGES)
        assert resp.usage is not None and resp.usage.completion_tokens == 3

        payload = json.dumps({"messages": MESSAGES, "stream": True}).encode()
        req = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-sim-itl-ms: 200\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
            % (len(payload), payload)
        )
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(req)  # a stream longer than the idle timeout is not cut
            data = b""
            while not data.endswith(b"0\r\n\r\n"):
                chunk = s.recv(65536)
                assert chunk, "connection closed mid-stream"
                data += chunk
            assert b"data: [DONE]" in data
            time.sleep(0.7)  # then the idle keep-alive connection is closed, like uvicorn's
            assert s.recv(1) == b""
