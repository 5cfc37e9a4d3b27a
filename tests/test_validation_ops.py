"""Validation of the rerank and classify operations' request bodies."""

from __future__ import annotations

from typing import Any

import pytest

from extproc import validation
from extproc.errors import GatewayError


def rejected(check: Any, body: dict[str, Any]) -> GatewayError:
    with pytest.raises(GatewayError) as exc:
        check(body)
    assert (exc.value.status, exc.value.code) == (400, "invalid_request_error")
    assert exc.value.message
    return exc.value


@pytest.mark.parametrize(
    "body",
    [
        {"query": "q", "documents": ["a"]},
        {"query": "q", "documents": ["a", {"text": "b"}], "top_n": 1, "return_documents": True},
        {"query": "q", "documents": [{"text": "", "title": "t"}], "top_n": None, "stream": False},
    ],
)
def test_rerank_accepts(body: dict[str, Any]) -> None:
    assert validation.rerank({"model": "r", **body}) is False


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"documents": ["a"]}, "query"),
        ({"query": "", "documents": ["a"]}, "query"),
        ({"query": 3, "documents": ["a"]}, "query"),
        ({"query": "q"}, "documents"),
        ({"query": "q", "documents": []}, "documents"),
        ({"query": "q", "documents": "a"}, "documents"),
        ({"query": "q", "documents": ["a", 3]}, "documents[1]"),
        ({"query": "q", "documents": [{"title": "no text"}]}, "documents[0]"),
        ({"query": "q", "documents": [{"text": 1}]}, "documents[0]"),
        ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
        ({"query": "q", "documents": ["a"], "top_n": "2"}, "top_n"),
        ({"query": "q", "documents": ["a"], "top_n": True}, "top_n"),
        ({"query": "q", "documents": ["a"], "return_documents": "yes"}, "return_documents"),
        ({"query": "q", "documents": ["a"], "stream": True}, "stream"),
    ],
)
def test_rerank_rejects(body: dict[str, Any], param: str) -> None:
    assert rejected(validation.rerank, {"model": "r", **body}).param == param


@pytest.mark.parametrize("value", ["great", ["good", "bad"], [""]])
def test_classify_accepts(value: Any) -> None:
    assert validation.classify({"model": "c", "input": value}) is False


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": 5}, "input"),
        ({"input": {"text": "x"}}, "input"),
        ({"input": ["ok", 1]}, "input[1]"),
        ({"input": [[1, 2]]}, "input[0]"),
        ({"input": "x", "stream": True}, "stream"),
    ],
)
def test_classify_rejects(body: dict[str, Any], param: str) -> None:
    assert rejected(validation.classify, {"model": "c", **body}).param == param
