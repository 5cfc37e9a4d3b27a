"""The TGI simulator (backends/tgi.py), driven over real HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from backends import textgen
from backends.http import ServerThread
from backends.process import SimulatorProcess
from backends.tgi import TgiConfig, build_app

MODEL = "tgi-model"
PROMPT = "Tell me about rivers and stones"
MESSAGES = [{"role": "user", "content": PROMPT}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    }
]


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    app = build_app(TgiConfig(models=[MODEL], output_tokens=8, max_total_tokens=512))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def tight() -> Iterator[httpx.Client]:
    """One request in flight at most: the second concurrent one is overloaded."""
    app = build_app(TgiConfig(models=[MODEL], output_tokens=4, max_concurrent_requests=1))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=10) as client:
        yield client


def events(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, asserting TGI 3.x's ``data:`` framing."""
    out = []
    for frame in text.split("\n\n"):
        if not frame:
            continue
        assert frame.startswith("data:") and not frame.startswith("data: "), frame
        out.append(frame[len("data:") :])
    return out


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


# --- native API -------------------------------------------------------------------------


def test_generate_body_details_and_headers(http: httpx.Client) -> None:
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 20}})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body == {"generated_text": textgen.generate_text(PROMPT, 8)}  # no details key
    assert r.headers["x-prompt-tokens"] == str(textgen.count_tokens(PROMPT))
    assert r.headers["x-generated-tokens"] == "9"  # 8 words + the EOS token
    for h in (
        "x-compute-type",
        "x-compute-time",
        "x-compute-characters",
        "x-total-time",
        "x-validation-time",
        "x-queue-time",
        "x-inference-time",
        "x-time-per-token",
    ):
        assert h in r.headers
    assert r.headers["x-compute-characters"] == str(len(PROMPT))
    assert "server" not in r.headers  # axum sends none

    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"details": True}})
    details = r.json()["details"]
    assert details["finish_reason"] == "eos_token" and details["generated_tokens"] == 9
    assert details["prefill"] == [] and details["seed"] is None  # greedy: no seed
    last = details["tokens"][-1]
    assert last["special"] is True and last["text"] == "</s>"
    assert "</s>" not in r.json()["generated_text"]
    assert "top_tokens" not in details and "best_of_sequences" not in details

    r = http.post(
        "/generate",
        json={
            "inputs": PROMPT,
            "parameters": {"details": True, "top_n_tokens": 3, "seed": 7, "do_sample": True},
        },
    )
    details = r.json()["details"]
    assert details["seed"] == 7 and len(details["top_tokens"][0]) == 3


def test_generate_length_and_stop_sequence(http: httpx.Client) -> None:
    r = http.post(
        "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "details": True}}
    )
    assert r.json()["details"]["finish_reason"] == "length"
    assert r.json()["generated_text"] == textgen.generate_text(PROMPT, 3)
    third = textgen.generate_tokens(PROMPT, 8)[2]
    r = http.post(
        "/generate", json={"inputs": PROMPT, "parameters": {"stop": [third], "details": True}}
    )
    details = r.json()["details"]
    assert details["finish_reason"] == "stop_sequence" and details["generated_tokens"] <= 3
    assert r.json()["generated_text"].endswith(third)


def test_generate_stream_events(http: httpx.Client) -> None:
    r = http.post("/generate_stream", json={"inputs": PROMPT, "parameters": {"details": True}})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["x-accel-buffering"] == "no"
    assert "[DONE]" not in r.text  # TGI's native stream has no terminator
    evs = [json.loads(e) for e in events(r.text)]
    assert [e["index"] for e in evs] == list(range(1, 10))
    assert all(e["generated_text"] is None and e["details"] is None for e in evs[:-1])
    last = evs[-1]
    assert last["token"]["special"] is True
    assert last["details"] == {
        "finish_reason": "eos_token",
        "generated_tokens": 9,
        "seed": None,
        "input_length": textgen.count_tokens(PROMPT),
    }
    text = "".join(e["token"]["text"] for e in evs if not e["token"]["special"])
    assert text == last["generated_text"] == textgen.generate_text(PROMPT, 8)
    # without details the last event says so
    r = http.post("/generate_stream", json={"inputs": PROMPT})
    assert json.loads(events(r.text)[-1])["details"] is None


