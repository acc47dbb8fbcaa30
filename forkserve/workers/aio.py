"""The worker: an asyncio (or uvloop) event loop serving HTTP/1.1 to a WSGI or an ASGI app.

The loop (made by workers/loops.py) accepts on the shared listening sockets itself, so that the
scoreboard can spread connections across workers (when it accepts: workers/accepting.py), and
runs one `HTTPProtocol` per connection (workers/protocol.py; a TLS or PROXY connection's once
its preamble is read, workers/preamble.py; a plain one whose request came with it on its
socket for its first loop turn, workers/direct.py). An ASGI request runs as a task; a WSGI app is
called inline in the loop (--threads 1, once the request's body is in) or in a pool of
--threads threads (see `run_wsgi`). Connections waiting behind a long call in the loop go to
peer workers (workers/handover.py). The heartbeat is a loop timer: an app that blocks the loop
stops it, and the master then sees a hang and dumps the tracebacks.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from time import perf_counter
from typing import Any

from forkserve import channel, health
from forkserve.asgi import Lifespan, LifespanFailed, wrap_asgi2
from forkserve.errors import EXIT_BOOT, StopNow
from forkserve.logs import access_log, error_log
from forkserve.scoreboard import UNAVAILABLE
from forkserve.threadpool import ThreadPool
from forkserve.workers.accepting import Acceptor
from forkserve.workers.autothreads import AUTO_THREADS, CALM_SECONDS, SLOW_CALL, AutoThreads
from forkserve.workers.base import BootFailed, Worker, quiet_one
from forkserve.workers.direct import DirectTransport
from forkserve.workers.handover import Handover
from forkserve.workers.loops import cancel_leftovers, new_event_loop
from forkserve.workers.preamble import connect_after_preamble
from forkserve.workers.protocol import HTTPProtocol
from forkserve.wsgi_cycle import WSGICycle

# On a graceful stop, open WebSockets are closed, and responses still streaming without a
# Content-Length ended, this many seconds before --graceful-timeout ends (so that the worker
# can still run lifespan shutdown and exit by itself).
WS_CLOSE_MARGIN = 1.0
# How long lifespan shutdown may take on a graceful stop.
LIFESPAN_SHUTDOWN_SECONDS = 10.0
CALLING_FRAME = channel.encode(channel.CALLING)
# The most of a just-accepted connection's first bytes read before its protocol is made.
FIRST_READ = 65536
# (An int: or-ing the flags' enums costs more than the system call, on every connection.)
_PEEK_NOW = int(socket.MSG_DONTWAIT | socket.MSG_PEEK)
_POLL = select.poll()  # (for _at_eof: one descriptor at a time)
# A pool thread waiting this long for a call ends (a new one starts when calls wait).
THREAD_IDLE_SECONDS = CALM_SECONDS


class AsyncioWorker(Worker):
    """Serves a WSGI or an ASGI app from one event loop per process."""

    serving = False  # booted and not stopping: a stop signal must wake its loop
    quick_stopping = False  # see stop_loop_now

    def serve(self) -> None:
        cfg = self.cfg
        self.asgi_app = wrap_asgi2(self.app) if self.interface == "asgi2" else self.app
        wsgi = self.interface == "wsgi"
        self.health_path = cfg.health_path.encode("ascii") if cfg.health_path else None
        self.health_app = (health.wsgi_app if wsgi else health.asgi_app)(self.scoreboard)
        # WSGI: the pool of --threads, or with --threads 1 the one thread that calls the app
        # for a request whose body is still coming (then no other call runs meanwhile).
        self.auto = AutoThreads() if cfg.threads == "auto" else None
        self.thread_limit = AUTO_THREADS if self.auto else cfg.threads
        self.pool = ThreadPool(self.thread_limit, "forkserve", THREAD_IDLE_SECONDS) \
            if wsgi else None
        self.concurrent = cfg.threads != 1  # calls into the app may overlap
        self.app_threaded = self.concurrent and not self.auto  # (auto: see AutoThreads)
        self.thread_busy = False  # --threads 1: the app is being called in the thread
        self.waiting_for_app: deque[Callable[[], None]] = deque()  # until it is not
        self.in_threads: set[WSGICycle] = set()
        self.ready: deque[WSGICycle] = deque()  # requests read in this turn of the loop
        self.in_batch = False  # _run_ready is calling the app for them
        self.corked: list[HTTPProtocol] = []  # holding responses until the batch ends
        # Calls into the app in the loop hand its waiting connections to peers once they run
        # long (workers/handover.py); not TLS or PROXY connections, whose state is ours alone.
        self.handover: Handover | None = Handover.start(self) if wsgi \
            and not self.app_threaded and self.tls is None and not cfg.proxy_protocol else None
        self.connections: set[HTTPProtocol] = set()
        # Connections waiting for a request that has not begun, longest waiting first.
        self.idle: dict[HTTPProtocol, None] = {}
        self.accepted = 0  # accepted sockets whose protocol is not set up yet
        self.stopping = False
        self.warned_no_websocket = False
        self.access_log_format = None if access_log.disabled else cfg.access_log_format
        try:
            self.loop = new_event_loop(cfg.loop)
        except ImportError:
            raise BootFailed(EXIT_BOOT, "--loop uvloop: uvloop is not installed "
                                        "(pip install 'forkserve[fast]')") from None
        asyncio.set_event_loop(self.loop)
        self.acceptor = Acceptor(self)
        quick_stop = False
        try:
            self.loop.run_until_complete(self._main())
        except StopNow:
            # The signal may have interrupted the loop anywhere (uvloop can be left
            # "running"): nothing more runs on it, the process exits now.
            quick_stop = True
            raise
        except RuntimeError:  # "Event loop stopped before Future completed"
            if not self.quick_stopping:
                raise
            quick_stop = True
            raise StopNow from None
        finally:
            if not quick_stop:
                cancel_leftovers(self.loop)
                self.loop.close()
            if self.pool is not None:
                self.pool.close()

    async def _main(self) -> None:
        self.stopped = asyncio.Event()
        self.all_closed = asyncio.Event()
        self.lifespan = Lifespan(self.asgi_app,
                                 "off" if self.interface == "wsgi" else self.cfg.lifespan)
        try:
            await self.lifespan.startup()
        except LifespanFailed as exc:
            raise BootFailed(EXIT_BOOT, str(exc)) from None
        if not self.alive:  # told to stop while starting up: undo what started
            await self.lifespan.shutdown(LIFESPAN_SHUTDOWN_SECONDS)
            return
        loop = self.loop
        loop.add_reader(self.wakeup_r, self._on_wakeup)
        for listener in self.listeners:
            listener.sock.setblocking(False)
        self.acceptor.set_accepting(True)
        if self.handover is not None:  # (its watcher waits for this before it acts)
            self.scoreboard.mark_hands_off(self.number, True)
        self._publish()  # from now on peers may leave connections to this worker
        self._tick()
        self.serving = True
        self.report_booted()
        await self.stopped.wait()
        await self._drain()
        await self.lifespan.shutdown(LIFESPAN_SHUTDOWN_SECONDS)

    # -- signals, heartbeat, stopping ---------------------------------------------------------

    def _graceful_stop(self, signum: int, frame: Any) -> None:
        super()._graceful_stop(signum, frame)
        # uvloop replaces the signal wakeup fd with its own while it runs, so wake the loop
        # explicitly rather than through the worker's wakeup pipe.
        if self.serving:
            self.loop.call_soon_threadsafe(self._begin_stop)

    def stop_loop_now(self) -> None:
        """The quick stop's StopNow reached a protocol callback, where uvloop would log and
        swallow it: stop the loop instead, and `serve` raises it again."""
        self.quick_stopping = True
        self.loop.stop()

    def _on_wakeup(self) -> None:
        try:
            os.read(self.wakeup_r, 4096)
        except BlockingIOError:
            pass
        if not self.alive:
            self._begin_stop()

    def _tick(self) -> None:
        try:
            self.tick()
        except Exception as exc:  # the master is gone or the pipe broke: stop now
            error_log.info("worker %d (pid %d): %s; exiting", self.number, os.getpid(), exc)
            self.alive = False
            self._begin_stop()
            return
        if not self.alive:
            self._begin_stop()
        if self.auto is not None and self.auto.tick(self.loop.time()):
            self._place_calls()
        self.loop.call_later(self.tick_interval, self._tick)

    def _begin_stop(self) -> None:
        if self.stopping:
            return
        self.stopping = self.close_all = True
        self.serving = False  # a second stop signal has nothing to wake (the loop may close)
        self.acceptor.set_accepting(False)
        self._publish()
        if self.handover is not None:
            self.scoreboard.mark_hands_off(self.number, False)
        for listener in self.listeners:
            listener.sock.close()
        for protocol in list(self.connections):
            protocol.begin_stop()
        for cycle in self._stuck_in_threads():
            cycle.out.abort()  # it cannot be ended: stop without waiting for it
        self.loop.call_later(max(0.0, self.cfg.graceful_timeout - WS_CLOSE_MARGIN),
                             self._stop_deadline)
        self.stopped.set()

    def _stop_deadline(self) -> None:
        for protocol in list(self.connections):
            protocol.end_now()

    async def _drain(self) -> None:
        """Wait for open connections to finish, and accepted ones still reading a PROXY
        header or doing a TLS handshake, for --graceful-timeout at most (the master kills a
        worker still running then; one whose master is gone must end by itself)."""
        if not (self.connections or self.accepted):
            return
        try:
            await asyncio.wait_for(self.all_closed.wait(), self.cfg.graceful_timeout)
        except asyncio.TimeoutError:
            error_log.warning("worker %d: %d connections still open after --graceful-timeout "
                              "%g s; closing them", self.number, len(self.connections),
                              self.cfg.graceful_timeout)
            for protocol in list(self.connections):
                protocol.abort()

    # -- taking connections ----------------------------------------------------------------------

    def take(self, sock: socket.socket, peer: Any, replay: bytes | None = None,
             local: Any = None) -> bool:
        """Serve the connection `sock`: accepted (from `peer` to `local`, if known), or
        handed by a peer with `replay`, the bytes it read of a request (maybe none). True if
        the worker still takes connections (serving this one in its first turn may have
        filled it: every thread or --worker-connections in use)."""
        if replay is None and self.stats is not None:
            self.stats.accepted += 1
        if not self._below_limit():
            # Idle connections must not lock out new clients (thousands that connect and
            # send nothing): the one idle longest makes room.
            oldest = quiet_one(self.idle)
            if oldest is not None:
                del self.idle[oldest]
                oldest.close()
        plain = self.tls is None and not self.cfg.proxy_protocol
        data = _first_read(sock) if plain and replay is None else None
        if data:
            self._serve_direct(sock, peer, local, data, _at_eof(sock))
        elif data is not None:  # b"": the client left without a word
            sock.close()
        else:
            self._open_later(sock, replay, plain)
        if not self.has_room():
            self.acceptor.set_accepting(False)  # connection_closed starts again once one is gone
        return self.acceptor.accepting

    def _open_later(self, sock: socket.socket, replay: bytes | None, plain: bool) -> None:
        """Set up the protocol of `sock` (with the bytes a peer read of it, `replay`) once
        its transport is made, or its preamble read."""
        self.accepted += 1
        self._publish()  # count it now: peers must see this worker's load at once
        if plain:
            fd = sock.fileno()
            # (One with bytes is handed on only once its protocol has them.)
            if not replay and self.handover is not None:
                self.handover.accepted(fd)
            self._open(self.loop.connect_accepted_socket(
                lambda: HTTPProtocol(self, replay=replay, adopted=replay is not None), sock),
                sock, fd)
        else:
            self.loop.create_task(connect_after_preamble(self, sock))

    def _serve_direct(self, sock: socket.socket, peer: Any, local: Any, data: bytes,
                      eof: bool) -> None:
        """Serve a connection whose first bytes were read as it was accepted (and whose
        client has ended writing, `eof`) on its socket for the rest of this loop turn
        (workers/direct.py), then on the loop's transport if it is still open."""
        protocol = HTTPProtocol(self, replay=data)
        transport = DirectTransport(sock, peer, local, protocol, self.loop)
        protocol.connection_made(transport)  # type: ignore[arg-type]
        if eof and not protocol.closing and not protocol.eof_received():
            transport.close()
        self._publish()
        self.loop.call_soon(transport.settle, self.loop.connect_accepted_socket, self._step)

    def has_room(self) -> bool:
        """May this worker take another connection (--worker-connections, free threads)? At
        --worker-connections it still may when it can close an idle connection for it."""
        return self._free() and (self._below_limit() or quiet_one(self.idle) is not None)

    def _free(self) -> bool:
        """Neither every thread busy nor over --max-worker-memory."""
        return not self.over_memory and not (
            self.app_threaded and self.in_flight >= self.thread_limit)

    def _below_limit(self) -> bool:
        return len(self.connections) + self.accepted < self.cfg.worker_connections

    def _open(self, opening: Coroutine[Any, Any, Any], sock: socket.socket, fd: int) -> None:
        """Run `opening`, connect_accepted_socket on a plain socket (descriptor `fd`)."""
        def finished(exc: BaseException | None) -> None:
            if exc is not None:
                sock.close()
            if self.handover is not None:
                self.handover.settled(fd)
            self.connection_settled()

        self._step(opening, finished)

    def _step(self, opening: Coroutine[Any, Any, Any],
              finished: Callable[[BaseException | None], None]) -> None:
        """Step `opening`, a connect_accepted_socket, to its end, then `finished(None)`, or
        `finished(exc)` if it failed. It only waits for its transport to call
        connection_made on the next loop turn, so it is stepped here rather than run as a
        task: a task per connection costs more than parsing its request."""
        try:
            waiting = opening.send(None)
        except StopIteration:
            finished(None)
        except (Exception, asyncio.CancelledError) as exc:  # (OSError, mostly)
            finished(exc)
        else:
            waiting.add_done_callback(lambda _: self._step(opening, finished))

    def connection_settled(self) -> None:
        """An accepted socket runs its protocol now, or was closed."""
        self.accepted -= 1
        self._publish()
        acceptor = self.acceptor
        if self.stopping:
            self._check_all_closed()
        elif not acceptor.accepting and not acceptor.deferring and self.has_room():
            acceptor.set_accepting(True)

    def stop_taking_connections(self) -> None:
        # Responses say Connection: close from now on (see `close_all`).
        self.acceptor.set_accepting(False)
        self._publish()

    def _publish(self) -> None:
        """Tell peers how many connections this worker holds; UNAVAILABLE while it cannot
        take one (stopping, over memory, every thread busy, at --worker-connections): a peer
        must not leave new connections to a worker that will not accept them."""
        # (At --worker-connections an idle connection counts as room without `has_room`'s
        # poll of them: this runs on every connection and every batch.)
        if self.stopping or not self._free() or not (self._below_limit() or self.idle):
            load = UNAVAILABLE
        else:
            load = len(self.connections) + self.accepted
        self.scoreboard.set(self.number, load)

    # -- calling a WSGI app -----------------------------------------------------------------------

    def start_wsgi(self, cycle: WSGICycle) -> None:
        """Call the WSGI app for `cycle` once the loop has read what every ready connection
        sent (`run_wsgi`): answering in a batch, as ASGI tasks do, rather than between reads
        saves the kernel a wakeup of the client per response (27 us of CPU per request
        instead of 36, hello world, 16 keep-alive connections). A pool thread gets its
        request at once: it runs beside the loop."""
        if self.app_threaded:
            self._run_in_thread(cycle, self.request_done)
            return
        self.ready.append(cycle)
        if len(self.ready) == 1:
            self.loop.call_soon(self._run_ready)

    def _run_ready(self) -> None:
        ready = self.ready
        self.in_batch = True
        if self.auto is not None:
            self.auto.batch_begins()
        try:
            while ready:
                self.run_wsgi(ready.popleft())
        finally:
            self.in_batch = False
            corked, self.corked = self.corked, []
            for protocol in corked:
                protocol.uncork()
        self._publish()  # free again: peers may leave connections to it (see in_app)

    def run_wsgi(self, cycle: WSGICycle) -> None:
        """Call the WSGI app for `cycle` (counted in `in_flight` already). With --threads N
        in the pool. With --threads 1 inline in the loop when the body is in (the protocol
        awaits a small one), else in the one thread (a large body, or one the client sends
        after 100 Continue). A call in that thread runs alone, the app being told it is not
        multithreaded: the loop calls the app again only once it returned. --threads auto
        is 1 while `AutoThreads` says so, except that a body still coming is read in the
        pool, and N otherwise."""
        if self.app_threaded:
            self._run_in_thread(cycle, self.request_done)
        elif self.thread_busy:
            self.waiting_for_app.append(lambda: self.run_wsgi(cycle))
        elif cycle.body_complete:
            cycle.run_inline(self.request_done, self.app_free, self.in_app)
        elif self.concurrent:
            self._run_in_thread(cycle, self.request_done)
        else:
            self.thread_busy = True
            self._run_in_thread(cycle, self._thread_call_done)

    def _run_in_thread(self, cycle: WSGICycle, on_done: Callable[[], None]) -> None:
        def done() -> None:
            self.in_threads.discard(cycle)
            auto = self.auto
            if auto is not None and auto.called(cycle.app_seconds, self.loop.time()):
                self._place_calls()
            on_done()

        self.in_threads.add(cycle)
        cycle.run_in_thread(self.pool, done)
        if self.app_threaded and not self.has_room():
            self.acceptor.set_accepting(False)  # let other workers take new connections
            self._publish()

    def _thread_call_done(self) -> None:
        self.thread_busy = False
        self.request_done()
        while self.waiting_for_app and not self.thread_busy:
            self.waiting_for_app.popleft()()

    def in_app(self, cycle: WSGICycle, call: Callable[..., Any], *args: Any) -> Any:
        """`call(*args)`, a call into the app for `cycle` in the loop, which it blocks: the
        scoreboard says so meanwhile, so that peers do not wait for this worker to accept,
        the master can name the request if it hangs, and the watcher can hand the worker's
        waiting connections to peers if it runs long (closed here as it returns, see
        `Handover`)."""
        request = cycle.request
        handover = self.handover
        if self.scoreboard.serving(self.number, request.method, request.target) \
                and handover is not None:
            try:
                channel.send(self.channel_fd, CALLING_FRAME)  # the master polls again
            except OSError:
                pass  # the master is gone: the tick finds out
        auto = self.auto
        if auto is not None and not self.in_batch:
            auto.batch_begins()
        started = perf_counter() if auto is not None else 0.0
        try:
            return call(*args)
        finally:
            self.scoreboard.served(self.number)
            if handover is not None and handover.watcher.attention:
                handover.close_handed()
            if auto is not None and auto.called_in_loop(perf_counter() - started,
                                                        self.loop.time()):
                self._place_calls()
            if not self.in_batch:  # (a batch publishes once, at its end)
                self._publish()

    def _place_calls(self) -> None:
        """--threads auto changed its mind: from now on the app is called in the pool
        (requests already read in this batch too), or in the loop again (the pool's threads,
        idle from then on, end after THREAD_IDLE_SECONDS)."""
        auto = self.auto
        self.app_threaded = auto.threaded
        if auto.threaded:
            error_log.debug("worker %d: %d of %d calls into the app waited over %g ms; "
                            "calling it in up to %d threads", self.number, auto.slow_calls,
                            auto.calls, SLOW_CALL * 1000, self.thread_limit)
        else:
            error_log.debug("worker %d: no call into the app waited over %g ms for %g s; "
                            "calling it in the loop again", self.number, SLOW_CALL * 1000,
                            CALM_SECONDS)

    def app_free(self) -> asyncio.Future[None] | None:
        """None if the loop may call the app now; else a future done once it may try again
        (--threads 1: a call in the thread is running)."""
        if not self.thread_busy:
            return None
        free = self.loop.create_future()
        self.waiting_for_app.append(lambda: free.done() or free.set_result(None))
        return free

    def request_done(self) -> None:
        """A request's exchange is over (the app may have left a task behind)."""
        self.in_flight -= 1
        if self.memory_limit_kib and not self.over_memory:
            self.check_memory()
        if self.app_threaded:
            self._publish()
            acceptor = self.acceptor
            if not acceptor.accepting and not acceptor.deferring and not self.stopping \
                    and self.has_room():
                acceptor.set_accepting(True)

    def held_connections(self) -> int:
        return len(self.connections) + self.accepted

    def stuck_request(self) -> str:
        stuck = self._stuck_in_threads()
        if not stuck:
            return ""
        oldest = min(stuck, key=lambda cycle: cycle.started)
        line = (oldest.request.method + b" " + oldest.request.target).decode("latin-1")
        return (f"stuck in {line!r} in a thread for "
                f"{time.monotonic() - oldest.started:.1f} s (limit {self.cfg.timeout:g} s)")

    def _stuck_in_threads(self) -> list[WSGICycle]:
        """Requests whose app has run in a pool thread for --timeout without reading from
        or writing to its client."""
        timeout = self.cfg.timeout
        if not self.in_threads or timeout <= 0:
            return []
        since = time.monotonic() - timeout
        return [cycle for cycle in self.in_threads if cycle.started < since]

    def connection_opened(self, protocol: HTTPProtocol) -> bool:
        """`protocol` starts; False if a peer serves its connection (handed while opening):
        the protocol then closes it without a word."""
        handover = self.handover
        if handover is not None and not handover.opened(protocol.fd):
            return False
        self.connections.add(protocol)
        return True

    def now_idle(self, protocol: HTTPProtocol) -> None:
        """`protocol` waits for a request: at --worker-connections it can make room for a
        new connection, so a worker that stopped accepting may start again."""
        self.idle[protocol] = None
        if not self.acceptor.accepting and not self.acceptor.deferring and not self.stopping \
                and self.has_room():
            self.acceptor.set_accepting(True)
            self._publish()

    def not_idle(self, protocol: HTTPProtocol) -> None:
        """`protocol`'s next request has begun: it can no longer make room for a new
        connection, so a worker at --worker-connections may have to stop accepting."""
        # (Only at --worker-connections can it have made room: the check costs a call.)
        if self.idle.pop(protocol, 0) is None and not self._below_limit() \
                and self.acceptor.accepting and not self.has_room():
            self.acceptor.set_accepting(False)  # connection_closed starts again once one is gone
            self._publish()

    def connection_closed(self, protocol: HTTPProtocol) -> None:
        self.connections.discard(protocol)
        self.idle.pop(protocol, None)
        self._publish()
        if self.stopping:
            self._check_all_closed()
        elif not self.acceptor.accepting and self.has_room():
            self.acceptor.resume(forced=False)  # also ends a pause: a descriptor is free

    def _check_all_closed(self) -> None:
        if not self.connections and not self.accepted:
            self.all_closed.set()


def _at_eof(sock: socket.socket) -> bool:
    """Has the client ended writing after what was read? (Told with the bytes, as a
    transport's reads would, the end comes before any response is under way: a client that
    half-closes after its requests has not left.)"""
    # Usually nothing more came: a poll says so without the exception a peek would raise
    # (making it costs more than the system call).
    fd = sock.fileno()
    _POLL.register(fd, select.POLLIN)
    try:
        if not _POLL.poll(0):
            return False
    finally:
        _POLL.unregister(fd)
    try:
        return sock.recv(1, _PEEK_NOW) == b""
    except OSError:  # a reset shows at the next read
        return False


def _first_read(sock: socket.socket) -> bytes | None:
    """What a just-accepted client sent already (b"" if it left, or reset the connection),
    or None if nothing came yet."""
    try:
        return sock.recv(FIRST_READ, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
