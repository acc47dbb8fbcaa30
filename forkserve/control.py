"""The control socket (--control-socket): operators and `forkserve ctl` ask the master.

A unix stream socket of mode 0600, owned by the user that serves; only that user and root may
talk to it (the peer's credentials are checked with SO_PEERCRED when it connects). Requests
and answers are newline-delimited JSON: a request is one line holding an object with a
"command" and its arguments, the answer one line holding an object with "ok": true and the
command's results, or "ok": false and an "error". A client may send several requests on one
connection; the answers come in order.

The master serves it from its own loop, so nothing a client does may block or grow it: a
connection is refused beyond MAX_CLIENTS at once, a request line is at most MAX_LINE bytes, a
client silent for endpoints.IDLE_SECONDS is dropped, and one that does not read its answers
is dropped once MAX_OUTPUT bytes wait for it (see forkserve.endpoints). Each of these gets
an error object when it can take one.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import stat
import struct
from collections.abc import Callable
from typing import Any

from forkserve.endpoints import Client, Server
from forkserve.sockets import unix_socket_in_use

MAX_CLIENTS = Server.max_clients
MAX_LINE = 64 * 1024
MAX_OUTPUT = 1 << 20
DEFAULT_NAME = "control.sock"
DEFAULT_DIRECTORY = "/run/forkserve"
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlError(Exception):
    """A request the master cannot carry out: its message is the answer's "error"."""


def default_path(environ: dict[str, str] | None = None) -> str:
    """Where the control socket is when asked for without a path: in systemd's
    $RUNTIME_DIRECTORY (RuntimeDirectory=) if set, else in /run/forkserve."""
    environ = os.environ if environ is None else environ
    directory = environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or DEFAULT_DIRECTORY
    return os.path.join(directory, DEFAULT_NAME)


Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlServer(Server):
    """The listening socket at `path` and its clients, on the master's `selector`.

    `handle(request)` answers one request (a dict with "command"): it returns the results, or
    raises ControlError. `take_over` replaces a socket a live server still listens on (the
    new master of a USR2 upgrade); otherwise that is an error."""

    max_request = MAX_LINE
    max_output = MAX_OUTPUT

    def __init__(self, path: str, selector: selectors.BaseSelector, handle: Handler,
                 take_over: bool = False) -> None:
        self.path = path
        self.handle = handle
        _clear_path(path, take_over)
        directory = os.path.dirname(path) or "."
        self.made_directory = not os.path.isdir(directory)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_mask = os.umask(0o177)  # 0600 from the start: no moment of a wider mode
        try:
            sock.bind(path)
        finally:
            os.umask(old_mask)
        sock.listen(MAX_CLIENTS)
        self.inode = os.stat(path).st_ino
        super().__init__(sock, selector)

    def hand_to(self, uid: int, gid: int) -> None:
        """Give the socket file to the user the server switches to (and the directory, if
        this server made it: so that the new master of a USR2 upgrade, running as that
        user, can take the path over)."""
        if not self.still_there():
            raise ControlError(f"--control-socket {self.path}: replaced by something else")
        os.chown(self.path, uid, gid, follow_symlinks=False)
        if self.made_directory:
            os.chown(os.path.dirname(self.path), uid, gid, follow_symlinks=False)

    def still_there(self) -> bool:
        """Is the file at the path still this server's socket?"""
        try:
            return os.lstat(self.path).st_ino == self.inode
        except OSError:
            return False

    def refuses(self, sock: socket.socket) -> str:
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid not in (0, os.geteuid()):
            return f"permission denied: uid {uid} may not control this server"
        return ""

    def refusal(self, reason: str) -> bytes:
        return _line({"ok": False, "error": reason})

    def close(self) -> None:
        """Close every client and the socket; remove the file if it is still ours (a USR2
        successor may have put its own there)."""
        super().close()
        if self.still_there():
            try:
                os.unlink(self.path)
            except OSError:
                pass


class _ControlClient(Client):
    """One connection to the control socket: a request a line, an answer a line."""

    server: ControlServer

    def received(self, now: float) -> None:
        while self.open:
            end = self.inbox.find(b"\n")
            if end < 0:
                return
            line = bytes(self.inbox[:end])
            del self.inbox[:end + 1]
            if line.strip():
                self.answer(_line(_answer(self.server.handle, line)), now)


ControlServer.client_class = _ControlClient


def _answer(handle: Handler, line: bytes) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError)
        return {"ok": False, "error": f"not JSON: {exc}"}
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        return {"ok": False, "error": 'expected an object with a "command" string'}
    try:
        return {"ok": True, **handle(request)}
    except ControlError as exc:
        return {"ok": False, "error": str(exc)}


def _line(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer).encode() + b"\n"


def _clear_path(path: str, take_over: bool) -> None:
    """Make room for the socket at `path`: remove a stale one (nobody listens), refuse to
    replace a live one unless `take_over`, and anything that is not a socket."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlError(f"--control-socket {path}: exists and is not a socket")
    if not take_over and unix_socket_in_use(path):
        raise ControlError(f"--control-socket {path}: another server listens on it")
    os.unlink(path)  # (else stale: left by a server that did not exit cleanly)


def request(path: str, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to the control socket at `path`; its answer. Raises OSError when the
    socket cannot be reached, ControlError when the answer is not one."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
        except BrokenPipeError:
            pass  # refused at once (busy, or not allowed): the reason waits to be read
        data = bytearray()
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(f"the server answered {bytes(data[:200])!r}") from None
    if not isinstance(answer, dict):
        raise ControlError(f"the server answered {answer!r}")
    return answer
