"""Overload is shed on purpose: a worker over processor.max_inflight answers 503
gateway_overloaded with Retry-After, instead of letting Envoy's message timeout turn it into 5xx."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import Gateway, base_config, start_gateway


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    cfg = base_config()
    cfg["processor"]["max_inflight"] = 4
    gw = start_gateway(Path(tmp_path_factory.mktemp("small")), cfg)
    try:
        yield gw
    finally:
        gw.stack.stop()


def test_over_max_inflight_is_503_with_retry_after(small: Gateway) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        small.v1 + "/chat/completions",
                        headers={"Authorization": f"Bearer {small.key}", "x-sim-ttft-ms": "1500"},
                        json={"model": "sim-chat", "messages": [{"role": "user", "content": "x"}]},
                    )
                    for _ in range(12)
                )
            )

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    shed = [r for r in responses if r.status_code == 503]
    assert statuses.count(200) >= 4 and shed, statuses
    assert set(statuses) <= {200, 503}
    for r in shed:
        assert r.json()["error"]["code"] == "gateway_overloaded"
        assert r.headers["retry-after"] == "1"
