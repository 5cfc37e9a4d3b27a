"""Server-sent events cut into body chunks at arbitrary places.

A backend chunk may end in the middle of an event (or of a UTF-8 character); translators must
only ever see whole events. :class:`EventSplitter` keeps the unfinished tail and hands back the
complete events, never buffering more than one partial event.
"""

from __future__ import annotations

_SEP = b"\n\n"


class EventSplitter:
    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        """Whole events completed by ``chunk`` (possibly b""), each ending in a blank line."""
        data = self._tail + chunk if self._tail else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        cut = data.rfind(_SEP)
        if cut < 0:
            self._tail = data
            return b""
        cut += len(_SEP)
        self._tail = data[cut:]
        return data[:cut]

    def events(self, chunk: bytes, end_of_stream: bool) -> list[bytes]:
        """The whole events ``chunk`` completes, each without its blank line; at end of stream
        also an unterminated last event."""
        events = [e for e in self.feed(chunk).split(_SEP) if e]
        if end_of_stream:
            tail = self.flush().strip(b"\n")
            if tail:
                events.append(tail)
        return events

    def flush(self) -> bytes:
        """What is left at end of stream (an unterminated last event), emptied."""
        tail, self._tail = self._tail, b""
        return tail
