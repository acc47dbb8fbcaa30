"""loadtests/fuzz_server.py in brief: a short run against each test app keeps every invariant,
and the checker does fail a server that answers what it should refuse."""

from __future__ import annotations

import importlib.util
import re
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "loadtests" / "fuzz_server.py"

def fuzz(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--seed", "7", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("app", ["wsgi", "asgi"])
def test_a_short_run_keeps_every_invariant(app):
    result = fuzz("--app", app, "--duration", "3", "--batch", "40", timeout=18)
    assert result.returncode == 0, result.stdout + result.stderr
    exchanges = re.search(r"summary: (\d+) exchanges", result.stdout)
    assert exchanges and int(exchanges.group(1)) >= 40, result.stdout


class AnswersEveryHead(socketserver.BaseRequestHandler):
    """A 200 for every request head, whatever the framing says: malformed requests are
    answered, and the bodies that look like requests too (desync)."""

    def handle(self) -> None:
        self.request.settimeout(0.3)
        buffered = b""
        try:
            while data := self.request.recv(65536):
                buffered += data
                while b"\r\n\r\n" in buffered:
                    buffered = buffered.split(b"\r\n\r\n", 1)[1]
                    self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except OSError:
            pass


@pytest.mark.timeout(20)
def test_a_server_that_answers_malformed_requests_fails_the_run():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), AnswersEveryHead)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        result = fuzz("--target", address, "--duration", "1", "--batch", "30", timeout=18)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FINDING accepted-malformed" in result.stdout
    assert "FINDING wrong-answer" in result.stdout


def _load_fuzz_server():
    spec = importlib.util.spec_from_file_location("fuzz_server", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_server"] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_the_judge_excuses_only_a_half_closed_clients_stream_ended_by_its_eof():
    """README documents it: a half-closed client's stream may end when its EOF is read after
    the stream began. Anything near it stays a finding."""
    fz = _load_fuzz_server()
    pid = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n123"
    stream = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\npiece 0\n\r\n"
    answers = (fz.Answer(None), fz.Answer(fz.STREAM_BODY))

    def verdict(received, ending=fz.HALF_CLOSE, end=fz.EOF, owed=answers):
        sent = b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\nGET /stream HTTP/1.1\r\nHost: t\r\n\r\nG"
        case = fz.Case("1.1", f"cut:{ending}", sent, (), ending, fz.Expect(owed, open_end=True))
        return fz.judge(case, fz.Transcript(received, end, 0, 0.1))

    excused = verdict(pid + stream)
    assert excused.cut_stream and excused.findings == []
    closing = pid.replace(b"OK\r\n", b"OK\r\nConnection: close\r\n")
    for near in (verdict(pid + stream, owed=(fz.Answer(None), fz.Answer(b"Hello"))),
                 verdict(pid[:-1] + stream),  # the answer before it cut
                 verdict(pid + stream, end=fz.SILENT),  # not closed: the stream hangs
                 verdict(pid),  # the stream never began
                 verdict(pid + b"HTTP/1.1 2"),  # nor its head
                 verdict(pid + stream.replace(b"200 OK", b"500 Internal Server Error")),
                 verdict(pid + b"HTTP/1.1 200 OK\r\nContent-Length: 24\r\n\r\npiece"),
                 verdict(closing + stream)):  # a response after the close
        assert not near.cut_stream and near.findings, near
