"""Idle-connection flood: do thousands of connections that never send a byte lock normal
clients out? (stdlib only)

Run from the repository root, with the project's environment::

    python loadtests/bench_idle.py                             # five servers, 10,000 idle
    python loadtests/bench_idle.py --only forkserve-sync       # just forkserve's sync worker
    python loadtests/bench_idle.py --connections 5000 --duration 5 --out /tmp/idle

Each server serves the hello world of ``loadtests/hello/apps.py`` (``--apps-dir`` overrides)
with 2 workers (``--workers``), one server at a time, on a fresh port on 127.0.0.1, with its
defaults (keep-alive, timeouts, backlog) but for the worker model:

* ``forkserve-sync``    forkserve sync worker, ``apps:wsgi``, ``--threads 1``
* ``forkserve-asgi``    forkserve ASGI worker, ``apps:asgi``, ``--loop uvloop``
* ``gunicorn-sync``     gunicorn ``-k sync``, ``apps:wsgi``
* ``gunicorn-gthread``  gunicorn ``-k gthread --threads 4``, ``apps:wsgi``
* ``uvicorn``           uvicorn ``--http httptools --loop uvloop``, ``apps:asgi``

forkserve gets ``--worker-connections 1000``, its default, written out so that the report shows
what bounded it. gunicorn and uvicorn come from ``loadtests/.peers-venv`` (set up on first use,
as for ``bench_asgi.py``).

For each server: a warm-up, the *baseline* (``--baseline-duration`` s of the normal client
alone), then the *flood*: ``--connections`` connections (default 10,000), all opened at once,
that never send a byte. When the server closes one (forkserve does after ``--header-timeout``,
10 s, or at once when a worker at ``--worker-connections`` takes a new connection in its
place), it is reopened, as an attacker would: at once, or after 1 s when it lived less than
that. The flood is ``bench_slowloris.py``'s attacker sending nothing: one thread, one
``selectors`` loop, in a child process of its own. Once all connections are open on the client
side, or after 10 s at most (a server whose accept queue is full drops the SYNs of the rest,
which then wait on the kernel's SYN retries), the normal client measures again for
``--duration`` s (default 10), a window that includes forkserve's header timeout. It begins
without waiting for the server to take the open connections from its accept queue: a normal
client arriving right behind the burst waits for that too.

The normal client is ``bench_slowloris.py``'s: one request on a fresh connection and one on a
kept-alive connection every ``--interval`` s, each of which must bring a 200 with the expected
body within ``--request-timeout`` s (default 5), connect included; a failure counts in the
percentiles with the time it took. Beside the plain p99 the table gives the p99 corrected for
coordinated omission (a request that took L also counts the requests due every ``--interval``
meanwhile, as having waited L - interval, L - 2 * interval, ...).

Also sampled: the listening socket's accept queue (every 0.1 s, from a process of its own),
each server process's open sockets (every second), the flood connections the server closed
(about every second), the workers' CPU time during the flood, and the workers' resident memory
(VmRSS from ``/proc``) before the flood, at the end of the measurement with the flood still
open, and after it closed.

File descriptors: this process raises its RLIMIT_NOFILE soft limit to the hard limit (the flood
process and the servers it starts inherit it; the notes give the limit each server process
ended up with) and refuses to run when ``--connections`` does not fit under it.

Bounded in time: the boot (15 s), the flood's opening (10 s), each measurement (its duration
plus at most two request timeouts), the stop (10 s, then SIGKILL). With the defaults a server
takes about 25-40 s, the whole run about 2-3 minutes. Every server process group and the flood
process are killed at the end, also on Ctrl-C, SIGTERM or SIGHUP.

The table is printed and written to ``loadtests/out/idle/bench_idle.md`` (``--out`` sets the
directory); each server's log goes to ``logs/`` beside it. The exit status is 0 when every
forkserve row measured answered every normal request (with and without the flood), 1 otherwise,
2 when a prerequisite is missing, 130 when interrupted. The peers' results do not affect it.

Absolute latencies depend on the machine and its load at the time: the flood, the client and
the server's workers share the CPUs.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import bench_slowloris as slow
import benchlib as lib
from bench_slowloris import Attack, AttackPlan
from benchlib import Server

DEFAULT_OUT = lib.OUT_DIR / "idle"
REPORT_NAME = "bench_idle.md"

WORKER_CONNECTIONS = 1000  # forkserve's default, written out on its command lines
GTHREAD_THREADS = 4
RAMP_TIMEOUT = 10.0  # seconds for the flood to be open before measuring anyway
CLOSES_EVERY = 1.0  # seconds between samples of the flood connections the server closed
AFTER_FLOOD = 1.0  # seconds after the flood closed before the workers' memory is read again

# Modules the peers venv must hold, and the pip requirement that provides each.
PEER_NEEDS = {"gunicorn": {"gunicorn": "gunicorn"},
              "uvicorn": {"uvicorn": "uvicorn[standard]", "httptools": "uvicorn[standard]",
                          "uvloop": "uvicorn[standard]"}}


# -- servers ------------------------------------------------------------------------------------


def servers() -> list[tuple[Server, str]]:
    """Each configuration and the interface of the app it serves, in the order measured."""
    limit = ("--worker-connections", str(WORKER_CONNECTIONS))
    return [
        (Server("forkserve-sync", "forkserve sync", "forkserve", ("--threads", "1", *limit)),
         "wsgi"),
        (Server("forkserve-asgi", "forkserve asgi (uvloop)", "forkserve",
                ("--loop", "uvloop", *limit)), "asgi"),
        (Server("gunicorn-sync", "gunicorn sync", "gunicorn", ("-k", "sync")), "wsgi"),
        (Server("gunicorn-gthread", f"gunicorn gthread({GTHREAD_THREADS})", "gunicorn",
                ("-k", "gthread", "--threads", str(GTHREAD_THREADS))), "wsgi"),
        (Server("uvicorn", "uvicorn httptools+uvloop", "uvicorn",
                ("--http", "httptools", "--loop", "uvloop")), "asgi"),
    ]


# -- the flood (a child process, one thread, one selector) --------------------------------------


class IdleFlood(slow.Attacker):
    """bench_slowloris's attacker with nothing to send: a connection, once open, only waits for
    the server to close it (or answer), and is then reopened."""

    def _send(self, index: int, data: bytes) -> bool:
        return False  # not a byte; so no trickle is scheduled either


def flood_main(plan: AttackPlan, counters: object, stop: object) -> None:
    slow._child_signals()
    IdleFlood(plan, counters, stop).run()


def start_flood(plan: AttackPlan, origin: float) -> Attack:
    """Start the flood process and bench_slowloris's accept queue sampler."""
    ctx = multiprocessing.get_context("fork")
    counters, stop = ctx.Array("q", slow.COUNTERS, lock=False), ctx.Event()
    jobs = {"idle flood": (flood_main, (plan, counters, stop)),
            "accept queue sampler": (slow.sampler_main, (plan, counters, stop, origin))}
    procs = [ctx.Process(target=target, args=args, daemon=True, name=name)
             for name, (target, args) in jobs.items()]
    for proc in procs:
        proc.start()
    return Attack(procs, counters, stop)


