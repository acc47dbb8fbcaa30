"""The deployment examples in deploy/: the systemd units verify, and the nginx config really
proxies to forkserve on a unix socket (HTTP keep-alive and WebSocket)."""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Reader

from forkserve.settings import BY_NAME

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SERVICE = DEPLOY / "systemd" / "forkserve.service"
SOCKET = DEPLOY / "systemd" / "forkserve.socket"
NGINX_CONF = DEPLOY / "nginx" / "forkserve.conf"
FORKSERVE_SCRIPT = Path(sys.executable).parent / "forkserve"
# forkserve refuses to serve as root without --user unless told otherwise; the test runs the
# server as whoever runs the tests.
AS_ROOT = ["--allow-root"] if os.geteuid() == 0 else []


def replace_once(text: str, old: str, new: str) -> str:
    """`text` with `old` replaced; fails if `old` is not there exactly once (so an edit of
    the example that the test no longer matches is noticed, not silently untested)."""
    assert text.count(old) == 1, f"expected {old!r} once in the example"
    return text.replace(old, new)


# -- systemd ----------------------------------------------------------------------------------

def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str  # unit keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def test_service_unit_settings_match_forkserve():
    """The settings the README promises, and timeouts consistent with forkserve's defaults."""
    service = unit(SERVICE)["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["KillMode"] == "mixed"
    assert service["KillSignal"] == "SIGTERM"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # forkserve's configuration error
    assert int(service["WatchdogSec"]) > 0
    assert "--bind" not in service["ExecStart"] and " -b " not in service["ExecStart"]
    # systemd's SIGKILL must come after forkserve's own graceful stop has ended.
    assert int(service["TimeoutStopSec"]) > BY_NAME["graceful_timeout"].default
    assert int(service["TimeoutStartSec"]) > BY_NAME["boot_timeout"].default
    assert unit(SERVICE)["Unit"]["Requires"] == "forkserve.socket"
    assert "forkserve.socket" in unit(SERVICE)["Unit"]["After"].split()
    listen = unit(SOCKET)["Socket"]["ListenStream"]
    # The socket must not live in the service's RuntimeDirectory= (chowned, then deleted at
    # each stop of the service).
    runtime = "/run/" + service["RuntimeDirectory"]
    assert not listen.startswith(runtime + "/")
    assert f"server unix:{listen};" in NGINX_CONF.read_text()


def systemd_version() -> int:
    out = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True,
                         timeout=30).stdout
    match = re.match(r"systemd (\d+)", out)
    return int(match.group(1)) if match else 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (package systemd)")
@pytest.mark.skipif(not FORKSERVE_SCRIPT.exists(),
                    reason=f"no forkserve console script at {FORKSERVE_SCRIPT}")
def test_systemd_units_verify(tmp_path):
    """`systemd-analyze verify` on copies of both units whose ExecStart= and
    WorkingDirectory= point at things that exist here, so that its checks of the command
    (is it executable?) are meaningful; every other line is verified as shipped.

    What is asserted: exit status 0 (verify fails on a missing binary, a missing Requires=
    unit, a socket without its service) and no output line naming one of our files. Unknown
    keys and unparsable values are only printed ("<file>:<line>: Unknown key..."), with
    status 0, hence the second check. Lines about other units (e.g. the host's own units
    pulled in as dependencies) or about not running under systemd are not ours to judge and
    are ignored; so are their errors (--recursive-errors=no, systemd 250+).
    """
    service = SERVICE.read_text()
    service = re.sub(r"^ExecStart=\S+", f"ExecStart={FORKSERVE_SCRIPT}", service,
                     count=1, flags=re.MULTILINE)
    service = replace_once(service, "WorkingDirectory=/opt/myapp",
                           f"WorkingDirectory={tmp_path}")
    (tmp_path / "forkserve.service").write_text(service)
    shutil.copy(SOCKET, tmp_path / "forkserve.socket")

    command = ["systemd-analyze", "verify", "--man=no"]
    if systemd_version() >= 250:
        command.append("--recursive-errors=no")
    command += [str(tmp_path / "forkserve.service"), str(tmp_path / "forkserve.socket")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, SYSTEMD_LOG_COLOR="0"))
    output = result.stdout + result.stderr
    ours = [line for line in output.splitlines()
            if "forkserve.service" in line or "forkserve.socket" in line
            or str(tmp_path) in line]
    assert result.returncode == 0, output
    assert ours == [], output


