"""The control socket (--control-socket): operators and `forkserve ctl` ask the master.

A unix stream socket of mode 0600, owned by the user that serves; only that user and root may
talk to it (the peer's credentials are checked with SO_PEERCRED when it connects). Requests
and answers are newline-delimited JSON: a request is one line holding an object with a
"command" and its arguments, the answer one line holding an object with "ok": true and the
command's results, or "ok": false and an "error". A client may send several requests on one
connection; the answers come in order.

The master serves it from its own loop, so nothing a client does may block or grow it: a
connection is refused beyond MAX_CLIENTS at once, a request line is at most MAX_LINE bytes, a
client silent for IDLE_SECONDS is dropped, and one that does not read its answers is dropped
once MAX_OUTPUT bytes wait for it. Each of these gets an error object when it can take one.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import stat
import struct
from collections.abc import Callable
from typing import Any

MAX_CLIENTS = 16
MAX_LINE = 64 * 1024
MAX_OUTPUT = 1 << 20
IDLE_SECONDS = 5.0
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


class Endpoint:
    """What the control socket registers in the master's selector."""

    def ready(self, mask: int, now: float) -> None:
        """The descriptor is ready for what `mask` says (selectors.EVENT_READ/WRITE)."""
        raise NotImplementedError


class ControlServer(Endpoint):
    """The listening socket at `path` and its clients, on the master's `selector`.

    `handle(request)` answers one request (a dict with "command"): it returns the results, or
    raises ControlError. `take_over` replaces a socket a live server still listens on (the
    new master of a USR2 upgrade); otherwise that is an error."""

    def __init__(self, path: str, selector: selectors.BaseSelector, handle: Handler,
                 take_over: bool = False) -> None:
        self.path = path
        self.selector = selector
        self.handle = handle
        self.clients: dict[int, _Client] = {}
        _clear_path(path, take_over)
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_mask = os.umask(0o177)  # 0600 from the start: no moment of a wider mode
        try:
            self.sock.bind(path)
        finally:
            os.umask(old_mask)
        self.sock.listen(MAX_CLIENTS)
        self.sock.setblocking(False)
        self.inode = os.stat(path).st_ino
        selector.register(self.sock, selectors.EVENT_READ, self)

    def hand_to(self, uid: int, gid: int) -> None:
        """Give the socket file to the user the server switches to."""
        os.chown(self.path, uid, gid)

    def ready(self, mask: int, now: float) -> None:
        """The listening socket is readable: take the waiting connections."""
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: the kernel queue keeps them
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                raise
            sock.setblocking(False)
            refusal = self._refusal(sock)
            if refusal:
                _send_and_close(sock, {"ok": False, "error": refusal})
                continue
            client = _Client(self, sock, now)
            self.clients[sock.fileno()] = client
            self.selector.register(sock, selectors.EVENT_READ, client)

    def _refusal(self, sock: socket.socket) -> str:
        """Why a new client is not served, or ""."""
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid not in (0, os.geteuid()):
            return f"permission denied: uid {uid} may not control this server"
        if len(self.clients) >= MAX_CLIENTS:
            return f"busy: {MAX_CLIENTS} clients are connected"
        return ""

    def timeout(self, timeout: float, now: float) -> float:
        """`timeout`, shortened to when the next silent client is due to be dropped."""
        for client in self.clients.values():
            timeout = min(timeout, max(0.0, client.deadline - now))
        return timeout

    def expire(self, now: float) -> None:
        """Drop the clients silent for IDLE_SECONDS."""
        for client in [c for c in self.clients.values() if c.deadline <= now]:
            client.fail(f"no complete request for {IDLE_SECONDS:g} s")

    def forget(self, client: _Client) -> None:
        if self.clients.pop(client.fd, None) is not None:
            self.selector.unregister(client.sock)
            client.sock.close()

    def close(self) -> None:
        """Close every client and the socket; remove the file if it is still ours (a USR2
        successor may have put its own there)."""
        for client in list(self.clients.values()):
            self.forget(client)
        self.selector.unregister(self.sock)
        self.sock.close()
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass

    def close_inherited(self) -> None:
        """In a forked worker: close the descriptors (not the file)."""
        for client in self.clients.values():
            client.sock.close()
        self.sock.close()


class _Client(Endpoint):
    """One connection to the control socket: lines in, answers out."""

    def __init__(self, server: ControlServer, sock: socket.socket, now: float) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.inbox = bytearray()
        self.output = bytearray()
        self.deadline = now + IDLE_SECONDS

    def ready(self, mask: int, now: float) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if mask & selectors.EVENT_READ and self.fd in self.server.clients:
            self._read(now)

    def _read(self, now: float) -> None:
        try:
            data = self.sock.recv(MAX_LINE + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.server.forget(self)
            return
        if not data:  # the client is done: what it is owed is sent if it can be at once
            self._flush()
            self.server.forget(self)
            return
        self.inbox += data
        while self.fd in self.server.clients:
            end = self.inbox.find(b"\n")
            if end < 0:
                if len(self.inbox) > MAX_LINE:
                    self.fail(f"request line longer than {MAX_LINE} bytes")
                return
            line = bytes(self.inbox[:end])
            del self.inbox[:end + 1]
            self.deadline = now + IDLE_SECONDS
            if line.strip():
                self._answer(_answer(self.server.handle, line))

    def _answer(self, answer: dict[str, Any]) -> None:
        self.output += json.dumps(answer).encode() + b"\n"
        if len(self.output) > MAX_OUTPUT:
            self.server.forget(self)  # it does not read what it asks for
            return
        self._flush()

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self.output)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.server.forget(self)
            return
        del self.output[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.output else 0)
        self.server.selector.modify(self.sock, events, self)

    def fail(self, error: str) -> None:
        """Answer `error` (if the client takes it at once) and drop the connection."""
        self.output += json.dumps({"ok": False, "error": error}).encode() + b"\n"
        try:
            self.sock.send(self.output)
        except OSError:
            pass
        self.server.forget(self)


def memory_kib(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) of process `pid` in KiB, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(b":")
        if name in (b"Rss", b"Pss"):
            values[name] = int(rest.split()[0])
    return values.get(b"Rss", 0), values.get(b"Pss", 0)


def _answer(handle: Handler, line: bytes) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return {"ok": False, "error": f"not JSON: {exc}"}
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        return {"ok": False, "error": 'expected an object with a "command" string'}
    try:
        return {"ok": True, **handle(request)}
    except ControlError as exc:
        return {"ok": False, "error": str(exc)}


def _send_and_close(sock: socket.socket, answer: dict[str, Any]) -> None:
    try:
        sock.send(json.dumps(answer).encode() + b"\n")
    except OSError:
        pass
    sock.close()


def _clear_path(path: str, take_over: bool) -> None:
    """Make room for the socket at `path`: remove a stale one (nobody listens), refuse to
    replace a live one unless `take_over`, and anything that is not a socket."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlError(f"--control-socket {path}: exists and is not a socket")
    if not take_over:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            pass  # stale: left by a server that did not exit cleanly
        else:
            raise ControlError(f"--control-socket {path}: another server listens on it")
        finally:
            probe.close()
    os.unlink(path)


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
