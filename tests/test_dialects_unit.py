"""The dialects' paths and shapes without a gateway: envelope wrapping and stream errors (events
cut anywhere), the route tables, the proxy's rewrites and usage, Envoy's envelope mappers."""

from __future__ import annotations

import orjson
import pytest

from extproc.config import parse_config
from extproc.dialects import (
    ENVELOPE,
    ENVELOPE_ROUTES,
    OPENAI,
    PROXY,
    Envelope,
    ProxyTranslator,
    dialect_of,
    envelope_route,
    error_body,
    proxy_target,
)
from extproc.envoy_config import ENVELOPE_CEL, render
from extproc.errors import ENVOY_LOCAL_REPLIES, GatewayError
from extproc.operations import CHAT, POST_OPERATIONS
from tests.harness import base_config

RID = "req-1"
CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"delta":{"content":"hi"}}]}'
VLLM_ERROR = (
    b'data: {"error":{"message":"boom","type":"InternalServerError","param":null,"code":500}}'
)
DONE = b"data: [DONE]"


def _cfg():
    cfg = base_config()
    cfg["backends"] += [
        {"name": "tgi", "kind": "tgi", "endpoints": ["127.0.0.1:1"], "request_timeout": "10s"},
        {"name": "tei", "kind": "tei", "endpoints": ["127.0.0.1:2"], "request_timeout": "10s"},
    ]
    cfg["models"] += [
        {"id": "org/tgi-model", "backend": "tgi", "free": True, "backend_model": "tgi-own"},
        {"id": "tei-model", "backend": "tei", "kind": "embedding", "free": True},
    ]
    return parse_config(cfg)


def test_dialect_of_path() -> None:
    assert dialect_of("/v1/chat/completions") == OPENAI
    assert dialect_of("/v1/models") == OPENAI
    assert dialect_of("/v1/inference/chat") == ENVELOPE
    assert dialect_of("/models/m/proxy/v1/generate") == PROXY


def test_error_shapes() -> None:
    err = GatewayError("rate_limit_exceeded", "Slow down.", retry_after=3)
    envelope = orjson.loads(error_body(ENVELOPE, err, RID))
    assert envelope == {
        "status": "error",
        "error": {
            "message": "Slow down.",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
            "retry_after": 3,
        },
        "meta": {"request_id": RID},
    }
    assert orjson.loads(error_body(OPENAI, err, RID))["error"]["request_id"] == RID
    assert error_body(PROXY, err, RID) == error_body(OPENAI, err, RID)


# --------------------------------------------------------------------------------- envelope


def test_envelope_routes() -> None:
    route, op = envelope_route("/v1/inference/chat")
    assert op is CHAT and route.openai_path == "/v1/chat/completions"
    with pytest.raises(GatewayError) as exc:
        envelope_route("/v1/inference/chats")
    assert exc.value.status == 404 and "/v1/inference/embed" in exc.value.message
    assert not ENVELOPE_ROUTES["audio/synthesize"].wrap


def test_an_envelope_name_follows_its_openai_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        envelope_route("/v1/inference/audio/synthesize")[1] is POST_OPERATIONS["/v1/audio/speech"]
    )
    monkeypatch.delitem(POST_OPERATIONS, "/v1/audio/speech")  # a build without speech
    with pytest.raises(GatewayError, match="does not serve yet"):
        envelope_route("/v1/inference/audio/synthesize")


def test_envelope_wraps_json_only() -> None:
    env = Envelope(ENVELOPE_ROUTES["chat"])
    assert env.wants_body("application/json") and env.wrapping
    model = _cfg().models_by_id["sim-chat"]
    out = orjson.loads(
        env.wrap(b'{"object":"x"}', RID, model, {"prompt_tokens": 3.0, "completion_tokens": 2.0})
    )
    assert out == {
        "status": "ok",
        "data": {"object": "x"},
        "meta": {
            "request_id": RID,
            "model": "sim-chat",
            "backend": "vllm-chat",
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        },
    }
    assert not Envelope(ENVELOPE_ROUTES["chat"]).wants_body("text/plain")
    assert not Envelope(ENVELOPE_ROUTES["audio/synthesize"]).wants_body("application/json")


