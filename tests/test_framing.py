"""Strict HTTP/1.1 framing (RFC 9112 §2-7): every ambiguous request is refused with its status
and the connection closed, and what follows it is never read as another request. Each case
runs against both interfaces (WSGI sync worker, ASGI asyncio worker) and both parsers."""

from __future__ import annotations

import pytest
from conftest import Reader, closed_by_peer, exchange

from forkserve.http import Limits, new_connection
from forkserve.http.base import (
    CLOSED,
    END_OF_MESSAGE,
    NEED_DATA,
    PAUSED,
    Data,
    ProtocolError,
    Request,
    valid_host,
)
from forkserve.http.chunked import ChunkedFraming

pytestmark = pytest.mark.both_parsers

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
    # RFC 9112 §7.1.1: BWS only before ";" and around "=": not after a size alone.
    ("chunk-size-space", CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-size-tab", CHUNKED + b"5\t\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-ext-bws-no-name", CHUNKED + b"5 ; \r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-ext-bws-after-ext", CHUNKED + b"5;a=b \r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-ext-space-in-name", CHUNKED + b"5;a b=c\r\nhello\r\n0\r\n\r\n", 400),
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
    # RFC 9112 §2.3: HTTP-version = HTTP-name "/" DIGIT "." DIGIT
    ("http-1.10", b"GET /hello HTTP/1.10\r\nHost: t\r\n\r\n", 400),
    # RFC 9110 §2.5: only a higher minor version of 1.x is served (as 1.1); other majors: 505.
    ("http-0.9-version", b"GET /hello HTTP/0.9\r\nHost: t\r\n\r\n", 505),
    ("http-2.0", b"GET /hello HTTP/2.0\r\nHost: t\r\n\r\n", 505),
    ("http-3.0", b"GET /hello HTTP/3.0\r\nHost: t\r\n\r\n", 505),
    # RFC 9112 §2.2: empty lines before a request line are ignored, up to the request-line
    # limit's worth; a bare CR is no line end.
    ("too-many-empty-lines", b"\r\n" * 4096 + SMUGGLED, 400),
    ("bare-cr-before-request", b"\rGET /hello HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("cr-cr-lf-before-request", b"\r\r\nGET /hello HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    # RFC 9112 §3.2.2 / RFC 3986 §3.2: an absolute-form target's authority is a host and port.
    ("absolute-not-an-ip-literal", b"GET http://[foo]/hello HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("absolute-port-out-of-range", b"GET http://h:99999/hello HTTP/1.1\r\nHost: t\r\n\r\n",
     400),
    ("absolute-port-not-digits", b"GET http://h:x/hello HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("absolute-two-ports", b"GET http://h:1:2/hello HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("absolute-space", b"GET http://h h/hello HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("absolute-bad-percent", b"GET http://h%zz/hello HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    # RFC 9110 §4.2.4: userinfo in an http(s) URI is an error; §4.2.1: so is an empty host.
    ("absolute-userinfo", b"GET http://user@h/hello HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("absolute-userinfo-password", b"GET http://u:p@h/hello HTTP/1.1\r\nHost: t\r\n\r\n",
     400),
    ("absolute-empty-host", b"GET http:///hello HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("absolute-empty-host-port", b"GET https://:80/hello HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("no-host", b"GET /hello HTTP/1.1\r\n\r\n", 400),
    ("two-hosts", b"GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("host-with-space", b"GET /hello HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("host-with-slash", b"GET /hello HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    # RFC 9110 §7.2: Host = uri-host [ ":" port ], as in a target's authority.
    ("host-not-an-ip-literal", b"GET /hello HTTP/1.1\r\nHost: [fff]\r\n\r\n", 400),
    ("host-port-out-of-range", b"GET /hello HTTP/1.1\r\nHost: t:65536\r\n\r\n", 400),
    ("host-userinfo", b"GET /hello HTTP/1.1\r\nHost: u@t\r\n\r\n", 400),
    ("body-too-large", b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\n\r\n", 413),
    ("chunked-body-too-large", b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
     b"\r\n\r\n" + b"3e8\r\n" + b"x" * 1000 + b"\r\n" + b"3e8\r\n" + b"x" * 1000 + b"\r\n", 413),
]


@pytest.fixture
def strict_server(shared_server, interface):
    from conftest import APP_OF
    return shared_server(APP_OF[interface], "-w", "1", "--limit-request-body", "1500")


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


ACCEPTED = [
    ("te-case-insensitive",
     b"GET /hello HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n"),
    ("empty-host", b"GET /hello HTTP/1.1\r\nHost:\r\n\r\n"),  # RFC 9110 §7.2
    ("ipv6-host", b"GET /hello HTTP/1.1\r\nHost: [::1]:8000\r\n\r\n"),
    ("host-highest-port", b"GET /hello HTTP/1.1\r\nHost: t:65535\r\n\r\n"),
    ("tab-in-value", b"GET /hello HTTP/1.1\r\nHost: t\r\nX: tab\there\r\n\r\n"),
    ("body-at-limit",
     b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1500\r\n\r\n" + b"x" * 1500),
    ("chunk-extensions-and-trailer",
     CHUNKED + b"5;name=value;q=\"a \\\"b\\\"\" ; x\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n"),
    # RFC 9112 §7.1.1: chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
    ("chunk-ext-bws-before-semicolon", CHUNKED + b"5 ;a=b\r\nhello\r\n0\r\n\r\n"),
    ("chunk-ext-bws-everywhere",
     CHUNKED + b"5 \t; a = b\t;\tc\t=\t\"d\"\r\nhello\r\n0 ;e\r\n\r\n"),
    # RFC 9110 §2.5: a higher minor version of HTTP/1 is served as HTTP/1.1.
    ("http-1.2", b"GET /hello HTTP/1.2\r\nHost: t\r\n\r\n"),
    ("http-1.9", b"GET /hello HTTP/1.9\r\nHost: t\r\n\r\n"),
    # RFC 9112 §2.2: empty lines before a request line are ignored (a bare LF ends a line,
    # as it does in a head).
    ("empty-line-before-request", b"\r\nGET /hello HTTP/1.1\r\nHost: t\r\n\r\n"),
    ("empty-lines-before-request", b"\r\n\n\r\nGET /hello HTTP/1.1\r\nHost: t\r\n\r\n"),
    ("empty-lines-at-the-limit", b"\r\n" * 4095 + b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n"),
    # RFC 9112 §3.2.2: absolute-form, with an RFC 3986 authority.
    ("absolute-form", b"GET http://h/hello HTTP/1.1\r\nHost: t\r\n\r\n"),
    ("absolute-form-no-path", b"GET http://h HTTP/1.1\r\nHost: t\r\n\r\n"),
    ("absolute-form-port-query", b"GET http://h:8080/hello?q HTTP/1.1\r\nHost: t\r\n\r\n"),
    ("absolute-form-ipv6", b"GET http://[::1]:80/hello HTTP/1.1\r\nHost: t\r\n\r\n"),
    ("absolute-form-ipv4", b"GET http://127.0.0.1/hello HTTP/1.1\r\nHost: t\r\n\r\n"),
    ("absolute-form-https-percent",
     b"GET https://a%2Db.example/hello HTTP/1.1\r\nHost: t\r\n\r\n"),
]


@pytest.mark.parametrize("raw", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted(strict_server, raw):
    assert exchange(strict_server, raw).status == 200


def test_chunk_extensions_with_white_space_are_ignored(strict_server):
    """RFC 9112 §7.1.1: BWS around ";" and "=" is allowed, and the extensions are ignored."""
    response = exchange(strict_server, CHUNKED + b"5 ;a=b\r\nhello\r\n6\t; c = \"d\"\r\n world"
                        b"\r\n0 ;e\r\nX-Sum: 1\r\n\r\n")
    assert response.status == 200 and response.body == b"hello world"


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


# -- the sans-I/O connection itself: every split of the bytes, and the edges of the rules -------

def events(parser: str, pieces: list[bytes], limits: Limits | None = None) -> list:
    """What a connection makes of `pieces` then the client's close: requests as
    (target, version), bodies whole; each request answered once its body is read."""
    conn = new_connection(limits or Limits(), parser)
    seen: list = []
    body = b""
    for piece in [*pieces, b""]:
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if type(event) is Request:
                seen.append((event.target, event.http_version))
            elif type(event) is Data:
                body += event.data
            elif event is END_OF_MESSAGE:
                seen.append(body)
                body = b""
                conn.send_response(200, b"OK", [(b"Content-Length", b"0")])
                conn.send_end()
                assert conn.start_next_cycle()
            elif event is CLOSED:
                return seen + [CLOSED]
            else:
                assert event in (NEED_DATA, PAUSED)
                break
    return seen


PIPELINE = (b"\r\n\nGET /a HTTP/1.2\r\nHost: h\r\n\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5 ;x=y\r\nhello\r\n1\t; z = \"q\"\r\n!\r\n0 ;end\r\nX-T: 1\r\n\r\n\n"
            b"POST /c HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc\r\n")
PIPELINE_EVENTS = [(b"/a", b"1.1"), b"", (b"/b", b"1.1"), b"hello!", (b"/c", b"1.1"), b"abc",
                   CLOSED]


def test_new_rules_hold_for_every_split(parser):
    """Empty lines before request lines, BWS in chunk extensions and HTTP/1.2, with the bytes
    cut at every point (a CRLF across reads, a chunk line across reads)."""
    assert events(parser, [PIPELINE]) == PIPELINE_EVENTS
    for cut in range(1, len(PIPELINE)):
        assert events(parser, [PIPELINE[:cut], PIPELINE[cut:]]) == PIPELINE_EVENTS, cut
    assert events(parser, [bytes([byte]) for byte in PIPELINE]) == PIPELINE_EVENTS


def test_empty_lines_are_bounded_by_the_request_line_limit(parser):
    limits = Limits(request_line=100)
    request = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    assert events(parser, [b"\r\n" * 50, request], limits) == [(b"/", b"1.1"), b"", CLOSED]
    with pytest.raises(ProtocolError) as refused:
        events(parser, [b"\r\n" * 50, b"\n"], limits)  # 101 bytes, before any request line
    assert refused.value.status == 400
    # The count starts again with each request.
    assert events(parser, [b"\n" * 100 + request + b"\n" * 100 + request], limits) == [
        (b"/", b"1.1"), b"", (b"/", b"1.1"), b"", CLOSED]


def test_closing_after_empty_lines_or_in_a_head(parser):
    assert events(parser, [b"\r\n\r\n"]) == [CLOSED]
    conn = new_connection(Limits(), parser)
    conn.receive_data(b"\r\n")
    conn.receive_data(b"")  # before the empty line was looked at
    assert conn.next_event() is CLOSED
    with pytest.raises(ProtocolError) as refused:
        events(parser, [b"\r\nGET / HT"])
    assert refused.value.status == 400


def test_bytes_past_an_upgrade_request_are_handed_on(parser):
    conn = new_connection(Limits(), parser)
    conn.receive_data(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
                      b"Upgrade: websocket\r\n\r\n\x81\x80frame")
    assert type(conn.next_event()) is Request
    assert conn.trailing_data() == b"\x81\x80frame"


def test_the_same_response_is_framed_for_each_request(parser):
    """One response (status and fields alike) to requests that differ in what the response
    head must say: keep-alive or close, HTTP/1.0 with and without keep-alive, HEAD. Each head
    is composed for its request, however many identical ones came before."""
    fields = [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5")]
    cases = [  # (request, says Connection: close, says keep-alive, body follows, closes)
        (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", False, False, True, False),
        (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", True, False, True, True),
        # (as h11, --http h11 closes every HTTP/1.0 connection)
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", parser == "h11",
         parser != "h11", True, parser == "h11"),
        (b"GET / HTTP/1.0\r\n\r\n", True, False, True, True),
        (b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n", False, False, False, False),
        (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", False, False, True, False),
    ]
    for _ in range(2):
        for raw, close, keep_alive, body, closes in cases:
            conn = new_connection(Limits(), parser)
            conn.receive_data(raw)
            assert type(conn.next_event()) is Request
            assert conn.next_event() is END_OF_MESSAGE
            head = conn.send_response(200, b"OK", fields).lower()
            out = conn.send_data(b"hello") + conn.send_end()
            assert (b"connection: close" in head, b"connection: keep-alive" in head,
                    out == b"hello", conn.will_close()) == (close, keep_alive, body, closes), raw


def counting_parses(conn) -> list[bytes]:
    """The heads `conn` will parse from now on (not those taken from what was parsed
    before)."""
    parsed: list[bytes] = []
    parse = conn._parse_head

    def counted(head):
        parsed.append(bytes(head))
        return parse(head)

    conn._parse_head = counted
    return parsed


def test_a_head_seen_before_is_checked_again_under_other_limits_and_gets_its_own_fields(
        parser):
    """Heads already parsed are remembered by their bytes (http/connection.py): the same
    bytes under the same limits and parser give an equal Request with fields of its own,
    unparsed; under other limits, or by the other parser, they are parsed and checked
    again."""
    raw = b"GET /a?b HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n"
    limits = Limits()
    requests = []
    parses = 0
    for _ in range(3):
        conn = new_connection(limits, parser)
        parsed = counting_parses(conn)
        conn.receive_data(raw)
        requests.append(conn.next_event())
        parses += len(parsed)
        assert conn.next_event() is END_OF_MESSAGE
        assert b"hello" in conn.send_response(200, b"OK", [(b"Content-Length", b"5")]) \
            + conn.send_data(b"hello") + conn.send_end()
        assert conn.start_next_cycle()
        # (as ASGI middleware may change scope["headers"]; the next request must not see it)
        requests[-1].headers.append((b"x-b", b"2"))
    assert parses == 1
    for request in requests:
        assert (request.method, request.target, request.http_version, request.headers) == (
            b"GET", b"/a?b", b"1.1", [(b"host", b"h"), (b"x-a", b"1"), (b"x-b", b"2")])
    other = new_connection(limits, "h11" if parser == "httptools" else "httptools")
    parsed = counting_parses(other)
    other.receive_data(raw)
    assert type(other.next_event()) is Request and len(parsed) == 1
    strict = new_connection(Limits(header_count=1), parser)
    strict.receive_data(raw)
    with pytest.raises(ProtocolError) as refused:
        strict.next_event()
    assert refused.value.status == 431


def test_heads_with_credentials_are_not_remembered(parser):
    """A head with a Cookie or Authorization field is parsed each time: its secret is not
    kept in memory after its request, nor can another client time whether it was sent."""
    limits = Limits()
    for field in (b"Cookie: s=1", b"Authorization: Bearer t", b"Proxy-Authorization: B t",
                  b"COOKIE: s=1", b"AUTHORIZATION: Bearer t"):
        raw = b"GET / HTTP/1.1\r\nHost: h\r\n" + field + b"\r\n\r\n"
        for _ in range(2):
            conn = new_connection(limits, parser)
            parsed = counting_parses(conn)
            conn.receive_data(raw)
            assert type(conn.next_event()) is Request and len(parsed) == 1, field


@pytest.mark.parametrize(("value", "valid"), [
    (b"", True), (b"h", True), (b"h:", True), (b"h:0", True), (b"h:00080", True),
    (b"h:65535", True), (b":80", True), (b"[::1]", True), (b"[::ffff:1.2.3.4]:443", True),
    (b"a%2Db", True), (b"127.0.0.1:8000", True), (b"[v1.fe:x]", False),
    (b"h:65536", False), (b"h:" + b"9" * 5000, False), (b"h:x", False), (b"h:1:2", False),
    (b"[foo]", False), (b"[::1", False), (b"[1.2.3.4]", False), (b"[fe80::1%25eth0]", False),
    (b"u@h", False), (b"h h", False), (b"a%zz", False), (b"a/b", False),
])
def test_valid_host(value, valid):
    """RFC 9110 §7.2 / RFC 3986 §3.2.2-3.2.3, for Host and a target's authority."""
    assert valid_host(value) is valid
