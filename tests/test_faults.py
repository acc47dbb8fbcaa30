"""Faults an operator meets: requests that kill their worker, fork failures, a stopped master,
log files that cannot be written or reopened. Real processes, limits and file systems."""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import APP_OF, READY, Reader, closed_by_peer, exchange

HELLO = b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n"
CRASH = b"GET /crash HTTP/1.1\r\nHost: t\r\n\r\n"

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (limits, mounts, --user)")


def _wait_in_file(path: Path, pattern: str, timeout: float = 15.0) -> str:
    """Block until `path` holds a line matching `pattern` (the process writes it); return the
    file's text."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if regex.search(text):
            return text
        assert time.monotonic() < deadline, f"{pattern!r} never appeared in {path}:\n{text}"
        time.sleep(0.02)  # a file offers nothing to block on


def test_requests_that_kill_their_worker_do_not_cause_an_outage(start_server):
    # os._exit in a request is what a segfault in a C extension looks like to the master.
    server = start_server("wsgiapp:app", "-w", "2")
    for _ in range(12):
        with server.connect() as sock:
            sock.sendall(CRASH)
            assert sock.recv(1) == b""  # the worker died without answering
        began = time.monotonic()
        assert exchange(server, HELLO).status == 200
        # Without a crash-loop backoff in the way, the next request waits one respawn at
        # most (before: 0.5 s, then 1, 2, 4... and 9 s or more with no worker at all).
        assert time.monotonic() - began < 5.0
    # (the master may log the last crash after the next request was served by the other worker)
    server.wait_for_count(r"exited with status 3 while serving 'GET /crash' \([\d.]+ s in\); "
                          r"replacing it", 12)
    assert "failures in a row" not in server.log


def test_worker_dying_right_after_boot_still_backs_off(start_server):
    # crashloop's workers die 0.3 s after booting without ever taking a connection: that is
    # a boot problem, and respawning it in a tight loop would be a fork bomb.
    server = start_server("crashloop:app", "-w", "1")
    server.wait_for(r"right after booting, before taking a connection")
    server.wait_for(r"3 failures in a row: next worker starts in 1\.0 s")


@root_only
@pytest.mark.timeout(30)
def test_fork_failures_back_off_and_recover(start_server, public_apps):
    # As root the process limit does not apply; as nobody (after the drop) it does. The
    # limit of 3 holds the master, one worker and a process of ours: the second worker cannot
    # be forked until ours ends.
    def limit_processes() -> None:
        resource.setrlimit(resource.RLIMIT_NPROC, (3, 3))

    if subprocess.run(["pgrep", "-u", "nobody"], capture_output=True).returncode == 0:
        pytest.skip("processes of user nobody already run here: the limit would be off")
    occupant = subprocess.Popen(["sleep", "60"], user="nobody")
    try:
        server = start_server("importmark:app", "-w", "2", "--user", "nobody", ready=False,
                              cwd=public_apps, preexec_fn=limit_processes)
        server.wait_for(r"cannot fork worker 2: Resource temporarily unavailable; retrying "
                        r"in 0\.5 s")
        master_cpu_before = _cpu_seconds(server.pid)
        time.sleep(2.0)  # the window over which the retry rate is measured
        assert len(re.findall("cannot fork", server.log)) == 1  # once per episode
        assert _cpu_seconds(server.pid) - master_cpu_before < 0.5  # no busy loop
    finally:
        occupant.kill()
        occupant.wait()
    server.wait_for(r"fork works again, after \d+ failed attempts", timeout=40)
    server.wait_for(READY, timeout=40)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_stopped_master_does_not_take_workers_for_hung(start_server):
    server = start_server("wsgiapp:app", "-w", "2", "--timeout", "2")
    workers = sorted(server.workers())
    os.kill(server.pid, signal.SIGSTOP)
    time.sleep(4)  # the fault itself: stopped past --timeout
    os.kill(server.pid, signal.SIGCONT)
    server.wait_for(r"the master's loop was stopped for [\d.]+ s")
    assert exchange(server, HELLO).status == 200
    assert "silent for" not in server.log
    assert sorted(server.workers()) == workers


def test_usr1_with_the_log_folder_gone_keeps_serving(start_server, tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    server = start_server("wsgiapp:app", "-w", "1", "--error-logfile",
                          str(folder / "error.log"), ready=False)
    _wait_in_file(folder / "error.log", READY.pattern)
    port = re.search(r"listening at http://127\.0\.0\.1:(\d+)",
                     (folder / "error.log").read_text())
    assert port
    server.port = int(port[1])
    moved = tmp_path / "moved"
    folder.rename(moved)  # the folder is gone from where the server looks for it
    os.kill(server.pid, signal.SIGUSR1)
    text = _wait_in_file(moved / "error.log", r"SIGUSR1: cannot reopen log file .*error\.log: "
                                              r"No such file or directory; still writing")
    assert exchange(server, HELLO).status == 200
    assert server.proc.poll() is None
    assert len(re.findall("cannot reopen", text)) == 1  # the master's line; workers are quiet


@pytest.fixture
def small_filesystem(tmp_path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted for the test (skipped where mounting is not allowed)."""
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@root_only
def test_a_full_disk_under_the_log_is_reported_once_then_recovers(start_server,
                                                                   small_filesystem):
    log = small_filesystem / "access.log"
    server = start_server("wsgiapp:app", "-w", "1", "--access-logfile", str(log))
    filler = small_filesystem / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the file system to the last block
        try:
            while True:
                f.write(b"x" * 1024)
        except OSError:
            pass
    for _ in range(200):  # 200 access-log records that cannot be written
        assert exchange(server, HELLO).status == 200
    reports = [line for line in server.lines if "cannot write to" in line]
    assert len(reports) == 1 and "No space left on device" in reports[0], server.log
    assert "Logging error" not in server.log and "Traceback" not in server.log
    filler.unlink()
    assert exchange(server, HELLO).status == 200
    _wait_in_file(log, r"\d+ log records were lost while the log could not be written")
    shutil.disk_usage(small_filesystem)  # still mounted and readable


