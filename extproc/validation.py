"""Validation of the request fields each operation needs, before anything reaches a backend.

Only what the gateway relies on is checked (model, the prompt fields, stream, token limits);
everything else is left to the backend, which answers in its own words and the translator maps
that to the gateway's shape. Each failure names the offending ``param``.
"""

from __future__ import annotations

import re
from typing import Any

from .config import MAX_IMAGES, MAX_SPEECH_CHARACTERS
from .errors import GatewayError, invalid

_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise invalid("Missing required parameter: 'model'.", "model")
    if not isinstance(model, str) or not model:
        raise invalid(f"'model' must be a non-empty string, got {_type_name(model)}.", "model")
    return model


def _text(body: dict[str, Any], name: str) -> str:
    """A required, non-empty string field."""
    value = body.get(name)
    if value is None:
        raise invalid(f"Missing required parameter: '{name}'.", name)
    if not isinstance(value, str):
        raise invalid(f"'{name}' must be a string, got {_type_name(value)}.", name)
    if not value:
        raise invalid(f"'{name}' must not be empty.", name)
    return value


def _items(body: dict[str, Any], name: str, item: str) -> list[Any]:
    """A required, non-empty array field (``item`` names one element in the message)."""
    value = body.get(name)
    if value is None:
        raise invalid(f"Missing required parameter: '{name}'.", name)
    if not isinstance(value, list):
        raise invalid(f"'{name}' must be an array, got {_type_name(value)}.", name)
    if not value:
        raise invalid(f"'{name}' must contain at least one {item}.", name)
    return value