# -- nginx ------------------------------------------------------------------------------------

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK)
                                  else None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nginx_config(tmp_path: Path, port: int, forkserve_socket: Path) -> str:
    """A whole nginx.conf around deploy/nginx/forkserve.conf: everything nginx writes goes
    to tmp_path, it listens on a loopback port and proxies to our unix socket."""
    site = NGINX_CONF.read_text()
    site = replace_once(site, "server unix:/run/myapp/forkserve.sock;",
                        f"server unix:{forkserve_socket};")
    site = replace_once(site, "listen 80;", f"listen 127.0.0.1:{port};")
    site = replace_once(site, "listen [::]:80;", "")
    temp = {name: tmp_path / name for name in ("client_body", "proxy", "fastcgi", "uwsgi",
                                               "scgi")}
    for path in temp.values():
        path.mkdir(exist_ok=True)
    # As root, nginx's workers would switch to "nobody", who may not enter tmp_path (0700).
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}daemon off;
master_process on;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {tmp_path}/access.log;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
{site}
}}
"""


def stop_nginx(proc: subprocess.Popen) -> None:
    """TERM (fast shutdown), then SIGKILL to its process group (master and workers)."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def start_nginx(tmp_path: Path, forkserve_socket: Path,
                procs: list[subprocess.Popen]) -> int:
    """Start nginx (appending it to `procs` at once, for the caller to stop) and return its
    port once it accepts connections. A port taken between free_port() and nginx's bind
    gets another try."""
    for _ in range(3):
        port = free_port()
        conf = tmp_path / "nginx.conf"
        conf.write_text(nginx_config(tmp_path, port, forkserve_socket))
        error_log = tmp_path / "error.log"
        error_log.write_text("")
        with open(tmp_path / "nginx.out", "wb") as out:
            proc = subprocess.Popen(
                [NGINX, "-c", str(conf), "-p", f"{tmp_path}/", "-e", str(error_log)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                time.sleep(0.05)  # polling a port that nginx has not bound yet
        log = error_log.read_text() + (tmp_path / "nginx.out").read_text()
        stop_nginx(proc)
        if "Address already in use" not in log:
            raise AssertionError(f"nginx did not start listening on port {port}:\n{log}")
    raise AssertionError("nginx could not bind a free port in 3 tries")


@pytest.fixture
def proxied(start_server, tmp_path) -> Iterator[Callable[..., int]]:
    """Start forkserve on a unix socket with the given arguments and the example nginx config
    in front of it; returns nginx's port."""
    if NGINX is None:
        pytest.skip("nginx is not installed")
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> int:
        sock_path = tmp_path / "fs.sock"
        server = start_server(*args, *AS_ROOT, "-b", f"unix:{sock_path}")
        assert server.url == f"unix:{sock_path}", server.log
        port = start_nginx(tmp_path, sock_path, procs)
        return port

    try:
        yield start
    finally:
        for proc in procs:
            stop_nginx(proc)


def get(sock: socket.socket, path: str, headers: str = "") -> tuple[int, dict, bytes, str]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: myapp.example.test\r\n{headers}\r\n".encode())
    response = Reader(sock).response()
    return response.status, dict(response.headers), response.body, response.header("connection")


def test_nginx_proxies_to_forkserve_on_a_unix_socket(proxied):
    port = proxied("wsgiapp:app", "-w", "1")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # A forged X-Forwarded-For is replaced by the address nginx saw.
        status, headers, body, connection = get(sock, "/environ",
                                                "X-Forwarded-For: 203.0.113.9\r\n")
        assert status == 200, body
        assert headers["Server"].startswith("nginx")
        environ = json.loads(body)
        assert environ["SERVER_SOFTWARE"].startswith("forkserve")
        # forkserve's peer is nginx on a unix socket, trusted by default (--forwarded-allow-ips
        # includes 'unix'), so REMOTE_ADDR is the client nginx saw, not the forged address.
        assert environ["REMOTE_ADDR"] == "127.0.0.1"
        assert environ["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
        assert environ["HTTP_X_FORWARDED_PROTO"] == "http"
        assert environ["HTTP_HOST"] == "myapp.example.test"
        # proxy_http_version 1.1 and no Connection header: the upstream connection can stay.
        assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"
        assert "HTTP_CONNECTION" not in environ
        assert connection != "close"

        # The client's connection is kept alive: a second request on it.
        status, _, body, _ = get(sock, "/hello")
        assert (status, body) == (200, b"Hello, World!")


def test_nginx_proxies_websocket_upgrades(proxied):
    websockets = pytest.importorskip("websockets")
    pytest.importorskip("wsproto")
    port = proxied("asgiapp:app", "-w", "1")

    async def talk() -> None:
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/echo") as ws:
            await ws.send("through nginx")
            assert await ws.recv() == "through nginx"

    asyncio.run(asyncio.wait_for(talk(), 20))
