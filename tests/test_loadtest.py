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


def test_report_of_several_rounds_gives_medians_and_the_range_of_the_ratios() -> None:
    """--rounds: each target's median, and metered against unmetered as the median of the
    rounds' own ratios (rounds paired by number) with their range."""
    from argparse import Namespace

    from loadtest.runner import Result, report

    def run(target: str, rnd: int, rps: float) -> Result:
        return Result(
            target, "chat.js", 64, 1000, 0, rps, 1.0, 2.0, 1.0, 500, 250, 3.0, 80, 70, rnd
        )

    rows = [(1, 10_000, 2_000, 1_700), (2, 9_000, 1_800, 1_620), (3, 11_000, 2_200, 1_760)]
    results = [
        r
        for rnd, bare, unmetered, metered in rows
        for r in (
            run("bare-envoy", rnd, bare),
            run("unmetered", rnd, unmetered),
            run("gateway", rnd, metered),
        )
    ]
    args = Namespace(scripts="chat.js", vus="64", workers=1, duration=10.0, rounds=3)
    text = report(results, args)
    row = next(line for line in text.splitlines() if line.startswith("| chat |"))
    # medians 10,000 / 2,000 / 1,700; ratios -15%, -10%, -20%: median -15%
    assert "| 10,000 | 2,000 | 1,700 | -15% (-20% to -10%, 3 rounds) |" in row
    assert "medians of 3 rounds" in text
    one = report([r for r in results if r.round == 1], Namespace(**{**vars(args), "rounds": 1}))
    assert "| 10,000 | 2,000 | 1,700 | -15% |" in one
    # a scenario bare Envoy does not run (the paced model) still gets its row
    paced = [
        Result(t, "paced-stream", 64, 100, 0, rps, 80.0, 110.0, 10.0, 800, 600, 3.0, 100, 330)
        for t, rps in (("unmetered", 750), ("gateway", 690))
    ]
    text = report(paced, Namespace(**{**vars(args), "scripts": "paced-stream", "rounds": 1}))
    assert "| paced-stream | 64 | — | 750 | 690 | -8% | —, 80.00/110.0, 80.00/110.0 |" in text
