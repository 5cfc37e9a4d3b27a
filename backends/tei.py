"""The TEI personality: a simulator of HuggingFace text-embeddings-inference 1.9.

Modelled on TEI ``1.9.3`` (``router/src/http/server.rs``, ``router/src/http/types.rs``,
``router/src/lib.rs``, ``core/src``; see ``shared/reference/backends.md`` section 3). One
server serves one model whose kind is ``--model-type``: ``embedding`` (default),
``reranker`` or ``classifier``. What it reproduces:

* ``POST /embed``: ``inputs`` as a string, a list of strings, a token-id list or a list of
  token-id lists (a list of ids is *one* input, as TEI's untagged enums decide);
  ``normalize`` (default true), ``truncate`` (default ``--auto-truncate``, on),
  ``truncation_direction``, ``prompt_name`` (accepted), ``dimensions`` (Matryoshka
  truncation; 0 or more than the model's size is an error). The answer is always a 2-D
  array of floats, one row per input, even for a single string;
* ``POST /rerank`` (``query`` x ``texts``; results sorted by score descending, each
  ``{"index", "score"}`` plus ``text`` with ``return_text``; ``raw_scores`` gives logits
  instead of sigmoid scores; texts sharing words with the query score higher), and
  ``POST /predict`` (a string, a ``[a, b]`` pair, or a batch of those; each answer a list of
  ``{"score", "label"}`` sorted descending, labels from ``--labels``);
* ``POST /v1/embeddings`` (and ``/embeddings``): the OpenAI route, ``encoding_format``
  float/base64, ``dimensions``, ``model`` only echoed back as ``--model``, the server's
  auto-truncate, always normalized; its errors are *flat* ``{"message", "code", "type"}``;
* the native error body ``{"error", "error_type"}`` with PascalCase ``error_type`` and
  TEI's statuses: ``Empty`` 400 (an empty batch or an empty input), ``Validation`` 422
  (``--validation-status 413`` for releases before Feb 2026: too many tokens with
  truncation off, batch larger than ``--max-client-batch-size``), ``Backend`` 424 (e.g.
  the wrong endpoint for the model type: "model is not a re-ranker model"),
  ``Overloaded`` 429 (more single requests in flight than ``--max-concurrent-requests``;
  batch requests wait for a permit like TEI's), ``Unhealthy`` 503 on ``/health``;
* axum's plain-text rejections (415 content type, 400 bad JSON, 422 wrong types / missing
  fields, 413 over ``--payload-limit``);
* ``GET /info`` (``model_type`` as ``{"embedding": {"pooling": "cls"}}``,
  ``{"reranker": {"id2label", "label2id"}}`` or ``{"classifier": {...}}``, limits,
  ``version``), ``GET /health`` (also ``/``, ``/ping``), ``GET /metrics`` (``te_*``), the
  ``x-compute-type``, ``x-compute-time``, ``x-compute-characters``, ``x-compute-tokens``,
  ``x-total-time``, ``x-tokenization-time``, ``x-queue-time``, ``x-inference-time``
  headers, and ``--api-key`` (401 with an empty body on everything but health/metrics).

Embeddings are :func:`backends.textgen.embedding` vectors (deterministic, unit length);
token counts are word counts (TEI would add the model's special tokens).

Knobs (request headers): ``x-sim-ttft-ms`` (inference time of a request),
``x-sim-error: <status>`` (400 Empty, 413/422 Validation, 424 Backend, 429 Overloaded,
503 Unhealthy, 401 empty), ``x-sim-error-after: <n>`` (fail with 424 Backend after the
inference time). ``/sim/requests`` and ``/sim/config`` as in every personality.

Deliberately not reproduced: ``/embed_all``, ``/embed_sparse``, ``/similarity``,
``/decode``, the gRPC and cloud adapters, the character limit that applies even with
truncation, prompt templates (``prompt_name`` is accepted and ignored), real batching.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from backends import textgen
from backends.common import (
    BadKnob,
    Knobs,
    RustMetrics,
    SerdeError,
    SimControl,
    add_common_arguments,
    axum_json,
    bearer_ok,
    common_config,
    deserialize_error,
    forced_status,
    json_or_text,
    payload_too_large,
    plain_text,
    read_knobs,
    serde_check,
    serde_custom,
    serde_missing,
)
from backends.http import App, Header, Request, Response

__all__ = ["KIND", "TEI_VERSION", "TeiConfig", "TeiSimulator", "add_arguments", "build_app"]

KIND = "tei"
TEI_VERSION = "1.9.3"
DEFAULT_MODEL = "BAAI/bge-small-en-v1.5"
MODEL_TYPES = ("embedding", "reranker", "classifier")


@dataclass
class TeiConfig:
    """Settings of one simulated TEI server (each is also a CLI flag)."""

    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    model_type: str = "embedding"
    embedding_dim: int = 384
    labels: list[str] = field(default_factory=lambda: ["NEGATIVE", "POSITIVE"])
    pooling: str = "cls"
    max_input_length: int = 512
    max_batch_tokens: int = 16384
    max_client_batch_size: int = 32
    max_concurrent_requests: int = 512
    auto_truncate: bool = True
    validation_status: int = 422
    payload_limit: int = 2_000_000
    api_key: str | None = None
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    output_tokens: int = 16
    max_running: int = 256
    max_queue: int = 256
    keep_alive_timeout: float = 5.0
    version: str = TEI_VERSION
    compute_type: str = "gpu+optimized"
    pod_name: str | None = None
    history: int = 200


class TeiError(Exception):
    """A native TEI error: ``status`` and ``{"error", "error_type"}``."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type

    def response(self, openai: bool = False) -> Response:
        if openai:  # OpenAICompatErrorResponse: flat
            body = {"message": self.message, "code": self.status, "type": self.error_type}
        else:
            body = {"error": self.message, "error_type": self.error_type}
        return Response(self.status, orjson.dumps(body))


