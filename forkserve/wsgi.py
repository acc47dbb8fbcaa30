"""The WSGI interface (PEP 3333): environ, wsgi.input, start_response, file wrapper.

No I/O happens here. `respond` runs one request through the app between a `read_chunk`
callable (the next piece of the request body, b"" at its end, for wsgi.input) and a
`ResponseWriter` that puts the response on the wire (see `wsgi_cycle.WSGICycle`).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from forkserve.http.base import SERVER, Request, remember
from forkserve.logs import error_log
from forkserve.proxy import Forwarded, TrustedProxies, forwarded

SERVER_SOFTWARE = SERVER.decode("ascii")

# RFC 9110 §5.6.2 token characters.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_STATUS = re.compile(r"([1-9][0-9][0-9]) ([^\x00-\x08\x0a-\x1f\x7f]*)")


class ResponseWriter(Protocol):
    """What `respond` needs to send a response.

    `start` records the head; it is sent with the first non-empty body piece, by `send_head`,
    or at `finish` (PEP 3333: headers wait for the body). `write` sends a piece. `send_head`
    sends the head now with `length` as its Content-Length unless the app gave one (a file
    follows in pieces). `finish(last)` sends `last` and ends the response; if nothing was sent
    before, `last` is the whole body (None: empty) and the writer may add the Content-Length
    the app left out. `paused`: the client is not reading; write no more until it drained.
    """

    head_sent: bool
    paused: bool

    def start(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None: ...

    def write(self, data: bytes) -> None: ...

    def send_head(self, length: int) -> None: ...

    def finish(self, last: bytes | None = None) -> None: ...


class InputStream:
    """`wsgi.input`: the request body, read on demand and never past its end."""

    __slots__ = ("_read_chunk", "_buffer", "_eof")

    def __init__(self, read_chunk: Callable[[], bytes]) -> None:
        self._read_chunk = read_chunk
        self._buffer = bytearray()
        self._eof = False

    def _fill(self) -> bool:
        """Append the next body piece to the buffer; False when the body is exhausted."""
        if self._eof:
            return False
        chunk = self._read_chunk()
        if not chunk:
            self._eof = True
            return False
        self._buffer += chunk
        return True

    def _take(self, size: int) -> bytes:
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def read(self, size: int | None = -1) -> bytes:
        """Read `size` bytes (fewer only at the end of the body), or all that is left."""
        if size is None or size < 0:
            while self._fill():
                pass
            return self._take(len(self._buffer))
        while len(self._buffer) < size and self._fill():
            pass
        return self._take(size)

    def readline(self, size: int | None = -1) -> bytes:
        """Read up to and including the next b"\\n", at most `size` bytes if given."""
        limit = -1 if size is None else size
        searched = 0
        while True:
            newline = self._buffer.find(b"\n", searched)
            if newline >= 0:
                end = newline + 1
                break
            if 0 <= limit <= len(self._buffer):
                end = limit
                break
            searched = len(self._buffer)
            if not self._fill():
                end = len(self._buffer)
                break
        return self._take(end if limit < 0 else min(end, limit))

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        """Read lines until the end, or until about `hint` bytes have been read."""
        lines: list[bytes] = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


class ErrorStream:
    """`wsgi.errors` of one request: text written here goes to the error log, one record per
    line; the server flushes a last partial line when the request ends."""

    def __init__(self) -> None:
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            error_log.error("%s", line)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self._partial:
            error_log.error("%s", self._partial)
            self._partial = ""


class FileWrapper:
    """`wsgi.file_wrapper`: iterates a file in blocks; the worker sends real files with sendfile."""

    def __init__(self, filelike: Any, block_size: int = 65536) -> None:
        self.filelike = filelike
        self.block_size = block_size
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> Iterator[bytes]:
        read = self.filelike.read
        while True:
            block = read(self.block_size)
            if not block:
                return
            yield block

    def file_range(self) -> tuple[int, int, int] | None:
        """(fd, offset, count) to sendfile from, if the wrapped object is a regular file."""
        try:
            fd = self.filelike.fileno()
            info = os.fstat(fd)
            offset = self.filelike.tell()
        except (AttributeError, OSError, ValueError):
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        return fd, offset, max(0, info.st_size - offset)


class StartResponse:
    """The `start_response` callable of one request (PEP 3333, including exc_info)."""

    __slots__ = ("_writer", "called", "content_length")

    def __init__(self, writer: ResponseWriter) -> None:
        self._writer = writer
        self.called = False
        self.content_length: int | None = None

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None):
        if exc_info is not None:
            try:
                if self._writer.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.called:
            raise RuntimeError("start_response() called a second time without exc_info")
        code, reason = _check_status(status)
        self._writer.start(code, reason, self._encode_headers(headers))
        self.called = True
        return self._writer.write

    def _encode_headers(self, headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
        if type(headers) is not list:
            raise TypeError(f"response headers must be a list, not {type(headers).__name__}")
        encoded = []
        self.content_length = None
        for item in headers:
            try:
                checked = _HEADERS.get(item) if type(item) is tuple else None
            except TypeError:  # unhashable: _check_header says what is wrong with it
                checked = None
            if checked is None:
                checked = _check_header(item)
            raw_name, raw_value, length = checked
            if length is not None:
                self.content_length = length
            encoded.append((raw_name, raw_value))
        return encoded


def _check_header(item: Any) -> tuple[bytes, bytes, int | None]:
    """A response header (name, value) as bytes, and its value as an int if it is a
    Content-Length; raises TypeError or ValueError for one that is not valid. Remembered in
    _HEADERS: apps send the same few headers over and over."""
    if type(item) is not tuple or len(item) != 2:
        raise TypeError(f"response header must be a (name, value) tuple: {item!r}")
    name, value = item
    if type(name) is not str or type(value) is not str:
        raise TypeError(f"response header name and value must be str: {item!r}")
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"invalid response header name {name!r}")
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"response header {name} is not latin-1: {value!r}") from None
    length = None
    if len(name) == 14 and name.lower() == "content-length":
        digits = value.strip(" \t")  # optional white space (RFC 9110 §5.5)
        if not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"invalid Content-Length {value!r}")
        length = int(digits)
    checked = name.encode("ascii"), raw, length
    if len(_HEADERS) < 4096:
        _HEADERS[item] = checked
    return checked


# Validated headers and status lines, by what the app gave: apps use a handful.
_HEADERS: dict[tuple[str, str], tuple[bytes, bytes, int | None]] = {}
_STATUSES: dict[str, tuple[int, bytes]] = {}


def _check_status(status: str) -> tuple[int, bytes]:
    checked = _STATUSES.get(status) if type(status) is str else None
    if checked is not None:
        return checked
    if type(status) is not str:
        raise TypeError(f"status must be a str like '200 OK', not {type(status).__name__}")
    match = _STATUS.fullmatch(status)
    if match is None:
        raise ValueError(f"invalid status {status!r}: expected a code and a reason, '200 OK'")
    try:
        checked = int(match[1]), match[2].encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"status {status!r} is not latin-1") from None
    if len(_STATUSES) < 256:
        _STATUSES[status] = checked
    return checked


def _server_part(sockname: tuple | None, multithread: bool, root_path: str,
                 url_scheme: str) -> dict[str, Any]:
    """The environ variables that every connection to `sockname` (None: a unix socket)
    shares."""
    if sockname is not None:
        server_name, server_port = sockname[0], str(sockname[1])
    else:
        server_name, server_port = "localhost", "80"
    return {
        "SERVER_SOFTWARE": SERVER_SOFTWARE,
        "SCRIPT_NAME": root_path,
        "SERVER_NAME": server_name,
        "SERVER_PORT": server_port,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": url_scheme,
        "wsgi.multithread": multithread,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
        "wsgi.input_terminated": True,
    }


# _server_part's answers, by its arguments: a worker listens on a few addresses.
_SERVER_PARTS: dict[tuple, dict[str, Any]] = {}


class EnvironFactory:
    """Builds request environs for one connection from a per-connection template."""

    __slots__ = ("_template", "_shared", "_remote_addr", "_remote_port", "_root_path",
                 "_proxies")

    def __init__(self, sockname: Any, peername: Any, multithread: bool, root_path: str = "",
                 url_scheme: str = "http", proxies: TrustedProxies | None = None):
        """For a connection from `peername` to `sockname`; `proxies`: the trusted proxies,
        if `peername` is one of them (their headers are then believed), else None."""
        if isinstance(peername, tuple):
            remote_addr, remote_port = peername[0], str(peername[1])
        else:
            remote_addr, remote_port = "", ""
        self._root_path = root_path
        self._proxies = proxies
        key = (sockname if isinstance(sockname, tuple) else None, multithread, root_path,
               url_scheme)
        server = _SERVER_PARTS.get(key)
        if server is None:
            server = _server_part(*key)
            if len(_SERVER_PARTS) < 64:
                _SERVER_PARTS[key] = server
        # Shared by every connection to the same server until `extend` (most connections
        # serve one request: a copy of their own would be one more per connection).
        self._template = server
        self._shared = True
        self._remote_addr = remote_addr
        self._remote_port = remote_port

    def extend(self, variables: dict[str, Any]) -> None:
        """Add `variables` to every environ built from now on (e.g. the TLS session's, or
        the client's address from a PROXY header)."""
        variables = dict(variables)
        self._remote_addr = variables.pop("REMOTE_ADDR", self._remote_addr)
        self._remote_port = variables.pop("REMOTE_PORT", self._remote_port)
        if self._shared:
            self._template = self._template.copy()
            self._shared = False
        self._template.update(variables)

    def build(self, request: Request, body: InputStream, errors: ErrorStream) -> dict[str, Any]:
        """The environ of `request`, with `body` as wsgi.input and `errors` as wsgi.errors."""
        environ = self._template.copy()
        environ["REMOTE_ADDR"] = self._remote_addr
        environ["REMOTE_PORT"] = self._remote_port
        head = request.head
        if head is None:
            environ.update(_request_part(request, self._root_path))
        else:
            # A head seen before: its part is remembered by its bytes (and the root path).
            known = _REQUEST_PARTS.get(head)
            if known is None or known[0] != self._root_path:
                known = remember(_REQUEST_PARTS, head, (
                    self._root_path, _request_part(request, self._root_path)),
                    _REQUEST_PARTS_MAX)
            environ.update(known[1])
        environ["wsgi.input"] = body
        environ["wsgi.errors"] = errors
        if self._proxies is not None and request.proxy_headers:
            _apply_forwarded(environ, forwarded(request.headers, self._proxies))
        return environ


def _request_part(request: Request, root: str) -> dict[str, str]:
    """The environ variables that `request`'s head alone decides, under root path `root`:
    the method, path, query, protocol and HTTP_ variables."""
    target = request.target.decode("latin-1")
    origin_form = target[:1] == "/"
    path, _, query = (target if origin_form else _path_of(target)).partition("?")
    if "%" in path:
        path = unquote_to_bytes(path).decode("latin-1")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root):]  # SCRIPT_NAME + PATH_INFO is the whole path
    part = {
        "REQUEST_METHOD": request.method.decode("ascii"),
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "RAW_URI": target,
        "REQUEST_URI": target,
        "SERVER_PROTOCOL": _PROTOCOLS[request.http_version],
    }
    keys = _ENVIRON_KEYS
    for name, value in request.headers:
        key = keys.get(name)
        if key is None:
            key = _environ_key(name)
            if key is None:
                continue  # see _environ_key: names with "_" are dropped
        if key in part:
            part[key] += ("; " if key == "HTTP_COOKIE" else ",") + value.decode("latin-1")
        else:
            part[key] = value.decode("latin-1")
    if not origin_form and "://" in target:
        # RFC 9112 §3.2.2: with an absolute-form target, its authority is the host.
        part["HTTP_HOST"] = target.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
    return part


