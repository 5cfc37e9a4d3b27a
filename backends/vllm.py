"""The vLLM personality: a fast simulator of vLLM's OpenAI-compatible server.

Wire format follows ``vllm serve`` (``vllm/entrypoints/openai``; see
``shared/reference/backends.md`` section 1): response bodies carry vLLM's extra fields,
streams follow ``chat_completion_stream_generator`` chunk for chunk, errors use vLLM's
nested shape ``{"error": {"message", "type", "param", "code": <int status>}}``, and
``/metrics`` uses vLLM's Prometheus names. Output text comes from :mod:`backends.textgen`,
so the same prompt always yields the same text.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
``GET /v1/models``, ``GET /health``, ``GET|POST /ping``, ``GET /metrics``, ``GET /version``;
simulator control: ``GET|DELETE /sim/requests``, ``GET|POST /sim/config``.

Per-request knobs (headers): ``x-sim-ttft-ms``, ``x-sim-itl-ms``, ``x-sim-output-tokens``,
``x-sim-error: <status>`` (answer that error at once), ``x-sim-error-after: <k>`` (a stream
sends k tokens, k of each choice, then an in-stream error frame and ``[DONE]``; a
non-stream request answers 500 after its generation time).

``n`` (several choices per prompt) works as in vLLM: chat answers n choices, completions
``len(prompt) * n`` (choice ``index = prompt_index * n + j``); each choice has its own
deterministic text (choice 0 is what ``n=1`` gives); ``usage`` counts every prompt once and
sums the completion tokens of all choices. Streams send one role chunk per choice (chat),
then one-choice chunks with the choices advancing together token by token; continuous usage
stats are per choice (vLLM's ``previous_num_tokens[i]``), the final usage chunk is the sum.
``/metrics`` counts each choice as a finished request, as vLLM's engine does with the n child
requests it splits such a request into.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import orjson

from backends import textgen
from backends.common import (
    QUEUED,
    REJECTED,
    BadKnob,
    Histogram,
    Scheduler,
    SimControl,
    add_common_arguments,
    common_config,
    fmt_float,
    json_or_text,
    knob_float,
    knob_int,
    label_value,
    pick_tool,
    tool_arguments,
)
from backends.http import App, Header, Request, Response, StreamResponse, not_found

__all__ = [
    "KIND",
    "VLLM_VERSION",
    "Scheduler",
    "VllmConfig",
    "VllmSimulator",
    "add_arguments",
    "build_app",
    "config_from_args",
]

KIND = "vllm"
VLLM_VERSION = "0.11.0"
DEFAULT_MODEL = "facebook/opt-125m"  # what `vllm serve` loads when given no model

_SSE_DONE = b"data: [DONE]\n\n"

# the shared helpers under their historical private names
_BadKnob = BadKnob
_knob_float = knob_float
_knob_int = knob_int
_fmt = fmt_float
_label_value = label_value
_json_or_text = json_or_text


@dataclass
class VllmConfig:
    """Settings of one simulated vLLM server (each is also a CLI flag)."""

    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    max_model_len: int = 32768
    embedding_dim: int = 384
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    output_tokens: int = 16
    max_running: int = 256
    max_queue: int = 256
    keep_alive_timeout: float = 5.0
    enable_force_include_usage: bool = False
    version: str = VLLM_VERSION
    pod_name: str | None = None
    history: int = 200


# --- errors --------------------------------------------------------------------------

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    501: "NotImplementedError",
}


def error_type_for(status: int) -> str:
    """The Python-class-style ``type`` vLLM / the llm-d sim put in an error of ``status``."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    if status >= 500:
        return "InternalServerError"
    try:
        return HTTPStatus(status).phrase.replace(" ", "") + "Error"
    except ValueError:
        return "APIError"


def error_obj(message: str, type_: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type_: str | None = None,
    param: str | None = None,
    headers: list[Header] | None = None,
) -> Response:
    body = orjson.dumps(error_obj(message, type_ or error_type_for(status), status, param))
    return Response(status, body, headers=headers)


