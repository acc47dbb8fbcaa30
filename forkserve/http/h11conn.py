"""The reference HTTP/1.1 connection, driven by h11, with forkserve's limits and checks added."""

from __future__ import annotations

import re
from typing import Any

import h11

from forkserve.http.base import (
    CHUNKED,
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
    trim_field_values,
)
from forkserve.http.chunked import ChunkedFraming

_Request = h11.Request
_Data = h11.Data
_EndOfMessage = h11.EndOfMessage
_NEED_DATA = h11.NEED_DATA
_PAUSED = h11.PAUSED
_IDLE = h11.IDLE
_SEND_BODY = h11.SEND_BODY
_DONE = h11.DONE
_MUST_CLOSE = h11.MUST_CLOSE

# RFC 9112 §2.2: empty lines before a request line are ignored; a bare LF ends a line as
# it does in the head (h11 takes bare LFs there).
_EMPTY_LINES = re.compile(rb"(?:\r?\n)+")
# The blank line that ends a head, found the way h11 finds it, so that h11 is given exactly
# one head.
_END_OF_HEAD = re.compile(rb"\n\r?\n")


class H11Connection:
    """An `HTTPConnection` on h11 (see forkserve.http.base for the contract).

    Received bytes wait in an inbox and h11 is handed exactly one request at a time: its head
    once complete (without the empty lines before it), then its body, re-framed by the strict
    follower if chunked. So h11 never sees what it would refuse but RFC 9112 allows (empty
    lines before a request line, white space before a chunk extension), and what follows a
    request stays in the inbox until the next cycle.
    """

    def __init__(self, limits: Limits) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.head_size)
        self._limits = limits
        self._head_request = False
        self._body_read = 0
        self._inbox = bytearray()  # received, not given to h11 yet
        self._eof = False  # the client closed its end; h11 is told once the inbox is empty
        self._eof_told = False
        self._empty_lines = 0  # bytes of empty lines before the next request line
        self._body_left = 0  # bytes of a Content-Length body h11 has not been given yet
        self._chunked: ChunkedFraming | None = None

    @property
    def client_waiting_for_continue(self) -> bool:
        return self._h11.they_are_waiting_for_100_continue

    def receive_data(self, data: bytes) -> None:
        if data:
            self._inbox += data
        else:
            self._eof = True

    def next_event(self) -> Event:
        conn = self._h11
        state = conn.their_state
        if state is _IDLE and self._inbox:
            head = self._take_head()
            if head is not None:
                conn.receive_data(head)
            elif self._inbox:  # the start of a head
                if self._eof:
                    raise ProtocolError(400, "connection closed in a request head")
                return NEED_DATA
        elif state is _SEND_BODY and self._inbox:
            self._give_body()
        if self._eof and not self._inbox and not self._eof_told:
            self._eof_told = True
            conn.receive_data(b"")
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
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
            framing = check_request(request, self._limits)
            self._head_request = event.method == b"HEAD"
            self._body_read = 0
            self._empty_lines = 0
            if framing == CHUNKED:
                # check_request let only a final "chunked" through
                self._chunked = ChunkedFraming(self._limits.head_size, self._limits.body_size)
            else:
                self._body_left = framing
            return request
        if kind is _EndOfMessage:
            return END_OF_MESSAGE
        if event is _NEED_DATA:
            # h11 is done with this request: bytes in the inbox are the next one's.
            return PAUSED if self._inbox else NEED_DATA
        if event is _PAUSED:
            return PAUSED
        return CLOSED

    def _take_head(self) -> bytearray | None:
        """The request head at the start of the inbox, taken out of it, or None while it is
        incomplete. Empty lines before it are dropped; refuses what is wrong already."""
        inbox = self._inbox
        if inbox[0] in b"\r\n":
            empty = _EMPTY_LINES.match(inbox)
            if empty is not None:
                # Counted against the request-line limit, so that an endless stream of them
                # is refused, not buffered or waited on.
                self._empty_lines += empty.end()
                if self._empty_lines > self._limits.request_line:
                    raise ProtocolError(400, "too many empty lines before the request line")
                self._take(empty.end())
                inbox = self._inbox
        end = _END_OF_HEAD.search(inbox)
        if end is None:
            # h11 unfolds obs-fold and lets control bytes through: look at the raw head. A
            # partial head may end in the CR of a CRLF still on its way.
            check_head_bytes(inbox.rstrip(b"\r"))
            check_partial_head(inbox, self._limits)
            return None
        head = self._take(end.end())
        check_head_bytes(head)
        return head

    def _give_body(self) -> None:
        """Hand h11 the inbox's bytes of the current request's body, no more."""
        if self._chunked is not None:
            body, used = self._chunked.feed(self._inbox)
            self._take(used)
        else:
            body = self._take(self._body_left)
            self._body_left -= len(body)
        if body:  # (an empty receive_data would tell h11 the client closed)
            self._h11.receive_data(body)

    def _take(self, count: int) -> bytearray:
        """The first `count` bytes of the inbox, taken out of it."""
        inbox = self._inbox
        if count >= len(inbox):
            self._inbox = bytearray()
            return inbox
        taken = inbox[:count]
        del inbox[:count]  # (amortized: CPython moves the start of a bytearray)
        return taken

    def send_continue(self) -> bytes:
        return self._h11.send(h11.InformationalResponse(status_code=100, headers=()))

    def send_response(self, status: int, reason: bytes, headers: list) -> bytes:
        try:
            return self._h11.send(_event(h11.Response, headers, status_code=status, reason=reason))
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
            return self._h11.send(_event(h11.EndOfMessage, list(trailers)))
        except h11.LocalProtocolError as exc:
            raise ValueError(str(exc)) from None

    def trailing_data(self) -> bytes:
        return self._h11.trailing_data[0] + self._inbox

    def buffered(self) -> int:
        return len(self._inbox)

    def will_close(self) -> bool:
        return self._h11.our_state is _MUST_CLOSE

    def start_next_cycle(self) -> bool:
        conn = self._h11
        if conn.our_state is _DONE and conn.their_state is _DONE:
            conn.start_next_cycle()
            self._chunked = None
            return True
        return False


def _event(kind: type, headers: list[tuple[bytes, bytes]], **fields: Any) -> Any:
    """h11's `kind` event with `headers`. h11 refuses white space around a field value; it is
    trimmed (see trim_field_values) only when h11 refused the headers, so that the usual
    well-formed response pays nothing for it."""
    try:
        return kind(headers=headers, **fields)
    except h11.LocalProtocolError:
        trimmed = trim_field_values(headers)
        if trimmed is None:
            raise
        return kind(headers=trimmed, **fields)
