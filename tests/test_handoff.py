"""forkserve.handoff: the channel that carries connections between workers, the master's
poller that spots long calls, and the worker's thread that hands connections over when
nudged (real sockets, pipes, threads and scoreboard; the end-to-end behaviour is in
test_process.py)."""

from __future__ import annotations

import array
import os
import select
import socket
import time
from collections.abc import Iterator

import pytest

from forkserve.handoff import (
    HANDOFF_AFTER,
    MAX_FDS,
    MAX_REPLAY,
    POLL_EVERY,
    SLOW_POLL,
    CallPoller,
    CallWatcher,
    HandoffChannel,
)
from forkserve.scoreboard import UNAVAILABLE, Scoreboard

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def channel() -> Iterator[HandoffChannel]:
    channel = HandoffChannel()
    yield channel
    channel.close()


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for ours, theirs in made:
        ours.close()
        theirs.close()


def _pairs(made: list, count: int) -> list[tuple[socket.socket, socket.socket]]:
    new = [socket.socketpair() for _ in range(count)]
    made.extend(new)
    return new


def test_connections_and_their_bytes_arrive_as_sent(channel, pairs):
    (a, a_client), (b, b_client) = _pairs(pairs, 2)
    assert channel.send([a.fileno(), b.fileno()]) == 2
    assert channel.send([a.fileno()], b"GET / HTTP/1.1\r\n\r\n") == 1
    first = channel.receive()
    assert [replay for _, replay in first] == [b"", b""]
    second = channel.receive()
    assert [replay for _, replay in second] == [b"GET / HTTP/1.1\r\n\r\n"]
    assert channel.receive() is None
    # They are the same connections: what one end sends, the received socket reads.
    a_client.sendall(b"to a")
    b_client.sendall(b"to b")
    received = [sock for sock, _ in first + second]
    try:
        assert [sock.recv(10) for sock in received[:2]] == [b"to a", b"to b"]
        assert received[0].get_inheritable() is False  # not leaked to the app's children
    finally:
        for sock in received:
            sock.close()


def test_many_connections_go_in_batches(channel, pairs):
    made = _pairs(pairs, MAX_FDS + 3)
    assert channel.send([ours.fileno() for ours, _ in made]) == len(made)
    sizes = []
    while (given := channel.receive()) is not None:
        sizes.append(len(given))
        for sock, _ in given:
            sock.close()
    assert sizes == [MAX_FDS, 3]


def test_a_full_queue_or_an_oversized_request_sends_nothing(channel, pairs):
    (ours, _), = _pairs(pairs, 1)
    assert channel.send([ours.fileno()], b"x" * (4 * MAX_REPLAY)) == 0
    sent = 0
    while channel.send([ours.fileno()]):  # until the kernel's queue is full
        sent += 1
        assert sent < 100_000
    assert channel.send([ours.fileno()]) == 0
    received = 0
    while (given := channel.receive()) is not None:
        received += len(given)
        for sock, _ in given:
            sock.close()
    assert received == sent


def test_messages_not_from_a_worker_are_dropped(channel, pairs):
    (ours, _), (other, _) = _pairs(pairs, 2)
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [ours.fileno()]))]
    channel._in.sendmsg([b"junk"], rights)  # not our mark
    channel._in.sendmsg([b"Fbytes"], rights + [  # bytes for two connections at once
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [other.fileno()]))])
    with open("/dev/null", "rb") as not_a_socket:
        channel._in.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", [not_a_socket.fileno()]))])
    assert channel.receive() == []
    assert channel.receive() == []
    assert channel.receive() == []
    assert channel.receive() is None


@pytest.fixture
def board() -> Scoreboard:
    """Two workers accepting; worker 1 hands connections over."""
    scoreboard = Scoreboard()
    for number in (1, 2):
        scoreboard.join(number)
        scoreboard.set(number, 0)
    scoreboard.mark_hands_off(1, True)
    scoreboard.mark_hands_off(2, True)
    return scoreboard


