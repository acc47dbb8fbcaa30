"""Shared machinery of the ``loadtests/bench_*.py`` server comparisons (stdlib only).

Not run on its own: ``bench_wsgi.py`` and ``bench_asgi.py`` import it (they put this directory
on ``sys.path`` by being run as scripts). It holds what both need: the peers virtualenv, starting
each server in its own session and stopping its whole process group whatever happens, waiting for
it to be ready, running and parsing ``wrk``, the per-worker CPU split, the log summary and the
markdown table. What differs between the scripts (which servers, their command lines, how each
says it has booted, which ratios matter) stays in the scripts.

Only the ratios between servers measured in the same run are meaningful.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_APPS_DIR = Path(__file__).resolve().parents[2] / "shared" / "bench"
PEERS_VENV = HERE / ".peers-venv"
OUT_DIR = HERE / "out"

EXPECTED_BODY = b"Hello, World!"
HOST = "127.0.0.1"
READY_TIMEOUT = 15.0  # seconds for a server to answer 200 and report all workers booted
STOP_TIMEOUT = 10.0  # seconds for the master to exit after SIGTERM before the group is killed
WARMUP_SECONDS = 1
PIP_TIMEOUT = 300.0
IMBALANCE_SHARE = 0.75  # flag a run where one worker used more than this share of worker CPU

EXIT_OK, EXIT_ERRORS, EXIT_SETUP, EXIT_INTERRUPTED = 0, 1, 2, 130

# Processes of a server's session that are not workers, recognised by their command line
# (uvicorn's multiprocess mode starts multiprocessing's resource tracker next to its workers).
HELPER_CMDLINE = re.compile(rb"multiprocessing\.resource_tracker")

# Every server process group started and not yet stopped, so no exit path leaves one behind.
_LIVE: dict[int, subprocess.Popen[bytes]] = {}


# -- servers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """One server configuration under test."""

    key: str  # name for --only
    label: str  # name in the table
    kind: str  # "forkserve", "gunicorn", "uvicorn"
    extra: tuple[str, ...]  # worker-model arguments
    peer_of: str | None = None  # for a peer row: the key of the forkserve row it pairs with


@dataclass(frozen=True)
class Boot:
    """How a server says it is fully up: a log line pattern and how often it must appear."""

    marker: re.Pattern[str]
    count: int


def forkserve_command() -> list[str]:
    """forkserve from this interpreter's environment (with --allow-root when run as root, as
    benchmarks on a test machine often are: forkserve refuses root otherwise)."""
    script = Path(sys.executable).with_name("forkserve")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "forkserve"]
    return [*base, "--allow-root"] if os.geteuid() == 0 else base


def forkserve_boot() -> Boot:
    return Boot(re.compile(r"ready: \d+ workers"), 1)


def gunicorn_boot(workers: int) -> Boot:
    return Boot(re.compile(r"Booting worker with pid"), workers)


# -- prerequisites ------------------------------------------------------------------------------


def require_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        print("error: wrk is not on PATH; it is the load generator this benchmark needs.\n"
              "Install it with:  apt-get install wrk", file=sys.stderr)
        sys.exit(EXIT_SETUP)
    return wrk


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


@functools.cache
def gunicorn_quiet_flags() -> tuple[str, ...]:
    """gunicorn >= 24 opens a control socket under ~/.gunicorn; the benchmark does not need it."""
    probe = subprocess.run([peer_bin("gunicorn"), "--help"], capture_output=True,
                           text=True, timeout=60)
    return ("--no-control-socket",) if "--no-control-socket" in probe.stdout else ()


def forkserve_version() -> str:
    probe = subprocess.run([*forkserve_command(), "--version"], capture_output=True, text=True,
                           timeout=60)
    return (probe.stdout or probe.stderr).strip() or "?"


def wrk_version(wrk: str) -> str:
    probe = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
    first = (probe.stdout or probe.stderr).splitlines()
    return first[0].split(" [")[0] if first else "?"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


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
def run_server(cmd: list[str], log_path: Path) -> Iterator[Running]:
    """Start `cmd` in its own session; on exit SIGTERM it, then SIGKILL its process group."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, cwd=REPO)
    _LIVE[proc.pid] = proc
    running = Running(proc, log_path)
    try:
        yield running
    finally:
        stop_server(running)


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


def wait_ready(running: Running, port: int, boot: Boot) -> str | None:
    """Poll until a GET / answers 200 with the expected body and all workers have booted.

    Returns None when ready, else why not.
    """
    deadline = time.monotonic() + READY_TIMEOUT
    answered = False
    last = "no answer"
    while time.monotonic() < deadline:
        if running.proc.poll() is not None:
            return f"exited with status {running.proc.returncode} before becoming ready"
        if not answered:
            answered, last = probe(port)
        if answered and len(boot.marker.findall(read_log(running.log_path))) >= boot.count:
            return None
        time.sleep(0.1)
    if answered:
        return f"answered, but not all workers booted within {READY_TIMEOUT:.0f} s"
    return f"not ready within {READY_TIMEOUT:.0f} s ({last})"


