"""Listening sockets: parse `--bind` specs, bind them (before any fork), or adopt inherited fds."""

from __future__ import annotations

import errno
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forkserve.errors import ConfigError
from forkserve.systemd import FDSTORE_PREFIX, listen_fds

DEFAULT_PORT = 8000
# Set by a master starting its replacement (USR2): the fds of its listeners, in --bind order.
INHERIT_ENV = "FORKSERVE_INHERIT_FDS"


@dataclass(frozen=True)
class Address:
    """A parsed `--bind` spec: `kind` is 'tcp' (host, port), 'unix' (path) or 'fd' (fd)."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fd":
            return f"fd://{self.fd}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# IP_TRANSPARENT and IPV6_TRANSPARENT (Linux): the socket accepts connections to any address.
_TRANSPARENT = {socket.AF_INET: (socket.IPPROTO_IP, 19), socket.AF_INET6: (socket.IPPROTO_IPV6, 75)}


def _accepted_local(sock: socket.socket) -> Any:
    """The local address of every connection listening socket `sock` accepts (as
    getsockname() gives it), when it is the same for all: a socket bound to one address, or
    a unix socket. None for one bound to every address, or transparent (each connection has
    the address it reached)."""
    local = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return local
    if local[0] in ("0.0.0.0", "::"):
        return None
    transparent = _TRANSPARENT.get(sock.family)
    try:
        if transparent is not None and sock.getsockopt(*transparent):
            return None
    except OSError:
        pass  # not Linux
    return local


def parse_bind(spec: str) -> Address:
    """Parse HOST:PORT, [IPv6]:PORT, unix:PATH or fd://N; raise ConfigError if malformed."""
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise ConfigError(f"bad bind address {spec!r}: unix: needs a path")
        return Address("unix", path=os.path.abspath(path))
    if spec.startswith("fd://"):
        try:
            fd = int(spec[5:])
        except ValueError:
            fd = -1
        if fd < 0:
            raise ConfigError(f"bad bind address {spec!r}: fd:// needs a file descriptor number")
        return Address("fd", fd=fd)
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"bad bind address {spec!r}: expected [IPv6]:PORT")
        port_text = rest[1:] if rest else str(DEFAULT_PORT)
    else:
        host, sep, port_text = spec.rpartition(":")
        if not sep:
            host, port_text = spec, str(DEFAULT_PORT)
        elif ":" in host:
            raise ConfigError(f"bad bind address {spec!r}: write IPv6 addresses as [ADDR]:PORT")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"bad bind address {spec!r}: port must be a number from 0 to 65535")
    return Address("tcp", host=host, port=int(port_text))


class Listener:
    """A bound, listening socket and the address it was asked for.

    `owns_path` is true for a unix socket this process created: only its creator unlinks it.
    """

    def __init__(self, sock: socket.socket, address: Address, owns_path: bool = False) -> None:
        self.sock = sock
        self.address = address
        self.owns_path = owns_path
        self.secure = False  # served over TLS (set by the master)
        self.accepted_local = _accepted_local(sock)

    @property
    def url(self) -> str:
        """Where clients reach this socket, with the real port when 0 was asked for."""
        if self.sock.family == socket.AF_UNIX:
            return f"unix:{self.sock.getsockname() or self.address.path}"
        host, port = self.sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.secure else 'http'}://{host}:{port}"

    def close(self) -> None:
        """Close the socket, and unlink the unix socket file if this process created it."""
        self.sock.close()
        if self.owns_path:
            try:
                os.unlink(self.address.path)
            except OSError:
                pass  # gone already, or in a directory we may no longer write to


