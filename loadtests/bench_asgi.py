"""Compare forkserve with uvicorn and gunicorn on the same hello-world ASGI app, in one run.

Run from the repository root, with the project's environment::

    python loadtests/bench_asgi.py                      # all six servers, 2 workers, 5 s each
    python loadtests/bench_asgi.py --duration 10 --connections 64 --workers 2
    python loadtests/bench_asgi.py --only forkserve-uvloop --only uvicorn-httptools-uvloop

Servers, all serving ``apps:asgi`` from ``../shared/bench`` (``--apps-dir`` overrides) with the
same number of workers, measured one after another in this order:

* ``forkserve-uvloop``          forkserve ``--loop uvloop`` (it detects the ASGI app itself)
* ``uvicorn-httptools-uvloop``  uvicorn ``--http httptools --loop uvloop --workers N``
* ``uvicorn-h11-uvloop``        uvicorn ``--http h11 --loop uvloop --workers N``
* ``gunicorn-asgi``             gunicorn's native ASGI worker, ``-k asgi --asgi-loop uvloop``
                                (gunicorn 27+; skipped, and said so, when the installed gunicorn
                                has none)
* ``forkserve-asyncio``         forkserve ``--loop asyncio``
* ``uvicorn-h11-asyncio``       uvicorn ``--http h11 --loop asyncio --workers N``

The last column of the table is forkserve (uvloop)'s requests/s over that row's. The lines at
the end pair like with like: forkserve (uvloop) against uvicorn httptools+uvloop, against uvicorn
h11 (its ``--loop uvloop`` row, so only the HTTP stack differs) and against gunicorn ``-k asgi``;
forkserve ``--loop asyncio`` against uvicorn h11 asyncio.

forkserve runs from this interpreter's environment (``sys.executable -m forkserve``), an editable
install: the header records the commit and a digest of any uncommitted change under
``forkserve/``, since that is the code measured. uvicorn (``uvicorn[standard]``, which brings
httptools and uvloop) and gunicorn live in their own virtualenv, ``loadtests/.peers-venv``
(shared with ``bench_wsgi.py``), created and pip-installed on first use and reused afterwards.
uvicorn runs with ``--no-access-log`` (forkserve and gunicorn log no access by default). The
load generator is ``wrk`` (``apt-get install wrk``), run with keep-alive (its default) as
``wrk -t1 -c32 -d5s --latency`` after a 1 s warm-up, against one server at a time, each on a
fresh port on 127.0.0.1.

The table is printed and written to ``loadtests/out/bench_asgi.md``; each server's log and
wrk's full output go to ``loadtests/out/bench_asgi-logs/``. The exit status is 0 when every
server answered every request with a 2xx/3xx and no socket error, 1 otherwise, 2 when a
prerequisite is missing.

Only the ratios between servers measured in the same run are meaningful. Absolute requests/s
depend on the machine, its load at the time, and on wrk sharing the CPUs with the server under
test; comparing numbers across runs or machines tells you nothing. Even within a run, with
keep-alive the connections stay with the worker that accepted them, so on a small machine one
worker may end up with all of them: the notes give each worker's CPU time and flag such a run
as IMBALANCED; rerun before reading much into its ratio. Look at p50 too: a multi-worker
asyncio server can sit on a fixed latency floor (tens of ms) that caps its requests/s.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import benchlib as lib
from benchlib import Row, Server

REPORT = lib.OUT_DIR / "bench_asgi.md"
LOG_DIR = lib.OUT_DIR / "bench_asgi-logs"

APP = "apps:asgi"
BASELINE = "forkserve-uvloop"

# Modules the peers venv must hold, and the pip requirement that provides each.
PEER_NEEDS = {"uvicorn": "uvicorn[standard]", "httptools": "uvicorn[standard]",
              "uvloop": "uvicorn[standard]", "gunicorn": "gunicorn"}

# (ours, peer, line text): the ratios printed at the end of the report.
RATIOS = (
    ("forkserve-uvloop", "uvicorn-httptools-uvloop",
     "forkserve asgi (uvloop) / uvicorn httptools+uvloop"),
    ("forkserve-uvloop", "uvicorn-h11-uvloop", "forkserve asgi (uvloop) / uvicorn h11"),
    ("forkserve-uvloop", "gunicorn-asgi", "forkserve asgi / gunicorn -k asgi"),
    ("forkserve-asyncio", "uvicorn-h11-asyncio",
     "forkserve asgi (asyncio loop) / uvicorn h11 asyncio"),
)

TITLE = re.compile(r"worker (\d+) \[.*\] (\d+) requests?")
TITLE_REFRESH = 1.2  # seconds: a forkserve worker's heartbeat tick is at most 1 s


# -- servers ------------------------------------------------------------------------------------


def servers() -> list[Server]:
    """The six configurations, in the order they are measured."""
    return [
        Server("forkserve-uvloop", "forkserve asgi (uvloop)", "forkserve", ("--loop", "uvloop")),
        Server("uvicorn-httptools-uvloop", "uvicorn httptools+uvloop", "uvicorn",
               ("--http", "httptools", "--loop", "uvloop")),
        Server("uvicorn-h11-uvloop", "uvicorn h11+uvloop", "uvicorn",
               ("--http", "h11", "--loop", "uvloop")),
        Server("gunicorn-asgi", "gunicorn -k asgi (uvloop)", "gunicorn",
               ("-k", "asgi", "--asgi-loop", "uvloop")),
        Server("forkserve-asyncio", "forkserve asgi (asyncio)", "forkserve",
               ("--loop", "asyncio")),
        Server("uvicorn-h11-asyncio", "uvicorn h11 asyncio", "uvicorn",
               ("--http", "h11", "--loop", "asyncio")),
    ]


def server_command(server: Server, apps_dir: Path, workers: int, port: int) -> list[str]:
    if server.kind == "uvicorn":
        return [lib.peer_bin("uvicorn"), APP, "--app-dir", str(apps_dir),
                "--workers", str(workers), *server.extra, "--no-access-log",
                "--host", lib.HOST, "--port", str(port)]
    if server.kind == "forkserve":
        base = lib.forkserve_command()
    else:
        base = [lib.peer_bin("gunicorn"), *lib.gunicorn_quiet_flags()]
    return [*base, APP, "--chdir", str(apps_dir), "-w", str(workers), *server.extra,
            "-b", f"{lib.HOST}:{port}"]


def boot_marker(server: Server, workers: int) -> lib.Boot:
    """A log line pattern and how many times it must appear once every worker has booted."""
    if server.kind == "forkserve":
        return lib.forkserve_boot()
    if server.kind == "uvicorn":  # once per worker process, after its lifespan startup
        return lib.Boot(re.compile(r"Application startup complete"), workers)
    return lib.gunicorn_boot(workers)


def forkserve_requests(master: int) -> str | None:
    """Requests each forkserve worker has served since it booted, read from its process title.

    Workers refresh their title on each heartbeat tick (at most 1 s apart), so wait for one
    after the load has stopped: the totals are then exact.
    """
    time.sleep(TITLE_REFRESH)
    counts = []
    for pid in lib.session_processes(master):
        match = TITLE.search(lib.cmdline(pid).decode(errors="replace"))
        if match is not None:
            counts.append((int(match.group(1)), int(match.group(2))))
    if not counts:
        return None
    counts.sort()
    total = sum(n for _, n in counts) or 1
    parts = " / ".join(f"worker {w}: {n} ({n / total:.0%})" for w, n in counts)
    return f"requests served per worker since boot (process titles, incl. warm-up): {parts}"


def measure(server: Server, apps_dir: Path, workers: int, wrk: str, connections: int,
            seconds: int) -> Row:
    port = lib.free_port()
    digest = lib.code_digest() if server.kind == "forkserve" else None
    row = lib.measure(server, server_command(server, apps_dir, workers, port),
                      boot_marker(server, workers), LOG_DIR / f"{server.key}.log", wrk,
                      connections, seconds, port,
                      forkserve_requests if server.kind == "forkserve" else None)
    if digest is not None:
        row.notes.append(f"forkserve code digest when started: {digest}")
    return row


# -- prerequisites ------------------------------------------------------------------------------


def gunicorn_has_asgi() -> bool:
    """Whether the peers venv's gunicorn registers a native ``asgi`` worker class."""
    probe = subprocess.run(
        [str(lib.peers_python()), "-c",
         "from gunicorn.workers import SUPPORTED_WORKERS as w; print('asgi' in w)"],
        capture_output=True, text=True, timeout=60)
    return probe.stdout.strip() == "True"