def test_compat_route_answers_a_list(http: httpx.Client) -> None:
    r = http.post("/", json={"inputs": "hi there", "parameters": {"max_new_tokens": 2}})
    body = r.json()
    assert isinstance(body, list) and body[0]["generated_text"].startswith("hi there")


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_p": 0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"temperature": 0}, "`temperature` must be strictly positive"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        (
            {"max_new_tokens": 510},
            "`inputs` tokens + `max_new_tokens` must be <= 512. Given: 6 `inputs` tokens and "
            "510 `max_new_tokens`",
        ),
    ],
)
def test_validation_errors(http: httpx.Client, parameters: dict[str, Any], message: str) -> None:
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": parameters})
    assert r.status_code == 422
    assert r.json() == {"error": f"Input validation error: {message}", "error_type": "validation"}


def test_empty_inputs_and_axum_rejections(http: httpx.Client) -> None:
    r = http.post("/generate", json={"inputs": ""})
    assert r.status_code == 422
    assert r.json()["error"] == "Input validation error: `inputs` cannot be empty"
    # a string `stop` never reaches TGI: axum's deserializer rejects it in plain text
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"stop": "\n"}})
    assert r.status_code == 422 and r.headers["content-type"].startswith("text/plain")
    assert r.text.startswith(
        "Failed to deserialize the JSON body into the target type: parameters.stop: "
        'invalid type: string "\n", expected a sequence at line 1 column'
    )
    r = http.post("/generate", json={"parameters": {}})
    assert r.status_code == 422 and "missing field `inputs`" in r.text
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": -1}})
    assert r.status_code == 422 and "invalid value: integer `-1`, expected u32" in r.text
    r = http.post("/generate", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.text.startswith("Failed to parse the request body as JSON")
    r = http.post("/generate", content=b'{"inputs": "x"}')
    assert r.status_code == 415
    assert r.text == "Expected request with `Content-Type: application/json`"


def test_stream_validation_error_is_in_band(http: httpx.Client) -> None:
    r = http.post("/generate_stream", json={"inputs": PROMPT, "parameters": {"top_p": 1.0}})
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    assert [json.loads(e) for e in events(r.text)] == [
        {
            "error": "Input validation error: `top_p` must be > 0.0 and < 1.0",
            "error_type": "validation",
        }
    ]


def test_overload_429_and_in_band(tight: httpx.Client) -> None:
    slow = threading.Thread(
        target=tight.post,
        args=("/generate",),
        kwargs={"json": {"inputs": "slow one"}, "headers": {"x-sim-ttft-ms": "600"}},
    )
    slow.start()
    deadline = time.monotonic() + 3
    while tight.get("/sim/config").json()["running"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r = tight.post("/generate", json={"inputs": PROMPT})
    assert r.status_code == 429
    assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    # the permit is taken before validation, so overload wins over a bad parameter
    r = tight.post("/generate", json={"inputs": PROMPT, "parameters": {"top_p": 1.0}})
    assert r.status_code == 429
    r = tight.post("/generate_stream", json={"inputs": PROMPT})
    assert r.status_code == 200
    assert [json.loads(e) for e in events(r.text)] == [
        {"error": "Model is overloaded", "error_type": "overloaded"}
    ]
    r = tight.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True})
    assert r.status_code == 200
    assert events(r.text) == [
        '{"error":{"message":"Model is overloaded","http_status_code":422}}',
        "[DONE]",
    ]
    assert metric(tight.get("/metrics").text, "tgi_batch_current_size") == 1
    slow.join()
    assert tight.post("/generate", json={"inputs": PROMPT}).status_code == 200


# --- Messages API ----------------------------------------------------------------------


def test_chat_non_stream_quirks(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"model": "my-adapter", "messages": MESSAGES})
    assert r.status_code == 200
    body = r.json()
    assert body["id"] == "" and body["object"] == "chat.completion"
    assert body["model"] == "my-adapter"  # echoed, not validated
    assert body["system_fingerprint"] == "3.3.6-dev0-native"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"  # eos_token mapped
    assert choice["message"] == {"role": "assistant", "content": choice["message"]["content"]}
    usage = body["usage"]
    assert usage["completion_tokens"] == 9 and usage["total_tokens"] == usage["prompt_tokens"] + 9
    assert int(r.headers["x-prompt-tokens"]) == usage["prompt_tokens"]

    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["model"] == MODEL
    first = r.json()["choices"][0]["message"]["content"].split()[0]
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "stop": [" " + first]})
    assert r.json()["choices"][0]["finish_reason"] == "stop_sequence"  # passes through