def probe(port: int) -> tuple[bool, str]:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            pass
    except OSError as exc:
        return False, f"connect: {exc}"
    conn = http.client.HTTPConnection(HOST, port, timeout=2.0)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        return False, f"GET /: {exc!r}"
    finally:
        conn.close()
    if response.status != 200:
        return False, f"GET / answered {response.status}"
    if body != EXPECTED_BODY:
        return False, f"GET / answered an unexpected body {body[:60]!r}"
    return True, "ok"


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# -- wrk ----------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float = 0.0
    requests: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    non_2xx: int = 0
    socket_errors: int = 0
    socket_detail: str = ""
    failure: str | None = None  # wrk did not run or its output could not be read

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"unreadable latency {text!r}")
    return float(match.group(1)) * UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    result = WrkResult()
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
        result.non_2xx = int(non_2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     output)
    if sock is not None:
        counts = [int(n) for n in sock.groups()]
        result.socket_errors = sum(counts)
        names = ("connect", "read", "write", "timeout")
        result.socket_detail = ", ".join(
            f"{name} {n}" for name, n in zip(names, counts, strict=True) if n)
    return result


def run_wrk(wrk: str, port: int, connections: int, seconds: int) -> tuple[WrkResult, str]:
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", f"http://{HOST}:{port}/"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return WrkResult(failure=f"wrk did not finish within {seconds + 30} s"), ""
    output = done.stdout + done.stderr
    result = parse_wrk(output)
    if done.returncode != 0 and result.failure is None:
        result.failure = f"wrk exited with status {done.returncode}"
    elif done.returncode != 0:
        result.failure = f"wrk exited with status {done.returncode}: {output.strip()[-200:]}"
    return result, output


# -- one server ---------------------------------------------------------------------------------


@dataclass
class Row:
    server: Server
    result: WrkResult | None = None
    failure: str | None = None  # did not start, died, or wrk failed
    notes: list[str] = field(default_factory=list)
    wrk_output: str = ""

    @property
    def errors(self) -> int:
        return self.result.errors if self.result is not None else 0

    @property
    def failed(self) -> bool:
        return self.failure is not None or self.errors > 0


def measure(server: Server, cmd: list[str], boot: Boot, log_path: Path, wrk: str,
            connections: int, seconds: int, port: int,
            after_load: Callable[[int], str | None] | None = None) -> Row:
    """Start `cmd` (listening on `port`), wait until booted, warm up, measure, stop.

    `after_load`, given the master's pid once the measured load is over and before the server
    is stopped, may return one more note.
    """
    row = Row(server)
    print(f"--- {server.label}: {' '.join(cmd)}", file=sys.stderr)
    with run_server(cmd, log_path) as running:
        why = wait_ready(running, port, boot)
        if why is not None:
            row.failure = f"did not start: {why}"
        else:
            warm, _ = run_wrk(wrk, port, connections, WARMUP_SECONDS)
            if warm.failure or warm.errors:
                row.notes.append(f"warm-up: {warm.failure or f'{warm.errors} errors'}")
            before = session_processes(running.proc.pid)
            row.result, row.wrk_output = run_wrk(wrk, port, connections, seconds)
            after = session_processes(running.proc.pid)
            log_path.with_suffix(".wrk.txt").write_text(row.wrk_output)
            if row.result.failure:
                row.failure = row.result.failure
            if running.proc.poll() is not None:
                row.failure = f"server exited with status {running.proc.returncode} under load"
            row.notes.append(cpu_split(running.proc.pid, before, after))
            extra = after_load(running.proc.pid) if after_load is not None else None
            if extra:
                row.notes.append(extra)
            if row.result.socket_detail:
                row.notes.append(f"socket errors: {row.result.socket_detail}")
    row.notes.extend(running.notes)
    row.notes.append(log_summary(log_path))
    status = row.failure or (f"{row.result.rps:,.0f} req/s, {row.errors} errors"
                             if row.result else "?")
    print(f"    {status}", file=sys.stderr)
    return row


