"""The reference HTTP/1.1 connection, driven by h11, with forkserve's limits and checks added."""

from __future__ import annotations

import h11

from forkserve.http.base import (
    CLOSED,
    END_OF_MESSAGE,
    NEED_DATA,
    PAUSED,
    Data,
    Event,
    FilePart,
    Limits,
    ProtocolError,
    Request,
    check_head_bytes,
    check_partial_head,
    check_request,
)
from forkserve.http.chunked import ChunkedFraming

_Request = h11.Request
_Data = h11.Data
_EndOfMessage = h11.EndOfMessage
_NEED_DATA = h11.NEED_DATA
_PAUSED = h11.PAUSED
_IDLE = h11.IDLE
_DONE = h11.DONE
_MUST_CLOSE = h11.MUST_CLOSE


class H11Connection:
    """An `HTTPConnection` on h11 (see forkserve.http.base for the contract)."""

    def __init__(self, limits: Limits) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.head_size)
        self._limits = limits
        self._head_request = False
        self._body_read = 0
        self._head_unchecked = False  # bytes of a request head arrived that were not checked
        # h11 is lenient in chunk lines: a strict follower sees the same body bytes.
        self._chunked: ChunkedFraming | None = None
        self._body_unchecked = b""

    @property
    def client_waiting_for_continue(self) -> bool:
        return self._h11.they_are_waiting_for_100_continue

    def receive_data(self, data: bytes) -> None:
        self._h11.receive_data(data)
        if data:
            self._head_unchecked = True
            if self._chunked is not None:
                self._body_unchecked += data

    def next_event(self) -> Event:
        conn = self._h11
        if self._body_unchecked:
            self._chunked.feed(self._body_unchecked)
            self._body_unchecked = b""
            if self._chunked.done:
                self._chunked = None
        if self._head_unchecked and conn.their_state is _IDLE:
            # h11 unfolds obs-fold and lets control bytes through: look at the raw head once.
            buffered = conn.trailing_data[0]
            end = buffered.find(b"\r\n\r\n")
            if buffered:
                # A partial head may end in the CR of a CRLF still on its way.
                check_head_bytes(buffered.rstrip(b"\r") if end < 0 else buffered[:end])
            self._head_unchecked = end < 0 and bool(buffered)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                # h11's own buffer limit: say 414 if it is the request line that is too long.
                check_partial_head(conn.trailing_data[0], self._limits)
            raise ProtocolError(exc.error_status_hint, str(exc)) from None
        kind = type(event)
        if kind is _Data:
            data = bytes(event.data)
            self._body_read += len(data)
            if self._limits.body_size and self._body_read > self._limits.body_size:
                raise ProtocolError(413, "request body too large")
            return Data(data)
        if kind is _Request:
            request = Request(
                event.method,
                event.target,
                event.http_version,
                [(name.lower(), value) for name, value in event.headers.raw_items()],
            )
            check_request(request, self._limits)
            self._head_request = event.method == b"HEAD"
            self._body_read = 0
            if any(name == b"transfer-encoding" for name, _ in request.headers):
                # check_request let only a final "chunked" through
                self._chunked = ChunkedFraming(self._limits.head_size, self._limits.body_size)
                self._body_unchecked = conn.trailing_data[0]
            return request
        if kind is _EndOfMessage:
            return END_OF_MESSAGE
        if event is _NEED_DATA:
            if conn.their_state is _IDLE:
                check_partial_head(conn.trailing_data[0], self._limits)
            return NEED_DATA
        if event is _PAUSED:
            return PAUSED
        return CLOSED

    def send_continue(self) -> bytes:
        return self._h11.send(h11.InformationalResponse(status_code=100, headers=()))

    def send_response(self, status: int, reason: bytes, headers: list) -> bytes:
        try:
            return self._h11.send(h11.Response(status_code=status, reason=reason, headers=headers))
        except h11.LocalProtocolError as exc:
            raise ValueError(f"invalid response head: {exc}") from None

    def send_data(self, data: bytes) -> bytes:
        if self._head_request:
            return b""
        try:
            return self._h11.send(h11.Data(data=data))
        except h11.LocalProtocolError as exc:
            raise ValueError(str(exc)) from None

    def send_file(self, part: FilePart) -> list[bytes | FilePart]:
        if self._head_request:
            return []
        try:
            return self._h11.send_with_data_passthrough(h11.Data(data=part))
        except h11.LocalProtocolError as exc:
            raise ValueError(str(exc)) from None

    def send_end(self, trailers: list[tuple[bytes, bytes]] = ()) -> bytes:
        try:
            return self._h11.send(h11.EndOfMessage(headers=trailers))
        except h11.LocalProtocolError as exc:
            raise ValueError(str(exc)) from None

    def trailing_data(self) -> bytes:
        return self._h11.trailing_data[0]

    def will_close(self) -> bool:
        return self._h11.our_state is _MUST_CLOSE

    def start_next_cycle(self) -> bool:
        conn = self._h11
        if conn.our_state is _DONE and conn.their_state is _DONE:
            conn.start_next_cycle()
            self._head_unchecked = True  # a pipelined head may be buffered already
            self._chunked = None
            self._body_unchecked = b""
            return True
        return False
