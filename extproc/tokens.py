"""A cheap, deterministic estimate of a request's prompt tokens, used only to reserve credits
and tokens-per-minute before the request runs; settlement uses the backend's real counts.

Method: UTF-8 bytes of every text the model reads, divided by 3 and rounded up, but at least one
token per space-separated word; plus 4 tokens per chat message and 3 for the reply's priming.
BPE tokenizers average about 4 bytes per token on English text, so this over-estimates (the
reservation is a ceiling, released at settlement); non-Latin scripts run closer to 2-3 bytes per
token, and text of one- and two-letter words ("a a a", "1 2 3") to 2, which the word count
covers. It is not a strict bound: a prompt that costs more than its estimate is charged in full
while the balance can pay. Token-id inputs count one per id. Image parts count a flat 85 tokens
(OpenAI's low-detail figure). Cost: two passes over the strings (the length, the spaces).

A generative request may make the backend generate several sequences, each up to ``max_tokens``
(``sequences``): ``n`` choices, for every prompt of a completions batch, and ``best_of`` when it
asks for more than ``n`` (the backend generates them all). The worst case reserved is that many
times ``max_tokens``; the settlement is the backend's usage. The context check reads the
longest prompt of a batch (``longest_prompt_tokens``), since each runs on its own.
"""

from __future__ import annotations

from typing import Any

import orjson

BYTES_PER_TOKEN = 3
PER_MESSAGE = 4
PRIMING = 3
IMAGE_PART = 85


def _text_tokens(text: str) -> int:
    n = len(text)
    if not text.isascii():
        n = len(text.encode("utf-8"))
    # and at least a token a word: text of one- and two-letter words ("a a a", "1 2 3") runs
    # at 2 bytes a token, which bytes / 3 under-counts
    return max(-(-n // BYTES_PER_TOKEN), text.count(" ") + 1 if n else 0)


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return _text_tokens(content)
    total = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    total += _text_tokens(part["text"])
                elif part.get("type") in ("image_url", "input_image", "image"):
                    total += IMAGE_PART
    return total


def _input_tokens(value: Any) -> int:
    """A prompt or embeddings input: a string, a list of strings, token ids, or lists of ids."""
    if isinstance(value, str):
        return _text_tokens(value)
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, str):
                total += _text_tokens(item)
            elif isinstance(item, int):
                total += 1
            elif isinstance(item, list):
                total += len(item)
        return total
    return 0


def _batch(prompt: Any) -> list[Any] | None:
    """A completions batch's prompts (a list of strings, or of token-id lists), else None: one
    prompt (a string, or one list of token ids)."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return prompt
    return None


def sequences(op: str, body: dict[str, Any]) -> int:
    """How many sequences a chat or completions request generates, each up to ``max_tokens``
    (validation has checked ``n`` and ``best_of``: positive integers or absent)."""
    if op not in ("chat", "completions"):
        return 1
    n = body.get("n") or 1
    if op == "chat":
        return n
    best_of = body.get("best_of") or 1
    prompts = _batch(body.get("prompt"))
    return max(n, best_of) * (len(prompts) if prompts is not None else 1)


def longest_prompt_tokens(op: str, body: dict[str, Any], total: int) -> int:
    """The estimate of the longest single prompt (``total``: the whole request's estimate):
    what has to fit a model's context."""
    prompts = _batch(body.get("prompt")) if op == "completions" else None
    if prompts is None or len(prompts) == 1:
        return total
    return max(_input_tokens([p]) for p in prompts)


def estimate_prompt_tokens(op: str, body: dict[str, Any]) -> int:
    if op == "chat":
        total = PRIMING
        for message in body.get("messages") or ():
            if isinstance(message, dict):
                total += PER_MESSAGE + _content_tokens(message.get("content"))
                if message.get("tool_calls"):
                    total += _text_tokens(orjson.dumps(message["tool_calls"]).decode())
        if body.get("tools"):
            total += _text_tokens(orjson.dumps(body["tools"]).decode())
        return total
    if op == "completions":
        return _input_tokens(body.get("prompt"))
    if op in ("embeddings", "classify"):
        return _input_tokens(body.get("input"))
    if op == "rerank":  # a cross-encoder reads the query once per document
        docs = [d.get("text") if isinstance(d, dict) else d for d in body.get("documents") or ()]
        query = _input_tokens(body.get("query"))
        return sum(query + _input_tokens(d) for d in docs)
    return 0
