"""Start a simulator as a subprocess and wait until it is ready (for tests and tools).

    with SimulatorProcess(["--model", "m", "--ttft-ms", "20"]) as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="x")

The process is ``python -m backends --kind KIND --host HOST --port PORT ARGS...``; with
port 0 (the default) the simulator picks a free port and reports it in its ready line,
so there is no race for ports.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO

_READY = re.compile(rb"simulator ready kind=(\S+) port=(\d+)")


class SimulatorProcess:
    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        kind: str = "vllm",
        host: str = "127.0.0.1",
        port: int = 0,
        python: str = sys.executable,
        stderr: int | IO[bytes] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.kind = kind
        self.host = host
        self.port = port
        self.cmd = [
            python,
            "-m",
            "backends",
            "--kind",
            kind,
            "--host",
            host,
            "--port",
            str(port),
            *args,
        ]
        self.stderr = stderr
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL (``.../v1``)."""
        return f"{self.url}/v1"

    def start(self, timeout: float = 15.0) -> SimulatorProcess:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=self.stderr, env=env, cwd=root
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stop()
                    raise TimeoutError(f"simulator not ready after {timeout}s: {self.cmd}")
                if not sel.select(left):
                    continue
                data = os.read(self.proc.stdout.fileno(), 4096)
                if not data:
                    code = self.proc.wait()
                    raise RuntimeError(f"simulator exited with {code} before ready: {self.cmd}")
                buf += data
                match = _READY.search(buf)
                if match:
                    self.port = int(match.group(2))
                    return self

    def stop(self, timeout: float = 5.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
