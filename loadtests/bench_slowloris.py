"""Slowloris: does a slow-client flood tie up forkserve's sync workers? (stdlib only)

Run from the repository root, with the project's environment::

    python loadtests/bench_slowloris.py                        # all three servers, 1000 slow
    python loadtests/bench_slowloris.py --only forkserve       # just the target figure
    python loadtests/bench_slowloris.py --slow 2000 --duration 30 --trickle 2

What it shows: the hardening target "1,000 slowloris connections against ``-w 2`` must not raise
a normal client's p99 above 50 ms". Each server serves ``apps:wsgi`` from ``loadtests/hello``
(``--apps-dir`` overrides) with 2 workers (``--workers``), one at a time, on a fresh port on
127.0.0.1, with the command lines of ``bench_wsgi.py``:

* ``forkserve``         forkserve sync worker, ``--threads 1`` (its defaults otherwise, so
                        ``--header-timeout 10``: it closes a head still incomplete after 10 s)
* ``gunicorn-sync``     gunicorn ``-k sync``, for contrast (one connection per worker at a time)
* ``gunicorn-gthread``  gunicorn ``-k gthread --threads 4`` (``--threads``), for contrast

gunicorn comes from ``loadtests/.peers-venv`` (created on first use, as for ``bench_wsgi.py``).

For each server: a warm-up, then the *baseline* (``--baseline-duration`` s of the normal client
alone), then the *attack*: ``--slow`` connections (default 1000), all opened at once, each
sending ``GET / HTTP/1.1`` and then one ``X-a: b`` header line every ``--trickle`` s (default
3), never the blank line that ends the head. When the server closes one, it is reopened at once
(a "reconnect"). Once all of them are open and the server has taken them from its accept queue
(the wait is bounded), the normal client measures again for ``--duration`` s (default 15), a
window that includes the burst of reconnects after forkserve's 10 s ``--header-timeout``. The
slow sockets are all driven by one thread running a ``selectors`` loop in a child process, so
that the attacker never holds the measuring process's GIL.

The normal client alternates two variants, one round every ``--interval`` s: a request on a
fresh connection (``Connection: close``), and a request on a kept-alive connection (reopened
when the server closes it; a request on a reused connection that the server had closed is
retried once, as HTTP clients do). Each request must bring a 200 with the expected body within
``--request-timeout`` s (default 5), connect included; anything else is a failure. A failed
request counts in the percentiles with the time it took to fail, so a server that makes the
client time out shows it in its p99.

A sequential client sends nothing while it waits, so a stall of S seconds costs it one slow
sample where clients arriving independently would have seen S / ``--interval`` slow requests
(coordinated omission). The table therefore gives, beside the p99 of the requests actually
sent, the p99 corrected as HdrHistogram does: a request that took L also counts the requests
due every ``--interval`` meanwhile, as having waited L - interval, L - 2 * interval, ... The
corrected p99 is the figure held to the 50 ms target; the notes list the slowest requests and
when they happened.

While it measures, the script also samples the listening socket's accept queue
(``/proc/net/tcp``, every 0.1 s, from a process of its own) and each server process's open
sockets (``/proc/PID/fd``, every second), and notes any server process that appeared (a
restarted worker).

The table is printed and written to ``loadtests/out/bench_slowloris.md``; each server's log
goes to ``loadtests/out/bench_slowloris-logs/``. The process raises its RLIMIT_NOFILE soft limit
to the hard limit first (the servers it starts inherit it) and refuses to run when ``--slow``
does not fit. The exit status is 0 when forkserve (if measured) answered every normal request
under attack, both variants' corrected p99 are below 50 ms, and the attack was fully
established; 1 otherwise; 2 when a prerequisite is missing. gunicorn's results do not affect
it: they show what the same attack does to servers that hold a worker (or a thread) per
connection.

Absolute latencies depend on the machine and its load at the time: the attacker, the client
and the server's workers share the CPUs.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import heapq
import math
import multiprocessing
import os
import resource
import selectors
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import benchlib as lib
from benchlib import Server

REPORT = lib.OUT_DIR / "bench_slowloris.md"
LOG_DIR = lib.OUT_DIR / "bench_slowloris-logs"

TARGET_P99_MS = 50.0
FD_RESERVE = 64  # descriptors beyond the slow sockets: normal client, logs, pipes, listeners
RAMP_TIMEOUT = 30.0  # seconds for all slow connections to be open before measuring anyway
SETTLE_TIMEOUT = 10.0  # then seconds for the server to take them from its accept queue
RETRY_DELAY = 1.0  # a slow connection that failed or lived less than this waits this long
ATTEMPTS_PER_SLOT = 50  # bound on connection attempts per slow socket over one attack
SAMPLE_EVERY = 1.0  # seconds between samples of the server's processes and sockets
QUEUE_EVERY = 0.1  # seconds between samples of the listening socket's accept queue
STOP_WAIT = 5.0  # seconds for the attacker process to close its sockets and exit
SLOWEST_KEPT = 5  # slowest requests of each kind listed in the notes, with when they happened

REQUEST_LINE = b"GET / HTTP/1.1\r\n"
TRICKLE_LINE = b"X-a: b\r\n"


# -- servers ------------------------------------------------------------------------------------


def servers(threads: int) -> list[Server]:
    return [
        Server("forkserve", "forkserve sync", "forkserve", ("--threads", "1")),
        Server("gunicorn-sync", "gunicorn sync", "gunicorn", ("-k", "sync")),
        Server("gunicorn-gthread", f"gunicorn gthread({threads})", "gunicorn",
               ("-k", "gthread", "--threads", str(threads))),
    ]


# -- file descriptors ---------------------------------------------------------------------------


def raise_fd_limit(slow: int) -> tuple[int, str | None]:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; return it, and why `slow` sockets do
    not fit under it (None when they do)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = soft
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            print(f"warning: cannot raise RLIMIT_NOFILE from {soft} to {target}: {exc}",
                  file=sys.stderr)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    need = slow + FD_RESERVE
    if soft < need:
        hard_text = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        return soft, (f"--slow {slow} needs about {need} file descriptors, but RLIMIT_NOFILE "
                      f"is {soft} even raised to the hard limit ({hard_text}). Raise the hard "
                      f"limit (ulimit -Hn, LimitNOFILE=) or lower --slow.")
    return soft, None


# -- the attacker (a child process, one thread, one selector) -----------------------------------

# Counters the attacker and the queue sampler publish in shared memory. The parent only reads
# them, but for the sampler's, which it zeroes when the measurement begins.
OPEN, PEAK, ATTEMPTS, ESTABLISHED, SERVER_CLOSED, ANSWERED, CONNECT_FAILED, LINES, FD_ERRORS, \
    CAPPED, Q_SAMPLES, Q_BUSY, Q_PEAK, Q_PEAK_AT_MS = range(14)
COUNTERS = 14


@dataclass(frozen=True)
class AttackPlan:
    port: int
    count: int
    trickle: float
    deadline: float  # time.monotonic() by which the attack ends whatever happens
    parent: int


class SlowSocket:
    """One slot of the attack: the socket currently in it and where it is."""

    __slots__ = ("sock", "gen", "connecting", "opened_at")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.gen = 0  # bumped at every change, so that stale timer entries are ignored
        self.connecting = False
        self.opened_at = 0.0


class Attacker:
    """Keeps `plan.count` connections open, each trickling an endless request head."""

    def __init__(self, plan: AttackPlan, counters: Any, stop: Any) -> None:
        self.plan = plan
        self.c = counters
        self.stop = stop
        self.selector = selectors.DefaultSelector()
        self.slots = [SlowSocket() for _ in range(plan.count)]
        self.timers: list[tuple[float, int, int, bool]] = []  # (when, slot, gen, is_connect)
        self.max_attempts = plan.count * ATTEMPTS_PER_SLOT

    def run(self) -> None:
        plan = self.plan
        now = time.monotonic()
        try:
            for index in range(plan.count):
                self._connect(index, now)
            while now < plan.deadline and not self.stop.is_set():
                if os.getppid() != plan.parent:
                    return
                timeout = 0.2 if not self.timers else min(0.2, self.timers[0][0] - now)
                for key, _ in self.selector.select(max(0.0, timeout)):
                    slot = key.data
                    if self.slots[slot].connecting:
                        self._connected(slot)
                    else:
                        self._readable(slot)
                now = time.monotonic()
                while self.timers and self.timers[0][0] <= now:
                    when, slot, gen, is_connect = heapq.heappop(self.timers)
                    if gen != self.slots[slot].gen:
                        continue
                    if is_connect:
                        self._connect(slot, now)
                    else:
                        self._trickle(slot, when)
        finally:
            for slot in self.slots:
                if slot.sock is not None:
                    slot.sock.close()
            self.selector.close()

    def _later(self, when: float, index: int, is_connect: bool) -> None:
        heapq.heappush(self.timers, (when, index, self.slots[index].gen, is_connect))

    def _connect(self, index: int, now: float) -> None:
        c = self.c
        if c[ATTEMPTS] >= self.max_attempts:
            c[CAPPED] = 1
            return
        c[ATTEMPTS] += 1
        slot = self.slots[index]
        slot.gen += 1
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            c[FD_ERRORS] += 1
            self._later(now + RETRY_DELAY, index, True)
            return
        sock.setblocking(False)
        err = sock.connect_ex((lib.HOST, self.plan.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            c[CONNECT_FAILED] += 1
            self._later(now + RETRY_DELAY, index, True)
            return
        slot.sock, slot.connecting = sock, True
        self.selector.register(sock, selectors.EVENT_WRITE, index)

    def _connected(self, index: int) -> None:
        slot = self.slots[index]
        assert slot.sock is not None
        now = time.monotonic()
        if slot.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.c[CONNECT_FAILED] += 1
            self._drop(index, now + RETRY_DELAY, counted=False)
            return
        c = self.c
        slot.connecting, slot.opened_at = False, now
        c[ESTABLISHED] += 1
        c[OPEN] += 1
        c[PEAK] = max(c[PEAK], c[OPEN])
        self.selector.modify(slot.sock, selectors.EVENT_READ, index)
        if self._send(index, REQUEST_LINE):
            self._later(now + self.plan.trickle, index, False)

    def _trickle(self, index: int, when: float) -> None:
        if self._send(index, TRICKLE_LINE):
            self._later(when + self.plan.trickle, index, False)

    def _send(self, index: int, data: bytes) -> bool:
        sock = self.slots[index].sock
        assert sock is not None
        try:
            sock.send(data)
        except BlockingIOError:
            return True  # the server is not reading it: all the better for the attack
        except OSError:
            self._server_closed(index)
            return False
        self.c[LINES] += 1
        return True

    def _readable(self, index: int) -> None:
        sock = self.slots[index].sock
        assert sock is not None
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.c[ANSWERED] += 1  # e.g. a 400 or 408: the server refused the head
        self._server_closed(index)

    def _server_closed(self, index: int) -> None:
        self.c[SERVER_CLOSED] += 1
        now = time.monotonic()
        slot = self.slots[index]
        # Reopen at once, unless the server closes connections as fast as they open.
        self._drop(index, now if now - slot.opened_at >= RETRY_DELAY else now + RETRY_DELAY,
                   counted=True)

    def _drop(self, index: int, reconnect_at: float, counted: bool) -> None:
        slot = self.slots[index]
        assert slot.sock is not None
        self.selector.unregister(slot.sock)
        slot.sock.close()
        slot.sock = None
        slot.gen += 1
        if counted:
            self.c[OPEN] -= 1
        if reconnect_at <= time.monotonic():
            self._connect(index, reconnect_at)
        else:
            self._later(reconnect_at, index, True)


def _child_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def attacker_main(plan: AttackPlan, counters: Any, stop: Any) -> None:
    _child_signals()
    Attacker(plan, counters, stop).run()


def sampler_main(plan: AttackPlan, counters: Any, stop: Any, origin: float) -> None:
    """Sample the server's accept queue every QUEUE_EVERY s. A process of its own, so that it
    keeps sampling while the normal client is stuck in a request, and costs the client no
    GIL."""
    _child_signals()
    while not stop.is_set() and time.monotonic() < plan.deadline:
        if os.getppid() != plan.parent:
            return
        queued = accept_queue(plan.port)
        if queued is not None:
            counters[Q_SAMPLES] += 1
            if queued:
                counters[Q_BUSY] += 1
            if queued > counters[Q_PEAK]:
                counters[Q_PEAK] = queued
                counters[Q_PEAK_AT_MS] = int((time.monotonic() - origin) * 1000)
        stop.wait(QUEUE_EVERY)


@dataclass
class Attack:
    procs: list[multiprocessing.process.BaseProcess]
    counters: Any
    stop: Any

    @property
    def alive(self) -> bool:
        return self.procs[0].is_alive()

    def get(self, index: int) -> int:
        return int(self.counters[index])

    def reset_queue_counters(self) -> None:
        for index in (Q_SAMPLES, Q_BUSY, Q_PEAK, Q_PEAK_AT_MS):
            self.counters[index] = 0

    def end(self) -> str | None:
        """Stop the attacker and the sampler; a note when one had to be killed or failed."""
        self.stop.set()
        notes = []
        for proc in self.procs:
            proc.join(STOP_WAIT)
            if proc.is_alive():
                proc.kill()
                proc.join(STOP_WAIT)
                notes.append(f"{proc.name} did not exit within {STOP_WAIT:.0f} s; killed")
            elif proc.exitcode:
                notes.append(f"{proc.name} exited with status {proc.exitcode}")
        return "; ".join(notes) or None


def start_attack(plan: AttackPlan, origin: float) -> Attack:
    """Start the attacker process and the accept queue sampler."""
    ctx = multiprocessing.get_context("fork")
    counters = ctx.Array("q", COUNTERS, lock=False)
    stop = ctx.Event()
    procs = [ctx.Process(target=attacker_main, args=(plan, counters, stop), daemon=True,
                         name="slowloris attacker"),
             ctx.Process(target=sampler_main, args=(plan, counters, stop, origin), daemon=True,
                         name="accept queue sampler")]
    for proc in procs:
        proc.start()
    return Attack(procs, counters, stop)


# -- the normal client --------------------------------------------------------------------------


class RequestFailed(Exception):
    pass


class StaleConnection(RequestFailed):
    """A reused connection closed before any byte of the response: worth one retry."""


@dataclass
class Stats:
    times_ms: list[float] = field(default_factory=list)  # every request, failed ones included
    failures: Counter[str] = field(default_factory=Counter)
    # The slowest requests: (total ms, connect ms or None, when it started, s after `origin`)
    slowest: list[tuple[float, float | None, float]] = field(default_factory=list)
    origin: float = field(default_factory=time.monotonic)

    def add(self, total_ms: float, connect_ms: float | None, started: float) -> None:
        self.times_ms.append(total_ms)
        heapq.heappush(self.slowest, (total_ms, connect_ms, started - self.origin))
        if len(self.slowest) > SLOWEST_KEPT:
            heapq.heappop(self.slowest)

    def slowest_text(self) -> str:
        return ", ".join(
            f"{total:.0f} ms at +{at:.2f} s"
            + (f" (connect {connect:.0f} ms)" if connect is not None else " (reused)")
            for total, connect, at in sorted(self.slowest, reverse=True))

    @property
    def count(self) -> int:
        return len(self.times_ms)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def pct(self, share: float) -> float | None:
        """Nearest-rank percentile of the recorded requests, in ms."""
        return _percentile(self.times_ms, share)

    def corrected_pct(self, share: float, interval_ms: float) -> float | None:
        """The percentile corrected for coordinated omission: a request that took L ms kept
        the client from sending the ones due every `interval_ms` meanwhile; they are counted
        as having waited L - interval, L - 2 * interval, ... (HdrHistogram's
        recordValueWithExpectedInterval)."""
        values = list(self.times_ms)
        for total in self.times_ms:
            missed = total - interval_ms
            while missed >= interval_ms:
                values.append(missed)
                missed -= interval_ms
        return _percentile(values, share)

    def worst(self) -> float | None:
        return max(self.times_ms) if self.times_ms else None

    def failure_text(self) -> str:
        return ", ".join(f"{why} x{n}" for why, n in self.failures.most_common())


class NormalClient:
    """Sequential GET / requests on fresh connections, or on one kept alive when it can be."""

    def __init__(self, port: int, timeout: float, keep_alive: bool, origin: float) -> None:
        self.port = port
        self.timeout = timeout
        self.keep_alive = keep_alive
        self.sock: socket.socket | None = None
        close = b"" if keep_alive else b"Connection: close\r\n"
        self.request_bytes = (f"GET / HTTP/1.1\r\nHost: {lib.HOST}:{port}\r\n"
                              f"User-Agent: bench_slowloris\r\n").encode() + close + b"\r\n"
        self.stats = Stats(origin=origin)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self) -> None:
        """One request, timed and recorded in `stats`."""
        at = time.monotonic()
        started = time.perf_counter()
        deadline = started + self.timeout
        self.connect_ms = None
        try:
            try:
                self._exchange(deadline)
            except StaleConnection:
                self._exchange(deadline)
        except RequestFailed as exc:
            self.close()
            self.stats.failures[str(exc)] += 1
        finally:
            if not self.keep_alive:
                self.close()
        self.stats.add((time.perf_counter() - started) * 1000.0, self.connect_ms, at)

    def _exchange(self, deadline: float) -> None:
        reused = self.sock is not None
        try:
            if self.sock is None:
                connecting = time.perf_counter()
                self.sock = socket.create_connection((lib.HOST, self.port),
                                                     timeout=_left(deadline))
                self.connect_ms = (time.perf_counter() - connecting) * 1000.0
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self.sock
            sock.settimeout(_left(deadline))
            sock.sendall(self.request_bytes)
            buf = b""
            while b"\r\n\r\n" not in buf:
                sock.settimeout(_left(deadline))
                chunk = sock.recv(65536)
                if not chunk:
                    raise (StaleConnection if reused and not buf else RequestFailed)(
                        "closed before the response")
                buf += chunk
        except TimeoutError:
            raise RequestFailed("timeout") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            self.close()
            if reused:
                raise StaleConnection(type(exc).__name__) from None
            raise RequestFailed(type(exc).__name__) from None
        except OSError as exc:
            raise RequestFailed(exc.strerror or type(exc).__name__) from None
        head, _, body = buf.partition(b"\r\n\r\n")
        status, length, close = _parse_head(head)
        try:
            while len(body) < length:
                sock.settimeout(_left(deadline))
                chunk = sock.recv(65536)
                if not chunk:
                    raise RequestFailed("closed in the body")
                body += chunk
        except TimeoutError:
            raise RequestFailed("timeout") from None
        except OSError as exc:
            raise RequestFailed(exc.strerror or type(exc).__name__) from None
        if close:
            self.close()
        if status != 200:
            raise RequestFailed(f"status {status}")
        if body != lib.EXPECTED_BODY:
            raise RequestFailed("unexpected body")


def _percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(len(ordered) * share / 100)) - 1]


def _left(deadline: float) -> float:
    left = deadline - time.perf_counter()
    if left <= 0:
        raise TimeoutError
    return left


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    """Status, Content-Length (required: the app sends it) and whether the server closes."""
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise RequestFailed("bad status line") from None
    length, close = -1, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection":
            close = b"close" in value.lower()
    if length < 0:
        raise RequestFailed("no Content-Length")
    return status, length, close


def run_client(port: int, seconds: float, interval: float, timeout: float,
               between: Callable[[], None] | None = None,
               origin: float | None = None) -> tuple[Stats, Stats]:
    """Alternate a fresh-connection and a keep-alive request, one round every `interval` s,
    for `seconds`; return their stats. `between` runs between rounds, outside the timings;
    the slowest requests are dated from `origin` (a time.monotonic(); default: now)."""
    origin = time.monotonic() if origin is None else origin
    fresh = NormalClient(port, timeout, keep_alive=False, origin=origin)
    kept = NormalClient(port, timeout, keep_alive=True, origin=origin)
    end = time.monotonic() + seconds
    next_round = time.monotonic()
    try:
        for _ in range(int(seconds / interval) + 1):
            now = time.monotonic()
            if now >= end:
                break
            if next_round > now:
                time.sleep(next_round - now)
            next_round = max(next_round + interval, time.monotonic())
            fresh.request()
            kept.request()
            if between is not None:
                between()
    finally:
        kept.close()
    return fresh.stats, kept.stats


# -- what the server holds ----------------------------------------------------------------------


def socket_count(pid: int) -> int:
    fd_dir = f"/proc/{pid}/fd"
    count = 0
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return 0
    for name in names:
        with contextlib.suppress(OSError):
            if os.readlink(f"{fd_dir}/{name}").startswith("socket:"):
                count += 1
    return count


def accept_queue(port: int) -> int | None:
    """Connections waiting in the accept queues (rx_queue) of the sockets listening on
    127.0.0.1:`port`; None when there is none or /proc/net/tcp cannot be read."""
    local = f"0100007F:{port:04X}"
    found = None
    try:
        with open("/proc/net/tcp") as table:
            for line in table:
                if local not in line:  # cheap test first: the table has a line per socket
                    continue
                fields = line.split()
                if len(fields) > 4 and fields[1] == local and fields[3] == "0A":
                    found = (found or 0) + int(fields[4].split(":")[1], 16)
    except OSError:
        return None
    return found


@dataclass
class ServerSamples:
    """The server's side of the attack, sampled between the normal client's requests."""

    master: int
    pids_seen: set[int] = field(default_factory=set)
    peak_sockets: dict[int, int] = field(default_factory=dict)  # per process
    open_min: int | None = None  # the attacker's open connections, client side
    open_max: int = 0
    next_at: float = 0.0

    def sample(self, attack: Attack | None = None, force: bool = False) -> None:
        now = time.monotonic()
        if attack is not None:
            held = attack.get(OPEN)
            self.open_min = held if self.open_min is None else min(self.open_min, held)
            self.open_max = max(self.open_max, held)
        if not force and now < self.next_at:
            return
        self.next_at = now + SAMPLE_EVERY
        for pid in lib.session_processes(self.master):
            self.pids_seen.add(pid)
            self.peak_sockets[pid] = max(self.peak_sockets.get(pid, 0), socket_count(pid))

    def sockets_text(self) -> str:
        parts = [f"{'master' if pid == self.master else pid} {n}"
                 for pid, n in sorted(self.peak_sockets.items(),
                                      key=lambda item: (item[0] != self.master, item[0]))]
        return ", ".join(parts) or "none seen"


# -- one server ---------------------------------------------------------------------------------


@dataclass
class Result:
    server: Server
    baseline: tuple[Stats, Stats] | None = None
    attacked: tuple[Stats, Stats] | None = None
    failure: str | None = None  # did not start, died, or the attack never got established
    all_connected: bool = False
    held: str = "-"
    reconnects: str = "-"
    notes: list[str] = field(default_factory=list)


def measure(server: Server, app: lib.App, args: argparse.Namespace) -> Result:
    port = lib.free_port()
    cmd = lib.server_command(server, app, args.workers, port)
    log_path = LOG_DIR / f"{server.key}.log"
    result = Result(server)
    print(f"--- {server.label}: {' '.join(cmd)}", file=sys.stderr)
    with lib.run_server(cmd, log_path, app.dirs) as running:
        why = lib.wait_ready(running, port, lib.boot_marker(server, args.workers))
        if why is not None:
            result.failure = f"did not start: {why}"
        else:
            attack_server(running, port, args, result)
    result.notes.extend(running.notes)
    result.notes.append(lib.log_summary(log_path))
    print(f"    {result.failure or summary(result)}", file=sys.stderr)
    return result


def attack_server(running: lib.Running, port: int, args: argparse.Namespace,
                  result: Result) -> None:
    master = running.proc.pid
    client = functools.partial(run_client, port, interval=args.interval,
                               timeout=args.request_timeout)
    client(lib.WARMUP_SECONDS)
    result.baseline = client(args.baseline_duration)
    plan = AttackPlan(port, args.slow, args.trickle,
                      time.monotonic() + RAMP_TIMEOUT + SETTLE_TIMEOUT + args.duration
                      + 2 * args.request_timeout + 30, os.getpid())
    started = time.monotonic()
    samples = ServerSamples(master)
    samples.sample(force=True)
    before = set(samples.pids_seen)
    attack = start_attack(plan, started)
    try:
        wait_for_attack(running, attack, port, args.slow, started, result)
        closed_before = attack.get(SERVER_CLOSED)
        measured_from = time.monotonic() - started
        attack.reset_queue_counters()
        result.attacked = client(args.duration, origin=started,
                                 between=functools.partial(samples.sample, attack))
        samples.sample(attack, force=True)
        closed_during = attack.get(SERVER_CLOSED) - closed_before
        counts = {name: attack.get(index) for name, index in (
            ("attempts", ATTEMPTS), ("established", ESTABLISHED), ("closed", SERVER_CLOSED),
            ("answered", ANSWERED), ("connect_failed", CONNECT_FAILED), ("lines", LINES),
            ("fd_errors", FD_ERRORS), ("peak", PEAK), ("capped", CAPPED),
            ("q_samples", Q_SAMPLES), ("q_busy", Q_BUSY), ("q_peak", Q_PEAK),
            ("q_peak_at", Q_PEAK_AT_MS))}
    finally:
        stop_note = attack.end()
    if stop_note:
        result.notes.append(stop_note)
    result.held = (f"{samples.open_min}-{samples.open_max}"
                   if samples.open_min != samples.open_max else str(samples.open_max))
    result.reconnects = str(closed_during)
    attack_seconds = time.monotonic() - started
    result.notes.append(
        f"attack over {attack_seconds:.1f} s (measured from +{measured_from:.2f} s): "
        f"{counts['attempts']} connection attempts, {counts['established']} established (at "
        f"most {counts['peak']} at once), {counts['closed']} closed by the server "
        f"({closed_during} during the measurement; {counts['answered']} of them with a "
        f"response first), {counts['connect_failed']} connects failed, {counts['fd_errors']} "
        f"local fd errors, {counts['lines']} lines sent"
        + ("; attempt cap reached" if counts["capped"] else ""))
    result.notes.append(
        f"while measuring: the server's accept queue was non-empty in {counts['q_busy']} of "
        f"{counts['q_samples']} samples (~{QUEUE_EVERY:g} s apart), at most {counts['q_peak']}"
        + (f" (at +{counts['q_peak_at'] / 1000:.2f} s)" if counts["q_peak"] else "")
        + f"; server sockets at most, per process: {samples.sockets_text()}")
    new = sorted(samples.pids_seen - before)
    if new:
        result.notes.append(f"{len(new)} process(es) appeared during the attack (worker "
                            f"restarts?): {new}")
    else:
        result.notes.append("no new server process during the attack")
    if running.proc.poll() is not None:
        result.failure = f"server exited with status {running.proc.returncode} under attack"
    for label, stats in zip(("baseline", "attack"), (result.baseline, result.attacked),
                            strict=True):
        for variant, one in zip(("fresh", "keep-alive"), stats, strict=True):
            if one.failed:
                result.notes.append(f"{label} {variant} failures: {one.failure_text()}")
    for variant, one in zip(("fresh", "keep-alive"), result.attacked, strict=True):
        result.notes.append(f"slowest {variant} requests under attack (time from the attack's "
                            f"start): {one.slowest_text()}")


def wait_for_attack(running: lib.Running, attack: Attack, port: int, slow: int,
                    started: float, result: Result) -> None:
    """Wait (bounded) until all `slow` connections are open on the client side, then until the
    server has taken them from its accept queue; say how long each took."""
    deadline = started + RAMP_TIMEOUT
    while time.monotonic() < deadline and attack.alive:
        if attack.get(OPEN) >= slow or running.proc.poll() is not None:
            break
        time.sleep(0.02)
    opened, ramp = attack.get(OPEN), time.monotonic() - started
    result.all_connected = opened >= slow
    if not result.all_connected:
        result.notes.append(f"attack: only {opened} of {slow} slow connections open after "
                            f"{ramp:.1f} s; measured anyway")
        return
    deadline = time.monotonic() + SETTLE_TIMEOUT
    queued = accept_queue(port)
    peak = queued or 0
    while queued and time.monotonic() < deadline and running.proc.poll() is None:
        time.sleep(0.02)
        queued = accept_queue(port)
        peak = max(peak, queued or 0)
    taken = time.monotonic() - started
    if queued:
        result.notes.append(f"attack: all {slow} slow connections open (client side) after "
                            f"{ramp:.2f} s, but {queued} still in the server's accept queue "
                            f"after {taken:.1f} s; measured anyway")
    else:
        result.notes.append(f"attack: all {slow} slow connections open (client side) after "
                            f"{ramp:.2f} s; the server's accept queue (up to {peak} seen) was "
                            f"empty after {taken:.2f} s, and the measurement began then")


def summary(result: Result) -> str:
    if result.attacked is None:
        return "?"
    fresh, kept = result.attacked
    return (f"under attack p99 fresh {lib.fmt_ms(fresh.pct(99))}, keep-alive "
            f"{lib.fmt_ms(kept.pct(99))}; failures {fresh.failed + kept.failed}")


# -- report -------------------------------------------------------------------------------------


def table(results: list[Result], interval_ms: float) -> str:
    lines = ["| server | client | baseline p50 / p99 | under attack p50 / p99 / max "
             "| under attack p99, corrected | failures | slow connections held | reconnects |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        label = result.server.label
        if result.baseline is None or result.attacked is None:
            lines.append(f"| {label} | - | - | - | - | FAILED: {result.failure} | - | - |")
            continue
        for i, variant in enumerate(("fresh connection", "keep-alive")):
            base, under = result.baseline[i], result.attacked[i]
            failures = f"{under.failed} / {under.count}"
            if base.failed:
                failures += f" (baseline {base.failed} / {base.count})"
            if result.failure:
                failures += f"; {result.failure}"
            held = result.held if result.all_connected else f"{result.held} (incomplete)"
            lines.append(
                f"| {label if i == 0 else ''} | {variant} "
                f"| {lib.fmt_ms(base.pct(50))} / {lib.fmt_ms(base.pct(99))} "
                f"| {lib.fmt_ms(under.pct(50))} / {lib.fmt_ms(under.pct(99))} / "
                f"{lib.fmt_ms(under.worst())} "
                f"| {lib.fmt_ms(under.corrected_pct(99, interval_ms))} | {failures} "
                f"| {held if i == 0 else ''} | {result.reconnects if i == 0 else ''} |")
    return "\n".join(lines)


def verdict(results: list[Result], slow: int, interval_ms: float) -> tuple[list[str], bool]:
    """The target line(s) for forkserve and whether it met the target."""
    ours = next((r for r in results if r.server.key == "forkserve"), None)
    if ours is None:
        return ["forkserve not measured (--only): no verdict"], True
    if ours.attacked is None:
        return [f"forkserve p99 under {slow} slowloris = n/a: {ours.failure}"], False
    fresh, kept = ours.attacked
    corrected = {"fresh connections": fresh.corrected_pct(99, interval_ms) or 0.0,
                 "keep-alive": kept.corrected_pct(99, interval_ms) or 0.0}
    which, worst = max(corrected.items(), key=lambda item: item[1])
    lines = [f"forkserve p99 under {slow} slowloris = {worst:.2f} ms (target < "
             f"{TARGET_P99_MS:.0f} ms)",
             f"  ({which}, corrected for coordinated omission, the worse of fresh connections "
             f"{corrected['fresh connections']:.2f} ms and keep-alive "
             f"{corrected['keep-alive']:.2f} ms; as recorded by the sequential client: "
             f"{lib.fmt_ms(fresh.pct(99))} and {lib.fmt_ms(kept.pct(99))}; failures "
             f"{fresh.failed + kept.failed} of {fresh.count + kept.count})"]
    ok = True
    if fresh.failed or kept.failed:
        lines.append("FAILED: forkserve's normal client had failures under attack")
        ok = False
    if worst >= TARGET_P99_MS:
        lines.append(f"FAILED: p99 {worst:.2f} ms is not below {TARGET_P99_MS:.0f} ms")
        ok = False
    if not ours.all_connected:
        lines.append(f"FAILED: the attack never had all {slow} slow connections open")
        ok = False
    if ours.failure:
        lines.append(f"FAILED: {ours.failure}")
        ok = False
    return lines, ok


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None, keys: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure a normal client's latency while slowloris connections hold "
                    "forkserve's (and gunicorn's) workers.")
    parser.add_argument("--apps-dir", type=Path, default=lib.DEFAULT_APPS_DIR,
                        help=f"directory holding apps.py (default: {lib.DEFAULT_APPS_DIR})")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=4,
                        help="threads of gunicorn gthread (default 4)")
    parser.add_argument("--slow", type=int, default=1000,
                        help="slowloris connections (default 1000)")
    parser.add_argument("--trickle", type=float, default=3.0,
                        help="seconds between the header lines of a slow connection (default 3)")
    parser.add_argument("--duration", type=float, default=15.0,
                        help="seconds measured under attack per server (default 15)")
    parser.add_argument("--baseline-duration", type=float, default=5.0,
                        help="seconds measured without attack per server (default 5)")
    parser.add_argument("--interval", type=float, default=0.01,
                        help="seconds between rounds of the normal client, each one fresh and "
                             "one keep-alive request (default 0.01)")
    parser.add_argument("--request-timeout", type=float, default=5.0,
                        help="seconds a normal request may take, connect included (default 5)")
    parser.add_argument("--only", action="append", choices=keys, metavar="NAME",
                        help=f"run only this server; repeatable. One of: {', '.join(keys)}")
    args = parser.parse_args(argv)
    lib.require_positive(parser, args, ("workers", "threads", "slow"))
    for name in ("trickle", "duration", "baseline_duration", "interval", "request_timeout"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, [s.key for s in servers(4)])
    apps_dir, chosen = lib.begin(args, servers(args.threads))
    nofile, why = raise_fd_limit(args.slow)
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return lib.EXIT_SETUP
    versions = [f"python {sys.version.split()[0]}", lib.forkserve_version()]
    if any(s.kind == "gunicorn" for s in chosen):
        versions.append(f"gunicorn {lib.require_peers({'gunicorn': 'gunicorn'})['gunicorn']}")

    started = datetime.now(timezone.utc)
    app = lib.hello_app(apps_dir, "wsgi")
    results = lib.run_all(functools.partial(measure, server, app, args) for server in chosen)
    if results is None:
        return lib.EXIT_INTERRUPTED

    try:
        somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    except OSError:
        somaxconn = "?"
    header = (
        f"# bench_slowloris: a normal client's latency under {args.slow} slowloris connections"
        f"\n\n{started:%Y-%m-%d %H:%M} UTC; {args.workers} workers per server; {args.slow} slow "
        f"connections, each sending `GET / HTTP/1.1` then one `X-a: b` line every "
        f"{args.trickle:g} s, never ending the head, reopened when closed; normal client: one "
        f"fresh-connection and one keep-alive GET every {args.interval:g} s, "
        f"{args.request_timeout:g} s timeout (a failure counts in the percentiles with the "
        f"time it took), {args.baseline_duration:g} s without attack, then {args.duration:g} s "
        f"with all slow connections open; RLIMIT_NOFILE {nofile}; somaxconn {somaxconn}; "
        f"{os.cpu_count()} CPUs; {'; '.join(versions)}; {lib.source_state()}.\n"
        f"\"slow connections held\": the attacker's open connections during the measurement "
        f"(min-max); \"reconnects\": slow connections the server closed (and the attacker "
        f"reopened) during it; \"corrected\": p99 counting the requests a stalled sequential "
        f"client did not send (coordinated omission), the figure held to the target.")
    interval_ms = args.interval * 1000.0
    verdict_lines, ok = verdict(results, args.slow, interval_ms)
    notes = [f"- {r.server.label}: {note}" for r in results for note in r.notes]
    report = "\n\n".join((header, table(results, interval_ms), "\n".join(verdict_lines),
                          "Notes:\n" + "\n".join(notes)))
    lib.OUT_DIR.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(report + "\n")
    print()
    print(report)
    print(f"\nwritten to {REPORT.relative_to(lib.REPO)}")
    print()
    print(verdict_lines[0])
    return lib.EXIT_OK if ok else lib.EXIT_ERRORS


if __name__ == "__main__":
    sys.exit(main())
