"""The ``openai`` personality: an OpenAI-compatible server for audio and images (plus chat).

Modelled on the public OpenAI API as described by ``openai/openai-python`` types and the
API reference (``shared/reference/backends.md`` section 4). What it reproduces:

* ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``: ``multipart/form-data``
  with ``file`` and ``model`` (plus ``response_format`` ``json`` | ``text`` |
  ``verbose_json`` | ``srt`` | ``vtt``, ``language``, ``prompt``, ``temperature``). The upload
  is parsed *as it arrives* (``backends.http`` body sinks): the file is hashed and counted,
  never held in memory, so uploads of any size up to ``--max-upload-bytes`` (25 MiB, like
  OpenAI; above it a 413) are fine. The transcript is deterministic text seeded by the
  file's hash; its length follows the audio duration, computed as if the file were 16 kHz
  16-bit mono PCM: ``duration = bytes / 32000`` seconds (``verbose_json`` reports it, with
  segments; ``json`` has ``{"text", "usage": {"type": "duration", "seconds"}}``);
* ``POST /v1/audio/speech``: JSON ``{model, input, voice, response_format, speed}`` ->
  audio bytes, streamed in chunks with ``Transfer-Encoding: chunked`` and the matching
  Content-Type (``audio/mpeg``, ``audio/opus``, ``audio/aac``, ``audio/flac``, ``audio/wav``,
  ``audio/pcm``); 24 kHz mono, silence, about 0.4 s per input word / ``speed``. ``wav``
  (RIFF header + PCM), ``pcm`` and ``mp3`` (MPEG-2 layer III frames) are decodable; ``opus``
  (Ogg pages with ``OpusHead``/``OpusTags``), ``aac`` (ADTS frames) and ``flac``
  (``fLaC`` + STREAMINFO) only have the right container structure;
* ``POST /v1/images/generations``: ``{model, prompt, n, size, response_format, quality}``
  -> ``{"created", "data": [{"url"} | {"b64_json"}]}`` (``revised_prompt`` for dall-e-3;
  gpt-image-* always answer ``b64_json`` and add ``usage``). Images are real PNGs of the
  requested size in one colour derived from the prompt; URLs point back at this server
  (``GET /sim/images/<W>x<H>-<rrggbb>.png``, on the server's own address when started with a
  fixed ``--port``, as OpenAI's URLs are on its storage host whoever relayed the request);
* ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` are served by an
  embedded vLLM personality (:mod:`backends.vllm`, so bodies carry vLLM's extra fields and
  *its* error shape), behind this server's auth and error injection;
* ``GET /v1/models`` and ``/v1/models/{id}`` (``owned_by: "system"``), ``GET /health``;
* OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``: 400
  ``invalid_request_error`` for a missing ``file`` / ``model`` / ``prompt`` / ``input`` /
  ``voice`` or a bad value, 404 ``model_not_found`` for a model not given with ``--model``
  (unless ``--accept-any-model``), 401 ``invalid_api_key`` with ``--api-key``, 429
  ``rate_limit_exceeded`` when ``--max-running`` + ``--max-queue`` are full; and the
  ``x-request-id: req_...``, ``openai-version``, ``openai-processing-ms`` headers.

Knobs (request headers): ``x-sim-ttft-ms`` (processing time before the answer / the
first audio chunk), ``x-sim-itl-ms`` (pause between audio chunks), ``x-sim-output-tokens``
(transcript length in words), ``x-sim-error: <status>`` (answer that OpenAI-style error),
``x-sim-error-after: <n>`` (speech: cut the audio stream after n chunks without its
terminating chunk; other routes: a 500 after the processing time), ``x-sim-image-noise: 1``
(``b64_json`` images of random pixels, as large as real photos, instead of one colour).
``/sim/requests`` records multipart uploads as ``{"fields": {...}, "files": {"file":
{"filename", "content_type", "size", "sha256"}}}``.

Deliberately not reproduced: real speech or images, ``stream`` transcriptions and SSE
speech (``stream_format``), image edits/variations, the Responses and Realtime APIs, rate
limit headers, ``timestamp_granularities`` (segments are always included in
``verbose_json``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import math
import os
import random
import struct
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson

from backends import textgen
from backends.common import (
    BadKnob,
    Knobs,
    Scheduler,
    SimControl,
    add_common_arguments,
    bearer_ok,
    common_config,
    forced_status,
    json_or_text,
    read_knobs,
)
from backends.http import AbortStream, App, Header, Request, Response, StreamResponse
from backends.vllm import VllmConfig, VllmSimulator

__all__ = [
    "KIND",
    "MultipartSink",
    "OpenAIConfig",
    "OpenAIMediaSimulator",
    "add_arguments",
    "build_app",
]

KIND = "openai"
DEFAULT_MODELS = ["whisper-1", "tts-1", "dall-e-3", "gpt-4o-mini"]
MAX_UPLOAD = 25 * 1024 * 1024
AUDIO_EXTENSIONS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")
TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
SPEECH_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
SPEECH_RATE = 24000
IMAGE_SIZES = {
    "dall-e-2": ("256x256", "512x512", "1024x1024"),
    "dall-e-3": ("1024x1024", "1792x1024", "1024x1792"),
    "gpt-image": ("auto", "1024x1024", "1536x1024", "1024x1536"),
}
ALL_SIZES = tuple(dict.fromkeys(s for sizes in IMAGE_SIZES.values() for s in sizes))


@dataclass
class OpenAIConfig:
    """Settings of one simulated OpenAI media server (each is also a CLI flag)."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    accept_any_model: bool = False
    api_key: str | None = None
    max_upload_bytes: int = MAX_UPLOAD
    embedding_dim: int = 384
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    output_tokens: int = 16
    max_running: int = 256
    max_queue: int = 256
    keep_alive_timeout: float = 5.0
    pod_name: str | None = None
    history: int = 200
    # Where image URLs point (``http://host:port``). OpenAI's URLs are on its own storage host,
    # whoever the client talked to; when unset, the request's Host header is used.
    image_base_url: str | None = None


