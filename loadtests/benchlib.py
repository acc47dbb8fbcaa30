"""Shared machinery of the ``loadtests`` server comparisons (stdlib only).

Not run on its own: ``bench_wsgi.py``, ``bench_asgi.py``, ``bench_slowloris.py`` and ``compare``
import it (they put this directory on ``sys.path`` by being run as scripts). It holds what they
need: the peers virtualenv, each server's command line and boot message, starting each server in
its own session and stopping its whole process group whatever happens, waiting for it to be
ready, the kinds of load (keep-alive, fresh connections, pipelined), the load generators (``wrk``
with ``pipeline.lua`` for pipelining, or ``loadgen.py`` beside this file) and reading their
output, what each worker used (CPU, memory, requests), the log summary and the markdown table.
What differs between the scripts (which servers, which ratios matter) stays in the scripts.

Only the ratios between servers measured in the same run are meaningful.
"""

from __future__ import annotations

import abc
import argparse
import atexit
import contextlib
import functools
import hashlib
import http.client
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The hello-world apps every comparison serves: a copy of ../shared/bench/apps.py (the same
# work, byte for byte, so that results stay comparable; tests/test_loadtests.py checks it),
# kept here so that the benchmarks run from a plain clone.
DEFAULT_APPS_DIR = Path(__file__).resolve().parent / "hello"
PEERS_VENV = HERE / ".peers-venv"
OUT_DIR = HERE / "out"
LOADGEN = HERE / "loadgen.py"
PIPELINE_LUA = HERE / "pipeline.lua"  # wrk's script for pipelined loads

EXPECTED_BODY = b"Hello, World!"
HOST = "127.0.0.1"
READY_TIMEOUT = 15.0  # seconds for a server to answer 200 and report all workers booted
STOP_TIMEOUT = 10.0  # seconds for the master to exit after SIGTERM before the group is killed
WARMUP_SECONDS = 1
PIP_TIMEOUT = 300.0
IMBALANCE_SHARE = 0.75  # flag a run where one worker used more than this share of worker CPU
SATURATED = 0.9  # flag a run where the generator kept its threads this busy
TITLE_REFRESH = 1.2  # seconds: a forkserve worker refreshes its title at least every second

EXIT_OK, EXIT_ERRORS, EXIT_SETUP, EXIT_INTERRUPTED = 0, 1, 2, 130

# Processes of a server's session that are not workers, recognised by their command line
# (uvicorn's and hypercorn's multiprocess modes start multiprocessing's resource tracker).
HELPER_CMDLINE = re.compile(rb"multiprocessing\.resource_tracker")
# forkserve's worker titles: "forkserve: worker 2 [app:app] 1520 requests".
TITLE = re.compile(r"worker (\d+) \[.*\] (\d+) requests?")

T = TypeVar("T")

# Every server process group started and not yet stopped, so no exit path leaves one behind.
_LIVE: dict[int, subprocess.Popen[bytes]] = {}


# -- servers and apps ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """One server configuration under test."""

    key: str  # name for --only
    label: str  # name in the table
    kind: str  # "forkserve", "gunicorn", "uvicorn", "hypercorn", "granian"
    extra: tuple[str, ...]  # worker-model arguments
    peer_of: str | None = None  # for a peer row: the key of the forkserve row it pairs with


@dataclass(frozen=True)
class App:
    """What every server of a run serves: MODULE:VARIABLE, importable from `dirs`, which answers
    every GET with `body`."""

    name: str
    target: str
    body: bytes
    dirs: tuple[Path, ...]


def hello_app(apps_dir: Path, interface: str) -> App:
    """The shared hello world (``apps.py`` in `apps_dir`) of `interface` ("wsgi" or "asgi")."""
    return App("hello", f"apps:{interface}", EXPECTED_BODY, (apps_dir,))


@dataclass(frozen=True)
class Boot:
    """How a server says it is fully up: a log line pattern and how often it must appear."""

    marker: re.Pattern[str]
    count: int


# kind -> (the log line that says a server or one of its workers booted, whether once per worker)
BOOT_LINES = {
    "forkserve": (r"ready: \d+ workers", False),
    "gunicorn": (r"Booting worker with pid", True),
    "uvicorn": (r"Application startup complete", True),  # after each worker's lifespan startup
    "hypercorn": (r"Running on http", True),
    "granian": (r"Started worker-\d+", True),
}


def boot_marker(server: Server, workers: int) -> Boot:
    """A log line pattern and how many times it must appear once every worker has booted."""
    line, per_worker = BOOT_LINES[server.kind]
    return Boot(re.compile(line), workers if per_worker else 1)


def server_command(server: Server, app: App, workers: int, port: int) -> list[str]:
    """The command line serving `app` with `workers` workers on HOST:`port`.

    The app is found through PYTHONPATH (run_server sets it to `app.dirs`), the same way for
    every server. Access logs stay off (forkserve, gunicorn, hypercorn and granian log none by
    default; uvicorn is told).
    """
    bind = ["--bind", f"{HOST}:{port}"]
    if server.kind == "forkserve":
        head = forkserve_command()
    elif server.kind == "gunicorn":
        head = [peer_bin("gunicorn"), *gunicorn_quiet_flags()]
    elif server.kind == "hypercorn":
        head = [peer_bin("hypercorn")]
    elif server.kind == "uvicorn":
        head, bind = [peer_bin("uvicorn"), "--no-access-log"], ["--host", HOST, "--port", str(port)]
    elif server.kind == "granian":
        head, bind = [peer_bin("granian")], ["--host", HOST, "--port", str(port)]
    else:
        raise ValueError(f"unknown server kind {server.kind!r}")
    return [*head, app.target, "--workers", str(workers), *server.extra, *bind]


def forkserve_command() -> list[str]:
    """forkserve from this interpreter's environment (with --allow-root when run as root, as
    benchmarks on a test machine often are: forkserve refuses root otherwise)."""
    script = Path(sys.executable).with_name("forkserve")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "forkserve"]
    return [*base, "--allow-root"] if os.geteuid() == 0 else base


