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
    # TGI streams run through the gateways only. Metered, Envoy's stream meter translates them
    # (no message per chunk) unless they have a stop sequence; unmetered, the processor does.
    msgs = {
        (r["script"], r["target"]): r["ext_proc_msgs_per_req"]
        for r in data["results"]
        if r["vus"] == 8 and r["target"] != "bare-envoy"
    }
    assert ("tgi-stream", "bare-envoy") not in {(r["script"], r["target"]) for r in data["results"]}
    assert msgs[("paced-stream", "gateway")] == pytest.approx(3, abs=0.2)
    assert msgs[("tgi-stream", "gateway")] == pytest.approx(3, abs=0.2)
    assert msgs[("tgi-stream-processor", "gateway")] > 10
    assert msgs[("tgi-stream", "unmetered")] > 10
