"""Ceph RBD images as disks: `rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][,key=value...]`.

    rbd:rbd/vm1                                   client.admin, the default ceph.conf search
    rbd:rbd/vm1,conf=/etc/ceph/ceph.conf,id=dataplane,keyring=/etc/ceph/ceph.client.dataplane.keyring
    rbd:rbd/vm1@base                              a snapshot (read-only)
    rbd:rbd/vm1,timeout=5,rbd_cache_policy=writeback,latency=fixed:100us

Keys: conf, id, keyring, cluster, timeout (seconds: rados_osd_op_timeout, rados_mon_op_timeout
and client_mount_timeout where the conf leaves Ceph's default; 30 unless given). A key with an
underscore is a Ceph option, set on the connection after the conf (rbd_cache_policy,
ms_async_op_threads, ...). `--cache` picks rbd_cache: none -> false, writeback -> true.

The C side (csrc/disk/rbd.c) connects and opens; this module parses the spec, turns the
C core's findings into log lines, and reclaims the exclusive lock a previous instance of this
backend on this host held when it died (see reclaim_lock).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from ..core import ffi, lib
from ..errors import ConfigError

log = logging.getLogger("dataplane.disk")

RBD_PACKAGE = "librbd-dev"
DEFAULT_TIMEOUT_S = 30
OWN_KEYS = ("conf", "id", "keyring", "cluster", "timeout")
DEBUG_NO_LOCK_BREAK = "debug-no-lock-break"   # turns the lock reclaim off, to prove the test sees it
_CACHE_SOURCES = ("config", "pool", "image")


@dataclass
class RbdSpec:
    """A parsed `rbd:` disk spec."""

    pool: str
    image: str
    namespace: str | None = None
    snap: str | None = None
    conf: str | None = None
    client_id: str = "admin"
    keyring: str | None = None
    cluster: str = "ceph"
    timeout: int = DEFAULT_TIMEOUT_S
    lock_break: bool = True
    options: dict[str, str] = field(default_factory=dict)   # Ceph options, in the spec's order

    @property
    def name(self) -> str:
        """pool/[namespace/]image[@snap], as `rbd` writes it."""
        ns = f"{self.namespace}/" if self.namespace else ""
        snap = f"@{self.snap}" if self.snap else ""
        return f"{self.pool}/{ns}{self.image}{snap}"


def is_rbd_spec(spec: str) -> bool:
    return spec.startswith("rbd:")


def parse_rbd_spec(spec: str) -> RbdSpec:
    """`rbd:POOL/[NS/]IMAGE[@SNAP][,key=value...]` (emulated-latency options already split off)."""
    if not is_rbd_spec(spec):
        raise ConfigError(f"bad rbd disk {spec!r}: expected rbd:POOL/IMAGE")
    where = f"bad rbd disk {spec!r}"
    body, *items = spec[len("rbd:"):].split(",")
    path, at, snap = body.partition("@")
    parts = path.split("/")
    if len(parts) not in (2, 3) or not all(parts) or (at and not snap):
        raise ConfigError(f"{where}: expected rbd:POOL/IMAGE, rbd:POOL/NAMESPACE/IMAGE or "
                          "rbd:POOL/IMAGE@SNAPSHOT")
    if "@" in snap:
        raise ConfigError(f"{where}: more than one @")
    parsed = RbdSpec(pool=parts[0], image=parts[-1], namespace=parts[1] if len(parts) == 3 else None,
                     snap=snap or None)
    seen: set[str] = set()
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if key == DEBUG_NO_LOCK_BREAK and not eq:
            parsed.lock_break = False
            continue
        if not eq or not key or not value:
            raise ConfigError(f"{where}: option {item!r} is not key=value")
        if key in seen:
            raise ConfigError(f"{where}: {key} is given twice")
        seen.add(key)
        if key == "conf":
            parsed.conf = value
        elif key == "id":
            parsed.client_id = value.removeprefix("client.")
        elif key == "keyring":
            parsed.keyring = value
        elif key == "cluster":
            parsed.cluster = value
        elif key == "timeout":
            if not re.fullmatch(r"\d+", value) or int(value) > 86400:
                raise ConfigError(f"{where}: timeout={value!r}: expected whole seconds (0 to 86400)")
            parsed.timeout = int(value)
        elif "_" in key:
            parsed.options[key] = value
        else:
            raise ConfigError(f"{where}: unknown option {key!r} (known: {', '.join(OWN_KEYS)}; "
                              "Ceph options are written with underscores, e.g. rbd_cache_policy=...)")
    return parsed


def rbd_available(core: object = lib) -> bool:
    """Whether the C core was built with librbd (it has no dp_rbd_* otherwise)."""
    return hasattr(core, "dp_rbd_disk_new")


def require_rbd(spec_text: str, core: object = lib) -> None:
    if not rbd_available(core):
        raise ConfigError(
            f"disk {spec_text!r}: this dataplane was built without RBD support (librbd was not found"
            f" at build time); install it (Debian: apt-get install {RBD_PACKAGE}) and rebuild the C"
            " core (pip install -e . or python -m dataplane._build)")


@dataclass
class RbdImage:
    """An open image: the C disk, what librbd said about it, and this process's owner record."""

    spec: RbdSpec
    handle: object = field(repr=False)
    size: int = 0
    features: int = 0
    image_id: str = ""
    fsid: str = ""
    addr: str = ""
    cache: bool = False
    cache_source: str = "config"
    cache_policy: str = ""
    volatile_cache: bool = False
    record: Path | None = None

    def info(self) -> object:
        out = ffi.new("struct dp_rbd_info *")
        if lib.dp_rbd_disk_get_info(self.handle, out) < 0:
            raise ConfigError("not an RBD disk")
        return out

    def errors(self) -> tuple[int, int]:
        """(requests librbd failed, the latest failure as -errno)."""
        info = self.info()
        return int(info.errors), int(info.last_error)

    def conf_get(self, option: str) -> str:
        buf = ffi.new("char[]", 256)
        if lib.dp_rbd_conf_get(self.handle, option.encode(), buf, 256) < 0:
            raise ConfigError(f"librados has no option {option!r}")
        return ffi.string(buf).decode()

    def lock_owner(self) -> str | None:
        buf = ffi.new("char[]", 256)
        rc = lib.dp_rbd_lock_owner(self.handle, buf, 256)
        return ffi.string(buf).decode() if rc > 0 else None

    def closed(self) -> None:
        """After the C disk is gone: this process no longer owns anything of the image."""
        self.handle = None
        if self.record is not None:
            self.record.unlink(missing_ok=True)
            self.record = None


