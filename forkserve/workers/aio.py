"""The worker: an asyncio (or uvloop) event loop serving HTTP/1.1 to a WSGI or an ASGI app.

The loop accepts on the shared listening sockets itself (so the scoreboard can spread
connections across workers) and runs one `HTTPProtocol` per connection. An ASGI request runs
as a task; a WSGI app is called inline in the loop (--threads 1, once the request's body is
in) or in a pool of --threads threads (see `run_wsgi`). The heartbeat is a loop timer: an
app that blocks the loop stops it, and the master then sees a hang and dumps the tracebacks.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine
from time import perf_counter
from typing import Any

from forkserve.asgi import Lifespan, LifespanFailed, wrap_asgi2

# Imported here, in the master, so that the workers share its pages (PSS).
try:
    import uvloop
except ImportError:  # asyncio's own loop then
    uvloop = None
from forkserve import channel, health
from forkserve.errors import EXIT_BOOT, StopNow
from forkserve.handoff import CallWatcher
from forkserve.http.base import error_response
from forkserve.logs import access_log, error_log
from forkserve.proxy_protocol import ProxyHeader, ProxyProtocolError
from forkserve.scoreboard import UNAVAILABLE
from forkserve.threadpool import ThreadPool
from forkserve.tls import PLAIN_HTTP_EXPLAIN, is_plain_http
from forkserve.workers.autothreads import AUTO_THREADS, CALM_SECONDS, SLOW_CALL, AutoThreads
from forkserve.workers.base import (
    ACCEPT_BATCH,
    BALANCE_MARGIN,
    DEFER_POLL,
    STOP_GRACE,
    BootFailed,
    ProxyHeaderReader,
    Worker,
    quiet_one,
)
from forkserve.workers.protocol import HTTPProtocol
from forkserve.wsgi_cycle import WSGICycle

# On a graceful stop, open WebSockets are closed, and responses still streaming without a
# Content-Length ended, this many seconds before --graceful-timeout ends (so that the worker
# can still run lifespan shutdown and exit by itself).
WS_CLOSE_MARGIN = 1.0
# How long lifespan shutdown may take on a graceful stop.
LIFESPAN_SHUTDOWN_SECONDS = 10.0
CALLING_FRAME = channel.encode(channel.CALLING)
# A pool thread waiting this long for a call ends (a new one starts when calls wait).
THREAD_IDLE_SECONDS = CALM_SECONDS


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """An event loop of `kind`: 'uvloop', 'asyncio', or 'auto' (uvloop when installed).
    Raises ImportError for 'uvloop' without uvloop."""
    if kind in ("auto", "uvloop"):
        if uvloop is not None:
            return uvloop.new_event_loop()
        if kind == "uvloop":
            raise ImportError("uvloop is not installed")
    return asyncio.new_event_loop()


class AsyncioWorker(Worker):
    """Serves a WSGI or an ASGI app from one event loop per process."""

    accepting = False  # listeners registered with the loop
    serving = False  # booted and not stopping: a stop signal must wake its loop
    deferring = False  # accepting paused for a while (a lighter peer, or no descriptors)
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
        self.opening: set[int] = set()  # descriptors accepted, their protocol not yet made
        self.handed_opening: set[int] = set()  # of those, handed to a peer meanwhile
        # Calls into the app in the loop hand its waiting connections to peers once they run
        # long (forkserve.handoff); not TLS or PROXY connections, whose state is ours alone.
        self.watcher: CallWatcher | None = None
        if wsgi and not self.app_threaded and self.tls is None and not cfg.proxy_protocol:
            try:
                self.watcher = CallWatcher(
                    self.handoff, self.handoff.nudges,
                    lambda: self.scoreboard.call_started(self.number),
                    self._waiting_connections, self._peers_free)
            except RuntimeError as exc:  # a process limit counts threads too
                error_log.warning("worker %d cannot start its hand-off thread (%s): its "
                                  "connections will wait behind long calls into the app",
                                  self.number, exc)
        self.connections: set[HTTPProtocol] = set()
        # Connections waiting for a request that has not begun, longest waiting first.
        self.idle: dict[HTTPProtocol, None] = {}
        self.accepted = 0  # accepted sockets whose protocol is not set up yet
        self.stopping = False
        self.accepting = False
        self.warned_no_websocket = False
        self.access_log_format = None if access_log.disabled else cfg.access_log_format
        try:
            self.loop = new_event_loop(cfg.loop)
        except ImportError:
            raise BootFailed(EXIT_BOOT, "--loop uvloop: uvloop is not installed "
                                        "(pip install 'forkserve[fast]')") from None
        asyncio.set_event_loop(self.loop)
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
                _cancel_leftovers(self.loop)
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
        self._set_accepting(True)
        if self.watcher is not None:  # (the watcher waits for this before it acts)
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
        self._set_accepting(False)
        if self.watcher is not None:
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

    # -- accepting ------------------------------------------------------------------------------

    def _set_accepting(self, on: bool) -> None:
        if on == self.accepting:
            return
        self.accepting = on
        for listener in self.listeners:
            if on:
                self.loop.add_reader(listener.sock.fileno(), self._accept, listener.sock)
            else:
                self.loop.remove_reader(listener.sock.fileno())
        if self.watcher is not None:  # connections handed by peers: taken like new ones
            if on:
                self.loop.add_reader(self.handoff.fileno(), self._adopt)
            else:
                self.loop.remove_reader(self.handoff.fileno())

    def _resume_accepting(self, forced: bool = True) -> None:
        """End a pause of accepting; `forced`: accept one connection even if a peer is
        lighter (it may be slow to wake)."""
        self.deferring = False
        if not self.stopping and self._has_room():
            self.accept_forced = forced
            self._set_accepting(True)

    def _pause_accepting(self, seconds: float, rebalancing: bool) -> None:
        self.deferring = True  # ended by the timer below, or by a connection closing
        self._set_accepting(False)
        if rebalancing:
            self._poll_deferral(self.loop.time() + seconds)
        else:
            self.loop.call_later(seconds, self._resume_accepting)

    def _poll_deferral(self, until: float) -> None:
        """A rebalancing pause ends at `until` (loop time), or as soon as no peer is lighter
        (looked at every DEFER_POLL): no worker idles while connections queue."""
        if not self.deferring:
            return  # ended already
        if self.loop.time() >= until:
            self._resume_accepting()
        elif not self.scoreboard.has_lighter_peer(self.number, BALANCE_MARGIN):
            self._resume_accepting(forced=False)
        else:
            self.loop.call_later(DEFER_POLL, self._poll_deferral, until)

    def _accept(self, listening: socket.socket) -> None:
        self.accept_batch(listening, self._pause_accepting, self._take)

    def _take(self, sock: socket.socket, peer: Any, replay: bytes | None = None) -> None:
        """Serve the connection `sock`: accepted, or handed by a peer with `replay`, the
        bytes it read of a request (maybe none)."""
        if replay is None and self.stats is not None:
            self.stats.accepted += 1
        if not self._below_limit():
            # Idle connections must not lock out new clients (thousands that connect and
            # send nothing): the one idle longest makes room.
            oldest = quiet_one(self.idle)
            if oldest is not None:
                del self.idle[oldest]
                oldest.close()
        self.accepted += 1
        self._publish()  # count it now: peers must see this worker's load at once
        if self.tls is None and not self.cfg.proxy_protocol:
            fd = sock.fileno()
            if not replay:  # (one with bytes is handed on only once its protocol has them)
                self.opening.add(fd)
            self._open(self.loop.connect_accepted_socket(
                lambda: HTTPProtocol(self, replay=replay), sock), sock, fd)
        else:
            self.loop.create_task(self._connect(sock))
        if not self._has_room():
            self._set_accepting(False)  # connection_closed starts again once one is gone

    def _has_room(self) -> bool:
        """May this worker take another connection (--worker-connections, free threads)? At
        --worker-connections it still may when it can close an idle connection for it."""
        if self.app_threaded and self.in_flight >= self.thread_limit:
            return False
        return not self.over_memory and (
            self._below_limit() or quiet_one(self.idle) is not None)

    def _below_limit(self) -> bool:
        return len(self.connections) + self.accepted < self.cfg.worker_connections

    async def _readable(self, sock: socket.socket, timeout: float) -> None:
        """Wait until `sock` is readable; raises TimeoutError after `timeout` seconds."""
        ready = self.loop.create_future()
        fd = sock.fileno()
        self.loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, max(0.0, timeout))
        finally:
            self.loop.remove_reader(fd)

    async def _proxy_header(self, sock: socket.socket, deadline: float) -> ProxyHeader:
        """Read the PROXY protocol header the connection must start with, by `deadline`
        (loop time)."""
        reader = ProxyHeaderReader()
        while True:
            try:
                header = reader.read(sock)
            except BlockingIOError:
                header = None
            if header is not None:
                return header
            await self._readable(sock, deadline - self.loop.time())

    async def _starts_tls(self, sock: socket.socket, deadline: float) -> bool:
        """Wait for the first byte of the client's TLS handshake (by `deadline`, loop time):
        True when it comes. A client speaking plain HTTP is answered 400 (in plain text)
        and the socket closed; one that leaves is closed."""
        await self._readable(sock, deadline - self.loop.time())
        first = sock.recv(1, socket.MSG_PEEK)
        if first and not is_plain_http(first):
            return True
        try:
            if not first:
                return False
            sock.send(error_response(400, PLAIN_HTTP_EXPLAIN))
            sock.shutdown(socket.SHUT_WR)
            # Read what the client sent before closing: unread bytes would make the kernel
            # reset the connection and destroy the answer.
            while await asyncio.wait_for(self.loop.sock_recv(sock, 65536), STOP_GRACE):
                pass
        finally:
            sock.close()
        return False

    async def _connect(self, sock: socket.socket) -> None:
        """Run an HTTPProtocol on an accepted socket once its PROXY header is read and its
        TLS handshake done (a plain socket goes through `_open`). The client has
        --keep-alive to send its first byte, then --header-timeout for all that (the request
        head's own bound starts once the protocol runs)."""
        tls = self.tls
        header = None
        cfg = self.cfg
        sock.setblocking(False)  # read here before its transport exists
        try:
            await self._readable(sock, self.first_byte_timeout)
            # For the PROXY header and the TLS handshake (loop time):
            deadline = self.loop.time() + (cfg.header_timeout or self.idle_timeout)
            if cfg.proxy_protocol:
                header = await self._proxy_header(sock, deadline)
            if tls is not None and not await self._starts_tls(sock, deadline):
                return
            await self.loop.connect_accepted_socket(
                lambda: HTTPProtocol(self, header), sock, ssl=tls,
                ssl_handshake_timeout=max(0.001, deadline - self.loop.time()) if tls else None)
        except (OSError, asyncio.TimeoutError, ProxyProtocolError) as exc:
            if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLZeroReturnError):
                error_log.debug("TLS handshake failed: %s", exc)
            elif isinstance(exc, ProxyProtocolError):
                error_log.info("closed a connection: %s", exc)
            sock.close()
        finally:
            self._connected()

    def _open(self, opening: Coroutine[Any, Any, Any], sock: socket.socket, fd: int) -> None:
        """Step `opening`, connect_accepted_socket on a plain socket (descriptor `fd`), to
        its end. It only waits for its transport to call connection_made on the next loop
        turn, so it is stepped here rather than run as a task: a task per connection costs
        more than parsing its request."""
        try:
            waiting = opening.send(None)
        except StopIteration:
            pass
        except (OSError, asyncio.CancelledError):
            sock.close()
        else:
            waiting.add_done_callback(lambda _: self._open(opening, sock, fd))
            return
        self.opening.discard(fd)
        self.handed_opening.discard(fd)
        self._connected()

    def _connected(self) -> None:
        """An accepted socket runs its protocol now, or was closed."""
        self.accepted -= 1
        self._publish()
        if self.stopping:
            self._check_all_closed()
        elif not self.accepting and not self.deferring and self._has_room():
            self._set_accepting(True)

    def stop_taking_connections(self) -> None:
        # Responses say Connection: close from now on (see `close_all`).
        self._set_accepting(False)

    def _publish(self) -> None:
        if self.app_threaded and self.in_flight >= self.thread_limit:
            load = UNAVAILABLE  # every thread is busy: peers must not wait for this worker
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
        if self.app_threaded and not self._has_room():
            self._set_accepting(False)  # let other workers take new connections
            self._publish()

    def _thread_call_done(self) -> None:
        self.thread_busy = False
        self.request_done()
        while self.waiting_for_app and not self.thread_busy:
            self.waiting_for_app.popleft()()

    def in_app(self, cycle: WSGICycle, call: Callable[..., bool], *args: Any) -> bool:
        """`call(*args)`, a call into the app for `cycle` in the loop, which it blocks: the
        scoreboard says so meanwhile, so that peers do not wait for this worker to accept,
        the master can name the request if it hangs, and the watcher can hand the worker's
        waiting connections to peers if it runs long (closed here as it returns)."""
        request = cycle.request
        watcher = self.watcher
        if self.scoreboard.serving(self.number, request.method + b" " + request.target) \
                and watcher is not None:
            try:
                channel.send(self.channel_fd, CALLING_FRAME)  # the master polls again
            except OSError:
                pass  # the master is gone: the tick finds out
        auto = self.auto
        if auto is not None and not self.in_batch:
            auto.batch_begins()
        started = perf_counter()
        try:
            return call(*args)
        finally:
            self.scoreboard.served(self.number)
            if watcher is not None and watcher.attention:
                self._close_handed(watcher.call_ended())
            if auto is not None and auto.called_in_loop(perf_counter() - started,
                                                        self.loop.time()):
                self._place_calls()
            if not self.in_batch:  # (a batch publishes once, at its end)
                self._publish()

    # -- handing connections to peers while the app blocks the loop ----------------------------

    def _waiting_connections(self) -> list[tuple[int, Any, bytes]]:
        """(The watcher's thread, while the loop is in a call.) The connections a peer could
        serve as new ones: (descriptor, protocol, b"") of those idle with nothing read,
        (descriptor, descriptor, b"") of those accepted whose protocol is not made yet, and
        (descriptor, protocol, its bytes) of those whose request waits for the app, read in
        one piece (see HTTPProtocol.replay)."""
        waiting: dict[int, tuple[int, Any, bytes]] = {
            fd: (fd, fd, b"") for fd in list(self.opening)}
        for protocol in list(self.idle):
            if protocol.may_hand_off():
                waiting[protocol.fd] = (protocol.fd, protocol, b"")
        for cycle in list(self.ready):
            protocol = cycle.out
            replay = protocol.replay()
            if replay:
                waiting[protocol.fd] = (protocol.fd, protocol, replay)
        return list(waiting.values())

    def _peers_free(self) -> bool:
        return self.scoreboard.has_free_adopter(self.number)

    def _close_handed(self, handed: list[Any]) -> None:
        """Close this worker's descriptors of connections a peer now serves: a protocol now,
        a connection still opening as its protocol is made (see connection_opened)."""
        for owner in handed:
            if type(owner) is int:
                self.opening.discard(owner)  # not to be handed again in the next call
                self.handed_opening.add(owner)
                continue
            cycle = owner.cycle
            if cycle is not None:  # its request was queued for the app: the peer answers it
                self.ready.remove(cycle)
                owner.cycle = None
                self.in_flight -= 1
                self.served -= 1
            owner.hand_over()

    def _adopt(self) -> None:
        """Take the connections a peer handed over, as if accepted."""
        for _ in range(ACCEPT_BATCH):
            given = self.handoff.receive()
            if given is None:
                return
            for sock, replay in given:
                self._take(sock, None, replay)

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
            if not self.accepting and not self.deferring and not self.stopping \
                    and self._has_room():
                self._set_accepting(True)

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
        fd = protocol.fd
        self.opening.discard(fd)  # (a peer may take it as idle from now on)
        if self.handed_opening and fd in self.handed_opening:
            return False
        self.connections.add(protocol)
        return True

    def now_idle(self, protocol: HTTPProtocol) -> None:
        """`protocol` waits for a request: at --worker-connections it can make room for a
        new connection, so a worker that stopped accepting may start again."""
        self.idle[protocol] = None
        if not self.accepting and not self.deferring and not self.stopping \
                and self._has_room():
            self._set_accepting(True)

    def not_idle(self, protocol: HTTPProtocol) -> None:
        """`protocol`'s next request has begun: it can no longer make room for a new
        connection, so a worker at --worker-connections may have to stop accepting."""
        if self.idle.pop(protocol, 0) is None and self.accepting and not self._has_room():
            self._set_accepting(False)  # connection_closed starts again once one is gone

    def connection_closed(self, protocol: HTTPProtocol) -> None:
        self.connections.discard(protocol)
        self.idle.pop(protocol, None)
        self._publish()
        if self.stopping:
            self._check_all_closed()
        elif not self.accepting and self._has_room():
            self._resume_accepting(forced=False)  # also ends a pause: a descriptor is free

    def _check_all_closed(self) -> None:
        if not self.connections and not self.accepted:
            self.all_closed.set()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel tasks still running when the worker stops (an app's background work)."""
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