def test_chat_stream_quirks(http: httpx.Client) -> None:
    body = {
        "model": "m",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    data = events(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    content, usage = chunks[:-1], chunks[-1]
    for c in content:
        assert c["id"] == "" and c["object"] == "chat.completion.chunk" and c["model"] == "m"
        assert c["usage"] is None and c["choices"][0]["logprobs"] is None
        assert c["choices"][0]["delta"]["role"] == "assistant"  # on every chunk
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    assert content[-1]["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 9
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    plain = http.post("/v1/chat/completions", json={"messages": MESSAGES}).json()
    assert text == plain["choices"][0]["message"]["content"]
    # without include_usage: no usage chunk
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True})
    data = events(r.text)
    assert all(json.loads(d)["choices"] for d in data[:-1])


def test_chat_openai_fields_tgi_rejects(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "top_p": 1.0})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "stop": "\n"})
    assert r.status_code == 422 and r.headers["content-type"].startswith("text/plain")
    assert "stop: invalid type: string" in r.text
    r = http.post(
        "/v1/chat/completions", json={"messages": MESSAGES, "logit_bias": {"50256": -100}}
    )
    assert r.status_code == 422 and "logit_bias: invalid type: map, expected a sequence" in r.text
    # presence_penalty becomes repetition_penalty = pp + 2: -2 gives 0, which is invalid
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "presence_penalty": -2})
    assert r.json()["error"] == (
        "Input validation error: `repetition_penalty` must be strictly positive"
    )
    r = http.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "response_format": {"type": "text"}},
    )
    assert r.status_code == 422 and "unknown variant `text`" in r.text
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0})
    assert r.status_code == 200  # greedy, not an error
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True, "top_p": 1.0})
    assert r.status_code == 200
    assert events(r.text) == [
        '{"error":{"message":"Input validation error: `top_p` must be > 0.0 and < 1.0",'
        '"http_status_code":422}}',
        "[DONE]",
    ]


def test_chat_tool_calls(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"  # not tool_calls
    message = choice["message"]
    assert "content" not in message
    (call,) = message["tool_calls"]
    assert call["id"] == "0" and call["type"] == "function"
    assert call["function"]["description"] is None and call["function"]["name"] == "get_weather"
    args = json.loads(call["function"]["arguments"])
    assert set(args) == {"city", "days"} and isinstance(args["days"], int)

    r = http.post(
        "/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS, "stream": True}
    )
    chunks = [json.loads(d) for d in events(r.text)[:-1]]
    deltas = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks]
    assert deltas[0]["function"]["name"] == "get_weather"
    assert all(d["function"]["name"] is None for d in deltas[1:])
    assert all(d["index"] == 0 and d["type"] == "function" for d in deltas)
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == args
    r = http.post(
        "/v1/chat/completions",
        json={
            "messages": MESSAGES,
            "tools": TOOLS,
            "response_format": {"type": "json", "value": {}},
        },
    )
    assert r.status_code == 422 and r.json()["error_type"] == "tool_error"


# --- /v1/completions, knobs, info -------------------------------------------------------


def test_completions(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": ["a b", "c"], "max_tokens": 20})
    body = r.json()
    assert body["id"] == "" and body["object"] == "text_completion"
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "stop"]
    r = http.post("/v1/completions", json={"prompt": "a b", "max_tokens": 20, "stream": True})
    data = events(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["choices"][0]["finish_reason"] == "" for c in chunks[:-1])
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "eos_token"  # raw, unlike non-stream
    assert final["choices"][0]["text"] == "</s>" and final["usage"]["completion_tokens"] == 9
    r = http.post("/v1/completions", json={"prompt": "a", "suffix": "b"})
    assert r.status_code == 422 and r.json()["error_type"] == "suffix not supported"