def listen(specs: list[str], backlog: int,
           forget_stored: Callable[[list[str]], None] = lambda names: None) -> list[Listener]:
    """Bind and listen on every spec; on any failure close what was bound and raise ConfigError.

    Sockets handed over by a previous master (the INHERIT_ENV variable, removed here so that
    nothing started later misreads it) are adopted in --bind order instead of being bound;
    sockets passed by systemd socket activation replace --bind altogether. Sockets from
    systemd's fd store (named FDSTORE_PREFIX...) are adopted for the --bind address they
    listen on; `forget_stored(names)` is told those of no use before anything is bound (so
    that systemd closes them, and their addresses are free again).
    """
    inherited = _inherited_fds()
    stored: dict[str, int] = {}  # name: fd, from the fd store (see systemd.py)
    activated = []
    for fd, name in listen_fds():
        if name.startswith(FDSTORE_PREFIX):
            stored[name] = fd
        else:
            activated.append(fd)
    addresses = [parse_bind(spec) for spec in specs]
    if inherited and len(inherited) != len(addresses) or activated and not inherited:
        # Sockets from systemd (or a master started with other --bind): use them as they are.
        _forget(stored, forget_stored)
        return [Listener(_adopt_fd(fd), Address("fd", fd=fd)) for fd in inherited or activated]
    reused: dict[int, int] = {}  # --bind index: the stored fd listening on its address
    for index, address in enumerate(addresses):
        name = next((name for name, fd in stored.items() if _bound_to(fd, address)), None)
        if name is not None and not inherited:
            reused[index] = stored.pop(name)
    # Before binding: their addresses may be wanted again, once systemd closed its copies.
    patience = STORE_RELEASE_SECONDS if stored else 0.0
    _forget(stored, forget_stored)
    listeners: list[Listener] = []
    try:
        for index, address in enumerate(addresses):
            if inherited:
                sock = _adopt_fd(inherited.pop(0))
                listeners.append(Listener(sock, address, owns_path=address.kind == "unix"))
            elif index in reused:
                listeners.append(Listener(_adopt_fd(reused.pop(index)), address))
            else:
                listeners.append(_listen_patiently(address, backlog, patience))
    except BaseException:
        for listener in listeners:
            listener.close()
        for fd in reused.values():
            os.close(fd)
        raise
    return listeners


# How long a bind may find its address busy after systemd was told to close the stored
# socket holding it (it handles notifications in its own time).
STORE_RELEASE_SECONDS = 2.0


def _listen_patiently(address: Address, backlog: int, patience: float) -> Listener:
    deadline = time.monotonic() + patience
    while True:
        try:
            return _listen_one(address, backlog)
        except ConfigError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _forget(stored: dict[str, int], forget_stored: Callable[[list[str]], None]) -> None:
    """Close the stored sockets of no use, and have systemd drop its copies."""
    for fd in stored.values():
        os.close(fd)
    if stored:
        forget_stored(list(stored))


def _bound_to(fd: int, address: Address) -> bool:
    """Is the socket `fd` (from the fd store) listening on the TCP `address`?"""
    if address.kind != "tcp":
        return False
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return False  # (not what forkserve stores: systemd passed something else)
            host, port = sock.getsockname()[:2]
            wanted = socket.getaddrinfo(address.host or None, address.port, sock.family,
                                        socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except OSError:
        return False
    return port == address.port and any(info[4][0] == host for info in wanted)


def _inherited_fds() -> list[int]:
    text = os.environ.pop(INHERIT_ENV, "")
    try:
        return [int(fd) for fd in text.split(",") if fd]
    except ValueError:
        raise ConfigError(f"bad {INHERIT_ENV}={text!r}") from None


def _listen_one(address: Address, backlog: int) -> Listener:
    if address.kind == "fd":
        return Listener(_adopt_fd(address.fd), address)
    if address.kind == "unix":
        return _listen_unix(address, backlog)
    try:
        infos = socket.getaddrinfo(
            address.host or None, address.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
            socket.AI_PASSIVE,
        )
    except socket.gaierror as exc:
        raise ConfigError(f"cannot bind {address}: {exc.strerror}") from None
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {address}: {_describe(exc)}") from None
    return Listener(sock, address)


def _listen_unix(address: Address, backlog: int) -> Listener:
    path = address.path
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigError(f"cannot bind {address}: {path} exists and is not a socket")
        if unix_socket_in_use(path):
            raise ConfigError(f"cannot bind {address}: another server is listening there")
        os.unlink(path)  # stale socket left by a process that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {address}: {_describe(exc)}") from None
    return Listener(sock, address, owns_path=True)


def unix_socket_in_use(path: str) -> bool:
    """Does a server listen on the unix socket at `path`?"""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _adopt_fd(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"cannot use fd://{fd}: {_describe(exc)}") from None
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.detach()
        raise ConfigError(f"cannot use fd://{fd}: not a listening stream socket")
    return sock


def _describe(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    if exc.errno == errno.EACCES:
        return "permission denied"
    return exc.strerror or str(exc)
