"""The vhost-user-blk server of one export: listens on a UNIX socket (bound here, or handed
over already listening), serves one front end at a time (a VhostUserBlkDevice per session)
from its own loop, and hands statistics to clients of its stats socket.

`dataplane serve` runs one of these per export, each in a thread of its own (backend.daemon);
a test may run one by itself. Other threads may read its snapshot (a lock keeps a session
from being torn down under a reader) and ask it to stop or to be removed; everything else
happens on the thread running serve_forever.

Nothing here runs per I/O request: the front end's messages are dispatched to the device's
handlers, which hand finished descriptions to the C core.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import select
import selectors
import signal
import socket
import stat
import struct
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
from .device import IOTLB_MISS_TIMEOUT_MS, VhostUserBlkDevice
from .engines import EnginePool, EngineView
from .record import Recording

log = logging.getLogger("dataplane.vhost")

MESSAGE_TIMEOUT_S = 5.0
T = TypeVar("T")
STATS_CLIENTS = 4          # stats/metrics clients answered at once (each in a short thread)
REMOVE_GRACE_S = 2.0       # a forced removal answers I/O errors this long before dropping
MAX_SOCKET_PATH = 107      # bytes of sockaddr_un.sun_path, less the terminating NUL
_tmp_names = itertools.count()
UCRED = struct.Struct("iII")   # struct ucred: pid, uid, gid


@dataclass
class ServerOptions:
    socket_path: Path | None
    num_queues: int
    socket_mode: int = 0o600
    socket_group: str | None = None
    inflight: bool = True
    dirty_log: bool = True                   # False: offer LOG_ALL, log nothing (debug only)
    iotlb_check: bool = True                 # False: the vIOMMU enforces nothing (debug only)
    iotlb_miss_timeout_ms: int = IOTLB_MISS_TIMEOUT_MS   # a request waits this long for an UPDATE
    metrics: tuple[str, int] | None = None   # Prometheus endpoint (host, port); None: off
    record: Path | None = None                # record every request served from the start
    record_format: str = "blktrace"
    name: str = ""                           # the export's name (stats, logs)
    listener: socket.socket | None = None    # a listening socket handed over (the caller's)
    listener_label: str = ""                 # how to name it in logs ("fd 3", "socket 'vm1'")
    stats_socket: bool = True                # PATH.stats next to a socket path


def check_listening_socket(sock: socket.socket, what: str) -> None:
    """A socket handed over must be a listening UNIX stream socket."""
    try:
        family = sock.family
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        raise ConfigError(f"{what}: not a socket ({exc.strerror})") from None
    if family != socket.AF_UNIX or kind != socket.SOCK_STREAM:
        raise ConfigError(f"{what}: not a UNIX stream socket")
    if not accepting:
        raise ConfigError(f"{what}: the socket is not listening (call listen() before handing it over)")


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


def bind_unix_socket(path: Path, mode: int, group: str | None,
                     what: str = "cannot listen on") -> socket.socket:
    """A listening UNIX socket at path with that mode and group. It is bound under a temporary
    name and renamed once listening, so the path appears only when connections are accepted;
    a stale socket is replaced, one in use is refused."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(f"socket path {path} is {len(os.fsencode(path))} bytes long; a UNIX socket"
                          f" path may have at most {MAX_SOCKET_PATH}")
    prepare_socket_path(path)
    tmp = path.with_name(f".dp{os.getpid():x}.{next(_tmp_names):x}")
    if len(os.fsencode(tmp)) > MAX_SOCKET_PATH:
        tmp = path          # no room for a temporary name: bind in place
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        tmp.unlink(missing_ok=True)
        sock.bind(str(tmp))
        os.chmod(tmp, mode)
        if group is not None:
            os.chown(tmp, -1, _group_id(group))
        sock.listen(16)
        if tmp != path:
            os.rename(tmp, path)
    except (OSError, ConfigError) as exc:
        sock.close()
        tmp.unlink(missing_ok=True)
        if isinstance(exc, ConfigError):
            raise
        prefix = f"{what} {path}" if what == "cannot listen on" else f"{what} {path}: cannot listen"
        raise ConfigError(f"{prefix}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return sock


def listen_tcp(address: tuple[str, int]) -> socket.socket:
    """The --metrics endpoint's listening socket."""
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


class VhostUserBlkServer:
    """Listens on a UNIX socket and serves one front end at a time until stopped."""

    def __init__(self, disk: Disk, options: ServerOptions,
                 engines: EnginePool | EngineView | None = None,
                 serial_lock: threading.RLock | None = None):
        self.disk = disk
        self.options = options
        self.engines = engines or EnginePool()
        self.device: VhostUserBlkDevice | None = None
        self.conn: socket.socket | None = None
        self.peer: dict[str, Any] | None = None   # the attached front end: pid, uid, gid, since
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._calls: queue.SimpleQueue = queue.SimpleQueue()   # call_in_loop's, for the loop
        self._loop_thread: threading.Thread | None = None
        self.recording: Recording | None = None
        self.record_totals = [{"recorded": 0, "record_dropped": 0} for _ in range(options.num_queues)]
        self._removal: tuple[bool, float, Callable[[str | None], None]] | None = None
        self.removing = False
        self._lock = threading.Lock()         # the session's life vs. snapshot readers
        self._serial = serial_lock            # --debug-serial-control: one export at a time
        self._stats_slots = threading.BoundedSemaphore(STATS_CLIENTS)
        self.owns_listener = options.listener is None
        disk.apply_latency(options.num_queues)
        self.collector = StatsCollector(
            options.num_queues,
            {i: (self.engines.name_for(i), self.engines.placement.get(i, ("", -1))[1])
             for i in range(options.num_queues)},
            disk.latency)
        self.listener: socket.socket | None = self._listen()
        self.stats_listener: socket.socket | None = None
        self.metrics_listener: socket.socket | None = None
        try:
            if options.stats_socket and options.socket_path is not None:
                self.stats_listener = self._listen_stats()
            if options.metrics is not None:
                self.metrics_listener = self._listen_metrics(options.metrics)
            if options.record is not None:
                self.start_recording(options.record, options.record_format)
        except BaseException:
            self.close()
            raise

    @property
    def where(self) -> str:
        """The socket, as logs and errors name it."""
        if self.options.listener is not None:
            return self.options.listener_label or f"fd {self.options.listener.fileno()}"
        return str(self.options.socket_path)

    def _listen(self) -> socket.socket:
        if self.options.listener is not None:
            check_listening_socket(self.options.listener, self.where)
            self.options.listener.setblocking(False)
            return self.options.listener
        assert self.options.socket_path is not None, "a socket path or a listening socket"
        return bind_unix_socket(self.options.socket_path, self.options.socket_mode,
                                self.options.socket_group)

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
        return listen_tcp(address)

    def snapshot(self) -> dict:
        """Counters of every queue, live and past sessions folded in, and what was recorded
        (any thread)."""
        with self._lock:
            live = self.device.vrings if self.device is not None else []
            snap = self.collector.snapshot(live, self.engines.thread_ids(), self._record_snapshot())
        if self.options.name:
            snap["export"] = self.options.name
            for q in snap["queues"]:
                q["export"] = self.options.name
        return snap

    def state(self) -> str:
        if self.removing:
            return "removing"
        if self._stopping:
            return "stopping"
        return "attached" if self.conn is not None else "listening"

    def front_end(self) -> dict[str, Any] | None:
        """Who is attached (SO_PEERCRED) since when, and how far the session got (any thread)."""
        with self._lock:
            if self.peer is None or self.device is None:
                return None
            vrings = self.device.vrings
            return {**self.peer,
                    "queues_running": sum(1 for v in vrings if v.running),
                    "queues_enabled": sum(1 for v in vrings if v.enabled),
                    "memory_mapped": self.device.mem is not None,
                    "features": f"{self.device.features:#x}"}

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
        serve_stats_client(conn, self.snapshot, http, self._stats_slots)

    def stop(self) -> None:
        """Ask serve_forever to return, draining in-flight requests (safe from signal handlers
        and other threads)."""
        self._stopping = True
        self._wake()

    def request_removal(self, force: bool, done: Callable[[str | None], None],
                        grace_s: float = REMOVE_GRACE_S) -> None:
        """Ask serve_forever to end for good (any thread). Without force an attached front end
        makes it refuse: done(reason) is called and serving goes on. Otherwise done(None) once
        serve_forever is about to return: with a front end attached, in-flight requests are
        drained first, then every request is answered IOERR for up to grace_s (the guest sees
        I/O errors rather than a disk that hangs), then the front end is dropped."""
        self._removal = (force, grace_s, done)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass

    def _on_stop_pipe(self) -> None:
        """The stop pipe: calls queued by call_in_loop, a removal asked for."""
        try:
            os.read(self._stop_r, 4096)
        except OSError:
            pass
        self._drain_calls()
        removal, self._removal = self._removal, None
        if removal is None:
            return
        force, grace, done = removal
        if self.conn is not None and not force:
            pid = (self.peer or {}).get("pid")
            done(f"a front end is attached{f' (pid {pid})' if pid else ''}")
            return
        self.removing = True
        self._stopping = True
        self._remove_grace = grace
        self._removed = done

    def serve_forever(self) -> None:
        sel = selectors.DefaultSelector()
        self._removed: Callable[[str | None], None] | None = None
        self._remove_grace = 0.0
        assert self.listener is not None
        sel.register(self.listener, selectors.EVENT_READ, "listen")
        sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        if self.stats_listener is not None:
            sel.register(self.stats_listener, selectors.EVENT_READ, "stats")
        if self.metrics_listener is not None:
            sel.register(self.metrics_listener, selectors.EVENT_READ, "metrics")
        log.info("listening on %s (%s, %d queue(s))", self.where,
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
                        self._on_stop_pipe()
                    if self._stopping:
                        break
        finally:
            try:
                if self.removing and self.conn is not None:
                    self._fail_then_drop(sel)
                if self.conn is not None:
                    self._disconnect(sel, "backend shutting down")
            finally:
                sel.close()
                self._loop_thread = None
                self._drain_calls()   # a call that came in as the loop ended runs here
                if self._removed is not None:
                    self._removed(None)

    def _fail_then_drop(self, sel: selectors.BaseSelector) -> None:
        """A forced removal with a front end attached: stop accepting, drain what is in
        flight, answer IOERR to whatever the guest sends next for a grace period (ends early
        when the front end leaves), then drop it."""
        assert self.device is not None and self.listener is not None
        sel.unregister(self.listener)
        self._close_listener()
        with self._exclusive():
            drained = self.device.fail_requests()
        log.warning("removing: %d queue(s) drained; every further request fails with IOERR for up"
                    " to %.1f s, then the front end is dropped", drained, self._remove_grace)
        deadline = time.monotonic() + self._remove_grace
        while self.conn is not None and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                if key.data == "conn" and self.conn is not None:
                    self._on_message(sel)
                elif key.data in ("stats", "metrics"):
                    self._serve_stats(key.fileobj, http=key.data == "metrics")
                elif key.data == "stop":          # the daemon is stopping: drop it now
                    with contextlib.suppress(OSError):
                        os.read(self._stop_r, 4096)
                    deadline = 0.0
        if self.conn is not None:
            self._disconnect(sel, "front end dropped: the export was removed")

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
        device = VhostUserBlkDevice(self.disk, self.options.num_queues, self.engines,
                                    inflight=self.options.inflight,
                                    dirty_log=self.options.dirty_log,
                                    iotlb_check=self.options.iotlb_check,
                                    iotlb_miss_timeout_ms=self.options.iotlb_miss_timeout_ms)
        if self.recording is not None:
            device.set_recorder(self.recording.handle)
        with self._lock:
            self.conn = conn
            self.device = device
            self.peer = _peer_of(conn)
        sel.register(conn, selectors.EVENT_READ, "conn")
        pid = self.peer.get("pid")
        log.info("front end connected%s", f" (pid {pid})" if pid else "")

    @staticmethod
    def _readable(conn: socket.socket) -> bool:
        ready, _, _ = select.select([conn], [], [], 0)
        return bool(ready)

    def _exclusive(self) -> contextlib.AbstractContextManager[Any]:
        """Held around control work that may block (a message, a drain) when the daemon runs
        with --debug-serial-control: then one export's work holds every other's."""
        return self._serial if self._serial is not None else contextlib.nullcontext()

    def _on_message(self, sel: selectors.BaseSelector) -> None:
        with self._exclusive():
            self._handle_message(sel)

    def _handle_message(self, sel: selectors.BaseSelector) -> None:
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
        """End the session: drain in-flight requests, then close the connection."""
        if self.conn is None:
            return
        sel.unregister(self.conn)
        if self.device is not None:
            with self._exclusive():
                self.device.stop_all()
        self.conn.close()
        with self._lock:
            self.conn = None
            self.peer = None
            if self.device is not None:
                self.collector.retire(self.device.vrings)
                self.device.close()
                self.device = None
        log.info("%s", why)

    def _close_listener(self) -> None:
        """Stop accepting: a socket bound here is closed and its path removed; one handed
        over stays open for its owner."""
        if self.listener is None:
            return
        if self.owns_listener:
            self.listener.close()
            if self.options.socket_path is not None:
                self.options.socket_path.unlink(missing_ok=True)
        self.listener = None

    def close(self) -> None:
        if self.recording is not None:
            self.stop_recording()
        self._close_listener()
        if self.stats_listener is not None:
            self.stats_listener.close()
            assert self.options.socket_path is not None
            Path(stats.stats_socket_path(self.options.socket_path)).unlink(missing_ok=True)
            self.stats_listener = None
        if self.metrics_listener is not None:
            self.metrics_listener.close()
            self.metrics_listener = None
        self.engines.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


def _peer_of(conn: socket.socket) -> dict[str, Any]:
    """pid, uid, gid of the front end's process (SO_PEERCRED) and when it connected."""
    peer: dict[str, Any] = {"connected_at": round(time.time(), 3)}
    try:
        cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
        pid, uid, gid = UCRED.unpack(cred)
        peer.update(pid=pid, uid=uid, gid=gid)
    except OSError:
        pass
    return peer


def serve_stats_client(conn: socket.socket, snapshot: Callable[[], dict[str, Any]], http: bool,
                       slots: threading.BoundedSemaphore) -> None:
    """Answer one stats or metrics client on a short thread of its own, so a client that
    stalls holds no control loop; beyond the slots, a client is turned away."""
    if not slots.acquire(blocking=False):
        conn.close()
        return

    def run() -> None:
        try:
            stats.serve_one(conn, snapshot, http)
        finally:
            slots.release()

    threading.Thread(target=run, name="dp-stats", daemon=True).start()


def install_signal_handlers(server: Any) -> None:
    """SIGINT/SIGTERM: drain and exit cleanly (the C threads never see signals). server: any
    object with stop() (a VhostUserBlkServer, the daemon)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: draining and exiting", signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
