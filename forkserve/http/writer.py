"""Response serialization with h11's rules, byte for byte, without h11.

`ResponseWriter` is the writing half of a `BaseConnection` subclass: the same checks of
names and values (h11's field grammar, one Content-Length value, Transfer-Encoding only
"chunked"), the same framing headers (chunked for an HTTP/1.1 client when the length is
unknown, none and a close for HTTP/1.0; HEAD framed as GET; none added to 204, 304 or a 2xx
to CONNECT), the same `Connection: close` rules, the same states and the same bytes (Host
first, then the fields in order, the framing and Connection fields h11 sets at the end).
"""

from __future__ import annotations

import re

from forkserve.http.base import FilePart, trim_field_values
from forkserve.http.connection import comma_values

# h11/_abnf.py: field-name = token; field-value = *( field-content ), with field-content
# = field-vchar [ 1*( SP / HTAB ) field-vchar ] and field-vchar any byte but NUL and white
# space (obs-text included).
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
_DIGITS = re.compile(rb"[0-9]+")
_MAX_LENGTH_DIGITS = 20  # as h11

# Writing states (h11's, for the server role).
_SEND_RESPONSE = "SEND_RESPONSE"
_SEND_BODY = "SEND_BODY"
_DONE = "DONE"
_MUST_CLOSE = "MUST_CLOSE"
_SWITCHED = "SWITCHED_PROTOCOL"  # a 2xx to CONNECT: nothing more is written
_ERROR = "ERROR"

# Body framings.
_LENGTH = 0
_CHUNKED = 1
_UNTIL_CLOSE = 2  # HTTP/1.0: no framing header, the close ends the body


class _Invalid(ValueError):
    """A field h11 refuses (raised before anything changes state)."""


def _bytes(value: object) -> bytes:
    """h11's bytesify: str as ASCII, any buffer as bytes; an int is an error."""
    if type(value) is bytes:
        return value
    if isinstance(value, str):
        return value.encode("ascii")
    if isinstance(value, int):
        raise TypeError("expected bytes-like object, not int")
    return bytes(value)


def normalize_fields(headers) -> list[tuple[bytes, bytes, bytes]]:
    """(raw name, lower-case name, value) for each field, checked and merged as h11's
    normalize_and_validate does; raises _Invalid."""
    fields = []
    seen_length = None
    saw_coding = False
    for name, value in headers:
        name = _bytes(name)
        value = _bytes(value)
        if _TOKEN.fullmatch(name) is None:
            raise _Invalid(f"Illegal header name {name!r}")
        if _FIELD_VALUE.fullmatch(value) is None:
            raise _Invalid(f"Illegal header value {value!r}")
        lower = name.lower()
        if lower == b"content-length":
            lengths = {length.strip() for length in value.split(b",")}
            if len(lengths) != 1:
                raise _Invalid("conflicting Content-Length headers")
            value = lengths.pop()
            if _DIGITS.fullmatch(value) is None or len(value) > _MAX_LENGTH_DIGITS:
                raise _Invalid("bad Content-Length")
            if seen_length is None:
                seen_length = value
                fields.append((name, lower, value))
            elif seen_length != value:
                raise _Invalid("conflicting Content-Length headers")
        elif lower == b"transfer-encoding":
            if saw_coding:
                raise _Invalid("multiple Transfer-Encoding headers")
            value = value.lower()
            if value != b"chunked":
                raise _Invalid("Only Transfer-Encoding: chunked is supported")
            saw_coding = True
            fields.append((name, lower, value))
        else:
            fields.append((name, lower, value))
    return fields


def _checked_fields(headers) -> list[tuple[bytes, bytes, bytes]]:
    """normalize_fields, retried once with the white space around values trimmed."""
    try:
        return normalize_fields(headers)
    except _Invalid:
        trimmed = trim_field_values(headers)
        if trimmed is None:
            raise
        return normalize_fields(trimmed)


def _comma_values(fields: list[tuple[bytes, bytes, bytes]], name: bytes) -> list[bytes]:
    return comma_values([(lower, value) for _, lower, value in fields], name)


