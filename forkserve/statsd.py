"""--statsd-host: the master pushes the server's statistics to a statsd (or DogStatsD) server.

Once a second, over UDP, as plain statsd lines (`name:value|c` for what was counted since the
last push, `name:value|g` for levels, and the mean request duration of the interval), several
lines to a datagram of at most 1,432 bytes (an
Ethernet frame's payload less IP and UDP headers). The counts are those of forkserve.metrics
(the Prometheus endpoint's): the pusher sends the difference from the last push. A statsd
server that is down costs nothing but the datagrams lost.
"""

from __future__ import annotations

import socket

from forkserve.metrics import Totals

INTERVAL = 1.0
MAX_DATAGRAM = 1432


class StatsdPusher:
    """Pushes to `host`:`port` with names beginning `prefix.`."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect((host, port))  # (resolves once; a down server: sends fail quietly)
        self.prefix = prefix.rstrip(".") + "." if prefix else ""
        self.sent: dict[str, float] = {}  # each counter's value at the last push
        self.due = 0.0

    def timeout(self, timeout: float, now: float) -> float:
        """`timeout`, shortened to when the next push is due."""
        return min(timeout, max(0.0, self.due - now))

    def push(self, now: float, totals: Totals, in_flight: int, workers: int,
             restarts: dict[str, int]) -> None:
        """Send what changed since the last push, if a push is due."""
        if now < self.due:
            return
        self.due = now + INTERVAL
        requests = sum(totals.requests.values())
        answered = requests - self.sent.get("requests", 0)
        waited = totals.duration_sum - self.sent.get("duration", 0.0)
        self.sent["duration"] = totals.duration_sum
        counters = {"requests": requests, "connections.accepted": totals.accepted}
        for key, value in totals.requests.items():
            method, status = key.split(" ")
            counters[f"requests.{status}"] = counters.get(f"requests.{status}", 0) + value
            counters[f"requests.{method.lower()}"] = counters.get(
                f"requests.{method.lower()}", 0) + value
        counters.update({f"requests.refused.{status}": value
                         for status, value in totals.refused.items()})
        counters.update({f"workers.restarts.{reason}": value
                         for reason, value in restarts.items()})
        lines = [f"{self.prefix}workers:{workers}|g",
                 f"{self.prefix}requests.in_flight:{in_flight}|g"]
        if answered:  # the mean over the last interval (statsd has no histogram to add to)
            lines.append(f"{self.prefix}request.duration_ms.mean:"
                         f"{waited / answered * 1000:.3f}|g")
        for name, value in counters.items():
            delta = value - self.sent.get(name, 0)
            self.sent[name] = value
            if delta:
                lines.append(f"{self.prefix}{name}:{delta:g}|c")
        self._send(lines)

    def _send(self, lines: list[str]) -> None:
        datagram = ""
        for line in lines:
            if datagram and len(datagram) + 1 + len(line) > MAX_DATAGRAM:
                self._send_one(datagram)
                datagram = ""
            datagram = f"{datagram}\n{line}" if datagram else line
        if datagram:
            self._send_one(datagram)

    def _send_one(self, datagram: str) -> None:
        try:
            self.sock.send(datagram.encode())
        except OSError:
            pass  # nobody listens (ECONNREFUSED), or the buffer is full: statsd is lossy

    def close(self) -> None:
        self.sock.close()
