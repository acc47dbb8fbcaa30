"""A shared-memory scoreboard: how many connections each worker holds, and what it serves.

Workers share one listening socket, and the kernel hands a burst of new connections to
whichever worker reaches accept() first; with keep-alive they then stay there, so one worker
can end up with every client while another idles. The scoreboard lets a worker see that it
holds clearly more connections than an idle peer and leave the next connection to that peer
for a moment (see `SyncWorker._accept`).

A worker that calls the app from its loop also records the request it is serving, so that
when it hangs or dies the master can say which request it was in, and for how long. A worker
also marks its slot once it has accepted its first connection: a worker that dies after
taking traffic is replaced at once, one that dies before is treated as failing to boot.

The master creates it before forking (an anonymous shared mapping, inherited by every worker),
marks a slot live when it starts a worker and absent when the worker is gone. Each worker
writes only its own slot. Slot 0 holds the highest worker number in use.
"""

from __future__ import annotations

import mmap
import time

SLOTS = 1024
# Absent; busy in the app; or taking no connection now (stopping, over memory, full).
UNAVAILABLE = 0xFFFFFFFF
REQUEST_TEXT = 240  # bytes of a request line kept for the hang report
# A loop's call into the app younger than this still counts its worker in for balancing, with
# the connections it held when the call began: it will accept again in a moment. Without it a
# burst of keep-alive clients (wrk, a pool filling up) all went to whichever worker was not
# in a call just then, and stayed there (connections 11 / 21, requests 1.7 to 1). The same
# bound as forkserve.handoff.HANDOFF_AFTER, where a call becomes long; 1 ms was too short on
# 2 busy CPUs, where a worker is often preempted in the middle of a call.
SHORT_CALL = 0.005


