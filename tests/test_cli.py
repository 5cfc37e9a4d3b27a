"""The CLI against a running gateway's control API: tables, --json, exit codes, and the round
trip create key -> use it with the OpenAI SDK -> revoke -> 401."""

from __future__ import annotations

import json
import time
import uuid

import openai
import pytest

from extproc.cli import main
from tests.harness import ADMIN_KEY, SECRETS, Gateway, closed_port

HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def cli(gateway: Gateway, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("TOLLGATE_URL", gateway.base_url)
    monkeypatch.setenv("TOLLGATE_ADMIN_KEY", ADMIN_KEY)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_round_trip_create_use_revoke(gateway: Gateway, cli) -> None:
    account = "cli-" + uuid.uuid4().hex[:8]
    assert cli("accounts", "create", account, "--name", "CLI test")[0] == 0
    assert cli("credits", "grant", account, "3.5")[0] == 0
    code, out, _ = cli("keys", "create", "--name", "laptop", "--account", account, "--json")
    assert code == 0
    created = json.loads(out)
    raw, key_id = created["key"], created["id"]
    SECRETS.append(raw)

    client = openai.OpenAI(base_url=gateway.v1, api_key=raw, max_retries=0)
    reply = client.chat.completions.create(model="sim-chat", messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert reply.choices[0].message.content

    code, out, _ = cli("keys", "list", "--account", account)
    assert code == 0 and raw[:11] in out and raw not in out
    assert out.splitlines()[0].split()[:3] == ["ID", "PREFIX", "NAME"]
    code, out, _ = cli("keys", "show", key_id)
    assert code == 0 and "active" in out
    code, out, _ = cli("usage", "--account", account, "--model", "sim-chat", "--since", "1h")
    assert code == 2 and out == ""  # not a time
    since = str(int(time.time()) - 3600)
    code, out, _ = cli(
        "usage", "--account", account, "--model", "sim-chat", "--since", since, "--json"
    )
    assert code == 0 and [r["model"] for r in json.loads(out)] == ["sim-chat"]
    code, out, _ = cli("credits", "show", account)
    assert code == 0 and "balance" in out and "grant" in out
    # the admin key's own account makes no requests: an empty table would look broken
    code, out, _ = cli("credits", "show")
    assert code == 0 and "credential's own account" in out and "show ACCOUNT" in out
    code, out, _ = cli("usage")
    assert code == 0 and "credential's own account" in out and "--account" in out
    code, out, _ = cli("usage", "--account", account, "--model", "no-such-model")
    assert code == 0 and f"account '{account}'" in out and "--account" not in out

    code, out, _ = cli("keys", "revoke", key_id)
    assert code == 0 and "revoked" in out
    with pytest.raises(openai.AuthenticationError) as exc:
        client.chat.completions.create(model="sim-chat", messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert exc.value.status_code == 401 and exc.value.body["code"] == "key_revoked"  # type: ignore[index]


def test_update_and_tables(cli) -> None:
    code, out, _ = cli(
        "keys", "create", "--name", "t", "--account", "default", "--scopes", "models:use"
    )
    raw = out.strip()
    SECRETS.append(raw)
    code, out, _ = cli("keys", "list", "--account", "default", "--json")
    key_id = next(k["id"] for k in json.loads(out) if k["prefix"] == raw[:11])
    code, out, _ = cli("keys", "update", key_id, "--models", "sim-embed", "--rpm", "9", "--json")
    assert code == 0 and json.loads(out)["models"] == ["sim-embed"]
    assert json.loads(out)["limits"] == {"rpm": 9}
    code, out, _ = cli("accounts", "list")
    assert code == 0 and "default" in out and out.splitlines()[0].startswith("ACCOUNT")


def test_exit_codes_and_messages(gateway: Gateway, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = cli("keys", "show", "key_0000000000000000")
    assert code == 4 and "No key with this id" in err
    assert cli("accounts", "create", "default")[0] == 5
    code, _, err = cli("credits", "grant", "default", "1.1234567")
    assert code == 2 and "6 decimal" in err
    code, _, err = cli("keys", "create", "--name", "x", "--scopes", "root")
    assert code == 2 and "root" in err
    assert cli("keys", "update", "key_0000000000000000")[0] == 2  # nothing to change
    code, _, err = cli("keys", "list", "--admin-key", "tg-admin-wrong")
    assert code == 3 and "TOLLGATE_ADMIN_KEY" in err
    monkeypatch.delenv("TOLLGATE_ADMIN_KEY")
    code, _, err = cli("keys", "list")
    assert code == 3 and "no credential" in err
    code, _, err = cli("keys", "list", "--url", f"http://127.0.0.1:{closed_port()}", "--key", "x")
    assert code == 1 and "cannot reach the gateway" in err
    tenant = gateway.new_key("tenant-cli", scopes=["usage:read"])
    code, _, err = cli("accounts", "list", "--key", tenant)
    assert code == 3 and "operator" in err
