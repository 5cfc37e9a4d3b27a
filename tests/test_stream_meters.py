"""The two stream meters (native stream_meter.c, Lua stream_meter.lua) give clients the same bytes.

One backend here is not a simulator but a script of SSE bytes cut at awkward places (mid-event,
mid-"[DONE]", blank line split from its event), with usage written with and without spaces and
as null: the same script goes through a gateway metered by the native meter and one metered by
the Lua meter, and what the clients get, what the ledger charges and the HTTP/2 trailers must
be identical.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from extproc import native_meter
from extproc.config import load_config
from extproc.envoy_config import LUA_METER_HEADER, NATIVE_METER_FILTER, render
from extproc.money import format_credits, parse_credits, token_cost
from extproc.supervisor import Stack, StartError
from extproc.tokens import estimate_prompt_tokens
from tests import h2client
from tests.harness import PRICE, Gateway, base_config, grant, start_gateway

HEAD = '{"id":"chatcmpl-s","object":"chat.completion.chunk","created":1,"model":"scripted",'
# The backend's answer, as the chunks it writes (each flushed, 20 ms apart).
SCRIPT = [
    "data: " + HEAD + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
    '"finish_reason":null}], "usage": {"prompt_tokens": 9, "total_tokens": 9, '
    '"completion_tokens": 0}}\n\ndata: ' + HEAD + '"choices":[{"index":0,"delta":{"content":"Tol',
    'l"},"finish_reason":null}],"usage":{"prompt_tokens":9,"total_tokens":10,'
    '"completion_tokens":1}}\n',
    "\n: a keep-alive comment\n\ndata: " + HEAD + '"choices":[{"index":0,"delta":{"content":'
    '" {gate}"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"total_tokens":11,'
    '"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":0}}}\n\n',
    "data: " + HEAD + '"choices":[{"index":0,"delta":{},"finish_reason":null}],"usage":null}\n\n',
    "data: " + HEAD + '"choices":[],"usage":{"prompt_tokens":9,"total_tokens":11,'
    '"completion_tokens":2}}\n\ndata: [DO',
    "NE]\n\n",
]

# A backend that reports no usage at all (as TGI's Messages API before its last event): the
# meters count the chunks with a choice as output tokens (not the opening one with the role
# alone, nor the closing empty delta).
NO_USAGE = [
    "data: " + HEAD + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
    '"finish_reason":null}]}\n\ndata: ' + HEAD + '"choices":[{"index":0,"delta":{"content":"Tol',
    'l"},"finish_reason":null}]}\n\ndata: ' + HEAD + '"choices":[{"index":0,"delta":{"content":'
    '"gate"},"finish_reason":null}]}\n\n',
    "data: "
    + HEAD
    + '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n',
]


# A usage-only event before [DONE] whose figures equal the count and the prompt estimate of
# the test's request: the meters must still settle it as the backend's usage, not a count.
_HI = {"model": "scripted", "messages": [{"role": "user", "content": "hi there"}]}
LATE_USAGE = (
    "data: " + HEAD + '"choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":2,'
    '"total_tokens":%d}}\n\ndata: [DONE]'
) % (estimate_prompt_tokens("chat", _HI), estimate_prompt_tokens("chat", _HI) + 2)


# A non-streaming answer whose content type has a charset parameter
JSON_ANSWER = (
    '{"id":"chatcmpl-j","object":"chat.completion","created":1,"model":"scripted","choices":'
    '[{"index":0,"message":{"role":"assistant","content":"Toll gate"},"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}'
)


class _Scripted(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # health checks
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        script = self.headers.get("x-sim-script")
        if script == "close-mid-json":  # the backend dies in the middle of its answer
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", "500")
            self.end_headers()
            self.wfile.write(JSON_ANSWER.encode()[:40])
            self.wfile.flush()
            self.close_connection = True
            return
        if script in ("json-charset", "json-huge", "json-error"):  # as Go writes JSON
            body = JSON_ANSWER.encode()
            if script == "json-error":  # an error sent with 200
                body = b'{"error":{"message":"boom","type":"server_error","code":500}}'
            if script == "json-huge":  # a broken backend's count
                body = body.replace(b'"completion_tokens":3', b'"completion_tokens":1e18')
            self.send_response(200)
            self.send_header("content-type", "application/json; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        script = self.headers.get("x-sim-script")
        parts = SCRIPT if script is None else NO_USAGE
        if script == "no-usage-openai":  # OpenAI's opening chunk also says refusal: null
            parts = [NO_USAGE[0].replace('"content":""}', '"content":"","refusal":null}', 1)]
            parts += NO_USAGE[1:]
        elif script == "late-usage":  # usage at the end only, the same as the count
            parts = [*NO_USAGE[:-1], NO_USAGE[-1].replace("data: [DONE]", LATE_USAGE, 1)]
        elif script == "crlf":  # the same stream framed with CRLF (as sse-starlette writes it)
            parts = [p.replace("\n", "\r\n") for p in SCRIPT]
            parts[0] = parts[0][:-1]  # a CRLF split between two chunks
            parts[1] = "\n" + parts[1]
        elif script == "no-last-blank-line":  # ends with "data: [DONE]" and no blank line
            parts = [*SCRIPT[:-1], SCRIPT[-1].rstrip("\n")]
        elif script in ("spaced", "spaced-no-usage"):  # JSON as Python's json.dumps writes it
            base = SCRIPT if script == "spaced" else NO_USAGE
            parts = [p.replace('":', '": ').replace(',"', ', "') for p in base]
        elif script == "huge-usage":  # counts no long long holds, and one in exponent form
            parts = [
                p.replace(
                    '"completion_tokens":2', '"completion_tokens":9223372036854775809'
                ).replace('"completion_tokens": 0', '"completion_tokens": 1e18')
                for p in SCRIPT
            ]
        try:
            for part in parts:
                data = part.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.02)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the cut-stream tests close it mid-way (else a traceback lands in the output)


@pytest.fixture(scope="module")
def scripted_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def _config(port: int, meter: str) -> dict:
    cfg = base_config()
    cfg["backends"].append(
        {
            "name": "scripted",
            "kind": "vllm",
            "endpoints": [f"127.0.0.1:{port}"],
            "request_timeout": "20s",
        }
    )
    cfg["models"].append({"id": "scripted", "backend": "scripted", "pricing": PRICE})
    # the same script as a TGI server: its JSON answers are not TGI's (an unreadable 200)
    cfg["backends"].append(
        {
            "name": "scripted-tgi",
            "kind": "tgi",
            "endpoints": [f"127.0.0.1:{port}"],
            "request_timeout": "20s",
        }
    )
    cfg["models"].append({"id": "scripted-tgi", "backend": "scripted-tgi", "pricing": PRICE})
    cfg["metering"]["stream_meter"] = meter
    return cfg


@pytest.fixture(scope="module")
def gateways(
    tmp_path_factory: pytest.TempPathFactory, scripted_port: int
) -> Iterator[dict[str, Gateway]]:
    started: dict[str, Gateway] = {}
    try:
        for meter in ("native", "lua"):
            tmp = tmp_path_factory.mktemp("meter-" + meter)
            started[meter] = start_gateway(tmp, _config(scripted_port, meter))
        yield started
    finally:
        for gw in started.values():
            gw.stack.stop()


def _meters(gw: Gateway) -> str:
    return (gw.stack.run_dir / "envoy.yaml").read_text()


def _account(gw: Gateway, account: str) -> str:
    key = gw.new_key("meters", account)
    grant(str(gw.stack.config_path), account, "3")
    return key


@pytest.mark.parametrize("include_usage", [False, True])
def test_both_meters_give_the_same_stream(
    gateways: dict[str, Gateway], include_usage: bool
) -> None:
    assert NATIVE_METER_FILTER in _meters(gateways["native"])
    assert NATIVE_METER_FILTER not in _meters(gateways["lua"])
    account, rid = "acct-" + uuid.uuid4().hex[:8], "meters-" + uuid.uuid4().hex
    body: dict = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
    body |= {"stream": True, "max_tokens": 20}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    got = {}
    for meter, gw in gateways.items():
        key = _account(gw, account)
        headers = {"Authorization": f"Bearer {key}", "X-Request-ID": rid}
        with httpx.stream(
            "POST", gw.v1 + "/chat/completions", json=body, headers=headers, timeout=20
        ) as r:
            assert r.status_code == 200
            assert LUA_METER_HEADER not in r.headers
            got[meter] = r.read().decode()
        got[meter + " ledger"] = _debit(gw, key, rid)
    assert got["native"] == got["lua"]
    assert got["native ledger"] == got["lua ledger"]
    events = got["native"].split("\n\n")
    assert ": a keep-alive comment" in events and '" {gate}"' in got["native"]
    assert ('"usage":{' in got["native"]) is include_usage  # only the usage-only chunk
    assert '"usage":null' in got["native"]  # not an object: left as the backend wrote it
    figures = json.loads(next(e for e in events if e.startswith(": tollgate "))[11:])
    assert figures["request_id"] == rid
    assert (figures["prompt_tokens"], figures["completion_tokens"]) == (9, 2)
    assert events[-2:] == ["data: [DONE]", ""]
    ledger = got["native ledger"]
    assert (ledger["tokens_in"], ledger["tokens_out"]) == (9, 2)
    assert ledger["amount"] == "-" + figures["credits_used"]


@pytest.mark.parametrize("script", ["no-usage", "no-usage-openai", "late-usage"])
@pytest.mark.parametrize("cut", [False, True])
def test_a_stream_without_usage_is_charged_its_chunks_by_both_meters(
    gateways: dict[str, Gateway], cut: bool, script: str
) -> None:
    account, rid = "acct-" + uuid.uuid4().hex[:8], "meters-" + uuid.uuid4().hex
    body: dict = dict(_HI)
    prompt = estimate_prompt_tokens("chat", body)
    body |= {"stream": True, "max_tokens": 20}
    got = {}
    for meter, gw in gateways.items():
        key = _account(gw, account)
        headers = {
            "Authorization": f"Bearer {key}",
            "X-Request-ID": rid,
            "x-sim-script": script,
        }
        with httpx.stream(
            "POST", gw.v1 + "/chat/completions", json=body, headers=headers, timeout=20
        ) as r:
            assert r.status_code == 200
            text = ""
            for part in r.iter_text():
                text += part
                if cut and '"gate"' in text:
                    break  # before the last chunk and [DONE]
            got[meter] = text
        got[meter + " ledger"] = _debit(gw, key, rid)
    assert got["native ledger"] == got["lua ledger"]
    ledger = got["native ledger"]
    assert (ledger["tokens_in"], ledger["tokens_out"]) == (prompt, 2)  # "Toll", "gate"
    if script == "late-usage" and not cut:
        assert "counted" not in ledger  # the backend's usage, equal to the count or not
    else:
        assert ledger["counted"] is True  # the estimate and the count: the entry says so
    price = gateways["native"].cfg.models_by_id["scripted"].price
    assert ledger["amount"] == "-" + format_credits(token_cost(price, prompt, 2))
    if cut:
        assert ledger["reason"] == "client_disconnected"
    else:
        assert got["native"] == got["lua"]
        figures = json.loads(got["native"].split("\n\n")[-3][11:])
        assert (figures["prompt_tokens"], figures["completion_tokens"]) == (prompt, 2)
        assert ledger["amount"] == "-" + figures["credits_used"]


def test_an_overrun_paid_from_credits_others_hold_shows_in_both_meters_figures(
    gateways: dict[str, Gateway],
) -> None:
    """A stream whose usage costs more than it reserved while another stream of the account
    holds the rest of the balance: the settlement charges it all from the balance (not capped
    at what the other reservation left), and both meters' figures say the same as the ledger."""
    price = gateways["native"].cfg.models_by_id["scripted"].price
    body: dict = dict(_HI) | {"stream": True, "max_tokens": 1}  # the script generates 2
    own = token_cost(price, estimate_prompt_tokens("chat", body), 1)
    slow = {"model": "sim-chat", "messages": _HI["messages"], "max_tokens": 10, "stream": True}
    hold = token_cost(price, estimate_prompt_tokens("chat", slow), 10)
    cost = token_cost(price, 9, 2)  # the script's usage
    assert own < cost <= own + hold
    for gw in gateways.values():
        account, rid = "acct-" + uuid.uuid4().hex[:8], "meters-" + uuid.uuid4().hex
        key = gw.new_key("meters", account)
        grant(str(gw.stack.config_path), account, format_credits(own + hold))
        auth = {"Authorization": f"Bearer {key}"}
        pace = {"x-sim-itl-ms": "200", "x-sim-output-tokens": "10"}
        with httpx.stream(
            "POST", gw.v1 + "/chat/completions", json=slow, headers=auth | pace, timeout=20
        ) as held:
            assert held.status_code == 200
            chunks = held.iter_raw()  # kept: a dropped iterator closes the stream
            next(chunks)  # reserved, and running
            r = httpx.post(
                gw.v1 + "/chat/completions", json=body, headers=auth | {"X-Request-ID": rid}
            )
            assert r.status_code == 200, r.text
        figures = json.loads(r.text.split("\n\n")[-3][11:])
        assert figures["credits_used"] == format_credits(cost), figures  # was `own`'s worth
        debit = _debit(gw, key, rid)
        assert debit["amount"] == "-" + format_credits(cost)  # all of it: nothing written off


