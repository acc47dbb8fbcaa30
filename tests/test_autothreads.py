"""--threads auto's decision (`AutoThreads`), fed real calls: where the next calls into the app
go. The worker-level behaviour is in test_wsgi_loop.py."""

from __future__ import annotations

import time

from forkserve.workers.autothreads import AutoThreads


def _wait_in_loop(auto: AutoThreads, seconds: float, now: float) -> bool:
    auto.batch_begins()
    time.sleep(seconds)  # gives up the CPU, as a call waiting on a database does
    return auto.called_in_loop(seconds, now)


def test_a_call_that_only_ran_long_is_not_slow():
    auto = AutoThreads()
    for _ in range(5):
        auto.batch_begins()
        started = time.perf_counter()
        while time.perf_counter() - started < 0.002:
            pass  # busy: as a call the kernel preempted looks, it never waited
        assert not auto.called_in_loop(time.perf_counter() - started, 0.0)
    assert (auto.slow_calls, auto.threaded) == (0, False)


def test_three_calls_that_waited_move_calls_to_threads_until_ten_calm_seconds():
    auto = AutoThreads()
    assert [_wait_in_loop(auto, 0.002, 1.0) for _ in range(3)] == [False, False, True]
    assert auto.threaded
    assert not auto.tick(1.5)  # a tick with slow calls: it stays, counting from 1.5
    assert not auto.called(0.0005, 3.0)  # fast, in a thread
    assert not auto.tick(11.0)  # calm, but not for 10 s yet
    assert auto.tick(11.6) and not auto.threaded


def test_a_few_calls_that_waited_among_many_fast_ones_do_not_move_calls():
    auto = AutoThreads()
    for _ in range(1000):
        auto.called_in_loop(0.00002, 0.0)
    assert [_wait_in_loop(auto, 0.002, 0.0) for _ in range(3)] == [False, False, False]
    assert not auto.threaded  # 3 of 1,003 calls: under 1%
    assert not auto.tick(1.0)
    assert [_wait_in_loop(auto, 0.002, 1.0) for _ in range(3)] == [False, False, True]