# -- prerequisites ------------------------------------------------------------------------------


def check_apps_dir(apps_dir: Path) -> bool:
    if (apps_dir / "apps.py").is_file():
        return True
    print(f"error: no apps.py in {apps_dir} (use --apps-dir)", file=sys.stderr)
    return False


def peers_python() -> Path:
    return PEERS_VENV / "bin" / "python"


def peer_bin(name: str) -> str:
    return str(PEERS_VENV / "bin" / name)


_PROBE = """
import importlib, importlib.metadata, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ImportError:
        print(name, "-")
        continue
    try:
        print(name, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        print(name, "?")
"""


def peer_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Version of each module importable in the peers venv (None when it is not)."""
    names = list(names)
    probe = subprocess.run([str(peers_python()), "-c", _PROBE, *names], capture_output=True,
                           text=True, timeout=60)
    found: dict[str, str | None] = dict.fromkeys(names)
    if probe.returncode == 0:
        for line in probe.stdout.splitlines():
            name, _, version = line.partition(" ")
            if name in found and version != "-":
                found[name] = version
    return found


def ensure_peers_venv(needs: Mapping[str, str]) -> dict[str, str]:
    """Create or reuse loadtests/.peers-venv holding the modules in `needs`; return versions.

    `needs` maps a module to the pip requirement that provides it; only the requirements of
    missing modules are installed.
    """
    python = peers_python()
    if not python.exists():
        print(f"creating {PEERS_VENV.relative_to(REPO)} ...", file=sys.stderr)
        if PEERS_VENV.exists():
            shutil.rmtree(PEERS_VENV)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True,
                       timeout=PIP_TIMEOUT)
    versions = peer_versions(needs)
    missing = [name for name, version in versions.items() if version is None]
    if missing:
        specs = sorted({needs[name] for name in missing})
        print(f"installing {' '.join(specs)} into the peers venv ...", file=sys.stderr)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", *specs],
                       check=True, timeout=PIP_TIMEOUT)
        versions = peer_versions(needs)
        still = [name for name, version in versions.items() if version is None]
        if still:
            raise RuntimeError(f"{', '.join(still)} still not importable after pip install")
    return {name: version or "?" for name, version in versions.items()}


def require_peers(needs: Mapping[str, str]) -> dict[str, str]:
    """ensure_peers_venv, or exit with status 2 saying why it could not be set up."""
    try:
        return ensure_peers_venv(needs)
    except (subprocess.SubprocessError, RuntimeError, OSError) as exc:
        print(f"error: could not set up {', '.join(sorted(set(needs.values())))} in "
              f"{PEERS_VENV}: {exc}", file=sys.stderr)
        sys.exit(EXIT_SETUP)


@functools.cache
def gunicorn_quiet_flags() -> tuple[str, ...]:
    """gunicorn >= 24 opens a control socket under ~/.gunicorn; the benchmark does not need it."""
    probe = subprocess.run([peer_bin("gunicorn"), "--help"], capture_output=True,
                           text=True, timeout=60)
    return ("--no-control-socket",) if "--no-control-socket" in probe.stdout else ()


def forkserve_version() -> str:
    """`forkserve --version`; exits with status 2 when forkserve cannot run from this Python."""
    probe = subprocess.run([*forkserve_command(), "--version"], capture_output=True, text=True,
                           timeout=60)
    if probe.returncode != 0:
        print(f"error: forkserve does not run from {sys.executable} (install it with "
              f"pip install -e . in this environment): {probe.stderr.strip()[-300:]}",
              file=sys.stderr)
        sys.exit(EXIT_SETUP)
    return probe.stdout.strip()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# -- load generators ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadKind:
    """How each connection of a load carries its requests: ``keepalive``, one at a time, the next
    written as soon as the last response is read; ``fresh``, one per connection, sent with
    ``Connection: close``, the connection closed once its response is read and a new one opened;
    ``pipelined``, `depth` requests written at once, then their `depth` responses read before the
    next batch."""

    name: str = "keepalive"
    depth: int = 1

    def __post_init__(self) -> None:
        if self.name not in LOAD_KINDS:
            raise ValueError(f"unknown load kind {self.name!r}")
        if self.depth < 1 or (self.depth > 1 and self.name != "pipelined"):
            raise ValueError(f"a {self.name} load cannot have depth {self.depth}")

    @property
    def pipelined(self) -> bool:
        return self.name == "pipelined"

    @property
    def how(self) -> str:
        """What the report says of it."""
        return LOAD_KINDS[self.name].format(depth=self.depth)

    @property
    def tag(self) -> str:
        """What a row's name says of it (nothing for keep-alive)."""
        return {"keepalive": "", "pipelined": f", pipelined {self.depth}"}.get(self.name,
                                                                             f", {self.name}")


