"""The same OpenAI SDK script against a vLLM-, a TGI-native- and a TGI-Messages-backed model gives
equivalent results; embeddings, rerank and classify through TEI; all metered, through Envoy."""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from extproc.money import Price, format_credits, parse_credits, token_cost
from extproc.tokens import estimate_prompt_tokens
from tests import h2client
from tests.harness import Gateway, base_config, sim_backend, start_gateway

PRICE = {"input_per_1m": 1, "output_per_1m": 2}
CHAT_MODELS = ("vllm-model", "tgi-native-model", "tgi-messages-model")
HELLO = [{"role": "user", "content": "Tell me about gateways."}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    cfg = base_config()
    cfg["backends"] = [
        sim_backend("vllm-b", "vllm"),
        sim_backend("vllm-emb", "vllm"),  # a vLLM server serves one model
        sim_backend("tgi-native", "tgi"),
        sim_backend("tgi-messages", "tgi", mode="messages"),
        sim_backend("tei-embed", "tei"),
        sim_backend("tei-rerank", "tei"),
        sim_backend("tei-classify", "tei"),
    ]
    cfg["models"] = [
        {"id": "vllm-model", "backend": "vllm-b", "pricing": PRICE},
        {"id": "tgi-native-model", "backend": "tgi-native", "pricing": PRICE},
        {"id": "tgi-messages-model", "backend": "tgi-messages", "pricing": PRICE},
        {"id": "tei-embed-model", "backend": "tei-embed", "kind": "embedding", "pricing": PRICE},
        {"id": "vllm-embed-model", "backend": "vllm-emb", "kind": "embedding", "pricing": PRICE},
        {"id": "tei-rerank-model", "backend": "tei-rerank", "kind": "rerank", "pricing": PRICE},
        {"id": "tei-cls-model", "backend": "tei-classify", "kind": "classify", "pricing": PRICE},
    ]
    g = start_gateway(Path(tmp_path_factory.mktemp("backends")), cfg)
    try:
        yield g
    finally:
        g.stack.stop()


@pytest.fixture()
def sdk(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=gw.key, max_retries=0, timeout=20)


def _ledger_debits(gw: Gateway) -> dict[str, dict]:
    r = httpx.get(
        gw.v1 + "/credits/transactions?limit=200", headers={"Authorization": f"Bearer {gw.key}"}
    )
    return {e["request_id"]: e for e in r.json()["data"] if e.get("type") == "debit"}


def _debit_for(gw: Gateway, rid: str) -> dict:
    for _ in range(100):
        debit = _ledger_debits(gw).get(rid)
        if debit:
            return debit
        time.sleep(0.1)
    raise AssertionError(f"no debit for {rid}")


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_same_sdk_script_on_every_chat_backend(sdk: openai.OpenAI, gw: Gateway, model: str) -> None:
    raw = sdk.chat.completions.with_raw_response.create(model=model, messages=HELLO, max_tokens=8)
    reply = raw.parse()
    rid = raw.headers["x-request-id"]
    assert reply.id == f"chatcmpl-{rid}" or reply.id.startswith("chatcmpl-")
    assert reply.model == model
    assert reply.object == "chat.completion"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens == 8
    assert float(raw.headers["x-credits-used"]) > 0

    # Streaming: role first, content deltas that add up to the non-stream text, one finish
    # reason, usage when asked for, and the stream ends cleanly ([DONE]).
    chunks = list(
        sdk.chat.completions.create(
            model=model,
            messages=HELLO,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert all(c.model == model for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == choice.message.content
    reasons = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason]
    assert reasons in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8

    # completions (legacy) where the backend has them
    if model != "tgi-messages-model":
        comp = sdk.completions.create(model=model, prompt="Once upon a time", max_tokens=5)
        assert comp.choices[0].text and comp.usage.completion_tokens == 5


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city"],
        },
    },
}
NOTE = {
    "type": "function",
    "function": {
        "name": "take_note",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
    },
}


