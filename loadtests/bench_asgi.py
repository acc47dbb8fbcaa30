"""Compare forkserve with uvicorn and gunicorn on the same hello-world ASGI app, in one run.

Run from the repository root, with the project's environment::

    python loadtests/bench_asgi.py                      # all six servers, 2 workers, 5 s each
    python loadtests/bench_asgi.py --duration 10 --connections 64 --workers 2
    python loadtests/bench_asgi.py --only forkserve-uvloop --only uvicorn-httptools-uvloop

Servers, all serving ``apps:asgi`` from ``loadtests/hello`` (``--apps-dir`` overrides) with the
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
fresh port on 127.0.0.1; without wrk (or with ``--generator loadgen``) it is ``loadgen.py``,
which also checks every response's body.

The table is printed and written to ``loadtests/out/bench_asgi.md``; each server's log and
the generator's full output go to ``loadtests/out/bench_asgi-logs/``. The exit status is 0 when
every server answered every request with a 2xx/3xx (and, with loadgen.py, the right body) and no
socket error, 1 otherwise, 2 when a prerequisite is missing.

Only the ratios between servers measured in the same run are meaningful. Absolute requests/s
depend on the machine, its load at the time, and on the load generator sharing the CPUs with
the server under test; comparing numbers across runs or machines tells you nothing. Even within
a run, with keep-alive the connections stay with the worker that accepted them, so on a small
machine one worker may end up with all of them: the notes give each worker's CPU time and flag
such a run as IMBALANCED; rerun before reading much into its ratio. Look at p50 too: a
multi-worker asyncio server can sit on a fixed latency floor (tens of ms) that caps its
requests/s.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import os
import subprocess
import sys
from datetime import datetime, timezone

import benchlib as lib
from benchlib import Row, Server

REPORT = lib.OUT_DIR / "bench_asgi.md"
LOG_DIR = lib.OUT_DIR / "bench_asgi-logs"

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


def measure(server: Server, app: lib.App, load: lib.Load) -> Row:
    digest = lib.code_digest() if server.kind == "forkserve" else None
    row = lib.measure(server, app, load, LOG_DIR / f"{server.key}.log")
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
    args = parse_args(argv, [s.key for s in servers()])
    apps_dir, chosen = lib.begin(args, servers())
    generator = lib.require_generator(args.generator)
    source, digest = lib.source_state(), lib.code_digest()
    versions = [f"python {sys.version.split()[0]}",
                f"{lib.forkserve_version()} ({source}; uvloop {local_version('uvloop')}, "
                f"h11 {local_version('h11')}, httptools {local_version('httptools')})"]
    skipped: dict[str, str] = {}
    if any(s.kind != "forkserve" for s in chosen):
        peers = lib.require_peers(PEER_NEEDS)
        parser = "gunicorn_h1c" if lib.peer_versions(["gunicorn_h1c"])["gunicorn_h1c"] \
            else "pure-Python parser"
        versions += [f"uvicorn {peers['uvicorn']} (httptools {peers['httptools']}, "
                     f"uvloop {peers['uvloop']})",
                     f"gunicorn {peers['gunicorn']} ({parser})"]
        if not gunicorn_has_asgi():
            skipped["gunicorn-asgi"] = (f"gunicorn {peers['gunicorn']} has no native ASGI "
                                        "worker, -k asgi needs gunicorn 27+")
            print(f"note: skipping gunicorn-asgi: {skipped['gunicorn-asgi']}", file=sys.stderr)
    versions.append(generator.version())

    load = lib.Load(generator, args.connections, args.duration, args.workers)
    app = lib.hello_app(apps_dir, "asgi")
    started = datetime.now(timezone.utc)
    rows = lib.run_all(functools.partial(measure, server, app, load)
                       for server in chosen if server.key not in skipped)
    if rows is None:
        return lib.EXIT_INTERRUPTED

    extra = p50_notes(rows)
    extra += [f"- {key}: SKIPPED, {why}" for key, why in skipped.items()]
    extra += lib.code_change_warning(source, digest)

    header = (f"# bench_asgi: forkserve vs uvicorn and gunicorn, hello-world ASGI\n\n"
              f"{started:%Y-%m-%d %H:%M} UTC; {args.workers} workers per server; "
              f"{generator.describe(args.connections, args.duration)}, after a "
              f"{lib.WARMUP_SECONDS} s warm-up; {os.cpu_count()} CPUs; {'; '.join(versions)}.\n"
              f"Only ratios within one run are meaningful.")
    body = lib.table(rows, [("forkserve(uvloop)/peer", functools.partial(ratio_cell, rows))])
    return lib.finish(REPORT, header, body, ratio_lines(rows, [s.key for s in chosen], skipped),
                      rows, extra_notes=extra, ratios_last=True)


if __name__ == "__main__":
    sys.exit(main())
