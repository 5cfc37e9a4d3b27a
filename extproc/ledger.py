"""Credits as a ledger: reserve before the backend runs, settle once when it is done.

A request's charge is a two-phase transfer (as in TigerBeetle's pending transfers): ``reserve``
creates a pending reservation keyed by the request id with a timeout, after checking the key's
request/token rate windows and its concurrency; ``settle`` posts the real amount or voids it,
exactly once; ``sweep`` resolves reservations whose timeout passed by charging the reserved
amount. available = balance - pending. Ledger entries are immutable JSON records, so
``reconcile`` can check that the entries add up to the balance. Retention (``fold``) replaces
entries older than ``metering.ledger_retention`` by one ``checkpoint`` entry holding their sum,
so that check still holds.

Every operation is one Lua script (extproc/store_scripts.py): one round trip, atomic.

The request id (the client's X-Request-ID, or the one Envoy generated) is the reservation's
identity across all accounts. A reused id is refused at reserve (``duplicate``) and the caller
never settles a request whose reserve was refused, so a reused id can cost nothing to anyone;
it only makes that one request fail (400). Scoping client ids per account belongs with request-id
sanitation (issue #6).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
import redis.exceptions
import structlog

from . import store, store_scripts
from .config import Limits
from .money import Price
from .resp import ScriptClient

log = structlog.get_logger("tollgate.ledger")

MAX_EXACT = 2**53  # Lua numbers are doubles: every amount and product must stay below this


def out_of_range(price: Price, prompt_tokens: int, completion_tokens: int) -> bool:
    """Whether the tokens x price products leave the range the store computes exactly."""
    worst = prompt_tokens * price.input_per_1m + completion_tokens * price.output_per_1m
    return worst >= MAX_EXACT


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    request_id: str
    account: str
    key_hash: str
    key_prefix: str
    model: str
    backend: str
    prompt_tokens: int  # the estimate
    requested_max_tokens: int | None  # None: grant what the balance, the limits and cap allow
    cap: int  # the model's max_tokens, reduced to fit the context; 0: no completion (embeddings)
    price: Price
    limits: Limits
    ttl_ms: int  # the reservation's timeout: after it, the sweeper charges the reserved amount
    # What prompt_tokens count: "tokens", or a media unit ("audio_seconds", "characters",
    # "images") priced through the price's input_per_1m and kept out of the tokens window.
    unit: str = "tokens"
    # How many sequences the backend generates, each up to max_tokens (tokens.sequences): the
    # worst case is this many times the granted max_tokens, and a clamp shares the money out.
    sequences: int = 1
    # This reserve call's own id, kept in the reservation: a void after a reserve whose answer
    # never came names it (settle's ``attempt``), so it voids only what this call reserved.
    attempt: str = ""


@dataclass(slots=True)
class Reservation:
    """status: ok | duplicate | rate_limit_requests | rate_limit_tokens | concurrency |
    insufficient_credits. Every figure is filled for every status, so headers can always be
    sent; a *_remaining of -1 means the limit is 0 (unlimited). ``amount`` on a failed
    reservation is what it would have cost, when that was computed (else 0)."""

    status: str
    granted: int
    amount: int
    rpm_limit: int
    rpm_remaining: int
    tpm_limit: int
    tpm_remaining: int
    reset_s: int
    retry_after: int
    balance: int
    pending: int
    available: int
    # prompt estimate + granted x sequences: what the reservation counted in the window
    tokens: int = 0
    unit: str = "tokens"  # ReserveRequest.unit
    prompt_estimate: int = 0  # ReserveRequest.prompt_tokens (0 for a media unit)
    sequences: int = 1  # ReserveRequest.sequences: granted is per sequence

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(slots=True)
class Settlement:
    """status: ok | duplicate (the first settlement's figures; nothing charged now) | unknown.
    entry_type: debit | void | expired (the ledger entry that resolved the request), or ""."""

    status: str
    charged: int
    balance: int
    pending: int
    available: int
    rpm_remaining: int
    tpm_remaining: int
    written_off: int
    entry_type: str = ""


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~5x (0.8 µs)
class SettleCall:
    """One request of ``Ledger.settle_many``: ``settle``'s arguments (now is the call's time)."""

    request_id: str
    prompt_tokens: int | None
    completion_tokens: int | None
    status: int
    latency_ms: int
    reason: str = "settled"
    charge_reserved: bool = False
    counted: bool = False
    attempt: str = ""  # settle only (not settle_many): only the reservation this attempt made


@dataclass(slots=True)
class Balance:
    balance: int
    pending: int
    available: int


class Ledger:
    def __init__(self, client: aioredis.Redis, fast: ScriptClient | None = None) -> None:
        """``fast``: a pipelined client for reserve/settle (the request path's two calls)."""
        self._client = client
        self._scripts = store_scripts.register(client, fast)
        # one connection, in order: a call sent after a reserve reaches the store after it
        self._ordered = fast is not None
        self._voids: set[asyncio.Task[Settlement]] = set()

    async def reserve(
        self, req: ReserveRequest, now_ms: int | None = None, abandoned_reason: str = ""
    ) -> Reservation:
        """``abandoned_reason``: if the caller is cancelled while the store reserves, a
        reservation the store makes anyway is voided with this reason (on the pipelined client
        the caller's own void follows it on the same connection; on a pool of connections,
        as with ``rediss://``, that void may overtake it, so this one waits for the answer)."""
        now = _now(now_ms)
        requested = req.requested_max_tokens or 0
        if min(req.prompt_tokens, requested, req.cap) < 0 or req.ttl_ms <= 0:
            raise ValueError("prompt_tokens, requested_max_tokens, cap and ttl_ms must be >= 0")
        if req.sequences < 1:
            raise ValueError("sequences must be >= 1")
        p = req.price
        if out_of_range(p, req.prompt_tokens, max(requested, req.cap) * req.sequences):
            raise ValueError("tokens x price out of range for exact arithmetic")
        minute = now // 60_000
        keys = [
            store.reservation(req.request_id),
            store.done(req.request_id),
            store.rate_window(req.key_hash, minute),
            store.in_flight(req.key_hash),
            store.reservations_due(),
            store.account(req.account),
            store.accounts(),
            store.ledger(req.account),
        ]
        args = [
            req.request_id, req.account, req.key_hash, req.key_prefix, req.model, req.backend,
            req.prompt_tokens, requested, req.cap,
            p.input_per_1m, p.output_per_1m, p.per_request,
            req.limits.rpm, req.limits.tpm, req.limits.concurrency,
            now, req.ttl_ms, minute, store.rate_window_prefix(req.key_hash), req.unit,
            req.sequences, req.attempt,
        ]  # fmt: skip
        call = self._scripts.reserve(keys=keys, args=args)
        if abandoned_reason and not self._ordered:
            reply = await self._void_if_abandoned(call, req.request_id, abandoned_reason)
        else:
            reply = await call
        res = Reservation(_str(reply[0]), *map(int, reply[1:12]))
        res.unit, res.sequences = req.unit, req.sequences
        if req.unit == "tokens":
            res.prompt_estimate = req.prompt_tokens
            res.tokens = req.prompt_tokens + res.granted * req.sequences
        return res

    async def _void_if_abandoned(self, call: Any, request_id: str, reason: str) -> Any:
        """``call``'s reply, awaited shielded: if the caller is cancelled meanwhile, the call
        still completes, and a reservation it made is voided then."""
        task = asyncio.ensure_future(call)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: self._void_made(t, request_id, reason))
            raise

    def _void_made(self, reserved: asyncio.Future[Any], request_id: str, reason: str) -> None:
        if reserved.cancelled() or reserved.exception() is not None:
            return  # nothing reserved, or the sweeper settles it
        if _str(reserved.result()[0]) != "ok":
            return  # refused: nothing to release
        void = asyncio.ensure_future(self.settle(request_id, None, None, 0, -1, reason))
        self._voids.add(void)  # a reference until it is done

        def done(t: asyncio.Task[Settlement]) -> None:
            self._voids.discard(t)
            if not t.cancelled() and t.exception() is not None:  # the sweeper charges it
                log.error("abandoned_void_failed", request_id=request_id, error=str(t.exception()))

        void.add_done_callback(done)

    async def settle(
        self,
        request_id: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        status: int,
        latency_ms: int,
        reason: str = "settled",
        now_ms: int | None = None,
        charge_reserved: bool = False,
        counted: bool = False,
        attempt: str = "",
    ) -> Settlement:
        """Post the real usage (None = unknown: void), exactly once per request id.

        ``charge_reserved``: the request was served but its usage is unknown (a stream cut off
        by a backend that reports no running usage): charge the reserved amount.
        ``latency_ms`` < 0: measure it from the reservation's creation. ``counted``: the tokens
        are the stream meter's count (the backend's usage never came), which the entry says.
        ``attempt``: settle only the reservation that reserve call made (``ReserveRequest``)."""
        call = SettleCall(
            request_id, prompt_tokens, completion_tokens, status, latency_ms, reason,
            charge_reserved, counted, attempt,
        )  # fmt: skip
        keys, args = _settle_call(call, now_ms)
        return _settlement(await self._scripts.settle(keys=keys, args=args))

    def settle_soon(
        self,
        request_id: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        status: int,
        latency_ms: int,
        reason: str,
        charge_reserved: bool,
        counted: bool = False,
        attempt: str = "",
    ) -> asyncio.Future[Settlement] | None:
        """``settle``, sent now: a future of its result (a future, not a task). None (nothing
        sent) without the pipelined client or its open connection; then await ``settle``."""
        soon = getattr(self._scripts.settle, "soon", None)
        if soon is None:
            return None
        call = SettleCall(
            request_id, prompt_tokens, completion_tokens, status, latency_ms, reason,
            charge_reserved, counted, attempt,
        )  # fmt: skip
        keys, args = _settle_call(call, None)
        return _sent(soon, keys, args, _settlement)

    async def settle_many(self, calls: Sequence[SettleCall]) -> list[Settlement | Exception]:
        """``settle`` for each call, in one script call (one round trip): a Settlement per call,
        in order, or the exception its settlement failed with (the others are not affected)."""
        if not calls:
            return []
        keys, args = _settle_many_call(calls)
        return _settlements(await self._scripts.settle_many(keys=keys, args=args))

    def settle_many_soon(
        self, calls: Sequence[SettleCall]
    ) -> asyncio.Future[list[Settlement | Exception]] | None:
        """``settle_many``, sent now: a future of its result (no task). None (nothing sent)
        without the pipelined client or its open connection; then await ``settle_many``."""
        soon = getattr(self._scripts.settle_many, "soon", None)
        if soon is None:
            return None
        keys, args = _settle_many_call(calls)
        return _sent(soon, keys, args, _settlements)

    async def announce_settled(self, token: str) -> None:
        """Tell the other workers that a batch of settlements was posted (``token``: this
        worker's); a failure only means they look again when their wait runs out."""
        try:
            await self._client.publish(store.settled_channel(), token)
        except Exception as exc:
            log.warning("settled_announce_failed", error=type(exc).__name__)

    async def sweep(self, now_ms: int | None = None, limit: int = 100) -> int:
        """Charge the reserved amount of up to ``limit`` timed-out reservations; how many."""
        keys = [store.reservations_due()]
        args = [_now(now_ms), limit, store.reservation_prefix()]
        return int(await self._scripts.sweep(keys=keys, args=args))

    async def fold(self, account: str, cutoff_ms: int, limit: int = 500) -> int:
        """Retention: fold the account's ledger entries older than ``cutoff_ms`` into one
        ``checkpoint`` entry (their sum), ``limit`` at a time; how many entries were folded."""
        folded = 0
        while True:
            read, fresh = await self._scripts.fold(
                keys=[store.ledger(account)], args=[cutoff_ms, limit]
            )
            folded += int(fresh)
            if int(read) < limit:
                return folded

    async def claim_fold(self, every_s: float) -> bool:
        """True for one caller (of every worker) per ``every_s``: that one folds."""
        return bool(await self._client.set(store.fold_lock(), "1", nx=True, px=int(every_s * 1000)))

    async def fold_all(self, cutoff_ms: int) -> int:
        """``fold`` every account's ledger (the accounts set lists every account with entries)."""
        folded = 0
        async for raw in self._client.sscan_iter(store.accounts(), count=500):
            folded += await self.fold(_str(raw), cutoff_ms)
        return folded

    async def grant(
        self, account: str, amount: int, note: str = "", grant_id: str | None = None
    ) -> int:
        """Add credits; with a ``grant_id``, a repeated grant is applied once. The new balance
        (the current one for a repeat)."""
        if amount <= 0 or amount >= MAX_EXACT:
            raise ValueError("a grant must be a positive amount of micro-credits below 2^53")
        keys = [
            store.account(account),
            store.accounts(),
            store.ledger(account),
            store.grant_done(grant_id or ""),
        ]
        entry_id = grant_id or f"grant-{uuid.uuid4().hex}"
        args = [account, amount, note, entry_id, 1 if grant_id else 0, _now(None)]
        reply = await self._scripts.grant(keys=keys, args=args)
        return int(reply[1])

    async def balance(self, account: str) -> Balance:
        balance, pending = await self._client.hmget(store.account(account), "balance", "pending")
        b, p = int(balance or 0), int(pending or 0)
        return Balance(b, p, b - p)

    async def transactions(
        self, account: str, limit: int = 50, before_ms: int | None = None
    ) -> list[dict]:
        """Ledger entries, newest first, with ts < ``before_ms``; page on with the last ts.

        A page holds every entry of its oldest millisecond, so it may exceed ``limit`` a little
        rather than let the next page (ts < that millisecond) skip one. Entries of the same
        millisecond come in reverse order of their JSON text (the zset's tie-break).
        """
        if limit <= 0:
            return []
        key = store.ledger(account)
        top = "+inf" if before_ms is None else f"({before_ms}"
        page = await self._client.zrevrangebyscore(key, top, "-inf", start=0, num=limit)
        entries = [_transaction(m) for m in page]
        if len(entries) == limit and entries:
            last = entries[-1]["ts"]
            same = await self._client.zrevrangebyscore(key, last, last)
            entries = [e for e in entries if e["ts"] != last] + [_transaction(m) for m in same]
        return entries

    async def usage(
        self,
        account: str,
        since_ms: int | None = None,
        until_ms: int | None = None,
        model: str | None = None,
        limit: int = 100,
    ) -> list[dict]:
        """Usage records with since_ms <= ts <= until_ms, newest first, optionally one model:
        the ledger's request entries, in the usage shape (grants are not requests)."""
        if limit <= 0:
            return []
        key = store.ledger(account)
        top = "+inf" if until_ms is None else str(until_ms)
        bottom = "-inf" if since_ms is None else str(since_ms)
        batch = max(limit, 100)
        records: list[dict] = []
        offset = 0
        while len(records) < limit:
            page = await self._client.zrevrangebyscore(key, top, bottom, start=offset, num=batch)
            for member in page:
                entry = orjson.loads(member)
                if "request_id" in entry and (model is None or entry["model"] == model):
                    records.append(_usage_record(entry))
            if len(page) < batch:
                break
            offset += batch
        return records[:limit]

    async def reconcile(self, account: str) -> tuple[int, int]:
        """(sum of all ledger amounts, balance), read in one transaction: equal when the
        ledger balances."""
        pipe = self._client.pipeline(transaction=True)
        pipe.zrange(store.ledger(account), 0, -1)
        pipe.hget(store.account(account), "balance")
        members, balance = await pipe.execute()
        total = sum(orjson.loads(m)["amount"] for m in members)
        return total, int(balance or 0)


