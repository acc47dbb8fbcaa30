"""WebSocket through the ASGI worker, with a real client (websockets) and raw frames."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import struct

import pytest
from conftest import Reader, exchange

websockets = pytest.importorskip("websockets")
pytest.importorskip("wsproto")


def url(server, path: str) -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


@pytest.fixture
def ws_server(start_server):
    return start_server("asgiapp:app", "-w", "1")


def test_echo_text_and_bytes_with_subprotocol_headers_and_compression(ws_server):
    async def talk():
        async with websockets.connect(url(ws_server, "/ws/echo"),
                                      subprotocols=["chat", "other"]) as ws:
            assert ws.subprotocol == "chat"
            assert ws.response.headers["x-accepted-by"] == str(ws_server.workers()[0])
            assert "permessage-deflate" in ws.response.headers["sec-websocket-extensions"]
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send(b"\x00\x01binary")
            assert await ws.recv() == b"\x00\x01binary"
            big = "x" * 300_000  # fragmented and compressed on the way
            await ws.send(big)
            assert await ws.recv() == big

    run(talk())


def test_rejected_before_accept_is_403(ws_server):
    async def talk():
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(url(ws_server, "/ws/reject")):
                pass
        assert info.value.response.status_code == 403

    run(talk())


def test_denial_response(ws_server):
    async def talk():
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(url(ws_server, "/ws/deny")):
                pass
        assert info.value.response.status_code == 418
        assert info.value.response.body == b"no sockets for you"

    run(talk())


def test_close_codes(ws_server):
    async def talk():
        async with websockets.connect(url(ws_server, "/ws/close")) as ws:
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "bye")
        async with websockets.connect(url(ws_server, "/ws/error")) as ws:
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1011

    run(talk())
    ws_server.wait_for("RuntimeError: deliberate WebSocket failure")


def test_system_exit_in_a_websocket_app_closes_it_with_1011(ws_server):
    (worker,) = ws_server.workers()

    async def talk():
        async with websockets.connect(url(ws_server, "/ws/exit")) as ws:
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1011

    run(talk())
    ws_server.wait_for("SystemExit: 4")
    assert exchange(ws_server, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n").status == 200
    assert ws_server.workers() == [worker]  # the worker serves on


def test_client_close_reaches_the_app(ws_server):
    async def talk():
        async with websockets.connect(url(ws_server, "/ws/wait")) as ws:
            await ws.close(code=1000)

    run(talk())
    ws_server.wait_for("WS DISCONNECT 1000")


def test_oversize_message_closes_with_1009(start_server):
    server = start_server("asgiapp:app", "-w", "1", "--ws-max-size", "1000")

    async def talk():
        async with websockets.connect(url(server, "/ws/echo"), compression=None) as ws:
            await ws.send("small")
            assert await ws.recv() == "small"
            await ws.send("x" * 2000)
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1009

    run(talk())


def test_graceful_stop_closes_open_websockets_with_1012(start_server):
    server = start_server("asgiapp:app", "-w", "1", "--graceful-timeout", "2")

    async def talk():
        async with websockets.connect(url(server, "/ws/echo")) as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            os.kill(server.pid, signal.SIGTERM)
            await ws.send("during the grace period")
            assert await ws.recv() == "during the grace period"
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1012

    run(talk())
    assert server.wait_exit() == 0


def test_answered_pings_keep_the_socket_open(start_server):
    server = start_server("asgiapp:app", "-w", "1", "--ws-ping-interval", "0.2",
                          "--ws-ping-timeout", "0.5")

    async def talk():
        async with websockets.connect(url(server, "/ws/echo")) as ws:
            for i in range(5):  # about 1.5 s: several pings, each answered by the client
                await asyncio.sleep(0.3)
                await ws.send(str(i))
                assert await ws.recv() == str(i)

    run(talk())


def test_unanswered_pings_close_with_1011(start_server):
    server = start_server("asgiapp:app", "-w", "1", "--ws-ping-interval", "0.2",
                          "--ws-ping-timeout", "0.3")
    with server.connect() as sock:
        key = base64.b64encode(os.urandom(16))
        sock.sendall(b"GET /ws/echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: " + key + b"\r\n\r\n")
        reader = Reader(sock)
        assert reader.response(head_request=True).status == 101
        opcodes = []
        while True:  # a client that never answers: read frames until the close
            first, length = reader.read_exact(2)
            payload = reader.read_exact(length & 0x7F)
            opcodes.append(first & 0x0F)
            if first & 0x0F == 0x8:
                assert struct.unpack("!H", payload[:2])[0] == 1011
                break
    assert opcodes[0] == 0x9  # a ping came first


def test_upgrade_without_wsproto_is_refused_clearly(start_server, tmp_path):
    (tmp_path / "wsproto.py").write_text("raise ModuleNotFoundError('hidden by the test')\n")
    server = start_server("asgiapp:app", "-w", "1", env={"PYTHONPATH": str(tmp_path)})
    request = (b"GET /ws/echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade"
               b"\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
               b"\r\n\r\n")
    for _ in range(2):
        response = exchange(server, request)
        assert response.status == 501
        assert b"WebSocket support is not installed" in response.body
    server.wait_for("wsproto is not installed")
    assert server.log.count("wsproto is not installed") == 1
    assert exchange(server, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n").status == 200


def test_the_same_handshake_again_is_a_handshake_again(ws_server):
    """A request head seen before is answered from what was parsed of it (begin_known), but
    not one proposing a protocol switch: a client sending the same handshake again (its key
    too) gets a WebSocket again, not an HTTP request."""
    handshake = (b"GET /ws/echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    for _ in range(3):
        with ws_server.connect() as sock:
            sock.sendall(handshake)
            assert Reader(sock).response(head_request=True).status == 101


def test_an_upgrade_pipelined_behind_requests_is_answered_after_them(ws_server):
    """Responses to pipelined requests are held to go out in one write; an upgrade request
    behind them starts no HTTP request: what is held goes out, then the handshake."""
    with ws_server.connect() as sock:
        sock.settimeout(5)
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n" * 2
                     + b"GET /ws/echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        reader = Reader(sock)
        for _ in range(2):
            assert reader.response().body == b"Hello, World!"
        assert reader.response(head_request=True).status == 101
