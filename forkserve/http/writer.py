"""Response serialization with h11's rules, byte for byte, without h11.

`ResponseWriter` is the writing half of a `BaseConnection` subclass: the same checks of
names and values (h11's field grammar, one Content-Length value, Transfer-Encoding only
"chunked"; stricter on one point: no control byte in a value), the same framing headers
(chunked for an HTTP/1.1 client when the length is unknown, none and a close for HTTP/1.0;
HEAD framed as GET; none added to 204, 304 or a 2xx to CONNECT), the same `Connection: close`
rules, the same states and the same bytes (Host first, then the fields in order, the framing
and Connection fields h11 sets at the end). One more thing h11 does not do: an HTTP/1.0 client
that asks for keep-alive keeps its connection when the response has a length, and is told so
(`Connection: keep-alive`).
"""

from __future__ import annotations

import re

from forkserve.http.base import complete_headers, http_date, remember
from forkserve.http.connection import comma_values

# h11/_abnf.py: field-name = token; field-value = *( field-content ), with field-content
# = field-vchar [ 1*( SP / HTAB ) field-vchar ]. h11's field-vchar is any byte but NUL and
# white space; this one is RFC 9110 §5.5's, VCHAR / obs-text: no control byte (h11 lets
# \x01-\x08, \x0e-\x1f and DEL through, and a proxy may read them as line ends).
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?")
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


class InvalidField(ValueError):
    """A response field that may not go out (raised before anything changes state)."""


def _bytes(value: object) -> bytes:
    """h11's bytesify: str as ASCII, any buffer as bytes; an int is an error."""
    if type(value) is bytes:
        return value
    if isinstance(value, str):
        return value.encode("ascii")
    if isinstance(value, int):
        raise TypeError("expected bytes-like object, not int")
    return bytes(value)


# A checked response field: (raw name, lower-case name, value, its line "Name: value\r\n",
# its kind: one of the bits below, or 0 for a field the writer does not look into).
_Field = tuple[bytes, bytes, bytes, bytes, int]
_HOST = 1
_CONNECTION = 2
_CONTENT_LENGTH = 4
_TRANSFER_ENCODING = 8
_KINDS = {b"host": _HOST, b"connection": _CONNECTION, b"content-length": _CONTENT_LENGTH,
          b"transfer-encoding": _TRANSFER_ENCODING}

# Checked fields by the (name, value) pair the app gave: apps send the same few with every
# response (and the Date changes once a second), so each is checked once, then looked up.
# Emptied when full, so that values that keep changing (lengths, cookies) cost no more than a
# check each and the memory stays bounded.
_FIELDS: dict[tuple[bytes, bytes], _Field] = {}
_FIELDS_MAX = 512
_CACHED_VALUE_MAX = 1024  # bytes; a longer value is checked each time


# Composed response heads (see ResponseWriter._compose) by what they were composed from: a
# server answers with the same few heads, which change once a second (their Date). Emptied
# when full, as _FIELDS.
_Head = tuple[bytes, int, int, bool, bool]
_HEADS: dict[tuple, _Head] = {}
_APP_HEADS: dict[tuple, _Head] = {}  # (the same, by what send_app_response is given)
_HEADS_MAX = 256
_CACHED_HEAD_MAX = 2048  # bytes


def _remember(heads: dict[tuple, _Head], key: tuple | None, head: _Head) -> None:
    """Keep `head` in `heads` under `key` (None: not to be kept), unless it is too long;
    `heads` is emptied when full."""
    if key is not None and len(head[0]) <= _CACHED_HEAD_MAX:
        remember(heads, key, head, _HEADS_MAX)


def _field(raw: bytes, lower: bytes, value: bytes) -> _Field:
    return raw, lower, value, b"%s: %s\r\n" % (raw, value), _KINDS.get(lower, 0)


_CHUNKED_FIELD = _field(b"Transfer-Encoding", b"transfer-encoding", b"chunked")
_KEEP_ALIVE_FIELD = _field(b"Connection", b"connection", b"keep-alive")


