"""Compare forkserve with gunicorn on the same hello-world WSGI app, in one run.

Run from the repository root, with the project's environment::

    python loadtests/bench_wsgi.py                      # all four servers, 2 workers, 5 s each
    python loadtests/bench_wsgi.py --duration 10 --connections 64 --workers 2
    python loadtests/bench_wsgi.py --only forkserve --only gunicorn-sync

Servers, all serving ``apps:wsgi`` from ``loadtests/hello`` (``--apps-dir`` overrides) with the
same number of workers:

* ``forkserve``          forkserve with ``--threads 1`` (app called inline in the event loop)
* ``forkserve-threads``  forkserve with ``--threads 4``
* ``gunicorn-sync``      gunicorn ``-k sync``
* ``gunicorn-gthread``   gunicorn ``-k gthread --threads 4``

forkserve runs from this interpreter's environment (``sys.executable -m forkserve``). gunicorn
lives in its own virtualenv, ``loadtests/.peers-venv``, created and pip-installed on first use and
reused afterwards. The load generator is ``wrk`` (``apt-get install wrk``), run with keep-alive
(its default) as ``wrk -t1 -c32 -d5s --latency`` after a 1 s warm-up, against one server at a
time, each on a fresh port on 127.0.0.1; without wrk (or with ``--generator loadgen``) it is
``loadgen.py``, which also checks every response's body.

The table is printed and written to ``loadtests/out/bench_wsgi.md``; each server's log and
the generator's full output go to ``loadtests/out/bench_wsgi-logs/``. The exit status is 0 when
every server answered every request with a 2xx/3xx (and, with loadgen.py, the right body) and no
socket error, 1 otherwise, 2 when a prerequisite is missing.

Only the ratios between servers measured in the same run are meaningful. Absolute requests/s
depend on the machine, its load at the time, and on the load generator sharing the CPUs with
the server under test; comparing numbers across runs or machines tells you nothing. Even within
a run, with keep-alive the connections stay with the worker that accepted them, so on a small
machine one worker may end up with all of them: the notes give each worker's CPU time and flag
such a run as IMBALANCED; rerun before reading much into its ratio.
"""


from __future__ import annotations

import argparse
import functools
import os
import sys
from datetime import datetime, timezone

import benchlib as lib
from benchlib import Row, Server

REPORT = lib.OUT_DIR / "bench_wsgi.md"
LOG_DIR = lib.OUT_DIR / "bench_wsgi-logs"


# -- servers ------------------------------------------------------------------------------------


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


def measure(server: Server, app: lib.App, load: lib.Load) -> Row:
    return lib.measure(server, app, load, LOG_DIR / f"{server.key}.log")


# -- report -------------------------------------------------------------------------------------


def ratio_cell(rows: list[Row], row: Row) -> str:
    """forkserve/peer for both rows of a pair."""
    by_key = {r.server.key: r for r in rows}
    partner = {s.peer_of: s.key for s in (r.server for r in rows) if s.peer_of}
    key = row.server.key
    if row.server.peer_of is not None:
        return lib.fmt_ratio(lib.ratio(by_key, row.server.peer_of, key))
    if key in partner:
        return lib.fmt_ratio(lib.ratio(by_key, key, partner[key]))
    return "-"


def ratio_lines(rows: list[Row], threads: int) -> list[str]:
    by_key = {row.server.key: row for row in rows}
    out = []
    for ours, peer, text in (
        ("forkserve", "gunicorn-sync", "forkserve sync / gunicorn sync"),
        ("forkserve-threads", "gunicorn-gthread",
         f"forkserve --threads {threads} / gunicorn gthread({threads})"),
    ):
        if ours in by_key and peer in by_key:
            value = lib.ratio(by_key, ours, peer)
            out.append(f"{text} = {lib.fmt_ratio(value, 'n/a (a server failed)')}")
    return out


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None, keys: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare forkserve with gunicorn on the same hello-world WSGI app.",
        epilog="Only ratios between servers measured in the same run are meaningful.")
    lib.add_common_args(parser, keys)
    parser.add_argument("--threads", type=int, default=4,
                        help="threads for forkserve --threads and gunicorn gthread (default 4)")
    args = parser.parse_args(argv)
    lib.require_positive(parser, args, ("workers", "threads", "connections", "duration"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, [s.key for s in servers(4)])
    apps_dir, chosen = lib.begin(args, servers(args.threads))
    generator = lib.require_generator(args.generator)
    versions = [f"python {sys.version.split()[0]}", lib.forkserve_version()]
    if any(s.kind == "gunicorn" for s in chosen):
        versions.append(f"gunicorn {lib.require_peers({'gunicorn': 'gunicorn'})['gunicorn']}")
    versions.append(generator.version())

    load = lib.Load(generator, args.connections, args.duration, args.workers)
    app = lib.hello_app(apps_dir, "wsgi")
    started = datetime.now(timezone.utc)
    rows = lib.run_all(functools.partial(measure, server, app, load) for server in chosen)
    if rows is None:
        return lib.EXIT_INTERRUPTED

    header = (f"# bench_wsgi: forkserve vs gunicorn, hello-world WSGI\n\n"
              f"{started:%Y-%m-%d %H:%M} UTC; {args.workers} workers per server; "
              f"{generator.describe(args.connections, args.duration)}, after a "
              f"{lib.WARMUP_SECONDS} s warm-up; {os.cpu_count()} CPUs; {'; '.join(versions)}.\n"
              f"Only ratios within one run are meaningful.")
    body = lib.table(rows, [("ratio forkserve/peer", functools.partial(ratio_cell, rows))])
    return lib.finish(REPORT, header, body, ratio_lines(rows, args.threads), rows)


if __name__ == "__main__":
    sys.exit(main())
