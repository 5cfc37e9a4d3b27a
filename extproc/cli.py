"""The ``tollgate`` command.

    tollgate up [--config tollgate.yaml]       start everything; Ctrl-C stops everything
    tollgate render-envoy [--config ...]       print the Envoy bootstrap
    tollgate check-config [--config ...]       validate the config and exit
    tollgate keys create --name NAME           create an API key, print it once
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

from .config import ConfigError, GatewayConfig, load_config

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
        key = create_key(_store_client(cfg), args.name, args.account)
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
            print(_banner(stack.cfg, key.raw).replace("{run}", str(stack.run_dir)), flush=True)
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
    kc.set_defaults(func=cmd_keys_create)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