@pytest.mark.parametrize("model", ("vllm-model", "tgi-messages-model"))
def test_tools_pass_through_where_the_backend_supports_them(
    sdk: openai.OpenAI, gw: Gateway, model: str
) -> None:
    """Function calling through vLLM and TGI's Messages API: the same SDK calls get a tool call
    of the chosen function with arguments that parse, streamed or not, and are metered."""
    asked = [{"role": "user", "content": "What is the weather in Oslo?"}]
    raw = sdk.chat.completions.with_raw_response.create(
        model=model,
        messages=asked,
        tools=[NOTE, WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64,
    )
    reply = raw.parse()
    (call,) = reply.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit", "days"} and args["unit"] == "celsius"
    assert reply.choices[0].finish_reason in ("tool_calls", "stop")
    assert reply.usage.completion_tokens > 0 and float(raw.headers["x-credits-used"]) > 0

    # "auto" picks the first tool; streamed, the arguments arrive as deltas of one call
    chunks = list(
        sdk.chat.completions.create(
            model=model, messages=asked, tools=[WEATHER], max_tokens=64, stream=True
        )
    )
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather"
    streamed = "".join(tc.function.arguments or "" for tc in calls)
    assert set(json.loads(streamed)) == {"city", "unit", "days"}
    assert {tc.index for tc in calls} == {0}

    with pytest.raises(openai.BadRequestError):  # a tool_choice naming no given tool
        sdk.chat.completions.create(
            model=model, messages=asked, tools=[WEATHER], tool_choice="nope", max_tokens=8
        )


def test_tools_on_tgi_native_are_refused_with_the_param(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.chat.completions.create(
            model="tgi-native-model", messages=HELLO, tools=[WEATHER], max_tokens=8
        )
    assert exc.value.status_code == 400
    assert exc.value.body["param"] == "tools"


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_streams_are_metered_with_their_real_usage(gw: Gateway, model: str) -> None:
    with httpx.stream(
        "POST",
        gw.v1 + "/chat/completions",
        headers={"Authorization": f"Bearer {gw.key}"},
        json={"model": model, "messages": HELLO, "max_tokens": 6, "stream": True},
    ) as r:
        rid = r.headers["x-request-id"]
        body = r.read().decode()
    assert body.rstrip().endswith("data: [DONE]")
    assert '"completion_tokens":6' in body  # the credits comment before [DONE]
    assert '"usage"' not in body.replace(": tollgate", "")  # not asked for: stripped
    for _ in range(50):
        debit = _ledger_debits(gw).get(rid)
        if debit:
            break
        time.sleep(0.1)
    assert debit and debit["tokens_out"] == 6 and debit["tokens_in"] > 0
    assert "counted" not in debit  # the backend's own usage


@pytest.mark.parametrize(
    ("model", "extra"),
    [(m, {}) for m in CHAT_MODELS] + [("tgi-native-model", {"stop": ["\u0007never"]})],
    ids=[*CHAT_MODELS, "tgi-native-by-processor"],
)
def test_a_cut_stream_is_charged_for_what_it_generated_on_every_backend(
    sdk: openai.OpenAI, gw: Gateway, model: str, extra: dict
) -> None:
    """vLLM reports usage on every chunk; TGI only in its last event, which a stream the client
    cuts never gets: the meter counts the chunks that passed (TGI sends one per token) and the
    stream is charged them and the prompt estimate, not its whole reservation."""
    body = {"model": model, "messages": HELLO, **extra}
    stream = sdk.chat.completions.create(
        **body,
        max_tokens=200,
        stream=True,
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
    debit = _debit_for(gw, rid)
    assert debit["reason"] == "client_disconnected", debit
    # what passed Envoy before it saw the cut (100 ms apart: a loaded machine may pass one more)
    assert 5 <= debit["tokens_out"] <= 8, debit
    if model != "vllm-model":  # TGI's stream says nothing of the prompt: the estimate
        assert debit["tokens_in"] == estimate_prompt_tokens("chat", body)
        assert debit["counted"] is True  # and the entry says the tokens were counted
    else:
        assert "counted" not in debit  # vLLM's running usage
    price = Price(1_000_000, 2_000_000)
    assert debit["amount"] == "-" + format_credits(
        token_cost(price, debit["tokens_in"], debit["tokens_out"])
    )


@pytest.mark.parametrize("model", ("tgi-native-model", "tgi-messages-model"))
def test_tgis_own_stream_through_the_proxy_is_charged_its_counts_whole_or_cut(
    gw: Gateway, model: str
) -> None:
    """TGI's own /generate_stream, passed untranslated by the per-model proxy: a whole stream is
    charged the counts of its last event (on either TGI mode, whichever stream meter runs), a
    cut one the events that passed (one per token) and the prompt estimate."""
    url = f"{gw.base_url}/models/{model}/proxy/v1/generate_stream"
    auth = {"Authorization": f"Bearer {gw.key}"}
    body = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 6}}
    with httpx.stream("POST", url, headers=auth, json=body, timeout=20) as r:
        assert r.status_code == 200, r.read()
        rid, text = r.headers["x-request-id"], r.read().decode()
    last = json.loads([e for e in text.split("\n\n") if e.startswith("data:")][-1][5:])
    debit = _debit_for(gw, rid)
    assert debit["reason"] != "client_disconnected" and "counted" not in debit, debit
    details = last["details"]
    assert (debit["tokens_in"], debit["tokens_out"]) == (
        details["input_length"],
        details["generated_tokens"],
    ), debit

    body = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 200}}
    pace = {"x-sim-itl-ms": "100", "x-sim-output-tokens": "200"}
    with httpx.stream("POST", url, headers={**auth, **pace}, json=body, timeout=20) as r:
        assert r.status_code == 200
        rid, got = r.headers["x-request-id"], 0
        for line in r.iter_lines():
            got += line.startswith("data:")
            if got == 5:
                break
    debit = _debit_for(gw, rid)
    assert debit["reason"] == "client_disconnected", debit
    assert 5 <= debit["tokens_out"] <= 8, debit
    # the proxy estimates TGI's inputs as a completion's prompt
    prompt = estimate_prompt_tokens("completions", {"prompt": body["inputs"]})
    assert debit["tokens_in"] == prompt and debit["counted"] is True, debit
    usage = httpx.get(gw.v1 + "/usage?limit=100", headers=auth).json()["data"]
    record = next(u for u in usage if u["request_id"] == rid)
    assert record["counted"] is True and record["tokens_out"] == debit["tokens_out"]


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_a_stream_cut_before_its_first_token_is_charged_its_prompt(gw: Gateway, model: str) -> None:
    """The client gives up while the request waits in the backend's queue or prefill (the
    response has begun, no token yet): charged the prompt as estimated, not the reservation."""
    body = {"model": model, "messages": HELLO}
    headers = {"Authorization": f"Bearer {gw.key}", "x-sim-ttft-ms": "3000"}
    t0 = time.monotonic()
    with httpx.stream(
        "POST",
        gw.v1 + "/chat/completions",
        headers=headers,
        json={**body, "max_tokens": 50, "stream": True},
    ) as r:
        assert r.status_code == 200 and time.monotonic() - t0 < 2.5  # headers before the token
        rid = r.headers["x-request-id"]
    entry = _debit_for(gw, rid)
    assert entry["reason"] == "client_disconnected", entry
    prompt = estimate_prompt_tokens("chat", body)
    assert (entry["tokens_in"], entry["tokens_out"]) == (prompt, 0), entry
    assert entry["counted"] is True
    assert entry["amount"] == "-" + format_credits(
        token_cost(Price(1_000_000, 2_000_000), prompt, 0)
    )


