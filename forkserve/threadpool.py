"""A pool of threads for calls into a WSGI app: grows while calls wait, shrinks when idle.

`concurrent.futures.ThreadPoolExecutor` keeps every thread it started until shutdown and makes
a Future per call, which the worker never reads (a call reports its own end to the loop).
`ThreadPool` starts a thread when a call finds none idle, up to `limit`, and a thread that
waits `idle_seconds` for a call ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from itertools import count
from queue import Empty, SimpleQueue
from typing import Any

from forkserve.logs import error_log


class ThreadPool:
    """Runs `submit`ted calls in up to `limit` daemon threads named `name`_N.

    A call that finds every thread busy at the limit waits in the queue for the first free
    one. A call reports its own errors; one it lets through is logged."""

    def __init__(self, limit: int, name: str, idle_seconds: float = 30.0) -> None:
        self.limit = limit
        self.name = name
        self.idle_seconds = idle_seconds
        self._calls: SimpleQueue[tuple[Callable[..., Any], tuple] | None] = SimpleQueue()
        # Under _lock: threads running; of those, threads waiting for a call (or just
        # started to take one); calls submitted and not yet taken.
        self._lock = threading.Lock()
        self._threads = self._waiting = self._queued = 0
        self._numbers = count(1)
        self._closed = False

    @property
    def threads(self) -> int:
        """How many threads the pool runs now."""
        return self._threads

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        """Run `function(*args)` in a pool thread, as soon as one is free."""
        with self._lock:
            self._queued += 1
            start = (self._queued > self._waiting and self._threads < self.limit
                     and not self._closed)
            if start:
                self._threads += 1
                self._waiting += 1
        self._calls.put((function, args))
        if start:
            threading.Thread(target=self._serve, name=f"{self.name}_{next(self._numbers)}",
                             daemon=True).start()

    def close(self) -> None:
        """Drop the calls still waiting; end each thread once its call returns."""
        with self._lock:
            self._closed = True
            threads = self._threads
        while True:
            try:
                self._calls.get_nowait()
            except Empty:
                break
        for _ in range(threads):
            self._calls.put(None)

    def _serve(self) -> None:
        calls, lock = self._calls, self._lock
        while True:
            try:
                call = calls.get(timeout=self.idle_seconds)
            except Empty:
                with lock:
                    if self._queued >= self._waiting:
                        continue  # a call came meanwhile, counting on this thread
                    self._waiting -= 1
                    self._threads -= 1
                return
            if call is None:
                return
            with lock:
                self._waiting -= 1
                self._queued -= 1
            function, args = call
            try:
                function(*args)
            except Exception:
                error_log.exception("uncaught error in a thread of the pool")
            del call, function, args  # (nothing of the call is kept while idle)
            with lock:
                self._waiting += 1
