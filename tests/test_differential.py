"""Differential tests: each app answers the same request under forkserve and under a peer
server, and the two answers must agree. One test id per (app, case): test_same_answer_as_peer
[APP-CASE].

The apps (tests/apps/diff_flask.py, diff_django.py, diff_starlette.py) share one set of routes,
requested by CASES below. The WSGI apps (Flask; Django's WSGI handler) are compared with
gunicorn's sync worker, the ASGI apps (Starlette; Django's ASGI handler, from the same Django
module) with uvicorn `--http h11`: h11 is also forkserve's parser, and it is part of uvicorn
itself (httptools, uvicorn's default when installed, is an extra; it gave the same results).
One forkserve and one peer, each with one worker, serve an app for all of its cases.

Every request is sent on a new connection with `Connection: close`, so that each server
frames the answer as it likes, and is read to the end of the connection. The comparison is
one helper, `assert_same`, for every case:

* the status;
* the headers as a multiset of (lower-cased name, value), less those a server chooses itself:
  Date, Server, Connection, Keep-Alive, Transfer-Encoding, and Content-Length unless the app
  set it (Case.sets_length); when the app set it, both must answer with it, framed by it;
* the body, de-chunked;
* every answer is one well-framed message with nothing after it: no body on HEAD, 204 or
  304, no second response after an error.

Not compared, as each server's own choice: the HTTP version of the status line (h11 answers
HTTP/1.1 to an HTTP/1.0 request, gunicorn echoes 1.0), the headers above, and the whole of a
500 the server writes itself (Case.server_answers). An error in the middle of a stream has
its own rule (check_message). A known forkserve bug is marked in Case.xfail, so that the
suite stays green and the mark (strict) fails once the bug is fixed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from conftest import APPS, Server

pytestmark = pytest.mark.timeout(60)

HOST = "diff.test"  # sent as Host: absolute URLs the apps build must not depend on the port


# -- the apps, and the peer that serves each --------------------------------------------------

@dataclass(frozen=True)
class App:
    """An app of tests/apps served by forkserve and by `peer` ('gunicorn' or 'uvicorn')."""

    spec: str  # MODULE:VARIABLE, the same for both servers
    peer: str
    needs: tuple[str, ...]  # modules without which the comparison is skipped


DIFF_APPS = {
    "flask": App("diff_flask:app", "gunicorn", ("flask", "gunicorn")),
    "django": App("diff_django:application", "gunicorn", ("django", "gunicorn")),
    "starlette": App("diff_starlette:app", "uvicorn", ("starlette", "uvicorn")),
    "django_asgi": App("diff_django:asgi_application", "uvicorn", ("django", "uvicorn")),
}
ALL = frozenset(DIFF_APPS)
# Apps whose ordinary responses carry a Content-Length the app computed: Werkzeug and
# Starlette set it; Django's HttpResponse does not (without CommonMiddleware) and leaves the
# framing to the server. A FileResponse sets it in every framework.
LENGTH_SET = frozenset({"flask", "starlette"})

# Both listen on port 0 and log the port they got (no race for a free port with the other
# test runs on this machine); the peers run in the foreground, logging to stderr.
PEER_COMMAND = {
    "gunicorn": ["-m", "gunicorn", "-b", "127.0.0.1:0", "-w", "1", "-k", "sync",
                 "--chdir", str(APPS)],
    "uvicorn": ["-m", "uvicorn", "--host", "127.0.0.1", "--port", "0", "--http", "h11",
                "--app-dir", str(APPS), "--log-level", "info"],
}
PEER_LISTENING = {
    "gunicorn": re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)"),
    "uvicorn": re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)"),
}


class Peer(Server):
    """A peer server process, run and stopped as conftest.Server runs forkserve (its own
    session; output captured for wait_for; stop() ends its whole process group)."""

    def __init__(self, name: str, spec: str) -> None:
        super().__init__([spec], command=[sys.executable, *PEER_COMMAND[name]])
        self.name = name

    def wait_ready(self) -> Peer:
        """Block until the peer logged its port (the socket is then listening)."""
        self.port = int(self.wait_for(PEER_LISTENING[self.name], timeout=30).group(1))
        return self


@dataclass
class Pair:
    """forkserve and the peer, serving the same app."""

    app: str
    forkserve: Server
    peer: Peer


@pytest.fixture(scope="module")
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """Both servers of the app named by the parameter, started at once, each answering a
    first request; both stopped (process groups killed) when the module's cases of this app
    are done. Skips when the app's framework or peer is not installed."""
    name: str = request.param
    app = DIFF_APPS[name]
    for module in app.needs:
        pytest.importorskip(module, reason=f"{module} is needed to compare {name} answers")
    servers: list[Server] = []
    try:
        servers.append(Server([app.spec, "-w", "1", "-b", "127.0.0.1:0"]))
        servers.append(Peer(app.peer, app.spec))
        for server in servers:
            server.wait_ready()
            # The first answer proves the app is loaded (gunicorn imports it in the worker).
            first = parse(fetch(server.port, build("GET", "/text"), timeout=30), head=False)
            assert first.status == 200, f"{server.args}: {first}\n{server.log}"
        yield Pair(name, *servers)
    finally:
        for server in servers:
            server.stop()


