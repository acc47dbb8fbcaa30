"""--reload (development mode): watching the app's source files for changes.

The master owns a `Watcher`. A daemon thread watches the trees, with watchfiles (inotify and
its kin) when it imports, else by scanning them (mtime, size and inode of every file that
counts, every POLL_INTERVAL seconds). It queues the paths of each batch of changes and
writes a byte to a non-blocking pipe whose read end the master's selector watches; its first
byte says that the watching began, and only then does the master log that it watches. The
thread never logs and takes no lock the master uses, since the master may fork a worker at
any moment: it reports, and the master speaks.

The master debounces, the same for either engine: a change makes a reload due DEBOUNCE
seconds later, each further change within that time pushes it back, up to DEBOUNCE_MAX
after the first, so a burst of writes (a checkout, a formatter) is one reload. What a reload
does is HUP's business (`Master.reload`).

What counts: files created, modified, deleted or moved whose name matches an include
pattern, unless the name of the file or of a directory between it and the watched directory
matches an exclude pattern (the polling scan does not enter such directories).
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from forkserve.logs import error_log

# A change reloads once no other came for DEBOUNCE seconds, at most DEBOUNCE_MAX seconds
# after the first change of the batch.
DEBOUNCE = 0.2
DEBOUNCE_MAX = 1.0
# The polling engine scans every POLL_INTERVAL seconds, and every POLL_AGAIN seconds (less
# than DEBOUNCE) while the scans find changes, so that a burst it catches in the middle is
# still one reload.
POLL_INTERVAL = 0.5
POLL_AGAIN = 0.1
# watchfiles answers the thread after this many milliseconds without a change; its first
# answer tells the thread that the watches are set up. (It looks at the stop event every
# 50 ms anyway.)
WATCHFILES_QUIET_MS = 100
# How long closing waits for the thread.
JOIN_TIMEOUT = 1.0
# The reload's log line names this many of the changed files.
NAMES_SHOWN = 3


class Watcher:
    """Watches `dirs` (and their subdirectories) for changes to files named like an
    `include` pattern and not like an `exclude` one, from a thread started at once.

    The master registers `fileno()` in its selector and calls `read()` when it is readable,
    waits at most `timeout()`, and asks `due()` for the changed paths once they should be
    reloaded for. `close()` stops the thread and closes the pipe.
    """

    def __init__(self, dirs: Sequence[str], include: Sequence[str],
                 exclude: Sequence[str]) -> None:
        self.dirs = [os.path.abspath(d) for d in dirs]
        self.include = list(include)
        # Most specific first: a path's parts are counted from the nearest watched directory.
        self._roots = sorted((os.path.join(d, "") for d in self.dirs), key=len, reverse=True)
        self._include = _any_of(include)
        self._exclude = _any_of(exclude)
        self._watch = _watchfiles()
        # Written by the thread, read by the master:
        self.engine = "polling" if self._watch is None else "watchfiles"
        self._watching = False  # the thread watches (its first report)
        self._failure = ""  # why watchfiles failed, after which the thread polls
        self._reported: deque[str] = deque()  # changed paths (only the master takes them)
        # The master's:
        self._announced = False  # it logged that the watching began
        self._pending: dict[str, None] = {}  # changed paths, in order, not reloaded for yet
        self._first = 0.0  # when the pending batch began (time.monotonic())
        self._due = 0.0  # when it is to be reloaded for; 0: nothing pending
        self._read_fd, self._write_fd = os.pipe()
        for fd in (self._read_fd, self._write_fd):
            os.set_blocking(fd, False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="forkserve-reload", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        """The pipe's read end: readable when the thread reported."""
        return self._read_fd

    def read(self, now: float) -> None:
        """Take what the thread reported (its pipe was readable) at `now`
        (time.monotonic()): log what began or failed, and push the reload back (DEBOUNCE)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._read_fd, 4096)
        if self._failure:
            error_log.error("reload: watchfiles failed (%s); polling instead", self._failure)
            self._failure = ""
        if self._watching and not self._announced:
            self._announced = True
            error_log.info("reload: watching %s for %s with %s (development mode)",
                           ", ".join(self.dirs), ", ".join(self.include), self.engine)
        if not self._reported:
            return
        while self._reported:
            self._pending[self._reported.popleft()] = None
        self._first = self._first or now
        self._due = min(now + DEBOUNCE, self._first + DEBOUNCE_MAX)

    def timeout(self, timeout: float, now: float) -> float:
        """How long the master's loop may wait at `now`, at most `timeout`."""
        return max(0.0, min(timeout, self._due - now)) if self._due else timeout

    def due(self, now: float) -> list[str]:
        """The changed paths if their reload is due at `now` (then forgotten), else []."""
        if not self._due or now < self._due:
            return []
        changed = list(self._pending)
        self._pending.clear()
        self._first = self._due = 0.0
        return changed

    def close(self) -> None:
        """Stop the thread and close the pipe. (Should the thread not stop in time, its
        write end stays open: the thread may still write to that descriptor number.)"""
        self._stop.set()
        self._thread.join(JOIN_TIMEOUT)
        os.close(self._read_fd)
        if not self._thread.is_alive():
            os.close(self._write_fd)

    def close_inherited(self) -> None:
        """In a forked worker: close the pipe's ends (the thread did not come along)."""
        os.close(self._read_fd)
        os.close(self._write_fd)

    # -- in the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        if self._watch is not None:
            try:
                for changes in self._watch(*self.dirs, watch_filter=self._counts,
                                           stop_event=self._stop,
                                           rust_timeout=WATCHFILES_QUIET_MS,
                                           yield_on_timeout=True,
                                           ignore_permission_denied=True):
                    if changes or not self._watching:
                        self._report(sorted(path for _, path in changes))
                return
            except Exception as exc:  # e.g. the kernel's limit of inotify watches
                self._failure = f"{type(exc).__name__}: {exc}"
                self.engine = "polling"
        self._poll()

    def _counts(self, change: object, path: str) -> bool:
        """watchfiles' filter: does a change to `path` count?"""
        relative = os.path.basename(path)
        for root in self._roots:
            if path.startswith(root):
                relative = path[len(root):]
                break
        parts = relative.split(os.sep)
        return bool(self._include.match(parts[-1])) and not any(
            self._exclude.match(part) for part in parts)

    def _poll(self) -> None:
        known = self._scan()
        self._report([])
        interval = POLL_INTERVAL
        while not self._stop.wait(interval):
            found = self._scan()
            changed = sorted(path for path in known.keys() | found.keys()
                             if known.get(path) != found.get(path))
            known = found
            if changed:
                self._report(changed)
            interval = POLL_AGAIN if changed else POLL_INTERVAL

    def _scan(self) -> dict[str, tuple[int, int, int]]:
        """(mtime, size, inode) of every file that counts, by path."""
        found: dict[str, tuple[int, int, int]] = {}
        directories = list(self.dirs)
        while directories and not self._stop.is_set():
            try:
                entries = list(os.scandir(directories.pop()))
            except OSError:  # gone, or not readable
                continue
            for entry in entries:
                if self._exclude.match(entry.name):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        directories.append(entry.path)
                    elif self._include.match(entry.name):
                        stat = entry.stat()
                        found[entry.path] = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
                except OSError:  # gone meanwhile: a deletion the next scan sees
                    continue
        return found

    def _report(self, paths: list[str]) -> None:
        """Hand the master `paths` (none: only that the watching began)."""
        self._reported.extend(paths)
        self._watching = True
        with contextlib.suppress(OSError):  # full: a byte waits already; closed: stopping
            os.write(self._write_fd, b"!")


