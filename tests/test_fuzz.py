"""Property tests of the sans-I/O HTTP connection (hypothesis, bounded for CI): random and
mutated bytes only ever give events or a clean ProtocolError, and pipelined requests split at
any points come out whole, in order, one response each."""

from __future__ import annotations

import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
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


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points + [len(data)]:
        pieces.append(data[last:point])
        last = point
    return [p for p in pieces if p]


def drive(pieces: list[bytes]) -> list[tuple]:
    """Feed pieces, answer each request after its body, return what was seen."""
    conn = new_connection(LIMITS)
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


@BOUNDED
@given(st.binary(max_size=600), st.lists(st.integers(min_value=0), max_size=8))
def test_random_bytes_give_events_or_a_protocol_error(data, cuts):
    try:
        drive(split(data, cuts))
    except ProtocolError as exc:
        assert exc.status in (400, 413, 414, 431, 501, 505)


VALID = (b"POST /submit?x=1 HTTP/1.1\r\nHost: example.org\r\nContent-Length: 5\r\n"
         b"X-Trace: abc\r\n\r\nhello")


@BOUNDED
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(VALID) - 1),
                          st.integers(min_value=0, max_value=255)), min_size=1, max_size=4),
       st.lists(st.integers(min_value=0), max_size=6))
def test_mutated_requests_give_events_or_a_protocol_error(mutations, cuts):
    data = bytearray(VALID)
    for index, byte in mutations:
        data[index] = byte
    try:
        seen = drive(split(bytes(data), cuts))
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


@BOUNDED
@given(st.lists(requests(), min_size=1, max_size=5), st.lists(st.integers(min_value=0),
                                                               max_size=10))
def test_pipelined_requests_split_anywhere_stay_in_step(batch, cuts):
    stream = b"".join(raw for _, _, raw in batch)
    seen = drive(split(stream, cuts))
    expected = []
    for path, body, _ in batch:
        expected += [("request", b"POST", path), ("body", body)]
    assert seen == expected