@pytest.mark.parametrize("app", ["wsgiapp:app", "wsgiapp:app --threads 4", "asgiapp:app"])
@pytest.mark.parametrize("kind", ["exit", "interrupt"])
def test_system_exit_and_keyboard_interrupt_from_the_app_are_500(start_server, app, kind):
    server = start_server(*app.split(), "-w", "1")
    workers = server.workers()
    request = b"GET /raise-exit?kind=%s HTTP/1.1\r\nHost: t\r\n\r\n" % kind.encode()
    assert exchange(server, request).status == 500
    server.wait_for("SystemExit: 4" if kind == "exit" else "KeyboardInterrupt")
    assert exchange(server, HELLO).status == 200
    assert server.workers() == workers  # the same worker serves on


def test_max_worker_memory_is_checked_after_every_request(start_server, interface):
    # A leak of 20 MiB a request, on one keep-alive connection: checked once a second, the
    # worker overshot a 100 MiB limit several times over.
    server = start_server(APP_OF[interface], "-w", "1", "--max-worker-memory", "100")
    (old,) = server.workers()
    peak = 0
    with server.connect() as sock:
        reader = Reader(sock)
        for _ in range(15):
            sock.sendall(b"GET /grow?mb=20 HTTP/1.1\r\nHost: t\r\n\r\n")
            response = reader.response()
            assert response.status == 200
            peak = max(peak, int(response.body))
            if response.header("connection") == "close":
                break  # over the limit: the worker lets this client go
    # What the app held when it let the client go: the request that crossed the limit, and
    # (checked once the response is out) one more at most.
    assert peak <= (100 + 20) * 1024 * 1024
    server.wait_for(rf"worker 1 \(pid {old}\) recycling: resident memory reached \d+ MiB")
    server.wait_for(rf"\(pid {old}\) exited with status 0")
    assert exchange(server, HELLO).status == 200


def test_out_of_descriptors_is_logged_once_per_episode(start_server, interface):
    server = start_server(APP_OF[interface], "-w", "1")
    (worker,) = server.workers()
    in_use = len(os.listdir(f"/proc/{worker}/fd"))
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (in_use + 2, 4096))
    clients = [server.connect() for _ in range(8)]  # two fit; the rest wait in the queue
    try:
        server.wait_for(r"cannot accept connections: Too many open files; pausing 0\.5 s")
        cpu_before = _cpu_seconds(worker)
        time.sleep(1.6)  # three more pauses: the window over which the lines are counted
        assert len(re.findall("cannot accept connections", server.log)) == 1
        assert _cpu_seconds(worker) - cpu_before < 0.5  # paused, not spinning
    finally:
        for sock in clients:
            sock.close()
    server.wait_for(r"accepting connections again after [\d.]+ s \(\d+ pauses\)")
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (4096, 4096))
    assert exchange(server, HELLO).status == 200


