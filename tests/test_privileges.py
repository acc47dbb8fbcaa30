"""Running as root: refusal, dropping to --user/--group after binding, --umask."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import APPS, Reader, forkserve_command

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")


def uids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of a process."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


@root_only
def test_root_without_user_is_refused():
    env = {k: v for k, v in os.environ.items() if k != "FORKSERVE_ALLOW_ROOT"}
    result = subprocess.run(forkserve_command() + ["wsgiapp:app", "-b", "127.0.0.1:0"],
                            cwd=APPS, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr == ("forkserve: error: refusing to run as root: add --user USER to "
                             "switch to it once the sockets are bound; in a container, set a "
                             "non-root USER in the image (or runAsUser in Kubernetes); or "
                             "--allow-root if you mean it\n")


@root_only
def test_the_demo_app_may_run_as_root(start_server):
    server = start_server("-w", "1", env={"FORKSERVE_ALLOW_ROOT": None})
    assert uids(server.pid)[0] == 0


@root_only
def test_user_and_group_drop_after_binding(start_server, tmp_path, public_apps):
    nobody = pwd.getpwnam("nobody")
    path = tmp_path / "fs.sock"
    # importmark needs no compiled module: in CI the interpreter's own directory may be closed
    # to other users (a pyenv under /root), which only imports after the drop would notice.
    server = start_server("importmark:app", "-w", "2", "--user", "nobody", "--umask", "007",
                          "-b", f"unix:{path}", "-b", "127.0.0.1:0", cwd=public_apps)
    assert uids(server.pid) == (nobody.pw_uid, nobody.pw_gid)
    for worker in server.workers():
        assert uids(worker) == (nobody.pw_uid, nobody.pw_gid)
    info = os.stat(path)
    assert (info.st_uid, info.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert stat.S_IMODE(info.st_mode) == 0o770  # 0777 less the umask 007
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert Reader(sock).response().body == b"ok"


@pytest.mark.parametrize(("args", "message"), [
    (["--user", "no-such-user-xyz"], "--user no-such-user-xyz: no such user"),
    (["--user", "nobody", "--group", "no-such-group-xyz"],
     "--group no-such-group-xyz: no such group"),
    (["--umask", "888"], "expected an octal mask"),
])
def test_bad_user_group_umask(args, message):
    result = subprocess.run(forkserve_command() + ["wsgiapp:app", "-b", "127.0.0.1:0", *args],
                            cwd=APPS, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr


_WEBSOCKET_APP = '''
async def app(scope, receive, send):
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close"})
'''


@root_only
def test_a_master_dropping_privileges_imports_wsproto_before(start_server, tmp_path,
                                                              public_apps):
    """Workers import wsproto at their first upgrade, unless the master drops its privileges:
    then it imports wsproto as root, since the user may not be able to read it (a venv in
    root's home). Here a copy of wsproto only root can read stands in for that."""
    import wsproto

    hidden = tmp_path / "hidden"
    shutil.copytree(Path(wsproto.__file__).parent, hidden / "wsproto")
    for path in hidden.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o600)
    for folder in (tmp_path, hidden):
        folder.chmod(0o755)
    (public_apps / "wsapp.py").write_text(_WEBSOCKET_APP)
    server = start_server("wsapp:app", "-w", "1", "--user", "nobody", cwd=public_apps,
                          env={"PYTHONPATH": str(hidden)})
    with server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        assert Reader(sock).response(head_request=True).status == 101
