"""Golden tests for OpenAI <-> TGI native (/generate, /generate_stream)."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc.config import Backend, Model
from extproc.errors import GatewayError
from extproc.translators import for_backend
from extproc.translators.openai_vllm import OpenAIToVLLM
from extproc.translators.tei import Tei
from extproc.translators.tgi_messages import TgiMessages
from extproc.translators.tgi_native import TgiNative

from .helpers import events, feed, split_everywhere

MODEL = Model(id="llama-chat", backend="tgi", backend_model="meta-llama/Llama-3.1-8B-Instruct")
CHATML = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
HEAD = b'data: {"id":"chatcmpl-req1","object":"chat.completion.chunk","created":1700000000,"model":"llama-chat","choices":'  # noqa: E501


def translator(**kw: Any) -> TgiNative:
    return TgiNative(kw.pop("model", MODEL), "req1", created=1700000000)


def chat_request(stream: bool = False, **fields: Any) -> tuple[TgiNative, dict[str, Any]]:
    t = translator()
    body: dict[str, Any] = {
        "model": "llama-chat",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 64,
        **fields,
    }
    if stream:
        body["stream"] = True
        body.setdefault("stream_options", {"include_usage": True})
    assert t.request("chat", body, stream) is True
    return t, body


def base_params(**extra: Any) -> dict[str, Any]:
    return {
        "max_new_tokens": 64,
        "details": True,
        "return_full_text": False,
        "decoder_input_details": False,
        "do_sample": True,
        **extra,
    }


# --------------------------------------------------------------------------------- request


def test_full_chat_request_mapping() -> None:
    t, body = chat_request(
        temperature=0.7,
        top_p=0.9,
        stop="\n\n",
        seed=42,
        frequency_penalty=0.5,
        presence_penalty=0.3,
        logit_bias={"50256": -100},
        user="alice",
        parallel_tool_calls=True,
        n=1,
        tool_choice="none",
        response_format={"type": "text"},
        top_k=40,
        repetition_penalty=1.1,
        service_tier="auto",
    )
    assert body == {
        "inputs": CHATML,
        "parameters": base_params(
            temperature=0.7,
            top_p=0.9,
            stop=["\n\n"],
            seed=42,
            frequency_penalty=0.5,
            top_k=40,
            repetition_penalty=1.1,
        ),
    }
    assert t.dropped == [
        "presence_penalty",
        "logit_bias",
        "user",
        "parallel_tool_calls",
        "service_tier",
    ]
    assert t.backend_path("chat", "/v1/chat/completions") == "/generate"


def test_greedy_and_neutral_values() -> None:
    _, body = chat_request(temperature=0, top_p=1.0, presence_penalty=0, logit_bias={})
    assert body["parameters"] == base_params(do_sample=False)
    t, body = chat_request(top_p=0)  # nucleus of one token: greedy
    assert body["parameters"] == base_params(do_sample=False)
    assert t.dropped == []


def test_defaults_max_new_tokens_from_model_and_max_completion_tokens_wins() -> None:
    t = translator()
    body: dict[str, Any] = {"model": "llama-chat", "messages": [{"role": "user", "content": "Hi"}]}
    t.request("chat", body, False)
    assert body["parameters"]["max_new_tokens"] == MODEL.max_tokens
    _, body = chat_request(max_completion_tokens=7)
    assert body["parameters"]["max_new_tokens"] == 7


def test_response_format_to_grammar() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    _, body = chat_request(
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    )
    assert body["parameters"]["grammar"] == {"type": "json", "value": schema}
    _, body = chat_request(response_format={"type": "json_object"})
    assert body["parameters"]["grammar"] == {"type": "json", "value": {"type": "object"}}


def test_logprobs_request() -> None:
    _, body = chat_request(logprobs=True, top_logprobs=3)
    assert body["parameters"]["top_n_tokens"] == 3
    _, body = chat_request(logprobs=True)
    assert "top_n_tokens" not in body["parameters"]


def test_stream_request_and_path() -> None:
    t, body = chat_request(stream=True)
    assert body == {"inputs": CHATML, "parameters": base_params()}
    assert t.backend_path("chat", "/v1/chat/completions") == "/generate_stream"
    assert t.dropped == []


def test_backend_path_needs_request_first() -> None:
    with pytest.raises(RuntimeError):
        translator().backend_path("chat", "/v1/chat/completions")


def test_custom_chat_template_is_used() -> None:
    model = Model(
        id="m",
        backend="b",
        backend_model="m",
        chat_template="{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}>",
    )
    t = TgiNative(model, "r", created=1)
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    t.request("chat", body, False)
    assert body["inputs"] == "[user]Hi>"


def test_completions_request() -> None:
    t = translator()
    body: dict[str, Any] = {
        "model": "llama-chat",
        "prompt": ["Once upon"],
        "max_tokens": 64,
        "best_of": 1,
        "echo": False,
        "logprobs": 2,
    }
    t.request("completions", body, False)
    assert body == {"inputs": "Once upon", "parameters": base_params(top_n_tokens=2)}
    assert t.dropped == []


@pytest.mark.parametrize(
    ("op", "fields", "param"),
    [
        ("chat", {"n": 2}, "n"),
        ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("chat", {"tool_choice": "required"}, "tool_choice"),
        ("chat", {"functions": [{"name": "f"}]}, "functions"),
        ("chat", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("chat", {"stop": [1]}, "stop"),
        ("chat", {"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"temperature": "hot"}, "temperature"),
        ("chat", {"temperature": -1}, "temperature"),
        ("chat", {"seed": -1}, "seed"),
        ("chat", {"frequency_penalty": 3}, "frequency_penalty"),
        ("chat", {"response_format": {"type": "yaml"}}, "response_format.type"),
        ("chat", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            "chat",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                    }
                ]
            },
            "messages[0].content[0]",
        ),
        ("completions", {"prompt": ["a", "b"]}, "prompt"),
        ("completions", {"prompt": [1, 2, 3]}, "prompt"),
        ("completions", {"prompt": "a", "suffix": "z"}, "suffix"),
        ("completions", {"prompt": "a", "best_of": 2}, "best_of"),
        ("completions", {"prompt": "a", "logprobs": 6}, "logprobs"),
        ("completions", {"prompt": "a", "echo": True, "logprobs": 1}, "echo"),
        ("embeddings", {"input": "a"}, "model"),
    ],
)
def test_rejected_fields(op: str, fields: dict[str, Any], param: str) -> None:
    body: dict[str, Any] = {"model": "llama-chat", "max_tokens": 8}
    if op == "chat":
        body["messages"] = [{"role": "user", "content": "Hi"}]
    body.update(fields)
    with pytest.raises(GatewayError) as exc:
        translator().request(op, body, False)
    assert (exc.value.status, exc.value.code, exc.value.param) == (
        400,
        "invalid_request_error",
        param,
    )


# ------------------------------------------------------------------------ non-stream response


def respond(t: TgiNative, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    t.response_headers(200, headers or {"x-prompt-tokens": "12", "x-generated-tokens": "3"})
    assert t.response_status(200) is None
    assert t.wants_response_body(200, "application/json")
    return orjson.loads(t.response_body(orjson.dumps(body), True) or b"")


GENERATE = {
    "generated_text": " Paris.",
    "details": {
        "finish_reason": "eos_token",
        "generated_tokens": 3,
        "seed": None,
        "prefill": [],
        "tokens": [
            {"id": 6342, "text": " Paris", "logprob": -0.12, "special": False},
            {"id": 29889, "text": ".", "logprob": -0.3, "special": False},
            {"id": 2, "text": "</s>", "logprob": -0.01, "special": True},
        ],
    },
}


def test_chat_response() -> None:
    t, _ = chat_request()
    out = respond(t, GENERATE)
    assert out == {
        "id": "chatcmpl-req1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "llama-chat",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " Paris."},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }
    ChatCompletion.model_validate(out)
    assert t.usage == {"prompt_tokens": 12, "completion_tokens": 3}


@pytest.mark.parametrize(
    ("tgi", "openai"),
    [("eos_token", "stop"), ("stop_sequence", "stop"), ("length", "length"), ("odd", "stop")],
)
def test_finish_reasons(tgi: str, openai: str) -> None:
    t, _ = chat_request()
    out = respond(t, {"generated_text": "x", "details": {"finish_reason": tgi}})
    assert out["choices"][0]["finish_reason"] == openai
    ChatCompletion.model_validate(out)


def test_stop_sequence_is_cut_from_the_text() -> None:
    t, _ = chat_request(stop=["\n", "END"])
    out = respond(
        t,
        {"generated_text": "one two END", "details": {"finish_reason": "stop_sequence"}},
    )
    assert out["choices"][0]["message"]["content"] == "one two "


def test_compat_array_answer_and_usage_from_generated_header() -> None:
    t, _ = chat_request()
    out = respond(
        t,
        [{"generated_text": "hi", "details": {"finish_reason": "length"}}],
        {"x-prompt-tokens": "5", "x-generated-tokens": "9"},
    )
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}


def test_chat_logprobs_response() -> None:
    t, _ = chat_request(logprobs=True, top_logprobs=1)
    body = orjson.loads(orjson.dumps(GENERATE))
    body["details"]["top_tokens"] = [
        [{"id": 6342, "text": " Paris", "logprob": -0.12, "special": False}],
        [{"id": 29889, "text": ".", "logprob": -0.3, "special": False}],
        [{"id": 2, "text": "</s>", "logprob": -0.01, "special": True}],
    ]
    out = respond(t, body)
    assert out["choices"][0]["logprobs"] == {
        "content": [
            {
                "token": " Paris",
                "logprob": -0.12,
                "bytes": list(b" Paris"),
                "top_logprobs": [{"token": " Paris", "logprob": -0.12, "bytes": list(b" Paris")}],
            },
            {
                "token": ".",
                "logprob": -0.3,
                "bytes": [46],
                "top_logprobs": [{"token": ".", "logprob": -0.3, "bytes": [46]}],
            },
        ]
    }
    ChatCompletion.model_validate(out)


def test_completions_response_with_echo_and_logprobs() -> None:
    t = translator()
    t.request("completions", {"model": "m", "prompt": "The capital:", "echo": True}, False)
    out = respond(t, GENERATE)
    assert out["id"] == "cmpl-req1"
    assert out["object"] == "text_completion"
    assert out["choices"] == [
        {"index": 0, "text": "The capital: Paris.", "logprobs": None, "finish_reason": "stop"}
    ]
    Completion.model_validate(out)

    t = translator()
    t.request("completions", {"model": "m", "prompt": "The capital:", "logprobs": 0}, False)
    out = respond(t, GENERATE)
    assert out["choices"][0]["logprobs"] == {
        "tokens": [" Paris", "."],
        "token_logprobs": [-0.12, -0.3],
        "top_logprobs": [{" Paris": -0.12}, {".": -0.3}],
        "text_offset": [0, 6],
    }
    Completion.model_validate(out)


def test_malformed_answer() -> None:
    t, _ = chat_request()
    t.wants_response_body(200, "application/json")
    with pytest.raises(GatewayError) as exc:  # the processor answers it 502, voided
        t.response_body(b"<html>oops", True)
    assert exc.value.code == "backend_unavailable" and exc.value.status == 502


# ---------------------------------------------------------------------------------- stream


def ev(index: int, text: str, special: bool = False, final: dict[str, Any] | None = None) -> bytes:
    event: dict[str, Any] = {
        "index": index,
        "token": {"id": index, "text": text, "logprob": -0.5, "special": special},
        "generated_text": None,
        "details": None,
    }
    if final is not None:
        event["generated_text"] = final.pop("generated_text")
        event["details"] = final
    return orjson.dumps(event)


# A realistic /generate_stream answer: "data:" without and with a space, a keep-alive comment,
# non-ASCII text (cut mid-character by the every-offset split), a special EOS token last.
STREAM = (
    b"data:" + ev(1, "Hello") + b"\n\n"
    b": keep-alive\n\n"
    b"data: " + ev(2, ",") + b"\n\n"
    b"data:" + ev(3, " caf\u00e9 \u2615") + b"\n\n"
    b"data:"
    + ev(
        4,
        "</s>",
        special=True,
        final={
            "generated_text": "Hello, caf\u00e9 \u2615",
            "finish_reason": "eos_token",
            "generated_tokens": 4,
            "seed": 7,
            "input_length": 12,
        },
    )
    + b"\n\n"
)

EXPECTED = (
    HEAD + b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
    b'"finish_reason":null}]}\n\n'
    + HEAD
    + b'[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}]}\n\n'
    + HEAD
    + b'[{"index":0,"delta":{"content":","},"logprobs":null,"finish_reason":null}]}\n\n'
    + HEAD
    + b'[{"index":0,"delta":{"content":" caf\xc3\xa9 \xe2\x98\x95"},"logprobs":null,'
    b'"finish_reason":null}]}\n\n'
    + HEAD
    + b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n'
    + HEAD
    + b'[],"usage":{"prompt_tokens":12,"completion_tokens":4,"total_tokens":16}}\n\n'
    + b"data: [DONE]\n\n"
)


def stream_translator(include_usage: bool = True, **fields: Any) -> TgiNative:
    options = {"include_usage": True} if include_usage else {}
    t, _ = chat_request(stream=True, stream_options=options, **fields)
    t.response_headers(200, {"content-type": "text/event-stream"})
    assert t.wants_response_body(200, "text/event-stream")
    return t


def test_stream_golden() -> None:
    t = stream_translator()
    assert feed(t, [STREAM]) == EXPECTED
    assert t.usage == {"prompt_tokens": 12, "completion_tokens": 4}
    for payload in events(EXPECTED)[:-1]:
        ChatCompletionChunk.model_validate(payload)


def test_stream_split_at_every_byte_offset() -> None:
    for pieces in split_everywhere(STREAM):
        assert feed(stream_translator(), pieces) == EXPECTED


def test_stream_byte_by_byte_and_crlf() -> None:
    assert feed(stream_translator(), [bytes([b]) for b in STREAM]) == EXPECTED
    assert feed(stream_translator(), [STREAM.replace(b"\n", b"\r\n")]) == EXPECTED


def test_stream_without_include_usage_has_no_usage_chunk() -> None:
    t = stream_translator(include_usage=False)
    out = events(feed(t, [STREAM]))
    assert all(e == "[DONE]" or e["choices"] for e in out)
    assert out[-1] == "[DONE]"
    assert t.usage == {"prompt_tokens": 12, "completion_tokens": 4}  # the processor still sees it


def test_stream_ends_without_last_event_gets_done() -> None:
    t = stream_translator()
    out = feed(t, [b"data:" + ev(1, "Hel") + b"\n\ndata:" + ev(2, "lo")])  # last one unterminated
    assert [e if e == "[DONE]" else e["choices"][0]["delta"] for e in events(out)] == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        "[DONE]",
    ]
    assert t.usage is None
    # text held back as a possible stop sequence start is let out when the stream just ends
    t = stream_translator(stop=["END"])
    out = feed(t, [b"data:" + ev(1, "the E") + b"\n\n"])
    assert [e if e == "[DONE]" else e["choices"][0]["delta"] for e in events(out)] == [
        {"role": "assistant", "content": ""},
        {"content": "the "},
        {"content": "E"},
        "[DONE]",
    ]


def test_stream_error_as_first_event() -> None:
    t = stream_translator()
    out = feed(t, [b'data:{"error":"Model is overloaded","error_type":"overloaded"}\n\n'])
    assert events(out) == [
        {
            "error": {
                "message": "The model backend is overloaded or not ready; retry shortly.",
                "type": "server_error",
                "param": None,
                "code": "backend_unavailable",
                "retry_after": 1,
                "request_id": "req1",
            }
        },
        "[DONE]",
    ]
    assert t.stream_error is not None and t.stream_error.status == 503


def test_stream_error_mid_stream_and_nothing_after() -> None:
    t = stream_translator()
    first = t.response_body(
        b"data:"
        + ev(1, "Hi")
        + b'\n\ndata:{"error":"Input validation error: `inputs` tokens + `max_new_tokens` must be'
        b' <= 4096. Given: 4000 `inputs` tokens and 200 `max_new_tokens`","error_type":'
        b'"validation"}\n\ndata:' + ev(2, "late"),
        False,
    )
    out = events(first or b"")
    assert out[1]["choices"][0]["delta"] == {"content": "Hi"}
    assert out[2]["error"]["code"] == "context_length_exceeded"
    assert out[2]["error"]["param"] == "messages"
    assert out[3] == "[DONE]"
    assert len(out) == 4
    assert t.response_body(b"\n\ndata:" + ev(3, "more") + b"\n\n", True) == b""


def test_stream_stop_sequence_held_back_and_cut() -> None:
    t = stream_translator(include_usage=False, stop=["END"])
    stream = (
        b"data:" + ev(1, "one E") + b"\n\n"  # "E" might start "END": held back
        b"data:" + ev(2, "xtra E") + b"\n\n"  # it did not: released with "xtra "
        b"data:" + ev(3, "N") + b"\n\n"
        b"data:"
        + ev(
            4,
            "D",
            final={
                "generated_text": "one Extra END",
                "finish_reason": "stop_sequence",
                "generated_tokens": 4,
                "input_length": 3,
            },
        )
        + b"\n\n"
    )
    out = events(feed(t, [stream]))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in out[:-1])
    assert text == "one Extra "
    assert out[-2]["choices"][0]["finish_reason"] == "stop"
    for pieces in split_everywhere(stream):
        assert events(feed(stream_translator(include_usage=False, stop=["END"]), pieces)) == out


def test_a_cut_stream_has_a_counted_chunk_per_token() -> None:
    """The stream meter charges a cut stream one token per chunk with a choice (not the role
    chunk): text held back for a possible stop sequence and a special token mid-stream get an
    empty chunk each, so that count is TGI's (before, 3 chunks for these 5 tokens)."""
    t = stream_translator(include_usage=False, stop=["END"])
    cut = (
        b"data:" + ev(1, "one E") + b"\n\n"  # "E" might start "END": held back
        b"data:" + ev(2, "N") + b"\n\n"  # still might
        b"data:" + ev(3, "<pad>", special=True) + b"\n\n"
        b"data:" + ev(4, "o") + b"\n\n"  # "ENo": released
        b"data:" + ev(5, " more") + b"\n\n"
    )  # and the client leaves: no last event
    out = events(t.response_body(cut, False))
    role, tokens = out[0], out[1:]
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(tokens) == 5
    assert "".join(e["choices"][0]["delta"]["content"] for e in tokens) == "one ENo more"
    assert [e["choices"][0]["delta"]["content"] for e in tokens] == [
        "one ",
        "",
        "",
        "ENo",
        " more",
    ]


