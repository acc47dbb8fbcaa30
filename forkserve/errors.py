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
