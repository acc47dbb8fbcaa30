"""The command line: errors are one clear line and a documented exit status."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from conftest import APPS, exchange, forkserve_command


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(forkserve_command() + list(args), cwd=APPS, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["-w", "0"], "argument -w/--workers: expected 'auto' or a whole number >= 1"),
        (["-w", "many"], "argument -w/--workers"),
        (["--threads", "0"], "argument --threads: expected 'auto' or a whole number >= 1"),
        (["--threads", "many"], "argument --threads: expected 'auto' or a whole number"),
        (["--timeout", "-1"], "argument -t/--timeout"),
        (["--log-level", "loud"], "argument --log-level: expected one of"),
        (["--chdir", "/no/such/dir"], "no such directory"),
        (["--access-log-format", "%(h"], "bad access log format"),
        (["-b", "127.0.0.1:99999"], "port must be a number from 0 to 65535"),
        (["-b", "::1:80"], "write IPv6 addresses as [ADDR]:PORT"),
        (["-b", "[::1"], "expected [IPv6]:PORT"),
        (["-b", "unix:"], "unix: needs a path"),
        (["-b", "fd://x"], "fd:// needs a file descriptor"),
        (["-b", "fd://99"], "cannot use fd://99"),
        (["-b", "no-such-host.invalid:80"], "cannot bind no-such-host.invalid:80"),
        (["no_such_module:app"], "no module named 'no_such_module'"),
        (["bad spec!"], "bad app 'bad spec!'"),
        (["--error-logfile", "/no/such/dir/log"], "cannot open log file"),
        (["--control-socket", "wsgiapp:app"], "'wsgiapp:app' looks like the app, not a path: put "
         "the app first, or write --control-socket=PATH"),
        (["--control-socket", "/proc/no/control.sock"], "--control-socket /proc/no/control.sock:"),
        (["--metrics-bind", "unix:/tmp/m.sock"], "argument --metrics-bind: expected HOST:PORT"),
        (["--health-path", "healthz"], "argument --health-path: expected a path such as /healthz"),
        (["--reload-include", "src/*.py"], "argument --reload-include: expected a file name "
         "pattern"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("forkserve: error: ")
    assert message in lines[0]


def test_address_in_use_is_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("-b", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert result.stderr == (
        f"forkserve: error: cannot bind 127.0.0.1:{port}: address already in use\n")


def test_missing_attribute_stops_master_with_exit_2():
    result = run("wsgiapp:nope", "-b", "127.0.0.1:0", "-w", "2")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1  # reported once, not once per worker
    assert "module 'wsgiapp' has no attribute 'nope'" in errors[0]
    assert "Traceback" not in result.stderr


def test_app_raising_at_import_stops_master_with_exit_3_and_one_traceback():
    result = run("broken:app", "-b", "127.0.0.1:0", "-w", "2")
    assert result.returncode == 3
    assert result.stderr.count("Traceback (most recent call last)") == 1
    assert "RuntimeError: broken on purpose" in result.stderr
    assert "failed to boot" in result.stderr


def test_worker_class_that_cannot_serve_the_app_is_refused():
    result = run("asgiapp:app", "-k", "sync", "-b", "127.0.0.1:0", "-w", "1")
    assert result.returncode == 2
    assert "-k sync cannot serve an ASGI 3 app (use -k asgi or --interface)" in result.stderr


def test_help_lists_every_setting():
    from forkserve.settings import SETTINGS
    result = run("--help")
    assert result.returncode == 0
    for setting in SETTINGS:
        for flag in setting.flags:
            assert flag in result.stdout


def test_default_app_is_the_demo(start_server):
    server = start_server("-w", "1")
    response = exchange(server, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert response.status == 200
    assert b"forkserve" in response.body and b"worker pid" in response.body


def test_access_log(start_server):
    server = start_server("wsgiapp:app", "-w", "1", "--access-logfile", "-",
                          "--access-log-format", '%(h)s "%(r)s" %(s)s %(b)s %({x-test}i)s')
    exchange(server, b"GET /hello?x=1 HTTP/1.1\r\nHost: t\r\nX-Test: tagged\r\n\r\n")
    server.wait_for(r'^127\.0\.0\.1 "GET /hello\?x=1 HTTP/1\.1" 200 13 tagged$')


def test_error_logfile(start_server, tmp_path):
    fifo = tmp_path / "error.log"
    os.mkfifo(fifo)  # a file the test can block on: each line arrives as an event
    server = start_server("wsgiapp:app", "-w", "1", "--error-logfile", str(fifo), ready=False)
    with open(fifo) as log:
        lines = []
        for line in log:
            lines.append(line)
            if "ready:" in line:
                break
    assert any("listening at http://127.0.0.1:" in line for line in lines)
    assert "ready:" not in server.log  # nothing went to stderr


_IMPORTED = """
import sys
started = set(sys.modules)  # (a .pth hook may import anything)
import forkserve.cli, forkserve.master
from forkserve.http import connection_factory
print(sorted(m for m in {modules} if m in sys.modules and m not in started))
connection_factory({parser!r})
print(sorted(m for m in {modules} if m in sys.modules and m not in started))
"""


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_the_master_imports_no_more_than_it_serves_with(parser):
    """A start imports what every server needs; what only some do (h11 unless it is the
    parser, wsproto until a worker upgrades a connection, the TOML parser without a file to
    read) cost each start about 50 ms and 3 MiB that every worker was charged a share of
    (PSS)."""
    lazy = ("h11", "wsproto", "tomllib", "tomli", "forkserve.websocket")
    script = _IMPORTED.format(modules=lazy, parser=parser)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30, check=True).stdout.splitlines()
    assert out == ["[]", "['h11']" if parser == "h11" else "[]"]
