"""Settlements the store was out of reach for are sent again (extproc/settle_retry.py): against
a real Valkey behind a proxy the tests cut and restore, and the retry queue's rules on their own.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.exceptions

from extproc.auth import Principal
from extproc.config import parse_config
from extproc.ledger import Ledger, ReserveRequest
from extproc.metering import STORE_LOST, Meter
from extproc.metrics import Metrics
from extproc.money import token_cost
from extproc.resp import AnswerLost, ScriptClient
from extproc.settle_retry import SettleRetry
from tests.harness import base_config

pytestmark = pytest.mark.anyio

CFG = parse_config(base_config())
MODEL = CFG.models_by_id["sim-chat"]
PRICE = MODEL.price
assert PRICE is not None


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def valkey_port(valkey_url: str) -> int:
    return int(valkey_url.rsplit(":", 1)[1].split("/")[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proxy:
    """A TCP proxy in front of the store, in the test's event loop: ``down()`` closes every
    connection and refuses new ones (the store restarting), ``up()`` serves again, and
    ``swallow_next()`` passes the next call to the store and then drops the connection before
    its answer comes back (the store ran it; the caller never hears)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = _free_port()
        self.server: asyncio.Server | None = None
        self.open: set[asyncio.StreamWriter] = set()
        self.swallow = False

    async def up(self) -> None:
        self.server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.open):
            w.close()
        await self.server.wait_closed()
        self.server = None

    def swallow_next(self) -> None:
        self.swallow = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.open |= {writer, up_writer}

        muted = False  # answers to this connection are dropped

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, out: bool) -> None:
            nonlocal muted
            try:
                while data := await src.read(65536):
                    if out and self.swallow:  # the store gets the call; the caller, nothing
                        self.swallow, muted = False, True
                        dst.write(data)
                        await dst.drain()
                        await asyncio.sleep(0.2)  # the store has run it
                        writer.close()
                        return
                    if not muted:
                        dst.write(data)
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        self.open -= {writer, up_writer}


@pytest.fixture()
async def rig(valkey_port: int) -> AsyncIterator[tuple[Proxy, Ledger, Meter, redis.asyncio.Redis]]:
    """The store (direct, for the test's reads), and a Meter whose hot-path calls go through
    the proxy."""
    direct = redis.asyncio.Redis(port=valkey_port, decode_responses=True)
    await direct.flushdb()
    proxy = Proxy(valkey_port)
    await proxy.up()
    fast = ScriptClient(f"redis://127.0.0.1:{proxy.port}/0", timeout=1.0)
    ledger = Ledger(direct, fast)
    meter = Meter(CFG, ledger, Metrics())
    meter.resends = SettleRetry(60.0, meter.metrics, delays_s=(0.05, 0.1, 0.2))
    await ledger.grant("acme", 10**9)
    yield proxy, ledger, meter, direct
    meter.resends.close()
    await fast.aclose()
    if proxy.server is not None:
        await proxy.down()
    await direct.aclose()


def _request(rid: str) -> ReserveRequest:
    return ReserveRequest(
        request_id=rid, account="acme", key_hash="k1", key_prefix="tg_k1", model="sim-chat",
        backend="vllm-chat", prompt_tokens=100, requested_max_tokens=50, cap=512, price=PRICE,
        limits=CFG.metering.default_limits, ttl_ms=60_000,
    )  # fmt: skip


