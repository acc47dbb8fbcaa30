"""What an app sends back is checked before it reaches the wire, on both interfaces: no header
injection, no invalid names, one framing header at most."""

from __future__ import annotations

import json
from http.cookies import SimpleCookie

import pytest
from conftest import exchange

from forkserve.http import Limits, new_connection
from forkserve.http.base import Request

pytestmark = [pytest.mark.timeout(30), pytest.mark.both_parsers]


def respond_with(server, headers: list[list[str]]):
    body = json.dumps(headers).encode()
    return exchange(server, b"POST /respond-with HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n"
                    b"\r\n%s" % (len(body), body))


@pytest.mark.parametrize("headers", [
    [["X-Injected", "a\r\nSet-Cookie: evil=1"]],
    [["X-Injected", "a\nSet-Cookie: evil=1"]],
    [["X-Nul", "a\x00b"]],
    [["Bad Name", "v"]],
    [["Bad:Name", "v"]],
    [["", "v"]],
    [["Content-Length", "5"], ["Content-Length", "6"]],
    [["Content-Length", "-5"]],
    [["Transfer-Encoding", "gzip"]],
    [["X-Injected", " a\r\nSet-Cookie: evil=1 "]],
    [["X-Injected", "a\r\n"]],
    [["X-Nul", "\ta\x00b "]],
    [["Content-Length", " 5"], ["Content-Length", "6 "]],
    [["X-Control", "a\x01b"]],
    [["X-Control", "a\x7f"]],
    [["Content-Length", "\u0665"]],
], ids=["crlf-in-value", "lf-in-value", "nul-in-value", "space-in-name", "colon-in-name",
        "empty-name", "conflicting-lengths", "negative-length", "unknown-coding",
        "crlf-in-padded-value", "crlf-ending-value", "nul-in-padded-value",
        "conflicting-padded-lengths", "control-byte-in-value", "del-in-value",
        "non-ascii-digit-length"])
def test_invalid_response_heads_become_500(http_server, headers):
    response = respond_with(http_server, headers)
    assert response.status == 500, response
    assert response.header("set-cookie") is None
    assert b"hello" not in response.body
    http_server.wait_for(r"error handling POST /respond-with")


def test_a_padded_content_length_frames_the_body(http_server):
    response = respond_with(http_server, [["Content-Length", " 5 "]])
    assert response.status == 200 and response.body == b"hello"
    assert response.header("content-length") == "5"


@pytest.mark.parametrize("headers, framing", [
    ([["Content-Length", "5"], ["Transfer-Encoding", "chunked"]], "transfer-encoding"),
    ([["Transfer-Encoding", "chunked"], ["Content-Length", "5"]], "transfer-encoding"),
    ([["Content-Length", "5"], ["Content-Length", "5"]], "content-length"),
], ids=["cl-then-te", "te-then-cl", "repeated-length"])
def test_one_framing_header_goes_out(http_server, headers, framing):
    response = respond_with(http_server, headers)
    assert response.status == 200 and response.body == b"hello"
    names = [name.lower() for name, _ in response.headers]
    assert names.count(framing) == 1
    assert {"content-length", "transfer-encoding"} & set(names) == {framing}


def test_white_space_around_values_is_trimmed(http_server):
    """RFC 9110 §5.5: white space around a field value is not part of it. Django's WSGI
    handler sends Set-Cookie values starting with a space; they go out without it."""
    cookie = SimpleCookie()
    cookie["session"] = "abc"
    cookie["session"]["httponly"] = True
    cookie["session"]["path"] = "/"
    django_value = cookie.output(header="")  # as django.core.handlers.wsgi builds it
    assert django_value == " session=abc; HttpOnly; Path=/"
    response = respond_with(http_server, [
        ["Set-Cookie", django_value], ["X-Trailing", "v \t"], ["X-Both", "\t a  b \t"],
        ["X-Blank", " \t "], ["X-Plain", "kept"]])
    assert response.status == 200 and response.body == b"hello"
    for line in (b"Set-Cookie: session=abc; HttpOnly; Path=/", b"X-Trailing: v",
                 b"X-Both: a  b", b"X-Blank: ", b"X-Plain: kept"):
        assert b"\r\n" + line + b"\r\n" in response.raw_head


def test_trailer_values_are_trimmed_and_checked_too(parser):
    conn = new_connection(Limits(), parser)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert type(conn.next_event()) is Request
    head = conn.send_response(200, b"OK", [(b"Transfer-Encoding", b"chunked "),
                                           (b"Trailer", b" x-sum")])
    assert b"\r\nTrailer: x-sum\r\n" in head and b"\r\nTransfer-Encoding: chunked\r\n" in head
    assert conn.send_end([(b"X-Sum", b"\t1 ")]) == b"0\r\nX-Sum: 1\r\n\r\n"
    with pytest.raises(ValueError):
        conn.send_end([(b"X-Sum", b" 1\r\nX-Evil: 1 ")])
