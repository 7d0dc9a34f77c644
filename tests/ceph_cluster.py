"""A throw-away single-node Ceph cluster for tests: one monitor, one memstore OSD, no mgr, no systemd.

Usage (a pytest session fixture)::

    cluster = CephCluster(tmp_path_factory.mktemp("ceph")).start()
    try:
        cluster.create_image("disk0", 64 << 20)
        ...  # point librbd at cluster.conf_path, cluster.client_id, cluster.keyring_path
    finally:
        cluster.stop()

Everything the cluster writes (ceph.conf, keyrings, mon store, OSD dir, logs, admin sockets, pid files,
crash dumps) lives under the directory it is given; it never reads or writes /etc/ceph, /var/lib/ceph,
/var/log/ceph or /var/run/ceph, so it works as root on a machine with no /etc/ceph/ceph.conf, and two
clusters (two test runs) on one machine do not collide: the monitor listens on a free port of
127.0.0.1 picked at start, the OSD takes the first free port of 6800-7300.

The data of the memstore OSD lives in that OSD's memory (memstore page set, 4 KiB pages, so memory
is about the data written); it is gone when the OSD is SIGKILLed.

The daemons run in the foreground as children of this process, with PR_SET_PDEATHSIG so that they
die with it; `stop()` kills them by PID and removes the directory. Every wait is bounded; a timeout
or a failed step raises `CephClusterError` with the command's output and the daemons' log tails.

Packages (Debian 12): ceph-mon ceph-osd ceph-common (ceph-base comes with them).

By hand: `python tests/ceph_cluster.py DIR --image vm1:1G` starts one, prints its conf and the
`--disk rbd:...` spec of each image, and stops it (removing DIR) on ^C or SIGTERM.
"""

from __future__ import annotations

import base64
import ctypes
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

__all__ = ["CephCluster", "CephClusterError", "CephUnavailable", "RbdImage", "missing_tools"]

# tool -> Debian package that ships it
REQUIRED_TOOLS: Mapping[str, str] = {
    "ceph-mon": "ceph-mon",
    "ceph-osd": "ceph-osd",
    "monmaptool": "ceph-base",
    "ceph": "ceph-common",
    "rbd": "ceph-common",
    "rados": "ceph-common",
}

MON_NAME = "a"
OSD_ID = 0
DEFAULT_POOL = "rbd"
DEFAULT_CLIENT = "dataplane"
# A daemon's admin socket path must fit in sun_path (108 bytes including the NUL).
_SUN_PATH_MAX = 107


class CephClusterError(RuntimeError):
    """A step of bringing up or driving the cluster failed or timed out."""


class CephUnavailable(CephClusterError):
    """The Ceph packages are not installed."""


def missing_tools() -> dict[str, str]:
    """The required tools that are not on PATH, mapped to the Debian package that provides them."""
    return {tool: pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None}


def _cephx_key() -> str:
    """A new cephx secret as a keyring stores it: CryptoKey encoding (type AES, created, len, 16 bytes)."""
    now = time.time()
    blob = struct.pack("<HIIH", 1, int(now), int((now % 1) * 1e9), 16) + secrets.token_bytes(16)
    return base64.b64encode(blob).decode()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    os.setpgid(0, 0)  # not in the test runner's process group: a ^C there does not reach the daemons


def _tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log, without blank lines and without the daemon's complaints about our
    own admin-socket polling (before a daemon registers `status` it logs each request as not defined)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"  ({path}: {e.strerror})"
    kept = [ln for ln in text.splitlines() if ln.strip() and "AdminSocket: request" not in ln]
    return "\n".join("  " + line for line in kept[-lines:])


