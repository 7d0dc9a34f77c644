"""The vhost-user-blk server: listens on a UNIX socket, serves one front end at a time (a
VhostUserBlkDevice per session), and answers statistics clients from the same loop.

Nothing here runs per I/O request: the front end's messages are dispatched to the device's
handlers, which hand finished descriptions to the C core.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import selectors
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..disks import Disk
from ..errors import ConfigError, ProtocolError
from ..observe.metrics import StatsCollector
from ..protocol.vhost_user import close_fds, recv_message, send_message
from . import stats
from .device import VhostUserBlkDevice
from .engines import EnginePool
from .record import Recording

log = logging.getLogger("dataplane.vhost")

MESSAGE_TIMEOUT_S = 5.0
T = TypeVar("T")


@dataclass
class ServerOptions:
    socket_path: Path
    num_queues: int
    socket_mode: int = 0o600
    socket_group: str | None = None
    inflight: bool = True
    metrics: tuple[str, int] | None = None   # Prometheus endpoint (host, port); None: off
    record: Path | None = None                # record every request served from the start
    record_format: str = "blktrace"


def _group_id(group: str) -> int:
    import grp

    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket group {group!r} does not exist") from None


def prepare_socket_path(path: Path) -> None:
    """Refuse a path another server listens on; remove a stale socket left by a crash."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"socket path {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()   # nobody listening: left over from a previous run
        return
    except OSError as exc:
        raise ConfigError(f"socket path {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ConfigError(f"socket path {path} is in use by another server")


class VhostUserBlkServer:
    """Listens on a UNIX socket and serves one front end at a time until stopped."""

    def __init__(self, disk: Disk, options: ServerOptions, engines: EnginePool | None = None):
        self.disk = disk
        self.options = options
        self.engines = engines or EnginePool()
        self.device: VhostUserBlkDevice | None = None
        self.conn: socket.socket | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._calls: queue.SimpleQueue = queue.SimpleQueue()   # call_in_loop's, for the loop
        self._loop_thread: threading.Thread | None = None
        self.recording: Recording | None = None
        self.record_totals = [{"recorded": 0, "record_dropped": 0} for _ in range(options.num_queues)]
        disk.apply_latency(options.num_queues)
        self.collector = StatsCollector(
            options.num_queues,
            {i: (self.engines.name_for(i), self.engines.placement.get(i, ("", -1))[1])
             for i in range(options.num_queues)},
            disk.latency)
        self.listener = self._listen()
        self.stats_listener: socket.socket | None = None
        self.metrics_listener: socket.socket | None = None
        try:
            self.stats_listener = self._listen_stats()
            if options.metrics is not None:
                self.metrics_listener = self._listen_metrics(options.metrics)
            if options.record is not None:
                self.start_recording(options.record, options.record_format)
        except BaseException:
            self.close()
            raise

    def _listen(self) -> socket.socket:
        path = self.options.socket_path
        prepare_socket_path(path)
        # Bind under a temporary name and rename once listening, so that the socket path
        # appears only when connections are accepted.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o777 & ~self.options.socket_mode)
        try:
            tmp.unlink(missing_ok=True)
            sock.bind(str(tmp))
            os.chmod(tmp, self.options.socket_mode)
            if self.options.socket_group is not None:
                os.chown(tmp, -1, _group_id(self.options.socket_group))
            sock.listen(16)
            os.rename(tmp, path)
        except (OSError, ConfigError) as exc:
            sock.close()
            tmp.unlink(missing_ok=True)
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"cannot listen on {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        sock.setblocking(False)
        return sock

    def _listen_stats(self) -> socket.socket:
        path = Path(stats.stats_socket_path(self.options.socket_path))
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o777 & ~self.options.socket_mode)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        sock.listen(8)
        sock.setblocking(False)
        return sock

    def _listen_metrics(self, address: tuple[str, int]) -> socket.socket:
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"--metrics {host}:{port}: {exc.strerror}") from None
        sock.listen(8)
        sock.setblocking(False)
        log.info("metrics on http://%s:%d/metrics", host, sock.getsockname()[1])
        return sock

    def snapshot(self) -> dict:
        live = self.device.vrings if self.device is not None else []
        return self.collector.snapshot(live, self.engines.thread_ids(), self._record_snapshot())

    # ---- recording (on the server's loop: call_in_loop from elsewhere) ----

    def start_recording(self, path: str | os.PathLike[str], fmt: str = "blktrace",
                        ring_entries: int = 0, hold_lines: int = 0) -> dict[str, Any]:
        """Record every request served from now on, on every queue, to `path` (blktrace:
        path.blktrace.<q>; iolog: path), until stop_recording. Returns the recording's info.
        ring_entries: each queue's ring (0: 256 Ki); hold_lines: iolog lines a queue may hold
        in memory (0: 1 Mi)."""
        if self.recording is not None:
            raise ConfigError(f"already recording to {self.recording.path}: stop that first")
        recording = Recording(Path(path), fmt, self.options.num_queues, ring_entries, hold_lines)
        self.recording = recording
        if self.device is not None:
            try:
                self.device.set_recorder(recording.handle)
            except BaseException:
                self.device.set_recorder(None)
                self.recording = None
                recording.close()
                raise
        return recording.info()

    def stop_recording(self) -> dict[str, Any]:
        """Stop recording and finish the file(s): every request recorded so far is in them.
        Returns the summary (files, bytes, requests, dropped entries, error)."""
        recording = self.recording
        if recording is None:
            raise ConfigError("not recording")
        if self.device is not None:
            self.device.set_recorder(None)   # no queue writes its ring once this returns
        self.recording = None
        summary = recording.close()
        for totals, q in zip(self.record_totals, summary["queues"], strict=True):
            totals["recorded"] += q["requests"]
            totals["record_dropped"] += q["dropped"]
        return summary

    def _record_snapshot(self) -> dict[str, Any]:
        queues = [dict(t) for t in self.record_totals]
        info = None
        if self.recording is not None:
            for totals, q in zip(queues, self.recording.queue_stats(), strict=True):
                totals["recorded"] += q["requests"]
                totals["record_dropped"] += q["dropped"]
            info = self.recording.info()
        return {"queues": queues, "recording": info}

    def call_in_loop(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run fn on the server's loop (where the session's state lives) and return what it
        returns (or raise what it raised); directly when the loop is not running or this is it."""
        loop = self._loop_thread
        if loop is None or loop is threading.current_thread() or not loop.is_alive():
            return fn()
        done = threading.Event()
        box: list[Any] = []
        self._calls.put((fn, box, done))
        try:
            os.write(self._stop_w, b"c")
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while not done.wait(0.1):
            if self._loop_thread is None:
                self._drain_calls()   # the loop ended after this call was queued
            elif time.monotonic() > deadline:
                raise TimeoutError(f"the server's loop did not run the call within {timeout} s")
        ok, value = box
        if not ok:
            raise value
        return value

    def _run_calls(self) -> None:
        try:
            os.read(self._stop_r, 4096)
        except OSError:
            pass
        self._drain_calls()

    def _drain_calls(self) -> None:
        while True:
            try:
                fn, box, done = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                box[:] = [True, fn()]
            except BaseException as exc:   # handed to the caller
                box[:] = [False, exc]
            done.set()

    def _serve_stats(self, listener: socket.socket, http: bool) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        stats.serve_one(conn, self.snapshot, http)

    def stop(self) -> None:
        """Ask serve_forever to return (safe from signal handlers and other threads)."""
        self._stopping = True
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass

    def serve_forever(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, "listen")
        sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        if self.stats_listener is not None:
            sel.register(self.stats_listener, selectors.EVENT_READ, "stats")
        if self.metrics_listener is not None:
            sel.register(self.metrics_listener, selectors.EVENT_READ, "metrics")
        log.info("listening on %s (%s, %d queue(s))", self.options.socket_path,
                 self.disk.description, self.options.num_queues)
        self._loop_thread = threading.current_thread()
        try:
            while not self._stopping:
                # The attached front end first: its EOF must free the slot before a new
                # connection that arrived in the same round is judged a second front end.
                events = sorted(sel.select(), key=lambda ev: ev[0].data != "conn")
                for key, _ in events:
                    if key.data == "listen":
                        self._accept(sel)
                    elif key.data == "conn":
                        self._on_message(sel)
                    elif key.data in ("stats", "metrics"):
                        self._serve_stats(key.fileobj, http=key.data == "metrics")
                    elif key.data == "stop":
                        self._run_calls()
                    if self._stopping:
                        break
        finally:
            if self.conn is not None:
                self._disconnect(sel, "backend shutting down")
            sel.close()
            self._loop_thread = None
            self._run_calls()   # a call that came in as the loop ended runs here

    def _accept(self, sel: selectors.BaseSelector) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        # The attached front end may have left with messages still queued: read what it
        # sent (up to its EOF) before judging the newcomer a second front end.
        while self.conn is not None and self._readable(self.conn):
            self._on_message(sel)
        if self.conn is not None:
            log.warning("refused a second front end: one is already connected")
            conn.close()
            return
        # A message must arrive whole within this time once its first byte did: a peer that
        # stops mid-message is dropped instead of holding the control loop (and SIGTERM).
        conn.settimeout(MESSAGE_TIMEOUT_S)
        self.conn = conn
        self.device = VhostUserBlkDevice(self.disk, self.options.num_queues, self.engines,
                                         inflight=self.options.inflight)
        if self.recording is not None:
            self.device.set_recorder(self.recording.handle)
        sel.register(conn, selectors.EVENT_READ, "conn")
        log.info("front end connected")

    @staticmethod
    def _readable(conn: socket.socket) -> bool:
        ready, _, _ = select.select([conn], [], [], 0)
        return bool(ready)

    def _on_message(self, sel: selectors.BaseSelector) -> None:
        assert self.conn is not None and self.device is not None
        try:
            msg = recv_message(self.conn)
        except ProtocolError as exc:
            log.error("dropping the connection: %s", exc)
            self._disconnect(sel, "protocol error")
            return
        except TimeoutError:
            self._disconnect(sel, f"dropping the connection: a message was cut off for {MESSAGE_TIMEOUT_S} s")
            return
        except OSError as exc:
            self._disconnect(sel, f"socket error: {exc.strerror}")
            return
        if msg is None:
            self._disconnect(sel, "front end disconnected")
            return
        log.debug("<- %r", msg)
        reply = self.device.handle(msg)
        close_fds(msg.fds)   # any fd a handler did not keep
        if reply is not None:
            try:
                send_message(self.conn, reply)
            except OSError as exc:
                self._disconnect(sel, f"socket error: {exc.strerror}")
            finally:
                close_fds(reply.fds)   # the peer has its own copies now

    def _disconnect(self, sel: selectors.BaseSelector, why: str) -> None:
        if self.conn is None:
            return
        sel.unregister(self.conn)
        self.conn.close()
        self.conn = None
        if self.device is not None:
            self.device.stop_all()
            self.collector.retire(self.device.vrings)
            self.device.close()
            self.device = None
        log.info("%s", why)

    def close(self) -> None:
        if self.recording is not None:
            self.stop_recording()
        self.listener.close()
        self.options.socket_path.unlink(missing_ok=True)
        if self.stats_listener is not None:
            self.stats_listener.close()
            Path(stats.stats_socket_path(self.options.socket_path)).unlink(missing_ok=True)
            self.stats_listener = None
        if self.metrics_listener is not None:
            self.metrics_listener.close()
            self.metrics_listener = None
        self.engines.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


def install_signal_handlers(server: VhostUserBlkServer) -> None:
    """SIGINT/SIGTERM: drain and exit cleanly (the C threads never see signals)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: draining and exiting", signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
