"""OpenAI-style ``embeddings``, ``rerank`` and ``classify`` -> TEI's native routes, and back.

TEI (text-embeddings-inference, ``shared/reference/backends.md`` §3, §6.2, §6.3) serves one model
per server, on its own routes and shapes:

``embeddings`` -> ``POST /embed``
    ``{"input", "dimensions"?, "encoding_format"?, "user"?}`` -> ``{"inputs", "normalize": true,
    "dimensions"?}``. TEI answers a bare 2-D array (one row per input, even for one string); it
    becomes ``{"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
    "model", "usage"}``. ``encoding_format: "base64"`` is done here (TEI's native route has no
    such option): little-endian float32 bytes, base64-encoded, as OpenAI does. The float answer
    is spliced from TEI's bytes without parsing the numbers (serde's compact ``[[..],[..]]``),
    with a parse-and-dump fallback for any other spacing.

``rerank`` -> ``POST /rerank``
    Cohere/Jina style ``{"query", "documents": [str | {"text"}], "top_n"?, "return_documents"?}``
    -> ``{"query", "texts", "return_text": false}``; TEI's ``[{"index", "score"}]`` ->
    ``{"id": "rerank-<request id>", "model", "results": [{"index", "relevance_score",
    "document"?: {"text"}}], "usage"}``, best first, cut to ``top_n``. Documents are attached from
    the request (``return_documents``, default false as in Cohere's v2 API) rather than asked
    back from TEI.

``classify`` -> ``POST /predict``
    ``{"input": str | [str]}`` -> ``{"inputs": str}`` or, for a list, ``{"inputs": [[s], ...]}``
    (TEI reads a flat ``[a, b]`` as one *pair* of texts, so a batch must be a list of one-element
    lists); TEI's ``[{"score", "label"}]`` (or a list of those per input) ->
    ``{"id": "classify-<request id>", "object": "list", "model", "data": [{"index", "label",
    "score", "labels": [{"label", "score"}, ...]}], "usage"}``, labels best first.

Usage (prompt tokens; TEI has no completion tokens) comes from the ``x-compute-tokens`` response
header. Other request fields TEI cannot use are removed and listed in :attr:`Tei.dropped`.
Errors: TEI's native ``{"error", "error_type"}`` (PascalCase types), the flat
``{"message", "code", "type"}`` of its ``/v1/embeddings``, axum's plain-text rejections and the
empty 401 all go through :func:`~.errors_map.normalize_error`.
"""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Any

import orjson

from ..config import Model
from ..errors import GatewayError, invalid
from .errors_map import client_status, normalize_error
from .tgi_native import int_header, malformed

PATHS = {"embeddings": "/embed", "rerank": "/rerank", "classify": "/predict"}
_INPUT_PARAM = {"embeddings": "input", "rerank": "documents", "classify": "input"}
_BIG_ENDIAN = sys.byteorder == "big"


def embedding_base64(row: list[float]) -> str:
    """OpenAI's base64 encoding of one embedding: little-endian float32 bytes."""
    values = array("f", row)
    if _BIG_ENDIAN:
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")


