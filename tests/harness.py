"""Start a real gateway (Valkey, simulators, processor workers, Envoy) on free ports for tests."""

from __future__ import annotations

import hashlib
import json
import secrets
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extproc.keys import create_key
from extproc.ports import free_port_block
from extproc.store import connect_sync
from extproc.supervisor import Stack


def closed_port() -> int:
    """A port nothing listens on (for 'backend down')."""
    return free_port_block(1)


# Every raw key the tests create: test_zz_logs.py checks that none of them reaches a log.
SECRETS: list[str] = []

# The bootstrap admin key of every test gateway (the config holds only its SHA-256).
ADMIN_KEY = "tg-admin-" + secrets.token_urlsafe(24)
SECRETS.append(ADMIN_KEY)

# 1 credit per 1M input tokens, 2 per 1M output tokens, 0.0001 per request.
PRICE = {"input_per_1m": 1, "output_per_1m": 2, "per_request": "0.0001"}


def base_config(
    workers: int = 1, sim_ttft_ms: int = 0, sim_itl_ms: int = 0, output_tokens: int = 12
) -> dict[str, Any]:
    """A config like the sample one, on free ports, with extra backends for failure tests."""
    return {
        "listener": {"port": free_port_block(), "max_request_body_bytes": 65536},
        "processor": {
            "port": free_port_block(workers),
            "metrics_port": free_port_block(workers),
            "workers": workers,
        },
        "envoy": {"admin_port": free_port_block(), "access_log": True},
        "store": {"data_dir": "data", "port": free_port_block()},
        "backends": [
            {
                "name": "vllm-chat",
                "kind": "vllm",
                "endpoints": [f"127.0.0.1:{free_port_block()}"],
                "request_timeout": "30s",
                "health_check": {"interval": "1s"},
                "simulate": {
                    "ttft_ms": sim_ttft_ms,
                    "itl_ms": sim_itl_ms,
                    "output_tokens": output_tokens,
                },
            },
            {
                "name": "vllm-embed",
                "kind": "vllm",
                "endpoints": [f"127.0.0.1:{free_port_block()}"],
                "request_timeout": "10s",
                "simulate": {},
            },
            {
                "name": "slow",
                "kind": "vllm",
                "endpoints": [f"127.0.0.1:{free_port_block()}"],
                "request_timeout": "1s",
                "simulate": {"ttft_ms": 3000},
            },
            {
                "name": "down",
                "kind": "vllm",
                "endpoints": [f"127.0.0.1:{closed_port()}"],
                "connect_timeout": "0.25s",
                "request_timeout": "10s",
                "health_check": {"interval": "1s"},
            },
        ],
        "auth": {"admin_key_sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest()},
        "metering": {
            "reservation_timeout": "60s",
            "sweep_interval": "1s",
            "starting_credits": 10,
        },
        "models": [
            {"id": "sim-chat", "backend": "vllm-chat", "max_tokens": 512, "pricing": PRICE},
            {
                "id": "chat-alias",
                "backend": "vllm-chat",
                "backend_model": "sim-chat",
                "pricing": PRICE,
            },
            {
                "id": "short-chat",  # a small context window (the same backend model)
                "backend": "vllm-chat",
                "backend_model": "sim-chat",
                "context_length": 4096,
                "max_tokens": 512,
                "pricing": PRICE,
            },
            {"id": "sim-embed", "backend": "vllm-embed", "kind": "embedding", "free": True},
            {"id": "slow-chat", "backend": "slow", "pricing": PRICE},
            {"id": "down-chat", "backend": "down", "pricing": PRICE},
        ],
    }


def sim_backend(name: str, kind: str, **extra: object) -> dict[str, object]:
    """A simulated backend of ``kind`` on a free port (8 output tokens, 20 s timeout)."""
    return {
        "name": name,
        "kind": kind,
        "endpoints": [f"127.0.0.1:{free_port_block()}"],
        "request_timeout": "20s",
        "simulate": {"output_tokens": 8},
        **extra,
    }


@dataclass
class Gateway:
    stack: Stack
    key: str

    @property
    def cfg(self):
        return self.stack.cfg

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.listener.port}"

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.cfg.envoy.admin_port}"

    def metrics(self, worker: int = 0) -> str:
        url = f"http://127.0.0.1:{self.cfg.processor.metrics_port + worker}/metrics"
        with urllib.request.urlopen(url) as resp:
            return resp.read().decode()

    def sim_url(self, backend: str) -> str:
        e = self.cfg.backends_by_name[backend].endpoints[0]
        return f"http://{e.host}:{e.port}"

    def sim_requests(self, backend: str = "vllm-chat") -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.sim_url(backend) + "/sim/requests") as resp:
            return json.loads(resp.read())

    def envoy_stats(self, prefix: str = "") -> dict[str, int]:
        url = f"{self.admin}/stats?filter={prefix}" if prefix else f"{self.admin}/stats"
        with urllib.request.urlopen(url) as resp:
            text = resp.read().decode()
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out

    def ext_proc_stat(self, stat: str) -> int:
        """Envoy's ext_proc counter ``stat`` (``streams_started``, ``stream_msgs_sent``, ...)."""
        suffix = f"ext_proc.tollgate.{stat}"
        return sum(v for k, v in self.envoy_stats("ext_proc").items() if k.endswith(suffix))

    def new_key(
        self,
        name: str = "test",
        account: str = "default",
        scopes: list[str] | None = None,
        models: list[str] | None = None,
        expires_at: float | None = None,
        **limits: int,
    ) -> str:
        client = connect_sync(self.cfg.store_url)
        raw = create_key(client, name, account, limits, scopes, models, expires_at).raw
        SECRETS.append(raw)
        return raw


def grant(url: str, account: str, credits: str) -> None:
    from extproc.cli import main

    argv = ["credits", "grant", account, credits, "--config", url, "--admin-key", ADMIN_KEY]
    assert main(argv) == 0


def start_gateway(tmp: Path, config: dict[str, Any], credits: str = "1000") -> Gateway:
    path = tmp / "tollgate.yaml"
    path.write_text(yaml.safe_dump(config))
    stack = Stack(path).start(timeout=60)
    key = create_key(connect_sync(stack.cfg.store_url), "tests", "default").raw
    SECRETS.append(key)
    if credits:
        grant(str(path), "default", credits)
    return Gateway(stack, key)
