"""The OpenAI media simulator (backends/openai_media.py), over HTTP and the openai SDK."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import wave
import zlib
from collections.abc import Iterator

import httpx
import openai
import pytest

from backends.__main__ import build_parser
from backends.http import ServerThread
from backends.openai_media import MultipartSink, OpenAIConfig, build_app, config_from_args
from backends.process import SimulatorProcess

MODELS = ["whisper-1", "tts-1", "dall-e-2", "dall-e-3", "gpt-image-1", "chat-model"]


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerThread]:
    config = OpenAIConfig(models=list(MODELS), max_upload_bytes=12 * 1024 * 1024)
    with ServerThread(build_app(config)) as server:
        yield server


@pytest.fixture(scope="module")
def http(srv: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def oai(srv: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)


def wav_upload(seconds: float) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(int(seconds * 16000) * 2))
    return buf.getvalue()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    crc = struct.unpack(">I", data[29:33])[0]
    assert crc == zlib.crc32(data[12:29]) & 0xFFFFFFFF
    return width, height


# --- transcriptions ---------------------------------------------------------------------


def test_ten_megabyte_upload_is_streamed(http: httpx.Client) -> None:
    audio = bytes(10 * 1024 * 1024)
    r = http.post(
        "/v1/audio/transcriptions",
        files={"file": ("speech.wav", audio, "audio/wav")},
        data={"model": "whisper-1", "response_format": "verbose_json"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "transcribe" and body["duration"] == len(audio) / 32000
    assert body["text"] and body["segments"][-1]["end"] == pytest.approx(body["duration"])
    assert body["usage"] == {"type": "duration", "seconds": 328}
    assert r.headers["x-request-id"].startswith("req_")
    assert r.headers["openai-version"] == "2020-10-01"
    rec = http.get("/sim/requests").json()[-1]
    assert rec["path"] == "/v1/audio/transcriptions"
    upload = rec["body"]["files"]["file"]
    assert upload["size"] == len(audio) and upload["filename"] == "speech.wav"
    assert upload["sha256"] == hashlib.sha256(audio).hexdigest()
    assert rec["body"]["fields"]["model"] == "whisper-1"


def test_transcription_formats_and_determinism(http: httpx.Client, oai: openai.OpenAI) -> None:
    audio = wav_upload(4.0)
    result = oai.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio))
    again = oai.audio.transcriptions.create(model="whisper-1", file=("b.wav", audio))
    assert result.text and result.text == again.text  # a function of the file's bytes
    assert len(result.text.split()) == round(len(audio) / 32000 * 2.5)
    text = oai.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", audio), response_format="text"
    )
    assert text == result.text
    r = http.post(
        "/v1/audio/transcriptions",
        files={"file": ("a.wav", audio)},
        data={"model": "whisper-1", "response_format": "srt"},
    )
    assert r.text.startswith("1\n00:00:00,000 --> ")
    r = http.post(
        "/v1/audio/translations", files={"file": ("a.wav", audio)}, data={"model": "whisper-1"}
    )
    assert r.status_code == 200 and r.json()["text"]


def test_chunked_upload_split_everywhere() -> None:
    """The multipart parser must not care where the network splits the body."""
    boundary = "----sim-boundary"
    file_bytes = b"\r\n--" + bytes(range(256)) * 40 + b"\r\n-"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + file_bytes
        + f"\r\n--{boundary}--\r\n".encode()
    )
    for step in (1, 7, 64, len(body)):
        sink = MultipartSink({"content-type": f"multipart/form-data; boundary={boundary}"}, 1 << 20)
        for i in range(0, len(body), step):
            sink.feed(body[i : i + step])
        sink.finish()
        assert sink.error is None, step
        assert sink.fields == {"model": "whisper-1"}
        upload = sink.files["file"]
        assert upload.size == len(file_bytes) and upload.content_type == "audio/wav"
        assert upload.hash.hexdigest() == hashlib.sha256(file_bytes).hexdigest()
    truncated = MultipartSink({"content-type": f"multipart/form-data; boundary={boundary}"}, 100)
    truncated.feed(body)
    truncated.finish()
    assert truncated.error == "too_large"


def test_transcription_errors(http: httpx.Client) -> None:
    audio = wav_upload(0.5)
    r = http.post(
        "/v1/audio/transcriptions", data={"model": "whisper-1"}, files={"other": ("x.txt", b"hi")}
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and "file" in err["message"]
    r = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", audio)})
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]
    r = http.post("/v1/audio/transcriptions", json={"model": "whisper-1"})
    assert r.status_code == 400
    r = http.post(
        "/v1/audio/transcriptions", files={"file": ("a.wav", audio)}, data={"model": "nope"}
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = http.post(
        "/v1/audio/transcriptions", files={"file": ("a.txt", audio)}, data={"model": "whisper-1"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = http.post(
        "/v1/audio/transcriptions",
        files={"file": ("a.wav", bytes(13 * 1024 * 1024))},
        data={"model": "whisper-1"},
    )
    assert r.status_code == 413 and "Maximum content size limit" in r.json()["error"]["message"]


# --- speech -----------------------------------------------------------------------------


def test_speech_wav_is_valid_audio(http: httpx.Client, oai: openai.OpenAI) -> None:
    r = http.post(
        "/v1/audio/speech",
        json={
            "model": "tts-1",
            "input": "one two three four",
            "voice": "alloy",
            "response_format": "wav",
        },
    )
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    assert r.headers["transfer-encoding"] == "chunked"
    with wave.open(io.BytesIO(r.content)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        assert w.getnframes() == int(1.6 * 24000)
    speech = oai.audio.speech.create(model="tts-1", input="hello", voice="alloy")
    assert speech.response.headers["content-type"] == "audio/mpeg"
    assert speech.content[:2] == b"\xff\xf3"  # MPEG frame sync


@pytest.mark.parametrize(
    ("fmt", "content_type", "magic"),
    [
        ("mp3", "audio/mpeg", b"\xff\xf3"),
        ("opus", "audio/opus", b"OggS"),
        ("aac", "audio/aac", b"\xff\xf1"),
        ("flac", "audio/flac", b"fLaC"),
        ("pcm", "audio/pcm", b"\x00\x00"),
    ],
)
def test_speech_formats(http: httpx.Client, fmt: str, content_type: str, magic: bytes) -> None:
    r = http.post(
        "/v1/audio/speech",
        json={"model": "tts-1", "input": "hi", "voice": "nova", "response_format": fmt},
    )
    assert r.status_code == 200 and r.headers["content-type"] == content_type
    assert r.content.startswith(magic)


def test_speech_errors_and_truncation(http: httpx.Client) -> None:
    r = http.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alloy"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = http.post(
        "/v1/audio/speech",
        json={"model": "tts-1", "input": "x", "voice": "alloy", "response_format": "ogg"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    r = http.post("/v1/audio/speech", json={"input": "x", "voice": "alloy"})
    assert r.status_code == 400
    long_text = " ".join(["word"] * 200)  # ~80 s of audio: several chunks
    with pytest.raises(httpx.RemoteProtocolError):
        http.post(
            "/v1/audio/speech",
            json={"model": "tts-1", "input": long_text, "voice": "alloy", "response_format": "wav"},
            headers={"x-sim-error-after": "1"},
        )


# --- images -----------------------------------------------------------------------------


def test_images_b64_and_url(http: httpx.Client, oai: openai.OpenAI) -> None:
    result = oai.images.generate(
        model="dall-e-2", prompt="a red fox", n=2, size="256x256", response_format="b64_json"
    )
    assert len(result.data) == 2
    for item in result.data:
        assert item.b64_json is not None
        assert png_size(base64.b64decode(item.b64_json)) == (256, 256)
    result = oai.images.generate(model="dall-e-3", prompt="a red fox")
    item = result.data[0]
    assert item.url and item.revised_prompt == "a red fox"
    png = http.get(item.url)
    assert png.headers["content-type"] == "image/png" and png_size(png.content) == (1024, 1024)
    r = http.post("/v1/images/generations", json={"model": "gpt-image-1", "prompt": "x"})
    body = r.json()
    assert "b64_json" in body["data"][0] and body["usage"]["output_tokens"] > 0


def test_noisy_images_are_photo_sized_and_urls_point_at_the_server(
    oai: openai.OpenAI,
) -> None:
    result = oai.images.generate(
        model="dall-e-2",
        prompt="grain",
        size="256x256",
        response_format="b64_json",
        extra_headers={"x-sim-image-noise": "1"},
    )
    png = base64.b64decode(result.data[0].b64_json or "")
    assert png_size(png) == (256, 256) and len(png) > 256 * 256 * 3  # random pixels: no gain
    args = build_parser("openai").parse_args(["--kind", "openai", "--port", "8123"])
    assert config_from_args(args).image_base_url == "http://127.0.0.1:8123"
    args = build_parser("openai").parse_args(["--kind", "openai", "--port", "0"])
    assert config_from_args(args).image_base_url is None  # the Host header then


def test_image_errors(http: httpx.Client) -> None:
    r = http.post("/v1/images/generations", json={"model": "dall-e-3"})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "'prompt' is a required property",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": None,
    }
    r = http.post("/v1/images/generations", json={"model": "dall-e-3", "prompt": "x", "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = http.post(
        "/v1/images/generations", json={"model": "dall-e-2", "prompt": "x", "size": "1792x1024"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"


# --- chat, models, auth, knobs ----------------------------------------------------------


def test_chat_and_models(oai: openai.OpenAI, http: httpx.Client) -> None:
    resp = oai.chat.completions.create(
        model="chat-model", messages=[{"role": "user", "content": "hi"}]
    )
    assert resp.model == "chat-model" and resp.choices[0].message.content
    assert [m.id for m in oai.models.list()] == MODELS
    assert oai.models.retrieve("tts-1").owned_by == "system"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError) as err:
        oai.chat.completions.create(
            model="chat-model",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-sim-error": "429"},
        )
    assert err.value.code == "rate_limit_exceeded"
    r = http.post(
        "/v1/images/generations",
        json={"prompt": "x", "model": "dall-e-2"},
        headers={"x-sim-error": "503"},
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_is_overloaded"


def test_cli_and_api_key() -> None:
    args = ["--model", "whisper-1", "--model", "m", "--ttft-ms", "0", "--itl-ms", "0"]
    args += ["--output-tokens", "2", "--max-running", "2", "--max-queue", "2"]
    args += ["--api-key", "sk-right"]
    with SimulatorProcess(args, kind="openai") as sim:
        bad = openai.OpenAI(base_url=sim.base_url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav_upload(0.2)))
        assert err.value.code == "invalid_api_key"
        good = openai.OpenAI(base_url=sim.base_url, api_key="sk-right", max_retries=0)
        text = good.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"x" * 64000))
        assert len(text.text.split()) == 5
        chat = good.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert chat.usage is not None and chat.usage.completion_tokens == 2