def open_rbd(spec_text: str, *, read_only: bool, cache: str) -> RbdImage:
    """Connect to the cluster and open the image (read-only for a snapshot or read_only). Raises
    ConfigError with what librados said, in bounded time when the cluster is unreachable."""
    spec = parse_rbd_spec(spec_text)
    require_rbd(spec_text)
    params = ffi.new("struct dp_rbd_params *")
    keep: list[object] = []

    def cstr(text: str | None) -> object:
        if text is None:
            return ffi.NULL
        buf = ffi.new("char[]", text.encode())
        keep.append(buf)
        return buf

    params.cluster = cstr(spec.cluster)
    params.client = cstr(f"client.{spec.client_id}")
    params.conf = cstr(spec.conf)
    params.keyring = cstr(spec.keyring)
    params.pool = cstr(spec.pool)
    params.pool_namespace = cstr(spec.namespace)
    params.image = cstr(spec.image)
    params.snap = cstr(spec.snap)
    params.read_only = int(read_only)
    params.timeout_s = spec.timeout
    # freeing waits this long for librbd's close (a flush, the lock's release) before leaving it
    params.close_wait_ms = max(spec.timeout, 1) * 1000
    options = [("rbd_cache", "true" if cache == "writeback" else "false"), *spec.options.items()]
    if len(options) > int(lib.DP_RBD_MAX_OPTIONS):
        raise ConfigError(f"disk {spec_text!r}: more than {int(lib.DP_RBD_MAX_OPTIONS) - 1} Ceph options")
    params.noptions = len(options)
    for i, (name, value) in enumerate(options):
        params.option_names[i] = cstr(name)
        params.option_values[i] = cstr(value)
    err = ffi.new("int *")
    handle = lib.dp_rbd_disk_new(params, err)
    if handle == ffi.NULL:
        raise ConfigError(f"disk {spec_text!r}: {ffi.string(params.error).decode(errors='replace')}")
    image = RbdImage(spec=spec, handle=handle)
    info = image.info()
    image.size = int(info.size)
    image.features = int(info.features)
    image.image_id = ffi.string(info.id).decode()
    image.fsid = ffi.string(info.fsid).decode()
    image.addr = ffi.string(info.addr).decode()
    image.cache = bool(info.cache)
    image.cache_source = _CACHE_SOURCES[info.cache_source] if 0 <= info.cache_source < 3 else "?"
    image.cache_policy = ffi.string(info.cache_policy).decode()
    image.volatile_cache = bool(info.volatile_cache)
    _log_open(image, cache, read_only or spec.snap is not None)
    return image