def _stream(chunks: list[bytes]) -> bytes:
    env = Envelope(ENVELOPE_ROUTES["chat"])
    assert env.wants_body("text/event-stream") and env.streaming
    return b"".join(env.stream_chunk(c, i == len(chunks) - 1, RID) for i, c in enumerate(chunks))


def test_envelope_stream_without_errors_is_untouched() -> None:
    env = Envelope(ENVELOPE_ROUTES["chat"])
    env.wants_body("text/event-stream")
    chunk = CHUNK + b"\n\n" + CHUNK + b"\n\n"
    assert env.stream_chunk(chunk, False, RID) is chunk  # no copy, no mutation
    # vLLM's finish_reason "error" is not an error event
    finished = b'data: {"choices":[{"finish_reason":"error"}]}\n\n'
    assert env.stream_chunk(finished, False, RID) == finished


@pytest.mark.parametrize("cut", [1, 7, 30, len(VLLM_ERROR) + 1, len(VLLM_ERROR) + 3])
def test_envelope_stream_error_event_cut_anywhere(cut: int) -> None:
    whole = CHUNK + b"\n\n" + VLLM_ERROR + b"\n\n" + DONE + b"\n\n"
    at = len(CHUNK) + 2 + cut
    out = _stream([whole[:at], whole[at:]])
    events = out.split(b"\n\n")
    assert events[0] == CHUNK and events[2] == DONE
    assert events[1].startswith(b"event: error\ndata: ")
    payload = orjson.loads(events[1].split(b"data: ", 1)[1])
    assert payload["status"] == "error" and payload["meta"] == {"request_id": RID}
    # vLLM's 500 mid-stream: the gateway's backend failure, as the OpenAI dialect maps it
    assert payload["error"]["code"] == "backend_unavailable"
    assert "boom" in payload["error"]["message"]


def test_envelope_stream_keeps_the_gateways_own_error_and_flushes_the_tail() -> None:
    # what the TGI translators emit: already the gateway's error object
    ours = GatewayError("context_length_exceeded", "Too long.", "messages").payload(RID)
    event = b"data: " + orjson.dumps(ours)
    out = _stream([CHUNK + b"\n\n" + event])  # unterminated last event at end of stream
    error = orjson.loads(out.split(b"event: error\ndata: ")[1])
    assert error["error"]["code"] == "context_length_exceeded"
    assert error["error"]["param"] == "messages"
    assert out.endswith(b"\n\n")


# ------------------------------------------------------------------------------------ proxy


def test_proxy_target_resolution() -> None:
    cfg = _cfg()
    model, route = proxy_target("/models/org/tgi-model/proxy/v1/generate", "POST", cfg)
    assert model.id == "org/tgi-model" and route.path == "/generate"
    model, _ = proxy_target("/models/org%2Ftgi-model/proxy/v1/generate_stream", "POST", cfg)
    assert model.id == "org/tgi-model"
    assert proxy_target("/models/tei-model/proxy/v1/classify", "POST", cfg)[1].path == "/predict"
    assert proxy_target("/models/sim-chat/proxy/v1/models", "GET", cfg)[1].op is None
    for path, method, code in (
        ("/models/tei-model/proxy/v1/generate", "POST", "not_found"),
        ("/models/tei-model/proxy/v1", "POST", "not_found"),
        ("/models/tei-model/other", "POST", "not_found"),
        ("/models/nope/proxy/v1/embed", "POST", "model_not_found"),
        ("/models/sim-chat/proxy/v1/models", "POST", "method_not_allowed"),
    ):
        with pytest.raises(GatewayError) as exc:
            proxy_target(path, method, cfg)
        assert exc.value.code == code, path
    with pytest.raises(GatewayError) as exc:
        proxy_target("/models/tei-model/proxy/v1/generate", "POST", cfg)
    assert "classify, embed, embeddings, predict, rerank" in exc.value.message


