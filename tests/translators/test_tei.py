"""Golden tests for OpenAI-style embeddings / rerank / classify <-> TEI's native routes."""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson
import pytest
from openai._models import construct_type
from openai._types import omit
from openai.lib._parsing._embeddings import parse_embedding_response
from openai.types import CreateEmbeddingResponse

from extproc.config import Model
from extproc.errors import GatewayError
from extproc.translators.tei import Tei, embedding_base64

EMBED = Model(id="bge", backend="tei", backend_model="BAAI/bge-small-en-v1.5", kind="embedding")
RERANK = Model(id="reranker", backend="tei", backend_model="BAAI/bge-reranker-base", kind="rerank")
CLASSIFY = Model(id="sentiment", backend="tei", backend_model="x/sst2", kind="classify")


def run(
    model: Model, op: str, body: dict[str, Any], answer: bytes, tokens: str = "9"
) -> tuple[Tei, dict[str, Any], Any]:
    t = Tei(model, "req1")
    assert t.request(op, body, False) is True
    t.response_headers(200, {"x-compute-tokens": tokens, "content-type": "application/json"})
    assert t.response_status(200) is None
    assert t.wants_response_body(200, "application/json")
    out = orjson.loads(t.response_body(answer, True) or b"")
    return t, body, out


# ------------------------------------------------------------------------------ embeddings

ROWS = [[0.015625, -0.25, 0.1], [1e-05, 0.5, -1.0]]


def test_embeddings_float() -> None:
    t, body, out = run(
        EMBED,
        "embeddings",
        {
            "model": "bge",
            "input": ["a", "b"],
            "dimensions": 3,
            "user": "u",
            "encoding_format": "float",
        },
        orjson.dumps(ROWS),
    )
    assert body == {"inputs": ["a", "b"], "normalize": True, "dimensions": 3}
    assert t.backend_path("embeddings", "/v1/embeddings") == "/embed"
    assert t.dropped == ["user"]
    assert out == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": ROWS[0]},
            {"object": "embedding", "index": 1, "embedding": ROWS[1]},
        ],
        "model": "bge",
        "usage": {"prompt_tokens": 9, "total_tokens": 9},
    }
    CreateEmbeddingResponse.model_validate(out)
    assert t.usage == {"prompt_tokens": 9, "completion_tokens": 0}


def test_embeddings_spaced_json_takes_the_parsing_path() -> None:
    _, _, out = run(EMBED, "embeddings", {"model": "bge", "input": "a"}, b"[ [0.5, -0.25] ]\n")
    assert out["data"] == [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}]
    _, _, out = run(EMBED, "embeddings", {"model": "bge", "input": "a"}, b"[]")
    assert out["data"] == []