def test_stream_logprobs() -> None:
    t = stream_translator(include_usage=False, logprobs=True, top_logprobs=1)
    token = {"id": 5, "text": "Hi", "logprob": -0.25, "special": False}
    event = {
        "index": 1,
        "token": token,
        "top_tokens": [token],
        "generated_text": "Hi",
        "details": {"finish_reason": "length", "generated_tokens": 1, "input_length": 2},
    }
    out = events(feed(t, [b"data: " + orjson.dumps(event) + b"\n\n"]))
    assert out[1]["choices"][0]["logprobs"] == {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.25,
                "bytes": [72, 105],
                "top_logprobs": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105]}],
            }
        ]
    }
    assert out[2]["choices"][0]["finish_reason"] == "length"
    for payload in out[:-1]:
        ChatCompletionChunk.model_validate(payload)


def test_completions_stream() -> None:
    t = translator()
    t.request(
        "completions",
        {"model": "m", "prompt": "Say", "stream": True, "stream_options": {"include_usage": True}},
        True,
    )
    assert t.backend_path("completions", "/v1/completions") == "/generate_stream"
    t.wants_response_body(200, "text/event-stream")
    out = events(feed(t, [STREAM]))
    assert [e if e == "[DONE]" else (e["choices"], e.get("usage")) for e in out] == [
        ([{"index": 0, "text": "Hello", "logprobs": None, "finish_reason": None}], None),
        ([{"index": 0, "text": ",", "logprobs": None, "finish_reason": None}], None),
        (
            [{"index": 0, "text": " caf\u00e9 \u2615", "logprobs": None, "finish_reason": None}],
            None,
        ),
        ([{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}], None),
        ([], {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}),
        "[DONE]",
    ]
    assert {e["object"] for e in out[:-1]} == {"text_completion"}
    assert {e["id"] for e in out[:-1]} == {"cmpl-req1"}
    # the SDK builds stream chunks without validation; its type wants a non-null finish_reason
    for payload in out[-3:-1]:
        Completion.model_validate(payload)


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "body", "client_status", "code", "param"),
    [
        (
            422,
            b'{"error":"Input validation error: `top_p` must be > 0.0 and < 1.0",'
            b'"error_type":"validation"}',
            400,
            "invalid_request_error",
            "top_p",
        ),
        (
            422,
            b'{"error":"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096.'
            b' Given: 4000 `inputs` tokens and 200 `max_new_tokens`","error_type":"validation"}',
            400,
            "context_length_exceeded",
            "messages",
        ),
        (
            422,
            b'{"error":"Input validation error: `inputs` must have less than 4000 tokens.'
            b' Given: 4100","error_type":"validation"}',
            400,
            "context_length_exceeded",
            "messages",
        ),
        (
            422,
            b'{"error":"Template error: unknown filter","error_type":"template_error"}',
            400,
            "invalid_request_error",
            None,
        ),
        (
            400,
            b"Failed to parse the request body as JSON: expected value at line 1 column 1",
            400,
            "invalid_request_error",
            None,
        ),
        (
            422,
            b"Failed to deserialize the JSON body into the target type: parameters.stop:"
            b" invalid type: string",
            400,
            "invalid_request_error",
            "stop",
        ),
        (
            415,
            b"Expected request with `Content-Type: application/json`",
            400,
            "invalid_request_error",
            None,
        ),
        (
            413,
            b"Failed to buffer the request body: length limit exceeded",
            413,
            "request_too_large",
            None,
        ),
        (401, b"", 502, "backend_unavailable", None),
        (
            424,
            b'{"error":"Request failed during generation: CUDA OOM","error_type":"generation"}',
            502,
            "backend_unavailable",
            None,
        ),
        (
            429,
            b'{"error":"Model is overloaded","error_type":"overloaded"}',
            503,
            "backend_unavailable",
            None,
        ),
        (
            500,
            b'{"error":"Incomplete generation","error_type":"incomplete_generation"}',
            502,
            "backend_unavailable",
            None,
        ),
        (
            503,
            b'{"error":"unhealthy","error_type":"healthcheck"}',
            503,
            "backend_unavailable",
            None,
        ),
    ],
)
def test_backend_errors(
    status: int, body: bytes, client_status: int, code: str, param: str | None
) -> None:
    t, _ = chat_request()
    assert t.response_status(status) == client_status
    assert t.wants_response_body(status, "application/json")
    err = t.error(status, body)
    assert (err.status, err.code, err.param) == (client_status, code, param)
    assert err.message
    if client_status in (429, 503):
        assert err.retry_after == 1