def _loc_param(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def validation_error(
    errors: list[dict[str, Any] | str], headers: list[Header] | None = None
) -> Response:
    """vLLM's answer to a FastAPI/pydantic ``RequestValidationError``: 400 ``Bad Request``.

    The message lists the errors the way vLLM's ``validation_exception_handler`` does
    (``"1 validation error:\\n  {...}"``); ``param`` is the first error's dotted ``loc``.
    """
    param = None
    first = errors[0] if errors else None
    if isinstance(first, dict) and first.get("loc"):
        param = _loc_param(first["loc"])
    label = "error" if len(errors) == 1 else "errors"
    message = f"{len(errors)} validation {label}:\n" + "".join(f"  {e}\n" for e in errors)
    return error_response(400, message.rstrip(), "Bad Request", param, headers)


def _field_error(kind: str, loc: tuple[Any, ...], msg: str) -> dict[str, Any]:
    return {"type": kind, "loc": ("body", *loc), "msg": msg}


_INJECTED_MESSAGES = {
    400: (
        "This model's maximum context length is 4096 tokens. However, your messages "
        "resulted in 4500 tokens.",
        "messages",
    ),
    401: ("Incorrect API key provided.", None),
    403: ("You are not allowed to access this resource.", None),
    404: ("The model `{model}` does not exist.", "model"),
    429: (
        "Rate limit reached for {model} in organization org-xxx on requests per min (RPM): "
        "Limit 3, Used 3, Requested 1.",
        None,
    ),
    500: ("Internal server error", None),
    503: ("The server is overloaded or not ready yet.", None),
}


# --- metrics -------------------------------------------------------------------------

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


class Metrics:
    """vLLM's Prometheus metrics, labelled ``model_name`` and ``engine="0"``."""

    def __init__(self, model_name: str, scheduler: Scheduler) -> None:
        self.labels = f'model_name="{_label_value(model_name)}",engine="0"'
        self.scheduler = scheduler
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = dict.fromkeys(FINISH_REASONS, 0)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.queue = Histogram(LATENCY_BUCKETS)

    def finish(
        self,
        reason: str,
        prompt_tokens: int,
        generated: int,
        queue_time: float,
        ttft: float | None,
        itl: float,
        e2e: float,
    ) -> None:
        self.success[reason] = self.success.get(reason, 0) + 1
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += generated
        self.queue.observe(queue_time)
        if ttft is not None:
            self.ttft.observe(ttft)
        if generated > 1:
            self.itl.observe(itl, generated - 1)
        self.e2e.observe(e2e)

    def render(self) -> bytes:
        s = self.scheduler
        lb = self.labels
        out: list[str] = []

        def gauge(name: str, doc: str, value: float) -> None:
            out.append(f"# HELP {name} {doc}")
            out.append(f"# TYPE {name} gauge")
            out.append(f"{name}{{{lb}}} {_fmt(value)}")

        def counter(name: str, doc: str, value: float) -> None:
            out.append(f"# HELP {name} {doc}")
            out.append(f"# TYPE {name} counter")
            out.append(f"{name}{{{lb}}} {_fmt(value)}")

        def histogram(name: str, doc: str, hist: Histogram) -> None:
            out.append(f"# HELP {name} {doc}")
            out.append(f"# TYPE {name} histogram")
            hist.render(name, lb, out)

        gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            s.running,
        )
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.waiting)
        gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            min(1.0, s.running / s.max_running) if s.max_running > 0 else 0.0,
        )
        counter(
            "vllm:num_preemptions_total",
            "Cumulative number of preemption from the engine.",
            0,
        )
        counter(
            "vllm:prefix_cache_queries_total",
            "Prefix cache queries, in terms of number of queried tokens.",
            self.prompt_tokens,
        )
        counter(
            "vllm:prefix_cache_hits_total",
            "Prefix cache hits, in terms of number of cached tokens.",
            0,
        )
        counter(
            "vllm:prompt_tokens_total", "Number of prefill tokens processed.", self.prompt_tokens
        )
        counter(
            "vllm:generation_tokens_total",
            "Number of generation tokens processed.",
            self.generation_tokens,
        )
        name = "vllm:request_success_total"
        out.append(f"# HELP {name} Count of successfully processed requests.")
        out.append(f"# TYPE {name} counter")
        for reason, value in self.success.items():
            out.append(f'{name}{{{lb},finished_reason="{reason}"}} {_fmt(value)}')
        histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            self.ttft,
        )
        histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            self.itl,
        )
        histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            self.e2e,
        )
        histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            self.queue,
        )
        return ("\n".join(out) + "\n").encode()


# --- the simulator -------------------------------------------------------------------


class _Gen:
    """One planned generation (per prompt)."""

    __slots__ = ("finish_reason", "prompt_tokens", "tokens")

    def __init__(self, prompt_tokens: int, tokens: tuple[str, ...], finish_reason: str) -> None:
        self.prompt_tokens = prompt_tokens
        self.tokens = tokens
        self.finish_reason = finish_reason


class _Plan:
    """Everything a generation request needs once validated."""

    __slots__ = (
        "arrival",
        "continuous_usage",
        "created",
        "error_after",
        "gens",
        "headers",
        "include_usage",
        "itl",
        "n",
        "rid",
        "tool",
        "ttft",
    )

    def __init__(
        self,
        rid: str,
        headers: list[Header],
        gens: list[_Gen],
        ttft: float,
        itl: float,
        error_after: int | None,
    ) -> None:
        self.rid = rid
        self.headers = headers
        self.gens = gens
        self.tool: str | None = None  # a tool call's function name (its arguments: the tokens)
        self.ttft = ttft
        self.itl = itl
        self.error_after = error_after
        self.created = int(time.time())
        self.arrival = time.perf_counter()
        self.include_usage = False
        self.continuous_usage = False
        self.n = 1  # choices per prompt: ``gens`` is prompt-major, ``len(prompts) * n`` long


def _choice_seed(seed: bytes, j: int) -> bytes:
    """The text seed of choice ``j`` of a prompt: choice 0 is the prompt's own seed (the
    ``n=1`` text), later choices a deterministic derivation, so each choice reads differently."""
    if j == 0:
        return seed
    return hashlib.blake2b(
        seed + j.to_bytes(4, "little"), digest_size=16, person=b"tollgate-choice"
    ).digest()


def _tool_call_id(plan: _Plan, i: int) -> str:
    """The ``chatcmpl-tool-<hex>`` id of choice ``i``'s tool call (vLLM makes a fresh one per
    choice; the simulator derives them from the request id so they stay reproducible)."""
    if i == 0:
        return "chatcmpl-tool-" + plan.rid[-16:]
    digest = hashlib.blake2b(f"{plan.rid}:{i}".encode(), digest_size=8).hexdigest()
    return "chatcmpl-tool-" + digest


def _prompt_tokens(plan: _Plan) -> int:
    """Prompt tokens of the request: each prompt counted once, however many choices it has."""
    return sum(g.prompt_tokens for g in plan.gens[:: plan.n])


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }


class VllmSimulator(SimControl):
    """State and handlers of one simulated vLLM server; ``self.app`` is what to serve."""

    config: VllmConfig

    def __init__(self, config: VllmConfig | None = None) -> None:
        config = config or VllmConfig()
        if not config.models:
            config.models = [DEFAULT_MODEL]
        super().__init__(config)
        self.model_name = config.models[0]
        self.served = frozenset(config.models)
        self.metrics = Metrics(self.model_name, self.scheduler)
        headers: list[Header] = []
        if config.pod_name:
            headers.append(("x-inference-pod", config.pod_name))
        self.app = App(
            server_header="uvicorn",
            keep_alive_timeout=config.keep_alive_timeout,
            default_headers=headers,
        )
        route = self.app.route
        route("POST", "/v1/chat/completions", self.chat_completions)
        route("POST", "/v1/completions", self.completions)
        route("POST", "/v1/embeddings", self.embeddings)
        route("GET", "/v1/models", self.models)
        route("GET", "/health", self.health)
        route("GET", "/ping", self.health)
        route("POST", "/ping", self.health)
        route("GET", "/metrics", self.prometheus)
        route("GET", "/metrics/", self.prometheus)
        route("GET", "/version", self.version)
        self.add_control_routes(self.app)
        self.app.fallback = self.unknown_route

    # -- helpers -----------------------------------------------------------------------

    @staticmethod
    def _rid_headers(req: Request, rid: str | None = None) -> tuple[str, list[Header]]:
        header = req.headers.get("x-request-id")
        if rid is None:
            rid = header or os.urandom(16).hex()
        return rid, [("x-request-id", header or rid)]

    def _injected(self, raw: str, model: Any, headers: list[Header]) -> Response:
        try:
            status = int(raw)
        except ValueError:
            status = 0
        if not 400 <= status <= 599:
            return error_response(
                400, f"invalid x-sim-error header: {raw!r} (want 400..599)", headers=headers
            )
        return self._forced_error(status, model, headers)

    def _forced_error(self, status: int, model: Any, headers: list[Header]) -> Response:
        name = model if isinstance(model, str) and model else self.model_name
        template, param = _INJECTED_MESSAGES.get(status, (None, None))
        message = template.format(model=name) if template else HTTPStatus(status).phrase
        return error_response(status, message, param=param, headers=headers)

    def _begin(self, req: Request) -> tuple[dict[str, Any], str, list[Header]] | Response:
        """Shared start of the JSON POST routes: record, inject, parse, check media type."""
        try:
            body: Any = orjson.loads(req.body) if req.body else None
            json_error: orjson.JSONDecodeError | None = None
        except orjson.JSONDecodeError as exc:
            body, json_error = None, exc
        self._record(req, req.body.decode("utf-8", "replace") if json_error else body)
        request_id = body.get("request_id") if isinstance(body, dict) else None
        rid, headers = self._rid_headers(
            req,
            req.headers.get("x-request-id")
            or (request_id if isinstance(request_id, str) and request_id else None),
        )
        model = body.get("model") if isinstance(body, dict) else None
        forced = req.headers.get("x-sim-error")
        if forced is not None:
            return self._injected(forced, model, headers)
        configured = self._configured_error()
        if configured is not None:
            return self._forced_error(configured, model, headers)
        media_type = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            return validation_error(
                ["Unsupported Media Type: Only 'application/json' is allowed"], headers
            )
        if json_error is not None or body is None:
            pos = json_error.pos if json_error is not None else 0
            return validation_error(
                [{"type": "json_invalid", "loc": ("body", pos), "msg": "JSON decode error"}],
                headers,
            )
        if not isinstance(body, dict):
            return validation_error(
                [
                    _field_error(
                        "model_attributes_type",
                        (),
                        "Input should be a valid dictionary or object to extract fields from",
                    )
                ],
                headers,
            )
        return body, rid, headers

    def _check_model(self, body: dict[str, Any], headers: list[Header]) -> Response | None:
        model = body.get("model")
        if model is None:
            return None
        if not isinstance(model, str):
            return validation_error(
                [_field_error("string_type", ("model",), "Input should be a valid string")],
                headers,
            )
        if model and model not in self.served:
            return error_response(
                404, f"The model `{model}` does not exist.", "NotFoundError", "model", headers
            )
        return None

    def _stream_flags(
        self, body: dict[str, Any], headers: list[Header]
    ) -> tuple[bool, bool, bool] | Response:
        """(stream, include_usage, continuous_usage) with vLLM's validation and semantics."""
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            return validation_error(
                [_field_error("bool_type", ("stream",), "Input should be a valid boolean")],
                headers,
            )
        options = body.get("stream_options")
        if options and not stream:
            return error_response(
                400,
                "Stream options can only be defined when `stream=True`.",
                "BadRequestError",
                "stream_options",
                headers,
            )
        if options is not None and not isinstance(options, dict):
            return validation_error(
                [
                    _field_error(
                        "model_type",
                        ("stream_options",),
                        "Input should be a valid dictionary or instance of StreamOptions",
                    )
                ],
                headers,
            )
        force = self.config.enable_force_include_usage
        if options is not None:  # vLLM: include_usage defaults to true once the object exists
            include = bool(options.get("include_usage", True)) or force
            continuous = include and bool(options.get("continuous_usage_stats", False))
        else:
            include, continuous = force, False
        return bool(stream), include, continuous

    def _max_tokens(
        self, body: dict[str, Any], default: int | None, headers: list[Header]
    ) -> tuple[int | None, str] | Response:
        value = body.get("max_completion_tokens")
        param = "max_completion_tokens"
        if value is None:
            value, param = body.get("max_tokens"), "max_tokens"
        if value is None:
            return default, param
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return validation_error(
                [_field_error("int_type", (param,), "Input should be a valid integer")], headers
            )
        if value < 1:
            message = f"max_tokens must be at least 1, got {value}."
            return error_response(400, message, "BadRequestError", param, headers)
        return value, param

    @staticmethod
    def _num_choices(body: dict[str, Any], headers: list[Header]) -> int | Response:
        """``n``, the number of choices per prompt (absent or null: 1).

        pydantic's ``n: Optional[int]`` takes a whole float (``2.0``) and rejects any other
        non-integer with a validation 400; vLLM's ``SamplingParams._verify_args`` then rejects
        ``n < 1``, and ``_verify_greedy_sampling`` ``n > 1`` with ``temperature: 0`` (small
        positive temperatures are raised to 0.01 first, so only 0 is greedy). vLLM 0.11 raises
        both as a plain ``ValueError``: a 400 ``BadRequestError`` with ``param`` null.
        """
        value = body.get("n")
        if value is None:
            return 1
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, float):
            msg = "Input should be a valid integer, got a number with a fractional part"
            return validation_error([_field_error("int_from_float", ("n",), msg)], headers)
        if isinstance(value, bool) or not isinstance(value, int):
            return validation_error(
                [_field_error("int_type", ("n",), "Input should be a valid integer")], headers
            )
        if value < 1:
            message = f"n must be at least 1, got {value}."
            return error_response(400, message, "BadRequestError", None, headers)
        temperature = body.get("temperature")
        if value > 1 and temperature == 0 and not isinstance(temperature, bool):
            message = f"n must be 1 when using greedy sampling, got {value}."
            return error_response(400, message, "BadRequestError", None, headers)
        return value

    def _knobs(self, req: Request) -> tuple[float, float, int, int | None]:
        h, c = req.headers, self.config
        ttft = _knob_float(h, "x-sim-ttft-ms", c.ttft_ms) / 1000.0
        itl = _knob_float(h, "x-sim-itl-ms", c.itl_ms) / 1000.0
        out = _knob_int(h, "x-sim-output-tokens", c.output_tokens, 1)
        error_after = _knob_int(h, "x-sim-error-after", None, 0)
        assert out is not None
        return ttft, itl, out, error_after

    def _plan_gens(
        self,
        prompts: list[tuple[bytes, int]],
        limit: int | None,
        limit_param: str,
        natural: int,
        prompt_param: str,
        headers: list[Header],
        choices: int = 1,
    ) -> list[_Gen] | Response:
        """Check each prompt against the context and plan its ``choices`` generations
        (prompt-major: prompt p's choice j is ``gens[p * choices + j]``). Every choice of a
        prompt gets the same length (the ``max_tokens`` limit, else the natural length, cut to
        the context room) and its own text (:func:`_choice_seed`)."""
        max_len = self.config.max_model_len
        gens = []
        for seed, prompt_tokens in prompts:
            if prompt_tokens >= max_len:
                return error_response(
                    400,
                    f"This model's maximum context length is {max_len} tokens. However, your "
                    f"request has {prompt_tokens} input tokens. Please reduce the length of "
                    "the input messages.",
                    "BadRequestError",
                    prompt_param,
                    headers,
                )
            if limit is not None and prompt_tokens + limit > max_len:
                return error_response(
                    400,
                    f"'max_tokens' or 'max_completion_tokens' is too large: {limit}. This "
                    f"model's maximum context length is {max_len} tokens and your request has "
                    f"{prompt_tokens} input tokens ({limit} > {max_len} - {prompt_tokens}).",
                    "BadRequestError",
                    limit_param,
                    headers,
                )
            if limit is not None and limit < natural:
                n, reason = limit, "length"
            else:
                n, reason = natural, "stop"
            room = max_len - prompt_tokens
            if n > room:
                n, reason = room, "length"
            for j in range(choices):
                tokens = textgen.generate_tokens(_choice_seed(seed, j), n)
                gens.append(_Gen(prompt_tokens, tokens, reason))
        return gens

    def _queue_full(self, headers: list[Header]) -> Response:
        return error_response(
            429,
            "Failed to enqueue request, waiting requests queue is full",
            "RateLimitError",
            None,
            headers,
        )

    def _finish(self, plan: _Plan, reason: str, generated: list[int], t_start: float,
                t_first: float | None) -> None:  # fmt: skip
        now = time.perf_counter()
        queue_time = t_start - plan.arrival
        ttft = None if t_first is None else t_first - plan.arrival
        for gen, n in zip(plan.gens, generated, strict=False):
            final = reason if reason != "ok" else gen.finish_reason
            self.metrics.finish(
                final, gen.prompt_tokens, n, queue_time, ttft, plan.itl, now - plan.arrival
            )

    async def _generate_full(self, plan: _Plan, render: Callable[[], bytes]) -> Response:
        """Admit, sleep the whole generation time, answer (non-stream)."""
        state = self.scheduler.admit()
        if state == REJECTED:
            return self._queue_full(plan.headers)
        if state == QUEUED:
            await self.scheduler.wait()
        t_start = time.perf_counter()
        reason = "abort"
        longest = max(len(g.tokens) for g in plan.gens)
        generated = [0] * len(plan.gens)
        try:
            delay = plan.ttft + longest * plan.itl
            if delay > 0:
                await asyncio.sleep(delay)
            if plan.error_after is not None:
                reason = "error"
                generated = [min(plan.error_after, len(g.tokens)) for g in plan.gens]
                return error_response(
                    500,
                    "The request failed during generation (x-sim-error-after).",
                    "InternalServerError",
                    None,
                    plan.headers,
                )
            reason = "ok"
            generated = [len(g.tokens) for g in plan.gens]
            return Response(200, render(), headers=plan.headers)
        finally:
            self.scheduler.release()
            self._finish(plan, reason, generated, t_start, t_start + plan.ttft)

    async def _admit_stream(self, plan: _Plan) -> Response | None:
        state = self.scheduler.admit()
        if state == REJECTED:
            return self._queue_full(plan.headers)
        if state == QUEUED:
            await self.scheduler.wait()
        return None

    # -- generation routes -------------------------------------------------------------

    async def chat_completions(self, req: Request) -> Response | StreamResponse:
        begun = self._begin(req)
        if isinstance(begun, Response):
            return begun
        body, rid, headers = begun
        try:
            prompt_text, prompt_tokens = textgen.chat_prompt(body.get("messages"))
        except textgen.ChatPromptError as exc:
            kind, msg = exc.kind, exc.msg
            if "messages" not in body:
                kind, msg = "missing", "Field required"
            return validation_error([_field_error(kind, ("messages", *exc.loc), msg)], headers)
        flags = self._stream_flags(body, headers)
        if isinstance(flags, Response):
            return flags
        stream, include_usage, continuous = flags
        bad_model = self._check_model(body, headers)
        if bad_model is not None:
            return bad_model
        limit = self._max_tokens(body, None, headers)
        if isinstance(limit, Response):
            return limit
        choices = self._num_choices(body, headers)
        if isinstance(choices, Response):
            return choices
        try:
            ttft, itl, natural, error_after = self._knobs(req)
        except _BadKnob as exc:
            return error_response(400, str(exc), headers=headers)
        gens = self._plan_gens(
            [(textgen.prompt_seed(prompt_text), prompt_tokens)],
            limit[0],
            limit[1],
            natural,
            "messages",
            headers,
            choices,
        )
        if isinstance(gens, Response):
            return gens
        role = "assistant"
        if body.get("add_generation_prompt") is False:
            role = str(body["messages"][-1].get("role", "assistant"))
        plan = _Plan("chatcmpl-" + rid, headers, gens, ttft, itl, error_after)
        plan.n = choices
        bad_tools = self._plan_tool_call(plan, body, prompt_text, limit[0])
        if bad_tools is not None:
            return bad_tools
        if not stream:
            return await self._generate_full(plan, lambda: self._chat_body(plan, role))
        plan.include_usage, plan.continuous_usage = include_usage, continuous
        rejected = await self._admit_stream(plan)
        if rejected is not None:
            return rejected
        return StreamResponse(
            self._chat_stream(plan, role),
            headers=headers,
            on_close=self.scheduler.release,
        )

    @staticmethod
    def _plan_tool_call(
        plan: _Plan, body: dict[str, Any], prompt: str, limit: int | None
    ) -> Response | None:
        """With ``tools`` (and ``tool_choice`` not ``none``) the answer is a call of the named
        tool, or of the first for ``auto``/``required`` (as a server started with
        ``--enable-auto-tool-choice`` and a tool parser): arguments that satisfy the function's
        schema, generated 5 characters per token. With ``n > 1`` every choice makes the same
        call (the arguments derive from the prompt)."""
        tools = body.get("tools")
        if tools is None:
            return None
        if not isinstance(tools, list) or not all(
            isinstance(t, dict)
            and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str)
            for t in tools
        ):
            return validation_error(
                [_field_error("list_type", ("tools",), "Input should be a valid list of tools")],
                plan.headers,
            )
        try:
            tool = pick_tool(tools, body.get("tool_choice", "auto"))
        except LookupError as exc:
            return error_response(
                400,
                f"Tool '{exc.args[0]}' has not been passed in `tools`.",
                "BadRequestError",
                "tool_choice",
                plan.headers,
            )
        if tool is None:
            return None
        args = tool_arguments(tool, prompt)
        pieces = tuple(args[i : i + 5] for i in range(0, len(args), 5))
        for gen in plan.gens:
            if limit is not None and limit < len(pieces):
                gen.tokens, gen.finish_reason = pieces[:limit], "length"
            else:
                gen.tokens, gen.finish_reason = pieces, "tool_calls"
        plan.tool = tool["name"]
        return None

    def _chat_body(self, plan: _Plan, role: str) -> bytes:
        """vLLM's ``chat_completion_full_generator``: one choice per output; ``usage`` has the
        prompt once and the completion tokens of all choices summed."""
        choices = [self._chat_choice(plan, role, i, gen) for i, gen in enumerate(plan.gens)]
        completion = sum(len(g.tokens) for g in plan.gens)
        return orjson.dumps(
            {
                "id": plan.rid,
                "object": "chat.completion",
                "created": plan.created,
                "model": self.model_name,
                "choices": choices,
                "service_tier": None,
                "system_fingerprint": None,
                "usage": {
                    **_usage(_prompt_tokens(plan), completion),
                    "prompt_tokens_details": None,
                },
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "kv_transfer_params": None,
            }
        )

    @staticmethod
    def _chat_choice(plan: _Plan, role: str, i: int, gen: _Gen) -> dict[str, Any]:
        """Choice ``i`` of a non-stream chat answer (its text, or its tool call)."""
        content: str | None = "".join(gen.tokens)
        tool_calls: list[dict[str, Any]] = []
        if plan.tool is not None:
            tool_calls = [
                {
                    "id": _tool_call_id(plan, i),
                    "type": "function",
                    "function": {"name": plan.tool, "arguments": content},
                }
            ]
            content = None
        return {
            "index": i,
            "message": {
                "role": role,
                "content": content,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "tool_calls": tool_calls,
                "reasoning": None,
            },
            "logprobs": None,
            "finish_reason": gen.finish_reason,
            "stop_reason": None,
            "token_ids": None,
        }

    @staticmethod
    def _steps(plan: _Plan) -> int:
        """How many token steps a stream sends: the longest choice's length, or at most
        ``x-sim-error-after`` steps. With several choices (or prompts) a step sends the next
        token of every unfinished choice, so ``x-sim-error-after: k`` lets each choice stream
        its first k tokens (k chunks per choice, not k in total) before the error frame, the
        same count the non-stream bookkeeping uses."""
        longest = max(len(g.tokens) for g in plan.gens)
        return longest if plan.error_after is None else min(plan.error_after, longest)

    @staticmethod
    async def _pace(plan: _Plan, t_first: float, step: int) -> None:
        """Sleep until token step ``step`` is due: ``itl`` apart, starting at ``t_first``."""
        if step and plan.itl > 0:
            delay = t_first + step * plan.itl - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)

    async def _chat_stream(self, plan: _Plan, role: str) -> AsyncIterator[bytes]:
        """vLLM's ``chat_completion_stream_generator``.

        First one role chunk per choice (``index`` 0..n-1); then one chunk per token, each
        holding a single choice, the choices advancing together (step k sends token k of
        choice 0, then of choice 1, ...; a finished choice sends nothing more); a choice's
        last token chunk carries its ``finish_reason``. With continuous usage every chunk's
        ``completion_tokens`` is that choice's own running count (``previous_num_tokens[i]``,
        0 on the role chunks), not the request's; the final usage chunk has the prompt once
        and the sum over the choices.
        """
        gens = plan.gens
        prompt_tokens = _prompt_tokens(plan)
        error_after = plan.error_after
        head = {
            "id": plan.rid,
            "object": "chat.completion.chunk",
            "created": plan.created,
            "model": self.model_name,
        }
        continuous = plan.continuous_usage
        t_start = time.perf_counter()
        t_first: float | None = None
        sent = [0] * len(gens)
        reason = "abort"
        try:
            if plan.ttft > 0:
                await asyncio.sleep(plan.ttft)
            t_first = time.perf_counter()
            for i in range(len(gens)):
                first: dict[str, Any] = {
                    **head,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": role, "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
                if continuous:
                    first["usage"] = _usage(prompt_tokens, 0)
                first["prompt_token_ids"] = None
                yield _sse(first)
            for step in range(self._steps(plan)):
                await self._pace(plan, t_first, step)
                for i, gen in enumerate(gens):
                    if step >= len(gen.tokens):
                        continue
                    sent[i] = step + 1
                    yield _sse(self._chat_chunk(plan, head, i, gen, step, prompt_tokens))
            if error_after is not None:
                reason = "error"
                yield self._stream_error()
                yield _SSE_DONE
                return
            reason = "ok"
            if plan.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, sum(sent))})
            yield _SSE_DONE
        finally:
            self._finish(plan, reason, sent, t_start, t_first)

    @staticmethod
    def _chat_chunk(
        plan: _Plan, head: dict[str, Any], i: int, gen: _Gen, step: int, prompt_tokens: int
    ) -> dict[str, Any]:
        """The stream chunk of choice ``i``'s token ``step``."""
        token = gen.tokens[step]
        delta: dict[str, Any] = {"content": token}
        if plan.tool is not None:  # vLLM streams a tool call's arguments as deltas
            call: dict[str, Any] = {"index": 0, "function": {"arguments": token}}
            if step == 0:
                call["id"] = _tool_call_id(plan, i)
                call["type"] = "function"
                call["function"]["name"] = plan.tool
            delta = {"tool_calls": [call]}
        choice: dict[str, Any] = {
            "index": i,
            "delta": delta,
            "logprobs": None,
            "finish_reason": None,
        }
        if plan.error_after is None and step == len(gen.tokens) - 1:
            choice["finish_reason"] = gen.finish_reason
            choice["stop_reason"] = None
        choice["token_ids"] = None
        chunk: dict[str, Any] = {**head, "choices": [choice]}
        if plan.continuous_usage:
            chunk["usage"] = _usage(prompt_tokens, step + 1)
        return chunk

    @staticmethod
    def _stream_error() -> bytes:
        return _sse(
            error_obj(
                "The request failed during generation (x-sim-error-after).",
                "InternalServerError",
                500,
            )
        )

    async def completions(self, req: Request) -> Response | StreamResponse:
        begun = self._begin(req)
        if isinstance(begun, Response):
            return begun
        body, rid, headers = begun
        prompts = self._completion_prompts(body.get("prompt"), "prompt" in body, headers)
        if isinstance(prompts, Response):
            return prompts
        flags = self._stream_flags(body, headers)
        if isinstance(flags, Response):
            return flags
        stream, include_usage, continuous = flags
        bad_model = self._check_model(body, headers)
        if bad_model is not None:
            return bad_model
        limit = self._max_tokens(body, 16, headers)  # vLLM's CompletionRequest default
        if isinstance(limit, Response):
            return limit
        choices = self._num_choices(body, headers)
        if isinstance(choices, Response):
            return choices
        try:
            ttft, itl, natural, error_after = self._knobs(req)
        except _BadKnob as exc:
            return error_response(400, str(exc), headers=headers)
        gens = self._plan_gens(prompts, limit[0], limit[1], natural, "prompt", headers, choices)
        if isinstance(gens, Response):
            return gens
        plan = _Plan("cmpl-" + rid, headers, gens, ttft, itl, error_after)
        plan.n = choices
        if not stream:
            return await self._generate_full(plan, lambda: self._completion_body(plan))
        plan.include_usage, plan.continuous_usage = include_usage, continuous
        rejected = await self._admit_stream(plan)
        if rejected is not None:
            return rejected
        return StreamResponse(
            self._completion_stream(plan), headers=headers, on_close=self.scheduler.release
        )

    @staticmethod
    def _completion_prompts(
        prompt: Any, present: bool, headers: list[Header]
    ) -> list[tuple[bytes, int]] | Response:
        def invalid(msg: str) -> Response:
            return validation_error([_field_error("value_error", ("prompt",), msg)], headers)

        if prompt is None or prompt == "" or prompt == []:
            if not present:
                return validation_error(
                    [
                        _field_error(
                            "value_error",
                            (),
                            "Value error, Either prompt or prompt_embeds must be provided "
                            "and non-empty.",
                        )
                    ],
                    headers,
                )
            return invalid(
                "Value error, Either prompt or prompt_embeds must be provided and non-empty."
            )
        if isinstance(prompt, str):
            return [(textgen.prompt_seed(prompt), textgen.count_tokens(prompt))]
        if not isinstance(prompt, list):
            return invalid("Input should be a valid string or list")
        if all(isinstance(p, str) for p in prompt):
            return [(textgen.prompt_seed(p), textgen.count_tokens(p)) for p in prompt]
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [(textgen.token_ids_seed(prompt), len(prompt))]
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [(textgen.token_ids_seed(p), len(p)) for p in prompt]
        return invalid("Input should be a string, a list of strings or token id list(s)")

    def _completion_body(self, plan: _Plan) -> bytes:
        """vLLM's ``request_output_to_completion_response``: the choices of every prompt in
        turn (``index = prompt_index * n + j``); ``usage`` has each prompt once and the
        completion tokens of all choices summed."""
        choices = []
        completion_total = 0
        for i, gen in enumerate(plan.gens):
            choices.append(
                {
                    "index": i,
                    "text": "".join(gen.tokens),
                    "logprobs": None,
                    "finish_reason": gen.finish_reason,
                    "stop_reason": None,
                    "token_ids": None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                }
            )
            completion_total += len(gen.tokens)
        return orjson.dumps(
            {
                "id": plan.rid,
                "object": "text_completion",
                "created": plan.created,
                "model": self.model_name,
                "choices": choices,
                "service_tier": None,
                "system_fingerprint": None,
                "usage": {
                    **_usage(_prompt_tokens(plan), completion_total),
                    "prompt_tokens_details": None,
                },
                "kv_transfer_params": None,
            }
        )

    async def _completion_stream(self, plan: _Plan) -> AsyncIterator[bytes]:
        """vLLM's ``completion_stream_generator``: one chunk per token, each holding a single
        choice (``index = prompt_index * n + j``), the choices advancing together; a choice's
        last token carries its ``finish_reason``. Continuous usage is per choice (its prompt,
        its own running count); the final usage chunk has each prompt once and the sum over
        all choices."""
        gens = plan.gens
        head = {
            "id": plan.rid,
            "object": "text_completion",
            "created": plan.created,
            "model": self.model_name,
        }
        error_after = plan.error_after
        sent = [0] * len(gens)
        t_start = time.perf_counter()
        t_first: float | None = None
        reason = "abort"
        try:
            if plan.ttft > 0:
                await asyncio.sleep(plan.ttft)
            t_first = time.perf_counter()
            for step in range(self._steps(plan)):
                await self._pace(plan, t_first, step)
                for i, gen in enumerate(gens):
                    n = len(gen.tokens)
                    if step >= n:
                        continue
                    last = error_after is None and step == n - 1
                    sent[i] = step + 1
                    yield _sse(
                        {
                            **head,
                            "choices": [
                                {
                                    "index": i,
                                    "text": gen.tokens[step],
                                    "logprobs": None,
                                    "finish_reason": gen.finish_reason if last else None,
                                    "stop_reason": None,
                                    "prompt_token_ids": None,
                                    "token_ids": None,
                                }
                            ],
                            "usage": _usage(gen.prompt_tokens, step + 1)
                            if plan.continuous_usage
                            else None,
                        }
                    )
            if error_after is not None:
                reason = "error"
                yield self._stream_error()
                yield _SSE_DONE
                return
            reason = "ok"
            if plan.include_usage:
                prompt_total = _prompt_tokens(plan)
                yield _sse({**head, "choices": [], "usage": _usage(prompt_total, sum(sent))})
            yield _SSE_DONE
        finally:
            self._finish(plan, reason, sent, t_start, t_first)

    async def embeddings(self, req: Request) -> Response:
        begun = self._begin(req)
        if isinstance(begun, Response):
            return begun
        body, rid, headers = begun
        inputs = self._embedding_inputs(body, headers)
        if isinstance(inputs, Response):
            return inputs
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            return validation_error(
                [
                    _field_error(
                        "literal_error",
                        ("encoding_format",),
                        "Input should be 'float' or 'base64'",
                    )
                ],
                headers,
            )
        dim = self.config.embedding_dim
        dimensions = body.get("dimensions")
        if dimensions is not None:
            if isinstance(dimensions, bool) or not isinstance(dimensions, int):
                return validation_error(
                    [_field_error("int_type", ("dimensions",), "Input should be a valid integer")],
                    headers,
                )
            if dimensions < 1:
                return error_response(
                    400, "Dimensions must be greater than 0", "BadRequestError", None, headers
                )
            if dimensions > dim:
                return error_response(
                    400,
                    f'Model "{self.model_name}" only supports dimensions up to {dim}, '
                    f"got {dimensions}.",
                    "BadRequestError",
                    None,
                    headers,
                )
        bad_model = self._check_model(body, headers)
        if bad_model is not None:
            return bad_model
        max_len = self.config.max_model_len
        for _, tokens in inputs:
            if tokens > max_len:
                return error_response(
                    400,
                    f"This model's maximum context length is {max_len} tokens. However, you "
                    f"requested {tokens} tokens in the input for embedding generation. Please "
                    "reduce the length of the input.",
                    "BadRequestError",
                    None,
                    headers,
                )
        try:
            ttft, _, _, _ = self._knobs(req)
        except _BadKnob as exc:
            return error_response(400, str(exc), headers=headers)
        plan = _Plan("embd-" + rid, headers, [], ttft, 0.0, None)
        state = self.scheduler.admit()
        if state == REJECTED:
            return self._queue_full(headers)
        if state == QUEUED:
            await self.scheduler.wait()
        t_start = time.perf_counter()
        prompt_total = sum(t for _, t in inputs)
        reason = "abort"
        try:
            if ttft > 0:
                await asyncio.sleep(ttft)
            data = []
            for i, (seed, _) in enumerate(inputs):
                vec = textgen.embedding(seed, dim, dimensions)
                value: Any
                if encoding == "base64":
                    value = base64.b64encode(textgen.float32_le_bytes(vec)).decode("ascii")
                else:
                    value = vec.tolist()
                data.append({"index": i, "object": "embedding", "embedding": value})
            reason = "stop"
            return Response(
                200,
                orjson.dumps(
                    {
                        "id": plan.rid,
                        "object": "list",
                        "created": plan.created,
                        "model": self.model_name,
                        "data": data,
                        "usage": {**_usage(prompt_total, 0), "prompt_tokens_details": None},
                    }
                ),
                headers=headers,
            )
        finally:
            self.scheduler.release()
            now = time.perf_counter()
            self.metrics.finish(
                reason, prompt_total, 0, t_start - plan.arrival, None, 0.0, now - plan.arrival
            )

    @staticmethod
    def _embedding_inputs(
        body: dict[str, Any], headers: list[Header]
    ) -> list[tuple[bytes, int]] | Response:
        if "input" not in body:
            return validation_error(
                [_field_error("missing", ("input",), "Field required")], headers
            )
        value = body["input"]
        if isinstance(value, str):
            return [(textgen.prompt_seed(value), textgen.count_tokens(value))]
        if isinstance(value, list) and value:
            if all(isinstance(v, str) for v in value):
                return [(textgen.prompt_seed(v), textgen.count_tokens(v)) for v in value]
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                return [(textgen.token_ids_seed(value), len(value))]
            if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
                return [(textgen.token_ids_seed(v), len(v)) for v in value]
        return validation_error(
            [
                _field_error(
                    "value_error",
                    ("input",),
                    "Input should be a string, a non-empty list of strings, or token id list(s)",
                )
            ],
            headers,
        )

    # -- other routes ------------------------------------------------------------------

    async def models(self, req: Request) -> Response:
        self._record(req, _json_or_text(req.body))
        _, headers = self._rid_headers(req)
        forced = req.headers.get("x-sim-error")
        if forced is not None:
            return self._injected(forced, None, headers)
        now = int(time.time())
        cards = [
            {
                "id": name,
                "object": "model",
                "created": now,
                "owned_by": "vllm",
                "root": self.model_name,
                "parent": None,
                "max_model_len": self.config.max_model_len,
                "permission": [
                    {
                        "id": "modelperm-" + os.urandom(16).hex(),
                        "object": "model_permission",
                        "created": now,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for name in self.config.models
        ]
        return Response(200, orjson.dumps({"object": "list", "data": cards}), headers=headers)

    async def health(self, req: Request) -> Response:
        _, headers = self._rid_headers(req)
        return Response(self.health_status, b"", content_type=None, headers=headers)

    async def prometheus(self, req: Request) -> Response:
        return Response(
            200, self.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def version(self, req: Request) -> Response:
        self._record(req, None)
        _, headers = self._rid_headers(req)
        return Response(200, orjson.dumps({"version": self.config.version}), headers=headers)

    async def unknown_route(self, req: Request) -> Response:
        self._record(req, _json_or_text(req.body))
        return not_found()

    def _control_error(self, message: str) -> Response:
        return error_response(400, message)


def build_app(config: VllmConfig | None = None) -> App:
    """The HTTP app of a simulated vLLM server (``VllmSimulator(config).app``)."""
    return VllmSimulator(config).app


# --- CLI -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the vLLM personality's flags to the ``python -m backends`` parser."""
    d = VllmConfig()
    g = parser.add_argument_group("vllm personality")
    add_common_arguments(
        g,
        d,
        DEFAULT_MODEL,
        "served model name; repeatable, the first is what responses report "
        f"(like --served-model-name; default {DEFAULT_MODEL})",
    )
    g.add_argument("--max-model-len", type=int, default=d.max_model_len)
    g.add_argument("--embedding-dim", type=int, default=d.embedding_dim)
    g.add_argument(
        "--enable-force-include-usage",
        action="store_true",
        help="always send the final usage chunk on streams (vLLM flag)",
    )
    g.add_argument("--vllm-version", default=d.version, help="what GET /version reports")


def config_from_args(args: argparse.Namespace) -> VllmConfig:
    return VllmConfig(
        **common_config(args),
        models=list(args.models or [DEFAULT_MODEL]),
        max_model_len=args.max_model_len,
        embedding_dim=args.embedding_dim,
        enable_force_include_usage=args.enable_force_include_usage,
        version=args.vllm_version,
    )


def app_from_args(args: argparse.Namespace) -> App:
    return build_app(config_from_args(args))