def local_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# -- report -------------------------------------------------------------------------------------


def ratio_cell(rows: list[Row], row: Row) -> str:
    """forkserve (uvloop) / this row."""
    if row.server.key == BASELINE:
        return "baseline"
    return lib.fmt_ratio(lib.ratio({r.server.key: r for r in rows}, BASELINE, row.server.key))


def ratio_lines(rows: list[Row], chosen: list[str], skipped: dict[str, str]) -> list[str]:
    by_key = {row.server.key: row for row in rows}
    out = []
    for ours, peer, text in RATIOS:
        if ours not in chosen or peer not in chosen:
            continue
        if peer in skipped:
            out.append(f"{text} = n/a (skipped: {skipped[peer]})")
            continue
        value = lib.ratio(by_key, ours, peer)
        out.append(f"{text} = {lib.fmt_ratio(value, 'n/a (a server failed)')}")
    return out


def p50_notes(rows: list[Row]) -> list[str]:
    """Each server's p50, with a flag for a latency floor like the 43 ms one seen before."""
    out = []
    for row in rows:
        if row.result is None or row.result.p50_ms is None:
            continue
        text = f"- p50 {row.server.label}: {row.result.p50_ms:.2f} ms"
        if row.result.p50_ms >= 20:
            text += " (LATENCY FLOOR? p50 >= 20 ms on a hello-world app)"
        out.append(text)
    return out


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None, keys: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare forkserve with uvicorn and gunicorn on the same hello-world ASGI "
                    "app.",
        epilog="Only ratios between servers measured in the same run are meaningful.")
    lib.add_common_args(parser, keys)
    args = parser.parse_args(argv)
    lib.require_positive(parser, args, ("workers", "connections", "duration"))
    return args


