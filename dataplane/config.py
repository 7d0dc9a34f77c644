"""Typed configuration for `dataplane serve` and `dataplane plan`: a TOML file, overridden by
command-line flags, validated into one `ServeConfig` (the daemon's settings) holding its
exports (`ExportConfig`: a disk on a socket). Every error is one ConfigError naming the file
(or flag, or RPC method), the table, the key and the bad value.

A file either describes one export with top-level keys (`disk`, `socket`, ...: what the flags
say) or any number of them as `[[export]]` tables; daemon-wide keys (`policy`, `vcpu_cpus`,
`metrics`, `rpc_socket`, ...) stay at the top. The RPC method `export_add` takes the keys of
an `[[export]]` table and goes through the same validation (`export_config`).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .placement import MAX_CPUS, PER_QUEUE, Policy, parse_cpulist, parse_policy

MAX_QUEUES = 256   # a vhost-user vring index is 8 bits (VHOST_USER_VRING_IDX_MASK)
MAX_IO_THREADS = 1024
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
CACHE_MODES = ("none", "writeback")
# what a file disk's I/O threads register with their io_uring (disks.disk.FIXED_MODES)
FIXED_MODES = ("all", "buffers", "files", "none")
RECORD_FORMATS = ("blktrace", "iolog")
LOG_LEVELS = ("debug", "info", "warning", "error")


def default_queues() -> int:
    """As many virtqueues as CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class SocketAddress:
    """Where an export listens: a UNIX socket path it binds (`type` "unix"), or a listening
    socket handed over (`type` "fd": `fd` is a descriptor number or a LISTEN_FDNAMES name), as
    qemu-storage-daemon's `addr.type=unix,addr.path=...` / `addr.type=fd,addr.str=...`."""

    type: str
    path: Path | None = None
    fd: str | None = None

    def __str__(self) -> str:
        if self.type == "unix":
            return str(self.path)
        return f"fd {self.fd}" if self.fd is not None and self.fd.isdigit() else f"socket {self.fd!r}"

    def to_dict(self) -> dict[str, str]:
        if self.type == "unix":
            return {"type": "unix", "path": str(self.path)}
        return {"type": "fd", "str": str(self.fd)}


@dataclass(frozen=True)
class ExportConfig:
    """One export: a disk on its own vhost-user socket. vcpu_cpus None: the daemon's."""

    name: str
    disk: str
    addr: SocketAddress | None                 # None only for `plan`
    queues: int = field(default_factory=lambda: default_queues())
    read_only: bool = False
    cache: str = "none"
    fixed: str = "files"
    iopoll: bool = False
    serial: str = "dataplane"
    socket_mode: int = 0o600
    socket_group: str | None = None
    vcpu_cpus: tuple[int, ...] | None = None
    inflight: bool = True
    record: Path | None = None                 # record every request served to this file
    record_format: str = "blktrace"            # blktrace (FILE.blktrace.<q>) or iolog (FILE)

    def to_dict(self) -> dict[str, Any]:
        """As an [[export]] table (and export_add's parameters) would say it."""
        return {"name": self.name, "disk": self.disk,
                "addr": self.addr.to_dict() if self.addr is not None else None,
                "queues": self.queues, "read_only": self.read_only, "cache": self.cache,
                "fixed": self.fixed, "iopoll": self.iopoll, "serial": self.serial,
                "socket_mode": f"{self.socket_mode:04o}",
                "socket_group": self.socket_group,
                "vcpu_cpus": list(self.vcpu_cpus) if self.vcpu_cpus is not None else None,
                "inflight": self.inflight,
                "record": str(self.record) if self.record is not None else None,
                "record_format": self.record_format}


@dataclass
class ServeConfig:
    """Everything `serve` (and, for placement, `plan`) needs; defaults match the CLI's. The
    top-level export keys (disk, socket, ...) describe the single export of a config without
    [[export]] tables; `exports` is what serve runs (filled by merge)."""

    disk: str | None = None
    socket: Path | None = None                 # required by serve, unused by plan
    queues: int = field(default_factory=default_queues)
    read_only: bool = False
    cache: str = "none"
    fixed: str = "files"
    iopoll: bool = False
    serial: str = "dataplane"
    policy: Policy = PER_QUEUE
    vcpu_cpus: list[int] | None = None         # host CPUs running the guest's vCPUs: kept free
    metrics: tuple[str, int] | None = None     # (host, port) of the metrics endpoint; None: off
    log_level: str = "info"
    socket_mode: int = 0o600
    socket_group: str | None = None            # group owning the socket (with socket_mode)
    poll_us: int = 50                          # I/O threads spin this long before sleeping
    inflight: bool = True                      # offer INFLIGHT_SHMFD (off only to debug)
    socket_fd: str | None = None               # a handed-over listening socket instead of socket
    name: str | None = None                    # the single export's name (default: socket stem)
    rpc_socket: Path | None = None             # JSON-RPC management socket; None: off
    io_threads: int | None = None              # pool size with several exports (None: per CPU)
    record: Path | None = None                 # the single export's recording (see ExportConfig)
    record_format: str = "blktrace"
    exports: list[ExportConfig] = field(default_factory=list, compare=False)


