"""The worker's pool of app threads: grows as calls wait, up to its limit; shrinks when idle."""

from __future__ import annotations

import threading
import time

from forkserve.threadpool import ThreadPool


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_grows_to_its_limit_then_queues_and_every_call_runs():
    pool = ThreadPool(3, "test", idle_seconds=30)
    release = threading.Event()
    started: list[int] = []
    done: list[int] = []
    lock = threading.Lock()

    def call(n: int) -> None:
        with lock:
            started.append(n)
        release.wait(10)
        with lock:
            done.append(n)

    try:
        for n in range(5):
            pool.submit(call, n)
        wait_until(lambda: len(started) == 3)
        assert pool.threads == 3  # the limit: two calls wait in the queue
        assert sorted(started) == [0, 1, 2]
        release.set()
        wait_until(lambda: len(done) == 5)
        assert pool.threads == 3
    finally:
        release.set()
        pool.close()


def test_a_call_finding_an_idle_thread_starts_none():
    pool = ThreadPool(8, "test", idle_seconds=30)
    ran = threading.Event()
    try:
        for _ in range(20):
            ran.clear()
            pool.submit(ran.set)
            assert ran.wait(5)
            wait_until(lambda: pool._waiting == pool.threads)  # back to waiting
        assert pool.threads == 1
    finally:
        pool.close()


def test_idle_threads_end_and_new_calls_start_new_ones():
    pool = ThreadPool(4, "test", idle_seconds=0.2)
    release = threading.Event()
    try:
        for _ in range(4):
            pool.submit(release.wait, 10)
        wait_until(lambda: pool.threads == 4)
        release.set()
        wait_until(lambda: pool.threads == 0)
        ran = threading.Event()
        pool.submit(ran.set)
        assert ran.wait(5)
        assert pool.threads == 1
    finally:
        release.set()
        pool.close()


def test_an_error_a_call_lets_through_is_logged_and_the_thread_serves_on(caplog):
    pool = ThreadPool(1, "test", idle_seconds=30)
    ran = threading.Event()
    try:
        pool.submit(lambda: 1 / 0)
        pool.submit(ran.set)
        assert ran.wait(5)
        assert "uncaught error in a thread of the pool" in caplog.text
        assert "ZeroDivisionError" in caplog.text
        assert pool.threads == 1
    finally:
        pool.close()


def test_close_drops_waiting_calls_and_ends_the_threads():
    pool = ThreadPool(1, "test", idle_seconds=30)
    release = threading.Event()
    dropped = threading.Event()
    pool.submit(release.wait, 10)
    pool.submit(dropped.set)  # waits behind the first call
    wait_until(lambda: pool._queued == 1)
    pool.close()
    release.set()
    wait_until(lambda: not any(t.name.startswith("test_") for t in threading.enumerate()))
    assert not dropped.is_set()