# LoadKind.name -> what the report says of it, formatted with its depth
LOAD_KINDS = {
    "keepalive": "keep-alive",
    "fresh": "a new connection for every request, Connection: close",
    "pipelined": "keep-alive, {depth} requests written at once, then their {depth} responses read",
}
KEEPALIVE = LoadKind()


@dataclass
class LoadResult:
    """What a load generator measured, and what it cost it."""

    rps: float = 0.0
    requests: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    bad_responses: int = 0  # a non-2xx/3xx (wrk), or a wrong status or body (loadgen)
    socket_errors: int = 0
    error_detail: str = ""  # errors by kind, for the notes
    sent: int | None = None  # requests written, when the generator says (pipelined loads)
    remarks: str = ""  # what else the generator saw that is no error, for the notes
    failure: str | None = None  # the generator did not run or its output could not be read
    cpu_seconds: float = 0.0  # the generator's own CPU time (user + system)
    wall_seconds: float = 0.0
    threads: int = 1  # CPUs the generator can keep busy

    @property
    def errors(self) -> int:
        return self.bad_responses + self.socket_errors

    @property
    def busy(self) -> float:
        """The share of its threads' time the generator spent on the CPU."""
        return self.cpu_seconds / (self.wall_seconds * self.threads) if self.wall_seconds else 0.0

    @property
    def saturated(self) -> bool:
        """Whether the generator was so busy that it may have limited the rate."""
        return self.busy >= SATURATED


class Generator(abc.ABC):
    """An HTTP/1.1 load generator run as a subprocess, with `threads` threads (or processes),
    making a load of some LoadKind."""

    name = ""
    shown = ""  # its name in the report
    checks = ""  # what it checks beyond statuses and framing, for the report
    ok_statuses: tuple[int, ...] = (0,)  # exit statuses after which the output is read

    def __init__(self, program: str, threads: int = 1) -> None:
        self.program = program
        self.threads = threads

    @property
    @abc.abstractmethod
    def head(self) -> list[str]:
        """The command line before the load's options."""

    @abc.abstractmethod
    def options(self, connections: int, seconds: int, kind: LoadKind) -> list[str]:
        """The options that set the load, before the URL (run from the repository's root)."""

    def after_url(self, kind: LoadKind) -> list[str]:
        """The arguments that follow the URL."""
        return []

    def command(self, url: str, connections: int, seconds: int, kind: LoadKind) -> list[str]:
        return [*self.head, *self.options(connections, seconds, kind), url,
                *self.after_url(kind)]

    @abc.abstractmethod
    def parse(self, output: str) -> LoadResult: ...

    @abc.abstractmethod
    def version(self) -> str: ...

    def describe(self, connections: int, seconds: int, kind: LoadKind = KEEPALIVE) -> str:
        """The command line as the report shows it (the URL only when arguments follow it)."""
        after = self.after_url(kind)
        return (f"{self.shown} {shlex.join(self.options(connections, seconds, kind))}"
                f"{' URL ' + shlex.join(after) if after else ''} ({kind.how}{self.checks})")

    def stdin(self, body: bytes) -> bytes:
        """What the generator reads on stdin, given the body every response must have."""
        return b""

    def run(self, port: int, connections: int, seconds: int, body: bytes,
            kind: LoadKind = KEEPALIVE) -> tuple[LoadResult, str]:
        """Load 127.0.0.1:`port` for `seconds`; the result and the generator's full output.

        Its CPU time is the change in this process's RUSAGE_CHILDREN, so nothing else may be
        reaped meanwhile (the servers under test are reaped only once stopped). A run without a
        single response is a failure.
        """
        cmd = self.command(f"http://{HOST}:{port}/", connections, seconds, kind)
        before, started = children_cpu(), time.monotonic()
        try:
            done = subprocess.run(cmd, input=self.stdin(body), capture_output=True,
                                  timeout=seconds + 30, cwd=REPO)
        except subprocess.TimeoutExpired:
            return LoadResult(failure=f"{self.name} did not finish within {seconds + 30} s"), ""
        wall, cpu = time.monotonic() - started, children_cpu() - before
        output = (done.stdout + done.stderr).decode(errors="replace")
        result = self.parse(done.stdout.decode(errors="replace"))
        if done.returncode not in self.ok_statuses:
            result.failure = (f"{self.name} exited with status {done.returncode}: "
                              f"{output.strip()[-200:]}")
        elif not result.failure and not result.requests:
            result.failure = f"not one response in {seconds} s"
        result.cpu_seconds, result.wall_seconds, result.threads = cpu, wall, self.threads
        return result, output


