"""A minimal HTTP/2 (h2c, prior knowledge) client that keeps what httpx drops: trailers."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events


@dataclass
class H2Response:
    status: int
    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [line for line in self.body.decode().split("\n") if line]


def post(
    url: str,
    payload: object,
    headers: dict[str, str],
    timeout: float = 20,
    cut_after: int | None = None,
) -> H2Response:
    """POST ``payload`` as JSON; ``cut_after``: reset the stream (RST_STREAM, as a client that
    gives up) once that many DATA frames have come, and return what came."""
    parts = urlsplit(url)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        body = json.dumps(payload).encode()
        request = [
            (":method", "POST"),
            (":path", parts.path),
            (":scheme", "http"),
            (":authority", parts.netloc),
            ("content-type", "application/json"),
            *((k.lower(), v) for k, v in headers.items()),
        ]
        conn.send_headers(stream_id, request)
        conn.send_data(stream_id, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        status, got, data, trailers, frames = 0, {}, bytearray(), {}, 0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before the stream ended")
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    got = dict(event.headers)
                    status = int(got.pop(":status"))
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                    frames += 1
                    if cut_after is not None and frames >= cut_after:
                        conn.reset_stream(stream_id, error_code=8)  # CANCEL
                        sock.sendall(conn.data_to_send())
                        return H2Response(status, got, bytes(data), trailers)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = dict(event.headers)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return H2Response(status, got, bytes(data), trailers)
            sock.sendall(conn.data_to_send())
