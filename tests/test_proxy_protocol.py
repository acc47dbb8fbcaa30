"""--proxy-protocol: the HAProxy PROXY header (v1 and v2), parsed and served on both kinds."""

from __future__ import annotations

import ipaddress
import json
import ssl
import struct
import time

import pytest
import trustme
from conftest import APP_OF, Reader, closed_by_peer

from forkserve.proxy_protocol import ProxyHeader, ProxyProtocolError, parse

pytestmark = pytest.mark.timeout(60)

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(source: str, port: int, command: int = 0x21, tlvs: bytes = b"") -> bytes:
    src = ipaddress.ip_address(source)
    family = 0x11 if src.version == 4 else 0x21
    dst = ipaddress.ip_address("127.0.0.1" if src.version == 4 else "::1")
    body = src.packed + dst.packed + struct.pack("!HH", port, 8000) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


SSL_TLV = bytes([0x20]) + struct.pack("!H", 5) + bytes([0x01]) + b"\0\0\0\0"

VALID = [
    (b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 8000\r\n", ("203.0.113.7", 51000), False),
    (b"PROXY TCP6 2001:db8::7 ::1 51000 8000\r\n", ("2001:db8::7", 51000), False),
    (b"PROXY UNKNOWN\r\n", None, False),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None, False),
    (v2("203.0.113.7", 51000), ("203.0.113.7", 51000), False),
    (v2("2001:db8::7", 443, tlvs=SSL_TLV), ("2001:db8::7", 443), True),
    (v2("203.0.113.7", 1, command=0x20), None, False),  # LOCAL: a health check
]


@pytest.mark.parametrize("header, client, tls", VALID)
def test_valid_headers_parse_and_every_prefix_asks_for_more(header, client, tls):
    assert parse(header + b"GET / HTTP/1.1\r\n") == ProxyHeader(len(header), client, tls)
    for end in range(len(header)):
        assert parse(header[:end]) is None


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n",
    b"PROXY TCP4 203.0.113.7 127.0.0.1 51000\r\n",
    b"PROXY TCP4 2001:db8::7 127.0.0.1 1 2\r\n",
    b"PROXY TCP4 203.0.113.7 127.0.0.1 65536 8000\r\n",
    b"PROXY TCP4 203.0.113.7 127.0.0.1 0051 8000\r\n",
    b"PROXY TCP5 203.0.113.7 127.0.0.1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b" " * 100 + b"\r\n",
    b"PROXZ",
    b"\r\n\r\n\x00\r\nQUIZ\n",
    v2("203.0.113.7", 1, command=0x22),
    v2("203.0.113.7", 1)[:14] + b"\x00\x04" + bytes(4),  # the addresses do not fit in 4
    V2_SIGNATURE + b"\x21\x11\xff\xff",  # longer than any header we accept
    v2("203.0.113.7", 1, tlvs=b"\x20\x00\x09\x01"),  # a TLV cut short
])
def test_malformed_headers_are_refused(data):
    with pytest.raises(ProxyProtocolError):
        parse(data)


def seen_client(interface: str, sock) -> tuple[str, str, str]:
    """(client address, client port, scheme) as the app saw them."""
    path = b"/environ" if interface == "wsgi" else b"/scope"
    sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    response = Reader(sock).response()
    assert response.status == 200, response
    seen = json.loads(response.body)
    if interface == "wsgi":
        return seen["REMOTE_ADDR"], seen["REMOTE_PORT"], seen["wsgi.url_scheme"]
    return seen["client"][0], str(seen["client"][1]), seen["scheme"]


@pytest.fixture
def proxied_server(start_server, interface):
    server = start_server(APP_OF[interface], "-w", "1", "--proxy-protocol",
                          "--header-timeout", "2")
    server.interface = interface
    return server


def test_the_header_names_the_client(proxied_server):
    with proxied_server.connect() as sock:
        for byte in b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 8000\r\n":
            sock.sendall(bytes([byte]))  # however it is split
        assert seen_client(proxied_server.interface, sock) == ("203.0.113.7", "51000", "http")
        # The header comes once per connection; the next request keeps its client.
        assert seen_client(proxied_server.interface, sock)[0] == "203.0.113.7"
    with proxied_server.connect() as sock:
        sock.sendall(v2("2001:db8::7", 443, tlvs=SSL_TLV))
        assert seen_client(proxied_server.interface, sock) == ("2001:db8::7", "443", "https")


def test_connections_without_a_valid_header_are_closed(proxied_server):
    for first in (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"PROXY TCP9 x\r\n"):
        with proxied_server.connect() as sock:
            sock.sendall(first)
            assert closed_by_peer(sock)
    with proxied_server.connect() as sock:
        sock.sendall(b"PROXY TCP4 203.0.1")  # and then nothing: --header-timeout 2
        started = time.monotonic()
        assert closed_by_peer(sock, timeout=10)
        assert time.monotonic() - started < 6
    mark = proxied_server.mark()
    with proxied_server.connect() as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 8000\r\n")
        assert seen_client(proxied_server.interface, sock)[0] == "203.0.113.7"
    assert "Traceback" not in "\n".join(proxied_server.lines[mark:])


def test_headers_from_untrusted_peers_are_not_believed(start_server, interface):
    server = start_server(APP_OF[interface], "-w", "1", "--proxy-protocol",
                          "--forwarded-allow-ips", "10.0.0.1")
    with server.connect() as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 8000\r\n")
        assert closed_by_peer(sock)
    server.wait_for(r"closed a connection from 127.0.0.1: a PROXY header is only believed")


def test_the_header_comes_before_the_tls_handshake(start_server, interface, tmp_path):
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem"))
    server = start_server(APP_OF[interface], "-w", "1", "--proxy-protocol",
                          "--certfile", str(tmp_path / "server.pem"))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    raw = server.connect()
    raw.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 8000\r\n")
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        assert seen_client(interface, sock) == ("203.0.113.7", "51000", "https")