def cpu_split(master: int, before: dict[int, float], after: dict[int, float]) -> str:
    """CPU seconds each worker (and the master) spent during the measured run."""
    if not after:
        return "worker CPU: unavailable"
    helpers = [pid for pid in after if pid != master and HELPER_CMDLINE.search(cmdline(pid))]
    used = {pid: after[pid] - before.get(pid, 0.0) for pid in after if pid not in helpers}
    workers = sorted((pid for pid in used if pid != master), key=lambda pid: -used[pid])
    parts = [f"{used[pid]:.2f}" for pid in workers]
    text = f"worker CPU s during run: {' / '.join(parts) or 'none'}"
    total = sum(used[pid] for pid in workers)
    if len(workers) > 1 and total > 0 and used[workers[0]] / total > IMBALANCE_SHARE:
        text += (f" (IMBALANCED: one worker did {used[workers[0]] / total:.0%} of the work, so"
                 " req/s here reflects how keep-alive connections landed, not only speed)")
    if master in used:
        text += f"; master {used[master]:.2f}"
    if helpers:
        text += f"; {len(helpers)} multiprocessing helper(s) not counted"
    new = [pid for pid in after if pid not in before]
    if new:
        text += f"; {len(new)} process(es) appeared during the run (respawned workers?)"
    return text


NOISE = re.compile(r"Traceback|\b(?:WARNING|ERROR|CRITICAL)\b|\[(?:WARNING|ERROR|CRITICAL)\]",
                   re.I)


def log_summary(path: Path) -> str:
    lines = read_log(path).splitlines()[1:]  # the first line is the command
    noisy = [line for line in lines if NOISE.search(line)]
    text = f"log: {len(lines)} lines, {len(noisy)} warning/error lines ({path.relative_to(REPO)})"
    if noisy:
        text += "; first: " + noisy[0].strip()[:160]
    return text


def run_all(chosen: Iterable[Server], one: Callable[[Server], Row]) -> list[Row] | None:
    """Measure each server in turn; None when interrupted. No server outlives this call."""
    rows: list[Row] = []
    try:
        for server in chosen:
            rows.append(one(server))
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return None
    finally:
        kill_leftovers()
    return rows


# -- report -------------------------------------------------------------------------------------


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def ratio(rows: dict[str, Row], ours: str, peer: str) -> float | None:
    a, b = rows.get(ours), rows.get(peer)
    if a is None or b is None or a.result is None or b.result is None:
        return None
    if a.failure or b.failure or not b.result.rps:
        return None
    return a.result.rps / b.result.rps


def fmt_ratio(value: float | None, missing: str = "-") -> str:
    return missing if value is None else f"{value:.2f}"


def table(rows: list[Row], ratio_header: str, ratio_cell: Callable[[Row], str]) -> str:
    """The markdown table: one line per row, the last column from `ratio_cell`."""
    lines = [f"| server | req/s | p50 | p99 | errors | {ratio_header} |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row.result is None or row.result.failure:
            cells = ["-", "-", "-", f"FAILED: {row.failure}"]
        else:
            r = row.result
            errors = str(r.errors)
            if r.errors:
                errors += f" ({r.non_2xx} non-2xx/3xx, {r.socket_errors} socket)"
            if row.failure:
                errors += f"; {row.failure}"
            cells = [f"{r.rps:,.0f}", fmt_ms(r.p50_ms), fmt_ms(r.p99_ms), errors]
        lines.append(f"| {row.server.label} | " + " | ".join(cells) + f" | {ratio_cell(row)} |")
    return "\n".join(lines)


def finish(report_path: Path, header: str, body: str, ratios: list[str], rows: list[Row],
           extra_notes: Iterable[str] = (), ratios_last: bool = False) -> int:
    """Print and write the report; the exit status: 0, or 1 when any server had errors.

    The ratio lines follow the table, or end the report with `ratios_last`.
    """
    notes = [*extra_notes, *(f"- {row.server.label}: {note}" for row in rows
                             for note in row.notes)]
    notes_text = "Notes:\n" + "\n".join(notes) if notes else ""
    parts = (header, body, notes_text, "\n".join(ratios)) if ratios_last else (
        header, body, "\n".join(ratios), notes_text)
    report = "\n\n".join(part for part in parts if part)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report + "\n")
    print()
    print(report)
    print(f"\nwritten to {report_path.relative_to(REPO)}")
    failed = [row.server.label for row in rows if row.failed]
    if failed:
        print(f"errors from: {', '.join(failed)}", file=sys.stderr)
        return EXIT_ERRORS
    return EXIT_OK


# -- command line -------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, keys: list[str]) -> None:
    """--apps-dir, --workers, --connections, --duration and --only (one of `keys`)."""
    parser.add_argument("--apps-dir", type=Path, default=DEFAULT_APPS_DIR,
                        help=f"directory holding apps.py (default: {DEFAULT_APPS_DIR})")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per server")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c (default 32)")
    parser.add_argument("--duration", type=int, default=5,
                        help="seconds of measured load per server, wrk -d (default 5)")
    parser.add_argument("--only", action="append", choices=keys, metavar="NAME",
                        help=f"run only this server; repeatable. One of: {', '.join(keys)}")


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     names: Iterable[str]) -> None:
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
