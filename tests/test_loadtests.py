"""loadtests/run end to end: a few seconds of locust against each app, and one scenario;
loadtests/compare: forkserve alone under each load, briefly."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LOADTESTS = Path(__file__).resolve().parents[1] / "loadtests"
RUN = LOADTESTS / "run"
COMPARE = LOADTESTS / "compare"

needs_locust = pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                                  reason="locust is not installed (pip install -e '.[test]')")

# The summary rows each tag makes, as "TYPE NAME" in the endpoint table.
ENDPOINTS = {
    "hello": ["GET /"],
    "json": ["GET /json"],
    "upload": ["POST /upload (chunked)", "POST /upload (length)"],
    "download": ["GET /download", "GET /file"],
    "slow": ["GET /slow"],
    "ws": ["WS /ws connect", "WS /ws echo"],
}


def run(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, str(RUN), "--out", str(out), *args],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def requests_of(summary: str, endpoint: str) -> int:
    """The request count of `endpoint` in the endpoint table of the summary."""
    match = re.search(rf"^  {re.escape(endpoint)} +(\d+) ", summary, re.MULTILINE)
    assert match, f"no row for {endpoint} in:\n{summary}"
    return int(match[1])


@needs_locust
@pytest.mark.timeout(30)
@pytest.mark.parametrize("app", ["wsgi", "asgi"])
def test_short_run_serves_every_endpoint(tmp_path, app):
    tags = [tag for tag in ENDPOINTS if tag != "ws" or app == "asgi"]
    result = run(tmp_path, "--app", app, "--users", "7", "--duration", "3s", "--tags", *tags,
                 "mixed", timeout=25)
    folder = tmp_path / "load"
    for name in ("locust_stats.csv", "locust_final_stats.csv", "report.html", "server.log"):
        assert (folder / name).stat().st_size > 0, name
    summary = (tmp_path / "summary.txt").read_text()
    assert summary in result.stdout
    for tag in tags:
        for endpoint in ENDPOINTS[tag]:
            assert requests_of(summary, endpoint) > 0, endpoint
    assert re.search(r"^load +\d+ +0 +0 .* ok ", summary, re.MULTILINE), summary


@needs_locust
@pytest.mark.timeout(30)
def test_hup_scenario_under_load_loses_nothing(tmp_path):
    result = run(tmp_path, "--scenario", "hup", "--users", "6", "--duration", "5s",
                 timeout=25)
    assert "[loadtests/run] HUP" in result.stdout
    assert "replaced 2 workers" in (tmp_path / "hup" / "server.log").read_text()
    assert re.search(r"^hup +\d+ +0 +0 .* ok +[\d.]+ s at", result.stdout, re.MULTILINE), \
        result.stdout[-2000:]


# The hello-world apps the benchmarks serve by default.
HELLO_APPS = LOADTESTS / "hello"
SHARED_APPS = LOADTESTS.parents[1] / "shared" / "bench" / "apps.py"


def test_the_hello_apps_are_the_shared_ones_byte_for_byte():
    if not SHARED_APPS.exists():
        pytest.skip(f"{SHARED_APPS} is not here to compare with")
    assert (HELLO_APPS / "apps.py").read_bytes() == SHARED_APPS.read_bytes()


def compare(out: Path, *args: str, timeout: float) -> str:
    """Run loadtests/compare on forkserve sync alone with the hello app; its report."""
    result = subprocess.run(
        [sys.executable, str(COMPARE), "--duration", "1", "--apps", "hello", "--only",
         "forkserve-sync", "--apps-dir", str(HELLO_APPS), "--out", str(out), *args],
        capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return (out / "compare.md").read_text()


@pytest.mark.timeout(90)
def test_compare_reports_keepalive_fresh_and_pipelined_loads(tmp_path):
    out = tmp_path / "out"
    # loadgen checks every body; --loads in this order puts the fresh table first.
    report = compare(out, "--generator", "loadgen", "--loads", "fresh,keepalive,pipelined",
                     "--fresh-connections", "3", "--connections", "4", "--pipeline-depth", "4",
                     timeout=85)
    fresh = report.index("## hello, fresh connections, 3 at once (one request each, "
                         "Connection: close)")
    keepalive = report.index("## hello, keep-alive, 4 connections")
    pipelined = report.index("## hello, pipelined, 4 connections, depth 4 (each writes 4 "
                             "requests at once, then reads their 4 responses)")
    assert fresh < keepalive < pipelined
    assert "loadgen.py -p 1 -c 3 -d 1 --fresh (a new connection for every request" in report
    assert ("loadgen.py -p 1 -c 4 -d 1 --pipeline 4 (keep-alive, 4 requests written at once, "
            "then their 4 responses read") in report
    # Each table's forkserve row: req/s, ..., baseline, CPU shares, request shares (spread).
    rows = re.findall(r"^\| forkserve sync \| ([\d,]+) \|.*\| baseline \| .*?\| "
                      r"(\d+% / \d+% \()", report, re.MULTILINE)
    assert len(rows) == 3, report
    assert all(int(rps.replace(",", "")) > 0 for rps, _ in rows), rows
    # Only the pipelined table has the share of requests answered.
    assert report.count("| answered of written |") == 1
    assert re.search(r"^\| forkserve sync \| [\d,]+ \| [\d.]+ ms \| [\d.]+ ms \| 0 \| "
                     r"baseline \| (9\d|100)% \|", report, re.MULTILINE), report
    assert "forkserve sync [hello, fresh]: requests served per worker" in report
    assert "forkserve sync [hello, pipelined 4]: pipelined: " in report
    assert "UNANSWERED" not in report
    assert "busiest/least busy" in report
    for load, fresh_mode, depth in (("fresh", True, 1), ("keepalive", False, 1),
                                    ("pipelined", False, 4)):
        output = (out / "logs" / f"hello-{load}-forkserve-sync.loadgen.txt").read_text()
        measured = json.loads(output.splitlines()[0])
        assert (measured["fresh"], measured["depth"]) == (fresh_mode, depth)
        assert measured["requests"] > 0
        assert not any(measured["errors"].values()), measured


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
@pytest.mark.timeout(60)
def test_compare_pipelines_with_wrk(tmp_path):
    report = compare(tmp_path, "--generator", "wrk", "--loads", "pipelined", "--connections",
                     "4", "--pipeline-depth", "4", timeout=55)
    assert ("wrk -t1 -c4 -d1s --latency -s loadtests/pipeline.lua URL -- 4 (keep-alive, 4 "
            "requests written at once") in report
    # wrk's percentiles mean nothing when pipelining: none are shown. Of the requests written
    # all but those in flight at the end are answered.
    assert re.search(r"^\| forkserve sync \| [\d,]+ \| - \| - \| 0 \| baseline \| (9\d|100)% \|",
                     report, re.MULTILINE), report
    assert re.search(r"pipelined 4\]: pipelined: \d+ requests written in batches of 4, \d+ "
                     r"answered$", report, re.MULTILINE), report
