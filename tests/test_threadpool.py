"""The worker's pool of app threads: grows as calls wait, up to its limit; shrinks when idle."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from forkserve.threadpool import ThreadPool


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.fixture
def new_pool() -> Iterator[Callable[..., ThreadPool]]:
    """ThreadPool(limit, "test", idle_seconds); each pool is closed after the test, and the
    `release` event set first, so that no call of the test is left waiting."""
    pools: list[ThreadPool] = []

    def make(limit: int, idle_seconds: float = 30) -> ThreadPool:
        pools.append(ThreadPool(limit, "test", idle_seconds))
        return pools[-1]

    make.release = threading.Event()
    yield make
    make.release.set()
    for pool in pools:
        pool.close()


def test_grows_to_its_limit_then_queues_and_every_call_runs(new_pool):
    pool = new_pool(3)
    started: list[int] = []
    done: list[int] = []
    lock = threading.Lock()

    def call(n: int) -> None:
        with lock:
            started.append(n)
        new_pool.release.wait(10)
        with lock:
            done.append(n)

    for n in range(5):
        pool.submit(call, n)
    wait_until(lambda: len(started) == 3)
    assert pool.threads == 3  # the limit: two calls wait in the queue
    assert sorted(started) == [0, 1, 2]
    new_pool.release.set()
    wait_until(lambda: len(done) == 5)
    assert pool.threads == 3


def test_a_call_finding_an_idle_thread_starts_none(new_pool):
    pool = new_pool(8)
    ran = threading.Event()
    for _ in range(20):
        ran.clear()
        pool.submit(ran.set)
        assert ran.wait(5)
        wait_until(lambda: pool._waiting == pool.threads)  # back to waiting
    assert pool.threads == 1


def test_idle_threads_end_and_new_calls_start_new_ones(new_pool):
    pool = new_pool(4, idle_seconds=0.2)
    for _ in range(4):
        pool.submit(new_pool.release.wait, 10)
    wait_until(lambda: pool.threads == 4)
    new_pool.release.set()
    wait_until(lambda: pool.threads == 0)
    ran = threading.Event()
    pool.submit(ran.set)
    assert ran.wait(5)
    assert pool.threads == 1


def test_an_error_a_call_lets_through_is_logged_and_the_thread_serves_on(new_pool, caplog):
    pool = new_pool(1)
    ran = threading.Event()
    pool.submit(lambda: 1 / 0)
    pool.submit(ran.set)
    assert ran.wait(5)
    assert "uncaught error in a thread of the pool" in caplog.text
    assert "ZeroDivisionError" in caplog.text
    assert pool.threads == 1


def test_close_drops_waiting_calls_and_ends_the_threads(new_pool):
    pool = new_pool(1)
    dropped = threading.Event()
    pool.submit(new_pool.release.wait, 10)
    pool.submit(dropped.set)  # waits behind the first call
    wait_until(lambda: pool._queued == 1)
    pool.close()
    new_pool.release.set()
    wait_until(lambda: not any(t.name.startswith("test_") for t in threading.enumerate()))
    assert not dropped.is_set()