def asok_command(path: Path | str, prefix: str, timeout: float = 5.0, **args: object) -> object:
    """Send one command to a daemon's admin socket; its reply decoded from JSON (or the text, if not JSON)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps({"prefix": prefix, "format": "json", **args}).encode() + b"\0")
        head = b""
        while len(head) < 4:
            chunk = s.recv(4 - len(head))
            if not chunk:
                raise CephClusterError(f"admin socket {path}: closed before the reply")
            head += chunk
        (length,) = struct.unpack(">I", head)
        body = b""
        while len(body) < length:
            chunk = s.recv(length - len(body))
            if not chunk:
                raise CephClusterError(f"admin socket {path}: reply cut short")
            body += chunk
    text = body.decode(errors="replace")
    try:
        return json.loads(text) if text.strip() else None
    except ValueError:
        return text  # some commands (`heap`) answer in plain text


@dataclass
class RbdImage:
    """An image of a cluster, and the `--disk` spec that reaches it as client.<client_id>."""

    cluster: CephCluster
    name: str
    size: int

    @property
    def spec(self) -> str:
        return f"{self.cluster.pool}/{self.name}"

    def disk(self, *options: str, timeout: int = 10) -> str:
        """`rbd:POOL/NAME,conf=...,id=...,keyring=...,timeout=N[,option...]` for dataplane."""
        c = self.cluster
        base = (f"rbd:{self.spec},conf={c.conf_path},id={c.client_id},keyring={c.keyring_path},"
                f"timeout={timeout}")
        return ",".join([base, *options])

    def export(self) -> bytes:
        """The whole image, read by `rbd export` (a client other than the code under test)."""
        return self.cluster.export_image(self.name)


class CephCluster:
    """One monitor and one memstore OSD on 127.0.0.1, cephx on, a size-1 pool `rbd` initialised for RBD.

    cephx is on because that is how every real cluster runs and because it exercises the `id=` and
    `keyring=` parts of a disk spec; it costs nothing measurable. Two entities exist: `client.admin`
    (used by this class) and `client.<client_id>` with the caps a librbd user gets in production
    (`profile rbd`), whose keyring is `keyring_path`.
    """

    def __init__(
        self,
        base_dir: Path | str,
        *,
        pool: str = DEFAULT_POOL,
        client_id: str = DEFAULT_CLIENT,
        osd_bytes: int = 8 << 30,
        timeout: float = 60.0,
        extra_conf: Mapping[str, Mapping[str, str]] | None = None,
        daemon_env: Mapping[str, str] | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.pool = pool
        self.client_id = client_id
        self.osd_bytes = osd_bytes  # what the OSD reports as its capacity; memory is only what is written
        self.timeout = timeout
        self.extra_conf = extra_conf or {}
        self.daemon_env = dict(daemon_env or {})  # added to the daemons' environment (e.g. MALLOC_*)
        self.fsid = str(uuid.uuid4())
        self.osd_uuid = str(uuid.uuid4())
        self.mon_port = 0
        self.mon_proc: subprocess.Popen[bytes] | None = None
        self.osd_proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.startup_s = 0.0
        self.timings: dict[str, float] = {}  # step -> seconds, of the last start()
        self._image_serial = itertools.count(1)

    # ---------------------------------------------------------------- paths
    @property
    def conf_path(self) -> Path:
        return self.base_dir / "ceph.conf"

    @property
    def keyring_path(self) -> Path:
        """The keyring of `client.<client_id>` (and only that entity)."""
        return self.keyring_for(self.client_id)

    @property
    def admin_keyring_path(self) -> Path:
        return self.keyring_for("admin")

    def keyring_for(self, client_id: str) -> Path:
        return self.base_dir / f"ceph.client.{client_id}.keyring"

    @property
    def mon_host(self) -> str:
        return f"v2:127.0.0.1:{self.mon_port}"

    @property
    def log_dir(self) -> Path:
        return self.base_dir / "log"

    @property
    def run_dir(self) -> Path:
        return self.base_dir / "run"

    @property
    def mon_data(self) -> Path:
        return self.base_dir / "mon" / f"ceph-{MON_NAME}"

    @property
    def osd_data(self) -> Path:
        return self.base_dir / "osd" / f"ceph-{OSD_ID}"

    @property
    def mon_asok(self) -> Path:
        return self.run_dir / f"ceph-mon.{MON_NAME}.asok"

    @property
    def osd_asok(self) -> Path:
        return self.run_dir / f"ceph-osd.{OSD_ID}.asok"

    @property
    def objectstore(self) -> str:
        return self.extra_conf.get("osd", {}).get("osd objectstore", "memstore")

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment for a Ceph client process (fio, qemu, rbd) that finds this cluster by default.

        CEPH_CONF points at our ceph.conf; CEPH_ARGS is cleared so a caller's setting cannot redirect it.
        """
        env = dict(os.environ if base is None else base)
        env["CEPH_CONF"] = str(self.conf_path)
        env.pop("CEPH_ARGS", None)
        return env

    # ---------------------------------------------------------------- config
    def conf_text(self, overrides: Mapping[str, Mapping[str, str]] | None = None) -> str:
        d = self.base_dir
        sections: dict[str, dict[str, str]] = {
            "global": {
                "fsid": self.fsid,
                "mon host": self.mon_host,
                "auth cluster required": "cephx",
                "auth service required": "cephx",
                "auth client required": "cephx",
                "ms bind msgr1": "false",
                "ms bind ipv6": "false",
                "public addr": "127.0.0.1",
                "cluster addr": "127.0.0.1",
                "run dir": str(d / "run"),
                "crash dir": str(d / "crash"),
                "admin socket": "$run_dir/ceph-$name.asok",
                "pid file": "$run_dir/ceph-$name.pid",
                "log file": f"{d}/log/ceph-$name.log",
                "mon cluster log file": f"default={d}/log/ceph.$channel.log cluster={d}/log/ceph.log",
                "osd pool default size": "1",
                "osd pool default min size": "1",
                "osd pool default pg num": "8",
                "osd pool default pgp num": "8",
                "osd pool default pg autoscale mode": "off",
                "osd crush chooseleaf type": "0",
                "mon allow pool size one": "true",
                "auth allow insecure global id reclaim": "false",
                "mon allow pool delete": "true",
                "mon warn on pool no redundancy": "false",
                "mon data avail warn": "2",
                "mon data avail crit": "1",
            },
            "mon": {
                "mon data": f"{d}/mon/ceph-$id",
                "paxos propose interval": "0.05",
                "ms bind retry count": "1",
                "mon mgr mkfs grace": "31536000",
            },
            "osd": {
                "osd data": f"{d}/osd/ceph-$id",
                "keyring": "$osd_data/keyring",
                "osd journal": "$osd_data/journal",
                "osd objectstore": "memstore",
                "memstore device bytes": str(self.osd_bytes),
                "memstore page set": "true",
                "memstore page size": "4096",
            },
            "client": {
                "keyring": f"{d}/ceph.$name.keyring",
                "admin socket": "$run_dir/ceph-$name.$pid.$cctid.asok",
                "log file": f"{d}/log/ceph-$name.$pid.log",
            },
        }
        for extra in (self.extra_conf, overrides or {}):
            for section, options in extra.items():
                sections.setdefault(section, {}).update(options)
        out: list[str] = []
        for section, options in sections.items():
            out.append(f"[{section}]")
            out.extend(f"\t{k} = {v}" for k, v in options.items())
            out.append("")
        return "\n".join(out)

    def write_client_conf(self, name: str, options: Mapping[str, str]) -> Path:
        """A copy of ceph.conf, as `<name>.conf`, with `options` for client.<client_id>; returns its path.

        For a client that can only be configured through its conf file (fio's rbd engine reads the conf
        and nothing else: no CEPH_ARGS), e.g. {"rbd cache": "false"}. The paths in ceph.conf name the
        cluster "ceph" literally, not `$cluster`, because Ceph derives $cluster from the conf file name.
        """
        path = self.base_dir / f"{name}.conf"
        path.write_text(self.conf_text({f"client.{self.client_id}": options}))
        return path

    @staticmethod
    def _keyring_entry(name: str, key: str, caps: Mapping[str, str]) -> str:
        lines = [f"[{name}]", f"\tkey = {key}"]
        lines.extend(f'\tcaps {svc} = "{cap}"' for svc, cap in caps.items())
        return "\n".join(lines) + "\n"

    def _write_files(self) -> None:
        if self.base_dir.exists() and any(self.base_dir.iterdir()):
            raise CephClusterError(f"{self.base_dir} is not empty; a cluster needs a directory of its own")
        for sub in ("log", "run", "crash", "mon", "osd"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        self.osd_data.mkdir(parents=True)
        if len(str(self.osd_asok)) > _SUN_PATH_MAX:
            raise CephClusterError(f"{self.base_dir} is too long a path for the daemons' admin sockets")
        self.conf_path.write_text(self.conf_text())

        entities = {
            "mon.": ({"mon": "allow *"}, None),
            "client.admin": (
                {"mon": "allow *", "osd": "allow *", "mgr": "allow *", "mds": "allow *"},
                self.admin_keyring_path,
            ),
            f"client.{self.client_id}": (
                {"mon": "profile rbd", "osd": "profile rbd", "mgr": "profile rbd"},
                self.keyring_path,
            ),
            f"osd.{OSD_ID}": (
                {"mon": "allow profile osd", "osd": "allow *", "mgr": "allow profile osd"},
                self.osd_data / "keyring",
            ),
        }
        # The mon imports every entity of its mkfs keyring into its auth database: no `ceph auth add`.
        mkfs_keyring = self.base_dir / "mkfs.keyring"
        all_entries = []
        for name, (caps, path) in entities.items():
            entry = self._keyring_entry(name, _cephx_key(), caps)
            all_entries.append(entry)
            if path is not None:
                path.write_text(entry)
                path.chmod(0o600)
        mkfs_keyring.write_text("".join(all_entries))
        mkfs_keyring.chmod(0o600)

    # ---------------------------------------------------------------- running things
    def _logs(self) -> str:
        """The tails of the daemons' logs (OSD first: it is the one that fails more often), for errors."""
        parts = []
        for name in (f"ceph-osd.{OSD_ID}", f"ceph-mon.{MON_NAME}"):
            for suffix in (".out", ".log"):
                path = self.log_dir / (name + suffix)
                if path.exists() and path.stat().st_size:
                    parts.append(f"--- {path} (tail)\n{_tail(path, 25)}")
        return "\n".join(parts)

    def _fail(self, message: str) -> CephClusterError:
        return CephClusterError(f"{message}\n{self._logs()}")

    def run(
        self, argv: Sequence[str], *, timeout: float | None = None, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a Ceph CLI against this cluster as client.admin; raise with its output and logs on failure."""
        limit = self.timeout if timeout is None else timeout
        try:
            proc = subprocess.run(
                list(argv),
                check=False,
                input=input,
                capture_output=True,
                timeout=limit,
                env=self.env(),
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise self._fail(f"{' '.join(argv)}: no answer in {limit:.0f} s") from e
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).decode(errors="replace").strip()
            raise self._fail(f"{' '.join(argv)}: exit status {proc.returncode}\n  {out}")
        return proc

    def _conf_args(self) -> list[str]:
        t = str(int(self.timeout))
        return ["-c", str(self.conf_path), "--rados-osd-op-timeout", t, "--rados-mon-op-timeout", t]

    def ceph(self, *args: str, timeout: float | None = None) -> str:
        conn = ["--connect-timeout", str(int(self.timeout))]
        return self.run(["ceph", *self._conf_args(), *conn, *args], timeout=timeout).stdout.decode()

    def rbd(self, *args: str, timeout: float | None = None, input: bytes | None = None) -> bytes:
        return self.run(["rbd", *self._conf_args(), *args], timeout=timeout, input=input).stdout

    def rados(self, *args: str, timeout: float | None = None, input: bytes | None = None) -> bytes:
        return self.run(["rados", *self._conf_args(), *args], timeout=timeout, input=input).stdout

    def _spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        out = open(self.log_dir / f"{name}.out", "ab")  # noqa: SIM115 - the child owns it from here
        try:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self.env(), **self.daemon_env},
                cwd=self.base_dir,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - needed for PR_SET_PDEATHSIG
            )
        finally:
            out.close()

    def _wait_asok(self, proc: subprocess.Popen[bytes], asok: Path, what: str, ready: str) -> None:
        """Poll a daemon's admin socket until `status`/`mon_status` says `ready` (bounded)."""
        deadline = time.monotonic() + self.timeout
        prefix = "mon_status" if "mon" in asok.name else "status"
        last = "no admin socket yet"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise self._fail(f"{what} exited with status {proc.returncode} while starting")
            if asok.exists():
                try:
                    reply = asok_command(asok, prefix, timeout=2.0)
                except (OSError, ValueError, CephClusterError) as e:
                    last = f"admin socket: {e}"
                else:
                    state = reply.get("state") if isinstance(reply, dict) else None
                    if state == ready:
                        return
                    last = f"state {state!r}" if state else "its admin socket does not answer `status` yet"
            time.sleep(0.1)
        raise self._fail(f"{what} not {ready!r} after {self.timeout:.0f} s ({last})")

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> Self:
        """Bring the cluster up: mon, OSD, pool `self.pool` initialised for RBD. Returns self."""
        missing = missing_tools()
        if missing:
            pkgs = " ".join(sorted(set(missing.values())))
            raise CephUnavailable(
                f"Ceph is not installed (missing {', '.join(sorted(missing))}); "
                f"on Debian 12: apt-get install {pkgs}"
            )
        t0 = time.monotonic()
        self.started_at = time.time()
        try:
            self._step("files", self._write_files)
            self._step("mon", self._start_mon)
            self._step("osd", self._start_osd)
            self._step("pool create", self.ceph, "osd", "pool", "create", self.pool, "8", "8", "replicated")
            self._step("rbd pool init", self.rbd, "pool", "init", self.pool)
        except BaseException:
            # Keep conf and logs for the post-mortem; drop the stores (a bluestore one can be large).
            self.stop(remove=False)
            for data in (self.base_dir / "mon", self.base_dir / "osd"):
                shutil.rmtree(data, ignore_errors=True)
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _step(self, name: str, fn: Callable[..., object], *args: str) -> None:
        t = time.monotonic()
        fn(*args)
        self.timings[name] = time.monotonic() - t

    def _start_mon(self) -> None:
        mkfs_keyring = self.base_dir / "mkfs.keyring"
        monmap = self.base_dir / "monmap"
        for attempt in range(3):
            self.mon_port = _free_port()
            self.conf_path.write_text(self.conf_text())
            self.run(["monmaptool", "--create", "--clobber", "--enable-all-features", "--fsid", self.fsid,
                      "--addv", MON_NAME, f"[{self.mon_host}]", str(monmap)])  # fmt: skip
            if self.mon_data.exists():
                shutil.rmtree(self.mon_data)
            self.run(["ceph-mon", "-c", str(self.conf_path), "--mkfs", "-i", MON_NAME,
                      "--monmap", str(monmap), "--keyring", str(mkfs_keyring)])  # fmt: skip
            self.mon_proc = self._spawn(f"ceph-mon.{MON_NAME}", ["ceph-mon", "-f", "-c", str(self.conf_path),
                                                                  "-i", MON_NAME])  # fmt: skip
            try:
                self._wait_asok(self.mon_proc, self.mon_asok, "ceph-mon", "leader")
                return
            except CephClusterError:
                # Lost the race for the port to someone else? Try another one.
                log = self.log_dir / f"ceph-mon.{MON_NAME}.log"
                busy = log.exists() and "Address already in use" in log.read_text(errors="replace")
                self._kill(self.mon_proc)
                self.mon_proc = None
                if not busy or attempt == 2:
                    raise

    def _start_osd(self) -> None:
        self.ceph("osd", "new", self.osd_uuid, str(OSD_ID))
        conf = str(self.conf_path)
        self.run(["ceph-osd", "-c", conf, "-i", str(OSD_ID), "--mkfs", "--osd-uuid", self.osd_uuid])
        # An option value Ceph rejects is dropped with a warning and the default applies: a misspelt
        # objectstore silently gives bluestore with a 100 GiB sparse file. Check what mkfs made.
        store = (self.osd_data / "type").read_text().strip()
        if store != self.objectstore:
            raise self._fail(f"ceph-osd --mkfs made a {store!r} store, not {self.objectstore!r}")
        self.osd_proc = self._spawn(f"ceph-osd.{OSD_ID}", ["ceph-osd", "-f", "-c", conf, "-i", str(OSD_ID)])
        self._wait_asok(self.osd_proc, self.osd_asok, "ceph-osd", "active")

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)

    def stop(self, *, remove: bool = True) -> None:
        """Kill the daemons by PID (SIGKILL: their state is thrown away anyway) and remove the directory."""
        self._kill(self.osd_proc)
        self._kill(self.mon_proc)
        if remove and self.base_dir.exists():
            shutil.rmtree(self.base_dir)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- OSD faults (for error-path tests)
    def pause_osd(self) -> None:
        """SIGSTOP the OSD: I/O to it stalls (a hung OSD) until `resume_osd`; its data is kept."""
        assert self.osd_proc is not None
        self.osd_proc.send_signal(signal.SIGSTOP)

    def resume_osd(self) -> None:
        assert self.osd_proc is not None
        self.osd_proc.send_signal(signal.SIGCONT)

    def kill_osd(self) -> None:
        """SIGKILL the OSD. memstore keeps nothing across this: the pool's data is gone for good."""
        self._kill(self.osd_proc)

    # ---------------------------------------------------------------- images
    def create_image(self, name: str, size: int, *, features: Sequence[str] | None = None) -> str:
        """Create an RBD image of `size` bytes (a multiple of 512) in the pool; returns "pool/name".

        `features`: None for Ceph's default set (layering, exclusive-lock, object-map, fast-diff,
        deep-flatten), or the exact list wanted, e.g. ["layering"] or [] (none: no exclusive lock).
        """
        if size <= 0 or size % 512:
            raise ValueError(f"image size {size} is not a positive multiple of 512")
        spec = f"{self.pool}/{name}"
        args = ["create", "--size", f"{size}B", spec]
        if features:
            args += ["--image-feature", ",".join(features)]
        elif features is not None:
            args += ["--rbd-default-features", "0"]
        self.rbd(*args)
        return spec

    def new_image(self, label: str, size: int, *, features: Sequence[str] | None = None) -> RbdImage:
        """A new image named after `label` (a test's name) and a counter, for a test's own use."""
        base = re.sub(r"[^A-Za-z0-9_-]+", "-", label)[-60:].strip("-") or "img"
        name = f"{base}-{next(self._image_serial)}"
        self.create_image(name, size, features=features)
        return RbdImage(self, name, size)

    def image_features(self, name: str) -> list[str]:
        info = json.loads(self.rbd("info", "--format", "json", f"{self.pool}/{name}"))
        return [str(f) for f in info["features"]]

    def remove_image(self, name: str) -> None:
        self.rbd("rm", "--no-progress", f"{self.pool}/{name}")

    def image_size(self, name: str) -> int:
        info = json.loads(self.rbd("info", "--format", "json", f"{self.pool}/{name}"))
        return int(info["size"])

    def write_image(self, name: str, offset: int, data: bytes, *, zero: bool = False) -> None:
        """Write `data` (or, with zero=True, zeroes of len(data)) at `offset` of an existing image.

        Goes through `rbd import-diff` with a one-extent "rbd diff v1" stream, so it is exact to the byte
        and independent of the code under test.
        """
        rec = (
            b"z" + struct.pack("<QQ", offset, len(data))
            if zero
            else (b"w" + struct.pack("<QQ", offset, len(data)) + data)
        )
        stream = b"rbd diff v1\n" + rec + b"e"
        self.rbd("import-diff", "--no-progress", "-", f"{self.pool}/{name}", input=stream)

    def export_image(self, name: str) -> bytes:
        """The whole image content, read through `rbd export` (independent of the code under test)."""
        return self.rbd("export", "--no-progress", f"{self.pool}/{name}", "-", timeout=self.timeout * 4)

    def import_image(self, name: str, data: bytes) -> str:
        """Create image `name` with content `data` through `rbd import`; returns "pool/name"."""
        spec = f"{self.pool}/{name}"
        self.rbd("import", "--no-progress", "-", spec, input=data, timeout=self.timeout * 4)
        return spec

    def daemon_rss(self) -> dict[str, int]:
        """Resident set size (bytes) of each running daemon, from /proc/PID/status."""
        out: dict[str, int] = {}
        for name, proc in (("mon", self.mon_proc), ("osd", self.osd_proc)):
            if proc is None or proc.poll() is not None:
                continue
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[name] = int(line.split()[1]) * 1024
        return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python tests/ceph_cluster.py DIR [--image NAME:SIZE]...`: a cluster for trying things by
    hand. It prints how to reach it, serves until SIGINT or SIGTERM, then removes DIR."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("dir", type=Path, help="an empty (or missing) directory for all its state")
    parser.add_argument("--image", action="append", default=[], metavar="NAME:SIZE",
                        help="create an image, e.g. vm1:1G (suffixes K M G; repeatable)")
    args = parser.parse_args(argv)
    cluster = CephCluster(args.dir)
    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        cluster.start()
        specs = []
        for item in args.image:
            name, _, size_text = item.partition(":")
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            scale = units.get(size_text[-1:].upper(), 1)
            size = int(size_text.rstrip("kKmMgG")) * scale
            specs.append(cluster.create_image(name, size))
        print(f"ceph cluster up in {cluster.startup_s:.2f} s (mon {cluster.mon_host});"
              f" state in {cluster.base_dir}")
        print(f"  conf:    {cluster.conf_path}")
        print(f"  client:  client.{cluster.client_id}, keyring {cluster.keyring_path}")
        for spec in specs:
            print(f"  --disk rbd:{spec},conf={cluster.conf_path},id={cluster.client_id}")
        print("  CTRL-C (or SIGTERM) stops it and removes the directory", flush=True)
        while not stop:
            signal.pause()
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
