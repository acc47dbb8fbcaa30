"""loadtests/bench_idle.py end to end, briefly: a small idle flood against forkserve's sync
worker."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_loadtests import HELLO_APPS, LOADTESTS

BENCH = LOADTESTS / "bench_idle.py"


@pytest.mark.timeout(45)
def test_small_flood_reports_every_normal_request_answered(tmp_path: Path) -> None:
    apps = HELLO_APPS
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--connections", "200", "--duration", "1",
         "--baseline-duration", "1", "--only", "forkserve-sync", "--apps-dir", str(apps),
         "--out", str(out)],
        capture_output=True, text=True, timeout=40)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (out / "bench_idle.md").read_text()
    assert report.strip() in result.stdout
    # The table: forkserve's two rows (fresh connection, keep-alive), neither with a failure.
    lines = [line for line in report.splitlines() if line.startswith("|")]
    head = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(head, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
            for line in lines[2:]]
    assert [row["client"] for row in rows] == ["fresh connection", "keep-alive"], report
    assert rows[0]["server"] == "forkserve sync", report
    for row in rows:
        failed, sent = re.fullmatch(r"(\d+) / (\d+)", row["failures"]).groups()
        assert failed == "0" and int(sent) > 0, row
    answered = re.search(r"^forkserve sync: (\d+) of (\d+) normal requests answered", report,
                         re.MULTILINE)
    assert answered and answered[1] == answered[2], report
    assert "flood: all 200 open (client side)" in report
    assert (out / "logs" / "forkserve-sync.log").stat().st_size > 0
