"""The money layer against a real Valkey: reserve, settle, sweep, grant, ledger reads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis

from extproc.config import Limits
from extproc.ledger import Ledger, Reservation, ReserveRequest, SettleCall
from extproc.money import Price, max_affordable_completion, token_cost

pytestmark = pytest.mark.anyio

PRICE = Price(input_per_1m=2_000_000, output_per_1m=6_000_000, per_request=100)
MINUTE = int(time.time()) // 60 + 60  # a minute window an hour ahead: grants (now) come first
T0 = MINUTE * 60_000 + 15_500  # 44.5 s before the window ends
RESET_S = 45


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture()
async def client(valkey_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    # like store.connect (decoded replies), but a blocking pool: 200 concurrent calls wait for
    # one of 64 connections instead of failing with MaxConnectionsError (redis-py's default
    # pool allows 100 and then raises)
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        valkey_url, decode_responses=True, max_connections=64
    )
    c = redis.asyncio.Redis(connection_pool=pool)
    await c.flushdb()
    yield c
    await c.aclose()
    await pool.disconnect()


@pytest.fixture()
async def ledger(client: redis.asyncio.Redis) -> Ledger:
    return Ledger(client)


def request(
    rid: str,
    *,
    account: str = "acme",
    key: str = "k1",
    prompt: int = 100,
    max_tokens: int | None = 50,
    cap: int = 1000,
    price: Price = PRICE,
    limits: Limits = Limits(),  # noqa: B008 (frozen)
    ttl_ms: int = 60_000,
    model: str = "m1",
    sequences: int = 1,
    attempt: str = "",
) -> ReserveRequest:
    return ReserveRequest(
        request_id=rid, account=account, key_hash=key, key_prefix=f"tg_{key}", model=model,
        backend="b1", prompt_tokens=prompt, requested_max_tokens=max_tokens, cap=cap,
        price=price, limits=limits, ttl_ms=ttl_ms, sequences=sequences, attempt=attempt,
    )  # fmt: skip


async def test_200_concurrent_reserves_against_a_balance_for_50(ledger: Ledger) -> None:
    amount = token_cost(PRICE, 100, 50)
    await ledger.grant("acme", 50 * amount)
    results = await asyncio.gather(
        *(ledger.reserve(request(f"r{i}"), now_ms=T0) for i in range(200))
    )
    ok = [f"r{i}" for i, r in enumerate(results) if r.ok]
    assert len(ok) == 50
    assert {r.status for r in results if not r.ok} == {"insufficient_credits"}
    assert all(r.amount == amount and r.granted == 50 for r in results if r.ok)
    assert min(r.available for r in results) == 0
    b = await ledger.balance("acme")
    assert (b.balance, b.pending, b.available) == (50 * amount, 50 * amount, 0)

    usage = {rid: (90 + i % 20, i % 51) for i, rid in enumerate(ok)}
    settled = await asyncio.gather(
        *(ledger.settle(rid, p, c, 200, 5, now_ms=T0 + 10) for rid, (p, c) in usage.items())
    )
    assert all(s.status == "ok" and s.entry_type == "debit" for s in settled)
    assert all(s.balance >= 0 and s.available >= 0 for s in settled)
    expected = sum(token_cost(PRICE, p, c) for p, c in usage.values())
    assert sum(s.charged for s in settled) == expected
    b = await ledger.balance("acme")
    assert (b.balance, b.pending) == (50 * amount - expected, 0)
    entries = await ledger.transactions("acme", limit=1000)
    assert {e["id"] for e in entries if e["type"] == "debit"} == set(ok)
    assert len(await ledger.usage("acme", limit=1000)) == 50
    total, balance = await ledger.reconcile("acme")
    assert total == balance == b.balance


async def test_request_rate_limit(ledger: Ledger) -> None:
    await ledger.grant("acme", 10**9)
    limits = Limits(rpm=10)
    seen = []
    for i in range(10):
        r = await ledger.reserve(request(f"r{i}", limits=limits), now_ms=T0 + i)
        assert r.ok and r.rpm_limit == 10 and r.reset_s == RESET_S
        seen.append(r.rpm_remaining)
    assert seen == list(range(9, -1, -1))
    r = await ledger.reserve(request("r10", limits=limits), now_ms=T0 + 10)
    assert r.status == "rate_limit_requests"
    assert r.retry_after == r.reset_s == RESET_S and r.rpm_remaining == 0
    assert (await ledger.balance("acme")).pending == 10 * token_cost(PRICE, 100, 50)
    # the next minute is a new window
    r = await ledger.reserve(request("r11", limits=limits), now_ms=(MINUTE + 1) * 60_000)
    assert r.ok and r.rpm_remaining == 9 and r.reset_s == 60
    # an unlimited key reports -1
    r = await ledger.reserve(request("r12", key="k2"), now_ms=T0)
    assert (r.rpm_limit, r.rpm_remaining, r.tpm_limit, r.tpm_remaining) == (0, -1, 0, -1)


async def test_token_window_counts_real_usage_after_settle(ledger: Ledger) -> None:
    await ledger.grant("acme", 10**9)
    limits = Limits(tpm=1000)
    r = await ledger.reserve(request("a", prompt=100, max_tokens=200, limits=limits), now_ms=T0)
    assert r.ok and r.tpm_limit == 1000 and r.tpm_remaining == 700
    s = await ledger.settle("a", 100, 20, 200, 12, now_ms=T0 + 100)
    assert s.tpm_remaining == 880 and s.rpm_remaining == -1
    r = await ledger.reserve(request("b", prompt=100, max_tokens=200, limits=limits), now_ms=T0)
    assert r.tpm_remaining == 580
    # asking for more than the window holds: 429 until the window ends
    r = await ledger.reserve(request("c", prompt=100, max_tokens=500, limits=limits), now_ms=T0)
    assert r.status == "rate_limit_tokens" and r.retry_after == RESET_S
    # without max_tokens the grant is clamped to the tokens left
    r = await ledger.reserve(request("d", prompt=100, max_tokens=None, limits=limits), now_ms=T0)
    assert r.ok and r.granted == 480 and r.tpm_remaining == 0
    r = await ledger.reserve(request("e", prompt=1, max_tokens=None, limits=limits), now_ms=T0)
    assert r.status == "rate_limit_tokens" and r.retry_after == RESET_S
    # a void settlement (no usage known) gives all reserved tokens back
    s = await ledger.settle("d", None, None, 502, 3, reason="backend_error", now_ms=T0 + 200)
    assert s.entry_type == "void" and s.charged == 0 and s.tpm_remaining == 580


async def test_media_units_are_priced_per_unit_and_kept_out_of_the_token_window(
    ledger: Ledger,
) -> None:
    await ledger.grant("acme", 10**9)
    limits = Limits(tpm=1000)
    per_second = Price(input_per_1m=100 * 1_000_000, per_request=1000)  # media.metered_price
    media = ReserveRequest(
        request_id="t", account="acme", key_hash="k1", key_prefix="tg_k1", model="whisper",
        backend="b1", prompt_tokens=3600, requested_max_tokens=None, cap=0, price=per_second,
        limits=limits, ttl_ms=60_000, unit="audio_seconds",
    )  # fmt: skip
    r = await ledger.reserve(media, now_ms=T0)
    assert r.ok and r.amount == 1000 + 100 * 3600 and r.granted == 0
    assert r.unit == "audio_seconds" and r.tokens == 0 and r.tpm_remaining == 1000
    s = await ledger.settle("t", 12, 0, 200, 5, now_ms=T0 + 10)
    assert s.charged == 1000 + 100 * 12 and s.tpm_remaining == 1000
    entry = (await ledger.transactions("acme", limit=1))[0]
    assert (entry["unit"], entry["tokens_in"], entry["tokens_out"]) == ("audio_seconds", 12, 0)
    assert (await ledger.usage("acme"))[0]["unit"] == "audio_seconds"
    # text requests still count, and say so
    r = await ledger.reserve(request("c", prompt=100, max_tokens=200, limits=limits), now_ms=T0)
    assert r.ok and r.unit == "tokens" and r.tpm_remaining == 700
    await ledger.settle("c", 100, 20, 200, 5, now_ms=T0 + 20)
    assert (await ledger.transactions("acme", limit=1))[0]["unit"] == "tokens"


async def test_clamp_to_what_the_balance_pays(ledger: Ledger) -> None:
    await ledger.grant("acme", 1000)
    r = await ledger.reserve(request("a", max_tokens=None, cap=1000), now_ms=T0)
    assert r.ok and r.granted == max_affordable_completion(PRICE, 100, 1000) == 116
    assert r.amount == token_cost(PRICE, 100, 116) <= 1000
    assert r.available == 1000 - r.amount
    r = await ledger.reserve(request("b", max_tokens=None, cap=1000), now_ms=T0)
    assert r.status == "insufficient_credits" and r.granted == 0

    await ledger.grant("rich", 10**12)
    r = await ledger.reserve(request("c", account="rich", max_tokens=None, cap=64), now_ms=T0)
    assert r.ok and r.granted == 64  # never above the cap
    free = Price()
    r = await ledger.reserve(request("d", account="nobody", max_tokens=None, price=free), now_ms=T0)
    assert r.ok and r.granted == 1000 and r.amount == 0  # a free model needs no balance
    # exactly the prompt and the fee: zero completion tokens is not a request
    await ledger.grant("poor", 300)
    r = await ledger.reserve(request("e", account="poor", max_tokens=None), now_ms=T0)
    assert r.status == "insufficient_credits"


async def test_several_sequences_reserve_each_one_s_worst_case(ledger: Ledger) -> None:
    """n choices (or a batch of prompts): each may run to max_tokens, so the worst case is
    sequences x max_tokens, in money and in the token window; a clamp shares what the money or
    the window allows out evenly (the reply's granted is per sequence: the max_tokens sent)."""
    limits = Limits(tpm=10_000)
    await ledger.grant("acme", token_cost(PRICE, 100, 4 * 50))
    r = await ledger.reserve(request("a", sequences=4, limits=limits), now_ms=T0)
    assert r.ok and r.granted == 50 and r.sequences == 4
    assert r.amount == token_cost(PRICE, 100, 200) and r.available == 0
    assert r.tokens == 100 + 200 and r.tpm_remaining == 10_000 - 300
    assert r.prompt_estimate == 100
    # one token more per sequence than the balance pays for: refused, not served at a loss
    r = await ledger.reserve(request("b", sequences=4, max_tokens=51), now_ms=T0)
    assert r.status == "insufficient_credits" and r.amount == token_cost(PRICE, 100, 204)
    # swept unsettled, it is charged the whole worst case (its entry names all 200 tokens)
    assert await ledger.sweep(now_ms=T0 + 60_000) == 1
    entry = (await ledger.transactions("acme", limit=1))[0]
    assert entry["type"] == "expired" and entry["tokens_out"] == 200
    assert entry["amount"] == -token_cost(PRICE, 100, 200)

    # without max_tokens: what the balance pays for, shared by the 3 sequences (rounded down)
    await ledger.grant("b", 10_000)
    total = max_affordable_completion(PRICE, 100, 10_000)
    r = await ledger.reserve(request("c", account="b", max_tokens=None, sequences=3), now_ms=T0)
    assert r.ok and r.granted == total // 3 and r.amount == token_cost(PRICE, 100, 3 * r.granted)
    assert r.amount <= 10_000
    # a balance that pays for fewer tokens than there are sequences cannot give each one
    await ledger.grant("c", token_cost(PRICE, 100, 2))
    r = await ledger.reserve(request("d", account="c", max_tokens=None, sequences=3), now_ms=T0)
    assert r.status == "insufficient_credits"
    # the token window, shared too: 1,000 - 100 of prompt leaves 300 for each of 3
    await ledger.grant("rich", 10**12)
    small = Limits(tpm=1000)
    r = await ledger.reserve(
        request("e", account="rich", key="k9", max_tokens=None, sequences=3, limits=small),
        now_ms=T0,
    )
    assert r.ok and r.granted == 300 and r.tpm_remaining == 0
    s = await ledger.settle("e", 100, 3 * 280, 200, 5, now_ms=T0 + 10)
    assert s.charged == token_cost(PRICE, 100, 840) and s.tpm_remaining == 1000 - 940
    # and over the window with max_tokens: 100 + 4 x 250 > 1,000
    r = await ledger.reserve(
        request("f", account="rich", key="k8", max_tokens=250, sequences=4, limits=small),
        now_ms=T0,
    )
    assert r.status == "rate_limit_tokens"
    total, balance = await ledger.reconcile("acme")
    assert total == balance


async def test_a_void_after_a_lost_answer_voids_only_what_that_call_reserved(
    ledger: Ledger,
) -> None:
    """A duplicate X-Request-ID, refused, whose client left while the store answered: its void
    names its own reserve call, so the served owner of the id keeps its reservation and is
    charged. Before, the void went by request id alone and made the served request free."""
    await ledger.grant("acme", 10**6)
    assert (await ledger.reserve(request("r", attempt="owner"), now_ms=T0)).ok
    dup = await ledger.reserve(request("r", attempt="dup"), now_ms=T0 + 1)
    assert dup.status == "duplicate"
    void = await ledger.settle("r", None, None, 0, -1, "client_disconnected", attempt="dup")
    assert void.status == "unknown" and void.charged == 0
    assert (await ledger.balance("acme")).pending == token_cost(PRICE, 100, 50)
    s = await ledger.settle("r", 100, 20, 200, 5, now_ms=T0 + 10)
    assert s.status == "ok" and s.entry_type == "debit" and s.charged == token_cost(PRICE, 100, 20)
    # the owner's own void (its answer lost) still voids its own reservation
    assert (await ledger.reserve(request("q", attempt="mine"), now_ms=T0)).ok
    void = await ledger.settle("q", None, None, 0, -1, "store_unavailable", attempt="mine")
    assert void.status == "ok" and void.entry_type == "void"
    total, balance = await ledger.reconcile("acme")
    assert total == balance == 10**6 - token_cost(PRICE, 100, 20)


async def test_no_completion_reserves_the_prompt(ledger: Ledger) -> None:
    # embeddings: no max_tokens and cap 0 -> nothing to generate, the prompt is reserved
    embed = Price(input_per_1m=100_000, per_request=10)
    need = token_cost(embed, 5000, 0)
    await ledger.grant("acme", need)
    r = await ledger.reserve(
        request("e1", prompt=5000, max_tokens=None, cap=0, price=embed, limits=Limits(tpm=9000)),
        now_ms=T0,
    )
    assert r.ok and r.granted == 0 and r.amount == need and r.tpm_remaining == 4000
    r = await ledger.reserve(request("e2", prompt=5000, max_tokens=None, cap=0, price=embed))
    assert r.status == "insufficient_credits" and r.amount == need
    s = await ledger.settle("e1", 4800, 0, 200, 3, now_ms=T0 + 1)
    assert s.charged == token_cost(embed, 4800, 0) and s.tpm_remaining == 4200


async def test_settle_twice_and_unknown_and_duplicate_reserve(ledger: Ledger) -> None:
    await ledger.grant("acme", 10**6)
    assert (await ledger.reserve(request("a"), now_ms=T0)).ok
    dup = await ledger.reserve(request("a"), now_ms=T0)
    assert dup.status == "duplicate" and dup.amount == 0
    assert (await ledger.balance("acme")).pending == token_cost(PRICE, 100, 50)

    first = await ledger.settle("a", 100, 40, 200, 9, now_ms=T0 + 1)
    assert first.status == "ok" and first.charged == token_cost(PRICE, 100, 40)
    second = await ledger.settle("a", 100, 50, 200, 9, now_ms=T0 + 2)
    assert second.status == "duplicate" and second.charged == first.charged
    assert second.balance == first.balance == 10**6 - first.charged
    assert (await ledger.reserve(request("a"), now_ms=T0 + 3)).status == "duplicate"
    assert (await ledger.settle("nope", 1, 1, 200, 1)).status == "unknown"
    entries = await ledger.transactions("acme")
    assert [e["type"] for e in entries] == ["debit", "grant"]
    total, balance = await ledger.reconcile("acme")
    assert total == balance


async def test_a_settled_request_keeps_one_key_that_expires(
    ledger: Ledger, client: redis.asyncio.Redis
) -> None:
    """Settling replaces the reservation with its figures (one write, no separate done
    marker); that key keeps the id used for 30 days, for reserve, settle and sweep alike. An
    earlier version's done marker still counts."""
    await ledger.grant("acme", 10**6)
    assert (await ledger.reserve(request("a", ttl_ms=1000), now_ms=T0)).ok
    assert (await ledger.settle("a", 100, 40, 200, 9, now_ms=T0 + 1)).status == "ok"
    assert await client.keys("tg:done:*") == []
    assert 29 * 86400 < await client.ttl("tg:resv:a") <= 30 * 86400
    assert await client.zcard("tg:resv-due") == 0
    assert await ledger.sweep(now_ms=T0 + 5000) == 0  # nothing pending, nothing charged
    assert (await ledger.reserve(request("a"), now_ms=T0 + 2)).status == "duplicate"
    await client.set("tg:done:old", '[5,0,"debit","tg:acct:acme","tg:rl:k1:","0","0"]')
    assert (await ledger.reserve(request("old"), now_ms=T0 + 3)).status == "duplicate"
    replay = await ledger.settle("old", 1, 1, 200, 1, now_ms=T0 + 4)
    assert (replay.status, replay.charged) == ("duplicate", 5)
    assert len(await ledger.transactions("acme")) == 2  # the grant and one debit
    total, balance = await ledger.reconcile("acme")
    assert total == balance == 10**6 - token_cost(PRICE, 100, 40)


async def test_sweep_charges_the_reserved_amount(ledger: Ledger) -> None:
    await ledger.grant("acme", 10**6)
    limits = Limits(concurrency=1)
    r = await ledger.reserve(request("a", limits=limits, ttl_ms=1000), now_ms=T0)
    assert r.ok
    busy = await ledger.reserve(request("b", limits=limits), now_ms=T0 + 1)
    assert busy.status == "concurrency" and busy.retry_after == 1
    assert await ledger.sweep(now_ms=T0 + 999) == 0
    assert await ledger.sweep(now_ms=T0 + 1000) == 1
    assert await ledger.sweep(now_ms=T0 + 5000) == 0
    b = await ledger.balance("acme")
    assert (b.balance, b.pending) == (10**6 - r.amount, 0)
    entry = (await ledger.transactions("acme", limit=1))[0]
    assert entry["type"] == "expired" and entry["amount"] == -r.amount
    assert entry["reason"].startswith("no settlement within the reservation timeout; charged")
    assert (await ledger.usage("acme"))[0]["status"] == 0
    late = await ledger.settle("a", 100, 1, 200, 9000, now_ms=T0 + 9000)
    assert late.status == "duplicate" and late.entry_type == "expired" and late.charged == r.amount
    assert (await ledger.reserve(request("b", limits=limits), now_ms=T0 + 9001)).ok  # slot freed
    total, balance = await ledger.reconcile("acme")
    assert total == balance


async def test_overrun_charged_in_full_when_the_balance_allows(ledger: Ledger) -> None:
    await ledger.grant("acme", 10**6)
    r = await ledger.reserve(request("a", max_tokens=10), now_ms=T0)
    s = await ledger.settle("a", 100, 100, 200, 5, now_ms=T0 + 1)
    assert s.charged == token_cost(PRICE, 100, 100) > r.amount and s.written_off == 0
    assert s.balance == 10**6 - s.charged


async def test_overrun_beyond_the_balance_is_written_off(ledger: Ledger) -> None:
    reserved = token_cost(PRICE, 100, 10)
    await ledger.grant("acme", 2 * reserved)
    assert (await ledger.reserve(request("a", max_tokens=10), now_ms=T0)).ok
    assert (await ledger.reserve(request("b", max_tokens=10), now_ms=T0)).ok
    s = await ledger.settle("a", 100, 10_000, 200, 5, now_ms=T0 + 1)
    cost = token_cost(PRICE, 100, 10_000)
    # "b" is still pending, but its reservation is no claim: "a" pays from the whole balance
    assert s.charged == 2 * reserved and s.written_off == cost - 2 * reserved
    assert (s.balance, s.pending, s.available) == (0, reserved, -reserved)
    # "b" then finds nothing to pay with: the balance never goes below zero
    s = await ledger.settle("b", 100, 10, 200, 5, now_ms=T0 + 2)
    assert s.charged == 0 and s.written_off == reserved and (s.balance, s.available) == (0, 0)
    entries = await ledger.transactions("acme")
    assert entries[0]["written_off"] == reserved and entries[0]["balance"] == 0
    assert entries[1]["written_off"] == cost - 2 * reserved
    total, balance = await ledger.reconcile("acme")
    assert total == balance == 0


async def test_an_overrun_is_paid_from_credits_a_reservation_did_not_need(ledger: Ledger) -> None:
    """A prompt over its estimate while the account has a large reservation open: the overrun
    is charged in full from the balance, not written off because the other reservation held
    the credits; that reservation, settled below what it held, is paid in full too."""
    big, small = token_cost(PRICE, 100, 1000), token_cost(PRICE, 100, 1)
    await ledger.grant("acme", big + small)
    assert (await ledger.reserve(request("big", max_tokens=1000), now_ms=T0)).ok
    assert (await ledger.reserve(request("small", max_tokens=1), now_ms=T0)).ok
    over = token_cost(PRICE, 400, 1)  # the prompt was 400 tokens, not the 100 estimated
    s = await ledger.settle("small", 400, 1, 200, 5, now_ms=T0 + 1)
    assert s.charged == over and s.written_off == 0  # before: capped at `small`, written off
    s = await ledger.settle("big", 100, 20, 200, 5, now_ms=T0 + 2)
    assert s.charged == token_cost(PRICE, 100, 20) and s.written_off == 0
    assert s.balance == big + small - over - s.charged >= 0
    total, balance = await ledger.reconcile("acme")
    assert total == balance


async def test_void_settlements(ledger: Ledger) -> None:
    await ledger.grant("acme", 10**6)
    for rid in ("a", "b", "c"):
        assert (await ledger.reserve(request(rid), now_ms=T0)).ok
    s = await ledger.settle("a", None, None, 200, 5, reason="client_disconnected", now_ms=T0 + 1)
    assert (s.entry_type, s.charged) == ("void", 0)
    s = await ledger.settle("b", 0, 0, 503, 5, reason="backend_error", now_ms=T0 + 2)
    assert (s.entry_type, s.charged) == ("void", 0)
    # an error whose body named usage is voided too: the client got the error
    assert (await ledger.reserve(request("e"), now_ms=T0)).ok
    s = await ledger.settle("e", 100, 7, 500, 5, reason="backend_error", now_ms=T0 + 2)
    assert (s.entry_type, s.charged) == ("void", 0)
    s = await ledger.settle("c", 0, 0, 200, 5, now_ms=T0 + 3)  # an empty answer still costs the fee
    assert (s.entry_type, s.charged) == ("debit", 100)
    b = await ledger.balance("acme")
    assert (b.balance, b.pending) == (10**6 - 100, 0)
    entries = await ledger.transactions("acme")
    void = next(e for e in entries if e["id"] == "a")
    assert void["tokens_in"] is None and void["reason"] == "client_disconnected"


async def test_a_served_request_of_unknown_usage_says_so(ledger: Ledger) -> None:
    """Charged its reservation, its entry's tokens are the estimate and the grant: the reason
    says they are not a count (it said "settled", as for the backend's own figures)."""
    await ledger.grant("acme", 10**6)
    r = await ledger.reserve(request("u"), now_ms=T0)
    s = await ledger.settle("u", None, None, 200, 5, charge_reserved=True, now_ms=T0 + 1)
    assert s.charged == r.amount and s.entry_type == "debit"
    entry = (await ledger.transactions("acme", limit=1))[0]
    assert entry["reason"] == "usage_unknown" and (entry["tokens_in"], entry["tokens_out"]) == (
        100,
        50,
    )


async def test_grant_idempotency(ledger: Ledger) -> None:
    assert await ledger.grant("acme", 5_000_000, note="invoice 1", grant_id="inv-1") == 5_000_000
    assert await ledger.grant("acme", 5_000_000, note="invoice 1", grant_id="inv-1") == 5_000_000
    assert await ledger.grant("acme", 1, note="no id") == 5_000_001
    assert await ledger.grant("acme", 1, note="no id") == 5_000_002
    # request ids and grant ids do not share a namespace
    assert (await ledger.reserve(request("inv-2"), now_ms=T0)).ok
    await ledger.settle("inv-2", 1, 1, 200, 1, now_ms=T0 + 1)
    balance = (await ledger.balance("acme")).balance
    assert await ledger.grant("acme", 7, grant_id="inv-2") == balance + 7
    entries = await ledger.transactions("acme")
    grants = [e for e in entries if e["type"] == "grant"]
    assert [e["id"] for e in grants].count("inv-1") == 1 and len(grants) == 4
    assert next(e for e in grants if e["id"] == "inv-1")["note"] == "invoice 1"
    with pytest.raises(ValueError):
        await ledger.grant("acme", 0)
    total, balance = await ledger.reconcile("acme")
    assert total == balance


async def test_transactions_page_newest_first(ledger: Ledger) -> None:
    await ledger.grant("acme", 10**7)
    t = int(time.time() * 1000) + 10_000  # after the grant
    stamps = [t + 1, t + 2, t + 3, t + 3, t + 3, t + 5, t + 6]
    for i, ts in enumerate(stamps):
        assert (await ledger.reserve(request(f"r{i}"), now_ms=ts - 1)).ok
        await ledger.settle(f"r{i}", 10, 10, 200, 1, now_ms=ts)
    pages, before = [], None
    while True:
        page = await ledger.transactions("acme", limit=3, before_ms=before)
        if not page:
            break
        pages.append(page)
        before = page[-1]["ts"]
    flat = [e for page in pages for e in page]
    assert len(flat) == 8 and len({e["id"] for e in flat}) == 8
    assert [e["ts"] for e in flat] == sorted((e["ts"] for e in flat), reverse=True)
    assert flat[-1]["type"] == "grant"
    # the page boundary falls inside the t+3 millisecond: the page takes all of it
    assert [len(p) for p in pages] == [5, 3]


async def test_retention_folds_old_entries_into_a_checkpoint_that_keeps_the_sum(
    ledger: Ledger,
) -> None:
    await ledger.grant("acme", 10**7)
    await ledger.grant("other", 10**6)
    t = int(time.time() * 1000) + 10_000  # after the grants
    for i in range(7):  # settled at t, t + 1000, ... t + 6000
        assert (await ledger.reserve(request(f"r{i}"), now_ms=t + i * 1000 - 1)).ok
        await ledger.settle(f"r{i}", 10, 10 + i, 200, 1, now_ms=t + i * 1000)
    before = await ledger.transactions("acme", limit=100)
    by_ts = sorted(before, key=lambda e: e["ts"])

    # everything before t + 3000 (the grant and r0-r2), three entries a script call
    assert await ledger.fold("acme", t + 3000, limit=3) == 4
    after = await ledger.transactions("acme", limit=100)
    assert [e["id"] for e in after[:-1]] == [f"r{i}" for i in range(6, 2, -1)]
    checkpoint = after[-1]
    assert checkpoint["type"] == "checkpoint" and checkpoint["entries"] == 4
    assert checkpoint["amount"] == sum(e["amount"] for e in by_ts[:4])
    assert checkpoint["ts"] == t + 2000 and checkpoint["since"] == by_ts[0]["ts"]
    assert checkpoint["balance"] == by_ts[3]["balance"]
    total, balance = await ledger.reconcile("acme")
    assert total == balance == (await ledger.balance("acme")).balance
    assert [u["request_id"] for u in await ledger.usage("acme")] == [f"r{i}" for i in (6, 5, 4, 3)]

    # a lone checkpoint is not folded again; a later fold takes it in with the rest
    assert await ledger.fold("acme", t + 3000) == 0
    assert await ledger.fold("acme", t + 5000) == 2
    after = await ledger.transactions("acme", limit=100)
    assert [e["id"] for e in after[:-1]] == ["r6", "r5"]
    assert after[-1]["entries"] == 6 and after[-1]["since"] == by_ts[0]["ts"]
    total, balance = await ledger.reconcile("acme")
    assert total == balance

    # every account, from the accounts set; an account with nothing old keeps its entries
    assert await ledger.fold_all(t + 10_000) == 2 + 1  # acme: r5 and r6; other: its grant
    assert [e["type"] for e in await ledger.transactions("acme")] == ["checkpoint"]
    assert (await ledger.transactions("other"))[0]["type"] == "checkpoint"
    for account in ("acme", "other"):
        total, balance = await ledger.reconcile(account)
        assert total == balance > 0
    assert await ledger.claim_fold(60) and not await ledger.claim_fold(60)


async def test_a_checkpoint_has_the_balance_after_its_entries_even_within_one_millisecond(
    ledger: Ledger,
) -> None:
    """Entries of one millisecond sort by their JSON text, not by when they were made: "zz" is
    settled before "aa" but sorts after it, so the last entry in the ledger's order is not the
    last one made, and its balance is not the balance after both."""
    await ledger.grant("acme", 10**7)
    t = int(time.time() * 1000) + 10_000
    for rid in ("zz", "aa"):
        assert (await ledger.reserve(request(rid), now_ms=t - 1)).ok
    await ledger.settle("zz", 10, 10, 200, 1, now_ms=t)
    await ledger.settle("aa", 10, 20, 200, 1, now_ms=t)
    after_both = (await ledger.balance("acme")).balance
    by_order = sorted(await ledger.transactions("acme"), key=lambda e: (e["ts"], e["id"]))
    assert [e["id"] for e in by_order[-2:]] == ["aa", "zz"]
    assert by_order[-1]["balance"] != after_both  # "zz" was made first

    assert await ledger.fold("acme", t + 1) == 3
    [checkpoint] = await ledger.transactions("acme")
    assert checkpoint["type"] == "checkpoint" and checkpoint["ts"] == t
    assert checkpoint["balance"] == checkpoint["amount"] == after_both
    total, balance = await ledger.reconcile("acme")
    assert total == balance == after_both


async def test_the_sweeper_folds_what_is_older_than_the_retention(ledger: Ledger) -> None:
    from extproc.metrics import Metrics
    from extproc.settle_service import sweep_forever

    await ledger.grant("acme", 10**7)
    now = int(time.time() * 1000)
    for i, age_ms in enumerate((9000, 8000, 500)):  # two older than the 5 s retention
        assert (await ledger.reserve(request(f"r{i}"), now_ms=now - age_ms - 1)).ok
        await ledger.settle(f"r{i}", 10, 10, 200, 1, now_ms=now - age_ms)
    sweeper = asyncio.create_task(sweep_forever(ledger, 0.05, Metrics(), retention_s=5.0))
    try:
        deadline = time.monotonic() + 5
        while (await ledger.transactions("acme"))[-1]["type"] != "checkpoint":
            assert time.monotonic() < deadline, "the sweeper did not fold the ledger"
            await asyncio.sleep(0.05)
    finally:
        sweeper.cancel()
    entries = await ledger.transactions("acme")
    assert [e["type"] for e in entries] == ["grant", "debit", "checkpoint"]  # grant: now
    assert entries[-1]["entries"] == 2
    total, balance = await ledger.reconcile("acme")
    assert total == balance


async def test_usage_filters(ledger: Ledger) -> None:
    await ledger.grant("acme", 10**7)
    for i in range(12):
        model = "m2" if i % 3 == 0 else "m1"
        assert (await ledger.reserve(request(f"r{i}", model=model), now_ms=T0)).ok
        await ledger.settle(f"r{i}", 10, i, 200, 7, now_ms=T0 + i * 1000)
    m2 = await ledger.usage("acme", model="m2")
    assert [u["request_id"] for u in m2] == ["r9", "r6", "r3", "r0"]
    assert m2[0]["cost"] == token_cost(PRICE, 10, 9) and m2[0]["backend"] == "b1"
    window = await ledger.usage("acme", since_ms=T0 + 3000, until_ms=T0 + 6000)
    assert [u["request_id"] for u in window] == ["r6", "r5", "r4", "r3"]
    both = await ledger.usage("acme", since_ms=T0 + 3000, until_ms=T0 + 6000, model="m1")
    assert [u["request_id"] for u in both] == ["r5", "r4"]
    assert len(await ledger.usage("acme", model="m1", limit=3)) == 3


async def test_counted_tokens_are_flagged_on_debits_only(ledger: Ledger) -> None:
    """A stream whose backend's usage never came is settled on the stream meter's count: its
    debit says "counted"; a void never does, and a replay does not add a second entry."""
    await ledger.grant("acme", 10**6)
    for rid in ("a", "b", "c"):
        assert (await ledger.reserve(request(rid), now_ms=T0)).ok
    await ledger.settle("a", 100, 5, 200, 1, "client_disconnected", now_ms=T0 + 1, counted=True)
    await ledger.settle("b", 100, 5, 200, 1, now_ms=T0 + 2)
    await ledger.settle("c", 0, 0, 502, 1, now_ms=T0 + 3, counted=True)  # failed: void
    again = await ledger.settle("a", 100, 5, 200, 1, now_ms=T0 + 4, counted=True)
    assert again.status == "duplicate"
    entries = {e["id"]: e for e in await ledger.transactions("acme") if e["type"] != "grant"}
    assert len(entries) == 3
    assert entries["a"]["counted"] is True and entries["a"]["type"] == "debit"
    assert "counted" not in entries["b"] and "counted" not in entries["c"]
    assert entries["c"]["type"] == "void"
    (record,) = [u for u in await ledger.usage("acme") if u["request_id"] == "a"]
    assert record["counted"] is True


async def test_one_entry_per_request_is_both_transaction_and_usage(
    ledger: Ledger, client: redis.asyncio.Redis
) -> None:
    await ledger.grant("acme", 10**6)
    assert (await ledger.reserve(request("a"), now_ms=T0)).ok
    s = await ledger.settle("a", 90, 7, 200, 12, now_ms=T0 + 5)
    (usage,) = await ledger.usage("acme")  # the grant is not a request
    assert usage == {
        "ts": T0 + 5, "request_id": "a", "key_prefix": "tg_k1", "model": "m1", "backend": "b1",
        "tokens_in": 90, "tokens_out": 7, "unit": "tokens", "cost": s.charged, "latency_ms": 12,
        "status": 200,
    }  # fmt: skip
    debit, grant = await ledger.transactions("acme")
    assert set(debit) == {
        "id", "ts", "type", "amount", "balance", "request_id", "model", "key_prefix",
        "tokens_in", "tokens_out", "unit", "reserved", "written_off", "reason",
    }  # fmt: skip
    assert debit["amount"] == -s.charged and grant["type"] == "grant"
    assert await client.zcard("tg:ledger:acme") == 2
    assert not await client.keys("tg:usage:*")


async def test_limits_keep_state_only_for_keys_that_have_them(
    ledger: Ledger, client: redis.asyncio.Redis
) -> None:
    await ledger.grant("acme", 10**6)
    assert (await ledger.reserve(request("a", key="free"), now_ms=T0)).ok
    assert not await client.keys("tg:rl:*") and not await client.keys("tg:cc:*")
    await ledger.settle("a", 100, 50, 200, 1, now_ms=T0 + 1)
    limited = Limits(rpm=5, tpm=10_000, concurrency=3)
    r = await ledger.reserve(request("b", key="lim", limits=limited), now_ms=T0)
    assert (r.rpm_remaining, r.tpm_remaining) == (4, 10_000 - 150)
    assert await client.keys("tg:rl:*") == [f"tg:rl:lim:{MINUTE}"]
    assert 0 < await client.ttl(f"tg:rl:lim:{MINUTE}") <= 120
    assert await client.zcard("tg:cc:lim") == 1
    s = await ledger.settle("b", 100, 20, 200, 1, now_ms=T0 + 1)
    assert (s.rpm_remaining, s.tpm_remaining) == (4, 10_000 - 120)
    assert await client.zcard("tg:cc:lim") == 0


async def test_records_an_earlier_version_wrote_are_settled_and_swept(
    ledger: Ledger, client: redis.asyncio.Redis
) -> None:
    """A gateway upgraded with requests in flight: their reservations are hashes, their done
    markers JSON objects. Settle, sweep and a replayed settle still read them."""
    await ledger.grant("acme", 10**6)
    amount = token_cost(PRICE, 100, 50)
    await client.hset("tg:acct:acme", "pending", amount * 2)

    def old(rid: str) -> dict[str, object]:
        return {
            "account": "acme", "key_hash": "k1", "key_prefix": "tg_k1", "model": "m1",
            "backend": "b1", "amount": amount, "prompt_est": 100, "granted": 50,
            "tok_reserved": 150, "unit": "tokens", "minute": MINUTE,
            "input_per_1m": PRICE.input_per_1m, "output_per_1m": PRICE.output_per_1m,
            "per_request": PRICE.per_request, "rpm": 0, "tpm": 0, "created_ms": T0,
            "expires_ms": T0 + 1000, "k_acct": "tg:acct:acme", "k_cc": "tg:cc:k1",
            "k_rl_prefix": "tg:rl:k1:", "k_ledger": "tg:ledger:acme",
            "k_usage": "tg:usage:acme", "k_done": f"tg:done:{rid}",
        }  # fmt: skip

    for rid in ("old1", "old2"):
        await client.hset(f"tg:resv:{rid}", mapping=old(rid))
        await client.zadd("tg:resv-due", {rid: T0 + 1000})
    s = await ledger.settle("old1", 100, 10, 200, 3, now_ms=T0 + 5)
    assert s.status == "ok" and s.charged == token_cost(PRICE, 100, 10)
    assert await ledger.sweep(now_ms=T0 + 2000) == 1
    b = await ledger.balance("acme")
    assert (b.balance, b.pending) == (10**6 - s.charged - amount, 0)
    await client.set(
        "tg:done:old3",
        '{"type":"debit","charged":42,"written_off":0,"k_acct":"tg:acct:acme",'
        '"k_rl_prefix":"tg:rl:k1:","rpm":0,"tpm":0}',
    )
    replay = await ledger.settle("old3", 1, 1, 200, 1, now_ms=T0 + 6)
    assert (replay.status, replay.charged, replay.entry_type) == ("duplicate", 42, "debit")
    total, balance = await ledger.reconcile("acme")
    assert total == balance


async def test_settle_soon_over_the_pipelined_client(
    client: redis.asyncio.Redis, valkey_url: str
) -> None:
    """The request path's settlement: sent at once, a future of the same figures as settle."""
    from extproc.resp import ScriptClient

    fast = ScriptClient(valkey_url)
    ledger = Ledger(client, fast)
    await ledger.grant("acme", 10**6)
    assert (await ledger.reserve(request("a"))).ok  # opens the pipelined connection
    futures = [ledger.settle_soon("a", 100, 10, 200, 4, "settled", False) for _ in range(3)]
    assert all(f is not None for f in futures)
    first, *replays = [await f for f in futures if f is not None]
    assert first.status == "ok" and first.charged == token_cost(PRICE, 100, 10)
    assert [r.status for r in replays] == ["duplicate", "duplicate"]
    assert all(r.charged == first.charged for r in replays)
    assert Ledger(client).settle_soon("a", 1, 1, 200, 1, "settled", False) is None  # redis-py
    total, balance = await ledger.reconcile("acme")
    assert total == balance == 10**6 - first.charged
    await fast.aclose()


async def test_lua_formulas_agree_with_money(ledger: Ledger) -> None:
    prices = [
        Price(),
        Price(input_per_1m=1, output_per_1m=1),
        PRICE,
        Price(input_per_1m=150_000, output_per_1m=600_000),
        Price(input_per_1m=3, output_per_1m=7, per_request=1),
        Price(input_per_1m=999_999, output_per_1m=1_000_001, per_request=5),
        Price(input_per_1m=10**9, output_per_1m=3 * 10**9, per_request=10**6),
        Price(input_per_1m=5_000_000),
    ]
    prompts = [0, 1, 7, 12_345]
    balances = [0, 1, 99, 1000, 123_456_789, 10**12]
    cases = [
        (price, prompt, balance, cap)
        for price in prices
        for prompt in prompts
        for balance in balances
        for cap in (1, 4096)
    ]

    async def clamp(i: int, price: Price, prompt: int, balance: int, cap: int) -> None:
        account = f"g{i}"
        if balance:
            await ledger.grant(account, balance)
        r = await ledger.reserve(
            request(f"c{i}", account=account, prompt=prompt, max_tokens=None, cap=cap,
                    price=price), now_ms=T0,
        )  # fmt: skip
        best = max_affordable_completion(price, prompt, balance)
        if best < 1:
            assert r.status == "insufficient_credits", (price, prompt, balance, cap)
            return
        assert r.ok and r.granted == min(cap, best), (price, prompt, balance, cap)
        assert r.amount == token_cost(price, prompt, r.granted)
        s = await ledger.settle(f"c{i}", prompt, r.granted // 2, 200, 1, now_ms=T0 + 1)
        assert s.charged == token_cost(price, prompt, r.granted // 2)

    await asyncio.gather(*(clamp(i, *case) for i, case in enumerate(cases)))

    # near 2^53 (1M prompt tokens at 8,000+ credits per 1M): the rounding must stay exact, where
    # math.ceil(x / 1e6) would round 8.6e15 + 1 down to a whole number of µcr
    big = [
        (Price(input_per_1m=8_000_000_000, output_per_1m=999_999_999, per_request=3), 10**6, 1),
        (Price(input_per_1m=8_000_000_000, output_per_1m=999_999_999), 999_999, 999),
        (Price(input_per_1m=8_600_000_000, output_per_1m=1), 10**6, 1),
        (Price(input_per_1m=8_600_000_000, output_per_1m=3, per_request=1), 10**6, 3),
        (Price(input_per_1m=8_999_999_999), 10**6, 1),
    ]
    for i, (price, prompt, completion) in enumerate(big):
        cost = token_cost(price, prompt, completion)
        await ledger.grant(f"big{i}", cost)
        r = await ledger.reserve(
            request(f"b{i}", account=f"big{i}", prompt=prompt, max_tokens=None, cap=4096,
                    price=price), now_ms=T0,
        )  # fmt: skip
        best = max_affordable_completion(price, prompt, cost)
        assert r.granted == min(4096, best) >= completion
        assert r.amount == token_cost(price, prompt, r.granted) == cost
        s = await ledger.settle(f"b{i}", prompt, completion, 200, 1, now_ms=T0 + 1)
        assert s.charged == cost and s.balance == 0
        total, balance = await ledger.reconcile(f"big{i}")
        assert total == balance == 0

    # balances near 2^53 are written as exact integers (Lua's default would be 9.007199254741e+15)
    whale = 2**53 - 2
    await ledger.grant("whale", whale)
    r = await ledger.reserve(request("w", account="whale", max_tokens=None, cap=77), now_ms=T0)
    assert r.granted == 77 and r.available == whale - r.amount
    s = await ledger.settle("w", 100, 7, 200, 1, now_ms=T0 + 1)
    assert s.balance == whale - token_cost(PRICE, 100, 7) == (await ledger.balance("whale")).balance
    assert (await ledger.transactions("whale"))[0]["balance"] == s.balance
    total, balance = await ledger.reconcile("whale")
    assert total == balance == s.balance


async def test_requested_amounts_agree_with_money(ledger: Ledger) -> None:
    await ledger.grant("acme", 10**12)
    prices = [PRICE, Price(input_per_1m=3, output_per_1m=7, per_request=1), Price(output_per_1m=1)]
    cases = [(p, prompt, c) for p in prices for prompt in (0, 5, 999) for c in (1, 33, 1000)]
    results: list[Reservation] = await asyncio.gather(
        *(
            ledger.reserve(request(f"q{i}", prompt=prompt, max_tokens=c, price=p), now_ms=T0)
            for i, (p, prompt, c) in enumerate(cases)
        )
    )
    for (p, prompt, c), r in zip(cases, results, strict=True):
        assert r.ok and r.granted == c and r.amount == token_cost(p, prompt, c)


async def test_reserve_rejects_out_of_range_inputs(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="cap"):
        await ledger.reserve(request("a", max_tokens=None, cap=-1), now_ms=T0)
    huge = Price(input_per_1m=10**10, output_per_1m=10**10)
    with pytest.raises(ValueError, match="exact"):
        await ledger.reserve(request("a", prompt=10**6, price=huge), now_ms=T0)


async def test_bytes_client(valkey_url: str) -> None:
    client = redis.asyncio.Redis.from_url(valkey_url)  # decode_responses=False
    try:
        await client.flushdb()
        ledger = Ledger(client)
        await ledger.grant("acme", 10**6, grant_id="g")
        r = await ledger.reserve(request("a"), now_ms=T0)
        assert r.ok and isinstance(r.status, str)
        s = await ledger.settle("a", 100, 50, 200, 5, now_ms=T0 + 1)
        assert s.status == "ok" and s.entry_type == "debit"
        assert (await ledger.balance("acme")).balance == 10**6 - s.charged
        assert [e["type"] for e in await ledger.transactions("acme")] == ["debit", "grant"]
        assert (await ledger.usage("acme", model="m1"))[0]["request_id"] == "a"
        total, balance = await ledger.reconcile("acme")
        assert total == balance
    finally:
        await client.aclose()


async def test_an_abandoned_reserve_on_a_pool_of_connections_is_voided_once_made(
    ledger: Ledger, client: redis.asyncio.Redis
) -> None:
    """On redis-py's pool (a rediss:// store: no pipelined client) a void sent after a reserve
    may reach the store first and find nothing. So a reserve whose caller is cancelled while the
    store holds it (CLIENT PAUSE here) completes anyway, and what it reserved is voided then:
    nothing is left for the sweeper to charge."""
    await ledger.grant("acme", 10**6)
    await client.execute_command("CLIENT", "PAUSE", "400", "WRITE")
    call = asyncio.ensure_future(ledger.reserve(request("gone"), abandoned_reason="client_gone"))
    await asyncio.sleep(0.1)  # sent, and held
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # the processor's own void, on another connection: before or after the reservation
    crossing = asyncio.ensure_future(ledger.settle("gone", None, None, 0, -1, "client_gone"))
    assert (await crossing).status in ("unknown", "ok")
    for _ in range(100):
        entries = [e for e in await ledger.transactions("acme") if e.get("request_id") == "gone"]
        if entries:
            break
        await asyncio.sleep(0.05)
    assert [(e["type"], e["amount"], e["reason"]) for e in entries] == [("void", 0, "client_gone")]
    assert (await ledger.balance("acme")).pending == 0
    total, balance = await ledger.reconcile("acme")
    assert total == balance == 10**6
    # a caller that is not cancelled keeps its reservation
    assert (await ledger.reserve(request("kept"), abandoned_reason="client_gone")).ok
    assert (await ledger.balance("acme")).pending > 0


# What the settling access log sends for one batch: each kind of settlement once, a request id
# twice, one never reserved, one settled before the batch.
_BATCH = (
    ("debit", 100, 40, 200, "settled", False, False),
    ("cut", 100, 3, 200, "client_disconnected", False, True),
    ("void", None, None, 200, "client_disconnected", False, False),
    ("failed", 0, 0, 502, "settled", False, False),
    ("unknown_usage", None, None, 200, "settled", True, False),
    ("debit", 100, 50, 200, "settled", False, False),  # the same id again, in the same batch
    ("earlier", 100, 7, 200, "settled", False, False),
    ("never_reserved", 1, 1, 200, "settled", False, False),
)


def _batch() -> list[SettleCall]:
    return [SettleCall(rid, p, c, s, -1, why, served, counted)
            for rid, p, c, s, why, served, counted in _BATCH]  # fmt: skip


async def _reserve_batch(ledger: Ledger, account: str) -> None:
    await ledger.grant(account, 10**7)
    for rid in {b[0] for b in _BATCH} - {"never_reserved"}:
        assert (await ledger.reserve(request(f"{account}-{rid}", account=account))).ok
    await ledger.settle(f"{account}-earlier", 100, 7, 200, 1)


@pytest.mark.parametrize("pipelined", [False, True])
async def test_settle_many_settles_each_as_settle_does(
    client: redis.asyncio.Redis, valkey_url: str, pipelined: bool
) -> None:
    """One SETTLE_MANY call (the access log's batch) leaves the same figures and ledger entries
    as SETTLE called for each request in turn, duplicates within the batch included."""
    from extproc.resp import ScriptClient

    fast = ScriptClient(valkey_url) if pipelined else None
    ledger = Ledger(client, fast)
    for account in ("one", "many"):
        await _reserve_batch(ledger, account)
    one = [
        await ledger.settle(f"one-{c.request_id}", c.prompt_tokens, c.completion_tokens,
                            c.status, c.latency_ms, c.reason, charge_reserved=c.charge_reserved,
                            counted=c.counted)
        for c in _batch()
    ]  # fmt: skip
    calls = [SettleCall(f"many-{c.request_id}", *(getattr(c, f) for f in _CALL_FIELDS))
             for c in _batch()]  # fmt: skip
    if pipelined:
        future = ledger.settle_many_soon(calls)
        assert future is not None
        many = await future
    else:
        assert ledger.settle_many_soon(calls) is None  # redis-py has no pipelined call
        many = await ledger.settle_many(calls)
    assert all(not isinstance(s, Exception) for s in many)
    assert many == one  # every figure, the duplicate's and the unknown one's included
    assert [s.status for s in many] == ["ok"] * 5 + ["duplicate", "duplicate", "unknown"]
    assert [s.entry_type for s in many[:5]] == ["debit", "debit", "void", "void", "debit"]
    assert many[5].charged == many[0].charged == token_cost(PRICE, 100, 40)

    def entries(rows: list[dict]) -> list[dict]:
        drop = ("id", "request_id", "ts", "latency_ms", "balance")
        return sorted(
            ({k: v for k, v in e.items() if k not in drop} for e in rows if e["type"] != "grant"),
            key=lambda e: sorted((k, str(v)) for k, v in e.items()),
        )

    assert entries(await ledger.transactions("many")) == entries(await ledger.transactions("one"))
    assert len(await ledger.transactions("many")) == 1 + 6  # the grant and 6 requests
    for account in ("one", "many"):
        b = await ledger.balance(account)
        assert b.pending == 0
        total, balance = await ledger.reconcile(account)
        assert total == balance == b.balance
    assert await client.zcard("tg:resv-due") == 0
    again = await ledger.settle_many(calls)  # the whole batch replayed: nothing charged again
    assert [s.status for s in again if not isinstance(s, Exception)] == ["duplicate"] * 7 + [
        "unknown"
    ]
    assert (await ledger.balance("many")).balance == (await ledger.balance("one")).balance
    if fast is not None:
        await fast.aclose()


_CALL_FIELDS = (
    "prompt_tokens", "completion_tokens", "status", "latency_ms", "reason", "charge_reserved",
    "counted",
)  # fmt: skip


async def test_settle_many_a_broken_record_does_not_stop_the_batch(
    ledger: Ledger, client: redis.asyncio.Redis
) -> None:
    await ledger.grant("acme", 10**6)
    for rid in ("a", "b"):
        assert (await ledger.reserve(request(rid))).ok
    await client.set("tg:resv:broken", "not json")
    got = await ledger.settle_many(
        [SettleCall("a", 100, 10, 200, -1), SettleCall("broken", 1, 1, 200, -1),
         SettleCall("b", 100, 20, 200, -1)]
    )  # fmt: skip
    a, broken, b = got
    assert isinstance(broken, redis.exceptions.ResponseError)
    assert not isinstance(a, Exception) and a.charged == token_cost(PRICE, 100, 10)
    assert not isinstance(b, Exception) and b.charged == token_cost(PRICE, 100, 20)
    assert (await ledger.balance("acme")).pending == 0
    assert await ledger.settle_many([]) == []


async def test_the_settling_log_settles_a_message_once_a_record(
    client: redis.asyncio.Redis, valkey_url: str
) -> None:
    """One access-log message, as Envoy sends it: each metered stream settled once (a record
    repeated in it is a duplicate), records without a request id skipped, a broken one logged
    while the rest settle, and the metrics counting what was settled."""
    from envoy.service.accesslog.v3 import als_pb2

    from extproc.config import parse_config
    from extproc.metering import Meter
    from extproc.metrics import Metrics
    from extproc.resp import ScriptClient
    from extproc.settle_service import SettleLog
    from tests.harness import base_config

    fast = ScriptClient(valkey_url)
    ledger = Ledger(client, fast)
    await ledger.grant("acme", 10**7)
    for rid in ("s1", "s2", "cut", "broken"):
        assert (await ledger.reserve(request(rid, model="sim-chat"))).ok
    await client.set("tg:resv:broken", "not json")
    metrics = Metrics()
    meter = Meter(parse_config(base_config()), ledger, metrics)

    message = als_pb2.StreamAccessLogsMessage()
    message.identifier.log_name = "tollgate_settle"
    records = [  # request id, prompt and completion tokens (None: no usage), status, cut
        ("s1", 100, 16, 200, False),
        ("s2", 90, 12, 200, False),
        ("s1", 100, 16, 200, False),  # sent twice
        ("cut", 100, 3, 200, True),
        ("", 1, 1, 200, False),  # no request id: not a metered stream's record
        ("broken", 1, 1, 200, False),
        ("never", 1, 1, 200, False),
    ]
    for rid, p, c, status, cut in records:
        e = message.http_logs.log_entry.add()
        fm = e.common_properties.metadata.filter_metadata
        md = fm["tollgate"].fields
        md["model"].string_value = "sim-chat"
        if rid:
            md["request_id"].string_value = rid
        fm["tollgate.usage"].fields["prompt_tokens"].number_value = p
        fm["tollgate.usage"].fields["completion_tokens"].number_value = c
        e.response.response_code.value = status
        e.common_properties.response_flags.downstream_connection_termination = cut
    second = als_pb2.StreamAccessLogsMessage()  # a later message: the same stream again
    second.http_logs.log_entry.add().CopyFrom(message.http_logs.log_entry[0])

    async def stream() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        yield message
        yield second

    await SettleLog(meter, metrics).StreamAccessLogs(stream(), None)

    charged = {  # at the price the reservation recorded
        "s1": token_cost(PRICE, 100, 16),
        "s2": token_cost(PRICE, 90, 12),
        "cut": token_cost(PRICE, 100, 3),
    }
    entries = {e["id"]: e for e in await ledger.transactions("acme") if e["type"] != "grant"}
    assert {rid: -e["amount"] for rid, e in entries.items()} == charged
    assert entries["cut"]["reason"] == "client_disconnected"
    assert entries["s1"]["reason"] == "settled"
    b = await ledger.balance("acme")
    assert b.balance == 10**7 - sum(charged.values())
    assert b.pending == token_cost(PRICE, 100, 50)  # the broken one's, for the sweeper
    assert metrics.settle_records.values == {("tollgate_settle",): 7}
    assert metrics.credits.values[("settled",)] == sum(charged.values())
    assert metrics.tokens.values[("sim-chat", "output")] == 16 + 12 + 3  # s1 counted once
    await fast.aclose()


async def test_follow_hands_each_channel_its_messages_and_announce_settled_publishes(
    client: redis.asyncio.Redis, valkey_url: str
) -> None:
    """store.follow: one subscription, each channel's messages to its handler, ``subscribed``
    after connecting; Ledger.announce_settled publishes the worker's token on tg:settled."""
    from extproc import store

    got: list[tuple[str, str]] = []
    ready = asyncio.Event()
    handlers = {
        store.keys_channel(): lambda m: got.append(("keys", m)),
        store.settled_channel(): lambda m: got.append(("settled", m)),
    }
    task = asyncio.create_task(store.follow(valkey_url, handlers, ready.set))
    try:
        await asyncio.wait_for(ready.wait(), 5)
        await client.publish(store.keys_channel(), "account:a1")
        await Ledger(client).announce_settled("4242")
        await client.publish("tg:elsewhere", "ignored")
        for _ in range(100):
            if len(got) == 2:
                break
            await asyncio.sleep(0.02)
        assert got == [("keys", "account:a1"), ("settled", "4242")]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_the_failed_log_voids_what_a_dead_workers_requests_reserved(
    client: redis.asyncio.Redis, valkey_url: str
) -> None:
    """Records of envoy_config.FAILED_LOG (Envoy's 503 after the processor failed): each
    request's reservation is voided by its x-request-id; a metered stream's record is left to
    its settling log (which carries its usage)."""
    from envoy.service.accesslog.v3 import als_pb2

    from extproc.config import parse_config
    from extproc.envoy_config import FAILED_LOG
    from extproc.metering import Meter
    from extproc.metrics import Metrics
    from extproc.resp import ScriptClient
    from extproc.settle_service import PROCESSOR_FAILED, SettleLog
    from tests.harness import base_config

    fast = ScriptClient(valkey_url)
    ledger = Ledger(client, fast)
    await ledger.grant("acme", 10**7)
    for rid in ("chat", "stream"):
        assert (await ledger.reserve(request(rid, model="sim-chat"))).ok
    message = als_pb2.StreamAccessLogsMessage()
    message.identifier.log_name = FAILED_LOG
    for rid in ("chat", "stream", "never-reserved", ""):
        e = message.http_logs.log_entry.add()
        e.request.request_id = rid
        e.response.response_code.value = 503
        if rid == "stream":
            md = e.common_properties.metadata.filter_metadata["tollgate"].fields
            md["request_id"].string_value = rid
            md["settle_now"].bool_value = True

    async def stream() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        yield message

    metrics = Metrics()
    await SettleLog(Meter(parse_config(base_config()), ledger, metrics), metrics).StreamAccessLogs(
        stream(), None
    )
    entries = {e["request_id"]: e for e in await ledger.transactions("acme") if "request_id" in e}
    assert set(entries) == {"chat"}
    assert (entries["chat"]["type"], entries["chat"]["reason"]) == ("void", PROCESSOR_FAILED)
    assert (await ledger.balance("acme")).pending == token_cost(PRICE, 100, 50)  # the stream's
    assert metrics.settle_records.values == {(FAILED_LOG,): 2}
    await fast.aclose()


async def test_the_hot_paths_store_calls_leave_no_reference_cycles(
    client: redis.asyncio.Redis, valkey_url: str
) -> None:
    """Reserve, settle_soon and settle_many_soon over the pipelined client free what they made
    by reference counting: cyclic garbage per call would cost every request a share of the
    garbage collector's passes (a closure that was its own callback left ~17 objects a call)."""
    import gc

    from extproc.resp import ScriptClient

    fast = ScriptClient(valkey_url)
    ledger = Ledger(client, fast)
    await ledger.grant("acme", 10**9)
    assert (await ledger.reserve(request("warm"))).ok  # opens the pipelined connection

    async def one_round(i: int) -> None:
        assert (await ledger.reserve(request(f"r{i}"))).ok
        assert (await ledger.reserve(request(f"s{i}"))).ok
        soon = ledger.settle_soon(f"r{i}", 100, 10, 200, 4, "settled", False)
        many = ledger.settle_many_soon(
            [SettleCall(f"s{i}", 100, 10, 200, -1, "settled", False, False)]
        )
        assert soon is not None and many is not None
        assert (await soon).status == "ok"
        assert [s.status for s in await many] == ["ok"]  # type: ignore[union-attr]

    await one_round(-1)  # anything made once (caches) is made before counting
    gc.collect()
    gc.disable()
    try:
        for i in range(100):
            await one_round(i)
        found = gc.collect()
    finally:
        gc.enable()
    assert found < 100, f"{found} objects in reference cycles after 100 rounds"
    await fast.aclose()
