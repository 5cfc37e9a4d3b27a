"""The loadtest runner itself (slow: run by `make bench`, skipped by `make test`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.runner import main


@pytest.mark.slow
def test_runner_compares_bare_envoy_and_gateway(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    assert main(["--duration", "2", "--vus", "1,8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    targets = {(r["script"], r["vus"], r["target"]) for r in data["results"]}
    for script in ("chat.js", "stream.js"):
        for vus in (1, 8):
            for target in ("bare-envoy", "unmetered", "gateway"):
                assert (script, vus, target) in targets
    for r in data["results"]:
        assert r["requests"] > 0 and r["failed"] == 0
        if r["target"] != "bare-envoy":
            assert r["processor_us_per_req"] > 0
