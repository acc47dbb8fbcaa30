"""The record of each finished exchange: counted in the worker's request statistics
(--metrics-bind, --statsd-host, --control-socket) and written to the access log
(--access-logfile).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from forkserve.logs import access_log, format_access_line
from forkserve.wsgi_cycle import WSGICycle

if TYPE_CHECKING:
    from forkserve.asgi import HTTPCycle
    from forkserve.workers.protocol import HTTPProtocol


def record(protocol: HTTPProtocol, cycle: HTTPCycle | WSGICycle) -> None:
    """The exchange of `cycle` on `protocol` is over: count it and write its access-log line.
    Called only for an exchange the protocol timed (`protocol.started`, set when either is
    wanted), which it resets."""
    request = protocol.request
    duration = max(0.0, time.time() - protocol.started)  # (the clock may be set back)
    worker = protocol.worker
    if worker.stats is not None and cycle.status:
        worker.stats.count(request.method.decode("ascii"), cycle.status, duration)
    if worker.access_log_format:
        _log_access(protocol, cycle, duration)
    protocol.started = 0.0


def _log_access(protocol: HTTPProtocol, cycle: HTTPCycle | WSGICycle, duration: float) -> None:
    request = protocol.request
    client = protocol.client
    environ = cycle.environ if type(cycle) is WSGICycle else None
    access_log.info(format_access_line(
        protocol.worker.access_log_format,
        remote=environ["REMOTE_ADDR"] if environ else client[0] if client else "",
        method=request.method.decode("ascii"),
        target=request.target.decode("latin-1"),
        version=request.http_version.decode("ascii"),
        status=cycle.status,
        sent=cycle.sent,
        started=protocol.started,
        duration=duration,
        request_headers=request.headers,
        response_headers=cycle.headers,
        environ=environ,
    ))
