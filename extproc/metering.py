"""Metering on the request path: reserve before forwarding, settle after, and the headers that
tell the client where it stands. The money itself (scripts, ledger) is in ``ledger.py``.

Request lifecycle (README, "Credits and limits"):
1. Body phase: estimate the prompt (``tokens.py``), take the client's ``max_tokens`` (above the
   model's cap is a 400) or, when there is none, let the reservation clamp it to what the balance
   and the tokens-per-minute window can pay; the rate check, concurrency check and reservation
   are one store round trip. Streams ask the backend for usage on every chunk.
2. Non-streaming: settled in the response-headers phase from the usage Envoy lifted out of the
   body (json_to_metadata), so ``X-Credits-*`` ride on the response (``settle_soon``). Streams:
   Envoy's Lua stream meter (``stream_meter.lua``) sends the figures as the stream's last SSE
   comment, and Envoy's gRPC access log hands the finished stream, with the last usage seen, to
   ``settle_service.py``, which settles it (cut-off streams included). A settlement the store
   was out of reach for is sent again until it takes it (``settle_retry.py``); whatever nobody
   settles in time, the sweeper charges at the reserved amount.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import redis.exceptions
import structlog

from .config import GatewayConfig, Model
from .errors import GatewayError
from .ledger import Ledger, Reservation, ReserveRequest, SettleCall, Settlement, out_of_range
from .media import UNITS, metered_price, reserved_units
from .metrics import Metrics
from .money import format_credits, token_cost
from .resp import AnswerLost
from .settle_retry import SettleRetry, lost
from .tokens import estimate_prompt_tokens, longest_prompt_tokens, sequences

log = structlog.get_logger("tollgate.metering")
T = TypeVar("T")


# A refusal another stream's settlement may be about to lift is checked again after this long
# (Meter._rechecks): that settlement comes at once (settle_now, within 2 ms), or batched
# (within 20 ms, envoy_config._settle_logs).
RECHECK_NOW_S = 0.03
RECHECK_BATCHED_S = 0.05
# ... or sooner: each time this worker's settling log settles a batch (the settlement awaited is
# usually in the first), up to this many times before the last look at the end of the wait.
EARLY_RECHECKS = 2
# A stream reserved when the account's available credits could pay fewer than this many more
# reservations like it settles at once: the next request may need the money it holds.
LOW_BALANCE_RESERVATIONS = 4
ABANDONED = "client_disconnected"  # the void's reason when a reserve's caller is cancelled
STORE_LOST = "store_unavailable"  # ... and when the store may have reserved but its answer was lost
MAX_REPORTED_TOKENS = 2**31  # a usage figure at or above this is no count (see _count)
GENERATIVE = ("chat", "completions")  # operations that generate tokens (max_tokens applies)


class Meter:
    def __init__(self, cfg: GatewayConfig, ledger: Ledger, metrics: Metrics | None = None) -> None:
        self.ledger = ledger
        self.metrics = metrics or Metrics()
        self.ttl_ms = int(cfg.metering.reservation_timeout_s * 1000)
        self.prices = {m.id: metered_price(m) for m in cfg.models}  # media: per unit (media.py)
        self.default_limits = cfg.metering.default_limits
        # a recheck must leave Envoy's wait for the processor's answer most of its time
        self._recheck_cap_s = cfg.processor.message_timeout_s / 4
        self._pending: set[asyncio.Task[Any]] = set()
        self._batch_settled: asyncio.Future[None] | None = None  # woken by _wake
        # with several workers, each batch settled here is announced to the others (store.py,
        # tg:settled), whose rechecks look again too; the token tells this worker's own apart
        self._announce = cfg.processor.workers > 1
        self._token = str(os.getpid())
        # settlements the store was out of reach for go again until it takes them
        self.resends = SettleRetry(cfg.metering.reservation_timeout_s, self.metrics)
        # each reserve call's own id (ReserveRequest.attempt): this process, then a count
        self._attempts = itertools.count(1)
        self._attempt_prefix = os.urandom(4).hex() + "."

    def _attempt(self) -> str:
        return self._attempt_prefix + str(next(self._attempts))

    async def reserve(
        self,
        request_id: str,
        principal: Any,
        model: Model,
        op: str,
        body: dict[str, Any],
        backend_name: str,
    ) -> Reservation:
        """Reserve, or raise the GatewayError the client gets (402, 429, 400)."""
        unit = UNITS.get(op, "tokens")
        if unit == "tokens":
            prompt = estimate_prompt_tokens(op, body)
        else:  # media: the worst case in its own unit, priced through input_per_1m
            prompt = reserved_units(op, model, body)
        requested: int | None = None
        seqs = 1
        if op in GENERATIVE:
            requested = body.get("max_completion_tokens") or body.get("max_tokens")
            param = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
            if requested is not None and requested > model.max_tokens:
                raise GatewayError(
                    "invalid_request_error",
                    f"'{param}' is {requested}; this model allows at most {model.max_tokens}.",
                    param,
                )
            longest = longest_prompt_tokens(op, body, prompt)
            cap = min(model.max_tokens, model.context_length - longest)
            if cap < 1:
                raise GatewayError(
                    "context_length_exceeded",
                    f"The prompt is about {longest} tokens; this model's context is "
                    f"{model.context_length}.",
                    "messages" if op == "chat" else "prompt",
                )
            # n choices (per prompt of a batch; best_of candidates): each may run to max_tokens
            seqs = sequences(op, body)
            if out_of_range(self.prices[model.id], prompt, (requested or cap) * seqs):
                raise GatewayError(
                    "invalid_request_error",
                    f"This request could generate {(requested or cap) * seqs} tokens "
                    f"({seqs} sequences); that is more than the gateway can price. Lower 'n' "
                    f"or '{param}', or send fewer prompts.",
                    "n" if body.get("n") else param,
                )
        else:
            cap = 0
        req = ReserveRequest(
            request_id=request_id,
            account=principal.account,
            key_hash=principal.key_hash,
            key_prefix=principal.key_prefix,
            model=model.id,
            backend=backend_name,
            prompt_tokens=prompt,
            requested_max_tokens=requested,
            cap=cap,
            price=self.prices[model.id],
            limits=principal.limits or self.default_limits,
            ttl_ms=self.ttl_ms,
            unit=unit,
            sequences=seqs,
            attempt=self._attempt(),
        )
        # a worker cancelled here (Envoy closed the stream: the client left) does not leave
        # the reservation for the sweeper to charge (below, and Ledger.reserve)
        try:
            res = await self.ledger.reserve(req, abandoned_reason=ABANDONED)
            if res.status != "ok":  # a stream that just ended may not be settled yet: look again
                left = self._recheck_cap_s
                for wait in self._rechecks(res, principal):
                    wait = min(wait, left)
                    if wait <= 0:
                        break
                    left -= wait
                    # early looks only where the settlement comes batched: a limited key's
                    # comes at once, and a flood over its limit should not cost the store more
                    early = 0 if self.limited(principal) else EARLY_RECHECKS
                    res = await self._recheck(req, principal, wait, early)
                    if res.status == "ok" or not self._rechecks(res, principal):
                        break
        except (AnswerLost, redis.exceptions.TimeoutError):
            # sent, unanswered: the store may have reserved it for a request the client gets a
            # 503 for. Void it (sent again until the store takes it), not left for the sweeper:
            # what this call reserved, if anything (another request with this id may own one)
            self.void_soon(request_id, STORE_LOST, req.attempt)
            raise
        except asyncio.CancelledError:
            # Envoy closed the stream (the client left) while the store reserved: what this
            # call reserved would go unsettled until the sweeper charged it for a request never
            # served. The void goes after the reservation on the same connection (none made,
            # refused, or another request's with this id: the store answers "unknown"); on a
            # pool of connections (rediss://), where it may overtake the reservation,
            # Ledger.reserve voids it once made.
            self.void_soon(request_id, ABANDONED, req.attempt)
            raise
        if res.status == "ok":
            self.metrics.credits.inc("reserved", amount=res.amount)
            return res
        err = _refusal(res, requested is not None)
        self.metrics.refusals.inc(err.code)
        raise err

    async def _recheck(
        self, req: ReserveRequest, principal: Any, wait: float, early: int
    ) -> Reservation:
        """Reserve again once ``wait`` seconds have passed, or sooner when a settling log settles
        a batch meanwhile (this worker's, or another's that announced it): each such batch
        brings a look, up to ``early`` of them; then the last look at the end of the wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        for _ in range(early):
            if not await self._batch_or_timeout(deadline - loop.time()):
                break
            res = await self.ledger.reserve(req, abandoned_reason=ABANDONED)
            if res.status == "ok" or not self._rechecks(res, principal):
                return res
        remaining = deadline - loop.time()
        if remaining > 0:
            await asyncio.sleep(remaining)
        return await self.ledger.reserve(req, abandoned_reason=ABANDONED)

    async def _batch_or_timeout(self, timeout: float) -> bool:
        """Wait for the next batch of settlements (``_wake``), at most ``timeout`` seconds:
        whether one came. The waiters share one future (no task each)."""
        if timeout <= 0:
            return False
        wake = self._batch_settled
        if wake is None or wake.done():
            wake = self._batch_settled = asyncio.get_running_loop().create_future()
        done, _ = await asyncio.wait((wake,), timeout=timeout)
        return bool(done)

    def _after_batch(self, _: asyncio.Future[Any]) -> None:
        """A batch of settlements was answered (or failed): wake the rechecks waiting for it,
        here and, with several workers, in the others."""
        self._wake()
        if self._announce:
            self._task(self.ledger.announce_settled(self._token))

    def settled_elsewhere(self, token: str) -> None:
        """Another worker announced a settled batch (store.settled_channel)."""
        if token != self._token:
            self._wake()

    def _wake(self) -> None:
        wake, self._batch_settled = self._batch_settled, None
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _rechecks(self, res: Reservation, principal: Any) -> tuple[float, ...]:
        """The waits (seconds) before each further reservation attempt; () to refuse now. A
        refusal for the slot, the tokens or the money that another reservation of the account
        holds (pending) may be one a finished stream's settlement is about to lift. It travels
        through Envoy's access log: at once for the streams of keys with a concurrency or token
        limit (then 30 ms covers it) and for streams reserved on a low balance, else batched
        (up to 20 ms). So a credits refusal of any other key looks again by 50 ms, and sooner
        when a batch settles (``_recheck``). A refusal no settlement could lift
        is not delayed."""
        if res.pending <= 0:
            return ()
        if res.status in ("concurrency", "rate_limit_tokens"):
            return (RECHECK_NOW_S,)
        if res.status == "insufficient_credits" and res.amount <= res.balance:
            if self.limited(principal):
                return (RECHECK_NOW_S,)
            return (RECHECK_BATCHED_S,)
        return ()

    def limited(self, principal: Any) -> bool:
        """A key with a concurrency or tokens-per-minute limit: its next request needs the slot
        and the tokens a finished stream's settlement frees."""
        limits = principal.limits or self.default_limits
        return limits.concurrency > 0 or limits.tpm > 0

    def settles_now(self, principal: Any, res: Reservation) -> bool:
        """Whether a stream is settled as soon as it ends (its access-log record unbatched,
        envoy_config._settle_logs): a limited key's, and one whose reservation left the account
        less than LOW_BALANCE_RESERVATIONS times its amount (the next request may be refused
        for the money it holds, until it is settled)."""
        if self.limited(principal):
            return True
        return res.available < LOW_BALANCE_RESERVATIONS * res.amount

    def settle_soon(
        self,
        request_id: str,
        model_id: str,
        res: Reservation,
        usage: dict[str, Any] | None,
        status: int,
        started_ms: int,
    ) -> Settlement:
        """Settle without waiting: the script call goes out now (ahead of any later reserve on
        the same connection) and the response carries the figures it will post, computed with
        the script's own integer formula. The one approximation: X-Credits-Remaining is the
        available balance as of this request's reservation minus its charge (requests of the
        same account in flight at the same time are not reflected; GET /v1/credits is exact).
        If the call fails, the sweeper charges the reservation later."""
        reason = "settled" if status < 400 else "backend_error"
        tokens = _tokens(usage)
        self.settle(request_id, usage, status, started_ms, reason).add_done_callback(
            functools.partial(_settled, request_id)
        )
        before = res.available + res.amount  # available once this reservation is released
        if tokens is None:  # served: the reservation is charged, else voided (all released)
            due = res.amount if status < 400 else 0
            used = res.tokens if status < 400 else 0
        else:
            p, c = tokens
            due = 0 if status >= 400 else token_cost(self.prices[model_id], p, c)
            used = p + c if res.unit == "tokens" else 0
        charged = min(due, max(res.balance, 0))  # the script's cap: the balance
        self.metrics.credits.inc("settled", amount=charged)
        if tokens is not None and res.unit == "tokens":
            self.metrics.tokens.inc(model_id, "input", amount=tokens[0])
            self.metrics.tokens.inc(model_id, "output", amount=tokens[1])
        tpm_left = res.tpm_remaining + res.tokens - used if res.tpm_limit > 0 else -1
        return Settlement(
            "ok", charged, 0, 0, before - charged, res.rpm_remaining, tpm_left, due - charged
        )

    def settle(
        self,
        request_id: str,
        usage: dict[str, Any] | None,
        status: int,
        started_ms: int,
        reason: str = "settled",
        attempt: str = "",
    ) -> asyncio.Future[Settlement]:
        """Settle: the store call goes out now, and this is a future of its result (no task,
        unless the pipelined connection is not open yet). Calls sent together pipeline.
        ``attempt``: only the reservation that reserve call made (a void after a lost answer)."""
        prompt, completion, served_unknown = _settle_args(usage, status)
        latency = _latency(started_ms)
        counted = bool(usage and usage.get("counted"))  # the stream meter counted the tokens

        def send() -> asyncio.Future[Settlement]:
            future = self.ledger.settle_soon(
                request_id,
                prompt,
                completion,
                status,
                latency,
                reason,
                served_unknown,
                counted,
                attempt,
            )
            if future is not None:
                return future
            return self._task(
                self.ledger.settle(
                    request_id,
                    prompt,
                    completion,
                    status,
                    latency,
                    reason,
                    charge_reserved=served_unknown,
                    counted=counted,
                    attempt=attempt,
                )
            )

        future = send()
        future.add_done_callback(lambda f: self._resend_if_lost(f, send))
        return future

    def settle_many(
        self,
        records: list[tuple[str, dict[str, Any] | None, int, str]],
        then: Callable[[list[Settlement | Exception]], None] | None = None,
    ) -> asyncio.Future[list[Settlement | Exception]]:
        """``settle`` for each (request_id, usage, status, reason) of a finished stream, in one
        store call: a future of a Settlement per record, in order, or the exception that
        record's settlement failed with. The store measures each latency from its reservation.
        If the store was out of reach, the future fails and the call goes again later; ``then``
        gets the Settlements when a later one is answered."""
        calls = []
        for request_id, usage, status, reason in records:
            prompt, completion, served_unknown = _settle_args(usage, status)
            calls.append(
                SettleCall(
                    request_id,
                    prompt,
                    completion,
                    status,
                    -1,
                    reason,
                    served_unknown,
                    bool(usage and usage.get("counted")),
                )
            )

        def send() -> asyncio.Future[list[Settlement | Exception]]:
            future = self.ledger.settle_many_soon(calls)
            if future is None:
                future = self._task(self.ledger.settle_many(calls))
            future.add_done_callback(self._after_batch)
            return future

        async def again() -> list[Settlement | Exception]:
            results = await send()
            if then is not None:
                then(results)
            return results

        future = send()
        future.add_done_callback(lambda f: self._resend_if_lost(f, again))
        return future

    def _resend_if_lost(self, future: asyncio.Future[Any], send: Callable[[], Any]) -> None:
        """A done callback: if the store call failed because the store was out of reach, it
        goes again later with ``send()`` (settle_retry.py); the future keeps the first failure."""
        if not future.cancelled() and lost(future.exception()):
            self.resends.add(send)

    def _task(self, awaited: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A store call awaited in a task of its own (no pipelined connection open yet)."""
        task = asyncio.ensure_future(awaited)
        self._pending.add(task)  # a reference until it is done
        task.add_done_callback(self._pending.discard)
        return task

    def void_soon(self, request_id: str, reason: str, attempt: str = "") -> None:
        """Void the request's reservation, if it has one (with ``attempt``: if that reserve
        call made it), without waiting."""
        self.settle(request_id, None, 0, 0, reason, attempt).add_done_callback(
            functools.partial(_settled, request_id)
        )


def _settled(request_id: str, future: asyncio.Future[Settlement]) -> None:
    """A settlement's done callback (a partial: no reference cycle through the future)."""
    if not future.cancelled() and (exc := future.exception()) is not None:
        # out of reach: sent again (settle_retry.py); else the sweeper charges it
        log.error("settle_failed", request_id=request_id, error=str(exc), resent=lost(exc))


