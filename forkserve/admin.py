"""The master's admin endpoints: the control socket, the metrics endpoint, the statsd push.

Each is optional (--control-socket, --metrics-bind, --statsd-host) and runs in the master's
loop: the servers' sockets are in its selector (`forkserve.endpoints`), and each says how
long the loop may wait (`timeout`). What they answer comes from the master (the control
socket's handler, the metrics text); opening them turns every failure into a ConfigError.
"""

from __future__ import annotations

import selectors
import time
from collections.abc import Callable

from forkserve.config import Config
from forkserve.control import ControlError, ControlServer, Handler, default_path
from forkserve.endpoints import Server
from forkserve.errors import ConfigError
from forkserve.logs import error_log
from forkserve.prometheus import MetricsServer
from forkserve.sockets import parse_bind
from forkserve.statsd import StatsdPusher
from forkserve.workerset import WorkerSet


class Admin:
    """The admin endpoints the configuration asks for (None: not asked for)."""

    def __init__(self, selector: selectors.BaseSelector, handle: Handler,
                 metrics_text: Callable[[], str]) -> None:
        self.selector = selector
        self.handle = handle
        self.metrics_text = metrics_text
        self.control: ControlServer | None = None
        self.metrics: MetricsServer | None = None
        self.statsd: StatsdPusher | None = None

    def open(self, cfg: Config, take_over: bool) -> None:
        """Open what `cfg` asks for; `take_over`: a live control socket at the path is the
        old master's (USR2), not another server's. Raises ConfigError."""
        if cfg.control_socket:
            self.open_control(cfg.control_socket, take_over)
        if cfg.metrics_bind:
            address = parse_bind(cfg.metrics_bind)
            try:
                self.metrics = MetricsServer(address.host, address.port, self.selector,
                                             self.metrics_text)
            except OSError as exc:
                raise ConfigError(f"--metrics-bind {cfg.metrics_bind}: {exc.strerror}") \
                    from None
            error_log.info("metrics at %s", self.metrics.url)
        if cfg.statsd_host:
            address = parse_bind(cfg.statsd_host)
            self.statsd = StatsdPusher(address.host, address.port, cfg.statsd_prefix)

    def open_control(self, path: str, take_over: bool) -> None:
        """Listen on the control socket at `path` ('auto': the default path)."""
        try:
            self.control = ControlServer(default_path() if path == "auto" else path,
                                         self.selector, self.handle, take_over=take_over)
        except ControlError as exc:
            raise ConfigError(str(exc)) from None
        except OSError as exc:
            raise ConfigError(f"--control-socket {path}: {exc.strerror}") from None
        error_log.info("control socket at %s", self.control.path)

    def hand_to(self, uid: int, gid: int) -> None:
        """Give the control socket to --user/--group (the master drops to them next)."""
        if self.control is not None:
            try:
                self.control.hand_to(uid, gid)
            except (ControlError, OSError) as exc:
                raise ConfigError(str(exc)) from None

    def reclaim_control(self) -> None:
        """A new master from USR2 exited: if it had taken the control socket over, listen
        on it again."""
        if self.control is None or self.control.still_there():
            return
        path = self.control.path
        self.control.close()
        self.control = None
        try:
            self.open_control(path, take_over=False)
        except ConfigError as exc:
            error_log.error("control socket lost: %s", exc)

    def servers(self) -> list[Server]:
        return [server for server in (self.control, self.metrics) if server is not None]

    def timeout(self, timeout: float, now: float, stopping: bool) -> float:
        """`timeout`, shortened to what the endpoints need next (no pushes once stopping)."""
        for server in self.servers():
            timeout = server.timeout(timeout, now)
        if self.statsd is not None and not stopping:
            timeout = self.statsd.timeout(timeout, now)
        return timeout

    def expire(self) -> None:
        """Drop the clients that overstayed (see forkserve.endpoints)."""
        now = time.monotonic()
        for server in self.servers():
            server.expire(now)

    def push(self, now: float, workers: WorkerSet, restarts: dict[str, int]) -> None:
        """Send the statistics to statsd when due."""
        if self.statsd is not None and now >= self.statsd.due:
            self.statsd.push(now, workers.totals(), workers.in_flight(), len(workers),
                             restarts)

    def close_in_child(self) -> None:
        """In a forked worker: close the descriptors without touching what they serve (a
        unix socket's path stays)."""
        for server in self.servers():
            server.close_inherited()
        if self.statsd is not None:
            self.statsd.close()

    def close(self) -> None:
        for server in self.servers():
            server.close()
        if self.statsd is not None:
            self.statsd.close()
