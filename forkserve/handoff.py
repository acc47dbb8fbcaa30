"""Handing the connections a blocked loop cannot serve to a peer worker.

A worker that calls a WSGI app in its event loop (--threads 1, or `auto` while it calls in the
loop) serves none of its other connections until the call returns: idle keep-alive ones, and
one accepted just before the call began, wait behind it, however long it takes, while a peer
may be idle. So the master's `CallPoller` looks at every worker's call in the scoreboard
(every POLL_EVERY seconds once it saw a long call, else every SLOW_POLL), and nudges a worker
whose call has run for HANDOFF_AFTER while a peer is free (a byte on the worker's nudge
pipe). The worker's `CallWatcher` thread, asleep on that pipe, then sends the worker's
connections that wait for a request to a `HandoffChannel` (their descriptors, by SCM_RIGHTS;
a request already read goes along as bytes). Every worker reads the channel as it reads its
listening sockets, so the first free peer adopts them as new connections: the kernel still
holds whatever the client sent. When the call returns, the loop closes its own descriptors of
them before it reads from any (closing is not shutting down: the connection lives on in the
peer's descriptor).

Watching from the master costs the workers no work per request: a thread in each worker that
woke every 5 ms to look cost 2.5-3.5 us of CPU per hello-world request (its every wake-up
takes the GIL from a busy loop). The master stops polling after PARK_AFTER without a new call,
and a worker beginning one then tells it (a CALLING frame on its pipe).

The master creates the channel before forking (a datagram socket pair: whatever a worker
writes to one end, any worker may read from the other) and holds both ends, so connections
handed by a worker that dies before a peer took them wait for the next one.
"""

from __future__ import annotations

import array
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from forkserve.logs import error_log
from forkserve.scoreboard import Scoreboard

# A call into the app running this long gives its worker's waiting connections to peers. A
# fast call (hello world takes 10 us) never waits that long; a view waiting on its database
# for 40 ms would make its worker's other clients wait as long.
HANDOFF_AFTER = 0.005
# The master looks every POLL_EVERY seconds for FAST_FOR seconds after it saw a call running
# HANDOFF_AFTER, so that it notices such calls in 5-10 ms; else every SLOW_POLL seconds.
# Polling every 5 ms costs a busy worker about 2.5 us of CPU per hello-world request (the
# master's wake-ups disturb it, on 2 CPUs), every 100 ms about 0.4 us.
POLL_EVERY = 0.005
FAST_FOR = 10.0
SLOW_POLL = 0.1
# Having seen no call into the app running for this long, the master stops polling until a
# worker begins one.
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

    nudges = -1  # in a worker: the read end of its nudge pipe from the master

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
        assert not replay or len(fds) == 1, "request bytes go with one connection only"
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
        none, if the message was not ours), or None when no message waits. (The sockets are
        non-blocking: the sender's event loop made them so, and the flag is the
        connection's, not the descriptor's.)"""
        try:
            size, ancillary, flags, _ = self._out.recvmsg_into(
                [self._buffer], socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return None
        if flags & socket.MSG_CTRUNC:  # out of descriptors: the kernel dropped some
            error_log.error("lost connections handed over by another worker: this one is out "
                            "of file descriptors")
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


class CallPoller:
    """The master's side: polls the workers' calls while they come, nudges long ones."""

    def __init__(self, scoreboard: Scoreboard) -> None:
        self.scoreboard = scoreboard
        self.polling = True
        self._last_call = time.monotonic()  # when a call was last seen running
        self._fast_until = 0.0  # poll every POLL_EVERY until then
        scoreboard.set_polled(True)

    def timeout(self, timeout: float) -> float:
        """How long the master's loop may wait, at most `timeout`."""
        if not self.polling:
            return timeout
        return min(timeout, POLL_EVERY if time.monotonic() < self._fast_until else SLOW_POLL)

    def wake(self) -> None:
        """A worker began a call while the master was not polling."""
        if not self.polling:
            self._resume(time.monotonic())
            error_log.debug("a call into the app began: watching calls again")

    def _resume(self, now: float) -> None:
        self.polling = True
        self._last_call = now
        # The next two looks come soon: the call that woke the master may be a long one.
        self._fast_until = max(self._fast_until, now + 2 * POLL_EVERY)
        self.scoreboard.set_polled(True)

    def poll(self, workers: Sequence[tuple[int, int]], now: float) -> None:
        """Look at the calls of `workers`, (number, nudge pipe) pairs, at `now`
        (time.monotonic()): nudge those in a call for HANDOFF_AFTER while a peer is free
        (each time: a peer may have been busy, or the channel full, when it last looked)."""
        if not self.polling:
            return
        scoreboard = self.scoreboard
        for number, nudge_fd in workers:
            started = scoreboard.call_started(number)
            if not started:
                continue
            self._last_call = now
            if now - started < HANDOFF_AFTER:
                continue
            self._fast_until = now + FAST_FOR
            if scoreboard.hands_off(number) and scoreboard.has_free_adopter(number):
                try:
                    os.write(nudge_fd, b".")
                except OSError:  # full (it is not reading), or gone
                    pass
        if now - self._last_call >= PARK_AFTER:
            self.polling = False
            scoreboard.set_polled(False)
            # A call that began just before a worker could see that it must tell: look again.
            if any(scoreboard.call_started(number) for number, _ in workers):
                self._resume(now)
                return
            error_log.debug("no call into the app running for %g s: watching calls only once "
                            "one begins", PARK_AFTER)


