"""When a worker accepts connections, and when it leaves them to its peers for a while.

The worker accepts on the shared listening sockets from its own loop (`Acceptor`), so that the
scoreboard can spread connections across workers. It stops at --worker-connections (unless it
can close an idle connection for the new one), with every thread busy or over memory
(`AsyncioWorker.has_room`), and for good once stopping; it pauses while a peer is lighter
(rebalancing, see `Worker.accept_batch`) or the process is out of descriptors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from forkserve.workers.base import BALANCE_MARGIN, DEFER_POLL

if TYPE_CHECKING:
    from forkserve.sockets import Listener
    from forkserve.workers.aio import AsyncioWorker


class Acceptor:
    """Registers `worker`'s listening sockets with its loop, and its hand-off channel
    (connections handed by peers are taken like new ones, see workers/handover.py), or
    unregisters them; and pauses accepting.

    `accepting`: registered now; `deferring`: a pause lasts (ended by its timer, or by a
    connection closing: `resume`). Uses of the worker: its listeners and `handover`,
    `stopping`, `has_room()`, `accept_batch`, `accept_forced` and `take`, and the
    scoreboard's view of its peers.
    """

    def __init__(self, worker: AsyncioWorker) -> None:
        self.worker = worker
        self.loop = worker.loop
        self.accepting = False
        self.deferring = False

    def set_accepting(self, on: bool) -> None:
        """Accept connections from now on (`on`), or not."""
        if on == self.accepting:
            return
        self.accepting = on
        loop = self.loop
        for listener in self.worker.listeners:
            if on:
                loop.add_reader(listener.sock.fileno(), self._accept, listener)
            else:
                loop.remove_reader(listener.sock.fileno())
        handover = self.worker.handover
        if handover is not None:  # connections handed by peers: taken like new ones
            if on:
                loop.add_reader(handover.channel.fileno(), handover.adopt)
            else:
                loop.remove_reader(handover.channel.fileno())

    def resume(self, forced: bool = True) -> None:
        """End a pause of accepting; `forced`: accept one connection even if a peer is
        lighter (it may be slow to wake)."""
        self.deferring = False
        worker = self.worker
        if not worker.stopping and worker.has_room():
            worker.accept_forced = forced
            self.set_accepting(True)

    def pause(self, seconds: float, rebalancing: bool) -> None:
        """Stop accepting for `seconds`; `rebalancing` (a peer is lighter): until no peer is
        lighter, if that comes sooner."""
        self.deferring = True  # ended by the timer below, or by a connection closing
        self.set_accepting(False)
        if rebalancing:
            self._poll_deferral(self.loop.time() + seconds)
        else:
            self.loop.call_later(seconds, self.resume)

    def _poll_deferral(self, until: float) -> None:
        """A rebalancing pause ends at `until` (loop time), or as soon as no peer is lighter
        (looked at every DEFER_POLL): no worker idles while connections queue."""
        if not self.deferring:
            return  # ended already
        worker = self.worker
        if self.loop.time() >= until:
            self.resume()
        elif not worker.scoreboard.has_lighter_peer(worker.number, BALANCE_MARGIN):
            self.resume(forced=False)
        else:
            self.loop.call_later(DEFER_POLL, self._poll_deferral, until)

    def _accept(self, listener: Listener) -> None:
        self.worker.accept_batch(listener, self.pause, self.worker.take)
