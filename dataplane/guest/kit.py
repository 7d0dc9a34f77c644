"""Build and boot a tiny Linux test guest under QEMU (TCG) with a vhost-user-blk disk.

The guest (Debian kernel + busybox/fio/e2fsprogs/blktrace initramfs) is built once and
cached; each boot runs a shell script inside the guest and reports its exit status.

A boot may also get a scratch disk (`scratch=PATH`: a raw file the guest sees as the virtio-blk
disk whose path is in $DP_SCRATCH, QEMU's own device, not the one under test) to carry files
out: the guest's own blktrace of /dev/vda (BLKTRACE_START / BLKTRACE_STOP below, the kernel
traces on debugfs, written to the guest's tmpfs, then a tar on the scratch disk) comes back
with `read_scratch`.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Required, Self, TextIO, TypedDict, Unpack

log = logging.getLogger("dataplane.guest")

BUILDER_VERSION = "1"
KERNEL_META_PACKAGE = "linux-image-amd64"
EXIT_MARKER = "DP-GUEST-EXIT"
WARN_MARKER = "DP-GUEST-WARN"
QEMU_BINARY = "qemu-system-x86_64"

# Modules we need; their dependencies are resolved from modules.dep / modules.softdep.
# crc32c_generic comes first because jbd2/ext4 ask the crypto API for "crc32c" at mount.
MODULE_ROOTS: tuple[str, ...] = ("crc32c_generic", "virtio_pci", "virtio_blk", "ext4")
# Host binaries copied into the guest (guest name -> host program name).
REQUIRED_BINARIES: dict[str, str] = {
    "fio": "fio",
    "mke2fs": "mke2fs",
    "e2fsck": "e2fsck",
    "blkdiscard": "blkdiscard",
    "blockdev": "blockdev",
    "blktrace": "blktrace",
}
OPTIONAL_BINARIES: dict[str, str] = {
    "blkparse": "blkparse",
    "dumpe2fs": "dumpe2fs",
    "tune2fs": "tune2fs",
    "lsblk": "lsblk",
}
GUEST_ALIASES: dict[str, str] = {
    "mkfs.ext4": "mke2fs",
    "mkfs.ext2": "mke2fs",
    "fsck.ext4": "e2fsck",
}
SCRATCH_SERIAL = "dp-scratch"


def blktrace_start(outdir: str = "/tmp/bt", device: str = "vda") -> str:
    """Guest shell: trace /dev/DEVICE from the guest's block layer into OUTDIR (one file per
    CPU, DEVICE.blktrace.N, on the guest's tmpfs) until blktrace_stop in the same script.

    blktrace 1.2 opens its files, one thread per CPU, before it starts the kernel's trace
    (BLKTRACESTART, once every thread has its file): a file that exists does not mean events
    are recorded yet, and I/O in that window is lost (seen: a write traced as nothing but the
    start's own time note). So this waits for every CPU's file, then a second more for the
    start to follow (under TCG on a loaded host the threads run late)."""
    files = f"$(ls {outdir} 2>/dev/null | grep -c '^{device}\\.blktrace\\.')"
    return f"""mkdir -p {outdir}
blktrace -d /dev/{device} -D {outdir} -o {device} > {outdir}.log 2>&1 &
DP_BT_PID=$!
DP_BT_CPUS=$(grep -c ^processor /proc/cpuinfo)
i=0; while [ "{files}" -lt "$DP_BT_CPUS" ] && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ "{files}" -lt "$DP_BT_CPUS" ]; then echo "{WARN_MARKER} blktrace did not start"; cat {outdir}.log; fi
sleep 1
"""


def blktrace_stop(outdir: str = "/tmp/bt", tar: bool = True) -> str:
    """Guest shell: stop blktrace_start's trace (SIGINT: blktrace writes out what it holds; its
    threads poll the kernel's per-CPU buffers every 500 ms, and stopped sooner than that after
    the last I/O, blktrace 1.2 may leave a CPU's last events behind: hence the wait first), and
    with tar put OUTDIR's files on the scratch disk (read_scratch reads them back)."""
    out = f"""sleep 1; kill -INT $DP_BT_PID; wait $DP_BT_PID
sed 's/^/DP-BLKTRACE /' {outdir}.log
"""
    if tar:
        out += f'tar -cf "$DP_SCRATCH" -C {outdir} . && sync\n'
    return out


