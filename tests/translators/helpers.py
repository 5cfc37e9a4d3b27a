"""Shared helpers for the translator golden tests: SSE parsing and chunked feeding."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import orjson


class _Body(Protocol):
    def response_body(self, chunk: bytes, end_of_stream: bool) -> bytes | None: ...


def feed(translator: _Body, pieces: Iterable[bytes]) -> bytes:
    """Feed ``pieces`` as body chunks (the last with end_of_stream); the joined output."""
    items = list(pieces)
    out = b""
    for i, piece in enumerate(items):
        out += translator.response_body(piece, i == len(items) - 1) or b""
    return out


def events(stream: bytes) -> list[Any]:
    """The ``data:`` payloads of an SSE byte stream: parsed JSON, or the raw string ("[DONE]")."""
    out: list[Any] = []
    assert stream.endswith(b"\n\n") or not stream, stream[-40:]
    for event in stream.split(b"\n\n"):
        if not event or event.startswith(b":"):
            continue
        assert event.startswith(b"data: "), event
        payload = event[6:]
        out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


def split_everywhere(stream: bytes) -> Iterable[list[bytes]]:
    """``stream`` cut in two at every byte offset (mid-event, mid-UTF-8 character...)."""
    for i in range(len(stream) + 1):
        yield [stream[:i], stream[i:]]
