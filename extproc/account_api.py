"""The caller's own account, answered by the processor from the store (no backend):

    GET /v1/credits                                   balance, reserved, available
    GET /v1/credits/transactions?limit=50&before=MS   ledger entries, newest first, paged
    GET /v1/usage?since=&until=&model=&limit=100      per-request usage records, newest first

Amounts are shown as decimal strings ("1234.50"); times as Unix milliseconds (``ts``) and ISO
8601 (``time``). ``since``/``until`` take either form. Each answer is scoped to the account of
the key that asks.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from .auth import Principal
from .errors import invalid
from .ledger import Ledger
from .money import format_credits

ACCOUNT_PATHS = frozenset({"/v1/credits", "/v1/credits/transactions", "/v1/usage"})
_MAX_LIMIT = 1000


def _query(full_path: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(full_path).query).items()}


def _int(q: dict[str, str], name: str, default: int, high: int = _MAX_LIMIT) -> int:
    raw = q.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= high:
        raise invalid(f"'{name}' must be an integer between 1 and {high}.", name)
    return int(raw)


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


class AccountApi:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def handle(self, path: str, full_path: str, principal: Principal) -> bytes:
        q = _query(full_path)
        account = principal.account
        if path == "/v1/credits":
            b = await self.ledger.balance(account)
            return orjson.dumps(
                {
                    "object": "credits",
                    "account": account,
                    "balance": format_credits(b.balance),
                    "reserved": format_credits(b.pending),
                    "available": format_credits(b.available),
                }
            )
        if path == "/v1/credits/transactions":
            limit = _int(q, "limit", 50)
            before = parse_time(q["before"], "before") if "before" in q else None
            entries = await self.ledger.transactions(account, limit=limit, before_ms=before)
            return orjson.dumps(
                {
                    "object": "list",
                    "data": [_show_entry(e) for e in entries],
                    "has_more": len(entries) == limit,
                    "next_before": entries[-1]["ts"] if len(entries) == limit else None,
                }
            )
        # /v1/usage
        limit = _int(q, "limit", 100)
        since = parse_time(q["since"], "since") if "since" in q else None
        until = parse_time(q["until"], "until") if "until" in q else None
        records = await self.ledger.usage(
            account, since_ms=since, until_ms=until, model=q.get("model"), limit=limit
        )
        return orjson.dumps({"object": "list", "data": [_show_entry(r) for r in records]})