# ---- one validator per key: (value, where, from_file) -> typed value, or ConfigError ----


def _show(value: Any) -> str:
    """A value as the user typed it in TOML ("abc", 4, true, [1, 2])."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _bad(where: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{where}: expected {expected}, got {_show(value)}")


def _string(value: Any, where: str, what: str = "a non-empty string") -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise _bad(where, what, value)
    return value


def _socket(value: Any, where: str, from_file: bool) -> Path:
    return Path(_string(value, where, "a socket path"))


def _disk(value: Any, where: str, from_file: bool) -> str:
    return _string(value, where, "a file, a block device, null:SIZE or rbd:POOL/IMAGE")


def _queues(value: Any, where: str, from_file: bool) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(where, "a positive integer", value)
    if value > MAX_QUEUES:
        raise ConfigError(f"{where}: {value} is more than the {MAX_QUEUES} virtqueues vhost-user can"
                          " address")
    return value


def _bool(value: Any, where: str, from_file: bool) -> bool:
    if not isinstance(value, bool):
        raise _bad(where, "true or false", value)
    return value


def _cache(value: Any, where: str, from_file: bool) -> str:
    if value not in CACHE_MODES:
        raise _bad(where, " or ".join(CACHE_MODES), value)
    return value


def _fixed(value: Any, where: str, from_file: bool) -> str:
    if value not in FIXED_MODES:
        raise _bad(where, ", ".join(FIXED_MODES[:-1]) + " or " + FIXED_MODES[-1], value)
    return value


def _serial(value: Any, where: str, from_file: bool) -> str:
    if not isinstance(value, str) or len(value.encode()) > 20:
        raise _bad(where, "a string of at most 20 bytes", value)
    return value


def _policy(value: Any, where: str, from_file: bool) -> Policy:
    try:
        return parse_policy(value)
    except ConfigError:
        raise _bad(where, "per-queue, shared or threads=K (K ≥ 1)", value) from None


def _vcpu_cpus(value: Any, where: str, from_file: bool) -> list[int]:
    if isinstance(value, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < MAX_CPUS for c in value):
            raise _bad(where, "a CPU list like \"0-3,8\" or an array of CPU numbers", value)
        return sorted(set(value))
    if not isinstance(value, str):
        raise _bad(where, "a CPU list like \"0-3,8\" or an array of CPU numbers", value)
    try:
        return parse_cpulist(value)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _metrics(value: Any, where: str, from_file: bool) -> tuple[str, int]:
    """'HOST:PORT', '[::1]:PORT', ':PORT' or a bare port; no host means 127.0.0.1 (not the world)."""
    expected = "an address like 127.0.0.1:9100, [::1]:9100 or :9100"
    if isinstance(value, tuple) and len(value) == 2:
        host, port = value
    elif isinstance(value, int) and not isinstance(value, bool):
        host, port = "", value
    elif isinstance(value, str):
        m = re.fullmatch(r"(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]\s]*)):(\d+)|(\d+)", value.strip())
        if not m:
            raise _bad(where, expected, value)
        host = m.group(1) or m.group(2) or ""
        port = int(m.group(3) or m.group(4))
    else:
        raise _bad(where, expected, value)
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{where}: port {port} is out of range (1 to 65535)")
    return (host or "127.0.0.1", port)


def _record(value: Any, where: str, from_file: bool) -> Path:
    return Path(_string(value, where, "a file to record to"))


def _record_format(value: Any, where: str, from_file: bool) -> str:
    if value not in RECORD_FORMATS:
        raise _bad(where, " or ".join(RECORD_FORMATS), value)
    return value


def _log_level(value: Any, where: str, from_file: bool) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise _bad(where, ", ".join(LOG_LEVELS[:-1]) + " or " + LOG_LEVELS[-1], value)
    return value.lower()


def _socket_mode(value: Any, where: str, from_file: bool) -> int:
    # A TOML number is ambiguous (0o660 and 432 parse alike, and 660 is not what was meant),
    # so the file must quote the mode; a flag's int comes from argparse and is already octal.
    if isinstance(value, int) and not isinstance(value, bool) and not from_file:
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"\s*(0o?)?[0-7]{1,4}\s*", value):
        mode = int(value.strip().removeprefix("0o"), 8)
    else:
        expected = ('an octal mode in quotes, like "0660"' if from_file
                    else "an octal mode like 0660")
        raise _bad(where, expected, value)
    if mode > 0o777:
        raise ConfigError(f"{where}: mode {value} has bits beyond 0777")
    return mode


def _poll_us(value: Any, where: str, from_file: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _bad(where, "a number of microseconds (0 or more)", value)
    try:
        number = int(value)
    except ValueError:
        raise _bad(where, "a number of microseconds (0 or more)", value) from None
    if not 0 <= number <= 1_000_000:
        raise _bad(where, "a number of microseconds between 0 and 1000000", value)
    return number


def _name(value: Any, where: str, from_file: bool) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise _bad(where, "a name of letters, digits and _.:- (up to 64, starting with a letter or"
                   " digit)", value)
    return value


def _socket_fd(value: Any, where: str, from_file: bool) -> str:
    """A descriptor number (3) or the name systemd gave the socket (LISTEN_FDNAMES)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if isinstance(value, str) and (value.strip().isdigit() or NAME_RE.fullmatch(value.strip())):
        return value.strip()
    raise _bad(where, "a file descriptor number or a LISTEN_FDNAMES name", value)


