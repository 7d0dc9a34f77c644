"""The daemon's JSON-RPC methods: each one registered function f(daemon, **params) with its
parameter schema (rpc.protocol.Param), checked before it runs. Another room adds a method the
same way (recording's record_start/record_stop: import METHODS, decorate a function).

Export keys in export_add are validated by config.export_config, the same code that reads an
[[export]] table, so a bad value gets the same one-line message either way.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from typing import Any

from ..config import EXPORT_VALIDATORS, LOG_LEVELS, RECORD_FORMATS, export_config
from ..errors import ConfigError
from ..observe.metrics import clean
from ..rpc import EXPORT_FAILED, INVALID_PARAMS, MethodTable, Param, RpcError

METHODS = MethodTable()

_EXPORT_DOCS = {
    "name": "export name, unique in the daemon (default: the socket file's stem)",
    "disk": "file, block device, null:SIZE (with ,latency=... options), or another disk spec",
    "socket": "UNIX socket path to listen on (absolute)",
    "socket_fd": "a listening socket handed to the daemon at start: fd number or LISTEN_FDNAMES name",
    "addr": 'instead of socket/socket_fd: {"type": "unix", "path": P} or {"type": "fd", "str": N}',
    "queues": "virtqueues offered (default: online CPUs)",
    "read_only": "advertise VIRTIO_BLK_F_RO",
    "cache": "none (O_DIRECT) or writeback",
    "fixed": "file disks: what the I/O threads register with io_uring: files (the file, default), "
             "all (and guest memory, pinned), buffers or none",
    "iopoll": "file disks on a device with poll queues: poll for completions (IORING_SETUP_IOPOLL)",
    "serial": "GET_ID serial, up to 20 bytes",
    "socket_mode": 'socket permissions, an octal string like "0660"',
    "socket_group": "group owning the socket (libvirt's QEMU: kvm)",
    "vcpu_cpus": "host CPUs of the VM's vCPUs, vCPU i on the i-th (queue i goes to its thread)",
    "inflight": "offer INFLIGHT_SHMFD (reconnect safety; off only to debug)",
    "record": "record every request served from the start to this file (absolute path)",
    "record_format": "blktrace (PATH.blktrace.<queue>) or iolog (a fio iolog v3 PATH)",
}
_EXPORT_TYPES = {"queues": "integer", "read_only": "boolean", "inflight": "boolean", "addr": "object",
                 "socket_fd": "any", "vcpu_cpus": "any"}


def _config_error(method: str, exc: ConfigError) -> RpcError:
    return RpcError(INVALID_PARAMS, str(exc) if str(exc).startswith(method) else f"{method}: {exc}")


@METHODS.method("export_add",
                *(Param(key, _EXPORT_TYPES.get(key, "string"), required=key == "disk",
                        doc=_EXPORT_DOCS[key]) for key in EXPORT_VALIDATORS),
                doc="Serve a new export; answers with its export_get once it listens.")
def export_add(daemon: Any, **params: Any) -> Future:
    given = {k: v for k, v in params.items() if v is not None}
    try:
        config = export_config(given, "export_add")
    except ConfigError as exc:
        raise _config_error("export_add", exc) from None
    return daemon.add(config)


@METHODS.method("export_remove",
                Param("name", "string", required=True, doc="the export"),
                Param("force", "boolean", default=False,
                      doc="with a front end attached: drain its in-flight requests, fail what it"
                          " sends next with IOERR for a grace period, then drop it"),
                Param("grace_s", "number", doc="that grace period in seconds (default 2)"),
                doc="Stop serving an export (refused while a front end is attached, unless force).")
def export_remove(daemon: Any, name: str, force: bool, grace_s: float | None) -> Future:
    if grace_s is not None and not 0 <= grace_s <= 600:
        raise RpcError(INVALID_PARAMS, f"export_remove: grace_s: expected 0 to 600 seconds, got {grace_s}")
    return daemon.remove(name, force=force, grace_s=grace_s)


@METHODS.method("export_list", doc="Every export: name, state, disk, socket, queues, attached.")
def export_list(daemon: Any) -> list[dict[str, Any]]:
    return daemon.listing()


@METHODS.method("export_get", Param("name", "string", required=True, doc="the export"),
                doc="One export: its config, placement plan, state and attached front end.")
def export_get(daemon: Any, name: str) -> dict[str, Any]:
    return daemon.describe(name)


@METHODS.method("stats", Param("export", "string", doc="only this export (default: all)"),
                doc="Per export and queue: the counters, gauges and latency histogram that"
                    " Prometheus shows (same numbers), plus a latency summary.")
def stats(daemon: Any, export: str | None) -> dict[str, Any]:
    snap = clean(daemon.snapshot(export))
    snap.pop("queues", None)    # each export's own list is in exports
    return snap


@METHODS.method("log_level_set",
                Param("level", "string", required=True, doc=", ".join(LOG_LEVELS)),
                doc="Change the log level of the running daemon (as SIGHUP does from the file).")
def log_level_set(daemon: Any, level: str) -> dict[str, str]:
    if level.lower() not in LOG_LEVELS:
        raise RpcError(INVALID_PARAMS, f"log_level_set: level: expected {', '.join(LOG_LEVELS[:-1])} or"
                       f" {LOG_LEVELS[-1]}, got {level!r}", {"param": "level"})
    root = logging.getLogger()
    previous = logging.getLevelName(root.level).lower()
    root.setLevel(getattr(logging, level.upper()))
    logging.getLogger("dataplane").warning("rpc: log level is now %s (was %s)", level.lower(), previous)
    return {"level": level.lower(), "previous": previous}


@METHODS.method("threads", doc="The I/O thread pool: each thread's CPU and queue count, and the"
                               " plan of every export.")
def threads(daemon: Any) -> dict[str, Any]:
    return daemon.threads()


@METHODS.method("record_start",
                Param("name", "string", required=True, doc="the export"),
                Param("path", "string", required=True,
                      doc="absolute path: blktrace writes PATH.blktrace.<queue>, iolog writes PATH"),
                Param("format", "string", default="blktrace", doc=" or ".join(RECORD_FORMATS)),
                doc="Record every request the export serves from now on (all its queues), until"
                    " record_stop; answers with the recording's files.")
def record_start(daemon: Any, name: str, path: str, format: str) -> dict[str, Any]:   # noqa: A002
    if format not in RECORD_FORMATS:
        raise RpcError(INVALID_PARAMS, f"record_start: format: expected {' or '.join(RECORD_FORMATS)},"
                       f" got {format!r}", {"param": "format"})
    if not os.path.isabs(path):
        raise RpcError(INVALID_PARAMS, f"record_start: path: {path} is a relative path; give an"
                       " absolute one", {"param": "path"})
    server = daemon.server_of(name)
    try:
        return server.call_in_loop(lambda: server.start_recording(path, format))
    except ConfigError as exc:
        raise RpcError(EXPORT_FAILED, f"record_start \"{name}\": {exc}", {"name": name}) from None


@METHODS.method("record_stop", Param("name", "string", required=True, doc="the export"),
                doc="Stop the export's recording and finish its files; answers with the summary"
                    " (files, bytes, requests, dropped entries).")
def record_stop(daemon: Any, name: str) -> dict[str, Any]:
    server = daemon.server_of(name)
    try:
        return server.call_in_loop(server.stop_recording)
    except ConfigError as exc:
        raise RpcError(EXPORT_FAILED, f"record_stop \"{name}\": {exc}", {"name": name}) from None


@METHODS.method("methods", doc="The methods this daemon serves, with their parameters.")
def methods(daemon: Any) -> list[dict[str, Any]]:
    return METHODS.describe()
