"""The process model: workers forked by the master, replaced, counted, stopped."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import (
    APP_OF,
    APPS,
    READY,
    Reader,
    Response,
    closed_by_peer,
    exchange,
    forkserve_command,
    group_members,
)

from forkserve.workers.base import ACCEPT_DEFER, BALANCE_MARGIN

HELLO = b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n"


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Wait for processes (not our children, so no waitpid) to disappear."""
    deadline = time.monotonic() + timeout
    remaining = list(pids)
    while remaining and time.monotonic() < deadline:
        remaining = [p for p in remaining if os.path.exists(f"/proc/{p}") and not _zombie(p)]
        if remaining:
            time.sleep(0.05)  # polling /proc: there is no event for another's process exit
    assert not remaining, f"still running: {remaining}"


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def test_forks_the_requested_workers_and_titles_them(start_server):
    server = start_server("wsgiapp:app", "-w", "3")
    workers = server.workers()
    assert len(workers) == 3
    with open(f"/proc/{server.pid}/cmdline", "rb") as f:
        assert f.read().startswith(b"forkserve: master [wsgiapp:app] 3 workers")
    for pid in workers:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert f.read().startswith(b"forkserve: worker ")
    served_by = {int(exchange(server, b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n").body)
                 for _ in range(30)}
    assert served_by <= set(workers)


def test_workers_auto_follows_cpu_affinity(start_server):
    server = start_server("wsgiapp:app", "-w", "auto",
                          preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    assert len(server.workers()) == 1
    assert "starting 1 workers" in server.log


def test_workers_auto_uses_every_allowed_cpu(start_server):
    from forkserve.cpus import usable_cpus
    server = start_server("wsgiapp:app")  # -w defaults to auto
    assert len(server.workers()) == usable_cpus()


def _burst_split(server, connections: int) -> list[int]:
    """Open `connections` connections at once, ask each which worker holds it: how many
    each worker holds, fewest first."""
    socks = [server.connect() for _ in range(connections)]
    try:
        served_by = []
        for sock in socks:
            sock.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
            served_by.append(int(Reader(sock).response().body))
    finally:
        for sock in socks:
            sock.close()
    return sorted(served_by.count(pid) for pid in server.workers())


def test_a_burst_of_keep_alive_connections_is_shared_between_workers(start_server, interface):
    server = start_server(APP_OF[interface], "-w", "2")
    splits = []
    for _ in range(3):  # balancing leans on the idle worker being scheduled in time: on a
        # loaded 2-core machine one burst in a few may still land on one worker
        splits.append(_burst_split(server, 12))
        if splits[-1][0] >= 4:
            return
    # Balanced, a burst splits 6/6 or 5/7; without the scoreboard 4/8 or better came in 12%
    # of bursts on a 2-core machine (0/12 and 1/11 in a third).
    raise AssertionError(f"every burst landed mostly on one worker: {splits}")


def test_a_burst_of_keep_alive_connections_is_spread_over_four_workers(start_server, interface):
    """32 connections opened at once to 4 workers: each worker holds 6 to 10 of them (the
    scoreboard; without it one worker took 24-32 and two took none, most bursts). On a
    loaded 2-core machine a worker may not be scheduled in time for one burst (seen once:
    2/10/10/10), so two bursts of three must be spread so."""
    server = start_server(APP_OF[interface], "-w", "4")
    splits = [_burst_split(server, 32) for _ in range(3)]
    assert sum(counts[-1] - counts[0] <= 4 for counts in splits) >= 2, splits


def _fresh_connections(server, target: bytes, clients: int, each: int,
                       until: float = math.inf) -> list[Response]:
    """`clients` threads each sending `each` requests for `target` (fewer if the monotonic
    clock reaches `until`), one per connection (as nginx's default proxy_pass and most
    health checkers do): every response, each a 200."""

    def one_client() -> list[Response]:
        responses: list[Response] = []
        while len(responses) < each and time.monotonic() < until:
            with server.connect() as sock:
                sock.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                             % target)
                responses.append(Reader(sock).response())
                assert responses[-1].status == 200
        return responses

    with ThreadPoolExecutor(clients) as pool:
        return [response for done in [pool.submit(one_client) for _ in range(clients)]
                for response in done.result()]


def _fresh_connection_rate(server, seconds: float = 0.5, clients: int = 10) -> float:
    """Requests/s of `clients` threads sending requests for /hello, one per connection, for
    `seconds` (a fixed count took some 50 ms: it measured the machine's hiccups as much as
    the server)."""
    began = time.monotonic()
    answered = _fresh_connections(server, b"/hello", clients, sys.maxsize, began + seconds)
    return len(answered) / (time.monotonic() - began)


@pytest.mark.parametrize("threads", ["1", "4"])
@pytest.mark.parametrize("workers", [2, 4])
def test_fresh_connections_are_shared_fairly_when_workers_are_busy(start_server, workers,
                                                                   threads):
    """32 clients sending requests one per connection (384 per worker) to an app that blocks
    5 ms, more than the workers can serve: the busiest worker serves at most 1.25 times the
    requests of the least busy (issue 15's target). What keeps it fair here is mostly that a
    worker whose loop or threads are all in the app does not accept; a worker that took
    connections it cannot serve at once would fail it. (384 a worker: with 96, chance alone
    spread 4 workers up to 1.36 about once in 7 runs; with 192, up to 1.26 once in 12.)"""
    server = start_server("wsgiapp:app", "-w", str(workers), "--threads", threads)
    served = [int(response.body) for response in
              _fresh_connections(server, b"/sleep?s=0.005", 32, 12 * workers)]
    counts = sorted(served.count(pid) for pid in server.workers())
    assert len(counts) == workers and counts[-1] <= 1.25 * counts[0], counts


def _keep_alive_burst(server, clients: int = 32) -> list[int]:
    """`clients` connections opened at once, each then sending a request as soon as it is
    connected (as wrk and a filling connection pool do): the pid that answered each."""
    socks = [socket.socket() for _ in range(clients)]
    try:
        for sock in socks:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", server.port))
        for sock in socks:
            select.select([], [sock], [], 10)
            sock.settimeout(10)
            sock.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
        return [int(Reader(sock).response().body) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _wait_until_closed(server) -> None:
    """Until the workers have closed every connection the client closed (none of the
    server's sockets on its port left in CLOSE_WAIT), so that the next burst meets workers
    that no longer count the last one's."""
    port = f":{server.port:04X}"
    deadline = time.monotonic() + 10
    while True:
        half_closed = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as lines:
                fields = (line.split() for line in lines)
                half_closed += sum(1 for f in fields if f[1].endswith(port) and f[3] == "08")
        if not half_closed:
            return
        assert time.monotonic() < deadline, f"{half_closed} connections left half-closed"
        time.sleep(0.002)


def test_a_burst_of_keep_alive_clients_is_split_evenly(start_server):
    """A keep-alive connection stays with the worker that accepted it, so a burst decides
    the shares for as long as the clients stay. A worker in a short call into the app when
    the burst came used to be left out: splits of 10 / 22, even 0 / 32, and requests 1.5-2
    to 1 under wrk (issue 15's target is 1.25). Now each worker takes its half, within the
    balancing margin, in most bursts: the median of 8 is within it (0-2 in 60 runs; the
    short call not counted, 2-7: 5 of 6 runs fail). A few bursts may split 23 / 9 when one
    worker's /pid call lasts past SHORT_CALL on these 2 shared CPUs (its peer then takes
    the rest, as it should from a worker blocked in its app): the median leaves them out,
    the sum of 8 bursts did not (1 run in 8 over 1.06)."""
    server = start_server("wsgiapp:app", "-w", "2")
    first, second = server.workers()
    differences = []
    for _ in range(8):
        pids = _keep_alive_burst(server)
        differences.append(abs(pids.count(first) - pids.count(second)))
        assert pids.count(first) + pids.count(second) == len(pids)
        _wait_until_closed(server)
    assert statistics.median(differences) <= BALANCE_MARGIN, differences


def test_no_connection_is_left_to_a_stopping_worker(start_server):
    """A worker that stops (here TERM; a reload, --max-requests) drains what it holds for up
    to --graceful-timeout. It used to go on publishing its connection count, so a peer that
    held more left every new connection to it, which never accepts again: each waited
    ACCEPT_DEFER (20 ms) in the backlog, for as long as the drain lasted. Now a stopping
    worker counts as unavailable."""
    server = start_server("asgiapp:app", "-w", "2", "--graceful-timeout", "20")
    with server.connect() as draining:
        # Closed with a reset, which ends the drain (a plain close would wait for the
        # response: half-close).
        draining.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        draining.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
        stopping = int(Reader(draining).response().body)
        draining.sendall(b"GET /sleep?s=10&tag=drain HTTP/1.1\r\nHost: t\r\n\r\n")
        server.wait_for(r"SLEEPING drain")
        os.kill(stopping, signal.SIGTERM)
        # Keep-alive clients that the other worker alone takes once the stopping one no
        # longer accepts (while it does, as the lighter one, it gets some of them).
        held: list[socket.socket] = []
        try:
            while len(held) < 6:
                sock = server.connect()
                sock.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
                if int(Reader(sock).response().body) == stopping:
                    sock.close()
                else:
                    held.append(sock)
            seconds = []
            for _ in range(11):
                began = time.monotonic()
                assert exchange(server, HELLO).status == 200
                seconds.append(time.monotonic() - began)
        finally:
            for sock in held:
                sock.close()
        # Deferred, each waited 20 ms at least; answered at once, well under 10 ms.
        assert sorted(seconds)[5] < ACCEPT_DEFER / 2, seconds
        assert os.path.exists(f"/proc/{stopping}")  # (it drained all along)


@pytest.mark.timeout(90)
def test_two_workers_serve_fresh_connections_no_slower_than_one(start_server, interface):
    # Two workers used to take turns idling (the balancing deferral held one off while its
    # peer deferred in turn): 200 requests/s with -w 2 against 1,900 with -w 1. Healthy rates
    # are bound by this Python client, which shares the machine's cores with the workers:
    # -w 2 came out at 0.6-0.9 of -w 1 on 2 cores, and at 0.45-0.8 for ASGI since a worker
    # serves a head seen before faster (the client's 10 threads get less CPU beside two
    # busy workers; with wrk, -w 2 serves 1.5 times -w 1); the stall was 0.1.
    one = start_server(APP_OF[interface], "-w", "1")
    rate_one = _fresh_connection_rate(one)
    one.stop()
    two = start_server(APP_OF[interface], "-w", "2")
    rate_two = _fresh_connection_rate(two)
    assert rate_two >= 0.3 * rate_one, f"-w 2: {rate_two:.0f}/s, -w 1: {rate_one:.0f}/s"


def test_killed_worker_is_replaced(start_server):
    server = start_server("wsgiapp:app", "-w", "2")
    before = server.workers()
    mark = server.mark()
    os.kill(before[0], signal.SIGKILL)
    server.wait_for(r"killed by SIGKILL \(not by forkserve", start=mark)
    server.wait_for(r"worker \d booted", start=mark)
    after = server.workers()
    assert len(after) == 2
    assert before[0] not in after and before[1] in after
    assert exchange(server, HELLO).status == 200


def test_crashing_worker_is_replaced(start_server):
    server = start_server("wsgiapp:app", "-w", "1")
    (old,) = server.workers()
    mark = server.mark()
    os.kill(old, signal.SIGSEGV)
    server.wait_for(r"killed by SIGSEGV", start=mark)
    server.wait_for(r"worker 1 booted", start=mark)
    assert exchange(server, HELLO).status == 200


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_stop_signals_leave_no_process_behind(start_server, signum):
    server = start_server("wsgiapp:app", "-w", "2")
    members = group_members(server.pid)
    assert len(members) == 3
    os.kill(server.pid, signum)
    assert server.wait_exit() == 0
    wait_gone(members)
    assert group_members(server.pid) == []


def test_graceful_stop_finishes_request_in_flight(start_server):
    server = start_server("wsgiapp:app", "-w", "1")
    with server.connect() as sock:
        sock.sendall(b"GET /sleep?s=1&tag=inflight HTTP/1.1\r\nHost: t\r\n\r\n")
        server.wait_for("SLEEPING inflight")
        os.kill(server.pid, signal.SIGTERM)
        response = Reader(sock).response()
        assert response.status == 200
        assert response.body.isdigit()
        assert closed_by_peer(sock)
    assert server.wait_exit() == 0


def test_workers_exit_when_master_is_killed(start_server):
    server = start_server("wsgiapp:app", "-w", "2")
    workers = server.workers()
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(10)
    wait_gone(workers)


def test_silent_worker_is_killed_and_replaced(start_server):
    server = start_server("wsgiapp:app", "-w", "1", "--timeout", "1")
    (old,) = server.workers()
    mark = server.mark()
    with server.connect() as sock:
        sock.sendall(b"GET /sleep?s=30 HTTP/1.1\r\nHost: t\r\n\r\n")
        server.wait_for(rf"worker 1 \(pid {old}\) silent for", start=mark)
        server.wait_for(r"worker 1 booted", start=mark)
    assert old not in server.workers()
    assert exchange(server, HELLO).status == 200


@pytest.mark.timeout(120)
@pytest.mark.parametrize("threads", ["1", "auto", "4"])
def test_a_hang_strands_no_other_request(start_server, threads):
    """Issue 15's hang scenario: while a request hangs in one worker (-w 2 --timeout 5), a
    client sending fresh requests one after another loses none, in 20 runs of 20. In a pool
    (--threads 4) the loop serves on beside the hung thread. In the loop (--threads 1, and
    `auto` while it calls there) the worker has often accepted the connection queued as the
    hang began: it hands that one to its peer once the call runs past a few ms (without the
    hand-off this fails within the first runs, the connection stranded until --timeout)."""
    request = b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    for run in range(20):
        server = start_server("wsgiapp:app", "-w", "2", "--timeout", "5", "--threads",
                              threads, "--graceful-timeout", "1")
        with server.connect() as hang:
            for answered in range(40):
                with server.connect() as sock:
                    if answered == 5:  # the hang begins as this connection waits in the queue
                        hang.sendall(b"GET /sleep?s=60&tag=hang HTTP/1.1\r\nHost: t\r\n\r\n")
                    sock.settimeout(3)  # a request stranded behind the hang: TimeoutError
                    sock.sendall(request)
                    assert Reader(sock).response().status == 200, f"run {run}"
            server.wait_for("SLEEPING hang")  # (the hang did happen meanwhile)
        os.kill(server.pid, signal.SIGQUIT)  # (TERM would wait out --graceful-timeout)
        server.wait_exit()
        server.stop()


def _get(sock: socket.socket, path: str, close: bool = False) -> None:
    extra = b"Connection: close\r\n" if close else b""
    sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: t\r\n" + extra + b"\r\n")


Conn = tuple[socket.socket, Reader]


@contextlib.contextmanager
def _connections_by_worker(server, on_a: int) -> Iterator[tuple[bytes, list[Conn], bytes,
                                                                list[Conn]]]:
    """Keep-alive connections to a 2-worker server, sorted by the worker that answers them:
    (A's pid, A's connections, B's pid, B's), with at least `on_a` on A and one on B."""
    by_worker: dict[bytes, list[Conn]] = {}
    try:
        while max(map(len, by_worker.values()), default=0) < on_a or len(by_worker) < 2:
            assert sum(map(len, by_worker.values())) < 60, "connections do not reach both"
            sock = server.connect()
            _get(sock, "/pid")
            reader = Reader(sock)
            by_worker.setdefault(reader.response().body, []).append((sock, reader))
        (a_pid, a_conns), (b_pid, b_conns) = sorted(by_worker.items(),
                                                    key=lambda item: -len(item[1]))
        yield a_pid, a_conns, b_pid, b_conns
    finally:
        for conns in by_worker.values():
            for sock, _ in conns:
                sock.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_connections_waiting_behind_a_long_call_are_served_by_the_other_worker(start_server,
                                                                                 http):
    """-w 2, app called in the loop: while worker A's loop is in a 3 s call, its other
    connections are handed to B (once B is free) and B answers them: an idle keep-alive one
    that sends a request, one whose request A had already read and queued behind the call
    (its bytes go along), and one answered with Connection: close, which the client sees
    closed at once although A still holds a descriptor of it. They stay B's afterwards, and
    B hands them on in turn when its own loop is held up."""
    server = start_server("wsgiapp:app", "-w", "2", "--threads", "1", "--http", http,
                          "--log-level", "debug")
    with _connections_by_worker(server, 5) as (a_pid, a_conns, b_pid, b_conns):
        (a1, a1r), (a2, a2r), (a3, a3r), (a4, a4r), (a5, a5r) = a_conns[:5]
        b1, b1r = b_conns[0]
        mark = server.mark()
        _get(b1, "/sleep?s=1.5&tag=b")  # B busy: nothing can be handed to it yet
        _get(a1, "/sleep?s=0.3&tag=a")
        server.wait_for("SLEEPING b", start=mark)
        server.wait_for("SLEEPING a", start=mark)
        # Both arrive while A is in its call; A reads them together once it returns, and
        # queues a3's request behind a2's 3 s call.
        _get(a2, "/sleep?s=3&tag=long")
        _get(a3, "/pid")
        server.wait_for("SLEEPING long", start=mark)
        _get(a4, "/pid")  # idle on A, which is in the app
        _get(a5, "/pid", close=True)
        started = time.monotonic()
        assert a3r.response().body == b_pid  # its bytes went along to B
        assert a4r.response().body == b_pid
        assert a5r.response().body == b_pid
        a5.settimeout(1.5)
        assert a5r.read_to_eof() == b""  # closed now, not when A's call ends
        assert time.monotonic() - started < 1.4  # all within B's wait, before A's call ended
        server.wait_for(r"handed \d+ waiting connections to other workers", start=mark)
        assert a1r.response().body == a_pid
        assert a2r.response().body == a_pid
        assert b1r.response().body == b_pid
        for sock, reader in ((a3, a3r), (a4, a4r)):  # B's now, A having let go of them
            _get(sock, "/pid")
            assert reader.response().body == b_pid
        mark = server.mark()
        _get(b1, "/sleep?s=1&tag=b2")
        server.wait_for("SLEEPING b2", start=mark)
        _get(a3, "/pid")  # B hands it back to A
        assert a3r.response().body == a_pid
        assert b1r.response().body == b_pid
        _get(a3, "/pid")  # B closed its copy as its call ended: that did not end it for A
        assert a3r.response().body == a_pid


@pytest.mark.timeout(60)
def test_a_long_call_after_a_quiet_spell_is_watched_too(start_server):
    """With no call running for a second the master stops polling the workers' calls; a
    worker beginning one tells it, so the connections waiting behind it still move."""
    server = start_server("wsgiapp:app", "-w", "2", "--threads", "1", "--log-level", "debug")
    with _connections_by_worker(server, 2) as (a_pid, a_conns, b_pid, _):
        (a1, a1r), (a2, a2r) = a_conns[:2]
        mark = server.mark()
        server.wait_for("watching calls only once one begins", start=mark)
        _get(a1, "/sleep?s=2&tag=long")
        server.wait_for("SLEEPING long", start=mark)
        _get(a2, "/pid")
        assert a2r.response().body == b_pid
        server.wait_for("watching calls again", start=mark)
        assert a1r.response().body == a_pid


def test_threads_serve_concurrently_and_idle_connections_pin_no_thread(start_server):
    server = start_server("wsgiapp:app", "-w", "1", "--threads", "2")
    idle = []
    for _ in range(6):  # more idle keep-alive connections than threads
        sock = server.connect()
        sock.sendall(HELLO)
        assert Reader(sock).response().status == 200
        idle.append(sock)
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(
                lambda _: exchange(server, b"GET /barrier HTTP/1.1\r\nHost: t\r\n\r\n").body,
                range(2)))
        assert results == [b"together", b"together"]  # both requests were in the app at once
        # The idle connections still work afterwards.
        for sock in idle:
            sock.sendall(HELLO)
            assert Reader(sock).response().status == 200
    finally:
        for sock in idle:
            sock.close()


def test_keep_alive_timeout_closes_idle_connections(start_server):
    server = start_server("wsgiapp:app", "-w", "1", "--keep-alive", "1")
    with server.connect() as sock:
        sock.sendall(HELLO)
        assert Reader(sock).response().status == 200
        sock.settimeout(5)
        started = time.monotonic()
        assert sock.recv(10) == b""
        assert 0.5 < time.monotonic() - started < 4


def test_unix_socket_and_tcp_together(start_server, tmp_path):
    path = tmp_path / "fs.sock"
    server = start_server("wsgiapp:app", "-w", "1", "-b", f"unix:{path}", "-b", "127.0.0.1:0")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"GET /environ HTTP/1.1\r\nHost: t\r\n\r\n")
        assert b'"REMOTE_ADDR": ""' in Reader(sock).response().body
    tcp_url = server.wait_for(r"listening at (http://\S+)").group(1)
    server.port = int(tcp_url.rsplit(":", 1)[1])
    assert exchange(server, HELLO).status == 200
    os.kill(server.pid, signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not path.exists()  # the master that created the socket file removed it


def test_stale_unix_socket_is_replaced(start_server, tmp_path):
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    start_server("wsgiapp:app", "-w", "1", "-b", f"unix:{path}")


def test_inherited_fd():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    fd = listener.fileno()
    proc = subprocess.Popen(
        forkserve_command() + ["wsgiapp:app", "-w", "1", "-b", f"fd://{fd}"],
        cwd=APPS, pass_fds=(fd,), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    listener.close()  # only the server holds it now
    try:
        for line in proc.stdout:
            if READY.search(line.decode()):
                break
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(HELLO)
            assert Reader(sock).response().status == 200
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()


def test_flask_app_end_to_end(start_server):
    pytest.importorskip("flask")
    server = start_server("flaskapp:app", "-w", "2")
    assert exchange(server, HELLO.replace(b"/hello", b"/")).body == b"Hello from Flask"
    body = b'{"n": 41}'
    response = exchange(server, b"POST /json HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                                b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert response.status == 200 and response.body.strip() == b'{"n":42}'
    chunked = (b"POST /json HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n4\r\n{\"n\"\r\n5\r\n: 99}\r\n0\r\n\r\n")
    assert exchange(server, chunked).body.strip() == b'{"n":100}'
    form = b"name=forkserve&kind=server"
    response = exchange(server, b"POST /form HTTP/1.1\r\nHost: t\r\nContent-Type: "
                                b"application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(form), form))
    assert response.body == b"forkserve is a server"
    response = exchange(server, b"GET /boom HTTP/1.1\r\nHost: t\r\n\r\n")
    assert response.status == 500
    server.wait_for("ZeroDivisionError")


def test_django_app_end_to_end(start_server):
    pytest.importorskip("django")
    server = start_server("djangoapp", "-w", "1")  # MODULE alone: finds `application`
    assert exchange(server, HELLO.replace(b"/hello", b"/")).body == b"Hello from Django"
    response = exchange(server, b"POST /echo/a%2Fb HTTP/1.1\r\nHost: example.org\r\n"
                                b"Content-Length: 5\r\n\r\nhello")
    assert response.status == 200
    assert json.loads(response.body) == {
        "length": 5, "path": "/echo/a/b", "raw_uri": "/echo/a%2Fb", "host": "example.org"}


def test_master_never_imports_the_app(start_server):
    server = start_server("importmark:app", "-w", "2")
    importers = {int(m) for m in re.findall(r"importmark imported by pid (\d+)", server.log)}
    assert importers == set(server.workers())
    assert server.pid not in importers


def test_python_dash_m_works(tmp_path):
    result = subprocess.run([sys.executable, "-m", "forkserve", "--version"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.startswith("forkserve ")


@pytest.mark.parametrize("threads", ["1", "4"])
def test_an_idle_connection_may_bring_one_request_while_stopping(start_server, threads):
    """A client that sends a request just as its worker stops is served, not reset: open
    connections get STOP_GRACE to bring one. The connection has been idle longer than
    --timeout, so a stale request start would look stuck to the thread check."""
    server = start_server("wsgiapp:app", "-w", "1", "--threads", threads, "--timeout", "1")
    (worker,) = server.workers()
    with server.connect() as sock:
        sock.sendall(HELLO)
        reader = Reader(sock)
        assert reader.response().status == 200  # the worker holds this connection now
        time.sleep(1.5)  # a duration under test (idle past --timeout), not a synchronisation
        os.kill(worker, signal.SIGTERM)
        sock.sendall(HELLO)
        assert reader.response().status == 200
        assert closed_by_peer(sock)
