"""A worker's side of handing connections to peer workers, and of adopting theirs.

forkserve.handoff has the channel the connections go through, the master's poller that spots
long calls, and the worker's `CallWatcher` thread. While the loop is in a long call into a WSGI
app, that thread hands over the connections a peer could serve as new ones
(`Handover.waiting_connections`); as the call returns, the loop closes its own descriptors of
them (`Handover.close_handed`). Connections handed by peers come in through the same channel,
read with the listening sockets (workers/accepting.py), and are taken as if accepted
(`Handover.adopt`).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from forkserve.handoff import CallWatcher
from forkserve.logs import error_log
from forkserve.workers.base import ACCEPT_BATCH

if TYPE_CHECKING:
    from forkserve.workers.aio import AsyncioWorker
    from forkserve.workers.protocol import HTTPProtocol


class Handover:
    """Hands `worker`'s waiting connections to peers while its loop is in a long call into
    the app, and adopts theirs. Made by `start`, which also starts its watcher thread.

    It also tracks the plain connections accepted with nothing read whose protocol is not
    made yet (`accepted`, then `opened` and `settled`): a peer may take those meanwhile.
    Uses of the worker: its `idle` connections and its `ready` requests (read while the loop
    is in the app), its counters, and `take` for adopted connections.
    """

    def __init__(self, worker: AsyncioWorker) -> None:
        self.worker = worker
        self.channel = worker.handoff
        self.opening: set[int] = set()  # descriptors accepted, their protocol not yet made
        self.handed_opening: set[int] = set()  # of those, handed to a peer meanwhile
        self.watcher = CallWatcher(
            self.channel, self.channel.nudges,
            lambda: worker.scoreboard.call_started(worker.number),
            self.waiting_connections, self.peers_free)

    @classmethod
    def start(cls, worker: AsyncioWorker) -> Handover | None:
        """A Handover for `worker`, its watcher thread started; None (and a warning) when the
        thread cannot start."""
        try:
            return cls(worker)
        except RuntimeError as exc:  # a process limit counts threads too
            error_log.warning("worker %d cannot start its hand-off thread (%s): its "
                              "connections will wait behind long calls into the app",
                              worker.number, exc)
            return None

    def accepted(self, fd: int) -> None:
        """Descriptor `fd`, a plain connection with nothing read, was just accepted: a peer
        may take it until its protocol starts (`opened`)."""
        self.opening.add(fd)

    def opened(self, fd: int) -> bool:
        """The protocol of descriptor `fd` starts; False if a peer serves its connection
        (handed while opening)."""
        self.opening.discard(fd)  # (a peer may take it as idle from now on)
        return fd not in self.handed_opening

    def settled(self, fd: int) -> None:
        """Descriptor `fd` runs its protocol now, or was closed: forget it."""
        self.opening.discard(fd)
        self.handed_opening.discard(fd)

    def waiting_connections(self) -> list[tuple[int, Any, bytes]]:
        """(The watcher's thread, while the loop is in a call.) The connections a peer could
        serve as new ones: (descriptor, protocol, b"") of those idle with nothing read,
        (descriptor, descriptor, b"") of those accepted whose protocol is not made yet, and
        (descriptor, protocol, its bytes) of those whose request waits for the app, read in
        one piece (see `_replay`)."""
        waiting: dict[int, tuple[int, Any, bytes]] = {
            fd: (fd, fd, b"") for fd in list(self.opening)}
        for protocol in list(self.worker.idle):
            if _may_hand_off(protocol):
                waiting[protocol.fd] = (protocol.fd, protocol, b"")
        for cycle in list(self.worker.ready):
            protocol = cycle.out
            replay = _replay(protocol)
            if replay:
                waiting[protocol.fd] = (protocol.fd, protocol, replay)
        return list(waiting.values())

    def peers_free(self) -> bool:
        """(The watcher's thread.) Whether a peer that adopts connections is free now."""
        return self.worker.scoreboard.has_free_adopter(self.worker.number)

    def close_handed(self) -> None:
        """(The loop, as a call into the app ends with the watcher's `attention` set.) Close
        this worker's descriptors of the connections a peer now serves: a protocol now, a
        connection still opening as its protocol is made (see `opened`)."""
        worker = self.worker
        for owner in self.watcher.call_ended():
            if type(owner) is int:
                self.opening.discard(owner)  # not to be handed again in the next call
                self.handed_opening.add(owner)
                continue
            cycle = owner.cycle
            if cycle is not None:  # its request was queued for the app: the peer answers it
                worker.ready.remove(cycle)
                owner.cycle = None
                worker.in_flight -= 1
                worker.served -= 1
            owner.hand_over()

    def adopt(self) -> None:
        """Take the connections a peer handed over, as if accepted."""
        for _ in range(ACCEPT_BATCH):
            given = self.channel.receive()
            if given is None:
                return
            for sock, replay in given:
                self.worker.take(sock, None, replay)
            if not self.worker.acceptor.accepting:
                return  # it is full now: the rest are for a free peer


def _replay(protocol: HTTPProtocol) -> bytes:
    """(The watcher's thread, while the loop is in the app.) The bytes of `protocol`'s
    request, queued for the app, if a peer worker could serve it from them as a new
    connection: read in one piece of at most MAX_REPLAY bytes, with nothing after it (see
    `HTTPProtocol.last_read`); else b""."""
    data = protocol.last_read
    if data is None or not _quiet(protocol):
        return b""
    return data


def _may_hand_off(protocol: HTTPProtocol) -> bool:
    """(The watcher's thread, while the loop is in the app.) Whether a peer worker could
    serve `protocol`'s connection as a new one: it waits for a request with nothing of it
    read."""
    return protocol.cycle is None and _quiet(protocol)


def _quiet(protocol: HTTPProtocol) -> bool:
    """Not closing, nothing unparsed, nothing unsent (or held, see HTTPProtocol.corked),
    no WebSocket. (TLS and PROXY connections are never asked: their workers hand nothing
    over.)"""
    transport = protocol.transport
    return (protocol.ws is None and not protocol.closed and protocol.fd >= 0
            and protocol.corked is None
            and not protocol.reading_paused and not transport.is_closing()
            and not transport.get_write_buffer_size() and not protocol.conn.buffered())


def shut_down(fd: int) -> None:
    """End the connection of socket `fd` (still open: the transport closes it next) for the
    client: a worker that handed it over may still hold a descriptor of it, so closing ours
    alone would not."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the client reset it, or it is no socket at all
    finally:
        sock.detach()
