"""The reference HTTP/1.1 connection: h11 parses each request head and writes the responses;
the rest (the inbox, heads, body framing, the cycle) is `BaseConnection`'s."""

from __future__ import annotations

from typing import Any

import h11

from forkserve.http.base import FilePart, ProtocolError, Request, trim_field_values
from forkserve.http.connection import BaseConnection
from forkserve.http.writer import InvalidField, check_field_values

_DONE = h11.DONE
_MUST_CLOSE = h11.MUST_CLOSE
_SWITCHED_PROTOCOL = h11.SWITCHED_PROTOCOL


class H11Connection(BaseConnection):
    """An `HTTPConnection` on h11 (see forkserve.http.base for the contract).

    Each request head, once complete, goes to a fresh h11 connection, which parses it and
    then writes that request's response: h11 never sees a body, an empty line before a
    request line or what follows a request."""

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
        self._switch_proposed = self._h11.our_state is _SWITCHED_PROTOCOL
        return out

    def send_data(self, data: bytes) -> bytes:
        if self._method == b"HEAD":
            return b""
        try:
            return self._h11.send(h11.Data(data=data))
        except h11.LocalProtocolError as exc:
            raise ValueError(str(exc)) from None

    def send_file(self, part: FilePart) -> list[bytes | FilePart]:
        if self._method == b"HEAD":
            return []
        try:
            return self._h11.send_with_data_passthrough(h11.Data(data=part))
        except h11.LocalProtocolError as exc:
            raise ValueError(str(exc)) from None

    def send_end(self, trailers: list[tuple[bytes, bytes]] = ()) -> bytes:
        try:
            return self._h11.send(_event(h11.EndOfMessage, list(trailers)))
        except (h11.LocalProtocolError, InvalidField) as exc:
            raise ValueError(str(exc)) from None

    def _response_done(self) -> bool:
        return self._h11.our_state is _DONE

    def _must_close(self) -> bool:
        return self._h11.our_state is _MUST_CLOSE


def _event(kind: type, headers: list[tuple[bytes, bytes]], **fields: Any) -> Any:
    """h11's `kind` event with `headers`, or InvalidField for a value with a control byte h11
    lets through (see check_field_values). h11 refuses white space around a field value; it is
    trimmed (see trim_field_values) only when h11 refused the headers, so that the usual
    well-formed response pays nothing for it."""
    try:
        event = kind(headers=headers, **fields)
    except h11.LocalProtocolError:
        trimmed = trim_field_values(headers)
        if trimmed is None:
            raise
        event = kind(headers=trimmed, **fields)
    check_field_values(event.headers.raw_items())
    return event