class Worker1:
    """Stands for worker 1's loop thread: calls into the app, connections waiting; the
    master's poller looks at its calls."""

    def __init__(self, channel: HandoffChannel, board: Scoreboard, waiting: list) -> None:
        self.channel = channel
        self.board = board
        self.nudge_r, self.nudge_w = os.pipe()
        self.poller = CallPoller(board)
        self.watcher = CallWatcher(channel, self.nudge_r, lambda: board.call_started(1),
                                   lambda: list(waiting), lambda: board.has_free_adopter(1))

    def call(self, seconds: float, expect_hand_off: bool) -> list:
        """A call of `seconds`, polled by the master every POLL_EVERY; what was handed."""
        self.board.serving(1, b"GET", b"/slow")
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, POLL_EVERY))  # the master's poll interval
            self.poller.poll([(1, self.nudge_w)], time.monotonic())
        if expect_hand_off:  # the watcher thread acts on the nudge: wait for what it sends
            assert select.select([self.channel.fileno()], [], [], 5)[0]
        self.board.served(1)
        return self.watcher.call_ended() if self.watcher.attention else []

    def close(self) -> None:
        os.close(self.nudge_w)  # the watcher thread ends (EOF), as when the master is gone
        self.watcher._thread.join(5)
        os.close(self.nudge_r)
        assert not self.watcher._thread.is_alive()


@pytest.fixture
def workers() -> Iterator[list[Worker1]]:
    made: list[Worker1] = []
    yield made
    for worker in made:
        worker.close()


def test_a_long_call_hands_waiting_connections_over_once(channel, pairs, board, workers):
    (a, _), (b, _) = _pairs(pairs, 2)
    worker = Worker1(channel, board, [(a.fileno(), "a", b""), (b.fileno(), "b", b"GET")])
    workers.append(worker)
    assert worker.call(HANDOFF_AFTER / 5, expect_hand_off=False) == []  # short: nothing
    assert channel.receive() is None
    handed = worker.call(HANDOFF_AFTER * 6, expect_hand_off=True)
    assert sorted(handed) == ["a", "b"]  # for the loop to close
    given = [channel.receive(), channel.receive()]
    assert channel.receive() is None  # each went once, though the call was polled on
    assert sorted(replay for batch in given for _, replay in batch) == [b"", b"GET"]
    for batch in given:
        for sock, _ in batch:
            sock.close()


@pytest.mark.parametrize("peer", ["in a call", "not adopting"])
def test_nothing_is_handed_while_no_peer_is_free(channel, pairs, board, workers, peer):
    (a, _), = _pairs(pairs, 1)
    if peer == "in a call":
        board.set(2, UNAVAILABLE)
    else:  # stopping, or serving in a way that hands nothing over (it does not read them)
        board.mark_hands_off(2, False)
    worker = Worker1(channel, board, [(a.fileno(), "a", b"")])
    workers.append(worker)
    assert worker.call(HANDOFF_AFTER * 4, expect_hand_off=False) == []
    assert channel.receive() is None
    assert select.select([worker.nudge_r], [], [], 0)[0] == []  # not even nudged


def test_the_master_stops_polling_when_calls_stop_and_a_new_call_says_so(board, monkeypatch):
    monkeypatch.setattr("forkserve.handoff.PARK_AFTER", 0.05)
    poller = CallPoller(board)
    assert poller.timeout(1.0) == SLOW_POLL  # no long call seen yet
    assert board.serving(1, b"GET", b"/") is False  # polled: nothing to say
    poller.poll([(1, -1)], time.monotonic() + HANDOFF_AFTER)  # a long one (-1: no nudge)
    assert poller.timeout(1.0) == POLL_EVERY
    board.served(1)
    poller.poll([(1, -1)], time.monotonic())
    poller.poll([(1, -1)], time.monotonic() + 0.1)  # no new call since
    assert not poller.polling and poller.timeout(1.0) == 1.0
    assert board.serving(1, b"GET", b"/") is True  # the worker tells the master (CALLING)
    poller.wake()
    assert poller.polling and board.serving(1, b"GET", b"/") is False
    poller.poll([(1, -1)], time.monotonic() + 1.0)  # a call running keeps it polling
    assert poller.polling
