"""errors_map: the offending field of a backend's deserializer error becomes ``param``.

axum (TGI, TEI) rejects a body of the wrong shape with a plain-text 422 that names the field by
serde's path only ("...into the target type: temperature: invalid type: ..."); the gateway's
``param`` is that path in the client's terms (``messages[0].role``, as validation.py names it).
The messages are the simulators' own (backends/common.py mimics axum and serde_path_to_error).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from backends.http import ServerThread
from backends.tei import TeiConfig
from backends.tei import build_app as build_tei
from backends.tgi import TgiConfig
from backends.tgi import build_app as build_tgi
from extproc.translators.errors_map import normalize_error

_DESERIALIZE = "Failed to deserialize the JSON body into the target type: "


@pytest.mark.parametrize(
    ("detail", "input_param", "param"),
    [
        # TGI's Messages API (the OpenAI route through the TGI translator)
        ('temperature: invalid type: string "x", expected f32 at line 1 column 20', "messages",
         "temperature"),
        ("messages[0].content: input should be a valid string or a list of content parts at"
         " line 1 column 42", "messages", "messages[0].content"),
        ("messages[0].role: field required at line 1 column 31", "messages", "messages[0].role"),
        ("messages[0].content[0].type: field required at line 1 column 55", "messages",
         "messages[0].content[0].type"),
        ("messages: input should be a valid list at line 1 column 16", "messages", "messages"),
        ("tools: invalid type: expected a sequence of tools at line 1 column 74", "messages",
         "tools"),
        ("max_tokens: invalid value: integer `-1`, expected u32 at line 1 column 60", "messages",
         "max_tokens"),
        ("response_format: missing field `type` at line 1 column 74", "messages",
         "response_format.type"),
        ("response_format.type: unknown variant `nope`, expected one of `json`, `json_object`,"
         " `regex`, `json_schema` at line 1 column 77", "messages", "response_format.type"),
        ("missing field `messages` at line 1 column 17", "messages", "messages"),
        ("prompt: data did not match any variant of untagged enum Prompt at line 1 column 11",
         "prompt", "prompt"),
        # TGI native: the translator's `parameters` wrapper and TGI's names are not the client's
        ('parameters.stop: invalid type: string "x", expected a sequence at line 1 column 38',
         "messages", "stop"),
        ("parameters.max_new_tokens: invalid value: integer `-1`, expected u32 at line 1"
         " column 47", "prompt", "max_tokens"),
        ("parameters.grammar.type: unknown variant `bad`, expected one of `json`, `json_object`,"
         " `regex`, `json_schema` at line 1 column 51", "messages", "response_format.type"),
        ("inputs: invalid type: integer `5`, expected a string at line 1 column 11", "prompt",
         "prompt"),
        ("missing field `inputs` at line 1 column 17", "messages", "messages"),
        # no field named: none claimed
        ("invalid type: sequence, expected a map at line 1 column 3", "messages", None),
        ("parameters: invalid type: integer `5`, expected struct GenerateParameters at line 1"
         " column 28", "messages", None),
    ],
)  # fmt: skip
def test_deserializer_errors_name_the_field(
    detail: str, input_param: str, param: str | None
) -> None:
    err = normalize_error(422, (_DESERIALIZE + detail).encode(), input_param)
    assert (err.status, err.code, err.param) == (400, "invalid_request_error", param)
    assert err.message == _DESERIALIZE + detail  # the backend's words, unchanged


def test_backticked_validation_names_still_map() -> None:
    def validation(message: str) -> bytes:
        error = {"error": f"Input validation error: {message}", "error_type": "validation"}
        return orjson.dumps(error)

    assert normalize_error(422, validation("`top_n_tokens` must be <= 5")).param == "top_logprobs"
    assert normalize_error(422, validation("`inputs` cannot be empty"), "prompt").param == "prompt"


# --------------------------------------------------------------------- the simulators' own text

HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tgi() -> Iterator[httpx.Client]:
    app = build_tgi(TgiConfig(models=["m"], output_tokens=4, max_total_tokens=512))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def tei() -> Iterator[httpx.Client]:
    with ServerThread(build_tei(TeiConfig())) as srv, httpx.Client(base_url=srv.url) as client:
        yield client


@pytest.mark.parametrize(
    ("path", "body", "input_param", "param"),
    [
        ("/v1/chat/completions", {"messages": HELLO, "temperature": "x"}, "messages",
         "temperature"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages",
         "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages",
         "messages[0].role"),
        ("/v1/chat/completions", {"messages": HELLO, "tools": [{"type": "function"}]},
         "messages", "tools"),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": -1}}, "prompt",
         "max_tokens"),
        ("/generate", {"inputs": "x", "parameters": {"top_n_tokens": "a"}}, "prompt",
         "top_logprobs"),
    ],
)  # fmt: skip
def test_tgi_simulator_errors_name_the_field(
    tgi: httpx.Client, path: str, body: dict[str, Any], input_param: str, param: str
) -> None:
    r = tgi.post(path, json=body)
    assert r.status_code == 422 and r.text.startswith(_DESERIALIZE), r.text
    err = normalize_error(r.status_code, r.content, input_param)
    assert (err.status, err.param) == (400, param)


def test_tei_simulator_errors_name_the_field(tei: httpx.Client) -> None:
    r = tei.post("/rerank", json={"query": "q", "texts": [1]})
    assert r.status_code == 422 and r.text.startswith(_DESERIALIZE), r.text
    assert "texts[0]" in r.text  # TEI's name for the documents
    assert normalize_error(r.status_code, r.content, "documents").param == "documents[0]"
