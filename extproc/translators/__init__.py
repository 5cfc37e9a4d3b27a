"""Schema translators: one module per (client schema, backend schema) pair.

Each translator is created per request and implements :class:`Translator`: request body in ->
backend path and body out; response headers in -> whether the body must be seen; response body
chunk in -> body out; backend error in -> :class:`~extproc.errors.GatewayError`. The processor
(``extproc/processor.py``) knows phases and Envoy messages; translators know schemas.
"""

from __future__ import annotations

from .base import Translator, for_backend

__all__ = ["Translator", "for_backend"]
