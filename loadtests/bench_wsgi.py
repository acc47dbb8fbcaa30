"""Compare forkserve with gunicorn on the same hello-world WSGI app, in one run.

Run from the repository root, with the project's environment::

    python loadtests/bench_wsgi.py                      # all four servers, 2 workers, 5 s each
    python loadtests/bench_wsgi.py --duration 10 --connections 64 --workers 2
    python loadtests/bench_wsgi.py --only forkserve --only gunicorn-sync

Servers, all serving ``apps:wsgi`` from ``../shared/bench`` (``--apps-dir`` overrides) with the
same number of workers:

* ``forkserve``          forkserve with ``--threads 1`` (app called inline in the event loop)
* ``forkserve-threads``  forkserve with ``--threads 4``
* ``gunicorn-sync``      gunicorn ``-k sync``
* ``gunicorn-gthread``   gunicorn ``-k gthread --threads 4``

forkserve runs from this interpreter's environment (``sys.executable -m forkserve``). gunicorn
lives in its own virtualenv, ``loadtests/.peers-venv``, created and pip-installed on first use and
reused afterwards. The load generator is ``wrk`` (``apt-get install wrk``), run with keep-alive
(its default) as ``wrk -t1 -c32 -d5s --latency`` after a 1 s warm-up, against one server at a
time, each on a fresh port on 127.0.0.1.

The table is printed and written to ``loadtests/out/bench_wsgi.md``; each server's log and
wrk's full output go to ``loadtests/out/bench_wsgi-logs/``. The exit status is 0 when every
server answered every request with a 2xx/3xx and no socket error, 1 otherwise, 2 when a
prerequisite is missing.

Only the ratios between servers measured in the same run are meaningful. Absolute requests/s
depend on the machine, its load at the time, and on wrk sharing the CPUs with the server under
test; comparing numbers across runs or machines tells you nothing. Even within a run, with
keep-alive the connections stay with the worker that accepted them, so on a small machine one
worker may end up with all of them: the notes give each worker's CPU time and flag such a run
as IMBALANCED; rerun before reading much into its ratio.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_APPS_DIR = Path(__file__).resolve().parents[2] / "shared" / "bench"
PEERS_VENV = HERE / ".peers-venv"
OUT_DIR = HERE / "out"
REPORT = OUT_DIR / "bench_wsgi.md"
LOG_DIR = OUT_DIR / "bench_wsgi-logs"

APP = "apps:wsgi"
EXPECTED_BODY = b"Hello, World!"
HOST = "127.0.0.1"
READY_TIMEOUT = 15.0  # seconds for a server to answer 200 and report all workers booted
STOP_TIMEOUT = 10.0  # seconds for the master to exit after SIGTERM before the group is killed
WARMUP_SECONDS = 1
PIP_TIMEOUT = 300.0
IMBALANCE_SHARE = 0.75  # flag a run where one worker used more than this share of worker CPU

EXIT_OK, EXIT_ERRORS, EXIT_SETUP, EXIT_INTERRUPTED = 0, 1, 2, 130

# Every server process group started and not yet stopped, so no exit path leaves one behind.
_LIVE: dict[int, subprocess.Popen[bytes]] = {}


# -- servers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """One server configuration under test."""

    key: str  # name for --only
    label: str  # name in the table
    kind: str  # "forkserve" or "gunicorn"
    extra: tuple[str, ...]  # worker-model arguments
    peer_of: str | None = None  # for a gunicorn row: the key of the forkserve row it pairs with


def servers(threads: int) -> list[Server]:
    """The four configurations, each forkserve one followed by its gunicorn peer."""
    return [
        Server("forkserve", "forkserve sync", "forkserve", ("--threads", "1")),
        Server("gunicorn-sync", "gunicorn sync", "gunicorn", ("-k", "sync"), "forkserve"),
        Server("forkserve-threads", f"forkserve --threads {threads}", "forkserve",
               ("--threads", str(threads))),
        Server("gunicorn-gthread", f"gunicorn gthread({threads})", "gunicorn",
               ("-k", "gthread", "--threads", str(threads)), "forkserve-threads"),
    ]


def forkserve_command() -> list[str]:
    """forkserve from this interpreter's environment."""
    script = Path(sys.executable).with_name("forkserve")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "forkserve"]