# --- errors --------------------------------------------------------------------------


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def response(self, headers: list[Header] | None = None) -> Response:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        return Response(self.status, orjson.dumps(body), headers=headers)


def missing(name: str) -> OpenAIError:
    return OpenAIError(
        400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
    )


def invalid_value(name: str, value: Any, allowed: tuple[str, ...]) -> OpenAIError:
    return OpenAIError(
        400,
        f"Invalid value: '{value}'. Supported values are: "
        + ", ".join(f"'{a}'" for a in allowed)
        + ".",
        param=name,
        code="invalid_value",
    )


def injected(status: int, model: str) -> OpenAIError:
    """The OpenAI error an ``x-sim-error: <status>`` stands for."""
    table: dict[int, tuple[str, str, str | None, str | None]] = {
        400: ("Invalid request (x-sim-error).", "invalid_request_error", None, None),
        401: (
            "Incorrect API key provided: sk-sim***. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            "invalid_api_key",
        ),
        403: ("You are not allowed to sample from this model", "invalid_request_error", None, None),
        404: (
            f"The model `{model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            None,
            "model_not_found",
        ),
        429: (
            f"Rate limit reached for {model} in organization org-sim on requests per min (RPM): "
            "Limit 3, Used 3, Requested 1. Please try again in 20s.",
            "requests",
            None,
            "rate_limit_exceeded",
        ),
        500: (
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
            None,
        ),
        503: (
            "The engine is currently overloaded, please try again later",
            "service_unavailable_error",
            None,
            "server_is_overloaded",
        ),
    }
    message, type_, param, code = table.get(
        status, (f"Simulated error {status}.", "server_error" if status >= 500 else
                 "invalid_request_error", None, None)
    )  # fmt: skip
    return OpenAIError(status, message, type_, param, code)


# --- streaming multipart/form-data ---------------------------------------------------


class _FilePart:
    __slots__ = ("content_type", "filename", "hash", "head", "size")

    def __init__(self, filename: str, content_type: str | None) -> None:
        self.filename = filename
        self.content_type = content_type
        self.size = 0
        self.hash = hashlib.sha256()
        self.head = b""

    def summary(self) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "content_type": self.content_type,
            "size": self.size,
            "sha256": self.hash.hexdigest(),
        }


def _header_params(value: str) -> tuple[str, dict[str, str]]:
    """``form-data; name="file"; filename="a.wav"`` -> (``form-data``, params)."""
    parts = value.split(";")
    params: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, val = part.strip().partition("=")
        if sep:
            val = val.strip()
            if len(val) >= 2 and val[0] == val[-1] == '"':
                val = val[1:-1].replace('\\"', '"')
            params[key.strip().lower()] = val
    return parts[0].strip().lower(), params


