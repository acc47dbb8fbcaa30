"""systemd integration without libsystemd: sd_notify, the watchdog, socket activation.

- `Notifier` sends sd_notify(3) datagrams to $NOTIFY_SOCKET (a path, or an abstract socket
  when it starts with "@"): READY=1, RELOADING=1 with MONOTONIC_USEC (Type=notify-reload),
  STOPPING=1, STATUS=..., MAINPID=..., and WATCHDOG=1 when $WATCHDOG_USEC asks for it.
- `listen_fds()` takes the sockets passed by socket activation ($LISTEN_FDS from fd 3, for
  $LISTEN_PID, named by $LISTEN_FDNAMES) and clears those variables, so that workers and a
  re-executed master do not misread them.
- `Notifier.store_fds` hands listening sockets to the service's file descriptor store
  (FDSTORE=1, FileDescriptorStoreMax=): systemd keeps them open across a restart and passes
  them back with $LISTEN_FDS, named FDSTORE_PREFIX and the --bind index, so that a restart
  without a .socket unit refuses no connection.
- `Reporter` is what the master tells systemd as it runs: READY=1 again once a reload is
  complete, STATUS= when it changed, and the watchdog ping while the workers are heard from.
"""

from __future__ import annotations

import array
import os
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forkserve.sockets import Listener
    from forkserve.workerset import WorkerSet

SD_LISTEN_FDS_START = 3
FDSTORE_PREFIX = "forkserve-bind-"  # FDNAME= of the --bind socket at this index
# How often systemd gets a STATUS= line (when it changed).
STATUS_INTERVAL = 5.0
# With --timeout 0, workers silent this long stop the watchdog pings.
WATCHDOG_STALE = 10.0


class Notifier:
    """sd_notify for this process, or a no-op when not started by systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address
        self._sock: socket.socket | None = None
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        usec = environ.get("WATCHDOG_USEC", "")
        ours = not watchdog_pid or watchdog_pid == str(os.getpid())
        # Ping at half the interval, as sd_watchdog_enabled(3) recommends.
        self.watchdog_interval = int(usec) / 2_000_000 if usec.isdigit() and ours else 0.0
        # systemd 254 and later say FDSTORE=N when the unit has FileDescriptorStoreMax=N.
        self.fdstore = environ.get("FDSTORE", "") != "0"

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, *fields: str) -> None:
        """Send one notification of `fields` (KEY=VALUE); errors are ignored, as sd_notify."""
        if not self._address:
            return
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError:
            pass

    def ready(self, status: str) -> None:
        self.send("READY=1", f"MAINPID={os.getpid()}", f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def remove_fds(self, names: list[str]) -> None:
        """Have systemd close the descriptors it stores under `names`."""
        for name in names:
            self.send("FDSTOREREMOVE=1", f"FDNAME={name}")

    def store_fds(self, named: list[tuple[int, str]]) -> None:
        """Hand each (fd, name) to the file descriptor store, in place of any stored under
        that name before (errors are ignored, as sd_notify's)."""
        if not self._address or not self.fdstore:
            return
        for fd, name in named:
            self.send("FDSTOREREMOVE=1", f"FDNAME={name}")
            try:
                self._sock.sendmsg([f"FDSTORE=1\nFDNAME={name}".encode()],  # type: ignore
                                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     array.array("i", [fd]))], 0, self._address)
            except OSError:
                pass

    def store_listeners(self, listeners: list[Listener]) -> None:
        """`store_fds` for the TCP listening sockets, named by their --bind index (a unix
        socket's path is removed at exit, so its descriptor would be of no use)."""
        self.store_fds([(listener.sock.fileno(), f"{FDSTORE_PREFIX}{index}")
                        for index, listener in enumerate(listeners)
                        if listener.address.kind == "tcp"])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Reporter:
    """The master's notifications while it runs, sent from its loop (`tick`)."""

    def __init__(self, notify: Notifier) -> None:
        self.notify = notify
        self.reloading = False  # READY=1 is due once the reload's new workers are up
        self.next_status = 0.0
        self.last_status = ""
        self.next_watchdog = 0.0

    def reload_started(self) -> None:
        self.reloading = True
        self.notify.reloading()

    def tick(self, now: float, workers: WorkerSet, size: int, timeout: float) -> None:
        """Notify what is due at `now` for a server of `size` workers silent up to
        `timeout` seconds (0: no limit). The end of a reload is noted without systemd too
        (`forkserve ctl status` says it)."""
        notify = self.notify
        if self.reloading and not workers.replacing() and workers.booted() >= size:
            self.reloading = False
            notify.ready(status_text(workers))
        if now >= self.next_status:
            self.next_status = now + STATUS_INTERVAL
            text = status_text(workers)
            if text != self.last_status:
                self.last_status = text
                notify.status(text)
        stale = timeout if timeout > 0 else WATCHDOG_STALE
        if notify.watchdog_interval and now >= self.next_watchdog \
                and workers.heard_from(now, stale):
            self.next_watchdog = now + notify.watchdog_interval
            notify.watchdog()


def status_text(workers: WorkerSet) -> str:
    """The STATUS= line: '2 workers, 1234 requests served'."""
    return f"{workers.booted()} workers, {workers.served()} requests served"


def listen_fds(environ: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """The (fd, name) of sockets passed by systemd to this process; the variables are
    removed from `environ` either way."""
    environ = os.environ if environ is None else environ
    pid = environ.pop("LISTEN_PID", "")
    count = environ.pop("LISTEN_FDS", "")
    names = environ.pop("LISTEN_FDNAMES", "")
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count))
    labels = names.split(":") if names else []
    return [(fd, labels[i] if i < len(labels) else "") for i, fd in enumerate(fds)]