# A settled request's ledger entry is also its usage record (one write per request, not two):
# these fields are the usage view's alone, and /v1/credits/transactions leaves them out.
_USAGE_ONLY = ("backend", "latency_ms", "status")
_USAGE_FIELDS = ("ts", "request_id", "key_prefix", "model", "backend", "tokens_in", "tokens_out")


def _transaction(member: bytes) -> dict[str, Any]:
    entry = orjson.loads(member)
    for name in _USAGE_ONLY:
        entry.pop(name, None)
    return entry


def _usage_record(entry: dict[str, Any]) -> dict[str, Any]:
    """The usage shape of a request's ledger entry. Entries written before the two were one
    (tg:usage:{account} held the usage records then) show backend, latency and status as null."""
    record = {name: entry.get(name) for name in _USAGE_FIELDS}
    record["unit"] = entry.get("unit", "tokens")
    record["cost"] = -entry["amount"]
    if entry.get("counted"):  # the tokens are the gateway's count: the backend's never came
        record["counted"] = True
    record["latency_ms"] = entry.get("latency_ms")
    record["status"] = entry.get("status")
    return record


def _settle_call(c: SettleCall, now_ms: int | None) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the settle script (store_scripts.SETTLE)."""
    rid = c.request_id
    keys = [store.reservation(rid), store.done(rid), store.reservations_due()]
    return keys, [*_argv(c, now_ms), c.attempt]


def _argv(c: SettleCall, now_ms: int | None) -> list[Any]:
    """One request's 8 arguments, for SETTLE and for each request of SETTLE_MANY."""
    unknown = c.prompt_tokens is None or c.completion_tokens is None
    return [
        c.request_id,
        -2 if c.charge_reserved else -1 if unknown else c.prompt_tokens,
        -2 if c.charge_reserved else -1 if unknown else c.completion_tokens,
        c.status,
        c.latency_ms,
        _now(now_ms),
        c.reason,
        1 if c.counted else 0,
    ]


