"""loadtests/loadgen.py against a real forkserve: it counts what was served and every error."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(15)

LOADGEN = Path(__file__).resolve().parents[1] / "loadtests" / "loadgen.py"


def loadgen(url: str, seconds: float, expect: bytes | None = None) -> tuple[int, dict[str, Any]]:
    """Run loadgen.py with 4 connections in 2 processes; its exit status and JSON result."""
    cmd = [sys.executable, str(LOADGEN), url, "-c", "4", "-p", "2", "-d", str(seconds),
           "--timeout", "2", "--json"]
    if expect is not None:
        cmd += ["--expect-body-file", "-"]
    done = subprocess.run(cmd, input=expect or b"", capture_output=True, timeout=seconds + 10)
    return done.returncode, json.loads(done.stdout)


@pytest.mark.parametrize(("path", "expect"), [("/hello", b"Hello, World!"),
                                              ("/stream?n=4", None)])  # chunked
def test_counts_requests_and_no_errors(wsgi_server, path, expect):
    status, result = loadgen(f"http://127.0.0.1:{wsgi_server.port}{path}", 1.5, expect)
    assert status == 0, result
    assert result["requests"] > 50
    assert result["rps"] == pytest.approx(result["requests"] / 1.5)
    assert not any(result["errors"].values()), result
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]


@pytest.mark.parametrize(("path", "expect", "kind"), [("/pid", b"Hello, World!", "body"),
                                                      ("/no-such-page", None, "status")])
def test_wrong_answers_are_errors(wsgi_server, path, expect, kind):
    status, result = loadgen(f"http://127.0.0.1:{wsgi_server.port}{path}", 0.5, expect)
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
