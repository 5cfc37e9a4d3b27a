"""The TGI personality: a simulator of HuggingFace text-generation-inference 3.x.

Modelled on TGI ``3.3.6-dev0`` (``router/src/server.rs``, ``lib.rs``, ``validation.rs``,
``infer/mod.rs``; see ``shared/reference/backends.md`` section 2). What it reproduces:

* the native API: ``POST /generate`` (JSON; ``details`` only when ``parameters.details``
  is true; the prompt size only in the ``x-prompt-tokens`` header, plus
  ``x-generated-tokens``, ``x-compute-type/-time/-characters``, ``x-total-time``,
  ``x-validation-time``, ``x-queue-time``, ``x-inference-time``, ``x-time-per-token``),
  ``POST /generate_stream`` (SSE token events with ``generated_text: null``, the last one
  with ``generated_text`` and ``details`` incl. ``input_length``; the EOS token is the last
  token event, ``special: true``; **no** ``[DONE]``), and the compat ``POST /`` (a JSON
  *array* when not streaming, ``return_full_text`` defaulting to true);
* TGI's validation, in TGI's order and with its messages (422
  ``{"error": "Input validation error: ...", "error_type": "validation"}``): ``top_p`` and
  ``typical_p`` strictly inside (0, 1), ``temperature`` > 0, ``top_k`` > 0,
  ``repetition_penalty`` > 0, ``frequency_penalty`` in [-2, 2], ``max_new_tokens`` >= 1,
  at most ``--max-stop-sequences`` stops, ``top_n_tokens`` <= ``--max-top-n-tokens``,
  ``best_of`` rules, non-empty ``inputs``, ``truncate``, and the length checks against
  ``--max-total-tokens`` / ``--max-input-tokens``;
* axum's rejections before TGI code runs, as plain text: 415 without a JSON content type,
  400 for malformed JSON, 422 "Failed to deserialize the JSON body into the target type:
  ..." for wrong types (a string ``stop``, an object ``logit_bias``, a missing ``inputs``),
  413 over ``--payload-limit``;
* overload: more requests in flight than ``--max-concurrent-requests`` (or a full
  ``--max-queue``) is a 429 ``{"error": "Model is overloaded", "error_type": "overloaded"}``
  -- but on the streaming routes the permit and the validation happen *inside* the SSE
  stream, so those failures arrive as a 200 whose single event is the error;
* the Messages API ``POST /v1/chat/completions`` with its quirks: ``id: ""``, ``model``
  echoed from the request, ``system_fingerprint`` ``"<version>-native"``, ``eos_token``
  mapped to ``stop`` while ``length`` / ``stop_sequence`` pass through, the role on every
  chunk, ``usage: null`` on every chunk and a ``choices: []`` usage chunk with
  ``stream_options.include_usage``, then ``data:[DONE]``; ``presence_penalty`` becomes
  ``repetition_penalty = presence_penalty + 2``; ``temperature: 0`` means greedy; tool calls
  as ``{"id": "0", "type": "function", "function": {"description": null, "name",
  "arguments"}}`` with no ``content`` key and finish_reason ``stop``; in-stream errors as
  ``{"error": {"message": ..., "http_status_code": 422}}`` followed by ``[DONE]``;
* ``POST /v1/completions`` (``id: ""``, intermediate ``finish_reason: ""``, the final
  chunk with the raw reason and the EOS text, usage), ``POST /tokenize``,
  ``POST /chat_tokenize``, ``GET /info``, ``GET /health`` (and ``/ping``, ``GET /``),
  ``GET /metrics`` (``tgi_*`` names, rendered like the Rust exporter), ``GET /v1/models``;
* ``--api-key``: the generation routes answer 401 with an empty body without
  ``Authorization: Bearer <key>``; info/health/metrics/models stay open.

SSE framing: TGI 3.x uses axum 0.7, whose ``Event::json_data`` writes ``data:{...}``
without a space (also for ``data:[DONE]``); ``--sse-space`` writes ``data: `` like newer
axum releases. Token counts and text come from :mod:`backends.textgen` (one word = one
token; the EOS token ``</s>`` counts as a generated token, as in TGI).

Simulator knobs (request headers): ``x-sim-ttft-ms``, ``x-sim-itl-ms``,
``x-sim-output-tokens`` (natural length before EOS), ``x-sim-error: <status>`` (422, 424,
429 and 500 are TGI errors that arrive in-band on streams; 401 / 413 / 503 / others are
plain HTTP errors), ``x-sim-error-after: <n>`` (n tokens, then a 424 ``generation`` error:
in-band on streams, after the generation time otherwise). ``/sim/requests`` and
``/sim/config`` as in every personality (see :class:`backends.common.SimControl`).

Deliberately not reproduced: real sampling, grammars (accepted and validated for shape
only), ``best_of_sequences``, images in messages, the ``no_tool`` re-generation, LoRA
adapters (any ``model`` is accepted and echoed), KServe/Vertex/SageMaker routes, keep-alive
comments, the OpenAPI docs.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
    pick_tool,
    plain_text,
    read_knobs,
    serde_check,
    serde_custom,
    serde_missing,
    serde_unexpected,
    tool_arguments,
)
from backends.http import App, Header, Request, Response, StreamResponse

__all__ = ["KIND", "TGI_VERSION", "TgiConfig", "TgiSimulator", "add_arguments", "build_app"]

KIND = "tgi"
TGI_VERSION = "3.3.6-dev0"
DEFAULT_MODEL = "bigscience/bloom-560m"  # the launcher's default --model-id


@dataclass
class TgiConfig:
    """Settings of one simulated TGI server (each is also a CLI flag)."""

    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    max_total_tokens: int = 4096
    max_input_tokens: int | None = None  # default max_total_tokens - 1, like the launcher
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4
    payload_limit: int = 2_000_000
    api_key: str | None = None
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    output_tokens: int = 16
    max_running: int = 256
    max_queue: int = 256
    keep_alive_timeout: float = 5.0
    version: str = TGI_VERSION
    docker_label: str | None = None
    compute_type: str = "gpu+optimized"
    sse_space: bool = False
    pod_name: str | None = None
    history: int = 200

    @property
    def input_limit(self) -> int:
        if self.max_input_tokens is not None:
            return self.max_input_tokens
        return max(1, self.max_total_tokens - 1)


# --- errors --------------------------------------------------------------------------


class TgiError(Exception):
    """An ``InferError``: ``status`` plus the ``{"error", "error_type"}`` body."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}

    def response(self, headers: list[Header] | None = None) -> Response:
        return Response(self.status, orjson.dumps(self.body()), headers=headers)


