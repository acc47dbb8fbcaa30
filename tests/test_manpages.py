"""The man pages in man/: generated from the settings table, checked in, and clean for mandoc.

When a setting is added to forkserve/settings.py, the pages must be regenerated with
`python -m forkserve.manpage`; these tests fail until they are.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from forkserve import ctl, manpage
from forkserve.config import HOOKS, build_parser
from forkserve.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
MAN = ROOT / "man"
REGENERATE = "run `python -m forkserve.manpage` (from the repository root) to regenerate"

needs_mandoc = pytest.mark.skipif(
    shutil.which("mandoc") is None,
    reason="mandoc is not installed (apt-get install mandoc; .ci/run installs it)",
)
needs_man = pytest.mark.skipif(
    shutil.which("man") is None, reason="man is not installed (apt-get install man-db)"
)


def page_source(which: str, name: str) -> str:
    """A page as checked in, or as the generator renders it now."""
    if which == "checked-in":
        path = MAN / name
        if not path.exists():
            pytest.fail(f"man/{name} is missing: {REGENERATE}")
        return path.read_text(encoding="utf-8")
    return manpage.render()[name]


def section(source: str, title: str) -> str:
    """The mdoc source of one section (.Sh TITLE up to the next .Sh)."""
    match = re.search(rf"^\.Sh {re.escape(title)}\n(.*?)(?=^\.Sh |\Z)", source, re.M | re.S)
    assert match, f"no section {title} in the page"
    return match.group(1)


def item_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(".It ")]


def flag_in(flag: str, line: str) -> bool:
    """Whether mdoc line `line` has option `flag` as an Fl macro (-b: `Fl b`, --bind:
    `Fl -bind`, hyphens possibly escaped as \\-)."""
    spelled = re.escape(flag[1:]).replace(r"\-", r"\\?-")
    return re.search(rf"\bFl {spelled}(?= |$)", line) is not None


def plain(rendered: str) -> str:
    """mandoc's terminal output without the backspace overstrikes of bold and underline."""
    return re.sub(r".\x08", "", rendered)


def mandoc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mandoc", *args], capture_output=True, text=True, timeout=60)


# (a) the checked-in pages are what the generator renders from the table now


@pytest.mark.parametrize("name", manpage.PAGES)
def test_checked_in_page_equals_generator_output(name):
    current = page_source("checked-in", name)
    fresh = manpage.render()[name]
    if current != fresh:
        diff = "".join(difflib.unified_diff(
            current.splitlines(keepends=True), fresh.splitlines(keepends=True),
            f"man/{name} (checked in)", f"man/{name} (rendered now)", n=1))
        pytest.fail(f"man/{name} is out of date with forkserve/settings.py: {REGENERATE}\n"
                    + diff[:4000])


def test_rendering_twice_gives_identical_ascii_text():
    first, second = manpage.render(), manpage.render()
    assert first == second
    for name, text in first.items():
        assert text.isascii(), f"{name} has non-ASCII characters"
        assert text.endswith("\n") and "\n\n" not in text, f"{name} has blank lines"
        assert not re.search(r"[ \t]$", text, re.M), f"{name} has trailing whitespace"


