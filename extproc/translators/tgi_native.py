"""OpenAI ``chat`` / ``completions`` -> TGI native ``/generate`` / ``/generate_stream``, and back.

Request (``shared/reference/backends.md`` §2.2, §6.1): the body is rebuilt as
``{"inputs": <prompt>, "parameters": {...}}``. Chat ``messages`` are rendered with the model's
``chat_template`` (:mod:`.chat_template`; ChatML when the model has none); a completions ``prompt``
must be one string. ``parameters`` always carries ``max_new_tokens`` (TGI's default differs by
version), ``details: true`` (without it there is no finish reason or token count),
``return_full_text: false`` and ``decoder_input_details: false``. Sampling is mapped around TGI's
rules: ``temperature: 0`` (or ``top_p: 0``) -> greedy (``do_sample: false``, no temperature, since
TGI rejects 0); otherwise ``do_sample: true`` (OpenAI samples by default); ``top_p >= 1`` is left
out (TGI answers 422 to 1.0); a string ``stop`` becomes a list (at most 4, TGI's default
``max_stop_sequences``); ``logprobs``/``top_logprobs`` -> ``top_n_tokens`` (at most 5);
``response_format`` json_object / json_schema -> ``grammar {"type": "json", ...}``; vLLM-style
``top_k``, ``repetition_penalty``, ``typical_p``, ``truncate`` keep TGI's names. What TGI cannot
do but changes the answer (``n > 1``, ``tools``, ``best_of > 1``, ``suffix``, non-text content
parts, token-id prompts) is a 400 naming the field; what it cannot do but is harmless
(``presence_penalty``, ``user``, ``logit_bias``, ``parallel_tool_calls``, ...) is removed and
listed in :attr:`TgiNative.dropped`.

Response: ``generated_text`` -> ``choices[0].message.content`` (``text`` for completions);
``details.finish_reason`` ``eos_token`` / ``stop_sequence`` -> ``stop``, ``length`` -> ``length``;
the stop sequence TGI leaves at the end of the text is cut (OpenAI never returns it); usage from
the ``x-prompt-tokens`` header and ``details.generated_tokens``; ids ``chatcmpl-<request id>`` /
``cmpl-<request id>``.

Stream (§2.4, §6.2): TGI's SSE (``data:`` with or without a space, keep-alive comments, events cut
anywhere, even inside a UTF-8 character; :class:`~extproc.sse.EventSplitter` holds at most one
partial event) -> ``chat.completion.chunk`` / ``text_completion`` chunks: a role chunk first, one
content chunk per token (empty for a special token, and for text that may be the start of a stop
sequence, held back until it is known not to be; one chunk a token is what the stream meter
counts when the client cuts the stream), then a chunk with ``finish_reason``, then the usage chunk
(``choices: []``, prompt tokens from ``details.input_length``) if the request asked for
``stream_options.include_usage``, then ``data: [DONE]`` (TGI sends none; it is also added when the
stream ends without its last event). An in-band error event (``{"error", "error_type"}``, sent
with status 200 for overload and validation failures) becomes the gateway's error event followed
by ``[DONE]``, and nothing is sent after it. Chunks are assembled from pre-built byte templates;
only the token text (and logprobs, when asked) is serialized per event.

Metered streams without stop sequences, logprobs or echo (the common case) are translated the
same way by Envoy's Lua stream meter instead (``stream_meter.lua``, from :meth:`stream_recipe`:
these templates, the error events pre-rendered per ``error_type``), so the processor gets no
message per chunk; the rest stream through :meth:`response_body`. Tests run both against the same
simulator streams.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from google.protobuf.struct_pb2 import Struct

from ..config import Model
from ..errors import GatewayError, invalid
from ..sse import EventSplitter, event_data
from .chat_template import compiled
from .errors_map import TGI_ERROR_STATUS, client_status, normalize_error, tgi_stream_error

MAX_STOP_SEQUENCES = 4  # TGI launcher default max_stop_sequences
MAX_TOP_N_TOKENS = 5  # TGI launcher default max_top_n_tokens

FINISH_REASONS: dict[str, str] = {
    "eos_token": "stop",
    "stop_sequence": "stop",
    "length": "length",
}

DONE = b"data: [DONE]\n\n"


def finish_reason(value: Any) -> str:
    """An OpenAI finish reason for TGI's (``stop`` for anything unknown)."""
    return FINISH_REASONS.get(value, "stop") if isinstance(value, str) else "stop"


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"'{name}' must be a number.", name)
    return value


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer.", name)
    return value