def _addr(value: Any, where: str, from_file: bool) -> SocketAddress:
    expected = '{ type = "unix", path = "..." } or { type = "fd", str = "3" or "NAME" }'
    if not isinstance(value, Mapping):
        raise _bad(where, expected, value)
    kind = value.get("type")
    allowed = {"unix": {"type", "path"}, "fd": {"type", "str"}}.get(kind) if isinstance(kind, str) else None
    if allowed is None:
        raise _bad(f"{where}.type", '"unix" or "fd"', kind)
    extra = sorted(set(value) - allowed)
    if extra:
        raise ConfigError(f"{where}: unknown key \"{extra[0]}\" for type {kind}"
                          f" (it takes {', '.join(sorted(allowed - {'type'}))})")
    if kind == "unix":
        if "path" not in value:
            raise ConfigError(f"{where}: type unix needs a path")
        return SocketAddress("unix", path=_socket(value["path"], f"{where}.path", from_file))
    if "str" not in value:
        raise ConfigError(f"{where}: type fd needs str (a descriptor number or a LISTEN_FDNAMES name)")
    return SocketAddress("fd", fd=_socket_fd(value["str"], f"{where}.str", from_file))


def _io_threads(value: Any, where: str, from_file: bool) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_IO_THREADS:
        raise _bad(where, f"a number of I/O threads from 1 to {MAX_IO_THREADS}", value)
    return value


VALIDATORS: dict[str, Callable[[Any, str, bool], Any]] = {
    "socket": _socket,
    "disk": _disk,
    "queues": _queues,
    "read_only": _bool,
    "cache": _cache,
    "fixed": _fixed,
    "iopoll": _bool,
    "serial": _serial,
    "policy": _policy,
    "vcpu_cpus": _vcpu_cpus,
    "metrics": _metrics,
    "log_level": _log_level,
    "socket_mode": _socket_mode,
    "socket_group": lambda v, where, f: _string(v, where),
    "poll_us": _poll_us,
    "inflight": _bool,
    "socket_fd": _socket_fd,
    "name": _name,
    "rpc_socket": _socket,
    "io_threads": _io_threads,
    "record": _record,
    "record_format": _record_format,
}
_PATH_KEYS = ("socket", "disk", "rpc_socket", "record")   # relative paths in a file: relative to the file
# The keys of an [[export]] table (and of export_add); the top-level ones of a file without
# tables describe its single export.
EXPORT_VALIDATORS: dict[str, Callable[[Any, str, bool], Any]] = {
    key: VALIDATORS[key] for key in ("name", "disk", "socket", "socket_fd", "queues", "read_only",
                                     "cache", "fixed", "iopoll", "serial", "socket_mode", "socket_group",
                                     "vcpu_cpus",
                                     "inflight", "record", "record_format")
} | {"addr": _addr}
FLAT_EXPORT_KEYS = ("name", "disk", "socket", "socket_fd", "queues", "read_only", "cache", "fixed", "iopoll",
                    "serial",
                    "socket_mode", "socket_group", "record", "record_format")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _suggest(key: str, known: Iterable[str] = (*VALIDATORS, "export")) -> str:
    """' (did you mean "queues"?)' in the user's spelling, or the list of keys."""
    known = sorted(known)
    canonical = key.lower().replace("-", "_")
    close = difflib.get_close_matches(canonical, known, n=1, cutoff=0.6)
    if close:
        spelled = close[0].replace("_", "-") if "-" in key else close[0]
        return f' (did you mean "{spelled}"?)'
    return f" (known keys: {', '.join(known)})"


