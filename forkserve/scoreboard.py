"""A shared-memory scoreboard: how many connections each worker holds.

Workers share one listening socket, and the kernel hands a burst of new connections to
whichever worker reaches accept() first; with keep-alive they then stay there, so one worker
can end up with every client while another idles. The scoreboard lets a worker see that it
holds clearly more connections than an idle peer and leave the next connection to that peer
for a moment (see `SyncWorker._accept`).

The master creates it before forking (an anonymous shared mapping, inherited by every worker),
marks a slot live when it starts a worker and absent when the worker is gone. Each worker
writes only its own slot. Slot 0 holds the highest worker number in use.
"""

from __future__ import annotations

import mmap

SLOTS = 1024
UNAVAILABLE = 0xFFFFFFFF  # absent, or busy in the app and not accepting


class Scoreboard:
    """Per-worker connection counts in memory shared across fork().

    Worker numbers from SLOTS on are not tracked: such workers never defer to a peer.
    """

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, 4 * SLOTS)
        self._counts = memoryview(self._map).cast("I")
        for slot in range(1, SLOTS):
            self._counts[slot] = UNAVAILABLE
        self._counts[0] = 0

    def join(self, number: int) -> None:
        """Master: worker `number` is starting with no connections."""
        if number < SLOTS:
            self._counts[number] = 0
            self._counts[0] = max(self._counts[0], number)

    def leave(self, number: int) -> None:
        """Master: worker `number` is gone."""
        if number < SLOTS:
            self._counts[number] = UNAVAILABLE

    def set(self, number: int, connections: int) -> None:
        """Worker: it holds `connections` connections (UNAVAILABLE while it cannot accept)."""
        if number < SLOTS:
            self._counts[number] = connections

    def has_lighter_peer(self, number: int, margin: int) -> bool:
        """Worker: does another available worker hold at least `margin` fewer connections?"""
        counts = self._counts
        if number >= SLOTS or counts[number] == UNAVAILABLE:
            return False
        threshold = counts[number] - margin
        if threshold < 0:
            return False
        return any(counts[slot] <= threshold and slot != number
                   for slot in range(1, counts[0] + 1))
