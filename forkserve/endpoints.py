"""Small socket servers the master runs in its own loop: the control socket and the metrics
endpoint.

`Server` accepts on a non-blocking listening socket registered in the master's selector;
each connection is a `Client` subclass that reads requests and queues answers. Nothing a
client does may block or grow the master: beyond `max_clients` at once a connection gets
`refusal()` and is closed, a request is at most `max_request` bytes, a client with no
complete request for `idle_seconds` is dropped, and one that lets more than `max_output`
bytes of answers wait is dropped.
"""

from __future__ import annotations

import errno
import selectors
import socket

IDLE_SECONDS = 5.0
# Out of descriptors (or memory): stop accepting for this long, rather than spin on a
# listening socket that stays readable.
RESOURCE_PAUSE = 0.5
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Endpoint:
    """What these servers register in the master's selector."""

    def ready(self, mask: int, now: float) -> None:
        """The descriptor is ready for what `mask` says (selectors.EVENT_READ/WRITE)."""
        raise NotImplementedError


class Server(Endpoint):
    """A listening socket and its clients, made by `client_class(server, sock, now)`."""

    max_clients = 16
    max_request = 64 * 1024
    max_output = 1 << 20
    idle_seconds = IDLE_SECONDS
    client_class: type[Client]

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector) -> None:
        self.sock = sock
        self.selector = selector
        self.clients: dict[int, Client] = {}
        self.paused_until = 0.0  # accepting paused (out of descriptors) until then
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self)

    def ready(self, mask: int, now: float) -> None:
        """The listening socket is readable: take the waiting connections (as many as may
        be served at once, so that a flood cannot keep the master here)."""
        for _ in range(self.max_clients + 1):
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:  # the kernel queue keeps them meanwhile
                    self.selector.unregister(self.sock)
                    self.paused_until = now + RESOURCE_PAUSE
                    return
                continue  # that connection failed (reset, a network error): the next one
            sock.setblocking(False)
            if len(self.clients) >= self.max_clients:
                _send_and_close(sock, self.refusal(f"busy: {self.max_clients} clients are "
                                                   "connected"))
                continue
            refusal = self.refuses(sock)
            if refusal:
                _send_and_close(sock, self.refusal(refusal))
                continue
            client = self.client_class(self, sock, now)
            self.clients[client.fd] = client
            self.selector.register(sock, selectors.EVENT_READ, client)

    def refuses(self, sock: socket.socket) -> str:
        """Why the new connection `sock` may not be served, or ""."""
        return ""

    def refusal(self, reason: str) -> bytes:
        """What a client is told before it is dropped for `reason`."""
        raise NotImplementedError

    def timeout(self, timeout: float, now: float) -> float:
        """`timeout`, shortened to when the next silent client is due to be dropped (or a
        pause of accepting ends)."""
        if self.paused_until:
            timeout = min(timeout, max(0.0, self.paused_until - now))
        for client in self.clients.values():
            timeout = min(timeout, max(0.0, client.deadline - now))
        return timeout

    def expire(self, now: float) -> None:
        """Drop the clients silent for `idle_seconds`; end a pause of accepting that is
        over."""
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
            self.selector.register(self.sock, selectors.EVENT_READ, self)
        for client in [c for c in self.clients.values() if c.deadline <= now]:
            client.fail(f"no complete request for {self.idle_seconds:g} s")

    def forget(self, client: Client) -> None:
        if self.clients.pop(client.fd, None) is not None:
            self.selector.unregister(client.sock)
            client.sock.close()

    def close(self) -> None:
        """Close every client and the listening socket."""
        for client in list(self.clients.values()):
            self.forget(client)
        if not self.paused_until:
            self.selector.unregister(self.sock)
        self.sock.close()

    def close_inherited(self) -> None:
        """In a forked worker: close the descriptors."""
        for client in self.clients.values():
            client.sock.close()
        self.sock.close()


class Client(Endpoint):
    """One connection: bytes in (`received` takes what it can from `inbox`), answers out
    (`answer`); with `close_after`, the connection ends once its answers are sent."""

    def __init__(self, server: Server, sock: socket.socket, now: float) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.inbox = bytearray()
        self.output = bytearray()
        self.deadline = now + server.idle_seconds
        self.close_after = False
        self.reading = True  # until the client half-closes

    @property
    def open(self) -> bool:
        return self.fd in self.server.clients

    def received(self, now: float) -> None:
        """Take the complete requests at the start of `inbox` and answer them."""
        raise NotImplementedError

    def ready(self, mask: int, now: float) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if mask & selectors.EVENT_READ and self.open:
            self._read(now)

    def _read(self, now: float) -> None:
        try:
            data = self.sock.recv(self.server.max_request + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.server.forget(self)
            return
        if not data:  # the client is done: what it is owed is still sent
            self.reading = False
            self.close_after = True
            self._flush()
            return
        self.inbox += data
        self.received(now)
        if self.open and len(self.inbox) > self.server.max_request:
            self.fail(f"request longer than {self.server.max_request} bytes")

    def answer(self, data: bytes, now: float) -> None:
        """Queue `data` (a whole answer) and send what can be sent now."""
        self.deadline = now + self.server.idle_seconds
        self.output += data
        if len(self.output) > self.server.max_output:
            self.server.forget(self)  # it does not read what it asks for
            return
        self._flush()

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self.output)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.server.forget(self)
            return
        del self.output[:sent]
        if self.close_after and not self.output:
            self.server.forget(self)
            return
        events = (selectors.EVENT_READ if self.reading else 0) | (
            selectors.EVENT_WRITE if self.output else 0)
        self.server.selector.modify(self.sock, events, self)

    def fail(self, error: str) -> None:
        """Tell the client `error` (if it takes it at once) and drop the connection."""
        self.output += self.server.refusal(error)
        try:
            self.sock.send(self.output)
        except OSError:
            pass
        self.server.forget(self)


def _send_and_close(sock: socket.socket, data: bytes) -> None:
    try:
        sock.send(data)
    except OSError:
        pass
    sock.close()