@pytest.mark.parametrize("script", ["crlf", "no-last-blank-line"])
def test_a_stream_framed_otherwise_reaches_the_client_whole(
    gateways: dict[str, Gateway], script: str
) -> None:
    """SSE may end its lines with CRLF (or CR), and a stream may end without its last blank
    line: the client still gets every event, [DONE] and the figures, and the ledger the
    backend's usage. Before, a CRLF stream reached the client as a 200 with no bytes at all,
    charged the prompt estimate; and a last event without its blank line was swallowed. The
    Lua meter (the fallback) normalizes line ends, but keeps a last event without its blank
    line, as before."""
    price = gateways["native"].cfg.models_by_id["scripted"].price
    for meter, gw in gateways.items():
        if meter == "lua" and script == "no-last-blank-line":
            continue
        account, rid = "acct-" + uuid.uuid4().hex[:8], "meters-" + uuid.uuid4().hex
        key = _account(gw, account)
        headers = {"Authorization": f"Bearer {key}", "X-Request-ID": rid, "x-sim-script": script}
        r = httpx.post(
            gw.v1 + "/chat/completions", json=dict(_HI) | {"stream": True}, headers=headers
        )
        assert r.status_code == 200
        assert "\r" not in r.text and r.text.rstrip().endswith("data: [DONE]"), (meter, r.text)
        events = [e for e in r.text.split("\n\n") if e.startswith("data: {")]
        assert len(events) == 4, (meter, r.text)  # the usage chunk, not asked for, is gone
        figures = json.loads(r.text.split("\n\n")[-3][11:])
        assert figures["credits_used"] == format_credits(token_cost(price, 9, 2)), meter
        debit = _debit(gw, key, rid)
        assert (debit["tokens_in"], debit["tokens_out"]) == (9, 2) and "counted" not in debit


