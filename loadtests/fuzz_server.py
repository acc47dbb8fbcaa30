"""A long fuzz run of the real server: generated and mutated requests over real sockets.

Run from the repository root, with the project's environment::

    python loadtests/fuzz_server.py                                  # 10 minutes, both apps
    python loadtests/fuzz_server.py --duration 60 --app asgi --seed 7
    python loadtests/fuzz_server.py --app wsgi --seed 7 --case 12.31  # replay one exchange
    python loadtests/fuzz_server.py --app wsgi --seed 7 --case 12     # replay a whole batch
    python loadtests/fuzz_server.py --target 127.0.0.1:8000          # a server run elsewhere

``tests/test_fuzz.py`` fuzzes the sans-I/O HTTP connection alone; this script fuzzes what the
workers make of it. It starts ``python -m forkserve tests.apps.wsgiapp:app`` (or the ASGI
app, or one after the other with ``--app both``, sharing ``--duration``) on a free loopback
port with ``--workers`` workers and ``--limit-request-body 65536``, in its own process group
that is killed whatever happens (Ctrl-C included), its output in
``loadtests/out/fuzz/server-APP-PID.log``. Then it sends batches of ``--batch`` exchanges, 16 at a
time, each on a new connection:

* valid pipelines (GET/HEAD/POST..., Content-Length or chunked bodies with extensions and
  trailers, Expect: 100-continue, HTTP/1.0, absolute-form targets, bodies that look like
  requests or response heads), each owed an exact answer;
* designed malformed requests (conflicting or malformed framing headers, huge, negative, hex
  and overflowing Content-Length and chunk sizes, control bytes in chunk extensions and
  trailers, bare CR, obs-fold, bad methods, versions and Hosts, oversized heads) behind 0-2
  valid requests and followed by a canary request that must never be answered;
* mutations of a valid request (byte and bit flips, insertions of tokens and framing fields,
  deletions, repeats, numbers swapped for extreme ones, altered line ends) behind valid ones;
* random bytes and random HTTP token soup;
* valid pipelines cut short and then half-closed, closed or reset;

each split at random points with small pauses, or trickled for at most 1.5 s.

Invariants checked on every exchange: each response is well-formed HTTP/1.1; well-formed
requests get exactly their answer, in order; a refusal (400, 413, 414, 431, 501, 505) or 500
says Connection: close, is the last response and is followed by the close; nothing follows a
response that announced the close (no desync: the canary is never answered); a designed
malformed request gets one of its statuses, never a 2xx (unless its fault is in a body the
app answered without reading); never more answers than request lines; no response header
carries bytes from a request body (no injection). One outcome is excused, as README documents
it: a client that half-closes right after its requests may have a streamed answer ended by its
EOF, when the server reads the EOF after the stream began (tallied in the summary).
After each batch: a plain GET is answered 200 within 2 s, the master is alive, every worker
is still the same process or was recycled by the server itself (its log says so), and the
error log holds no traceback or error that is not an app's (``error handling ...``; those
are tallied, not findings).

Each exchange is generated from its own random.Random(f"{seed}:{app}:{batch}.{index}"), so any
one replays alone (``--case``; a whole batch replays one exchange at a time, reading the log
after each). A failing exchange's bytes go to ``loadtests/out/fuzz/APP-SEED-CASE-KIND.bin``
and what happened to ``.txt`` beside it, with a one-line repro.

Progress is printed every 10 s, a summary at the end. Exit status: 0 no invariant broken,
1 findings, 2 setup problem (the server does not start, bad arguments), 130 interrupted.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT_DIR = HERE / "out" / "fuzz"
APPS = {"wsgi": "tests.apps.wsgiapp:app", "asgi": "tests.apps.asgiapp:app"}

EXIT_OK, EXIT_FINDINGS, EXIT_SETUP, EXIT_INTERRUPTED = 0, 1, 2, 130

BODY_LIMIT = 65536  # the server's --limit-request-body: a 413 costs 64 KiB, not 100 MiB
MAX_BODY = 30000  # valid bodies stay well below it
CONCURRENCY = 16  # exchanges in flight; most of the time they wait on the network
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
RESPONSE_WAIT = 5.0  # for an owed response, or the close announced by one
IDLE_WAIT = 0.5  # once nothing more is owed, this much silence ends an exchange
HEALTH_WAIT = 2.0
TRICKLE_SECONDS = 1.5
PAUSES = (0.0, 0.0, 0.001, 0.01, 0.05)  # between the pieces of a split exchange
PROGRESS_EVERY = 10.0
SAVED_PER_KIND = 3  # findings printed, and exchanges written to disk, per family and kind
LOG_SETTLE = 0.3  # for the server's log to catch up before it is read
RECV_SIZE = 65536

# How an exchange ends once everything was sent.
READ, HALF_CLOSE, CLOSE, RESET = "read", "half-close", "close", "reset"
# How the reading ended.
EOF, RESET_BY_PEER, SILENT, HUNG_UP, NO_CONNECTION = (
    "eof", "reset-by-server", "silent", "hung-up", "no-connection")

REFUSALS = frozenset({400, 413, 414, 431, 501, 505})
CLOSING = REFUSALS | {500}
ANSWERS = frozenset({200, 404}) | CLOSING

CANARY = b"POST /echo HTTP/1.1\r\nHost: canary\r\nContent-Length: 6\r\n\r\nCANARY"
CANARY_MARK = b"CANARY"
# Request bodies carry these; a response header holding one was injected from a body.
INJECTED = re.compile(rb"x-injected|x-smuggled", re.IGNORECASE)
BAIT = (
    b"GET /smuggled HTTP/1.1\r\nHost: s\r\nX-Smuggled: 1\r\n\r\n",
    b"\r\n\r\nHTTP/1.1 200 OK\r\nX-Injected: 1\r\nContent-Length: 0\r\n\r\n",
    b"0\r\n\r\n",
    b"\r\nX-Injected: body\r\n",
    b"POST /echo HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nX-Smuggled: 2\r\n\r\nabc",
    b"Transfer-Encoding: chunked\r\n",
)
STREAM_BODY = b"piece 0\npiece 1\npiece 2\n"
ROUTES = {b"/echo": b"", b"/hello": b"Hello, World!", b"/ignore-body": b"ignored",
          b"/stream": STREAM_BODY, b"/pid": None}  # path -> answer body (None: any)
BODY_METHODS = (b"POST", b"PUT", b"PATCH", b"DELETE")
HOSTS = (b"t", b"example.org", b"example.org:8080", b"[::1]:8000", b"", b"127.0.0.1")
EXTRA_FIELDS = ((b"User-Agent", b"fuzz_server/1"), (b"Accept", b"*/*"), (b"X-Tab", b"a\tb"),
                (b"X-Latin1", b"caf\xe9"), (b"X-Empty", b""), (b"Cookie", b"a=b; c=d"),
                (b"X-Quoted", b'"a, b"'), (b"Accept-Encoding", b"gzip, deflate"))
CONTROLS = tuple(bytes([c]) for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F))
ALNUM = b"abcdefghijklmnopqrstuvwxyz0123456789"


class SetupError(Exception):
    """The run cannot start: bad arguments, or the server does not come up."""


# -- exchanges and what they are owed --------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What a well-formed request must get: a 200 with this body (None: any body)."""

    body: bytes | None
    head: bool = False  # it was a HEAD request: the response has no body


@dataclass(frozen=True)
class Expect:
    """What an exchange is owed, beyond the invariants every exchange must keep.

    `answers` for the well-formed requests sent first, in order. Then, if `refusal` is set,
    a malformed request that must get one of these statuses (or, when `app_may_answer`, the
    200 of an app that answered without reading the malformed body) and the close. With
    `open_end`, what follows the answers is unknown (mutated, random or cut bytes).
    """

    answers: tuple[Answer, ...] = ()
    refusal: frozenset[int] = frozenset()
    app_may_answer: bool = False
    open_end: bool = False


@dataclass(frozen=True)
class Case:
    """One exchange: bytes sent on a new connection in timed pieces, then an ending."""

    ident: str  # "BATCH.INDEX"
    family: str
    data: bytes
    pieces: tuple[tuple[int, float], ...]  # (end offset in data, pause before sending it)
    ending: str
    expect: Expect


