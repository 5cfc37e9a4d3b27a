"""The ``tollgate`` command.

    tollgate up [--config tollgate.yaml]       start everything; Ctrl-C stops everything
    tollgate render-envoy [--config ...]       print the Envoy bootstrap
    tollgate check-config [--config ...]       validate the config and exit
    tollgate keys create --name NAME           create an API key, print it once
    tollgate credits grant ACCOUNT AMOUNT      add credits (decimal, at most 6 places)
    tollgate credits show ACCOUNT              balance, reserved, available, recent entries
    tollgate usage [--account A --since T --until T --model M]   per-request usage
    tollgate accounts set-limits ACCOUNT [--rpm N --tpm N --concurrency N]
    tollgate worker --config ... --index N     one processor worker (started by `up`)

Exit codes: 0 success, 1 runtime failure (a part died, the store is unreachable),
2 bad usage or an invalid config file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from .config import OTLP_ENV, ConfigError, GatewayConfig, load_config

DEFAULT_CONFIG = os.environ.get("TOLLGATE_CONFIG", "tollgate.yaml")
PARTS = ("store", "simulators", "workers", "envoy")


def _load(path: str) -> GatewayConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"tollgate: invalid config {path}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _store_client(cfg: GatewayConfig):
    from redis.exceptions import ConnectionError as RedisConnectionError

    from .store import connect_sync

    client = connect_sync(cfg.store_url)
    try:
        client.ping()
    except RedisConnectionError:
        print(
            f"tollgate: the store at {cfg.store_url} is not reachable."
            " Start the gateway (`make up`) or set REDIS_URL.",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    return client


def cmd_render_envoy(args: argparse.Namespace) -> int:
    from .envoy_config import render_yaml

    sys.stdout.write(render_yaml(_load(args.config)))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    print(f"{args.config}: OK ({len(cfg.backends)} backends, {len(cfg.models)} models)")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from .server import run

    return run(_load(args.config), args.index)


def cmd_keys_create(args: argparse.Namespace) -> int:
    from .keys import create_key

    cfg = _load(args.config)
    try:
        limits = {
            name: value
            for name, value in (
                ("rpm", args.rpm),
                ("tpm", args.tpm),
                ("concurrency", args.concurrency),
            )
            if value is not None
        }
        key = create_key(_store_client(cfg), args.name, args.account, limits)
    except ValueError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {"key": key.raw, "prefix": key.prefix, "name": key.name, "account": key.account}
            )
        )
    else:
        print(key.raw)
        print(
            f"# key '{key.name}' for account '{key.account}' (prefix {key.prefix});"
            " shown once, stored hashed",
            file=sys.stderr,
        )
    return 0


def _ledger_call(cfg: GatewayConfig, fn):
    """Run ``fn(ledger)`` (a coroutine function) against the configured store."""
    import asyncio

    from .ledger import Ledger
    from .store import connect

    _store_client(cfg)  # a clear message and exit 1 if the store is down

    async def run():
        client = connect(cfg.store_url)
        try:
            return await fn(Ledger(client))
        finally:
            await client.aclose()

    return asyncio.run(run())


def cmd_credits_grant(args: argparse.Namespace) -> int:
    from .money import format_credits, parse_credits

    try:
        amount = parse_credits(args.amount)
    except ValueError as exc:
        print(f"tollgate: AMOUNT {args.amount!r}: {exc}", file=sys.stderr)
        return 2
    if amount <= 0:
        print(f"tollgate: AMOUNT must be positive, got {args.amount}", file=sys.stderr)
        return 2
    cfg = _load(args.config)
    balance = _ledger_call(
        cfg, lambda ledger: ledger.grant(args.account, amount, args.note or "", args.id)
    )
    if args.json:
        print(
            json.dumps(
                {
                    "account": args.account,
                    "granted": format_credits(amount),
                    "balance": format_credits(balance),
                }
            )
        )
    else:
        print(
            f"granted {format_credits(amount)} to {args.account}; balance {format_credits(balance)}"
        )
    return 0


def cmd_credits_show(args: argparse.Namespace) -> int:
    from .account_api import iso
    from .money import format_credits

    cfg = _load(args.config)

    async def fetch(ledger):
        return await ledger.balance(args.account), await ledger.transactions(args.account, 10)

    b, entries = _ledger_call(cfg, fetch)
    if args.json:
        print(
            json.dumps(
                {
                    "account": args.account,
                    "balance": format_credits(b.balance),
                    "reserved": format_credits(b.pending),
                    "available": format_credits(b.available),
                    "recent": entries,
                }
            )
        )
        return 0
    print(f"account    {args.account}")
    print(f"balance    {format_credits(b.balance)}")
    print(f"reserved   {format_credits(b.pending)}")
    print(f"available  {format_credits(b.available)}")
    if entries:
        print("\nrecent ledger entries (newest first):")
        for e in entries:
            print(
                f"  {iso(int(e['ts']))}  {e['type']:8} {format_credits(int(e['amount'])):>14}"
                f"  {e.get('request_id') or e.get('note') or ''}"
            )
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from .account_api import iso, parse_time
    from .errors import GatewayError
    from .money import format_credits

    try:
        since = parse_time(args.since, "--since") if args.since else None
        until = parse_time(args.until, "--until") if args.until else None
    except GatewayError as exc:
        print(f"tollgate: {exc.message}", file=sys.stderr)
        return 2
    cfg = _load(args.config)
    rows = _ledger_call(
        cfg,
        lambda ledger: ledger.usage(
            args.account, since_ms=since, until_ms=until, model=args.model, limit=args.limit
        ),
    )
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'time':24} {'key':12} {'model':24} {'in':>7} {'out':>7} {'cost':>12} {'ms':>7} status")
    for r in rows:
        print(
            f"{iso(int(r['ts'])):24} {r.get('key_prefix', ''):12} {r.get('model', ''):24}"
            f" {r.get('tokens_in', 0):>7} {r.get('tokens_out', 0):>7}"
            f" {format_credits(int(r.get('cost', 0))):>12} {r.get('latency_ms', 0):>7}"
            f" {r.get('status', '')}"
        )
    return 0


def cmd_accounts_set_limits(args: argparse.Namespace) -> int:
    from . import store

    limits = {"rpm": args.rpm, "tpm": args.tpm, "concurrency": args.concurrency}
    chosen = {k: v for k, v in limits.items() if v is not None}
    if not chosen:
        print("tollgate: give at least one of --rpm, --tpm, --concurrency", file=sys.stderr)
        return 2
    if any(v < 0 for v in chosen.values()):
        print("tollgate: limits must be >= 0 (0 = unlimited)", file=sys.stderr)
        return 2
    cfg = _load(args.config)
    client = _store_client(cfg)
    client.hset(store.account(args.account), mapping={k: str(v) for k, v in chosen.items()})
    client.sadd(store.accounts(), args.account)
    shown = ", ".join(f"{k}={v}" for k, v in chosen.items())
    print(
        f"limits for account {args.account}: {shown} (keys without their own limits;"
        f" workers pick it up within processor.key_cache_ttl)"
    )
    return 0


def _cli_name() -> str:
    """How the user can call this CLI: `tollgate` if it is on PATH, else its path."""
    import shutil

    me = Path(sys.argv[0]).resolve()
    found = shutil.which("tollgate")
    if found and Path(found).resolve() == me:
        return "tollgate"
    try:
        return str(me.relative_to(Path.cwd()))
    except ValueError:
        return str(me)


def _starting_credits(cfg: GatewayConfig) -> str:
    """Grant metering.starting_credits to 'default' once (idempotent); the available balance."""
    from .money import format_credits

    async def run(ledger):
        if cfg.metering.starting_credits > 0:
            await ledger.grant(
                "default",
                cfg.metering.starting_credits,
                "starting credits from tollgate up",
                "tollgate-up-starting-credits",
            )
        return (await ledger.balance("default")).available

    return format_credits(_ledger_call(cfg, run))


def _banner(cfg: GatewayConfig, key: str) -> str:
    host = "127.0.0.1" if cfg.listener.host == "0.0.0.0" else cfg.listener.host
    url = f"http://{host}:{cfg.listener.port}/v1"
    chat = next((m.id for m in cfg.models if m.kind == "chat"), cfg.models[0].id)
    models = ", ".join(m.id for m in cfg.models)
    return f"""
