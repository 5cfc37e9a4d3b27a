"""The pipelined script client: ordering under concurrency, NOSCRIPT, reconnects, AUTH."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
import redis.exceptions

from extproc.resp import AnswerLost, FastScript, ScriptClient
from extproc.supervisor import port_open, valkey_binary
from tests.harness import free_port_block

ECHO = "return {ARGV[1], redis.call('INCR', KEYS[1])}"


@pytest.fixture()
def valkey() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port_block()
    cmd = [valkey_binary(), "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*cmd, "--requirepass", "s3cret"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not port_open("127.0.0.1", port):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield port, proc
    proc.kill()
    proc.wait()


def test_pipelined_calls_answer_in_order(valkey: tuple[int, subprocess.Popen[bytes]]) -> None:
    port, _ = valkey
    script = FastScript(ScriptClient(f"redis://:s3cret@127.0.0.1:{port}/2"), ECHO)

    async def run() -> list[list[object]]:
        return await asyncio.gather(*(script(keys=["n"], args=[i]) for i in range(300)))

    replies = asyncio.run(run())
    assert [r[0] for r in replies] == [str(i) for i in range(300)]
    assert sorted(r[1] for r in replies) == list(range(1, 301))
    sync = redis.Redis(port=port, password="s3cret", db=2)
    assert int(sync.get("n")) == 300  # AUTH and SELECT applied


def test_noscript_falls_back_and_reconnects(valkey: tuple[int, subprocess.Popen[bytes]]) -> None:
    port, _ = valkey
    client = ScriptClient(f"redis://:s3cret@127.0.0.1:{port}/0")
    script = FastScript(client, ECHO)
    sync = redis.Redis(port=port, password="s3cret")

    async def run() -> None:
        assert (await script(keys=["k"], args=["a"]))[1] == 1
        sync.script_flush()
        assert (await script(keys=["k"], args=["b"]))[1] == 2  # NOSCRIPT -> EVAL
        sync.client_kill_filter(_type="normal", skipme=True)
        await asyncio.sleep(0.1)
        assert (await script(keys=["k"], args=["c"]))[1] == 3  # reconnected

    asyncio.run(run())


def test_errors_are_redis_py_types(valkey: tuple[int, subprocess.Popen[bytes]]) -> None:
    port, proc = valkey
    bad = FastScript(ScriptClient(f"redis://:s3cret@127.0.0.1:{port}"), "return redis.call('NOPE')")
    with pytest.raises(redis.exceptions.ResponseError):
        asyncio.run(bad(keys=[], args=[]))
    proc.kill()
    proc.wait()
    down = FastScript(ScriptClient(f"redis://127.0.0.1:{port}", timeout=0.5), ECHO)
    with pytest.raises(redis.exceptions.ConnectionError):
        asyncio.run(down(keys=["k"], args=["x"]))


def test_a_call_in_flight_when_the_connection_drops_is_answer_lost() -> None:
    """A call sent and unanswered when the connection closes fails with AnswerLost (the store
    may have run it: metering voids such a reservation); a call that could not go out at all
    (nothing listens) is a plain ConnectionError."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = ScriptClient(f"redis://127.0.0.1:{port}", timeout=5)
    script = FastScript(client, ECHO)

    async def run() -> None:
        await client._connection()
        accepted, _ = listener.accept()  # the store took the connection
        call = asyncio.ensure_future(script(keys=["k"], args=["x"]))
        await asyncio.sleep(0.1)  # sent
        assert accepted.recv(1024).startswith(b"*")
        accepted.close()  # ... and the store went away without answering
        with pytest.raises(AnswerLost):
            await call
        listener.close()
        with pytest.raises(redis.exceptions.ConnectionError) as never_sent:
            await script(keys=["k"], args=["y"])
        assert not isinstance(never_sent.value, AnswerLost)

    asyncio.run(run())


def test_calls_the_store_never_answers_time_out() -> None:
    """A store that accepts and then says nothing: each call fails after the timeout (the
    connection's one watchdog, not a timer per call), awaited or sent with evalsha_soon."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    client = ScriptClient(f"redis://127.0.0.1:{silent.getsockname()[1]}", timeout=0.3)
    script = FastScript(client, ECHO)

    async def run() -> tuple[float, list[BaseException | None]]:
        loop = asyncio.get_running_loop()
        await client._connection()
        errors: list[BaseException | None] = []
        assert script.soon(["k"], ["x"], lambda reply, exc: errors.append(exc))
        t0 = loop.time()
        with pytest.raises(redis.exceptions.TimeoutError):
            await script(keys=["k"], args=["y"])
        return loop.time() - t0, errors

    elapsed, errors = asyncio.run(run())
    silent.close()
    assert 0.25 < elapsed < 2
    assert len(errors) == 1 and isinstance(errors[0], redis.exceptions.TimeoutError)


def test_soon_answers_in_order_and_reloads_a_flushed_script(
    valkey: tuple[int, subprocess.Popen[bytes]],
) -> None:
    port, _ = valkey
    client = ScriptClient(f"redis://:s3cret@127.0.0.1:{port}/0")
    script = FastScript(client, ECHO)
    sync = redis.Redis(port=port, password="s3cret")

    async def run() -> list[tuple[object, BaseException | None]]:
        answers: list[tuple[object, BaseException | None]] = []
        assert not script.soon(["n"], ["early"], lambda r, e: None)  # not connected yet
        await script(keys=["n"], args=["first"])
        sync.script_flush()
        done = asyncio.Event()

        def record(reply: object, exc: BaseException | None) -> None:
            answers.append((reply, exc))
            if len(answers) == 50:
                done.set()

        for i in range(50):
            assert script.soon(["n"], [i], record)
        await asyncio.wait_for(done.wait(), 5)
        return answers

    answers = asyncio.run(run())
    assert all(exc is None for _, exc in answers)
    assert sorted(int(reply[0]) for reply, _ in answers) == list(range(50))  # type: ignore[index]
    assert sorted(reply[1] for reply, _ in answers) == list(range(2, 52))  # type: ignore[index]
