"""Chat templates: OpenAI ``messages`` -> one prompt string, for backends that take raw text.

TGI's native ``/generate`` takes ``inputs`` only, so the gateway applies the model's chat template
itself (``models[].chat_template`` in the config, the Jinja source of the model's
``tokenizer_config.json`` ``chat_template``). Rendering follows Hugging Face ``transformers``
(``apply_chat_template``) closely enough for the templates models ship:

* a :class:`jinja2.sandbox.ImmutableSandboxedEnvironment` (templates come from model repos: no
  attribute access to internals, no mutation of the messages) with ``trim_blocks``,
  ``lstrip_blocks`` and the ``loopcontrols`` extension;
* variables ``messages``, ``add_generation_prompt`` (always true: the model answers next),
  ``bos_token``, ``eos_token`` and ``tools`` (None); helpers ``raise_exception(msg)`` and
  ``strftime_now(fmt)``; a ``tojson`` filter that does not HTML-escape (like ``transformers``);
* each template string is compiled once and cached (:func:`compiled`).

``bos_token`` / ``eos_token`` default to ``""``: TGI's tokenizer adds the BOS token itself when it
tokenizes ``inputs``, so a template that starts with ``{{ bos_token }}`` must not add a second one.

Without a configured template the gateway uses :data:`DEFAULT_TEMPLATE`, ChatML::

    <|im_start|>system
    You are helpful.<|im_end|>
    <|im_start|>user
    Hi<|im_end|>
    <|im_start|>assistant

Message content given as an array of parts is joined into one string (text parts, separated by
``"\\n"``, as vLLM does for string-format templates); other part types (images, audio) cannot be
expressed in a text prompt and are rejected. Any template failure (syntax error,
``raise_exception``, undefined variable misuse, sandbox violation) is a 400
``invalid_request_error`` naming ``messages``.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

from jinja2 import TemplateError, Undefined
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import GatewayError, invalid

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class _TemplateRaised(Exception):
    pass


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    def default(obj: Any) -> Any:
        if isinstance(obj, Undefined):
            return None
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")

    return json.dumps(
        value,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
        default=default,
    )


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], autoescape=False
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


class ChatTemplate:
    """One compiled template; :meth:`render` is safe to call concurrently."""

    __slots__ = ("_template", "bos_token", "eos_token", "source")

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _ENV.from_string(source)
        except TemplateError as exc:
            raise _template_error(exc) from None

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for ``messages`` (OpenAI shape), ready for the model to answer."""
        try:
            return self._template.render(
                messages=[_flatten(i, m) for i, m in enumerate(messages)],
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
            )
        except GatewayError:
            raise
        except Exception as exc:  # TemplateError, raise_exception(), or the template's own bug
            raise _template_error(exc) from None


@lru_cache(maxsize=64)
def compiled(source: str | None) -> ChatTemplate:
    """The compiled template for ``source`` (None: :data:`DEFAULT_TEMPLATE`), cached."""
    return ChatTemplate(DEFAULT_TEMPLATE if source is None else source)


def render(source: str | None, messages: list[dict[str, Any]]) -> str:
    return compiled(source).render(messages)


def _template_error(exc: BaseException) -> GatewayError:
    return invalid(f"The model's chat template could not render these messages: {exc}", "messages")


def _flatten(index: int, message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts: list[str] = []
    for j, part in enumerate(content):
        where = f"messages[{index}].content[{j}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise invalid(f"'{where}' must be an object.", where)
        kind = part.get("type")
        if kind in ("text", "input_text", "refusal"):
            text = part.get("text", part.get("refusal"))
            if not isinstance(text, str):
                raise invalid(f"'{where}.text' must be a string.", f"{where}.text")
            texts.append(text)
        else:
            raise invalid(
                f"Content parts of type {kind!r} are not supported by this model's backend; "
                "only text parts are.",
                where,
            )
    flat = dict(message)
    flat["content"] = "\n".join(texts)
    return flat
