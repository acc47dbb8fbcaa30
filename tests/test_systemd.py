"""systemd: socket activation (systemd-socket-activate) and sd_notify to a test-owned socket."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import APPS, LoadClient, Reader, Server, children, exchange, forkserve_command
from test_process import wait_gone

pytestmark = pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                                reason="systemd-socket-activate is not installed")


class NotifySocket:
    """The datagram socket systemd would listen on; collects every notification."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 15.0) -> dict:
        """The next message (after those already seen) with `key` (= `value`)."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                raise AssertionError(f"no {key} notification; got {self.messages}") from None
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(message)
            if key in message and (value is None or message[key] == value):
                return message

    def stored_fd(self, name: str, timeout: float = 15.0) -> int:
        """The next descriptor handed to the fd store (FDSTORE=1) under FDNAME=`name`."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 4096, 4)
            except TimeoutError:
                raise AssertionError(f"no FDSTORE of {name}; got {self.messages}") from None
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(message)
            if message.get("FDSTORE") == "1" and message.get("FDNAME") == name and fds:
                return fds[0]
            for fd in fds:
                os.close(fd)

    def read_all(self) -> None:
        """Take every notification already sent."""
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(4096)
                self.messages.append(dict(line.split("=", 1)
                                          for line in data.decode().splitlines()))
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def activated(tmp_path):
    """forkserve under systemd-socket-activate, with NOTIFY_SOCKET and a 0.4 s watchdog."""
    notify = NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="400000")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E", "NOTIFY_SOCKET",
         "-E", "WATCHDOG_USEC", "-E", "PATH", "-E", "PYTHONPATH", "-E", "FORKSERVE_ALLOW_ROOT",
         *forkserve_command(), "wsgiapp:app", "-w", "2", "-b", "127.0.0.1:1"],
        cwd=APPS, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True)
    try:
        # It says "Listening on 127.0.0.1:PORT as 3." once the socket is ready.
        line = proc.stderr.readline().decode()
        assert "Listening on" in line, line
        yield proc, notify, port
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        proc.stderr.close()
        notify.close()


def get_pid(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
        return int(Reader(sock).response().body)


def test_activation_ready_watchdog_reload_and_stop(activated):
    proc, notify, port = activated
    # systemd-socket-activate starts forkserve on the first connection, which it then serves
    # on the passed socket (the -b 127.0.0.1:1 in the command line is not bound).
    first_worker = get_pid(port)
    ready = notify.wait_for("READY", "1")
    master = int(ready["MAINPID"])
    assert master == proc.pid  # systemd-socket-activate execs the command in place
    assert "workers" in ready["STATUS"]
    assert first_worker != master
    notify.wait_for("WATCHDOG", "1")
    notify.wait_for("WATCHDOG", "1")

    old_workers = children(master)
    os.kill(master, signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "1")
    assert int(reloading["MONOTONIC_USEC"]) > 0
    notify.wait_for("READY", "1")  # the new workers are up
    wait_gone(old_workers)
    assert get_pid(port) not in old_workers

    os.kill(master, signal.SIGTERM)
    notify.wait_for("STOPPING", "1")
    assert proc.wait(15) == 0


def test_usr2_upgrade_keeps_serving_the_activated_socket(activated):
    proc, notify, port = activated
    get_pid(port)
    old = int(notify.wait_for("READY", "1")["MAINPID"])
    os.kill(old, signal.SIGUSR2)
    new = int(notify.wait_for("MAINPID")["MAINPID"])
    while new == old:  # skip the old master's own STATUS/READY lines
        new = int(notify.wait_for("MAINPID")["MAINPID"])
    # Under systemd the new master, once ready, stops the old one (systemd follows MAINPID=),
    # which says nothing more: a STOPPING=1 from it would stop the service.
    assert proc.wait(15) == 0  # the old master is gone; the new one holds the socket
    try:
        assert get_pid(port) in children(new)  # served by a worker of the new master
        os.kill(new, signal.SIGTERM)
        wait_gone([new])  # (every notification is sent by then)
        notify.read_all()
        assert sum("STOPPING" in message for message in notify.messages) == 1  # the new one's
        assert {"MAINPID": str(new)} in notify.messages  # the old master's hand-over
    finally:
        try:
            os.kill(new, signal.SIGTERM)
        except ProcessLookupError:
            pass


# Starts a command with the descriptor argv[1] as fd 3 and LISTEN_PID set to its own pid, as
# systemd passes stored sockets back.
_AS_SYSTEMD = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.close(int(sys.argv[1])); "
               "os.environ['LISTEN_PID'] = str(os.getpid()); os.execvp(sys.argv[2], sys.argv[2:])")