def main(argv: list[str] | None = None) -> int:
    keys = [s.key for s in servers()]
    args = parse_args(argv, keys)
    apps_dir: Path = args.apps_dir.resolve()
    if not lib.check_apps_dir(apps_dir):
        return lib.EXIT_SETUP
    wrk = lib.require_wrk()
    chosen = [s for s in servers() if not args.only or s.key in args.only]
    lib.install_cleanup()

    source, digest = lib.source_state(), lib.code_digest()
    versions = [f"python {sys.version.split()[0]}",
                f"{lib.forkserve_version()} ({source}; uvloop {local_version('uvloop')}, "
                f"h11 {local_version('h11')}, httptools {local_version('httptools')})"]
    skipped: dict[str, str] = {}
    if any(s.kind != "forkserve" for s in chosen):
        try:
            peers = lib.ensure_peers_venv(PEER_NEEDS)
        except (subprocess.SubprocessError, RuntimeError, OSError) as exc:
            print(f"error: could not set up uvicorn/gunicorn in {lib.PEERS_VENV}: {exc}",
                  file=sys.stderr)
            return lib.EXIT_SETUP
        parser = "gunicorn_h1c" if lib.peer_versions(["gunicorn_h1c"])["gunicorn_h1c"] \
            else "pure-Python parser"
        versions += [f"uvicorn {peers['uvicorn']} (httptools {peers['httptools']}, "
                     f"uvloop {peers['uvloop']})",
                     f"gunicorn {peers['gunicorn']} ({parser})"]
        if not gunicorn_has_asgi():
            skipped["gunicorn-asgi"] = (f"gunicorn {peers['gunicorn']} has no native ASGI "
                                        "worker, -k asgi needs gunicorn 27+")
            print(f"note: skipping gunicorn-asgi: {skipped['gunicorn-asgi']}", file=sys.stderr)
    versions.append(lib.wrk_version(wrk))

    started = datetime.now(timezone.utc)
    rows = lib.run_all([s for s in chosen if s.key not in skipped], functools.partial(
        measure, apps_dir=apps_dir, workers=args.workers, wrk=wrk,
        connections=args.connections, seconds=args.duration))
    if rows is None:
        return lib.EXIT_INTERRUPTED

    extra = p50_notes(rows)
    extra += [f"- {key}: SKIPPED, {why}" for key, why in skipped.items()]
    if lib.code_digest() != digest:
        extra.append(f"- WARNING: forkserve/ changed during the run (at start: {source}; "
                     f"at end: {lib.source_state()}); rows may have measured different code")

    header = (f"# bench_asgi: forkserve vs uvicorn and gunicorn, hello-world ASGI\n\n"
              f"{started:%Y-%m-%d %H:%M} UTC; {args.workers} workers per server; "
              f"wrk -t1 -c{args.connections} -d{args.duration}s --latency (keep-alive), after a "
              f"{lib.WARMUP_SECONDS} s warm-up; {os.cpu_count()} CPUs; {'; '.join(versions)}.\n"
              f"Only ratios within one run are meaningful.")
    body = lib.table(rows, "forkserve(uvloop)/peer", functools.partial(ratio_cell, rows))
    return lib.finish(REPORT, header, body, ratio_lines(rows, [s.key for s in chosen], skipped),
                      rows, extra_notes=extra, ratios_last=True)


if __name__ == "__main__":
    sys.exit(main())