class Scoreboard:
    """Per-worker connection counts, and the request each worker's loop is in, in memory
    shared across fork(). Worker numbers from SLOTS on are not tracked: such workers never
    defer to a peer.
    """

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, SLOTS * (4 + 8 + 4 + 1 + 1 + 4 + REQUEST_TEXT) + 2)
        view = memoryview(self._map)
        self._counts = view[:4 * SLOTS].cast("I")
        self._started = view[4 * SLOTS:12 * SLOTS].cast("d")  # when the request began
        self._lengths = view[12 * SLOTS:16 * SLOTS].cast("I")  # of its text; 0: none
        self._took_traffic = view[16 * SLOTS:17 * SLOTS]  # 1 once it accepted a connection
        self._hands_off = view[17 * SLOTS:18 * SLOTS]  # 1: hands connections to peers
        # The connections it last published (`set`), kept while it calls the app.
        self._held = view[18 * SLOTS:22 * SLOTS].cast("I")
        self._text = 22 * SLOTS  # where the texts begin in the map
        # 1 while the master polls the calls (forkserve.handoff); else a worker beginning one
        # tells it.
        self._polled = view[len(view) - 1:]
        # 1 once the server as a whole stops (the master's TERM, INT, QUIT): --health-path
        # answers 503. Not set for workers replaced one by one (reload, recycling).
        self._stopping = view[len(view) - 2:len(view) - 1]
        for slot in range(1, SLOTS):
            self._counts[slot] = UNAVAILABLE
        self._counts[0] = 0
        # Worker: the slot and request whose text was written last (see `serving`), and
        # its length.
        self._number = 0
        self._method = self._target = b""
        self._length = 0

    def join(self, number: int) -> None:
        """Master: worker `number` is starting; it counts once it publishes (accepting)."""
        if number < SLOTS:
            self._counts[number] = UNAVAILABLE
            self._lengths[number] = 0
            self._took_traffic[number] = 0
            self._hands_off[number] = 0
            self._counts[0] = max(self._counts[0], number)

    def leave(self, number: int) -> None:
        """Master: worker `number` is gone."""
        if number < SLOTS:
            self._counts[number] = UNAVAILABLE

    def set(self, number: int, connections: int) -> None:
        """Worker: it holds `connections` connections (UNAVAILABLE while it cannot accept)."""
        if number < SLOTS:
            self._counts[number] = connections
            self._held[number] = connections

    def mark_took_traffic(self, number: int) -> None:
        """Worker: it accepted its first connection."""
        if number < SLOTS:
            self._took_traffic[number] = 1

    def took_traffic(self, number: int) -> bool:
        """Master: has worker `number` ever accepted a connection? (Untracked slots: yes.)"""
        return number >= SLOTS or bool(self._took_traffic[number])

    def serving(self, number: int, method: bytes, target: bytes) -> bool:
        """Worker: its loop is now calling the app for a request (`method` `target`), not
        accepting. True if the master does not poll the calls now (see forkserve.handoff)."""
        if number >= SLOTS:
            return False
        self._counts[number] = UNAVAILABLE
        if method is not self._method or target is not self._target \
                or number != self._number:
            # (Keep-alive clients ask for the same again: its text is in place already.)
            self._number, self._method, self._target = number, method, target
            text = (method + b" " + target)[:REQUEST_TEXT]
            offset = self._text + REQUEST_TEXT * number
            self._map[offset:offset + len(text)] = text
            self._length = len(text)
        self._started[number] = time.monotonic()
        self._lengths[number] = self._length
        return not self._polled[0]

    def served(self, number: int) -> None:
        """Worker: its loop is back from the app."""
        if number < SLOTS:
            self._lengths[number] = 0

    def mark_hands_off(self, number: int, on: bool) -> None:
        """Worker: it hands its waiting connections to peers when nudged, and adopts theirs
        (until it stops)."""
        if number < SLOTS:
            self._hands_off[number] = on

    def hands_off(self, number: int) -> bool:
        """Master: does worker `number` hand connections to peers?"""
        return number < SLOTS and bool(self._hands_off[number])

    def has_free_adopter(self, number: int) -> bool:
        """Worker or master: is another worker that adopts handed connections accepting now
        (not busy in the app, not stopping)?"""
        counts = self._counts
        hands_off = self._hands_off
        return any(counts[slot] != UNAVAILABLE and hands_off[slot] and slot != number
                   for slot in range(1, counts[0] + 1))

    def set_stopping(self) -> None:
        """Master: the server stops; workers answer --health-path with 503."""
        self._stopping[0] = 1

    @property
    def stopping(self) -> bool:
        """Worker: does the server as a whole stop?"""
        return bool(self._stopping[0])

    @property
    def stopping_flag(self) -> memoryview:
        """Worker: the byte behind `stopping` (nonzero once the server stops), for a check
        on every request that costs an index, not a call."""
        return self._stopping

    def set_polled(self, polled: bool) -> None:
        """Master: whether it polls the workers' calls now."""
        self._polled[0] = polled

    def call_started(self, number: int) -> float:
        """Worker or master: when worker `number`'s loop began its current call into the app
        (time.monotonic()); 0.0 if none runs (or the slot is not tracked)."""
        if number >= SLOTS or not self._lengths[number]:
            return 0.0
        return self._started[number]

    def current_request(self, number: int) -> tuple[str, float] | None:
        """Master: the request worker `number`'s loop is in, and for how many seconds."""
        if number >= SLOTS or not self._lengths[number]:
            return None
        offset = self._text + REQUEST_TEXT * number
        text = self._map[offset:offset + self._lengths[number]]
        return text.decode("latin-1"), time.monotonic() - self._started[number]

    def has_lighter_peer(self, number: int, margin: int) -> bool:
        """Worker: does another available worker hold clearly fewer connections: at least
        `margin` fewer, and at least an eighth fewer? (The relative part keeps workers
        holding hundreds of connections each from leaving new ones to each other in turn.)
        A worker whose loop has been in the app for less than SHORT_CALL counts, with the
        connections it held; one in a longer call, or taking no connection now (every thread
        busy, stopping, over memory, at --worker-connections), does not."""
        if number >= SLOTS:
            return False
        counts = self._counts
        mine = counts[number]
        if mine == UNAVAILABLE:
            return False
        threshold = mine - max(margin, mine >> 3)
        if threshold < 0:
            return False
        now = 0.0
        for slot in range(1, counts[0] + 1):
            if slot == number:
                continue
            count = counts[slot]
            if count == UNAVAILABLE and self._lengths[slot]:
                now = now or time.monotonic()
                if now - self._started[slot] < SHORT_CALL:
                    count = self._held[slot]
            if count <= threshold:
                return True
        return False