def test_completions_error_param_is_prompt() -> None:
    t = translator()
    t.request("completions", {"model": "m", "prompt": "x"}, False)
    err = t.error(
        422,
        b'{"error":"Input validation error: `inputs` must have less than 10 tokens. Given: 11",'
        b'"error_type":"validation"}',
    )
    assert (err.code, err.param) == ("context_length_exceeded", "prompt")


# ------------------------------------------------------------------------------ for_backend


def test_for_backend_picks_by_kind_and_mode() -> None:
    def backend(kind: str, mode: str = "native") -> Backend:
        return Backend(name="b", kind=kind, endpoints=(), mode=mode)

    assert isinstance(for_backend(backend("vllm"), MODEL, "r"), OpenAIToVLLM)
    assert isinstance(for_backend(backend("openai"), MODEL, "r"), OpenAIToVLLM)
    assert isinstance(for_backend(backend("tgi"), MODEL, "r"), TgiNative)
    assert isinstance(for_backend(backend("tgi", "messages"), MODEL, "r"), TgiMessages)
    assert isinstance(for_backend(backend("tei"), MODEL, "r"), Tei)
    with pytest.raises(GatewayError) as exc:
        for_backend(backend("triton"), MODEL, "r")
    assert exc.value.status == 501
    vllm = for_backend(backend("vllm"), MODEL, "r")
    assert vllm.dropped == [] and vllm.usage is None
    vllm.response_headers(200, {})