def _check_field(name: object, value: object) -> _Field:
    """One field checked and normalized as h11's normalize_and_validate does (a Content-Length
    list of one repeated length becomes that length, a Transfer-Encoding is lower-cased), the
    SP and HTAB around a value that is refused with them trimmed (RFC 9110 §5.5; not for a
    str); kept in _FIELDS. Raises InvalidField, TypeError or UnicodeError."""
    raw = _bytes(name)
    raw_value = _bytes(value)
    if _TOKEN.fullmatch(raw) is None:
        raise InvalidField(f"Illegal header name {raw!r}")
    if _FIELD_VALUE.fullmatch(raw_value) is None:
        trimmed = raw_value if isinstance(value, str) else raw_value.strip(b" \t")
        if trimmed == raw_value or _FIELD_VALUE.fullmatch(trimmed) is None:
            raise InvalidField(f"Illegal header value {raw_value!r}")
        raw_value = trimmed
    lower = raw.lower()
    if lower == b"content-length":
        lengths = {length.strip() for length in raw_value.split(b",")}
        if len(lengths) != 1:
            raise InvalidField("conflicting Content-Length headers")
        raw_value = lengths.pop()
        if _DIGITS.fullmatch(raw_value) is None or len(raw_value) > _MAX_LENGTH_DIGITS:
            raise InvalidField("bad Content-Length")
    elif lower == b"transfer-encoding":
        raw_value = raw_value.lower()  # normalize_fields refuses what is not "chunked"
    field = _field(raw, lower, raw_value)
    if type(name) is bytes and type(value) is bytes and len(value) <= _CACHED_VALUE_MAX:
        remember(_FIELDS, (name, value), field, _FIELDS_MAX)
    return field


def normalize_fields(headers) -> tuple[list[_Field], int, bytes | None]:
    """Each field checked (see _check_field) and merged as h11's normalize_and_validate does:
    (the fields, the kinds of field among them OR-ed, the Content-Length value or None).
    Raises InvalidField for conflicting lengths, a second Transfer-Encoding or one that is not
    "chunked" (in h11's order), and what _check_field raises."""
    fields = []
    kinds = 0
    length = None
    for name, value in headers:
        try:
            field = _FIELDS[name, value]
        except (KeyError, TypeError):  # not seen yet, or unhashable (a bytearray)
            field = _check_field(name, value)
        kind = field[4]
        if kind & _CONTENT_LENGTH:
            if length is not None:
                if length != field[2]:
                    raise InvalidField("conflicting Content-Length headers")
                continue
            length = field[2]
        elif kind & _TRANSFER_ENCODING:
            if kinds & _TRANSFER_ENCODING:
                raise InvalidField("multiple Transfer-Encoding headers")
            if field[2] != b"chunked":
                raise InvalidField("Only Transfer-Encoding: chunked is supported")
        kinds |= kind
        fields.append(field)
    return fields, kinds, length


def _comma_values(fields: list[_Field], name: bytes) -> list[bytes]:
    return comma_values([(lower, value) for _, lower, value, _, _ in fields], name)