class CallWatcher:
    """A worker's thread that, nudged by the master, hands the worker's waiting connections
    to peers while its loop is in a long call into the app.

    `call_started()` says when the loop's current call began (`time.monotonic()`; 0.0: none
    runs): the worker's scoreboard slot. `waiting()` is called from the watcher thread, while
    the call runs, to list what may be handed: (descriptor, what it belongs to, the bytes of
    a request read from it) triples; the loop must not change what it reads meanwhile (it is
    in the app). `peers_free()` says whether a peer could take them now. The loop looks at
    `attention` as each call ends, and if set collects what was handed with `call_ended()`,
    to close it.
    """

    def __init__(self, channel: HandoffChannel, nudges: int, call_started: Callable[[], float],
                 waiting: Callable[[], list[tuple[int, Any, bytes]]],
                 peers_free: Callable[[], bool]) -> None:
        self.channel = channel
        self.nudges = nudges
        self.call_started = call_started
        self.waiting = waiting
        self.peers_free = peers_free
        # Set by the watcher before it looks at a call, and left set while what it handed
        # is not collected: the loop then takes the lock as the call ends, and so waits for
        # a hand-off in progress to finish.
        self.attention = False
        self._lock = threading.Lock()
        self._handed: list[Any] = []
        self._handed_fds: set[int] = set()
        self._done_for = 0.0  # the call everything waiting was handed for
        self._thread = threading.Thread(target=self._run, name="forkserve-handoff",
                                        daemon=True)
        self._thread.start()

    def call_ended(self) -> list[Any]:
        """Loop thread, as a call ends with `attention` set: what was handed during it, for
        the loop to close before it reads from any (after a hand-off in progress ended)."""
        with self._lock:
            handed, self._handed = self._handed, []
            self._handed_fds.clear()
            self.attention = False
        return handed

    def _run(self) -> None:
        while True:
            try:
                if not os.read(self.nudges, 64):
                    return  # the master is gone
            except InterruptedError:
                continue
            except OSError:
                return
            try:
                self.hand_off()
            except Exception:  # not to end the thread: the next nudge tries again
                error_log.exception("handing connections to other workers failed")

    def hand_off(self) -> None:
        """Hand over the waiting connections if the loop's call has run HANDOFF_AFTER and a
        peer is free (what a nudge does)."""
        with self._lock:
            self.attention = True
            started = self.call_started()  # the call may have ended meanwhile
            # (While the call runs no connection comes: once all went, nudges change nothing.)
            if started and started != self._done_for \
                    and time.monotonic() - started >= HANDOFF_AFTER and self.peers_free():
                self._send(started)
            if not self._handed:
                self.attention = False

    def _send(self, started: float) -> None:
        handed = len(self._handed)
        plain = []
        missed = 0  # waiting connections that could not go (a full queue, a long request)
        for fd, owner, replay in self.waiting():
            if fd in self._handed_fds:
                continue
            if not replay:
                plain.append((fd, owner))
            elif self.channel.send([fd], replay):
                self._handed_fds.add(fd)
                self._handed.append(owner)
            else:
                missed += 1
        sent = self.channel.send([fd for fd, _ in plain])
        for fd, owner in plain[:sent]:
            self._handed_fds.add(fd)
            self._handed.append(owner)
        if not missed and sent == len(plain):
            self._done_for = started
        if len(self._handed) > handed:
            error_log.debug("a call into the app has run for %.0f ms: handed %d waiting "
                            "connections to other workers",
                            1000 * (time.monotonic() - started), len(self._handed) - handed)