def stream_flag(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise invalid(f"'stream' must be a boolean, got {_type_name(stream)}.", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("'stream_options' must be an object.", "stream_options")
    return stream


def _positive_int(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer, got {_type_name(value)}.", name)
    if value < 1:
        raise invalid(f"'{name}' must be at least 1, got {value}.", name)


# OpenAI's own bounds. Every choice (and every best_of candidate) may run to max_tokens, and
# metering reserves them all (tokens.sequences).
MAX_CHOICES = 128
MAX_BEST_OF = 20


def _at_most(body: dict[str, Any], name: str, limit: int) -> None:
    _positive_int(body, name)
    value = body.get(name)
    if value is not None and value > limit:
        raise invalid(f"'{name}' must be at most {limit}, got {value}.", name)


def chat(body: dict[str, Any]) -> bool:
    """Chat completions; returns the stream flag."""
    messages = _items(body, "messages", "message")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"'{where}' must be an object, got {_type_name(message)}.", where)
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise invalid(
                f"'{where}.role' must be one of {', '.join(sorted(_ROLES))}.", f"{where}.role"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid(
                f"'{where}.content' must be a string or an array of parts, "
                f"got {_type_name(content)}.",
                f"{where}.content",
            )
    _positive_int(body, "max_tokens")
    _positive_int(body, "max_completion_tokens")
    _at_most(body, "n", MAX_CHOICES)
    return stream_flag(body)


def completions(body: dict[str, Any]) -> bool:
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("Missing required parameter: 'prompt'.", "prompt")
    if not isinstance(prompt, str | list) or (isinstance(prompt, list) and not prompt):
        raise invalid("'prompt' must be a string or a non-empty array.", "prompt")
    _positive_int(body, "max_tokens")
    if body.get("max_completion_tokens") is not None:
        # a chat parameter: a completions backend ignores it (vLLM then stops at its default
        # of 16 tokens), so metering by it would reserve one limit while the backend obeys
        # another
        raise invalid(
            "'max_completion_tokens' is a chat completions parameter; completions take "
            "'max_tokens'.",
            "max_completion_tokens",
        )
    _at_most(body, "n", MAX_CHOICES)
    _at_most(body, "best_of", MAX_BEST_OF)
    return stream_flag(body)


def _is_id(item: Any) -> bool:
    return isinstance(item, int) and not isinstance(item, bool)


def _is_ids(item: Any) -> bool:
    return isinstance(item, list) and bool(item) and all(_is_id(t) for t in item)


def _is_text(item: Any) -> bool:
    return isinstance(item, str)


def _input_items(value: list[Any]) -> None:
    """An embeddings ``input`` array, in OpenAI's forms: strings, token ids, or lists of ids
    (the estimate reads these; anything else the backend would refuse without a ``param``)."""
    first = value[0]
    if isinstance(first, str):
        kind, ok = "a string", _is_text
    elif _is_id(first):
        kind, ok = "a token id (integer)", _is_id
    else:
        kind, ok = "a list of token ids", _is_ids
    for i, item in enumerate(value):
        if not ok(item):
            raise invalid(
                f"'input[{i}]' must be {kind}, like the array's first item, got "
                f"{_type_name(item)}.",
                f"input[{i}]",
            )


def embeddings(body: dict[str, Any]) -> bool:
    value = body.get("input")
    if value is None:
        raise invalid("Missing required parameter: 'input'.", "input")
    if isinstance(value, str):
        if not value:
            raise invalid("'input' must not be empty.", "input")
    elif isinstance(value, list):
        if not value:
            raise invalid("'input' must not be an empty array.", "input")
        _input_items(value)
    else:
        raise invalid(f"'input' must be a string or an array, got {_type_name(value)}.", "input")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise invalid("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    _positive_int(body, "dimensions")
    if body.get("stream"):
        raise invalid("Embeddings cannot be streamed.", "stream")
    return False


def _no_stream(body: dict[str, Any], what: str) -> None:
    if body.get("stream"):
        raise invalid(f"{what} cannot be streamed.", "stream")


def rerank(body: dict[str, Any]) -> bool:
    """Rerank (Cohere/Jina style: query, documents, top_n, return_documents); never a stream."""
    _text(body, "query")
    documents = _items(body, "documents", "document")
    for i, doc in enumerate(documents):
        if isinstance(doc, str):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("text"), str):
            continue
        raise invalid(
            f"'documents[{i}]' must be a string or an object with a string 'text',"
            f" got {_type_name(doc)}.",
            f"documents[{i}]",
        )
    _positive_int(body, "top_n")
    flag = body.get("return_documents")
    if flag is not None and not isinstance(flag, bool):
        raise invalid(
            f"'return_documents' must be a boolean, got {_type_name(flag)}.", "return_documents"
        )
    _no_stream(body, "Rerank requests")
    return False


def classify(body: dict[str, Any]) -> bool:
    """Classification: ``input`` is a string or a non-empty array of strings; never a stream."""
    value = body.get("input")
    if value is None:
        raise invalid("Missing required parameter: 'input'.", "input")
    if isinstance(value, list):
        if not value:
            raise invalid("'input' must not be an empty array.", "input")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise invalid(
                    f"'input[{i}]' must be a string, got {_type_name(item)}.", f"input[{i}]"
                )
    elif not isinstance(value, str):
        raise invalid(
            f"'input' must be a string or an array of strings, got {_type_name(value)}.", "input"
        )
    elif not value:
        raise invalid("'input' must not be empty.", "input")
    _no_stream(body, "Classification requests")
    return False


def json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid(f"The request body must be a JSON object, got {_type_name(body)}.")
    return body


MALFORMED_JSON = GatewayError(
    "invalid_request_error",
    "The request body is not valid JSON.",
)


TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
IMAGE_FORMATS = ("url", "b64_json")
_SIZE = re.compile(r"[1-9][0-9]{0,4}x[1-9][0-9]{0,4}")


def _one_of(body: dict[str, Any], name: str, allowed: tuple[str, ...]) -> None:
    value = body.get(name)
    if value is not None and value not in allowed:
        raise invalid(
            f"'{name}' must be one of {', '.join(allowed)}, got {str(value)[:40]!r}.", name
        )


def _number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, str):  # a form field
        try:
            value = float(value)
        except ValueError:
            raise invalid(f"'{name}' must be a number, got {value[:40]!r}.", name) from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise invalid(f"'{name}' must be a number from {low:g} to {high:g}.", name)


def transcription(fields: dict[str, Any]) -> bool:
    """``/v1/audio/transcriptions`` form fields (all strings; the file is checked by
    :class:`extproc.media.FormUpload`); never a stream here."""
    _one_of(fields, "response_format", TRANSCRIPT_FORMATS)
    _number(fields, "temperature", 0, 1)
    if fields.get("stream", "false").lower() not in ("false", "0", ""):
        raise invalid("Streamed transcriptions are not supported by this gateway.", "stream")
    return False


def speech(body: dict[str, Any]) -> bool:
    """``/v1/audio/speech``: ``input`` (1 to 4096 characters), ``voice``, ``response_format``,
    ``speed``; the audio comes back as raw bytes, never as SSE events."""
    text = _text(body, "input")
    if len(text) > MAX_SPEECH_CHARACTERS:
        raise invalid(
            f"'input' is {len(text)} characters; the limit is {MAX_SPEECH_CHARACTERS}.", "input"
        )
    voice = body.get("voice")
    if voice is None:
        raise invalid("Missing required parameter: 'voice'.", "voice")
    if not (isinstance(voice, str) and voice) and not isinstance(voice, dict):
        raise invalid("'voice' must be a voice name or a voice object.", "voice")
    _one_of(body, "response_format", SPEECH_FORMATS)
    _number(body, "speed", 0.25, 4.0)
    if body.get("stream_format") not in (None, "audio"):
        raise invalid("Only stream_format 'audio' (raw bytes) is supported.", "stream_format")
    return False


def images(body: dict[str, Any]) -> bool:
    """``/v1/images/generations``: ``prompt``, ``n`` (1-10), ``size`` (``auto`` or ``WxH``; which
    sizes a model makes is the backend's to say), ``response_format`` (``url``, ``b64_json``)."""
    _text(body, "prompt")
    n = body.get("n")
    if n is not None and (
        isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES
    ):
        raise invalid(f"'n' must be an integer from 1 to {MAX_IMAGES}.", "n")
    size = body.get("size")
    if (
        size is not None
        and size != "auto"
        and not (isinstance(size, str) and _SIZE.fullmatch(size))
    ):
        raise invalid(f"'size' must be 'auto' or WIDTHxHEIGHT, got {str(size)[:40]!r}.", "size")
    _one_of(body, "response_format", IMAGE_FORMATS)
    _no_stream(body, "Image generations")
    return False