@dataclass
class Closes:
    """The flood connections the server closed, sampled about every CLOSES_EVERY s."""

    flood: Attack
    origin: float
    marks: list[tuple[float, int]] = field(default_factory=list)  # (s since origin, total)

    def sample(self) -> None:
        now = time.monotonic() - self.origin
        if not self.marks or now - self.marks[-1][0] >= CLOSES_EVERY:
            self.marks.append((now, self.flood.get(slow.SERVER_CLOSED)))

    def text(self) -> str:
        steps = [f"+{at:.0f} s {total - before}"
                 for (_, before), (at, total) in itertools.pairwise(self.marks)
                 if total > before]
        return ", ".join(steps) or "none"


# -- one server ---------------------------------------------------------------------------------


@dataclass
class Result(slow.Result):
    """bench_slowloris's result (`attacked`: the normal client with the flood open; `held`
    and `reconnects`: the flood's) and the workers' memory then."""

    rss_flooded: dict[int, int] = field(default_factory=dict)  # worker pid -> VmRSS KiB

    def normal_failures(self) -> int:
        return sum(one.failed for stats in (self.baseline, self.attacked) if stats
                   for one in stats)

    @property
    def name(self) -> str:
        return self.server.label

    @property
    def failed(self) -> bool:
        """Whether this row fails the run: only forkserve's can (a normal request failed, or
        the server did not run); the peers' rows are there for contrast."""
        return self.server.kind == "forkserve" and bool(self.failure or self.normal_failures())


def measure(server: Server, interface: str, apps_dir: Path, args: argparse.Namespace) -> Result:
    result = Result(server)
    log_path = args.out / "logs" / f"{server.key}.log"
    app = lib.hello_app(apps_dir, interface)
    with lib.booted(server, app, args.workers, log_path) as (running, port, why):
        if why is None:
            flood_server(running, port, args, result)
        else:
            result.failure = f"did not start: {why}"
    result.notes += [*running.notes, lib.log_summary(log_path)]
    print(f"    {result.failure or slow.summary(result)}", file=sys.stderr)
    return result