def _toml_error(name: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    msg = getattr(exc, "msg", None) or str(exc)
    line, col = getattr(exc, "lineno", None), getattr(exc, "colno", None)
    m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", str(exc), re.S)
    if m:
        msg, line, col = m.group(1), int(m.group(2)), int(m.group(3))
    else:
        msg = re.sub(r" \(at end of document\)$", "", msg)
    where = f"line {line}, column {col}" if line else "end of file"
    return ConfigError(f"{name}: {where}: bad TOML syntax: {msg}")


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a TOML config file: {key: typed value} for the keys it sets, and
    under "export" the list of its [[export]] tables as ExportConfigs (when it has any).

    Keys are ServeConfig's fields; `read-only` is accepted for `read_only` (the flag's
    spelling). Relative socket and disk paths are taken relative to the file's directory.
    """
    path = Path(path)
    name = str(path)
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {name} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {name} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"config file {name}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(name, exc) from None

    tables = raw.pop("export", None)
    values = _typed_keys(raw, VALIDATORS, name, path.absolute().parent)
    if tables is not None:
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise ConfigError(f"{name}: export must be [[export]] tables (an array of tables),"
                              f" got {_show(tables)}")
        flat = [k for k in values if k in FLAT_EXPORT_KEYS]
        if flat:
            raise ConfigError(f"{name}: {flat[0]} is set at the top level, but the file describes its"
                              " exports as [[export]] tables: set it in each table")
        exports = [export_config(t, f"{name}: [[export]] #{i}", base_dir=path.absolute().parent,
                                 index=i) for i, t in enumerate(tables, start=1)]
        check_unique(exports, [f"{name}: [[export]] #{i}" for i in range(1, len(exports) + 1)])
        values["export"] = exports
    return values


def _typed_keys(raw: Mapping[str, Any], validators: Mapping[str, Callable[[Any, str, bool], Any]],
                where: str, base_dir: Path | None) -> dict[str, Any]:
    """Validate the keys of one table (hyphens allowed for underscores); relative paths are
    taken against base_dir (None: they must be absolute)."""
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in raw.items():
        canonical = key.replace("-", "_")
        if canonical not in validators:
            known = (*validators, "export") if validators is VALIDATORS else validators
            raise ConfigError(f"{where}: unknown key \"{key}\"{_suggest(key, known)}")
        if canonical in spelled:
            raise ConfigError(f"{where}: {canonical} is set twice (as {spelled[canonical]} and {key})")
        spelled[canonical] = key
        typed = validators[canonical](value, f"{where}: {key}", True)
        if canonical in _PATH_KEYS and not _is_spec(str(typed)):
            typed_path = Path(typed)
            if not typed_path.is_absolute():
                if base_dir is None:
                    raise ConfigError(f"{where}: {key}: {typed} is a relative path; give an"
                                      " absolute one")
                typed_path = base_dir / typed_path
            typed = str(typed_path) if canonical == "disk" else typed_path
        values[canonical] = typed
    return values


def _is_spec(disk: str) -> bool:
    """A disk named by a scheme rather than a path: null, null:SIZE, rbd:POOL/IMAGE, ..."""
    return disk == "null" or bool(re.match(r"[a-z][a-z0-9]*:", disk))


def export_config(raw: Mapping[str, Any], where: str, *, base_dir: Path | None = None,
                  index: int | None = None) -> ExportConfig:
    """One export from the keys of an [[export]] table or export_add's parameters. `where`
    starts every error ("dp.toml: [[export]] #2", "export_add"); base_dir: where relative paths
    start (None: paths must be absolute, as over RPC)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table of export keys, got {_show(raw)}")
    label = where
    name = raw.get("name")
    if isinstance(name, str) and NAME_RE.fullmatch(name):
        label = f'{where} "{name}"'
    values = _typed_keys(raw, EXPORT_VALIDATORS, label, base_dir)
    return _export_from(values, label, index=index, require_addr=True)


