"""Pure pieces tested directly: no I/O in them, so no process is needed."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import re
import socket
import time

import pytest

from forkserve import channel
from forkserve.app import detect_interface
from forkserve.cpus import cgroup_cpu_quota, usable_cpus
from forkserve.errors import ConfigError
from forkserve.http import Limits, new_connection
from forkserve.http.base import (
    END_OF_MESSAGE,
    NEED_DATA,
    Data,
    ProtocolError,
    Request,
    complete_headers,
)
from forkserve.logs import check_access_log_format, format_access_line
from forkserve.memory import fit_warning, memory_limit, oom_kills
from forkserve.metrics import RequestStats, Totals, read_report
from forkserve.sockets import Address, Listener, _bound_to, parse_bind
from forkserve.wsgi import EnvironFactory, ErrorStream, InputStream

# -- cpus ---------------------------------------------------------------------------------------


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(("proc", "files", "quota"), [
    ("0::/app.slice/web\n", {"app.slice/web/cpu.max": "150000 100000\n"}, 1.5),
    # A parent's limit binds its children, even when the child's own is "max".
    ("0::/a/b\n", {"a/cpu.max": "100000 100000\n", "a/b/cpu.max": "max 100000\n"}, 1.0),
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    ("4:memory:/x\n2:cpu,cpuacct:/docker/abc\n",
     {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
      "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}, 0.5),
    ("2:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                           "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
], ids=["v2-quota", "v2-parent-binds", "v2-unlimited", "v1-quota", "v1-unlimited"])
def test_cgroup_quota(tmp_path, proc, files, quota):
    write(tmp_path / "proc", proc)
    for name, text in files.items():
        write(tmp_path / "fs" / name, text)
    root, proc_file = str(tmp_path / "fs"), str(tmp_path / "proc")
    assert cgroup_cpu_quota(root, proc_file) == quota
    cpus = usable_cpus(root, proc_file)
    assert cpus >= 1
    if quota is not None:
        assert cpus <= math.ceil(quota)


@pytest.mark.parametrize(("proc", "files", "limit", "kills"), [
    ("0::/app\n", {"memory.max": "max\n", "app/memory.max": "104857600\n",
                   "app/memory.events": "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n"},
     100 * 2**20, 2),
    ("0::/a/b\n", {"a/memory.max": "209715200\n", "a/b/memory.max": "max\n"},
     200 * 2**20, None),  # a parent's limit binds its children
    ("5:memory:/docker/x\n0::/\n", {
        "memory/docker/x/memory.limit_in_bytes": "9223372036854771712\n",
        "memory/docker/memory.limit_in_bytes": "536870912\n",
        "memory/docker/x/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n"},
     512 * 2**20, 7),
    ("0::/\n", {}, None, None),
])
def test_cgroup_memory_limit_and_oom_kills(tmp_path, proc, files, limit, kills):
    write(tmp_path / "proc", proc)
    for name, text in files.items():
        write(tmp_path / "fs" / name, text)
    root, proc_file = str(tmp_path / "fs"), str(tmp_path / "proc")
    assert memory_limit(root, proc_file) == limit
    assert oom_kills(root, proc_file) == kills


def test_the_memory_fit_warning_names_what_fits():
    assert fit_warning(1024 * 2**20, [24 * 1024] * 4, 4) == ""
    assert fit_warning(100 * 2**20, [24 * 1024, 24 * 1024], 4).startswith(
        "4 workers of about 24 MiB each take 96 MiB, over 80% of the cgroup's memory limit of "
        "100 MiB: 3 would fit (-w 3)")
    assert fit_warning(10 * 2**20, [24 * 1024], 2).split(": ")[1].startswith("1 would fit")


# -- bind specs ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "address"), [
    ("127.0.0.1:8000", Address("tcp", host="127.0.0.1", port=8000)),
    ("localhost", Address("tcp", host="localhost", port=8000)),
    (":9000", Address("tcp", host="", port=9000)),
    ("[::1]:8080", Address("tcp", host="::1", port=8080)),
    ("[::]", Address("tcp", host="::", port=8000)),
    ("unix:/run/app.sock", Address("unix", path="/run/app.sock")),
    ("fd://3", Address("fd", fd=3)),
])
def test_parse_bind(spec, address):
    assert parse_bind(spec) == address


@pytest.mark.parametrize("spec", ["h:70000", "h:-1", "h:x", "::1:80", "[::1", "[::1]x",
                                  "unix:", "fd://", "fd://-1"])
def test_parse_bind_refuses(spec):
    with pytest.raises(ConfigError):
        parse_bind(spec)


# -- wsgi.input ---------------------------------------------------------------------------------

def stream_of(*chunks: bytes) -> InputStream:
    pieces = list(chunks)
    return InputStream(lambda: pieces.pop(0) if pieces else b"")


def test_input_read_sizes_span_chunks():
    stream = stream_of(b"ab", b"cde", b"f")
    assert stream.read(4) == b"abcd"
    assert stream.read(0) == b""
    assert stream.read(10) == b"ef"
    assert stream.read(1) == b""
    assert stream.read() == b""


def test_input_read_all_and_none():
    assert stream_of(b"ab", b"c").read() == b"abc"
    assert stream_of(b"ab", b"c").read(None) == b"abc"


def test_input_readline_variants():
    stream = stream_of(b"li", b"ne1\nline2\n", b"tail")
    assert stream.readline(2) == b"li"
    assert stream.readline() == b"ne1\n"
    assert stream.readline(100) == b"line2\n"
    assert stream.readline() == b"tail"
    assert stream.readline() == b""


def test_input_readlines_hint_and_iteration():
    # As io.IOBase.readlines: stop once the lines read reach the hint.
    assert stream_of(b"a\nb\nc\n").readlines(2) == [b"a\n"]
    assert stream_of(b"a\nb\nc\n").readlines(3) == [b"a\n", b"b\n"]
    assert list(stream_of(b"a\n", b"b")) == [b"a\n", b"b"]


def test_input_never_asks_again_after_the_end():
    calls = []

    def read_chunk():
        calls.append(1)
        return b""

    stream = InputStream(read_chunk)
    assert stream.read() == b"" and stream.read(5) == b"" and stream.readline() == b""
    assert len(calls) == 1


# -- channel ------------------------------------------------------------------------------------

def test_frames_reassemble_across_reads():
    data = (channel.encode(channel.BOOTED) + channel.heartbeat(7, 2, 5)
            + channel.boot_failed(3, "x"))
    reader = channel.FrameReader()
    frames = []
    for i in range(len(data)):
        frames += reader.feed(data[i:i + 1])
    assert [kind for kind, _ in frames] == [channel.BOOTED, channel.HEARTBEAT, channel.BOOT_FAILED]
    assert channel.read_counters(frames[1][1]) == (7, 2, 5)
    assert frames[2][1] == b"\x03x"


@pytest.mark.parametrize("garbage", [b"\xff\x00\x00\x00\x00", b"\x02\xff\xff\xff\xff"])
def test_garbage_frames_raise(garbage):
    with pytest.raises(channel.ChannelError):
        channel.FrameReader().feed(garbage)


# -- the sans-I/O HTTP connection ---------------------------------------------------------------

@pytest.mark.both_parsers
def test_connection_events_and_pipelining(parser):
    conn = new_connection(Limits(), parser)
    conn.receive_data(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET /b HTT")
    request = conn.next_event()
    assert isinstance(request, Request)
    assert request.headers == [(b"host", b"h"), (b"content-length", b"3")]
    assert conn.next_event() == Data(b"abc")
    assert conn.next_event() is END_OF_MESSAGE
    out = conn.send_response(200, b"OK", [(b"Content-Length", b"2")]) + conn.send_data(b"hi")
    out += conn.send_end()
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    assert conn.start_next_cycle()
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"P/1.1\r\nHost: h\r\n\r\n")
    assert conn.next_event().target == b"/b"


def _answered(parser: str, head: bytes, send: str, *args) -> tuple[bytes, bool]:
    """The response head that the connection's method `send` composes from `args` for the
    request `head`, and whether the connection may then carry on."""
    conn = new_connection(Limits(), parser)
    conn.receive_data(head)
    conn.next_event()
    conn.next_event()
    out = getattr(conn, send)(*args)
    with contextlib.suppress(ValueError):  # (a body where the status or HEAD has none)
        conn.send_data(b"x" * 3)
        conn.send_end()
    # (The clock's second may change between two answers.)
    return re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", out), conn.start_next_cycle()


@pytest.mark.both_parsers
def test_the_remembered_app_head_is_the_completed_one(parser):
    """send_app_response composes what send_response does with complete_headers, remembered
    or not: every combination below in turn, each asked twice, so that a key missing what
    tells two of them apart gives one the other's head."""
    request_heads = [
        b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n", b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"]
    app_headers = [
        [], [(b"Content-Type", b"text/plain")], [(b"content-length", b"3")],
        [(b"Date", b"Thu, 01 Jan 1970 00:00:00 GMT"), (b"Server", b"app")],
        [(b"Transfer-Encoding", b"chunked")], [(b"Connection", b"close")]]
    answers = [(200, 3, False), (200, None, False), (200, 3, True), (204, None, False),
               (304, 3, False), (404, 3, False)]
    for request_head, headers, (status, length, close) in itertools.product(
            request_heads, app_headers, answers):
        expected = _answered(parser, request_head, "send_response", status, b"R",
                             complete_headers(headers, status, length, close))
        case = (request_head, headers, status, length, close)
        for _ in range(2):
            assert _answered(parser, request_head, "send_app_response", status, b"R", headers,
                             length, close) == expected, case