def test_check_option_names_stale_pages_and_write_fixes_them(tmp_path):
    command = [sys.executable, "-m", "forkserve.manpage"]
    result = subprocess.run([*command, "--check", str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    for name in manpage.PAGES:
        assert name in result.stderr
    result = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    for name, text in manpage.render().items():
        assert (tmp_path / name).read_text(encoding="utf-8") == text
    (tmp_path / "forkserve.toml.5").write_text("stale\n")
    result = subprocess.run([*command, "--check", str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "forkserve.toml.5" in result.stderr and "forkserve.1" not in result.stderr
    assert (tmp_path / "forkserve.toml.5").read_text() == "stale\n"  # --check writes nothing


# (b) every setting is documented, whatever the generator's state: checked against both the
# checked-in pages and a fresh rendering, so dropping a setting from the generated sections
# fails here even after regenerating


@pytest.mark.parametrize("which", ["rendered", "checked-in"])
def test_every_setting_has_an_option_entry_in_forkserve_1(which):
    items = item_lines(section(page_source(which, "forkserve.1"), "OPTIONS"))
    missing = [
        f"{setting.name} ({', '.join(setting.flags)})" for setting in SETTINGS
        if not any(all(flag_in(flag, line) for flag in setting.flags) for line in items)
    ]
    assert not missing, f"settings without an entry in OPTIONS of forkserve.1: {missing}"


@pytest.mark.parametrize("which", ["rendered", "checked-in"])
def test_every_command_line_option_is_in_forkserve_1(which):
    items = item_lines(section(page_source(which, "forkserve.1"), "OPTIONS"))
    spellings = [flag for action in build_parser()._actions for flag in action.option_strings]
    assert "--bind" in spellings and "--version" in spellings
    missing = [flag for flag in spellings if not any(flag_in(flag, line) for line in items)]
    assert not missing, f"options missing from OPTIONS of forkserve.1: {missing}"


@pytest.mark.parametrize("which", ["rendered", "checked-in"])
def test_every_environment_variable_is_in_forkserve_1(which):
    source = page_source(which, "forkserve.1")
    environment = item_lines(section(source, "ENVIRONMENT"))
    options = section(source, "OPTIONS")
    for setting in SETTINGS:
        assert f".It Ev {setting.env}" in environment, f"{setting.env} not in ENVIRONMENT"
        assert f".Ev {setting.env} " in options, f"{setting.env} not in OPTIONS"
    for variable in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID",
                     "LISTEN_FDNAMES"):
        assert any(variable in line for line in environment), variable


@pytest.mark.parametrize("which", ["rendered", "checked-in"])
def test_every_setting_and_hook_is_a_key_in_forkserve_toml_5(which):
    source = page_source(which, "forkserve.toml.5")
    keys = [line.split()[2] for line in item_lines(section(source, "KEYS"))]
    missing = [setting.name for setting in SETTINGS if setting.name not in keys]
    assert not missing, f"settings missing from KEYS of forkserve.toml.5: {missing}"
    hooks = item_lines(section(source, "PYTHON CONFIGURATION FILES"))
    assert [line.split()[2] for line in hooks] == list(HOOKS)


def test_forkserve_1_has_the_hand_written_sections():
    source = manpage.render_forkserve_1()
    titles = re.findall(r"^\.Sh (.+)$", source, re.M)
    assert titles == ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SIGNALS", "CONTROL",
                      "ENVIRONMENT", "FILES", "EXIT STATUS", "EXAMPLES", "SEE ALSO"]
    signals = section(source, "SIGNALS")
    for name in ("TERM", "INT", "QUIT", "HUP", "TTIN", "TTOU", "USR1", "USR2", "WINCH"):
        assert f"SIG{name}" in signals, name
    control = section(source, "CONTROL")
    for command in ctl.COMMANDS:
        assert f".Cm {command}" in control, command
    statuses = [line.split()[1] for line in item_lines(section(source, "EXIT STATUS"))]
    assert statuses == ["0", "1", "2", "3"]
    see_also = section(source, "SEE ALSO")
    for page in ("forkserve.toml 5", "systemd.service 5", "systemd.socket 5", "nginx 8"):
        assert f".Xr {page}" in see_also, page


def test_defaults_are_rendered_readably():
    by_name = {setting.name: setting for setting in SETTINGS}
    assert manpage.default_text(by_name["umask"]) == "022"
    assert manpage.default_text(by_name["ws_max_size"]) == "16777216"
    assert manpage.default_text(by_name["timeout"]) == "30"
    assert manpage.default_text(by_name["bind"]) == "127.0.0.1:8000"
    assert manpage.default_text(by_name["pidfile"]) is None
    assert manpage.default_text(by_name["preload"]) is None
    assert manpage.toml_value(by_name["bind"], ["a", "b"]) == '["a", "b"]'
    assert manpage.toml_value(by_name["preload"], False) == "false"


def test_text_from_the_table_is_escaped_for_mdoc():
    lines = manpage.text_lines(r"Use C:\dir or '-' with --bind. 'auto' picks. .hidden too.")
    assert lines == [r"Use C:\edir or '\-' with \-\-bind.", r"\&'auto' picks.",
                     r"\&.hidden too."]
    assert manpage.arg('say "hi"', literal=True) == r'"say \(dqhi\(dq"'
    assert manpage.arg("Fl") == '"Fl"'
    assert manpage.arg(",") == '","'


# (c) mandoc's linter finds nothing at warning level


@needs_mandoc
@pytest.mark.parametrize("name", manpage.PAGES)
def test_mandoc_lint_reports_no_warnings(name):
    result = mandoc("-Tlint", "-Wwarning", str(MAN / name))
    assert result.returncode == 0 and not result.stdout and not result.stderr, (
        f"mandoc -Tlint -Wwarning man/{name}:\n{result.stdout}{result.stderr}")


# (d) the pages render, with their sections


@needs_mandoc
def test_forkserve_1_renders_with_signals_and_exit_status():
    result = mandoc("-Tutf8", str(MAN / "forkserve.1"))
    assert result.returncode == 0, result.stderr
    text = plain(result.stdout)
    for heading in ("NAME", "SYNOPSIS", "OPTIONS", "SIGNALS", "EXIT STATUS", "ENVIRONMENT",
                    "FILES", "EXAMPLES", "SEE ALSO"):
        assert re.search(rf"^{heading}$", text, re.M), heading
    assert "-b ADDRESS, --bind ADDRESS" in text  # options render with ASCII hyphens
    assert "FORKSERVE_MAX_REQUESTS" in text


@needs_mandoc
def test_forkserve_toml_5_renders_with_keys_and_hooks():
    result = mandoc("-Tutf8", str(MAN / "forkserve.toml.5"))
    assert result.returncode == 0, result.stderr
    text = plain(result.stdout)
    assert re.search(r"^KEYS$", text, re.M)
    assert "max_requests (integer)" in text
    assert "post_fork(server, worker)" in text


@needs_man
def test_man_renders_forkserve_1():
    env = {**os.environ, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "80"}
    result = subprocess.run(["man", "-l", str(MAN / "forkserve.1")], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    text = plain(result.stdout)
    assert "SIGNALS" in text and "EXIT STATUS" in text