@pytest.mark.parametrize("error_after", [0, 2])
@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("tgi-native-model", {}),
        ("tgi-messages-model", {}),
        ("tgi-native-model", {"stop": ["\u0007never"]}),
    ],
    ids=["tgi-native-model", "tgi-messages-model", "tgi-native-by-processor"],
)
def test_a_tgi_stream_that_fails_is_charged_what_it_generated(
    gw: Gateway, model: str, extra: dict, error_after: int
) -> None:
    """TGI reports failures (overload, validation, a generation error) as an event in a 200
    stream. Before its first token nothing was made: the request is voided; after n tokens it
    is charged them (and the prompt estimate), not its reservation."""
    body = {"model": model, "messages": HELLO, **extra}
    headers = {"Authorization": f"Bearer {gw.key}", "x-sim-error-after": str(error_after)}
    with httpx.stream(
        "POST",
        gw.v1 + "/chat/completions",
        headers=headers,
        json={**body, "max_tokens": 50, "stream": True},
    ) as r:
        assert r.status_code == 200
        rid, text = r.headers["x-request-id"], r.read().decode()
    assert '"error"' in text and text.rstrip().endswith("data: [DONE]")
    figures = json.loads(next(x for x in text.split("\n") if x.startswith(": tollgate "))[11:])
    entry = None
    for _ in range(100):
        r = httpx.get(
            gw.v1 + "/credits/transactions?limit=50", headers={"Authorization": f"Bearer {gw.key}"}
        )
        entry = next((e for e in r.json()["data"] if e.get("request_id") == rid), None)
        if entry:
            break
        time.sleep(0.1)
    assert entry is not None
    if error_after == 0:
        assert entry["type"] == "void" and parse_credits(entry["amount"]) == 0, entry
        assert figures["credits_used"] == "0.00"
    else:
        prompt = estimate_prompt_tokens("chat", body)
        assert entry["type"] == "debit", entry
        assert (entry["tokens_in"], entry["tokens_out"]) == (prompt, error_after), entry
        assert entry["amount"] == "-" + figures["credits_used"]
        assert entry["amount"] == "-" + format_credits(
            token_cost(Price(1_000_000, 2_000_000), prompt, error_after)
        )


