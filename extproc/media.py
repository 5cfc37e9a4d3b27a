"""Audio and images, OpenAI-style: what each media endpoint is charged for, and the head of a
multipart upload (the only part of it the processor ever sees).

Metering. Media requests use the same two-phase ledger as text (reserve, then settle once), with
the model's media price mapped onto the ledger's ``input_per_1m`` so the store's exact integer
formula (``ceil(units x price_per_1m / 1e6) + per_request``) prices them; the ledger entry's
``unit`` says what ``tokens_in`` counts. Media units never count against tokens-per-minute.

=====================  ==============  ====================================================
endpoint               unit            reserved (worst case)  ->  settled
=====================  ==============  ====================================================
audio/transcriptions,  audio_seconds   ``max_audio_seconds`` of the model -> the backend's
audio/translations                     ``duration`` rounded up, at most that cap
audio/speech           characters      ``len(input)`` -> the same (known before the backend
                                       runs)
images/generations     images          ``n`` -> ``n``
=====================  ==============  ====================================================

plus ``per_request`` on each. A transcription model priced only per request is never read back.

Uploads. ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` are
``multipart/form-data``. Their Envoy route (``envoy_config._media_route``) sets ext_proc's request
body mode to ``BUFFERED_PARTIAL``: Envoy sends the body whole if it fits its buffer limit (the
listener's ``per_connection_buffer_limit_bytes``, at least 1 MiB), else only its head, and
streams everything after that to the backend without the processor. The form's text fields must
therefore come before the file (every OpenAI SDK sends them first); :class:`FormUpload` parses
that head, and can rewrite a field in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import Any

import orjson

from .config import Model
from .errors import GatewayError, invalid
from .money import MICRO, Price

# operation name -> what its ledger entries count
UNITS: dict[str, str] = {
    "transcription": "audio_seconds",
    "translation": "audio_seconds",
    "speech": "characters",
    "images": "images",
}


def metered_price(model: Model) -> Price:
    """The price the ledger applies: a media price moved onto ``input_per_1m`` per unit (an
    image or audio second costs ``per_image``/``per_audio_second`` = 1e6 x that per 1M units)."""
    p = model.price
    if model.kind == "transcription":
        return Price(input_per_1m=p.per_audio_second * MICRO, per_request=p.per_request)
    if model.kind == "speech":
        return Price(input_per_1m=p.per_1m_characters, per_request=p.per_request)
    if model.kind == "image":
        return Price(input_per_1m=p.per_image * MICRO, per_request=p.per_request)
    return p


def reserved_units(op: str, model: Model, body: Mapping[str, Any]) -> int:
    """The units a media request reserves: its worst case (see the table above)."""
    if UNITS[op] == "audio_seconds":  # transcriptions and translations
        return model.max_audio_seconds if model.price.per_audio_second else 0
    if op == "speech":
        return len(body["input"])
    return int(body.get("n") or 1)  # images


def transcript_seconds(raw: bytes) -> float | None:
    """The audio seconds a JSON transcript names: verbose_json's ``duration``, or the newer
    ``json`` answer's ``usage`` of type ``duration``; None when it names none."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    value = data.get("duration")
    usage = data.get("usage")
    if value is None and isinstance(usage, dict) and usage.get("type") == "duration":
        value = usage.get("seconds")
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


