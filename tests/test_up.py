"""`tollgate up`: starts everything, prints how to call it, and never leaves a process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from tests.harness import SECRETS, base_config


def _children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.add(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pids: set[int], timeout: float = 10) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {p for p in pids if _alive(p)}
        if not left:
            return set()
        time.sleep(0.1)
    return {p for p in pids if _alive(p)}


class Up:
    def __init__(self, tmp: Path) -> None:
        self.config = tmp / "tollgate.yaml"
        self.config.write_text(yaml.safe_dump(base_config()))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "extproc", "up", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.banner = ""
        deadline = time.monotonic() + 60
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"tollgate up died: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            self.banner += line
            if "Ctrl-C stops everything" in line:
                break
        m = re.search(r"API key  (tg_[A-Za-z0-9_-]+)", self.banner)
        assert m, self.banner
        self.key = m.group(1)
        SECRETS.append(self.key)
        url = re.search(r"URL      (\S+)", self.banner)
        assert url
        self.url = url.group(1)


@pytest.fixture()
def up(tmp_path: Path) -> Iterator[Up]:
    u = Up(tmp_path)
    yield u
    if u.proc.poll() is None:
        u.proc.kill()
        u.proc.wait()


def test_banner_key_works_with_openai_sdk(up: Up) -> None:
    assert "curl" in up.banner and "from openai import OpenAI" in up.banner
    client = openai.OpenAI(base_url=up.url, api_key=up.key, max_retries=0)
    assert client.models.list().data
    reply = client.chat.completions.create(
        model="sim-chat", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content


def test_ctrl_c_leaves_no_process_behind(up: Up) -> None:
    kids = _children(up.proc.pid)
    # valkey, three simulators, one worker, envoy
    assert len(kids) == 6, kids
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(timeout=20) == 0
    assert _wait_gone(kids) == set()


def test_dead_child_is_named_and_the_rest_stopped(up: Up) -> None:
    kids = _children(up.proc.pid)
    worker = next(p for p in kids if "worker" in Path(f"/proc/{p}/cmdline").read_text())
    os.kill(worker, signal.SIGKILL)
    assert up.proc.wait(timeout=20) == 1
    err = up.proc.stderr.read()  # type: ignore[union-attr]
    assert "worker-0" in err and "SIGKILL" in err
    assert _wait_gone(kids) == set()


def test_killed_supervisor_takes_children_with_it(up: Up) -> None:
    kids = _children(up.proc.pid)
    up.proc.kill()
    up.proc.wait()
    assert _wait_gone(kids) == set()