def empty(what: str = "inputs") -> TeiError:
    return TeiError(400, f"`{what}` cannot be empty", "Empty")


def backend(message: str) -> TeiError:
    return TeiError(424, f"Backend error: {message}", "Backend")


def overloaded() -> TeiError:
    return TeiError(429, "Model is overloaded", "Overloaded")


class _Item:
    """One input: its seed, token count and character count (after truncation)."""

    __slots__ = ("chars", "seed", "text", "tokens")

    def __init__(self, seed: bytes, tokens: int, chars: int, text: str) -> None:
        self.seed = seed
        self.tokens = tokens
        self.chars = chars
        self.text = text


EMBED_SCHEMA: dict[str, tuple[str, bool]] = {
    "normalize": ("bool", False),
    "truncate": ("bool", True),
    "truncation_direction": ("str", False),
    "prompt_name": ("str", True),
    "dimensions": ("usize", True),
}
OPENAI_SCHEMA: dict[str, tuple[str, bool]] = {
    "model": ("str", True),
    "user": ("str", True),
    "encoding_format": ("str", False),
    "dimensions": ("usize", True),
}
RERANK_SCHEMA: dict[str, tuple[str, bool]] = {
    "query": ("str", False),
    "texts": ("vec_str", False),
    "truncate": ("bool", True),
    "truncation_direction": ("str", False),
    "raw_scores": ("bool", False),
    "return_text": ("bool", False),
}
PREDICT_SCHEMA: dict[str, tuple[str, bool]] = {
    "truncate": ("bool", True),
    "truncation_direction": ("str", False),
    "raw_scores": ("bool", False),
}
_DIRECTIONS = ("Left", "Right", "left", "right")


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _jitter(seed: bytes) -> float:
    """A deterministic value in [-0.5, 0.5) from a seed."""
    return seed[0] / 256.0 - 0.5


LATENCY_BUCKETS = tuple(0.0001 * 1.5 ** (i + 1) for i in range(35))