def stop_list(value: Any) -> list[str] | None:
    """OpenAI ``stop`` (string or array of at most 4 strings) as TGI's list; None when unset."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value] if value else None
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise invalid("'stop' must be a string or an array of strings.", "stop")
    if len(value) > MAX_STOP_SEQUENCES:
        raise invalid(
            f"'stop' may hold at most {MAX_STOP_SEQUENCES} sequences on this model's backend,"
            f" got {len(value)}.",
            "stop",
        )
    stops = [s for s in value if s]
    return stops or None


def json_schema_of(response_format: Any) -> tuple[str, dict[str, Any] | None] | None:
    """(name, schema) for a json_schema / json_object ``response_format``; None for text/unset.

    json_object gives ``("", None)``.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise invalid("'response_format' must be an object.", "response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "", None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid(
                "'response_format.json_schema' must be an object.", "response_format.json_schema"
            )
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise invalid(
                "'response_format.json_schema.schema' must be an object.",
                "response_format.json_schema.schema",
            )
        name = spec.get("name")
        return (name if isinstance(name, str) else "", schema)
    raise invalid(
        "'response_format.type' must be one of 'text', 'json_object', 'json_schema'.",
        "response_format.type",
    )


def reject_tools(body: dict[str, Any]) -> None:
    """400 for tool use, which TGI's native API cannot do; no-op values pass."""
    if body.get("tools"):
        raise invalid("This model's backend does not support tools (function calling).", "tools")
    if body.get("functions"):
        raise invalid(
            "This model's backend does not support functions (function calling).", "functions"
        )
    for name in ("tool_choice", "function_call"):
        choice = body.get(name)
        if choice is not None and choice not in ("none", "auto"):
            raise invalid(
                f"'{name}' needs tools, which this model's backend does not support.", name
            )


def _chat_logprob(token: dict[str, Any], top: Any) -> dict[str, Any]:
    text = token.get("text") or ""
    entry: dict[str, Any] = {
        "token": text,
        "logprob": token.get("logprob"),
        "bytes": list(text.encode()),
        "top_logprobs": [],
    }
    if isinstance(top, list):
        entry["top_logprobs"] = [
            {
                "token": t.get("text") or "",
                "logprob": t.get("logprob"),
                "bytes": list((t.get("text") or "").encode()),
            }
            for t in top
            if isinstance(t, dict)
        ]
    return entry


