"""What every parser's `HTTPConnection` shares: the reading side and the cycle bookkeeping.

`BaseConnection` keeps the received bytes in an inbox, skips the empty lines before a
request line, cuts out exactly one complete request head (refusing what is over a limit or
malformed in its raw bytes), frames the body itself (Content-Length, or chunked through the
strict `ChunkedFraming`), and tracks 100-continue, protocol-switch proposals and when the
next request may begin. A parser subclass supplies only what differs: `_parse_head`, one
complete head to a `Request` with h11's grammar and rules, and the writing side (`send_*`,
`_response_done`, `_must_close`) with h11's serialization rules.
"""

from __future__ import annotations

import re

from forkserve.http.base import (
    CHUNKED,
    CLOSED,
    CONNECTION,
    END_OF_MESSAGE,
    EXPECT,
    NEED_DATA,
    PAUSED,
    UPGRADE,
    Data,
    Event,
    Limits,
    ProtocolError,
    Request,
    check_head_bytes,
    check_partial_head,
    check_request,
    plain_head_length,
    remember,
)
from forkserve.http.chunked import ChunkedFraming

# RFC 9112 §2.2: empty lines before a request line are ignored; a bare LF ends a line as
# it does in the head (h11 takes bare LFs there).
_EMPTY_LINES = re.compile(rb"(?:\r?\n)+")
# The blank line that ends a head, found the way h11 finds it.
_END_OF_HEAD = re.compile(rb"\n\r?\n")

# Request heads parsed and checked before, by their bytes: keep-alive clients, health checks
# and API clients send the same head again and again, and the parse and the checks depend on
# nothing but the bytes, the limits and the parser (`_checked_request`). Bounded: emptied
# when full, heads up to _CACHED_HEAD_MAX bytes and _CACHED_HEAD_FIELDS fields (under 1 MiB
# in all). Heads with credentials are never kept: a secret must not outlive its request in
# memory, nor could a client time the cache to learn whether another sent a head like it.
# (Most such heads, the browsers', are not even looked up: `_checked_request` passes over a
# head with "ookie" or "uthorization" in it, as spelled in any case but upper; the exact
# check of the parsed fields decides what is kept.)
_CHECKED_HEADS: dict[bytes, tuple] = {}
_CHECKED_HEADS_MAX = 128
_CACHED_HEAD_MAX = 1024
_CACHED_HEAD_FIELDS = 32
_CREDENTIALS = frozenset((b"authorization", b"cookie", b"proxy-authorization"))

# The reading side's states.
_IDLE = "IDLE"  # waiting for a request head
_BODY = "BODY"  # a request head was returned, its body is not read to its end
_DONE = "DONE"  # the request is read; the next one waits for start_next_cycle()
_CLOSED = "CLOSED"  # the client closed its end and CLOSED was returned


def comma_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """The comma-separated values of every `name` field, lower-cased, as h11 reads them."""
    values = []
    for found, value in headers:
        if found == name:
            for item in value.lower().split(b","):
                item = item.strip()
                if item:
                    values.append(item)
    return values


def _asks(request: Request) -> tuple[bool, bool, bool]:
    """What a checked request asks of the connection: (no keep-alive: Connection: close, or
    HTTP/1.0 without Connection: keep-alive; a protocol switch proposed: Upgrade or CONNECT;
    100 Continue awaited before the body)."""
    method = request.method
    http10 = request.http_version == b"1.0"
    options = request.options
    if not options:
        return http10, method == b"CONNECT", False
    headers = request.headers
    tokens = comma_values(headers, b"connection") if options & CONNECTION else ()
    # HTTP/1.0 keeps the connection only when the client asks (RFC 9112 §9.3, Appendix
    # C.2.2): the writer may then answer keep-alive (h11's never does).
    return (b"close" in tokens or http10 and b"keep-alive" not in tokens,
            method == b"CONNECT" or bool(options & UPGRADE and comma_values(headers, b"upgrade")),
            bool(options & EXPECT and request.http_version == b"1.1"
                 and b"100-continue" in comma_values(headers, b"expect")))


