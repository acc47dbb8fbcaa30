"""Locust users for the load-test apps in ``loadtests/apps``; ``loadtests/run`` drives them.

One user class per tag of ``loadtests/run --tags``, named after it (``hello`` is
``HelloUser``), each on its own keep-alive session:

=============  ==============================================================================
HelloUser      ``GET /``: tiny responses
JsonUser       ``GET /json``: a few KB of JSON, compared with the document sent
UploadUser     ``POST /upload``: streamed bodies, chunked (a generator body) or with a length;
               the byte count, SHA-256 and framing the app reports must match what was sent
DownloadUser   ``GET /download?size=N`` (64 KiB to 4 MiB, streamed) or ``GET /file``
               (``wsgi.file_wrapper``), compared byte for byte
SlowUser       ``GET /slow?ms=N``, 50 to 300 ms
WsUser         ``/ws`` (ASGI app only): WebSocket echo, a new connection every
               ``WS_MESSAGES_PER_CONNECTION`` messages. Needs ``websocket-client``, which
               locust installs (python-socketio's client extra); without it the class is
               left out with a warning
MixedUser      all the HTTP requests above, weighted, on one session
HangUser       one user sending ``GET /hang`` every ``HANG_EVERY`` s while at least
               ``HANG_ROOM`` s of the run are left (time for a ``--timeout 2`` server to kill
               and replace the worker); named ``HANG_NAME``: it is meant to fail
=============  ==============================================================================

Every response is checked (status, body length and content); anything else is marked a
failure. A request that got no response at all (the connection was reset or closed), or was
still waiting for one ``STUCK_AFTER`` s or more when the run ended, is failed with
``LOST_ON_WORKER`` and the pid of the worker that served the previous response of that user
(from the apps' ``WORKER_HEADER``), so that the runner can tell requests lost with a worker it
killed from requests forkserve should have answered.

With ``--csv PREFIX``, the locustfile also writes, when locust quits, the final statistics in
locust's CSV format (``FINAL_CSV``: locust's own files are rewritten every second and miss the
end of the run) and, one per line, the completion time (``time.time()``) of every successful
request followed by the time the run ended (``COMPLETIONS``), for the runner's longest gap.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import gevent
from apps import (
    COMPLETIONS,
    DOCUMENT,
    FILE_SIZE,
    FINAL_CSV,
    HANG_NAME,
    HELLO,
    LOST_ON_WORKER,
    WORKER_HEADER,
    pattern,
)
from locust import HttpUser, User, between, constant, events
from locust.clients import ResponseContextManager
from locust.env import Environment
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

try:
    import websocket
except ImportError:
    websocket = None

REQUEST_TIMEOUT = 20.0  # seconds; a hung worker is killed well before
STUCK_AFTER = 2.0  # seconds; a request waiting this long when the run ends has failed
WAIT = between(0, 0.05)
UPLOAD_SIZES = (16 * 1024, 256 * 1024, 1024 * 1024)
UPLOAD_CHUNK = 50_000  # not a power of two, so chunks straddle the server's read sizes
DOWNLOAD_SIZES = (64 * 1024, 1024 * 1024, 4 * 1024 * 1024)
SLOW_MS = (50, 300)
WS_MESSAGES_PER_CONNECTION = 20
HANG_FIRST = 2.0  # seconds after the start, so the hang hits a server under full load
HANG_EVERY = 6.0
HANG_ROOM = 6.0

_PAYLOAD = random.randbytes(max(UPLOAD_SIZES))
_completions: list[float] = []  # time.time() of each successful request
_waiting: dict[int, tuple[str, str, float, str]] = {}  # id(user) -> type, name, since, worker
_started = 0.0  # time.time() at the start of the run


@lru_cache(maxsize=len(UPLOAD_SIZES))
def _payload_digest(size: int) -> str:
    return hashlib.sha256(_PAYLOAD[:size]).hexdigest()


def _pieces(size: int) -> Iterator[bytes]:
    for start in range(0, size, UPLOAD_CHUNK):
        yield _PAYLOAD[start:min(size, start + UPLOAD_CHUNK)]


def _lost(worker_pid: str, what: str) -> str:
    return f"{LOST_ON_WORKER} {worker_pid}: {what}"


@contextmanager
def _awaiting(user: Any, request_type: str, name: str) -> Iterator[None]:
    """Mark `user` as waiting for a response, for `_fail_stuck_requests`."""
    _waiting[id(user)] = (request_type, name, time.time(), user.worker_pid)
    try:
        yield
    finally:
        del _waiting[id(user)]


class LoadUser(HttpUser):
    """An HTTP user whose requests are all checked with `request()`."""

    abstract = True
    wait_time = WAIT

    def on_start(self) -> None:
        self.worker_pid = "unknown"  # of the previous response of this user

    def request(self, method: str, path: str, check: Callable[[Any], str | None],
                name: str | None = None, **kwargs: Any) -> None:
        """Send a request; a success needs status 200 and `check(response)` to return None
        (else it returns what is wrong)."""
        with _awaiting(self, method, name or path), self.client.request(
                method, path, name=name, catch_response=True, timeout=REQUEST_TIMEOUT,
                **kwargs) as response:
            self._judge(response, check)

    def _judge(self, response: ResponseContextManager,
               check: Callable[[Any], str | None]) -> None:
        if response.status_code == 0:  # no response: locust put the exception in .error
            response.failure(_lost(self.worker_pid, repr(response.error)))
            return
        self.worker_pid = response.headers.get(WORKER_HEADER, "unknown")
        problem = f"status {response.status_code}" if response.status_code != 200 else \
            check(response)
        if problem:
            response.failure(problem)
        else:
            response.success()


def _body_is(expected: bytes) -> Callable[[Any], str | None]:
    def check(response: Any) -> str | None:
        body = response.content
        if body == expected:
            return None
        if len(body) != len(expected):
            return f"body of {len(body)} bytes instead of {len(expected)}"
        return "body differs from the expected bytes"
    return check


def _json_is(expected: Any) -> Callable[[Any], str | None]:
    def check(response: Any) -> str | None:
        try:
            document = json.loads(response.content)
        except ValueError:
            return f"not JSON: {response.content[:80]!r}"
        return None if document == expected else f"unexpected JSON: {response.content[:200]!r}"
    return check


def _run_time_left(environment: Environment) -> float:
    run_time = environment.parsed_options and environment.parsed_options.run_time
    return run_time - (time.time() - _started) if run_time else math.inf


# -- tasks (one per endpoint family; MixedUser weighs them) -------------------------------------

def hello(user: LoadUser) -> None:
    user.request("GET", "/", _body_is(HELLO))


def json_api(user: LoadUser) -> None:
    user.request("GET", "/json", _json_is(DOCUMENT))


def upload(user: LoadUser) -> None:
    size = random.choice(UPLOAD_SIZES)
    chunked = random.random() < 0.5
    expected = {"bytes": size, "sha256": _payload_digest(size),
                "framing": "chunked" if chunked else "length"}
    body = _pieces(size) if chunked else _PAYLOAD[:size]  # requests sends a generator chunked
    user.request("POST", "/upload", _json_is(expected), data=body,
                 name=f"/upload ({expected['framing']})")


def download(user: LoadUser) -> None:
    if random.random() < 0.5:
        user.request("GET", "/file", _body_is(pattern(FILE_SIZE)))
    else:
        size = random.choice(DOWNLOAD_SIZES)
        user.request("GET", f"/download?size={size}", _body_is(pattern(size)), name="/download")


def slow(user: LoadUser) -> None:
    ms = random.randint(*SLOW_MS)
    user.request("GET", f"/slow?ms={ms}", _body_is(b"slept %d ms" % ms), name="/slow")


def hang(user: LoadUser) -> None:
    if _run_time_left(user.environment) >= HANG_ROOM:
        user.request("GET", "/hang", lambda response: "answered instead of hanging",
                     name=HANG_NAME)


# -- users --------------------------------------------------------------------------------------

class HelloUser(LoadUser):
    tasks = [hello]


class JsonUser(LoadUser):
    tasks = [json_api]


class UploadUser(LoadUser):
    tasks = [upload]


class DownloadUser(LoadUser):
    tasks = [download]


class SlowUser(LoadUser):
    tasks = [slow]


class MixedUser(LoadUser):
    tasks = {hello: 5, json_api: 3, upload: 1, download: 1, slow: 1}


class HangUser(LoadUser):
    fixed_count = 1
    wait_time = constant(HANG_EVERY)
    tasks = [hang]

    def on_start(self) -> None:
        super().on_start()
        gevent.sleep(HANG_FIRST)


if websocket is None:
    logging.warning("websocket-client is not installed: WsUser (the ws tag) is left out")
else:
    class WsUser(User):
        """Echoes random text over WebSocket, reconnecting every WS_MESSAGES_PER_CONNECTION."""

        wait_time = WAIT

        def on_start(self) -> None:
            self.ws: Any = None
            self.sent = 0
            self.worker_pid = "unknown"
            self.url = self.host.replace("http", "ws", 1) + "/ws"

        def on_stop(self) -> None:
            # No closing handshake: locust is stopping this user and waits for it.
            if self.ws is not None:
                self.ws.shutdown()

        def _close(self) -> None:
            if self.ws is not None:
                self.ws.close()
                self.ws = None

        def _timed(self, name: str, action: Callable[[], str | None]) -> bool:
            """Run `action` (it returns what went wrong, or None) as a request named `name`;
            True if it succeeded. Failures close the connection."""
            start = time.perf_counter()
            with _awaiting(self, "WS", name):
                try:
                    problem = action()
                except (OSError, websocket.WebSocketException) as exc:
                    problem = _lost(self.worker_pid, repr(exc))
            self.environment.events.request.fire(
                request_type="WS", name=name, context={}, response=None,
                response_time=(time.perf_counter() - start) * 1000, response_length=0,
                exception=Exception(problem) if problem else None)
            if problem:
                self._close()
            return not problem

        def _connect(self) -> str | None:
            self.ws = websocket.create_connection(self.url, timeout=REQUEST_TIMEOUT)
            self.sent = 0
            self.worker_pid = (self.ws.getheaders() or {}).get(WORKER_HEADER, "unknown")
            return None

        def _echo(self) -> str | None:
            message = f"{random.getrandbits(64):016x}" * random.randint(1, 64)
            self.ws.send(message)
            reply = self.ws.recv()
            self.sent += 1
            return None if reply == message else f"echo of {len(reply)} characters " \
                f"instead of {len(message)}"

        def echo(self) -> None:
            if self.ws is None and not self._timed("/ws connect", self._connect):
                return
            if self._timed("/ws echo", self._echo) and self.sent >= WS_MESSAGES_PER_CONNECTION:
                self._close()

        tasks = [echo]


# -- bookkeeping --------------------------------------------------------------------------------

@events.test_start.add_listener
def _note_start(environment: Environment, **kwargs: Any) -> None:
    global _started
    _started = time.time()


@events.request.add_listener
def _note_success(exception: BaseException | None, **kwargs: Any) -> None:
    if exception is None:
        _completions.append(time.time())


@events.test_stopping.add_listener
def _fail_stuck_requests(environment: Environment, **kwargs: Any) -> None:
    # locust is about to stop the users, dropping the requests they wait for without a word:
    # a server that stopped answering would go unnoticed.
    now = time.time()
    for request_type, name, since, worker_pid in list(_waiting.values()):
        if now - since >= STUCK_AFTER:
            environment.events.request.fire(
                request_type=request_type, name=name, context={}, response=None,
                response_time=(now - since) * 1000, response_length=0,
                exception=Exception(_lost(worker_pid, f"still waiting after {now - since:.1f} s "
                                                      "when the run ended")))
    _completions.append(now)


@events.quitting.add_listener
def _write_final_stats(environment: Environment, **kwargs: Any) -> None:
    # locust rewrites its --csv files every second, so they miss the end of the run (locust
    # issues 1806 and 2299); by now every user has stopped and the figures are final.
    prefix = environment.parsed_options and environment.parsed_options.csv_prefix
    if not prefix:
        return
    tables = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for kind, write in (("stats", tables.requests_csv), ("failures", tables.failures_csv),
                        ("exceptions", tables.exceptions_csv)):
        with open(FINAL_CSV.format(prefix=prefix, kind=kind), "w", newline="") as f:
            write(csv.writer(f))
    with open(COMPLETIONS.format(prefix=prefix), "w") as f:
        f.writelines(f"{t:.6f}\n" for t in _completions)