# -- the requests ------------------------------------------------------------------------------

def build(method: str, target: str, headers: tuple[tuple[str, str], ...] = (),
          body: bytes = b"", chunks: list[bytes] | None = None, version: str = "1.1") -> bytes:
    """A raw request with Host and Connection: close; with `chunks` the body is sent chunked
    (the first chunk with a chunk extension), else with a Content-Length if any."""
    lines = [f"{method} {target} HTTP/{version}", f"Host: {HOST}", "Connection: close",
             *(f"{name}: {value}" for name, value in headers)]
    if chunks is not None:
        lines.append("Transfer-Encoding: chunked")
        body = b"".join(b"%x%s\r\n%s\r\n" % (len(chunk), b";ext=1" if i == 0 else b"", chunk)
                        for i, chunk in enumerate(chunks)) + b"0\r\n\r\n"
    elif body:
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


BIG = random.Random(7).randbytes(2 * 1024 * 1024)  # 2 MiB, not compressible or repetitive
JSON_IN = json.dumps({"n": 41, "s": "h\u00e9llo w\u00f6rld \u2713", "list": [1, 2.5, None, True],
                      "nested": {"k": "v"}}, ensure_ascii=False).encode("utf-8")
FORM = (b"name=J%C3%BCrgen+M%C3%BCller&tags=a&tags=b%26c&empty=&plus=1%2B1&space=x+y"
        b"&%C3%A9=%E2%82%AC")
BOUNDARY = "forkserve-diff-7MA4YWxkTrZu0gW"


def multipart(parts: list[tuple[str, str | None, str | None, bytes]]) -> bytes:
    """A multipart/form-data body of (field, filename, content type, content) parts."""
    out = b""
    for name, filename, content_type, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"'
                                                      if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        if content_type:
            out += f"Content-Type: {content_type}\r\n".encode()
        out += b"\r\n" + content + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


UPLOAD = multipart([
    ("title", None, None, "h\u00e9llo w\u00f6rld".encode()),
    ("tags", None, None, b"one"),
    ("tags", None, None, b"two"),
    ("upload", "data file.bin", "application/octet-stream",
     bytes(range(256)) * 16 + b"\r\n--not-the-boundary\r\n" + BIG[:10000]),
    ("notes", "notes.txt", "text/plain", b"line 1\r\nline 2\n"),
])


@dataclass(frozen=True)
class Case:
    """One request, sent to both servers, and how their answers are compared.

    sets_length: apps whose view sets Content-Length itself: that header is compared, and
        both servers must frame the body with it (no chunking).
    server_answers: apps whose view raises before the response starts, so that the server
        writes the answer: only the status is compared (the body and headers of a 500 are
        each server's own), and each must be one well-framed message.
    fails_midstream: the view raises after the response started (see check_message).
    """

    name: str
    request: bytes
    sets_length: frozenset[str] = LENGTH_SET
    server_answers: frozenset[str] = frozenset()
    fails_midstream: bool = False
    # app -> reason: a forkserve bug that makes this case fail for that app (strict xfail).
    xfail: dict[str, str] = field(default_factory=dict)

    @property
    def head(self) -> bool:
        return self.request.startswith(b"HEAD ")


MIDSTREAM_PART = b"first part\n"  # what /stream-error sends before it raises
COOKIE_HEADER = 'session="abc def"; theme=dark; list="a\\054b\\073c"'
FAR_FUTURE = "Fri, 01 Jan 2100 00:00:00 GMT"