def flood_server(running: lib.Running, port: int, args: argparse.Namespace,
                 result: Result) -> None:
    master = running.proc.pid
    client = functools.partial(slow.run_client, port, interval=args.interval,
                               timeout=args.request_timeout)
    client(lib.WARMUP_SECONDS)
    result.baseline = client(args.baseline_duration)
    rss_before = worker_rss(master)
    plan = AttackPlan(port, args.connections, math.inf,
                      time.monotonic() + RAMP_TIMEOUT + args.duration
                      + 2 * args.request_timeout + 30, os.getpid())
    started = time.monotonic()
    samples = slow.ServerSamples(master)
    samples.sample(force=True)
    pids_before = set(samples.pids_seen)
    flood = start_flood(plan, started)
    closes = Closes(flood, started)

    def between() -> None:
        samples.sample(flood)
        closes.sample()

    try:
        opened, pending, ramp = wait_for_flood(running, flood, args.connections, started,
                                               between)
        closed_before, measured_from = flood.get(slow.SERVER_CLOSED), time.monotonic() - started
        samples.open_min, samples.open_max = None, 0  # count what was open while measuring
        flood.reset_queue_counters()
        cpu_before = lib.session_processes(master)
        result.attacked = client(args.duration, origin=started, between=between)
        stats = lib.worker_stats(master, cpu_before, lib.session_processes(master))
        samples.sample(flood, force=True)
        closes.sample()
        result.reconnects = str(flood.get(slow.SERVER_CLOSED) - closed_before)
        counts = {name: flood.get(getattr(slow, name)) for name in (
            "ATTEMPTS", "ESTABLISHED", "PEAK", "SERVER_CLOSED", "ANSWERED", "CONNECT_FAILED",
            "FD_ERRORS", "CAPPED", "Q_SAMPLES", "Q_BUSY", "Q_PEAK")}
        limits = nofile_limits(master)
    finally:
        stop_note = flood.end()
    flood_seconds = time.monotonic() - started
    time.sleep(AFTER_FLOOD)
    answered, why = lib.probe(port)
    result.rss_flooded = stats.rss_kib
    result.held = (f"{samples.open_min}-{samples.open_max}"
                   if samples.open_min != samples.open_max else str(samples.open_max))
    n = args.connections
    result.all_connected = opened >= n
    opening = (f"all {n} open (client side) after {ramp:.2f} s" if result.all_connected else
               f"only {opened} of {n} open (client side) after {ramp:.1f} s, {pending} "
               f"connecting (SYNs unanswered: a full accept queue drops them), "
               f"{n - opened - pending} waiting to reconnect; measured anyway")
    notes = [
        f"flood: {opening}; measured from +{measured_from:.2f} s",
        f"flood over {flood_seconds:.1f} s: {counts['ATTEMPTS']} connection attempts, "
        f"{counts['ESTABLISHED']} established (at most {counts['PEAK']} at once), "
        f"{counts['SERVER_CLOSED']} closed by the server ({result.reconnects} during the "
        f"measurement; {counts['ANSWERED']} of them with a response first) and reopened, "
        f"{counts['CONNECT_FAILED']} connects failed, {counts['FD_ERRORS']} local fd errors"
        + ("; attempt cap reached" if counts["CAPPED"] else ""),
        f"flood connections closed by the server, by time since the flood began (sampled about "
        f"every {CLOSES_EVERY:g} s, between requests): {closes.text()}",
        f"while measuring: the accept queue was non-empty in {counts['Q_BUSY']} of "
        f"{counts['Q_SAMPLES']} samples, at most {counts['Q_PEAK']}; server sockets at most, "
        f"per process: {samples.sockets_text()}",
        f"during the flood measurement: {stats.cpu_text()}",
        f"worker RSS MiB: before the flood {mib(rss_before)}; at the end of the measurement, "
        f"flood open, {mib(stats.rss_kib)}; {AFTER_FLOOD:g} s after it closed "
        f"{mib(worker_rss(master))}",
        f"RLIMIT_NOFILE (soft) of the server's processes: {limits}",
    ]
    new = sorted(samples.pids_seen - pids_before)
    notes.append(f"{len(new)} process(es) appeared during the flood (worker restarts?): {new}"
                 if new else "no new server process during the flood")
    if stop_note:
        notes.append(stop_note)
    for label, pair in (("no flood", result.baseline), ("flood", result.attacked)):
        for variant, one in zip(("fresh", "keep-alive"), pair or (), strict=True):
            if one.failed:
                notes.append(f"{label} {variant} failures: {one.failure_text()}")
    for variant, one in zip(("fresh", "keep-alive"), result.attacked or (), strict=True):
        # bench_slowloris says "reused" for a request without a connect time, which is also
        # one whose connect never completed.
        slowest = one.slowest_text().replace("(reused)", "(reused, or no connect completed)")
        notes.append(f"slowest {variant} requests in the flood (time since it began): {slowest}")
    if not answered:
        notes.append(f"after the flood closed: {why}")
    result.notes += notes
    if running.proc.poll() is not None:
        result.failure = f"server exited with status {running.proc.returncode} in the flood"


