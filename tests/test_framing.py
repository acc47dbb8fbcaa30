"""Strict HTTP/1.1 framing (RFC 9112 §2-7): every ambiguous request is refused with its status
and the connection closed, and what follows it is never read as another request. Each case
runs against both interfaces (WSGI sync worker, ASGI asyncio worker)."""

from __future__ import annotations

import pytest
from conftest import Reader, closed_by_peer, exchange

from forkserve.http.base import ProtocolError
from forkserve.http.chunked import ChunkedFraming

# A request smuggled behind a refused one: if the server ever answered it, a second
# response would follow the error.
SMUGGLED = b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n"

CHUNKED = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"

CASES = [
    # (id, raw request, status)
    ("cl-and-te", b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-and-cl", b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Length: 4\r\n\r\n0\r\n\r\n", 400),
    ("two-content-lengths", b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
     b"Content-Length: 3\r\n\r\nabc", 400),
    ("content-length-list", b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3, 3\r\n\r\nabc",
     400),
    ("content-length-sign", b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\nabc",
     400),
    ("content-length-word", b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: three\r\n\r\n",
     400),
    ("te-gzip", b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ("te-chunked-not-last", b"POST /echo HTTP/1.1\r\nHost: t\r\n"
     b"Transfer-Encoding: chunked, gzip\r\n\r\n", 501),
    ("te-in-http10", b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("bad-chunk-size", b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"zz\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-without-crlf", b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
     b"\r\n3\r\nabcX0\r\n\r\n", 400),
    ("bad-trailer", b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\nBad Trailer\r\n\r\n", 400),
    # h11 takes all of these; the strict chunked-framing follower does not.
    ("chunk-ext-nul", CHUNKED + b"5;a=\x00b\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-ext-bare-cr", CHUNKED + b"5;a\rb\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-ext-empty", CHUNKED + b"5;\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-size-space", CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-size-17-digits", CHUNKED + b"10000000000000005\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-size-2^63", CHUNKED + b"8000000000000000\r\nhello\r\n0\r\n\r\n", 400),
    ("trailer-control", CHUNKED + b"5\r\nhello\r\n0\r\nX-T: \x01\r\n\r\n", 400),
    ("trailers-end-bare-lf", CHUNKED + b"5\r\nhello\r\n0\r\n\n", 400),
    ("bare-cr", b"GET /hello HTTP/1.1\r\nHost: t\rX: y\r\n\r\n", 400),
    ("obs-fold", b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Folded: a\r\n b\r\n\r\n", 400),
    ("space-before-colon", b"GET /hello HTTP/1.1\r\nHost : t\r\n\r\n", 400),
    ("control-in-value", b"GET /hello HTTP/1.1\r\nHost: t\r\nX: a\x01b\r\n\r\n", 400),
    ("control-in-name", b"GET /hello HTTP/1.1\r\nHost: t\r\nX\x7f: b\r\n\r\n", 400),
    ("nul-in-target", b"GET /\x00 HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("bad-method", b"G(T /hello HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("relative-target", b"GET hello HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("star-target-for-get", b"GET * HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("fragment-in-target", b"GET http://t/a#b HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("http-0.9", b"GET /hello\r\n\r\n", 400),
    ("bad-version-syntax", b"GET /hello HTTP/3\r\nHost: t\r\n\r\n", 400),
    ("http-1.2", b"GET /hello HTTP/1.2\r\nHost: t\r\n\r\n", 505),
    ("http-2.0", b"GET /hello HTTP/2.0\r\nHost: t\r\n\r\n", 505),
    ("no-host", b"GET /hello HTTP/1.1\r\n\r\n", 400),
    ("two-hosts", b"GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("host-with-space", b"GET /hello HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("host-with-slash", b"GET /hello HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    ("body-too-large", b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\n\r\n", 413),
    ("chunked-body-too-large", b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
     b"\r\n\r\n" + b"3e8\r\n" + b"x" * 1000 + b"\r\n" + b"3e8\r\n" + b"x" * 1000 + b"\r\n", 413),
]


@pytest.fixture
def strict_server(start_server, interface):
    from conftest import APP_OF
    return start_server(APP_OF[interface], "-w", "1", "--limit-request-body", "1500")


@pytest.mark.parametrize(("raw", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_with_status_and_closed(strict_server, raw, status):
    with strict_server.connect() as sock:
        sock.sendall(raw + SMUGGLED)
        reader = Reader(sock)
        response = reader.response()
        assert response.status == status, response
        assert response.header("connection") == "close"
        assert closed_by_peer(sock)
        assert b"HTTP/1.1 200" not in reader.buffer  # the smuggled request was not answered
    assert exchange(strict_server, SMUGGLED).status == 200  # and the server goes on


@pytest.mark.parametrize("raw", [
    b"GET /hello HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost:\r\n\r\n",  # empty Host: allowed (RFC 9110 §7.2)
    b"GET /hello HTTP/1.1\r\nHost: [::1]:8000\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost: t\r\nX: tab\there\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1500\r\n\r\n" + b"x" * 1500,
    CHUNKED + b"5;name=value;q=\"a \\\"b\\\"\" ; x\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n",
], ids=["te-case-insensitive", "empty-host", "ipv6-host", "tab-in-value", "body-at-limit",
        "chunk-extensions-and-trailer"])
def test_accepted(strict_server, raw):
    assert exchange(strict_server, raw).status == 200


VALID_CHUNKED_BODY = (b"5;name=value;q=\"quoted\"\r\nhello\r\n1\r\n!\r\n0\r\nX-Sum: 1\r\n\r\n")


def test_chunked_framing_follows_a_body_split_anywhere():
    for split in range(len(VALID_CHUNKED_BODY)):
        framing = ChunkedFraming(max_trailers=1024)
        framing.feed(VALID_CHUNKED_BODY[:split])
        assert not framing.done
        framing.feed(VALID_CHUNKED_BODY[split:] + b"GET / HTTP/1.1\r\n")  # past the end
        assert framing.done


def test_chunked_framing_limits():
    largest = ChunkedFraming(max_trailers=1024)
    largest.feed(b"7fffffffffffffff\r\n" + b"x" * 100)  # the largest size is fine
    with pytest.raises(ProtocolError) as refused:
        ChunkedFraming(max_trailers=1024).feed(b"1;" + b"a" * 5000)
    assert refused.value.status == 400
    with pytest.raises(ProtocolError) as refused:
        ChunkedFraming(max_trailers=64).feed(b"0\r\n" + b"X-T: y\r\n" * 20)
    assert refused.value.status == 431
    announced = ChunkedFraming(max_trailers=64, max_body=1500)
    announced.feed(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
    with pytest.raises(ProtocolError) as refused:
        announced.feed(b"3e8\r\n")  # before any of its data
    assert refused.value.status == 413