CASES = [
    Case("text", build("GET", "/text")),
    Case("head_text", build("HEAD", "/text")),
    Case("odd_header_values", build("GET", "/headers")),
    # No chunked coding in HTTP/1.0: a body of unknown length ends with the connection.
    Case("http10_stream", build("GET", "/stream", version="1.0"), sets_length=frozenset()),
    Case("json", build("POST", "/json", (("Content-Type", "application/json"),), JSON_IN)),
    Case("cookies_set", build("GET", "/cookies/set")),
    Case("cookies_delete", build("GET", "/cookies/delete", (("Cookie", COOKIE_HEADER),))),
    Case("redirect_301_relative", build("GET", "/redirect/301")),
    Case("redirect_302_absolute", build("GET", "/redirect/302")),
    Case("redirect_307_post", build("POST", "/redirect/307",
                                    (("Content-Type", "application/x-www-form-urlencoded"),),
                                    b"keep=this")),
    Case("no_content_204", build("GET", "/empty"), sets_length=frozenset()),
    Case("not_modified_304", build("GET", "/not-modified", (("If-None-Match", '"v1"'),)),
         sets_length=frozenset()),
    Case("stream", build("GET", "/stream"), sets_length=frozenset()),
    Case("head_stream", build("HEAD", "/stream"), sets_length=frozenset()),
    Case("file", build("GET", "/file"), sets_length=ALL),
    Case("head_file", build("HEAD", "/file"), sets_length=ALL),
    Case("file_range", build("GET", "/file", (("Range", "bytes=10-29"),)), sets_length=ALL),
    # Flask answers 304 (no Content-Length); Django's and Starlette's FileResponse ignore it.
    Case("file_if_modified_since", build("GET", "/file", (("If-Modified-Since", FAR_FUTURE),)),
         sets_length=ALL - {"flask"}),
    # Starlette answers the error itself (ServerErrorMiddleware, then re-raises).
    Case("error_before_start", build("GET", "/error"), sets_length=frozenset({"starlette"}),
         server_answers=frozenset({"flask", "django", "django_asgi"})),
    Case("error_midstream", build("GET", "/stream-error"), sets_length=frozenset(),
         fails_midstream=True),
    Case("error_midstream_with_length", build("GET", "/stream-error?length=64"),
         sets_length=ALL, fails_midstream=True),
    Case("path_unicode", build("GET", "/path/caf%C3%A9/%E2%9C%93/%F0%9F%90%8D")),
    Case("path_encoded", build("GET", "/path/a%2Fb/c%20d/e%3Ff/100%25/semi;colon?x=%2F")),
    Case("query", build("GET", "/query?a=1&a=2&b=x+y%20z&c=%26%3D%3F&d=&e&%C3%A9=%E2%82%AC"
                               "&f=%2F&a=3")),
    Case("form_urlencoded", build("POST", "/form",
                                  (("Content-Type", "application/x-www-form-urlencoded"),),
                                  FORM)),
    Case("multipart_upload", build("POST", "/upload", (
        ("Content-Type", f"multipart/form-data; boundary={BOUNDARY}"),), UPLOAD)),
    Case("large_body_2mib", build("POST", "/hash", (("Content-Type", "application/octet-stream"),),
                                  BIG)),
    Case("chunked_body", build("POST", "/hash", (("Content-Type", "application/octet-stream"),),
                               chunks=[BIG[:1], BIG[1:11], BIG[11:4107], BIG[4107:69643],
                                       BIG[69643:300000]])),
    Case("echo_1mib", build("POST", "/echo", (("Content-Type", "application/octet-stream"),),
                            BIG[:1024 * 1024])),
]

PARAMS = [pytest.param(app, case, id=f"{app}-{case.name}",
                       marks=[pytest.mark.xfail(strict=True, reason=case.xfail[app])]
                       if app in case.xfail else [])
          for app in DIFF_APPS for case in CASES]


# -- reading and comparing the answers -----------------------------------------------------------

