"""`forkserve ctl`: ask a running server through its control socket (see forkserve.control).

    forkserve ctl [--socket PATH] [-c FILE] [--json] COMMAND [ARGUMENT]

The socket is --socket, else the server's own setting (FORKSERVE_CONTROL_SOCKET, or the
config file: -c, FORKSERVE_CONFIG, ./forkserve.toml, [tool.forkserve] in ./pyproject.toml),
else the default path. Exit status: 0 when the server did it, 1 when it answered an error or
cannot be reached, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

from forkserve.config import parse_args
from forkserve.control import ControlError, default_path, request
from forkserve.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, ConfigError

# Command: (what it does, its argument's name or None).
COMMANDS = {
    "status": ("the master and one row a worker", None),
    "stats": ("requests by status, their durations, refusals, connections", None),
    "reload": ("what HUP does: new workers with the app's code anew, then the old ones stop",
               None),
    "scale": ("run N workers", "N"),
    "incr": ("one worker more (TTIN)", None),
    "decr": ("one worker fewer (TTOU)", None),
    "reopen-logs": ("reopen the log files (USR1)", None),
    "stop": ("stop, 'graceful' (TERM, the default) or 'quick' (QUIT)", "MODE"),
    "dump": ("every worker's tracebacks to the error log, nothing stopped", None),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="forkserve ctl", description="Ask a running forkserve server.",
                     epilog="commands: " + "; ".join(
                         f"{name}{' ' + arg if arg else ''}: {text}"
                         for name, (text, arg) in COMMANDS.items()))
    parser.add_argument("--socket", metavar="PATH", help="the server's control socket")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="the server's config file, to find its control socket")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    parser.add_argument("argument", nargs="?", metavar="ARGUMENT")
    return parser


def main(argv: list[str]) -> int:
    """Run `forkserve ctl` with `argv`; return the exit status."""
    try:
        args = _parser().parse_args(argv)
        message = _message(args.command, args.argument)
        path = args.socket or _configured_socket(args.config)
    except ConfigError as exc:
        print(f"forkserve ctl: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        answer = request(path, message)
    except (OSError, ControlError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        print(f"forkserve ctl: cannot talk to {path}: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(answer, indent=2))
    elif answer.get("ok"):
        print(_describe(args.command, answer))
    if not answer.get("ok"):
        if not args.json:
            print(f"forkserve ctl: {answer.get('error')}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _message(command: str, argument: str | None) -> dict[str, Any]:
    takes = COMMANDS[command][1]
    if argument is not None and takes is None:
        raise ConfigError(f"{command} takes no argument")
    if command == "scale":
        if argument is None or not argument.isdigit():
            raise ConfigError("scale: expected the number of workers, e.g. scale 4")
        return {"command": command, "workers": int(argument)}
    if command == "stop":
        return {"command": command, "mode": argument or "graceful"}
    return {"command": command}


def _configured_socket(config: str | None) -> str:
    cfg = parse_args(["-c", config] if config else [])
    setting = cfg.control_socket
    return default_path() if setting in (None, "auto") else setting


def _describe(command: str, answer: dict[str, Any]) -> str:
    if command == "status":
        return _status_table(answer)
    if command == "stats":
        return _stats_text(answer)
    if command == "scale":
        return f"now {answer['workers']} workers"
    if command == "stop":
        return f"stopping ({answer['stopping']})"
    if command == "dump":
        return f"the tracebacks of {len(answer['workers'])} workers go to the error log"
    return f"{command}: done ({answer['signal']})"


def _status_table(answer: dict[str, Any]) -> str:
    master = answer["master"]
    lines = [
        f"forkserve {master['version']}  master {master['pid']}  {master['state']}  "
        f"up {_duration(master['uptime'])}  {master['workers']} workers of {master['app']}",
        "listening at " + ", ".join(master["binds"]),
    ]
    rows = [("#", "pid", "state", "age", "served", "in flight", "connections", "heartbeat",
             "RSS MiB", "PSS MiB")]
    for worker in answer["workers"]:
        rows.append((str(worker["number"]), str(worker["pid"]), worker["state"],
                     _duration(worker["age"]), str(worker["served"]),
                     str(worker["in_flight"]), str(worker["connections"]),
                     f"{worker['heartbeat_age']:.1f} s ago", _mib(worker["rss_kib"]),
                     _mib(worker["pss_kib"])))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        cells = zip(row, widths, strict=True)
        lines.append("  ".join(cell.rjust(width) if cell[:1].isdigit() or column < 2
                               else cell.ljust(width)
                               for column, (cell, width) in enumerate(cells)).rstrip())
    return "\n".join(lines)


def _stats_text(answer: dict[str, Any]) -> str:
    def counts(values: dict[str, int]) -> str:
        return ", ".join(f"{key} {value}" for key, value in sorted(values.items())) or "none"

    durations = answer["duration_seconds"]
    total = answer["requests"]
    mean = f", mean {durations['sum'] / total * 1000:.1f} ms" if total else ""
    return "\n".join([
        f"requests answered: {total} ({counts(answer['by_status'])}){mean}",
        "within (s): " + ", ".join(f"{bound} {count}"
                                   for bound, count in durations["buckets"].items()),
        f"refused before the app: {counts(answer['refused'])}",
        f"connections accepted: {answer['connections_accepted']}",
    ])


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"
