"""PEP 3333 through the real server: environ, wsgi.input, start_response, close(), files."""

from __future__ import annotations

import json
import os
import socket

import pytest
from conftest import Reader, closed_by_peer, exchange

REQUIRED_KEYS = {
    "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_NAME",
    "SERVER_PORT", "SERVER_PROTOCOL", "wsgi.url_scheme", "wsgi.multithread",
    "wsgi.multiprocess", "wsgi.run_once", "REMOTE_ADDR", "RAW_URI", "REQUEST_URI",
    "wsgi.input_terminated",
}


def post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path, len(body), extra, body))


def environ_of(server, raw: bytes) -> dict:
    response = exchange(server, raw)
    assert response.status == 200, response.body
    return json.loads(response.body)


def test_environ_has_every_required_key(wsgi_server):
    env = environ_of(wsgi_server, b"GET /environ?a=1&b=%20 HTTP/1.1\r\nHost: example.org:81\r\n"
                                  b"Content-Type: text/x\r\nX-Multi: 1\r\nX-Multi: 2\r\n"
                                  b"Cookie: a=1\r\nCookie: b=2\r\n\r\n")
    assert env.keys() >= REQUIRED_KEYS
    assert env["REQUEST_METHOD"] == "GET"
    assert env["PATH_INFO"] == "/environ"
    assert env["QUERY_STRING"] == "a=1&b=%20"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["SERVER_NAME"] == "127.0.0.1"
    assert env["SERVER_PORT"] == str(wsgi_server.port)
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["HTTP_HOST"] == "example.org:81"
    assert env["CONTENT_TYPE"] == "text/x"
    assert "HTTP_CONTENT_TYPE" not in env
    assert env["HTTP_X_MULTI"] == "1,2"
    assert env["HTTP_COOKIE"] == "a=1; b=2"
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.multithread"] is (wsgi_server.args[wsgi_server.args.index("--threads") + 1]
                                       != "1")
    assert env["wsgi.multiprocess"] is True
    assert env["wsgi.version"] == [1, 0]


def test_path_is_percent_decoded_and_raw_uri_is_not(wsgi_server):
    env = environ_of(wsgi_server, b"GET /environ/%2Fa%20b%C3%A9?q=%2F HTTP/1.1\r\nHost: t\r\n\r\n")
    assert env["PATH_INFO"] == "/environ//a b\u00c3\u00a9"  # bytes decoded as latin-1 (PEP 3333)
    assert env["QUERY_STRING"] == "q=%2F"
    assert env["RAW_URI"] == env["REQUEST_URI"] == "/environ/%2Fa%20b%C3%A9?q=%2F"


def test_underscore_headers_are_dropped(wsgi_server):
    env = environ_of(wsgi_server, b"GET /environ HTTP/1.1\r\nHost: t\r\nX_Forwarded_For: 6.6.6.6"
                                  b"\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n")
    assert env["HTTP_X_FORWARDED_FOR"] == "1.2.3.4"