def test_a_new_connection_gets_header_timeout_for_its_first_byte(start_server, interface):
    server = start_server(APP_OF[interface], "-w", "1", "--header-timeout", "1",
                          "--keep-alive", "60")
    with server.connect() as sock:
        began = time.monotonic()
        assert closed_by_peer(sock, timeout=10)
        assert time.monotonic() - began < 5  # not --keep-alive's 60 s


def test_idle_connections_do_not_lock_out_normal_clients(start_server, interface):
    # More connections that send nothing than every worker may hold: before, each worker
    # stopped accepting at --worker-connections and normal clients waited in the queue
    # behind them for --keep-alive.
    server = start_server(APP_OF[interface], "-w", "2", "--worker-connections", "50",
                          "--keep-alive", "60")
    idle = []
    try:
        for _ in range(300):
            idle.append(server.connect())
        for _ in range(20):
            with server.connect() as sock:
                sock.settimeout(5)
                sock.sendall(HELLO)
                assert Reader(sock).response().status == 200
    finally:
        for sock in idle:
            sock.close()


def test_asgi_worker_stopped_during_startup_runs_lifespan_shutdown(start_server):
    server = start_server("asgiapp:slow_startup", "-w", "1", ready=False)
    server.wait_for("LIFESPAN startup begins")
    os.kill(server.pid, signal.SIGTERM)
    assert server.wait_exit() == 0
    assert re.search(r"LIFESPAN shutdown \d+", server.log)
    assert "[ERROR]" not in server.log and "CancelledError" not in server.log


@pytest.mark.timeout(30)
def test_an_orphaned_asgi_worker_ends_within_graceful_timeout(start_server):
    # A request that never ends kept a worker whose master died running forever.
    server = start_server("asgiapp:app", "-w", "1", "--graceful-timeout", "2")
    (worker,) = server.workers()
    with server.connect() as sock:
        sock.sendall(b"GET /sleep?s=600&tag=forever HTTP/1.1\r\nHost: t\r\n\r\n")
        server.wait_for("SLEEPING forever")
        os.kill(server.pid, signal.SIGKILL)
        server.wait_for(rf"worker 1 \(pid {worker}\): the master is gone; exiting")
        began = time.monotonic()
        while os.path.exists(f"/proc/{worker}") and _state(worker) != "Z":
            assert time.monotonic() - began < 10, "the orphan is still running"
            time.sleep(0.05)  # nothing to block on: it is not our child


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def _cgroup_v1(controller: str, name: str) -> Path | None:
    """A new cgroup (v1) of `controller` under this process's own, or None if that cannot be
    made here."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            group = Path("/sys/fs/cgroup") / controller / path.lstrip("/") / name
            try:
                group.mkdir()
            except OSError:
                return None
            return group
    return None


@pytest.fixture
def cgroup(request) -> Iterator[Path]:
    """A fresh v1 cgroup of the controller named by the parameter; removed afterwards (its
    processes are gone by then: the server fixture kills them first)."""
    group = _cgroup_v1(request.param, f"forkserve-test-{os.getpid()}")
    if group is None:
        pytest.skip(f"cannot make a {request.param} cgroup here")
    yield group
    for pid in (group / "cgroup.procs").read_text().split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while True:
        try:
            group.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # the killed processes are still exiting


def _start_limited(start_server, cgroup: Path, mib: int, *args: str):
    """The test app's server in the v1 memory cgroup `cgroup`, limited to `mib` MiB."""
    (cgroup / "memory.limit_in_bytes").write_text(str(mib * 1024 * 1024))
    return start_server("wsgiapp:app", *args,
                        preexec_fn=lambda: (cgroup / "cgroup.procs").write_text("0"))


