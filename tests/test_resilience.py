"""No debit lost or charged twice when a processor worker is SIGKILLed mid-stream and the
store restarts under load: afterwards the ledger reconciles to the micro-credit. A store restart
alone leaves nothing to the sweeper, and a request whose worker died is voided at once."""

from __future__ import annotations

import concurrent.futures
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from extproc.money import parse_credits
from tests.harness import Gateway, base_config, grant, start_gateway

HELLO = [{"role": "user", "content": "Count the toll booths, slowly"}]


def _config() -> dict:
    """Two workers, 20-token answers at 20 ms a token, reservations that time out at 12 s."""
    cfg = base_config(workers=2, sim_itl_ms=20, output_tokens=20)
    cfg["backends"][0]["request_timeout"] = "5s"
    cfg["backends"][2]["request_timeout"] = "1s"
    cfg["metering"] = {"reservation_timeout": "12s", "sweep_interval": "1s"}
    return cfg


@pytest.fixture(scope="module")
def fragile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("fragile"), _config(), credits="")
    try:
        yield gw
    finally:
        gw.stack.stop()


def _one(gw: Gateway, key: str, stream: bool) -> tuple[str, int, bool]:
    """(request id, status, served in full)."""
    rid = uuid.uuid4().hex
    body = {"model": "sim-chat", "messages": HELLO, "max_tokens": 20, "stream": stream}
    headers = {"Authorization": f"Bearer {key}", "X-Request-ID": rid}
    try:
        with httpx.stream(
            "POST", gw.v1 + "/chat/completions", headers=headers, json=body, timeout=15
        ) as r:
            text = r.read().decode()
            full = r.status_code == 200 and (not stream or "data: [DONE]" in text)
            return rid, r.status_code, full
    except httpx.HTTPError:
        return rid, 0, False


