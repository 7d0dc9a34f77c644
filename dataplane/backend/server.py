"""The vhost-user-blk server: listens on a UNIX socket, serves one front end at a time (a
VhostUserBlkDevice per session), and answers statistics clients from the same loop.

Nothing here runs per I/O request: the front end's messages are dispatched to the device's
handlers, which hand finished descriptions to the C core.
"""

from __future__ import annotations

import logging
import os
import select
import selectors
import signal
import socket
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from ..disks import Disk
from ..errors import ConfigError, ProtocolError
from ..observe.metrics import StatsCollector
from ..protocol.vhost_user import close_fds, recv_message, send_message
from . import stats
from .device import VhostUserBlkDevice
from .engines import EnginePool

log = logging.getLogger("dataplane.vhost")

MESSAGE_TIMEOUT_S = 5.0


@dataclass
class ServerOptions:
    socket_path: Path
    num_queues: int
    socket_mode: int = 0o600
    socket_group: str | None = None
    inflight: bool = True
    dirty_log: bool = True                   # False: offer LOG_ALL, log nothing (debug only)
    metrics: tuple[str, int] | None = None   # Prometheus endpoint (host, port); None: off


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
        return self.collector.snapshot(live, self.engines.thread_ids())

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
                    if self._stopping:
                        break
        finally:
            if self.conn is not None:
                self._disconnect(sel, "backend shutting down")
            sel.close()

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
                                         inflight=self.options.inflight,
                                         dirty_log=self.options.dirty_log)
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