class TgiNative:
    """One request's translation; see the module docstring."""

    content_type: str | None = None  # the backend's content type is kept (always JSON or SSE)

    __slots__ = (
        "_buf",
        "_chat",
        "_done",
        "_echo",
        "_generated_header",
        "_head",
        "_held",
        "_include_usage",
        "_logprobs",
        "_lua",
        "_model",
        "_ntokens",
        "_offset",
        "_pre",
        "_prompt_tokens",
        "_rid",
        "_splitter",
        "_started",
        "_stops",
        "_stream",
        "_tail",
        "created",
        "dropped",
        "stream_error",
        "usage",
    )

    def __init__(self, model: Model, request_id: str, created: int | None = None) -> None:
        self._model = model
        self._rid = request_id
        self.created = int(time.time()) if created is None else created
        self.dropped: list[str] = []
        self.usage: dict[str, int] | None = None
        self.stream_error: GatewayError | None = None  # an in-band error, once seen
        self._chat = True
        self._stream: bool | None = None
        self._include_usage = False
        self._stops: tuple[str, ...] = ()
        self._logprobs = False
        self._echo = ""
        self._prompt_tokens: int | None = None
        self._generated_header: int | None = None
        self._splitter: EventSplitter | None = None
        self._buf = b""
        self._started = False
        self._done = False
        self._held = ""
        self._ntokens = 0
        self._offset = 0
        self._head = b""
        self._pre = b""
        self._tail = b""
        self._lua = False

    # ------------------------------------------------------------------ request
    def backend_path(self, op: str, path: str) -> str | None:
        if self._stream is None:
            raise RuntimeError("TgiNative.backend_path() needs request() first")
        return "/generate_stream" if self._stream else "/generate"

    def request(self, op: str, body: dict[str, Any], stream: bool) -> bool:
        if op not in ("chat", "completions"):
            raise invalid(f"This model's backend cannot serve '{op}'.", "model")
        self._chat = chat = op == "chat"
        self._stream = stream
        consumed = {"model", "stream", "stream_options", "max_tokens", "max_completion_tokens"}

        if chat:
            consumed.add("messages")
            inputs = compiled(self._model.chat_template).render(body["messages"])
        else:
            consumed.update(("prompt", "echo", "suffix", "best_of"))
            inputs = self._prompt(body)

        max_new = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_new is None:
            max_new = self._model.max_tokens
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise invalid("'max_tokens' must be a positive integer.", "max_tokens")
        params: dict[str, Any] = {
            "max_new_tokens": max_new,
            "details": True,
            "return_full_text": False,
            "decoder_input_details": False,
        }

        consumed.update(("temperature", "top_p"))
        temperature = _number(body, "temperature")
        top_p = _number(body, "top_p")
        if temperature is not None and temperature < 0:
            raise invalid("'temperature' must be between 0 and 2.", "temperature")
        if top_p is not None and top_p < 0:
            raise invalid("'top_p' must be between 0 and 1.", "top_p")
        if temperature == 0 or top_p == 0:
            params["do_sample"] = False
        else:
            params["do_sample"] = True
            if temperature is not None:
                params["temperature"] = temperature
            if top_p is not None and top_p < 1:
                params["top_p"] = top_p

        consumed.add("stop")
        stops = stop_list(body.get("stop"))
        if stops:
            params["stop"] = stops
            self._stops = tuple(sorted(stops, key=len, reverse=True))

        consumed.add("seed")
        seed = _integer(body, "seed")
        if seed is not None:
            if seed < 0:
                raise invalid("'seed' must be a non-negative integer on this backend.", "seed")
            params["seed"] = seed

        consumed.add("frequency_penalty")
        frequency_penalty = _number(body, "frequency_penalty")
        if frequency_penalty is not None:
            if not -2 <= frequency_penalty <= 2:
                raise invalid("'frequency_penalty' must be between -2 and 2.", "frequency_penalty")
            params["frequency_penalty"] = frequency_penalty

        consumed.add("n")
        n = _integer(body, "n")
        if n is not None and n > 1:
            raise invalid(
                "This model's backend returns one choice per request: 'n' must be 1.", "n"
            )

        consumed.update(("logprobs", "top_logprobs"))
        top_n = self._logprob_params(body, chat)
        if top_n:
            params["top_n_tokens"] = top_n

        consumed.update(("tools", "tool_choice", "functions", "function_call"))
        reject_tools(body)

        consumed.add("response_format")
        schema = json_schema_of(body.get("response_format"))
        if schema is not None:
            params["grammar"] = {
                "type": "json",
                "value": schema[1] if schema[1] is not None else {"type": "object"},
            }

        # vLLM-style extras TGI knows under the same names
        consumed.update(("top_k", "repetition_penalty", "typical_p", "truncate"))
        top_k = _integer(body, "top_k")
        if top_k is not None and top_k > 0:
            params["top_k"] = top_k
        repetition_penalty = _number(body, "repetition_penalty")
        if repetition_penalty is not None:
            if repetition_penalty <= 0:
                raise invalid("'repetition_penalty' must be > 0.", "repetition_penalty")
            params["repetition_penalty"] = repetition_penalty
        typical_p = _number(body, "typical_p")
        if typical_p is not None:
            if typical_p <= 0:
                raise invalid("'typical_p' must be > 0.", "typical_p")
            if typical_p < 1:
                params["typical_p"] = typical_p
        truncate = _integer(body, "truncate")
        if truncate is not None and truncate > 0:
            params["truncate"] = truncate

        if stream:
            options = body.get("stream_options")
            self._include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

        # Everything else TGI has no use for: presence_penalty, logit_bias, user, service_tier...
        self.dropped = [k for k, v in body.items() if k not in consumed and v]
        body.clear()
        body["inputs"] = inputs
        body["parameters"] = params
        self._build_templates()
        return True

    def _prompt(self, body: dict[str, Any]) -> str:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise invalid(
                "This model's backend takes one prompt string per request"
                " (no batches, no token ids).",
                "prompt",
            )
        if body.get("suffix"):
            raise invalid("This model's backend does not support 'suffix'.", "suffix")
        best_of = _integer(body, "best_of")
        if best_of is not None and best_of > 1:
            raise invalid("This model's backend does not support 'best_of' above 1.", "best_of")
        if body.get("echo") is True:
            if body.get("logprobs") is not None:
                raise invalid(
                    "'echo' with 'logprobs' is not supported by this model's backend.", "echo"
                )
            self._echo = prompt
        return prompt

    def _logprob_params(self, body: dict[str, Any], chat: bool) -> int:
        """top_n_tokens for the request's logprobs settings (0: none); sets self._logprobs."""
        if chat:
            wanted = body.get("logprobs")
            if wanted is not None and not isinstance(wanted, bool):
                raise invalid("'logprobs' must be a boolean.", "logprobs")
            top = _integer(body, "top_logprobs") or 0
            if top and not wanted:
                raise invalid("'top_logprobs' needs 'logprobs' set to true.", "top_logprobs")
            name = "top_logprobs"
        else:
            top = _integer(body, "logprobs")
            wanted = top is not None
            top = top or 0
            name = "logprobs"
        if top < 0 or top > MAX_TOP_N_TOKENS:
            raise invalid(
                f"'{name}' must be between 0 and {MAX_TOP_N_TOKENS} on this model's backend.", name
            )
        self._logprobs = bool(wanted)
        return top

    def _build_templates(self) -> None:
        kind, prefix = (
            (b"chat.completion.chunk", b"chatcmpl-")
            if self._chat
            else (b"text_completion", b"cmpl-")
        )
        self._head = (
            b'data: {"id":'
            + orjson.dumps(prefix.decode() + self._rid)
            + b',"object":"'
            + kind
            + b'","created":'
            + str(self.created).encode()
            + b',"model":'
            + orjson.dumps(self._model.id)
            + b',"choices":'
        )
        if self._chat:
            self._pre = self._head + b'[{"index":0,"delta":{"content":'
            self._tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            self._pre = self._head + b'[{"index":0,"text":'
            self._tail = b',"logprobs":null,"finish_reason":null}]}\n\n'

    # ------------------------------------------------------- the Lua fast path
    def stream_recipe(self) -> dict[str, Any] | None:
        if not self._stream or self._stops or self._logprobs or self._echo:
            return None
        self._lua = True
        return {
            "chat": self._chat,
            "head": self._head.decode(),
            "pre": self._pre.decode(),
            "tail": self._tail.decode(),
            "errors": _error_templates("messages" if self._chat else "prompt"),
        }

    @property
    def rewrites_stream(self) -> bool:
        return bool(self._stream) and not self._lua

    # ----------------------------------------------------------------- response
    def response_headers(self, status: int, headers: dict[str, str]) -> None:
        self._prompt_tokens = int_header(headers.get("x-prompt-tokens"))
        self._generated_header = int_header(headers.get("x-generated-tokens"))

    def response_status(self, status: int) -> int | None:
        return client_status(status)

    def wants_response_body(self, status: int, content_type: str) -> bool:
        if status < 400 and self._stream:
            if self._lua:
                return False  # Envoy's stream meter translates it
            self._splitter = EventSplitter()
        return True

    def response_body(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        if self._splitter is not None:
            return self._stream_body(chunk, end_of_stream)
        self._buf += chunk
        if not end_of_stream:
            return b""
        body, self._buf = self._buf, b""
        return self._complete(body)

    def error(self, status: int, body: bytes) -> GatewayError:
        return normalize_error(status, body, "messages" if self._chat else "prompt")

    # ------------------------------------------------------------- non-stream
    def _complete(self, raw: bytes) -> bytes:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, list) and data:  # the compat route "/" answers [ {...} ]
            data = data[0]
        if not isinstance(data, dict) or not isinstance(data.get("generated_text"), str):
            raise malformed()
        details = data.get("details") or {}
        reason = details.get("finish_reason")
        text = data["generated_text"]
        if reason == "stop_sequence":
            text = self._cut_stop(text)
        usage = generate_usage(details, self._prompt_tokens, self._generated_header)
        prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
        # a count missing from both the headers and the details is unknown (charged the
        # reservation), not 0
        self.usage = (
            usage if usage_known(details, self._prompt_tokens, self._generated_header) else None
        )
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        logprobs = self._logprobs_of(details) if self._logprobs else None
        choice: dict[str, Any]
        if self._chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish_reason(reason),
            }
            kind, rid = "chat.completion", "chatcmpl-" + self._rid
        else:
            choice = {
                "index": 0,
                "text": self._echo + text,
                "logprobs": logprobs,
                "finish_reason": finish_reason(reason),
            }
            kind, rid = "text_completion", "cmpl-" + self._rid
        return orjson.dumps(
            {
                "id": rid,
                "object": kind,
                "created": self.created,
                "model": self._model.id,
                "choices": [choice],
                "usage": usage,
            }
        )

    def _cut_stop(self, text: str) -> str:
        for stop in self._stops:  # longest first
            if text.endswith(stop):
                return text[: len(text) - len(stop)]
        return text

    def _logprobs_of(self, details: dict[str, Any]) -> dict[str, Any]:
        tokens = details.get("tokens") or []
        tops = details.get("top_tokens") or []
        kept = [
            (tok, tops[i] if i < len(tops) else None)
            for i, tok in enumerate(tokens)
            if isinstance(tok, dict) and not tok.get("special")
        ]
        if self._chat:
            return {"content": [_chat_logprob(tok, top) for tok, top in kept]}
        out: dict[str, Any] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        offset = len(self._echo)
        for tok, top in kept:
            text = tok.get("text") or ""
            out["tokens"].append(text)
            out["token_logprobs"].append(tok.get("logprob"))
            out["top_logprobs"].append(_legacy_top(tok, top))
            out["text_offset"].append(offset)
            offset += len(text)
        return out

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
        if end_of_stream and not self._done:  # the stream ended without TGI's last event
            if self._held:
                held, self._held = self._held, ""
                out.append(self._content(held))
            out.append(DONE)
            self._done = True
        return b"".join(out)

    def _event(self, event: bytes, out: list[bytes]) -> None:
        if event[:5] == b"data:" and b"\n" not in event:
            payload = event[6:] if event[5:6] == b" " else event[5:]
        else:
            payload = event_data(event)
            if payload is None:  # keep-alive comment, or a field we do not use
                return
        try:
            ev = orjson.loads(payload)
        except orjson.JSONDecodeError:
            if payload.strip() == b"[DONE]":
                self._end(None, out)
                return
            self._fail(malformed(), out)
            return
        if not isinstance(ev, dict):
            self._fail(malformed(), out)
            return
        if "error" in ev:
            self._fail(tgi_stream_error(ev, "messages" if self._chat else "prompt"), out)
            return
        if not self._started:
            self._started = True
            if self._chat:
                out.append(
                    self._head + b'[{"index":0,"delta":{"role":"assistant","content":""},'
                    b'"logprobs":null,"finish_reason":null}]}\n\n'
                )
            elif self._echo:
                out.append(self._content(self._echo))
                self._offset = len(self._echo)
        self._ntokens += 1
        token = ev.get("token")
        final = ev.get("generated_text") is not None
        details = ev.get("details") if final else None
        text = ""
        special = True
        if isinstance(token, dict) and not token.get("special"):
            special = False
            text = token.get("text") or ""
        if self._stops:
            text = self._release(
                text,
                final,
                isinstance(details, dict) and details.get("finish_reason") == "stop_sequence",
            )
        if self._logprobs and not special:
            assert isinstance(token, dict)
            out.append(
                self._pre + orjson.dumps(text) + self._logprob_tail(token, ev.get("top_tokens"))
            )
        elif text or not final:
            # one chunk per token, an empty one for a special token or text held back (it may
            # start a stop sequence): the stream meter counts a cut stream's tokens by chunks
            out.append(self._pre + orjson.dumps(text) + self._tail)
        if final:
            self._end(details if isinstance(details, dict) else {}, out)

    def _logprob_tail(self, token: dict[str, Any], top: Any) -> bytes:
        if self._chat:
            lp: dict[str, Any] = {"content": [_chat_logprob(token, top)]}
            return b'},"logprobs":' + orjson.dumps(lp) + b',"finish_reason":null}]}\n\n'
        text = token.get("text") or ""
        legacy = {
            "tokens": [text],
            "token_logprobs": [token.get("logprob")],
            "top_logprobs": [_legacy_top(token, top)],
            "text_offset": [self._offset],
        }
        self._offset += len(text)
        return b',"logprobs":' + orjson.dumps(legacy) + b',"finish_reason":null}]}\n\n'

    def _release(self, text: str, final: bool, stopped: bool) -> str:
        """``text`` minus what could still turn out to be the start of a stop sequence."""
        buf = self._held + text if self._held else text
        if final:
            self._held = ""
            return self._cut_stop(buf) if stopped else buf
        keep = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        if keep:
            self._held = buf[len(buf) - keep :]
            return buf[: len(buf) - keep]
        self._held = ""
        return buf

    def _end(self, details: dict[str, Any] | None, out: list[bytes]) -> None:
        details = details or {}
        reason = finish_reason(details.get("finish_reason"))
        if self._held:  # a "[DONE]" without a last event: let the held text out
            held, self._held = self._held, ""
            out.append(self._content(held))
        if self._chat:
            out.append(
                self._head
                + b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":"'
                + reason.encode()
                + b'"}]}\n\n'
            )
        else:
            out.append(
                self._pre + b'"","logprobs":null,"finish_reason":"' + reason.encode() + b'"}]}\n\n'
            )
        prompt = details.get("input_length")
        completion = details.get("generated_tokens")
        if not isinstance(prompt, int):
            prompt = self._prompt_tokens or 0
        if not isinstance(completion, int):
            completion = self._ntokens
        self.usage = {"prompt_tokens": prompt, "completion_tokens": completion}
        if self._include_usage:
            out.append(
                self._head
                + b'[],"usage":{"prompt_tokens":'
                + str(prompt).encode()
                + b',"completion_tokens":'
                + str(completion).encode()
                + b',"total_tokens":'
                + str(prompt + completion).encode()
                + b"}}\n\n"
            )
        out.append(DONE)
        self._done = True

    def _content(self, text: str) -> bytes:
        return self._pre + orjson.dumps(text) + self._tail

    def _fail(self, err: GatewayError, out: list[bytes]) -> None:
        self.stream_error = err
        out.append(b"data: " + orjson.dumps(err.payload(self._rid)) + b"\n\n" + DONE)
        self._done = True