@root_only
@pytest.mark.parametrize("cgroup", ["memory"], indirect=True)
def test_workers_killed_by_the_oom_killer_are_replaced_at_once(start_server, cgroup):
    # A leaking app in a memory-limited container: the kernel kills a worker every few
    # requests. Each must be replaced at once, never leaving the service without workers.
    server = _start_limited(start_server, cgroup, 200, "-w", "2")
    killed = 0
    for _ in range(40):
        with server.connect() as sock:
            sock.sendall(b"GET /grow?mb=30 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            killed += Reader(sock).read_to_eof() == b""  # no answer: the worker was killed
        began = time.monotonic()
        assert exchange(server, HELLO).status == 200
        assert time.monotonic() - began < 5.0
    assert killed >= 2, server.log
    if "oom_kill " in (cgroup / "memory.oom_control").read_text():  # (Linux 4.13 and later)
        # (Killed in the app, as mostly, the line says which request it was serving.)
        assert re.search(r"killed by SIGKILL by the kernel's OOM killer \(the cgroup's oom_kill "
                         r"count went from \d+ to \d+\)( while serving 'GET /grow\?mb=30' "
                         r"\([\d.]+ s in\))?; replacing it", server.log)
    else:
        assert re.search(r"killed by SIGKILL \(not by forkserve: out of memory\?\).*; "
                         r"replacing it", server.log)
    assert "failures in a row" not in server.log


@root_only
@pytest.mark.parametrize("cgroup", ["memory"], indirect=True)
def test_workers_that_do_not_fit_the_memory_limit_are_named_once_ready(start_server, cgroup):
    server = _start_limited(start_server, cgroup, 100, "-w", "4")
    warning = server.wait_for(r"\[WARNING\] 4 workers of about (\d+) MiB each take (\d+) MiB, "
                              r"over 80% of the cgroup's memory limit of 100 MiB: (\d+) would "
                              r"fit \(-w \d+\); .* --max-worker-memory (\d+) recycles them")
    fit, share = int(warning[3]), int(warning[4])
    assert 1 <= fit < 4 and share == round(80 / fit)
    (cgroup / "memory.limit_in_bytes").write_text(str(4 * 1024 * 1024 * 1024))
    mark = server.mark()
    os.kill(server.pid, signal.SIGHUP)  # (checked when a server becomes ready, not on HUP)
    server.wait_for(r"replaced 4 workers", start=mark)
    assert server.log.count("would fit") == 1


@root_only
@pytest.mark.parametrize("cgroup", ["memory"], indirect=True)
def test_workers_that_fit_the_memory_limit_get_no_warning(start_server, cgroup):
    server = _start_limited(start_server, cgroup, 1024, "-w", "4")
    assert "WARNING" not in server.log  # (the check runs before the ready line)


@root_only
@pytest.mark.parametrize("cgroup", ["freezer"], indirect=True)
def test_a_frozen_server_is_not_taken_for_hung_when_thawed(start_server, cgroup):
    # What `docker pause` does: the master and its workers frozen together, past --timeout.
    server = start_server("wsgiapp:app", "-w", "2", "--timeout", "2",
                          preexec_fn=lambda: (cgroup / "cgroup.procs").write_text("0"))
    workers = sorted(server.workers())
    (cgroup / "freezer.state").write_text("FROZEN")
    time.sleep(4)  # the fault itself: frozen past --timeout
    (cgroup / "freezer.state").write_text("THAWED")
    server.wait_for(r"the master's loop was stopped for [\d.]+ s")
    assert exchange(server, HELLO).status == 200
    assert "silent for" not in server.log
    assert sorted(server.workers()) == workers


def test_a_worker_over_max_worker_memory_still_stops_when_replaced(start_server):
    # It stopped taking connections when it went over; the TERM that follows its
    # replacement's boot used to be ignored while an idle keep-alive client stayed connected
    # (killed at the stop deadline, with its memory held until then).
    server = start_server("wsgiapp:app", "-w", "1", "--max-worker-memory", "120")
    (old,) = server.workers()
    with server.connect() as idle, server.connect() as sock:
        idle.sendall(HELLO)
        assert Reader(idle).response().status == 200  # now idle, kept alive
        sock.sendall(b"GET /grow?mb=200 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert Reader(sock).response().status == 200
        server.wait_for(rf"worker 1 \(pid {old}\) recycling: resident memory reached")
        server.wait_for(rf"\(pid {old}\) exited with status 0", timeout=10)
    assert "killing worker" not in server.log
