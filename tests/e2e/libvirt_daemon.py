"""A private, throw-away libvirtd (system mode, QEMU driver only) for tests, without systemd.

``LibvirtDaemon(tmpdir).start()`` runs Debian 12's ``libvirtd`` (libvirt 9.0) in the foreground
in a private mount namespace where /etc/libvirt, /run/libvirt, /var/lib/libvirt,
/var/log/libvirt and /var/cache/libvirt are bind mounts of directories under ``tmpdir``, so it
never sees or touches a system instance or another test run's daemon. Its client socket is
``tmpdir/sock/libvirt-sock`` (``.uri`` is ``qemu:///system?socket=...``). QEMU runs as the
packaged default user ``libvirt-qemu`` (groups ``libvirt-qemu`` and ``kvm``) unless
``qemu_user`` says otherwise, so a vhost-user socket must be reachable by that user: see
:meth:`LibvirtDaemon.guest_dir` and the README's libvirt section.

Standard library only. Prerequisites missing (not root, libvirt not installed, no mount
namespaces) raise :class:`LibvirtUnavailable` (a test skips with its message); a daemon that
has everything it needs and still fails to come up raises :class:`LibvirtError`.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

LIBVIRTD = "libvirtd"
VIRSH = "virsh"
UNSHARE = "unshare"
QEMU_BINARY = "qemu-system-x86_64"
DRIVER_DIR = Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver")
QEMU_DRIVER = "libvirt_driver_qemu.so"
DEFAULT_QEMU_USER = "libvirt-qemu"   # Debian's build default (qemu.conf: user = "libvirt-qemu")
# host path -> directory under the daemon's root bind-mounted over it
PRIVATE_DIRS = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/log/libvirt": "log",
    "/var/cache/libvirt": "cache",
}
START_TIMEOUT = 90.0    # the first connection makes libvirtd probe QEMU: 4-12 s on a busy host
STOP_TIMEOUT = 15.0
VIRSH_TIMEOUT = 60.0

# Runs as: sh -c MOUNT_SCRIPT sh ROOT KVM_HIDE DRIVER_DIR LIBVIRTD_CONF PIDFILE [LIBVIRTD ARGS...]
# inside `unshare --mount --propagation private`, then becomes libvirtd (same PID).
MOUNT_SCRIPT = """set -e
root=$1 kvm_hide=$2
shift 2
mount --bind "$root/etc" /etc/libvirt
mount --bind "$root/run" /run/libvirt
mount --bind "$root/lib" /var/lib/libvirt
mount --bind "$root/log" /var/log/libvirt
mount --bind "$root/cache" /var/cache/libvirt
if [ -n "$kvm_hide" ]; then mount --bind "$kvm_hide" /dev/kvm; fi
export LIBVIRT_DRIVER_DIR="$1"
conf=$2 pidfile=$3
shift 3
exec libvirtd -f "$conf" -p "$pidfile" "$@"
"""


class LibvirtUnavailable(RuntimeError):
    """libvirtd cannot run on this host; the message says why (a test skips with it)."""


class LibvirtError(RuntimeError):
    """libvirtd or virsh failed although everything it needs is there."""


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _groups_of(user: str) -> tuple[int, set[int]]:
    pw = pwd.getpwnam(user)
    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    return pw.pw_uid, gids


def reachable_by(path: Path, uid: int, gids: set[int]) -> bool:
    """Whether ``uid`` (with groups ``gids``) may search ``path`` and every directory above."""
    path = Path(path).absolute()
    for parent in [*reversed(path.parents), path]:
        st = parent.stat()
        if uid == st.st_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if uid != 0 and not st.st_mode & bit:
            return False
    return True


def _accessible_rw(path: Path, uid: int, gids: set[int]) -> bool:
    st = path.stat()
    if uid == 0:
        return True
    if uid == st.st_uid:
        need = stat.S_IRUSR | stat.S_IWUSR
    elif st.st_gid in gids:
        need = stat.S_IRGRP | stat.S_IWGRP
    else:
        need = stat.S_IROTH | stat.S_IWOTH
    return st.st_mode & need == need


class LibvirtDaemon:
    """A libvirtd of our own. ``start()``, then ``virsh(...)``; ``stop()`` destroys and
    undefines every domain, stops the daemon by PID and kills any QEMU it left behind."""

    def __init__(
        self,
        tmpdir: Path,
        *,
        qemu_user: str = DEFAULT_QEMU_USER,
        qemu_group: str | None = None,
        start_timeout: float = START_TIMEOUT,
        log_level: int = 3,
        idle_timeout: int | None = None,
        extra_qemu_conf: Sequence[str] = (),
    ) -> None:
        """``tmpdir``: the daemon's root (configs, state, logs, client socket); keep it short,
        UNIX socket paths are limited to 107 bytes. ``qemu_user``/``qemu_group``: qemu.conf's
        user/group. ``log_level``: libvirtd's log level (1 debug .. 4 error) for
        ``tmpdir/libvirtd.log``. ``idle_timeout``: libvirtd exits on its own after this many
        seconds without clients or running domains (a safety net should the test runner
        die; mind pauses between tests). ``extra_qemu_conf``: more qemu.conf lines."""
        self.root = Path(tmpdir)
        self.qemu_user = qemu_user
        self.qemu_group = qemu_group
        self.start_timeout = start_timeout
        self.log_level = log_level
        self.idle_timeout = idle_timeout
        self.extra_qemu_conf = list(extra_qemu_conf)
        self.process: subprocess.Popen[bytes] | None = None
        self._shared: Path | None = None     # guest_dir()'s parent, when made outside tmpdir

    # ------------------------------------------------------------------ paths

    @property
    def socket(self) -> Path:
        return self.root / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def log_path(self) -> Path:
        """libvirtd's own log (errors and warnings unless ``log_level`` says otherwise)."""
        return self.root / "libvirtd.log"

    def qemu_log_path(self, domain: str) -> Path:
        """QEMU's command line and stderr for ``domain`` (libvirt's /var/log/libvirt/qemu)."""
        return self.root / "log" / "qemu" / f"{domain}.log"

    def qemu_pid(self, domain: str) -> int | None:
        """The PID of ``domain``'s QEMU while it runs (libvirt's /run/libvirt/qemu pid file)."""
        try:
            return int((self.root / "run" / "qemu" / f"{domain}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def guest_dir(self, name: str) -> Path:
        """A new directory, mode 0755, that the QEMU user can reach: for the vhost-user socket,
        the kernel and the initrd. It is ``tmpdir/guests/NAME`` when the QEMU user may search
        every directory above ``tmpdir`` (pytest's /tmp/pytest-of-root is 0700, so usually
        not), else under a temporary directory in /tmp that :meth:`stop` removes."""
        base = self.root / "guests"
        uid, gids = _groups_of(self.qemu_user)
        if not reachable_by(self.root, uid, gids):
            if self._shared is None:
                self._shared = Path(tempfile.mkdtemp(prefix="dp-libvirt-", dir="/tmp"))
                self._shared.chmod(0o755)
            base = self._shared
        base.mkdir(mode=0o755, exist_ok=True)
        path = base / name
        path.mkdir(mode=0o755)
        path.chmod(0o755)   # whatever the umask
        return path

    # ------------------------------------------------------------------ start

    def _check_prerequisites(self) -> None:
        if os.geteuid() != 0:
            raise LibvirtUnavailable("a system-mode libvirtd (QEMU as libvirt-qemu) needs root")
        for program, package in ((LIBVIRTD, "libvirt-daemon-system"), (VIRSH, "libvirt-clients"),
                                 (UNSHARE, "util-linux"), (QEMU_BINARY, "qemu-system-x86")):
            if shutil.which(program) is None:
                raise LibvirtUnavailable(f"{program} is not installed (apt-get install {package})")
        if not (DRIVER_DIR / QEMU_DRIVER).is_file():
            raise LibvirtUnavailable(f"{DRIVER_DIR / QEMU_DRIVER} missing"
                                     " (apt-get install libvirt-daemon-driver-qemu)")
        try:
            pwd.getpwnam(self.qemu_user)
        except KeyError:
            raise LibvirtUnavailable(f"user {self.qemu_user!r} does not exist"
                                     " (created by libvirt-daemon-system)") from None
        probe = subprocess.run([UNSHARE, "--mount", "--propagation", "private", "true"],
                               capture_output=True, text=True, timeout=10, check=False)
        if probe.returncode != 0:
            raise LibvirtUnavailable("cannot make a private mount namespace (unshare --mount):"
                                     f" {probe.stderr.strip()}")

    def _kvm_hide(self) -> str:
        """libvirt probes QEMU as root but checks /dev/kvm as the QEMU user: when the two
        disagree (no udev rule making /dev/kvm root:kvm 0660) it throws the capabilities away
        and probes again on every call (~4 s each). Hiding /dev/kvm behind an empty root-only
        file makes both say "no KVM": the domain is TCG anyway."""
        kvm = Path("/dev/kvm")
        if not kvm.exists():
            return ""
        uid, gids = _groups_of(self.qemu_user)
        if _accessible_rw(kvm, uid, gids):
            return ""
        hide = self.root / "kvm-hidden"
        hide.touch(mode=0o600)
        return str(hide)

    def _write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in (*PRIVATE_DIRS.values(), "sock", "drivers"):
            (self.root / sub).mkdir(mode=0o755, exist_ok=True)
        driver = self.root / "drivers" / QEMU_DRIVER
        if not driver.is_symlink():
            driver.symlink_to(DRIVER_DIR / QEMU_DRIVER)   # load the QEMU driver and no other
        (self.root / "libvirtd.conf").write_text("\n".join([
            f"unix_sock_dir = {_quote(str(self.socket.parent))}",
            'unix_sock_rw_perms = "0700"',
            'unix_sock_ro_perms = "0700"',
            'unix_sock_admin_perms = "0700"',
            'auth_unix_rw = "none"',
            'auth_unix_ro = "none"',
            f"log_outputs = {_quote(f'{self.log_level}:file:{self.log_path}')}",
            "",
        ]))
        qemu_conf = [
            f"user = {_quote(self.qemu_user)}",
            # No virtlogd (nothing socket-activates it without systemd): QEMU's stderr goes
            # straight to /var/log/libvirt/qemu/NAME.log.
            'stdio_handler = "file"',
            # No cgroups: libvirt would otherwise make /sys/fs/cgroup/*/machine on the host.
            "cgroup_controllers = [ ]",
            # No per-domain /dev namespace: with /dev/kvm hidden by a bind mount (_kvm_hide)
            # libvirt fails to move that mount into it ("Unable to move ... mount to /dev/kvm").
            "namespaces = [ ]",
        ]
        if self.qemu_group is not None:
            qemu_conf.append(f"group = {_quote(self.qemu_group)}")
        qemu_conf.extend(self.extra_qemu_conf)
        (self.root / "etc" / "qemu.conf").write_text("\n".join(qemu_conf) + "\n")

    def start(self) -> Self:
        """Start libvirtd and wait (bounded) until ``virsh version`` answers."""
        if self.process is not None:
            raise LibvirtError("already started")
        self._check_prerequisites()
        self._write_config()
        for target in PRIVATE_DIRS:
            # Mount points; the package makes all but /run/libvirt (systemd-tmpfiles would).
            Path(target).mkdir(mode=0o755, parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIBVIRT")}
        cmd = [UNSHARE, "--mount", "--propagation", "private", "--", "sh", "-c", MOUNT_SCRIPT,
               "sh", str(self.root), self._kvm_hide(), str(self.root / "drivers"),
               str(self.root / "libvirtd.conf"), str(self.root / "libvirtd.pid")]
        if self.idle_timeout is not None:
            cmd += ["--timeout", str(self.idle_timeout)]
        with open(self.root / "libvirtd.stdout", "wb") as out:
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while True:
            if self.process.poll() is not None:
                raise LibvirtError(f"libvirtd exited with status {self.process.returncode}"
                                   f" before answering:\n{self.log_tail()}")
            if self.socket.exists():
                left = max(1.0, deadline - time.monotonic())
                try:
                    proc = self.virsh("version", check=False, timeout=left)
                except LibvirtError as exc:
                    last = str(exc)
                else:
                    if proc.returncode == 0 and "Running hypervisor: QEMU" in proc.stdout:
                        return
                    last = (proc.stdout + proc.stderr).strip()
            if time.monotonic() > deadline:
                raise LibvirtError(f"libvirtd did not answer within {self.start_timeout:.0f}s"
                                   f" (last: {last or 'no socket'}):\n{self.log_tail()}")
            time.sleep(0.1)

    # ------------------------------------------------------------------ use

    def virsh(self, *args: str, timeout: float = VIRSH_TIMEOUT,
              check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``virsh -c URI ARGS...`` (bounded by ``timeout``); with ``check`` a failure
        raises LibvirtError carrying virsh's message."""
        cmd = [VIRSH, "-c", self.uri, *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIBVIRT")}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, env=env, check=False)
        except subprocess.TimeoutExpired:
            raise LibvirtError(f"{' '.join(cmd)} did not finish within {timeout:.0f}s") from None
        if check and proc.returncode != 0:
            raise LibvirtError(f"virsh {' '.join(args)} failed ({proc.returncode}):"
                               f" {proc.stderr.strip()}")
        return proc

    def define(self, xml: str, path: Path) -> str:
        """Write ``xml`` to ``path``, define it; returns the domain name virsh reported."""
        path.write_text(xml)
        out = self.virsh("define", str(path)).stdout
        # "Domain 'NAME' defined from PATH"
        return out.split("'")[1] if out.count("'") >= 2 else out.strip()

    def domstate(self, domain: str) -> str:
        return self.virsh("domstate", domain).stdout.strip()

    def wait_state(self, domain: str, state: str, timeout: float) -> bool:
        """Poll ``virsh domstate`` until it says ``state`` (e.g. "shut off"); False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self.domstate(domain) == state:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)

    def domains(self) -> list[str]:
        out = self.virsh("list", "--all", "--name").stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def remove_domain(self, domain: str) -> None:
        """Destroy (if running) and undefine ``domain``."""
        if self.domstate(domain) != "shut off":
            self.virsh("destroy", domain, check=False)
        self.virsh("undefine", domain)

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for path in (self.root / "libvirtd.stdout", self.log_path):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ stop

    def _qemu_pids(self) -> list[int]:
        pids = []
        for pidfile in (self.root / "run" / "qemu").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                # only a QEMU of this daemon: libvirt names it guest=NAME after the pid file
                if cmdline and cmdline[0].endswith(QEMU_BINARY.encode()) and any(
                        arg.startswith(b"guest=" + pidfile.stem.encode()) for arg in cmdline):
                    pids.append(pid)
        return pids

    def stop(self) -> None:
        """Destroy and undefine every domain, SIGTERM libvirtd (SIGKILL after STOP_TIMEOUT),
        kill any QEMU of ours still running. Idempotent."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(LibvirtError):
                for domain in self.domains():
                    with contextlib.suppress(LibvirtError):
                        self.remove_domain(domain)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self._qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._shared is not None:
            shutil.rmtree(self._shared, ignore_errors=True)
            self._shared = None
        self.process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
