"""An account's money as the control API shows it (control_api.py serves these):

    GET /v1/credits                                   balance, reserved, available
    GET /v1/credits/transactions?limit=50&before=MS   ledger entries, newest first, paged
    GET /v1/usage?since=&until=&model=&limit=100      per-request usage records, newest first

Amounts are shown as decimal strings ("1234.50"); times as Unix milliseconds (``ts``) and ISO
8601 (``time``). ``since``/``until``/``before`` take either form. The caller decides the
account (control_api.py: the caller's own unless an operator names another).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from .errors import invalid
from .ledger import Ledger
from .money import format_credits

_MAX_LIMIT = 1000


def _limit(value: int, default: int) -> int:
    if value == 0:
        return default
    if not 1 <= value <= _MAX_LIMIT:
        raise invalid(f"'limit' must be an integer between 1 and {_MAX_LIMIT}.", "limit")
    return value


def parse_time(raw: str, name: str) -> int:
    """Unix milliseconds from '1795440000000', '1795440000' (seconds) or ISO 8601."""
    if raw.isdigit():
        n = int(raw)
        return n if n > 10**11 else n * 1000
    try:
        t = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise invalid(f"'{name}' must be Unix time or ISO 8601, got {raw!r}.", name) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp() * 1000)


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def _show_entry(e: dict[str, Any]) -> dict[str, Any]:
    out = dict(e)
    out["time"] = iso(int(e["ts"]))
    for key in ("amount", "balance", "reserved", "written_off", "cost"):
        if isinstance(out.get(key), int):
            out[key] = format_credits(out[key])
    return out


async def credits(ledger: Ledger, account: str) -> dict[str, Any]:
    b = await ledger.balance(account)
    return {
        "object": "credits",
        "account": account,
        "balance": format_credits(b.balance),
        "reserved": format_credits(b.pending),
        "available": format_credits(b.available),
    }


async def transactions(
    ledger: Ledger, account: str, limit: int = 0, before: str = ""
) -> dict[str, Any]:
    limit = _limit(limit, 50)
    before_ms = parse_time(before, "before") if before else None
    entries = await ledger.transactions(account, limit=limit, before_ms=before_ms)
    return {
        "object": "list",
        "data": [_show_entry(e) for e in entries],
        "has_more": len(entries) >= limit,
        "next_before": entries[-1]["ts"] if len(entries) >= limit else None,
    }


async def usage(
    ledger: Ledger,
    account: str,
    since: str = "",
    until: str = "",
    model: str = "",
    limit: int = 0,
) -> dict[str, Any]:
    records = await ledger.usage(
        account,
        since_ms=parse_time(since, "since") if since else None,
        until_ms=parse_time(until, "until") if until else None,
        model=model or None,
        limit=_limit(limit, 100),
    )
    return {"object": "list", "data": [_show_entry(r) for r in records]}
