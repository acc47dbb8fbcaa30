"""Handing the connections a blocked loop cannot serve to a peer worker.

A worker that calls a WSGI app in its event loop (--threads 1, or `auto` while it calls in the
loop) serves none of its other connections until the call returns: idle keep-alive ones, and
one accepted just before the call began, wait behind it, however long it takes, while a peer
may be idle. So a `CallWatcher` thread looks at the loop's call every CHECK_EVERY seconds;
once one has run for HANDOFF_AFTER, it sends the worker's connections that wait for a request
with nothing read yet to a `HandoffChannel` (their descriptors, by SCM_RIGHTS). Every worker
reads the channel as it reads its listening sockets, so the first free peer adopts them as new
connections: the kernel still holds whatever the client sent. When the call returns, the loop
closes its own descriptors of them before it reads from any (closing is not shutting down: the
connection lives on in the peer's descriptor).

The master creates the channel before forking (a datagram socket pair: whatever a worker
writes to one end, any worker may read from the other) and holds both ends, so connections
handed by a worker that dies before a peer took them wait for the next one.
"""

from __future__ import annotations

import array
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from forkserve.logs import error_log

# A call into the app running this long gives its worker's waiting connections to peers;
# the watcher looks every CHECK_EVERY seconds while calls come, so it notices in 5-10 ms. A
# fast call (hello world takes 10 us) never waits that long; a view waiting on its database
# for 40 ms would make its worker's other clients wait as long.
HANDOFF_AFTER = 0.005
CHECK_EVERY = 0.005
# With no call into the app for this long, the watcher sleeps until the next one.
PARK_AFTER = 1.0
# Descriptors in one message (the kernel's limit is 253); a queue of 10 messages (Linux's
# default net.unix.max_dgram_qlen) then holds 640 connections.
MAX_FDS = 64
# A request already read, queued for the app, goes along with its connection (one a
# message) when its bytes are at most this long; a peer parses them again.
MAX_REPLAY = 128 * 1024
_MARK = b"F"  # every message: this byte, the request's bytes if any, and descriptors


class HandoffChannel:
    """The master's socket pair through which workers pass connections to each other."""

    def __init__(self) -> None:
        self._in, self._out = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._in.setblocking(False)
        self._out.setblocking(False)
        # Room for a message of MAX_REPLAY bytes (the kernel may cap it lower: such a
        # request then stays where it is).
        self._in.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * MAX_REPLAY)
        self._buffer = bytearray(len(_MARK) + MAX_REPLAY)

    def fileno(self) -> int:
        """The end workers read (readable while connections wait to be adopted)."""
        return self._out.fileno()

    def send(self, fds: list[int], replay: bytes = b"") -> int:
        """Pass the connections `fds` (the sender still has to close its own descriptors),
        with `replay`, the bytes of a request already read from the one connection in `fds`
        (at most MAX_REPLAY); returns how many went (0 when the queue is full)."""
        sent = 0
        while sent < len(fds):
            batch = fds[sent:sent + MAX_FDS]
            try:
                self._in.sendmsg([_MARK, replay], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                    array.array("i", batch))])
            except OSError:  # full (EAGAIN), too long (EMSGSIZE), or out of memory
                break
            sent += len(batch)
        return sent

    def receive(self) -> list[tuple[socket.socket, bytes]] | None:
        """The connections of one message, each with the bytes it already brought (possibly
        none, if the message was not ours), or None when no message waits. The sockets are
        blocking, as accept() returns them."""
        try:
            size, ancillary, _, _ = self._out.recvmsg_into(
                [self._buffer], socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return None
        fds = array.array("i")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        sockets = []
        for fd in fds:
            try:
                sockets.append(socket.socket(fileno=fd))
            except OSError:  # not a socket: nothing a worker sends
                socket.close(fd)
        replay = bytes(self._buffer[len(_MARK):size])
        if self._buffer[:len(_MARK)] != _MARK or (replay and len(sockets) != 1):
            for sock in sockets:
                sock.close()
            return []
        return [(sock, replay) for sock in sockets]

    def close(self) -> None:
        self._in.close()
        self._out.close()


class CallWatcher:
    """A thread that hands a worker's waiting connections to peers while its loop is in a
    long call into the app.

    The loop thread sets `started` (a `time.perf_counter()` value) as a call begins and
    calls `call_ended()` when it returns. `waiting()` is called from the watcher thread, while
    the call runs, to list what may be handed: (descriptor, what it belongs to) pairs; the
    loop must not change what it reads meanwhile (it is in the app). `peers_free()` says
    whether a peer could take them now. `call_ended()` returns what was handed during the
    call, for the loop to close.
    """

    def __init__(self, channel: HandoffChannel,
                 waiting: Callable[[], list[tuple[int, Any, bytes]]],
                 peers_free: Callable[[], bool]) -> None:
        self.channel = channel
        self.waiting = waiting
        self.peers_free = peers_free
        self.started = 0.0  # when the loop's call began; 0: not in a call
        self.calls = 0  # calls begun, so that the watcher sees whether any came
        self._lock = threading.Lock()  # the watcher hands off only while the call runs
        self._handed: list[Any] = []
        self._handed_fds: set[int] = set()
        self._parked = False
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="forkserve-handoff",
                                        daemon=True)
        self._thread.start()

    def call_begins(self, started: float) -> None:
        """Loop thread: a call into the app begins (at perf_counter() `started`)."""
        self.started = started
        self.calls += 1
        if self._parked:
            self._parked = False
            self._wake.set()

    def call_ended(self) -> list[Any]:
        """Loop thread: the call returned; what was handed during it, for the loop to close
        before it reads from any."""
        with self._lock:
            self.started = 0.0
            if not self._handed:
                return self._handed
            handed, self._handed = self._handed, []
            self._handed_fds.clear()
        return handed

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def _run(self) -> None:
        seen = self.calls
        quiet_since = time.monotonic()
        while not self._closed:
            started = self.started
            now = time.perf_counter()
            if started and now - started < HANDOFF_AFTER:
                time.sleep(started + HANDOFF_AFTER - now)
            else:
                time.sleep(CHECK_EVERY)
            if self.started and time.perf_counter() - self.started >= HANDOFF_AFTER:
                self._hand_off()
            if self.calls != seen or self.started:
                seen = self.calls
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= PARK_AFTER:
                self._park(seen)
                quiet_since = time.monotonic()

    def _park(self, seen: int) -> None:
        self._parked = True
        if self.calls == seen:  # (else a call began before it could see _parked)
            self._wake.wait()
        self._parked = False
        self._wake.clear()

    def _hand_off(self) -> None:
        with self._lock:
            started = self.started
            if not started or not self.peers_free():
                return
            handed = len(self._handed)
            plain = []
            for fd, owner, replay in self.waiting():
                if fd in self._handed_fds:
                    continue
                if not replay:
                    plain.append((fd, owner))
                elif self.channel.send([fd], replay):
                    self._handed_fds.add(fd)
                    self._handed.append(owner)
            sent = self.channel.send([fd for fd, _ in plain])
            for fd, owner in plain[:sent]:
                self._handed_fds.add(fd)
                self._handed.append(owner)
            if len(self._handed) > handed:
                error_log.debug("a call into the app has run for %.0f ms: handed %d waiting "
                                "connections to other workers", 1000 * (time.perf_counter()
                                                                        - started),
                                len(self._handed) - handed)