class Wrk(Generator):
    """wrk, checking status codes and framing (not bodies); pipelining with pipeline.lua."""

    name = shown = "wrk"

    @property
    def head(self) -> list[str]:
        return [self.program]

    def options(self, connections: int, seconds: int, kind: LoadKind) -> list[str]:
        extra = {"fresh": ["-H", "Connection: close"],
                 "pipelined": ["-s", shown(PIPELINE_LUA)]}.get(kind.name, [])
        return [f"-t{self.threads}", f"-c{connections}", f"-d{seconds}s", "--latency", *extra]

    def after_url(self, kind: LoadKind) -> list[str]:
        return ["--", str(kind.depth)] if kind.pipelined else []

    def parse(self, output: str) -> LoadResult:
        return parse_wrk(output)

    def version(self) -> str:
        probe = subprocess.run([self.program, "--version"], capture_output=True, text=True,
                               timeout=10)
        first = (probe.stdout or probe.stderr).splitlines()
        return first[0].split(" [")[0] if first else "wrk ?"


class Loadgen(Generator):
    """loadtests/loadgen.py on this Python, checking every response's status and body."""

    name, shown = "loadgen", "loadgen.py"
    checks = "; every response's status and body checked"
    ok_statuses = (0, 1)  # 1: it counted errors, which the result says

    @property
    def head(self) -> list[str]:
        return [self.program, str(LOADGEN), "--json", "--expect-body-file", "-"]

    def options(self, connections: int, seconds: int, kind: LoadKind) -> list[str]:
        extra = {"fresh": ["--fresh"], "pipelined": ["--pipeline", str(kind.depth)]}
        return ["-p", str(self.threads), "-c", str(connections), "-d", str(seconds),
                *extra.get(kind.name, [])]

    def stdin(self, body: bytes) -> bytes:
        return body

    def parse(self, output: str) -> LoadResult:
        try:
            found = json.loads(output)
        except ValueError:
            return LoadResult(failure=f"unreadable loadgen output {output.strip()[-200:]!r}")
        errors = found["errors"]
        detail = ", ".join(f"{kind} {n}" for kind, n in errors.items() if n)
        if found["first_error"]:
            detail += f"; first: {found['first_error']}"
        bad = errors["status"] + errors["body"]
        remarks = [f"{found['reconnects']} connections reopened after the server closed them "
                   "(saying Connection: close)" if found["reconnects"] else "",
                   f"{found['unanswered']} pipelined requests left unanswered on them"
                   if found["unanswered"] else ""]
        return LoadResult(rps=found["rps"], requests=found["requests"], p50_ms=found["p50_ms"],
                          p99_ms=found["p99_ms"], bad_responses=bad,
                          socket_errors=sum(errors.values()) - bad, error_detail=detail,
                          sent=found["sent"] if found["depth"] > 1 else None,
                          remarks="; ".join(filter(None, remarks)))

    def version(self) -> str:
        return f"loadgen.py (Python {sys.version.split()[0]})"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def require_generator(choice: str | None) -> Generator:
    """The generator asked for; without a choice wrk when installed, else loadgen.py.

    Exits with status 2 when wrk is asked for and not installed.
    """
    wrk = shutil.which("wrk")
    if choice == "loadgen" or (choice is None and wrk is None):
        if choice is None:
            print("note: wrk is not installed (apt-get install wrk); using loadtests/loadgen.py",
                  file=sys.stderr)
        return Loadgen(sys.executable)
    if wrk is None:
        print("error: wrk is not on PATH. Install it with:  apt-get install wrk\n"
              "(or use --generator loadgen)", file=sys.stderr)
        sys.exit(EXIT_SETUP)
    return Wrk(wrk)


UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"unreadable latency {text!r}")
    return float(match.group(1)) * UNITS_MS[match.group(2)]


# pipeline.lua's last line
WRK_PIPELINED = re.compile(r"^Pipelined: (\d+) batches of (\d+) requests written", re.M)


def parse_wrk(output: str) -> LoadResult:
    """wrk's result; with pipeline.lua's line, the requests written, and no percentiles: wrk
    4.1 corrects latency for coordinated omission as if each write carried one request, which
    with deeper batches leaves its percentiles meaningless (often 0)."""
    result = LoadResult()
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    total = re.search(r"^\s*(\d+) requests in ", output, re.M)
    if rps is None or total is None:
        result.failure = "no Requests/sec in wrk output"
        return result
    result.rps = float(rps.group(1))
    result.requests = int(total.group(1))
    for pct, attr in (("50", "p50_ms"), ("99", "p99_ms")):
        line = re.search(rf"^\s*{pct}(?:\.0+)?%\s+(\S+)", output, re.M)
        if line is not None:
            setattr(result, attr, to_ms(line.group(1)))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx is not None:
        result.bad_responses = int(non_2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     output)
    if sock is not None:
        counts = [int(n) for n in sock.groups()]
        result.socket_errors = sum(counts)
        names = ("connect", "read", "write", "timeout")
        result.error_detail = ", ".join(
            f"{name} {n}" for name, n in zip(names, counts, strict=True) if n)
    pipelined = WRK_PIPELINED.search(output)
    if pipelined is not None and int(pipelined.group(2)) > 1:
        result.sent = int(pipelined.group(1)) * int(pipelined.group(2))
        result.p50_ms = result.p99_ms = None
    return result


