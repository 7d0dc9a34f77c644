"""Typed configuration for `dataplane serve` and `dataplane plan`: a TOML file, overridden by
command-line flags, validated into one `ServeConfig`. Every error is one ConfigError naming the
file (or flag), the key and the bad value.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .placement import MAX_CPUS, PER_QUEUE, Policy, parse_cpulist, parse_policy

MAX_QUEUES = 256   # a vhost-user vring index is 8 bits (VHOST_USER_VRING_IDX_MASK)
CACHE_MODES = ("none", "writeback")
LOG_LEVELS = ("debug", "info", "warning", "error")


def default_queues() -> int:
    """As many virtqueues as CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


@dataclass
class ServeConfig:
    """Everything `serve` (and, for placement, `plan`) needs; defaults match the CLI's."""

    disk: str
    socket: Path | None = None                 # required by serve, unused by plan
    queues: int = field(default_factory=default_queues)
    read_only: bool = False
    cache: str = "none"
    serial: str = "dataplane"
    policy: Policy = PER_QUEUE
    vcpu_cpus: list[int] | None = None         # host CPUs running the guest's vCPUs: kept free
    metrics: tuple[str, int] | None = None     # (host, port) of the metrics endpoint; None: off
    log_level: str = "info"
    socket_mode: int = 0o600
    socket_group: str | None = None            # group owning the socket (with socket_mode)
    poll_us: int = 50                          # I/O threads spin this long before sleeping
    inflight: bool = True                      # offer INFLIGHT_SHMFD (off only to debug)


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


VALIDATORS: dict[str, Callable[[Any, str, bool], Any]] = {
    "socket": _socket,
    "disk": _disk,
    "queues": _queues,
    "read_only": _bool,
    "cache": _cache,
    "serial": _serial,
    "policy": _policy,
    "vcpu_cpus": _vcpu_cpus,
    "metrics": _metrics,
    "log_level": _log_level,
    "socket_mode": _socket_mode,
    "socket_group": lambda v, where, f: _string(v, where),
    "poll_us": _poll_us,
    "inflight": _bool,
}
_PATH_KEYS = ("socket", "disk")   # relative paths in a file are relative to the file


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _suggest(key: str) -> str:
    """' (did you mean "queues"?)' in the user's spelling, or the list of keys."""
    canonical = key.lower().replace("-", "_")
    close = difflib.get_close_matches(canonical, VALIDATORS, n=1, cutoff=0.6)
    if close:
        spelled = close[0].replace("_", "-") if "-" in key else close[0]
        return f' (did you mean "{spelled}"?)'
    return f" (known keys: {', '.join(sorted(VALIDATORS))})"


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
    """Read and validate a TOML config file: {key: typed value} for the keys it sets.

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

    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in raw.items():
        canonical = key.replace("-", "_")
        if canonical not in VALIDATORS:
            raise ConfigError(f"{name}: unknown key \"{key}\"{_suggest(key)}")
        if canonical in spelled:
            raise ConfigError(f"{name}: {canonical} is set twice (as {spelled[canonical]} and {key})")
        spelled[canonical] = key
        typed = VALIDATORS[canonical](value, f"{name}: {key}", True)
        if canonical in _PATH_KEYS and not (typed == "null" or str(typed).startswith(("null:", "rbd:"))):
            typed_path = Path(typed)
            if not typed_path.is_absolute():
                typed_path = path.parent / typed_path
            typed = typed_path if canonical == "socket" else str(typed_path)
        values[canonical] = typed
    return values


def merge(file_values: Mapping[str, Any], cli_values: Mapping[str, Any], *,
          command: str = "serve") -> ServeConfig:
    """The effective config: defaults, then `file_values` (from load_config), then every flag in
    `cli_values` that is not None. `cli_values` may be vars(argparse.Namespace): keys that are
    not config keys are ignored, so flags must default to None to mean "not given".

    `command="plan"` does not require a socket.
    """
    values = dict(file_values)
    unknown = set(values) - set(VALIDATORS)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))}")
    for key, validate in VALIDATORS.items():
        value = cli_values.get(key)
        if value is not None:
            values[key] = validate(value, _flag(key), False)

    required = ("socket", "disk") if command == "serve" else ("disk",)
    for key in required:
        if values.get(key) is None:
            raise ConfigError(f"{_flag(key)} is required (on the command line, or as {key} in the"
                              " config file)")
    config = ServeConfig(**values)
    if config.policy.kind == "threads" and (config.policy.threads or 1) > config.queues:
        raise ConfigError(f"policy: threads={config.policy.threads} needs at least as many"
                          f" virtqueues, but queues is {config.queues}")
    return config