def wait_for_flood(running: lib.Running, flood: Attack, connections: int, started: float,
                   between: Callable[[], None]) -> tuple[int, int, float]:
    """Wait (at most RAMP_TIMEOUT s) until all `connections` are open on the client side; how
    many were, how many still connecting, and after how long."""
    deadline = started + RAMP_TIMEOUT
    while (flood.get(slow.OPEN) < connections and time.monotonic() < deadline
           and flood.alive and running.proc.poll() is None):
        between()
        time.sleep(0.02)
    opened, tried = flood.get(slow.OPEN), flood.get(slow.ATTEMPTS)
    done = sum(flood.get(counter) for counter in (
        slow.ESTABLISHED, slow.CONNECT_FAILED, slow.FD_ERRORS))
    return opened, max(0, tried - done), time.monotonic() - started


def worker_rss(master: int) -> dict[int, int]:
    """VmRSS (KiB) of each worker of the server started as `master`."""
    return lib.worker_stats(master, {}, lib.session_processes(master)).rss_kib


def nofile_limits(master: int) -> str:
    """The soft RLIMIT_NOFILE values of the server's processes, with how many have each."""
    found: dict[str, int] = {}
    for pid in lib.session_processes(master):
        try:
            text = Path("/proc", str(pid), "limits").read_text()
        except OSError:
            continue
        match = re.search(r"^Max open files\s+(\S+)", text, re.M)
        if match is not None:
            found[match.group(1)] = found.get(match.group(1), 0) + 1
    return ", ".join(f"{value} ({n} process(es))" for value, n in found.items()) or "unknown"


def mib(rss_kib: dict[int, int]) -> str:
    return " / ".join(f"{kib / 1024:.1f}" for kib in rss_kib.values()) or "-"


# -- report -------------------------------------------------------------------------------------


def table(results: list[Result], interval_ms: float) -> str:
    """bench_slowloris's table ("under attack": with the flood open), with two columns more: how
    many of the failures were timeouts, and the workers' memory at the end of the flood."""
    lines = slow.table(results, interval_ms).replace(
        "slow connections held", "flood connections open").splitlines()
    extra: list[tuple[str, str] | None] = [
        ("failures that timed out", "worker RSS MiB, flood open"), None]  # None: the rule
    for result in results:
        if result.baseline is None or result.attacked is None:
            extra.append(("-", "-"))  # the failed row
            continue
        fresh, kept = (str(one.failures["timeout"]) for one in result.attacked)
        extra += [(fresh, mib(result.rss_flooded)), (kept, "")]
    return "\n".join(line + ("---:|---:|" if cells is None else f" {cells[0]} | {cells[1]} |")
                     for line, cells in zip(lines, extra, strict=True))


def verdict(results: list[Result], interval_ms: float) -> list[str]:
    """A line per forkserve row: did it answer every normal request?"""
    lines = []
    for result in results:
        if result.server.kind != "forkserve":
            continue
        label = result.server.label
        if result.attacked is None or result.baseline is None:
            lines.append(f"FAILED: {label}: {result.failure}")
            continue
        sent = sum(one.count for one in (*result.baseline, *result.attacked))
        failed = result.normal_failures()
        worst = max(one.corrected_pct(99, interval_ms) or 0.0 for one in result.attacked)
        line = (f"{label}: {sent - failed} of {sent} normal requests answered; in the flood "
                f"corrected p99 {worst:.2f} ms (the worse of fresh and keep-alive)")
        if result.failed:
            line = f"FAILED: {line}" + (f"; {result.failure}" if result.failure else "")
        lines.append(line)
    return lines or ["forkserve not measured (--only): no verdict"]


# -- main ---------------------------------------------------------------------------------------


# The numeric flags: (flag, default, what it sets). All must be positive.
NUMBERS = (
    ("--workers", 2, "worker processes per server"),
    ("--connections", 10_000, "idle connections of the flood"),
    ("--duration", 10.0, "seconds measured in the flood, per server"),
    ("--baseline-duration", 5.0, "seconds measured without the flood, per server"),
    ("--interval", 0.01, "seconds between rounds of the normal client, each one fresh and one "
                         "keep-alive request"),
    ("--request-timeout", 5.0, "seconds a normal request may take, connect included"),
)


