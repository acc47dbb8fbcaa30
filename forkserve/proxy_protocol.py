"""The PROXY protocol (HAProxy, versions 1 and 2): a header a load balancer sends first on each
connection, saying whom the connection is really from. No I/O: `parse` looks at the bytes
received so far.

With --proxy-protocol every connection must start with one (from a peer in
--forwarded-allow-ips; anyone else could claim any address); a connection that does not is
closed. The header's source address becomes the client's (REMOTE_ADDR, the scope's
`client`); a version 2 header saying the client came over TLS makes the scheme https.
Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest version 1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = struct.Struct("!12sBBH")  # signature, version+command, family+transport, length
V2_MAX_ADDRESSES = 4096  # we accept TLVs up to this; HAProxy sends far less
# Enough bytes to parse any header; peek this many so nothing after it is consumed.
MAX_HEADER = V2_HEADER.size + V2_MAX_ADDRESSES

_V2_LOCAL, _V2_PROXY = 0x20, 0x21
_V2_ADDRESSES = {0x11: (4, 12), 0x12: (4, 12), 0x21: (16, 36), 0x22: (16, 36)}  # TCP/UDP 4/6
_TLV_SSL = 0x20
_SSL_CLIENT_SSL = 0x01


class ProxyProtocolError(Exception):
    """The connection does not start with a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header: `length` bytes long; `client` is (address, port), or None when the
    proxy speaks for itself (v1 UNKNOWN, v2 LOCAL, or a family other than TCP/UDP over IP:
    then the connection's own peer stands)."""

    length: int
    client: tuple[str, int] | None
    tls: bool = False


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`, or None if more bytes are needed to tell.

    Raises ProxyProtocolError when `data` cannot start a valid header.
    """
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data:
        raise ProxyProtocolError("no PROXY protocol header")
    return None


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not V1_PREFIX.startswith(data[:len(V1_PREFIX)]):
        raise ProxyProtocolError("no PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError("PROXY v1 line too long")
        return None
    parts = data[:end].split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyHeader(end + 2, None)
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"malformed PROXY v1 line {data[:end]!r}")
    version = 4 if parts[1] == b"TCP4" else 6
    source = _address(parts[2].decode("ascii", "replace"), version)
    _address(parts[3].decode("ascii", "replace"), version)
    return ProxyHeader(end + 2, (source, _port(parts[4])))


def _address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"bad address {text!r} in PROXY header") from None
    if address.version != version:
        raise ProxyProtocolError(f"IPv{address.version} address {text!r} in a TCP{version} "
                                 "PROXY header")
    return str(address)


def _port(text: bytes) -> int:
    if not text.isdigit() or (len(text) > 1 and text[:1] == b"0") or int(text) > 65535:
        raise ProxyProtocolError(f"bad port {text!r} in PROXY header")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if not V2_SIGNATURE.startswith(data[:len(V2_SIGNATURE)]):
        raise ProxyProtocolError("no PROXY protocol header")
    if len(data) < V2_HEADER.size:
        return None
    _, command, family, length = V2_HEADER.unpack_from(data)
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError(f"PROXY v2 version/command byte {command:#x} unknown")
    if length > V2_MAX_ADDRESSES:
        raise ProxyProtocolError(f"PROXY v2 header of {length} bytes is too long")
    total = V2_HEADER.size + length
    if len(data) < total:
        return None
    body = data[V2_HEADER.size:total]
    if command == _V2_LOCAL or family not in _V2_ADDRESSES:
        return ProxyHeader(total, None)
    size, used = _V2_ADDRESSES[family]
    if length < used:
        raise ProxyProtocolError("PROXY v2 addresses are cut short")
    source = str(ipaddress.ip_address(body[:size]))
    port = int.from_bytes(body[2 * size:2 * size + 2], "big")
    return ProxyHeader(total, (source, port), _client_tls(body[used:]))


def _client_tls(tlvs: bytes) -> bool:
    """Whether the TLVs carry PP2_TYPE_SSL with the client-connected-over-SSL bit."""
    offset = 0
    while offset + 3 <= len(tlvs):
        kind, size = tlvs[offset], int.from_bytes(tlvs[offset + 1:offset + 3], "big")
        value = tlvs[offset + 3:offset + 3 + size]
        if len(value) < size:
            raise ProxyProtocolError("PROXY v2 TLV cut short")
        if kind == _TLV_SSL and value and value[0] & _SSL_CLIENT_SSL:
            return True
        offset += 3 + size
    return False
