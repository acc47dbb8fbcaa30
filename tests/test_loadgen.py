"""loadtests/loadgen.py against a real forkserve: it counts what was served and every error;
against small recording servers: fresh connections are closed, pipelined batches go out whole."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(15)

LOADGEN = Path(__file__).resolve().parents[1] / "loadtests" / "loadgen.py"
HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nHello, World!"

# The loads, by the options that make them.
MODES = {"keep-alive": (), "fresh": ("--fresh",), "pipelined": ("--pipeline", "4")}


def loadgen(url: str, seconds: float, expect: bytes | None = None,
            mode: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]]:
    """Run loadgen.py with 4 connections in 2 processes and the options `mode` of MODES; its
    exit status and JSON result."""
    cmd = [sys.executable, str(LOADGEN), url, "-c", "4", "-p", "2", "-d", str(seconds),
           "--timeout", "2", "--json", *mode]
    if expect is not None:
        cmd += ["--expect-body-file", "-"]
    done = subprocess.run(cmd, input=expect or b"", capture_output=True, timeout=seconds + 10)
    return done.returncode, json.loads(done.stdout)


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES)
@pytest.mark.parametrize(("path", "expect"), [("/hello", b"Hello, World!"),
                                              ("/stream?n=4", None)])  # chunked
def test_counts_requests_and_no_errors(wsgi_server, path, expect, mode):
    status, result = loadgen(f"http://127.0.0.1:{wsgi_server.port}{path}", 1.5, expect, mode)
    assert status == 0, result
    assert result["requests"] > 50
    assert result["rps"] == pytest.approx(result["requests"] / 1.5)
    assert not any(result["errors"].values()), result
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert result["fresh"] is (mode == MODES["fresh"])
    assert result["depth"] == (4 if mode == MODES["pipelined"] else 1)
    # Written in the window, less those still in flight at its end; more answered, of those
    # written before it began.
    assert result["sent"] - 4 * result["depth"] <= result["requests"], result
    assert result["reconnects"] == 0  # forkserve keeps connections open unless asked to close
    assert result["unanswered"] == 0


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES)
@pytest.mark.parametrize(("path", "expect", "kind"), [("/pid", b"Hello, World!", "body"),
                                                      ("/no-such-page", None, "status")])
def test_wrong_answers_are_errors(wsgi_server, path, expect, kind, mode):
    status, result = loadgen(f"http://127.0.0.1:{wsgi_server.port}{path}", 0.5, expect, mode)
    assert status == 1
    assert result["errors"][kind] > 0
    assert result["requests"] == 0
    assert result["first_error"].startswith(kind)


def test_closed_port_is_connect_errors():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        status, result = loadgen(f"http://127.0.0.1:{port}/", 0.5)
    assert status == 1
    assert result["errors"]["connect"] > 0
    assert result["requests"] == 0


class OneShotHandler(socketserver.BaseRequestHandler):
    """Reads one request head and answers it without closing (nor saying Connection: close);
    then notes what else arrives before the client closes: nothing, from a fresh-mode client."""

    server: Recorder

    def handle(self) -> None:
        self.request.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            data += chunk
        head, _, after = data.partition(b"\r\n\r\n")
        with self.server.lock:
            self.server.heads.append(head)
        self.request.sendall(HELLO)
        try:
            while chunk := self.request.recv(4096):
                after += chunk
        except TimeoutError:
            after += b"<no close>"
        except OSError:
            pass  # a reset is a close too: the run ended before this answer was read
        with self.server.lock:
            self.server.after.append(after)


class BatchHandler(socketserver.BaseRequestHandler):
    """Notes how many request heads each read brings, and answers them all in one write; or,
    with the server's `last` set, answers only the first request, with that last line of head,
    and closes."""

    server: Recorder

    def handle(self) -> None:
        self.request.settimeout(5)
        while data := self.request.recv(65536):
            heads = data.count(b"\r\n\r\n")
            with self.server.lock:
                self.server.reads.append(heads)
            if self.server.last is not None:
                self.request.sendall(HELLO.replace(b"\r\n\r\n", self.server.last + b"\r\n\r\n"))
                return
            self.request.sendall(HELLO * heads)


class Recorder(socketserver.ThreadingTCPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, handler: type[socketserver.BaseRequestHandler],
                 last: bytes | None = None) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.lock = threading.Lock()
        self.last = last
        self.heads: list[bytes] = []  # the request head of each connection
        self.after: list[bytes] = []  # what came on each connection the client closed
        self.reads: list[int] = []  # request heads in each read

    def counts(self) -> tuple[int, int]:
        """Connections that sent a request, and of those the ones the client has closed."""
        with self.lock:
            return len(self.heads), len(self.after)


@contextlib.contextmanager
def serving(handler: type[socketserver.BaseRequestHandler],
            last: bytes | None = None) -> Iterator[Recorder]:
    server = Recorder(handler, last)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    with serving(OneShotHandler) as server:
        yield server


def test_fresh_sends_one_request_per_connection_and_closes_it(recorder, tmp_path):
    # The server never closes and never says Connection: close: the client must close.
    url = f"http://127.0.0.1:{recorder.server_address[1]}/"
    expect = tmp_path / "body"
    expect.write_bytes(b"Hello, World!")
    cmd = [sys.executable, str(LOADGEN), url, "-c", "4", "-d", "1", "--timeout", "2", "--json",
           "--fresh", "--expect-body-file", str(expect)]
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) as proc:
        time.sleep(0.8)  # inside the measured second
        opened, closed = recorder.counts()
        out = proc.communicate(timeout=10)[0]
    result = json.loads(out)
    assert proc.returncode == 0, result
    assert result["requests"] > 50
    assert opened > 50
    assert opened - closed < max(20, opened // 4), (opened, closed)  # closed as it went
    with recorder.lock:
        heads, after = list(recorder.heads), list(recorder.after)
    assert len(heads) >= result["requests"]
    assert all(b"\r\nconnection: close" in head.lower() for head in heads), heads[:3]
    assert not any(after), [extra for extra in after if extra][:3]


def test_pipeline_writes_each_batch_at_once_and_waits_for_its_answers():
    with serving(BatchHandler) as server:
        status, result = loadgen(f"http://127.0.0.1:{server.server_address[1]}/", 1,
                                 b"Hello, World!", ("--pipeline", "8"))
        with server.lock:
            reads = list(server.reads)
    assert status == 0, result
    assert result["requests"] > 50
    assert result["depth"] == 8
    assert not any(result["errors"].values()), result
    # Each batch arrives in one read (the loopback keeps a small write whole), and none before
    # the last one is answered.
    assert sum(reads) >= result["requests"]
    assert set(reads) == {8}, sorted(set(reads))


@pytest.mark.parametrize(("last", "error"), [(b"\r\nConnection: close", None),
                                             (b"", "read")], ids=["says-close", "silent"])
def test_a_server_that_answers_one_request_of_a_batch_and_closes(last, error):
    """Saying Connection: close, it may leave the rest unanswered (no error: gunicorn's sync
    worker does); closing without saying so fails the requests it dropped."""
    with serving(BatchHandler, last) as server:
        status, result = loadgen(f"http://127.0.0.1:{server.server_address[1]}/", 1,
                                 b"Hello, World!", ("--pipeline", "8"))
    errors = {kind: n for kind, n in result["errors"].items() if n}
    if error is None:
        assert status == 0, result
        assert not errors, result
        assert result["reconnects"] >= result["requests"] > 20
        assert result["unanswered"] == 7 * result["reconnects"]
    else:
        assert status == 1, result
        assert set(errors) == {error}, result
        assert "unanswered" in result["first_error"]
