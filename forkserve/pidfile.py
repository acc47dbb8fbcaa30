"""The `--pid` file: written after bind, renamed to FILE.oldbin during a USR2 upgrade,
removed at exit by the master whose pid it holds (and by no other)."""

from __future__ import annotations

import os

from forkserve.errors import ConfigError


class Pidfile:
    """The pid file of this master."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.current = self.path  # where our pid is now: path, or path.oldbin

    @property
    def oldbin(self) -> str:
        return self.path + ".oldbin"

    def write(self) -> None:
        """Write our pid atomically. A file naming another live process is refused."""
        other = _read_pid(self.path)
        if other and other != os.getpid() and process_alive(other):
            raise ConfigError(f"pid file {self.path} names running process {other}")
        directory = os.path.dirname(self.path)
        temporary = os.path.join(directory, f".{os.path.basename(self.path)}.{os.getpid()}")
        try:
            with open(temporary, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(temporary, self.path)
        except OSError as exc:
            raise ConfigError(f"cannot write pid file {self.path}: {exc.strerror}") from None
        self.current = self.path

    def rename_to_oldbin(self) -> None:
        """USR2: make room for the new master's pid file."""
        if _read_pid(self.path) == os.getpid():
            os.replace(self.path, self.oldbin)
            self.current = self.oldbin

    def restore_from_oldbin(self) -> None:
        """The new master died: take the name back if nobody else did."""
        if self.current == self.oldbin and not os.path.exists(self.path):
            os.replace(self.oldbin, self.path)
            self.current = self.path

    def remove(self) -> None:
        """Remove the file if it still holds our pid."""
        if _read_pid(self.current) == os.getpid():
            try:
                os.unlink(self.current)
            except OSError:
                pass  # gone already, or not ours to remove after dropping privileges


def _read_pid(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def process_alive(pid: int) -> bool:
    """Does process `pid` exist (a zombie counts)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
