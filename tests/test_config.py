"""One settings table: every setting through every layer, precedence, config files, errors."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import APPS, forkserve_command

from forkserve.config import parse_args
from forkserve.errors import ConfigError
from forkserve.settings import SETTINGS

# (checked to exist and to end in a logging configuration's suffix; not read while parsing)
LOG_CONFIG = Path(__file__).resolve().parents[1] / "pyproject.toml"

# A valid non-default value for every setting, as command-line text and as a config-file
# value. A setting added to the table without a sample here fails test_every_setting_*.
SAMPLES: dict[str, tuple[str, object]] = {
    "bind": ("unix:/tmp/sample.sock", ["unix:/tmp/sample.sock"]),
    "backlog": ("64", 64),
    "workers": ("3", 3),
    "threads": ("4", 4),
    "worker_connections": ("50", 50),
    "timeout": ("12.5", 12.5),
    "graceful_timeout": ("7", 7),
    "drain_delay": ("5", 5),
    "keep_alive": ("9", 9),
    "boot_timeout": ("45", 45),
    "header_timeout": ("3", 3),
    "max_requests": ("1000", 1000),
    "max_requests_jitter": ("50", 50),
    "max_worker_memory": ("512", 512),
    "pidfile": ("/tmp/sample.pid", "/tmp/sample.pid"),
    "limit_request_line": ("4094", 4094),
    "limit_request_fields": ("50", 50),
    "limit_request_field_size": ("4096", 4096),
    "preload": ("true", True),
    "worker_class": ("asgi", "asgi"),
    "interface": ("asgi2", "asgi2"),
    "loop": ("asyncio", "asyncio"),
    "http": ("h11", "h11"),
    "lifespan": ("off", "off"),
    "root_path": ("/api", "/api"),
    "forwarded_allow_ips": ("10.0.0.0/8,unix", "10.0.0.0/8,unix"),
    "limit_request_body": ("1000", 1000),
    "server_header": ("", ""),
    "ws_max_size": ("1024", 1024),
    "ws_ping_interval": ("5", 5),
    "ws_ping_timeout": ("6", 6),
    "user": ("nobody", "nobody"),
    "group": ("nogroup", "nogroup"),
    "umask": ("027", 0o027),
    "proxy_protocol": ("true", True),
    "certfile": ("/etc/ssl/site.pem", "/etc/ssl/site.pem"),
    "keyfile": ("/etc/ssl/site.key", "/etc/ssl/site.key"),
    "ca_certs": ("/etc/ssl/clients-ca.pem", "/etc/ssl/clients-ca.pem"),
    "client_cert": ("required", "required"),
    "ciphers": ("ECDHE+AESGCM", "ECDHE+AESGCM"),
    "tls_min_version": ("1.3", "1.3"),
    "allow_root": ("true", True),
    "chdir": ("/tmp", "/tmp"),
    "log_level": ("debug", "debug"),
    "error_logfile": ("/tmp/sample-error.log", "/tmp/sample-error.log"),
    "access_logfile": ("-", "-"),
    "access_log_format": ("%(h)s %(s)s", "%(h)s %(s)s"),
    "log_config": (str(LOG_CONFIG), str(LOG_CONFIG)),
    "log_format": ("json", "json"),
    "health_path": ("/healthz", "/healthz"),
    "control_socket": ("/run/app/control.sock", "/run/app/control.sock"),
    "metrics_bind": ("127.0.0.1:9464", "127.0.0.1:9464"),
    "statsd_host": ("127.0.0.1:8125", "127.0.0.1:8125"),
    "statsd_prefix": ("web", "web"),
    "reload": ("true", True),
    "reload_dirs": ("/tmp", ["/tmp"]),
    "reload_include": ("*.html", ["*.html"]),
    "reload_exclude": ("build", ["build"]),
}


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\") + '"'
    return repr(value)


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
def test_every_setting_works_in_every_layer(setting, tmp_path):
    assert setting.name in SAMPLES, f"add a sample value for {setting.name} to SAMPLES"
    text, value = SAMPLES[setting.name]
    argv = [setting.flags[-1]] if setting.flag else [setting.flags[-1], text]
    from_argv = getattr(parse_args(argv, environ={}), setting.name)
    from_env = getattr(parse_args([], environ={setting.env: text}), setting.name)
    config = tmp_path / "forkserve.toml"
    config.write_text(f"{setting.name} = {toml_value(value)}\n")
    from_file = getattr(parse_args(["-c", str(config)], environ={}), setting.name)
    assert from_argv == from_env == from_file
    assert from_argv != setting.default


def test_precedence_command_line_over_environment_over_file(tmp_path):
    config = tmp_path / "forkserve.toml"
    config.write_text('timeout = 11\nkeep_alive = 12\nbacklog = 13\napp = "filemod:app"\n')
    cfg = parse_args(["-c", str(config), "--timeout", "21"],
                     environ={"FORKSERVE_TIMEOUT": "31", "FORKSERVE_KEEP_ALIVE": "32"})
    assert (cfg.timeout, cfg.keep_alive, cfg.backlog, cfg.app) == (21, 32, 13, "filemod:app")
    assert cfg.sources["timeout"] == "command line"
    assert cfg.sources["keep_alive"] == "environment FORKSERVE_KEEP_ALIVE"
    assert cfg.sources["backlog"] == f"config file {config}"
    assert "graceful_timeout" not in cfg.sources  # a default


def test_forkserve_toml_is_found_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "forkserve.toml").write_text("backlog = 77\n")
    monkeypatch.chdir(tmp_path)
    assert parse_args([], environ={}).backlog == 77


def test_pyproject_tool_forkserve_is_found(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.forkserve]\n'
                                             'workers = 5\nbind = ["127.0.0.1:9999"]\n')
    monkeypatch.chdir(tmp_path)
    cfg = parse_args([], environ={})
    assert (cfg.workers, cfg.bind) == (5, ["127.0.0.1:9999"])
    assert cfg.sources["workers"].endswith("pyproject.toml")


def test_list_settings_from_the_environment_are_comma_separated():
    cfg = parse_args([], environ={"FORKSERVE_BIND": "127.0.0.1:1, unix:/tmp/a.sock"})
    assert cfg.bind == ["127.0.0.1:1", "unix:/tmp/a.sock"]


@pytest.mark.parametrize(("text", "message"), [
    ("workers = 'lots'\n", "workers: expected 'auto' or a whole number"),
    ("threads = 0\n", "threads: expected 'auto' or a whole number >= 1"),
    ("timeout = true\n", "timeout: expected a string or number, got True"),
    ("bogus = 1\n", "unknown setting 'bogus'"),
    ("preload = 1\n", "preload: expected True or False"),
    ("timeout = \n", "Invalid value"),
])
def test_bad_toml_is_one_line_naming_file_and_key(tmp_path, text, message):
    config = tmp_path / "forkserve.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_args(["-c", str(config)], environ={})
    assert str(info.value).startswith(f"config file {config}")
    assert message in str(info.value)


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="environment variable FORKSERVE_BACKLOG: must be at "
                                          "least 1, got 0"):
        parse_args([], environ={"FORKSERVE_BACKLOG": "0"})


def test_check_config_prints_values_and_sources(tmp_path):
    config = tmp_path / "forkserve.toml"
    config.write_text("backlog = 99\n")
    result = subprocess.run(
        forkserve_command() + ["--check-config", "-c", str(config), "--timeout", "5",
                               "wsgiapp:app"],
        cwd=APPS, capture_output=True, text=True, timeout=30,
        env={"FORKSERVE_KEEP_ALIVE": "8", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("backlog = 99 ") and f"# config file {config}" in line
               for line in lines)
    assert any(line.startswith("keep_alive = 8.0 ") and "FORKSERVE_KEEP_ALIVE" in line
               for line in lines)
    assert any(line.startswith("timeout = 5.0 ") and "# command line" in line for line in lines)
    for setting in SETTINGS:
        assert any(setting.name in line for line in lines), setting.name


def test_check_config_refuses_what_would_not_start():
    result = subprocess.run(forkserve_command() + ["--check-config", "nope_module:app"],
                            cwd=APPS, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "no module named 'nope_module'" in result.stderr


def test_empty_environment_variables_count_as_unset(tmp_path):
    # What compose files and shell templates write for unset values.
    empty = {"FORKSERVE_WORKERS": "", "FORKSERVE_TIMEOUT": " ", "FORKSERVE_BIND": "",
             "FORKSERVE_APP": "", "FORKSERVE_CONFIG": "", "FORKSERVE_LOG_LEVEL": ""}
    defaults = parse_args([], environ={})
    cfg = parse_args([], environ=empty)
    assert (cfg.workers, cfg.timeout, cfg.bind, cfg.app, cfg.log_level) == (
        defaults.workers, defaults.timeout, defaults.bind, defaults.app, defaults.log_level)
    result = subprocess.run(forkserve_command() + ["--check-config"], cwd=tmp_path,
                            env=dict(os.environ, **empty), capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr


def test_help_says_it_serves_wsgi_and_asgi():
    result = subprocess.run(forkserve_command() + ["--help"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0
    assert "Serve a WSGI or ASGI app" in result.stdout