def test_json_with_spaces_is_metered_alike(gateways: dict[str, Gateway]) -> None:
    """A backend writing JSON with spaces ("choices": [{...}]): a stream without usage is
    charged its counted chunks, and a usage-only event the client did not ask for is removed.
    Before, such chunks counted no token and the usage event passed to the client."""
    prompt = estimate_prompt_tokens("chat", _HI)
    for meter, gw in gateways.items():
        key = _account(gw, "acct-" + uuid.uuid4().hex[:8])
        for script, expect in (("spaced-no-usage", (prompt, 2)), ("spaced", (9, 2))):
            rid = "spaced-" + uuid.uuid4().hex
            headers = {
                "Authorization": f"Bearer {key}",
                "X-Request-ID": rid,
                "x-sim-script": script,
            }
            r = httpx.post(
                gw.v1 + "/chat/completions", json=dict(_HI) | {"stream": True}, headers=headers
            )
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
            assert '"choices": []' not in r.text, (meter, script)  # not asked for
            debit = _debit(gw, key, rid)
            assert (debit["tokens_in"], debit["tokens_out"]) == expect, (meter, script, debit)


def test_a_count_no_backend_makes_is_no_count(gateways: dict[str, Gateway]) -> None:
    """Usage of 1e18 tokens, or more digits than a 64-bit integer holds, is a broken backend's:
    not read as a count. A stream is charged the last usage that was one (both meters alike),
    an answer its reservation. Before, such a count took the account's whole
    balance (and past 2^63 corrupted the ledger entry)."""
    prompt = estimate_prompt_tokens("chat", _HI)
    body = dict(_HI) | {"max_tokens": 20}
    got = {}
    for meter, gw in gateways.items():
        account = "acct-" + uuid.uuid4().hex[:8]
        key = _account(gw, account)
        price = gw.cfg.models_by_id["scripted"].price
        for script in ("huge-usage", "json-huge"):
            rid = "huge-" + uuid.uuid4().hex
            headers = {
                "Authorization": f"Bearer {key}",
                "X-Request-ID": rid,
                "x-sim-script": script,
            }
            stream = script == "huge-usage"
            r = httpx.post(
                gw.v1 + "/chat/completions", json=body | {"stream": stream}, headers=headers
            )
            assert r.status_code == 200, r.text
            got[meter, script] = debit = _debit(gw, key, rid)
            if stream:  # the last count that was one: the second chunk's running usage
                assert (debit["tokens_in"], debit["tokens_out"]) == (9, 1), debit
                assert "counted" not in debit
            else:  # unknown usage: the reservation
                assert debit["amount"] == "-" + format_credits(token_cost(price, prompt, 20))
        assert (
            parse_credits(
                httpx.get(gw.v1 + "/credits", headers={"Authorization": f"Bearer {key}"}).json()[
                    "balance"
                ]
            )
            > 2_000_000
        )
    assert got["native", "huge-usage"] == got["lua", "huge-usage"]


