"""Error types that cross module boundaries, each mapped to one exit status by `cli.py`."""

# Exit statuses of the `forkserve` command (documented in README.md).
EXIT_OK = 0
EXIT_FAILURE = 1  # a runtime failure after start-up
EXIT_CONFIG = 2  # bad flag, bad address, address in use, app not found
EXIT_BOOT = 3  # the app raised while a worker was loading it


class ConfigError(Exception):
    """What the user asked for cannot work. The message is one line, shown as is."""


class AppNotFound(ConfigError):
    """The app's module or attribute does not exist."""


class StopNow(SystemExit):
    """Raised in a worker by the INT/QUIT handler (and by any stop signal while the app
    loads) to end it at once, exit status 0. A SystemExit so that it unwinds asyncio's loop
    too; code that catches the app's own SystemExit must let this one through."""

    def __init__(self) -> None:
        super().__init__(EXIT_OK)


class ClientDisconnected(OSError):
    """The client is gone (it closed or reset the connection, or stalled past the I/O
    timeout), or the server ended its request. ASGI's `send` raises it (the spec wants an
    OSError), and so do a WSGI app's writes and wsgi.input reads."""
