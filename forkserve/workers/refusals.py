"""Answers a connection gets from the worker in the app's place, after which it closes: the
error status of what the parser refused (`reject`), and 408 for a request body that never
came (`body_stalled`). Each is counted in the worker's request statistics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from forkserve.http.base import ProtocolError, error_response
from forkserve.logs import error_log

if TYPE_CHECKING:
    from forkserve.workers.protocol import HTTPProtocol


def reject(protocol: HTTPProtocol, exc: ProtocolError) -> None:
    """The parser refused what the client sent on `protocol` (`exc`): answer with its
    status, unless a response has begun, and close."""
    worker = protocol.worker
    error_log.debug("refused request: %s %s", exc.status, exc.detail)
    if worker.stats is not None:
        worker.stats.refuse(exc.status)
    cycle = protocol.cycle
    if cycle is not None and cycle.head_sent:
        protocol.close()
        return
    if cycle is not None:
        cycle.disconnect()  # the app must not answer a request that broke
    protocol.write(error_response(exc.status, exc.explain))
    protocol.close()


def body_stalled(protocol: HTTPProtocol) -> None:
    """`protocol`'s request body, awaited before the app is called, did not come within the
    I/O timeout: answer 408 and close (`HTTPProtocol._awaits_body`)."""
    request = protocol.request
    worker = protocol.worker
    error_log.info("%s %s: the client sent no body for %g s; answered 408",
                   request.method.decode("ascii"), request.target.decode("latin-1"),
                   worker.io_timeout)
    if worker.stats is not None:
        worker.stats.refuse(408)
    protocol.cycle.disconnect()
    protocol.write(error_response(408, head=request.method == b"HEAD"))
    protocol.close()
