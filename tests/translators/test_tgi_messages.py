"""Golden tests for OpenAI <-> TGI's Messages API (/v1/chat/completions) quirk fixes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc.config import Model
from extproc.errors import GatewayError
from extproc.translators.tgi_messages import TgiMessages

from .helpers import events, feed, split_everywhere

MODEL = Model(id="llama-chat", backend="tgi", backend_model="meta-llama/Llama-3.1-8B-Instruct")
BACKEND_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def translator() -> TgiMessages:
    return TgiMessages(MODEL, "req1", created=1700000000)


def mapped(stream: bool = False, **fields: Any) -> tuple[TgiMessages, dict[str, Any]]:
    t = translator()
    body: dict[str, Any] = {
        "model": "llama-chat",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 64,
        **fields,
    }
    if stream:
        body["stream"] = True
    t.request("chat", body, stream)
    return t, body


# --------------------------------------------------------------------------------- request


def test_request_quirks() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    t, body = mapped(
        top_p=1.0,
        presence_penalty=0.5,
        stop="\n\n",
        logit_bias={"50256": -100},
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        user="alice",
        parallel_tool_calls=False,
        temperature=0.2,
        seed=3,
        stream_options={"include_usage": True},  # dropped: not a stream
    )
    assert body == {
        "model": BACKEND_MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 64,
        "stop": ["\n\n"],
        "response_format": {"type": "json_schema", "value": {"name": "city", "schema": schema}},
        "temperature": 0.2,
        "seed": 3,
    }
    assert t.dropped == ["presence_penalty", "logit_bias", "user"]
    assert t.backend_path("chat", "/v1/chat/completions") == "/v1/chat/completions"


def test_response_format_variants_and_max_completion_tokens() -> None:
    _, body = mapped(response_format={"type": "json_object"}, max_completion_tokens=9)
    assert body["response_format"] == {"type": "json", "value": {"type": "object"}}
    assert body["max_tokens"] == 9 and "max_completion_tokens" not in body
    _, body = mapped(response_format={"type": "text"}, top_p=0.5)
    assert "response_format" not in body and body["top_p"] == 0.5


def test_stream_request_keeps_stream_options_and_tools() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    t, body = mapped(
        stream=True, stream_options={"include_usage": True}, tools=tools, tool_choice="auto"
    )
    assert body == {
        "model": BACKEND_MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": tools,
        "tool_choice": "auto",
    }
    assert t.dropped == []


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 3}, "n"),
        ({"stop": list("abcde")}, "stop"),
        ({"response_format": 1}, "response_format"),
    ],
)
def test_rejected(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as exc:
        mapped(**fields)
    assert (exc.value.status, exc.value.param) == (400, param)


def test_completions_go_native() -> None:
    t = translator()
    body: dict[str, Any] = {"model": "llama-chat", "prompt": "Hi", "max_tokens": 5, "user": "u"}
    t.request("completions", body, False)
    assert body["inputs"] == "Hi" and body["parameters"]["max_new_tokens"] == 5
    assert t.backend_path("completions", "/v1/completions") == "/generate"
    assert t.dropped == ["user"]
    t.response_headers(200, {"x-prompt-tokens": "2"})
    t.wants_response_body(200, "application/json")
    out = orjson.loads(
        t.response_body(
            b'{"generated_text":"!","details":{"finish_reason":"length","generated_tokens":1}}',
            True,
        )
        or b""
    )
    assert out["choices"][0]["text"] == "!" and out["id"] == "cmpl-req1"
    assert t.usage == {"prompt_tokens": 2, "completion_tokens": 1}


# ------------------------------------------------------------------------ non-stream response


def respond(t: TgiMessages, body: dict[str, Any]) -> Any:
    t.response_headers(200, {})
    assert t.wants_response_body(200, "application/json")
    return orjson.loads(t.response_body(orjson.dumps(body), True) or b"")


def tgi_completion(message: dict[str, Any], finish: str) -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "id": "",
        "created": 1700000005,
        "model": BACKEND_MODEL,
        "system_fingerprint": "3.3.6-dev0-native",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
    }


def test_response_fixes() -> None:
    t, _ = mapped()
    out = respond(t, tgi_completion({"role": "assistant", "content": "Paris."}, "stop_sequence"))
    assert out == {
        "object": "chat.completion",
        "id": "chatcmpl-req1",
        "created": 1700000000,
        "model": "llama-chat",
        "system_fingerprint": "3.3.6-dev0-native",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Paris."},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
    }
    ChatCompletion.model_validate(out)
    assert t.usage == {"prompt_tokens": 10, "completion_tokens": 2}


def test_old_object_and_eos_token() -> None:
    t, _ = mapped()
    body = tgi_completion({"role": "assistant", "content": "x"}, "eos_token")
    body["object"] = "text_completion"
    out = respond(t, body)
    assert (out["object"], out["choices"][0]["finish_reason"]) == ("chat.completion", "stop")


def test_tool_calls_response() -> None:
    t, _ = mapped(tools=[{"type": "function", "function": {"name": "get_weather"}}])
    message = {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "0",
                "type": "function",
                "function": {
                    "description": None,
                    "name": "get_weather",
                    "arguments": '{"city":"Paris"}',
                },
            },
            {  # TGI 2.x: arguments as an object
                "id": "0",
                "type": "function",
                "function": {"description": None, "name": "get_time", "arguments": {"tz": "CET"}},
            },
        ],
    }
    out = respond(t, tgi_completion(message, "stop"))
    assert out["choices"][0] == {
        "index": 0,
        "message": {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_req1_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_req1_1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"tz":"CET"}'},
                },
            ],
        },
        "logprobs": None,
        "finish_reason": "tool_calls",
    }
    ChatCompletion.model_validate(out)


# ---------------------------------------------------------------------------------- stream


def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "object": "chat.completion.chunk",
        "id": "",
        "created": 1700000007,
        "model": BACKEND_MODEL,
        "system_fingerprint": "3.3.6-dev0-native",
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
        **extra,
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


STREAM = (
    chunk({"role": "assistant", "content": "Bon"})
    + b": keep-alive\n\n"
    + chunk({"role": "assistant", "content": "jour \u00e7a va"})
    + chunk({"role": "assistant", "content": ""}, "eos_token")
    + chunk(None, usage={"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13})
    + b"data: [DONE]\n\n"
)


def expected_chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> Any:
    body: dict[str, Any] = {
        "object": "chat.completion.chunk",
        "id": "chatcmpl-req1",
        "created": 1700000000,
        "model": "llama-chat",
        "system_fingerprint": "3.3.6-dev0-native",
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }
    return body


EXPECTED = [
    expected_chunk({"role": "assistant", "content": "Bon"}),
    expected_chunk({"content": "jour \u00e7a va"}),
    expected_chunk({"content": ""}, "stop"),
    expected_chunk(None, usage={"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}),
    "[DONE]",
]


def stream_translator(**fields: Any) -> TgiMessages:
    t, _ = mapped(stream=True, stream_options={"include_usage": True}, **fields)
    t.response_headers(200, {})
    assert t.wants_response_body(200, "text/event-stream")
    return t


def test_stream_fixes() -> None:
    t = stream_translator()
    out = feed(t, [STREAM])
    assert events(out) == EXPECTED
    for payload in events(out)[:-1]:
        ChatCompletionChunk.model_validate(payload)
    assert t.usage == {"prompt_tokens": 10, "completion_tokens": 3}


def test_stream_split_at_every_byte_offset() -> None:
    whole = feed(stream_translator(), [STREAM])
    for pieces in split_everywhere(STREAM):
        assert feed(stream_translator(), pieces) == whole


def test_stream_missing_done_is_added() -> None:
    t = stream_translator()
    out = events(feed(t, [STREAM[: STREAM.index(b"data: [DONE]")]]))
    assert out == EXPECTED


def test_stream_tool_calls() -> None:
    call = {"index": 0, "id": "", "type": "function"}
    stream = (
        chunk(
            {
                "role": "assistant",
                "tool_calls": [{**call, "function": {"name": "get_weather", "arguments": None}}],
            }
        )
        + chunk(
            {
                "role": "assistant",
                "tool_calls": [{**call, "function": {"name": None, "arguments": '{"city": '}}],
            }
        )
        + chunk(
            {
                "role": "assistant",
                "tool_calls": [{**call, "function": {"name": None, "arguments": '"Paris"}'}}],
            },
            "eos_token",
        )
        + b"data: [DONE]\n\n"
    )
    out = events(feed(stream_translator(), [stream]))
    assert [e["choices"][0] for e in out[:-1]] == [
        {
            "index": 0,
            "delta": {
                "role": "assistant",
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_req1_0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": None,
        },
        {
            "index": 0,
            "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
            "logprobs": None,
            "finish_reason": None,
        },
        {
            "index": 0,
            "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
            "logprobs": None,
            "finish_reason": "tool_calls",
        },
    ]
    for payload in out[:-1]:
        ChatCompletionChunk.model_validate(payload)


def test_stream_error_event() -> None:
    t = stream_translator()
    stream = (
        chunk({"role": "assistant", "content": "Hi"})
        + b'data: {"error":{"message":"Input validation error: `top_p` must be > 0.0 and < 1.0",'
        b'"http_status_code":422}}\n\n' + b"data: [DONE]\n\n"
    )
    out = events(feed(t, [stream]))
    assert out[1] == {
        "error": {
            "message": "Input validation error: `top_p` must be > 0.0 and < 1.0",
            "type": "invalid_request_error",
            "param": "top_p",
            "code": "invalid_request_error",
            "request_id": "req1",
        }
    }
    assert out[2:] == ["[DONE]"]
    assert t.stream_error is not None


@pytest.mark.parametrize(
    ("message", "status", "code"),
    [
        ("Model is overloaded", 503, "backend_unavailable"),
        ("Request failed during generation: CUDA error", 502, "backend_unavailable"),
        ("Incomplete generation stream", 502, "backend_unavailable"),
        (
            "Input validation error: `stop` supports up to 4 stop sequences",
            400,
            "invalid_request_error",
        ),
    ],
)
def test_stream_error_kinds_despite_422(message: str, status: int, code: str) -> None:
    """TGI's Messages API labels every in-stream error 422; the message tells the kind."""
    t = stream_translator()
    error = {"error": {"message": message, "http_status_code": 422}}
    out = events(feed(t, [b"data:" + orjson.dumps(error) + b"\n\ndata:[DONE]\n\n"]))
    assert out[0]["error"]["code"] == code and out[1:] == ["[DONE]"]
    assert t.stream_error is not None and t.stream_error.status == status


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "body", "client_status", "code", "param"),
    [
        (
            422,
            b'{"error":"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 8192.'
            b' Given: 8000 `inputs` tokens and 500 `max_new_tokens`","error_type":"validation"}',
            400,
            "context_length_exceeded",
            "messages",
        ),
        (
            422,
            b'{"error":"Tool error: No function found","error_type":"tool_error"}',
            400,
            "invalid_request_error",
            None,
        ),
        (
            422,
            b"Failed to deserialize the JSON body into the target type: stop: invalid type",
            400,
            "invalid_request_error",
            "stop",
        ),
        (401, b"", 502, "backend_unavailable", None),
        (
            429,
            b'{"error":"Model is overloaded","error_type":"overloaded"}',
            503,
            "backend_unavailable",
            None,
        ),
        (
            424,
            b'{"error":"Request failed during generation: x","error_type":"generation"}',
            502,
            "backend_unavailable",
            None,
        ),
    ],
)
def test_errors(status: int, body: bytes, client_status: int, code: str, param: str | None) -> None:
    t, _ = mapped()
    assert t.response_status(status) == client_status
    err = t.error(status, body)
    assert (err.status, err.code, err.param) == (client_status, code, param)
