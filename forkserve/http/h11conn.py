"""The reference HTTP/1.1 connection: h11 reads each request head, with its grammar and rules;
`ResponseWriter` writes the responses with h11's rules and bytes (tests/h11_reference.py, on
h11 alone, is the judge of that); the rest (the inbox, heads, body framing, the cycle) is
`BaseConnection`'s."""

from __future__ import annotations

import h11
from h11._readers import maybe_read_from_IDLE_client
from h11._receivebuffer import ReceiveBuffer

from forkserve.http.base import ProtocolError, Request
from forkserve.http.connection import BaseConnection
from forkserve.http.writer import ResponseWriter


class H11Connection(ResponseWriter, BaseConnection):
    """An `HTTPConnection` on h11 (see forkserve.http.base for the contract).

    Each complete request head goes to h11's reader for an idle client, what
    `h11.Connection.next_event` runs on a fresh connection; the rest of that call, the state
    machine, refuses nothing in a first request and costs more than the parse. h11 never sees
    a body, an empty line before a request line or what follows a request. As h11, it keeps
    no HTTP/1.0 connection, even when the client asks for keep-alive."""

    _pure_parse = True

    def _parse_head(self, head: bytes | bytearray) -> Request:
        buffer = ReceiveBuffer()
        buffer += head
        try:
            event = maybe_read_from_IDLE_client(buffer)
        except h11.ProtocolError as exc:
            raise ProtocolError(exc.error_status_hint, str(exc)) from None
        self._new_response()
        return Request(event.method, event.target, event.http_version,
                       [(name.lower(), value) for name, value in event.headers.raw_items()])

    def _start(self, request: Request, framing: int, flags: tuple[bool, bool, bool]) -> Request:
        request = super()._start(request, framing, flags)
        self._close_asked = self._close_asked or self._http10
        return request