def _under_load(
    gw: Gateway, key: str, streams: float, meanwhile: Callable[[], None]
) -> list[tuple[str, int, bool]]:
    """12 clients sending requests (a share ``streams`` of them streams) while ``meanwhile``
    runs: each request's (request id, status, served in full)."""
    results: list[tuple[str, int, bool]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            results.append(_one(gw, key, stream=random.random() < streams))

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        for _ in range(12):
            pool.submit(load)
        try:
            meanwhile()
        finally:
            stop.set()
    return results


def test_ledger_reconciles_after_worker_kill_and_store_restart(fragile: Gateway) -> None:
    gw = fragile
    account = "acct-" + uuid.uuid4().hex[:6]
    key = gw.new_key("fragile", account)
    grant(str(gw.stack.config_path), account, "100")

    def kill_and_restart() -> None:
        time.sleep(2)
        victim = gw.stack.child("worker-0")
        assert victim.proc is not None
        victim.proc.kill()  # SIGKILL, streams in flight
        time.sleep(2)
        gw.stack.restart("valkey")  # SIGTERM; AOF on; back under load
        time.sleep(3)

    results = _under_load(gw, key, 0.6, kill_and_restart)

    served = [rid for rid, status, full in results if status == 200]
    statuses = {s for _, s, _ in results}
    assert len(served) > 50, statuses
    assert statuses <= {200, 503, 0}, statuses
    # every reservation resolves: settled, voided, or expired by the sweeper
    deadline = time.monotonic() + 30
    while True:
        credits = httpx.get(gw.v1 + "/credits", headers={"Authorization": f"Bearer {key}"}).json()
        if "reserved" in credits and parse_credits(credits["reserved"]) == 0:
            break
        assert time.monotonic() < deadline, credits  # a worker restarting answers 503 a while
        time.sleep(0.5)
    while True:  # the same for the ledger: a restarting worker may answer this one 503
        r = httpx.get(
            gw.v1 + "/credits/transactions?limit=1000", headers={"Authorization": f"Bearer {key}"}
        )
        if r.status_code == 200:
            break
        assert time.monotonic() < deadline and r.status_code == 503, r.text
        time.sleep(0.5)
    entries = r.json()["data"]
    total = sum(parse_credits(e["amount"]) for e in entries)
    assert total == parse_credits(credits["balance"]), "ledger does not reconcile"
    assert parse_credits(credits["balance"]) >= 0
    by_request: dict[str, int] = {}
    for e in entries:
        if e.get("request_id"):
            by_request[e["request_id"]] = by_request.get(e["request_id"], 0) + 1
    assert all(n == 1 for n in by_request.values()), "a request has two ledger entries"
    missing = [rid for rid in served if by_request.get(rid) != 1]
    assert not missing, f"{len(missing)} served requests without exactly one ledger entry"
    kinds = {e["type"] for e in entries}
    assert "grant" in kinds and "debit" in kinds
    print(f"served {len(served)}, statuses {statuses}, entry types {kinds}")


def test_a_store_restart_under_load_leaves_nothing_to_the_sweeper(fragile: Gateway) -> None:
    """Settlements the store was away for are sent again (settle_retry.py): every served request
    is debited what it used, and a request refused while the store was away is not charged at
    all. Nothing waits for the sweeper (reservations time out after 12 s here)."""
    gw = fragile
    account = "acct-" + uuid.uuid4().hex[:6]
    key = gw.new_key("fragile", account)
    grant(str(gw.stack.config_path), account, "100")
    deadline = time.monotonic() + 30
    while _one(gw, key, stream=False)[1] != 200:  # both workers up (the test before kills one)
        assert time.monotonic() < deadline
        time.sleep(0.2)

    def restart() -> None:
        time.sleep(1.5)
        gw.stack.restart("valkey")  # SIGTERM; AOF on; back under load
        time.sleep(2)

    results = _under_load(gw, key, 0.5, restart)
    restarted = time.monotonic()

    served = {rid for rid, status, _ in results if status == 200}
    refused = {rid for rid, status, _ in results if status != 200}
    assert len(served) > 50 and refused, {s for _, s, _ in results}
    while True:  # settled by the resends within seconds, not by the sweeper at 12 s
        r = httpx.get(gw.v1 + "/credits", headers={"Authorization": f"Bearer {key}"})
        if r.status_code == 200 and parse_credits(r.json()["reserved"]) == 0:
            break
        assert time.monotonic() - restarted < 8, r.text
        time.sleep(0.2)
    r = httpx.get(
        gw.v1 + "/credits/transactions?limit=1000", headers={"Authorization": f"Bearer {key}"}
    )
    entries = {e["request_id"]: e for e in r.json()["data"] if e.get("request_id")}
    assert len(entries) == len([e for e in r.json()["data"] if e.get("request_id")])
    assert not [e for e in entries.values() if e["type"] == "expired"]
    assert all(entries[rid]["type"] == "debit" for rid in served), [
        entries.get(rid) for rid in served if entries.get(rid, {}).get("type") != "debit"
    ]
    assert all(entries[rid]["type"] == "void" for rid in refused if rid in entries)
    total = sum(parse_credits(e["amount"]) for e in r.json()["data"])
    assert total == parse_credits(httpx.get(
        gw.v1 + "/credits", headers={"Authorization": f"Bearer {key}"}
    ).json()["balance"])  # fmt: skip
    kinds = sorted(e["type"] for e in entries.values())
    print(f"served {len(served)}, refused {len(refused)}, entries {kinds.count('debit')} debit"
          f" {kinds.count('void')} void")  # fmt: skip


def test_a_request_whose_worker_dies_is_voided_at_once_not_charged(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A request whose processor worker dies mid-way gets Envoy's 503 ("ext_proc_error_..."),
    and what it reserved is voided by the other worker from Envoy's access log
    (envoy_config.FAILED_LOG) within a second or two, not charged in full by the sweeper once
    it times out (12 s here). A gateway of its own: the tests above leave a worker ejected."""
    gw = start_gateway(tmp_path_factory.mktemp("dying"), _config(), credits="")
    try:
        _voided_when_its_worker_dies(gw)
    finally:
        gw.stack.stop()


def _voided_when_its_worker_dies(gw: Gateway) -> None:
    victim = gw.stack.child("worker-0")
    account = "acct-" + uuid.uuid4().hex[:6]
    key = gw.new_key("fragile", account)
    grant(str(gw.stack.config_path), account, "100")
    deadline = time.monotonic() + 20
    while not all("tollgate_requests_total{" in gw.metrics(w) for w in (0, 1)):
        assert time.monotonic() < deadline  # both workers in Envoy's rotation
        _one(gw, key, stream=False)
    statuses: dict[str, int] = {}

    def one(rid: str) -> None:
        headers = {"Authorization": f"Bearer {key}", "x-request-id": rid}
        body = {"model": "sim-chat", "messages": HELLO, "max_tokens": 20}
        r = httpx.post(gw.v1 + "/chat/completions", headers=headers, json=body, timeout=15)
        statuses[rid] = r.status_code

    rids = [uuid.uuid4().hex for _ in range(8)]
    threads = [threading.Thread(target=one, args=(rid,)) for rid in rids]
    for t in threads:
        t.start()
    time.sleep(0.2)  # reserved, generating (20 tokens at 20 ms each)
    assert victim.proc is not None
    victim.proc.kill()
    for t in threads:
        t.join()
    failed = {rid for rid, status in statuses.items() if status == 503}
    assert failed and len(failed) < len(rids), statuses
    killed = time.monotonic()
    auth = {"Authorization": f"Bearer {key}"}
    while True:  # (a call that meets the dead worker before Envoy ejects it gets a 503)
        r = httpx.get(gw.v1 + "/credits", headers=auth)
        if r.status_code == 200 and parse_credits(r.json()["reserved"]) == 0:
            break
        assert time.monotonic() - killed < 5, r.text  # the sweeper would take 12 s
        time.sleep(0.1)
    while (r := httpx.get(gw.v1 + "/credits/transactions?limit=100", headers=auth)).is_error:
        assert time.monotonic() - killed < 10, r.text
    entries = r.json()["data"]
    by_request = {e["request_id"]: e for e in entries if e.get("request_id")}
    voided = [by_request[rid] for rid in failed if rid in by_request]
    assert voided and all(
        (e["type"], e["reason"], e["amount"]) == ("void", "processor_failed", "0.00")
        for e in voided
    ), voided
    assert all(by_request[rid]["type"] == "debit" for rid in set(rids) - failed)


def test_store_fsync_reaches_the_embedded_valkey(fragile: Gateway, tmp_path: Path) -> None:
    """``store.fsync``: everysec by default, always on request (every write answered is on
    disk first, so a crash of the store loses no reservation or settlement it answered)."""
    import redis

    from extproc.supervisor import Stack

    def appendfsync(port: int) -> str:
        with redis.Redis(port=port, decode_responses=True) as r:
            return str(r.config_get("appendfsync")["appendfsync"])

    assert appendfsync(fragile.cfg.store.port) == "everysec"
    cfg = base_config()
    cfg["store"]["fsync"] = "always"
    path = tmp_path / "tollgate.yaml"
    path.write_text(json.dumps(cfg))
    stack = Stack(path, start_simulators=False, start_workers=False, start_envoy=False)
    stack.start(timeout=30)
    try:
        assert appendfsync(stack.cfg.store.port) == "always"
    finally:
        stack.stop()
