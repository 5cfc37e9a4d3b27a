"""Settlements the store did not take, sent again until it does (``Meter`` hands them here).

A settlement or void whose store call failed because the store was out of reach (its connection
dropped, it was restarting, it did not answer in time) would otherwise wait for the sweeper,
which charges the reserved amount once the reservation times out: a served request would be
charged its worst case instead of what it used (and not what its ``X-Credits-Used`` said), and a
request the client got a 503 for would be charged at all. So it is sent again in the background.

* One call at a time probes a store that is down, after each of ``DELAYS_S`` in turn (the last
  repeats): a worker with thousands of settlements waiting sends one call every two seconds, not
  thousands. Once a call gets through, the rest go at once (they pipeline on one connection).
* Each waits until the reservation's timeout has passed; from then on it is the sweeper's.
* Safe to repeat: settling is idempotent by request id, so a call the store did take but
  answered too late is a ``duplicate`` the second time and charges nothing, and a void of a
  reservation never made finds none.
* At most ``LIMIT`` wait at once (a long outage under load); beyond that, the sweeper's too.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import redis.exceptions
import structlog

from .metrics import Metrics

log = structlog.get_logger("tollgate.settle")

DELAYS_S = (0.1, 0.25, 0.5, 1.0, 2.0)
LIMIT = 10_000
# what "the store was out of reach" looks like, on either client (resp.AnswerLost and redis-py's
# BusyLoadingError are ConnectionErrors)
LOST = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

Send = Callable[[], Awaitable[Any]]


def lost(exc: BaseException | None) -> bool:
    """Whether a store call failed because the store was out of reach (worth sending again)."""
    return isinstance(exc, LOST)


class SettleRetry:
    def __init__(
        self,
        give_up_after_s: float,
        metrics: Metrics,
        delays_s: tuple[float, ...] = DELAYS_S,
        limit: int = LIMIT,
    ) -> None:
        self._give_up_after_s = give_up_after_s
        self._metrics = metrics
        self._delays = delays_s
        self._limit = limit
        self._queue: deque[tuple[float, Send]] = deque()  # (when to give up, the call)
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, send: Send) -> None:
        """Send ``send()`` again later (it makes the store call anew each time)."""
        if len(self._queue) >= self._limit:
            self._metrics.settle_resends.inc("dropped")
            log.error("settle_resend_dropped", waiting=len(self._queue))
            return
        self._queue.append((time.monotonic() + self._give_up_after_s, send))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        failures = 0
        while self._queue:
            await asyncio.sleep(self._delays[min(failures, len(self._delays) - 1)])
            self._give_up_old()
            if not self._queue:
                return
            try:  # the oldest probes the store
                await self._queue[0][1]()
            except LOST:
                failures += 1
                continue
            except Exception as exc:
                self._queue.popleft()
                self._failed(exc)
                continue
            self._queue.popleft()
            self._metrics.settle_resends.inc("settled")
            failures = 0
            batch = list(self._queue)  # the store answers again: the rest at once
            self._queue.clear()
            results = await asyncio.gather(*(send() for _, send in batch), return_exceptions=True)
            for item, result in zip(batch, results, strict=True):
                if isinstance(result, LOST):
                    self._queue.append(item)  # out of reach again: the next round
                elif isinstance(result, BaseException):
                    self._failed(result)
                else:
                    self._metrics.settle_resends.inc("settled")
        log.info("settle_resends_done")

    def _give_up_old(self) -> None:
        now = time.monotonic()
        keep = deque(item for item in self._queue if item[0] > now)
        if len(keep) < len(self._queue):
            self._metrics.settle_resends.inc("expired", amount=len(self._queue) - len(keep))
            self._queue = keep

    def _failed(self, exc: BaseException) -> None:
        """The store answered with an error (a script error): sending it again would not help."""
        self._metrics.settle_resends.inc("failed")
        log.error("settle_resend_failed", error=str(exc))

    def close(self) -> None:
        """The worker stops: what still waits is the sweeper's."""
        if self._queue:
            log.warning("settle_resends_left_to_sweeper", waiting=len(self._queue))
        if self._task is not None:
            self._task.cancel()