def _export_from(values: Mapping[str, Any], label: str, *, index: int | None,
                 require_addr: bool, flag_style: bool = False) -> ExportConfig:
    def key(k: str) -> str:
        return _flag(k) if flag_style else k

    where = "" if flag_style else f"{label}: "
    if values.get("disk") is None:
        raise ConfigError(f"{where}{key('disk')} is required" + (
            " (on the command line, or as disk in the config file)" if flag_style else ""))
    given = [k for k in ("socket", "socket_fd", "addr") if values.get(k) is not None]
    if len(given) > 1:
        raise ConfigError(f"{where}{key(given[0])} and {key(given[1])} both say where to listen:"
                          " give one")
    addr: SocketAddress | None = None
    if values.get("socket") is not None:
        addr = SocketAddress("unix", path=Path(values["socket"]))
    elif values.get("socket_fd") is not None:
        addr = SocketAddress("fd", fd=str(values["socket_fd"]))
    elif values.get("addr") is not None:
        addr = values["addr"]
    elif require_addr:
        if flag_style:
            raise ConfigError("--socket is required (on the command line, or as socket in the config"
                              " file; or --socket-fd for a listening socket handed over)")
        raise ConfigError(f"{where}socket is required (or socket_fd, or addr = {{ type = ..., ... }})")
    name = values.get("name") or _default_name(addr, index)
    vcpus = values.get("vcpu_cpus")
    fields = {k: values[k] for k in ("queues", "read_only", "cache", "fixed", "iopoll", "serial",
                                     "socket_mode", "socket_group", "inflight", "record", "record_format")
              if values.get(k) is not None}
    return ExportConfig(name=name, disk=values["disk"], addr=addr,
                        vcpu_cpus=tuple(vcpus) if vcpus is not None else None, **fields)


def _default_name(addr: SocketAddress | None, index: int | None) -> str:
    if addr is not None and addr.type == "unix" and addr.path is not None:
        stem = re.sub(r"[^A-Za-z0-9_.:-]", "_", addr.path.stem or addr.path.name).lstrip("_.:-")
        if stem:
            return stem[:64]
    if addr is not None and addr.type == "fd" and addr.fd is not None and not addr.fd.isdigit():
        return addr.fd[:64]
    return f"export{index or 0}"


def check_unique(exports: Iterable[ExportConfig], labels: Iterable[str]) -> None:
    """No two exports share a name, a socket path or a handed-over socket."""
    seen: dict[tuple[str, str], str] = {}
    for export, label in zip(exports, labels, strict=True):
        claims = [("name", export.name)]
        if export.addr is not None and export.addr.type == "unix":
            claims.append(("socket", str(Path(os.path.abspath(export.addr.path)))))
        elif export.addr is not None:
            claims.append(("socket_fd", str(export.addr.fd)))
        for kind, value in claims:
            if (kind, value) in seen:
                raise ConfigError(f'{label}: {kind} "{value}" is already {seen[kind, value]}\'s')
            named = kind == "name" or f'"{export.name}"' in label
            seen[kind, value] = label if named else f'{label} "{export.name}"'


def merge(file_values: Mapping[str, Any], cli_values: Mapping[str, Any], *,
          command: str = "serve") -> ServeConfig:
    """The effective config: defaults, then `file_values` (from load_config), then every flag in
    `cli_values` that is not None. `cli_values` may be vars(argparse.Namespace): keys that are
    not config keys are ignored, so flags must default to None to mean "not given".

    `command="plan"` does not require a socket. A file with [[export]] tables takes no export
    flags (--disk, --socket, ...); without tables, the top-level keys and flags are one export.
    """
    values = dict(file_values)
    tables: list[ExportConfig] | None = values.pop("export", None)
    unknown = set(values) - set(VALIDATORS)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))}")
    for key, validate in VALIDATORS.items():
        value = cli_values.get(key)
        if value is not None:
            if tables is not None and key in FLAT_EXPORT_KEYS:
                raise ConfigError(f"{_flag(key)}: the config file describes its exports as [[export]]"
                                  f" tables: set {key} there (or drop the tables)")
            values[key] = validate(value, _flag(key), False)

    config = ServeConfig(**values)
    if tables is not None:
        exports = list(tables)
    elif config.disk is not None or command == "plan" or config.rpc_socket is None or any(
            values.get(k) is not None for k in FLAT_EXPORT_KEYS):
        exports = [_export_from(values, "", index=0, require_addr=command == "serve",
                                flag_style=True)]
    else:
        exports = []    # a daemon managed over RPC only
    if not config.inflight:    # --debug-no-inflight: every export
        exports = [replace(e, inflight=False) for e in exports]
    config.exports = exports
    if len(exports) == 1 and config.policy.kind == "threads" and config.io_threads is None and \
            (config.policy.threads or 1) > exports[0].queues:
        raise ConfigError(f"policy: threads={config.policy.threads} needs at least as many"
                          f" virtqueues, but queues is {exports[0].queues}")
    return config