Tollgate is up.

  URL      {url}
  API key  {key}
           (created now for account 'default'; shown once, stored hashed)
  Models   {models}
  Credits  {{balance}} available to account 'default' (more: `{{cli}} credits grant default 100`)

curl:
  curl {url}/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "{chat}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

OpenAI SDK (pip install openai):
  python - <<'EOF'
  from openai import OpenAI
  client = OpenAI(base_url="{url}", api_key="{key}")
  reply = client.chat.completions.create(
      model="{chat}", messages=[{{"role": "user", "content": "Hello!"}}])
  print(reply.choices[0].message.content)
  EOF

Envoy admin: http://127.0.0.1:{cfg.envoy.admin_port}/   Logs: {{run}}/logs/
Ctrl-C stops everything.
"""


def cmd_up(args: argparse.Namespace) -> int:
    from .keys import create_key
    from .store import connect_sync
    from .supervisor import Stack, StartError

    if args.otlp:  # read by the config (GatewayConfig.otlp_endpoint) here and in every child
        os.environ[OTLP_ENV] = args.otlp
    parts = set(args.only.split(",")) if args.only else set(PARTS)
    if unknown := parts - set(PARTS):
        print(
            f"tollgate: --only takes {','.join(PARTS)}; unknown: {','.join(unknown)}",
            file=sys.stderr,
        )
        return 2
    try:
        stack = Stack(
            Path(args.config),
            start_store="store" in parts,
            start_simulators="simulators" in parts,
            start_workers="workers" in parts,
            start_envoy="envoy" in parts,
        )
    except ConfigError as exc:
        print(f"tollgate: invalid config {args.config}: {exc}", file=sys.stderr)
        return 2
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"tollgate: starting from {stack.config_path} ...", flush=True)
    try:
        stack.start()
    except StartError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 1
    try:
        if "envoy" in parts:
            key = create_key(connect_sync(stack.cfg.store_url), f"up-{os.getpid()}", "default")
            balance = _starting_credits(stack.cfg)
            banner = _banner(stack.cfg, key.raw).replace("{run}", str(stack.run_dir))
            banner = banner.replace("{balance}", balance).replace("{cli}", _cli_name())
            print(banner, flush=True)
        else:
            print(f"tollgate: running {','.join(sorted(parts))}. Ctrl-C stops.", flush=True)
        dead = stack.watch(stop=lambda: stopping)
        if dead is not None:
            print(
                f"tollgate: {dead.name} (pid {dead.pid}) {dead.exit_reason()};"
                f" stopping the rest. Last lines of {dead.log_path}:\n{dead.log_tail()}",
                file=sys.stderr,
                flush=True,
            )
            return 1
        print("tollgate: stopping ...", flush=True)
        return 0
    finally:
        stack.stop()
        print("tollgate: stopped.", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tollgate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", default=DEFAULT_CONFIG, help="gateway config (YAML)")
        return p

    up = with_config(sub.add_parser("up", help="start the whole gateway"))
    up.add_argument(
        "--only",
        help=f"comma-separated parts to run ({','.join(PARTS)}; default all), e.g. 'workers'"
        " in a container",
    )
    up.add_argument(
        "--otlp",
        metavar="HOST:PORT",
        help="export traces (Envoy's and the processor's) over OTLP/gRPC to this collector;"
        " overrides tracing.otlp_endpoint",
    )
    up.set_defaults(func=cmd_up)
    with_config(sub.add_parser("render-envoy", help="print the Envoy bootstrap")).set_defaults(
        func=cmd_render_envoy
    )
    with_config(sub.add_parser("check-config", help="validate the config")).set_defaults(
        func=cmd_check_config
    )
    w = with_config(sub.add_parser("worker", help="run one processor worker"))
    w.add_argument("--index", type=int, default=0)
    w.set_defaults(func=cmd_worker)
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys", required=True)
    kc = with_config(keys.add_parser("create", help="create a key and print it once"))
    kc.add_argument("--name", required=True)
    kc.add_argument("--account", default="default")
    kc.add_argument("--json", action="store_true", help="print JSON for scripts")
    kc.add_argument("--rpm", type=int, help="requests per minute for this key (0 = unlimited)")
    kc.add_argument("--tpm", type=int, help="tokens per minute for this key (0 = unlimited)")
    kc.add_argument("--concurrency", type=int, help="requests in flight for this key")
    kc.set_defaults(func=cmd_keys_create)

    credits = sub.add_parser("credits", help="account balances").add_subparsers(
        dest="credits", required=True
    )
    cg = with_config(credits.add_parser("grant", help="add credits to an account"))
    cg.add_argument("account")
    cg.add_argument("amount", help="credits, e.g. 100 or 12.5 (at most 6 decimal places)")
    cg.add_argument("--note", help="why (kept in the ledger)")
    cg.add_argument("--id", help="idempotency id: granting twice with it adds once")
    cg.add_argument("--json", action="store_true")
    cg.set_defaults(func=cmd_credits_grant)
    cs = with_config(credits.add_parser("show", help="balance and recent ledger entries"))
    cs.add_argument("account")
    cs.add_argument("--json", action="store_true")
    cs.set_defaults(func=cmd_credits_show)

    accounts = sub.add_parser("accounts", help="accounts").add_subparsers(
        dest="accounts", required=True
    )
    al = with_config(
        accounts.add_parser("set-limits", help="default limits for the account's keys")
    )
    al.add_argument("account")
    al.add_argument("--rpm", type=int, help="requests per minute (0 = unlimited)")
    al.add_argument("--tpm", type=int, help="tokens per minute (0 = unlimited)")
    al.add_argument("--concurrency", type=int, help="requests in flight (0 = unlimited)")
    al.set_defaults(func=cmd_accounts_set_limits)

    us = with_config(sub.add_parser("usage", help="per-request usage records"))
    us.add_argument("--account", default="default")
    us.add_argument("--since", help="Unix time or ISO 8601")
    us.add_argument("--until", help="Unix time or ISO 8601")
    us.add_argument("--model")
    us.add_argument("--limit", type=int, default=50)
    us.add_argument("--json", action="store_true")
    us.set_defaults(func=cmd_usage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
