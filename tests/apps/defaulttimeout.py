"""The WSGI test app, imported after `socket.setdefaulttimeout(2)`: an app may set a default
timeout for its own sockets, which must not change how the worker's behave."""

import socket

socket.setdefaulttimeout(2)

from wsgiapp import app  # noqa: E402  (after the timeout is set)

__all__ = ["app"]
