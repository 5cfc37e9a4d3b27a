"""API keys: scopes, model pools, expiry, revocation seen by every worker within a second (not
the cache TTL), last-used times, and the failed-lookup limit per client address."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from extproc import keys
from extproc.keys import hash_key
from extproc.store import connect, connect_sync
from tests.harness import Gateway, base_config, start_gateway

HELLO = [{"role": "user", "content": "hi"}]
CHAT = {"model": "sim-chat", "messages": HELLO, "max_tokens": 2}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Two workers; a key cache TTL far above a second, so only pub/sub can explain a
    revocation seen within one; a small failed-lookup limit."""
    config = base_config(workers=2)
    config["processor"]["key_cache_ttl"] = "60s"
    config["auth"]["failed_lookups_per_minute"] = 5
    gw = start_gateway(tmp_path_factory.mktemp("keys"), config)
    try:
        yield gw
    finally:
        gw.stack.stop()


def _post(gw: Gateway, key: str, body: dict | None = None, **kw: object) -> httpx.Response:
    return httpx.post(
        gw.v1 + "/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json=body or CHAT,
        timeout=10,
        **kw,  # type: ignore[arg-type]
    )


def _code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]


def _revoke(gw: Gateway, raw: str) -> None:
    async def run() -> None:
        client = connect(gw.cfg.store_url)
        try:
            await keys.revoke(client, hash_key(raw))
        finally:
            await client.aclose()

    asyncio.run(run())


def test_expired_key_is_401_key_expired(gw: Gateway) -> None:
    past = gw.new_key("old", expires_at=time.time() - 1)
    r = _post(gw, past)
    assert r.status_code == 401 and _code(r) == "key_expired"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.v1, api_key=past, max_retries=0).models.list()


def test_key_expires_while_cached(gw: Gateway) -> None:
    soon = gw.new_key("soon", expires_at=time.time() + 1.5)
    assert _post(gw, soon).status_code == 200  # cached now, for 60 s
    time.sleep(1.6)
    r = _post(gw, soon)
    assert r.status_code == 401 and _code(r) == "key_expired"


def test_missing_scope_is_403(gw: Gateway) -> None:
    reader = gw.new_key("reader", scopes=["usage:read"])
    r = _post(gw, reader)
    assert r.status_code == 403 and _code(r) == "permission_denied"
    assert "models:use" in r.json()["error"]["message"]
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=gw.v1, api_key=reader, max_retries=0).models.list()


