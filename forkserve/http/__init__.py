"""Sans-I/O HTTP/1.1: one connection interface (`base.HTTPConnection`), one or more parsers."""

from forkserve.http.base import HTTPConnection, Limits
from forkserve.http.h11conn import H11Connection


def new_connection(limits: Limits) -> HTTPConnection:
    """A fresh server-side connection state machine (h11, the reference parser)."""
    return H11Connection(limits)