@dataclass(frozen=True)
class Draft:
    family: str
    data: bytes
    expect: Expect
    ending: str = READ


# -- well-formed requests ---------------------------------------------------------------------


def compose(method: bytes, target: bytes, fields: Sequence[tuple[bytes, bytes]],
            body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    """A request from its parts, byte for byte (nothing is checked)."""
    lines = [b"%s %s %s\r\n" % (method, target, version)]
    lines += [b"%s: %s\r\n" % pair for pair in fields]
    return b"".join(lines) + b"\r\n" + body


def _word(rng: random.Random, size: int) -> bytes:
    return bytes(rng.choice(ALNUM) for _ in range(size))


def _spell(rng: random.Random, name: bytes) -> bytes:
    return rng.choice((name, name.lower(), name.upper()))


def header_fields(rng: random.Random, host: bool = True) -> list[tuple[bytes, bytes]]:
    """Valid fields in random order and spelling: Host (if `host`) and 0-3 others."""
    fields = [(_spell(rng, b"Host"), rng.choice(HOSTS))] if host else []
    fields += rng.sample(EXTRA_FIELDS, rng.randint(0, 3))
    if rng.random() < 0.1:
        fields.append((b"X-Long", _word(rng, rng.randint(100, 4000))))
    # Optional white space around values (RFC 9112 §5.1).
    fields = [(name, rng.choice((b"", b" ", b"\t")) + value + rng.choice((b"", b" ", b"\t")))
              for name, value in fields]
    rng.shuffle(fields)
    return fields


def body_bytes(rng: random.Random) -> bytes:
    """A request body: random bytes, runs of one byte, and bait that looks like HTTP."""
    parts = []
    for _ in range(rng.randint(0, 4)):
        roll = rng.random()
        if roll < 0.4:
            parts.append(rng.choice(BAIT))
        elif roll < 0.8:
            parts.append(rng.randbytes(rng.randint(1, 64)))
        else:
            parts.append(b"x" * rng.randint(1, rng.choice((100, 3000, 20000))))
    return b"".join(parts)[:MAX_BODY]


def _chunk(rng: random.Random, data: bytes, last: bool = False) -> bytes:
    """One chunk (or the last chunk, empty): hex size in either case with leading zeros,
    optionally valid extensions."""
    size = rng.choice((b"%x", b"%X")) % len(data)
    ext = rng.choice((b"", b"", b";a", b";a=b", b';a="q;\\"x"', b";a=b;c=d"))
    line = b"0" * rng.choice((0, 0, 1, 2)) + size + ext + b"\r\n"
    return line if last else line + data + b"\r\n"


def chunked(rng: random.Random, body: bytes) -> bytes:
    """`body` in chunks of random sizes, the last chunk, and maybe trailer fields."""
    out, pos = [], 0
    while pos < len(body):
        size = rng.choice((1, 7, 100, len(body) - pos))
        out.append(_chunk(rng, body[pos:pos + size]))
        pos += size
    out.append(_chunk(rng, b"", last=True))
    out.append(rng.choice((b"", b"", b"X-Trailer: v\r\n", b"X-A: 1\r\nX-B: 2\r\n")) + b"\r\n")
    return b"".join(out)


def valid_request(rng: random.Random, close: bool, head_ok: bool = True) -> tuple[bytes, Answer]:
    """A well-formed request to one of the test apps' routes and the answer it is owed.

    With `close` it ends the connection (Connection: close or HTTP/1.0). `head_ok`: it may be
    a HEAD request (whose response has no body: responses can only be read knowing that).
    """
    route = rng.choice(sorted(ROUTES))
    version = b"HTTP/1.0" if close and rng.random() < 0.2 else b"HTTP/1.1"
    fields = header_fields(rng, host=version == b"HTTP/1.1" or rng.random() < 0.5)
    methods = [b"GET", b"GET", *BODY_METHODS] + ([b"HEAD"] if head_ok else [])
    method = rng.choice(methods)
    body = encoded = b""
    if method in BODY_METHODS:
        body = body_bytes(rng)
        if version == b"HTTP/1.1" and rng.random() < 0.4:
            encoded = chunked(rng, body)
            fields.append((_spell(rng, b"Transfer-Encoding"), rng.choice((b"chunked", b"Chunked"))))
        else:
            encoded = body
            fields.append((_spell(rng, b"Content-Length"),
                           b"0" * rng.choice((0, 0, 0, 2)) + b"%d" % len(body)))
        if route == b"/echo" and rng.random() < 0.15:
            fields.append((b"Expect", b"100-continue"))
    if close and version == b"HTTP/1.1":
        fields.append((b"Connection", b"close"))
    rng.shuffle(fields)
    target = route
    if rng.random() < 0.2:
        target += b"?size=%d" % rng.choice((7, 100, 4096)) if route == b"/echo" else b"?q=1"
    if rng.random() < 0.1:
        target = b"http://" + rng.choice(HOSTS[:3]) + target  # absolute form
    if method == b"HEAD":
        answer = Answer(b"", head=True)
    else:
        answer = Answer(body if route == b"/echo" else ROUTES[route])
    return compose(method, target, fields, encoded, version), answer


def valid_pipeline(rng: random.Random, count: int, close: bool) -> list[tuple[bytes, Answer]]:
    """`count` well-formed requests; with `close` the last one ends the connection."""
    return [valid_request(rng, close=close and i == count - 1) for i in range(count)]


def _prefix(rng: random.Random) -> tuple[bytes, tuple[Answer, ...]]:
    """0-2 well-formed keep-alive requests to send before something else."""
    requests = valid_pipeline(rng, rng.choice((0, 0, 1, 2)), close=False)
    return b"".join(raw for raw, _ in requests), tuple(answer for _, answer in requests)


# -- malformed requests -----------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """A family of malformed requests: a builder (rng, target) -> bytes and the statuses
    allowed for its members. `in_body`: the fault is in a chunked body, after a valid head."""

    build: Callable[[random.Random, bytes], bytes]
    statuses: frozenset[int]
    in_body: bool = False


def _request(rng: random.Random, target: bytes, extra: Sequence[tuple[bytes, bytes]],
             body: bytes = b"", method: bytes = b"POST", version: bytes = b"HTTP/1.1",
             host: bool = True) -> bytes:
    fields = header_fields(rng, host) + list(extra)
    rng.shuffle(fields)
    return compose(method, target, fields, body, version)


def _insert(rng: random.Random, data: bytes, token: bytes, end: int | None = None) -> bytes:
    """`token` inserted at a random position of `data` (before `end`)."""
    at = rng.randint(0, len(data) if end is None else end)
    return data[:at] + token + data[at:]


def _chunked_post(rng: random.Random, target: bytes, fault: bytes) -> bytes:
    """A chunked POST whose body is 0-2 valid chunks and then `fault`."""
    body = b"".join(_chunk(rng, _word(rng, rng.randint(1, 9))) for _ in range(rng.randint(0, 2)))
    return _request(rng, target, [(b"Transfer-Encoding", b"chunked")], body + fault)


def _get(rng: random.Random, target: bytes) -> bytes:
    return _request(rng, target, [], method=b"GET")


def _field(name: bytes, *values: bytes) -> Callable[[random.Random, bytes], bytes]:
    """A family: a POST with one of `values` in field `name`, and a 5-byte body."""
    return lambda rng, target: _request(rng, target, [(name, rng.choice(values))], b"abcde")


def _bad_cl_and_te(rng: random.Random, target: bytes) -> bytes:
    framing = [(b"Content-Length", b"5"), (b"Transfer-Encoding", rng.choice((b"chunked",
                                                                            b"Chunked")))]
    return _request(rng, target, framing, b"0\r\n\r\n")


def _bad_cl_twice(rng: random.Random, target: bytes) -> bytes:
    lengths = [(b"Content-Length", rng.choice((b"3", b"4"))),
               (b"content-length", rng.choice((b"3", b"4", b"03")))]
    return _request(rng, target, lengths, b"abcd")


def _bad_te_twice(rng: random.Random, target: bytes) -> bytes:
    codings = [(b"Transfer-Encoding", b"chunked"),
               (b"Transfer-Encoding", rng.choice((b"chunked", b"gzip", b"identity")))]
    return _request(rng, target, codings, b"0\r\n\r\n")


def _bad_te_http10(rng: random.Random, target: bytes) -> bytes:
    return _request(rng, target, [(b"Transfer-Encoding", b"chunked")], b"0\r\n\r\n",
                    version=b"HTTP/1.0", host=rng.random() < 0.5)


def _bad_bare_cr(rng: random.Random, target: bytes) -> bytes:
    raw = _get(rng, target)
    spots = [i for i in range(len(raw) - 3) if raw[i] != ord("\n")]  # so the CR stays bare
    at = rng.choice(spots)
    return raw[:at] + b"\r" + raw[at:]


def _bad_control(rng: random.Random, target: bytes) -> bytes:
    raw = _get(rng, target)
    return _insert(rng, raw, rng.choice(CONTROLS), end=len(raw) - 4)


def _bad_obs_fold(rng: random.Random, target: bytes) -> bytes:
    folded = b"a\r\n" + rng.choice((b" ", b"\t", b"  ")) + b"b"
    return _request(rng, target, [(b"X-Folded", folded)], method=b"GET")


def _bad_space_before_colon(rng: random.Random, target: bytes) -> bytes:
    name = rng.choice((b"X-A", b"Host", b"Content-Length")) + rng.choice((b" ", b"\t"))
    return _request(rng, target, [(name, b"1")], method=b"GET")


def _bad_method(rng: random.Random, target: bytes) -> bytes:
    method = rng.choice((b"G(T", b"GE\x01T", b"G@T", b"", b"[GET]", b"GE/T", b"GET\x7f",
                         b"G\xc3\x89T", b"GE T"))
    return _request(rng, target, [], method=method)


def _bad_http09(rng: random.Random, target: bytes) -> bytes:
    return b"GET " + target + b"\r\n\r\n"


def _version(*versions: bytes) -> Callable[[random.Random, bytes], bytes]:
    return lambda rng, target: _request(rng, target, [], method=b"GET",
                                        version=rng.choice(versions))


def _bad_no_host(rng: random.Random, target: bytes) -> bytes:
    return _request(rng, target, [], method=b"GET", host=False)


def _bad_two_hosts(rng: random.Random, target: bytes) -> bytes:
    return _request(rng, target, [(b"Host", rng.choice((b"b", b"t")))], method=b"GET")


def _bad_host(rng: random.Random, target: bytes) -> bytes:
    host = rng.choice((b"a b", b"a/b", b"a@b", b"a\\b", b"[::1", b"a:b:c", b"a:80x", b"<a>",
                       b'a"b'))
    return _request(rng, target, [(b"Host", host)], method=b"GET", host=False)


def _bad_long_line(rng: random.Random, target: bytes) -> bytes:
    return _get(rng, target + b"?q=" + b"a" * rng.randint(8200, 12000))


def _bad_big_field(rng: random.Random, target: bytes) -> bytes:
    return _request(rng, target, [(b"X-Big", b"a" * rng.randint(8200, 12000))], method=b"GET")


def _bad_many_fields(rng: random.Random, target: bytes) -> bytes:
    fields = [(b"X-F%d" % i, b"v") for i in range(rng.randint(101, 150))]
    return _request(rng, target, fields, method=b"GET")


def _bad_big_head(rng: random.Random, target: bytes) -> bytes:
    fields = [(b"X-F%d" % i, b"a" * 4000) for i in range(rng.randint(17, 20))]  # > 64 KiB
    return _request(rng, target, fields, method=b"GET")


def _bad_chunk_size(rng: random.Random, target: bytes) -> bytes:
    size = rng.choice((b"zz", b"-3", b"+3", b"0x3", b"", b"3.0", b"3_0", b"3 3", b";a", b"\xff3"))
    return _chunked_post(rng, target, size + b"\r\nabc\r\n0\r\n\r\n")


def _bad_chunk_overflow(rng: random.Random, target: bytes) -> bytes:
    size = b"%x" % rng.randrange(1 << 63, 1 << rng.choice((64, 68, 80)))  # past int64
    return _chunked_post(rng, target, b"0" * rng.randint(0, 3) + size + b"\r\nabc\r\n0\r\n\r\n")


def _bad_chunk_over_limit(rng: random.Random, target: bytes) -> bytes:
    size = rng.randint(BODY_LIMIT + 1, 1 << 40)  # refused from the size, before any data
    return _chunked_post(rng, target, b"%x\r\nabc\r\n0\r\n\r\n" % size)


def _bad_chunk_ext(rng: random.Random, target: bytes) -> bytes:
    ext = b";" + _insert(rng, b"name=value", rng.choice((*CONTROLS, b"\r")))
    last = rng.random() < 0.5
    return _chunked_post(rng, target, b"0" + ext + b"\r\n\r\n" if last
                         else b"3" + ext + b"\r\nabc\r\n0\r\n\r\n")


def _bad_chunk_length(rng: random.Random, target: bytes) -> bytes:
    data = _word(rng, rng.randint(3, 9))
    size = len(data) + rng.choice((-2, -1, 1, 2, 3, 5))  # the canary follows: never aligned
    return _chunked_post(rng, target, b"%x\r\n%s\r\n0\r\n\r\n" % (size, data))


def _bad_chunk_lf(rng: random.Random, target: bytes) -> bytes:
    return _chunked_post(rng, target, rng.choice((b"3\nabc\r\n0\r\n\r\n", b"3\r\nabc\n0\r\n\r\n",
                                                  b"3\r\nabc\r\n0\n\r\n")))


def _bad_trailer(rng: random.Random, target: bytes) -> bytes:
    line = rng.choice((b"Bad Trailer", b"X-T : v", b"X-T: a\x00b", b"X-T: a\rb", b": v",
                       b"X\x01T: v", b"X-T v"))
    return _chunked_post(rng, target, b"0\r\n" + line + b"\r\n\r\n")


def _bad_trailer_control(rng: random.Random, target: bytes) -> bytes:
    value = _insert(rng, b"value", rng.choice(CONTROLS[1:]))  # NUL: _bad_trailer
    return _chunked_post(rng, target, b"0\r\nX-T: " + value + b"\r\n\r\n")


def _bad_trailer_fold(rng: random.Random, target: bytes) -> bytes:
    return _chunked_post(rng, target, b"0\r\nX-T: a\r\n" + rng.choice((b" ", b"\t")) + b"b\r\n\r\n")


def _bad_trailer_lf(rng: random.Random, target: bytes) -> bytes:
    ending = rng.choice((b"X-T: a\n\r\n", b"X-T: a\nY: b\r\n\r\n", b"X-T: a\r\n\n", b"\n"))
    return _chunked_post(rng, target, b"0\r\n" + ending)


def _bad_chunked_too_large(rng: random.Random, target: bytes) -> bytes:
    size = BODY_LIMIT // 2 + 1
    return _chunked_post(rng, target, b"%x\r\n%s\r\n" % (size, b"x" * size) * 2 + b"0\r\n\r\n")


_400 = frozenset({400})
BAD = {
    "cl-and-te": Bad(_bad_cl_and_te, _400),
    "cl-twice": Bad(_bad_cl_twice, _400),
    "cl-list": Bad(_field(b"Content-Length", b"3, 3", b"3,3", b"3, 4", b"3,", b",3"), _400),
    "cl-syntax": Bad(_field(b"Content-Length", b"+3", b"-3", b"0x3", b"3.0", b"1e3", b"3 3", b"",
                            b"three", b"3a", b"\xd9\xa3"), _400),
    "cl-overflow": Bad(_field(b"Content-Length", b"18446744073709551616", b"9" * 23, b"9" * 40),
                       frozenset({400, 413})),
    "cl-too-large": Bad(_field(b"Content-Length", b"%d" % (BODY_LIMIT + 1), b"1000000000000"),
                        frozenset({413})),
    "te-unsupported": Bad(_field(b"Transfer-Encoding", b"gzip", b"chunked, gzip", b"identity",
                                 b"gzip, chunked", b"chunked, chunked", b"xchunked", b"deflate"),
                          frozenset({400, 501})),
    "te-twice": Bad(_bad_te_twice, frozenset({400, 501})),
    "te-http10": Bad(_bad_te_http10, _400),
    "bare-cr": Bad(_bad_bare_cr, _400),
    "control-byte": Bad(_bad_control, _400),
    "obs-fold": Bad(_bad_obs_fold, _400),
    "space-before-colon": Bad(_bad_space_before_colon, _400),
    "bad-method": Bad(_bad_method, _400),
    "http-0.9": Bad(_bad_http09, _400),
    "bad-version": Bad(_version(b"HTTP/3", b"HTTP/1", b"HTTP/1.1.1", b"http/1.1", b"HTTP/01.1",
                                b"HTTP/1.10", b"HTTP /1.1", b"HTTP/1.x", b"HTTPS/1.1",
                                b"HTTP/1.1 ", b"HTTP/\xb9.1"), _400),
    # HTTP/1.2 to 1.9 are served as 1.1 (RFC 9110 §2.5): not among these.
    "version-unsupported": Bad(_version(b"HTTP/2.0", b"HTTP/0.9", b"HTTP/9.9"),
                               frozenset({505})),
    "no-host": Bad(_bad_no_host, _400),
    "two-hosts": Bad(_bad_two_hosts, _400),
    "bad-host": Bad(_bad_host, _400),
    "line-too-long": Bad(_bad_long_line, frozenset({414})),
    "field-too-large": Bad(_bad_big_field, frozenset({431})),
    "too-many-fields": Bad(_bad_many_fields, frozenset({431})),
    "head-too-large": Bad(_bad_big_head, frozenset({431})),
    "chunk-size": Bad(_bad_chunk_size, _400, in_body=True),
    "chunk-size-overflow": Bad(_bad_chunk_overflow, _400, in_body=True),
    "chunk-over-limit": Bad(_bad_chunk_over_limit, frozenset({413}), in_body=True),
    "chunk-ext-control": Bad(_bad_chunk_ext, _400, in_body=True),
    "chunk-length": Bad(_bad_chunk_length, _400, in_body=True),
    "chunk-bare-lf": Bad(_bad_chunk_lf, _400, in_body=True),
    "trailer": Bad(_bad_trailer, _400, in_body=True),
    "trailer-control": Bad(_bad_trailer_control, _400, in_body=True),
    "trailer-obs-fold": Bad(_bad_trailer_fold, _400, in_body=True),
    "trailer-bare-lf": Bad(_bad_trailer_lf, _400, in_body=True),
    "chunked-too-large": Bad(_bad_chunked_too_large, frozenset({413}), in_body=True),
}


# -- mutations --------------------------------------------------------------------------------

SPECIAL = b"\x00\t\n\r \x7f\x80\xff:;,\"-+0"
TOKENS = (b"\r", b"\n", b"\r\n", b"\r\n\r\n", b" ", b"\t", b"\x00", b"\x01", b"\x7f", b"\xff",
          b":", b";", b",", b"=", b'"', b"\\", b"0", b"-", b"chunked", b"HTTP/1.1", b"0\r\n\r\n",
          b"\r\n ", b"%00", b"?", b"#", b"/", b"..", b"ffffffffffffffffff",
          b"GET /smuggled HTTP/1.1\r\nHost: s\r\nX-Smuggled: 3\r\n\r\n")
FRAMING_FIELDS = (b"Content-Length: 0\r\n", b"Content-Length: 5\r\n", b"Content-Length: -1\r\n",
                  b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n",
                  b"Transfer-Encoding: chunked, identity\r\n", b"Host: x\r\n",
                  b"Expect: 100-continue\r\n", b"Connection: close\r\n",
                  b"Connection: keep-alive\r\n", b"Content-Length : 5\r\n",
                  b"Transfer-Encoding:\x0bchunked\r\n", b" Transfer-Encoding: chunked\r\n")
NUMBERS = (b"0", b"00", b"-1", b"+1", b"-0", b"1", b"18446744073709551615",
           b"18446744073709551616", b"99999999999999999999", b"9" * 40, b"0x10", b"1e3", b"1.5",
           b" 1", b"1 ", b"ffffffffffffffff", b"10000000000000000", b"7fffffff", b"80000000",
           b"0" * 30 + b"1", b"%d" % (BODY_LIMIT + 1))
# A Content-Length value or a chunk size.
NUMBER = re.compile(rb"(?<=[\n: ])[0-9A-Fa-f]+(?=[\r\n;, ])")


def _spot(rng: random.Random, data: bytes) -> int:
    """A position in `data`, mostly in its head (where framing is decided)."""
    head = data.find(b"\r\n\r\n")
    end = head + 4 if head >= 0 and rng.random() < 0.7 else len(data)
    return rng.randrange(end)


def _mut_byte(rng: random.Random, data: bytes) -> bytes:
    at = _spot(rng, data)
    new = rng.choice(SPECIAL) if rng.random() < 0.5 else rng.randrange(256)
    return data[:at] + bytes([new]) + data[at + 1:]


def _mut_bit(rng: random.Random, data: bytes) -> bytes:
    at = _spot(rng, data)
    return data[:at] + bytes([data[at] ^ 1 << rng.randrange(8)]) + data[at + 1:]


def _mut_insert(rng: random.Random, data: bytes) -> bytes:
    at = _spot(rng, data)
    return data[:at] + rng.choice(TOKENS) + data[at:]


def _mut_delete(rng: random.Random, data: bytes) -> bytes:
    at = _spot(rng, data)
    return data[:at] + data[at + rng.randint(1, 8):]


def _mut_repeat(rng: random.Random, data: bytes) -> bytes:
    at = _spot(rng, data)
    end = at + rng.randint(1, 40)
    return data[:end] + data[at:end] + data[end:]


def _mut_field(rng: random.Random, data: bytes) -> bytes:
    """A header line repeated, or a framing field added (duplicate, conflicting framing)."""
    head = data.find(b"\r\n\r\n")
    if head < 0:
        return _mut_insert(rng, data)
    starts = [m.end() for m in re.finditer(rb"\r\n", data[:head + 2])]
    at = rng.choice(starts)
    if rng.random() < 0.5 and at < head:
        line = data[at:data.index(b"\r\n", at) + 2]
    else:
        line = rng.choice(FRAMING_FIELDS)
    return data[:at] + line + data[at:]


def _mut_number(rng: random.Random, data: bytes) -> bytes:
    numbers = list(NUMBER.finditer(data))
    if not numbers:
        return _mut_byte(rng, data)
    found = rng.choice(numbers)
    return data[:found.start()] + rng.choice(NUMBERS) + data[found.end():]


def _mut_line_end(rng: random.Random, data: bytes) -> bytes:
    ends = [m.start() for m in re.finditer(rb"\r\n", data)]
    if not ends:
        return _mut_byte(rng, data)
    at = rng.choice(ends)
    return data[:at] + rng.choice((b"\n", b"\r", b"\n\r", b"\r\r\n", b"")) + data[at + 2:]


MUTATIONS = (_mut_byte, _mut_bit, _mut_insert, _mut_delete, _mut_repeat, _mut_field,
             _mut_number, _mut_line_end)
SOUP = (b"GET", b"POST", b"PUT", b" ", b" ", b"/", b"/echo", b"/hello", b"?q=1", b"HTTP/1.1",
        b"HTTP/1.0", b"\r\n", b"\r\n", b"\n", b"\r", b"Host: t", b"Content-Length: ",
        b"Transfer-Encoding: chunked", b"Connection: close", b"5", b"0", b"12", b"abcde",
        b"0\r\n\r\n", b":", b";", b"\t", b"\x00", b"chunked", b"ffffffffffffffffff", b"\xff")


# -- drawing exchanges ------------------------------------------------------------------------


def _draw_valid(rng: random.Random) -> Draft:
    requests = valid_pipeline(rng, rng.randint(1, 4), close=True)
    return Draft("valid", b"".join(raw for raw, _ in requests),
                 Expect(tuple(answer for _, answer in requests)))


def _draw_bad(rng: random.Random) -> Draft:
    name = rng.choice(sorted(BAD))
    bad = BAD[name]
    prefix, answers = _prefix(rng)
    if bad.in_body:
        target = rng.choice((b"/echo", b"/echo", b"/hello", b"/ignore-body"))
    else:
        target = rng.choice(sorted(ROUTES))
    expect = Expect(answers, bad.statuses, app_may_answer=bad.in_body and target != b"/echo")
    return Draft(f"bad:{name}", prefix + bad.build(rng, target) + CANARY, expect)


def _draw_mutated(rng: random.Random) -> Draft:
    prefix, answers = _prefix(rng)
    raw, _ = valid_request(rng, close=rng.random() < 0.3, head_ok=False)
    for mutate in rng.choices(MUTATIONS, k=rng.randint(1, 4)):
        raw = mutate(rng, raw) or b"\r\n"  # deletions may leave nothing
    return Draft("mutated", prefix + raw + CANARY, Expect(answers, open_end=True))


def _draw_random(rng: random.Random) -> Draft:
    if rng.random() < 0.5:
        return Draft("random-bytes", rng.randbytes(rng.randint(1, 600)), Expect(open_end=True))
    soup = b"".join(rng.choices(SOUP, k=rng.randint(3, 40)))
    return Draft("token-soup", soup, Expect(open_end=True))


def _draw_cut(rng: random.Random) -> Draft:
    requests = valid_pipeline(rng, rng.randint(1, 3), close=rng.random() < 0.5)
    data = b"".join(raw for raw, _ in requests)
    cut = rng.randrange(len(data))
    complete, offset = [], 0
    for raw, answer in requests:
        offset += len(raw)
        if offset > cut:
            break
        complete.append(answer)
    ending = rng.choice((HALF_CLOSE, CLOSE, RESET))
    return Draft(f"cut:{ending}", data[:cut], Expect(tuple(complete), open_end=True), ending)


DRAWS = (_draw_valid, _draw_bad, _draw_mutated, _draw_random, _draw_cut)
WEIGHTS = (20, 30, 30, 8, 12)


def schedule(rng: random.Random, size: int, trickle: bool) -> tuple[tuple[int, float], ...]:
    """Piece boundaries of `size` bytes and the pause before each piece: a few random splits
    with short pauses, or (`trickle`) 10-60 pieces spread over at most TRICKLE_SECONDS."""
    if size == 0:
        return ()
    if trickle:
        count = min(size, rng.randint(10, 60))
        pause = TRICKLE_SECONDS / count
        cuts = [*sorted(rng.sample(range(1, size), count - 1)), size]
        return tuple((cut, rng.uniform(0.5, 1.0) * pause if i else 0.0)
                     for i, cut in enumerate(cuts))
    cuts = sorted({rng.randrange(1, size) for _ in range(rng.randint(0, 4)) if size > 1})
    return tuple((cut, rng.choice(PAUSES) if i else 0.0) for i, cut in enumerate([*cuts, size]))


def make_case(seed: int, label: str, batch: int, index: int) -> Case:
    """Exchange `index` of `batch`: the same for the same arguments, whatever ran before."""
    rng = random.Random(f"{seed}:{label}:{batch}.{index}")
    draft = rng.choices(DRAWS, WEIGHTS)[0](rng)
    trickle = draft.ending == READ and rng.random() < 0.06
    return Case(f"{batch}.{index}", draft.family + ("+trickle" if trickle else ""), draft.data,
                schedule(rng, len(draft.data), trickle), draft.ending, draft.expect)


# -- the wire ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transcript:
    received: bytes
    end: str  # EOF, RESET_BY_PEER, SILENT, HUNG_UP (ours, on purpose) or NO_CONNECTION
    sent: int
    seconds: float


def _drain(sock: socket.socket, received: bytearray) -> str:
    """Read what has arrived without waiting; EOF or RESET_BY_PEER if the server closed."""
    sock.settimeout(0)
    while True:
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            return ""
        except ConnectionResetError:
            return RESET_BY_PEER
        if not data:
            return EOF
        received += data


def _owed(received: bytes, expect: Expect) -> bool:
    """Is a response still owed, or the close that the last response announced?"""
    responses, problem, pending = parse_responses(received, [a.head for a in expect.answers],
                                                  eof=False)
    finals = [r for r in responses if r.status >= 200]
    if pending or len(finals) < len(expect.answers) + bool(expect.refusal):
        return not problem
    return bool(finals) and finals[-1].closes


def _read_rest(sock: socket.socket, received: bytearray, expect: Expect) -> str:
    """Read until the server closes, or it is silent too long: RESPONSE_WAIT while something
    is owed (always, unless `expect.open_end`), else IDLE_WAIT."""
    deadline = time.monotonic() + RESPONSE_WAIT
    quiet_since = time.monotonic()
    while True:
        now = time.monotonic()
        wait = deadline - now
        if expect.open_end and not _owed(received, expect):
            wait = min(wait, quiet_since + IDLE_WAIT - now)
        if wait <= 0:
            return SILENT
        sock.settimeout(wait)
        try:
            data = sock.recv(RECV_SIZE)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return RESET_BY_PEER
        if not data:
            return EOF
        received += data
        quiet_since = time.monotonic()


def converse(address: tuple[str, int], case: Case) -> Transcript:
    """Play `case` on a new connection: send its pieces (reading meanwhile; sending stops if
    the server closes), end as it says, and read what comes back."""
    started = time.monotonic()
    try:
        sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT)
    except OSError:
        return Transcript(b"", NO_CONNECTION, 0, time.monotonic() - started)
    received = bytearray()
    sent = 0
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = ""
        for stop, pause in case.pieces:
            time.sleep(pause)
            end = _drain(sock, received)
            if end:
                break
            sock.settimeout(RESPONSE_WAIT)
            try:
                sock.sendall(case.data[sent:stop])
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                break  # the server stopped reading or closed: what it said is still read below
            sent = stop
        if case.ending in (CLOSE, RESET):
            if case.ending == RESET:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return Transcript(bytes(received), HUNG_UP, sent, time.monotonic() - started)
        if case.ending == HALF_CLOSE and not end:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # already reset: the read below says so
        if not end:
            end = _read_rest(sock, received, case.expect)
    return Transcript(bytes(received), end, sent, time.monotonic() - started)


# -- reading responses ------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]  # names lower-cased
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = [value for key, value in self.headers if key == name]
        return b", ".join(values) if values else None

    @property
    def closes(self) -> bool:
        """It announces the close of the connection."""
        return b"close" in (self.header(b"connection") or b"").lower()


STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [\t\x20-\x7e\x80-\xff]*")
FIELD_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t\x20-\x7e\x80-\xff]*)")
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class Malformed(Exception):
    """Bytes from the server that are not an HTTP/1.1 response."""


def _fields(lines: list[bytes]) -> tuple[tuple[bytes, bytes], ...]:
    fields = []
    for line in lines:
        match = FIELD_LINE.fullmatch(line)
        if match is None:
            raise Malformed(f"bad header line {line[:80]!r}")
        fields.append((match.group(1).lower(), match.group(2).rstrip(b" \t")))
    return tuple(fields)


def _dechunk(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """A chunked body starting at `pos`: (body, end), or None if it is not all there."""
    parts = []
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        if not CHUNK_SIZE.fullmatch(data[pos:eol]):
            raise Malformed(f"bad chunk size line {data[pos:eol][:40]!r}")
        size = int(data[pos:eol], 16)
        pos = eol + 2
        if size == 0:
            break
        if len(data) < pos + size + 2:
            return None
        if data[pos + size:pos + size + 2] != b"\r\n":
            raise Malformed("chunk data not followed by CRLF")
        parts.append(data[pos:pos + size])
        pos += size + 2
    while True:  # trailer fields, then the blank line
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        if eol == pos:
            return b"".join(parts), eol + 2
        _fields([data[pos:eol]])
        pos = eol + 2


def parse_responses(data: bytes, heads: Sequence[bool], eof: bool
                    ) -> tuple[list[Response], str, bool]:
    """Split what a server sent into responses, strictly.

    `heads[i]` says whether the i-th final (non-1xx) response answers a HEAD request; `eof`:
    the server closed, so a body without framing ends here. Returns the complete responses,
    a description of the first malformed bytes ("" if none), and whether an incomplete
    response is left at the end.
    """
    responses: list[Response] = []
    pos = 0
    finals = 0
    try:
        while pos < len(data):
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                if not data.startswith(b"HTTP/1.1 "[:len(data) - pos], pos):
                    raise Malformed(f"not a status line: {data[pos:pos + 40]!r}")
                return responses, "", True
            lines = data[pos:end].split(b"\r\n")
            status_line = STATUS_LINE.fullmatch(lines[0])
            if status_line is None:
                raise Malformed(f"bad status line {lines[0][:80]!r}")
            status = int(status_line.group(1))
            headers = _fields(lines[1:])
            pos = end + 4
            head = status >= 200 and finals < len(heads) and heads[finals]
            names = [name for name, _ in headers]
            if names.count(b"content-length") > 1 or names.count(b"transfer-encoding") > 1 or (
                    b"content-length" in names and b"transfer-encoding" in names):
                raise Malformed("conflicting framing headers")
            framing = dict(headers)
            if status < 200 or status in (204, 304) or head:
                body = b""
            elif b"transfer-encoding" in framing:
                if framing[b"transfer-encoding"].lower() != b"chunked":
                    raise Malformed(f"transfer coding {framing[b'transfer-encoding']!r}")
                found = _dechunk(data, pos)
                if found is None:
                    return responses, "", True
                body, pos = found
            elif b"content-length" in framing:
                if not framing[b"content-length"].isdigit():
                    raise Malformed(f"Content-Length {framing[b'content-length']!r}")
                length = int(framing[b"content-length"])
                if len(data) < pos + length:
                    return responses, "", True
                body, pos = data[pos:pos + length], pos + length
            elif eof:
                body, pos = data[pos:], len(data)
            else:
                return responses, "", True
            responses.append(Response(status, headers, body))
            finals += status >= 200
    except Malformed as exc:
        return responses, f"{exc} at byte {pos}", False
    return responses, "", False


# -- judging an exchange ----------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    kind: str
    detail: str

    @property
    def signature(self) -> str:
        """What tells findings apart in the summary: the kind, and for a log entry its last
        line (the exception)."""
        if self.kind != "server-error-log":
            return self.kind
        return f"{self.kind}: {self.detail.strip().splitlines()[-1][:120]}"


@dataclass(frozen=True)
class Verdict:
    findings: list[Finding]
    statuses: list[int]  # of the responses received, 1xx included
    cut_stream: bool = False  # a half-closed client's stream ended by its EOF (see judge)


def _missing(end: str, what: str) -> Finding:
    if end == SILENT:
        return Finding("no-answer", f"{what}: nothing within {RESPONSE_WAIT:g} s")
    return Finding("closed-without-answer", f"{what}: the connection ended ({end})")


def _after(response: Response) -> Finding:
    if CANARY_MARK in response.body:
        return Finding("canary-answered", "the canary request behind a refused or closing "
                                          "request was answered (desync)")
    return Finding("response-after-close",
                   f"a {response.status} followed a response that closed the connection")


def judge(case: Case, transcript: Transcript) -> Verdict:
    """Every invariant `case` broke, judging by `transcript`, and the statuses it got."""
    if transcript.end == NO_CONNECTION:
        return Verdict([Finding("no-connection", "could not connect to the server")], [])
    if transcript.end == HUNG_UP:
        return Verdict([], [])
    expect = case.expect
    responses, problem, pending = parse_responses(
        transcript.received, [a.head for a in expect.answers],
        eof=transcript.end in (EOF, RESET_BY_PEER))
    finals = [r for r in responses if r.status >= 200]
    # Documented (README, ASGI): an EOF read while a response streams is the client leaving,
    # so a client that half-closes right after its requests may have a streamed answer ended
    # when its EOF is read after the stream began (the EOF races the request bytes). Only that
    # is excused: every answer before it whole and none saying close, the stream's head whole
    # (200, chunked) and its body well-formed as far as it came.
    cut_stream = (case.ending == HALF_CLOSE and pending and not problem
                  and transcript.end == EOF and len(finals) < len(expect.answers)
                  and expect.answers[len(finals)].body == STREAM_BODY
                  and not any(r.closes for r in finals)
                  and _streaming_head(transcript.received))
    if cut_stream:
        expect = replace(expect, answers=expect.answers[:len(finals)])
    findings = []
    if problem:
        findings.append(Finding("malformed-response", problem))
    elif pending and transcript.end == EOF and not cut_stream:
        findings.append(Finding("truncated-response", "the server closed mid-response"))
    for response in responses:
        if any(INJECTED.search(name + b":" + value) for name, value in response.headers):
            findings.append(Finding("injection", f"request body bytes in response headers: "
                                                 f"{response.headers!r}"[:300]))
        if response.status not in ANSWERS and response.status != 100:
            findings.append(Finding("unexpected-status", f"status {response.status}"))
    closed_at = next((i for i, r in enumerate(finals) if r.closes or r.status in CLOSING), None)
    if closed_at is not None:
        closer = finals[closed_at]
        if closer.status in CLOSING and not closer.closes:
            findings.append(Finding("refusal-keeps-alive",
                                    f"{closer.status} without Connection: close"))
        if closed_at + 1 < len(finals):
            findings.append(_after(finals[closed_at + 1]))
        elif transcript.end == SILENT:
            findings.append(Finding("not-closed", f"the connection stayed open "
                                                  f"{RESPONSE_WAIT:g} s after a {closer.status} "
                                                  f"that closes it"))
    answers = sum(r.status not in CLOSING for r in finals)
    request_lines = case.data.count(b"HTTP/1.")
    if answers > request_lines:
        findings.append(Finding("extra-response",
                                f"{answers} answers to {request_lines} request lines"))
    findings += _judge_owed(expect, finals, closed_at, transcript.end)
    unique = {f.kind: f for f in findings}  # one of each kind is enough
    return Verdict(list(unique.values()), [r.status for r in responses], cut_stream)


def _streaming_head(received: bytes) -> bool:
    """Does the last response `received` begin with a whole head of a 200 with a chunked
    body?"""
    start = received.rfind(b"HTTP/1.1 ")
    end = received.find(b"\r\n\r\n", start)
    if start < 0 or end < 0:
        return False
    status_line, *lines = received[start:end].split(b"\r\n")
    try:
        fields = dict(_fields(lines))
    except Malformed:
        return False
    return status_line.startswith(b"HTTP/1.1 200 ") \
        and fields.get(b"transfer-encoding", b"").lower() == b"chunked"


def _judge_owed(expect: Expect, finals: list[Response], closed_at: int | None,
                end: str) -> list[Finding]:
    """The answers owed to the well-formed requests, then to the malformed one. A server may
    close a keep-alive connection after any response that says so: nothing is owed after it
    (its followers are judged by judge())."""
    owed = len(expect.answers)
    for i, answer in enumerate(expect.answers):
        if i >= len(finals):
            return [_missing(end, f"valid request {i + 1} of {owed}")]
        response = finals[i]
        if response.status != 200 or answer.body is not None and response.body != answer.body:
            return [Finding("wrong-answer", f"valid request {i + 1} of {owed} got "
                                            f"{response.status} {response.body[:60]!r}, "
                                            f"expected 200 {(answer.body or b'')[:60]!r}")]
        if closed_at == i:
            return []
    if not expect.refusal:
        if not expect.open_end and len(finals) > owed:
            return [Finding("extra-response", f"{len(finals)} responses to {owed} requests")]
        return []
    if len(finals) <= owed:
        return [_missing(end, "malformed request")]
    response = finals[owed]
    if response.status in expect.refusal or (
            response.status == 200 and expect.app_may_answer and CANARY_MARK not in response.body):
        return []
    if 200 <= response.status < 300:
        return [Finding("accepted-malformed", f"malformed request got {response.status}")]
    return [Finding("wrong-status", f"malformed request got {response.status}, expected "
                                    f"{'/'.join(map(str, sorted(expect.refusal)))}")]


# -- the server -------------------------------------------------------------------------------


# A log record's first line: "[date] [pid] [LEVEL] message" (the log is read as latin-1).
RECORD = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[([A-Z]+)\] ",
                    re.MULTILINE)
RECYCLING = re.compile(r"\(pid (\d+)\) recycling")
CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


def log_blocks(text: str) -> list[int]:
    """Where the entries of a log start: a record's first line, or any other line (output
    that did not go through forkserve's logging, like an event loop's "Exception in
    callback") that does not continue a traceback. A traceback continues its entry up to
    and including its exception line."""
    starts, offset, in_traceback = [], 0, False
    for line in text.splitlines(keepends=True):
        if RECORD.match(line):
            starts.append(offset)
            in_traceback = False
        elif line.startswith("Traceback (most recent call last):"):
            in_traceback = True
        elif line[:1] in (" ", "\t") or not line.strip() or line.startswith(CHAINED):
            pass
        elif in_traceback:
            in_traceback = False  # the exception line ends the traceback
        else:
            starts.append(offset)
        offset += len(line)
    return starts


class Target:
    """A server to fuzz at `address`, run by someone else: only its answers are checked."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.app_errors: Counter[str] = Counter()  # tallied from the log, where there is one

    def alive(self) -> bool:
        """False once the server is known to be gone (the run stops then)."""
        return True

    def check(self) -> list[Finding]:
        """After a batch: findings if the server is no longer fine."""
        return self.health()

    def close(self) -> None:
        """Stop the server, if this run started it."""

    def health(self) -> list[Finding]:
        """A plain GET must get a 200 within HEALTH_WAIT."""
        request = b"GET /pid HTTP/1.1\r\nHost: health\r\nConnection: close\r\n\r\n"
        deadline = time.monotonic() + HEALTH_WAIT
        received, responses = b"", []
        try:
            with socket.create_connection(self.address, timeout=HEALTH_WAIT) as sock:
                sock.sendall(request)
                while not responses and time.monotonic() < deadline:
                    sock.settimeout(max(0.01, deadline - time.monotonic()))
                    data = sock.recv(RECV_SIZE)
                    received += data
                    responses = parse_responses(received, [False], eof=not data)[0]
                    if not data:
                        break
        except OSError as exc:
            return [Finding("unresponsive", f"a plain GET failed: {exc!r}")]
        if not responses or responses[0].status != 200:
            return [Finding("unresponsive", f"a plain GET got {received[:80]!r} within "
                                            f"{HEALTH_WAIT:g} s")]
        return []


class Forkserve(Target):
    """forkserve serving a test app in its own process group, its output in a log file.

    Besides the answers, checks its processes (the master alive; a worker gone only if the
    server recycled it) and its log (no traceback or error other than the app's).
    """

    def __init__(self, app: str, workers: int) -> None:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        # (Named by this run's pid: two runs at once must not read each other's port.)
        self.log_path = OUT_DIR / f"server-{app}-{os.getpid()}.log"
        command = [sys.executable, "-m", "forkserve", APPS[app], "-b", "127.0.0.1:0",
                   "-w", str(workers), "--limit-request-body", str(BODY_LIMIT)]
        if os.geteuid() == 0:
            command.append("--allow-root")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        _RUNNING.append(self)
        self._log_offset = 0
        self._recycled: set[int] = set()
        super().__init__(self._wait_ready(workers))
        self.workers = self._children()

    def _wait_ready(self, workers: int) -> tuple[str, int]:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and self.proc.poll() is None:
            text = self.log_path.read_text("latin-1")
            port = re.search(r"listening at http://127\.0\.0\.1:(\d+)", text)
            if port and f"ready: {workers} workers" in text:
                return "127.0.0.1", int(port.group(1))
            time.sleep(0.05)
        self.close()
        tail = self.log_path.read_text("latin-1")[-2000:]
        raise SetupError(f"forkserve did not become ready ({self.log_path}):\n{tail}")

    def _children(self) -> set[int]:
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return {int(pid) for pid in f.read().split()}
        except OSError:
            return set()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> list[Finding]:
        findings = self.health()
        if not self.alive():
            findings.append(Finding("master-died", f"the master exited ({self.proc.returncode})"))
        time.sleep(LOG_SETTLE)
        findings += self.read_log(final=False)
        workers = self._children()
        for pid in sorted(self.workers - workers - self._recycled):
            findings.append(Finding("worker-gone", f"worker pid {pid} is gone and the log does "
                                                   f"not say the server recycled it"))
        self.workers = workers
        return findings

    def read_log(self, final: bool) -> list[Finding]:
        """Findings in what the log got since the last call; the app's errors are tallied.
        Unless `final`, the last record waits for the next call (its traceback may still be
        on its way)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            text = f.read().decode("latin-1")
        starts = log_blocks(text)
        if not final:
            text = text[:starts[-1]] if starts else ""
        self._log_offset += len(text)
        bounds = sorted({0, *starts, len(text)})
        findings = []
        for begin, end in itertools.pairwise(bounds):
            findings += self._classify(text[begin:end].strip())
        return findings

    def _classify(self, record: str) -> list[Finding]:
        match = RECORD.match(record)
        message = record[match.end():] if match else record
        recycled = RECYCLING.search(message)
        if recycled:
            self._recycled.add(int(recycled.group(1)))
        if message.startswith("error handling "):
            # By exception and the start of its message ("AssertionError: PATH_INFO ...").
            self.app_errors[": ".join(record.splitlines()[-1].split(": ")[:2])[:100]] += 1
            return []
        if (match and match.group(1) in ("ERROR", "CRITICAL")) or "Traceback" in record \
                or "unexpected error" in record:
            return [Finding("server-error-log", record[:3000])]
        return []

    def close(self) -> None:
        """TERM the master, then KILL its whole process group: nothing is left running."""
        if self not in _RUNNING:
            return
        _RUNNING.remove(self)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


_RUNNING: list[Forkserve] = []  # stopped at exit, whatever happens


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.close()


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Tally:
    """What a run saw: counts for the progress lines and the summary, and the findings."""

    seed: int
    repro_base: dict[str, str]  # label -> the command line that replays its exchanges
    batches: Counter[str] = field(default_factory=Counter)
    exchanges: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    ends: Counter[str] = field(default_factory=Counter)
    findings: list[tuple[str, Finding, str]] = field(default_factory=list)  # where, what, repro
    app_errors: Counter[str] = field(default_factory=Counter)
    cut_streams: Counter[str] = field(default_factory=Counter)  # label -> Verdict.cut_stream
    _shown: Counter[tuple[str, str]] = field(default_factory=Counter)

    def record(self, label: str, case: Case, transcript: Transcript, verdict: Verdict) -> None:
        """Count an exchange and report its findings."""
        self.exchanges[label] += 1
        self.ends[transcript.end] += 1
        self.statuses.update(verdict.statuses)
        if verdict.cut_stream:
            self.cut_streams[label] += 1
        for finding in verdict.findings:
            if self.report(label, f"{case.ident} {case.family}", finding, case.ident,
                           case.family.partition("+")[0]):
                print(f"  bytes: {save_case(label, case, transcript, finding, self)}",
                      flush=True)

    def repro(self, label: str, ident: str) -> str:
        return f"{self.repro_base[label]} --case {ident}"

    def report(self, label: str, where: str, finding: Finding, ident: str,
               family: str = "server") -> bool:
        """Record `finding`; print it if it is among the first few of its `family` (of
        exchanges; "server" for what the checks after a batch found) and signature (then
        True)."""
        self.findings.append((f"{label} {where}", finding, self.repro(label, ident)))
        self._shown[family, finding.signature] += 1
        if self._shown[family, finding.signature] > SAVED_PER_KIND:
            return False
        print(f"FINDING {finding.kind} [{label} {where}]: {finding.detail[:1000]}\n"
              f"  repro: {self.repro(label, ident)}", flush=True)
        return True

    def progress(self, elapsed: float) -> str:
        return (f"[{elapsed:4.0f} s] {sum(self.batches.values())} batches, "
                f"{sum(self.exchanges.values())} exchanges, {len(self.findings)} findings; "
                f"statuses {_counts(self.statuses)}; ends {_counts(self.ends)}")


def _counts(counter: Counter) -> str:
    return " ".join(f"{key}:{n}" for key, n in sorted(counter.items()))


def save_case(label: str, case: Case, transcript: Transcript, finding: Finding,
              tally: Tally) -> Path:
    """Write a failing exchange's bytes (.bin) and what happened (.txt); returns the .bin."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stem = f"{label}-{tally.seed}-{case.ident}-{finding.kind}"
    path = OUT_DIR / f"{stem}.bin"
    path.write_bytes(case.data)
    (OUT_DIR / f"{stem}.txt").write_text(
        f"{finding.kind}: {finding.detail}\nfamily {case.family}, ending {case.ending}, sent "
        f"{transcript.sent} of {len(case.data)} bytes in pieces (end, pause) {case.pieces}\n"
        f"expected {case.expect}\nconnection end: {transcript.end} after "
        f"{transcript.seconds:.2f} s\nreceived: {transcript.received!r}\n"
        f"repro: {tally.repro(label, case.ident)}\n")
    return path


def fuzz(label: str, target: Target, tally: Tally, batch_size: int, until: float,
         started: float) -> None:
    """Batches of exchanges against `target`, checking it after each, until the monotonic
    time `until` (at least one batch)."""
    last_progress = time.monotonic()
    pool = ThreadPoolExecutor(CONCURRENCY)
    try:
        for batch in itertools.count(1):
            cases = [make_case(tally.seed, label, batch, i) for i in range(batch_size)]
            transcripts = pool.map(lambda case: converse(target.address, case), cases)
            for case, transcript in zip(cases, transcripts, strict=True):
                tally.record(label, case, transcript, judge(case, transcript))
            tally.batches[label] += 1
            for finding in target.check():
                tally.report(label, f"batch {batch}", finding, str(batch))
            now = time.monotonic()
            if now - last_progress >= PROGRESS_EVERY:
                print(tally.progress(now - started), flush=True)
                last_progress = now
            if now >= until or not target.alive():
                return
    finally:
        # On Ctrl-C, queued exchanges are dropped; those under way end once the server stops.
        pool.shutdown(wait=False, cancel_futures=True)


def replay(label: str, target: Target, tally: Tally, batch: int, index: int | None,
           batch_size: int) -> None:
    """The exchanges of `batch` (all, or only `index`), one at a time with the server checked
    after each, so that a finding in its log points at one exchange. A single exchange is
    printed in full."""
    for i in range(batch_size) if index is None else [index]:
        case = make_case(tally.seed, label, batch, i)
        transcript = converse(target.address, case)
        verdict = judge(case, transcript)
        if index is not None:
            print(f"case {case.ident} {case.family}, ending {case.ending}\nexpected {case.expect}"
                  f"\nsent ({len(case.data)} bytes, pieces (end, pause) {case.pieces}):\n"
                  f"{case.data!r}\nreceived ({transcript.end}):\n{transcript.received!r}\n"
                  f"findings: {[f.kind for f in verdict.findings] or 'none'}", flush=True)
        tally.record(label, case, transcript, verdict)
        for finding in target.check():
            tally.report(label, f"{case.ident} {case.family}", finding, case.ident)
    tally.batches[label] += 1


def summary(tally: Tally, labels: list[str], seconds: float, interrupted: bool) -> str:
    lines = [f"summary: {sum(tally.exchanges.values())} exchanges in "
             f"{sum(tally.batches.values())} batches over {seconds:.0f} s, seed {tally.seed}"
             + (" (interrupted)" if interrupted else "")]
    lines += [f"  {label}: {tally.exchanges[label]} exchanges in {tally.batches[label]} batches"
              for label in labels]
    lines.append(f"  statuses: {_counts(tally.statuses)}")
    lines.append(f"  connection ends: {_counts(tally.ends)}")
    cut = sum(tally.cut_streams.values())
    if cut:
        lines.append(f"  half-closed clients whose stream their EOF ended (documented, not a "
                     f"finding): {cut} ({_counts(tally.cut_streams)})")
    lines.append(f"  findings: {len(tally.findings)}")
    first: dict[str, tuple[str, Finding, str]] = {}
    for where, finding, repro in tally.findings:
        first.setdefault(finding.signature, (where, finding, repro))
    signatures = Counter(finding.signature for _, finding, _ in tally.findings)
    for signature, n in signatures.most_common():
        where, finding, repro = first[signature]
        lines.append(f"    x{n} {signature}\n      first [{where}]: {finding.detail[:300]!r}\n"
                     f"      repro: {repro}")
    lines += [f"  app error (not a finding) x{n}: {error}"
              for error, n in tally.app_errors.most_common(8)]
    lines.append("  result: " + (f"FAIL, {len(tally.findings)} findings (inputs in "
                                 f"{OUT_DIR.relative_to(REPO)}/)" if tally.findings
                                 else "OK, no invariant broken"))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, metavar="SECONDS",
                        help="fuzzing time, shared by the apps (default 600)")
    parser.add_argument("--seed", type=int, help="seed of the run (default: random; printed)")
    parser.add_argument("--app", choices=("wsgi", "asgi", "both"), default="both")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100, metavar="N",
                        help="exchanges per batch; the server is checked after each batch")
    parser.add_argument("--case", metavar="BATCH[.INDEX]",
                        help="replay one exchange, or a whole batch one exchange at a time")
    parser.add_argument("--target", metavar="HOST:PORT",
                        help="fuzz a server that is already running (no process or log checks)")
    args = parser.parse_args(argv)
    if args.case and not re.fullmatch(r"\d+(\.\d+)?", args.case):
        parser.error("--case takes BATCH or BATCH.INDEX, e.g. 12 or 12.31")
    if args.case and args.app == "both" and not args.target:
        parser.error("--case replays the exchanges of one app: give --app wsgi or --app asgi")
    if args.target and not re.fullmatch(r"[^:]+:\d+", args.target):
        parser.error("--target takes HOST:PORT")
    if args.batch < 1 or args.workers < 1:
        parser.error("--batch and --workers must be at least 1")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10 ** 9)
    script = "python loadtests/fuzz_server.py"
    if args.target:
        repro_base = {"target": f"{script} --target {args.target} --seed {seed}"}
    else:
        apps = ["wsgi", "asgi"] if args.app == "both" else [args.app]
        repro_base = {app: f"{script} --app {app} --seed {seed}" for app in apps}
    labels = list(repro_base)
    print(f"fuzz_server: seed {seed}, {' and '.join(labels)}, "
          + (f"case {args.case}" if args.case else f"{args.duration:g} s"), flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    tally = Tally(seed, repro_base)
    started = time.monotonic()
    interrupted = False
    try:
        for n, label in enumerate(labels):
            if args.target:
                host, port = args.target.rsplit(":", 1)
                target = Target((host, int(port)))
            else:
                target = Forkserve(label, args.workers)
            unhealthy = target.health()
            if unhealthy:
                target.close()
                raise SetupError(f"the server does not answer: {unhealthy[0].detail}")
            try:
                if args.case:
                    batch, _, index = args.case.partition(".")
                    replay(label, target, tally, int(batch), int(index) if index else None,
                           args.batch)
                else:
                    share = (args.duration - (time.monotonic() - started)) / (len(labels) - n)
                    fuzz(label, target, tally, args.batch, time.monotonic() + share, started)
            finally:
                target.close()
                if isinstance(target, Forkserve):
                    for finding in target.read_log(final=True):
                        tally.report(label, "at shutdown", finding, "1")
                tally.app_errors += target.app_errors
    except SetupError as exc:
        print(f"setup error: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        interrupted = True
    print(summary(tally, labels, time.monotonic() - started, interrupted), flush=True)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FINDINGS if tally.findings else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