def test_model_outside_pool_is_403(gw: Gateway) -> None:
    embed_only = gw.new_key("embed-only", models=["sim-embed"])
    client = openai.OpenAI(base_url=gw.v1, api_key=embed_only, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as exc:
        client.chat.completions.create(model="sim-chat", messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert exc.value.body["code"] == "permission_denied"  # type: ignore[index]
    assert exc.value.body["param"] == "model"  # type: ignore[index]
    assert [m.id for m in client.models.list()] == ["sim-embed"]
    with pytest.raises(openai.PermissionDeniedError):
        client.models.retrieve("sim-chat")
    assert client.embeddings.create(model="sim-embed", input="x").data
    with pytest.raises(openai.NotFoundError):  # an unknown model is still 404, not 403
        client.chat.completions.create(model="nope", messages=HELLO)  # type: ignore[arg-type]


def test_revoked_key_is_401_on_every_worker_within_a_second_under_load(gw: Gateway) -> None:
    raw = gw.new_key("doomed")
    stop = threading.Event()
    results: list[tuple[float, int, str]] = []  # (sent at, status, code)

    def hammer() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                sent = time.monotonic()
                r = http.post(
                    gw.v1 + "/chat/completions",
                    headers={"Authorization": f"Bearer {raw}"},
                    json=CHAT,
                )
                code = r.json()["error"]["code"] if r.status_code != 200 else ""
                results.append((sent, r.status_code, code))

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # both workers have the key cached (60 s TTL)
    revoked_at = time.monotonic()
    _revoke(gw, raw)
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join()
    before = [r for r in results if r[0] < revoked_at - 0.2]  # answered before the revocation
    after = [r for r in results if r[0] > revoked_at + 1.0]
    assert len(before) > 20 and {s for _, s, _ in before} == {200}, {s for _, s, _ in before}
    assert len(after) > 20
    assert {(status, code) for _, status, code in after} == {(401, "key_revoked")}
    # both workers served the key before and refused it after
    served = [gw.metrics(w) for w in range(2)]
    assert all('status="200"' in text for text in served)
    assert all('status="401"' in text for text in served)


def test_last_used_is_recorded(gw: Gateway) -> None:
    raw = gw.new_key("used")
    record = connect_sync(gw.cfg.store_url).hgetall(f"tg:key:{hash_key(raw)}")
    assert "last_used_at" not in record
    before = time.time()
    assert _post(gw, raw).status_code == 200
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        record = connect_sync(gw.cfg.store_url).hgetall(f"tg:key:{hash_key(raw)}")
        if "last_used_at" in record:
            break
        time.sleep(0.05)
    assert before - 1 <= float(record["last_used_at"]) <= time.time()


def _from(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10)


def test_failed_lookups_are_limited_per_client_address(gw: Gateway) -> None:
    good = gw.new_key("good")
    fresh = gw.new_key("fresh")  # never used: its first lookup reaches the store
    assert _post(gw, good).status_code == 200
    url = gw.v1 + "/chat/completions"
    guesses = [f"tg_{'A' * 42}{c}" for c in "abcdefgh"]
    with _from("127.0.0.3") as attacker:
        codes = []
        for guess in guesses:
            r = attacker.post(url, headers={"Authorization": f"Bearer {guess}"}, json=CHAT)
            codes.append((r.status_code, _code(r)))
        assert codes[:5] == [(401, "invalid_api_key")] * 5
        assert codes[5:] == [(429, "rate_limit_exceeded")] * 3
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # even a real key that is not cached yet is refused from that address
        r = attacker.post(url, headers={"Authorization": f"Bearer {fresh}"}, json=CHAT)
        assert r.status_code == 429
        # X-Forwarded-For does not move the attacker elsewhere
        r = attacker.post(
            url,
            headers={"Authorization": f"Bearer tg_{'B' * 43}", "X-Forwarded-For": "10.1.2.3"},
            json=CHAT,
        )
        assert r.status_code == 429
    # another address is not affected, nor can it be blamed by naming the attacker
    with _from("127.0.0.4") as other:
        r = other.post(
            url,
            headers={"Authorization": f"Bearer {fresh}", "X-Forwarded-For": "127.0.0.3"},
            json=CHAT,
        )
        assert r.status_code == 200


# --------------------------------------------------------------------------- validation
# Each check names its field the way the control API's clients write it: the error's param.


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"name": ""}, "name"),
        ({"name": "a\nb"}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"account": "bad:name"}, "account"),
        ({"limits": {"rpm": -1}}, "limits.rpm"),
        ({"limits": {"tpm": 1.5}}, "limits.tpm"),
        ({"limits": {"burst": 1}}, "limits.burst"),
        ({"scopes": ["models:use", "root"]}, "scopes"),
        ({"models": []}, "models"),
        ({"models": ["a b"]}, "models"),
    ],
)
def test_invalid_key_fields_name_the_field(kwargs: dict, param: str) -> None:
    args = {"name": "ok", "account": "default", **kwargs}
    with pytest.raises(keys.FieldError) as exc:
        keys.new_key_record(**args)
    assert exc.value.param == param
    assert isinstance(exc.value, ValueError)  # callers catching ValueError still do


def test_valid_key_fields_pass() -> None:
    raw, record = keys.new_key_record(
        "ok", "default", {"rpm": 5}, ["models:use"], ["sim-chat"], None
    )
    assert keys.KEY_RE.match(raw) and record["rpm"] == "5" and record["models"] == "sim-chat"
