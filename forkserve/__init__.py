"""forkserve: a preforking WSGI and ASGI server."""

__version__ = "0.1.0"