def _write_fields(fields: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """The fields as h11 writes them (a Host field first), and the blank line."""
    lines = [b"%s: %s\r\n" % (raw, value) for raw, lower, value in fields if lower == b"host"]
    lines += [b"%s: %s\r\n" % (raw, value) for raw, lower, value in fields if lower != b"host"]
    lines.append(b"\r\n")
    return b"".join(lines)


class ResponseWriter:
    """The writing side of an `HTTPConnection`, for a `BaseConnection` subclass that calls
    `_new_response()` for each request head it parses."""

    _wstate = _SEND_RESPONSE
    _framing = _LENGTH
    _length_left = 0
    _keep_alive = True

    # From BaseConnection.
    _method: bytes
    _close_asked: bool
    _http10: bool
    _switch_proposed: bool
    client_waiting_for_continue: bool

    def _new_response(self) -> None:
        self._wstate = _SEND_RESPONSE

    def _fail(self, message: str) -> ValueError:
        self._wstate = _ERROR
        return ValueError(message)

    def send_continue(self) -> bytes:
        if self._wstate is not _SEND_RESPONSE:
            raise self._fail(f"can't send 100 Continue in state {self._wstate}")
        self.client_waiting_for_continue = False
        return b"HTTP/1.1 100 \r\n\r\n"

    def send_response(self, status: int, reason: bytes, headers: list) -> bytes:
        try:
            fields = _checked_fields(headers)
        except (_Invalid, TypeError, UnicodeError) as exc:
            raise ValueError(f"invalid response head: {exc}") from None
        if not isinstance(status, int) or not 200 <= status < 1000:
            raise ValueError(f"invalid response head: status {status!r}")
        reason = _bytes(reason)
        if self._wstate is not _SEND_RESPONSE:
            raise self._fail(f"invalid response head: can't send a response in state "
                             f"{self._wstate}")
        method = self._method
        switched = method == b"CONNECT" and 200 <= status < 300
        need_close = False
        keep_alive = not self._close_asked
        if status == 204 or status == 304 or switched:
            framing = _LENGTH
            length = 0
        else:
            length = None
            for _, lower, value in fields:
                if lower == b"transfer-encoding":
                    framing = _CHUNKED
                    break
                if lower == b"content-length" and length is None:
                    length = int(value)
            else:
                framing = _LENGTH if length is not None else _UNTIL_CLOSE
            if framing != _LENGTH:
                # An unknown length: chunked for HTTP/1.1, the close for HTTP/1.0. HEAD is
                # framed as GET would be.
                fields = [field for field in fields
                          if field[1] != b"content-length" and field[1] != b"transfer-encoding"]
                if self._http10:
                    framing = _UNTIL_CLOSE
                    need_close = method != b"HEAD"
                else:
                    framing = _CHUNKED
                    fields.append((b"Transfer-Encoding", b"transfer-encoding", b"chunked"))
        if not keep_alive or need_close:
            connection = set(_comma_values(fields, b"connection"))
            connection.discard(b"keep-alive")
            connection.add(b"close")
            fields = [field for field in fields if field[1] != b"connection"]
            fields += [(b"Connection", b"connection", value) for value in sorted(connection)]
            keep_alive = False
        elif b"close" in _comma_values(fields, b"connection"):
            keep_alive = False
        self._keep_alive = keep_alive
        if method == b"HEAD":  # the body is swallowed: as h11, it frames nothing
            framing = _LENGTH
            length = 0
        self._framing = framing
        self._length_left = length or 0
        self.client_waiting_for_continue = False
        if switched:
            self._wstate = _SWITCHED
        else:
            self._wstate = _SEND_BODY
            self._switch_proposed = False
        return b"HTTP/1.1 %d %s\r\n" % (status, reason) + _write_fields(fields)

    def send_data(self, data: bytes) -> bytes:
        if self._method == b"HEAD":
            return b""
        if self._wstate is not _SEND_BODY:
            raise self._fail(f"can't send data in state {self._wstate}")
        framing = self._framing
        if framing == _CHUNKED:
            return b"%x\r\n%b\r\n" % (len(data), data) if data else b""
        if framing == _LENGTH:
            self._length_left -= len(data)
            if self._length_left < 0:
                raise self._fail("Too much data for declared Content-Length")
        return bytes(data)

    def send_file(self, part: FilePart) -> list[bytes | FilePart]:
        if self._method == b"HEAD":
            return []
        if self._wstate is not _SEND_BODY:
            raise self._fail(f"can't send data in state {self._wstate}")
        framing = self._framing
        if framing == _CHUNKED:
            return [b"%x\r\n" % len(part), part, b"\r\n"] if len(part) else []
        if framing == _LENGTH:
            self._length_left -= len(part)
            if self._length_left < 0:
                raise self._fail("Too much data for declared Content-Length")
        return [part]

    def send_end(self, trailers: list[tuple[bytes, bytes]] = ()) -> bytes:
        try:
            fields = _checked_fields(list(trailers)) if trailers else []
        except (_Invalid, TypeError, UnicodeError) as exc:
            raise ValueError(str(exc)) from None
        if self._wstate is not _SEND_BODY:
            raise self._fail(f"can't end a response in state {self._wstate}")
        framing = self._framing
        if framing == _CHUNKED:
            out = b"0\r\n" + _write_fields(fields)
        elif framing == _LENGTH:
            if self._length_left:
                raise self._fail("Too little data for declared Content-Length")
            if fields:
                raise self._fail("Content-Length and trailers don't mix")
            out = b""
        else:
            if fields:
                raise self._fail("can't send trailers to HTTP/1.0 client")
            out = b""
        self._wstate = _DONE if self._keep_alive else _MUST_CLOSE
        return out

    def _response_done(self) -> bool:
        return self._wstate is _DONE

    def _must_close(self) -> bool:
        return self._wstate is _MUST_CLOSE
