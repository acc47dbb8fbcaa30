"""Logging configured like the app's: --log-config (JSON, TOML, INI), logconfig_dict, JSON
access and error logs, USR1 with a logging configuration, log files after --user."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from datetime import datetime
from pathlib import Path

import pytest
from conftest import APPS, Server, exchange, forkserve_command, wait_in_file

HELLO = (b"GET /hello?x=1 HTTP/1.1\r\nHost: t\r\nReferer: http://example.test/from\r\n"
         b"User-Agent: probe/1.0\r\nX-Request-ID: req-7\r\n\r\n")
FAIL = b"GET /fail HTTP/1.1\r\nHost: t\r\n\r\n"
READY_TEXT = re.compile(r"ready: \d+ workers")
LISTENING = re.compile(r"listening at http://127\.0\.0\.1:(\d+)")

# Access lines as they are (JSON from --access-log-format json) to one file, the error log
# as JSON objects (forkserve.logs.JSONFormatter) to another, in each format a file may have.
DICT_CONFIG = {
    "version": 1,
    "formatters": {"plain": {"format": "%(message)s"},
                   "json": {"()": "forkserve.logs.JSONFormatter"}},
    "handlers": {
        "access": {"class": "logging.FileHandler", "filename": "{access}",
                   "formatter": "plain"},
        "errors": {"class": "logging.FileHandler", "filename": "{errors}",
                   "formatter": "json"},
    },
    "loggers": {
        "forkserve.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        "forkserve.error": {"handlers": ["errors"], "level": "INFO", "propagate": False},
    },
}
TOML_CONFIG = """\
version = 1
[formatters.plain]
format = "%(message)s"
[formatters.json]
"()" = "forkserve.logs.JSONFormatter"
[handlers.access]
class = "logging.FileHandler"
filename = "{access}"
formatter = "plain"
[handlers.errors]
class = "logging.FileHandler"
filename = "{errors}"
formatter = "json"
[loggers."forkserve.access"]
handlers = ["access"]
level = "INFO"
propagate = false
[loggers."forkserve.error"]
handlers = ["errors"]
level = "INFO"
propagate = false
"""
INI_CONFIG = """\
[loggers]
keys = root, access, errors

[handlers]
keys = access, errors

[formatters]
keys = plain, json

[logger_root]
level = WARNING
handlers =

[logger_access]
qualname = forkserve.access
level = INFO
handlers = access
propagate = 0

[logger_errors]
qualname = forkserve.error
level = INFO
handlers = errors
propagate = 0

[handler_access]
class = FileHandler
args = ('{access}',)
formatter = plain

[handler_errors]
class = FileHandler
args = ('{errors}',)
formatter = json

[formatter_plain]
format = %(message)s