def parse_args(argv: list[str] | None, keys: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apps-dir", type=Path, default=lib.DEFAULT_APPS_DIR,
                        help=f"directory holding apps.py (default: {lib.DEFAULT_APPS_DIR})")
    for flag, default, text in NUMBERS:
        parser.add_argument(flag, type=type(default), default=default,
                            metavar="N" if isinstance(default, int) else "SECONDS",
                            help=f"{text} (default {default:g})")
    parser.add_argument("--only", action="append", choices=keys, metavar="SERVER",
                        help=f"run only this server; repeatable. One of: {', '.join(keys)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"directory for the report and the logs (default: "
                             f"{lib.shown(DEFAULT_OUT)})")
    args = parser.parse_args(argv)
    for flag, _, _ in NUMBERS:
        if getattr(args, flag[2:].replace("-", "_")) <= 0:
            parser.error(f"{flag} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    configs = servers()
    args = parse_args(argv, [server.key for server, _ in configs])
    apps_dir, chosen = lib.begin(args, [server for server, _ in configs])
    interfaces = {server.key: interface for server, interface in configs}
    nofile, _ = slow.raise_fd_limit(0)
    if nofile < args.connections + slow.FD_RESERVE:
        print(f"error: --connections {args.connections} needs about "
              f"{args.connections + slow.FD_RESERVE} file descriptors, but RLIMIT_NOFILE is "
              f"{nofile} even raised to the hard limit. Raise the hard limit (ulimit -Hn, "
              f"LimitNOFILE=) or lower --connections.", file=sys.stderr)
        return lib.EXIT_SETUP
    versions = [f"python {sys.version.split()[0]}", lib.forkserve_version()]
    for kind, needs in PEER_NEEDS.items():
        if any(server.kind == kind for server in chosen):
            found = lib.require_peers(needs)
            versions += [f"{name} {version}" for name, version in found.items()]

    started, clock = datetime.now(timezone.utc), time.monotonic()
    results = lib.run_all(
        functools.partial(measure, server, interfaces[server.key], apps_dir, args)
        for server in chosen)
    if results is None:
        return lib.EXIT_INTERRUPTED

    header = (
        f"# bench_idle: a normal client's latency while {args.connections} idle connections "
        f"are held open\n\n"
        f"{started:%Y-%m-%d %H:%M} UTC, {time.monotonic() - clock:.0f} s in all; "
        f"{args.workers} workers per server, each with its default keep-alive and timeouts "
        f"(forkserve: --worker-connections {WORKER_CONNECTIONS}, its default); "
        f"{args.connections} connections that never send a byte, opened at once and reopened "
        f"when the server closes them; normal client: one fresh-connection and one keep-alive "
        f"GET every {args.interval:g} s, {args.request_timeout:g} s timeout (a failure counts "
        f"in the percentiles with the time it took), {args.baseline_duration:g} s without the "
        f"flood, then {args.duration:g} s with it (from when all its connections were open, "
        f"or {RAMP_TIMEOUT:g} s); RLIMIT_NOFILE {nofile}; {sysctls()}; "
        f"{os.cpu_count()} CPUs; {'; '.join(versions)}; {lib.source_state()}.\n"
        f"\"baseline\": without the flood; \"under attack\": with it open; \"flood "
        f"connections open\": the flood's open connections (client side) during the "
        f"measurement (min-max), \"(incomplete)\" when never all of them; \"reconnects\": "
        f"flood connections the server closed (and the flood reopened) during it; "
        f"\"corrected\": p99 counting the requests a stalled sequential client did not send "
        f"(coordinated omission); \"worker RSS\": VmRSS of each worker at the end of the "
        f"measurement, the flood still open.")
    interval_ms = args.interval * 1000.0
    return lib.finish(args.out / REPORT_NAME, header, table(results, interval_ms),
                      verdict(results, interval_ms), results)


def sysctls() -> str:
    """The kernel settings that bound a flood on 127.0.0.1."""
    names = ("core/somaxconn", "ipv4/tcp_max_syn_backlog", "ipv4/ip_local_port_range",
             "ipv4/tcp_tw_reuse")
    return "; ".join(f"{name.split('/')[1]} "
                     f"{' '.join(lib.read_log(Path('/proc/sys/net', name)).split()) or '?'}"
                     for name in names)


if __name__ == "__main__":
    sys.exit(main())
