"""The seam between HTTP/1.1 parsers and the WSGI/ASGI adapters.

A parser implementation is a sans-I/O connection object (see `HTTPConnection`): bytes go in
with `receive_data`, events come out of `next_event`, and response bytes come back from the
`send_*` methods. It never touches a socket. Every implementation raises `ProtocolError`
carrying the status to answer, and enforces the same limits (`Limits`) through the checks in
this module, so that all of them pass the same tests.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol, TypeVar

from forkserve import __version__

K = TypeVar("K")
V = TypeVar("V")


class ProtocolError(Exception):
    """The client broke HTTP/1.1: answer `status` (400, 413, 414, 431, ...) and close.

    `detail` is for the log; `explain`, when given, is told to the client in the body.
    """

    def __init__(self, status: int, detail: str, explain: str = "") -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.explain = explain


@dataclass(frozen=True)
class Limits:
    """Request-head limits.

    request_line: bytes in the request line (gunicorn 4094, nginx 8k); over it → 414.
    header_count: number of header fields (gunicorn 100); over it → 431.
    header_field_size: bytes in one `name: value` field (gunicorn 8190, nginx 8k); over it → 431.
    head_size: bytes in the whole request head (nginx's default buffers allow 32k);
        over it → 431. Checked on the buffered bytes, so a head that arrives in one read is
        refused as surely as one that trickles in.
    body_size: bytes in a request body (nginx's client_max_body_size; 0: no limit); over it
        → 413, from Content-Length before reading, or while a chunked body streams in.
    """

    request_line: int = 8190
    header_count: int = 100
    header_field_size: int = 8190
    head_size: int = 65536
    body_size: int = 0


@dataclass(slots=True)
class Request:
    """A request head. Header names are lower-case bytes, values as received.

    `http_version` is b"1.0" or b"1.1": check_request reads a higher 1.x as b"1.1" (RFC 9110
    §2.5), so that is what the app and the access log see for HTTP/1.2 to HTTP/1.9.
    """

    method: bytes
    target: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]
    # Set by check_request: a Forwarded or X-Forwarded-* header is present; the kinds of
    # field among Connection, Expect and Upgrade that are present (bits below).
    proxy_headers: bool = False
    options: int = 0
    # The head's bytes, when they are remembered with what was parsed of them (see
    # forkserve.http.connection): what depends on the head alone may be remembered by them.
    # Not part of the request's value: the same request read without it is equal.
    head: bytes | None = field(default=None, repr=False, compare=False)


# Request.options bits.
CONNECTION = 1
EXPECT = 2
UPGRADE = 4


@dataclass(slots=True)
class Data:
    """A piece of the request body, de-chunked."""

    data: bytes


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


END_OF_MESSAGE = _Sentinel("END_OF_MESSAGE")  # the request body is complete
NEED_DATA = _Sentinel("NEED_DATA")  # feed more bytes with receive_data()
PAUSED = _Sentinel("PAUSED")  # a request is in progress: respond before reading the next one
CLOSED = _Sentinel("CLOSED")  # the client closed the connection between requests

Event = Request | Data | _Sentinel


class HTTPConnection(Protocol):
    """One server-side HTTP/1.1 connection as a state machine. No I/O.

    Reading: `receive_data(b"")` means the client closed its end. `next_event()` returns a
    `Request`, then `Data` pieces and `END_OF_MESSAGE`; `NEED_DATA` when it needs bytes;
    `PAUSED` once the request is read and the response is not finished; `CLOSED` when the
    client left between requests. It raises `ProtocolError` for a malformed request. Empty
    lines before a request line are skipped (RFC 9112 §2.2), up to `Limits.request_line`
    bytes of them.

    Writing: `send_response` (head), `send_data` (body, framed as the head chose:
    Content-Length, chunked, or until close for HTTP/1.0), `send_end`; they raise ValueError
    for a head or trailers that may not go out (a field value with a control byte other than
    HTAB among them), after trimming the white space (SP, HTAB) around field values (RFC 9110
    §5.5). A HEAD request's body is swallowed. After `send_end`, `start_next_cycle()` tells
    whether the connection can carry another request (the request body must have been read
    to its end first), and `will_close()` whether it cannot, whatever the client still sends.
    """

    client_waiting_for_continue: bool

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> Event: ...

    def begin_known(self, data: bytes) -> Request | None:
        """Instead of receive_data(data) then next_event() twice, when the connection waits
        for a request with nothing buffered and `data` is exactly a request head it parsed
        and checked before (the same bytes under the same limits), without a body or a
        protocol switch: that Request, read to its end (the next event is PAUSED). Else None,
        and nothing changed."""

    def send_continue(self) -> bytes: ...

    def send_response(self, status: int, reason: bytes, headers: list) -> bytes: ...

    def send_app_response(self, status: int, reason: bytes, headers: list,
                          body_length: int | None, close: bool) -> bytes:
        """`send_response` of the app's `headers` completed by `complete_headers`."""

    def send_data(self, data: bytes) -> bytes: ...

    def send_end(self, trailers: list[tuple[bytes, bytes]] = ()) -> bytes: ...

    def start_next_cycle(self) -> bool: ...

    def will_close(self) -> bool:
        """After `send_end`: this response ends the connection (it said Connection: close,
        or the client asked for that, or spoke HTTP/1.0)."""
        ...

    def trailing_data(self) -> bytes:
        """Bytes received past the current request, for a protocol switch (WebSocket)."""
        ...

    def buffered(self) -> int:
        """How many received bytes wait to be parsed (a pipelining client may send any
        amount while a response is in progress: the caller stops reading past a limit)."""
        ...

    def has_input(self) -> bool:
        """Do received bytes wait, or has the client closed its end? (If not, next_event can
        only say NEED_DATA once the current request is over.)"""
        ...


def check_partial_head(buffered: bytes, limits: Limits) -> None:
    """Refuse an incomplete request head that is already over a limit."""
    eol = buffered.find(b"\n", 0, limits.request_line + 2)
    if eol == -1 and len(buffered) > limits.request_line + 1:
        raise ProtocolError(414, "request line too long")
    if len(buffered) > limits.head_size:
        raise ProtocolError(431, "request head too large")


# RFC 9112 §5.2: obs-fold (a line starting with space or tab) must be refused; and no
# control bytes but HTAB may appear in a head (CR and LF only as line ends). A head that keeps
# these rules: lines of HTAB, SP, VCHAR and obs-text, each ended by CRLF or LF, none after the
# first starting with white space (one pass, for every request: cheaper than a test per rule).
_FIELD_BYTE = rb"[\t\x20-\x7e\x80-\xff]"
_PLAIN_HEAD = re.compile(rb"(?:" + _FIELD_BYTE + rb"*+\r?\n(?![ \t]))*+" + _FIELD_BYTE + rb"*+")
# Such lines, not empty, up to the first empty one: a complete head that keeps the rules.
_PLAIN_COMPLETE_HEAD = re.compile(rb"(?:" + _FIELD_BYTE + rb"++\r?\n(?![ \t]))*+\r?\n")


# First bytes of the header names check_request looks at: host, content-length,
# connection, transfer-encoding, x-forwarded-*, forwarded, expect, upgrade.
_CHECKED_FIRST_BYTES = frozenset(b"hctxfeu")
_OPTIONS = {b"connection": CONNECTION, b"expect": EXPECT, b"upgrade": UPGRADE}


def plain_head_length(buffered: bytes) -> int:
    """The length of the request head that `buffered` starts with (its blank line included)
    if it is complete and keeps check_head_bytes' rules; else 0: it is incomplete, or not
    plain (check it)."""
    plain = _PLAIN_COMPLETE_HEAD.match(buffered)
    return 0 if plain is None else plain.end()


def check_head_bytes(head: bytes) -> None:
    """Refuse a raw request head (up to its blank line, or a part of one) with obs-fold or
    control bytes: what parsers unfold or let through."""
    if _PLAIN_HEAD.fullmatch(head) is None:
        if b"\n " in head or b"\n\t" in head:
            raise ProtocolError(400, "obs-fold (a header line starting with white space)")
        raise ProtocolError(400, "control character in the request head")  # or a bare CR


# RFC 9110 §7.2: Host = uri-host [ ":" port ], the authority of a URI without its userinfo.
# RFC 3986 §3.2.2: uri-host is an IP literal in brackets, an IPv4 address or a reg-name
# (unreserved, pct-encoded, sub-delims; empty is allowed); port = *DIGIT.
_HOST = re.compile(
    rb"(?:\[([0-9A-Fa-f:.]+)\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)"
    rb"(?::([0-9]*))?")


# Host values found valid: clients send the same one or few with every request. Emptied when
# full, so that the memory stays bounded whatever hosts are sent.
def remember(cache: dict[K, V], key: K, value: V, most: int) -> V:
    """`cache[key] = value`, `cache` emptied first when it holds `most` entries: the
    request path's caches (heads, fields, environ and scope parts) are bounded this way, as
    a few entries are all a server sees again and again. Returns `value`."""
    if len(cache) >= most:
        cache.clear()
    cache[key] = value
    return value


_VALID_HOSTS: set[bytes] = set()
_VALID_HOSTS_MAX = 256
_CACHED_HOST_MAX = 300  # bytes: a DNS name has at most 253, a port 6 more


def valid_host(value: bytes) -> bool:
    """Is `value` a uri-host with an optional port: a Host field value, or the authority of a
    request target? Userinfo ("user@") is not part of it, a bracketed literal must be an IPv6
    address (IPvFuture and zone identifiers are refused: nothing routes them), and a port
    must be a TCP port, 0 to 65535."""
    if value in _VALID_HOSTS:
        return True
    if not _valid_host(value):
        return False
    if len(value) <= _CACHED_HOST_MAX:
        if len(_VALID_HOSTS) >= _VALID_HOSTS_MAX:
            _VALID_HOSTS.clear()
        _VALID_HOSTS.add(value)
    return True


def _valid_host(value: bytes) -> bool:
    match = _HOST.fullmatch(value)
    if match is None:
        return False
    literal, port = match.groups()
    if literal is not None:
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except ValueError:
            return False
    if port:
        port = port.lstrip(b"0")
        return len(port) <= 5 and int(port or b"0") <= 65535
    return True


# RFC 9112 §3.2: besides origin-form ("/path?query"), absolute-form, "*" for OPTIONS, and
# authority-form ("host:port") for CONNECT. absolute-form is an absolute-URI (no fragment):
# scheme "://" authority, then a path or a query.
_ABSOLUTE_FORM = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(?:[/?][^#]*)?")


def _other_target_form(request: Request) -> bool:
    target = request.target
    if request.method == b"OPTIONS" and target == b"*":
        return True
    if request.method == b"CONNECT":
        return b":" in target and valid_host(target)
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        return False
    scheme, authority = match.groups()
    # RFC 9110 §4.2.4: userinfo in an http(s) URI is an error (valid_host refuses it, for any
    # scheme). RFC 9110 §4.2.1: an http(s) URI with an empty host must be rejected.
    if authority[:1] in (b"", b":") and scheme.lower() in (b"http", b"https"):
        return False
    return valid_host(authority)


# Parsers merge repeated identical Content-Length fields; RFC 9112 §6.3 lets us refuse them.
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:([^\r\n]*)", re.IGNORECASE | re.MULTILINE)


def _merged_lengths(head: bytes) -> bool:
    """Does raw `head` hold more than one Content-Length value (a parser may have merged)?"""
    lengths = _CONTENT_LENGTH.findall(head)
    return len(lengths) > 1 or any(b"," in value for value in lengths)


CHUNKED = -1  # check_request's framing of a chunked request body


def check_request(request: Request, limits: Limits, head: bytes) -> int:
    """Refuse a request head parsed from `head`, its raw bytes, that breaks a limit or is
    ambiguous to frame; return its body's framing: the Content-Length (0 without one) or
    CHUNKED. A version HTTP/1.2 to HTTP/1.9 becomes 1.1 in `request`, and its
    `proxy_headers` and `options` are set."""
    version = request.http_version
    if version != b"1.1" and version != b"1.0":
        # RFC 9110 §2.5: a recipient reads a message of a higher minor version within a major
        # version it speaks as the highest minor version it speaks; other majors get 505.
        if version[:2] != b"1." or not version[2:].isdigit():
            raise ProtocolError(505, "HTTP version not supported")
        request.http_version = b"1.1"
    # method SP target SP HTTP/x.y
    if len(request.method) + len(request.target) + 10 > limits.request_line:
        raise ProtocolError(414, "request line too long")
    if request.target[:1] != b"/" and not _other_target_form(request):
        raise ProtocolError(400, "invalid request target")
    headers = request.headers
    if len(headers) > limits.header_count:
        raise ProtocolError(431, "too many header fields")
    hosts = lengths = codings = length = options = 0
    field_limit = limits.header_field_size - 2  # name ": " value, less the colon and space
    head_size = len(request.method) + len(request.target) + 12 + 4 * len(headers)
    for name, value in headers:
        field_size = len(name) + len(value)
        if field_size > field_limit:
            raise ProtocolError(431, "header field too large")
        head_size += field_size
        if name[0] not in _CHECKED_FIRST_BYTES:
            continue
        if name.startswith(b"x-forwarded-") or name == b"forwarded":
            request.proxy_headers = True
        elif name == b"host":
            hosts += 1
            if not valid_host(value):
                raise ProtocolError(400, "invalid Host header")
        elif name == b"content-length":
            lengths += 1 + value.count(b",")
            if value.isdigit():
                length = int(value)
                if limits.body_size and length > limits.body_size:
                    raise ProtocolError(413, "request body too large")
        elif name == b"transfer-encoding":
            codings += 1
        else:
            options |= _OPTIONS.get(name, 0)
    request.options = options
    if head_size > limits.head_size:
        raise ProtocolError(431, "request head too large")
    if hosts > 1:
        raise ProtocolError(400, "more than one Host header")
    if lengths > 1 or lengths and _merged_lengths(head):
        raise ProtocolError(400, "more than one Content-Length")
    if codings and lengths:
        # RFC 9112 §6.1: a request with both is a smuggling attempt; close after answering.
        raise ProtocolError(400, "both Content-Length and Transfer-Encoding")
    if codings and request.http_version == b"1.0":
        raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
    return CHUNKED if codings else length


_date_cache: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The current time as an HTTP Date value, computed at most once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode("ascii"))
    return _date_cache[1]


SERVER = f"forkserve/{__version__}".encode("ascii")
_server_header: bytes | None = SERVER


def set_server_header(text: str) -> None:
    """What the Server header says: 'forkserve' means forkserve/VERSION; empty: no header.
    Set once, before any response: heads are remembered with it (http/writer.py)."""
    global _server_header
    _server_header = SERVER if text == "forkserve" else (text.encode("latin-1") or None)


def complete_headers(headers: list[tuple[bytes, bytes]], status: int, body_length: int | None,
                     close: bool) -> list[tuple[bytes, bytes]]:
    """The app's response headers plus what the server adds: Date and Server unless the app
    set them, Content-Length when `body_length` is known and the app gave no framing (and
    the status may have a body), Connection: close when `close`."""
    has_date = has_server = has_framing = False
    for name, _ in headers:
        lowered = name.lower()
        if lowered == b"date":
            has_date = True
        elif lowered == b"server":
            has_server = True
        elif lowered == b"content-length" or lowered == b"transfer-encoding":
            has_framing = True
    extra = []
    if not has_date:
        extra.append((b"Date", http_date()))
    if not has_server and _server_header is not None:
        extra.append((b"Server", _server_header))
    if body_length is not None and not has_framing and status >= 200 \
            and status not in (204, 304):
        extra.append((b"Content-Length", b"%d" % body_length))
    if close:
        extra.append((b"Connection", b"close"))
    return headers + extra if extra else headers


def error_response(status: int, detail: str = "", head: bool = False) -> bytes:
    """A complete `status` response that closes the connection, for refused requests; the
    answer to a HEAD request (`head`) has no body."""
    phrase = HTTPStatus(status).phrase.encode("ascii")
    body = phrase + (b": " + detail.encode("utf-8") if detail else b"") + b"\n"
    return b"".join((
        b"HTTP/1.1 %d %s\r\n" % (status, phrase),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Connection: close\r\n",
        b"Date: " + http_date() + b"\r\n",
        b"Server: " + _server_header + b"\r\n" if _server_header else b"",
        b"\r\n",
        b"" if head else body,
    ))