BLKTRACE_START = blktrace_start()
BLKTRACE_STOP = blktrace_stop()
BUSYBOX = Path("/bin/busybox")
_SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_EXIT_RE = re.compile(rf"{EXIT_MARKER} (-?\d+)")

INIT_SCRIPT = f"""#!/bin/sh
echo  # end the firmware's unterminated "Booting from ROM.." console line
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
while read -r mod; do
    insmod "/lib/modules/dp/$mod.ko" || echo "{WARN_MARKER} insmod $mod failed"
done < /etc/dp-modules
case " $(cat /proc/cmdline) " in
    *" dpguest.disk=1 "*)
        i=0
        while [ ! -b /dev/vda ] && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
        [ -b /dev/vda ] || echo "{WARN_MARKER} /dev/vda did not appear"
        ;;
esac
case " $(cat /proc/cmdline) " in
    *" dpguest.scratch=1 "*)
        i=0
        while [ -z "$DP_SCRATCH" ] && [ "$i" -lt 100 ]; do
            for d in /sys/block/vd*; do
                [ "$(cat "$d/serial" 2>/dev/null)" = "{SCRATCH_SERIAL}" ] && export DP_SCRATCH=/dev/${{d##*/}}
            done
            [ -n "$DP_SCRATCH" ] || sleep 0.1
            i=$((i + 1))
        done
        [ -n "$DP_SCRATCH" ] || echo "{WARN_MARKER} the scratch disk did not appear"
        ;;
esac
cd /
if [ -f /test.sh ]; then
    sh /test.sh < /dev/null
    rc=$?
else
    echo "{WARN_MARKER} /test.sh missing"
    rc=127
fi
sync
echo "{EXIT_MARKER} $rc"
poweroff -f
echo o > /proc/sysrq-trigger
"""


class GuestError(RuntimeError):
    """The guest image could not be built or the guest could not be started."""


class GuestTimeout(Exception):
    """The guest did not power off in time; QEMU was killed."""

    def __init__(self, message: str, output: str, duration: float) -> None:
        super().__init__(message)
        self.output = output
        self.duration = duration

    @property
    def exit_status(self) -> int | None:
        return _parse_exit(self.output)


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initramfs: Path
    kernel_version: str


@dataclass
class GuestResult:
    exit_status: int | None
    output: str
    duration: float
    qemu_returncode: int | None = None

    def markers(self, prefix: str) -> list[str]:
        """Console lines that start with ``prefix`` (trailing whitespace stripped)."""
        return [line.rstrip() for line in self.output.splitlines() if line.startswith(prefix)]


# --------------------------------------------------------------------------- cpio


