"""`dataplane serve`: one process, many exports, changed while it runs.

Each export (a disk on its own vhost-user socket) is a VhostUserBlkServer running its own
control loop on a Python thread of its own; the main thread runs the daemon's loop: the
JSON-RPC management socket, the Prometheus endpoint, signals. The I/O threads are shared: a
pool planned by placement.pool (with one export, the per-queue plan as it always was).

Why a control thread per export rather than one selector loop over every socket: a vhost-user
message may block its handler (GET_VRING_BASE and SET_MEM_TABLE wait for the queue's in-flight
requests to drain, which on a slow or emulated-latency disk takes as long as its slowest
request; a front end that stops mid-message holds the reader for MESSAGE_TIMEOUT_S; opening an
RBD disk talks to a cluster). In one loop each of those would stall every other export's
control traffic and the RPC socket; on a thread of its own it stalls only that export, and the
C calls that wait release the GIL. The handlers stay the simple, blocking code they are (no
per-message state machine). The cost is a mostly idle Python thread per export (no pinned I/O
thread: those are the pool's). What crosses threads is small and locked: the export table and
the pool plan (the daemon's lock), each export's session for snapshot readers (the server's
lock), and making an engine (the engine pool's lock).

Adding an export over RPC opens its disk and binds its socket on its new thread and answers
when that is done; removing one answers once its thread has drained and ended. Meanwhile the
daemon loop serves everyone else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import selectors
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ExportConfig, SocketAddress, check_unique
from ..disks import Disk, open_disk, split_disk_options
from ..errors import ConfigError, DataplaneError
from ..observe.metrics import merge_exports
from ..placement import (
    PER_QUEUE,
    BlockDevice,
    DeviceInfo,
    ExportDemand,
    Policy,
    ThreadPool,
    Topology,
    iopoll_unsupported,
)
from ..rpc import (
    EXPORT_BUSY,
    EXPORT_EXISTS,
    EXPORT_FAILED,
    NO_SUCH_EXPORT,
    SHUTTING_DOWN,
    RpcError,
    RpcServer,
)
from .device import IOTLB_MISS_TIMEOUT_MS
from .engines import EnginePool, EngineView
from .handover import HandedSocket, HandedSockets, sd_notify
from .server import (
    REMOVE_GRACE_S,
    STATS_CLIENTS,
    ServerOptions,
    VhostUserBlkServer,
    bind_unix_socket,
    listen_tcp,
    serve_stats_client,
)

log = logging.getLogger("dataplane.vhost")

JOIN_TIMEOUT_S = 60.0


@dataclass
class DaemonOptions:
    """The daemon-wide settings (config.ServeConfig's top-level keys)."""

    policy: Policy = PER_QUEUE
    vcpu_cpus: list[int] | None = None
    io_threads: int | None = None
    poll_us: int = 50
    metrics: tuple[str, int] | None = None
    rpc_socket: Path | None = None
    remove_grace_s: float = REMOVE_GRACE_S
    serial_control: bool = False     # --debug-serial-control: one export's control work at a time
    dirty_log: bool = True           # False (--debug-no-dirty-log): LOG_ALL offered, nothing logged
    iopoll_unchecked: bool = False   # --debug-iopoll-without-poll-queues: poll where it cannot pay
    iotlb_check: bool = True         # False (--debug-no-iotlb-check): the vIOMMU enforces nothing
    iotlb_miss_timeout_ms: int = IOTLB_MISS_TIMEOUT_MS


def device_info(disk_spec: str) -> DeviceInfo:
    """The disk behind a spec, for placement: a path's block device; a disk named by a scheme
    (null:, rbd:, ...) has none (threads placed by NUMA and SMT only)."""
    spec = split_disk_options(disk_spec)[0]
    scheme = re.match(r"([a-z][a-z0-9]*):", spec)
    if scheme and scheme.group(1) not in ("null", "rbd") and not os.path.exists(spec):
        return DeviceInfo(spec, mapping_note=f"{scheme.group(1)} disk: no local block device;"
                          " threads are placed by NUMA and SMT only")
    return BlockDevice.resolve(spec)


def iopoll_wanted(config: ExportConfig, unchecked: bool = False) -> bool:
    """Whether an export asking for --iopoll gets it: only on a device with poll queues. Where
    it cannot, the export is served with interrupt-driven I/O and the log says why."""
    if not config.iopoll:
        return False
    spec = split_disk_options(config.disk)[0]
    try:
        why = iopoll_unsupported(spec, config.cache)
    except ConfigError as exc:
        why = str(exc)
    if why is None:
        return True
    if unchecked and not spec.startswith(("null", "rbd:")) and config.cache == "none":
        log.warning("export %s: --iopoll on a device that cannot poll (%s): debug, polling anyway",
                    config.name, why)
        return True
    log.warning("export %s: --iopoll: %s; serving with interrupt-driven I/O", config.name, why)
    return False


def plan_pool(topology: Topology, exports: list[ExportConfig], policy: Policy = PER_QUEUE,
              io_threads: int | None = None, vcpu_cpus: list[int] | None = None) -> ThreadPool:
    """The I/O thread pool serve starts with for these exports (what `plan` prints)."""
    demands = [ExportDemand(e.name, device_info(e.disk), e.queues, e.vcpu_cpus) for e in exports]
    return ThreadPool.build(topology, demands, policy=policy, io_threads=io_threads,
                            vcpu_cpus=vcpu_cpus)


@dataclass
class Export:
    """An export of the daemon: its config, its server, the thread running it."""

    config: ExportConfig
    state: str = "starting"             # starting, serving (see server.state()), stopped
    server: VhostUserBlkServer | None = None
    disk: Disk | None = None
    handed: HandedSocket | None = None
    thread: threading.Thread | None = None
    rows: list[Any] = field(default_factory=list)
    added_at: float = field(default_factory=time.time)
    removal: Future | None = None       # an export_remove waiting for the thread to end
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def name(self) -> str:
        return self.config.name

    def current_state(self) -> str:
        if self.state != "serving" or self.server is None:
            return self.state
        return self.server.state()


class Daemon:
    """The exports of one `dataplane serve`, its I/O thread pool and its management loop."""

    def __init__(self, options: DaemonOptions, topology: Topology | None = None,
                 handed: HandedSockets | None = None) -> None:
        self.options = options
        self.topology = topology or Topology.from_sysfs(allowed=os.sched_getaffinity(0))
        self.handed = handed or HandedSockets()
        self.engines = EnginePool(poll_ns=options.poll_us * 1000)
        self.pool: ThreadPool | None = None
        self.exports: dict[str, Export] = {}
        self._lock = threading.RLock()
        self._serial = threading.RLock() if options.serial_control else None
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._stuck = False
        self.rpc: RpcServer | None = None
        self.metrics_listener: socket.socket | None = None
        self._stats_slots = threading.BoundedSemaphore(STATS_CLIENTS)

    # ---- start-up ----

    def start(self, exports: list[ExportConfig]) -> None:
        """Open every start-up export (disk, socket) and the daemon's own sockets; any failure
        closes what was opened and raises ConfigError (serve: one line, exit 2)."""
        check_unique(exports, [f'export "{e.name}"' for e in exports])
        self.pool = plan_pool(self.topology, exports, self.options.policy, self.options.io_threads,
                              self.options.vcpu_cpus)
        try:
            for config in exports:
                export = Export(config)
                export.rows = self.pool.rows_of(config.name)
                self._open(export)
                self.exports[config.name] = export
            if self.options.rpc_socket is not None:
                self._listen_rpc(self.options.rpc_socket)
            if self.options.metrics is not None:
                self.metrics_listener = listen_tcp(self.options.metrics)
        except BaseException:
            self.close()
            raise
        for note in self.pool.notes:
            log.info("placement: %s", note)
        for export in self.exports.values():
            self._log_rows(export, len(exports) > 1)
        for handed in self.handed.unclaimed():
            log.warning("%s was handed over but no export uses it (export_add can take it)",
                        handed.label)
        for export in self.exports.values():
            self._start_thread(export)

    def _log_rows(self, export: Export, named: bool) -> None:
        for row in export.rows:
            who = f"{export.name} " if named else ""
            log.info("placement: %svq%d -> %s on cpu %s (%s)", who, row.virtqueue, row.thread_name,
                     row.host_cpu, row.reason)

    def _listen_rpc(self, path: Path) -> None:
        from .methods import METHODS

        sock = bind_unix_socket(path, 0o600, None, what="--rpc-socket")
        self.rpc = RpcServer(sock, METHODS, self)
        log.info("management (JSON-RPC) on %s", path)

    def _open(self, export: Export) -> None:
        """Socket and disk of an export, and its server (not serving yet). Opening the disk
        (which may talk to a cluster) holds no lock."""
        config = export.config
        listener, label = None, ""
        addr = config.addr
        if addr is None:
            raise ConfigError(f"export {config.name!r}: no socket to listen on")
        if addr.type == "fd":
            with self._lock:
                export.handed = self.handed.claim(str(addr.fd), config.name)
            listener, label = export.handed.sock, export.handed.label
        try:
            export.disk = open_disk(config.disk, read_only=config.read_only, cache=config.cache,
                                    serial=config.serial, fixed=config.fixed,
                                    iopoll=iopoll_wanted(config, self.options.iopoll_unchecked))
            with self._lock:
                mapping = self._mapping(export)
            export.server = VhostUserBlkServer(
                export.disk,
                ServerOptions(socket_path=addr.path if addr.type == "unix" else None,
                              num_queues=config.queues, socket_mode=config.socket_mode,
                              socket_group=config.socket_group, inflight=config.inflight,
                              dirty_log=self.options.dirty_log, name=config.name, listener=listener,
                              listener_label=label, record=config.record,
                              record_format=config.record_format,
                              iotlb_check=self.options.iotlb_check,
                              iotlb_miss_timeout_ms=self.options.iotlb_miss_timeout_ms),
                mapping, serial_lock=self._serial)
        except BaseException:
            self._release(export)
            raise

    def _mapping(self, export: Export) -> EngineView:
        assert self.pool is not None
        load = dict(zip((s.name for s in self.pool.slots), self.pool.load(), strict=True))
        return EngineView(self.engines, self.pool.mapping_of(export.name), load)

    def _start_thread(self, export: Export) -> None:
        export.state = "serving"
        export.thread = threading.Thread(target=self._run, args=(export,), daemon=True,
                                         name=f"export:{export.name}")
        export.thread.start()

    def _run(self, export: Export) -> None:
        assert export.server is not None
        try:
            export.server.serve_forever()
        except Exception:   # one export's bug must not take the others down
            log.exception("export %s: its control loop failed; removing it", export.name)
        finally:
            self._retire(export)

    def _release(self, export: Export) -> None:
        """Close what an export holds (its server, disk, a handed-over socket goes back)."""
        if export.server is not None:
            with contextlib.suppress(Exception):
                export.server.close()
            export.server = None
        if export.disk is not None:
            export.disk.close()
            export.disk = None
        if export.handed is not None:
            with self._lock:
                self.handed.release(export.handed.fd)
            export.handed = None

    def _retire(self, export: Export) -> None:
        self._release(export)
        with self._lock:
            export.state = "stopped"
            if self.exports.get(export.name) is export:
                del self.exports[export.name]
            if self.pool is not None:
                self.pool.remove(export.name)
            removal, export.removal = export.removal, None
        export.ended.set()
        if removal is not None and not removal.done():
            removal.set_result({"name": export.name, "removed": True})
        if not self._stopping:
            log.info("export %s removed", export.name)

    # ---- at run time (RPC) ----

    def add(self, config: ExportConfig) -> Future:
        """Start serving a new export; the future's result is its export_get, once it listens
        (or an RpcError saying why it could not)."""
        future: Future = Future()
        with self._lock:
            if self._stopping:
                raise RpcError(SHUTTING_DOWN, "the daemon is shutting down")
            if config.name in self.exports:
                raise RpcError(EXPORT_EXISTS, f"an export named \"{config.name}\" exists already"
                               " (export_remove it first, or choose another name)", {"name": config.name})
            taken = [e.config for e in self.exports.values()]
            try:
                check_unique([*taken, config], [*(f'export "{c.name}"' for c in taken), "export_add"])
            except ConfigError as exc:
                raise RpcError(EXPORT_EXISTS, str(exc), {"name": config.name}) from None
            if config.addr is not None and config.addr.type == "fd":
                try:
                    self.handed.find(str(config.addr.fd))
                except ConfigError as exc:
                    raise RpcError(EXPORT_FAILED, str(exc), {"name": config.name}) from None
            assert self.pool is not None
            try:
                device = device_info(config.disk)
            except ConfigError as exc:
                raise RpcError(EXPORT_FAILED, f"export {config.name!r}: {exc}") from None
            export = Export(config)
            export.rows = self.pool.add(ExportDemand(config.name, device, config.queues, config.vcpu_cpus))
            self.exports[config.name] = export
        threading.Thread(target=self._add, args=(export, future), daemon=True,
                         name=f"export:{config.name}").start()
        return future

    def _add(self, export: Export, future: Future) -> None:
        try:
            self._open(export)
            if self._stopping:
                self._release(export)
                raise RpcError(SHUTTING_DOWN, "the daemon is shutting down")
        except Exception as exc:   # a bug as much as a bad disk: the answer says so
            if not isinstance(exc, DataplaneError | OSError | RpcError):
                log.exception("export_add %s", export.name)
            with self._lock:
                self.exports.pop(export.name, None)
                if self.pool is not None:
                    self.pool.remove(export.name)
            export.ended.set()
            log.error("export_add %s: %s", export.name, exc)
            future.set_exception(exc if isinstance(exc, RpcError) else RpcError(
                EXPORT_FAILED, f"export {export.name!r}: {exc}", {"name": export.name}))
            return
        self._log_rows(export, True)
        export.state = "serving"
        export.thread = threading.current_thread()
        future.set_result(self.describe(export.name))
        log.info("export %s added", export.name)
        self._run(export)

    def remove(self, name: str, force: bool = False, grace_s: float | None = None) -> Future:
        """Stop serving an export. Refused (EXPORT_BUSY) while a front end is attached, unless
        force: then in-flight requests drain, the guest's next requests fail with IOERR for a
        grace period, and the front end is dropped. The future resolves once it is gone."""
        with self._lock:
            export = self._get(name)
            if export.state == "starting":
                raise RpcError(EXPORT_BUSY, f"export \"{name}\" is still being added: try again",
                               {"name": name})
            if export.removal is not None or export.current_state() in ("removing", "stopping"):
                raise RpcError(EXPORT_BUSY, f"export \"{name}\" is being removed already", {"name": name})
            future: Future = Future()
            export.removal = future
            server = export.server
        assert server is not None

        def refused(reason: str | None) -> None:
            if reason is None:
                return
            with self._lock:
                export.removal = None
            future.set_exception(RpcError(
                EXPORT_BUSY, f"export \"{name}\": {reason}; stop the VM (or detach the disk) first, or"
                " call export_remove with force=true to drain its requests and drop it",
                {"name": name, "front_end": server.front_end()}))

        server.request_removal(force, refused,
                               self.options.remove_grace_s if grace_s is None else grace_s)
        return future

    def _get(self, name: str) -> Export:
        export = self.exports.get(name)
        if export is None:
            known = ", ".join(sorted(self.exports)) or "none"
            raise RpcError(NO_SUCH_EXPORT, f"no export named \"{name}\" (exports: {known})", {"name": name})
        return export

    def server_of(self, name: str) -> VhostUserBlkServer:
        """The server of a serving export (record_start and the like act on it)."""
        with self._lock:
            export = self._get(name)
        if export.server is None or export.state != "serving":
            raise RpcError(EXPORT_FAILED, f"export \"{name}\" is {export.current_state()}, not serving",
                           {"name": name})
        return export.server

    # ---- reading ----

    def describe(self, name: str) -> dict[str, Any]:
        """export_get: config, plan, state, the attached front end."""
        with self._lock:
            export = self._get(name)
        server, disk = export.server, export.disk
        info: dict[str, Any] = {
            "name": name, "state": export.current_state(), "config": export.config.to_dict(),
            "listening_on": server.where if server is not None else str(export.config.addr),
            "plan": [{"virtqueue": r.virtqueue, "vcpu": r.vcpu, "thread": r.thread_name,
                      "host_cpu": r.host_cpu, "hw_queue": r.hw_queue, "numa_node": r.numa_node,
                      "reason": r.reason} for r in export.rows],
            "front_end": server.front_end() if server is not None else None,
            "added_at": round(export.added_at, 3),
        }
        if disk is not None:
            info["disk"] = {"description": disk.description, "size": disk.size,
                            "read_only": disk.read_only, "block_size": disk.logical_block_size}
        return info

    def listing(self) -> list[dict[str, Any]]:
        with self._lock:
            exports = sorted(self.exports.values(), key=lambda e: e.name)
        out = []
        for e in exports:
            server = e.server
            out.append({"name": e.name, "state": e.current_state(), "disk": e.config.disk,
                        "socket": str(e.config.addr), "queues": e.config.queues,
                        "attached": server is not None and server.conn is not None})
        return out

    def snapshot(self, name: str | None = None) -> dict[str, Any]:
        """Every export's statistics side by side (merge_exports), or one export's."""
        with self._lock:
            exports = [self._get(name)] if name is not None else list(self.exports.values())
        snaps = []
        for e in exports:
            server = e.server
            if server is not None and e.state == "serving":
                snaps.append(server.snapshot())
        return merge_exports(snaps)

    def threads(self) -> dict[str, Any]:
        with self._lock:
            pool = self.pool.to_dict() if self.pool is not None else {}
        return pool

    # ---- the loop ----

    def stop(self) -> None:
        """Ask serve_forever to return (signal handlers, other threads)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")

    def serve_forever(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._stop_r, selectors.EVENT_READ, lambda _m: None)
        if self.rpc is not None:
            self.rpc.register(sel)
        if self.metrics_listener is not None:
            sel.register(self.metrics_listener, selectors.EVENT_READ, lambda _m: self._serve_metrics())
        sd_notify("READY=1")
        try:
            while not self._stopping:
                for key, mask in sel.select():
                    key.data(mask)
                    if self._stopping:
                        break
        finally:
            sd_notify("STOPPING=1")
            sel.close()
            self.shutdown()

    def _serve_metrics(self) -> None:
        assert self.metrics_listener is not None
        try:
            conn, _ = self.metrics_listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        serve_stats_client(conn, self.snapshot, True, self._stats_slots)

    def shutdown(self) -> None:
        """Stop every export (in parallel: each drains its queues) and wait for them."""
        self._stopping = True
        with self._lock:
            exports = list(self.exports.values())
        for export in exports:
            if export.server is not None:
                export.server.stop()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for export in exports:
            if not export.ended.wait(max(0.0, deadline - time.monotonic())):
                log.error("export %s did not stop within %.0f s", export.name, JOIN_TIMEOUT_S)
                self._stuck = True

    def close(self) -> None:
        """Release everything (after serve_forever, or when start failed)."""
        for export in list(self.exports.values()):
            if export.thread is None:
                self._release(export)
        self.exports.clear()
        if self.rpc is not None:
            self.rpc.close()
            self.rpc = None
            if self.options.rpc_socket is not None:
                self.options.rpc_socket.unlink(missing_ok=True)
        if self.metrics_listener is not None:
            self.metrics_listener.close()
            self.metrics_listener = None
        if not self._stuck:     # a queue may still be attached to an engine of a stuck export
            self.engines.close()
        self.handed.close()
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)


__all__ = ["Daemon", "DaemonOptions", "Export", "SocketAddress", "device_info", "plan_pool"]