@pytest.mark.parametrize(
    ("model", "extra"),
    [(m, {}) for m in CHAT_MODELS] + [("tgi-native-model", {"stop": ["\u0007never"]})],
    ids=[*CHAT_MODELS, "tgi-native-by-processor"],
)
def test_http2_streams_end_whole_and_in_credit_trailers_on_every_backend(
    gw: Gateway, model: str, extra: dict
) -> None:
    """Over HTTP/2, every metered stream ends with the credits comment, [DONE] and the credit
    trailers: vLLM's, TGI-native's (translated by Envoy's stream meter, or by the processor when
    it has stop sequences) and TGI Messages' (whose chunks the processor translates), the
    trailers the same figures as the comment."""
    body = {"model": model, "messages": HELLO, "max_tokens": 6, "stream": True, **extra}
    r = h2client.post(gw.v1 + "/chat/completions", body, {"Authorization": f"Bearer {gw.key}"})
    assert r.status == 200
    lines = r.lines()
    assert lines[-1] == "data: [DONE]" and '"completion_tokens":6' in lines[-2]
    figures = json.loads(lines[-2].removeprefix(": tollgate "))
    assert r.trailers == {
        "x-credits-used": figures["credits_used"],
        "x-credits-remaining": figures["credits_remaining"],
    }
    assert "x-tollgate-trailers" not in r.headers  # the processor's cue stays inside


def test_embeddings_answer_larger_than_envoys_buffer_passes_and_is_metered(gw: Gateway) -> None:
    """json_to_metadata buffers a JSON answer to read its usage; one of 1 MB or more passes
    unread (else Envoy's buffer limit would turn it into a 500) and is charged the reservation."""
    h = {"Authorization": f"Bearer {gw.key}"}
    small = httpx.post(
        gw.v1 + "/embeddings", headers=h, json={"model": "vllm-embed-model", "input": ["hi"] * 4}
    )
    assert small.status_code == 200
    tokens = small.json()["usage"]["prompt_tokens"]
    assert small.headers["x-credits-used"] == format_credits(
        token_cost(Price(1_000_000, 2_000_000), tokens, 0)
    )
    r = httpx.post(
        gw.v1 + "/embeddings",
        headers=h,
        json={"model": "vllm-embed-model", "input": ["hello world"] * 300},
        timeout=30,
    )
    assert r.status_code == 200, r.text[:300]
    assert int(r.headers["content-length"]) >= 1_000_000 and len(r.json()["data"]) == 300
    rid = r.headers["x-request-id"]
    debit = _ledger_debits(gw)[rid]
    assert debit["tokens_in"] > 0 and parse_credits(debit["amount"]) < 0
    assert r.headers["x-credits-used"] == format_credits(-parse_credits(debit["amount"]))