def server_command(server: Server, apps_dir: Path, workers: int, port: int) -> list[str]:
    if server.kind == "forkserve":
        base = forkserve_command()
    else:
        base = [str(PEERS_VENV / "bin" / "gunicorn"), *gunicorn_quiet_flags()]
    return [*base, APP, "--chdir", str(apps_dir), "-w", str(workers), *server.extra,
            "-b", f"{HOST}:{port}"]


def boot_marker(server: Server, workers: int) -> tuple[re.Pattern[str], int]:
    """A log line pattern and how many times it must appear once every worker has booted."""
    if server.kind == "forkserve":
        return re.compile(r"ready: \d+ workers"), 1
    return re.compile(r"Booting worker with pid"), workers


# -- prerequisites ------------------------------------------------------------------------------


def require_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        print("error: wrk is not on PATH; it is the load generator this benchmark needs.\n"
              "Install it with:  apt-get install wrk", file=sys.stderr)
        sys.exit(EXIT_SETUP)
    return wrk


def peers_python() -> Path:
    return PEERS_VENV / "bin" / "python"


def ensure_peers_venv() -> str:
    """Create or reuse loadtests/.peers-venv with gunicorn in it; return gunicorn's version."""
    python = peers_python()
    if not python.exists():
        print(f"creating {PEERS_VENV.relative_to(REPO)} ...", file=sys.stderr)
        if PEERS_VENV.exists():
            shutil.rmtree(PEERS_VENV)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True,
                       timeout=PIP_TIMEOUT)
    version = gunicorn_version(python)
    if version is None:
        print("installing gunicorn into the peers venv ...", file=sys.stderr)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", "gunicorn"],
                       check=True, timeout=PIP_TIMEOUT)
        version = gunicorn_version(python)
        if version is None:
            raise RuntimeError("gunicorn still not importable after pip install")
    return version


def gunicorn_version(python: Path) -> str | None:
    probe = subprocess.run([str(python), "-c", "import gunicorn; print(gunicorn.__version__)"],
                           capture_output=True, text=True, timeout=60)
    return probe.stdout.strip() if probe.returncode == 0 else None


