"""loadtests/run end to end: a few seconds of locust against each app, and one scenario."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("locust", reason="locust is not installed (pip install -e '.[test]')")

RUN = Path(__file__).resolve().parents[1] / "loadtests" / "run"

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


@pytest.mark.timeout(30)
def test_hup_scenario_under_load_loses_nothing(tmp_path):
    result = run(tmp_path, "--scenario", "hup", "--users", "6", "--duration", "5s",
                 timeout=25)
    assert "[loadtests/run] HUP" in result.stdout
    assert "replaced 2 workers" in (tmp_path / "hup" / "server.log").read_text()
    assert re.search(r"^hup +\d+ +0 +0 .* ok +[\d.]+ s at", result.stdout, re.MULTILINE), \
        result.stdout[-2000:]