class Tei:
    """One request's translation; see the module docstring."""

    content_type: str | None = None  # the backend's content type is kept (always JSON or SSE)

    __slots__ = (
        "_base64",
        "_batch",
        "_buf",
        "_counted",
        "_model",
        "_op",
        "_prompt_tokens",
        "_return_documents",
        "_rid",
        "_texts",
        "_top_n",
        "dropped",
        "usage",
    )
    rewrites_stream = False  # no streams

    def stream_recipe(self) -> dict[str, Any] | None:
        return None

    def __init__(self, model: Model, request_id: str, created: int | None = None) -> None:
        self._model = model
        self._rid = request_id
        self.dropped: list[str] = []
        self.usage: dict[str, int] | None = None
        self._op = ""
        self._base64 = False
        self._batch = False
        self._texts: list[str] = []
        self._top_n: int | None = None
        self._return_documents = False
        self._prompt_tokens = 0
        self._counted = False
        self._buf = b""

    # ------------------------------------------------------------------ request
    def backend_path(self, op: str, path: str) -> str | None:
        return PATHS.get(op)

    def request(self, op: str, body: dict[str, Any], stream: bool) -> bool:
        if op not in PATHS:
            raise invalid(f"This model's backend cannot serve '{op}'.", "model")
        self._op = op
        # max_tokens: the processor may set it on every non-embeddings operation
        consumed = {"model", "stream", "stream_options", "max_tokens", "max_completion_tokens"}
        new: dict[str, Any]
        if op == "embeddings":
            consumed.update(("input", "encoding_format", "dimensions"))
            self._base64 = body.get("encoding_format") == "base64"
            new = {"inputs": body["input"], "normalize": True}
            if body.get("dimensions") is not None:
                new["dimensions"] = body["dimensions"]
        elif op == "rerank":
            consumed.update(("query", "documents", "top_n", "return_documents"))
            self._texts = [d if isinstance(d, str) else d["text"] for d in body["documents"]]
            self._top_n = body.get("top_n")
            self._return_documents = bool(body.get("return_documents"))
            new = {"query": body["query"], "texts": self._texts, "return_text": False}
        else:
            consumed.add("input")
            value = body["input"]
            self._batch = isinstance(value, list)
            new = {"inputs": [[s] for s in value] if self._batch else value}
        self.dropped = [k for k, v in body.items() if k not in consumed and v]
        body.clear()
        body.update(new)
        return True

    # ----------------------------------------------------------------- response
    def response_headers(self, status: int, headers: dict[str, str]) -> None:
        tokens = int_header(headers.get("x-compute-tokens"))
        self._counted = tokens is not None  # else unknown: charged the reservation
        self._prompt_tokens = tokens or 0

    def response_status(self, status: int) -> int | None:
        return client_status(status)

    def wants_response_body(self, status: int, content_type: str) -> bool:
        return True

    def response_body(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        self._buf += chunk
        if not end_of_stream:
            return b""
        raw, self._buf = self._buf, b""
        tokens = self._prompt_tokens
        self.usage = {"prompt_tokens": tokens, "completion_tokens": 0} if self._counted else None
        try:
            if self._op == "embeddings":
                return self._embeddings(raw)
            data = orjson.loads(raw)
            if self._op == "rerank":
                return self._rerank(data)
            return self._classify(data)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise malformed() from None

    def error(self, status: int, body: bytes) -> GatewayError:
        return normalize_error(status, body, _INPUT_PARAM.get(self._op, "input"))

    # ----------------------------------------------------------------- bodies
    def _usage_bytes(self) -> bytes:
        n = str(self._prompt_tokens).encode()
        return b'{"prompt_tokens":' + n + b',"total_tokens":' + n + b"}"

    def _embeddings(self, raw: bytes) -> bytes:
        head = b'{"object":"list","data":['
        tail = (
            b'],"model":' + orjson.dumps(self._model.id) + b',"usage":' + self._usage_bytes() + b"}"
        )
        if (
            not self._base64
            and raw[:2] == b"[["
            and raw[-2:] == b"]]"
            and b" " not in raw
            and b"\n" not in raw
        ):
            rows = raw[2:-2].split(b"],[")  # a number never contains "],["
            items = [
                b'{"object":"embedding","index":%d,"embedding":[%b]}' % (i, row)
                for i, row in enumerate(rows)
            ]
            return head + b",".join(items) + tail
        if raw.strip() == b"[]":
            return head + tail
        data = orjson.loads(raw)
        if not isinstance(data, list) or not all(isinstance(row, list) for row in data):
            raise ValueError("not a 2-D array")
        encode = embedding_base64 if self._base64 else None
        items = [
            orjson.dumps(
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": encode(row) if encode else row,
                }
            )
            for i, row in enumerate(data)
        ]
        return head + b",".join(items) + tail

    def _rerank(self, data: Any) -> bytes:
        ranked = sorted(data, key=lambda r: r["score"], reverse=True)
        if self._top_n is not None:
            ranked = ranked[: self._top_n]
        results = []
        for r in ranked:
            index = r["index"]
            result: dict[str, Any] = {"index": index, "relevance_score": r["score"]}
            if self._return_documents:
                text = r.get("text")
                if not isinstance(text, str) and 0 <= index < len(self._texts):
                    text = self._texts[index]
                result["document"] = {"text": text}
            results.append(result)
        return orjson.dumps(
            {
                "id": "rerank-" + self._rid,
                "model": self._model.id,
                "results": results,
                "usage": {
                    "prompt_tokens": self._prompt_tokens,
                    "total_tokens": self._prompt_tokens,
                },
            }
        )

    def _classify(self, data: Any) -> bytes:
        if not isinstance(data, list):
            raise ValueError("not a list")
        rows = data if data and isinstance(data[0], list) else [data]
        out = []
        for i, row in enumerate(rows):
            labels = sorted(
                ({"label": p["label"], "score": p["score"]} for p in row),
                key=lambda p: p["score"],
                reverse=True,
            )
            best = labels[0] if labels else {"label": None, "score": None}
            out.append(
                {"index": i, "label": best["label"], "score": best["score"], "labels": labels}
            )
        return orjson.dumps(
            {
                "id": "classify-" + self._rid,
                "object": "list",
                "model": self._model.id,
                "data": out,
                "usage": {
                    "prompt_tokens": self._prompt_tokens,
                    "total_tokens": self._prompt_tokens,
                },
            }
        )