@pytest.mark.both_parsers
def test_connection_head_swallows_body(parser):
    conn = new_connection(Limits(), parser)
    conn.receive_data(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    conn.next_event()
    conn.next_event()
    head = conn.send_response(200, b"OK", [(b"Content-Length", b"5")])
    assert conn.send_data(b"hello") == b""
    assert conn.send_end() == b""
    assert head.endswith(b"\r\n\r\n")


@pytest.mark.both_parsers
@pytest.mark.parametrize(("chunks", "status"), [
    ([b"GET /" + b"x" * 200], 414),
    ([b"GET / HTTP/1.1\r\nHost: h\r\nA: " + b"x" * 300], 431),
    ([b"GET / HTTP/1.1\r\n", b"Host: h\r\n" * 5 + b"\r\n"], 400),
])
def test_connection_limits(parser, chunks, status):
    conn = new_connection(Limits(request_line=100, header_field_size=200, head_size=250), parser)
    with pytest.raises(ProtocolError) as info:
        for chunk in chunks:
            conn.receive_data(chunk)
            conn.next_event()
    assert info.value.status == status


# -- access log ---------------------------------------------------------------------------------

def test_access_line_atoms():
    line = format_access_line(
        '%(h)s %(l)s %(u)s "%(r)s" %(s)s %(b)s %(B)s "%(f)s" "%(a)s" %(m)s %(U)s %(q)s %(H)s '
        '%({x-id}i)s %({content-type}o)s %(M)s',
        remote="10.0.0.1", method="GET", target="/p?q=1", version="1.1", status=204, sent=0,
        started=0.0, duration=0.25,
        request_headers=[(b"referer", b"http://r/"), (b"user-agent", b"ua"), (b"x-id", b"7")],
        response_headers=[(b"Content-Type", b"text/plain")],
    )
    assert line == ('10.0.0.1 - - "GET /p?q=1 HTTP/1.1" 204 - 0 "http://r/" "ua" GET /p q=1 '
                    'HTTP/1.1 7 text/plain 250')


def test_bad_access_log_format():
    with pytest.raises(ValueError):
        check_access_log_format("%(h")


# -- scoreboard ---------------------------------------------------------------------------------

def test_scoreboard_balancing_rules():
    from forkserve.scoreboard import SHORT_CALL, UNAVAILABLE, Scoreboard
    board = Scoreboard()
    board.join(1)
    board.join(2)
    board.set(1, 3)
    assert not board.has_lighter_peer(1, 2)  # worker 2 is still booting (unavailable)
    board.set(2, 0)
    assert board.has_lighter_peer(1, 2)  # 3 vs 0: leave the next one to worker 2
    assert not board.has_lighter_peer(2, 2)
    board.set(2, 2)
    assert not board.has_lighter_peer(1, 2)  # 3 vs 2: within the margin
    board.set(1, 500)
    board.set(2, 450)
    assert not board.has_lighter_peer(1, 2)  # 500 vs 450: within an eighth
    board.set(2, 437)
    assert board.has_lighter_peer(1, 2)  # 500 vs 437: more than an eighth fewer
    board.set(2, 3)
    board.serving(2, b"GET", b"/slow HTTP/1.1")
    board.set(1, 9)
    # In a call just begun, worker 2 counts with the 3 it held: it accepts again in a moment.
    assert board.has_lighter_peer(1, 2)
    time.sleep(SHORT_CALL * 2)  # (the passing of time is what is checked)
    assert not board.has_lighter_peer(1, 2)  # a long call: worker 2 is busy in the app
    text, seconds = board.current_request(2)
    assert text == "GET /slow HTTP/1.1" and 0 <= seconds < 5
    board.served(2)
    assert board.current_request(2) is None
    for number, target in [(2, b"/b"), (3, b"/b"), (3, b"/b"), (2, b"/slow HTTP/1.1")]:
        board.serving(number, b"GET", target)  # the text written only when it changes
        assert board.current_request(number)[0] == "GET " + target.decode()
        board.served(number)
    board.leave(2)
    board.set(1, UNAVAILABLE)
    assert not board.has_lighter_peer(1, 2)


# -- interface detection ------------------------------------------------------------------------

async def _asgi3(scope, receive, send):
    pass


def _wsgi(environ, start_response):
    pass


class _AsgiInstance:
    async def __call__(self, scope, receive, send):
        pass


class _WsgiInstance:
    def __call__(self, environ, start_response):
        pass


class _Asgi2:
    def __init__(self, scope):
        pass

    async def __call__(self, receive, send):
        pass


class _Asgi2Child(_Asgi2):
    pass


@pytest.mark.parametrize(("app", "interface"), [
    (_asgi3, "asgi3"),
    (_wsgi, "wsgi"),
    (_AsgiInstance(), "asgi3"),
    (_WsgiInstance(), "wsgi"),
    (_Asgi2, "asgi2"),
    (_Asgi2Child, "asgi2"),
    (functools.partial(_asgi3), "asgi3"),
    (functools.partial(functools.partial(_wsgi)), "wsgi"),
])
def test_detect_interface(app, interface):
    assert detect_interface(app) == interface


def test_interface_override_wins():
    assert detect_interface(_wsgi, "asgi") == "asgi3"
    assert detect_interface(_asgi3, "wsgi") == "wsgi"
    assert detect_interface(_asgi3, "asgi2") == "asgi2"


# -- metrics -------------------------------------------------------------------------------------

def test_a_worker_report_is_read_only_when_it_is_one():
    stats = RequestStats()
    stats.count("GET", 200, 0.003)
    stats.count("BREW", 418, 20.0)
    stats.refuse(431)
    stats.accepted = 2
    totals = read_report(stats.payload(), Totals())
    assert totals.requests == {"GET 2xx": 1, "other 4xx": 1}
    assert totals.buckets[0] == 1 and totals.buckets[-1] == 1
    assert (totals.accepted, totals.refused) == (2, {"431": 1})
    good = json.loads(stats.payload())
    bad_reports = [
        b"[" * 100_000,
        b"{}",
        json.dumps({**good, "accepted": 1e999}).encode(),
        json.dumps({**good, "accepted": -1}).encode(),
        json.dumps({**good, "accepted": True}).encode(),
        json.dumps({**good, "sum": float("nan")}).encode(),
        json.dumps({**good, "requests": {"GET 2xx": None}}).encode(),
        json.dumps({**good, "requests": {"x": 1}}).encode(),
        json.dumps({**good, "refused": {"9999": 1}}).encode(),
        json.dumps({**good, "buckets": [0] * 3}).encode(),
        json.dumps({**good, "extra": 1}).encode(),
    ]
    for payload in bad_reports:
        with pytest.raises(ValueError):
            read_report(payload, Totals())
    # Totals only grow: a report lower than the last one is refused.
    with pytest.raises(ValueError):
        read_report(json.dumps({**good, "accepted": 1}).encode(), totals)
    with pytest.raises(ValueError):
        read_report(json.dumps({**good, "requests": {"GET 2xx": 1}}).encode(), totals)


def test_a_stored_socket_of_another_family_matches_no_bind():
    """systemd passes back what was stored under forkserve's names; a socket that is not
    TCP (here an unnamed unix socket) is no --bind's, and does not stop the start."""
    unix, other = socket.socketpair()
    with unix, other:
        assert _bound_to(unix.fileno(), parse_bind("127.0.0.1:8000")) is False
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        assert _bound_to(tcp.fileno(), parse_bind(f"127.0.0.1:{port}")) is True
        assert _bound_to(tcp.fileno(), parse_bind(f"127.0.0.1:{port + 1}")) is False


# -- the environ of a remembered head -------------------------------------------------------------


def test_environ_of_a_remembered_head_follows_each_factorys_root_path():
    """What a head alone decides of the environ is remembered by its bytes (Request.head),
    with the root path it was made under: another root path makes its own."""
    head = b"GET /app/x%41?q=1 HTTP/1.1\r\nHost: t\r\n\r\n"

    def environ(root: str) -> dict:
        request = Request(b"GET", b"/app/x%41?q=1", b"1.1", [(b"host", b"t")], head=head)
        factory = EnvironFactory(("127.0.0.1", 80), ("127.0.0.1", 5000), False, root)
        return factory.build(request, InputStream(lambda: b""), ErrorStream())

    for root, script, path in [("/app", "/app", "/xA"), ("", "", "/app/xA"),
                               ("/app", "/app", "/xA")]:
        got = environ(root)
        assert (got["SCRIPT_NAME"], got["PATH_INFO"], got["QUERY_STRING"],
                got["HTTP_HOST"]) == (script, path, "q=1", "t")


def test_the_local_address_of_accepted_connections_is_known_when_one(tmp_path):
    """A listener bound to one address (or a unix socket) gives every connection that
    address; one bound to every address, or transparent (any address), does not."""
    cases = [(("127.0.0.1", 0), {}, True), (("0.0.0.0", 0), {}, False),
             (("127.0.0.1", 0), {"transparent": True}, False)]
    for address, options, known in cases:
        with socket.socket() as sock:
            if options:
                sock.setsockopt(socket.IPPROTO_IP, 19, 1)  # IP_TRANSPARENT (needs root)
            sock.bind(address)
            sock.listen()
            local = Listener(sock, Address("tcp")).accepted_local
            assert local == (sock.getsockname() if known else None)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "s"))
        sock.listen()
        assert Listener(sock, Address("unix")).accepted_local == str(tmp_path / "s")