def test_embeddings_base64_decodes_to_the_same_floats() -> None:
    _, _, out = run(
        EMBED,
        "embeddings",
        {"model": "bge", "input": ["a", "b"], "encoding_format": "base64"},
        orjson.dumps(ROWS),
    )
    for row, item in zip(ROWS, out["data"], strict=True):
        raw = base64.b64decode(item["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert decoded == pytest.approx(row, rel=1e-6)  # float32 precision, like OpenAI
    assert embedding_base64([1.0]) == base64.b64encode(b"\x00\x00\x80\x3f").decode()
    # the OpenAI SDK asks for base64 by default and decodes it itself: same numbers
    sdk = parse_embedding_response(
        construct_type(type_=CreateEmbeddingResponse, value=out), encoding_format=omit
    )
    for row, item in zip(ROWS, sdk.data, strict=True):
        assert item.embedding == pytest.approx(row, rel=1e-6)


# ---------------------------------------------------------------------------------- rerank

TEI_RERANK = orjson.dumps(
    [{"index": 2, "score": 0.9}, {"index": 0, "score": 0.4}, {"index": 1, "score": 0.01}]
)


def test_rerank_top_n_and_documents() -> None:
    t, body, out = run(
        RERANK,
        "rerank",
        {
            "model": "reranker",
            "query": "capital of France",
            "documents": ["Berlin", {"text": "Madrid"}, "Paris"],
            "top_n": 2,
            "return_documents": True,
            "rank_fields": ["text"],
            "max_tokens": 4096,  # set by the processor; not "dropped"
        },
        TEI_RERANK,
        "21",
    )
    assert body == {
        "query": "capital of France",
        "texts": ["Berlin", "Madrid", "Paris"],
        "return_text": False,
    }
    assert t.backend_path("rerank", "/v1/rerank") == "/rerank"
    assert t.dropped == ["rank_fields"]
    assert out == {
        "id": "rerank-req1",
        "model": "reranker",
        "results": [
            {"index": 2, "relevance_score": 0.9, "document": {"text": "Paris"}},
            {"index": 0, "relevance_score": 0.4, "document": {"text": "Berlin"}},
        ],
        "usage": {"prompt_tokens": 21, "total_tokens": 21},
    }


def test_rerank_unsorted_answer_without_documents() -> None:
    _, _, out = run(
        RERANK,
        "rerank",
        {"model": "reranker", "query": "q", "documents": ["a", "b"]},
        b'[{"index":0,"score":0.1},{"index":1,"score":0.7,"text":"b"}]',
    )
    assert out["results"] == [
        {"index": 1, "relevance_score": 0.7},
        {"index": 0, "relevance_score": 0.1},
    ]


# -------------------------------------------------------------------------------- classify


def test_classify_single() -> None:
    t, body, out = run(
        CLASSIFY,
        "classify",
        {"model": "sentiment", "input": "great movie"},
        b'[{"score":0.97,"label":"POSITIVE"},{"score":0.03,"label":"NEGATIVE"}]',
        "4",
    )
    assert body == {"inputs": "great movie"}
    assert t.backend_path("classify", "/v1/classify") == "/predict"
    assert out == {
        "id": "classify-req1",
        "object": "list",
        "model": "sentiment",
        "data": [
            {
                "index": 0,
                "label": "POSITIVE",
                "score": 0.97,
                "labels": [
                    {"label": "POSITIVE", "score": 0.97},
                    {"label": "NEGATIVE", "score": 0.03},
                ],
            }
        ],
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }


def test_classify_batch_is_sent_as_one_element_lists() -> None:
    _, body, out = run(
        CLASSIFY,
        "classify",
        {"model": "sentiment", "input": ["good", "bad"]},
        b'[[{"score":0.9,"label":"POSITIVE"},{"score":0.1,"label":"NEGATIVE"}],'
        b'[{"score":0.2,"label":"POSITIVE"},{"score":0.8,"label":"NEGATIVE"}]]',
    )
    assert body == {"inputs": [["good"], ["bad"]]}  # a flat pair would be ONE text pair
    assert [(d["index"], d["label"], d["score"]) for d in out["data"]] == [
        (0, "POSITIVE", 0.9),
        (1, "NEGATIVE", 0.8),
    ]
    assert out["data"][1]["labels"] == [
        {"label": "NEGATIVE", "score": 0.8},
        {"label": "POSITIVE", "score": 0.2},
    ]


def test_malformed_answer_and_unknown_op() -> None:
    with pytest.raises(GatewayError) as exc:  # the processor answers it 502, voided
        run(CLASSIFY, "classify", {"model": "s", "input": "x"}, b"{}")
    assert exc.value.code == "backend_unavailable" and exc.value.status == 502
    with pytest.raises(GatewayError) as exc:
        Tei(EMBED, "r").request("chat", {"model": "bge", "messages": []}, False)
    assert exc.value.status == 400


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("op", "status", "body", "client_status", "code", "param"),
    [
        (
            "embeddings",
            400,
            b'{"error":"Input validation error: `inputs` cannot be empty","error_type":"Empty"}',
            400,
            "invalid_request_error",
            "input",
        ),
        (
            "embeddings",
            413,  # before TEI's Feb 2026 fix, Validation errors were 413
            b'{"error":"Input validation error: `inputs` must have less than 512 tokens.'
            b' Given: 530","error_type":"Validation"}',
            400,
            "context_length_exceeded",
            "input",
        ),
        (
            "embeddings",
            422,
            b'{"error":"Input validation error: batch size 64 > maximum allowed batch size 32",'
            b'"error_type":"Validation"}',
            400,
            "invalid_request_error",
            None,
        ),
        (
            "embeddings",
            422,  # the flat body of TEI's /v1/embeddings
            b'{"message":"Input validation error: `inputs` must have less than 512 tokens.'
            b' Given: 530","code":422,"type":"Validation"}',
            400,
            "context_length_exceeded",
            "input",
        ),
        (
            "embeddings",
            422,
            b'{"error":"tokenizer error: bad input","error_type":"Tokenizer"}',
            400,
            "invalid_request_error",
            None,
        ),
        (
            "rerank",
            424,
            b'{"error":"Backend error: model is not a re-ranker model","error_type":"Backend"}',
            400,
            "invalid_request_error",
            None,
        ),
        (
            "rerank",
            400,
            b'{"error":"Input validation error: `texts` cannot be empty","error_type":"Empty"}',
            400,
            "invalid_request_error",
            "documents",
        ),
        (
            "classify",
            424,
            b'{"error":"Backend error: CUDA error","error_type":"Backend"}',
            502,
            "backend_unavailable",
            None,
        ),
        (
            "embeddings",
            429,
            b'{"error":"Model is overloaded","error_type":"Overloaded"}',
            503,
            "backend_unavailable",
            None,
        ),
        (
            "embeddings",
            503,
            b'{"error":"unhealthy","error_type":"Unhealthy"}',
            503,
            "backend_unavailable",
            None,
        ),
        ("embeddings", 401, b"", 502, "backend_unavailable", None),
        (
            "embeddings",
            413,
            b"Failed to buffer the request body: length limit exceeded",
            413,
            "request_too_large",
            None,
        ),
        (
            "embeddings",
            415,
            b"Expected request with `Content-Type: application/json`",
            400,
            "invalid_request_error",
            None,
        ),
    ],
)
def test_errors(
    op: str, status: int, body: bytes, client_status: int, code: str, param: str | None
) -> None:
    t = Tei(EMBED, "r")
    request: dict[str, Any] = {
        "embeddings": {"model": "bge", "input": "x"},
        "rerank": {"model": "bge", "query": "q", "documents": ["a"]},
        "classify": {"model": "bge", "input": "x"},
    }[op]
    t.request(op, request, False)
    err = t.error(status, body)
    assert (err.status, err.code, err.param) == (client_status, code, param)
    assert err.message


def test_without_x_compute_tokens_the_usage_is_unknown() -> None:
    """TEI names its tokens only in x-compute-tokens: without it the request is charged its
    reservation (usage_unknown), not 0 tokens (found by an audit)."""
    t = Tei(EMBED, "req1")
    assert t.request("embeddings", {"model": "bge", "input": "hello"}, False) is True
    t.response_headers(200, {"content-type": "application/json"})
    t.response_body(b"[[0.1,0.2]]", True)
    assert t.usage is None
    _, _, _ = run(EMBED, "embeddings", {"model": "bge", "input": "hello"}, b"[[0.1,0.2]]")
