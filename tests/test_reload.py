"""--reload: real files edited under a running server (forkserve.reloader, and the master
reloading on a change as HUP does)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import Server, children, exchange, forkserve_command
from test_process import wait_gone

from forkserve.reloader import Watcher

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
RELOADED = r"changed: reloading: starting"
REPLACED = r"replaced 2 workers"
# Without this the workers of these servers write no bytecode cache (the suite's
# environment may set it), and the cache's own pitfall would go untested.
WRITE_BYTECODE = {"PYTHONDONTWRITEBYTECODE": None}


def app_source(body: bytes) -> str:
    """A WSGI app module answering `body`."""
    return ("def app(environ, start_response):\n"
            f"    start_response('200 OK', [('Content-Length', '{len(body)}')])\n"
            f"    return [{body!r}]\n")


@pytest.fixture
def module(tmp_path) -> Path:
    """mod.py in an app folder of its own, answering b'v1'."""
    folder = tmp_path / "app"
    folder.mkdir()
    path = folder / "mod.py"
    path.write_text(app_source(b"v1"))
    return path


class Engine(NamedTuple):
    name: str  # what the log says it watches with
    env: dict[str, str]  # of the server
    failure: str  # what the log says first, if anything


# Each way --reload may run: the module that stands in for watchfiles on PYTHONPATH (none:
# the real one), and what the master then says.
ENGINES = {
    "watchfiles": (None, Engine("watchfiles", {}, "")),
    "polling": ("raise ImportError('not installed, as it were')\n", Engine("polling", {}, "")),
    "watchfiles-failing": (
        "def watch(*paths, **options):\n    raise OSError('OS file watch limit reached.')\n",
        Engine("polling", {}, "reload: watchfiles failed (OSError: OS file watch limit "
                              "reached.); polling instead")),
}


@pytest.fixture(params=sorted(ENGINES))
def engine(request, tmp_path) -> Engine:
    """How a server's --reload watches: with watchfiles, or polling where `import
    watchfiles` fails or its `watch` does."""
    fake, engine = ENGINES[request.param]
    if fake is None:
        return engine
    folder = tmp_path / "fake-watchfiles"
    folder.mkdir()
    (folder / "watchfiles.py").write_text(fake)
    return engine._replace(env={"PYTHONPATH": str(folder)})


def start(start_server: Callable[..., Server], module: Path, *args: str,
          engine: str = "watchfiles", env: dict | None = None) -> Server:
    """A --reload server of `module`'s app, 2 workers, in its folder, once it watches."""
    server = start_server("mod:app", "--reload", "--chdir", str(module.parent), "-w", "2",
                          *args, env=env)
    server.wait_for(rf"reload: watching {module.parent} for \*\.py with {engine} "
                    r"\(development mode\)")
    return server


def get(server: Server) -> bytes:
    return exchange(server, GET).body


def wait_replaced(server: Server, old: list[int], start: int) -> None:
    """Until a reload logged from `start` replaced the workers `old` and they exited (until
    it handles its TERM, an old worker may still take a connection)."""
    server.wait_for(REPLACED, start=start)
    for pid in old:
        server.wait_for(rf"\(pid {pid}\) exited with status 0", start=start)


class Requests:
    """A client thread sending requests back to back, each on a new connection, until
    stopped (at most `max_seconds`): counts answers and failures, and notes when each
    distinct body was first received."""

    def __init__(self, server: Server, max_seconds: float = 20.0) -> None:
        self.server = server
        self.max_seconds = max_seconds
        self.answers = 0
        self.failures: list[str] = []
        self.first_seen: dict[bytes, float] = {}
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Requests:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._thread.join(10)

    def wait_for_answers(self, count: int, timeout: float = 10.0) -> None:
        """Block until `count` more requests were answered."""
        with self._cond:
            target = self.answers + count
            if not self._cond.wait_for(lambda: self.answers >= target, timeout):
                raise AssertionError(f"fewer than {count} answers in {timeout} s; failures "
                                     f"{self.failures[:3]}")

    def wait_for_body(self, body: bytes, timeout: float = 10.0) -> float:
        """When `body` was first received (time.monotonic()), waiting up to `timeout`."""
        with self._cond:
            if not self._cond.wait_for(lambda: body in self.first_seen, timeout):
                raise AssertionError(f"{body!r} not received in {timeout} s; got "
                                     f"{sorted(self.first_seen)}, failures {self.failures[:3]}")
            return self.first_seen[body]

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stopping.is_set() and time.monotonic() < deadline:
            try:
                response = exchange(self.server, GET)
                assert response.status == 200, response
            except Exception as exc:  # every failure counts; none is retried
                with self._cond:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with self._cond:
                self.answers += 1
                self.first_seen.setdefault(response.body, time.monotonic())
                self._cond.notify_all()


def save_within_the_same_second(path: Path, text: str) -> None:
    """Save `text` as editors that write a new file and rename it over the old one do, with
    the old file's mtime: as a save within the second the workers wrote the bytecode cache
    would look to Python's cache check (mtime in whole seconds, and size)."""
    before = path.stat()
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    os.utime(new, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(new, path)


def test_edit_is_served_within_2_s_and_no_request_fails(start_server, module, engine):
    server = start(start_server, module, engine=engine.name,
                   env={**WRITE_BYTECODE, **engine.env})
    failures = [line.split("] ", 3)[-1] for line in server.lines if "failed" in line]
    assert failures == ([engine.failure] if engine.failure else [])
    old = server.workers()
    assert (module.parent / "__pycache__").is_dir()  # the workers cached mod.py's bytecode
    mark = server.mark()
    with Requests(server) as requests:
        requests.wait_for_body(b"v1")
        saved = time.monotonic()
        save_within_the_same_second(module, app_source(b"v2"))
        seconds = requests.wait_for_body(b"v2") - saved
        wait_replaced(server, old, mark)
        requests.wait_for_answers(10)  # and on, with the old workers gone
    print(f"{engine.name}: first new answer {seconds:.2f} s after the save; {requests.answers} "
          f"requests")
    assert seconds < 2.0
    assert requests.failures == []
    assert requests.answers > 10
    assert sorted(requests.first_seen) == [b"v1", b"v2"]
    os.kill(server.pid, signal.SIGTERM)
    assert server.wait_exit(10) == 0  # the watcher stops with the master


def test_syntax_error_keeps_old_code_serving_and_is_logged_once(start_server, module):
    server = start(start_server, module)
    old = server.workers()
    mark = server.mark()
    module.write_text("def app(environ, start_response:\n")
    server.wait_for(r"SyntaxError", start=mark)
    server.wait_for(r"reload: the old workers serve on until the next change", start=mark)
    server.wait_for_count(r"worker [34] \(pid \d+\) exited", 2, start=mark)
    assert server.workers() == old  # no new attempt until the next change
    assert get(server) == b"v1"
    mark = server.mark()
    module.write_text(app_source(b"v3"))
    wait_replaced(server, old, mark)
    assert get(server) == b"v3"
    assert sum("SyntaxError" in line for line in server.lines) == 1
    assert sum("failed to boot" in line for line in server.lines) == 1


def test_a_worker_dying_while_the_code_is_broken_waits_for_the_next_change(start_server,
                                                                          module):
    server = start(start_server, module, "-w", "1")
    [old] = server.workers()
    assert get(server) == b"v1"  # it took a request: its death is not taken for a failed boot
    mark = server.mark()
    module.write_text("raise RuntimeError('broken on disk')\n")
    server.wait_for(r"reload: the old workers serve on until the next change", start=mark)
    server.wait_for(r"worker 2 \(pid \d+\) exited with status 3", start=mark)
    os.kill(old, signal.SIGKILL)
    server.wait_for(rf"\(pid {old}\) killed by SIGKILL .*; replacing it", start=mark)
    with pytest.raises(AssertionError):  # (not logged within that time: no retry loop)
        server.wait_for(r"failed to boot|booted", start=server.mark(), timeout=1.0)
    assert server.workers() == []
    module.write_text(app_source(b"v2"))
    server.wait_for(r"worker \d booted", start=mark)
    assert get(server) == b"v2"
    assert sum("RuntimeError: broken on disk" in line for line in server.lines) == 1


def test_a_burst_of_20_writes_is_one_reload(start_server, module):
    server = start(start_server, module)
    first = server.workers()
    mark = server.mark()
    for i in range(20):
        (module.parent / f"helper{i % 4}.py").write_text(f"VALUE = {i}\n")
    # The first workers exit after "replaced" is logged: wait, or they would count as old.
    wait_replaced(server, first, mark)
    old = server.workers()
    mark = server.mark()
    module.write_text(app_source(b"v2"))  # one more change, once the burst's reload is over
    wait_replaced(server, old, mark)
    assert get(server) == b"v2"
    reloads = [line for line in server.lines if RELOADED in line]
    assert len(reloads) == 2, reloads
    assert "] helper0.py, helper1.py, helper2.py and 1 more changed" in reloads[0]


def test_excluded_paths_do_not_reload(start_server, module, engine):
    folder = module.parent
    # Made before the watching begins: a file written into a directory just made can come
    # before inotify watches it, and watchfiles would not see it at all.
    directories = ("__pycache__", ".hidden", "node_modules", "sub/venv")
    for directory in directories:
        (folder / directory).mkdir(parents=True, exist_ok=True)
    server = start(start_server, module, engine=engine.name, env=engine.env)
    mark = server.mark()
    for directory in directories:
        (folder / directory / "x.py").write_text("X = 1\n")
    (folder / "notes.txt").write_text("not code\n")
    (folder / "mod.py~").write_text("a backup\n")
    (folder / "sub" / "inner.py").write_text("Y = 1\n")  # counts: sub/ is not excluded
    server.wait_for(REPLACED, start=mark)
    reloads = [line for line in server.lines if RELOADED in line]
    assert len(reloads) == 1 and "] sub/inner.py changed: reloading" in reloads[0], reloads


def test_debounce_pushes_the_reload_back_up_to_a_second(module):
    """The watcher's own clock arithmetic, on real changes: a reload is due 0.2 s after the
    last change, and no later than 1 s after the first."""
    folder = module.parent
    watcher = Watcher([str(folder)], ["*.py"], [".*"])
    try:
        assert select.select([watcher], [], [], 5)[0], "the watching did not begin"
        watcher.read(0.0)

        def change(name: str, now: float) -> None:
            (folder / name).write_text(f"# {now}\n")
            assert select.select([watcher], [], [], 5)[0], "no change reported"
            watcher.read(now)

        change("a.py", 100.0)
        assert watcher.timeout(1.0, 100.0) == pytest.approx(0.2)
        assert watcher.due(100.19) == []
        change("b.py", 100.15)
        assert watcher.due(100.34) == []
        assert watcher.due(100.36) == [str(folder / "a.py"), str(folder / "b.py")]
        assert watcher.due(101.0) == []  # forgotten once taken
        for step in range(7):  # a change every 0.15 s: never 0.2 s of quiet
            change("a.py", 200.0 + 0.15 * step)
        assert watcher.due(200.99) == []
        assert watcher.due(201.0) == [str(folder / "a.py")]
    finally:
        watcher.close()


def test_usr2_and_winch_with_reload(start_server, module, tmp_path):
    pidfile = tmp_path / "fs.pid"
    server = start(start_server, module, "--pid", str(pidfile))
    old_workers = server.workers()
    mark = server.mark()
    os.kill(server.pid, signal.SIGUSR2)
    new_master = int(server.wait_for(r"USR2: started new master pid (\d+)", start=mark)[1])
    try:
        server.wait_for(rf"\[{new_master}\] \[INFO\] reload: watching", start=mark)
        server.wait_for(rf"\[{new_master}\] \[INFO\] ready: 2 workers", start=mark)
        os.kill(server.pid, signal.SIGWINCH)
        for pid in old_workers:
            server.wait_for(rf"\(pid {pid}\) exited with status 0", start=mark)
        new_workers = children(new_master)
        mark = server.mark()
        module.write_text(app_source(b"v2"))
        server.wait_for(rf"\[{server.pid}\] \[INFO\] mod.py changed: not reloading: the "
                        r"workers were stopped by WINCH", start=mark)
        wait_replaced(server, new_workers, mark)  # by the new master
        assert server.workers() == [new_master]
        assert get(server) == b"v2"
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait_exit(10) == 0
    finally:
        os.kill(new_master, signal.SIGTERM)
        wait_gone([new_master])


def test_reload_with_preload_is_refused(module):
    result = subprocess.run(forkserve_command() + ["--reload", "--preload", "mod:app"],
                            cwd=module.parent, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "--reload cannot be used with --preload" in result.stderr



def test_a_change_during_a_drain_does_not_reload(start_server, module):
    """TERM with --drain-delay: the server is on its way out; a file saved meanwhile starts
    no new workers (they would load the app only to be stopped)."""
    server = start(start_server, module, "--drain-delay", "2")
    os.kill(server.pid, signal.SIGTERM)
    server.wait_for(r"SIGTERM: draining for 2 s")
    mark = server.mark()
    module.write_text(app_source(b"v2"))
    assert server.wait_exit() == 0
    after = "\n".join(server.lines[mark:])
    assert "drain delay over: graceful stop" in after
    assert "reloading" not in after and "booted" not in after
