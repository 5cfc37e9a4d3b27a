"""Server-sent events cut into body chunks at arbitrary places.

A backend chunk may end in the middle of an event (or of a UTF-8 character); translators must
only ever see whole events. :class:`EventSplitter` keeps the unfinished tail and hands back the
complete events, never buffering more than one partial event. :func:`event_data` reads one
event's data.
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

    @property
    def pending(self) -> bool:
        """Whether part of an event is held for the next chunk."""
        return bool(self._tail)

    def flush(self) -> bytes:
        """What is left at end of stream (an unterminated last event), emptied."""
        tail, self._tail = self._tail, b""
        return tail


def event_data(event: bytes) -> bytes | None:
    """The data of one SSE event (``data:`` with or without the space, lines joined; comments
    and other fields skipped), or None if it has no data line."""
    lines = [
        line[6:] if line[5:6] == b" " else line[5:]
        for line in event.split(b"\n")
        if line[:5] == b"data:"
    ]
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else b"\n".join(lines)