class CpioWriter:
    """Minimal writer for the "newc" cpio format the kernel unpacks as initramfs."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1000
        self._dirs: set[str] = {""}

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name_b = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        size, (rmajor, rminor) = len(data), rdev
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        fields = (self._ino, mode, 0, 0, nlink, 0, size, 0, 0, rmajor, rminor, len(name_b), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._out.write(header + name_b + b"\0" * (-(len(header) + len(name_b)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def _parents(self, name: str) -> str:
        name = name.strip("/")
        parent = os.path.dirname(name)
        if parent not in self._dirs:
            self.directory(parent)
        return name

    def directory(self, name: str, mode: int = 0o755) -> None:
        name = self._parents(name)
        if name not in self._dirs:
            self._dirs.add(name)
            self._entry(name, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(self._parents(name), stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(self._parents(name), stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(self._parents(name), stat.S_IFCHR | mode, rdev=(major, minor))

    def trailer(self) -> None:
        self._entry("TRAILER!!!", 0)
        self._out.write(b"\0" * (-self._out.tell() % 512))


def script_archive(script: str) -> bytes:
    """An uncompressed newc archive holding just ``/test.sh``."""
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    writer.file("test.sh", script.encode(), 0o755)
    writer.trailer()
    return buf.getvalue()


# --------------------------------------------------------------------------- host lookups


def _run(
    cmd: Sequence[str], *, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    log.debug("running %.300s", " ".join(map(str, cmd)))
    proc = subprocess.run(list(map(str, cmd)), check=False, cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise GuestError(
            f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


def _apt_opts() -> list[str]:
    # Downloading into a root-owned dir as root otherwise warns about the _apt sandbox.
    return ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []


def _kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel image that ``linux-image-amd64`` depends on."""

    def lookup() -> tuple[str, str] | None:
        proc = _run(["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE], check=False)
        match = re.search(
            r"^Depends:.*?(linux-image-\S+)\s*\(=\s*([^)\s]+)\)", proc.stdout, re.MULTILINE
        )
        return (match.group(1), match.group(2)) if proc.returncode == 0 and match else None

    found = lookup()
    if found is None:
        log.info("kernel lookup failed; running apt-get update")
        _run(["apt-get", "update"], check=False)
        found = lookup()
    if found is None:
        raise GuestError(
            f"cannot find which kernel {KERNEL_META_PACKAGE} depends on (apt-cache show)"
        )
    return found


def _which(program: str) -> str | None:
    return shutil.which(program, path=os.environ.get("PATH", "") + ":" + _SEARCH_PATH)


def _shared_libs(binary: str) -> list[str]:
    proc = _run(["ldd", binary], check=False)
    if proc.returncode != 0:
        if "not a dynamic executable" in proc.stdout + proc.stderr:
            return []
        raise GuestError(f"ldd {binary} failed: {proc.stderr.strip()}")
    libs: list[str] = []
    for line in proc.stdout.splitlines():
        if "not found" in line:
            raise GuestError(f"{binary}: missing shared library: {line.strip()}")
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            libs.append(match.group(1))
    return libs


def _package_versions(paths: Iterable[str]) -> dict[str, str]:
    """Versions of the dpkg packages owning ``paths`` (unowned files: size/mtime)."""
    candidates: dict[str, str] = {}
    for path in paths:
        real = os.path.realpath(path)
        for cand in {path, real}:
            candidates[cand] = path
            if cand.startswith("/usr/"):
                candidates[cand[4:]] = path
            else:
                candidates["/usr" + cand] = path
    proc = _run(["dpkg-query", "-S", *sorted(candidates)], check=False)
    owners: dict[str, set[str]] = {}
    for line in proc.stdout.splitlines():
        pkgs, _, owned = line.partition(": ")
        if owned in candidates:
            owners.setdefault(candidates[owned], set()).update(p.strip() for p in pkgs.split(","))
    versions: dict[str, str] = {}
    packages = sorted({p for pkgs in owners.values() for p in pkgs})
    if packages:
        proc = _run(
            ["dpkg-query", "-W", "-f", "${Package}:${Architecture} ${Version}\\n", *packages],
            check=False,
        )
        for line in proc.stdout.splitlines():
            name, _, version = line.partition(" ")
            versions[name.removesuffix(":amd64").removesuffix(":all")] = version
    for path in set(candidates.values()) - set(owners):
        st = os.stat(path)
        versions[f"file:{path}"] = f"{st.st_size}:{st.st_mtime_ns}"
    return versions


@dataclass
class _Plan:
    kernel_package: str
    kernel_package_version: str
    binaries: dict[str, str]
    libs: list[str]
    versions: dict[str, str]

    @property
    def kernel_release(self) -> str:
        return self.kernel_package.removeprefix("linux-image-")

    @property
    def key(self) -> str:
        # The init script is part of the image: a change to it is a new image.
        blob = json.dumps(
            [BUILDER_VERSION, self.kernel_package, self.kernel_package_version, self.versions,
             hashlib.sha256(INIT_SCRIPT.encode()).hexdigest()],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _host_fingerprint() -> str:
    """Cheap fingerprint of the apt/dpkg state; the plan is re-resolved when it changes."""
    parts = [BUILDER_VERSION, os.environ.get("PATH", "")]
    for path in [Path("/var/lib/dpkg/status"), *sorted(Path("/var/lib/apt/lists").glob("*"))]:
        with contextlib.suppress(OSError):
            st = path.stat()
            parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _resolve_plan(cache_dir: Path) -> _Plan:
    memo = cache_dir / "plan.json"
    fingerprint = _host_fingerprint()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(memo.read_text())
        if data["fingerprint"] == fingerprint:
            return _Plan(**data["plan"])
    pkg, pkg_version = _kernel_package()
    binaries: dict[str, str] = {}
    for guest_name, program in {**REQUIRED_BINARIES, **OPTIONAL_BINARIES}.items():
        path = _which(program)
        if path is None:
            if guest_name in REQUIRED_BINARIES:
                raise GuestError(f"required host binary {program!r} not found")
            log.debug("optional binary %s not installed; skipping", program)
            continue
        binaries[guest_name] = path
    if not BUSYBOX.exists():
        raise GuestError(f"{BUSYBOX} missing (apt-get install busybox-static)")
    libs = sorted({lib for path in binaries.values() for lib in _shared_libs(path)})
    versions = _package_versions([str(BUSYBOX), *binaries.values(), *libs])
    plan = _Plan(pkg, pkg_version, binaries, libs, versions)
    tmp = memo.with_name(f".plan.{os.getpid()}.json")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "plan": plan.__dict__}, indent=1))
    os.replace(tmp, memo)
    return plan


