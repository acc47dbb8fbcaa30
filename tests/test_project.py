"""The project's own promises: README's commands, CI running them, ruff-clean code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.+)\n```", text)[:2]


def test_readme_opens_with_serve_and_test_commands():
    serve, test = readme_commands()
    assert "pip install ." in serve and serve.endswith("&& forkserve")
    assert "pip install -e '.[test]'" in test and test.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    # .ci/run finds the command the same way; run its extraction and compare.
    script = (ROOT / ".ci" / "run").read_text()
    awk = re.search(r"cmd=\$\(awk '(.+)' README\.md\)", script).group(1)
    found = subprocess.run(["awk", awk, "README.md"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert found == readme_commands()[1]


def test_ruff_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise",
                             "."], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