# ------------------------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_stream_chunk_benchmark() -> None:
    """µs per TGI event translated (one event per body chunk, as TGI flushes them)."""
    n = 20000
    chunks = [b"data:" + ev(i, " token") + b"\n\n" for i in range(1, n)]
    chunks.append(
        b"data:"
        + ev(
            n,
            "</s>",
            special=True,
            final={
                "generated_text": "x",
                "finish_reason": "eos_token",
                "generated_tokens": n,
                "input_length": 5,
            },
        )
        + b"\n\n"
    )
    for label, fields in (("plain", {}), ("stop", {"stop": ["\n\n", "END"]})):
        best = float("inf")
        for _ in range(5):
            t = stream_translator(**fields)
            start = time.perf_counter()
            for i, chunk in enumerate(chunks):
                t.response_body(chunk, i == n - 1)
            best = min(best, time.perf_counter() - start)
        print(f"\ntgi_native stream ({label}): {best / n * 1e6:.2f} µs/chunk")
        # split mid-event: every chunk cut in two
        halves = [part for c in chunks for part in (c[: len(c) // 2], c[len(c) // 2 :])]
        t = stream_translator(**fields)
        start = time.perf_counter()
        for i, chunk in enumerate(halves):
            t.response_body(chunk, i == len(halves) - 1)
        elapsed = time.perf_counter() - start
        print(f"tgi_native stream ({label}, events split in two): {elapsed / n * 1e6:.2f} µs/event")


def test_a_count_neither_the_headers_nor_the_details_give_is_unknown() -> None:
    """Without x-prompt-tokens (or without any generated count) the usage is unknown, so the
    request is charged its reservation (reason usage_unknown), not 0 tokens for what it read
    (found by an audit). The client's usage object still shows 0."""
    t, _ = chat_request()
    out = respond(t, GENERATE, {"x-generated-tokens": "3"})
    assert t.usage is None and out["usage"]["prompt_tokens"] == 0
    t, _ = chat_request()
    respond(t, {"generated_text": "x"}, {"x-prompt-tokens": "12"})
    assert t.usage is None
    t, _ = chat_request()
    respond(t, GENERATE, {"x-prompt-tokens": "12"})  # the details count the generated tokens
    assert t.usage == {"prompt_tokens": 12, "completion_tokens": 3}