_MSG, _RID = "@@tollgate-message@@", "@@tollgate-request-id@@"
_ERROR_TEMPLATES: dict[str, Struct] = {}


def _error_templates(input_param: str) -> Struct:
    """Per TGI ``error_type`` (``""``: any other), the gateway's error payload as the stream
    meter writes it: literal parts and the two slots ``"\x01m"`` (TGI's message, JSON-escaped
    as TGI sent it) and ``"\x01r"`` (the request id). Validation errors whose message would
    change the code or param (context length, a named field) get the plain code here. Kinds
    rendered like ``""`` are left out; built once, as the Struct the processor copies into the
    request's metadata."""
    cached = _ERROR_TEMPLATES.get(input_param)
    if cached is None:
        templates: dict[str, list[str]] = {}
        for kind in ("", *TGI_ERROR_STATUS):
            err = tgi_stream_error({"error": _MSG, "error_type": kind}, input_param)
            text = orjson.dumps(err.payload(_RID)).decode()
            parts: list[str] = []
            for i, piece in enumerate(text.split(_MSG)):
                if i:
                    parts.append("\x01m")
                for j, bit in enumerate(piece.split(_RID)):
                    if j:
                        parts.append("\x01r")
                    parts.append(bit)
            if not kind or parts != templates[""]:
                templates[kind] = parts
        cached = _ERROR_TEMPLATES[input_param] = Struct()
        cached.update(templates)
    return cached


