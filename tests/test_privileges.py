"""Running as root: refusal, dropping to --user/--group after binding, --umask."""

from __future__ import annotations

import os
import pwd
import socket
import stat
import subprocess

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
