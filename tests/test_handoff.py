"""forkserve.handoff: the channel that carries connections between workers, and the thread
that hands them over while the loop is in a long call (real sockets and threads; the
end-to-end behaviour is in test_process.py)."""

from __future__ import annotations

import array
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from forkserve.handoff import HANDOFF_AFTER, MAX_FDS, MAX_REPLAY, CallWatcher, HandoffChannel

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


class Loop:
    """Stands for a worker's loop thread: calls of a given length, connections waiting."""

    def __init__(self, channel: HandoffChannel, waiting: list, peers_free: bool = True) -> None:
        self.waiting = waiting
        self.free = peers_free
        self.watcher = CallWatcher(channel, lambda: list(self.waiting), lambda: self.free)

    def call(self, seconds: float) -> list:
        self.watcher.call_begins(time.perf_counter())
        time.sleep(seconds)
        return self.watcher.call_ended()


@pytest.fixture
def loops() -> Iterator[list[Loop]]:
    made: list[Loop] = []
    yield made
    for loop in made:
        loop.watcher.close()


def test_a_long_call_hands_waiting_connections_over_once(channel, pairs, loops):
    (a, _), (b, _) = _pairs(pairs, 2)
    loop = Loop(channel, [(a.fileno(), "a", b""), (b.fileno(), "b", b"GET")])
    loops.append(loop)
    assert loop.call(0.0005) == []  # short: nothing moves
    assert channel.receive() is None
    handed = loop.call(HANDOFF_AFTER * 6)
    assert sorted(handed) == ["a", "b"]  # for the loop to close
    given = [channel.receive(), channel.receive()]
    assert channel.receive() is None  # each went once, though the call was watched on
    assert sorted(replay for batch in given for _, replay in batch) == [b"", b"GET"]
    for batch in given:
        for sock, _ in batch:
            sock.close()


def test_nothing_is_handed_while_no_peer_is_free(channel, pairs, loops):
    (a, _), = _pairs(pairs, 1)
    loop = Loop(channel, [(a.fileno(), "a", b"")], peers_free=False)
    loops.append(loop)
    assert loop.call(HANDOFF_AFTER * 4) == []
    assert channel.receive() is None


def test_a_parked_watcher_wakes_for_the_next_call(channel, pairs, loops, monkeypatch):
    monkeypatch.setattr("forkserve.handoff.PARK_AFTER", 0.05)
    (a, _), = _pairs(pairs, 1)
    loop = Loop(channel, [(a.fileno(), "a", b"")])
    loops.append(loop)
    parked = threading.Event()
    deadline = time.monotonic() + 5
    while not loop.watcher._parked:
        assert time.monotonic() < deadline, "the watcher never parked"
        parked.wait(0.01)
    assert loop.call(HANDOFF_AFTER * 6) == ["a"]
    given = channel.receive()
    assert len(given) == 1
    given[0][0].close()