# _request_part's answers for heads remembered by the HTTP connection (Request.head), with
# the root path they were made under. As bounded as those heads (they hold no credentials).
_REQUEST_PARTS: dict[bytes, tuple[str, dict[str, str]]] = {}
_REQUEST_PARTS_MAX = 128


# SERVER_PROTOCOL by Request.http_version (check_request leaves only these two).
_PROTOCOLS = {b"1.1": "HTTP/1.1", b"1.0": "HTTP/1.0"}


def _apply_forwarded(environ: dict[str, Any], info: Forwarded) -> None:
    if info.client is not None:
        environ["REMOTE_ADDR"] = info.client
        environ["REMOTE_PORT"] = str(info.port) if info.port is not None else ""
    if info.scheme in ("http", "https"):
        environ["wsgi.url_scheme"] = info.scheme
    if info.host:
        environ["HTTP_HOST"] = info.host


def _path_of(target: str) -> str:
    """The path and query of a request target that is not in origin form: of the absolute
    form (RFC 9112 §3.2.2); "*" and the authority form are their own."""
    if "://" not in target:
        return target
    rest = target.split("://", 1)[1]
    slash = rest.find("/")
    query = rest.find("?")
    if slash == -1 or (query != -1 and query < slash):
        return "/" + (rest[query:] if query != -1 else "")
    return rest[slash:]


