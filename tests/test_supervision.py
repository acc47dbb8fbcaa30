"""The master under signals, crashes, hangs, reloads and upgrades: real processes throughout."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time

import pytest
from conftest import (
    APP_OF,
    APPS,
    LISTENING,
    READY,
    LoadClient,
    Reader,
    Server,
    children,
    exchange,
    forkserve_command,
    group_members,
    wait_in_file,
)
from test_process import wait_gone

HELLO = b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n"


def problems(server: Server) -> list[str]:
    """The ERROR and WARNING lines of the server's log, less what the test apps write to
    wsgi.errors themselves (SLEEPING tags)."""
    return [line for line in server.lines if re.search(r"\[(ERROR|WARNING)\]", line)
            and "SLEEPING" not in line]


def get(server: Server, path: bytes) -> bytes:
    return exchange(server, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path).body


def test_ttin_and_ttou_change_the_worker_count(start_server):
    server = start_server("wsgiapp:app", "-w", "2")
    mark = server.mark()
    os.kill(server.pid, signal.SIGTTIN)
    server.wait_for(r"worker 3 booted", start=mark)
    assert len(server.workers()) == 3
    for expected in (2, 1):
        mark = server.mark()
        os.kill(server.pid, signal.SIGTTOU)
        server.wait_for(rf"SIGTTOU: now {expected} workers", start=mark)
        server.wait_for(r"exited with status 0", start=mark)
        assert len(server.workers()) == expected
    os.kill(server.pid, signal.SIGTTOU)
    server.wait_for(r"SIGTTOU: already at 1 worker")
    assert len(server.workers()) == 1
    assert exchange(server, HELLO).status == 200


def test_signals_during_startup_are_not_lost(start_server):
    server = start_server("wsgiapp:app", "-w", "1", ready=False)
    server.wait_for(LISTENING)  # the master is up; its workers may not be
    # Two different signals at once are both delivered (the same one twice may merge into
    # one in the kernel, as POSIX allows, so the second TTIN waits for the first).
    os.kill(server.pid, signal.SIGTTIN)
    os.kill(server.pid, signal.SIGUSR1)
    server.wait_for(r"now 2 workers")
    os.kill(server.pid, signal.SIGTTIN)
    server.wait_for(r"now 3 workers")
    server.wait_for(r"SIGUSR1: log files reopened")
    server.wait_for(r"worker 3 booted")
    assert len(server.workers()) == 3


def test_signals_during_shutdown_do_not_derail_it(start_server):
    server = start_server("wsgiapp:app", "-w", "2", "--threads", "2")
    with server.connect() as sock:
        sock.sendall(b"GET /sleep?s=1&tag=busy HTTP/1.1\r\nHost: t\r\n\r\n")
        server.wait_for("SLEEPING busy")
        os.kill(server.pid, signal.SIGTERM)
        server.wait_for("SIGTERM: graceful stop")
        for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGUSR2, signal.SIGWINCH):
            os.kill(server.pid, signum)
        assert Reader(sock).response().status == 200
    assert server.wait_exit() == 0
    assert "SIGHUP ignored: stopping" in server.log
    assert "started new master" not in server.log


def test_worker_titles_count_requests(start_server):
    server = start_server("wsgiapp:app", "-w", "1")
    (worker,) = server.workers()
    for _ in range(3):
        exchange(server, HELLO)
    deadline = time.monotonic() + 10
    title = b""
    while time.monotonic() < deadline:  # the title is refreshed on the worker's next tick
        with open(f"/proc/{worker}/cmdline", "rb") as f:
            title = f.read().rstrip(b"\0")
        if title.endswith(b" 3 requests"):
            break
        time.sleep(0.05)
    assert title == b"forkserve: worker 1 [wsgiapp:app] 3 requests"


def test_hung_worker_dumps_traceback_then_is_replaced(start_server):
    server = start_server("wsgiapp:app", "-w", "1", "--timeout", "1")
    (old,) = server.workers()
    mark = server.mark()
    with server.connect() as sock:
        sock.sendall(b"GET /sleep?s=60&tag=hang HTTP/1.1\r\nHost: t\r\n\r\n")
        match = server.wait_for(
            rf"worker 1 \(pid {old}\) silent for ([\d.]+) s \(limit 1 s\), stuck in "
            r"'GET /sleep\?s=60&tag=hang' for [\d.]+ s", start=mark)
        assert float(match.group(1)) >= 1.0
        server.wait_for(r"line \d+ in sleep", start=mark)  # where it was stuck
        server.wait_for(rf"worker 1 \(pid {old}\) killed by SIGKILL \(hung\)", start=mark)
        server.wait_for(r"worker 1 booted", start=mark)
    assert "Current thread" in server.log or "Thread 0x" in server.log
    assert old not in server.workers()
    assert exchange(server, HELLO).status == 200


def test_a_request_stuck_in_a_thread_gets_its_worker_replaced(start_server):
    """With --threads the loop goes on beating while a pool thread is stuck in the app: the
    worker itself reports the stuck request; the master has it dump its tracebacks and
    replaces it, and it stops by itself (its other threads finish) instead of being killed."""
    server = start_server("wsgiapp:app", "-w", "1", "--threads", "2", "--timeout", "1")
    (old,) = server.workers()
    mark = server.mark()
    with server.connect() as stuck:
        stuck.sendall(b"GET /sleep?s=60&tag=stuck HTTP/1.1\r\nHost: t\r\n\r\n")
        server.wait_for("SLEEPING stuck", start=mark)
        assert exchange(server, HELLO).status == 200  # the other thread still serves
        server.wait_for(rf"worker 1 \(pid {old}\) stuck in 'GET /sleep\?s=60&tag=stuck' in a "
                        r"thread for [\d.]+ s \(limit 1 s\); its tracebacks follow", start=mark)
        server.wait_for(r"line \d+ in sleep", start=mark)  # the stuck thread's traceback
        server.wait_for(r"worker 2 booted", start=mark)
        server.wait_for(rf"worker 1 \(pid {old}\) exited with status 0", start=mark)
    assert "SIGKILL" not in "\n".join(server.lines[mark:])
    assert old not in server.workers()
    assert exchange(server, HELLO).status == 200


def test_worker_stuck_booting_is_killed_after_boot_timeout(start_server):
    result = subprocess.run(
        forkserve_command() + ["slowboot:app", "-w", "1", "-b", "127.0.0.1:0",
                               "--boot-timeout", "1"],
        cwd=APPS, capture_output=True, text=True, timeout=30, start_new_session=True)
    assert result.returncode == 3
    assert "still booting for" in result.stderr
    assert "in <module>" in result.stderr  # the traceback shows the import that hangs


@pytest.mark.parametrize(("path", "reason"), [
    (b"/garbage", "sent garbage on its pipe"),
    (b"/close-pipe", "closed its pipe"),
])
def test_bad_pipe_traffic_kills_only_that_worker(start_server, path, reason):
    server = start_server("wsgiapp:app", "-w", "1")
    (old,) = server.workers()
    mark = server.mark()
    with server.connect() as sock:  # the worker may be killed before it answers
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
    server.wait_for(rf"killing worker 1 \(pid {old}\): {reason}", start=mark)
    server.wait_for(r"worker 1 booted", start=mark)
    assert exchange(server, HELLO).status == 200
    assert server.proc.poll() is None


def test_crash_loop_backs_off(start_server):
    server = start_server("crashloop:app", "-w", "1")
    server.wait_for(r"3 failures in a row: next worker starts in 1\.0 s")
    server.wait_for(r"4 failures in a row: next worker starts in 2\.0 s")
    assert server.proc.poll() is None  # the master keeps trying, slower and slower


def test_boot_failure_exits_fast_and_leaves_no_orphan():
    proc = subprocess.Popen(forkserve_command() + ["broken:app", "-w", "3", "-b", "127.0.0.1:0"],
                            cwd=APPS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        assert proc.wait(10) == 3
        assert group_members(proc.pid) == []
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_hup_under_load_replaces_every_worker_with_zero_errors(start_server):
    server = start_server("wsgiapp:app", "-w", "2")
    old = set(server.workers())
    with LoadClient(server, threads=4) as load:
        load.wait_for_requests(200)
        mark = server.mark()
        os.kill(server.pid, signal.SIGHUP)
        server.wait_for(r"replaced 2 workers", start=mark)
        for pid in old:
            server.wait_for(rf"\(pid {pid}\) exited with status 0", start=mark)
        load.wait_for_requests(200)
    assert load.errors == []
    new = set(server.workers())
    assert len(new) == 2 and not new & old
    assert load.pids >= new


def test_hup_twice_quickly_and_with_threads(start_server):
    server = start_server("wsgiapp:app", "-w", "2", "--threads", "3")
    old = set(server.workers())
    with LoadClient(server, threads=4) as load:
        load.wait_for_requests(100)
        mark = server.mark()
        os.kill(server.pid, signal.SIGHUP)
        os.kill(server.pid, signal.SIGHUP)
        server.wait_for(r"replaced \d workers", start=mark)
        for pid in old:
            server.wait_for(rf"\(pid {pid}\) exited with status 0", start=mark)
        load.wait_for_requests(200)
    assert load.errors == []
    assert not set(server.workers()) & old


def test_hup_with_broken_app_keeps_old_workers_serving(start_server, tmp_path):
    module = tmp_path / "flipapp.py"
    module.write_text("def app(environ, start_response):\n"
                      "    start_response('200 OK', [('Content-Length', '2')])\n"
                      "    return [b'v1']\n")
    server = start_server("flipapp:app", "-w", "1", "--chdir", str(tmp_path))
    old = server.workers()
    module.write_text("raise RuntimeError('v2 is broken')\n")
    mark = server.mark()
    os.kill(server.pid, signal.SIGHUP)
    server.wait_for(r"RuntimeError: v2 is broken", start=mark)
    server.wait_for(r"failed to boot again", start=mark)
    assert get(server, b"/") == b"v1"
    assert server.workers()[0] in old
    # Fixed code boots on the next retry and then replaces the old worker.
    module.write_text("def app(environ, start_response):\n"
                      "    start_response('200 OK', [('Content-Length', '2')])\n"
                      "    return [b'v3']\n")
    server.wait_for(r"replaced 1 workers", start=mark, timeout=30)
    # (the old worker may take one more connection until it handles its TERM)
    server.wait_for(rf"\(pid {old[0]}\) exited", start=mark)
    assert get(server, b"/") == b"v3"


def test_master_stops_when_no_worker_can_boot_any_more(start_server, tmp_path):
    module = tmp_path / "doomed.py"
    module.write_text("def app(environ, start_response):\n"
                      "    start_response('200 OK', [('Content-Length', '2')])\n"
                      "    return [b'ok']\n")
    server = start_server("doomed:app", "-w", "1", "--chdir", str(tmp_path))
    module.write_text("raise RuntimeError('cannot boot any more')\n")
    os.kill(server.workers()[0], signal.SIGKILL)
    assert server.wait_exit(60) == 3
    assert "workers keep failing to boot and none is serving: stopping" in server.log
    assert server.log.count("RuntimeError: cannot boot any more") == 2  # first and last


def test_usr2_upgrade_under_load_with_zero_errors(start_server, tmp_path):
    pidfile = tmp_path / "fs.pid"
    sock_path = tmp_path / "fs.sock"
    server = start_server("wsgiapp:app", "-w", "2", "--pid", str(pidfile), "-b", "127.0.0.1:0",
                          "-b", f"unix:{sock_path}")
    tcp = re.findall(r"listening at http://127\.0\.0\.1:(\d+)", server.log)
    server.port = int(tcp[0])
    assert int(pidfile.read_text()) == server.pid
    old_workers = set(server.workers())
    with LoadClient(server, threads=4) as load:
        load.wait_for_requests(200)
        mark = server.mark()
        os.kill(server.pid, signal.SIGUSR2)
        new_master = int(server.wait_for(r"USR2: started new master pid (\d+)", start=mark)[1])
        server.wait_for(rf"\[{new_master}\] \[INFO\] ready: 2 workers", start=mark)
        assert int(pidfile.read_text()) == new_master
        assert int((tmp_path / "fs.pid.oldbin").read_text()) == server.pid
        load.wait_for_requests(200)
        os.kill(server.pid, signal.SIGTERM)  # retire the old master and its workers
        assert server.wait_exit() == 0
        load.wait_for_requests(200)
    try:
        assert load.errors == []
        assert not (tmp_path / "fs.pid.oldbin").exists()
        assert int(pidfile.read_text()) == new_master
        assert sock_path.exists()  # handed over, not removed by the old master
        new_workers = set(children(new_master))
        assert len(new_workers) == 2 and not new_workers & old_workers
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(sock_path))
            sock.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
            assert int(Reader(sock).response().body) in new_workers
    finally:
        os.kill(new_master, signal.SIGTERM)
        wait_gone([new_master])
    assert not pidfile.exists()
    assert not sock_path.exists()


def test_winch_stops_workers_and_hup_brings_them_back(start_server):
    server = start_server("wsgiapp:app", "-w", "2")
    old = server.workers()
    mark = server.mark()
    os.kill(server.pid, signal.SIGWINCH)
    for pid in old:
        server.wait_for(rf"\(pid {pid}\) exited with status 0", start=mark)
    assert server.workers() == []
    assert server.proc.poll() is None
    mark = server.mark()
    os.kill(server.pid, signal.SIGHUP)
    server.wait_for_count(r"worker \d booted", 2, start=mark)
    assert len(server.workers()) == 2
    assert exchange(server, HELLO).status == 200


def test_term_lets_slow_requests_finish(start_server):
    server = start_server("wsgiapp:app", "-w", "1", "--threads", "4")
    socks = []
    for i in range(3):
        sock = server.connect()
        sock.sendall(b"GET /sleep?s=1&tag=slow%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
        socks.append(sock)
    for i in range(3):
        server.wait_for(rf"SLEEPING slow{i}")
    os.kill(server.pid, signal.SIGTERM)
    for sock in socks:
        response = Reader(sock).response()
        assert response.status == 200
        sock.close()
    assert server.wait_exit() == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGQUIT],
                         ids=["INT", "TERM", "QUIT"])
def test_signal_to_the_whole_process_group_is_a_clean_stop(start_server, interface, signum):
    # What Ctrl-C does in a terminal (INT), and `kill -TERM -- -PGID` or `timeout`: every
    # process of the group gets the signal at once, the workers before the master can act.
    server = start_server(APP_OF[interface], "-w", "2")
    with server.connect() as sock:
        sock.sendall(b"GET /sleep?s=1&tag=slow HTTP/1.1\r\nHost: t\r\n\r\n")
        server.wait_for("SLEEPING slow")
        os.killpg(server.pid, signum)
        assert server.wait_exit() == 0
        if signum == signal.SIGTERM:  # graceful: the request in flight completes
            assert Reader(sock).response().status == 200
    assert not problems(server), server.log
    assert "not by the master" not in server.log  # reaped as part of the stop
    assert re.search(rf"{signum.name}: (graceful|quick) stop of 2 workers", server.log)


def test_worker_sent_term_directly_finishes_its_request_and_is_replaced(start_server,
                                                                        interface):
    server = start_server(APP_OF[interface], "-w", "1")
    [worker] = server.workers()
    mark = server.mark()
    with server.connect() as sock:
        sock.sendall(b"GET /sleep?s=1&tag=slow HTTP/1.1\r\nHost: t\r\n\r\n")
        server.wait_for("SLEEPING slow")
        os.kill(worker, signal.SIGTERM)
        assert Reader(sock).response().status == 200
    server.wait_for(rf"worker 1 \(pid {worker}\) exited with status 0 on SIGTERM sent to it, "
                    r"not by the master; starting a replacement", start=mark)
    server.wait_for(r"worker 1 booted", start=mark)
    assert exchange(server, HELLO).status == 200
    assert not problems(server), server.log


def test_graceful_timeout_kills_requests_that_take_too_long(start_server):
    server = start_server("wsgiapp:app", "-w", "1", "--graceful-timeout", "1")
    with server.connect() as sock:
        sock.sendall(b"GET /sleep?s=30&tag=long HTTP/1.1\r\nHost: t\r\n\r\n")
        server.wait_for("SLEEPING long")
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait_exit(10) == 0
    assert "still running at the stop deadline" in server.log


def test_max_requests_recycles_with_replacement_first(start_server):
    server = start_server("wsgiapp:app", "-w", "1", "--max-requests", "20")
    (old,) = server.workers()
    with LoadClient(server, threads=2) as load:
        server.wait_for(rf"worker 1 \(pid {old}\) recycling: served \d+ requests")
        server.wait_for(rf"replaced 1 workers \(pid {old}\)")
        server.wait_for(rf"\(pid {old}\) exited with status 0")
        load.wait_for_requests(50)
    assert load.errors == []
    assert old not in server.workers()


def test_max_worker_memory_recycles(start_server):
    server = start_server("wsgiapp:app", "-w", "1", "--max-worker-memory", "60")
    (old,) = server.workers()
    assert get(server, b"/grow?mb=80")
    server.wait_for(rf"worker 1 \(pid {old}\) recycling: resident memory reached \d+ MiB > "
                    r"--max-worker-memory 60")
    server.wait_for(rf"\(pid {old}\) exited with status 0")
    assert exchange(server, HELLO).status == 200


def test_preload_imports_once_in_the_master(start_server):
    server = start_server("importmark:app", "-w", "2", "--preload")
    importers = re.findall(r"importmark imported by pid (\d+)", server.log)
    assert importers == [str(server.pid)]
    assert "preloaded importmark:app" in server.log
    assert exchange(server, HELLO.replace(b"/hello", b"/")).body == b"ok"


def test_preload_failure_is_reported_once_and_exits_3():
    result = subprocess.run(forkserve_command() + ["broken:app", "--preload", "-b", "127.0.0.1:0"],
                            cwd=APPS, capture_output=True, text=True, timeout=30)
    assert result.returncode == 3
    assert result.stderr.count("RuntimeError: broken on purpose") == 1


def test_pidfile_written_after_bind_and_removed_at_exit(start_server, tmp_path):
    pidfile = tmp_path / "run" / "fs.pid"
    pidfile.parent.mkdir()
    server = start_server("wsgiapp:app", "-w", "1", "--pid", str(pidfile))
    assert pidfile.read_text() == f"{server.pid}\n"
    os.kill(server.pid, signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not pidfile.exists()


def test_pidfile_of_a_running_process_is_refused(tmp_path):
    pidfile = tmp_path / "fs.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # this test process is alive
    result = subprocess.run(forkserve_command() + ["wsgiapp:app", "-b", "127.0.0.1:0",
                                                   "--pid", str(pidfile)],
                            cwd=APPS, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"names running process {os.getpid()}" in result.stderr
    assert pidfile.read_text() == f"{os.getpid()}\n"


def test_usr1_reopens_log_files(start_server, tmp_path):
    log = tmp_path / "error.log"
    server = start_server("wsgiapp:app", "-w", "1", "--error-logfile", str(log), ready=False)
    wait_in_file(log, READY)
    server.port = int(re.search(r"listening at http://127\.0\.0\.1:(\d+)", log.read_text())[1])
    log.rename(tmp_path / "error.log.1")  # what logrotate does
    os.kill(server.pid, signal.SIGUSR1)
    wait_in_file(log, re.compile("SIGUSR1: log files reopened"))
    wait_in_file(log, re.compile(r"worker 1 reopened its log files"))
    assert exchange(server, b"GET /fail HTTP/1.1\r\nHost: t\r\n\r\n").status == 500
    wait_in_file(log, re.compile("RuntimeError: deliberate failure"))
    assert "deliberate failure" not in (tmp_path / "error.log.1").read_text()


def test_config_file_settings_and_every_hook(start_server):
    server = start_server("-c", "hooks_config.py", "wsgiapp:app")
    master = server.pid
    server.wait_for(rf"HOOK on_starting master={master} size=2")
    server.wait_for(rf"HOOK when_ready master={master}")
    assert len(re.findall(rf"HOOK pre_fork in={master} number=\d", server.log)) == 2
    workers = server.workers()
    for pid in workers:
        server.wait_for(rf"HOOK post_fork in={pid} number=\d")
    mark = server.mark()
    os.kill(master, signal.SIGHUP)
    server.wait_for(rf"HOOK on_reload master={master}", start=mark)
    server.wait_for(r"hook on_reload raised", start=mark)
    server.wait_for(r"replaced 2 workers", start=mark)
    for pid in workers:
        server.wait_for(rf"HOOK worker_exit in={pid}", start=mark)
    assert exchange(server, HELLO).status == 200


def test_on_starting_exception_stops_the_start(tmp_path):
    config = tmp_path / "bad.py"
    config.write_text("def on_starting(server):\n    raise ValueError('no start today')\n")
    result = subprocess.run(forkserve_command() + ["-c", str(config), "wsgiapp:app", "-b",
                                                   "127.0.0.1:0"],
                            cwd=APPS, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "ValueError: no start today" in result.stderr


@pytest.mark.parametrize(("text", "message"), [
    ("workers = 'lots'\n", "workers: expected 'auto' or a whole number"),
    ("bogus_setting = 1\n", "unknown setting 'bogus_setting'"),
    ("timeout = [1]\n", "timeout: expected a string or number"),
    ("preload = 'yes'\n", "preload: expected True or False"),
    ("import nonexistent_module_xyz\n", "ModuleNotFoundError"),
])
def test_bad_config_file_is_one_line_and_exit_2(tmp_path, text, message):
    config = tmp_path / "conf.py"
    config.write_text(text)
    result = subprocess.run(forkserve_command() + ["-c", str(config)], cwd=APPS,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"config file {config}" in result.stderr and message in result.stderr


# -- helpers ------------------------------------------------------------------------------------