def test_error_injection(http: httpx.Client) -> None:
    r = http.post("/generate_stream", json={"inputs": PROMPT}, headers={"x-sim-error-after": "2"})
    evs = [json.loads(e) for e in events(r.text)]
    assert r.status_code == 200 and len(evs) == 3
    assert evs[2]["error_type"] == "generation"
    assert evs[2]["error"].startswith("Request failed during generation: ")
    r = http.post("/generate", json={"inputs": PROMPT}, headers={"x-sim-error-after": "2"})
    assert r.status_code == 424 and r.json()["error_type"] == "generation"
    r = http.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "stream": True},
        headers={"x-sim-error-after": "1"},
    )
    data = events(r.text)
    assert len(data) == 3 and data[-1] == "[DONE]"
    assert json.loads(data[1])["error"]["http_status_code"] == 422
    r = http.post("/generate", json={"inputs": PROMPT}, headers={"x-sim-error": "429"})
    assert r.status_code == 429 and r.json()["error_type"] == "overloaded"
    r = http.post("/generate_stream", json={"inputs": PROMPT}, headers={"x-sim-error": "429"})
    assert r.status_code == 200 and json.loads(events(r.text)[0])["error_type"] == "overloaded"
    r = http.post("/generate_stream", json={"inputs": PROMPT}, headers={"x-sim-error": "503"})
    assert r.status_code == 503  # not one TGI sends in-band
    r = http.post(
        "/generate",
        json={"inputs": PROMPT},
        headers={"x-sim-ttft-ms": "120", "x-sim-output-tokens": "2"},
    )
    assert r.json()["generated_text"] == textgen.generate_text(PROMPT, 2)
    assert int(r.headers["x-inference-time"]) >= 100


def test_info_health_models_metrics_and_records(http: httpx.Client) -> None:
    info = http.get("/info").json()
    assert info["model_id"] == MODEL and info["router"] == "text-generation-router"
    assert info["max_total_tokens"] == 512 and info["max_input_tokens"] == 511
    assert info["max_concurrent_requests"] == 128 and info["version"] == "3.3.6-dev0"
    r = http.get("/health")
    assert r.status_code == 200 and r.content == b""
    assert http.get("/v1/models").json()["data"] == [
        {"id": MODEL, "object": "model", "created": 0, "owned_by": MODEL}
    ]
    text = http.get("/metrics").text
    for name in (
        "tgi_request_count",
        "tgi_request_success",
        "tgi_queue_size",
        "tgi_batch_current_size",
        "tgi_request_duration_count",
        "tgi_request_generated_tokens_count",
    ):
        assert metric(text, name) >= 0
    assert 'tgi_request_failure{err="validation"}' in text

    http.delete("/sim/requests")
    http.post("/generate", json={"inputs": "x y", "custom": 1}, headers={"x-trace": "t1"})
    (rec,) = http.get("/sim/requests").json()
    assert (rec["method"], rec["path"]) == ("POST", "/generate")
    assert rec["body"] == {"inputs": "x y", "custom": 1} and rec["headers"]["x-trace"] == "t1"
    http.post("/sim/config", json={"health_status": 503})
    r = http.get("/health")
    assert r.status_code == 503
    assert r.json() == {"error": "unhealthy", "error_type": "healthcheck"}
    http.post("/sim/config", json={"health_status": 200})


def test_cli_with_supervisor_flags_and_api_key() -> None:
    args = ["--model", "a", "--model", "b", "--ttft-ms", "1", "--itl-ms", "0"]
    args += ["--output-tokens", "3", "--max-running", "4", "--max-queue", "4"]
    args += ["--api-key", "k", "--sse-space"]
    with SimulatorProcess(args, kind="tgi") as sim, httpx.Client(base_url=sim.url) as c:
        r = c.post("/generate", json={"inputs": "hello"})
        assert r.status_code == 401 and r.content == b""
        assert c.get("/info").json()["model_id"] == "a"  # info stays open
        auth = {"authorization": "Bearer k"}
        r = c.post("/generate", json={"inputs": "hello"}, headers=auth)
        assert r.status_code == 200 and r.headers["x-generated-tokens"] == "4"
        r = c.post("/generate_stream", json={"inputs": "hello"}, headers=auth)
        assert r.text.startswith("data: {")  # --sse-space: newer axum framing
