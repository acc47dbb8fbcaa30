"""Property tests of the sans-I/O HTTP connection (hypothesis, bounded for CI), on each parser:
random and mutated bytes only ever give events or a clean ProtocolError, and pipelined
requests split at any points come out whole, in order, one response each. And the two parsers
(h11, the reference, and httptools) are one protocol: fed the same bytes and answering the
same way, they give the same events, the same refusals (status) and the same response bytes
as h11 alone (tests/h11_reference.py), the judge of both."""

from __future__ import annotations

import itertools
import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
from conftest import PARSERS  # noqa: E402
from h11_reference import H11Reference  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from forkserve.http import Limits, new_connection  # noqa: E402
from forkserve.http.base import (  # noqa: E402
    CLOSED,
    END_OF_MESSAGE,
    NEED_DATA,
    PAUSED,
    Data,
    ProtocolError,
    Request,
)

# 150 examples per property in CI; FORKSERVE_FUZZ_EXAMPLES=20000 for a long run.
BOUNDED = settings(max_examples=int(os.environ.get("FORKSERVE_FUZZ_EXAMPLES", "150")),
                   deadline=None)
LIMITS = Limits(request_line=200, header_count=10, header_field_size=200, head_size=1000,
                body_size=2000)

# A property that holds on each parser (a plain parameter: hypothesis wants no function-scoped
# fixture).
EACH_PARSER = pytest.mark.parametrize("parser", PARSERS)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points + [len(data)]:
        pieces.append(data[last:point])
        last = point
    return [p for p in pieces if p]


def drive(parser: str, pieces: list[bytes]) -> list[tuple]:
    """Feed pieces, answer each request after its body, return what was seen."""
    conn = new_connection(LIMITS, parser)
    seen: list[tuple] = []
    body = b""
    for piece in [*pieces, b""]:
        conn.receive_data(piece)
        while True:
            event = conn.next_event()  # ProtocolError propagates: a clean refusal
            if type(event) is Request:
                seen.append(("request", event.method, event.target))
                body = b""
            elif type(event) is Data:
                body += event.data
            elif event is END_OF_MESSAGE:
                seen.append(("body", body))
                conn.send_response(200, b"OK", [(b"Content-Length", b"0")])
                conn.send_end()
                if not conn.start_next_cycle():
                    return seen
            elif event in (NEED_DATA, PAUSED):
                break
            else:
                assert event is CLOSED
                return seen
    return seen


@EACH_PARSER
@BOUNDED
@given(st.binary(max_size=600), st.lists(st.integers(min_value=0), max_size=8))
def test_random_bytes_give_events_or_a_protocol_error(parser, data, cuts):
    try:
        drive(parser, split(data, cuts))
    except ProtocolError as exc:
        assert exc.status in (400, 413, 414, 431, 501, 505)


VALID = (b"POST /submit?x=1 HTTP/1.1\r\nHost: example.org\r\nContent-Length: 5\r\n"
         b"X-Trace: abc\r\n\r\nhello")


@EACH_PARSER
@BOUNDED
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(VALID) - 1),
                          st.integers(min_value=0, max_value=255)), min_size=1, max_size=4),
       st.lists(st.integers(min_value=0), max_size=6))
def test_mutated_requests_give_events_or_a_protocol_error(parser, mutations, cuts):
    data = bytearray(VALID)
    for index, byte in mutations:
        data[index] = byte
    try:
        seen = drive(parser, split(bytes(data), cuts))
    except ProtocolError:
        return
    assert len([s for s in seen if s[0] == "request"]) <= 1  # never two requests from one


@st.composite
def requests(draw):
    path = "/" + draw(st.text(alphabet="abcxyz019-_", max_size=12))
    body = draw(st.binary(max_size=40))
    if draw(st.booleans()):
        raw = (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n"
               .encode() + body)
    else:
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c)
                          for c in (body[:7], body[7:]) if c) + b"0\r\n\r\n"
        raw = f"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        raw += chunks
    return path.encode(), body, raw


@EACH_PARSER
@BOUNDED
@given(st.lists(requests(), min_size=1, max_size=5), st.lists(st.integers(min_value=0),
                                                               max_size=10))
def test_pipelined_requests_split_anywhere_stay_in_step(parser, batch, cuts):
    stream = b"".join(raw for _, _, raw in batch)
    seen = drive(parser, split(stream, cuts))
    expected = []
    for path, body, _ in batch:
        expected += [("request", b"POST", path), ("body", body)]
    assert seen == expected


