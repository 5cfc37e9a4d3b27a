"""OpenAI ``chat`` -> TGI's own Messages API (``/v1/chat/completions``), with its quirks smoothed.

TGI applies the chat template and handles tools itself here, but differs from OpenAI in ways
that break clients (``shared/reference/backends.md`` §2.7, §6.2):

Request:

* ``model`` -> the backend model (TGI uses it as a LoRA ``adapter_id`` and echoes it back);
* ``top_p >= 1`` removed (TGI answers 422 to 1.0); ``top_p: 0`` -> ``temperature: 0`` (greedy);
* ``presence_penalty`` removed (TGI turns it into ``repetition_penalty = p + 2``, so even the
  OpenAI default 0 would double the penalty) and listed in :attr:`TgiMessages.dropped`;
* a string ``stop`` -> ``[stop]`` (a string fails TGI's deserialization), at most 4;
* ``logit_bias`` removed (TGI types it as a list: an OpenAI map fails deserialization);
* ``response_format`` rewritten to TGI's grammar enum: json_schema
  ``{"json_schema": {"name", "schema"}}`` -> ``{"type": "json_schema", "value": {"name",
  "schema"}}``, ``json_object`` -> ``{"type": "json", "value": {"type": "object"}}``,
  ``text`` removed;
* ``max_completion_tokens`` folded into ``max_tokens`` (TGI treats them as aliases and rejects
  both at once); ``n > 1`` rejected (TGI ignores it and answers one choice);
* fields TGI's ``ChatRequest`` does not have (``user``, ``parallel_tool_calls``,
  ``service_tier``, vLLM extras, ...) removed and listed in ``dropped``; ``stream_options`` only
  on streams.

Response: ``id`` (always ``""``) -> ``chatcmpl-<request id>``; ``object`` -> ``chat.completion``
(1.x said ``text_completion``); ``model`` -> the public id; ``created`` -> one value for the
whole response (TGI stamps each stream chunk anew); ``finish_reason`` ``eos_token`` /
``stop_sequence`` -> ``stop`` and ``tool_calls`` whenever the message has tool calls; tool calls
get unique ids ``call_<request id>_<n>`` (TGI sends ``"0"``), lose TGI's extra ``description`` and
get ``arguments`` as a JSON string (TGI 2.x sent an object); a message without ``content`` gets
``content: null``.

Stream: same fixes per chunk; only the first chunk keeps ``delta.role`` (TGI repeats it in every
chunk); tool-call deltas after the first of each call carry only ``index`` and the
``arguments`` fragment; ``usage: null`` is removed from ordinary chunks and the usage chunk
(``choices: []``) is kept; a mid-stream ``{"error": {"message", "http_status_code"}}`` becomes the
gateway's error event followed by ``[DONE]`` and nothing after; ``[DONE]`` is added if the stream
ends without one. Non-stream errors use TGI's native ``{"error", "error_type"}`` body and are
mapped by :func:`~.errors_map.normalize_error`.

The ``completions`` operation is served through TGI's native ``/generate`` (delegated to
:class:`~.tgi_native.TgiNative`): TGI's ``/v1/completions`` has its own, different quirks.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from ..config import Model
from ..errors import GatewayError, invalid
from ..sse import EventSplitter, event_data
from .errors_map import client_status, normalize_error, tgi_stream_error
from .tgi_native import DONE, TgiNative, json_schema_of, malformed, stop_list

# TGI's ChatRequest fields (router/src/lib.rs); anything else is removed and reported.
KNOWN_FIELDS = frozenset(
    {
        "model",
        "messages",
        "frequency_penalty",
        "logprobs",
        "top_logprobs",
        "max_tokens",
        "n",
        "stream",
        "seed",
        "temperature",
        "top_p",
        "tools",
        "tool_prompt",
        "tool_choice",
        "response_format",
        "stream_options",
        "stop",
    }
)

_FINISH = {
    "stop": "stop",
    "eos_token": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
}


class TgiMessages:
    """One request's translation; see the module docstring."""

    content_type: str | None = None  # the backend's content type is kept (always JSON or SSE)

    __slots__ = (
        "_buf",
        "_done",
        "_dropped",
        "_model",
        "_native",
        "_rid",
        "_seen_calls",
        "_splitter",
        "_started",
        "_stream",
        "_usage",
        "created",
        "stream_error",
    )
    rewrites_stream = True  # every stream event is translated

    def stream_recipe(self) -> dict[str, Any] | None:
        return None

    def __init__(self, model: Model, request_id: str, created: int | None = None) -> None:
        self._model = model
        self._rid = request_id
        self.created = int(time.time()) if created is None else created
        self._native: TgiNative | None = None
        self._dropped: list[str] = []
        self._usage: dict[str, int] | None = None
        self.stream_error: GatewayError | None = None
        self._stream = False
        self._splitter: EventSplitter | None = None
        self._buf = b""
        self._started = False
        self._done = False
        self._seen_calls: set[int] = set()

    @property
    def dropped(self) -> list[str]:
        return self._native.dropped if self._native is not None else self._dropped

    @property
    def usage(self) -> dict[str, int] | None:
        return self._native.usage if self._native is not None else self._usage

    # ------------------------------------------------------------------ request
    def backend_path(self, op: str, path: str) -> str | None:
        if self._native is not None:
            return self._native.backend_path(op, path)
        return "/v1/chat/completions"

    def request(self, op: str, body: dict[str, Any], stream: bool) -> bool:
        if op == "completions":
            self._native = TgiNative(self._model, self._rid, self.created)
            return self._native.request(op, body, stream)
        if op != "chat":
            raise invalid(f"This model's backend cannot serve '{op}'.", "model")
        self._stream = stream
        changed = False
        if body.get("model") != self._model.backend_model:
            body["model"] = self._model.backend_model
            changed = True

        top_p = body.get("top_p")
        if isinstance(top_p, int | float) and not isinstance(top_p, bool):
            if top_p >= 1:
                del body["top_p"]
                changed = True
            elif top_p == 0:
                del body["top_p"]
                body["temperature"] = 0
                changed = True

        if "stop" in body:
            stops = stop_list(body["stop"])
            if stops is None:
                del body["stop"]
                changed = True
            elif stops != body["stop"]:
                body["stop"] = stops
                changed = True

        if "response_format" in body:
            schema = json_schema_of(body["response_format"])
            if schema is None:
                del body["response_format"]
            elif schema[1] is None:
                body["response_format"] = {"type": "json", "value": {"type": "object"}}
            else:
                value: dict[str, Any] = {"name": schema[0]} if schema[0] else {}
                value["schema"] = schema[1]
                body["response_format"] = {"type": "json_schema", "value": value}
            changed = True

        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > 1:
            raise invalid(
                "This model's backend returns one choice per request: 'n' must be 1.", "n"
            )

        if "max_completion_tokens" in body:
            value_max = body.pop("max_completion_tokens")
            if value_max is not None:
                body["max_tokens"] = value_max
            changed = True

        if not stream and "stream_options" in body:
            del body["stream_options"]
            changed = True

        unknown = [k for k in body if k not in KNOWN_FIELDS]
        for key in unknown:  # presence_penalty, logit_bias, user, parallel_tool_calls, ...
            if body.pop(key):
                self._dropped.append(key)
            changed = True
        return changed

    # ----------------------------------------------------------------- response
    def response_headers(self, status: int, headers: dict[str, str]) -> None:
        if self._native is not None:
            self._native.response_headers(status, headers)

    def response_status(self, status: int) -> int | None:
        return client_status(status)

    def wants_response_body(self, status: int, content_type: str) -> bool:
        if self._native is not None:
            return self._native.wants_response_body(status, content_type)
        if status < 400 and self._stream:
            self._splitter = EventSplitter()
        return True

    def response_body(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        if self._native is not None:
            return self._native.response_body(chunk, end_of_stream)
        if self._splitter is not None:
            return self._stream_body(chunk, end_of_stream)
        self._buf += chunk
        if not end_of_stream:
            return b""
        body, self._buf = self._buf, b""
        return self._complete(body)

    def error(self, status: int, body: bytes) -> GatewayError:
        if self._native is not None:
            return self._native.error(status, body)
        return normalize_error(status, body, "messages")

    # ------------------------------------------------------------- non-stream
    def _complete(self, raw: bytes) -> bytes:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise malformed()
        data["id"] = "chatcmpl-" + self._rid
        data["object"] = "chat.completion"
        data["created"] = self.created
        data["model"] = self._model.id
        for choice in data["choices"]:
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            if not isinstance(message, dict):
                continue
            calls = message.get("tool_calls")
            if calls:
                for i, call in enumerate(calls):
                    if isinstance(call, dict):
                        call["id"] = self._call_id(i)
                        call["type"] = "function"
                        _fix_function(call)
                choice["finish_reason"] = "tool_calls"
            else:
                message.pop("tool_calls", None)
                choice["finish_reason"] = _finish(choice.get("finish_reason"))
            if "content" not in message:
                message["content"] = None
        usage = data.get("usage")
        if isinstance(usage, dict):
            self._usage = _usage_of(usage)
        return orjson.dumps(data)

    def _call_id(self, index: int) -> str:
        return f"call_{self._rid}_{index}"

    # ----------------------------------------------------------------- stream
    def _stream_body(self, chunk: bytes, end_of_stream: bool) -> bytes:
        if self._done:
            return b""
        assert self._splitter is not None
        out: list[bytes] = []
        for event in self._splitter.events(chunk, end_of_stream):
            self._event(event, out)
            if self._done:
                break
        if end_of_stream and not self._done:
            out.append(DONE)
            self._done = True
        return b"".join(out)

    def _event(self, event: bytes, out: list[bytes]) -> None:
        payload = event_data(event)
        if payload is None:  # keep-alive comment
            return
        if payload.strip() == b"[DONE]":
            out.append(DONE)
            self._done = True
            return
        try:
            ev = orjson.loads(payload)
        except orjson.JSONDecodeError:
            ev = None
        if not isinstance(ev, dict):
            self._fail(malformed(), out)
            return
        if "error" in ev:
            self._fail(tgi_stream_error(ev, "messages"), out)
            return
        ev["id"] = "chatcmpl-" + self._rid
        ev["object"] = "chat.completion.chunk"
        ev["created"] = self.created  # TGI stamps every chunk with its own time
        ev["model"] = self._model.id
        usage = ev.get("usage")
        if usage is None:
            ev.pop("usage", None)
        elif isinstance(usage, dict):
            self._usage = _usage_of(usage)
        for choice in ev.get("choices") or ():
            if isinstance(choice, dict):
                self._fix_choice(choice)
        out.append(b"data: " + orjson.dumps(ev) + b"\n\n")

    def _fix_choice(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            if self._started:
                delta.pop("role", None)
            else:
                self._started = True
            calls = delta.get("tool_calls")
            if calls:
                fixed = []
                for call in calls:
                    if not isinstance(call, dict):
                        continue
                    index = call.get("index", 0)
                    if index not in self._seen_calls:
                        self._seen_calls.add(index)
                        call["id"] = self._call_id(index)
                        call["type"] = "function"
                        _fix_function(call)
                        fixed.append(call)
                    else:
                        function = call.get("function") or {}
                        arguments = function.get("arguments")
                        fixed.append(
                            {
                                "index": index,
                                "function": {"arguments": _arguments(arguments)},
                            }
                        )
                delta["tool_calls"] = fixed
            elif "tool_calls" in delta:
                del delta["tool_calls"]
        reason = choice.get("finish_reason")
        if reason is not None:
            choice["finish_reason"] = (
                None if reason == "" else "tool_calls" if self._seen_calls else _finish(reason)
            )

    def _fail(self, err: GatewayError, out: list[bytes]) -> None:
        self.stream_error = err
        out.append(b"data: " + orjson.dumps(err.payload(self._rid)) + b"\n\n" + DONE)
        self._done = True


def _finish(reason: Any) -> str:
    return _FINISH.get(reason, "stop") if isinstance(reason, str) else "stop"


def _arguments(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()  # TGI 2.x sent the arguments as an object


def _fix_function(call: dict[str, Any]) -> None:
    function = call.get("function")
    if not isinstance(function, dict):
        call["function"] = {"name": "", "arguments": ""}
        return
    function.pop("description", None)
    if function.get("name") is None:
        function["name"] = ""
    function["arguments"] = _arguments(function.get("arguments"))


def _usage_of(usage: dict[str, Any]) -> dict[str, int]:
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    return {
        "prompt_tokens": prompt if isinstance(prompt, int) else 0,
        "completion_tokens": completion if isinstance(completion, int) else 0,
    }
