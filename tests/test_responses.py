"""What an app sends back is checked before it reaches the wire, on both interfaces: no header
injection, no invalid names, one framing header at most."""

from __future__ import annotations

import json

import pytest
from conftest import exchange

pytestmark = pytest.mark.timeout(30)


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
], ids=["crlf-in-value", "lf-in-value", "nul-in-value", "space-in-name", "colon-in-name",
        "empty-name", "conflicting-lengths", "negative-length", "unknown-coding"])
def test_invalid_response_heads_become_500(http_server, headers):
    response = respond_with(http_server, headers)
    assert response.status == 500, response
    assert response.header("set-cookie") is None
    assert b"hello" not in response.body
    http_server.wait_for(r"error handling POST /respond-with")


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