def _log_open(image: RbdImage, cache: str, read_only: bool) -> None:
    spec = image.spec
    log.info("rbd %s: image id %s, %d bytes, features 0x%x, cluster %s, client.%s (%s)%s",
             spec.name, image.image_id, image.size, image.features, image.fsid, spec.client_id,
             image.addr, ", read-only" if read_only else "")
    log.info("rbd %s: rbd_cache=%s (from the %s), policy %s: %s; timeouts osd op %s s, mon op %s s,"
             " mount %s s", spec.name, str(image.cache).lower(), image.cache_source, image.cache_policy,
             "writes may be acknowledged before the OSDs have them; the guest's FLUSH is rbd_aio_flush"
             if image.volatile_cache else "a completed write is on the OSDs",
             image.conf_get("rados_osd_op_timeout"), image.conf_get("rados_mon_op_timeout"),
             image.conf_get("client_mount_timeout"))
    wanted = cache == "writeback"
    if image.cache != wanted:
        log.warning("rbd %s: --cache=%s asked for rbd_cache=%s, but the %s's metadata sets %s",
                    spec.name, cache, str(wanted).lower(), image.cache_source, str(image.cache).lower())
    if spec.timeout == 0:
        log.warning("rbd %s: timeout=0: with the cluster gone, I/O and closing wait forever", spec.name)


# ---- the exclusive lock of a previous instance ----
#
# An image with the exclusive-lock feature is locked by the first client that writes. When that
# client dies without releasing it (SIGKILL), the next client's first write waits out the dead
# client's watch (osd_client_watch_timeout, 30 s) before librbd takes the lock over: a guest
# would stall for 30 s after a backend restart. Breaking the lock ends that at once but
# blocklists its holder, which is only safe when the holder is known to be dead. So each
# backend records, per image, its own client address next to its PID; a backend that opens the
# image breaks the lock only when its holder is such a record whose process is gone.


def runtime_dir() -> Path:
    """Where this host's backends keep their records: $DATAPLANE_RUNTIME_DIR, else
    $XDG_RUNTIME_DIR/dataplane, /run/dataplane (root), or /tmp/dataplane-UID."""
    if env := os.environ.get("DATAPLANE_RUNTIME_DIR"):
        return Path(env)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "dataplane"
    if os.geteuid() == 0:
        return Path("/run/dataplane")
    return Path(tempfile.gettempdir()) / f"dataplane-{os.getuid()}"


def _records_dir(image: RbdImage) -> Path:
    key = urllib.parse.quote(f"{image.spec.pool}/{image.spec.namespace or ''}/{image.spec.image}", safe="")
    return runtime_dir() / "rbd" / (image.fsid or "unknown-cluster") / key


def _start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (None: no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return int(fields[19]) if len(fields) > 19 and fields[0] != "Z" else None


def reclaim_lock(image: RbdImage) -> None:
    """Break the image's exclusive lock if a dead earlier backend of this host holds it, then
    record this process as a holder-to-be. Records of dead processes are removed."""
    folder = _records_dir(image)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("rbd %s: cannot keep an owner record in %s (%s): a restart after a crash will"
                    " wait for the old lock to expire", image.spec.name, folder, exc.strerror)
        return
    owner = image.lock_owner()
    for path in sorted(folder.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
            pid, started, addr = int(rec["pid"]), int(rec["start"]), str(rec["addr"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)   # torn or foreign: it proves nothing
            continue
        if _start_time(pid) == started:
            continue   # alive: a migration peer or another export of the same image
        if owner is not None and addr == owner and image.spec.lock_break:
            rc = lib.dp_rbd_lock_break(image.handle, owner.encode())
            if rc < 0:
                log.warning("rbd %s: could not break the lock of our dead predecessor (pid %d, %s): %s",
                            image.spec.name, pid, owner, os.strerror(-rc))
            else:
                log.warning("rbd %s: broke the exclusive lock our previous instance (pid %d, %s, dead)"
                            " held; librbd blocklists that client", image.spec.name, pid, owner)
                owner = None
        path.unlink(missing_ok=True)
    if owner is not None:
        log.info("rbd %s: %s holds the exclusive lock%s", image.spec.name, owner,
                 "" if image.spec.lock_break else f" ({DEBUG_NO_LOCK_BREAK}: never reclaimed)")
    me = os.getpid()
    name = f"{me}-{image.addr.rpartition('/')[2] or 'client'}"   # one per connection of this process
    record, tmp = folder / f"{name}.json", folder / f".{name}.tmp"
    try:
        tmp.write_text(json.dumps({"pid": me, "start": _start_time(me), "addr": image.addr,
                                   "image_id": image.image_id}))
        tmp.replace(record)
    except OSError as exc:
        log.warning("rbd %s: cannot write the owner record %s (%s): a restart after a crash will"
                    " wait for the old lock to expire", image.spec.name, record, exc.strerror)
        return
    image.record = record