def describe(paths: Sequence[str]) -> str:
    """The first NAMES_SHOWN of `paths` (relative to the working directory), and how many
    more."""
    names = ", ".join(os.path.relpath(path) for path in paths[:NAMES_SHOWN])
    more = len(paths) - NAMES_SHOWN
    return f"{names} and {more} more" if more > 0 else names


def forget_bytecode(paths: Iterable[str]) -> None:
    """Remove the cached bytecode of the Python files among `paths`. A .pyc records its
    source's mtime in whole seconds and its size: had a worker written it just before a save
    of the same size within that second, the next workers would run the old code."""
    for path in paths:
        if path.endswith(".py"):
            with contextlib.suppress(OSError, ValueError):
                os.unlink(importlib.util.cache_from_source(path))


def _any_of(patterns: Sequence[str]) -> re.Pattern[str]:
    """One regular expression for names that match any of the glob `patterns` (none: one
    that matches nothing)."""
    return re.compile("|".join(fnmatch.translate(p) for p in patterns) or "(?!)")


def _watchfiles() -> Callable[..., Iterable[set[tuple[object, str]]]] | None:
    """watchfiles' `watch`, or None when it is not installed."""
    try:
        from watchfiles import watch
    except ImportError:
        return None
    # watch() imports platform (WSL detection) in the thread: a worker forked during that
    # import would find it half done. Imported here, it is only looked up there.
    import platform  # noqa: F401
    # It would log each batch and each quiet spell from the thread; the master says what
    # changed.
    quiet = logging.getLogger("watchfiles.main")
    quiet.disabled = True
    quiet.propagate = False
    return watch
