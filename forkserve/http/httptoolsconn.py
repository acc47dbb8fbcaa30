"""The fast HTTP/1.1 connection: llhttp (httptools) splits each request head, `ResponseWriter`
writes the responses; the rest is `BaseConnection`'s. Same semantics as the h11 one.

llhttp is laxer than h11 in places and stricter in others, so it is never the judge:
- what it lets through that h11 refuses is refused here, with h11's status: a request line
  that is not exactly `token SP target SP HTTP/d.d` (llhttp takes two spaces, a tab in the
  target, RTSP/ and ICE/), a missing Host in an HTTP/1.1 request, a Content-Length that is not
  1 to 20 digits, a second Transfer-Encoding field or a coding other than chunked (501), and
  white space after a field value (llhttp keeps it in the value);
- what it refuses that h11 takes (a method it does not know, a version other than 1.0 and
  1.1, a bare LF ending a line) is read again by the reference
  grammar below, which is h11's.
Raw-byte rules (control bytes, obs-fold, bare CR) and limits were applied to the head before
it got here (check_head_bytes), and check_request follows (it also finds a repeated
Content-Length in the raw head).
"""

from __future__ import annotations

import re

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from forkserve.http.base import ProtocolError, Request
from forkserve.http.connection import BaseConnection
from forkserve.http.writer import ResponseWriter

# h11's grammar (h11/_abnf.py): request-line = method SP request-target SP HTTP-version, with
# method = token, request-target = 1*VCHAR,
# HTTP-version = "HTTP/" DIGIT "." DIGIT; a header line is field-name ":" OWS field-value OWS.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])\r?\n")
_FIELD_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\r\n]*?)[ \t]*\r?\n")
_MAX_LENGTH_DIGITS = 20  # as h11


class _Fields:
    """httptools' callback target: collects the header fields of one head, and sees whether
    it was a whole message (no body follows)."""

    __slots__ = ("fields", "complete")

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp drops the white space before a value, not after it.
        self.fields.append((name.lower(), value.rstrip(b" \t")))

    def on_message_complete(self) -> None:
        self.complete = True


def reference_fields(head: bytes | bytearray, start: int) -> list[tuple[bytes, bytes]]:
    """The header fields of `head` from offset `start` (after its request line), read with
    h11's grammar: lower-case names, values without the white space around them."""
    fields = []
    while head[start:start + 1] != b"\n" and head[start:start + 2] != b"\r\n":
        line = _FIELD_LINE.match(head, start)
        if line is None:
            raise ProtocolError(400, "illegal header line")
        fields.append((line.group(1).lower(), line.group(2)))
        start = line.end()
    return fields


def check_fields(version: bytes, fields: list[tuple[bytes, bytes]]) -> None:
    """What h11 refuses in parsed header fields (h11/_headers.normalize_and_validate, then
    h11/_events.Request), in h11's order and with its statuses. A Transfer-Encoding value is
    lower-cased in `fields`, as h11 hands it on."""
    hosts = 0
    seen_length = None
    coding_at = -1
    for index, (name, value) in enumerate(fields):
        first = name[0]
        if first == 0x68 and name == b"host":  # h
            hosts += 1
        elif first == 0x63 and name == b"content-length":  # c
            lengths = {length.strip() for length in value.split(b",")}
            if len(lengths) != 1:
                raise ProtocolError(400, "conflicting Content-Length headers")
            length = lengths.pop()
            if not length.isdigit() or not length.isascii() or len(length) > _MAX_LENGTH_DIGITS:
                raise ProtocolError(400, "bad Content-Length")
            if seen_length is not None and seen_length != length:
                raise ProtocolError(400, "conflicting Content-Length headers")
            seen_length = length
        elif first == 0x74 and name == b"transfer-encoding":  # t
            if coding_at >= 0:
                raise ProtocolError(501, "multiple Transfer-Encoding headers")
            if value.lower() != b"chunked":
                raise ProtocolError(501, "Only Transfer-Encoding: chunked is supported")
            coding_at = index
    if coding_at >= 0:
        fields[coding_at] = (b"transfer-encoding", b"chunked")
    if version == b"1.1" and not hosts:
        raise ProtocolError(400, "Missing mandatory Host: header")
    if hosts > 1:
        raise ProtocolError(400, "Found multiple Host: headers")


class HttptoolsConnection(ResponseWriter, BaseConnection):
    """An `HTTPConnection` on httptools (see forkserve.http.base for the contract)."""

    _pure_parse = True
    # What the parser calls back, made with the first head parsed (a head remembered by
    # BaseConnection is not parsed).
    _sink: _Fields | None = None
    # The parser of the last head if that was a whole message: it then waits for the next
    # one as a new parser would, and reusing it costs half as much as making one. Any other
    # state (a body expected, an upgrade, an error) is left behind with it.
    _parser: HttpRequestParser | None = None

    def _parse_head(self, head: bytes | bytearray) -> Request:
        line = _REQUEST_LINE.match(head)
        if line is None:
            raise ProtocolError(400, "illegal request line")
        method, target, version = line.groups()
        if self._sink is None:
            self._sink = _Fields()
        parser = self._parser
        self._parser = None
        fields = None
        if parser is not None:
            try:
                fields = self._feed(parser, head)
            except HttpParserError:  # what it kept from the last message (it said close)
                pass
        if fields is None:
            try:
                fields = self._feed(HttpRequestParser(self._sink), head)
            except HttpParserError:
                fields = reference_fields(head, line.end())
        check_fields(version, fields)
        self._new_response()
        return Request(method, target, version, fields)

    def _feed(self, parser: HttpRequestParser,
              head: bytes | bytearray) -> list[tuple[bytes, bytes]]:
        """The header fields of `head`, through `parser`, kept for the next head if it
        stays ready for one. Raises HttpParserError for a head llhttp refuses."""
        sink = self._sink
        sink.fields = fields = []
        sink.complete = False
        try:
            parser.feed_data(head)
        except HttpParserUpgrade:  # Upgrade or CONNECT: the head was read all the same
            return fields
        if sink.complete:
            self._parser = parser
        return fields