def _settle_many_call(calls: Sequence[SettleCall]) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of store_scripts.SETTLE_MANY."""
    args: list[Any] = [store.reservation_prefix(), store.done_prefix()]
    for c in calls:
        args += _argv(c, None)
    return [store.reservations_due()], args


def _settlements(reply: list[Any]) -> list[Settlement | Exception]:
    """SETTLE_MANY's reply: a Settlement per request, or the error its settlement raised."""
    out: list[Settlement | Exception] = []
    for r in reply:
        if _str(r[0]) == "error":
            out.append(redis.exceptions.ResponseError(_str(r[1])))
        else:
            out.append(_settlement(r))
    return out


T = TypeVar("T")


def _sent(
    soon: Callable[..., bool], keys: list[str], args: list[Any], parse: Callable[[Any], T]
) -> asyncio.Future[T] | None:
    """A script call sent now over the pipelined client (``FastScript.soon``): a future of its
    parsed reply, or None when nothing was sent (no open connection)."""
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

    def answered(reply: Any, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(parse(reply))

    return future if soon(keys, args, answered) else None


def _settlement(reply: list[Any]) -> Settlement:
    return Settlement(_str(reply[0]), *map(int, reply[1:8]), entry_type=_str(reply[8]))


def _now(value: int | None) -> int:
    return wall_ms() if value is None else value
