"""Messages from a worker to its master over the worker's own pipe.

A frame is a 1-byte kind, a 4-byte big-endian payload length, then the payload. A worker
writes whole frames; the master feeds whatever it reads into a `FrameReader`, which yields
complete frames and raises `ChannelError` on anything that is not a valid frame, so that
garbage on a pipe marks its worker as broken instead of confusing the master.
"""

from __future__ import annotations

import os
import struct

BOOTED = 1  # the app is loaded; the worker accepts connections
HEARTBEAT = 2  # payload: requests served so far, requests in flight, connections held
BOOT_FAILED = 3  # payload: exit status byte, then the error text (UTF-8)
RECYCLE = 4  # payload: why (UTF-8); the worker asks to be replaced, then stopped
STUCK = 5  # payload: which request is stuck (UTF-8); the worker wants a dump and a replacement
STOPPING = 6  # payload: the number of the stop signal (TERM, INT, QUIT) the worker received
CALLING = 7  # the worker began a call into the app while the master did not poll (handoff)
STATS = 8  # payload: the worker's request statistics so far (forkserve.metrics, JSON)

_KINDS = frozenset((BOOTED, HEARTBEAT, BOOT_FAILED, RECYCLE, STUCK, STOPPING, CALLING, STATS))
_HEADER = struct.Struct("!BI")
_COUNTERS = struct.Struct("!QII")
MAX_PAYLOAD = 1 << 20


class ChannelError(Exception):
    """The bytes on a worker's pipe are not a valid frame."""


def encode(kind: int, payload: bytes = b"") -> bytes:
    """One frame."""
    return _HEADER.pack(kind, len(payload)) + payload


def heartbeat(served: int, in_flight: int, connections: int) -> bytes:
    """A HEARTBEAT frame carrying the worker's counters."""
    return encode(HEARTBEAT, _COUNTERS.pack(served, in_flight, connections))


def read_counters(payload: bytes) -> tuple[int, int, int]:
    """(served, in_flight, connections) from a HEARTBEAT payload."""
    if len(payload) != _COUNTERS.size:
        raise ChannelError(f"heartbeat payload of {len(payload)} bytes")
    return _COUNTERS.unpack(payload)


def stopping(signum: int) -> bytes:
    """A STOPPING frame: the worker got stop signal `signum` and is exiting (a signal sent by
    the master, or to the worker or its whole process group by someone else)."""
    return encode(STOPPING, bytes((signum,)))


def boot_failed(status: int, text: str) -> bytes:
    """A BOOT_FAILED frame: the exit status the master should end with, and why."""
    return encode(BOOT_FAILED, bytes((status,)) + text.encode("utf-8", "replace"))


class FrameReader:
    """Reassembles frames from the bytes of one pipe."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add `data`; return the frames it completes. Raises ChannelError on garbage."""
        buffer = self._buffer
        buffer += data
        frames = []
        while len(buffer) >= _HEADER.size:
            kind, length = _HEADER.unpack_from(buffer)
            if kind not in _KINDS or length > MAX_PAYLOAD:
                raise ChannelError(f"bad frame header kind={kind} length={length}")
            end = _HEADER.size + length
            if len(buffer) < end:
                break
            frames.append((kind, bytes(buffer[_HEADER.size:end])))
            del buffer[:end]
        return frames


def send(fd: int, frame: bytes) -> bool:
    """Write a frame to the master without blocking; False if the pipe is full.

    Raises BrokenPipeError when the master is gone.
    """
    try:
        written = os.write(fd, frame)
    except BlockingIOError:
        return False
    while written < len(frame):  # only frames larger than PIPE_BUF get here
        try:
            written += os.write(fd, frame[written:])
        except BlockingIOError:
            os.set_blocking(fd, True)
            try:
                written += os.write(fd, frame[written:])
            finally:
                os.set_blocking(fd, False)
    return True