[formatter_json]
class = forkserve.logs.JSONFormatter
"""


def _write_config(folder: Path, kind: str, access: Path, errors: Path) -> Path:
    path = folder / f"logging.{kind}"
    if kind == "json":
        text = json.dumps(DICT_CONFIG).replace("{access}", str(access)).replace(
            "{errors}", str(errors))
    else:
        text = (TOML_CONFIG if kind == "toml" else INI_CONFIG).format(access=access,
                                                                      errors=errors)
    path.write_text(text)
    return path


def _start_logging_to(errors: Path, start_server, *args: str, **kwargs) -> Server:
    """A server whose error log goes to the file `errors`: ready once that file says so."""
    server = start_server(*args, ready=False, **kwargs)
    wait_in_file(errors, READY_TEXT)
    server.port = int(LISTENING.search(errors.read_text())[1])
    return server


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_hello_line(entry: dict) -> None:
    assert entry["remote_addr"] == "127.0.0.1"
    assert (entry["method"], entry["path"], entry["query"]) == ("GET", "/hello", "x=1")
    assert (entry["protocol"], entry["status"], entry["bytes"]) == ("HTTP/1.1", 200, 13)
    assert entry["referer"] == "http://example.test/from"
    assert entry["user_agent"] == "probe/1.0"
    assert entry["request_id"] == "req-7"
    assert isinstance(entry["duration_us"], int) and 0 <= entry["duration_us"] < 10_000_000
    when = datetime.fromisoformat(entry["time"])
    assert when.utcoffset() is not None  # RFC 3339: with its offset
    assert abs(when.timestamp() - datetime.now().timestamp()) < 60


@pytest.mark.parametrize("kind", ["json", "toml", "ini"])
def test_a_log_config_sends_json_access_lines_to_one_file_and_errors_to_another(
        start_server, tmp_path, kind):
    access, errors = tmp_path / "access.log", tmp_path / "error.log"
    config = _write_config(tmp_path, kind, access, errors)
    server = _start_logging_to(errors, start_server, "wsgiapp:app", "-w", "2",
                               "--log-config", str(config), "--access-log-format", "json")
    assert exchange(server, HELLO).status == 200
    assert exchange(server, FAIL).status == 500
    wait_in_file(access, re.compile(r'"status": 500'))
    wait_in_file(errors, re.compile(r"RuntimeError: deliberate failure"))
    hello, failed = _json_lines(access)
    _check_hello_line(hello)
    assert (failed["path"], failed["status"], failed["request_id"]) == ("/fail", 500, None)
    records = _json_lines(errors)  # every line is one JSON object, tracebacks included
    workers = set(server.workers())
    assert any(record["pid"] == server.pid for record in records)
    failure = next(record for record in records if "traceback" in record)
    assert failure["level"] == "ERROR" and failure["logger"] == "forkserve.error"
    assert failure["pid"] in workers and failure["message"].startswith("error handling GET")
    assert "RuntimeError: deliberate failure" in failure["traceback"].splitlines()[-1]
    assert "/hello" not in errors.read_text()
    assert "ready:" not in server.log and "/hello" not in server.log  # nothing on stdout


def test_usr1_reopens_the_files_of_a_log_config(start_server, tmp_path):
    access, errors = tmp_path / "access.log", tmp_path / "error.log"
    config = tmp_path / "logging.json"
    config.write_text(json.dumps({  # the error log through the root logger's handler
        "version": 1,
        "formatters": {"json": {"()": "forkserve.logs.JSONFormatter"}},
        "handlers": {
            "access": {"class": "logging.FileHandler", "filename": str(access)},
            "errors": {"class": "logging.FileHandler", "filename": str(errors),
                       "formatter": "json"}},
        "loggers": {"forkserve.access": {"handlers": ["access"], "propagate": False}},
        "root": {"handlers": ["errors"], "level": "INFO"}}))
    server = _start_logging_to(errors, start_server, "wsgiapp:app", "-w", "2",
                               "--log-config", str(config))
    workers = server.workers()
    access.rename(tmp_path / "access.log.1")  # what logrotate does
    errors.rename(tmp_path / "error.log.1")
    os.kill(server.pid, signal.SIGUSR1)
    wait_in_file(errors, re.compile("SIGUSR1: log files reopened"))
    for pid in workers:
        wait_in_file(errors, re.compile(rf'"pid": {pid}, .*reopened its log files'))
    assert exchange(server, HELLO).status == 200
    assert exchange(server, FAIL).status == 500
    wait_in_file(access, re.compile(r'"GET /fail HTTP/1\.1" 500'))
    wait_in_file(errors, re.compile("RuntimeError: deliberate failure"))
    assert "/hello" not in (tmp_path / "access.log.1").read_text()
    assert "deliberate failure" not in (tmp_path / "error.log.1").read_text()


@pytest.mark.parametrize("kind", ["py", "toml"])
def test_a_config_file_may_hold_the_logging_configuration(start_server, tmp_path, kind):
    access, errors = tmp_path / "access.log", tmp_path / "error.log"
    config = json.loads(json.dumps(DICT_CONFIG).replace("{access}", str(access)).replace(
        "{errors}", str(errors)))
    path = tmp_path / f"forkserve.{kind}"
    if kind == "py":
        path.write_text(f"workers = 1\nlogconfig_dict = {config!r}\n")
    else:
        toml = TOML_CONFIG.format(access=access, errors=errors)
        path.write_text("workers = 1\n[logconfig_dict]\n"
                        + re.sub(r"^\[", "[logconfig_dict.", toml, flags=re.MULTILINE))
    server = _start_logging_to(errors, start_server, "wsgiapp:app", "-c", str(path))
    assert exchange(server, HELLO).status == 200
    wait_in_file(access, re.compile(r'"GET /hello\?x=1 HTTP/1\.1" 200'))
    assert len(server.workers()) == 1


def test_log_format_json_writes_the_error_log_as_json_objects(start_server):
    server = start_server("wsgiapp:app", "-w", "1", "--log-format", "json", ready=False)
    server.wait_for(r'"message": "ready: 1 workers')
    server.port = int(server.wait_for(LISTENING)[1])
    assert exchange(server, FAIL).status == 500
    server.wait_for(r'"traceback": "Traceback .*RuntimeError: deliberate failure')
    records = [json.loads(line) for line in server.log.splitlines()]
    assert {record["logger"] for record in records} == {"forkserve.error"}
    assert any(record["level"] == "ERROR" and "traceback" in record for record in records)


def test_without_a_configuration_of_forkserve_access_no_access_line_is_written(start_server,
                                                                              tmp_path):
    errors = tmp_path / "error.log"
    config = tmp_path / "logging.json"
    config.write_text(json.dumps({
        "version": 1,
        "handlers": {"errors": {"class": "logging.FileHandler", "filename": str(errors)}},
        "root": {"handlers": ["errors"], "level": "INFO"}}))
    server = _start_logging_to(errors, start_server, "wsgiapp:app", "-w", "1",
                               "--log-config", str(config))
    assert exchange(server, HELLO).status == 200
    assert exchange(server, FAIL).status == 500
    wait_in_file(errors, re.compile("RuntimeError: deliberate failure"))
    assert "/hello" not in errors.read_text()  # (the root logger would have taken it)


@pytest.mark.parametrize(("files", "args", "message"), [
    ({}, ["--log-config", "missing.json"], "argument --log-config: no such file: 'missing.json'"),
    ({"log.yaml": "version: 1"}, ["--log-config", "log.yaml"],
     "argument --log-config: expected a file ending in .json, .toml, .ini, .conf, .cfg, "
     "got 'log.yaml'"),
    ({"log.json": "[1, 2"}, ["--log-config", "log.json"],
     "--log-config {dir}/log.json: Expecting ',' delimiter: line 1 column 6 (char 5)"),
    ({"log.json": "[1, 2]"}, ["--log-config", "log.json"],
     "--log-config {dir}/log.json: expected a dictionary for logging.config.dictConfig"),
    ({"log.json": '{"version": 1, "handlers": {"h": {"class": "no.such.Handler"}}}'},
     ["--log-config", "log.json"],
     "--log-config {dir}/log.json: Unable to configure handler 'h': Cannot resolve "
     "'no.such.Handler': No module named 'no'"),
    ({"log.json": '{"version": 1, "handlers": {"h": {"class": "logging.FileHandler", '
                  '"filename": "/no/such/dir/x.log"}}}'}, ["--log-config", "log.json"],
     "--log-config {dir}/log.json: Unable to configure handler 'h': [Errno 2] No such file "
     "or directory: '/no/such/dir/x.log'"),
    ({"log.ini": "[loggers]\nkeys = root\n"}, ["--log-config", "log.ini"],
     "--log-config {dir}/log.ini: missing section or option 'formatters'"),
    ({"c.py": "logconfig_dict = ['version', 1]\n"}, ["-c", "c.py"],
     "config file c.py: logconfig_dict: expected a dictionary for logging.config.dictConfig, "
     "got list"),
    ({"c.py": "logconfig_dict = {'handlers': {}}\n"}, ["-c", "c.py"],
     'config file c.py: logconfig_dict: needs "version": 1 (logging.config.dictConfig\'s '
     "schema)"),
    ({"c.py": "logconfig_dict = {'version': 1}\n", "log.json": '{"version": 1}'},
     ["-c", "c.py", "--log-config", "log.json"],
     "--log-config and the config file's logconfig_dict both configure logging: keep one"),
    ({}, ["--log-format", "xml"], "argument --log-format: expected one of text, json, got 'xml'"),
])
def test_a_bad_logging_configuration_is_one_line_and_exit_2(tmp_path, files, args, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    result = subprocess.run(forkserve_command() + ["wsgiapp:app", "--chdir", str(APPS),
                                                   "-b", "127.0.0.1:0", *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    expected = "forkserve: error: " + message.format(dir=tmp_path) + "\n"
    assert result.stderr == expected


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_after_user_drops_root_usr1_still_reopens_the_log_files(start_server, public_apps):
    nobody = pwd.getpwnam("nobody")
    folder = Path(tempfile.mkdtemp(prefix="forkserve-logs-", dir="/tmp"))
    try:
        folder.chmod(0o777)  # nobody may create the next file once the old one is moved
        errors, access = folder / "error.log", folder / "access.log"
        server = _start_logging_to(errors, start_server, "importmark:app", "-w", "2",
                                   "--user", "nobody", "--error-logfile", str(errors),
                                   "--access-logfile", str(access), cwd=public_apps)
        for path in (errors, access):
            assert os.stat(path).st_uid == nobody.pw_uid  # created as root, handed over
        os.kill(server.pid, signal.SIGUSR1)  # reopening the same files
        wait_in_file(errors, re.compile("SIGUSR1: log files reopened"))
        errors.rename(folder / "error.log.1")
        access.rename(folder / "access.log.1")
        os.kill(server.pid, signal.SIGUSR1)  # creating new ones
        wait_in_file(errors, re.compile("SIGUSR1: log files reopened"))
        for number in (1, 2):
            wait_in_file(errors, re.compile(rf"worker {number} reopened its log files"))
        assert exchange(server, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").status == 200
        wait_in_file(access, re.compile(r'"GET / HTTP/1\.1" 200'))
        assert os.stat(errors).st_uid == nobody.pw_uid
        assert "cannot reopen" not in (folder / "error.log.1").read_text()
    finally:
        shutil.rmtree(folder)


def test_a_hup_with_a_broken_log_config_keeps_the_logging_and_the_workers(start_server,
                                                                          tmp_path):
    access, errors = tmp_path / "access.log", tmp_path / "error.log"
    config = _write_config(tmp_path, "json", access, errors)
    server = _start_logging_to(errors, start_server, "wsgiapp:app", "-w", "2",
                               "--log-config", str(config))
    workers = sorted(server.workers())
    config.write_text('{"version": 1, "handlers": {"h": {"class": "no.such.Handler"}}}')
    os.kill(server.pid, signal.SIGHUP)
    wait_in_file(errors, re.compile(r"HUP: configuration not reloaded: --log-config .*"
                                    r"Cannot resolve 'no\.such\.Handler'"))
    assert exchange(server, FAIL).status == 500  # still logged where it was
    wait_in_file(errors, re.compile("RuntimeError: deliberate failure"))
    wait_in_file(access, re.compile(r'"GET /fail HTTP/1\.1" 500'))
    assert sorted(server.workers()) == workers
