from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.harness import Gateway, base_config, start_gateway


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One real gateway for the session: Valkey, simulators, a worker, Envoy."""
    gw = start_gateway(tmp_path_factory.mktemp("gateway"), base_config())
    try:
        yield gw
    finally:
        gw.stack.stop()


@pytest.fixture()
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=gateway.key, max_retries=0, timeout=20)