def validation(message: str) -> TgiError:
    return TgiError(422, f"Input validation error: {message}", "validation")


def overloaded() -> TgiError:
    return TgiError(429, "Model is overloaded", "overloaded")


def generation_error(message: str) -> TgiError:
    return TgiError(424, f"Request failed during generation: {message}", "generation")


def tool_error(message: str) -> TgiError:
    return TgiError(422, f"Tool error: {message}", "tool_error")


_INBAND = (422, 424, 429, 500)  # statuses TGI delivers inside a 200 stream


def _injected(status: int, max_total: int) -> TgiError | Response:
    """The error ``x-sim-error: <status>`` stands for."""
    if status == 401:
        return Response(401, b"", content_type=None)
    if status == 413:
        return payload_too_large()
    if status == 422:
        return validation(
            f"`inputs` tokens + `max_new_tokens` must be <= {max_total}. "
            f"Given: {max_total - 10} `inputs` tokens and 100 `max_new_tokens`"
        )
    if status == 424:
        return generation_error("CUDA out of memory (x-sim-error)")
    if status == 429:
        return overloaded()
    if status == 500:
        return TgiError(500, "Incomplete generation", "incomplete_generation")
    if status == 503:
        return TgiError(503, "unhealthy", "healthcheck")
    return TgiError(status, f"simulated error {status}", "sim")


# --- request schemas (serde) ---------------------------------------------------------

PARAMETERS_SCHEMA: dict[str, tuple[str, bool]] = {
    "best_of": ("usize", True),
    "temperature": ("f32", True),
    "repetition_penalty": ("f32", True),
    "frequency_penalty": ("f32", True),
    "top_k": ("i32", True),
    "top_p": ("f32", True),
    "typical_p": ("f32", True),
    "do_sample": ("bool", False),
    "max_new_tokens": ("u32", True),
    "return_full_text": ("bool", True),
    "stop": ("vec_str", False),
    "truncate": ("usize", True),
    "watermark": ("bool", False),
    "details": ("bool", False),
    "decoder_input_details": ("bool", False),
    "seed": ("u64", True),
    "top_n_tokens": ("u32", True),
    "adapter_id": ("str", True),
}
GENERATE_SCHEMA: dict[str, tuple[str, bool]] = {
    "inputs": ("str", False),
    "parameters": ("struct GenerateParameters", False),
    "add_special_tokens": ("bool", False),
    "stream": ("bool", False),
}
CHAT_SCHEMA: dict[str, tuple[str, bool]] = {
    "model": ("str", True),
    "frequency_penalty": ("f32", True),
    "logit_bias": ("vec_f32", True),
    "logprobs": ("bool", True),
    "top_logprobs": ("u32", True),
    "max_tokens": ("u32", True),
    "max_completion_tokens": ("u32", True),
    "n": ("u32", True),
    "presence_penalty": ("f32", True),
    "stream": ("bool", False),
    "seed": ("u64", True),
    "temperature": ("f32", True),
    "top_p": ("f32", True),
    "tool_prompt": ("str", True),
    "stop": ("vec_str", True),
    "stream_options": ("struct StreamOptions", True),
}
COMPLETION_SCHEMA: dict[str, tuple[str, bool]] = {
    "model": ("str", True),
    "max_tokens": ("u32", True),
    "temperature": ("f32", True),
    "top_p": ("f32", True),
    "stream": ("bool", False),
    "seed": ("u64", True),
    "suffix": ("str", True),
    "repetition_penalty": ("f32", True),
    "frequency_penalty": ("f32", True),
    "stop": ("vec_str", True),
}
_GRAMMAR_TYPES = ("json", "json_object", "regex", "json_schema")