class MultipartSink:
    """An incremental ``multipart/form-data`` parser (a :class:`backends.http.BodySink`).

    Plain fields are kept (up to 1 MiB each); file parts are only hashed and counted.
    Problems are recorded in ``error`` (``"not_multipart"``, ``"malformed"``,
    ``"too_large"``) instead of raised; ``total`` is the number of body bytes received.
    """

    FIELD_LIMIT = 1 << 20
    HEADER_LIMIT = 16 << 10

    def __init__(self, headers: Mapping[str, str], max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.total = 0
        self.fields: dict[str, str] = {}
        self.files: dict[str, _FilePart] = {}
        self.error: str | None = None
        self._buf = bytearray()
        self._state = "preamble"
        self._part: _FilePart | bytearray | None = None
        self._name = ""
        kind, params = _header_params(headers.get("content-type", ""))
        boundary = params.get("boundary")
        if kind != "multipart/form-data" or not boundary:
            self.error = "not_multipart"
            self._delim = b""
        else:
            self._delim = b"--" + boundary.encode("latin-1")

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        if self.error is not None:
            return
        if self.total > self.max_bytes:
            self.error = "too_large"
            self._buf.clear()
            return
        self._buf += data
        self._run()

    def finish(self) -> None:
        if self.error is None and self._state != "end":
            self.error = "malformed"
        self._buf.clear()

    def _run(self) -> None:
        buf, delim = self._buf, self._delim
        while self.error is None:
            if self._state == "preamble":
                at = buf.find(delim)
                if at < 0:
                    keep = len(delim) - 1
                    if len(buf) > keep:
                        del buf[: len(buf) - keep]
                    return
                del buf[: at + len(delim)]
                self._state = "after_delim"
            elif self._state == "after_delim":
                if len(buf) < 2:
                    return
                if buf[:2] == b"--":
                    self._state = "end"
                    buf.clear()
                    return
                if buf[:2] != b"\r\n":
                    self.error = "malformed"
                    return
                del buf[:2]
                self._state = "headers"
            elif self._state == "headers":
                at = buf.find(b"\r\n\r\n")
                if at < 0:
                    if len(buf) > self.HEADER_LIMIT:
                        self.error = "malformed"
                    return
                self._start_part(bytes(buf[:at]))
                del buf[: at + 4]
                self._state = "body"
            elif self._state == "body":
                marker = b"\r\n" + delim
                at = buf.find(marker)
                if at < 0:
                    keep = len(marker) - 1
                    if len(buf) > keep:
                        self._part_data(bytes(buf[: len(buf) - keep]))
                        del buf[: len(buf) - keep]
                    return
                self._part_data(bytes(buf[:at]))
                self._end_part()
                del buf[: at + len(marker)]
                self._state = "after_delim"
            else:  # end: ignore the epilogue
                buf.clear()
                return

    def _start_part(self, raw: bytes) -> None:
        headers: dict[str, str] = {}
        for line in raw.decode("utf-8", "replace").split("\r\n"):
            key, sep, value = line.partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()
        _, params = _header_params(headers.get("content-disposition", ""))
        self._name = params.get("name", "")
        if "filename" in params:
            self._part = _FilePart(params["filename"], headers.get("content-type"))
        else:
            self._part = bytearray()

    def _part_data(self, data: bytes) -> None:
        part = self._part
        if isinstance(part, _FilePart):
            part.size += len(data)
            part.hash.update(data)
            if len(part.head) < 64:
                part.head += data[: 64 - len(part.head)]
        elif part is not None and len(part) < self.FIELD_LIMIT:
            part += data[: self.FIELD_LIMIT - len(part)]

    def _end_part(self) -> None:
        part = self._part
        if isinstance(part, _FilePart):
            self.files[self._name] = part
        elif part is not None:
            self.fields[self._name] = part.decode("utf-8", "replace")
        self._part = None

    def summary(self) -> dict[str, Any]:
        return {
            "fields": self.fields,
            "files": {k: v.summary() for k, v in self.files.items()},
            "bytes": self.total,
            "error": self.error,
        }


# --- media encoders ------------------------------------------------------------------


def wav_bytes(samples: int, rate: int = SPEECH_RATE) -> bytes:
    """A 16-bit mono PCM WAV file of ``samples`` samples of silence."""
    data = samples * 2
    header = b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    header += b"data" + struct.pack("<I", data)
    return header + bytes(data)


def _mp3(seconds: float) -> bytes:
    """MPEG-2 layer III frames, 24 kHz mono 64 kbit/s, all-zero (silent) payloads."""
    frame = b"\xff\xf3\x84\xc0" + bytes(192 - 4)
    return frame * max(1, math.ceil(seconds / 0.024))


def _crc32_ogg(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def _ogg_page(packets: list[bytes], granule: int, seq: int, flags: int) -> bytes:
    lacing = b""
    for p in packets:
        lacing += b"\xff" * (len(p) // 255) + bytes([len(p) % 255])
    header = b"OggS" + struct.pack("<BBqIIIB", 0, flags, granule, 0x53494D31, seq, 0, len(lacing))
    page = header + lacing + b"".join(packets)
    crc = _crc32_ogg(page)
    return page[:22] + struct.pack("<I", crc) + page[26:]


def _opus(seconds: float) -> bytes:
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 312, SPEECH_RATE, 0, 0)
    tags = b"OpusTags" + struct.pack("<I", 8) + b"tollgate" + struct.pack("<I", 0)
    pages = [_ogg_page([head], 0, 0, 0x02), _ogg_page([tags], 0, 1, 0)]
    total = max(1, math.ceil(seconds * 50))  # 20 ms packets
    seq, done = 2, 0
    while done < total:
        count = min(50, total - done)
        done += count
        flags = 0x04 if done >= total else 0
        pages.append(_ogg_page([b"\xf8"] * count, 312 + done * 960, seq, flags))
        seq += 1
    return b"".join(pages)


def _aac(seconds: float) -> bytes:
    """ADTS frames (AAC-LC, 24 kHz, mono) with zeroed payloads."""
    payload = bytes(16)
    length = 7 + len(payload)
    header = bytes(
        [
            0xFF,
            0xF1,
            (1 << 6) | (6 << 2),  # profile LC, sampling index 6 (24 kHz)
            (1 << 6) | (length >> 11),  # channel configuration 1
            (length >> 3) & 0xFF,
            ((length & 0x7) << 5) | 0x1F,
            0xFC,
        ]
    )
    return (header + payload) * max(1, math.ceil(seconds * SPEECH_RATE / 1024))


def _flac(seconds: float) -> bytes:
    samples = int(seconds * SPEECH_RATE)
    info = struct.pack(">HH", 4096, 4096) + b"\x00\x00\x00" * 2
    packed = (SPEECH_RATE << 44) | (0 << 41) | (15 << 36) | samples
    info += packed.to_bytes(8, "big") + bytes(16)
    return b"fLaC" + bytes([0x80]) + len(info).to_bytes(3, "big") + info


def speech_bytes(fmt: str, seconds: float) -> bytes:
    if fmt == "wav":
        return wav_bytes(int(seconds * SPEECH_RATE))
    if fmt == "pcm":
        return bytes(int(seconds * SPEECH_RATE) * 2)
    if fmt == "mp3":
        return _mp3(seconds)
    if fmt == "opus":
        return _opus(seconds)
    if fmt == "aac":
        return _aac(seconds)
    return _flac(seconds)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


@lru_cache(maxsize=32)
def png_bytes(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A valid ``width`` x ``height`` RGB PNG in one colour."""
    row = b"\x00" + bytes(rgb) * width
    return _png(width, height, zlib.compress(row * height, 9))


def noisy_png(width: int, height: int, seed: int) -> bytes:
    """A valid PNG of random pixels: about 3 bytes a pixel, the size of a real photo's."""
    rng = random.Random(seed)
    rows = b"".join(b"\x00" + rng.randbytes(width * 3) for _ in range(height))
    return _png(width, height, zlib.compress(rows, 1))


def _png(width: int, height: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _colour(prompt: str) -> tuple[int, int, int]:
    seed = textgen.prompt_seed("image:" + prompt)
    return seed[0], seed[1], seed[2]


def _timestamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


# --- the simulator -------------------------------------------------------------------


class OpenAIMediaSimulator(SimControl):
    """State and handlers of one simulated OpenAI server; ``self.app`` is what to serve."""

    config: OpenAIConfig

    def __init__(self, config: OpenAIConfig | None = None) -> None:
        config = config or OpenAIConfig()
        if not config.models:
            config.models = list(DEFAULT_MODELS)
        super().__init__(config)
        self.served = frozenset(config.models)
        self.chat_scheduler = Scheduler(config.max_running, config.max_queue)
        self.chats: dict[str, VllmSimulator] = {}
        for name in config.models:
            self._chat_for(name)
        headers: list[Header] = [("openai-version", "2020-10-01")]
        if config.pod_name:
            headers.append(("x-inference-pod", config.pod_name))
        self.app = App(
            server_header=None,
            keep_alive_timeout=config.keep_alive_timeout,
            default_headers=headers,
        )
        route = self.app.route

        def sink(h: dict[str, str]) -> MultipartSink:
            return MultipartSink(h, config.max_upload_bytes)

        route("POST", "/v1/audio/transcriptions", self.transcriptions, body_sink=sink)
        route("POST", "/v1/audio/translations", self.translations, body_sink=sink)
        route("POST", "/v1/audio/speech", self.speech)
        route("POST", "/v1/images/generations", self.images)
        route("POST", "/v1/chat/completions", self._delegate("chat_completions"))
        route("POST", "/v1/completions", self._delegate("completions"))
        route("POST", "/v1/embeddings", self._delegate("embeddings"))
        route("GET", "/v1/models", self.models)
        route("GET", "/health", self.health)
        self.add_control_routes(self.app)
        self.app.fallback = self.fallback

    # -- plumbing ----------------------------------------------------------------------

    @staticmethod
    def _headers(t0: float) -> list[Header]:
        return [
            ("x-request-id", "req_" + os.urandom(16).hex()),
            ("openai-processing-ms", str(int((time.perf_counter() - t0) * 1000))),
        ]

    def _gate(self, req: Request, model: Any) -> OpenAIError | None:
        """Auth, then an error asked for by ``x-sim-error`` or ``/sim/config``."""
        key = self.config.api_key
        if key:
            auth = req.headers.get("authorization", "")
            if not auth:
                return OpenAIError(
                    401,
                    "You didn't provide an API key. You need to provide your API key in an "
                    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                )
            if not bearer_ok(req.headers, key):
                return injected(401, "")
        status = forced_status(req.headers)
        if isinstance(status, str):
            return OpenAIError(400, f"invalid x-sim-error header: {status!r}")
        if status is None:
            status = self._configured_error()
        if status is not None:
            return injected(status, model if isinstance(model, str) else "")
        return None

    def _check_model(self, model: Any) -> None:
        if not isinstance(model, str) or not model:
            raise OpenAIError(400, "you must provide a model parameter")
        if not self.config.accept_any_model and model not in self.served:
            raise OpenAIError(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )

    def _knobs(self, req: Request) -> Knobs:
        try:
            return read_knobs(req.headers, self.config)
        except BadKnob as exc:
            raise OpenAIError(400, str(exc)) from None

    async def _work(self, knobs: Knobs) -> None:
        """Hold a slot for the processing time; 429 when running and queue are full."""
        if not await self.scheduler.acquire():
            raise OpenAIError(
                429,
                "Rate limit reached: too many concurrent requests (simulator queue is full).",
                "requests",
                code="rate_limit_exceeded",
            )
        try:
            if knobs.ttft > 0:
                await asyncio.sleep(knobs.ttft)
            if knobs.error_after is not None:
                raise injected(500, "")
        finally:
            self.scheduler.release()

    def _json(self, req: Request) -> dict[str, Any]:
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError:
            raise OpenAIError(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
                "payload, but what was sent was not valid JSON. If you have trouble figuring "
                "out how to fix this, please contact us through our help center at "
                "help.openai.com.)",
            ) from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "Invalid type for request body: expected an object.")
        return body

    def _chat_for(self, model: str) -> VllmSimulator:
        """The embedded vLLM simulator that serves ``model`` (and reports that name)."""
        sim = self.chats.get(model)
        if sim is None:
            c = self.config
            sim = VllmSimulator(
                VllmConfig(
                    models=[model],
                    embedding_dim=c.embedding_dim,
                    ttft_ms=c.ttft_ms,
                    itl_ms=c.itl_ms,
                    output_tokens=c.output_tokens,
                    max_running=c.max_running,
                    max_queue=c.max_queue,
                    history=c.history,
                )
            )
            sim.history = self.history  # one request log for all
            sim.scheduler = sim.metrics.scheduler = self.chat_scheduler
            if len(self.chats) < 64:
                self.chats[model] = sim
        return sim

    def _delegate(self, name: str) -> Any:
        """An embedded vLLM route behind this server's auth, model check and injection."""

        async def route(req: Request) -> Response | StreamResponse:
            t0 = time.perf_counter()
            body = json_or_text(req.body)
            model = body.get("model") if isinstance(body, dict) else None
            error = self._gate(req, model)
            if error is None and isinstance(model, str) and model:
                try:
                    self._check_model(model)
                except OpenAIError as exc:
                    error = exc
            if error is not None:
                self._record(req, body)
                return error.response(self._headers(t0))
            served = model if isinstance(model, str) and model else self.config.models[0]
            handler = getattr(self._chat_for(served), name)
            result: Response | StreamResponse = await handler(req)
            return result

        return route

    # -- audio -------------------------------------------------------------------------

    async def transcriptions(self, req: Request) -> Response:
        return await self._audio(req, "transcribe")

    async def translations(self, req: Request) -> Response:
        return await self._audio(req, "translate")

    async def _audio(self, req: Request, task: str) -> Response:
        t0 = time.perf_counter()
        sink: MultipartSink = req.sink
        self._record(req, sink.summary())
        try:
            error = self._gate(req, sink.fields.get("model"))
            if error is not None:
                raise error
            if sink.error == "too_large":
                raise OpenAIError(
                    413,
                    f"Maximum content size limit ({self.config.max_upload_bytes}) exceeded "
                    f"({sink.total} bytes read)",
                    "server_error",
                )
            if sink.error is not None:
                raise OpenAIError(400, "Could not parse multipart form")
            upload = sink.files.get("file")
            if upload is None:
                raise OpenAIError(
                    400,
                    "1 validation error for Request\nbody -> file\n  field required "
                    "(type=value_error.missing)",
                )
            model = sink.fields.get("model")
            self._check_model(model)
            ext = upload.filename.rsplit(".", 1)[-1].lower() if "." in upload.filename else ""
            if ext and ext not in AUDIO_EXTENSIONS:
                raise OpenAIError(
                    400,
                    f"Invalid file format. Supported formats: {list(AUDIO_EXTENSIONS)}",
                    param="file",
                )
            fmt = sink.fields.get("response_format") or "json"
            if fmt not in TRANSCRIPT_FORMATS:
                raise OpenAIError(
                    400,
                    f"'{fmt}' is not one of {list(TRANSCRIPT_FORMATS)} - 'response_format'",
                    param="response_format",
                )
            knobs = self._knobs(req)
            duration = upload.size / 32000.0
            natural = max(1, min(2000, round(duration * 2.5)))
            words = knobs.output_tokens if "x-sim-output-tokens" in req.headers else natural
            await self._work(knobs)
        except OpenAIError as exc:
            return exc.response(self._headers(t0))
        text = textgen.generate_text(upload.hash.digest()[:16], words).strip()
        language = "english" if task == "translate" else sink.fields.get("language") or "english"
        usage = {"type": "duration", "seconds": math.ceil(duration)}
        headers = self._headers(t0)
        if fmt == "text":
            return Response(
                200, text.encode(), content_type="text/plain; charset=utf-8", headers=headers
            )
        segments = _segments(text, duration)
        if fmt in ("srt", "vtt"):
            body = _subtitles(segments, fmt)
            content_type = "text/plain; charset=utf-8" if fmt == "srt" else "text/vtt"
            return Response(200, body.encode(), content_type=content_type, headers=headers)
        if fmt == "json":
            return Response(200, orjson.dumps({"text": text, "usage": usage}), headers=headers)
        out = {
            "task": task,
            "language": language,
            "duration": duration,
            "text": text,
            "segments": segments,
            "usage": usage,
        }
        return Response(200, orjson.dumps(out), headers=headers)

    async def speech(self, req: Request) -> Response | StreamResponse:
        t0 = time.perf_counter()
        body: Any = json_or_text(req.body)
        self._record(req, body)
        try:
            error = self._gate(req, body.get("model") if isinstance(body, dict) else None)
            if error is not None:
                raise error
            body = self._json(req)
            if "model" not in body:
                raise missing("model")
            self._check_model(body["model"])
            text = body.get("input")
            if text is None:
                raise missing("input")
            if not isinstance(text, str):
                raise OpenAIError(
                    400, "Invalid type for 'input': expected a string.", param="input"
                )
            if len(text) > 4096:
                raise OpenAIError(
                    400,
                    "String should have at most 4096 characters",
                    param="input",
                    code="string_above_max_length",
                )
            if not body.get("voice"):
                raise missing("voice")
            fmt = body.get("response_format") or "mp3"
            if fmt not in SPEECH_TYPES:
                raise invalid_value("response_format", fmt, tuple(SPEECH_TYPES))
            speed = body.get("speed", 1.0)
            if isinstance(speed, bool) or not isinstance(speed, int | float):
                raise OpenAIError(
                    400, "Invalid type for 'speed': expected a number.", param="speed"
                )
            if not 0.25 <= speed <= 4.0:
                raise OpenAIError(
                    400,
                    f"Invalid 'speed': {speed}. Expected a value between 0.25 and 4.0.",
                    param="speed",
                )
            knobs = self._knobs(req)
            if not await self.scheduler.acquire():
                raise OpenAIError(
                    429,
                    "Rate limit reached: too many concurrent requests (simulator queue is full).",
                    "requests",
                    code="rate_limit_exceeded",
                )
        except OpenAIError as exc:
            return exc.response(self._headers(t0))
        seconds = max(0.5, 0.4 * len(text.split())) / speed
        audio = speech_bytes(fmt, seconds)
        return StreamResponse(
            self._audio_chunks(audio, knobs),
            content_type=SPEECH_TYPES[fmt],
            headers=self._headers(t0),
            on_close=self.scheduler.release,
        )

    async def _audio_chunks(self, audio: bytes, knobs: Knobs) -> AsyncIterator[bytes]:
        if knobs.ttft > 0:
            await asyncio.sleep(knobs.ttft)
        size = 16384
        for n, start in enumerate(range(0, len(audio), size)):
            if knobs.error_after is not None and n >= knobs.error_after:
                raise AbortStream
            if n and knobs.itl > 0:
                await asyncio.sleep(knobs.itl)
            yield audio[start : start + size]

    # -- images ------------------------------------------------------------------------

    async def images(self, req: Request) -> Response:
        t0 = time.perf_counter()
        body: Any = json_or_text(req.body)
        self._record(req, body)
        try:
            error = self._gate(req, body.get("model") if isinstance(body, dict) else None)
            if error is not None:
                raise error
            body = self._json(req)
            model = body.get("model") or "dall-e-2"
            self._check_model(model)
            prompt = body.get("prompt")
            if prompt is None:
                raise OpenAIError(400, "'prompt' is a required property", param="prompt")
            if not isinstance(prompt, str) or not prompt:
                raise OpenAIError(400, "Invalid 'prompt': empty string.", param="prompt")
            n = body.get("n", 1)
            n = 1 if n is None else n
            limit = 1 if model == "dall-e-3" else 10
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
                raise OpenAIError(
                    400,
                    f"Invalid 'n': expected an integer between 1 and {limit}, got {n}.",
                    param="n",
                )
            family = "gpt-image" if model.startswith("gpt-image") else model
            sizes = IMAGE_SIZES.get(family, ALL_SIZES)
            size = body.get("size") or ("auto" if family == "gpt-image" else "1024x1024")
            if size not in sizes:
                raise invalid_value("size", size, sizes)
            fmt = "b64_json" if family == "gpt-image" else body.get("response_format") or "url"
            if fmt not in ("url", "b64_json"):
                raise invalid_value("response_format", fmt, ("url", "b64_json"))
            knobs = self._knobs(req)
            await self._work(knobs)
        except OpenAIError as exc:
            return exc.response(self._headers(t0))
        width, height = (1024, 1024) if size == "auto" else map(int, size.split("x"))
        data = []
        for i in range(n):
            rgb = _colour(f"{prompt}\x00{i}")
            item: dict[str, Any]
            if fmt == "b64_json":
                if req.headers.get("x-sim-image-noise") == "1":  # photo-sized answers
                    png = noisy_png(width, height, int.from_bytes(bytes(rgb), "big"))
                else:
                    png = png_bytes(width, height, rgb)
                item = {"b64_json": base64.b64encode(png).decode("ascii")}
            else:
                base = self.config.image_base_url
                if base is None:
                    base = "http://" + req.headers.get("host", "127.0.0.1")
                name = f"{width}x{height}-{bytes(rgb).hex()}.png"
                item = {"url": f"{base}/sim/images/{name}"}
            if model == "dall-e-3":
                item["revised_prompt"] = prompt
            data.append(item)
        out: dict[str, Any] = {"created": int(time.time()), "data": data}
        if family == "gpt-image":
            per_image = {"low": 272, "high": 4160}.get(body.get("quality") or "", 1056)
            prompt_tokens = textgen.count_tokens(prompt)
            out["usage"] = {
                "total_tokens": prompt_tokens + per_image * n,
                "input_tokens": prompt_tokens,
                "output_tokens": per_image * n,
                "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": 0},
            }
        return Response(200, orjson.dumps(out), headers=self._headers(t0))

    # -- other routes ------------------------------------------------------------------

    def _card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 1686935002, "owned_by": "system"}

    async def models(self, req: Request) -> Response:
        error = self._gate(req, None)
        if error is not None:
            return error.response(self._headers(time.perf_counter()))
        cards = [self._card(m) for m in self.config.models]
        return Response(200, orjson.dumps({"object": "list", "data": cards}))

    async def health(self, req: Request) -> Response:
        return Response(self.health_status, b"", content_type=None)

    async def fallback(self, req: Request) -> Response:
        path = req.path
        if req.method == "GET" and path.startswith("/sim/images/") and path.endswith(".png"):
            try:
                dims, colour = path[len("/sim/images/") : -4].split("-")
                width, height = (int(v) for v in dims.split("x"))
                rgb = bytes.fromhex(colour)
                if len(rgb) != 3 or not (0 < width <= 4096 and 0 < height <= 4096):
                    raise ValueError
            except ValueError:
                return Response(404, b"", content_type=None)
            return Response(
                200, png_bytes(width, height, (rgb[0], rgb[1], rgb[2])), content_type="image/png"
            )
        if req.method == "GET" and path.startswith("/v1/models/"):
            error = self._gate(req, None)
            if error is not None:
                return error.response()
            name = path[len("/v1/models/") :]
            if name in self.served:
                return Response(200, orjson.dumps(self._card(name)))
            return OpenAIError(
                404,
                f"The model '{name}' does not exist",
                param="model",
                code="model_not_found",
            ).response()
        self._record(req, json_or_text(req.body))
        return OpenAIError(404, f"Invalid URL ({req.method} {path})").response()

    async def sim_config_update(self, req: Request) -> Response:
        response = await super().sim_config_update(req)
        c = self.config
        for sim in self.chats.values():
            sim.config.ttft_ms, sim.config.itl_ms = c.ttft_ms, c.itl_ms
            sim.config.output_tokens = c.output_tokens
        self.chat_scheduler.resize(c.max_running, c.max_queue)
        return response


def _segments(text: str, duration: float) -> list[dict[str, Any]]:
    words = text.split()
    chunks = [words[i : i + 12] for i in range(0, len(words), 12)] or [[]]
    step = duration / len(chunks) if chunks else duration
    out = []
    for i, chunk in enumerate(chunks):
        out.append(
            {
                "id": i,
                "seek": 0,
                "start": round(i * step, 3),
                "end": round((i + 1) * step, 3),
                "text": " " + " ".join(chunk),
                "tokens": [50364 + len(w) for w in chunk],
                "temperature": 0.0,
                "avg_logprob": -0.25,
                "compression_ratio": 1.2,
                "no_speech_prob": 0.01,
            }
        )
    return out


def _subtitles(segments: list[dict[str, Any]], fmt: str) -> str:
    lines = ["WEBVTT", ""] if fmt == "vtt" else []
    sep = "." if fmt == "vtt" else ","
    for seg in segments:
        if fmt == "srt":
            lines.append(str(seg["id"] + 1))
        start, end = _timestamp(seg["start"], sep), _timestamp(seg["end"], sep)
        lines.extend((f"{start} --> {end}", seg["text"].strip(), ""))
    return "\n".join(lines) + "\n"


# --- CLI -----------------------------------------------------------------------------


def build_app(config: OpenAIConfig | None = None) -> App:
    return OpenAIMediaSimulator(config).app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the OpenAI personality's flags to the ``python -m backends`` parser."""
    d = OpenAIConfig()
    g = parser.add_argument_group("openai personality")
    add_common_arguments(
        g,
        d,
        ", ".join(DEFAULT_MODELS),
        "served model id; repeatable (default: " + ", ".join(DEFAULT_MODELS) + ")",
    )
    g.add_argument(
        "--accept-any-model",
        action="store_true",
        help="serve any model id instead of answering 404 model_not_found",
    )
    g.add_argument("--api-key", default=None, help="require Authorization: Bearer <key>")
    g.add_argument("--max-upload-bytes", type=int, default=d.max_upload_bytes)
    g.add_argument("--embedding-dim", type=int, default=d.embedding_dim)


def config_from_args(args: argparse.Namespace) -> OpenAIConfig:
    return OpenAIConfig(
        **common_config(args),
        models=list(args.models or DEFAULT_MODELS),
        accept_any_model=args.accept_any_model,
        api_key=args.api_key,
        max_upload_bytes=args.max_upload_bytes,
        embedding_dim=args.embedding_dim,
        # a fixed port: image URLs point here even when clients reach the server through a proxy
        image_base_url=f"http://{args.host}:{args.port}" if args.port else None,
    )


def app_from_args(args: argparse.Namespace) -> App:
    return build_app(config_from_args(args))