def _write_fields(first_line: bytes, fields: list[_Field], kinds: int) -> bytes:
    """`first_line`, then the fields as h11 writes them (a Host field first), then the blank
    line."""
    if kinds & _HOST:
        lines = [field[3] for field in fields if field[4] & _HOST]
        lines += [field[3] for field in fields if not field[4] & _HOST]
    else:
        lines = [field[3] for field in fields]
    return b"".join((first_line, *lines, b"\r\n"))


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
        if self._wstate is not _SEND_RESPONSE:
            # (after the checks of the head: they come first, as in h11)
            self._compose(status, reason, headers)
            raise self._fail(f"invalid response head: can't send a response in state "
                             f"{self._wstate}")
        try:
            key = (status, reason, self._method, self._close_asked, self._http10, *headers)
            head = _HEADS.get(key)
        except TypeError:  # an unhashable value (a bytearray): composed each time
            key = None
            head = None
        if head is None:
            head = self._compose(status, reason, headers)
            _remember(_HEADS, key, head)
        return self._sent(head)

    def send_app_response(self, status: int, reason: bytes, headers: list,
                          body_length: int | None, close: bool) -> bytes:
        """send_response(status, reason, complete_headers(headers, status, body_length,
        close)): the app's head with what the server adds, remembered by what it is made of
        (the Date too), so that the usual response costs one look-up."""
        if self._wstate is not _SEND_RESPONSE:
            return self.send_response(status, reason,
                                      complete_headers(headers, status, body_length, close))
        # (The app's fields are bytes, checked by its interface: the key is hashable.)
        key = (status, reason, self._method, self._close_asked, self._http10, body_length,
               close, http_date(), *headers)
        head = _APP_HEADS.get(key)
        if head is None:
            head = self._compose(status, reason,
                                 complete_headers(headers, status, body_length, close))
            _remember(_APP_HEADS, key, head)
        return self._sent(head)

    def _sent(self, head: _Head) -> bytes:
        """The writing side's state once `head` is sent; its bytes."""
        data, self._framing, self._length_left, self._keep_alive, switched = head
        self.client_waiting_for_continue = False
        if switched:
            self._wstate = _SWITCHED
        else:
            self._wstate = _SEND_BODY
            self._switch_proposed = False
        return data

    def _compose(self, status: int, reason: bytes, headers: list) -> _Head:
        """The response head for this request (h11's rules, see the module's docstring) and
        what it decides: (its bytes, the body framing, the length, keep-alive, switched).
        Raises ValueError for a head that may not go out; changes no state."""
        try:
            fields, kinds, length_value = normalize_fields(headers)
        except (InvalidField, TypeError, UnicodeError) as exc:
            raise ValueError(f"invalid response head: {exc}") from None
        if not isinstance(status, int) or not 200 <= status < 1000:
            raise ValueError(f"invalid response head: status {status!r}")
        reason = _bytes(reason)
        method = self._method
        switched = method == b"CONNECT" and 200 <= status < 300
        need_close = False
        keep_alive = not self._close_asked
        if status == 204 or status == 304 or switched:
            framing = _LENGTH
            length = 0
        elif length_value is not None and not kinds & _TRANSFER_ENCODING:
            framing = _LENGTH
            length = int(length_value)
        else:
            # An unknown length: chunked for HTTP/1.1, the close for HTTP/1.0. HEAD is framed
            # as GET would be.
            length = None
            fields = [field for field in fields
                      if not field[4] & (_CONTENT_LENGTH | _TRANSFER_ENCODING)]
            if self._http10:
                framing = _UNTIL_CLOSE
                need_close = method != b"HEAD"
            else:
                framing = _CHUNKED
                fields.append(_CHUNKED_FIELD)
        if not keep_alive or need_close:
            connection = set(_comma_values(fields, b"connection"))
            connection.discard(b"keep-alive")
            connection.add(b"close")
            fields = [field for field in fields if not field[4] & _CONNECTION]
            fields += [_field(b"Connection", b"connection", value) for value in sorted(connection)]
            keep_alive = False
        elif kinds & _CONNECTION and b"close" in _comma_values(fields, b"connection"):
            keep_alive = False
        elif self._http10 and not (kinds & _CONNECTION and b"keep-alive" in _comma_values(
                fields, b"connection")):
            fields = [*fields, _KEEP_ALIVE_FIELD]  # an HTTP/1.0 client closes without it
        if method == b"HEAD":  # the body is swallowed: as h11, it frames nothing
            framing = _LENGTH
            length = 0
        data = _write_fields(b"HTTP/1.1 %d %s\r\n" % (status, reason), fields, kinds)
        return data, framing, length or 0, keep_alive, switched

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
        return data if type(data) is bytes else bytes(data)

    def send_end(self, trailers: list[tuple[bytes, bytes]] = ()) -> bytes:
        try:
            fields, kinds, _ = normalize_fields(trailers) if trailers else ([], 0, None)
        except (InvalidField, TypeError, UnicodeError) as exc:
            raise ValueError(str(exc)) from None
        if self._wstate is not _SEND_BODY:
            raise self._fail(f"can't end a response in state {self._wstate}")
        framing = self._framing
        if framing == _CHUNKED:
            out = _write_fields(b"0\r\n", fields, kinds)
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