def test_tgi_native_rejects_and_drops_what_it_cannot_do(gw: Gateway) -> None:
    h = {"Authorization": f"Bearer {gw.key}"}
    r = httpx.post(
        gw.v1 + "/chat/completions",
        headers=h,
        json={"model": "tgi-native-model", "messages": HELLO, "n": 2},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(
        gw.v1 + "/chat/completions",
        headers=h,
        json={
            "model": "tgi-native-model",
            "messages": HELLO,
            "presence_penalty": 0.5,
            "top_p": 1.0,
            "max_tokens": 3,
        },
    )
    assert r.status_code == 200, r.text  # top_p 1.0 would be TGI's own 422
    assert "presence_penalty" in r.headers["x-gateway-dropped-params"]
    seen = httpx.get(gw.sim_url("tgi-native") + "/sim/requests").json()
    last = seen[-1] if isinstance(seen, list) else seen["requests"][-1]
    assert last["path"] == "/generate"


@pytest.mark.parametrize("error_after", [None, "2"])
def test_tgi_native_stream_translated_by_envoy_matches_the_processors(
    gw: Gateway, error_after: str | None
) -> None:
    """A metered TGI-native stream without stop sequences, logprobs or echo is translated by
    Envoy's stream meter (tgi_native.stream_recipe): no processor message per chunk. With a stop
    sequence the processor translates it. The same simulator stream gives the same chunks (but
    for ids), in-stream errors included."""

    def translate(extra: dict) -> tuple[list[dict], int]:
        body = {
            "model": "tgi-native-model",
            "messages": HELLO,
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": True},
            **extra,
        }
        headers = {"Authorization": f"Bearer {gw.key}"}
        if error_after:
            headers["x-sim-error-after"] = error_after
        m0 = gw.ext_proc_stat("stream_msgs_sent")
        with httpx.stream("POST", gw.v1 + "/chat/completions", headers=headers, json=body) as r:
            assert r.status_code == 200
            rid, text = r.headers["x-request-id"], r.read().decode()
        m1 = gw.ext_proc_stat("stream_msgs_sent")
        events = []
        for line in text.split("\n"):
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    assert event["error"].pop("request_id") == rid
                else:
                    assert event.pop("id").endswith(rid)
                    event.pop("created")
                events.append(event)
        assert text.rstrip().endswith("data: [DONE]")
        return events, m1 - m0

    by_envoy, envoy_msgs = translate({})
    by_processor, processor_msgs = translate({"stop": ["\u0007never"]})
    assert by_envoy == by_processor and len(by_envoy) >= 3
    assert envoy_msgs == 3 and processor_msgs > 3
    if error_after:
        assert "error" in by_envoy[-1] and by_envoy[-1]["error"]["code"]


def test_tgi_in_stream_error_becomes_an_sdk_error(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="tgi-native-model",
        messages=HELLO,
        stream=True,
        max_tokens=8,
        extra_headers={"x-sim-error-after": "2"},
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_tei_embeddings_float_and_base64(sdk: openai.OpenAI) -> None:
    floats = sdk.embeddings.create(model="tei-embed-model", input=["hello", "world"])
    assert [d.index for d in floats.data] == [0, 1]
    assert floats.usage.prompt_tokens > 0
    raw = sdk.embeddings.with_raw_response.create(
        model="tei-embed-model", input="hello", encoding_format="base64"
    )
    b64 = raw.http_response.json()["data"][0]["embedding"]
    decoded = struct.unpack(f"<{len(base64.b64decode(b64)) // 4}f", base64.b64decode(b64))
    assert decoded == pytest.approx(floats.data[0].embedding, rel=1e-6)
    short = sdk.embeddings.create(model="tei-embed-model", input="hello", dimensions=16)
    assert len(short.data[0].embedding) == 16


def test_tei_rerank_and_classify(gw: Gateway) -> None:
    h = {"Authorization": f"Bearer {gw.key}"}
    docs = ["a gateway meters tokens", "bananas are yellow", "envoy proxies requests"]
    r = httpx.post(
        gw.v1 + "/rerank",
        headers=h,
        json={
            "model": "tei-rerank-model",
            "query": "what is a gateway?",
            "documents": docs,
            "top_n": 2,
            "return_documents": True,
        },
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]
    assert results[0]["document"]["text"] == docs[results[0]["index"]]
    assert float(r.headers["x-credits-used"]) > 0
    c = httpx.post(
        gw.v1 + "/classify", headers=h, json={"model": "tei-cls-model", "input": ["great", "bad"]}
    )
    assert c.status_code == 200, c.text
    data = c.json()["data"]
    assert [d["index"] for d in data] == [0, 1] and all(d["label"] for d in data)
    # the wrong task for a model is the gateway's 400, not TEI's 424
    bad = httpx.post(
        gw.v1 + "/rerank",
        headers=h,
        json={"model": "tei-rerank-model", "query": "", "documents": docs},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "query"
    wrong = httpx.post(
        gw.v1 + "/rerank",
        headers=h,
        json={"model": "tei-embed-model", "query": "q", "documents": docs},
    )
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model"


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_an_http2_stream_the_client_resets_is_charged_what_passed(gw: Gateway, model: str) -> None:
    """An HTTP/2 client gives up with RST_STREAM (no connection closes): the same settlement as
    a cut HTTP/1.1 stream, and the ledger says the client disconnected."""
    body = {"model": model, "messages": HELLO, "max_tokens": 200, "stream": True}
    headers = {
        "Authorization": f"Bearer {gw.key}",
        "x-sim-itl-ms": "100",
        "x-sim-output-tokens": "200",
    }
    r = h2client.post(gw.v1 + "/chat/completions", body, headers, cut_after=4)
    assert r.status == 200
    rid = r.headers["x-request-id"]
    debit = _debit_for(gw, rid)
    assert debit["reason"] == "client_disconnected", debit
    assert 1 <= debit["tokens_out"] <= 8, debit
