"""Sans-I/O HTTP/1.1: one connection interface (`base.HTTPConnection`), two parsers behind it:
h11 (the reference) and httptools (llhttp, the fast one), with the same semantics."""

from __future__ import annotations

from collections.abc import Callable

from forkserve.http.base import HTTPConnection, Limits

# Imported here, in the master, so that the workers share its pages (PSS). h11 is imported
# only when it is the parser (connection_factory, which the master calls before forking).
try:
    from forkserve.http.httptoolsconn import HttptoolsConnection
except ImportError:  # no httptools on this platform: h11 only
    HttptoolsConnection = None

PARSERS = ("auto", "h11", "httptools")


def connection_factory(parser: str = "h11") -> Callable[[Limits], HTTPConnection]:
    """The connection class of `parser`: 'h11', 'httptools', or 'auto' (httptools when it
    imports, else h11). Raises ImportError for 'httptools' without httptools."""
    if parser not in PARSERS:
        raise ValueError(f"unknown HTTP parser {parser!r}")
    if parser != "h11":
        if HttptoolsConnection is not None:
            return HttptoolsConnection
        if parser == "httptools":
            raise ImportError("httptools is not installed")
    from forkserve.http.h11conn import H11Connection

    return H11Connection


def new_connection(limits: Limits, parser: str = "h11") -> HTTPConnection:
    """A fresh server-side connection state machine on `parser` (see connection_factory)."""
    return connection_factory(parser)(limits)