def _legacy_top(token: dict[str, Any], top: Any) -> dict[str, float]:
    """Legacy completions ``top_logprobs`` entry: the top tokens, or the sampled one alone."""
    if not isinstance(top, list) or not top:
        return {token.get("text") or "": token.get("logprob")}
    return {t.get("text") or "": t.get("logprob") for t in top if isinstance(t, dict)}


def generate_usage(
    details: Any, prompt_header: int | None, generated_header: int | None
) -> dict[str, int]:
    """Usage of a ``/generate`` answer: prompt tokens from the ``x-prompt-tokens`` header,
    generated tokens from ``details.generated_tokens`` (else the ``x-generated-tokens`` header)."""
    completion = details.get("generated_tokens") if isinstance(details, dict) else None
    if not isinstance(completion, int):
        completion = generated_header or 0
    return {"prompt_tokens": prompt_header or 0, "completion_tokens": completion}


def usage_known(details: Any, prompt_header: int | None, generated_header: int | None) -> bool:
    """Whether a ``/generate`` answer named both its counts (see generate_usage)."""
    generated = isinstance(details, dict) and isinstance(details.get("generated_tokens"), int)
    return prompt_header is not None and (generated or generated_header is not None)


def int_header(value: str | None) -> int | None:
    """An integer response header (x-prompt-tokens, x-compute-tokens...), None if absent/bad."""
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError:
        return None
    return n if 0 <= n < 2**31 else None  # a count, not a number no request reaches


def malformed() -> GatewayError:
    """The error for a backend answer that cannot be parsed."""
    return GatewayError(
        "backend_unavailable", "The model backend sent a malformed response.", status=502
    )
