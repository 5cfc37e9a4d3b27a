"""Golden tests for the OpenAI <-> vLLM translator and the SSE splitter it relies on."""

from __future__ import annotations

import orjson
import pytest

from extproc.config import Model
from extproc.sse import EventSplitter
from extproc.translators.openai_vllm import OpenAIToVLLM, normalize_error

ALIASED = Model(id="public", backend="b", backend_model="Org/Backend-1")
PLAIN = Model(id="same", backend="b", backend_model="same")


def test_plain_model_forwards_untouched() -> None:
    body = {"model": "same", "messages": [], "stream": True, "stream_options": {"x": 1}}
    assert OpenAIToVLLM(PLAIN).request("chat", body, stream=True) is False
    assert not OpenAIToVLLM(PLAIN).wants_response_body(200, "text/event-stream")


def test_alias_and_stream_options_on_non_stream() -> None:
    body = {"model": "public", "messages": [], "stream_options": {"include_usage": True}}
    assert OpenAIToVLLM(ALIASED).request("chat", body, stream=False) is True
    assert body == {"model": "Org/Backend-1", "messages": []}


def test_aliased_stream_rewritten_across_split_events() -> None:
    t = OpenAIToVLLM(ALIASED)
    assert t.wants_response_body(200, "text/event-stream")
    events = [
        b'data: {"id":"1","model":"Org/Backend-1","choices":[{"delta":{"content":"a"}}]}\n\n',
        b'data: {"id":"1","model":"Org/Backend-1","choices":[{"delta":{"content":"\\"model\\":'
        b'\\"Org/Backend-1\\""}}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    stream = b"".join(events)
    out = b""
    for i in range(0, len(stream), 7):  # arbitrary cuts, mid-event and mid-key
        chunk = stream[i : i + 7]
        out += t.response_body(chunk, i + 7 >= len(stream)) or b""
    parsed = [orjson.loads(e[6:]) for e in out.split(b"\n\n") if e.startswith(b"data: {")]
    assert [p["model"] for p in parsed] == ["public", "public"]
    # text that merely contains the backend id is never rewritten
    assert parsed[1]["choices"][0]["delta"]["content"] == '"model":"Org/Backend-1"'
    assert out.endswith(b"data: [DONE]\n\n")


def test_event_splitter_holds_partial_events_and_normalizes_crlf() -> None:
    s = EventSplitter()
    assert s.feed(b"data: a\r\n\r\ndata: b") == b"data: a\n\n"
    assert s.feed(b"\n\n") == b"data: b\n\n"
    assert s.feed(b"data: c") == b""
    assert s.flush() == b"data: c"


@pytest.mark.parametrize(
    ("status", "body", "code", "client_status", "param"),
    [
        (
            400,
            b'{"error":{"message":"This model\'s maximum context length is 4096 tokens.",'
            b'"type":"BadRequestError","param":null,"code":400}}',
            "context_length_exceeded",
            400,
            "messages",
        ),
        (  # vLLM before v0.10.1: flat
            400,
            b'{"object":"error","message":"bad top_p","type":"BadRequestError","param":"top_p",'
            b'"code":400}',
            "invalid_request_error",
            400,
            "top_p",
        ),
        (
            404,
            b'{"error":{"message":"The model `x` does not exist.","param":"model"}}',
            "model_not_found",
            404,
            "model",
        ),
        (401, b'{"error": "Unauthorized"}', "backend_unavailable", 502, None),
        (429, b'{"error":{"message":"queue full","code":429}}', "backend_unavailable", 503, None),
        (501, b'{"error":{"message":"not implemented"}}', "invalid_request_error", 400, None),
        (500, b"Internal Server Error", "backend_unavailable", 502, None),
        (503, b"", "backend_unavailable", 503, None),
    ],
)
def test_backend_errors(
    status: int, body: bytes, code: str, client_status: int, param: str | None
) -> None:
    err = normalize_error(status, body)
    assert (err.code, err.status, err.param) == (code, client_status, param)
    assert OpenAIToVLLM(PLAIN).response_status(status) == client_status
    assert err.message