def _settle_args(usage: dict[str, Any] | None, status: int) -> tuple[int | None, int | None, bool]:
    """Prompt and completion tokens (None: unknown), and whether to charge the reservation:
    served (2xx/3xx) but no usage known is charged the reservation, never served for free."""
    tokens = _tokens(usage)
    prompt, completion = tokens if tokens else (None, None)
    return prompt, completion, prompt is None and 0 < status < 400


def _latency(started_ms: int) -> int:
    return max(0, int(time.time() * 1000) - started_ms) if started_ms else -1


def _count(value: Any) -> int | None:
    """A backend's token count: a whole number from 0 below 2^31 (no request counts more;
    1e18 from a broken backend would take the balance), else None (unknown)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not 0 <= value < MAX_REPORTED_TOKENS or value != int(value):
        return None
    return int(value)


def _tokens(usage: dict[str, Any] | None) -> tuple[int, int] | None:
    """The usage's prompt and completion tokens, None when either is no count (unknown: a
    served request is then charged its reservation)."""
    if usage:
        p, c = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
        if p is not None and c is not None:
            return p, c
    return None


def _refusal(res: Reservation, explicit_max_tokens: bool) -> GatewayError:
    headers = tuple(rate_headers(res))
    if res.status == "insufficient_credits":
        needs = (
            f"this request needs up to {format_credits(res.amount)} credits"
            if res.amount > 0
            else "the balance cannot pay for the prompt and one output token"
        )
        return GatewayError(
            "insufficient_credits",
            f"Insufficient credits: {needs}; {format_credits(res.available)} available.",
            headers=headers,
        )
    if res.status == "rate_limit_requests":
        message = f"Rate limit reached: {res.rpm_limit} requests per minute."
    elif res.status == "rate_limit_tokens":
        message = f"Rate limit reached: {res.tpm_limit} tokens per minute."
    elif res.status == "concurrency":
        message = "Too many requests in flight for this key."
    elif res.status == "duplicate":
        return GatewayError(
            "invalid_request_error",
            "This X-Request-ID was already used; send a unique id per request.",
            "x-request-id",
        )
    else:
        return GatewayError("internal_error", f"Reservation failed: {res.status}.")
    retry = max(1, int(res.retry_after or 1))
    return GatewayError(
        "rate_limit_exceeded",
        f"{message} Retry after {retry}s.",
        "max_tokens" if res.status == "rate_limit_tokens" and explicit_max_tokens else None,
        retry_after=retry,
        headers=headers,
    )


def rate_headers(
    res: Reservation, rpm_remaining: int | None = None, tpm_remaining: int | None = None
) -> list[tuple[str, str]]:
    """X-RateLimit-* (requests) and OpenAI's x-ratelimit-*-requests / -tokens. Limits and the
    reset come from the reservation; remaining counts too, unless a settlement updated them."""
    rpm_left = res.rpm_remaining if rpm_remaining is None else rpm_remaining
    tpm_left = res.tpm_remaining if tpm_remaining is None else tpm_remaining
    reset = res.reset_s
    out: list[tuple[str, str]] = []
    if res.rpm_limit > 0:
        remaining = str(max(0, rpm_left))
        out += [
            ("x-ratelimit-limit", str(res.rpm_limit)),
            ("x-ratelimit-remaining", remaining),
            ("x-ratelimit-reset", str(reset)),
            ("x-ratelimit-limit-requests", str(res.rpm_limit)),
            ("x-ratelimit-remaining-requests", remaining),
            ("x-ratelimit-reset-requests", f"{reset}s"),
        ]
    if res.tpm_limit > 0:
        out += [
            ("x-ratelimit-limit-tokens", str(res.tpm_limit)),
            ("x-ratelimit-remaining-tokens", str(max(0, tpm_left))),
            ("x-ratelimit-reset-tokens", f"{reset}s"),
        ]
    return out


def settled_headers(res: Reservation, s: Settlement) -> list[tuple[str, str]]:
    """Credits, and rate headers whose token remaining reflects the real usage."""
    credits = [
        ("x-credits-used", format_credits(s.charged)),
        # an overrun paid from credits other requests hold leaves them less than they hold
        ("x-credits-remaining", format_credits(max(s.available, 0))),
    ]
    if s.status != "ok":
        return credits + rate_headers(res)
    return credits + rate_headers(res, s.rpm_remaining, s.tpm_remaining)
