"""The TEI simulator (backends/tei.py), driven over real HTTP."""

from __future__ import annotations

import base64
import math
import struct
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from backends import textgen
from backends.http import ServerThread
from backends.process import SimulatorProcess
from backends.tei import TeiConfig, build_app

MODEL = "bge-sim"
DIM = 32


def _serve(**kwargs: object) -> Iterator[httpx.Client]:
    config = TeiConfig(
        models=[MODEL], embedding_dim=DIM, max_client_batch_size=4, max_input_length=16, **kwargs
    )  # type: ignore[arg-type]
    with ServerThread(build_app(config)) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def embed() -> Iterator[httpx.Client]:
    yield from _serve()


@pytest.fixture(scope="module")
def rerank() -> Iterator[httpx.Client]:
    yield from _serve(model_type="reranker")


@pytest.fixture(scope="module")
def classify() -> Iterator[httpx.Client]:
    yield from _serve(model_type="classifier")


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


# --- /embed -----------------------------------------------------------------------------


def test_embed_is_always_a_2d_float_array(embed: httpx.Client) -> None:
    r = embed.post("/embed", json={"inputs": "what is deep learning?"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    rows = r.json()
    assert isinstance(rows, list) and len(rows) == 1 and len(rows[0]) == DIM
    assert all(isinstance(x, float) for x in rows[0])  # floats, never base64
    assert rows[0] == textgen.embedding("what is deep learning?", DIM).tolist()
    assert abs(norm(rows[0]) - 1) < 1e-5
    assert r.headers["x-compute-tokens"] == "4"
    assert r.headers["x-compute-characters"] == str(len("what is deep learning?"))
    for h in (
        "x-compute-type",
        "x-compute-time",
        "x-total-time",
        "x-tokenization-time",
        "x-queue-time",
        "x-inference-time",
    ):
        assert h in r.headers

    rows = embed.post("/embed", json={"inputs": ["a b", [101, 2054, 102]]}).json()
    assert (
        len(rows) == 2
        and rows[1] == textgen.embedding(textgen.token_ids_seed([101, 2054, 102]), DIM).tolist()
    )
    assert len(embed.post("/embed", json={"inputs": [101, 2054]}).json()) == 1  # one id list
    raw = embed.post("/embed", json={"inputs": "x y", "normalize": False}).json()[0]
    assert abs(norm(raw) - 1) > 1e-3
    small = embed.post("/embed", json={"inputs": "x y", "dimensions": 8}).json()[0]
    assert len(small) == 8 and abs(norm(small) - 1) < 1e-5


def test_embed_errors(embed: httpx.Client) -> None:
    r = embed.post("/embed", json={"inputs": []})
    assert r.status_code == 400
    assert r.json() == {"error": "`inputs` cannot be empty", "error_type": "Empty"}
    r = embed.post("/embed", json={"inputs": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 422
    assert r.json() == {
        "error": "batch size 5 > maximum allowed batch size 4",
        "error_type": "Validation",
    }
    long = " ".join(["word"] * 20)
    r = embed.post("/embed", json={"inputs": long, "truncate": False})
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"
    assert r.json()["error"] == "`inputs` must have less than 16 tokens. Given: 20"
    r = embed.post("/embed", json={"inputs": long})  # auto-truncate is on
    assert r.status_code == 200 and r.headers["x-compute-tokens"] == "16"
    for dims in (0, DIM + 1):
        r = embed.post("/embed", json={"inputs": "x", "dimensions": dims})
        assert r.status_code == 422 and r.json()["error_type"] == "Validation"
    r = embed.post("/embed", json={"inputs": 5})
    assert r.status_code == 422 and r.headers["content-type"].startswith("text/plain")
    assert "data did not match any variant of untagged enum Input" in r.text
    r = embed.post("/embed", json={"input": "x"})
    assert r.status_code == 422 and "missing field `inputs`" in r.text
    r = embed.post("/rerank", json={"query": "q", "texts": ["a"]})
    assert r.status_code == 424
    assert r.json() == {
        "error": "Backend error: model is not a re-ranker model",
        "error_type": "Backend",
    }
    r = embed.post("/predict", json={"inputs": "x"})
    assert r.status_code == 424 and r.json()["error_type"] == "Backend"


def test_openai_route_and_its_flat_errors(embed: httpx.Client) -> None:
    r = embed.post("/v1/embeddings", json={"input": ["a b", "c"], "model": "whatever"})
    body = r.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    r = embed.post("/v1/embeddings", json={"input": "a b", "encoding_format": "base64"})
    packed = base64.b64decode(r.json()["data"][0]["embedding"])
    floats = list(struct.unpack(f"<{DIM}f", packed))
    assert floats == body["data"][0]["embedding"]
    r = embed.post("/v1/embeddings", json={"input": []})
    assert r.status_code == 400
    assert r.json() == {"message": "`inputs` cannot be empty", "code": 400, "type": "Empty"}
    r = embed.post("/v1/embeddings", json={"input": ["x"] * 5})
    assert r.json() == {
        "message": "batch size 5 > maximum allowed batch size 4",
        "code": 422,
        "type": "Validation",
    }


# --- /rerank and /predict ---------------------------------------------------------------


def test_rerank_sorted_by_score(rerank: httpx.Client) -> None:
    texts = ["a cat on a mat", "rivers flow", "stones and rivers in the hills"]
    r = rerank.post("/rerank", json={"query": "rivers and stones", "texts": texts})
    ranks = r.json()
    assert r.status_code == 200 and [x["index"] for x in ranks] == [2, 1, 0]
    scores = [x["score"] for x in ranks]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert all("text" not in x for x in ranks)
    ranks = rerank.post(
        "/rerank",
        json={
            "query": "rivers and stones",
            "texts": texts,
            "return_text": True,
            "raw_scores": True,
        },
    ).json()
    assert [x["text"] for x in ranks] == [texts[2], texts[1], texts[0]]
    assert any(x["score"] < 0 for x in ranks)  # logits, not probabilities
    r = rerank.post("/rerank", json={"query": "q", "texts": []})
    assert r.status_code == 400 and r.json()["error_type"] == "Empty"
    r = rerank.post("/rerank", json={"query": "q", "texts": ["t"] * 5})
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"
    r = rerank.post("/embed", json={"inputs": "x"})
    assert r.status_code == 424 and r.json()["error_type"] == "Backend"
    # a re-ranker also answers /predict, with its single label
    assert rerank.post("/predict", json={"inputs": ["q", "t"]}).json()[0]["label"] == "LABEL_0"


def test_predict_single_pair_and_batch(classify: httpx.Client) -> None:
    preds = classify.post("/predict", json={"inputs": "I love it"}).json()
    assert {p["label"] for p in preds} == {"POSITIVE", "NEGATIVE"}
    assert preds[0]["score"] >= preds[1]["score"]
    assert abs(sum(p["score"] for p in preds) - 1) < 1e-5
    batch = classify.post("/predict", json={"inputs": [["I love it"], ["a", "b"]]}).json()
    assert len(batch) == 2 and all(len(b) == 2 for b in batch)
    assert batch[0] == preds  # deterministic
    r = classify.post("/rerank", json={"query": "q", "texts": ["t"]})
    assert r.status_code == 424


def test_info_per_model_type(
    embed: httpx.Client, rerank: httpx.Client, classify: httpx.Client
) -> None:
    info = embed.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "cls"}}
    assert info["model_id"] == MODEL and info["version"] == "1.9.3"
    assert info["max_client_batch_size"] == 4 and info["auto_truncate"] is True
    assert "reranker" in rerank.get("/info").json()["model_type"]
    labels = classify.get("/info").json()["model_type"]["classifier"]["id2label"]
    assert labels == {"0": "NEGATIVE", "1": "POSITIVE"}
    assert embed.get("/health").status_code == 200
    text = embed.get("/metrics").text
    assert 'te_request_count{method="single"}' in text and "te_queue_size 0" in text
    assert "te_request_duration_count" in text


def test_overload_injection_and_records(embed: httpx.Client) -> None:
    r = embed.post("/embed", json={"inputs": "x"}, headers={"x-sim-error": "429"})
    assert r.status_code == 429
    assert r.json() == {"error": "Model is overloaded", "error_type": "Overloaded"}
    r = embed.post("/v1/embeddings", json={"input": "x"}, headers={"x-sim-error": "424"})
    assert r.status_code == 424 and r.json()["type"] == "Backend"
    r = embed.post("/embed", json={"inputs": "x"}, headers={"x-sim-error-after": "0"})
    assert r.status_code == 424
    embed.delete("/sim/requests")
    embed.post("/embed", json={"inputs": "hello", "normalize": True})
    (rec,) = embed.get("/sim/requests").json()
    assert rec["path"] == "/embed" and rec["body"] == {"inputs": "hello", "normalize": True}


def test_overloaded_when_permits_run_out() -> None:
    for client in _serve(max_concurrent_requests=1):
        slow = threading.Thread(
            target=client.post,
            args=("/embed",),
            kwargs={"json": {"inputs": "x"}, "headers": {"x-sim-ttft-ms": "500"}},
        )
        slow.start()
        deadline = time.monotonic() + 3
        while client.get("/sim/config").json()["running"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = client.post("/embed", json={"inputs": "y"})
        assert r.status_code == 429 and r.json()["error_type"] == "Overloaded"
        slow.join()


def test_old_validation_status_and_auth() -> None:
    for client in _serve(validation_status=413, api_key="secret"):
        r = client.post("/embed", json={"inputs": ["a"] * 5})
        assert r.status_code == 401 and r.content == b""
        assert client.get("/health").status_code == 200  # health stays open
        auth = {"authorization": "Bearer secret"}
        r = client.post("/embed", json={"inputs": ["a"] * 5}, headers=auth)
        assert r.status_code == 413 and r.json()["error_type"] == "Validation"


def test_cli_model_type_flag() -> None:
    args = ["--model", "rr", "--model-type", "reranker", "--ttft-ms", "0", "--itl-ms", "0"]
    args += ["--output-tokens", "1", "--max-running", "2", "--max-queue", "2"]
    with SimulatorProcess(args, kind="tei") as sim, httpx.Client(base_url=sim.url) as c:
        assert "reranker" in c.get("/info").json()["model_type"]
        r = c.post("/rerank", json={"query": "a", "texts": ["a", "b"]})
        assert r.status_code == 200 and r.json()[0]["index"] == 0
