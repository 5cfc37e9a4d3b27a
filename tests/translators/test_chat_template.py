"""Golden tests for chat-template rendering (TGI native backends)."""

from __future__ import annotations

import pytest

from extproc.errors import GatewayError
from extproc.translators.chat_template import DEFAULT_TEMPLATE, ChatTemplate, compiled, render

# Meta Llama 3 Instruct's template, as shipped in tokenizer_config.json
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Mistral-style: strict alternation enforced with raise_exception, eos_token after answers
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "Spain?"}],
    },
]


def test_default_chatml() -> None:
    assert render(None, MESSAGES) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd\nSpain?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert compiled(None).source == DEFAULT_TEMPLATE


def test_null_content_renders_empty() -> None:
    assert render(None, [{"role": "assistant", "content": None}]) == (
        "<|im_start|>assistant\n<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama3_template() -> None:
    assert render(LLAMA3, MESSAGES[:2]) == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_bos_and_eos_tokens() -> None:
    template = ChatTemplate(MISTRAL, bos_token="<s>", eos_token="</s>")
    assert template.render([*MESSAGES[1:3], {"role": "user", "content": "Spain?"}]) == (
        "<s>[INST] Capital of France? [/INST]Paris.</s>[INST] Spain? [/INST]"
    )
    # the gateway's default: TGI's tokenizer adds BOS itself
    assert render(MISTRAL, [{"role": "user", "content": "Hi"}]) == "[INST] Hi [/INST]"


def test_compiled_once_per_source() -> None:
    assert compiled(LLAMA3) is compiled(LLAMA3)
    assert compiled(LLAMA3) is not compiled(MISTRAL)


def test_tojson_does_not_html_escape() -> None:
    assert render("{{ messages[0] | tojson }}", [{"role": "user", "content": "<a & b>"}]) == (
        '{"role": "user", "content": "<a & b>"}'
    )


@pytest.mark.parametrize(
    ("source", "messages"),
    [
        (MISTRAL, [{"role": "assistant", "content": "x"}]),  # raise_exception
        ("{% for m in messages %}{{ m.content }", [{"role": "user", "content": "x"}]),  # syntax
        ("{{ messages.append(1) }}", [{"role": "user", "content": "x"}]),  # immutable sandbox
        ("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}]),  # sandbox
        ("{{ 1 / 0 }}", [{"role": "user", "content": "x"}]),  # the template's own bug
    ],
)
def test_template_errors_are_400_messages(source: str, messages: list[dict[str, str]]) -> None:
    with pytest.raises(GatewayError) as exc:
        render(source, messages)
    assert (exc.value.status, exc.value.code, exc.value.param) == (
        400,
        "invalid_request_error",
        "messages",
    )


def test_raise_exception_message_reaches_the_client() -> None:
    with pytest.raises(GatewayError) as exc:
        render(MISTRAL, [{"role": "assistant", "content": "x"}])
    assert "Conversation roles must alternate" in exc.value.message


def test_non_text_parts_rejected() -> None:
    with pytest.raises(GatewayError) as exc:
        render(
            None,
            [
                {"role": "user", "content": "a"},
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
            ],
        )
    assert exc.value.param == "messages[1].content[0]"