def audio_seconds(model: Model, duration: float) -> int:
    """The seconds charged for ``duration``: rounded up, capped at the reservation's bound."""
    return min(-int(-duration // 1), model.max_audio_seconds)


# --------------------------------------------------------------------------- multipart


def _header(name: str, value: str) -> Message:
    """One MIME header, for the stdlib to read its parameters (quoted, RFC 2231)."""
    message = Message()
    message[name] = value
    return message


def _param(header: Message, name: str, where: str = "content-type") -> str | None:
    value = header.get_param(name, header=where)
    return None if value is None else collapse_rfc2231_value(value)


# The form fields the gateway reads (the model prices the upload and picks the backend; the
# format decides how a transcript's duration is read): each may be given once.
READ_FIELDS = frozenset({"model", "response_format"})


class FormUpload:
    """One ``multipart/form-data`` request: checked on its headers, parsed from its head.

    ``parse_head`` returns the text fields found in the head; ``encode`` gives the head back with
    changed field values (replaced in place, or added as a first part). File parts are noted by
    name, never copied.
    """

    __slots__ = ("_delim", "_raw", "_spans", "complete", "content_length", "files")

    def __init__(self, boundary: str, content_length: int) -> None:
        self._delim = b"--" + boundary.encode("latin-1")
        self.content_length = content_length
        self._raw = b""
        self._spans: dict[str, tuple[int, int, str]] = {}  # field -> (start, end, value)
        self.files: set[str] = set()
        self.complete = False

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], max_bytes: int) -> FormUpload:
        content_type = _header("content-type", headers.get("content-type", ""))
        boundary = _param(content_type, "boundary") or ""
        if content_type.get_content_type() != "multipart/form-data" or not 0 < len(boundary) <= 70:
            raise invalid(
                "This endpoint takes multipart/form-data (a 'file' and a 'model' field).", "file"
            )
        length = headers.get("content-length", "")
        if not length.isdigit():
            raise invalid("An upload needs a Content-Length header (chunked uploads are refused).")
        if int(length) > max_bytes:
            raise GatewayError(
                "request_too_large", f"The upload is {length} bytes; the limit is {max_bytes}."
            )
        return cls(boundary, int(length))

    def parse_head(self, raw: bytes, complete: bool) -> dict[str, Any]:
        """The text fields of the form that lie wholly in ``raw`` (the whole body when
        ``complete``), as strings. A part cut by the end of ``raw`` and everything after it is
        unknown, except that a cut part with a filename is still noted as a file."""
        self._raw, self.complete = raw, complete
        delim = self._delim
        fields: dict[str, Any] = {}
        at = raw.find(delim)
        malformed = invalid("The multipart/form-data body is malformed.", "file")
        if at < 0:
            if complete:
                raise malformed
            return fields
        while True:
            at += len(delim)
            if raw[at : at + 2] == b"--":
                break  # the closing delimiter
            if raw[at : at + 2] != b"\r\n":
                if complete or len(raw) - at >= 2:
                    raise malformed
                break
            head_end = raw.find(b"\r\n\r\n", at + 2)
            if head_end < 0:
                break
            name, filename = "", None
            for line in raw[at + 2 : head_end].split(b"\r\n"):
                key, _, value = line.decode("utf-8", "replace").partition(":")
                if key.strip().lower() == "content-disposition":
                    disposition = _header(key, value)
                    name = _param(disposition, "name", "content-disposition") or ""
                    filename = _param(disposition, "filename", "content-disposition")
            start = head_end + 4
            end = raw.find(b"\r\n" + delim, start)
            if filename is not None:
                self.files.add(name)
            if end < 0:
                break  # cut by the end of the head
            if filename is None and name in fields and name in READ_FIELDS:
                # the backend's form parser keeps the last value (Starlette's, vLLM's), the
                # gateway priced and checked the first: refused rather than guessed
                raise invalid(f"The form gives '{name}' more than once.", name)
            if filename is None and name not in fields:
                value = raw[start:end].decode("utf-8", "replace")
                fields[name] = value
                self._spans[name] = (start, end, value)
            at = end + 2
        if complete and "file" not in self.files:
            raise invalid("Missing required parameter: 'file'.", "file")
        if "model" not in fields and not complete:
            raise invalid(
                "The 'model' field must come before the file in the form (it was not in the"
                f" first {len(raw)} bytes).",
                "model",
            )
        return fields

    def encode(self, fields: Mapping[str, Any]) -> bytes:
        """The head with every field whose value differs from the one parsed replaced, and new
        fields added as the form's first parts."""
        raw, pos = self._raw, 0
        out: list[bytes] = []
        added = b""
        edits: list[tuple[int, int, bytes]] = []
        for name, value in fields.items():
            span = self._spans.get(name)
            if span is None:
                added += (
                    self._delim
                    + b'\r\nContent-Disposition: form-data; name="'
                    + name.encode()
                    + b'"\r\n\r\n'
                    + str(value).encode()
                    + b"\r\n"
                )
            elif span[2] != value:
                edits.append((span[0], span[1], str(value).encode()))
        first = raw.find(self._delim)
        if added:
            edits.append((first, first, added))
        for start, end, value in sorted(edits):
            out += [raw[pos:start], value]
            pos = end
        out.append(raw[pos:])
        return b"".join(out)