# -- the two parsers agree ----------------------------------------------------------------------

REFERENCE = "h11 alone"


def trace(parser: str, pieces: list[bytes], answers: list) -> list:
    """Everything one connection on `parser` (or REFERENCE) does with `pieces` (then the
    client's close), answering each request with the next of `answers`: (status, headers,
    body pieces, trailers)."""
    conn = H11Reference(LIMITS) if parser == REFERENCE else new_connection(LIMITS, parser)
    seen: list = []
    answers = list(answers)

    def send(call, *args):
        try:
            out = call(*args)
        except ValueError:
            seen.append(("refused", call.__name__))
            return False
        seen.append((call.__name__, out))
        return True

    try:
        for piece in [*pieces, b""]:
            conn.receive_data(piece)
            while True:
                event = conn.next_event()
                seen.append(repr(event))
                seen.append(("continue?", conn.client_waiting_for_continue))
                if event is END_OF_MESSAGE:
                    status, headers, body, trailers = (
                        answers.pop(0) if answers else (200, [], [], []))
                    if conn.client_waiting_for_continue and not send(conn.send_continue):
                        return seen
                    if not send(conn.send_response, status, b"OK", headers):
                        return seen
                    for chunk in body:
                        if not send(conn.send_data, chunk):
                            return seen
                    if not send(conn.send_end, trailers):
                        return seen
                    seen.append(("will_close", conn.will_close()))
                    nxt = conn.start_next_cycle()
                    seen.append(("next", nxt))
                    if not nxt:
                        return seen
                elif event is CLOSED:
                    return seen
                elif event in (NEED_DATA, PAUSED):
                    seen.append(("buffered", conn.buffered()))
                    break
    except ProtocolError as exc:
        seen.append(("error", exc.status))
    return seen


def assert_agree(pieces: list[bytes], answers: list = ()) -> None:
    """The h11 path does what h11 alone does, byte for byte. So does the fast path, with one
    documented difference: an HTTP/1.0 client that asks for keep-alive keeps its connection
    when the response has a length (h11 closes every HTTP/1.0 connection). Up to that
    response the two agree, and there h11 says close where the fast path says keep-alive and
    goes on."""
    reference = trace(REFERENCE, pieces, answers)
    assert trace("h11", pieces, answers) == reference
    fast = trace("httptools", pieces, answers)
    kept = next((i for i, (step, ref) in enumerate(zip(fast, reference, strict=False))
                 if step != ref), None)
    if kept is None or fast[kept][:1] != ("send_response",) \
            or b"\r\nConnection: keep-alive\r\n" not in fast[kept][1]:
        assert fast == reference
        return
    # h11 rewrites the Connection fields as one per token, close for keep-alive.
    assert reference[kept][0] == "send_response"
    fast_rest, fast_tokens = _connection_fields(fast[kept][1])
    rest, tokens = _connection_fields(reference[kept][1])
    assert (rest, tokens) == (fast_rest, fast_tokens - {b"keep-alive"} | {b"close"})
    ends = [_until_will_close(steps[kept + 1:]) for steps in (reference, fast)]
    assert ends[0] == ends[1]  # the same body and end, and for h11 no next request
    assert ("next", True) not in reference[kept:]


def _connection_fields(head: bytes) -> tuple[bytes, set[bytes]]:
    """A response head without its Connection fields, and their tokens."""
    rest, tokens = [], set()
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
        else:
            rest.append(line)
    return b"\r\n".join(rest), tokens - {b""}


def _until_will_close(steps: list) -> list:
    return list(itertools.takewhile(lambda step: step[:1] != ("will_close",), steps))


# -- requests -----------------------------------------------------------------------------------

HEADS = [
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST /p?q HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\n"
    b"X-T: 1\r\n\r\n",
    b"HEAD / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81",
    b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    b"PURGE http://[::1]:80/a HTTP/1.2\r\nHost: \r\nX:\t v \t\r\n\r\n",
    b"GET /\xc3\xa9 HTTP/1.1\nHost: h\nX-A: \xff\n\n",
]
# Bytes that make heads interesting when put anywhere.
SPICE = [b" ", b"\t", b"\r", b"\n", b"\r\n", b":", b",", b"\x00", b"\x7f", b"\x80", b"H", b"0",
         b"HTTP/1.1", b"Host: h\r\n", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n",
         b"Transfer-Encoding: gzip\r\n", b"Content-Length: 00000000000000000000001\r\n",
         b"Connection: close\r\n", b"Expect: 100-continue\r\n", b"Upgrade: x\r\n", b"(", b"@",
         b"\r\n\r\n", b"GET ", b" / ", b"1.0", b"2.0"]


