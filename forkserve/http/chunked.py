"""A strict follower of a chunked request body's framing (RFC 9112 §7.1), ahead of the parser.

A parser that accepts more than the grammar allows in chunk lines (h11 takes control bytes in
chunk extensions, bare CR, 20-digit sizes, a bare LF ending the trailers) lets a request
mean one thing to forkserve and another to a proxy in front of it: request smuggling. This
follower reads the body bytes before the parser does and raises `ProtocolError` at the first
chunk line, chunk end or trailer field the grammar does not allow, and hands on only the
chunk data: no parser sees chunk lines, so no parser's leniencies or strictnesses in them
come into play (h11 refuses the white space RFC 9112 §7.1.1 allows before a ";"; llhttp
takes a bare LF after a chunk). Trailer fields are checked and dropped (the interface has
no place for them). It skips chunk data by counting, so its cost is per chunk, not per byte.
"""

from __future__ import annotations

import re

from forkserve.http.base import ProtocolError

# RFC 9112 §7.1.1: chunk-size [ chunk-ext ] CRLF, with
# chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ). White space (BWS) may only come
# before a ";" or around a "=": after a size that no extension follows ("5 \r\n") it is a 400.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*" + _TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*)\r\n"
)
# field-name ":" OWS field-value OWS CRLF, no control bytes but HTAB in the value.
_TRAILER_FIELD = re.compile(_TOKEN + rb":[\t \x21-\x7e\x80-\xff]*\r\n")
# A chunk size must fit a signed 64-bit offset, as it does in every proxy worth the name.
MAX_CHUNK_SIZE = (1 << 63) - 1
MAX_CHUNK_LINE = 4096

_SIZE, _DATA, _DATA_END, _TRAILERS, _DONE = range(5)


class ChunkedFraming:
    """Follows one chunked body. `feed` it the bytes received after the request head, in
    order; it returns the chunk data in them and how many of the bytes were the body's
    (bytes past the body's end are left to the caller). `done` is true once the last chunk
    and the trailer section ended. `max_trailers` bounds the trailer section's bytes;
    `max_body` (0: no limit) the body's, refused with 413 at the chunk line that announces
    too much."""

    __slots__ = ("_state", "_line", "_remaining", "_trailer_bytes", "_max_trailers",
                 "_announced", "_max_body")

    def __init__(self, max_trailers: int, max_body: int = 0) -> None:
        self._state = _SIZE
        self._line = b""
        self._remaining = 0
        self._trailer_bytes = 0
        self._max_trailers = max_trailers
        self._announced = 0
        self._max_body = max_body

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> tuple[bytes, int]:
        """Follow `data`: return (the chunk data in it, how many bytes of `data` were the
        body's). Raises ProtocolError at the first framing error."""
        out = []
        position, end = 0, len(data)
        while position < end and self._state != _DONE:
            if self._state == _DATA:
                taken = min(self._remaining, end - position)
                out.append(data[position:position + taken])
                position += taken
                self._remaining -= taken
                if not self._remaining:
                    self._state = _DATA_END
                continue
            newline = data.find(b"\n", position)
            if newline < 0:
                self._line += data[position:]
                self._check_line_length()
                position = end
                break
            line = self._line + data[position:newline + 1]
            self._line = b""
            position = newline + 1
            self._check_line_length(line)
            self._end_of_line(line)
        return b"".join(out), position

    def _check_line_length(self, line: bytes | None = None) -> None:
        size = len(self._line if line is None else line)
        if self._state == _TRAILERS:
            if self._trailer_bytes + size > self._max_trailers:
                raise ProtocolError(431, "chunked trailer section too large")
        elif size > MAX_CHUNK_LINE:
            raise ProtocolError(400, "chunk data not followed by CRLF" if self._state == _DATA_END
                                else "chunk line too long")

    def _end_of_line(self, line: bytes) -> None:
        """Check a complete line and follow it."""
        if self._state == _SIZE:
            match = _CHUNK_LINE.fullmatch(line)
            if match is None:
                raise ProtocolError(400, f"malformed chunk line {line[:64]!r}")
            size = int(match.group(1), 16)
            if size > MAX_CHUNK_SIZE:
                raise ProtocolError(400, "chunk size out of range")
            self._announced += size
            if self._max_body and self._announced > self._max_body:
                raise ProtocolError(413, "request body too large")
            self._remaining = size
            # RFC 9112 §7.1.1: a recipient ignores the chunk extensions it does not know.
            self._state = _DATA if size else _TRAILERS
            return
        if self._state == _DATA_END:
            if line != b"\r\n":
                raise ProtocolError(400, "chunk data not followed by CRLF")
            self._state = _SIZE
        elif line == b"\r\n":
            self._state = _DONE
        else:
            self._trailer_bytes += len(line)
            if not _TRAILER_FIELD.fullmatch(line):
                raise ProtocolError(400, f"malformed trailer field {line[:64]!r}")