# --------------------------------------------------------------------------- build


def default_cache_dir() -> Path:
    env = os.environ.get("DATAPLANE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dataplane" / "guest"


def _image_from(final: Path) -> GuestImage | None:
    try:
        manifest = json.loads((final / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    image = GuestImage(
        kernel=final / manifest["kernel"],
        initramfs=final / manifest["initramfs"],
        kernel_version=manifest["kernel_version"],
    )
    return image if image.kernel.is_file() and image.initramfs.is_file() else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for guest build lock %s", path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_guest(cache_dir: Path | None = None, *, force: bool = False) -> GuestImage:
    """Return the cached guest image, building it first if needed (or if ``force``)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan = _resolve_plan(cache_dir)
    final = cache_dir / f"guest-{plan.key}"
    if not force and (image := _image_from(final)) is not None:
        return image
    with _locked(cache_dir / ".lock"):
        if not force and (image := _image_from(final)) is not None:
            return image  # someone else built it while we waited
        for stale in [*cache_dir.glob(".build-*"), *cache_dir.glob(".dl-*")]:
            log.info("removing leftovers of an interrupted build: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
        work.chmod(0o755)
        try:
            _build_into(plan, cache_dir, work)
            shutil.rmtree(work / "kernel-root")
            if final.exists():
                old = cache_dir / f".build-old-{os.getpid()}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        log.info("built guest image %s in %.1fs", final, time.monotonic() - started)
    image = _image_from(final)
    if image is None:
        raise GuestError(f"guest build in {final} is incomplete")
    return image


def _download_kernel(plan: _Plan, cache_dir: Path) -> Path:
    debs = cache_dir / "debs"
    debs.mkdir(exist_ok=True)
    name = f"{plan.kernel_package}_{plan.kernel_package_version.replace(':', '%3a')}_amd64.deb"
    deb = debs / name
    if deb.is_file():
        return deb
    spec = f"{plan.kernel_package}={plan.kernel_package_version}"
    with tempfile.TemporaryDirectory(prefix=".dl-", dir=cache_dir) as tmp:
        log.info("downloading %s", spec)
        proc = _run(["apt-get", *_apt_opts(), "download", spec], cwd=Path(tmp), check=False)
        if proc.returncode != 0:
            log.info("apt-get download failed (%s); running apt-get update", proc.stderr.strip())
            _run(["apt-get", "update"], check=False)
            _run(["apt-get", *_apt_opts(), "download", spec], cwd=Path(tmp))
        got = sorted(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise GuestError(f"apt-get download {spec} produced {got}")
        os.replace(got[0], deb)
    return deb


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data


def _mod_name(path: str) -> str:
    return re.sub(r"\.ko(\.\w+)?$", "", os.path.basename(path)).replace("-", "_")


def _module_order(moddir: Path, roots: Sequence[str]) -> list[tuple[str, Path]]:
    """Load order (dependencies first) for ``roots``, from modules.dep and modules.softdep."""
    if not (moddir / "modules.dep").is_file():
        release = moddir.name
        _run(["depmod", "-b", str(moddir.parent.parent.parent), release])
    deps: dict[str, list[str]] = {}
    files: dict[str, Path] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        name = _mod_name(mod)
        files[name] = moddir / mod
        deps[name] = [_mod_name(d) for d in rest.split()]
    aliases: dict[str, list[str]] = {}
    with contextlib.suppress(OSError):
        for line in (moddir / "modules.alias").read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "alias":
                aliases.setdefault(parts[1], []).append(parts[2].replace("-", "_"))
    softdeps: dict[str, list[str]] = {}
    with contextlib.suppress(OSError):
        for line in (moddir / "modules.softdep").read_text().splitlines():
            match = re.match(r"softdep\s+(\S+)\s+pre:\s*(.*?)(?:\s+post:.*)?$", line)
            if match:
                softdeps[match.group(1).replace("-", "_")] = match.group(2).split()

    def resolve_soft(name: str) -> str | None:
        if name.replace("-", "_") in files:
            return name.replace("-", "_")
        options = [m for m in aliases.get(name, []) if m in files]
        generic = [m for m in options if m.endswith("_generic")]  # always works under TCG
        return next(iter(generic or options), None)

    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...] = ()) -> None:
        if name in order or name in chain:
            return
        for soft in softdeps.get(name, []):
            if (resolved := resolve_soft(soft)) is not None:
                visit(resolved, (*chain, name))
        for dep in reversed(deps[name]):  # modules.dep lists the deepest dependency last
            visit(dep, (*chain, name))
        order.append(name)

    for root in roots:
        if root not in files:
            raise GuestError(f"kernel module {root} not found in {moddir} (built in?)")
        visit(root)
    return [(name, files[name]) for name in order]


def _install_kernel(vmlinuz: Path, config: Path, work: Path) -> Path:
    """Copy the kernel into ``work``, preferring an uncompressed PVH-bootable vmlinux.

    QEMU boots an ELF vmlinux with a PVH entry point directly, which skips the
    (slow under TCG) bzImage self-decompression: ~3 s less per boot.
    """
    try:
        pvh = "CONFIG_PVH=y" in config.read_text().splitlines()
    except OSError:
        pvh = False
    if pvh:
        data = vmlinuz.read_bytes()
        for magic, make in (
            (b"\xfd7zXZ\x00", lzma.LZMADecompressor),
            (b"\x1f\x8b\x08", _gzip_decompressor),
        ):
            offset = data.find(magic)
            if offset < 0:
                continue
            try:
                elf = make().decompress(data[offset:])
            except (lzma.LZMAError, zlib.error, EOFError):
                continue
            if elf.startswith(b"\x7fELF"):
                out = work / vmlinuz.name.replace("vmlinuz", "vmlinux", 1)
                out.write_bytes(elf)
                return out
        log.warning("could not extract vmlinux from %s; booting the bzImage (slower)", vmlinuz.name)
    out = work / vmlinuz.name
    shutil.copy2(vmlinuz, out)
    return out


def _gzip_decompressor() -> zlib._Decompress:
    return zlib.decompressobj(16 + zlib.MAX_WBITS)


def _build_into(plan: _Plan, cache_dir: Path, work: Path) -> None:
    deb = _download_kernel(plan, cache_dir)
    root = work / "kernel-root"
    log.info("extracting %s", deb.name)
    _run(["dpkg-deb", "-x", str(deb), str(root)])
    release = plan.kernel_release
    vmlinuz = root / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.is_file():
        raise GuestError(f"{vmlinuz} not in {deb.name}")
    moddir = next(
        p
        for p in [root / "lib/modules" / release, root / "usr/lib/modules" / release]
        if p.is_dir()
    )
    modules = _module_order(moddir, MODULE_ROOTS)
    log.info("module load order: %s", " ".join(name for name, _ in modules))
    kernel = _install_kernel(vmlinuz, root / "boot" / f"config-{release}", work)

    # Uncompressed on purpose: gunzip of ~40 MB under TCG costs ~1.3 s per boot.
    initramfs = work / "initramfs.cpio"
    with open(initramfs, "wb") as raw:
        writer = CpioWriter(raw)
        for d in (
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "lib64",
            "dev",
            "proc",
            "sys",
            "tmp",
            "root",
            "run",
            "mnt",
            "etc",
            "lib/modules/dp",
        ):
            writer.directory(d)
        writer.chardev("dev/console", 5, 1)
        writer.chardev("dev/null", 1, 3, 0o666)
        writer.file("init", INIT_SCRIPT.encode(), 0o755)
        writer.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
        applets = _run([str(BUSYBOX), "--list"]).stdout.split()
        real = set(plan.binaries) | set(GUEST_ALIASES)
        for applet in applets:
            if applet not in real and applet != "busybox":
                writer.symlink(f"bin/{applet}", "busybox")
        for guest_name, host_path in sorted(plan.binaries.items()):
            writer.file(f"bin/{guest_name}", Path(host_path).read_bytes(), 0o755)
        for alias, target in GUEST_ALIASES.items():
            if target in plan.binaries:
                writer.symlink(f"bin/{alias}", target)
        for lib in plan.libs:
            writer.file(lib, Path(lib).read_bytes(), 0o755)
        for conf in ("/etc/mke2fs.conf",):
            if os.path.isfile(conf):
                writer.file(conf, Path(conf).read_bytes())
        writer.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        writer.file("etc/group", b"root:x:0:\n")
        for name, path in modules:
            writer.file(f"lib/modules/dp/{name}.ko", _read_module(path))
        writer.file("etc/dp-modules", "".join(f"{name}\n" for name, _ in modules).encode())
        writer.trailer()
    manifest = {
        "key": plan.key,
        "kernel": kernel.name,
        "initramfs": initramfs.name,
        "kernel_version": release,
        "kernel_package": f"{plan.kernel_package}={plan.kernel_package_version}",
        "modules": [name for name, _ in modules],
        "binaries": plan.binaries,
        "versions": plan.versions,
        "initramfs_bytes": initramfs.stat().st_size,
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log.info("initramfs %s: %.1f MB", initramfs, initramfs.stat().st_size / 1e6)


# --------------------------------------------------------------------------- run


def _parse_exit(output: str) -> int | None:
    matches = _EXIT_RE.findall(output)
    return int(matches[-1]) if matches else None


def qemu_command(
    image: GuestImage,
    initrd: Path,
    *,
    socket: Path | None,
    num_queues: int = 2,
    smp: int = 2,
    memory_mb: int = 1024,
    queue_size: int = 128,
    packed: bool = False,
    kernel_args: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    scratch: Path | None = None,
    memory_slots: int = 0,
    max_memory_mb: int = 0,
    memory_kb: int = 0,
    iommu: bool = False,
) -> list[str]:
    """The QEMU argv used to boot ``image`` (exposed for debugging and tests); ``packed``:
    the disk's virtqueues are packed rings (``packed=on``). ``scratch``: a raw file the guest
    gets as a second (QEMU virtio-blk) disk, its device in $DP_SCRATCH. memory_slots and
    max_memory_mb make room for hot-plugged DIMMs (`-m SIZE,slots=N,maxmem=MAX`); memory_kb,
    when set, is the RAM size in KiB instead of memory_mb.

    ``iommu``: the disk behind QEMU's virtual IOMMU, as QEMU 7.2 needs it under TCG: a q35
    machine, ``intel-iommu`` (interrupt remapping, device IOTLB) before the device, the device
    behind a PCIe root port (on pcie.0 a virtio device is transitional, which refuses
    iommu_platform, and ats=on would be ignored) with ``iommu_platform=on,ats=on``, and
    ``intel_iommu=on`` for the guest kernel (the Debian kernel leaves it off). ATS with a
    device IOTLB is what makes QEMU send the backend invalidations at all when the guest is in
    its default lazy mode; add ``iommu.strict=1`` to kernel_args for one per unmap."""
    size = f"{memory_kb}K" if memory_kb else f"{memory_mb}M"
    append = ["console=ttyS0", "quiet", "panic=-1"]
    if socket is not None:
        append.append("dpguest.disk=1")
    if scratch is not None:
        append.append("dpguest.scratch=1")
    if iommu:
        append.append("intel_iommu=on")
    append.extend(kernel_args)
    cmd = [
        QEMU_BINARY,
        *(["-machine", "q35"] if iommu else []),
        "-accel", "tcg,thread=multi",
        "-cpu", "max",
        "-smp", str(smp),
        "-m", size + (f",slots={memory_slots},maxmem={max_memory_mb or 2 * memory_mb}M"
                      if memory_slots else ""),
        "-object", f"memory-backend-memfd,id=mem,size={size},share=on",
        "-numa", "node,memdev=mem",
        "-nographic", "-nodefaults",
        "-serial", "stdio",
        "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(initrd),
        "-append", " ".join(append),
    ]  # fmt: skip
    if socket is not None:
        if iommu:
            cmd += [
                "-device", "intel-iommu,intremap=on,device-iotlb=on",
                "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
            ]  # fmt: skip
        cmd += [
            "-chardev", f"socket,id=vub0,path={socket}",
            "-device", (
                "vhost-user-blk-pci,chardev=vub0"
                f",num-queues={num_queues},queue-size={queue_size}"
                + (",packed=on" if packed else "")
                + (",bus=rp1,iommu_platform=on,ats=on" if iommu else "")
            ),
        ]  # fmt: skip
    if scratch is not None:
        # After the disk under test, so that it stays /dev/vda; found by serial in the guest.
        cmd += [
            "-drive", f"file={scratch},format=raw,if=none,id=scratch,cache=unsafe",
            "-device", f"virtio-blk-pci,drive=scratch,serial={SCRATCH_SERIAL}",
        ]  # fmt: skip
    cmd.extend(extra_args)
    return cmd


def make_scratch(path: Path, size: int = 256 << 20) -> Path:
    """A sparse raw file of ``size`` bytes to boot with (``scratch=path``)."""
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def read_scratch(path: Path) -> dict[str, bytes]:
    """The files the guest left on the scratch disk with ``tar -cf $DP_SCRATCH`` (name -> data)."""
    import tarfile

    try:
        with tarfile.open(path, "r:") as tar:
            return {m.name.removeprefix("./"): tar.extractfile(m).read()  # type: ignore[union-attr]
                    for m in tar.getmembers() if m.isfile()}
    except tarfile.TarError as exc:
        raise GuestError(f"no tar archive on the scratch disk {path}: {exc}") from None


class GuestHandle:
    """A running guest. Use :meth:`wait` for the result or :meth:`kill` to stop it."""

    def __init__(
        self,
        cmd: Sequence[str],
        workdir: Path,
        log_path: Path | None = None,
        echo: TextIO | None = None,
    ) -> None:
        self.cmd = list(cmd)
        self._workdir = workdir
        self._chunks: list[str] = []
        self._cond = threading.Condition()
        self._log = open(log_path, "wb") if log_path is not None else None  # noqa: SIM115
        self._echo = echo
        self.started = time.monotonic()
        self._ended: float | None = None
        log.debug("starting guest: %s", " ".join(self.cmd))
        self.process = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(
            target=self._pump, name=f"guest-console-{self.process.pid}", daemon=True
        )
        self._reader.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = self.process.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            text = decoder.decode(chunk, final=not chunk)
            if self._log is not None and chunk:
                self._log.write(chunk)
                self._log.flush()
            if self._echo is not None and text:
                self._echo.write(text.replace("\r\n", "\n"))
                self._echo.flush()
            with self._cond:
                self._chunks.append(text)
                self._cond.notify_all()
            if not chunk:
                break

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def output(self) -> str:
        """Console text so far (``\\r\\n`` normalised)."""
        with self._cond:
            return "".join(self._chunks).replace("\r\n", "\n")

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_for_output(self, text: str, timeout: float) -> bool:
        """Block until ``text`` appears on the console; False on timeout or guest exit."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if text in "".join(self._chunks).replace("\r\n", "\n"):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._reader.is_alive():
                    return False
                self._cond.wait(min(remaining, 0.5))

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait for QEMU to exit; on timeout kill it and raise :class:`GuestTimeout`."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            output = self.output
            raise GuestTimeout(
                f"guest did not finish within {timeout}s; last output:\n{output[-2000:]}",
                output,
                time.monotonic() - self.started,
            ) from None
        self._finish()
        output = self.output
        result = GuestResult(_parse_exit(output), output, self._duration(), self.process.returncode)
        log.debug(
            "guest exited (qemu rc %s, status %s) after %.1fs",
            result.qemu_returncode,
            result.exit_status,
            result.duration,
        )
        return result

    def _duration(self) -> float:
        return (self._ended or time.monotonic()) - self.started

    def kill(self) -> None:
        """Kill QEMU (idempotent) and release resources."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._finish()

    def _finish(self) -> None:
        if self._ended is None:
            self._ended = time.monotonic()
        self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class BootOptions(TypedDict, total=False):
    """How to boot the guest: qemu_command's keywords, with its defaults."""

    socket: Required[Path | None]
    num_queues: int
    smp: int
    memory_mb: int
    queue_size: int
    packed: bool
    kernel_args: Sequence[str]
    extra_args: Sequence[str]
    scratch: Path | None
    memory_slots: int
    max_memory_mb: int
    memory_kb: int
    iommu: bool


def initrd_with_script(image: GuestImage, script: str, out: Path) -> Path:
    """The guest's initramfs with ``script`` as /test.sh, written to ``out``: what QEMU boots
    here and what a libvirt domain's <initrd> points at."""
    with open(out, "wb") as dst, open(image.initramfs, "rb") as base:
        shutil.copyfileobj(base, dst, 1 << 20)
        dst.write(b"\0" * (-dst.tell() % 4))
        dst.write(script_archive(script))
    return out


def start_guest(
    image: GuestImage,
    script: str,
    *,
    log_path: Path | None = None,
    echo: TextIO | None = None,
    **boot: Unpack[BootOptions],
) -> GuestHandle:
    """Boot ``image`` running ``script`` as /test.sh; returns immediately. ``boot``: socket
    (required), num_queues, smp, memory_mb, queue_size, packed, kernel_args, extra_args, iommu
    (see qemu_command)."""
    if shutil.which(QEMU_BINARY) is None:
        raise GuestError(f"{QEMU_BINARY} not installed")
    workdir = Path(tempfile.mkdtemp(prefix="dp-guest-"))
    try:
        initrd = initrd_with_script(image, script, workdir / "initrd.img")
        cmd = qemu_command(image, initrd, **boot)
        return GuestHandle(cmd, workdir, log_path=log_path, echo=echo)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def run_guest(
    image: GuestImage,
    script: str,
    *,
    timeout: float = 300,
    log_path: Path | None = None,
    echo: TextIO | None = None,
    **boot: Unpack[BootOptions],
) -> GuestResult:
    """Boot ``image``, run ``script`` inside it and wait for power-off (GuestTimeout on timeout).
    ``boot``: as start_guest's."""
    with start_guest(image, script, log_path=log_path, echo=echo, **boot) as handle:
        return handle.wait(timeout)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataplane.guest", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    build = sub.add_parser("build", help="build (or reuse) the cached guest image")
    build.add_argument("--force", action="store_true")
    run = sub.add_parser("run", help="boot the guest and run a script inside it")
    run.add_argument("script", type=Path, help="shell script run as /test.sh in the guest")
    run.add_argument("--socket", type=Path, default=None, help="vhost-user-blk backend socket")
    run.add_argument("--queues", type=int, default=2)
    run.add_argument("--queue-size", type=int, default=128)
    run.add_argument("--packed", action="store_true", help="packed virtqueues (packed=on)")
    run.add_argument("--iommu", action="store_true",
                     help="the disk behind intel-iommu (q35, root port, iommu_platform=on,ats=on)")
    run.add_argument("--smp", type=int, default=2)
    run.add_argument("--memory", type=int, default=1024, help="guest RAM in MiB")
    run.add_argument("--timeout", type=float, default=300)
    run.add_argument("--log", type=Path, default=None, help="also write raw console to this file")
    run.add_argument("--append", action="append", default=[], help="extra kernel command line arg")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")

    image = build_guest(args.cache_dir, force=getattr(args, "force", False))
    if args.cmd == "build":
        print(f"kernel: {image.kernel}")
        print(f"initramfs: {image.initramfs}")
        print(f"kernel_version: {image.kernel_version}")
        return 0
    try:
        result = run_guest(
            image, args.script.read_text(), socket=args.socket, num_queues=args.queues,
            queue_size=args.queue_size, packed=args.packed, smp=args.smp, memory_mb=args.memory,
            timeout=args.timeout, iommu=args.iommu,
            kernel_args=args.append, log_path=args.log, echo=sys.stdout,
        )  # fmt: skip
    except GuestTimeout as exc:
        log.error("guest timed out after %.0fs", exc.duration)
        return 124
    log.info("guest exit status %s after %.1fs", result.exit_status, result.duration)
    return result.exit_status if result.exit_status is not None else 125


if __name__ == "__main__":
    sys.exit(main())