class BaseConnection:
    """The shared half of an `HTTPConnection` (see forkserve.http.base for the contract)."""

    # A subclass whose `_parse_head` depends on the head alone, and whose only other effect
    # is `_new_response()`, sets this: its Requests are then remembered (_CHECKED_HEADS).
    # (Inherited: a subclass of such a parser with a `_parse_head` of its own must say again.)
    _pure_parse = False

    # What a new connection starts with (class attributes: a connection is made per client).
    _eof = False  # the client closed its end
    _state = _IDLE
    _empty_lines = 0  # bytes of empty lines before the next request line
    _body_left = 0  # bytes of a Content-Length body not read yet
    _body_read = 0
    _chunked: ChunkedFraming | None = None
    _switch_proposed = False  # Upgrade or CONNECT: PAUSED until a response says no
    # Set from the request head for the writing side: the client's Connection: close or
    # HTTP/1.0 without Connection: keep-alive (no keep-alive either way), and its method.
    _close_asked = False
    _http10 = False
    _method = b""
    client_waiting_for_continue = False

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._inbox = bytearray()  # received, not read yet

    # -- what a parser supplies ----------------------------------------------------------

    def _parse_head(self, head: bytes | bytearray) -> Request:
        """One complete request head (no empty lines before it) as a Request with lower-case
        header names, or ProtocolError: what h11 refuses, with h11's status."""
        raise NotImplementedError

    def _response_done(self) -> bool:
        """The response was ended and keeps the connection open."""
        raise NotImplementedError

    def _must_close(self) -> bool:
        """The response was ended and closes the connection."""
        raise NotImplementedError

    # -- reading ----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if data:
            self._inbox += data
        else:
            self._eof = True

    def next_event(self) -> Event:
        state = self._state
        if state is _BODY:
            return self._body_event()
        if state is _IDLE:
            if self._inbox:
                head = self._take_head()
                if head is not None:
                    return self._begin(head)
                if self._inbox:  # the start of a head
                    if self._eof:
                        raise ProtocolError(400, "connection closed in a request head")
                    return NEED_DATA
            if self._eof:
                self._state = _CLOSED
                return CLOSED
            return NEED_DATA
        # The request is read: what follows is the next one's, read after start_next_cycle.
        if self._switch_proposed or self._inbox:
            return PAUSED
        if self._eof:
            self._state = _CLOSED
            return CLOSED
        return NEED_DATA

    def _begin(self, head: bytearray) -> Request:
        return self._start(*self._checked_request(head))

    def _start(self, request: Request, framing: int, flags: tuple[bool, bool, bool]) -> Request:
        """The reading side's state for a new request (its body's framing, what it asks)."""
        self._method = request.method
        self._empty_lines = 0
        self._body_read = 0
        if framing == CHUNKED:  # check_request let only a final "chunked" through
            self._chunked = ChunkedFraming(self._limits.head_size, self._limits.body_size)
        else:
            self._chunked = None
            self._body_left = framing
        self._http10 = request.http_version == b"1.0"
        self._close_asked, self._switch_proposed, self.client_waiting_for_continue = flags
        self._state = _BODY
        return request

    def begin_known(self, data: bytes) -> Request | None:
        """The request in `data`, read to its end, if the connection waits for one with
        nothing buffered and `data` is exactly a request head remembered (_CHECKED_HEADS)
        that has no body and proposes no protocol switch: what next_event would return, then
        END_OF_MESSAGE, but with one dictionary look-up. Else None, and nothing changed:
        give `data` to receive_data."""
        if self._state is not _IDLE or self._inbox or self._eof:
            return None
        known = _CHECKED_HEADS.get(data)
        if known is None or known[8] or known[9][1]:  # (framing; flags: a switch proposed)
            return None
        remembered = self._remembered(data, known)
        if remembered is None:
            return None
        request = self._start(*remembered)
        self._end_of_body()
        return request

    def _checked_request(self, head: bytearray) -> tuple[Request, int, tuple[bool, bool, bool]]:
        """The Request of `head`, its body's framing (see check_request) and what it asks of
        the connection (`_asks`): parsed and checked, or, for a parser whose `_parse_head` is
        pure (`_pure_parse`), as the same bytes were under the same limits before
        (_CHECKED_HEADS)."""
        key = bytes(head) if self._pure_parse and len(head) <= _CACHED_HEAD_MAX \
            and b"ookie" not in head and b"uthorization" not in head else None
        if key is not None:
            known = _CHECKED_HEADS.get(key)
            if known is not None:
                remembered = self._remembered(key, known)
                if remembered is not None:
                    return remembered
        request = self._parse_head(head)
        framing = check_request(request, self._limits, head)
        flags = _asks(request)
        if key is not None and len(request.headers) <= _CACHED_HEAD_FIELDS \
                and not any(name in _CREDENTIALS for name, _ in request.headers):
            remember(_CHECKED_HEADS, key, (
                self._limits, type(self), request.method, request.target,
                request.http_version, tuple(request.headers), request.proxy_headers,
                request.options, framing, flags), _CHECKED_HEADS_MAX)
            request.head = key
        return request, framing, flags

    def _remembered(self, key: bytes, known: tuple) -> tuple[Request, int,
                                                             tuple[bool, bool, bool]] | None:
        """What `_checked_request` returns for the head `key`, from its _CHECKED_HEADS entry
        `known`; None if that was parsed under other limits or by another parser."""
        limits, parser, method, target, version, headers, proxy_headers, options, framing, \
            flags = known
        if limits is not self._limits or parser is not type(self):
            return None
        self._new_response()  # (what _parse_head does for the writing side)
        # A list of its own: an ASGI app's middleware may change scope["headers"].
        return Request(method, target, version, list(headers), proxy_headers, options,
                       key), framing, flags

    def _body_event(self) -> Event:
        chunked = self._chunked
        if chunked is None:
            if not self._body_left:
                return self._end_of_body()
            if self._inbox:
                data = self._take(self._body_left)
                self._body_left -= len(data)
                return self._data(data)
        else:
            if chunked.done:
                return self._end_of_body()
            if self._inbox:
                data, used = chunked.feed(self._inbox)
                self._take(used)
                if data:
                    return self._data(data)
                if chunked.done:
                    return self._end_of_body()
        if self._eof:
            raise ProtocolError(400, "connection closed in a request body")
        return NEED_DATA

    def _data(self, data: bytes | bytearray) -> Data:
        self._body_read += len(data)
        if self._limits.body_size and self._body_read > self._limits.body_size:
            raise ProtocolError(413, "request body too large")
        self.client_waiting_for_continue = False
        return Data(bytes(data))

    def _end_of_body(self) -> Event:
        self._state = _DONE
        self.client_waiting_for_continue = False
        return END_OF_MESSAGE

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
                if not inbox:
                    return None
        length = plain_head_length(inbox)
        if length:  # the usual case, checked in one pass
            return self._take(length)
        end = _END_OF_HEAD.search(inbox)
        if end is None:
            # Parsers unfold obs-fold and let control bytes through: look at the raw head. A
            # partial head may end in the CR of a CRLF still on its way.
            check_head_bytes(inbox.rstrip(b"\r"))
            check_partial_head(inbox, self._limits)
            return None
        head = self._take(end.end())
        check_head_bytes(head)
        return head

    def _take(self, count: int) -> bytearray:
        """The first `count` bytes of the inbox, taken out of it."""
        inbox = self._inbox
        if count >= len(inbox):
            self._inbox = bytearray()
            return inbox
        taken = inbox[:count]
        del inbox[:count]  # (amortized: CPython moves the start of a bytearray)
        return taken

    def trailing_data(self) -> bytes:
        return bytes(self._inbox)

    def buffered(self) -> int:
        return len(self._inbox)

    def has_input(self) -> bool:
        return bool(self._inbox) or self._eof

    # -- the cycle --------------------------------------------------------------------------

    def will_close(self) -> bool:
        return self._state is _CLOSED or self._must_close()

    def start_next_cycle(self) -> bool:
        if self._state is _DONE and self._response_done():
            self._state = _IDLE
            self._chunked = None
            self._switch_proposed = False
            return True
        return False