def test_an_unreadable_answer_is_a_502_and_not_charged(gateways: dict[str, Gateway]) -> None:
    """A 200 whose body the translator cannot read (here an OpenAI answer from a "TGI"
    backend; TGI's own overload error sent with 200 is another): the client gets 502
    backend_unavailable and the request is voided. Before, the gateway's error went out with
    status 200 and the request was charged."""
    gw = gateways["native"]
    account, rid = "acct-" + uuid.uuid4().hex[:8], "bad-" + uuid.uuid4().hex
    key = _account(gw, account)
    headers = {
        "Authorization": f"Bearer {key}",
        "X-Request-ID": rid,
        "x-sim-script": "json-charset",
    }
    r = httpx.post(
        gw.v1 + "/chat/completions", json=dict(_HI) | {"model": "scripted-tgi"}, headers=headers
    )
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "backend_unavailable"
    assert r.headers["x-credits-used"] == "0.00"
    entry = _entry(gw, key, rid)
    assert entry is not None and entry["type"] == "void", entry


def test_a_backend_that_dies_mid_answer_is_a_backend_error(gateways: dict[str, Gateway]) -> None:
    """The backend closes its connection in the middle of a JSON answer: 502
    backend_unavailable (it was internal_error, the code for the gateway's own bugs), voided."""
    gw = gateways["native"]
    key = _account(gw, "acct-" + uuid.uuid4().hex[:8])
    rid = "died-" + uuid.uuid4().hex
    headers = {
        "Authorization": f"Bearer {key}",
        "X-Request-ID": rid,
        "x-sim-script": "close-mid-json",
    }
    r = httpx.post(gw.v1 + "/chat/completions", json=dict(_HI), headers=headers)
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "backend_unavailable", r.text
    entry = _entry(gw, key, rid)
    assert entry is not None and entry["type"] == "void", entry


