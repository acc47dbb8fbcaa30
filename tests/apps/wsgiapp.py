"""Test WSGI apps. `app` runs every route through wsgiref.validate.validator, with its
warnings turned into errors, so a server that breaks PEP 3333 fails the request (500)."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
import warnings
from urllib.parse import parse_qs
from wsgiref.validate import WSGIWarning, validator

warnings.simplefilter("error", WSGIWarning)

TEXT = [("Content-Type", "text/plain")]


def _query(environ) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(environ["QUERY_STRING"]).items()}


def _reply(start_response, body: bytes, status: str = "200 OK", headers=()):
    start_response(status, TEXT + [("Content-Length", str(len(body)))] + list(headers))
    return [body]


def hello(environ, start_response):
    return _reply(start_response, b"Hello, World!")


def pid(environ, start_response):
    return _reply(start_response, str(os.getpid()).encode())


def thread_name(environ, start_response):
    """The name of the thread the app is called in ("MainThread": the worker's loop)."""
    return _reply(start_response, threading.current_thread().name.encode())


def echo(environ, start_response):
    """The body, read with read(n) in pieces of ?size= bytes (default 8192)."""
    size = int(_query(environ).get("size", "8192"))
    stream = environ["wsgi.input"]
    parts = []
    while True:
        part = stream.read(size)
        if not part:
            break
        assert len(part) <= size
        parts.append(part)
    body = b"".join(parts)
    return _reply(start_response, body, headers=[("X-Reads", str(len(parts)))])


def read_all(environ, start_response):
    """The body through read() with the exact CONTENT_LENGTH, then one more read for EOF."""
    stream = environ["wsgi.input"]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = stream.read(length)
    extra = stream.read(10)
    return _reply(start_response, body, headers=[("X-Extra", str(len(extra)))])


def lines(environ, start_response):
    """The body's lines as JSON, read with readline / readlines / iteration (?how=)."""
    how = _query(environ).get("how", "readline")
    stream = environ["wsgi.input"]
    if how == "readline":
        out = []
        while True:
            line = stream.readline()
            if not line:
                break
            out.append(line)
    elif how == "readline-limit":
        out = []
        while True:
            line = stream.readline(4)
            if not line:
                break
            out.append(line)
    elif how == "readlines":
        out = stream.readlines()
    else:
        out = list(stream)
    body = json.dumps([line.decode("latin-1") for line in out]).encode()
    return _reply(start_response, body)


def environ_dump(environ, start_response):
    data = {k: v for k, v in environ.items() if isinstance(v, str | bool | int | tuple)}
    return _reply(start_response, json.dumps(data).encode())


def stream(environ, start_response):
    """?n= pieces with no Content-Length: chunked for HTTP/1.1."""
    n = int(_query(environ).get("n", "3"))
    start_response("200 OK", TEXT)
    return (b"piece %d\n" % i for i in range(n))


def write_callable(environ, start_response):
    write = start_response("200 OK", TEXT)
    write(b"written ")
    write(b"by write()")
    return [b" and returned"]


def ignore_body(environ, start_response):
    return _reply(start_response, b"ignored")


def fail(environ, start_response):
    raise RuntimeError("deliberate failure before start_response")


def fail_midway(environ, start_response):
    start_response("200 OK", TEXT)

    def body():
        yield b"first part\n"
        raise RuntimeError("deliberate failure after the headers")

    return body()


def exc_info(environ, start_response):
    start_response("200 OK", TEXT)
    try:
        raise ValueError("oops")
    except ValueError:
        start_response("500 Internal Server Error", TEXT, sys.exc_info())
    return [b"handled by exc_info"]


def twice(environ, start_response):
    start_response("200 OK", TEXT)
    start_response("200 OK", TEXT)
    return [b"never"]


def bad_header(environ, start_response):
    return _reply(start_response, b"x", headers=[("X-Injected", "a\r\nSet-Cookie: evil=1")])


def non_latin1(environ, start_response):
    return _reply(start_response, b"x", headers=[("X-Name", "caf\u00e9 \u20ac")])


class _Marked:
    """A body whose close() is logged, optionally endless (?endless=1)."""

    def __init__(self, environ, endless: bool) -> None:
        self.errors = environ["wsgi.errors"]
        self.tag = _query(environ).get("tag", "")
        self.endless = endless

    def __iter__(self):
        yield b"start\n"
        while self.endless:
            yield b"x" * 65536

    def close(self) -> None:
        self.errors.write(f"CLOSED {self.tag}\n")
        self.errors.flush()


def marked(environ, start_response):
    start_response("200 OK", TEXT)
    return _Marked(environ, _query(environ).get("endless") == "1")


def sleep(environ, start_response):
    query = _query(environ)
    if "tag" in query:
        environ["wsgi.errors"].write(f"SLEEPING {query['tag']}\n")
    time.sleep(float(query.get("s", "0.5")))
    return _reply(start_response, str(os.getpid()).encode())


_barrier = threading.Barrier(2, timeout=10)


def barrier(environ, start_response):
    """Returns only when a second request reaches it too: proves two run at once."""
    try:
        _barrier.wait()
    except threading.BrokenBarrierError:
        _barrier.reset()
        return _reply(start_response, b"alone", "503 Service Unavailable")
    return _reply(start_response, b"together")


_calls_running = 0


def exclusive(environ, start_response):
    """Reads the body, then sleeps ?s=; logs OVERLAP if another call of the app is running
    meanwhile (the server says wsgi.multithread is false)."""
    global _calls_running
    _calls_running += 1
    try:
        if _calls_running > 1 and not environ["wsgi.multithread"]:
            environ["wsgi.errors"].write("OVERLAP\n")
        environ["wsgi.errors"].write(f"EXCLUSIVE {_query(environ).get('tag')}\n")
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        time.sleep(float(_query(environ).get("s", "0")))
        environ["wsgi.errors"].write(f"EXCLUSIVE-END {_query(environ).get('tag')}\n")
    finally:
        _calls_running -= 1
    return _reply(start_response, body)


def big(environ, start_response):
    """?mb= MiB of b"x" in 64 KiB pieces, with a Content-Length; ?hang=1: then it hangs;
    ?tag=: logs "BIG <tag> PRODUCED" once the last piece is taken."""
    query = _query(environ)
    size = int(query.get("mb", "16")) << 20
    start_response("200 OK", TEXT + [("Content-Length", str(size))])

    def pieces():
        for _ in range(size >> 16):
            yield b"x" * 65536
        if "tag" in query:
            environ["wsgi.errors"].write(f"BIG {query['tag']} PRODUCED\n")
            environ["wsgi.errors"].flush()
        if query.get("hang") == "1":
            time.sleep(60)

    return pieces()


def _channel_fd() -> int:
    """The worker's pipe to the master: the write end of a pipe whose read end is elsewhere
    (the worker's own wakeup pipe has both ends here; fds 0-2 belong to the test harness)."""
    ends: dict[str, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except OSError:
            continue
        if fd > 2 and target.startswith("pipe:"):
            ends.setdefault(target, []).append((fd, mode))
    (fd,) = [e[0][0] for e in ends.values() if len(e) == 1 and e[0][1] == os.O_WRONLY]
    return fd


def garbage(environ, start_response):
    os.write(_channel_fd(), b"\xff" * 16)
    return _reply(start_response, b"sent garbage")


def close_pipe(environ, start_response):
    """Close the pipe's write end but keep writing into the void: the master sees EOF from
    a worker that goes on running."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, _channel_fd())
    os.close(devnull)
    return _reply(start_response, b"closed")


def crash(environ, start_response):
    os._exit(3)


def raise_exit(environ, start_response):
    """Raises SystemExit (?kind=exit, the default) or KeyboardInterrupt (?kind=interrupt)."""
    if _query(environ).get("kind") == "interrupt":
        raise KeyboardInterrupt
    sys.exit(4)


_hoard: list[bytearray] = []


def grow(environ, start_response):
    _hoard.append(bytearray(int(_query(environ).get("mb", "10")) * 1024 * 1024))
    return _reply(start_response, str(sum(map(len, _hoard))).encode())


ROUTES = {
    "/": hello,
    "/hello": hello,
    "/pid": pid,
    "/thread": thread_name,
    "/echo": echo,
    "/read-all": read_all,
    "/lines": lines,
    "/environ": environ_dump,
    "/stream": stream,
    "/write": write_callable,
    "/ignore-body": ignore_body,
    "/fail": fail,
    "/fail-midway": fail_midway,
    "/exc-info": exc_info,
    "/twice": twice,
    "/marked": marked,
    "/sleep": sleep,
    "/barrier": barrier,
    "/exclusive": exclusive,
    "/big": big,
    "/garbage": garbage,
    "/close-pipe": close_pipe,
    "/crash": crash,
    "/raise-exit": raise_exit,
    "/grow": grow,
}


def not_found(environ, start_response):
    return _reply(start_response, b"not found", "404 Not Found")


def file_app(environ, start_response):
    """wsgi.file_wrapper over ?path= (not validated: the validator hides the wrapper)."""
    query = _query(environ)
    f = open(query["path"], "rb")  # noqa: SIM115 - the server closes it via the wrapper
    f.seek(int(query.get("offset", "0")))
    headers = TEXT + ([("Content-Length", query["length"])] if "length" in query else [])
    start_response("200 OK", headers)
    return environ["wsgi.file_wrapper"](f, 8192)


_validated = {path: validator(route) for path, route in ROUTES.items()}
_not_found = validator(not_found)


def short_body(environ, start_response):
    start_response("200 OK", TEXT + [("Content-Length", "10")])
    return [b"abc"]


def body_on_204(environ, start_response):
    start_response("204 No Content", [])
    return [b"a body where none may be"]


def respond_with(environ, start_response):
    """Responds "hello" with the headers the request body lists: JSON [[name, value], ...]."""
    headers = json.loads(environ["wsgi.input"].read())
    start_response("200 OK", [(name, value) for name, value in headers])
    return [b"hello"]


# Routes the validator would refuse before the server gets to: they test the server's checks.
UNVALIDATED = {"/file": file_app, "/bad-header": bad_header, "/non-latin1": non_latin1,
               "/short-body": short_body, "/body-on-204": body_on_204,
               "/respond-with": respond_with}


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path.startswith("/environ/"):
        path = "/environ"
    route = UNVALIDATED.get(path) or _validated.get(path, _not_found)
    return route(environ, start_response)


def create_app(greeting="factory"):
    """For MODULE:FACTORY() loading."""

    def factory_app(environ, start_response):
        return _reply(start_response, greeting.encode())

    return factory_app
