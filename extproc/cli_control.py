"""``tollgate keys|accounts|credits|usage``: the control API from the command line.

Every command is one or two REST calls to the control API through the gateway's listener:

    URL         --url, else $TOLLGATE_URL, else the listener of --config, else 127.0.0.1:8080
    credential  --admin-key, else $TOLLGATE_ADMIN_KEY (the bootstrap admin key, or any API key
                or JWT: a tenant's key with keys:manage manages its own account's keys)

Tables for people, ``--json`` for scripts (the API's own JSON). Exit codes scripts can rely on:

    0  success
    1  the gateway is unreachable or failed (5xx, 429)
    2  bad usage or an invalid request (argparse, 400): the message names the field
    3  the credential is missing or refused (401, 403)
    4  not found (404)
    5  conflict (409: the account exists, the key is revoked)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from .config import ADMIN_KEY_ENV, SCOPES, ConfigError, load_config

URL_ENV = "TOLLGATE_URL"
_EXIT = {400: 2, 401: 3, 403: 3, 404: 4, 405: 2, 409: 5, 413: 2}
_HINTS = {
    401: f"pass --admin-key or set ${ADMIN_KEY_ENV}",
    403: "use a credential with the scope named above (or the admin key)",
}


class Failure(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _url(args: argparse.Namespace) -> str:
    if args.url or os.environ.get(URL_ENV):
        return (args.url or os.environ[URL_ENV]).rstrip("/")
    if Path(args.config).is_file():
        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            raise Failure(f"invalid config {args.config}: {exc}", 2) from None
        host = "127.0.0.1" if cfg.listener.host == "0.0.0.0" else cfg.listener.host
        return f"http://{host}:{cfg.listener.port}"
    return "http://127.0.0.1:8080"


def call(args: argparse.Namespace, method: str, path: str, body: Any = None, **query: Any) -> Any:
    """One control-API call; the answer's JSON, or Failure with the exit code and message."""
    credential = args.admin_key or os.environ.get(ADMIN_KEY_ENV)
    if not credential:
        raise Failure(f"no credential: pass --admin-key or set ${ADMIN_KEY_ENV}", 3)
    base = _url(args)
    params = {k: v for k, v in query.items() if v not in (None, "")}
    url = base + path + ("?" + urlencode(params) if params else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {credential}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            err = json.loads(exc.read())["error"]
            message = err["message"] + (f" (param: {err['param']})" if err.get("param") else "")
            code = err["code"]
        except (ValueError, KeyError, TypeError):
            message, code = exc.reason, "http_error"
        hint = _HINTS.get(exc.code)
        raise Failure(
            f"{message} [{code}, HTTP {exc.code}]" + (f"; {hint}" if hint else ""),
            _EXIT.get(exc.code, 1),
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Failure(
            f"cannot reach the gateway at {base} ({reason}); start it (`make up`),"
            f" or pass --url / set ${URL_ENV}",
            1,
        ) from None


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    cells = [[str(r.get(key, "")) for key, _ in columns] for r in rows]
    widths = [
        max([len(title)] + [len(c[i]) for c in cells]) for i, (_, title) in enumerate(columns)
    ]
    lines = ["  ".join(t.ljust(w) for (_, t), w in zip(columns, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _out(args: argparse.Namespace, value: Any, human: Callable[[], str]) -> int:
    print(json.dumps(value, indent=None if args.json == "compact" else 2) if args.json else human())
    return 0


def _limits(args: argparse.Namespace) -> dict[str, int]:
    return {
        name: getattr(args, name)
        for name in ("rpm", "tpm", "concurrency")
        if getattr(args, name, None) is not None
    }


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


_KEY_COLUMNS = [
    ("id", "ID"),
    ("prefix", "PREFIX"),
    ("name", "NAME"),
    ("account", "ACCOUNT"),
    ("status", "STATUS"),
    ("scopes", "SCOPES"),
    ("models", "MODELS"),
    ("expires_at", "EXPIRES"),
    ("last_used_at", "LAST USED"),
]


def _key_row(k: dict[str, Any]) -> dict[str, Any]:
    return {
        **k,
        "scopes": ",".join(k.get("scopes", [])),
        "models": ",".join(k.get("models", [])),
        "expires_at": k.get("expires_at") or "never",
        "last_used_at": k.get("last_used_at") or "-",
    }


def _key_detail(k: dict[str, Any]) -> str:
    row = _key_row(k)
    limits = ", ".join(f"{n}={v}" for n, v in (k.get("limits") or {}).items()) or "-"
    fields = [*(key for key, _ in _KEY_COLUMNS), "created_at", "revoked_at"]
    lines = [f"{name:13}{row.get(name) or '-'}" for name in fields]
    return "\n".join([*lines, f"{'limits':13}{limits}"])


# --------------------------------------------------------------------------- commands


def keys_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "account": args.account or ""}
    if args.scopes is not None:
        body["scopes"] = _csv(args.scopes)
    if args.models is not None:
        body["models"] = _csv(args.models)
    if args.expires:
        body["expires_at"] = args.expires
    if limits := _limits(args):
        body["limits"] = limits
    key = call(args, "POST", "/v1/keys", body)
    if args.json:
        return _out(args, key, str)
    print(key["key"])
    print(
        f"# key {key['id']} '{key['name']}' for account '{key['account']}' (prefix"
        f" {key['prefix']}, scopes {','.join(key['scopes'])}); shown once, stored hashed",
        file=sys.stderr,
    )
    return 0


def keys_list(args: argparse.Namespace) -> int:
    page = call(args, "GET", "/v1/keys", account=args.account)
    rows = [_key_row(k) for k in page["data"]]
    return _out(args, page["data"], lambda: _table(rows, _KEY_COLUMNS))


def keys_show(args: argparse.Namespace) -> int:
    key = call(args, "GET", f"/v1/keys/{quote(args.id, safe='')}")
    return _out(args, key, lambda: _key_detail(key))


def keys_update(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.name is not None:
        body["name"] = args.name
    if args.models is not None:
        body["models"] = _csv(args.models)
    if args.expires is not None:
        body["expires_at"] = "" if args.expires == "never" else args.expires
    if limits := _limits(args):
        body["limits"] = limits
    if not body:
        raise Failure("nothing to change: give --name, --models, --expires or a limit", 2)
    key = call(args, "PATCH", f"/v1/keys/{quote(args.id, safe='')}", body)
    return _out(args, key, lambda: _key_detail(key))


def keys_revoke(args: argparse.Namespace) -> int:
    key = call(args, "DELETE", f"/v1/keys/{quote(args.id, safe='')}")
    return _out(args, key, lambda: f"revoked {key['id']} ({key['prefix']}, '{key['name']}')")


_ACCOUNT_COLUMNS = [
    ("id", "ACCOUNT"),
    ("name", "NAME"),
    ("balance", "BALANCE"),
    ("reserved", "RESERVED"),
    ("available", "AVAILABLE"),
    ("keys", "KEYS"),
    ("limits", "LIMITS"),
]


def _account_row(a: dict[str, Any]) -> dict[str, Any]:
    limits = ",".join(f"{n}={v}" for n, v in (a.get("limits") or {}).items())
    return {**a, "limits": limits or "-", "name": a.get("name") or "-"}


def accounts_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"id": args.id, "name": args.name or ""}
    if limits := _limits(args):
        body["limits"] = limits
    account = call(args, "POST", "/v1/accounts", body)
    return _out(args, account, lambda: f"created account {account['id']}")


def accounts_list(args: argparse.Namespace) -> int:
    page = call(args, "GET", "/v1/accounts")
    rows = [_account_row(a) for a in page["data"]]
    return _out(args, page["data"], lambda: _table(rows, _ACCOUNT_COLUMNS))


def accounts_set_limits(args: argparse.Namespace) -> int:
    limits = _limits(args)
    if not limits:
        raise Failure("give at least one of --rpm, --tpm, --concurrency", 2)
    if any(v < 0 for v in limits.values()):
        raise Failure("limits must be >= 0 (0 = unlimited)", 2)
    account = call(
        args, "PATCH", f"/v1/accounts/{quote(args.account, safe='')}", {"limits": limits}
    )
    shown = ", ".join(f"{k}={v}" for k, v in limits.items())
    return _out(
        args,
        account,
        lambda: (
            f"limits for account {args.account}: {shown} (keys without their own;"
            " every worker applies them at once)"
        ),
    )


def credits_grant(args: argparse.Namespace) -> int:
    from .money import parse_credits

    try:
        amount = parse_credits(args.amount)
    except ValueError as exc:
        raise Failure(f"AMOUNT {args.amount!r}: {exc}", 2) from None
    if amount <= 0:
        raise Failure(f"AMOUNT must be positive, got {args.amount}", 2)
    body = {
        "account": args.account,
        "amount": args.amount,
        "note": args.note or "",
        "id": args.id or "",
    }
    grant = call(args, "POST", "/v1/credits/grants", body)
    return _out(
        args,
        grant,
        lambda: f"granted {grant['granted']} to {grant['account']}; balance {grant['balance']}",
    )


def credits_show(args: argparse.Namespace) -> int:
    credits = call(args, "GET", "/v1/credits", account=args.account)
    recent = call(args, "GET", "/v1/credits/transactions", account=args.account, limit=10)["data"]

    def human() -> str:
        lines = [f"{k:10} {credits[k]}" for k in ("account", "balance", "reserved", "available")]
        if recent:
            lines.append("\nrecent ledger entries (newest first):")
            for e in recent:
                what = e.get("request_id") or e.get("note") or ""
                if e["type"] == "checkpoint":  # retention folded these (README, "Retention")
                    what = f"{e['entries']} earlier entries"
                lines.append(f"  {e['time']}  {e['type']:10} {e['amount']:>14}  {what}")
        elif not args.account:  # the credential's own account: an operator's has no ledger
            lines.append(
                "\nno ledger entries for the credential's own account; name one: show ACCOUNT"
            )
        return "\n".join(lines)

    return _out(args, {**credits, "recent": recent}, human)


def usage(args: argparse.Namespace) -> int:
    page = call(
        args,
        "GET",
        "/v1/usage",
        account=args.account,
        since=args.since,
        until=args.until,
        model=args.model,
        limit=args.limit,
    )
    columns = [
        ("time", "TIME"),
        ("key_prefix", "KEY"),
        ("model", "MODEL"),
        ("tokens_in", "IN"),
        ("tokens_out", "OUT"),
        ("cost", "COST"),
        ("latency_ms", "MS"),
        ("status", "STATUS"),
    ]

    def human() -> str:
        if page["data"]:
            return _table(page["data"], columns)
        # an operator's own account (auth.admin_account) makes no requests: say where to look
        whose = f"account '{args.account}'" if args.account else "the credential's own account"
        hint = "" if args.account else "; name another with --account"
        return f"no usage records for {whose} in this range{hint}"

    return _out(args, page["data"], human)


# --------------------------------------------------------------------------- parser


def _run(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except Failure as exc:
            print(f"tollgate: {exc}", file=sys.stderr)
            return exc.code

    return run


def add_commands(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    def command(group: Any, name: str, fn: Callable[[argparse.Namespace], int], help: str):
        p = with_config(group.add_parser(name, help=help))
        p.add_argument("--url", help=f"the gateway (default ${URL_ENV}, else --config's listener)")
        p.add_argument(
            "--admin-key", "--key", dest="admin_key", help=f"credential (default ${ADMIN_KEY_ENV})"
        )
        p.add_argument("--json", action="store_const", const="pretty", help="JSON for scripts")
        p.add_argument("--timeout", type=float, default=15.0, help=argparse.SUPPRESS)
        p.set_defaults(func=_run(fn))
        return p

    def limit_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rpm", type=int, help="requests per minute (0 = unlimited)")
        p.add_argument("--tpm", type=int, help="tokens per minute (0 = unlimited)")
        p.add_argument("--concurrency", type=int, help="requests in flight (0 = unlimited)")

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys", required=True)
    p = command(keys, "create", keys_create, "create a key and print it once")
    p.add_argument("--name", required=True)
    p.add_argument("--account", help="default: the credential's own account")
    p.add_argument(
        "--scopes", help=f"comma-separated ({','.join(SCOPES)}); default models:use,usage:read"
    )
    p.add_argument("--models", help="comma-separated model pool; default every model")
    p.add_argument("--expires", help="RFC 3339 time or Unix seconds; default never")
    limit_flags(p)
    p = command(keys, "list", keys_list, "keys of an account (prefixes only)")
    p.add_argument("--account", help="default: the credential's own account")
    p = command(keys, "show", keys_show, "one key")
    p.add_argument("id", help="key id (key_...)")
    p = command(keys, "update", keys_update, "change a key's name, pool, expiry or limits")
    p.add_argument("id", help="key id (key_...)")
    p.add_argument("--name")
    p.add_argument("--models", help="comma-separated model pool, or '*' for every model")
    p.add_argument("--expires", help="RFC 3339 time, Unix seconds, or 'never'")
    limit_flags(p)
    p = command(keys, "revoke", keys_revoke, "revoke a key (every worker refuses it within 1 s)")
    p.add_argument("id", help="key id (key_...)")

    accounts = sub.add_parser("accounts", help="accounts").add_subparsers(
        dest="accounts", required=True
    )
    p = command(accounts, "create", accounts_create, "create an account (operator)")
    p.add_argument("id")
    p.add_argument("--name")
    limit_flags(p)
    command(accounts, "list", accounts_list, "every account with its balance (operator)")
    p = command(accounts, "set-limits", accounts_set_limits, "default limits of an account's keys")
    p.add_argument("account")
    limit_flags(p)

    credits = sub.add_parser("credits", help="balances").add_subparsers(
        dest="credits", required=True
    )
    p = command(credits, "grant", credits_grant, "add credits to an account (operator)")
    p.add_argument("account")
    p.add_argument("amount", help="credits, e.g. 100 or 12.5 (at most 6 decimal places)")
    p.add_argument("--note", help="why (kept in the ledger)")
    p.add_argument("--id", help="idempotency id: granting twice with it adds once")
    p = command(credits, "show", credits_show, "balance and recent ledger entries")
    p.add_argument("account", nargs="?", default="", help="default: the credential's own")

    p = command(sub, "usage", usage, "per-request usage records, newest first")
    p.add_argument("--account", help="default: the credential's own account")
    p.add_argument("--since", help="Unix time or ISO 8601")
    p.add_argument("--until", help="Unix time or ISO 8601")
    p.add_argument("--model")
    p.add_argument("--limit", type=int, default=50)
