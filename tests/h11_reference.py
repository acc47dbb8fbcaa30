"""The judge of the response side: an `HTTPConnection` that hands everything to h11.

Each request head goes to a fresh `h11.Connection`, through its public API, which parses it
and then writes that request's response with `h11.Connection.send`. Both of forkserve's
parsers write with `forkserve.http.writer.ResponseWriter`, which reproduces h11's bytes and
rules without h11; tests/test_fuzz.py holds it to this. Besides h11's rules it keeps
forkserve's two of its own for response fields: white space around a value is trimmed (RFC
9110 §5.5), and a value with a control byte other than HTAB is refused (h11 lets \\x01-\\x08,
\\x0e-\\x1f and DEL through).
"""

from __future__ import annotations

import re
from typing import Any

import h11

from forkserve.http.base import ProtocolError, Request
from forkserve.http.connection import BaseConnection

_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # the control bytes, HTAB aside
_OWS = (0x20, 0x09)  # SP and HTAB, as items of a bytes value


class InvalidField(ValueError):
    """A response field that may not go out, though h11 would write it."""


class H11Reference(BaseConnection):
    """An `HTTPConnection` on h11 alone (see forkserve.http.base for the contract): h11
    never sees a body, an empty line before a request line or what follows a request."""

    _h11: h11.Connection

    def _parse_head(self, head: bytes | bytearray) -> Request:
        self._h11 = conn = h11.Connection(h11.SERVER)
        conn.receive_data(head)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProtocolError(exc.error_status_hint, str(exc)) from None
        return Request(event.method, event.target, event.http_version,
                       [(name.lower(), value) for name, value in event.headers.raw_items()])

    def send_continue(self) -> bytes:
        out = self._h11.send(h11.InformationalResponse(status_code=100, headers=()))
        self.client_waiting_for_continue = False
        return out

    def send_response(self, status: int, reason: bytes, headers: list) -> bytes:
        try:
            out = self._h11.send(_event(h11.Response, headers, status_code=status, reason=reason))
        except (h11.LocalProtocolError, InvalidField) as exc:
            raise ValueError(f"invalid response head: {exc}") from None
        self.client_waiting_for_continue = False
        # A response ends an Upgrade proposal, unless it is a 2xx to CONNECT (h11 then
        # switches protocols: nothing more is read or written).
        self._switch_proposed = self._h11.our_state is h11.SWITCHED_PROTOCOL
        return out

    def send_data(self, data: bytes) -> bytes:
        if self._method == b"HEAD":
            return b""
        try:
            return self._h11.send(h11.Data(data=data))
        except h11.LocalProtocolError as exc:
            raise ValueError(str(exc)) from None

    def send_end(self, trailers: list[tuple[bytes, bytes]] = ()) -> bytes:
        try:
            return self._h11.send(_event(h11.EndOfMessage, list(trailers)))
        except (h11.LocalProtocolError, InvalidField) as exc:
            raise ValueError(str(exc)) from None

    def _response_done(self) -> bool:
        return self._h11.our_state is h11.DONE

    def _must_close(self) -> bool:
        return self._h11.our_state is h11.MUST_CLOSE


def _event(kind: type, headers: list[tuple[bytes, bytes]], **fields: Any) -> Any:
    """h11's `kind` event with `headers`, or InvalidField for a value with a control byte.
    h11 refuses white space around a field value: the values are trimmed when it does."""
    try:
        event = kind(headers=headers, **fields)
    except h11.LocalProtocolError:
        trimmed = _trimmed(headers)
        if trimmed is None:
            raise
        event = kind(headers=trimmed, **fields)
    for _, value in event.headers.raw_items():
        if _CONTROL.search(value):
            raise InvalidField(f"Illegal header value {value!r}")
    return event


def _trimmed(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]] | None:
    """`headers` with the SP and HTAB around each value removed, or None if no value had any."""
    trimmed = []
    changed = False
    for name, value in headers:
        if value and (value[0] in _OWS or value[-1] in _OWS):
            value = value.strip(b" \t")
            changed = True
        trimmed.append((name, value))
    return trimmed if changed else None