def test_an_error_sent_with_200_is_voided(gateways: dict[str, Gateway]) -> None:
    """A backend that answers its error with status 200: the body passes as it is, and the
    request is voided, not charged its reservation as a served answer without usage."""
    gw = gateways["native"]
    account, rid = "acct-" + uuid.uuid4().hex[:8], "err200-" + uuid.uuid4().hex
    key = _account(gw, account)
    headers = {"Authorization": f"Bearer {key}", "X-Request-ID": rid, "x-sim-script": "json-error"}
    r = httpx.post(gw.v1 + "/chat/completions", json=dict(_HI), headers=headers)
    assert r.status_code == 200 and r.json()["error"]["message"] == "boom"
    assert r.headers["x-credits-used"] == "0.00"
    entry = _entry(gw, key, rid)
    assert entry is not None and entry["type"] == "void", entry


def test_a_json_answer_with_a_charset_is_settled_from_its_usage(
    gateways: dict[str, Gateway],
) -> None:
    """``application/json; charset=utf-8`` is JSON too: its usage is lifted and charged. Before,
    only the bare media type was read, and such an answer was charged its whole reservation
    (without max_tokens, what the balance paid for)."""
    gw = gateways["native"]
    account, rid = "acct-" + uuid.uuid4().hex[:8], "json-" + uuid.uuid4().hex
    key = _account(gw, account)
    r = httpx.post(
        gw.v1 + "/chat/completions",
        json=dict(_HI),
        headers={
            "Authorization": f"Bearer {key}",
            "X-Request-ID": rid,
            "x-sim-script": "json-charset",
        },
    )
    assert r.status_code == 200, r.text
    price = gw.cfg.models_by_id["scripted"].price
    assert r.headers["x-credits-used"] == format_credits(token_cost(price, 9, 3))
    debit = _debit(gw, key, rid)
    assert (debit["tokens_in"], debit["tokens_out"]) == (9, 3) and "counted" not in debit


