"""OpenAI media API (audio transcriptions and translations, speech, image generations) -> an
OpenAI-compatible media backend (OpenAI itself, the ``openai`` simulator, vLLM for
transcriptions) and back.

The schemas match, so requests and answers pass through; the translator only steps in for:

* an aliased model: ``model`` is rewritten to ``backend_model`` (a JSON field, or the form field
  in the head of an upload). Answers carry no model id (speech is raw audio), so nothing is
  rewritten on the way back;
* metering: speech and images are charged by what the request says (characters, ``n``), known
  before the backend runs (:attr:`usage` is set by :meth:`request`). A transcription priced per
  audio second is charged by the ``duration`` the backend reports: the backend is asked for
  ``verbose_json`` (the one format that always carries it) and the client gets the format it
  asked for, rendered here: ``json`` as OpenAI's ``{"text", "usage": {"type": "duration",
  "seconds"}}``, ``text`` as the bare transcript, ``srt``/``vtt`` from the segments.
  A transcription priced only per request is never read back;
* backend errors, normalized as for every OpenAI-compatible backend (``errors_map``).
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog

from ..config import Model
from ..media import audio_seconds, reserved_units
from .openai_vllm import OpenAIToVLLM

log = structlog.get_logger("tollgate.media")

# the client's transcript format -> the content type of the rendered answer (OpenAI's)
_TRANSCRIPT_TYPES = {
    "json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "text/plain; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}


class OpenAIMedia(OpenAIToVLLM):
    """The OpenAI pass-through (paths, statuses, errors and the alias on the request are its),
    plus what metering media needs; answers are never rewritten for the alias."""

    __slots__ = ("_render", "_timed", "content_type", "usage")

    def __init__(self, model: Model, request_id: str = "") -> None:
        super().__init__(model, request_id)
        self._timed = False  # the answer is read for its duration (per-second pricing)
        self._render: str | None = None  # the client's format, rendered from verbose_json
        self.usage: dict[str, int] | None = None
        self.content_type: str | None = None

    # ------------------------------------------------------------------ request
    def request(self, op: str, body: dict[str, Any], stream: bool) -> bool:
        model = self._model
        changed = super().request(op, body, stream)  # the model alias
        if model.kind == "transcription" and model.price.per_audio_second:
            self._timed = True
            fmt = body.get("response_format") or "json"
            if fmt != "verbose_json":
                self._render = fmt
                self.content_type = _TRANSCRIPT_TYPES[fmt]
                body["response_format"] = "verbose_json"
                changed = True
        else:  # the units are known now (0 audio seconds: priced per request only)
            self.usage = {"prompt_tokens": reserved_units(op, model, body), "completion_tokens": 0}
        return changed

    # ----------------------------------------------------------------- response
    def wants_response_body(self, status: int, content_type: str) -> bool:
        return status >= 400 or self._timed

    def response_body(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        """The whole verbose_json transcript (the processor buffers it): read its duration and
        render the client's format. An answer that is not verbose_json passes unchanged and,
        its duration unknown, is charged the reservation."""
        try:
            data = orjson.loads(chunk)
            duration = float(data["duration"])
            text = data["text"]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("transcript_without_duration", model=self._model.id)
            self.content_type = None
            return None
        seconds = audio_seconds(self._model, duration)
        self.usage = {"prompt_tokens": seconds, "completion_tokens": 0}
        fmt = self._render
        if fmt is None:
            return None
        if fmt == "json":
            usage = {"type": "duration", "seconds": -int(-duration // 1)}
            return orjson.dumps({"text": text, "usage": usage})
        if fmt == "text":
            return str(text).encode()
        return subtitles(data.get("segments") or [], fmt).encode()


def _timestamp(seconds: float, sep: str) -> str:
    ms = round(max(seconds, 0.0) * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def subtitles(segments: list[Any], fmt: str) -> str:
    """SRT or WebVTT cues from verbose_json segments (``start``, ``end``, ``text``)."""
    vtt = fmt == "vtt"
    sep = "." if vtt else ","
    lines = ["WEBVTT", ""] if vtt else []
    number = 0
    for seg in segments:
        if not isinstance(seg, dict):
            continue
        number += 1
        if not vtt:
            lines.append(str(number))
        start = _timestamp(float(seg.get("start") or 0), sep)
        end = _timestamp(float(seg.get("end") or 0), sep)
        lines += [f"{start} --> {end}", str(seg.get("text", "")).strip(), ""]
    return "\n".join(lines) + "\n"