@BOUNDED
@given(st.binary(max_size=400), st.lists(st.integers(min_value=0), max_size=6))
def test_parsers_agree_on_random_bytes(data, cuts):
    assert_agree(split(data, cuts))


@BOUNDED
@given(st.lists(st.sampled_from(HEADS), min_size=1, max_size=3),
       st.lists(st.tuples(st.integers(min_value=0), st.sampled_from(SPICE)), max_size=4),
       st.lists(st.integers(min_value=0, max_value=2), max_size=4),
       st.lists(st.integers(min_value=0), max_size=6))
def test_parsers_agree_on_mutated_heads(heads, insertions, deletions, cuts):
    data = bytearray(b"".join(heads))
    for position, spice in insertions:
        position %= len(data) + 1
        data[position:position] = spice
    for position in deletions:
        del data[position % len(data):position % len(data) + 1]
    assert_agree(split(bytes(data), cuts))


# -- responses ----------------------------------------------------------------------------------

NAMES = [b"Content-Length", b"content-length", b"Transfer-Encoding", b"Connection", b"Host",
         b"Set-Cookie", b"X-A", b"Bad Name", b"", b"Trailer", b"Content-Type", "X-Str"]
VALUES = [b"5", b"0", b" 5 ", b"5, 5", b"5,6", b"-1", b"chunked", b"Chunked", b"gzip", b"close",
          b"keep-alive", b"Upgrade, close", b"v", b" padded\t", b"a\r\nb", b"a\x00b", b"",
          b"\xff", "text"]


@st.composite
def answers(draw):
    status = draw(st.sampled_from([200, 204, 304, 404, 101, 199, 1000, 500]))
    headers = draw(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)),
                            max_size=4))
    body = draw(st.lists(st.sampled_from([b"", b"hello", b"x" * 7]), max_size=3))
    trailers = draw(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)),
                             max_size=2))
    return status, headers, body, trailers


@BOUNDED
@given(st.lists(st.sampled_from(HEADS), min_size=1, max_size=3),
       st.lists(answers(), min_size=3, max_size=3))
def test_parsers_agree_on_responses(heads, replies):
    assert_agree([b"".join(heads)], replies)


# -- a head seen before (begin_known) -------------------------------------------------------------


def _answer(conn) -> tuple:
    """Answer the request read on `conn` with a 2-byte body: the bytes, and what follows."""
    try:
        out = (conn.send_response(200, b"OK", [(b"Content-Length", b"2")])
               + conn.send_data(b"ok") + conn.send_end())
    except ValueError as exc:
        return ("refused", str(exc))
    return out, conn.will_close(), conn.start_next_cycle(), conn.next_event()


@BOUNDED
@EACH_PARSER
@given(st.sampled_from(HEADS),
       st.lists(st.tuples(st.integers(min_value=0), st.sampled_from(SPICE)), max_size=4))
def test_a_head_seen_before_begins_as_it_was_read_the_first_time(parser, head, insertions):
    """begin_known(head) on a fresh connection, once another connection has read `head`,
    gives what receive_data(head) and next_event() give there: the same Request, the body
    read (none), and the same response bytes and keep-alive decision; or None and nothing
    changed."""
    data = bytearray(head.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")
    for position, spice in insertions:
        position %= len(data) + 1
        data[position:position] = spice
    data = bytes(data)
    first = new_connection(LIMITS, parser)
    first.receive_data(data)
    try:
        events = [first.next_event(), first.next_event()]
    except ProtocolError:
        return
    second = new_connection(LIMITS, parser)
    request = second.begin_known(data)
    if request is None:  # nothing changed: the normal path reads it as the first did
        second.receive_data(data)
        assert [second.next_event(), second.next_event()] == events
        return
    assert [request, END_OF_MESSAGE] == events and not first.buffered()
    assert second.next_event() == first.next_event()
    assert _answer(second) == _answer(first)
