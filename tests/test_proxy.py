"""Proxy headers: believed from --forwarded-allow-ips only, for both interfaces."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import APP_OF, APPS, exchange, forkserve_command

from forkserve.errors import ConfigError
from forkserve.proxy import Forwarded, TrustedProxies, forwarded

FORWARDED_REQUEST = (b"GET %s HTTP/1.1\r\nHost: internal:8000\r\n"
                     b"X-Forwarded-For: 203.0.113.7, 127.0.0.1\r\nX-Forwarded-Proto: https\r\n"
                     b"X-Forwarded-Host: example.com\r\n\r\n")
DUMP = {"wsgi": b"/environ", "asgi": b"/scope"}


def seen(server, interface: str) -> tuple[str, str, str]:
    """(client address, scheme, host) as the app saw them."""
    data = json.loads(exchange(server, FORWARDED_REQUEST % DUMP[interface]).body)
    if interface == "wsgi":
        return data["REMOTE_ADDR"], data["wsgi.url_scheme"], data["HTTP_HOST"]
    host = [value for name, value in data["headers"] if name == "host"]
    return data["client"][0], data["scheme"], host[-1]


def test_trusted_proxy_headers_are_believed(start_server, interface):
    server = start_server(APP_OF[interface], "-w", "1")  # default: 127.0.0.1 is trusted
    assert seen(server, interface) == ("203.0.113.7", "https", "example.com")


def test_untrusted_proxy_headers_are_ignored(start_server, interface):
    server = start_server(APP_OF[interface], "-w", "1", "--forwarded-allow-ips", "10.0.0.0/8")
    assert seen(server, interface) == ("127.0.0.1", "http", "internal:8000")


def test_bad_forwarded_allow_ips_is_refused():
    result = subprocess.run(forkserve_command() + ["--forwarded-allow-ips", "10.0.0.0/99"],
                            cwd=APPS, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "'10.0.0.0/99' is not an address, a network, 'unix' or '*'" in result.stderr


TRUST_LOCAL = TrustedProxies("127.0.0.1,10.0.0.0/8,unix")


@pytest.mark.parametrize(("headers", "expected"), [
    ([(b"x-forwarded-for", b"198.51.100.1")], Forwarded("198.51.100.1", None, None, None)),
    # The rightmost address that is not a trusted proxy is the client.
    ([(b"x-forwarded-for", b"6.6.6.6, 198.51.100.1, 10.1.2.3")],
     Forwarded("198.51.100.1", None, None, None)),
    ([(b"x-forwarded-for", b"10.0.0.5, 10.0.0.6")], Forwarded("10.0.0.5", None, None, None)),
    ([(b"x-forwarded-for", b"garbage")], Forwarded(None, None, None, None)),
    ([(b"x-forwarded-proto", b"HTTPS")], Forwarded(None, None, "https", None)),
    ([(b"x-forwarded-proto", b"gopher")], Forwarded(None, None, None, None)),
    ([(b"forwarded", b'for="[2001:db8::1]:4711";proto=https;host=example.org')],
     Forwarded("2001:db8::1", 4711, "https", "example.org")),
    ([(b"forwarded", b"for=192.0.2.60;proto=http, for=10.0.0.1"),
      (b"x-forwarded-for", b"6.6.6.6")], Forwarded("192.0.2.60", None, None, None)),
    ([(b"forwarded", b"for=unknown")], Forwarded(None, None, None, None)),
])
def test_forwarded_parsing(headers, expected):
    assert forwarded(headers, TRUST_LOCAL) == expected


def test_trusted_proxies_spec():
    assert TRUST_LOCAL.trusts("10.9.8.7") and TRUST_LOCAL.trusts(None)
    assert not TRUST_LOCAL.trusts("192.0.2.1")
    assert TrustedProxies("*").trusts("192.0.2.1")
    assert not TrustedProxies("127.0.0.1").trusts(None)  # unix sockets only with 'unix'
    assert TRUST_LOCAL.trusts("::ffff:10.1.2.3")  # an IPv4 peer of a dual-stack [::] socket
    assert not TRUST_LOCAL.trusts("::ffff:192.0.2.1")
    with pytest.raises(ConfigError):
        TrustedProxies("not-an-ip")