_ENVIRON_KEYS: dict[bytes, str] = {
    b"content-type": "CONTENT_TYPE",
    b"content-length": "CONTENT_LENGTH",
}


def _environ_key(name: bytes) -> str | None:
    """HTTP_NAME for a header name, cached. Names containing "_" return None: a header
    `X_Forwarded_For` would otherwise collide with `X-Forwarded-For` (as nginx, we drop it)."""
    if b"_" in name:
        return None
    key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
    if len(_ENVIRON_KEYS) < 4096:
        _ENVIRON_KEYS[name] = key
    return key


def respond(app: Callable[..., Any], environ: dict[str, Any],
            writer: ResponseWriter) -> Iterator[bool] | None:
    """Run one request through a WSGI app and send its response through `writer`.

    Returns None once the response is sent whole (a list of one piece, the usual answer);
    else the rest of the exchange as a generator, which must be run to its end: it yields
    True when `writer.paused` after a piece, and goes on when next() is called once the
    writer drained, so that a client that reads slowly holds no thread and no loop. The
    result's close() is always called, also when sending fails. Exceptions from the app
    propagate (from here or from the generator): the caller answers 500 if
    `writer.head_sent` is false, else drops the connection.
    """
    start_response = StartResponse(writer)
    result = app(environ, start_response)
    if type(result) is list and len(result) == 1:
        _require_started(start_response)
        writer.finish(_check_bytes(result[0]))
        return None
    return _send_pieces(result, start_response, environ, writer)