def fetch(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send `request` on a new connection to 127.0.0.1:`port`; everything received until the
    server closes (a reset after some bytes ends the answer too)."""
    received = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        try:
            while data := sock.recv(65536):
                received.append(data)
        except ConnectionResetError:
            pass
    return b"".join(received)


@dataclass
class Answer:
    """One response as it came off the wire.

    framing: how the body was delimited: 'content-length', 'chunked', 'close' (until the end
        of the connection), or 'none' (HEAD, 1xx, 204, 304).
    complete: the body's framing was satisfied (always True for 'close' and 'none').
    rest: bytes received after the end of the message.
    """

    version: str  # not compared: HTTP/1.1 (h11) or the request's version (gunicorn) are fine
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    framing: str
    complete: bool
    rest: bytes

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key == name]
        return ", ".join(values) if values else None


def dechunk(data: bytes) -> tuple[bytes, bool, bytes]:
    """(body, whether the last chunk and the trailer section arrived, bytes after them)."""
    body = []
    while True:
        line, sep, after = data.partition(b"\r\n")
        try:
            size = int(line.split(b";")[0], 16) if sep else -1
        except ValueError:
            size = -1
        if size < 0:  # cut off, or something else where a chunk size should be
            return b"".join(body), False, data
        if size == 0:  # the last chunk, then trailer fields up to an empty line
            if after.startswith(b"\r\n"):
                return b"".join(body), True, after[2:]
            _, end, rest = after.partition(b"\r\n\r\n")
            return b"".join(body), bool(end), rest
        body.append(after[:size])
        if after[size:size + 2] != b"\r\n":  # cut off inside the chunk, or malformed
            return b"".join(body), False, after[size:]
        data = after[size + 2:]


def parse(raw: bytes, head: bool) -> Answer:
    """The response in `raw`, the bytes of a whole connection (`head`: it answers HEAD)."""
    head_bytes, sep, after = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw[:300]!r}"
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    assert version in ("HTTP/1.1", "HTTP/1.0"), status_line
    headers = [(name.lower(), value.strip(" \t"))
               for name, _, value in (line.partition(":") for line in lines)]
    answer = Answer(version, int(status), headers, b"", "none", True, after)
    if head or answer.status in (204, 304) or answer.status < 200:
        return answer
    length = answer.header("content-length")
    if (answer.header("transfer-encoding") or "").lower().endswith("chunked"):
        answer.framing = "chunked"
        answer.body, answer.complete, answer.rest = dechunk(after)
    elif length is not None:
        answer.framing = "content-length"
        answer.body, answer.rest = after[:int(length)], after[int(length):]
        answer.complete = len(answer.body) == int(length)
    else:
        answer.framing, answer.body, answer.rest = "close", after, b""
    return answer


# Headers a server adds or replaces on its own account (Content-Length only when the app did
# not set it: see Case.sets_length).
SERVER_CHOSEN = frozenset({"date", "server", "connection", "keep-alive", "transfer-encoding",
                           "content-length"})


def shown(body: bytes) -> bytes | tuple[int, str, bytes]:
    """A body as compared: itself, or (length, sha256, first bytes) when large."""
    if len(body) <= 4096:
        return body
    return len(body), hashlib.sha256(body).hexdigest(), body[:64]


def comparable(app: str, case: Case, answer: Answer) -> dict:
    """What of `answer` must be the same from both servers (see the module's docstring)."""
    if app in case.server_answers:
        return {"status": answer.status}
    sets_length = app in case.sets_length
    headers = sorted((name, value) for name, value in answer.headers
                     if name not in SERVER_CHOSEN or (name == "content-length" and sets_length))
    return {"status": answer.status, "headers": headers, "body": shown(answer.body),
            "framing": answer.framing if sets_length else "server's choice"}


def check_message(server: str, app: str, case: Case, answer: Answer) -> None:
    """What each answer must be on its own: one well-framed message and nothing after it,
    framed by the app's Content-Length when the app set one.

    An error in the middle of a stream (`fails_midstream`) cannot be told to the client but by
    cutting the body short: both servers must answer 200 (and the same headers, compared by
    `comparable`), deliver what the app sent before it failed, end the connection without
    completing the body when its framing can show that (no last chunk, or fewer bytes than
    Content-Length; an answer delimited by the close cannot), and send nothing after it: no
    second response.
    """
    where = f"{server} answering {case.name} of {app}"
    assert answer.rest == b"", f"{where}: bytes after the message: {answer.rest[:300]!r}"
    assert not (answer.header("content-length") and answer.header("transfer-encoding")), where
    if app in case.sets_length and answer.framing != "none":
        assert answer.framing == "content-length", f"{where}: the app's Content-Length unused"
    if case.fails_midstream:
        assert answer.status == 200, where
        assert answer.body == MIDSTREAM_PART, f"{where}: body {answer.body!r}"
        assert not answer.complete or answer.framing == "close", f"{where}: the cut is hidden"
    else:
        assert answer.complete, (
            f"{where}: body cut short ({answer.framing}, {len(answer.body)} B)")


def assert_same(app: str, case: Case, ours: Answer, theirs: Answer, peer: str) -> None:
    """The comparison of every case: each answer well formed, and both alike."""
    check_message("forkserve", app, case, ours)
    check_message(peer, app, case, theirs)
    assert comparable(app, case, ours) == comparable(app, case, theirs)


@pytest.mark.parametrize(("pair", "case"), PARAMS, indirect=["pair"], scope="module")
def test_same_answer_as_peer(pair: Pair, case: Case) -> None:
    """forkserve answers `case` as the peer server does, for the same app."""
    ours = parse(fetch(pair.forkserve.port, case.request), case.head)
    theirs = parse(fetch(pair.peer.port, case.request), case.head)
    assert_same(pair.app, case, ours, theirs, pair.peer.name)
