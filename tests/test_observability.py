"""Seeing and steering a running server: --health-path, the control socket, forkserve ctl."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import APP_OF, APPS, Reader, exchange, forkserve_command
from prometheus_client.parser import text_string_to_metric_families
from test_process import wait_gone

HEALTH = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.mark.parametrize("interface", sorted(APP_OF))
def test_the_health_path_is_answered_without_the_app(start_server, interface):
    server = start_server(APP_OF[interface], "-w", "2", "--health-path", "/healthz")
    response = exchange(server, HEALTH)
    assert (response.status, response.body) == (200, b"ok\n")  # the app would say 404
    assert response.header("Cache-Control") == "no-store"
    assert exchange(server, b"GET /healthz?probe=1 HTTP/1.1\r\nHost: t\r\n\r\n").body == b"ok\n"
    head = exchange(server, b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n", head_request=True)
    assert (head.status, head.body, head.header("Content-Length")) == (200, b"", "3")
    post = exchange(server, b"POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    assert (post.status, post.header("Allow")) == (405, "GET, HEAD")
    assert exchange(server, b"GET /healthz/more HTTP/1.1\r\nHost: t\r\n\r\n").status == 404
    assert exchange(server, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n").status == 200
    with server.connect() as sock:  # keep-alive: probes on one connection
        reader = Reader(sock)
        for _ in range(3):
            sock.sendall(HEALTH)
            response = reader.response()
            assert response.status == 200 and response.header("Connection") is None


def test_without_a_health_path_the_app_answers_it(start_server):
    server = start_server("wsgiapp:app", "-w", "1")
    assert exchange(server, HEALTH).status == 404


def test_the_health_path_says_503_once_the_server_stops(start_server):
    server = start_server("wsgiapp:app", "-w", "2", "--threads", "2",
                          "--health-path", "/healthz")
    with server.connect() as probe, server.connect() as busy:
        probe_reader = Reader(probe)
        probe.sendall(HEALTH)
        assert probe_reader.response().status == 200
        busy.sendall(b"GET /sleep?s=2&tag=busy HTTP/1.1\r\nHost: t\r\n\r\n")
        server.wait_for("SLEEPING busy")  # keeps the stop graceful for a while
        os.kill(server.pid, signal.SIGTERM)
        server.wait_for("SIGTERM: graceful stop")
        probe.sendall(HEALTH)  # (an idle connection may bring one more request)
        response = probe_reader.response()
        assert (response.status, response.body) == (503, b"stopping\n")
        assert response.header("Connection") == "close"
        assert Reader(busy).response().status == 200
    assert server.wait_exit() == 0


def test_the_health_path_stays_200_while_a_reload_replaces_the_workers(start_server):
    server = start_server("wsgiapp:app", "-w", "2", "--health-path", "/healthz")
    with server.connect() as probe:
        reader = Reader(probe)
        probe.sendall(HEALTH)
        assert reader.response().status == 200
        mark = server.mark()
        os.kill(server.pid, signal.SIGHUP)
        server.wait_for("HUP: reloading", start=mark)
        # The probe's worker is told to stop once its replacement booted; until it closes
        # the connection, each probe is answered, the one after its stop began with
        # Connection: close.
        while True:
            probe.sendall(HEALTH)
            response = reader.response()
            assert (response.status, response.body) == (200, b"ok\n")
            if response.header("Connection") == "close":
                break
    server.wait_for(r"replaced 2 workers", start=mark)
    assert exchange(server, HEALTH).status == 200


# -- the control socket and forkserve ctl ---------------------------------------------------


def _ask(path: Path, *messages: object, raw: bytes = b"") -> list[dict]:
    """Send `messages` (each as a JSON line) then `raw`, and read an answer per line sent."""
    lines = [json.dumps(message).encode() + b"\n" for message in messages]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        try:
            sock.sendall(b"".join(lines) + raw)
        except BrokenPipeError:
            pass  # refused at once: the refusal waits to be read
        expected = len(lines) + raw.count(b"\n")
        data = b""
        while data.count(b"\n") < expected:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def _ctl(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(forkserve_command() + ["ctl", "--socket", str(path), *args],
                          capture_output=True, text=True, timeout=30)


def _status_as(path: Path, user: pwd.struct_passwd) -> dict:
    """The answer to "status" asked by a process running as `user` (forked, not executed:
    another user may not be allowed to run this checkout's interpreter), or the error it
    met connecting."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            try:
                answer = _ask(path, {"command": "status"})[0]
            except OSError as exc:
                answer = {"error": str(exc)}
            os.write(write_end, json.dumps(answer).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def _control_server(start_server, tmp_path: Path, *args: str) -> tuple:
    path = tmp_path / "control.sock"
    server = start_server("wsgiapp:app", *(args or ("-w", "2")), "--control-socket", str(path))
    server.wait_for(rf"control socket at {re.escape(str(path))}")
    return server, path


def test_status_names_the_master_and_every_worker(start_server, tmp_path):
    server, path = _control_server(start_server, tmp_path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for _ in range(5):
        assert exchange(server, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n").status == 200
    deadline = time.monotonic() + 10
    while True:  # the counts come with each worker's next heartbeat (at most 1 s)
        (answer,) = _ask(path, {"command": "status"})
        if sum(worker["served"] for worker in answer["workers"]) == 5:
            break
        assert time.monotonic() < deadline, answer
        time.sleep(0.1)
    master = answer["master"]
    assert answer["ok"] and master["pid"] == server.pid and master["state"] == "serving"
    assert master["workers"] == 2 and master["app"] == "wsgiapp:app"
    assert master["binds"] == [f"http://127.0.0.1:{server.port}"]
    workers = answer["workers"]
    assert sorted(worker["pid"] for worker in workers) == sorted(server.workers())
    for worker in workers:
        assert worker["state"] == "serving" and worker["in_flight"] == 0
        assert worker["heartbeat_age"] < 5 and worker["rss_kib"] > worker["pss_kib"] > 0
    table = _ctl(path, "status")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("forkserve ") and f"master {server.pid}  serving" in lines[0]
    assert lines[2].split()[:3] == ["#", "pid", "state"]
    assert sorted(int(line.split()[1]) for line in lines[3:]) == sorted(server.workers())
    assert json.loads(_ctl(path, "--json", "status").stdout)["master"]["pid"] == server.pid


def test_every_control_command_does_what_it_says(start_server, tmp_path):
    server, path = _control_server(start_server, tmp_path, "-w", "1")
    mark = server.mark()
    (worker,) = server.workers()
    dump = _ctl(path, "dump")
    assert dump.stdout == "the tracebacks of 1 workers go to the error log\n"
    server.wait_for(r"Current thread 0x[0-9a-f]+ \(most recent call first\)", start=mark)
    assert server.workers() == [worker]  # nothing stopped
    assert _ctl(path, "scale", "3").stdout == "now 3 workers\n"
    server.wait_for(r"control: scale: now 3 workers", start=mark)
    server.wait_for(r"worker 3 booted", start=mark)
    assert _ctl(path, "decr").returncode == 0
    server.wait_for(r"SIGTTOU: now 2 workers", start=mark)
    assert _ctl(path, "incr").returncode == 0
    server.wait_for(r"SIGTTIN: now 3 workers", start=mark)
    assert _ctl(path, "reopen-logs").returncode == 0
    server.wait_for(r"SIGUSR1: log files reopened", start=mark)
    workers = sorted(server.workers())
    mark = server.mark()
    assert _ctl(path, "reload").stdout == "reload: done (SIGHUP)\n"
    # (HUP reads the configuration again: back to -w 1)
    server.wait_for(r"HUP: reloading: starting 1 new workers before stopping 3", start=mark)
    server.wait_for(r"replaced 3 workers", start=mark)
    for pid in workers:  # (told to stop, they finish in their own time)
        server.wait_for(rf"\(pid {pid}\) exited with status 0", start=mark)
    assert not set(server.workers()) & set(workers)
    # (the reload is over once the old workers are told to stop: with or without systemd)
    assert _ask(path, {"command": "status"})[0]["master"]["state"] == "serving"
    assert _ctl(path, "stop").stdout == "stopping (graceful)\n"
    assert server.wait_exit() == 0
    assert "SIGTERM: graceful stop" in server.log
    assert not path.exists()


def test_stop_quick_through_the_control_socket(start_server, tmp_path):
    server, path = _control_server(start_server, tmp_path)
    assert _ask(path, {"command": "stop", "mode": "quick"}) == [
        {"ok": True, "stopping": "quick"}]
    assert server.wait_exit() == 0
    assert "SIGQUIT: quick stop" in server.log


def test_bad_requests_get_an_error_and_the_server_goes_on(start_server, tmp_path):
    server, path = _control_server(start_server, tmp_path)
    answers = _ask(path, {"command": "nope"}, ["status"], {"command": 3},
                   {"command": "scale", "workers": 0}, {"command": "scale", "workers": "2"},
                   {"command": "stop", "mode": "now"},
                   raw=b"{not json\n\xff\xfe\n\n" + json.dumps({"command": "status"}).encode()
                   + b"\n")
    errors = [answer.get("error") for answer in answers]
    assert errors[:8] == [
        "unknown command 'nope' (expected one of status, stats, stop, reload, scale, incr, "
        "decr, reopen-logs, dump)",
        'expected an object with a "command" string',
        'expected an object with a "command" string',
        'scale: expected "workers": a whole number from 1 to 1000',
        'scale: expected "workers": a whole number from 1 to 1000',
        'stop: "mode" is graceful or quick',
        "not JSON: Expecting property name enclosed in double quotes: line 1 column 2 "
        "(char 1)",
        "not JSON: Expecting value: line 1 column 1 (char 0)",  # (read as UTF-16)
    ]
    assert answers[8]["ok"] and answers[8]["master"]["pid"] == server.pid  # (empty line: none)
    (deep,) = _ask(path, raw=b"[" * 60_000 + b"\n")
    assert deep["error"].startswith("not JSON: maximum recursion depth exceeded")
    # A client that half-closes after its requests still gets every answer (more than the
    # socket buffers hold).
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall((json.dumps({"command": "status"}) + "\n").encode() * 400)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    assert data.count(b'"ok": true') == 400
    failed = _ctl(path, "scale", "0")
    assert failed.returncode == 1
    assert failed.stderr == ('forkserve ctl: scale: expected "workers": a whole number from 1 '
                             "to 1000\n")
    usage = _ctl(path, "scale")
    assert usage.returncode == 2 and "expected the number of workers" in usage.stderr
    # A line that never ends, past the limit: an error, then the connection is closed.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"x" * (64 * 1024 + 10))
        answer = Reader(sock).read_until(b"\n")
        assert json.loads(answer)["error"] == "request longer than 65536 bytes"
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass  # (closed with our unread bytes in it: a reset)
    assert len(server.workers()) == 2
    assert exchange(server, HEALTH).status == 404  # HTTP goes on (no --health-path here)


def test_silent_slow_and_many_clients_cannot_hold_the_master(start_server, tmp_path):
    server, path = _control_server(start_server, tmp_path)
    clients = []
    try:
        for _ in range(16):  # the most served at once; they send nothing
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(15)
            sock.connect(str(path))
            clients.append(sock)
        started = time.monotonic()
        with socket.socket(socket.AF_UNIX) as extra:
            extra.settimeout(10)
            extra.connect(str(path))
            assert json.loads(Reader(extra).read_until(b"\n")) == {
                "ok": False, "error": "busy: 16 clients are connected"}
        assert exchange(server, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n").status == 200
        for sock in clients:  # each is dropped after 5 s of silence, with a word
            assert json.loads(Reader(sock).read_until(b"\n")) == {
                "ok": False, "error": "no complete request for 5 s"}
        assert 4.5 < time.monotonic() - started < 12
    finally:
        for sock in clients:
            sock.close()
    # One that asks and does not read its answers is dropped once 1 MiB waits for it: its
    # sends fail long before 10,000 requests (9 MB of answers).
    with socket.socket(socket.AF_UNIX) as greedy:
        greedy.settimeout(10)
        greedy.connect(str(path))
        request = json.dumps({"command": "status"}).encode() + b"\n"
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(50):
                greedy.sendall(request * 200)
    (answer,) = _ask(path, {"command": "status"})
    assert answer["ok"] and len(answer["workers"]) == 2


def test_a_second_server_on_the_same_control_socket_is_refused(start_server, tmp_path):
    server, path = _control_server(start_server, tmp_path)
    result = subprocess.run(forkserve_command() + ["wsgiapp:app", "-b", "127.0.0.1:0",
                                                   "--control-socket", str(path)],
                            cwd=APPS, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr == (f"forkserve: error: --control-socket {path}: another server "
                             "listens on it\n")
    assert _ask(path, {"command": "status"})[0]["master"]["pid"] == server.pid


def test_a_usr2_upgrade_hands_the_control_socket_to_the_new_master(start_server, tmp_path):
    with socket.socket() as probe:  # a fixed metrics port, as in production
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server, path = _control_server(start_server, tmp_path, "-w", "2", "--metrics-bind",
                                   f"127.0.0.1:{port}")
    mark = server.mark()
    os.kill(server.pid, signal.SIGUSR2)
    new_master = int(server.wait_for(r"USR2: started new master pid (\d+)", start=mark)[1])
    try:
        server.wait_for(rf"\[{new_master}\] \[INFO\] ready: 2 workers", start=mark)
        server.wait_for(rf"\[{new_master}\] \[INFO\] metrics at http://127\.0\.0\.1:{port}/",
                        start=mark)
        assert _ask(path, {"command": "status"})[0]["master"]["pid"] == new_master
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait_exit() == 0
        assert _ask(path, {"command": "status"})[0]["master"]["pid"] == new_master
        assert _scrape(f"http://127.0.0.1:{port}/metrics")[("forkserve_workers", ())] == 2
    finally:
        os.kill(new_master, signal.SIGTERM)
        wait_gone([new_master])
    assert not path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_only_the_serving_user_and_root_may_use_the_control_socket(start_server, public_apps):
    folder = Path(tempfile.mkdtemp(prefix="forkserve-control-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        path = folder / "control.sock"
        server = start_server("importmark:app", "-w", "1", "--user", "nobody",
                              "--control-socket", str(path), cwd=public_apps)
        nobody = pwd.getpwnam("nobody")
        info = os.stat(path)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (nobody.pw_uid, 0o600)
        daemon = pwd.getpwnam("daemon")
        assert _ctl(path, "status").returncode == 0  # root
        assert _status_as(path, nobody)["ok"]  # the serving user
        assert _status_as(path, daemon) == {"error": "[Errno 13] Permission denied"}
        path.chmod(0o666)  # even if the file lets it connect, the server refuses it
        assert _status_as(path, daemon) == {
            "ok": False,
            "error": f"permission denied: uid {daemon.pw_uid} may not control this server"}
        assert _status_as(path, nobody)["ok"]
        server.stop()
    finally:
        shutil.rmtree(folder)


# -- statistics: forkserve ctl stats, --metrics-bind ----------------------------------------


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    """The samples of a scrape, parsed by prometheus_client: {(name, labels): value}."""
    host, port = re.match(r"http://([\d.]+):(\d+)/", url).groups()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        response = Reader(sock).response()
    assert response.status == 200, response
    assert response.header("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.body.decode())
            for sample in family.samples}


def _until(scrape, predicate, timeout: float = 10.0):
    """Scrape until `predicate(samples)` holds (the counts come with each worker's next
    heartbeat, at most a second later)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape()
        if predicate(samples):
            return samples
        assert time.monotonic() < deadline, samples
        time.sleep(0.1)


def test_metrics_count_what_was_sent(start_server, tmp_path):
    path = tmp_path / "control.sock"
    server = start_server("wsgiapp:app", "-w", "2", "--metrics-bind", "127.0.0.1:0",
                          "--control-socket", str(path))
    url = server.wait_for(r"metrics at (http://127\.0\.0\.1:\d+/metrics)")[1]
    for _ in range(5):
        assert exchange(server, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n").status == 200
    assert exchange(server, b"GET /fail HTTP/1.1\r\nHost: t\r\n\r\n").status == 500
    for _ in range(2):
        assert exchange(server, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n"
                                b"hi").status == 200
    assert exchange(server, b"GET / HTTP/1.1\r\n\r\n").status == 400  # no Host
    assert exchange(server, b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"x" * 9000
                    + b"\r\n\r\n").status == 431

    def total(samples: dict) -> float:
        return sum(value for (name, _), value in samples.items()
                   if name == "forkserve_requests_total")

    samples = _until(lambda: _scrape(url), lambda s: total(s) == 8 and sum(
        v for (n, _), v in s.items() if n == "forkserve_requests_refused_total") == 2)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("forkserve_requests_total", method="GET", status="2xx") == 5
    assert value("forkserve_requests_total", method="GET", status="5xx") == 1
    assert value("forkserve_requests_total", method="POST", status="2xx") == 2
    assert value("forkserve_requests_refused_total", status="400") == 1
    assert value("forkserve_requests_refused_total", status="431") == 1
    assert value("forkserve_request_duration_seconds_count") == 8
    assert value("forkserve_request_duration_seconds_bucket", le="+Inf") == 8
    assert 0 < value("forkserve_request_duration_seconds_sum") < 8
    assert value("forkserve_connections_accepted_total") == 10
    assert value("forkserve_requests_in_flight") == 0
    assert value("forkserve_workers") == 2
    for number in ("1", "2"):
        assert 0 <= value("forkserve_worker_heartbeat_age_seconds", worker=number) < 5
        assert value("forkserve_worker_resident_memory_bytes", worker=number) > 1 << 20
    assert all(value("forkserve_worker_restarts_total", reason=reason) == 0
               for reason in ("crash", "hang", "max-requests", "memory", "reload"))
    (stats,) = _ask(path, {"command": "stats"})
    assert stats["requests"] == 8 and stats["by_status"] == {"2xx": 7, "5xx": 1}
    assert stats["refused"] == {"400": 1, "431": 1}
    assert stats["duration_seconds"]["buckets"]["+Inf"] == 8
    text = _ctl(path, "stats")
    assert text.returncode == 0
    assert text.stdout.splitlines()[0].startswith("requests answered: 8 (2xx 7, 5xx 1), mean ")
    # What scrapers may get wrong: other paths, methods, bytes.
    host, port = re.match(r"http://([\d.]+):(\d+)/", url).groups()
    for raw, status in ((b"GET /other HTTP/1.1\r\n\r\n", 404),
                        (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
                        (b"\x16\x03\x01 not http\r\n\r\n", 400)):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(raw)
            assert Reader(sock).response().status == status


def test_metrics_count_restarts_by_reason_and_keep_what_exited_workers_served(start_server):
    server = start_server("wsgiapp:app", "-w", "2", "--metrics-bind", "127.0.0.1:0",
                          "--max-requests", "4")
    url = server.wait_for(r"metrics at (http://127\.0\.0\.1:\d+/metrics)")[1]

    def restarts(samples: dict) -> dict:
        return {dict(labels)["reason"]: value for (name, labels), value in samples.items()
                if name == "forkserve_worker_restarts_total"}

    for _ in range(3):
        assert exchange(server, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n").status == 200
    victim = server.workers()[0]
    _until(lambda: _scrape(url), lambda s: sum(
        v for (n, _), v in s.items() if n == "forkserve_requests_total") == 3)
    os.kill(victim, signal.SIGKILL)
    server.wait_for(rf"worker \d \(pid {victim}\) killed by SIGKILL")
    samples = _until(lambda: _scrape(url), lambda s: restarts(s)["crash"] == 1)
    # The dead worker's requests still count.
    assert sum(v for (n, _), v in samples.items() if n == "forkserve_requests_total") == 3
    mark = server.mark()
    os.kill(server.pid, signal.SIGHUP)
    server.wait_for(r"replaced 2 workers", start=mark)
    _until(lambda: _scrape(url), lambda s: restarts(s)["reload"] == 2)
    for _ in range(12):  # at least one worker reaches --max-requests 4
        assert exchange(server, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n").status == 200
    samples = _until(lambda: _scrape(url), lambda s: restarts(s)["max-requests"] >= 1)
    assert restarts(samples)["hang"] == restarts(samples)["memory"] == 0


def test_ctl_finds_the_socket_in_the_servers_own_config_file(start_server, tmp_path):
    (tmp_path / "forkserve.toml").write_text(
        f'app = "wsgiapp:app"\nchdir = "{APPS}"\nworkers = 1\ncontrol_socket = "ctl.sock"\n')
    server = start_server(cwd=tmp_path)
    server.wait_for(rf"control socket at {re.escape(str(tmp_path / 'ctl.sock'))}")
    result = subprocess.run(forkserve_command() + ["ctl", "--json", "status"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["master"]["pid"] == server.pid
    elsewhere = subprocess.run(forkserve_command() + ["ctl", "status"], cwd=APPS,
                               capture_output=True, text=True, timeout=30,
                               env=dict(os.environ, RUNTIME_DIRECTORY=str(tmp_path / "none")))
    assert elsewhere.returncode == 1
    assert elsewhere.stderr == (f"forkserve ctl: cannot talk to {tmp_path}/none/control.sock: "
                                "No such file or directory\n")


def test_statsd_gets_what_happened_once_a_second(start_server):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as statsd:
        statsd.bind(("127.0.0.1", 0))
        statsd.settimeout(10)
        server = start_server("wsgiapp:app", "-w", "2", "--statsd-host",
                              f"127.0.0.1:{statsd.getsockname()[1]}", "--statsd-prefix", "web")
        for _ in range(3):
            assert exchange(server, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n").status == 200
        assert exchange(server, b"GET /fail HTTP/1.1\r\nHost: t\r\n\r\n").status == 500
        counts: dict[str, float] = {}
        gauges: dict[str, float] = {}
        while counts.get("web.requests", 0) < 4 or counts.get("web.connections.accepted",
                                                              0) < 4:
            for line in statsd.recv(2048).decode().splitlines():
                name, _, rest = line.partition(":")
                value, kind = rest.split("|")
                if kind == "c":
                    counts[name] = counts.get(name, 0) + float(value)
                else:
                    gauges[name] = float(value)
    assert counts["web.requests"] == 4
    assert (counts["web.requests.2xx"], counts["web.requests.5xx"]) == (3, 1)
    assert counts["web.requests.get"] == 4 and counts["web.connections.accepted"] == 4
    assert gauges["web.workers"] == 2 and gauges["web.requests.in_flight"] == 0
    assert gauges["web.request.duration_ms.mean"] > 0


def test_a_failed_usr2_upgrade_gives_the_control_socket_back(start_server, tmp_path):
    module = tmp_path / "flaky.py"
    module.write_text("def app(environ, start_response):\n"
                      "    start_response('200 OK', [('Content-Length', '2')])\n"
                      "    return [b'ok']\n")
    path = tmp_path / "control.sock"
    server = start_server("flaky:app", "-w", "1", "--chdir", str(tmp_path),
                          "--control-socket", str(path))
    module.write_text("raise RuntimeError('the new code does not boot')\n")
    mark = server.mark()
    os.kill(server.pid, signal.SIGUSR2)
    server.wait_for(r"new master pid \d+ exited .*; this master carries on", start=mark)
    # (the new master said the same line before it failed: wait for the old master's)
    server.wait_for(rf"\[{server.pid}\] \[INFO\] control socket at {re.escape(str(path))}",
                    start=mark)
    assert _ask(path, {"command": "status"})[0]["master"]["pid"] == server.pid


def test_statsd_costs_the_master_nothing_while_it_stops(start_server):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as statsd:
        statsd.bind(("127.0.0.1", 0))
        server = start_server("wsgiapp:app", "-w", "1", "--threads", "2", "--statsd-host",
                              f"127.0.0.1:{statsd.getsockname()[1]}")
        with server.connect() as busy:
            busy.sendall(b"GET /sleep?s=2.5&tag=drain HTTP/1.1\r\nHost: t\r\n\r\n")
            server.wait_for("SLEEPING drain")
            os.kill(server.pid, signal.SIGTERM)
            server.wait_for("SIGTERM: graceful stop")
            before = _cpu_seconds(server.pid)
            assert Reader(busy).response().status == 200  # about 2 s of stopping later
            spent = _cpu_seconds(server.pid) - before
        assert spent < 0.5, f"the master used {spent:.2f} s of CPU while the worker drained"
        assert server.wait_exit() == 0


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_drain_delay_serves_on_with_health_503_then_stops(start_server, tmp_path):
    path = tmp_path / "control.sock"
    server = start_server("wsgiapp:app", "-w", "2", "--drain-delay", "4",
                          "--health-path", "/healthz", "--threads", "2",
                          "--control-socket", str(path))
    with server.connect() as busy:
        busy.sendall(b"GET /sleep?s=4.5&tag=late HTTP/1.1\r\nHost: t\r\n\r\n")
        server.wait_for("SLEEPING late")  # in flight when the drain ends: it still completes
        os.kill(server.pid, signal.SIGTERM)
        started = time.monotonic()
        server.wait_for(r"SIGTERM: draining for 4 s")
        for _ in range(20):  # new connections during the delay are served, told to close
            response = exchange(server, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
            assert response.status == 200 and response.header("Connection") == "close"
        health = exchange(server, HEALTH)
        assert (health.status, health.body) == (503, b"stopping\n")
        # The control socket answers, but changes nothing, as the signals would not.
        (status,) = _ask(path, {"command": "status"})
        assert status["master"]["state"] == "draining"
        assert _ask(path, {"command": "scale", "workers": 3}) == [
            {"ok": False, "error": "the server is stopping"}]
        assert "drain delay over" not in server.log  # (all of that was within the delay)
        assert "scale" not in server.log
        server.wait_for(r"drain delay over: graceful stop of 2 workers")
        assert time.monotonic() - started > 3.5
        assert Reader(busy).response().status == 200
    assert server.wait_exit() == 0