@functools.cache
def gunicorn_quiet_flags() -> tuple[str, ...]:
    """gunicorn >= 24 opens a control socket under ~/.gunicorn; the benchmark does not need it."""
    probe = subprocess.run([str(PEERS_VENV / "bin" / "gunicorn"), "--help"], capture_output=True,
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


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_leftovers() -> None:
    for pid, proc in list(_LIVE.items()):
        kill_group(pid)
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)
        _LIVE.pop(pid, None)


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@dataclass
class Running:
    """A started server and what was seen while stopping it."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def run_server(server: Server, cmd: list[str], log_path: Path) -> Iterator[Running]:
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


def wait_ready(running: Running, port: int, marker: re.Pattern[str], count: int) -> str | None:
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
        if answered and len(marker.findall(read_log(running.log_path))) >= count:
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


def measure(server: Server, apps_dir: Path, workers: int, wrk: str, connections: int,
            seconds: int) -> Row:
    row = Row(server)
    port = free_port()
    cmd = server_command(server, apps_dir, workers, port)
    log_path = LOG_DIR / f"{server.key}.log"
    marker, count = boot_marker(server, workers)
    print(f"--- {server.label}: {' '.join(cmd)}", file=sys.stderr)
    with run_server(server, cmd, log_path) as running:
        why = wait_ready(running, port, marker, count)
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
    used = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
    workers = sorted((pid for pid in used if pid != master), key=lambda pid: -used[pid])
    parts = [f"{used[pid]:.2f}" for pid in workers]
    text = f"worker CPU s during run: {' / '.join(parts) or 'none'}"
    total = sum(used[pid] for pid in workers)
    if len(workers) > 1 and total > 0 and used[workers[0]] / total > IMBALANCE_SHARE:
        text += (f" (IMBALANCED: one worker did {used[workers[0]] / total:.0%} of the work, so"
                 " req/s here reflects how keep-alive connections landed, not only speed)")
    if master in used:
        text += f"; master {used[master]:.2f}"
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


def table(rows: list[Row]) -> str:
    by_key = {row.server.key: row for row in rows}
    partner = {s.peer_of: s.key for s in (row.server for row in rows) if s.peer_of}
    lines = ["| server | req/s | p50 | p99 | errors | ratio forkserve/peer |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        key = row.server.key
        if row.server.peer_of is not None:
            value = ratio(by_key, row.server.peer_of, key)
        elif key in partner:
            value = ratio(by_key, key, partner[key])
        else:
            value = None
        shown = "-" if value is None else f"{value:.2f}"
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
        lines.append(f"| {row.server.label} | " + " | ".join(cells) + f" | {shown} |")
    return "\n".join(lines)


def ratio_lines(rows: list[Row], threads: int) -> list[str]:
    by_key = {row.server.key: row for row in rows}
    out = []
    for ours, peer, text in (
        ("forkserve", "gunicorn-sync", "forkserve sync / gunicorn sync"),
        ("forkserve-threads", "gunicorn-gthread",
         f"forkserve --threads {threads} / gunicorn gthread({threads})"),
    ):
        if ours in by_key and peer in by_key:
            value = ratio(by_key, ours, peer)
            out.append(f"{text} = {'n/a (a server failed)' if value is None else f'{value:.2f}'}")
    return out


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None, keys: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare forkserve with gunicorn on the same hello-world WSGI app.",
        epilog="Only ratios between servers measured in the same run are meaningful.")
    parser.add_argument("--apps-dir", type=Path, default=DEFAULT_APPS_DIR,
                        help=f"directory holding apps.py (default: {DEFAULT_APPS_DIR})")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per server")
    parser.add_argument("--threads", type=int, default=4,
                        help="threads for forkserve --threads and gunicorn gthread (default 4)")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c (default 32)")
    parser.add_argument("--duration", type=int, default=5,
                        help="seconds of measured load per server, wrk -d (default 5)")
    parser.add_argument("--only", action="append", choices=keys, metavar="NAME",
                        help=f"run only this server; repeatable. One of: {', '.join(keys)}")
    args = parser.parse_args(argv)
    for name in ("workers", "threads", "connections", "duration"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    keys = [s.key for s in servers(4)]
    args = parse_args(argv, keys)
    apps_dir: Path = args.apps_dir.resolve()
    if not (apps_dir / "apps.py").is_file():
        print(f"error: no apps.py in {apps_dir} (use --apps-dir)", file=sys.stderr)
        return EXIT_SETUP
    wrk = require_wrk()
    chosen = [s for s in servers(args.threads) if not args.only or s.key in args.only]

    atexit.register(_kill_leftovers)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_exit)

    versions = [f"python {sys.version.split()[0]}", forkserve_version(), wrk_version(wrk)]
    if any(s.kind == "gunicorn" for s in chosen):
        try:
            versions.insert(2, f"gunicorn {ensure_peers_venv()}")
        except (subprocess.SubprocessError, RuntimeError, OSError) as exc:
            print(f"error: could not set up gunicorn in {PEERS_VENV}: {exc}", file=sys.stderr)
            return EXIT_SETUP

    started = datetime.now(timezone.utc)
    rows: list[Row] = []
    try:
        for server in chosen:
            rows.append(measure(server, apps_dir, args.workers, wrk, args.connections,
                                args.duration))
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        _kill_leftovers()

    header = (f"# bench_wsgi: forkserve vs gunicorn, hello-world WSGI\n\n"
              f"{started:%Y-%m-%d %H:%M} UTC; {args.workers} workers per server; "
              f"wrk -t1 -c{args.connections} -d{args.duration}s --latency (keep-alive), after a "
              f"{WARMUP_SECONDS} s warm-up; {os.cpu_count()} CPUs; {'; '.join(versions)}.\n"
              f"Only ratios within one run are meaningful.")
    body = table(rows)
    ratios = ratio_lines(rows, args.threads)
    notes = [f"- {row.server.label}: {note}" for row in rows for note in row.notes]
    report = "\n\n".join(part for part in (
        header, body, "\n".join(ratios), "Notes:\n" + "\n".join(notes) if notes else "") if part)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(report + "\n")
    print()
    print(report)
    print(f"\nwritten to {REPORT.relative_to(REPO)}")
    failed = [row.server.label for row in rows if row.failed]
    if failed:
        print(f"errors from: {', '.join(failed)}", file=sys.stderr)
        return EXIT_ERRORS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
