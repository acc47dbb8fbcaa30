"""Fixtures that run the real `forkserve` command and talk to it over real sockets."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

APPS = Path(__file__).parent / "apps"

if os.geteuid() == 0:
    # The suite runs as root in CI; forkserve refuses that without --user unless allowed.
    # Every forkserve started by a test inherits this (tests of the refusal remove it).
    os.environ["FORKSERVE_ALLOW_ROOT"] = "1"
READY = re.compile(r"\] ready: \d+ workers")

# The HTTP parsers behind forkserve.http.base.HTTPConnection. Tests marked `both_parsers` (the
# HTTP behaviour modules) run once on each; the rest run on the default.
PARSERS = ("h11", "httptools")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "both_parsers: run on each of PARSERS (the `parser` "
                                       "fixture, and --http for the servers started)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (`start_server` shows the servers' logs
    when the test failed)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


def pytest_generate_tests(metafunc) -> None:
    if metafunc.definition.get_closest_marker("both_parsers") and "parser" in \
            metafunc.fixturenames:
        metafunc.parametrize("parser", PARSERS, indirect=True)


@pytest.fixture
def parser(request) -> str | None:
    """The HTTP parser of this test (--http of the servers it starts), or None: the default."""
    return getattr(request, "param", None)
LISTENING = re.compile(r"listening at (\S+)")


def forkserve_command() -> list[str]:
    """The installed console script next to this Python, else `python -m forkserve`."""
    script = Path(sys.executable).parent / "forkserve"
    if script.exists():
        return [str(script)]
    found = shutil.which("forkserve")
    return [found] if found else [sys.executable, "-m", "forkserve"]


class Server:
    """A running `forkserve` process (in its own session) and what it logged; `command`
    runs another server the same way (a peer, for comparisons)."""

    def __init__(self, args: list[str], cwd: Path = APPS, env: dict | None = None,
                 preexec_fn: Callable[[], None] | None = None,
                 command: list[str] | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        self.args = args
        self.lines: list[str] = []
        self._cond = threading.Condition()
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        for key, value in (env or {}).items():  # None removes a variable
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        self.proc = subprocess.Popen(
            (command or forkserve_command()) + args,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec_fn,
            pass_fds=pass_fds,
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = ""
        self.port = 0
        # Where this test's part of the log begins: a server shared by a module's tests
        # (shared_server) moves it at each test, so that wait_for and log see only its lines.
        self.base = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def log(self) -> str:
        """What it logged since `base`."""
        with self._cond:
            return "\n".join(self.lines[self.base:])

    def wait_for(self, pattern: str | re.Pattern, timeout: float = 15.0,
                 start: int | None = None) -> re.Match:
        """Block until a log line (from index `start`, else `base`) matches `pattern`; return
        the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = self.base if start is None else start
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no log line matched {regex.pattern!r} in {timeout} s; log:\n{self.log}"
                    )
                self._cond.wait(remaining)

    def wait_for_count(self, pattern: str, count: int, start: int | None = None,
                       timeout: float = 15.0) -> None:
        """Block until `count` log lines from index `start` (else `base`) match `pattern`."""
        regex = re.compile(pattern)
        start = self.base if start is None else start
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(1 for line in self.lines[start:] if regex.search(line)) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._reader.is_alive():
                    raise AssertionError(f"fewer than {count} lines matched {pattern!r}; "
                                         f"log:\n{self.log}")
                self._cond.wait(remaining)

    def mark(self) -> int:
        """An index into the log, to wait for lines logged after this point."""
        with self._cond:
            return len(self.lines)

    def wait_ready(self) -> Server:
        match = self.wait_for(LISTENING)
        self.url = match.group(1)
        if self.url.startswith(("http://", "https://")):
            self.port = int(self.url.rsplit(":", 1)[1])
        self.wait_for(READY)
        return self

    def wait_exit(self, timeout: float = 15.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def workers(self) -> list[int]:
        """Pids of the master's live child processes."""
        return children(self.pid)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def stop(self) -> None:
        """SIGTERM, then SIGKILL the whole process group; nothing is left running."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.stdout:
            self._reader.join(5)
            self.proc.stdout.close()


def _processes() -> Iterator[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgid) of every process, from /proc/PID/stat."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        state, ppid, pgid = stat[stat.rindex(")") + 2:].split()[:3]
        yield int(entry), state, int(ppid), int(pgid)


def children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (zombies excluded)."""
    return sorted(p for p, state, ppid, _ in _processes() if ppid == pid and state != "Z")


def group_members(pgid: int) -> list[int]:
    """Live pids in process group `pgid`."""
    return [p for p, state, _, group in _processes() if group == pgid and state != "Z"]


def rss_mib(pid: int) -> float:
    """Process `pid`'s resident memory in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _argv(args: tuple[str, ...], parser: str | None) -> list[str]:
    """A test's server arguments: on 127.0.0.1:0 unless -b is given, --http `parser` when the
    test runs on each parser."""
    argv = list(args)
    if "-b" not in argv and "--bind" not in argv:
        argv += ["-b", "127.0.0.1:0"]
    if parser is not None:
        argv += ["--http", parser]
    return argv


def _show_logs(request: pytest.FixtureRequest, servers: list[Server]) -> None:
    """Add what each server logged (since its `base`) to the report of a failed test."""
    failed = getattr(request.node, "report_call", None)
    if failed is not None and failed.failed:
        for server in servers:
            failed.sections.append((f"forkserve {' '.join(server.args)} (exit status "
                                    f"{server.proc.returncode})", server.log))


@pytest.fixture
def start_server(parser, request) -> Iterator[Callable[..., Server]]:
    """Start forkserve with the given arguments (see _argv). A failed test's report shows
    what each server logged, and how it exited."""
    servers: list[Server] = []

    def start(*args: str, ready: bool = True, **kwargs) -> Server:
        server = Server(_argv(args, parser), **kwargs)
        servers.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in servers:
        server.stop()
    _show_logs(request, servers)


@pytest.fixture(scope="module")
def _server_pool() -> Iterator[dict[tuple[str, ...], Server]]:
    """The servers of shared_server, by command line; stopped when the module is done."""
    pool: dict[tuple[str, ...], Server] = {}
    yield pool
    for server in pool.values():
        server.stop()


@pytest.fixture
def shared_server(parser, request, _server_pool) -> Iterator[Callable[..., Server]]:
    """start_server for tests that leave the server as they found it (they change no setting
    and stop nothing; a worker they make exit is replaced by the master): the module's tests
    asking for one command line share one server, started for the first of them (about 0.2 s
    saved per test). Each test sees the log from its own start (Server.base). A server found
    no longer running is started again."""
    used: list[Server] = []

    def start(*args: str) -> Server:
        argv = _argv(args, parser)
        server = _server_pool.get(tuple(argv))
        if server is None or server.proc.poll() is not None:
            if server is not None:
                server.stop()
            server = _server_pool[tuple(argv)] = Server(argv).wait_ready()
        server.base = server.mark()
        used.append(server)
        return server

    yield start
    _show_logs(request, used)


@pytest.fixture
def public_apps() -> Iterator[Path]:
    """A folder every user can read holding a copy of importmark.py: the checkout (and so
    tests/apps) may sit in a private folder (mode 0700, as root's home or `mktemp -d`) that a
    worker running as nobody cannot read."""
    folder = Path(tempfile.mkdtemp(prefix="forkserve-public-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        shutil.copy(APPS / "importmark.py", folder)
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.fixture(params=["1", "4"], ids=["inline", "threads"])
def wsgi_server(shared_server, request) -> Server:
    """The validating test app, 2 workers; each test runs with the app called in the loop
    (--threads 1) and in a pool of threads (--threads 4), whose writes go through the loop."""
    return shared_server("wsgiapp:app", "-w", "2", "--threads", request.param)


# The same routes as a WSGI app (sync worker) and as an ASGI app (asyncio worker).
APP_OF = {"wsgi": "wsgiapp:app", "asgi": "asgiapp:app"}


@pytest.fixture(params=sorted(APP_OF))
def interface(request) -> str:
    return request.param


@pytest.fixture
def http_server(shared_server, interface) -> Server:
    """The test app of `interface`, 2 workers; `.interface` says which."""
    server = shared_server(APP_OF[interface], "-w", "2")
    server.interface = interface
    return server


# -- a minimal HTTP/1.1 response reader, to check what is on the wire -------------------------

class Response:
    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes,
                 raw_head: bytes, chunked: bool) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.raw_head = raw_head
        self.chunked = chunked

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers} {self.body[:80]!r}>"


class Reader:
    """Reads HTTP responses off a socket, one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _more(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            if not self._more():
                raise EOFError(f"connection closed before {marker!r}; got {self.buffer!r}")
        head, self.buffer = self.buffer.split(marker, 1)
        return head + marker

    def read_exact(self, n: int) -> bytes:
        # (Pieces joined once: a large body read in small pieces, as a small receive buffer
        # gives them, would be copied again for every piece.)
        pieces, have = [self.buffer], len(self.buffer)
        while have < n:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"connection closed after {have} of {n} bytes")
            pieces.append(data)
            have += len(data)
        joined = b"".join(pieces)
        data, self.buffer = joined[:n], joined[n:]
        return data

    def read_to_eof(self) -> bytes:
        pieces = [self.buffer]
        while data := self.sock.recv(65536):
            pieces.append(data)
        self.buffer = b""
        return b"".join(pieces)

    def response(self, head_request: bool = False) -> Response:
        raw_head = self.read_until(b"\r\n\r\n")
        lines = raw_head[:-4].decode("latin-1").split("\r\n")
        _, status, reason = (lines[0].split(" ", 2) + [""])[:3]
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
        response = Response(int(status), reason, headers, b"", raw_head, False)
        code = int(status)
        if head_request or code in (204, 304) or 100 <= code < 200:
            return response
        length = response.header("content-length")
        if response.header("transfer-encoding") == "chunked":
            response.chunked = True
            body = b""
            while True:
                size = int(self.read_until(b"\r\n")[:-2].split(b";")[0], 16)
                if size == 0:
                    self.read_until(b"\r\n")
                    break
                body += self.read_exact(size)
                self.read_exact(2)
            response.body = body
        elif length is not None:
            response.body = self.read_exact(int(length))
        else:
            response.body = self.read_to_eof()
        return response


def exchange(server: Server, raw: bytes, head_request: bool = False) -> Response:
    """Send raw bytes on a new connection and read one response."""
    with server.connect() as sock:
        sock.sendall(raw)
        return Reader(sock).response(head_request)


def served_only_after_the_busy(waiting: socket.socket, busy: list[socket.socket]) -> None:
    """`waiting`, whose request is sent, gets nothing for 0.5 s while the requests of `busy`
    run, then its 200 once one of them ended; then each of `busy` gets its 200."""
    waiting.settimeout(0.5)
    with pytest.raises(TimeoutError):
        waiting.recv(1)
    waiting.settimeout(10)
    assert Reader(waiting).response().status == 200
    for sock in busy:
        assert Reader(sock).response().status == 200


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True if the server closes `sock` (EOF or reset) within `timeout`, reading what is left."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


class LoadClient:
    """Concurrent clients sending requests until stopped, counting every failure.

    Half the threads open a new connection per request; the other half keep connections
    alive, reconnecting when the server said Connection: close or closed an idle connection
    (checked before reuse, as urllib3 does). Bounded by `max_seconds`.
    """

    def __init__(self, server: Server, threads: int = 4, path: bytes = b"/pid",
                 max_seconds: float = 30.0) -> None:
        self.server = server
        self.path = path
        self.max_seconds = max_seconds
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.errors: list[str] = []
        self.pids: set[int] = set()
        self.threads = [threading.Thread(target=self._run, args=(i % 2 == 1,), daemon=True)
                        for i in range(threads)]

    def __enter__(self) -> LoadClient:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(15)

    def wait_for_requests(self, count: int, timeout: float = 15.0) -> None:
        """Block until `count` more requests succeeded."""
        with self.lock:
            target = self.ok + count
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if self.ok >= target:
                    return
            assert time.monotonic() < deadline, f"load stalled; errors: {self.errors[:5]}"
            time.sleep(0.01)  # progress of other threads: nothing to block on here

    def _run(self, keep_alive: bool) -> None:
        request = b"GET %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (
            self.path, b"" if keep_alive else b"Connection: close\r\n")
        deadline = time.monotonic() + self.max_seconds
        sock = None
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                if sock is None or _dropped(sock):
                    if sock is not None:
                        sock.close()
                    sock = self.server.connect()
                sock.sendall(request)
                response = Reader(sock).response()
                if response.status != 200:
                    raise AssertionError(f"status {response.status}")
                with self.lock:
                    self.ok += 1
                    self.pids.add(int(response.body))
                if not keep_alive or response.header("connection") == "close":
                    sock.close()
                    sock = None
            except Exception as exc:  # every failure is recorded, none is retried
                with self.lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()


def _dropped(sock: socket.socket) -> bool:
    """Has the server closed this idle connection? (EOF waiting to be read.)"""
    # (Not recv(MSG_DONTWAIT) on the socket as it is: with a timeout, Python first waits for
    # it to become readable, up to the timeout: 10 s for every keep-alive request.)
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)


def wait_in_file(path, pattern: re.Pattern, timeout: float = 15.0) -> None:
    """Follow a log file until a line matches (the file is the only event source here)."""
    deadline = time.monotonic() + timeout
    while True:
        if path.exists() and pattern.search(path.read_text()):
            return
        assert time.monotonic() < deadline, f"{pattern.pattern!r} never appeared in {path}"
        time.sleep(0.02)