def test_a_restart_through_the_fd_store_refuses_no_connection(tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    args = ["wsgiapp:app", "-w", "2", "-b", f"127.0.0.1:{port}"]
    first = Server(args, env={"NOTIFY_SOCKET": notify.path})
    second = None
    stored = notify.stored_fd("forkserve-bind-0")  # what systemd would keep
    try:
        notify.wait_for("READY", "1")
        first.port = port
        with LoadClient(first, threads=4) as load:
            load.wait_for_requests(100)
            os.kill(first.pid, signal.SIGTERM)
            assert first.wait_exit() == 0  # nothing listens now but the stored socket
            second = Server(args, command=[sys.executable, "-c", _AS_SYSTEMD, str(stored),
                                           *forkserve_command()],
                            env={"NOTIFY_SOCKET": notify.path, "LISTEN_FDS": "1",
                                 "LISTEN_FDNAMES": "forkserve-bind-0"}, pass_fds=(stored,))
            second.port = port
            assert notify.wait_for("READY", "1")["MAINPID"] == str(second.pid)
            load.wait_for_requests(200)
        assert load.errors == []
        assert "listening at http://127.0.0.1:" in second.log
        # Stored again by the second server, in place of the first one's.
        assert [message for message in notify.messages if "FDNAME" in message] == [
            {"FDSTOREREMOVE": "1", "FDNAME": "forkserve-bind-0"},
            {"FDSTORE": "1", "FDNAME": "forkserve-bind-0"}] * 2
    finally:
        for server in (first, second):
            if server is not None:
                server.stop()
        os.close(stored)
        notify.close()


# As _AS_SYSTEMD, with every descriptor of the comma-separated argv[1] passed from fd 3 on.
_AS_SYSTEMD_MANY = (
    "import os, sys\n"
    "fds = [int(fd) for fd in sys.argv[1].split(',')]\n"
    "moved = [os.dup(fd) for fd in fds]\n"
    "for fd in fds:\n"
    "    os.close(fd)\n"
    "for target, fd in enumerate(moved, 3):\n"
    "    os.dup2(fd, target)\n"
    "    os.set_inheritable(target, True)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n")


def test_stored_sockets_are_matched_to_a_changed_bind_by_address(tmp_path):
    """--bind A --bind B, then --bind B --bind C: the stored socket of B is adopted at its new
    place, the one of A (of no use now) is dropped from the store before anything is bound,
    and C is bound anew."""
    notify = NotifySocket(tmp_path / "notify.sock")
    a, b, c = free_port(), free_port(), free_port()
    first = Server(["wsgiapp:app", "-w", "1", "-b", f"127.0.0.1:{a}", "-b", f"127.0.0.1:{b}"],
                   env={"NOTIFY_SOCKET": notify.path})
    second = None
    stored = [notify.stored_fd("forkserve-bind-0"), notify.stored_fd("forkserve-bind-1")]
    try:
        notify.wait_for("READY", "1")
        os.kill(first.pid, signal.SIGTERM)
        assert first.wait_exit() == 0
        notify.read_all()
        notify.messages.clear()
        second = Server(["wsgiapp:app", "-w", "1", "-b", f"127.0.0.1:{b}", "-b",
                         f"127.0.0.1:{c}"],
                        command=[sys.executable, "-c", _AS_SYSTEMD_MANY,
                                 ",".join(map(str, stored)), *forkserve_command()],
                        env={"NOTIFY_SOCKET": notify.path, "LISTEN_FDS": "2",
                             "LISTEN_FDNAMES": "forkserve-bind-0:forkserve-bind-1"},
                        pass_fds=tuple(stored))
        assert notify.wait_for("READY", "1")["MAINPID"] == str(second.pid)
        for port in (b, c):
            second.port = port
            assert exchange(second, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n").status == 200
        # B is the very socket the store kept (the same inode), now at --bind index 0.
        held = {os.stat(f"/proc/{second.pid}/fd/{fd}").st_ino
                for fd in os.listdir(f"/proc/{second.pid}/fd")
                if os.readlink(f"/proc/{second.pid}/fd/{fd}").startswith("socket:")}
        assert os.fstat(stored[1]).st_ino in held and os.fstat(stored[0]).st_ino not in held
        names = [message for message in notify.messages if "FDNAME" in message]
        assert names[0] == {"FDSTOREREMOVE": "1", "FDNAME": "forkserve-bind-0"}  # A, first
        assert names[1:] == [{"FDSTOREREMOVE": "1", "FDNAME": "forkserve-bind-0"},
                             {"FDSTORE": "1", "FDNAME": "forkserve-bind-0"},
                             {"FDSTOREREMOVE": "1", "FDNAME": "forkserve-bind-1"},
                             {"FDSTORE": "1", "FDNAME": "forkserve-bind-1"}]
    finally:
        for server in (first, second):
            if server is not None:
                server.stop()
        for fd in stored:
            os.close(fd)
        notify.close()
