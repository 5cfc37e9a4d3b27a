"""Schema translators: one module per (client schema, backend schema) pair.

Each translator is created per request and implements :class:`Translator`: request body in ->
backend path and body out; response headers in -> whether the body must be seen; response body
chunk in -> body out; backend error in -> :class:`~extproc.errors.GatewayError`. The processor
(``extproc/processor.py``) knows phases and Envoy messages; translators know schemas.

* :mod:`.openai_vllm` -- vLLM and any OpenAI-compatible backend (pass-through fast path);
* :mod:`.tgi_native` -- TGI ``/generate`` / ``/generate_stream`` (chat templates from
  :mod:`.chat_template`);
* :mod:`.tgi_messages` -- TGI's ``/v1/chat/completions`` with its quirks fixed;
* :mod:`.tei` -- TEI ``/embed``, ``/rerank``, ``/predict``;
* :mod:`.openai_media` -- OpenAI's audio and image endpoints (pass-through, metered);
* :mod:`.errors_map` -- every backend error shape -> :class:`~extproc.errors.GatewayError`.
"""

from __future__ import annotations

from .base import Translator, for_backend

__all__ = ["Translator", "for_backend"]