def test_proxy_tgi_request_in_tgis_own_terms() -> None:
    cfg = _cfg()
    model, route = proxy_target("/models/org/tgi-model/proxy/v1/generate_stream", "POST", cfg)
    t = ProxyTranslator(model, route)
    body = {"inputs": "Hi", "parameters": {"temperature": 0.5}}
    stream, view = t.prepare(body)
    assert stream is True and view == {"prompt": "Hi"}
    # what the processor adds for a metered stream with no max_tokens, in OpenAI terms
    body.update(max_tokens=77, stream_options={"include_usage": True})
    assert t.request("completions", body, stream) is True
    assert body == {
        "inputs": "Hi",
        "parameters": {"temperature": 0.5, "max_new_tokens": 77, "details": True},
    }
    assert t.backend_path("completions", "/models/x") == "/generate_stream"
    with pytest.raises(GatewayError) as exc:
        t.prepare({"inputs": "Hi", "parameters": {"max_new_tokens": "9"}})
    assert exc.value.param == "parameters.max_new_tokens"
    # null is TGI's "no limit" (up to the context): metered, it becomes the granted amount
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": None}}
    assert t.prepare(body) == (True, {"prompt": "Hi"})
    body.update(max_tokens=12, stream_options={"include_usage": True})
    assert t.request("completions", body, True) is True
    assert body["parameters"] == {"max_new_tokens": 12, "details": True}
    # best_of: every candidate may run to max_new_tokens (metering reserves them all)
    stream, view = t.prepare({"inputs": "Hi", "parameters": {"best_of": 3, "max_new_tokens": 4}})
    assert view == {"prompt": "Hi", "max_tokens": 4, "best_of": 3}
    with pytest.raises(GatewayError) as exc:
        t.prepare({"inputs": "Hi", "parameters": {"best_of": 0}})
    assert exc.value.param == "parameters.best_of"


def test_proxy_rewrites_the_model_only() -> None:
    cfg = _cfg()
    model, route = proxy_target("/models/org/tgi-model/proxy/v1/chat/completions", "POST", cfg)
    t = ProxyTranslator(model, route)
    body = {"model": "org/tgi-model", "messages": [{"role": "user", "content": "x"}]}
    assert t.prepare(body) == (False, body)
    assert t.request("chat", body, False) is True and body["model"] == "tgi-own"
    assert t.request("chat", body, False) is False  # already the backend's name


def test_proxy_usage_from_tgi_and_tei_headers() -> None:
    cfg = _cfg()
    model, route = proxy_target("/models/org/tgi-model/proxy/v1/generate", "POST", cfg)
    t = ProxyTranslator(model, route)
    t.prepare({"inputs": "Hi"})
    t.response_headers(200, {"x-prompt-tokens": "5", "x-generated-tokens": "9"})
    assert t.usage == {"prompt_tokens": 5, "completion_tokens": 9}
    assert not t.wants_response_body(200, "application/json")
    # no x-generated-tokens: the count comes from the body's details, which pass untouched
    t = ProxyTranslator(model, route)
    t.response_headers(200, {"x-prompt-tokens": "5"})
    assert t.wants_response_body(200, "application/json")
    assert t.response_body(b'{"generated_text":"a b","details":{"generated', False) is None
    assert t.response_body(b'_tokens":2}}', True) is None
    assert t.usage == {"prompt_tokens": 5, "completion_tokens": 2}
    assert not t.wants_response_body(422, "application/json")  # errors pass through

    model, route = proxy_target("/models/tei-model/proxy/v1/embed", "POST", cfg)
    t = ProxyTranslator(model, route)
    assert t.prepare({"inputs": ["a", ["b", "c"]]}) == (False, {"input": ["a", "b", "c"]})
    t.response_headers(200, {"x-compute-tokens": "12"})
    assert t.usage == {"prompt_tokens": 12, "completion_tokens": 0}
    assert t.response_status(424) is None  # the backend's status, as it is


# ------------------------------------------------------------------------------------ Envoy


def test_every_envoy_local_reply_has_an_envelope_mapper_first() -> None:
    boot = render(parse_config(base_config()))
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    mappers = hcm["local_reply_config"]["mappers"]
    assert len(mappers) == 2 * len(ENVOY_LOCAL_REPLIES) + 1
    for i, (_, _, code, _) in enumerate(ENVOY_LOCAL_REPLIES):
        envelope, openai = mappers[2 * i], mappers[2 * i + 1]
        both = envelope["filter"]["and_filter"]["filters"]
        assert both[0] == openai["filter"]
        assert both[1]["extension_filter"]["typed_config"]["expression"] == ENVELOPE_CEL
        body = envelope["body_format_override"]["json_format"]
        assert body["status"] == "error" and body["error"]["code"] == code
        assert body["meta"] == {"request_id": "%REQ(X-REQUEST-ID)%"}
        assert openai["body_format_override"]["json_format"]["error"]["code"] == code