def _send_pieces(result: Iterable[Any], start_response: StartResponse,
                 environ: dict[str, Any], writer: ResponseWriter) -> Iterator[bool]:
    """The rest of `respond` for a result that is not one piece: see there."""
    try:
        head_only = environ["REQUEST_METHOD"] == "HEAD"
        pieces: Iterable[Any] = result
        if type(result) is FileWrapper:
            file_range = result.file_range()
            if file_range is not None:
                _require_started(start_response)
                fd, offset, count = file_range
                if start_response.content_length is not None:
                    count = min(count, start_response.content_length)
                writer.send_head(count)
                pieces = () if head_only else _file_pieces(fd, offset, count)
        for chunk in pieces:
            if chunk:
                _require_started(start_response)
                writer.write(_check_bytes(chunk))
                if head_only:
                    break  # the body is not sent: do not make the app produce all of it
                if writer.paused:
                    yield True
        _require_started(start_response)
        writer.finish()
    finally:
        close = getattr(result, "close", None) if type(result) is not list else None
        if close is not None:
            close()


def _file_pieces(fd: int, offset: int, count: int) -> Iterator[bytes]:
    """`count` bytes of file `fd` from `offset`, in pieces of FILE_PIECE bytes. Raises
    OSError if the file ends before (the response, already announced, is then cut)."""
    while count > 0:
        piece = os.pread(fd, min(count, FILE_PIECE), offset)
        if not piece:
            raise OSError(f"the file ended {count} bytes before its announced length")
        yield piece
        offset += len(piece)
        count -= len(piece)


# Bytes read from a file at a time for wsgi.file_wrapper.
FILE_PIECE = 256 * 1024


def _require_started(start_response: StartResponse) -> None:
    if not start_response.called:
        raise RuntimeError("the app sent a body without calling start_response() first")


def _check_bytes(chunk: Any) -> bytes:
    if type(chunk) is not bytes and not isinstance(chunk, bytes | bytearray | memoryview):
        raise TypeError(f"the app must yield bytes, not {type(chunk).__name__}")
    return chunk
