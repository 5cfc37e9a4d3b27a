"""The OpenAI-compatible surface through real Envoy + processor + Valkey + simulator."""

from __future__ import annotations

import concurrent.futures
import uuid

import httpx
import openai
import pytest

from tests.harness import Gateway

HELLO = [{"role": "user", "content": "Say hello to the gateway"}]


def test_models_list_and_retrieve(client: openai.OpenAI, gateway: Gateway) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [m.id for m in gateway.cfg.models]
    card = client.models.retrieve("sim-chat")
    assert card.id == "sim-chat" and card.object == "model"
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("no-such-model")
    assert exc.value.body["code"] == "model_not_found"


def test_models_list_needs_no_backend_message(gateway: Gateway) -> None:
    before = gateway.sim_requests()
    r = httpx.get(gateway.v1 + "/models", headers={"Authorization": f"Bearer {gateway.key}"})
    assert r.status_code == 200 and r.json()["object"] == "list"
    assert len(gateway.sim_requests()) == len(before)


def test_chat_non_stream(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="sim-chat", messages=HELLO)
    reply = raw.parse()
    assert reply.model == "sim-chat"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert raw.headers["x-gateway-model"] == "sim-chat"
    assert raw.headers["x-gateway-backend"] == "vllm-chat"
    assert raw.headers["x-request-id"]


def test_stream_deltas_equal_non_stream_text(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me about toll gates"}]
    full = client.chat.completions.create(model="sim-chat", messages=messages)
    chunks = list(client.chat.completions.create(model="sim-chat", messages=messages, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert len(chunks) > 3
    assert all(c.model == "sim-chat" for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="sim-chat", prompt="Once upon a time", max_tokens=5)
    assert reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_embeddings(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model="sim-embed", input=["one", "two"])
    assert reply.model == "sim-embed"
    assert [d.index for d in reply.data] == [0, 1]
    assert len(reply.data[0].embedding) > 0


def test_non_stream_request_drops_stream_options(client: openai.OpenAI, gateway: Gateway) -> None:
    rid = str(uuid.uuid4())
    client.chat.completions.create(
        model="sim-chat",
        messages=HELLO,
        extra_body={"stream_options": {"include_usage": True}},
        extra_headers={"X-Request-ID": rid},
    )
    seen = [r for r in gateway.sim_requests() if r["headers"].get("x-request-id") == rid]
    assert len(seen) == 1 and "stream_options" not in seen[0]["body"]


def test_aliased_model_rewritten_both_ways(client: openai.OpenAI, gateway: Gateway) -> None:
    rid = str(uuid.uuid4())
    reply = client.chat.completions.create(
        model="chat-alias", messages=HELLO, extra_headers={"X-Request-ID": rid}
    )
    assert reply.model == "chat-alias"
    seen = [r for r in gateway.sim_requests() if r["headers"].get("x-request-id") == rid]
    assert seen[0]["body"]["model"] == "sim-chat"
    chunks = list(client.chat.completions.create(model="chat-alias", messages=HELLO, stream=True))
    assert chunks and all(c.model == "chat-alias" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content


def test_request_id_kept_echoed_and_forwarded(gateway: Gateway) -> None:
    rid = "client-" + uuid.uuid4().hex
    r = httpx.post(
        gateway.v1 + "/chat/completions",
        headers={"Authorization": f"Bearer {gateway.key}", "X-Request-ID": rid},
        json={"model": "sim-chat", "messages": HELLO},
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == rid
    # vLLM (and the simulator) use the received X-Request-Id as the completion id's base.
    assert r.json()["id"] == f"chatcmpl-{rid}"
    seen = [x for x in gateway.sim_requests() if x["headers"].get("x-request-id") == rid]
    assert len(seen) == 1
    assert "authorization" not in seen[0]["headers"]


def test_request_id_generated_when_absent(gateway: Gateway) -> None:
    r = httpx.post(
        gateway.v1 + "/chat/completions",
        headers={"Authorization": f"Bearer {gateway.key}"},
        json={"model": "sim-chat", "messages": HELLO},
    )
    rid = r.headers["x-request-id"]
    uuid.UUID(rid)
    assert r.json()["id"] == f"chatcmpl-{rid}"


def test_request_id_on_error_replies(gateway: Gateway) -> None:
    rid = "err-" + uuid.uuid4().hex
    r = httpx.post(gateway.v1 + "/chat/completions", headers={"X-Request-ID": rid}, json={})
    assert r.status_code == 401
    assert r.headers["x-request-id"] == rid
    assert r.json()["error"]["request_id"] == rid


def test_twenty_concurrent_streams_never_interleave(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key, max_retries=0)
    prompts = [f"stream number {i} about topic {i * 7}" for i in range(20)]
    expected = {
        p: client.chat.completions.create(
            model="sim-chat", messages=[{"role": "user", "content": p}]
        )
        .choices[0]
        .message.content
        for p in prompts
    }

    def run(prompt: str) -> tuple[str, set[str], str]:
        rid = uuid.uuid4().hex
        stream = client.chat.completions.create(
            model="sim-chat",
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            extra_headers={"X-Request-ID": rid},
        )
        ids, text = set(), []
        for chunk in stream:
            ids.add(chunk.id)
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
        return rid, ids, "".join(text)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = dict(zip(prompts, pool.map(run, prompts), strict=True))
    for prompt, (rid, ids, text) in results.items():
        assert ids == {f"chatcmpl-{rid}"}, "a chunk from another stream leaked in"
        assert text == expected[prompt]


def _ext_proc_counts(gateway: Gateway) -> tuple[int, int]:
    return gateway.ext_proc_stat("streams_started"), gateway.ext_proc_stat("stream_msgs_sent")


def test_at_most_three_messages_per_non_stream_request(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key, max_retries=0)
    s0, m0 = _ext_proc_counts(gateway)
    for _ in range(10):
        client.chat.completions.create(model="sim-chat", messages=HELLO)
    s1, m1 = _ext_proc_counts(gateway)
    assert s1 - s0 == 10
    assert m1 - m0 <= 30


def test_no_processor_message_per_streamed_chunk(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key, max_retries=0)
    s0, m0 = _ext_proc_counts(gateway)
    chunks = list(
        client.chat.completions.create(
            model="sim-chat",
            messages=HELLO,
            stream=True,
            extra_headers={"x-sim-output-tokens": "50"},
        )
    )
    s1, m1 = _ext_proc_counts(gateway)
    assert len(chunks) >= 50
    assert s1 - s0 == 1
    assert m1 - m0 == 3  # request headers, request body, response headers
