"""Every bad input gets the gateway's error shape, the right status, a stable code and param."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from extproc.supervisor import Stack
from tests.harness import Gateway, base_config, start_gateway

HELLO = [{"role": "user", "content": "hello"}]


def _post(gateway: Gateway, body: bytes | dict, **headers: str) -> httpx.Response:
    h = {"Authorization": f"Bearer {gateway.key}", **headers}
    if isinstance(body, dict):
        return httpx.post(gateway.v1 + "/chat/completions", headers=h, json=body, timeout=20)
    h["Content-Type"] = "application/json"
    return httpx.post(gateway.v1 + "/chat/completions", headers=h, content=body, timeout=20)


def _error(r: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code, err
    assert err["param"] == param, err
    assert err["message"]
    assert err["request_id"] == r.headers["x-request-id"]
    return err


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Basic dXNlcjpwYXNz", "Bearer not-a-key", "tg_only_the_key"],
)
def test_missing_or_malformed_authorization_is_401(
    gateway: Gateway, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    r = httpx.post(
        gateway.v1 + "/chat/completions",
        headers=headers,
        json={"model": "sim-chat", "messages": HELLO},
    )
    _error(r, 401, "invalid_api_key")


def test_unknown_key_raises_authentication_error(gateway: Gateway) -> None:
    bad = openai.OpenAI(base_url=gateway.v1, api_key="tg_" + "A" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.chat.completions.create(model="sim-chat", messages=HELLO)
    assert exc.value.status_code == 401
    assert exc.value.code == "invalid_api_key"


def test_unauthenticated_request_never_reaches_backend(gateway: Gateway) -> None:
    rid = uuid.uuid4().hex
    httpx.post(
        gateway.v1 + "/chat/completions",
        headers={"X-Request-ID": rid},
        json={"model": "sim-chat", "messages": HELLO},
    )
    assert not [r for r in gateway.sim_requests() if r["headers"].get("x-request-id") == rid]


def test_malformed_json_is_400(gateway: Gateway) -> None:
    _error(_post(gateway, b'{"model": "sim-chat", "messages": ['), 400, "invalid_request_error")


def test_body_not_an_object_is_400(gateway: Gateway) -> None:
    _error(_post(gateway, b"[1, 2]"), 400, "invalid_request_error")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HELLO}, "model"),
        ({"model": 42, "messages": HELLO}, "model"),
        ({"model": "", "messages": HELLO}, "model"),
        ({"model": "sim-chat"}, "messages"),
        ({"model": "sim-chat", "messages": "hello"}, "messages"),
        ({"model": "sim-chat", "messages": []}, "messages"),
        ({"model": "sim-chat", "messages": ["hello"]}, "messages[0]"),
        ({"model": "sim-chat", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "sim-chat", "messages": HELLO, "stream": "yes"}, "stream"),
        ({"model": "sim-chat", "messages": HELLO, "stream": 1}, "stream"),
        ({"model": "sim-chat", "messages": HELLO, "max_tokens": "10"}, "max_tokens"),
        ({"model": "sim-chat", "messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"model": "sim-chat", "messages": HELLO, "n": 0}, "n"),
        ({"model": "sim-chat", "messages": HELLO, "n": 129}, "n"),
        ({"model": "sim-chat", "messages": HELLO, "n": 2.5}, "n"),
    ],
)
def test_missing_or_wrong_typed_fields_name_param(gateway: Gateway, body: dict, param: str) -> None:
    _error(_post(gateway, body), 400, "invalid_request_error", param)


def test_wrong_fields_raise_bad_request_in_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="sim-chat", messages="not a list")  # type: ignore[arg-type]
    assert exc.value.param == "messages"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-nonexistent", messages=HELLO)
    assert exc.value.code == "model_not_found"
    assert exc.value.param == "model"


def test_model_of_wrong_kind_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model="sim-chat", input="x")
    assert exc.value.param == "model"


def test_body_over_limit_is_413(gateway: Gateway) -> None:
    big = {"model": "sim-chat", "messages": [{"role": "user", "content": "x" * 70000}]}
    _error(_post(gateway, big), 413, "request_too_large")


def test_chunked_body_over_limit_is_413(gateway: Gateway) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "sim-chat", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 4096
        yield b'"}]}'

    r = httpx.post(
        gateway.v1 + "/chat/completions",
        headers={"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"},
        content=chunks(),
    )
    _error(r, 413, "request_too_large")


def test_unknown_path_is_404(gateway: Gateway) -> None:
    r = httpx.get(gateway.v1 + "/nothing/here", headers={"Authorization": f"Bearer {gateway.key}"})
    _error(r, 404, "not_found")


def test_wrong_method_is_405(gateway: Gateway) -> None:
    r = httpx.get(
        gateway.v1 + "/chat/completions", headers={"Authorization": f"Bearer {gateway.key}"}
    )
    _error(r, 405, "method_not_allowed")


def test_backend_down_is_503(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="down-chat", messages=HELLO)
    assert exc.value.status_code == 503
    assert exc.value.code == "backend_unavailable"


def test_backend_too_slow_is_504(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="slow-chat", messages=HELLO)
    assert exc.value.status_code == 504
    assert exc.value.code == "backend_timeout"


@pytest.mark.parametrize(
    ("status", "client_status", "code", "param"),
    [
        # the simulator's 400 is vLLM's "maximum context length" error
        (400, 400, "context_length_exceeded", "messages"),
        (404, 404, "model_not_found", "model"),
        (429, 503, "backend_unavailable", None),
        (500, 502, "backend_unavailable", None),
        (401, 502, "backend_unavailable", None),
    ],
)
def test_backend_errors_normalized(
    gateway: Gateway, status: int, client_status: int, code: str, param: str | None
) -> None:
    r = _post(gateway, {"model": "sim-chat", "messages": HELLO}, **{"x-sim-error": str(status)})
    err = _error(r, client_status, code, param)
    assert err["type"] in ("invalid_request_error", "server_error")


def test_backend_in_stream_error_raises_in_sdk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="sim-chat", messages=HELLO, stream=True, extra_headers={"x-sim-error-after": "3"}
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


@pytest.fixture(scope="module")
def gateway_without_processor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Envoy and a simulator, but no processor worker listening: the processor is unreachable."""
    tmp: Path = tmp_path_factory.mktemp("noproc")
    gw = start_gateway(tmp, base_config())
    for child in gw.stack.children:
        if child.name.startswith("worker-") and child.proc:
            child.proc.kill()
            child.proc.wait()
    try:
        yield gw
    finally:
        gw.stack.stop()


def test_processor_unreachable_fails_closed(gateway_without_processor: Gateway) -> None:
    gw: Gateway = gateway_without_processor
    rid = uuid.uuid4().hex
    r = httpx.post(
        gw.v1 + "/chat/completions",
        headers={"Authorization": f"Bearer {gw.key}", "X-Request-ID": rid},
        json={"model": "sim-chat", "messages": HELLO},
    )
    _error(r, 503, "gateway_unavailable")
    assert not [x for x in gw.sim_requests() if x["headers"].get("x-request-id") == rid]
    assert isinstance(gw.stack, Stack)


@pytest.mark.parametrize("value", [5, "x"])
def test_completions_take_max_tokens_not_the_chat_field(gateway: Gateway, value: object) -> None:
    """``max_completion_tokens`` is chat's: a completions backend ignores it (vLLM then stops at
    its default, 16), so it cannot be the limit metering reserves for; unchecked, a string in it
    reached metering and made a 500."""
    r = httpx.post(
        gateway.v1 + "/completions",
        headers={"Authorization": f"Bearer {gateway.key}"},
        json={"model": "sim-chat", "prompt": "hello", "max_completion_tokens": value},
        timeout=20,
    )
    _error(r, 400, "invalid_request_error", "max_completion_tokens")
