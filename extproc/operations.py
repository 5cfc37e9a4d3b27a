"""The client-facing operations (OpenAI dialect), keyed by path, and the answers that need no
backend (``GET /v1/models``, ``GET /v1/models/{id}``), serialized once from the config."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

from . import validation
from .config import MEDIA_BACKENDS, GatewayConfig, Model


@dataclass(frozen=True, slots=True)
class Operation:
    name: str
    model_kind: str
    validate: Callable[[dict[str, Any]], bool]  # raises GatewayError; returns the stream flag
    upload: bool = False  # multipart/form-data: the processor sees only the head (media.py)


CHAT = Operation("chat", "chat", validation.chat)
COMPLETIONS = Operation("completions", "chat", validation.completions)
EMBEDDINGS = Operation("embeddings", "embedding", validation.embeddings)
RERANK = Operation("rerank", "rerank", validation.rerank)
CLASSIFY = Operation("classify", "classify", validation.classify)
TRANSCRIPTION = Operation("transcription", "transcription", validation.transcription, upload=True)
TRANSLATION = Operation("translation", "transcription", validation.transcription, upload=True)
SPEECH = Operation("speech", "speech", validation.speech)
IMAGES = Operation("images", "image", validation.images)

POST_OPERATIONS: dict[str, Operation] = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/embeddings": EMBEDDINGS,
    "/v1/rerank": RERANK,
    "/v1/classify": CLASSIFY,
    "/v1/audio/transcriptions": TRANSCRIPTION,
    "/v1/audio/translations": TRANSLATION,
    "/v1/audio/speech": SPEECH,
    "/v1/images/generations": IMAGES,
}
MEDIA_PATHS = tuple(p for p, op in POST_OPERATIONS.items() if op.model_kind in MEDIA_BACKENDS)
UPLOAD_PATHS = tuple(path for path, op in POST_OPERATIONS.items() if op.upload)
MODELS_PATH = "/v1/models"


def _card(model: Model, created: int) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": created,
        "owned_by": model.owned_by,
        "kind": model.kind,
        "context_length": model.context_length,
        "max_tokens": model.max_tokens,
    }


class ModelCatalog:
    """Pre-serialized model list and cards."""

    def __init__(self, cfg: GatewayConfig) -> None:
        created = int(time.time())
        cards = [_card(m, created) for m in cfg.models]
        self.cards = cards
        self.list_body = orjson.dumps({"object": "list", "data": cards})
        self.card_bodies = {c["id"]: orjson.dumps(c) for c in cards}
        self._pools: dict[frozenset[str], bytes] = {}

    def list_for(self, pool: frozenset[str] | None) -> bytes:
        """The model list a credential with this model pool sees (None: every model)."""
        if pool is None:
            return self.list_body
        body = self._pools.get(pool)
        if body is None:
            if len(self._pools) > 1000:
                self._pools.clear()
            cards = [c for c in self.cards if c["id"] in pool]
            body = self._pools[pool] = orjson.dumps({"object": "list", "data": cards})
        return body

    def card(self, path: str) -> tuple[str, bytes | None]:
        """(model id, its card or None) for a ``/v1/models/{id}`` path."""
        model_id = unquote(path[len(MODELS_PATH) + 1 :])
        return model_id, self.card_bodies.get(model_id)