async def _entry(ledger: Ledger, rid: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        entries = [e for e in await ledger.transactions("acme") if e.get("request_id") == rid]
        if entries or time.monotonic() > deadline:
            assert len(entries) == 1, entries
            return entries[0]
        await asyncio.sleep(0.05)


async def test_a_settlement_the_store_missed_goes_again_and_charges_the_real_usage(
    rig: tuple[Proxy, Ledger, Meter, redis.asyncio.Redis],
) -> None:
    proxy, ledger, meter, _ = rig
    assert (await ledger.reserve(_request("a"))).ok  # over the proxy: the connection is open
    await proxy.down()
    usage = {"prompt_tokens": 100, "completion_tokens": 7}
    with pytest.raises(redis.exceptions.ConnectionError):
        await meter.settle("a", usage, 200, int(time.time() * 1000) - 40)
    assert len(meter.resends) == 1
    await asyncio.sleep(0.3)  # probes while the store is away (one call at a time) fail
    assert len(meter.resends) == 1 and (await ledger.balance("acme")).pending > 0
    await proxy.up()
    entry = await _entry(ledger, "a")
    assert entry["type"] == "debit" and entry["reason"] == "settled"  # not "expired"
    assert (entry["tokens_in"], entry["tokens_out"]) == (100, 7)
    assert -entry["amount"] == token_cost(PRICE, 100, 7)
    (record,) = await ledger.usage("acme")
    assert 40 <= record["latency_ms"] < 1000, record  # measured when it was first sent
    b = await ledger.balance("acme")
    assert b.pending == 0 and b.balance == 10**9 - token_cost(PRICE, 100, 7)
    assert meter.metrics.settle_resends.values == {("settled",): 1}
    assert len(meter.resends) == 0


async def test_a_batch_from_the_settling_log_goes_again_and_is_counted_then(
    rig: tuple[Proxy, Ledger, Meter, redis.asyncio.Redis],
) -> None:
    proxy, ledger, meter, _ = rig
    for rid in ("s1", "s2"):
        assert (await ledger.reserve(_request(rid))).ok
    await proxy.down()
    later: list[list[Any]] = []
    records = [
        ("s1", {"prompt_tokens": 100, "completion_tokens": 16}, 200, "settled"),
        ("s2", {"prompt_tokens": 100, "completion_tokens": 3}, 200, "client_disconnected"),
    ]
    with pytest.raises(redis.exceptions.ConnectionError):
        await meter.settle_many(records, then=later.append)
    await proxy.up()
    s1, s2 = await _entry(ledger, "s1"), await _entry(ledger, "s2")
    assert (s1["type"], s1["tokens_out"], s2["tokens_out"]) == ("debit", 16, 3)
    assert s2["reason"] == "client_disconnected"
    assert len(later) == 1 and [s.charged for s in later[0]] == [
        token_cost(PRICE, 100, 16),
        token_cost(PRICE, 100, 3),
    ]
    assert (await ledger.balance("acme")).pending == 0


async def test_a_reservation_whose_answer_was_lost_is_voided_not_left_to_the_sweeper(
    rig: tuple[Proxy, Ledger, Meter, redis.asyncio.Redis],
) -> None:
    proxy, ledger, meter, direct = rig
    assert (await ledger.reserve(_request("warm"))).ok  # the pipelined connection is open
    await meter.settle("warm", None, 0, 0, "no_response")
    principal = Principal(account="acme", key_prefix="tg_k1", key_name="t", key_hash="k1")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    proxy.swallow_next()
    with pytest.raises(AnswerLost):
        await meter.reserve("lost", principal, MODEL, "chat", body, "vllm-chat")
    assert await direct.exists("tg:resv:lost")  # the store did reserve it
    entry = await _entry(ledger, "lost")
    assert entry["type"] == "void" and entry["reason"] == STORE_LOST and entry["amount"] == 0
    assert (await ledger.balance("acme")).pending == 0


async def test_a_call_that_never_went_out_leaves_nothing_to_void(
    rig: tuple[Proxy, Ledger, Meter, redis.asyncio.Redis],
) -> None:
    """A store that cannot be reached at all reserved nothing: no void waits for it (an outage
    under load would otherwise fill the queue with voids of reservations never made)."""
    proxy, _, meter, _ = rig
    await proxy.down()
    principal = Principal(account="acme", key_prefix="tg_k1", key_name="t", key_hash="k1")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    with pytest.raises(redis.exceptions.ConnectionError) as exc:
        await meter.reserve("never", principal, MODEL, "chat", body, "vllm-chat")
    assert not isinstance(exc.value, AnswerLost)
    assert len(meter.resends) == 0


# ---------------------------------------------------------------- the queue's own rules


def _calls(outcomes: list[BaseException | None], log: list[str], name: str) -> Callable[[], Any]:
    """A send whose n-th call fails with outcomes[n] (None: succeeds), the last repeating."""

    def send() -> Awaitable[None]:
        n = sum(1 for x in log if x == name)
        log.append(name)
        outcome = outcomes[min(n, len(outcomes) - 1)]

        async def call() -> None:
            if outcome is not None:
                raise outcome

        return call()

    return send


async def test_one_probe_at_a_time_while_the_store_is_away_then_the_rest_at_once() -> None:
    metrics = Metrics()
    retry = SettleRetry(60.0, metrics, delays_s=(0.01, 0.02))
    log: list[str] = []
    away = redis.exceptions.ConnectionError("store unreachable")
    retry.add(_calls([away, away, away, None], log, "a"))
    for name in "bcd":
        retry.add(_calls([None], log, name))
    await asyncio.sleep(0.3)
    assert log == ["a", "a", "a", "a", "b", "c", "d"]  # only "a" probed while away
    assert metrics.settle_resends.values == {("settled",): 4}
    assert len(retry) == 0


async def test_an_error_answer_is_not_sent_again_and_old_ones_expire() -> None:
    metrics = Metrics()
    retry = SettleRetry(0.05, metrics, delays_s=(0.01,))
    log: list[str] = []
    retry.add(_calls([redis.exceptions.ResponseError("a script error")], log, "bad"))
    await asyncio.sleep(0.05)
    assert log == ["bad"] and metrics.settle_resends.values == {("failed",): 1}
    away = redis.exceptions.TimeoutError("store did not answer in time")
    retry.add(_calls([away], log, "late"))
    await asyncio.sleep(0.2)
    assert metrics.settle_resends.values[("expired",)] == 1  # the sweeper's from then on
    assert len(retry) == 0 and 2 <= log.count("late") <= 6


async def test_at_most_limit_wait() -> None:
    metrics = Metrics()
    retry = SettleRetry(60.0, metrics, delays_s=(10.0,), limit=2)
    log: list[str] = []
    for name in "abc":
        retry.add(_calls([None], log, name))
    assert len(retry) == 2 and metrics.settle_resends.values == {("dropped",): 1}
    retry.close()
