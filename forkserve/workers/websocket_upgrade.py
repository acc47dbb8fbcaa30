"""A connection switching from HTTP to the WebSocket protocol (ASGI apps): the upgrade request
hands it to a `WebSocketSession` (forkserve.websocket), which the app then drives in a task.
Without wsproto, upgrade requests are refused (501).

forkserve.websocket (and with it wsproto, and h11 which wsproto uses) is imported by the first
upgrade a worker serves, not by the master: most apps never upgrade a connection (a WSGI app
cannot), and it was the largest import of the master's start (about 40 ms, and 2 MiB in every
process). The first upgrade in each worker waits that long once. A master that drops its
privileges (--user) imports it before (`load`), so that workers need not read it as the user.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from forkserve.http.base import END_OF_MESSAGE, ProtocolError, Request, error_response
from forkserve.logs import error_log
from forkserve.workers.refusals import reject

if TYPE_CHECKING:
    from forkserve.websocket import WebSocketSession
    from forkserve.workers.aio import AsyncioWorker
    from forkserve.workers.protocol import HTTPProtocol


def load() -> None:
    """Import the WebSocket session (wsproto) now rather than at a worker's first upgrade."""
    import forkserve.websocket  # noqa: F401


def is_upgrade(request: Request) -> bool:
    """Does the request ask to switch to WebSocket?"""
    upgrade = connection = False
    for name, value in request.headers:
        if name == b"upgrade":
            upgrade = upgrade or value.strip().lower() == b"websocket"
        elif name == b"connection":
            connection = connection or b"upgrade" in value.lower()
    return upgrade and connection and request.method == b"GET"


def upgrade(protocol: HTTPProtocol, request: Request) -> None:
    """Hand `protocol`'s connection to a WebSocket session for the upgrade `request` (or
    refuse: no wsproto). The session is `protocol.ws` from then on: it gets what the client
    sends."""
    from forkserve.websocket import MISSING, WebSocketSession, websocket_scope

    worker = protocol.worker
    if MISSING:
        if not worker.warned_no_websocket:
            worker.warned_no_websocket = True
            error_log.warning("refusing WebSocket requests: %s", MISSING)
        protocol.write(error_response(501, "WebSocket support is not installed"))
        protocol.close()
        return
    conn = protocol.conn
    try:
        while conn.next_event() is END_OF_MESSAGE:
            pass  # a GET has no body: the parser now waits for the protocol switch
    except ProtocolError as exc:
        reject(protocol, exc)
        return
    protocol.deadline = math.inf
    worker.not_idle(protocol)
    cfg = worker.cfg
    scope = protocol.completed(request, websocket_scope(
        request, protocol.client, protocol.server, cfg.root_path,
        worker.lifespan.state if worker.lifespan.supported else None))
    session = WebSocketSession(scope, request, protocol, cfg.ws_max_size,
                               cfg.ws_ping_interval, cfg.ws_ping_timeout)
    protocol.ws = session
    worker.in_flight += 1
    worker.served += 1
    protocol.loop.create_task(_run(worker, session, conn.trailing_data()))


async def _run(worker: AsyncioWorker, session: WebSocketSession, leftover: bytes) -> None:
    if leftover:
        session.receive_data(leftover)
    try:
        await session.run(worker.asgi_app)
    finally:
        worker.in_flight -= 1
