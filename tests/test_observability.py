"""Seeing a running server: --health-path."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import APP_OF, Reader, exchange

HEALTH = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.mark.parametrize("interface", sorted(APP_OF))
def test_the_health_path_is_answered_without_the_app(start_server, interface):
    server = start_server(APP_OF[interface], "-w", "2", "--health-path", "/healthz")
    response = exchange(server, HEALTH)
    assert (response.status, response.body) == (200, b"ok\n")  # the app would say 404
    assert response.header("Cache-Control") == "no-store"
    assert exchange(server, b"GET /healthz?probe=1 HTTP/1.1\r\nHost: t\r\n\r\n").body == b"ok\n"
    head = exchange(server, b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n", head_request=True)
    assert (head.status, head.body, head.header("Content-Length")) == (200, b"", "3")
    post = exchange(server, b"POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    assert (post.status, post.header("Allow")) == (405, "GET, HEAD")
    assert exchange(server, b"GET /healthz/more HTTP/1.1\r\nHost: t\r\n\r\n").status == 404
    assert exchange(server, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n").status == 200
    with server.connect() as sock:  # keep-alive: probes on one connection
        reader = Reader(sock)
        for _ in range(3):
            sock.sendall(HEALTH)
            response = reader.response()
            assert response.status == 200 and response.header("Connection") is None


def test_without_a_health_path_the_app_answers_it(start_server):
    server = start_server("wsgiapp:app", "-w", "1")
    assert exchange(server, HEALTH).status == 404


def test_the_health_path_says_503_once_the_server_stops(start_server):
    server = start_server("wsgiapp:app", "-w", "2", "--threads", "2",
                          "--health-path", "/healthz")
    with server.connect() as probe, server.connect() as busy:
        probe_reader = Reader(probe)
        probe.sendall(HEALTH)
        assert probe_reader.response().status == 200
        busy.sendall(b"GET /sleep?s=2&tag=busy HTTP/1.1\r\nHost: t\r\n\r\n")
        server.wait_for("SLEEPING busy")  # keeps the stop graceful for a while
        os.kill(server.pid, signal.SIGTERM)
        server.wait_for("SIGTERM: graceful stop")
        probe.sendall(HEALTH)  # (an idle connection may bring one more request)
        response = probe_reader.response()
        assert (response.status, response.body) == (503, b"stopping\n")
        assert response.header("Connection") == "close"
        assert Reader(busy).response().status == 200
    assert server.wait_exit() == 0


def test_the_health_path_stays_200_while_a_reload_replaces_the_workers(start_server):
    server = start_server("wsgiapp:app", "-w", "2", "--health-path", "/healthz")
    with server.connect() as probe:
        reader = Reader(probe)
        probe.sendall(HEALTH)
        assert reader.response().status == 200
        mark = server.mark()
        os.kill(server.pid, signal.SIGHUP)
        server.wait_for("HUP: reloading", start=mark)
        # The probe's worker is told to stop once its replacement booted; until it closes
        # the connection, each probe is answered, the one after its stop began with
        # Connection: close.
        while True:
            probe.sendall(HEALTH)
            response = reader.response()
            assert (response.status, response.body) == (200, b"ok\n")
            if response.header("Connection") == "close":
                break
    server.wait_for(r"replaced 2 workers", start=mark)
    assert exchange(server, HEALTH).status == 200