@pytest.mark.parametrize("size", [1, 7, 8192])
def test_read_in_pieces_never_returns_more_than_asked(wsgi_server, size):
    body = bytes(range(256)) * 100
    response = exchange(wsgi_server, post(b"/echo?size=%d" % size, body))
    assert response.body == body
    assert int(response.header("x-reads")) == -(-len(body) // size)


def test_read_stops_at_content_length(wsgi_server):
    # The bytes after the body belong to the next request and must not be read as body.
    with wsgi_server.connect() as sock:
        sock.sendall(post(b"/read-all", b"0123456789") + b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
        reader = Reader(sock)
        first = reader.response()
        assert first.body == b"0123456789"
        assert first.header("x-extra") == "0"
        assert reader.response().body == b"Hello, World!"


def test_large_body_streams_through(wsgi_server):
    body = os.urandom(3 * 1024 * 1024)
    with wsgi_server.connect() as sock:
        sock.sendall(b"POST /echo?size=65536 HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                     % len(body))
        sock.sendall(body)
        assert Reader(sock).response().body == body


@pytest.mark.parametrize("how", ["readline", "readlines", "iter"])
def test_line_reading(wsgi_server, how):
    body = b"one\ntwo\n\nthree"
    response = exchange(wsgi_server, post(b"/lines?how=" + how.encode(), body))
    assert json.loads(response.body) == ["one\n", "two\n", "\n", "three"]


def test_readline_with_size(wsgi_server):
    response = exchange(wsgi_server, post(b"/lines?how=readline-limit", b"abcdefgh\nij\n"))
    assert json.loads(response.body) == ["abcd", "efgh", "\n", "ij\n"]


def test_chunked_lines(wsgi_server):
    raw = (b"POST /lines?how=readline HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nab\n\r\n4\r\ncd\nx\r\n0\r\n\r\n")
    assert json.loads(exchange(wsgi_server, raw).body) == ["ab\n", "cd\n", "x"]


def test_write_callable(wsgi_server):
    response = exchange(wsgi_server, b"GET /write HTTP/1.1\r\nHost: t\r\n\r\n")
    assert response.body == b"written by write() and returned"


def test_exc_info_replaces_unsent_headers(wsgi_server):
    response = exchange(wsgi_server, b"GET /exc-info HTTP/1.1\r\nHost: t\r\n\r\n")
    assert response.status == 500
    assert response.body == b"handled by exc_info"


def test_start_response_twice_is_an_error(wsgi_server):
    response = exchange(wsgi_server, b"GET /twice HTTP/1.1\r\nHost: t\r\n\r\n")
    assert response.status == 500
    wsgi_server.wait_for("start_response\\(\\) called a second time")


def test_app_exception_is_500_with_traceback_and_worker_keeps_serving(wsgi_server):
    pids = set(wsgi_server.workers())
    response = exchange(wsgi_server, b"GET /fail HTTP/1.1\r\nHost: t\r\n\r\n")
    assert response.status == 500
    wsgi_server.wait_for(r"error handling GET /fail")
    wsgi_server.wait_for(r"RuntimeError: deliberate failure before start_response")
    assert "Traceback (most recent call last)" in wsgi_server.log
    for _ in range(4):
        assert exchange(wsgi_server, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n").status == 200
    assert set(wsgi_server.workers()) == pids


def test_exception_after_headers_closes_connection(wsgi_server):
    with wsgi_server.connect() as sock:
        sock.sendall(b"GET /fail-midway HTTP/1.1\r\nHost: t\r\n\r\n")
        reader = Reader(sock)
        head = reader.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding: chunked" in head.lower()
        rest = reader.read_to_eof()
        # The chunked body is cut off: no terminating zero-length chunk.
        assert b"first part" in rest
        assert not rest.endswith(b"0\r\n\r\n")
    wsgi_server.wait_for("deliberate failure after the headers")


@pytest.mark.parametrize("path", [b"/bad-header", b"/non-latin1"])
def test_invalid_response_headers_give_500(wsgi_server, path):
    response = exchange(wsgi_server, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
    assert response.status == 500
    assert response.header("set-cookie") is None
    assert response.header("x-name") is None


def test_a_header_value_that_is_not_a_str_is_named_in_the_error_log(wsgi_server):
    body = json.dumps([["X-List", ["not", "a", "str"]]]).encode()
    response = exchange(wsgi_server, post(b"/respond-with", body))
    assert response.status == 500
    wsgi_server.wait_for(r"TypeError: response header name and value must be str: "
                         r"\('X-List', \['not', 'a', 'str'\]\)")


def test_close_is_called(wsgi_server):
    response = exchange(wsgi_server, b"GET /marked?tag=normal HTTP/1.1\r\nHost: t\r\n\r\n")
    assert response.body == b"start\n"
    wsgi_server.wait_for("CLOSED normal")


def test_close_is_called_when_client_disconnects(wsgi_server):
    sock = wsgi_server.connect()
    sock.sendall(b"GET /marked?tag=gone&endless=1 HTTP/1.1\r\nHost: t\r\n\r\n")
    sock.recv(1000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # reset
    wsgi_server.wait_for("CLOSED gone")
    assert exchange(wsgi_server, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n").status == 200


def test_head_of_an_endless_body_stops_iterating_and_closes_it(wsgi_server):
    response = exchange(wsgi_server, b"HEAD /marked?tag=head&endless=1 HTTP/1.1\r\nHost: t\r\n\r\n",
                        head_request=True)
    assert response.status == 200
    wsgi_server.wait_for("CLOSED head")
    assert exchange(wsgi_server, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n").status == 200


@pytest.mark.parametrize("path", [b"/short-body", b"/body-on-204"])
def test_framing_errors_from_the_app_give_500(wsgi_server, path):
    response = exchange(wsgi_server, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
    assert response.status == 500
    wsgi_server.wait_for("error handling GET " + path.decode())


def test_failed_requests_reach_the_access_log(start_server):
    server = start_server("wsgiapp:app", "-w", "1", "--access-logfile", "-",
                          "--access-log-format", "ACCESS %(r)s %(s)s")
    assert exchange(server, b"GET /fail HTTP/1.1\r\nHost: t\r\n\r\n").status == 500
    server.wait_for(r"^ACCESS GET /fail HTTP/1\.1 500$")


def test_file_wrapper_sends_file(wsgi_server, tmp_path):
    data = os.urandom(1_000_000)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    target = b"/file?path=" + str(path).encode()
    response = exchange(wsgi_server, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % target)
    assert response.body == data
    assert response.header("content-length") == str(len(data))
    # With an offset and an explicit shorter length.
    response = exchange(wsgi_server, b"GET %s&offset=10&length=100 HTTP/1.1\r\nHost: t\r\n\r\n"
                        % target)
    assert response.body == data[10:110]
    # HTTP/1.0 and HEAD.
    with wsgi_server.connect() as sock:
        sock.sendall(b"GET %s HTTP/1.0\r\n\r\n" % target)
        assert Reader(sock).response().body == data
    head = exchange(wsgi_server, b"HEAD %s HTTP/1.1\r\nHost: t\r\n\r\n" % target, True)
    assert head.header("content-length") == str(len(data))


def test_factory_app(start_server):
    server = start_server("wsgiapp:create_app('made by factory')", "-w", "1")
    assert exchange(server, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").body == b"made by factory"


def test_threads_environ(start_server):
    server = start_server("wsgiapp:app", "-w", "1", "--threads", "3")
    env = environ_of(server, b"GET /environ HTTP/1.1\r\nHost: t\r\n\r\n")
    assert env["wsgi.multithread"] is True


def test_bad_chunked_body_gives_400(wsgi_server):
    with wsgi_server.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"zz\r\nabc\r\n")
        response = Reader(sock).response()
        assert response.status == 400
        assert closed_by_peer(sock)
