"""Media without a gateway: the multipart head, media prices and units, the media endpoints'
validation, and the config rules for media models."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from extproc import validation
from extproc.config import ConfigError, Model, load_config, parse_config
from extproc.errors import GatewayError
from extproc.media import FormUpload, audio_seconds, metered_price, reserved_units
from extproc.money import Price

BOUNDARY = "xYz"
HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}", "content-length": "1"}


def form(fields: dict[str, str], file: bytes | None = b"RIFF....", after: bool = False) -> bytes:
    """A multipart body as the OpenAI SDK (httpx) writes it: fields first, then the file."""
    files = {"file": ("a.wav", file, "audio/wav")} if file is not None else {"x": ("x", b"")}
    req = httpx.Request("POST", "http://x", data=fields, files=files)
    body = req.read()
    boundary = req.headers["content-type"].split("boundary=")[1]
    body = body.replace(boundary.encode(), BOUNDARY.encode())
    if after:  # move the fields behind the file
        parts = body.split(b"--" + BOUNDARY.encode())
        body = (
            b"--"
            + BOUNDARY.encode()
            + (b"--" + BOUNDARY.encode()).join(
                [*parts[1 + len(fields) : -1], *parts[1 : 1 + len(fields)], parts[-1]]
            )
        )
    return body


def upload(**headers: str) -> FormUpload:
    return FormUpload.from_headers({**HEADERS, **headers}, max_bytes=1000)


def _param(exc: pytest.ExceptionInfo[GatewayError]) -> tuple[int, str | None]:
    return exc.value.status, exc.value.param


# ------------------------------------------------------------------ the form's head


def test_whole_form() -> None:
    body = form({"model": "whisper-1", "response_format": "srt", "language": "de"})
    u = upload()
    fields = u.parse_head(body, complete=True)
    assert fields == {"model": "whisper-1", "response_format": "srt", "language": "de"}
    assert u.files == {"file"}


def test_head_cut_inside_the_file() -> None:
    body = form({"model": "whisper-1"}, file=bytes(5000))
    u = upload()
    assert u.parse_head(body[:700], complete=False) == {"model": "whisper-1"}
    assert u.files == {"file"}


def test_head_cut_inside_a_field_or_a_part_header() -> None:
    body = form({"model": "whisper-1", "prompt": "p" * 200})
    model_end = body.index(b"whisper-1") + len(b"whisper-1")
    # a value ends where the next delimiter is seen: cut before it, the model is unknown
    next_part = model_end + len(b"\r\n--" + BOUNDARY.encode())
    for cut in (20, body.index(b"whisper-1"), model_end, next_part - 1):
        with pytest.raises(GatewayError) as exc:
            upload().parse_head(body[:cut], complete=False)
        assert _param(exc) == (400, "model")
    for cut in (next_part, next_part + 60, next_part + 150):  # the prompt is cut: unknown
        assert upload().parse_head(body[:cut], complete=False) == {"model": "whisper-1"}


def test_model_after_the_file_is_refused_only_when_the_head_is_partial() -> None:
    body = form({"model": "whisper-1"}, file=bytes(3000), after=True)
    with pytest.raises(GatewayError) as exc:
        upload().parse_head(body[:1000], complete=False)
    assert _param(exc) == (400, "model") and "before the file" in exc.value.message
    assert upload().parse_head(body, complete=True) == {"model": "whisper-1"}


def test_a_field_the_gateway_reads_may_be_given_once() -> None:
    """A form parser keeps a repeated field's last value (Starlette's, so vLLM's), the gateway
    its first: a cheap model's price for a dear one's work, and another model than the key's
    pool allows. Repeated, such a field is refused; other fields may repeat (the OpenAI SDK
    repeats ``timestamp_granularities[]``)."""
    httpx_form = httpx.Request(
        "POST",
        "http://x",
        data={
            "model": ["cheap-stt", "gpt-4o-mini"],
            "timestamp_granularities[]": ["word", "segment"],
        },
        files={"file": ("a.wav", b"RIFF....", "audio/wav")},
    )
    body, boundary = httpx_form.read(), httpx_form.headers["content-type"].split("boundary=")[1]
    body = body.replace(boundary.encode(), BOUNDARY.encode())
    with pytest.raises(GatewayError) as exc:
        upload().parse_head(body, complete=True)
    assert _param(exc) == (400, "model") and "more than once" in exc.value.message
    body = body.replace(b"gpt-4o-mini", b"x", 1).replace(
        b'name="model"\r\n\r\nx', b'name="m"\r\n\r\nx'
    )
    fields = upload().parse_head(body, complete=True)
    assert fields["model"] == "cheap-stt" and fields["timestamp_granularities[]"] == "word"
    twice = form({"model": "whisper-1", "response_format": "json"}).replace(
        b'name="model"', b'name="response_format"'
    )
    with pytest.raises(GatewayError) as exc:
        upload().parse_head(twice, complete=True)
    assert _param(exc) == (400, "response_format")


def test_missing_file_or_malformed() -> None:
    with pytest.raises(GatewayError) as exc:
        upload().parse_head(form({"model": "m"}, file=None), complete=True)
    assert _param(exc) == (400, "file")
    with pytest.raises(GatewayError) as exc:
        body = form({"model": "m"}).replace(b'name="file"', b'name="audio"')
        upload().parse_head(body, complete=True)
    assert _param(exc) == (400, "file")
    for junk in (b"no boundary at all", b"--xYzGARBAGE"):
        with pytest.raises(GatewayError) as exc:
            upload().parse_head(junk, complete=True)
        assert _param(exc) == (400, "file")


def test_headers_are_checked_first() -> None:
    for headers in ({"content-type": "application/json"}, {"content-type": "multipart/form-data"}):
        with pytest.raises(GatewayError) as exc:
            upload(**headers)
        assert _param(exc) == (400, "file")
    with pytest.raises(GatewayError) as exc:
        FormUpload.from_headers({"content-type": HEADERS["content-type"]}, 1000)
    assert exc.value.status == 400  # no Content-Length
    with pytest.raises(GatewayError) as exc:
        upload(**{"content-length": "1001"})
    assert exc.value.code == "request_too_large" and exc.value.status == 413
    quoted = {"content-type": 'multipart/form-data; boundary="a b"', "content-length": "9"}
    assert FormUpload.from_headers(quoted, 10).content_length == 9


def test_encode_replaces_and_adds_fields_and_keeps_the_rest() -> None:
    body = form({"model": "public", "language": "en"}, file=b"\x00\x01audio")
    u = upload()
    fields = u.parse_head(body, complete=True)
    fields["model"] = "backend-model"
    fields["response_format"] = "verbose_json"
    new = u.encode(fields)
    again = upload()
    assert again.parse_head(new, complete=True) == {
        "response_format": "verbose_json",
        "model": "backend-model",
        "language": "en",
    }
    assert new.endswith(body[body.index(b"\x00\x01audio") - 40 :])  # the file bytes untouched
    assert u.encode(u.parse_head(body, complete=True)) == body  # nothing changed: same bytes


# ------------------------------------------------------------------ prices and units

WHISPER = Model(
    "w", "b", "w", kind="transcription", max_audio_seconds=600, pricing=Price(per_audio_second=7)
)


def test_metered_prices_and_units() -> None:
    assert metered_price(WHISPER) == Price(input_per_1m=7_000_000)
    tts = Model("t", "b", "t", kind="speech", pricing=Price(per_1m_characters=15, per_request=3))
    assert metered_price(tts) == Price(input_per_1m=15, per_request=3)
    img = Model("i", "b", "i", kind="image", pricing=Price(per_image=20_000))
    assert metered_price(img) == Price(input_per_1m=20_000_000_000)
    chat = Model("c", "b", "c", pricing=Price(input_per_1m=5))
    assert metered_price(chat) == chat.price
    assert reserved_units("transcription", WHISPER, {}) == 600
    flat = Model("f", "b", "f", kind="transcription", pricing=Price(per_request=1))
    assert reserved_units("transcription", flat, {}) == 0
    assert reserved_units("speech", tts, {"input": "hé!"}) == 3
    assert reserved_units("images", img, {"n": 4}) == 4
    assert reserved_units("images", img, {}) == 1
    assert [audio_seconds(WHISPER, d) for d in (0, 0.01, 3.0, 3.2, 9999)] == [0, 1, 3, 4, 600]


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("check", "body", "param"),
    [
        (validation.transcription, {"response_format": "mp3"}, "response_format"),
        (validation.transcription, {"temperature": "hot"}, "temperature"),
        (validation.transcription, {"temperature": "2"}, "temperature"),
        (validation.transcription, {"stream": "true"}, "stream"),
        (validation.speech, {"voice": "a"}, "input"),
        (validation.speech, {"voice": "a", "input": 3}, "input"),
        (validation.speech, {"input": "hi"}, "voice"),
        (validation.speech, {"input": "hi", "voice": ""}, "voice"),
        (validation.speech, {"input": "hi", "voice": "a", "speed": 0.1}, "speed"),
        (validation.speech, {"input": "hi", "voice": "a", "speed": True}, "speed"),
        (validation.speech, {"input": "hi", "voice": "a", "stream_format": "sse"}, "stream_format"),
        (validation.images, {}, "prompt"),
        (validation.images, {"prompt": ""}, "prompt"),
        (validation.images, {"prompt": "x", "n": True}, "n"),
        (validation.images, {"prompt": "x", "size": "0x5"}, "size"),
        (validation.images, {"prompt": "x", "size": "1024X1024"}, "size"),
        (validation.images, {"prompt": "x", "stream": True}, "stream"),
    ],
)
def test_media_validation(check: Any, body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as exc:
        check(body)
    assert _param(exc) == (400, param)


def test_media_validation_accepts() -> None:
    assert validation.transcription({"response_format": "vtt", "temperature": "0.2"}) is False
    assert validation.speech({"input": "hi", "voice": {"id": "v1"}, "speed": 4}) is False
    assert validation.images({"prompt": "x", "n": 10, "size": "auto", "quality": "hd"}) is False
    assert validation.images({"prompt": "x", "size": "1792x1024"}) is False


# ------------------------------------------------------------------ config

BASE: dict[str, Any] = {
    "backends": [
        {"name": "media", "kind": "openai", "endpoints": ["127.0.0.1:9000"]},
        {"name": "vllm", "kind": "vllm", "endpoints": ["127.0.0.1:9001"]},
        {"name": "tei", "kind": "tei", "endpoints": ["127.0.0.1:9002"]},
    ],
    "models": [
        {
            "id": "whisper-1",
            "backend": "media",
            "kind": "transcription",
            "pricing": {"per_audio_second": "0.0001", "per_request": "0.001"},
        },
        {"id": "tts-1", "backend": "media", "kind": "speech", "pricing": {"per_1m_characters": 15}},
        {"id": "dall-e-3", "backend": "media", "kind": "image", "pricing": {"per_image": "0.04"}},
    ],
}


def test_media_models_load() -> None:
    cfg = parse_config(copy.deepcopy(BASE))
    w = cfg.models_by_id["whisper-1"]
    assert w.kind == "transcription" and w.max_audio_seconds == 3600
    assert w.price == Price(per_audio_second=100, per_request=1000)
    assert cfg.models_by_id["tts-1"].price.per_1m_characters == 15_000_000
    assert cfg.listener.max_upload_bytes == 25 * 1024 * 1024
    vllm_asr = copy.deepcopy(BASE)
    vllm_asr["models"][0]["backend"] = "vllm"  # vLLM serves transcriptions too
    parse_config(vllm_asr)


@pytest.mark.parametrize(
    ("model", "field", "problem"),
    [
        (0, {"backend": "tei"}, "needs a backend of kind openai or vllm"),
        (1, {"backend": "vllm"}, "needs a backend of kind openai"),
        (2, {"pricing": {"per_image": 1, "input_per_1m": 1}}, "does not apply to a image"),
        (0, {"pricing": {"per_image": 1}}, "does not apply to a transcription"),
        (1, {"pricing": {"per_audio_second": 1}}, "does not apply to a speech"),
        (0, {"max_audio_seconds": 0}, "must be between"),
        (0, {"max_audio_seconds": 100_000, "pricing": {"per_audio_second": 1000}}, "exact"),
        (2, {"pricing": {"per_image": 10_000}}, "exact"),
        (0, {"kind": "video"}, "must be one of"),
    ],
)
def test_media_config_errors(model: int, field: dict[str, Any], problem: str) -> None:
    data = copy.deepcopy(BASE)
    data["models"][model].update(field)
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert exc.value.path.startswith(f"models[{model}]") and problem in str(exc.value)


def test_the_samples_commented_media_example_is_valid(tmp_path: Path) -> None:
    sample = (Path(__file__).resolve().parent.parent / "tollgate.yaml").read_text()
    # only the media examples: the lines after the "Audio and images" and "Media models" notes
    live = re.sub(
        r"(?m)^(  # (?:Audio and images|Media models).*\n)((?:  # (?:- |  ).*\n)+)",
        lambda m: m.group(1) + re.sub(r"(?m)^  # ", "  ", m.group(2)),
        sample,
    )
    assert live != sample
    (tmp_path / "tollgate.yaml").write_text(live)
    cfg = load_config(tmp_path / "tollgate.yaml")
    kinds = {m.kind for m in cfg.models if m.backend == "openai-media"}
    assert kinds == {"transcription", "speech", "image"}
