"""Golden tests for the OpenAI media translator: what goes to the backend, what the client gets
back, and the usage each request is settled with (in its own unit)."""

from __future__ import annotations

import orjson
import pytest

from extproc.config import Backend, Endpoint, Model
from extproc.money import Price
from extproc.translators.base import for_backend
from extproc.translators.openai_media import OpenAIMedia, subtitles

PER_SECOND = Model(
    id="whisper-1",
    backend="media",
    backend_model="whisper-1",
    kind="transcription",
    max_audio_seconds=60,
    pricing=Price(per_audio_second=100, per_request=1000),
)
PER_REQUEST = Model(
    id="whisper-flat",
    backend="media",
    backend_model="whisper-1",
    kind="transcription",
    pricing=Price(per_request=2000),
)
TTS = Model(id="tts-1", backend="media", backend_model="tts-1", kind="speech")
IMAGES = Model(id="pictures", backend="media", backend_model="dall-e-2", kind="image")

VERBOSE = orjson.dumps(
    {
        "task": "transcribe",
        "language": "english",
        "duration": 3.2,
        "text": "hello there world",
        "segments": [
            {"id": 0, "start": 0.0, "end": 1.5, "text": " hello there"},
            {"id": 1, "start": 1.5, "end": 3.2, "text": " world"},
        ],
        "usage": {"type": "duration", "seconds": 4},
    }
)


def test_media_models_get_the_media_translator() -> None:
    for model in (PER_SECOND, TTS, IMAGES):
        media = Backend("media", "openai", (Endpoint("127.0.0.1", 1),))
        assert isinstance(for_backend(media, model), OpenAIMedia)


@pytest.mark.parametrize(
    ("fmt", "content_type", "body"),
    [
        (None, "application/json", b'{"text":"hello there world","usage":'),
        ("json", "application/json", b'{"text":"hello there world","usage":'),
        ("text", "text/plain; charset=utf-8", b"hello there world"),
        ("srt", "text/plain; charset=utf-8", b"1\n00:00:00,000 --> 00:00:01,500\nhello there\n"),
        ("vtt", "text/vtt; charset=utf-8", b"WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nhello"),
    ],
)
def test_per_second_transcripts_are_asked_as_verbose_json_and_rendered(
    fmt: str | None, content_type: str, body: bytes
) -> None:
    t = OpenAIMedia(PER_SECOND)
    fields = (
        {"model": "whisper-1"} if fmt is None else {"model": "whisper-1", "response_format": fmt}
    )
    assert t.request("transcription", fields, False) is True
    assert fields["response_format"] == "verbose_json"
    assert t.usage is None  # known only from the answer
    assert t.wants_response_body(200, "application/json")
    out = t.response_body(VERBOSE, True)
    assert out is not None and out.startswith(body)
    assert t.content_type == content_type
    assert t.usage == {"prompt_tokens": 4, "completion_tokens": 0}  # 3.2 s, rounded up
    if fmt in (None, "json"):
        assert orjson.loads(out) == {
            "text": "hello there world",
            "usage": {"type": "duration", "seconds": 4},
        }


def test_verbose_json_passes_through_and_long_audio_is_capped() -> None:
    t = OpenAIMedia(PER_SECOND)
    fields = {"model": "whisper-1", "response_format": "verbose_json"}
    assert t.request("transcription", fields, False) is False
    long = orjson.dumps({"text": "x", "duration": 3600.5, "segments": []})
    assert t.response_body(long, True) is None and t.content_type is None
    assert t.usage == {"prompt_tokens": 60, "completion_tokens": 0}  # max_audio_seconds


def test_an_answer_without_duration_passes_unchanged_with_no_usage() -> None:
    t = OpenAIMedia(PER_SECOND)
    t.request("transcription", {"model": "whisper-1", "response_format": "text"}, False)
    assert t.response_body(b"just text", True) is None
    assert t.usage is None and t.content_type is None  # the processor charges the reservation


def test_per_request_transcription_is_not_read_back_and_alias_is_rewritten() -> None:
    t = OpenAIMedia(PER_REQUEST)
    fields = {"model": "whisper-flat", "response_format": "srt"}
    assert t.request("transcription", fields, False) is True
    assert fields == {"model": "whisper-1", "response_format": "srt"}
    assert not t.wants_response_body(200, "text/plain")
    assert t.wants_response_body(400, "application/json")
    assert t.usage == {"prompt_tokens": 0, "completion_tokens": 0}


def test_speech_and_images_are_charged_by_the_request() -> None:
    speech = OpenAIMedia(TTS)
    assert (
        speech.request("speech", {"model": "tts-1", "input": "héllo", "voice": "a"}, False) is False
    )
    assert speech.usage == {"prompt_tokens": 5, "completion_tokens": 0}  # characters
    assert not speech.wants_response_body(200, "audio/mpeg")

    images = OpenAIMedia(IMAGES)
    body = {"model": "pictures", "prompt": "a fox", "n": 3}
    assert images.request("images", body, False) is True and body["model"] == "dall-e-2"
    assert images.usage == {"prompt_tokens": 3, "completion_tokens": 0}
    one = OpenAIMedia(IMAGES)
    one.request("images", {"model": "pictures", "prompt": "a fox"}, False)
    assert one.usage == {"prompt_tokens": 1, "completion_tokens": 0}


def test_backend_errors_are_normalized() -> None:
    t = OpenAIMedia(IMAGES)
    body = orjson.dumps(
        {"error": {"message": "Invalid 'n'", "type": "invalid_request_error", "param": "n"}}
    )
    err = t.error(400, body)
    assert (err.status, err.code, err.param) == (400, "invalid_request_error", "n")
    assert t.response_status(429) == 503


def test_subtitles() -> None:
    segments = [{"start": 0, "end": 3725.25, "text": " a "}, "junk", {"text": "b"}]
    assert subtitles(segments, "srt") == (
        "1\n00:00:00,000 --> 01:02:05,250\na\n\n2\n00:00:00,000 --> 00:00:00,000\nb\n\n"
    )
    assert subtitles([], "vtt") == "WEBVTT\n\n"