# -- process handling ---------------------------------------------------------------------------


def session_processes(sid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every live process in session `sid`, by pid (Linux)."""
    found: dict[int, float] = {}
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name, which may itself hold spaces.
        rest = stat[stat.rfind(")") + 2:].split()
        state, session = rest[0], int(rest[3])
        if session == sid and state != "Z":
            found[int(entry)] = (int(rest[11]) + int(rest[12])) / ticks
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path("/proc", str(pid), "cmdline").read_bytes().replace(b"\0", b" ").strip()
    except OSError:
        return b""


def code_digest() -> str:
    """A digest of the files under forkserve/, which the editable install runs."""
    digest = hashlib.sha1()
    root = REPO / "forkserve"
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            with contextlib.suppress(OSError):
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:10]


def source_state() -> str:
    """The commit, whether forkserve/ differs from it, and the code's digest: the results belong
    to that state of the code."""
    state = f"code digest {code_digest()}"
    git = shutil.which("git")
    if git is None:
        return state

    def run(*args: str) -> str:
        done = subprocess.run([git, "--no-optional-locks", "-C", str(REPO), *args],
                              capture_output=True, text=True, timeout=30)
        return done.stdout

    head = run("rev-parse", "--short", "HEAD").strip() or "?"
    changed = run("status", "--porcelain", "--untracked-files=all", "--", "forkserve").splitlines()
    dirty = f" + uncommitted changes to {len(changed)} file(s) in forkserve/" if changed else ""
    return f"git {head}{dirty}, {state}"


def code_change_warning(source: str, digest: str) -> list[str]:
    """A warning line when forkserve/ no longer has `digest`, the one it had when the run
    started (at `source`, from source_state), else none."""
    if code_digest() == digest:
        return []
    return [f"- WARNING: forkserve/ changed during the run (at start: {source}; at end: "
            f"{source_state()}); rows may have measured different code"]


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_leftovers() -> None:
    for pid, proc in list(_LIVE.items()):
        kill_group(pid)
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)
        _LIVE.pop(pid, None)


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    """Kill every server group still running at exit, including on SIGTERM and SIGHUP."""
    atexit.register(kill_leftovers)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_exit)


@dataclass
class Running:
    """A started server and what was seen while stopping it."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def run_server(cmd: list[str], log_path: Path, app_dirs: Sequence[Path]) -> Iterator[Running]:
    """Start `cmd` in its own session with `app_dirs` on PYTHONPATH; on exit SIGTERM it, then
    SIGKILL its process group."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(d) for d in app_dirs))
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, cwd=REPO, env=env)
    _LIVE[proc.pid] = proc
    running = Running(proc, log_path)
    try:
        yield running
    finally:
        stop_server(running)


@contextlib.contextmanager
def booted(server: Server, app: App, workers: int,
           log_path: Path) -> Iterator[tuple[Running, int, str | None]]:
    """run_server for `server` serving `app` on a free port, then wait_ready: the running
    server, its port, and why it is not ready (None when it is)."""
    port = free_port()
    cmd = server_command(server, app, workers, port)
    print(f"--- {server.label}: {' '.join(cmd)}", file=sys.stderr)
    with run_server(cmd, log_path, app.dirs) as running:
        yield running, port, wait_ready(running, port, boot_marker(server, workers), app.body)


def stop_server(running: Running) -> None:
    proc = running.proc
    try:
        if proc.poll() is None:
            started = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
                running.notes.append(f"stopped by SIGTERM in {time.monotonic() - started:.2f} s "
                                     f"(status {proc.returncode})")
            except subprocess.TimeoutExpired:
                running.notes.append(f"master still running {STOP_TIMEOUT:.0f} s after SIGTERM;"
                                     " killed")
        else:
            running.notes.append(f"master had already exited with status {proc.returncode}")
        leftovers = session_processes(proc.pid)
        if leftovers:
            running.notes.append(f"{len(leftovers)} process(es) of the group outlived the "
                                 f"master: {sorted(leftovers)}; killed")
    finally:
        kill_group(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        _LIVE.pop(proc.pid, None)


def wait_ready(running: Running, port: int, boot: Boot,
               body: bytes = EXPECTED_BODY) -> str | None:
    """Poll until a GET / answers 200 with `body` and all workers have booted.

    Returns None when ready, else why not.
    """
    deadline = time.monotonic() + READY_TIMEOUT
    answered = False
    last = "no answer"
    while time.monotonic() < deadline:
        if running.proc.poll() is not None:
            return f"exited with status {running.proc.returncode} before becoming ready"
        if not answered:
            answered, last = probe(port, body)
        if answered and len(boot.marker.findall(read_log(running.log_path))) >= boot.count:
            return None
        time.sleep(0.1)
    if answered:
        return f"answered, but not all workers booted within {READY_TIMEOUT:.0f} s"
    return f"not ready within {READY_TIMEOUT:.0f} s ({last})"


def probe(port: int, body: bytes = EXPECTED_BODY) -> tuple[bool, str]:
    """One GET / on a new connection: (whether it answered 200 with `body`, what happened)."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            pass
    except OSError as exc:
        return False, f"connect: {exc}"
    conn = http.client.HTTPConnection(HOST, port, timeout=2.0)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        got = response.read()
    except (OSError, http.client.HTTPException) as exc:
        return False, f"GET /: {exc!r}"
    finally:
        conn.close()
    if response.status != 200:
        return False, f"GET / answered {response.status}"
    if got != body:
        return False, f"GET / answered an unexpected body {got[:60]!r}"
    return True, "ok"


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# -- what the workers used ----------------------------------------------------------------------


@dataclass
class WorkerStats:
    """A server's processes over one measured load: the CPU each worker used during it, their
    memory after it, and (forkserve) the requests each served since it booted."""

    cpu: dict[int, float]  # worker pid -> CPU seconds during the load
    master_cpu: float | None  # None: the master was gone
    helpers: int  # multiprocessing helpers, counted nowhere
    appeared: int  # processes that appeared during the load (respawned workers?)
    rss_kib: dict[int, int] = field(default_factory=dict)  # worker pid -> VmRSS
    pss_kib: dict[int, int] = field(default_factory=dict)  # worker pid -> Pss (shared pages split)
    served: dict[int, int] = field(default_factory=dict)  # worker number -> requests (titles)

    @property
    def server_cpu(self) -> float:
        return sum(self.cpu.values()) + (self.master_cpu or 0.0)

    def shares(self) -> list[float]:
        """Each worker's share of the workers' CPU time, largest first."""
        return proportions(self.cpu.values())

    def served_shares(self) -> list[float]:
        """Each worker's share of the requests served (forkserve), largest first."""
        return proportions(self.served.values())

    @property
    def served_spread(self) -> float | None:
        """Requests of the busiest worker over the least busy one's (inf when that one served
        none); None without per-worker counts or with one worker."""
        if len(self.served) < 2:
            return None
        low, high = min(self.served.values()), max(self.served.values())
        return high / low if low else math.inf

    @property
    def imbalanced(self) -> bool:
        shares = self.shares()
        return len(shares) > 1 and shares[0] > IMBALANCE_SHARE

    def cpu_text(self) -> str:
        parts = sorted(self.cpu.values(), reverse=True)
        text = f"worker CPU s during run: {' / '.join(f'{s:.2f}' for s in parts) or 'none'}"
        if self.imbalanced:
            text += (f" (IMBALANCED: one worker did {self.shares()[0]:.0%} of the work, so req/s"
                     " here reflects how connections landed on the workers, not only speed)")
        if self.master_cpu is not None:
            text += f"; master {self.master_cpu:.2f}"
        if self.helpers:
            text += f"; {self.helpers} multiprocessing helper(s) not counted"
        if self.appeared:
            text += f"; {self.appeared} process(es) appeared during the run (respawned workers?)"
        return text

    def memory_text(self) -> str:
        def mib(values: Iterable[int]) -> str:
            return " / ".join(f"{kib / 1024:.1f}" for kib in values)

        if not self.rss_kib:
            return "worker memory: unavailable"
        text = (f"worker RSS MiB after the run: {mib(self.rss_kib.values())} "
                f"(sum {sum(self.rss_kib.values()) / 1024:.1f})")
        if self.pss_kib:
            text += f"; PSS sum {sum(self.pss_kib.values()) / 1024:.1f} MiB"
        return text

    def served_text(self) -> str | None:
        if not self.served:
            return None
        total = sum(self.served.values()) or 1
        parts = " / ".join(f"worker {w}: {n} ({n / total:.0%})"
                           for w, n in sorted(self.served.items()))
        text = f"requests served per worker during the run (process titles): {parts}"
        if self.served_spread is not None:
            text += f"; busiest/least busy {fmt_spread(self.served_spread)}"
        return text


def proportions(values: Iterable[float]) -> list[float]:
    """Each value's share of their sum, largest first (none when the sum is 0)."""
    values = list(values)
    total = sum(values)
    return sorted((value / total for value in values), reverse=True) if total else []


def fmt_spread(value: float) -> str:
    return "inf (one worker served none)" if math.isinf(value) else f"{value:.2f}"


def worker_stats(master: int, before: dict[int, float], after: dict[int, float]) -> WorkerStats:
    """What each process of the server started as `master` used between the two samples of
    session_processes, and the workers' memory now."""
    helpers = [pid for pid in after if pid != master and HELPER_CMDLINE.search(cmdline(pid))]
    workers = [pid for pid in after if pid != master and pid not in helpers]
    stats = WorkerStats(cpu={pid: after[pid] - before.get(pid, 0.0) for pid in workers},
                        master_cpu=after[master] - before.get(master, 0.0)
                        if master in after else None,
                        helpers=len(helpers), appeared=len(set(after) - set(before)))
    for pid in workers:
        rss = proc_field(pid, "status", "VmRSS")
        if rss is not None:
            stats.rss_kib[pid] = rss
        pss = proc_field(pid, "smaps_rollup", "Pss")
        if pss is not None:
            stats.pss_kib[pid] = pss
    return stats


def proc_field(pid: int, name: str, key: str) -> int | None:
    """The kB value of line `key:` in /proc/`pid`/`name`, None when unreadable."""
    try:
        text = Path("/proc", str(pid), name).read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def forkserve_served(master: int) -> dict[int, int]:
    """Requests each forkserve worker (by number) served since it booted, from its title.

    Workers refresh their title on each heartbeat tick, so this waits for one first: taken
    between loads, the totals are exact.
    """
    time.sleep(TITLE_REFRESH)
    served = {}
    for pid in session_processes(master):
        match = TITLE.search(cmdline(pid).decode(errors="replace"))
        if match is not None:
            served[int(match.group(1))] = int(match.group(2))
    return served


# -- one server ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """The load every server of a run gets."""

    generator: Generator
    connections: int
    seconds: int
    workers: int
    kind: LoadKind = KEEPALIVE


@dataclass
class Row:
    server: Server
    app: App
    result: LoadResult | None = None
    failure: str | None = None  # did not start, died, answered wrongly, or the generator failed
    notes: list[str] = field(default_factory=list)
    workers: WorkerStats | None = None
    cross_check: LoadResult | None = None  # a second generator's result on the same server
    kind: LoadKind = KEEPALIVE  # the load it was measured under

    @property
    def name(self) -> str:
        """The server, app and (when not keep-alive) load, as the notes and warnings say."""
        return f"{self.server.label} [{self.app.name}{self.kind.tag}]"

    @property
    def errors(self) -> int:
        return self.result.errors if self.result is not None else 0

    @property
    def failed(self) -> bool:
        return self.failure is not None or self.errors > 0


def measure(server: Server, app: App, load: Load, log_path: Path,
            cross_check: Generator | None = None) -> Row:
    """Start `server` serving `app`, wait until booted, warm up, measure, stop.

    With `cross_check`, that generator then loads the same server as long again, for
    comparison (Row.cross_check).
    """
    row = Row(server, app, kind=load.kind)
    port = free_port()
    cmd = server_command(server, app, load.workers, port)
    print(f"--- {row.name}: {' '.join(cmd)}", file=sys.stderr)
    with run_server(cmd, log_path, app.dirs) as running:
        why = wait_ready(running, port, boot_marker(server, load.workers), app.body)
        if why is not None:
            row.failure = f"did not start: {why}"
        else:
            load_server(row, running, port, load, cross_check)
    row.notes.extend(running.notes)
    row.notes.append(log_summary(log_path))
    status = row.failure or (f"{row.result.rps:,.0f} req/s, {row.errors} errors"
                             if row.result else "?")
    print(f"    {status}", file=sys.stderr)
    return row


def load_server(row: Row, running: Running, port: int, load: Load,
                cross_check: Generator | None) -> None:
    generator, master = load.generator, running.proc.pid
    run = functools.partial(generator.run, port, load.connections, body=row.app.body,
                            kind=load.kind)
    warm, _ = run(WARMUP_SECONDS)
    if warm.failure or warm.errors:
        row.notes.append(f"warm-up: {warm.failure or f'{warm.errors} errors'}")
    served_before = forkserve_served(master) if row.server.kind == "forkserve" else {}
    before = session_processes(master)
    row.result, output = run(load.seconds)
    after = session_processes(master)
    running.log_path.with_suffix(f".{generator.name}.txt").write_text(output)
    if row.result.failure:
        row.failure = row.result.failure
    if running.proc.poll() is not None:
        row.failure = f"server exited with status {running.proc.returncode} under load"
        return
    answered, why = probe(port, row.app.body)
    if not answered:
        row.failure = f"after the load: {why}"
    row.workers = stats = worker_stats(master, before, after)
    if row.server.kind == "forkserve":
        stats.served = {number: count - served_before.get(number, 0)
                        for number, count in forkserve_served(master).items()}
    row.notes += [stats.cpu_text(), stats.memory_text()]
    row.notes += filter(None, [stats.served_text(), generator_text(row.result, stats),
                               pipelining_text(row.result, load)])
    if row.result.error_detail:
        row.notes.append(f"errors: {row.result.error_detail}")
    if row.result.remarks:
        row.notes.append(f"{generator.name}: {row.result.remarks}")
    if cross_check is not None:
        row.cross_check, _ = cross_check.run(port, load.connections, load.seconds, row.app.body,
                                             load.kind)


def pipelining_text(result: LoadResult, load: Load) -> str | None:
    """Requests written and answered in a pipelined run; flagged when more went unanswered than
    a run leaves in flight at its ends (a server that answered part of its batches and closed)."""
    if result.sent is None:
        return None
    depth = load.kind.depth
    missing, in_flight = result.sent - result.requests, load.connections * depth
    text = (f"pipelined: {result.sent} requests written in batches of {depth}, "
            f"{result.requests} answered")
    if missing > in_flight:
        text += (f" (UNANSWERED: {missing}, more than the {in_flight} a run can leave in flight "
                 "at its ends; the server answered only part of some batches)")
    return text


def answered_share(row: Row) -> str:
    """The share of the requests written that were answered, for a pipelined run's table."""
    result = row.result
    if result is None or not result.sent:
        return "-"
    return f"{min(result.requests / result.sent, 1.0):.0%}"


def generator_text(result: LoadResult, stats: WorkerStats) -> str | None:
    """The generator's CPU beside the server's, flagged when the generator saturated."""
    if not result.wall_seconds:
        return None
    text = (f"generator CPU {result.cpu_seconds:.2f} s in {result.wall_seconds:.2f} s "
            f"({result.busy:.0%} of its {result.threads} thread(s)); server CPU "
            f"{stats.server_cpu:.2f} s; {os.cpu_count()} CPUs")
    if result.saturated:
        text += " (GENERATOR SATURATED: the server may be faster than measured)"
    return text


NOISE = re.compile(r"Traceback|\b(?:WARNING|ERROR|CRITICAL)\b|\[(?:WARNING|ERROR|CRITICAL)\]",
                   re.I)


def log_summary(path: Path) -> str:
    lines = read_log(path).splitlines()[1:]  # the first line is the command
    noisy = [line for line in lines if NOISE.search(line)]
    text = f"log: {len(lines)} lines, {len(noisy)} warning/error lines ({shown(path)})"
    if noisy:
        text += "; first: " + noisy[0].strip()[:160]
    return text


def shown(path: Path) -> str:
    """`path` relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def run_all(jobs: Iterable[Callable[[], T]]) -> list[T] | None:
    """Run each measurement in turn; their results, or None when interrupted. No server outlives
    this call."""
    results: list[T] = []
    try:
        for job in jobs:
            results.append(job())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return None
    finally:
        kill_leftovers()
    return results


# -- report -------------------------------------------------------------------------------------


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def ratio(rows: Mapping[str, Row], of: str, to: str) -> float | None:
    """Requests/s of row `of` over row `to`; None unless both measured without failure."""
    a, b = rows.get(of), rows.get(to)
    if a is None or b is None or a.result is None or b.result is None:
        return None
    if a.failure or b.failure or not b.result.rps:
        return None
    return a.result.rps / b.result.rps


def fmt_ratio(value: float | None, missing: str = "-") -> str:
    return missing if value is None else f"{value:.2f}"


Column = tuple[str, Callable[[Row], str]]  # header, cell


def table(rows: Iterable[Row], columns: Sequence[Column]) -> str:
    """The markdown table: server, req/s, p50, p99, errors, then `columns`."""
    lines = ["| server | req/s | p50 | p99 | errors | "
             + " | ".join(header for header, _ in columns) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(columns)]
    for row in rows:
        if row.result is None or row.result.failure:
            cells = ["-", "-", "-", f"FAILED: {row.failure}"]
        else:
            r = row.result
            errors = str(r.errors)
            if r.errors:
                errors += f" ({r.bad_responses} bad responses, {r.socket_errors} socket)"
            if row.failure:
                errors += f"; {row.failure}"
            cells = [f"{r.rps:,.0f}", fmt_ms(r.p50_ms), fmt_ms(r.p99_ms), errors]
        cells += [cell(row) for _, cell in columns]
        lines.append(f"| {row.server.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def finish(report_path: Path, header: str, body: str, ratios: list[str], rows: list[Row],
           extra_notes: Iterable[str] = (), ratios_last: bool = False) -> int:
    """Print and write the report; the exit status: 0, or 1 when any server had errors.

    The ratio lines follow the table, or end the report with `ratios_last`.
    """
    notes = [*extra_notes, *(f"- {row.name}: {note}" for row in rows for note in row.notes)]
    notes_text = "Notes:\n" + "\n".join(notes) if notes else ""
    parts = (header, body, notes_text, "\n".join(ratios)) if ratios_last else (
        header, body, "\n".join(ratios), notes_text)
    report = "\n\n".join(part for part in parts if part)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report + "\n")
    print()
    print(report)
    print(f"\nwritten to {shown(report_path)}")
    failed = [row.name for row in rows if row.failed]
    if failed:
        print(f"errors from: {', '.join(failed)}", file=sys.stderr)
        return EXIT_ERRORS
    return EXIT_OK


# -- command line -------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, keys: list[str]) -> None:
    """--apps-dir, --workers, --connections, --duration, --generator and --only (of `keys`)."""
    parser.add_argument("--apps-dir", type=Path, default=DEFAULT_APPS_DIR,
                        help=f"directory holding apps.py (default: {DEFAULT_APPS_DIR})")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per server")
    parser.add_argument("--connections", type=int, default=32,
                        help="keep-alive connections of the load generator (default 32)")
    parser.add_argument("--duration", type=int, default=5,
                        help="seconds of measured load per server (default 5)")
    parser.add_argument("--generator", choices=("wrk", "loadgen"),
                        help="load generator (default: wrk when installed, else loadgen.py)")
    parser.add_argument("--only", action="append", choices=keys, metavar="NAME",
                        help=f"run only this server; repeatable. One of: {', '.join(keys)}")


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     names: Iterable[str]) -> None:
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


def begin(args: argparse.Namespace, servers: Iterable[Server]) -> tuple[Path, list[Server]]:
    """The resolved --apps-dir and the servers --only picks; from here on no server started
    outlives the process. Exits with status 2 when the apps directory holds no apps.py."""
    apps_dir: Path = args.apps_dir.resolve()
    if not check_apps_dir(apps_dir):
        sys.exit(EXIT_SETUP)
    install_cleanup()
    return apps_dir, [s for s in servers if not args.only or s.key in args.only]