def test_both_meters_give_the_same_trailers(gateways: dict[str, Gateway]) -> None:
    account = "acct-" + uuid.uuid4().hex[:8]
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    got = {}
    for meter, gw in gateways.items():
        key = _account(gw, account)
        r = h2client.post(gw.v1 + "/chat/completions", body, {"Authorization": f"Bearer {key}"})
        assert r.status == 200
        figures = json.loads(next(x for x in r.lines() if x.startswith(": tollgate "))[11:])
        assert r.trailers == {
            "x-credits-used": figures["credits_used"],
            "x-credits-remaining": figures["credits_remaining"],
        }
        got[meter] = r.trailers
    assert got["native"] == got["lua"]


def _entry(gw: Gateway, key: str, rid: str, timeout: float = 10) -> dict | None:
    """The ledger entry of request ``rid``, whatever its type, once it is there (or None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(gw.v1 + "/credits/transactions", headers={"Authorization": f"Bearer {key}"})
        entry = next((e for e in r.json()["data"] if e.get("request_id") == rid), None)
        if entry is not None:
            return entry
        time.sleep(0.05)
    return None


def _debit(gw: Gateway, key: str, rid: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(gw.v1 + "/credits/transactions", headers={"Authorization": f"Bearer {key}"})
        for entry in r.json()["data"]:
            if entry.get("request_id") == rid and entry["type"] == "debit":
                return {
                    k: entry[k]
                    for k in ("amount", "tokens_in", "tokens_out", "reason", "counted")
                    if k in entry
                }
        time.sleep(0.05)
    raise AssertionError(f"no debit for {rid}")


def test_the_native_meter_runs_where_lua_cannot_be_replaced(tmp_path: Path) -> None:
    """Lua keeps TGI's native streams (translated in Lua); every other stream route: native."""
    cfg = base_config()
    cfg["backends"].append(
        {
            "name": "tgi-native",
            "kind": "tgi",
            "endpoints": ["127.0.0.1:1"],
            "mode": "native",
            "request_timeout": "20s",
        }
    )
    path = tmp_path / "tollgate.yaml"
    path.write_text(json.dumps(cfg))
    gateway = load_config(path)
    hcm = render(gateway, tmp_path / "libmeter.so")["static_resources"]["listeners"][0]
    hcm = hcm["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names[:2] == [NATIVE_METER_FILTER, "envoy.filters.http.lua"]
    module = hcm["http_filters"][0]["typed_config"]["dynamic_module_config"]
    assert module["module"]["local"]["filename"] == str(tmp_path / "libmeter.so")
    routes = {r["name"]: r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]}

    def lua_disabled(route: str) -> bool:
        per = routes[route].get("typed_per_filter_config", {})
        return per.get("envoy.filters.http.lua", {}).get("disabled", False)

    assert not lua_disabled("to_tgi-native/stream") and lua_disabled("to_vllm-chat/stream")
    assert lua_disabled("to_tgi-native") and lua_disabled("to_vllm-chat")
    for name in ("to_tgi-native/stream", "to_vllm-chat/stream"):  # the mark both meters read
        [mark] = routes[name]["response_headers_to_add"]
        assert mark["header"]["key"] == LUA_METER_HEADER
    # Without a built module (render-envoy, or no compiler): the Lua meter everywhere.
    plain = render(gateway)["static_resources"]["listeners"][0]["filter_chains"][0]
    filters = plain["filters"][0]["typed_config"]["http_filters"]
    assert NATIVE_METER_FILTER not in [f["name"] for f in filters]


def test_no_compiler_means_the_lua_meter_or_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(native_meter.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.raises(native_meter.BuildError, match="failed"):
        native_meter.build()
    monkeypatch.setattr(native_meter, "compiler", lambda: None)
    with pytest.raises(native_meter.BuildError, match="no C compiler"):
        native_meter.build()
    cfg = base_config()
    for choice, expect in (("auto", None), ("lua", None), ("native", StartError)):
        cfg["metering"]["stream_meter"] = choice
        path = tmp_path / f"{choice}.yaml"
        path.write_text(json.dumps(cfg))
        stack = Stack(path)
        if expect is None:
            assert stack._native_meter() is None
        else:
            with pytest.raises(StartError, match="stream_meter is native"):
                stack._native_meter()
    assert not list((tmp_path / "cache").glob("*.so*"))  # nothing half-built left behind


def test_the_build_is_cached_by_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native_meter.CACHE_ENV, str(tmp_path))
    first = native_meter.build()
    assert first.is_file() and first.parent == tmp_path
    stamp = first.stat().st_mtime_ns
    assert native_meter.build() == first and first.stat().st_mtime_ns == stamp
