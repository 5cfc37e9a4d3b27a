"""Deterministic fake generation shared by every simulator personality.

Text
    Output is drawn from :data:`VOCAB`, a fixed list of 200 short English words. The word
    sequence is a pure function of the prompt text: ``blake2b(prompt)`` seeds a SHAKE-256
    stream, two bytes of which pick each word. One word, with its leading space
    (``" river"``), is one output token and one stream chunk, so a stream's deltas
    concatenate to exactly the non-stream text. Asking for fewer tokens gives a prefix of
    the longer answer; the same prompt gives the same text in every process and on every
    machine (no dependence on Python's ``hash`` or ``random``).

Token counts
    The simulators have no tokenizer. A text's token count is its number of
    whitespace-separated words (``len(text.split())``). A chat prompt counts the words of
    every message's content plus 4 per message (a stand-in for chat-template overhead:
    role markers and separators), see :func:`chat_prompt`. A prompt given as token ids
    counts one token per id.

Embeddings
    :func:`embedding` returns a unit-length float32 vector seeded by the hash of its input
    text (or token ids): the same input always gives the same vector.
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
from array import array
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

__all__ = [
    "VOCAB",
    "ChatPromptError",
    "chat_prompt",
    "count_tokens",
    "embedding",
    "float32_le_bytes",
    "generate_text",
    "generate_tokens",
    "prompt_seed",
    "token_ids_seed",
]

VOCAB: tuple[str, ...] = (
    "the", "a", "an", "and", "or", "but", "if", "then", "so", "yet",
    "of", "in", "on", "at", "by", "for", "with", "from", "to", "into",
    "over", "under", "near", "far", "up", "down", "out", "off", "about", "after",
    "i", "you", "we", "they", "it", "he", "she", "this", "that", "these",
    "is", "was", "are", "were", "be", "been", "has", "had", "do", "did",
    "can", "will", "may", "might", "must", "should", "would", "could", "shall", "not",
    "time", "day", "night", "year", "way", "word", "world", "life", "hand", "part",
    "place", "case", "week", "point", "home", "water", "room", "fact", "idea", "story",
    "river", "stone", "tree", "light", "road", "city", "house", "door", "field", "wind",
    "rain", "snow", "sun", "moon", "star", "sea", "hill", "bird", "fish", "horse",
    "book", "song", "game", "name", "line", "end", "side", "head", "face", "eye",
    "good", "new", "first", "last", "long", "great", "little", "own", "other", "old",
    "right", "big", "high", "small", "large", "next", "early", "young", "few", "bad",
    "same", "able", "warm", "cold", "quiet", "quick", "slow", "bright", "dark", "clear",
    "make", "go", "know", "take", "see", "come", "think", "look", "want", "give",
    "use", "find", "tell", "ask", "work", "seem", "feel", "try", "leave", "call",
    "keep", "let", "begin", "help", "show", "hear", "play", "run", "move", "live",
    "hold", "bring", "write", "sit", "stand", "lose", "pay", "meet", "learn", "grow",
    "very", "just", "well", "also", "still", "even", "only", "now", "here", "there",
    "again", "never", "always", "often", "soon", "today", "once", "more", "most", "less",
)  # fmt: skip

_TOKENS: tuple[str, ...] = tuple(" " + w for w in VOCAB)
_N = len(_TOKENS)
_PERSON = b"tollgate-sim"


def prompt_seed(text: str) -> bytes:
    """The 16-byte blake2b digest that seeds everything generated from ``text``."""
    data = text.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=16, person=_PERSON).digest()


def token_ids_seed(ids: Sequence[int]) -> bytes:
    """The seed for a prompt given as token ids."""
    return prompt_seed("\x00ids:" + ",".join(map(str, ids)))


@lru_cache(maxsize=8192)
def _tokens_for_seed(seed: bytes, n: int) -> tuple[str, ...]:
    if n <= 0:
        return ()
    stream = hashlib.shake_256(b"text:" + seed).digest(2 * n)
    return tuple(_TOKENS[v % _N] for v in struct.unpack(f"<{n}H", stream))


def generate_tokens(seed: bytes | str, n: int) -> tuple[str, ...]:
    """The first ``n`` output tokens (each ``" word"``) for a prompt text or seed."""
    if isinstance(seed, str):
        seed = prompt_seed(seed)
    return _tokens_for_seed(seed, n)


@lru_cache(maxsize=8192)
def _text_for_seed(seed: bytes, n: int) -> str:
    return "".join(_tokens_for_seed(seed, n))


def generate_text(seed: bytes | str, n: int) -> str:
    """``"".join(generate_tokens(seed, n))``, cached."""
    if isinstance(seed, str):
        seed = prompt_seed(seed)
    return _text_for_seed(seed, n)


def count_tokens(text: str) -> int:
    """Token estimate of a plain text: its number of whitespace-separated words."""
    return len(text.split())


class ChatPromptError(ValueError):
    """A chat message list that cannot be turned into a prompt.

    ``loc`` is the location of the problem inside ``messages`` (e.g. ``(2, "content")``),
    ``kind`` a pydantic-style error type such as ``"missing"``.
    """

    def __init__(self, msg: str, loc: tuple[Any, ...] = (), kind: str = "value_error") -> None:
        super().__init__(msg)
        self.msg = msg
        self.loc = loc
        self.kind = kind


PER_MESSAGE_TOKENS = 4


def _content_text(content: Any, index: int, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        if role in ("assistant", "tool", "function"):  # e.g. an assistant turn with tool_calls
            return ""
        raise ChatPromptError("Field required", (index, "content"), "missing")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise ChatPromptError(
                    "Input should be a valid dictionary", (index, "content", j), "dict_type"
                )
            kind = part.get("type")
            if not isinstance(kind, str):
                raise ChatPromptError("Field required", (index, "content", j, "type"), "missing")
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ChatPromptError(
                        "Input should be a valid string",
                        (index, "content", j, "text"),
                        "string_type",
                    )
                texts.append(text)
            # other part types (image_url, input_audio, ...) carry no countable text here
        return "\n".join(texts)
    raise ChatPromptError(
        "Input should be a valid string or a list of content parts",
        (index, "content"),
        "union_tag_invalid",
    )


def chat_prompt(messages: Any) -> tuple[str, int]:
    """Validate an OpenAI ``messages`` list; return ``(prompt_text, prompt_tokens)``.

    ``messages`` must be a non-empty list of objects, each with a string ``role`` and a
    ``content`` that is a string or a list of ``{"type": "text", "text": ...}`` parts
    (other part types are accepted and ignored; ``content`` may be null or missing for
    assistant/tool turns). ``prompt_text`` joins ``role: content`` lines and seeds the
    output; ``prompt_tokens`` = words in all contents + 4 per message.
    """
    if not isinstance(messages, list):
        raise ChatPromptError("Input should be a valid list", (), "list_type")
    if not messages:
        raise ChatPromptError(
            "List should have at least 1 item after validation, not 0", (), "too_short"
        )
    lines = []
    tokens = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatPromptError("Input should be a valid dictionary", (i,), "dict_type")
        role = message.get("role")
        if not isinstance(role, str):
            if role is None:
                raise ChatPromptError("Field required", (i, "role"), "missing")
            raise ChatPromptError("Input should be a valid string", (i, "role"), "string_type")
        text = _content_text(message.get("content"), i, role)
        lines.append(f"{role}: {text}")
        tokens += len(text.split()) + PER_MESSAGE_TOKENS
    return "\n".join(lines), tokens


_LITTLE = sys.byteorder == "little"


@lru_cache(maxsize=4096)
def _embedding_for_seed(seed: bytes, dim: int, keep: int) -> array[float]:
    raw = hashlib.shake_256(b"embed:" + seed).digest(4 * dim)
    values = [v / 2147483648.0 for v in struct.unpack(f"<{keep}i", raw[: 4 * keep])]
    norm = math.sqrt(math.fsum(v * v for v in values)) or 1.0
    return array("f", [v / norm for v in values])


def embedding(seed: bytes | str, dim: int, dimensions: int | None = None) -> array[float]:
    """A deterministic unit-length float32 vector of length ``dim``.

    With ``dimensions`` the vector is truncated to that length and renormalized (like a
    Matryoshka model): it equals the renormalized prefix of the full vector.
    The returned array is shared (cached): do not modify it.
    """
    if isinstance(seed, str):
        seed = prompt_seed(seed)
    keep = dim if dimensions is None else min(dimensions, dim)
    return _embedding_for_seed(seed, dim, keep)


def float32_le_bytes(vector: array[float]) -> bytes:
    """The little-endian float32 bytes of ``vector`` (what ``encoding_format=base64`` uses)."""
    if _LITTLE:
        return vector.tobytes()
    swapped = array("f", vector)
    swapped.byteswap()
    return swapped.tobytes()
