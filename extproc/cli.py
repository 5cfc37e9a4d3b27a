"""The ``tollgate`` command.

    tollgate up [--config tollgate.yaml]       start everything; Ctrl-C stops everything
    tollgate render-envoy [--config ...]       print the Envoy bootstrap
    tollgate check-config [--config ...]       validate the config and exit
    tollgate worker --config ... --index N     one processor worker (started by `up`)
    tollgate keys create|list|show|update|revoke      the control API (cli_control.py)
    tollgate accounts create|list|set-limits
    tollgate credits grant|show
    tollgate usage [--account A --since T --until T --model M]

Exit codes: 0 success, 1 runtime failure (a part died, the gateway or store is unreachable),
2 bad usage, an invalid request or config file; control-API commands add 3 (credential refused),
4 (not found), 5 (conflict).
"""

from __future__ import annotations

import argparse
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

Control API (keys, accounts, credits, usage; REST under {url}, spec at /openapi.json):
{{admin}}

Envoy admin: http://127.0.0.1:{cfg.envoy.admin_port}/   Logs: {{run}}/logs/
Ctrl-C stops everything.
"""


def _admin_key(cfg: GatewayConfig) -> str:
    """How the banner tells the operator about the admin key. Without one configured, make one
    for this run: the workers (children) read it from the environment; it is printed once."""
    import secrets

    from .config import ADMIN_KEY_ENV

    if os.environ.get(ADMIN_KEY_ENV):
        return f"  admin key: ${ADMIN_KEY_ENV} (from your environment)"
    if cfg.auth.admin_key_sha256:
        return "  admin key: the one whose SHA-256 is auth.admin_key_sha256 in the config"
    os.environ[ADMIN_KEY_ENV] = "tg-admin-" + secrets.token_urlsafe(32)
    return (
        f"  export {ADMIN_KEY_ENV}={os.environ[ADMIN_KEY_ENV]}   # this run only; shown once\n"
        f"  {{cli}} keys list --account default"
    )


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
    admin = _admin_key(stack.cfg)  # before the workers start: they inherit it
    try:
        stack.start()
    except StartError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 1
    try:
        if "envoy" in parts:
            key = create_key(connect_sync(stack.cfg.store_url), f"up-{os.getpid()}", "default")
            balance = _starting_credits(stack.cfg)
            banner = _banner(stack.cfg, key.raw).replace("{admin}", admin)
            banner = banner.replace("{run}", str(stack.run_dir))
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
    from .cli_control import add_commands

    add_commands(sub, with_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