class TeiSimulator(SimControl):
    """State and handlers of one simulated TEI server; ``self.app`` is what to serve."""

    config: TeiConfig

    def __init__(self, config: TeiConfig | None = None) -> None:
        config = config or TeiConfig()
        if not config.models:
            config.models = [DEFAULT_MODEL]
        if config.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}")
        super().__init__(config)
        self.model_id = config.models[0]
        self.inflight = 0
        self.metrics = RustMetrics()
        self.metrics.declare_counter("te_request_count", method="single")
        self.metrics.declare_counter("te_request_success", method="single")
        for name in (
            "te_request_duration",
            "te_request_tokenization_duration",
            "te_request_queue_duration",
            "te_request_inference_duration",
        ):
            self.metrics.declare_histogram(name, LATENCY_BUCKETS)
        self.metrics.declare_histogram(
            "te_request_input_length",
            tuple(config.max_input_length / 20 * (i + 1) for i in range(20)),
        )
        headers: list[Header] = []
        if config.pod_name:
            headers.append(("x-inference-pod", config.pod_name))
        self.app = App(
            server_header=None,
            keep_alive_timeout=config.keep_alive_timeout,
            default_headers=headers,
        )
        route = self.app.route
        route("POST", "/embed", self.embed)
        route("POST", "/rerank", self.rerank)
        route("POST", "/predict", self.predict)
        route("POST", "/v1/embeddings", self.openai_embed)
        route("POST", "/embeddings", self.openai_embed)
        route("POST", "/tokenize", self.tokenize)
        route("GET", "/info", self.info)
        route("GET", "/health", self.health)
        route("GET", "/", self.health)
        route("GET", "/ping", self.health)
        route("GET", "/metrics", self.prometheus)
        self.add_control_routes(self.app)
        self.app.fallback = self.unknown_route

    # -- plumbing ----------------------------------------------------------------------

    def _validation(self, message: str) -> TeiError:
        return TeiError(self.config.validation_status, message, "Validation")

    def _begin(
        self, req: Request, schema: dict[str, tuple[str, bool]]
    ) -> dict[str, Any] | Response:
        self._record(req, json_or_text(req.body))
        if not bearer_ok(req.headers, self.config.api_key):
            return Response(401, b"", content_type=None)
        if len(req.body) > self.config.payload_limit:
            return payload_too_large()
        body = axum_json(req)
        if isinstance(body, Response):
            return body
        try:
            serde_check(req.body, body, schema)
            direction = body.get("truncation_direction")
            if direction is not None and direction not in _DIRECTIONS:
                raise serde_custom(
                    req.body,
                    ("truncation_direction",),
                    direction,
                    f"unknown variant `{direction}`, expected one of `Left`, `Right`, "
                    "`left`, `right`",
                )
        except SerdeError as exc:
            return deserialize_error(exc)
        return body

    def _prelude(self, req: Request) -> Knobs | TeiError | Response:
        """Knobs, or the error ``x-sim-error`` / ``/sim/config`` asks for."""
        try:
            knobs = read_knobs(req.headers, self.config)
        except BadKnob as exc:
            return TeiError(400, str(exc), "Validation")
        status = forced_status(req.headers)
        if isinstance(status, str):
            return TeiError(400, f"invalid x-sim-error header: {status!r}", "Validation")
        if status is None:
            status = self._configured_error()
        if status is None:
            return knobs
        return self._injected(status)

    def _injected(self, status: int) -> TeiError | Response:
        m = self.config.max_input_length
        if status == 401:
            return Response(401, b"", content_type=None)
        if status == 400:
            return empty()
        if status in (413, 422):
            return TeiError(
                status, f"`inputs` must have less than {m} tokens. Given: {m + 88}", "Validation"
            )
        if status == 424:
            return backend("simulated failure (x-sim-error)")
        if status == 429:
            return overloaded()
        if status == 503:
            return TeiError(503, "unhealthy", "Unhealthy")
        return TeiError(status, f"simulated error {status}", "Backend")

    def _item(self, value: str | list[int], truncate: bool) -> _Item:
        limit = self.config.max_input_length
        if isinstance(value, str):
            words = value.split()
            if not value:
                raise empty()
            if len(words) > limit:
                if not truncate:
                    raise self._validation(
                        f"`inputs` must have less than {limit} tokens. Given: {len(words)}"
                    )
                words = words[:limit]
                value = " ".join(words)
            return _Item(textgen.prompt_seed(value), len(words), len(value), value)
        if not value:
            raise empty()
        if len(value) > limit:
            if not truncate:
                raise self._validation(
                    f"`inputs` must have less than {limit} tokens. Given: {len(value)}"
                )
            value = value[:limit]
        return _Item(textgen.token_ids_seed(value), len(value), len(value), "")

    def _inputs(
        self, raw: bytes, body: dict[str, Any], key: str, truncate: bool
    ) -> tuple[list[_Item], bool]:
        """``Input`` (untagged): one string / id list, or a batch. -> (items, is_batch)."""
        if key not in body:
            raise serde_missing(raw, key)
        value = body[key]
        if isinstance(value, str):
            return [self._item(value, truncate)], False
        if _is_ids(value) and value:
            return [self._item(value, truncate)], False
        if isinstance(value, list) and all(isinstance(v, str) or _is_ids(v) for v in value):
            self._check_batch(len(value))
            return [self._item(v, truncate) for v in value], True
        raise serde_custom(
            raw, (key,), value, "data did not match any variant of untagged enum Input"
        )

    def _check_batch(self, size: int) -> None:
        if size == 0:
            self.metrics.inc("te_request_failure", err="validation")
            raise empty()
        limit = self.config.max_client_batch_size
        if size > limit:
            self.metrics.inc("te_request_failure", err="batch_size")
            raise self._validation(f"batch size {size} > maximum allowed batch size {limit}")

    def _require(self, kind: str) -> None:
        have = self.config.model_type
        ok = kind == have or (kind == "classifier" and have == "reranker")
        if not ok:
            self.metrics.inc("te_request_failure", err="model_type")
            article = "an" if kind == "embedding" else "a"
            name = "re-ranker" if kind == "reranker" else kind
            raise backend(f"model is not {article} {name} model")

    def _dimensions(self, body: dict[str, Any]) -> int | None:
        dims = body.get("dimensions")
        if dims is None:
            return None
        dim = self.config.embedding_dim
        if dims == 0:
            raise self._validation("`dimensions` should be greater than 0")
        if dims > dim:
            raise self._validation(f"`dimensions` should be less than or equal to {dim}")
        return int(dims)

    async def _infer(
        self, items: list[_Item], knobs: Knobs, batch: bool, method: str
    ) -> list[Header]:
        """Take a permit (single requests fail fast, batches wait), sleep, count."""
        t0 = time.perf_counter()
        self.metrics.inc("te_request_count", method=method)
        if not batch and self.inflight >= self.config.max_concurrent_requests:
            self.metrics.inc("te_request_failure", err="overloaded")
            raise overloaded()
        self.inflight += 1
        try:
            if not await self.scheduler.acquire():
                self.metrics.inc("te_request_failure", err="overloaded")
                raise overloaded()
            t_start = time.perf_counter()
            try:
                if knobs.ttft > 0:
                    await asyncio.sleep(knobs.ttft)
                if knobs.error_after is not None:
                    self.metrics.inc("te_request_failure", err="backend")
                    raise backend("simulated failure (x-sim-error-after)")
            finally:
                self.scheduler.release()
        finally:
            self.inflight -= 1
        done = time.perf_counter()
        tokens = sum(i.tokens for i in items)
        m = self.metrics
        m.inc("te_request_success", method=method)
        m.observe("te_request_duration", done - t0)
        m.observe("te_request_tokenization_duration", 0.0)
        m.observe("te_request_queue_duration", t_start - t0)
        m.observe("te_request_inference_duration", done - t_start)
        for item in items:
            m.observe("te_request_input_length", item.tokens)
        ms = int((done - t0) * 1000)
        return [
            ("x-compute-type", self.config.compute_type),
            ("x-compute-time", str(ms)),
            ("x-compute-characters", str(sum(i.chars for i in items))),
            ("x-compute-tokens", str(tokens)),
            ("x-total-time", str(ms)),
            ("x-tokenization-time", "0"),
            ("x-queue-time", str(int((t_start - t0) * 1000))),
            ("x-inference-time", str(int((done - t_start) * 1000))),
        ]

    def _vector(self, item: _Item, dimensions: int | None, normalize: bool) -> list[float]:
        vec = textgen.embedding(item.seed, self.config.embedding_dim, dimensions)
        if normalize:
            return vec.tolist()
        scale = 1.0 + item.seed[1] / 32.0  # a deterministic, non-unit norm
        return [v * scale for v in vec.tolist()]

    async def _guard(
        self, req: Request, schema: dict[str, tuple[str, bool]], *, openai: bool,
        work: Callable[[dict[str, Any], Knobs], Awaitable[Response]],
    ) -> Response:  # fmt: skip
        body = self._begin(req, schema)
        if isinstance(body, Response):
            return body
        pre = self._prelude(req)
        if isinstance(pre, Response):
            return pre
        if isinstance(pre, TeiError):
            return pre.response(openai)
        try:
            return await work(body, pre)
        except SerdeError as exc:
            return deserialize_error(exc)
        except TeiError as exc:
            return exc.response(openai)

    # -- routes ------------------------------------------------------------------------

    async def embed(self, req: Request) -> Response:
        async def work(body: dict[str, Any], knobs: Knobs) -> Response:
            truncate = body.get("truncate")
            truncate = self.config.auto_truncate if truncate is None else truncate
            items, batch = self._inputs(req.body, body, "inputs", truncate)
            self._require("embedding")
            dims = self._dimensions(body)
            headers = await self._infer(items, knobs, batch, "batch" if batch else "single")
            normalize = body.get("normalize", True)
            rows = [self._vector(i, dims, normalize) for i in items]
            return Response(200, orjson.dumps(rows), headers=headers)

        return await self._guard(req, EMBED_SCHEMA, openai=False, work=work)

    async def openai_embed(self, req: Request) -> Response:
        async def work(body: dict[str, Any], knobs: Knobs) -> Response:
            encoding = body.get("encoding_format", "float")
            if encoding not in ("float", "base64"):
                raise serde_custom(
                    req.body,
                    ("encoding_format",),
                    encoding,
                    f"unknown variant `{encoding}`, expected `float` or `base64`",
                )
            items, batch = self._inputs(req.body, body, "input", self.config.auto_truncate)
            self._require("embedding")
            dims = self._dimensions(body)
            headers = await self._infer(items, knobs, batch, "batch" if batch else "single")
            data = []
            for index, item in enumerate(items):
                vec = textgen.embedding(item.seed, self.config.embedding_dim, dims)
                value: Any
                if encoding == "base64":
                    value = base64.b64encode(textgen.float32_le_bytes(vec)).decode("ascii")
                else:
                    value = vec.tolist()
                data.append({"object": "embedding", "embedding": value, "index": index})
            tokens = sum(i.tokens for i in items)
            out = {
                "object": "list",
                "data": data,
                "model": self.model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
            return Response(200, orjson.dumps(out), headers=headers)

        return await self._guard(req, OPENAI_SCHEMA, openai=True, work=work)

    async def rerank(self, req: Request) -> Response:
        async def work(body: dict[str, Any], knobs: Knobs) -> Response:
            for key in ("query", "texts"):
                if key not in body:
                    raise serde_missing(req.body, key)
            texts: list[str] = body["texts"]
            if not texts:
                self.metrics.inc("te_request_failure", err="validation")
                raise empty("texts")
            self._require("reranker")
            self._check_batch(len(texts))
            truncate = body.get("truncate")
            truncate = self.config.auto_truncate if truncate is None else truncate
            query: str = body["query"]
            items = [self._item(f"{query} {text}", truncate) for text in texts]
            headers = await self._infer(items, knobs, True, "batch")
            raw_scores = bool(body.get("raw_scores"))
            ranks = []
            for index, text in enumerate(texts):
                logit = _relevance(query, text)
                rank: dict[str, Any] = {"index": index}
                if body.get("return_text"):
                    rank["text"] = text
                rank["score"] = logit if raw_scores else _sigmoid(logit)
                ranks.append(rank)
            ranks.sort(key=lambda r: r["score"], reverse=True)
            return Response(200, orjson.dumps(ranks), headers=headers)

        return await self._guard(req, RERANK_SCHEMA, openai=False, work=work)

    async def predict(self, req: Request) -> Response:
        async def work(body: dict[str, Any], knobs: Knobs) -> Response:
            if "inputs" not in body:
                raise serde_missing(req.body, "inputs")
            sequences, batch = _predict_inputs(req.body, body["inputs"])
            self._require("classifier")
            if batch:
                self._check_batch(len(sequences))
            truncate = body.get("truncate")
            truncate = self.config.auto_truncate if truncate is None else truncate
            items = [self._item(" ".join(seq), truncate) for seq in sequences]
            headers = await self._infer(items, knobs, batch, "batch" if batch else "single")
            raw_scores = bool(body.get("raw_scores"))
            answers = [self._classify(seq, raw_scores) for seq in sequences]
            return Response(200, orjson.dumps(answers if batch else answers[0]), headers=headers)

        return await self._guard(req, PREDICT_SCHEMA, openai=False, work=work)

    def _classify(self, seq: list[str], raw_scores: bool) -> list[dict[str, Any]]:
        if self.config.model_type == "reranker":
            logit = _relevance(seq[0], seq[-1]) if len(seq) == 2 else _jitter_logit(seq[0])
            return [{"score": logit if raw_scores else _sigmoid(logit), "label": "LABEL_0"}]
        labels = self.config.labels
        seed = textgen.prompt_seed("classify:" + "\x00".join(seq))
        logits = [(seed[i % len(seed)] / 64.0) - 2.0 for i in range(len(labels))]
        if raw_scores:
            scores = logits
        else:
            peak = max(logits)
            exps = [math.exp(x - peak) for x in logits]
            total = sum(exps)
            scores = [e / total for e in exps]
        out = [
            {"score": float(array("f", [s])[0]), "label": label}
            for s, label in zip(scores, labels, strict=True)
        ]
        out.sort(key=lambda p: p["score"], reverse=True)
        return out

    async def tokenize(self, req: Request) -> Response:
        body = self._begin(req, {"add_special_tokens": ("bool", False)})
        if isinstance(body, Response):
            return body
        value = body.get("inputs")
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return deserialize_error(serde_missing(req.body, "inputs"))
        out = []
        for text in texts:
            tokens, pos = [], 0
            for word in text.split():
                start = text.index(word, pos)
                pos = start + len(word)
                tokens.append(
                    {"id": 1000 + len(word), "text": word, "special": False, "start": start,
                     "stop": pos}
                )  # fmt: skip
            out.append(tokens)
        return Response(200, orjson.dumps(out))

    async def info(self, req: Request) -> Response:
        if not bearer_ok(req.headers, self.config.api_key):
            return Response(401, b"", content_type=None)
        c = self.config
        model_type: dict[str, Any]
        if c.model_type == "embedding":
            model_type = {"embedding": {"pooling": c.pooling}}
        else:
            labels = ["LABEL_0"] if c.model_type == "reranker" else c.labels
            model_type = {
                c.model_type: {
                    "id2label": {str(i): label for i, label in enumerate(labels)},
                    "label2id": {label: i for i, label in enumerate(labels)},
                }
            }
        out = {
            "model_id": self.model_id,
            "model_sha": None,
            "model_dtype": "float16",
            "model_type": model_type,
            "max_concurrent_requests": c.max_concurrent_requests,
            "max_input_length": c.max_input_length,
            "max_batch_tokens": c.max_batch_tokens,
            "max_batch_requests": None,
            "max_client_batch_size": c.max_client_batch_size,
            "auto_truncate": c.auto_truncate,
            "tokenization_workers": 8,
            "version": c.version,
            "sha": None,
            "docker_label": None,
            "served_model_name": self.model_id,
        }
        return Response(200, orjson.dumps(out))

    async def health(self, req: Request) -> Response:
        if self.health_status != 200:
            return TeiError(self.health_status, "unhealthy", "Unhealthy").response()
        return Response(200, b"", content_type=None)

    async def prometheus(self, req: Request) -> Response:
        s = self.scheduler
        body = self.metrics.render(
            {"te_queue_size": s.waiting, "te_batch_next_size": s.running, "te_batch_next_tokens": 0}
        )
        return plain_text(200, body.decode())

    async def unknown_route(self, req: Request) -> Response:
        self._record(req, json_or_text(req.body))
        return Response(404, b"", content_type=None)


def _relevance(query: str, text: str) -> float:
    """A logit that grows with the share of query words found in ``text``."""
    q = {w.lower().strip(".,;:!?") for w in query.split()}
    t = {w.lower().strip(".,;:!?") for w in text.split()}
    overlap = len(q & t) / len(q) if q else 0.0
    return round(6.0 * overlap - 3.0 + _jitter(textgen.prompt_seed(query + "\x00" + text)), 6)


def _jitter_logit(text: str) -> float:
    return _jitter(textgen.prompt_seed(text)) * 4.0


def _predict_inputs(raw: bytes, value: Any) -> tuple[list[list[str]], bool]:
    """``PredictInput``: a string, an ``[a, b]`` pair, or a batch of those."""
    if isinstance(value, str):
        return [[value]], False
    if isinstance(value, list):
        if len(value) == 2 and all(isinstance(v, str) for v in value):
            return [list(value)], False
        seqs: list[list[str]] = []
        for v in value:
            if isinstance(v, str):
                seqs.append([v])
            elif isinstance(v, list) and len(v) in (1, 2) and all(isinstance(s, str) for s in v):
                seqs.append(list(v))
            else:
                break
        else:
            return seqs, True
    raise serde_custom(
        raw, ("inputs",), value, "data did not match any variant of untagged enum PredictInput"
    )


# --- CLI -----------------------------------------------------------------------------


def build_app(config: TeiConfig | None = None) -> App:
    return TeiSimulator(config).app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the TEI personality's flags to the ``python -m backends`` parser."""
    d = TeiConfig()
    g = parser.add_argument_group("tei personality")
    add_common_arguments(
        g,
        d,
        DEFAULT_MODEL,
        f"model id (repeatable, the first is reported; default {DEFAULT_MODEL})",
    )
    g.add_argument("--model-type", choices=MODEL_TYPES, default=d.model_type)
    g.add_argument("--embedding-dim", type=int, default=d.embedding_dim)
    g.add_argument(
        "--labels",
        default=",".join(d.labels),
        help="classifier labels (id2label order), comma-separated",
    )
    g.add_argument("--pooling", default=d.pooling)
    g.add_argument(
        "--max-input-length", "--max-model-len", dest="max_input_length", type=int,
        default=d.max_input_length,
    )  # fmt: skip
    g.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens)
    g.add_argument("--max-client-batch-size", type=int, default=d.max_client_batch_size)
    g.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests)
    g.add_argument(
        "--auto-truncate", action=argparse.BooleanOptionalAction, default=d.auto_truncate
    )
    g.add_argument(
        "--validation-status",
        type=int,
        choices=(413, 422),
        default=d.validation_status,
        help="status of Validation errors (413 before TEI's Feb 2026 fix)",
    )
    g.add_argument("--payload-limit", type=int, default=d.payload_limit)
    g.add_argument("--api-key", default=None, help="require Authorization: Bearer <key>")
    g.add_argument("--tei-version", default=d.version)
    g.add_argument("--compute-type", default=d.compute_type)


def config_from_args(args: argparse.Namespace) -> TeiConfig:
    return TeiConfig(
        **common_config(args),
        models=list(args.models or [DEFAULT_MODEL]),
        model_type=args.model_type,
        embedding_dim=args.embedding_dim,
        labels=[s.strip() for s in args.labels.split(",") if s.strip()],
        pooling=args.pooling,
        max_input_length=args.max_input_length,
        max_batch_tokens=args.max_batch_tokens,
        max_client_batch_size=args.max_client_batch_size,
        max_concurrent_requests=args.max_concurrent_requests,
        auto_truncate=args.auto_truncate,
        validation_status=args.validation_status,
        payload_limit=args.payload_limit,
        api_key=args.api_key,
        version=args.tei_version,
        compute_type=args.compute_type,
    )


def app_from_args(args: argparse.Namespace) -> App:
    return build_app(config_from_args(args))