def _check_grammar(raw: bytes, value: Any, path: tuple[Any, ...]) -> None:
    """``GrammarType`` is ``#[serde(tag = "type", content = "value")]``."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise serde_custom(
            raw, path, value, "invalid type: " + serde_unexpected(value) + ", expected a map"
        )
    kind = value.get("type")
    if kind is None:
        raise serde_custom(raw, path, value, "missing field `type`")
    if kind not in _GRAMMAR_TYPES:
        raise serde_custom(
            raw,
            (*path, "type"),
            kind,
            f"unknown variant `{kind}`, expected one of "
            + ", ".join(f"`{t}`" for t in _GRAMMAR_TYPES),
        )
    if "value" not in value:
        raise serde_custom(raw, path, value, "missing field `value`")


# --- generation ----------------------------------------------------------------------


class Tok(NamedTuple):
    id: int
    text: str
    logprob: float
    special: bool

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "logprob": self.logprob, "special": self.special}


_WORD_IDS = {" " + w: 1000 + i for i, w in enumerate(textgen.VOCAB)}
EOS = Tok(2, "</s>", -0.0123, True)


def _logprob(token_id: int, position: int) -> float:
    return -round(0.01 + ((token_id * 7 + position * 13) % 97) / 100.0, 4)


def _word_tok(word: str, position: int) -> Tok:
    token_id = _WORD_IDS.get(word, 999)
    return Tok(token_id, word, _logprob(token_id, position), False)


def _top_tokens(tok: Tok, position: int, n: int) -> list[dict[str, Any]]:
    out = [tok.as_json()]
    for k in range(1, n):
        word = " " + textgen.VOCAB[(tok.id + 31 * k + position) % len(textgen.VOCAB)]
        alt = _word_tok(word, position)
        out.append({**alt.as_json(), "logprob": round(tok.logprob - 0.5 * k, 4)})
    return out


@dataclass
class Job:
    """A validated generation request."""

    inputs: str
    input_length: int
    max_new_tokens: int
    tokens: list[Tok]
    finish_reason: str
    seed: int | None
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int = 0
    return_full_text: bool = False

    @property
    def generated_text(self) -> str:
        text = "".join(t.text for t in self.tokens if not t.special)
        return self.inputs + text if self.return_full_text else text


def _plan_tokens(seed: bytes, natural: int, max_new: int, stop: list[str]) -> tuple[list[Tok], str]:
    """``natural`` words then EOS, cut by ``max_new`` (length) or a stop sequence."""
    words = textgen.generate_tokens(seed, natural)
    tokens: list[Tok] = []
    text = ""
    for i, word in enumerate(words):
        if len(tokens) >= max_new:
            return tokens, "length"
        tokens.append(_word_tok(word, i))
        text += word
        if any(s and text.endswith(s) for s in stop):
            return tokens, "stop_sequence"
    if len(tokens) >= max_new:
        return tokens, "length"
    tokens.append(EOS)
    return tokens, "eos_token"


def _seed_from(inputs: str) -> int:
    return int.from_bytes(textgen.prompt_seed("seed:" + inputs)[:8], "little")


def _openai_finish(reason: str) -> str:
    """``FinishReason::format(true)``: only ``eos_token`` is rewritten."""
    return "stop" if reason == "eos_token" else reason


class _Timing:
    __slots__ = ("done", "first", "queued", "start", "t0")

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.queued = self.t0
        self.start = self.t0
        self.first: float | None = None
        self.done = self.t0


# --- the simulator -------------------------------------------------------------------

DURATION_BUCKETS = tuple(0.0001 * 1.5 ** (i + 1) for i in range(35))


class TgiSimulator(SimControl):
    """State and handlers of one simulated TGI server; ``self.app`` is what to serve."""

    config: TgiConfig

    def __init__(self, config: TgiConfig | None = None) -> None:
        config = config or TgiConfig()
        if not config.models:
            config.models = [DEFAULT_MODEL]
        super().__init__(config)
        self.model_id = config.models[0]
        self.inflight = 0
        self.running_tokens = 0
        self.prefix = b"data: " if config.sse_space else b"data:"
        self.fingerprint = f"{config.version}-{config.docker_label or 'native'}"
        self.metrics = RustMetrics()
        for name in ("tgi_request_count", "tgi_request_success"):
            self.metrics.declare_counter(name)
        for name in (
            "tgi_request_duration",
            "tgi_request_validation_duration",
            "tgi_request_queue_duration",
            "tgi_request_inference_duration",
            "tgi_request_mean_time_per_token_duration",
        ):
            self.metrics.declare_histogram(name, DURATION_BUCKETS)
        total, inp = config.max_total_tokens, config.input_limit
        self.metrics.declare_histogram(
            "tgi_request_input_length", tuple(inp / 100 * (x + 1) for x in range(100))
        )
        for name in ("tgi_request_generated_tokens", "tgi_request_max_new_tokens"):
            self.metrics.declare_histogram(name, tuple(total / 100 * (x + 1) for x in range(100)))
        headers: list[Header] = []
        if config.pod_name:
            headers.append(("x-inference-pod", config.pod_name))
        self.app = App(
            server_header=None,
            keep_alive_timeout=config.keep_alive_timeout,
            default_headers=headers,
        )
        route = self.app.route
        route("POST", "/generate", self.generate)
        route("POST", "/generate_stream", self.generate_stream)
        route("POST", "/", self.compat_generate)
        route("POST", "/v1/chat/completions", self.chat_completions)
        route("POST", "/v1/completions", self.completions)
        route("POST", "/tokenize", self.tokenize)
        route("POST", "/chat_tokenize", self.chat_tokenize)
        route("GET", "/info", self.info)
        route("GET", "/health", self.health)
        route("GET", "/ping", self.health)
        route("GET", "/", self.health)
        route("GET", "/metrics", self.prometheus)
        route("GET", "/v1/models", self.models)
        self.add_control_routes(self.app)
        self.app.fallback = self.unknown_route

    # -- plumbing ----------------------------------------------------------------------

    def _event(self, obj: Any) -> bytes:
        return self.prefix + orjson.dumps(obj) + b"\n\n"

    def _done(self) -> bytes:
        return self.prefix + b"[DONE]\n\n"

    def _begin(
        self, req: Request, schema: dict[str, tuple[str, bool]]
    ) -> dict[str, Any] | Response:
        """Record, then what axum and the auth layer do before a TGI handler runs."""
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
        except SerdeError as exc:
            return deserialize_error(exc)
        return body

    def _knobs(self, req: Request) -> Knobs | Response:
        try:
            return read_knobs(req.headers, self.config)
        except BadKnob as exc:
            return TgiError(400, str(exc), "sim").response()

    def _forced(self, req: Request) -> TgiError | Response | None:
        """The error an ``x-sim-error`` header or ``/sim/config`` asks for, if any."""
        status = forced_status(req.headers)
        if isinstance(status, str):
            return TgiError(400, f"invalid x-sim-error header: {status!r}", "sim").response()
        if status is None:
            status = self._configured_error()
        if status is None:
            return None
        return _injected(status, self.config.max_total_tokens)

    @staticmethod
    def _answer_now(
        forced: TgiError | Response | None, stream: bool, knobs: Knobs
    ) -> Response | None:
        """A forced error that is a plain HTTP response (not in-band, not deferred by
        ``x-sim-error-after``)."""
        if forced is None:
            return None
        if isinstance(forced, Response):
            return forced
        if knobs.error_after is not None or (stream and forced.status in _INBAND):
            return None
        return forced.response()

    def _parse_parameters(self, raw: bytes, body: dict[str, Any]) -> dict[str, Any]:
        if "inputs" not in body:
            raise serde_missing(raw, "inputs")
        params = body.get("parameters")
        if params is None:  # the whole object omitted: default_parameters() samples
            return {"do_sample": True}
        serde_check(raw, params, PARAMETERS_SCHEMA, ("parameters",))
        _check_grammar(raw, params.get("grammar"), ("parameters", "grammar"))
        return dict(params)

    def _validate(self, inputs: str, p: dict[str, Any], natural: int, *, stream: bool) -> Job:
        """``Validation::validate`` (plus the best_of / stream checks around it)."""
        c = self.config
        best_of = p.get("best_of") or 1
        if stream and best_of != 1:
            raise validation("`best_of` != 1 is not supported when streaming tokens")
        if stream and p.get("decoder_input_details"):
            raise validation(
                "`decoder_input_details` == true is not supported when streaming tokens"
            )
        if best_of > 1:
            if c.max_best_of == 1:
                raise validation("`best_of` != 1 is not allowed for this endpoint")
            if best_of > c.max_best_of:
                raise validation(f"`best_of` must be > 0 and <= {c.max_best_of}. Given: {best_of}")
        do_sample = bool(p.get("do_sample"))
        temperature, top_k = p.get("temperature"), p.get("top_k")
        top_p, typical_p = p.get("top_p"), p.get("typical_p")
        sampling = do_sample or any(v is not None for v in (temperature, top_k, top_p, typical_p))
        if best_of > 1 and not sampling:
            raise validation("you must use sampling when `best_of` is > 1")
        if (1.0 if temperature is None else temperature) <= 0:
            raise validation("`temperature` must be strictly positive")
        rep = p.get("repetition_penalty")
        if (1.0 if rep is None else rep) <= 0:
            raise validation("`repetition_penalty` must be strictly positive")
        freq = p.get("frequency_penalty")
        if not -2.0 <= (0.0 if freq is None else freq) <= 2.0:
            raise validation("`frequency_penalty` must be >= -2.0 and <= 2.0")
        if top_p is not None and not 0.0 < top_p < 1.0:
            raise validation("`top_p` must be > 0.0 and < 1.0")
        if typical_p is not None and not 0.0 < typical_p < 1.0:
            raise validation("`typical_p` must be > 0.0 and < 1.0")
        if top_k is not None and top_k <= 0:
            raise validation("`top_k` must be strictly positive")
        max_new = p.get("max_new_tokens")
        if max_new == 0:
            raise validation("`max_new_tokens` must be strictly positive")
        stop = list(p.get("stop") or [])
        if len(stop) > c.max_stop_sequences:
            raise validation(
                f"`stop` supports up to {c.max_stop_sequences} stop sequences. Given: {len(stop)}"
            )
        seed = p.get("seed")
        if seed is not None and best_of > 1:
            raise validation("`seed` must not be set when `best_of` > 1")
        top_n = p.get("top_n_tokens") or 0
        if top_n > c.max_top_n_tokens:
            raise validation(
                f"`top_n_tokens` must be >= 0 and <= {c.max_top_n_tokens}. Given: {top_n}"
            )
        if not inputs:
            raise validation("`inputs` cannot be empty")
        truncate = p.get("truncate")
        limit = c.input_limit
        if truncate is not None and (truncate == 0 or truncate > limit):
            raise validation(
                f"`truncate` must be strictly positive and less than {limit}. Given: {truncate}"
            )
        n_tokens = textgen.count_tokens(inputs)
        input_length = min(n_tokens, truncate) if truncate else n_tokens
        total = c.max_total_tokens
        if max_new is None:
            budget = max(0, total - input_length)
            checked = min(budget, 1024)
        else:
            budget = checked = max_new
        if input_length + checked > total:
            raise validation(
                f"`inputs` tokens + `max_new_tokens` must be <= {total}. "
                f"Given: {input_length} `inputs` tokens and {checked} `max_new_tokens`"
            )
        if input_length > limit:
            raise validation(f"`inputs` must have less than {limit} tokens. Given: {input_length}")
        tokens, reason = _plan_tokens(textgen.prompt_seed(inputs), natural, budget, stop)
        if seed is None and sampling:
            seed = _seed_from(inputs)
        elif not sampling:
            seed = None
        return Job(
            inputs=inputs,
            input_length=input_length,
            max_new_tokens=budget,
            tokens=tokens,
            finish_reason=reason,
            seed=seed,
            details=bool(p.get("details")),
            decoder_input_details=bool(p.get("decoder_input_details")),
            top_n_tokens=top_n,
            return_full_text=bool(p.get("return_full_text")),
        )

    # -- running a job -----------------------------------------------------------------

    async def _start(
        self,
        inputs: str,
        params: dict[str, Any],
        knobs: Knobs,
        t: _Timing,
        *,
        stream: bool,
        tool: dict[str, Any] | None = None,
    ) -> Job:
        """What ``Infer::generate_stream`` does before the first token: take a concurrency
        permit (``overloaded`` when ``--max-concurrent-requests`` are in flight), validate,
        then queue for a running slot (``overloaded`` too when ``--max-queue`` is full).

        Raises :class:`TgiError` holding nothing; on success the caller must
        ``_release(job)``.
        """
        if self.inflight >= self.config.max_concurrent_requests:
            self.metrics.inc("tgi_request_failure", err="overloaded")
            raise overloaded()
        self.inflight += 1
        try:
            try:
                job = self._validate(inputs, params, knobs.output_tokens, stream=stream)
            except TgiError:
                self.metrics.inc("tgi_request_failure", err="validation")
                raise
            if tool is not None:
                job = _tool_job(job, tool)
            t.queued = time.perf_counter()
            if not await self.scheduler.acquire():
                self.metrics.inc("tgi_request_failure", err="overloaded")
                raise overloaded()
        except BaseException:
            self.inflight -= 1
            raise
        self.running_tokens += job.input_length + job.max_new_tokens
        self.metrics.observe("tgi_request_input_length", job.input_length)
        self.metrics.observe("tgi_request_max_new_tokens", job.max_new_tokens)
        t.start = time.perf_counter()
        return job

    def _release(self, job: Job) -> None:
        self.scheduler.release()
        self.inflight -= 1
        self.running_tokens -= job.input_length + job.max_new_tokens

    def _success(self, job: Job, t: _Timing) -> None:
        m = self.metrics
        n = len(job.tokens)
        inference = t.done - t.start
        m.inc("tgi_request_success")
        m.observe("tgi_request_duration", t.done - t.t0)
        m.observe("tgi_request_validation_duration", t.queued - t.t0)
        m.observe("tgi_request_queue_duration", t.start - t.queued)
        m.observe("tgi_request_inference_duration", inference)
        m.observe("tgi_request_mean_time_per_token_duration", inference / max(1, n))
        m.observe("tgi_request_generated_tokens", n)

    def _failed(self, error: TgiError | None) -> TgiError:
        self.metrics.inc("tgi_request_failure", err="generation")
        return error or generation_error("simulated failure (x-sim-error-after)")

    async def _token_times(
        self, job: Job, knobs: Knobs, t: _Timing, error: TgiError | None
    ) -> AsyncIterator[int]:
        """Yield token positions at their simulated times (after admission).

        With ``knobs.error_after`` set, stop after that many tokens and raise ``error`` (a
        generation error by default).
        """
        n = len(job.tokens)
        limit = n if knobs.error_after is None else min(knobs.error_after, n)
        if knobs.ttft > 0:
            await asyncio.sleep(knobs.ttft)
        t.first = time.perf_counter()
        for i in range(limit):
            if i and knobs.itl > 0:
                delay = t.first + i * knobs.itl - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            yield i
        t.done = time.perf_counter()
        if knobs.error_after is not None:
            raise self._failed(error)
        self._success(job, t)

    async def _run_full(
        self,
        inputs: str,
        params: dict[str, Any],
        knobs: Knobs,
        t: _Timing,
        error: TgiError | None = None,
        tool: dict[str, Any] | None = None,
    ) -> Job:
        """Generate without streaming; raises :class:`TgiError`."""
        job = await self._start(inputs, params, knobs, t, stream=False, tool=tool)
        try:
            n = len(job.tokens)
            k = n if knobs.error_after is None else min(knobs.error_after, n)
            delay = knobs.ttft + max(0, k - 1) * knobs.itl
            if delay > 0:
                await asyncio.sleep(delay)
            t.first = t.start + knobs.ttft
            t.done = time.perf_counter()
            if knobs.error_after is not None:
                raise self._failed(error)
            self._success(job, t)
        finally:
            self._release(job)
        return job

    def _generate_headers(self, job: Job, t: _Timing) -> list[Header]:
        total = t.done - t.t0
        inference = t.done - t.start
        n = len(job.tokens)
        return [
            ("x-compute-type", self.config.compute_type),
            ("x-compute-time", repr(total)),
            ("x-compute-characters", str(len(job.inputs))),
            ("x-total-time", str(int(total * 1000))),
            ("x-validation-time", str(int((t.queued - t.t0) * 1000))),
            ("x-queue-time", str(int((t.start - t.queued) * 1000))),
            ("x-inference-time", str(int(inference * 1000))),
            ("x-time-per-token", str(int(inference * 1000 / max(1, n)))),
            ("x-prompt-tokens", str(job.input_length)),
            ("x-generated-tokens", str(n)),
        ]

    def _stream_headers(self, characters: int) -> list[Header]:
        return [
            ("cache-control", "no-cache"),
            ("x-compute-type", self.config.compute_type),
            ("x-compute-characters", str(characters)),
            ("x-accel-buffering", "no"),
        ]

    def _details(self, job: Job) -> dict[str, Any]:
        prefill: list[dict[str, Any]] = []
        if job.decoder_input_details:
            words = job.inputs.split()[-job.input_length :] if job.input_length else []
            for i, w in enumerate(words):
                tok = _word_tok(" " + w, i)
                prefill.append(
                    {"id": tok.id, "text": tok.text, "logprob": None if i == 0 else tok.logprob}
                )
        details: dict[str, Any] = {
            "finish_reason": job.finish_reason,
            "generated_tokens": len(job.tokens),
            "seed": job.seed,
            "prefill": prefill,
            "tokens": [t.as_json() for t in job.tokens],
        }
        if job.top_n_tokens:
            details["top_tokens"] = [
                _top_tokens(t, i, job.top_n_tokens) for i, t in enumerate(job.tokens)
            ]
        return details

    def _generate_body(self, job: Job) -> dict[str, Any]:
        body: dict[str, Any] = {"generated_text": job.generated_text}
        if job.details or job.decoder_input_details:
            body["details"] = self._details(job)
        return body

    # -- native routes -----------------------------------------------------------------

    async def generate(self, req: Request) -> Response | StreamResponse:
        return await self._native(req, stream=False, compat=False)

    async def generate_stream(self, req: Request) -> Response | StreamResponse:
        return await self._native(req, stream=True, compat=False)

    async def compat_generate(self, req: Request) -> Response | StreamResponse:
        return await self._native(req, stream=False, compat=True)

    async def _native(
        self, req: Request, *, stream: bool, compat: bool
    ) -> Response | StreamResponse:
        body = self._begin(req, GENERATE_SCHEMA)
        if isinstance(body, Response):
            return body
        try:
            params = self._parse_parameters(req.body, body)
        except SerdeError as exc:
            return deserialize_error(exc)
        if compat:
            stream = bool(body.get("stream"))
            if params.get("return_full_text") is None:
                params["return_full_text"] = True  # pipeline tag text-generation
        knobs = self._knobs(req)
        if isinstance(knobs, Response):
            return knobs
        self.metrics.inc("tgi_request_count")
        inputs: str = body["inputs"]
        forced = self._forced(req)
        now = self._answer_now(forced, stream, knobs)
        if now is not None:
            return now
        error = forced if isinstance(forced, TgiError) else None
        t = _Timing()
        if stream:
            return StreamResponse(
                self._native_events(inputs, params, knobs, error, t),
                content_type="text/event-stream",
                headers=self._stream_headers(len(inputs)),
            )
        try:
            job = await self._run_full(inputs, params, knobs, t, error)
        except TgiError as exc:
            return exc.response()
        out = self._generate_body(job)
        return Response(
            200, orjson.dumps([out] if compat else out), headers=self._generate_headers(job, t)
        )

    async def _native_events(
        self,
        inputs: str,
        params: dict[str, Any],
        knobs: Knobs,
        error: TgiError | None,
        t: _Timing,
    ) -> AsyncIterator[bytes]:
        """``generate_stream_internal``: every failure is an event, then the stream ends."""
        if error is not None and knobs.error_after is None:
            yield self._event(error.body())
            return
        try:
            job = await self._start(inputs, params, knobs, t, stream=True)
        except TgiError as exc:
            yield self._event(exc.body())
            return
        try:
            n = len(job.tokens)
            async for i in self._token_times(job, knobs, t, error):
                tok = job.tokens[i]
                event: dict[str, Any] = {"index": i + 1, "token": tok.as_json()}
                if job.top_n_tokens:
                    event["top_tokens"] = _top_tokens(tok, i, job.top_n_tokens)
                last = i == n - 1 and knobs.error_after is None
                event["generated_text"] = job.generated_text if last else None
                event["details"] = (
                    {
                        "finish_reason": job.finish_reason,
                        "generated_tokens": n,
                        "seed": job.seed,
                        "input_length": job.input_length,
                    }
                    if last and job.details
                    else None
                )
                yield self._event(event)
        except TgiError as exc:
            yield self._event(exc.body())
        finally:
            self._release(job)

    async def tokenize(self, req: Request) -> Response:
        body = self._begin(req, GENERATE_SCHEMA)
        if isinstance(body, Response):
            return body
        if "inputs" not in body:
            return deserialize_error(serde_missing(req.body, "inputs"))
        return Response(200, orjson.dumps(_tokenize(body["inputs"])))

    # -- Messages API ------------------------------------------------------------------

    def _chat_to_generate(
        self, raw: bytes, body: dict[str, Any]
    ) -> tuple[str, int, dict[str, Any], dict[str, Any] | None]:
        """``ChatRequest::try_into_generate``: (templated text, prompt tokens, parameters,
        the tool to call or None). Raises SerdeError or TgiError."""
        if "messages" not in body:
            raise serde_missing(raw, "messages")
        if "max_tokens" in body and "max_completion_tokens" in body:
            raise serde_custom(raw, (), None, "duplicate field `max_tokens`")
        try:
            text, n_tokens = textgen.chat_prompt(body["messages"])
        except textgen.ChatPromptError as exc:
            if exc.kind == "too_short":
                raise validation("`inputs` cannot be empty") from None
            raise serde_custom(raw, ("messages", *exc.loc), None, exc.msg.lower()) from None
        response_format = body.get("response_format")
        _check_grammar(raw, response_format, ("response_format",))
        tool = self._pick_tool(raw, body)
        if tool is not None and response_format is not None:
            raise tool_error("Grammar and tools are mutually exclusive")
        temperature = body.get("temperature")
        presence = body.get("presence_penalty")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        logprobs = bool(body.get("logprobs"))
        params: dict[str, Any] = {
            "do_sample": not (temperature is not None and temperature == 0.0),
            "temperature": None if temperature == 0.0 else temperature,
            "top_p": body.get("top_p"),
            "frequency_penalty": body.get("frequency_penalty"),
            "repetition_penalty": None if presence is None else presence + 2.0,
            "max_new_tokens": max_tokens,
            "stop": body.get("stop") or [],
            "seed": body.get("seed"),
            "details": True,
            "decoder_input_details": not body.get("stream"),
            "top_n_tokens": body.get("top_logprobs") if logprobs else None,
            "grammar": response_format,
        }
        return text, n_tokens, params, tool

    @staticmethod
    def _pick_tool(raw: bytes, body: dict[str, Any]) -> dict[str, Any] | None:
        tools = body.get("tools")
        if tools and (
            not isinstance(tools, list)
            or not all(isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools)
        ):
            raise serde_custom(raw, ("tools",), tools, "invalid type: expected a sequence of tools")
        try:
            return pick_tool(tools, body.get("tool_choice", "auto"))
        except LookupError as exc:
            raise tool_error(f"Tool choice '{exc.args[0]}' not found in tools") from None

    async def chat_completions(self, req: Request) -> Response | StreamResponse:
        body = self._begin(req, CHAT_SCHEMA)
        if isinstance(body, Response):
            return body
        try:
            text, _, params, tool = self._chat_to_generate(req.body, body)
        except SerdeError as exc:
            return deserialize_error(exc)
        except TgiError as exc:
            return exc.response()
        knobs = self._knobs(req)
        if isinstance(knobs, Response):
            return knobs
        self.metrics.inc("tgi_request_count")
        stream = bool(body.get("stream"))
        model = body.get("model") or self.model_id
        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage"))
        logprobs = bool(body.get("logprobs"))
        forced = self._forced(req)
        now = self._answer_now(forced, stream, knobs)
        if now is not None:
            return now
        error = forced if isinstance(forced, TgiError) else None
        t = _Timing()
        if stream:
            return StreamResponse(
                self._chat_events(
                    text, params, tool, knobs, error, t, model, include_usage, logprobs
                ),
                content_type="text/event-stream",
                headers=self._stream_headers(len(text)),
            )
        try:
            job = await self._run_full(text, params, knobs, t, error, tool)
        except TgiError as exc:
            return exc.response()
        message: dict[str, Any]
        if tool is not None:
            message = {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "0",
                        "type": "function",
                        "function": {
                            "description": None,
                            "name": tool.get("name"),
                            "arguments": tool_arguments(tool, text),
                        },
                    }
                ],
            }
        else:
            message = {"role": "assistant", "content": job.generated_text}
        n = len(job.tokens)
        out = {
            "object": "chat.completion",
            "id": "",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": self.fingerprint,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": _chat_logprobs(job, 0, n) if logprobs else None,
                    "finish_reason": _openai_finish(job.finish_reason),
                }
            ],
            "usage": {
                "prompt_tokens": job.input_length,
                "completion_tokens": n,
                "total_tokens": job.input_length + n,
            },
        }
        return Response(200, orjson.dumps(out), headers=self._generate_headers(job, t))

    async def _chat_events(
        self,
        text: str,
        params: dict[str, Any],
        tool: dict[str, Any] | None,
        knobs: Knobs,
        error: TgiError | None,
        t: _Timing,
        model: str,
        include_usage: bool,
        logprobs: bool,
    ) -> AsyncIterator[bytes]:
        def error_event(exc: TgiError) -> bytes:
            return self._event({"error": {"message": exc.message, "http_status_code": 422}})

        if error is not None and knobs.error_after is None:
            yield error_event(error)
            yield self._done()
            return
        try:
            job = await self._start(text, params, knobs, t, stream=True, tool=tool)
        except TgiError as exc:
            yield error_event(exc)
            yield self._done()
            return
        try:
            n = len(job.tokens)
            async for i in self._token_times(job, knobs, t, error):
                tok = job.tokens[i]
                last = i == n - 1 and knobs.error_after is None
                delta: dict[str, Any]
                if tool is not None:
                    delta = {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "",
                                "type": "function",
                                "function": {
                                    "name": tool.get("name") if i == 0 else None,
                                    "arguments": "" if tok.special else tok.text,
                                },
                            }
                        ],
                    }
                else:
                    delta = {"role": "assistant", "content": "" if tok.special else tok.text}
                yield self._event(
                    {
                        "object": "chat.completion.chunk",
                        "id": "",
                        "created": int(time.time()),
                        "model": model,
                        "system_fingerprint": self.fingerprint,
                        "choices": [
                            {
                                "index": 0,
                                "delta": delta,
                                "logprobs": _chat_logprobs(job, i, i + 1) if logprobs else None,
                                "finish_reason": _openai_finish(job.finish_reason)
                                if last
                                else None,
                            }
                        ],
                        "usage": None,
                    }
                )
            if include_usage:
                yield self._event(
                    {
                        "object": "chat.completion.chunk",
                        "id": "",
                        "created": int(time.time()),
                        "model": model,
                        "system_fingerprint": self.fingerprint,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": job.input_length,
                            "completion_tokens": n,
                            "total_tokens": job.input_length + n,
                        },
                    }
                )
        except TgiError as exc:
            yield error_event(exc)
        finally:
            self._release(job)
        yield self._done()

    async def chat_tokenize(self, req: Request) -> Response:
        body = self._begin(req, CHAT_SCHEMA)
        if isinstance(body, Response):
            return body
        try:
            text, _, _, _ = self._chat_to_generate(req.body, body)
        except SerdeError as exc:
            return deserialize_error(exc)
        except TgiError as exc:
            return exc.response()
        return Response(
            200, orjson.dumps({"tokenize_response": _tokenize(text), "templated_text": text})
        )

    # -- /v1/completions -------------------------------------------------------------

    async def completions(self, req: Request) -> Response | StreamResponse:
        body = self._begin(req, COMPLETION_SCHEMA)
        if isinstance(body, Response):
            return body
        prompt = body.get("prompt")
        if "prompt" not in body:
            return deserialize_error(serde_missing(req.body, "prompt"))
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            return deserialize_error(
                serde_custom(
                    req.body,
                    ("prompt",),
                    prompt,
                    "data did not match any variant of untagged enum Prompt",
                )
            )
        knobs = self._knobs(req)
        if isinstance(knobs, Response):
            return knobs
        self.metrics.inc("tgi_request_count")
        if body.get("suffix") is not None:
            self.metrics.inc("tgi_request_failure", err="validation")
            return TgiError(
                422,
                "Suffix is not supported and can be achieved by preprocessing the prompt.",
                "suffix not supported",
            ).response()
        if len(prompts) > self.config.max_client_batch_size:
            self.metrics.inc("tgi_request_failure", err="validation")
            return TgiError(
                422,
                "Number of prompts exceeds the maximum allowed batch size of "
                f"{self.config.max_client_batch_size}",
                "batch size exceeded",
            ).response()
        stream = bool(body.get("stream"))
        temperature = body.get("temperature")
        params: dict[str, Any] = {
            "do_sample": not (temperature is not None and temperature == 0.0),
            "temperature": None if temperature == 0.0 else temperature,
            "top_p": body.get("top_p"),
            "repetition_penalty": body.get("repetition_penalty"),
            "frequency_penalty": body.get("frequency_penalty"),
            "max_new_tokens": body.get("max_tokens") or 100,
            "stop": body.get("stop") or [],
            "seed": body.get("seed"),
            "details": True,
            "decoder_input_details": not stream,
        }
        forced = self._forced(req)
        now = self._answer_now(forced, stream, knobs)
        if now is not None:
            return now
        error = forced if isinstance(forced, TgiError) else None
        if stream:
            return StreamResponse(
                self._completion_events(prompts, params, knobs, error),
                content_type="text/event-stream",
                headers=self._stream_headers(sum(len(p) for p in prompts)),
            )
        try:
            timings = [_Timing() for _ in prompts]
            jobs = await asyncio.gather(
                *(
                    self._run_full(p, params, knobs, t, error)
                    for p, t in zip(prompts, timings, strict=True)
                )
            )
        except TgiError as exc:
            return exc.response()
        choices = []
        prompt_total = completion_total = 0
        for i, job in enumerate(jobs):
            choices.append(
                {
                    "finish_reason": _openai_finish(job.finish_reason),
                    "index": i,
                    "logprobs": None,
                    "text": job.generated_text,
                }
            )
            prompt_total += job.input_length
            completion_total += len(job.tokens)
        out = {
            "object": "text_completion",
            "id": "",
            "created": int(time.time()),
            "model": self.model_id,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_total,
                "completion_tokens": completion_total,
                "total_tokens": prompt_total + completion_total,
            },
        }
        headers = self._generate_headers(jobs[0], timings[0])
        headers = [h for h in headers if h[0] not in ("x-prompt-tokens", "x-generated-tokens")]
        headers += [
            ("x-prompt-tokens", str(prompt_total)),
            ("x-generated-tokens", str(completion_total)),
        ]
        return Response(200, orjson.dumps(out), headers=headers)

    async def _completion_events(
        self,
        prompts: list[str],
        params: dict[str, Any],
        knobs: Knobs,
        error: TgiError | None,
    ) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def one(index: int, prompt: str) -> None:
            async for event in self._completion_one(index, prompt, params, knobs, error):
                await queue.put(event)

        async def run_all() -> None:
            try:
                await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            finally:
                await queue.put(None)

        task = asyncio.ensure_future(run_all())
        try:
            while (item := await queue.get()) is not None:
                yield item
            yield self._done()
        finally:
            task.cancel()

    async def _completion_one(
        self,
        index: int,
        prompt: str,
        params: dict[str, Any],
        knobs: Knobs,
        error: TgiError | None,
    ) -> AsyncIterator[bytes]:
        if error is not None and knobs.error_after is None:
            yield self._event(error.body())
            return
        t = _Timing()
        try:
            job = await self._start(prompt, params, knobs, t, stream=True)
        except TgiError as exc:
            yield self._event(exc.body())
            return
        try:
            n = len(job.tokens)
            async for i in self._token_times(job, knobs, t, error):
                tok = job.tokens[i]
                head = {
                    "object": "text_completion",
                    "id": "",
                    "created": int(time.time()),
                    "model": self.model_id,
                    "system_fingerprint": self.fingerprint,
                }
                if i == n - 1 and knobs.error_after is None:
                    yield self._event(
                        {
                            **head,
                            "choices": [
                                {
                                    "finish_reason": job.finish_reason,
                                    "index": index,
                                    "logprobs": None,
                                    "text": tok.text,  # the EOS text leaks here, as in TGI
                                }
                            ],
                            "usage": {
                                "prompt_tokens": job.input_length,
                                "completion_tokens": n,
                                "total_tokens": job.input_length + n,
                            },
                        }
                    )
                else:
                    yield self._event(
                        {
                            **head,
                            "choices": [
                                {
                                    "finish_reason": "",
                                    "index": index,
                                    "logprobs": None,
                                    "text": tok.text,
                                }
                            ],
                        }
                    )
        except TgiError as exc:
            yield self._event(exc.body())
        finally:
            self._release(job)

    # -- info routes -------------------------------------------------------------------

    async def info(self, req: Request) -> Response:
        c = self.config
        return Response(
            200,
            orjson.dumps(
                {
                    "model_id": self.model_id,
                    "model_sha": None,
                    "model_pipeline_tag": "text-generation",
                    "max_concurrent_requests": c.max_concurrent_requests,
                    "max_best_of": c.max_best_of,
                    "max_stop_sequences": c.max_stop_sequences,
                    "max_input_tokens": c.input_limit,
                    "max_total_tokens": c.max_total_tokens,
                    "validation_workers": 2,
                    "max_client_batch_size": c.max_client_batch_size,
                    "router": "text-generation-router",
                    "version": c.version,
                    "sha": None,
                    "docker_label": c.docker_label,
                }
            ),
        )

    async def health(self, req: Request) -> Response:
        if self.health_status != 200:
            return TgiError(self.health_status, "unhealthy", "healthcheck").response()
        return Response(200, b"", content_type=None)

    async def models(self, req: Request) -> Response:
        return Response(
            200,
            orjson.dumps(
                {
                    "object": "list",
                    "data": [
                        {
                            "id": self.model_id,
                            "object": "model",
                            "created": 0,
                            "owned_by": self.model_id,
                        }
                    ],
                }
            ),
        )

    async def prometheus(self, req: Request) -> Response:
        s = self.scheduler
        body = self.metrics.render(
            {
                "tgi_queue_size": s.waiting,
                "tgi_batch_current_size": s.running,
                "tgi_batch_current_max_tokens": self.running_tokens,
            }
        )
        return plain_text(200, body.decode())

    async def unknown_route(self, req: Request) -> Response:
        self._record(req, json_or_text(req.body))
        return Response(404, b"", content_type=None)


# --- helpers for chat ----------------------------------------------------------------


def _tokenize(text: str) -> list[dict[str, Any]]:
    out = []
    pos = 0
    for word in text.split():
        start = text.index(word, pos)
        pos = start + len(word)
        out.append(
            {"id": _WORD_IDS.get(" " + word, 999), "text": word, "start": start, "stop": pos}
        )
    return out


def _chat_logprobs(job: Job, start: int, stop: int) -> dict[str, Any]:
    content = []
    for i in range(start, stop):
        tok = job.tokens[i]
        top = (
            [
                {"token": alt["text"], "logprob": alt["logprob"]}
                for alt in _top_tokens(tok, i, job.top_n_tokens)
            ]
            if job.top_n_tokens
            else []
        )
        content.append({"token": tok.text, "logprob": tok.logprob, "top_logprobs": top})
    return {"content": content}


def _tool_job(job: Job, tool: dict[str, Any]) -> Job:
    """The job re-planned as a tool call: the arguments JSON in small pieces, then EOS."""
    args = tool_arguments(tool, job.inputs)
    pieces = [args[i : i + 5] for i in range(0, len(args), 5)]
    tokens = [
        Tok(_WORD_IDS.get(" the", 999), p, _logprob(7, i), False) for i, p in enumerate(pieces)
    ]
    if len(tokens) < job.max_new_tokens:
        tokens.append(EOS)
        reason = "eos_token"
    else:
        tokens = tokens[: job.max_new_tokens]
        reason = "length"
    job.tokens = tokens
    job.finish_reason = reason
    return job


# --- CLI -----------------------------------------------------------------------------


def build_app(config: TgiConfig | None = None) -> App:
    return TgiSimulator(config).app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the TGI personality's flags to the ``python -m backends`` parser."""
    d = TgiConfig()
    g = parser.add_argument_group("tgi personality")
    add_common_arguments(
        g,
        d,
        DEFAULT_MODEL,
        f"model id (like --model-id; repeatable, the first is reported; default {DEFAULT_MODEL})",
    )
    g.add_argument(
        "--max-total-tokens",
        "--max-model-len",
        dest="max_total_tokens",
        type=int,
        default=d.max_total_tokens,
        help="input + generated tokens per request (TGI flag; --max-model-len is an alias)",
    )
    g.add_argument(
        "--max-input-tokens", type=int, default=None, help="default: max-total-tokens - 1"
    )
    g.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests)
    g.add_argument("--max-best-of", type=int, default=d.max_best_of)
    g.add_argument("--max-stop-sequences", type=int, default=d.max_stop_sequences)
    g.add_argument("--max-top-n-tokens", type=int, default=d.max_top_n_tokens)
    g.add_argument("--max-client-batch-size", type=int, default=d.max_client_batch_size)
    g.add_argument("--payload-limit", type=int, default=d.payload_limit)
    g.add_argument("--api-key", default=None, help="require Authorization: Bearer <key>")
    g.add_argument("--tgi-version", default=d.version, help="reported by /info")
    g.add_argument("--docker-label", default=None)
    g.add_argument("--compute-type", default=d.compute_type, help="x-compute-type header")
    g.add_argument(
        "--sse-space",
        action="store_true",
        help="write 'data: ' (newer axum) instead of TGI 3.x's 'data:'",
    )


def config_from_args(args: argparse.Namespace) -> TgiConfig:
    return TgiConfig(
        **common_config(args),
        models=list(args.models or [DEFAULT_MODEL]),
        max_total_tokens=args.max_total_tokens,
        max_input_tokens=args.max_input_tokens,
        max_concurrent_requests=args.max_concurrent_requests,
        max_best_of=args.max_best_of,
        max_stop_sequences=args.max_stop_sequences,
        max_top_n_tokens=args.max_top_n_tokens,
        max_client_batch_size=args.max_client_batch_size,
        payload_limit=args.payload_limit,
        api_key=args.api_key,
        version=args.tgi_version,
        docker_label=args.docker_label,
        compute_type=args.compute_type,
        sse_space=args.sse_space,
    )


def app_from_args(args: argparse.Namespace) -> App:
    return build_app(config_from_args(args))
