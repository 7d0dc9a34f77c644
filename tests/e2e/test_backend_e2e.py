"""End-to-end tests: a QEMU (TCG) Linux guest drives `dataplane serve` over vhost-user-blk.

Every test gets its own `dataplane serve` process (conftest.backend), parametrized over the
disk kind (a 256 MiB sparse file, or null:256M) and the queue count (1, 2); the guest gets
as many virtqueues as the backend offers. The guest script reports each check on the
console as `DP-CHECK name=NAME ok|FAIL`; the host asserts on those lines, then on the
backend's log (per-queue stop lines) and, for file disks, on the backing file itself (for the
RBD image of the fio and ext4 tests, on what `rbd export` reads).

Guest shell note: busybox ash runs its own applets in preference to $PATH, so the
util-linux/e2fsprogs tools are called by full path (/bin/blkdiscard, /bin/mkfs.ext4, ...).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dataplane.guest import GuestImage, GuestResult, GuestTimeout, run_guest, start_guest

if TYPE_CHECKING:
    from conftest import Backend  # tests/e2e/conftest.py

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

# Overrides of the `backend` fixture's parameters (kind, queues) for one-kind tests.
FILE_BACKEND_PARAMS = [pytest.param(("file", q), id=f"file-q{q}") for q in (1, 2)]
# Disks with content the host can read back: files, and an RBD image (by `rbd export`).
STORED_BACKEND_PARAMS = [*FILE_BACKEND_PARAMS, pytest.param(("rbd", 2), id="rbd-q2")]
NULL_BACKEND_PARAMS = [pytest.param(("null", q), id=f"null-q{q}") for q in (1, 2)]

SECTOR = 512
MiB = 1 << 20
GUEST_TIMEOUT = 150.0        # seconds for one guest run (boot ~4 s under TCG)
DISCONNECT_TIMEOUT = 15.0    # seconds for the backend to log the front end's disconnect
FIO_JOB_STRIDE = 32 * MiB    # job i works on [i * stride, i * stride + size)
FIO_JOB_SIZE = 24 * MiB
FILL_LINE = b"DP-FILL-0123456789abcdef\n"
FILL_MIB = (FILL_LINE * (MiB // len(FILL_LINE) + 1))[:MiB]   # the guest's /tmp/fill

# Shared guest prelude: `check NAME CMD...` reports one result line; the script's exit
# status is the number of failed checks.
PRELUDE = r"""
fails=0
check() {
    name=$1
    shift
    if "$@"; then
        echo "DP-CHECK name=$name ok"
    else
        echo "DP-CHECK name=$name FAIL rc=$?"
        fails=$((fails + 1))
    fi
}
# md5 of COUNT units of BS bytes of /dev/vda at unit SKIP, read with O_DIRECT
disk_md5() { dd if=/dev/vda bs=$1 skip=$2 count=$3 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1; }
zero_md5() { dd if=/dev/zero bs=$1 count=$2 2>/dev/null | md5sum | cut -d' ' -f1; }
same() { [ "$1" = "$2" ] || { echo "DP-DIFF $1 != $2"; return 1; }; }
yes DP-FILL-0123456789abcdef | head -c 1048576 > /tmp/fill
FILL_MD5=$(md5sum < /tmp/fill | cut -d' ' -f1)
ZERO_MIB_MD5=$(zero_md5 1M 1)
# fill_mib FIRST COUNT: write the fill pattern to COUNT MiB starting at MiB FIRST
fill_mib() {
    i=0
    while [ $i -lt $2 ]; do
        dd if=/tmp/fill of=/dev/vda bs=1M seek=$(($1 + i)) count=1 conv=notrunc oflag=direct \
            2>/dev/null || return 1
        i=$((i + 1))
    done
}
# mib_is FIRST COUNT MD5: each MiB in [FIRST, FIRST+COUNT) reads back (O_DIRECT) as MD5
mib_is() {
    i=0
    while [ $i -lt $2 ]; do
        same "$(disk_md5 1M $(($1 + i)) 1)" "$3" || return 1
        i=$((i + 1))
    done
}
"""
EPILOGUE = r"""
echo "DP-DONE fails=$fails"
exit $fails
"""

_CHECK_RE = re.compile(r"^DP-CHECK name=(\S+) (ok|FAIL.*)$")


@dataclass
class Run:
    """A finished guest run, with what is needed for diagnosable assertion messages."""

    result: GuestResult
    backend: Backend

    @property
    def output(self) -> str:
        return self.result.output

    def diag(self) -> str:
        return (f"\n--- guest console (tail) ---\n{self.output[-5000:]}"
                f"\n--- backend log (tail) ---\n{self.backend.log_tail()}")

    def markers(self, prefix: str) -> list[str]:
        return self.result.markers(prefix)

    def checks(self) -> list[tuple[str, str]]:
        out = []
        for line in self.markers("DP-CHECK"):
            m = _CHECK_RE.match(line)
            assert m, f"malformed check line {line!r}{self.diag()}"
            out.append((m.group(1), m.group(2)))
        return out

    def assert_checks(self, expected: list[str]) -> None:
        """Every expected check ran exactly once and passed, and the script finished."""
        checks = self.checks()
        failed = [f"{name}: {status}" for name, status in checks if status != "ok"]
        assert not failed, f"guest checks failed: {failed}{self.diag()}"
        assert sorted(name for name, _ in checks) == sorted(expected), (
            f"guest checks ran: {[n for n, _ in checks]}, expected {expected}{self.diag()}")
        assert self.markers("DP-DONE") == ["DP-DONE fails=0"], f"script incomplete{self.diag()}"
        assert self.result.exit_status == 0, f"guest exit status {self.result.exit_status}" + (
            self.diag())
        warnings = self.markers("DP-GUEST-WARN")
        assert not warnings, f"guest kit warnings {warnings}{self.diag()}"

    def stats(self):
        """Per-queue counters from the backend's stop lines (after the disconnect)."""
        return self.backend.final_queue_stats()


def _finish(backend: Backend, result: GuestResult) -> Run:
    run = Run(result, backend)
    assert backend.wait_for_log("front end disconnected", DISCONNECT_TIMEOUT), (
        f"backend did not log the disconnect within {DISCONNECT_TIMEOUT}s{run.diag()}")
    log = backend.read_log()
    assert log.count("front end connected") == 1, f"expected one connection{run.diag()}"
    return run


def run_script(image: GuestImage, backend: Backend, body: str, tmp_path: Path,
               packed: bool = False) -> Run:
    """Boot the guest against the backend, run PRELUDE + body, wait for the disconnect."""
    try:
        result = run_guest(image, PRELUDE + body + EPILOGUE, socket=backend.socket,
                           num_queues=backend.queues, timeout=GUEST_TIMEOUT, packed=packed,
                           log_path=tmp_path / "console.log")
    except GuestTimeout as exc:
        pytest.fail(f"{exc}\n--- backend log (tail) ---\n{backend.log_tail()}")
    return _finish(backend, result)


def topology_body(backend: Backend) -> tuple[str, list[str]]:
    """Guest checks: one /sys/block/vda/mq/<i> per queue (and no more), size, cpu mapping."""
    n = backend.queues
    lines = [f"check mq-count same \"$(ls /sys/block/vda/mq | wc -l)\" {n}"]
    names = ["mq-count"]
    for i in range(n):
        lines.append(f"check mq{i}-exists test -d /sys/block/vda/mq/{i}")
        lines.append(f"echo \"DP-CPULIST {i} $(cat /sys/block/vda/mq/{i}/cpu_list)\"")
        names.append(f"mq{i}-exists")
    lines.append(f"check mq-no-extra test ! -e /sys/block/vda/mq/{n}")
    lines.append(f"check size same \"$(cat /sys/block/vda/size)\" {backend.disk_size // SECTOR}")
    lines.append(f"check blockdev-size same \"$(/bin/blockdev --getsize64 /dev/vda)\""
                 f" {backend.disk_size}")
    names += ["mq-no-extra", "size", "blockdev-size"]
    return "\n".join(lines) + "\n", names


def expected_cpu_lists(queues: int) -> dict[int, set[int]]:
    # Two vCPUs: with as many queues as CPUs cpu i -> hctx i, with one queue both -> hctx 0.
    return {0: {0, 1}} if queues == 1 else {i: {i} for i in range(queues)}


def _parse_cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in re.split(r"[,\s]+", text.strip()):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        elif part:
            cpus.add(int(part))
    return cpus


def assert_cpu_mapping(run: Run, queues: int) -> None:
    got = {}
    for line in run.markers("DP-CPULIST"):
        _, idx, rest = line.split(" ", 2)
        got[int(idx)] = _parse_cpu_list(rest)
    assert got == expected_cpu_lists(queues), f"blk-mq cpu mapping {got}{run.diag()}"


def fio_jobfile(queues: int, options: dict[str, str]) -> str:
    """One job per queue, job i pinned to the vCPU that maps to hctx i, disjoint regions."""
    glob = {"filename": "/dev/vda", "ioengine": "libaio", "direct": "1", "iodepth": "16",
            "bsrange": "4k-64k", "size": f"{FIO_JOB_SIZE >> 20}m", **options}
    lines = ["[global]", *(f"{k}={v}" for k, v in glob.items())]
    for i in range(queues):
        cpu = min(expected_cpu_lists(queues)[i])
        lines += [f"[q{i}]", f"offset={i * FIO_JOB_STRIDE >> 20}m", f"cpus_allowed={cpu}"]
    return "\n".join(lines) + "\n"


def fio_body(queues: int, options: dict[str, str]) -> str:
    """Run fio in the background, print DP-FIO-RUNNING once its I/O is under way, wait."""
    return f"""
cat > /tmp/job.fio <<'EOF'
{fio_jobfile(queues, options)}EOF
w0=$(awk '{{print $5}}' /sys/block/vda/stat)
fio /tmp/job.fio > /tmp/fio.out 2>&1 &
fpid=$!
i=0
while [ "$(awk '{{print $5}}' /sys/block/vda/stat)" = "$w0" ] && kill -0 $fpid 2>/dev/null \\
        && [ $i -lt 600 ]; do
    sleep 0.02
    i=$((i + 1))
done
check fio-observed-running kill -0 $fpid
echo DP-FIO-RUNNING
wait $fpid
frc=$?
check fio-exit-status same $frc 0
grep -E 'err=|issued rwts' /tmp/fio.out | sed 's/^ */DP-FIO /'
[ $frc -eq 0 ] || tail -n 60 /tmp/fio.out
"""


def run_fio_guest(image: GuestImage, backend: Backend, body: str, tmp_path: Path,
                  packed: bool = False) -> Run:
    """Like run_script, but checks the backend's I/O threads while fio is running."""
    handle = start_guest(image, PRELUDE + body + EPILOGUE, socket=backend.socket,
                         num_queues=backend.queues, packed=packed, log_path=tmp_path / "console.log")
    with handle:
        if not handle.wait_for_output("DP-FIO-RUNNING", GUEST_TIMEOUT):
            handle.kill()
            pytest.fail("guest never reported fio running\n--- guest console (tail) ---\n"
                        f"{handle.output[-5000:]}\n--- backend log ---\n{backend.log_tail()}")
        threads = backend.thread_names()
        guest_running = handle.running()
        try:
            result = handle.wait(GUEST_TIMEOUT)
        except GuestTimeout as exc:
            pytest.fail(f"{exc}\n--- backend log (tail) ---\n{backend.log_tail()}")
    run = _finish(backend, result)
    assert guest_running, f"guest had already exited when threads were listed{run.diag()}"
    vq_threads = sorted(t for t in threads if re.fullmatch(r"dp-vq\d+", t))
    assert vq_threads == [f"dp-vq{i}" for i in range(backend.queues)], (
        f"backend threads while fio ran: {threads}{run.diag()}")
    return run


def assert_fio_clean(run: Run, queues: int) -> list[int]:
    """Each job reported err= 0; returns the writes fio issued per job."""
    jobs = {}
    for line in run.markers("DP-FIO"):
        m = re.match(r"DP-FIO (q\d+): \(groupid=\d+, jobs=\d+\): err=\s*(\d+)", line)
        if m:
            jobs[m.group(1)] = int(m.group(2))
    assert jobs == {f"q{i}": 0 for i in range(queues)}, f"fio job errors: {jobs}{run.diag()}"
    issued = [int(m.group(2)) for line in run.markers("DP-FIO")
              if (m := re.search(r"issued rwts: total=(\d+),(\d+),", line))]
    assert len(issued) == queues, f"fio issued lines: {issued}{run.diag()}"
    return issued


def assert_queue_stats(run: Run, queues: int) -> None:
    """Every queue served reads and writes, no queue beyond the negotiated count, no errors."""
    stats = run.stats()
    assert sorted(stats) == list(range(queues)), f"queues with stop lines: {sorted(stats)}" + (
        run.diag())
    for i, s in stats.items():
        assert s.writes > 0 and s.reads > 0, f"vq{i} served no reads or writes: {s.line}" + (
            run.diag())
        assert s.errors == 0 and not s.broken, f"vq{i}: {s.line}{run.diag()}"


# --------------------------------------------------------------------------- all disks


def test_device_topology(guest_image: GuestImage, backend: Backend, tmp_path: Path) -> None:
    """The guest sees one blk-mq hardware queue per backend queue and the disk's size."""
    body, names = topology_body(backend)
    run = run_script(guest_image, backend, body, tmp_path)
    run.assert_checks(names)
    assert_cpu_mapping(run, backend.queues)


# --------------------------------------------------------------------------- file disks


def _read_disk(backend: Backend) -> bytes:
    data = backend.disk_bytes()
    assert len(data) == backend.disk_size, f"backing disk size changed to {len(data)}"
    return data


@pytest.mark.parametrize("backend", STORED_BACKEND_PARAMS, indirect=True)
def test_fio_write_verify_per_queue(guest_image: GuestImage, backend: Backend,
                                    tmp_path: Path) -> None:
    """fio randwrite + crc32c verify, one job per queue pinned to its vCPU; every queue
    served writes and reads; the data landed on the disk (the backing file, or the RBD image
    as `rbd export` reads it) at each job's region."""
    n = backend.queues
    body = fio_body(n, {"rw": "randwrite", "verify": "crc32c", "do_verify": "1",
                        "verify_fatal": "1", "verify_state_save": "0"})
    run = run_fio_guest(guest_image, backend, body, tmp_path)
    run.assert_checks(["fio-observed-running", "fio-exit-status"])
    issued = assert_fio_clean(run, n)
    assert_queue_stats(run, n)
    stats = run.stats()
    # Direct I/O: every write fio issued reached the backend (the block layer may split,
    # merges are unlikely with iodepth 16 < queue size 128), and job i's writes went to
    # vq i: only fio writes in this test, so a job not pinned to its hctx would show up here.
    writes = [stats[i].writes for i in range(n)]
    assert sum(writes) >= sum(issued), f"fio issued {issued} writes, backend saw {writes}" + (
        run.diag())
    assert all(w >= 0.9 * j for w, j in zip(writes, issued, strict=True)), (
        f"per-queue writes {writes} do not follow the per-job writes {issued}{run.diag()}")

    data = _read_disk(backend)
    zero4k = bytes(4096)
    for i in range(n):
        start = i * FIO_JOB_STRIDE
        empty = [off for off in range(start, start + FIO_JOB_SIZE, 4096)
                 if data[off: off + 4096] == zero4k]
        assert not empty, (f"job q{i}: {len(empty)} 4 KiB blocks of its region are still zero"
                           f" on the disk, first at {empty[0]:#x}")
    end_of_jobs = (n - 1) * FIO_JOB_STRIDE + FIO_JOB_SIZE
    gaps = [(i * FIO_JOB_STRIDE + FIO_JOB_SIZE, (i + 1) * FIO_JOB_STRIDE) for i in range(n - 1)]
    for lo, hi in [*gaps, (end_of_jobs, len(data))]:
        assert data[lo:hi].count(0) == hi - lo, f"data outside fio's regions in [{lo:#x}, {hi:#x})"


EXT4_BODY = r"""
check mkfs /bin/mkfs.ext4 -q -F /dev/vda
mkdir -p /mnt
check mount1 mount -t ext4 /dev/vda /mnt
mkdir -p /mnt/dir
head -c 1048576 /dev/urandom > /mnt/f1
head -c 3145728 /dev/urandom > /mnt/f2
i=1
while [ $i -le 16 ]; do
    head -c $((i * 4099)) /dev/urandom > /mnt/dir/s$i
    i=$((i + 1))
done
check write-files sh -c 'cd /mnt && sha256sum f1 f2 dir/* > /tmp/sums'
sed 's/^/DP-SUM /' /tmp/sums
sync
check umount1 umount /mnt
echo 3 > /proc/sys/vm/drop_caches
check flushbufs /bin/blockdev --flushbufs /dev/vda
check mount2 mount -t ext4 /dev/vda /mnt
check sums-match sh -c 'cd /mnt && sha256sum -c -s /tmp/sums'
check file-count same "$(find /mnt/f1 /mnt/f2 /mnt/dir -type f | wc -l)" 18
check umount2 umount /mnt
check fsck /bin/fsck.ext4 -fn /dev/vda
"""
EXT4_CHECKS = ["mkfs", "mount1", "write-files", "umount1", "flushbufs", "mount2", "sums-match",
               "file-count", "umount2", "fsck"]


def assert_ext4_round_trip(run: Run, backend: Backend, tmp_path: Path) -> None:
    """After EXT4_BODY: FLUSHes were sent, and the host's e2fsck and debugfs agree with the
    guest about the image and every file in it."""
    sums = {}
    for line in run.markers("DP-SUM"):
        _, digest, name = line.split()
        sums[name] = digest
    assert len(sums) == 18, f"checksums: {sums}{run.diag()}"
    stats = run.stats()
    for i, s in stats.items():
        assert s.errors == 0, f"vq{i}: {s.line}{run.diag()}"
    # The device reports a write-back cache, so ext4's journal commits must send FLUSHes.
    assert sum(s.writes for s in stats.values()) > 0, f"no writes seen{run.diag()}"
    assert sum(s.flushes for s in stats.values()) > 0, f"no FLUSH requests seen{run.diag()}"

    if backend.disk_path is not None:
        image = str(backend.disk_path)
    else:   # an RBD image: checked in a copy `rbd export` made
        image = str(tmp_path / "exported.img")
        Path(image).write_bytes(_read_disk(backend))
    e2fsck = shutil.which("e2fsck") or "/usr/sbin/e2fsck"
    fsck = subprocess.run([e2fsck, "-fn", image], capture_output=True, text=True, timeout=60)
    assert fsck.returncode == 0, f"host e2fsck -fn: {fsck.returncode}\n{fsck.stdout}{fsck.stderr}"
    debugfs = shutil.which("debugfs") or "/usr/sbin/debugfs"
    for name, digest in sums.items():
        cat = subprocess.run([debugfs, "-R", f"cat /{name}", image], capture_output=True,
                             timeout=60)
        assert cat.returncode == 0, cat.stderr.decode(errors="replace")
        assert hashlib.sha256(cat.stdout).hexdigest() == digest, (
            f"/{name} read by the host's debugfs differs from what the guest wrote")


@pytest.mark.parametrize("backend", STORED_BACKEND_PARAMS, indirect=True)
def test_filesystem_round_trip(guest_image: GuestImage, backend: Backend,
                               tmp_path: Path) -> None:
    """mkfs.ext4, write files, remount with caches dropped, checksums match, fsck clean;
    the host then checks the image with e2fsck and reads the files back with debugfs."""
    run = run_script(guest_image, backend, EXT4_BODY, tmp_path)
    run.assert_checks(EXT4_CHECKS)
    assert_ext4_round_trip(run, backend, tmp_path)


# Discard: fill [64, 72) MiB, discard [65, 69) MiB. Write zeroes (sector granular): fill
# [96, 104) MiB, zero [96 MiB + 512, 100 MiB - 512) bytes.
DISCARD_FILL = (64, 8)
DISCARD_RANGE = (65 * MiB, 4 * MiB)
WZ_FILL = (96, 8)
WZ_RANGE = (96 * MiB + SECTOR, 4 * MiB - 2 * SECTOR)


@pytest.mark.parametrize("backend", FILE_BACKEND_PARAMS, indirect=True)
def test_discard_and_write_zeroes(guest_image: GuestImage, backend: Backend,
                                  tmp_path: Path) -> None:
    """blkdiscard and blkdiscard -z on filled regions read back as zeroes (guest, O_DIRECT)
    while the neighbouring data survives; the host sees the same in the backing file."""
    d_off, d_len = DISCARD_RANGE
    z_off, z_len = WZ_RANGE
    z_first, z_count = z_off // SECTOR, z_len // SECTOR
    body = f"""
check fill-discard-region fill_mib {DISCARD_FILL[0]} {DISCARD_FILL[1]}
check fill-zero-region fill_mib {WZ_FILL[0]} {WZ_FILL[1]}
check discard-region-filled mib_is {DISCARD_FILL[0]} {DISCARD_FILL[1]} $FILL_MD5
check zero-region-filled mib_is {WZ_FILL[0]} {WZ_FILL[1]} $FILL_MD5
check blkdiscard /bin/blkdiscard -o {d_off} -l {d_len} /dev/vda
check discarded-reads-zero mib_is {d_off // MiB} {d_len // MiB} $ZERO_MIB_MD5
check discard-left-guard mib_is {DISCARD_FILL[0]} {d_off // MiB - DISCARD_FILL[0]} $FILL_MD5
check discard-right-guard mib_is {(d_off + d_len) // MiB} \
    {sum(DISCARD_FILL) - (d_off + d_len) // MiB} $FILL_MD5
check blkdiscard-z /bin/blkdiscard -z -o {z_off} -l {z_len} /dev/vda
check zeroed-reads-zero same "$(disk_md5 512 {z_first} {z_count})" "$(zero_md5 512 {z_count})"
check zero-left-guard same "$(disk_md5 512 {z_first - 1} 1)" \
    "$(dd if=/tmp/fill bs=512 skip={(z_first - 1) % 2048} count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
check zero-right-guard same "$(disk_md5 512 {z_first + z_count} 1)" \
    "$(dd if=/tmp/fill bs=512 skip={(z_first + z_count) % 2048} count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
check zero-region-rest mib_is {(z_off + z_len) // MiB + 1} \
    {sum(WZ_FILL) - (z_off + z_len) // MiB - 1} $FILL_MD5
"""
    run = run_script(guest_image, backend, body, tmp_path)
    run.assert_checks([
        "fill-discard-region", "fill-zero-region", "discard-region-filled", "zero-region-filled",
        "blkdiscard", "discarded-reads-zero", "discard-left-guard", "discard-right-guard",
        "blkdiscard-z", "zeroed-reads-zero", "zero-left-guard", "zero-right-guard",
        "zero-region-rest"])
    stats = run.stats()
    assert sum(s.discards for s in stats.values()) >= 1, f"no DISCARD request{run.diag()}"
    assert sum(s.write_zeroes for s in stats.values()) >= 1, f"no WRITE_ZEROES{run.diag()}"
    for i, s in stats.items():
        assert s.errors == 0, f"vq{i}: {s.line}{run.diag()}"

    data = _read_disk(backend)

    def expect_fill(lo: int, hi: int) -> None:
        assert data[lo:hi] == (FILL_MIB * 8)[lo % MiB: lo % MiB + hi - lo], (
            f"backing file [{lo:#x}, {hi:#x}) does not hold the fill pattern")

    def expect_zero(lo: int, hi: int) -> None:
        nonzero = len(data[lo:hi]) - data[lo:hi].count(0)
        assert nonzero == 0, f"backing file [{lo:#x}, {hi:#x}) has {nonzero} non-zero bytes"

    expect_fill(DISCARD_FILL[0] * MiB, d_off)
    expect_zero(d_off, d_off + d_len)
    expect_fill(d_off + d_len, sum(DISCARD_FILL) * MiB)
    expect_fill(WZ_FILL[0] * MiB, z_off)
    expect_zero(z_off, z_off + z_len)
    expect_fill(z_off + z_len, sum(WZ_FILL) * MiB)


@pytest.mark.parametrize("backend", FILE_BACKEND_PARAMS, indirect=True)
def test_markers_land_at_sector_offsets(guest_image: GuestImage, backend: Backend,
                                        tmp_path: Path) -> None:
    """`DP-MARK-<sector>` written with dd seek=N oflag=direct is found at exactly N * 512 in
    the backing file, and nothing else in the file is non-zero."""
    last = backend.disk_size // SECTOR - 1
    sectors = [0, 1, 7, 8, 777, 4095, 65537, 131071, 262144, last - 1, last]
    lines = []
    for s in sectors:
        lines += [
            f"printf 'DP-MARK-{s}' > /tmp/m",
            "dd if=/tmp/m of=/tmp/mp bs=512 count=1 conv=sync 2>/dev/null",
            f"check write-{s} dd if=/tmp/m of=/dev/vda bs=512 seek={s} count=1 conv=sync,notrunc"
            " oflag=direct",
            f"check read-{s} same \"$(disk_md5 512 {s} 1)\" \"$(md5sum < /tmp/mp | cut -d' ' -f1)\"",
        ]
    lines.append("check sync sync")
    run = run_script(guest_image, backend, "\n".join(lines) + "\n", tmp_path)
    run.assert_checks([f"{op}-{s}" for s in sectors for op in ("write", "read")] + ["sync"])

    data = _read_disk(backend)
    for s in sectors:
        got = data[s * SECTOR: (s + 1) * SECTOR]
        assert got == f"DP-MARK-{s}".encode().ljust(SECTOR, b"\0"), (
            f"sector {s}: {got[:32]!r}...; DP-MARK-{s} found at "
            f"{data.find(f'DP-MARK-{s}'.encode())}")
    nonzero = []
    zero_mib = bytes(MiB)
    for off in range(0, len(data), MiB):
        if data[off: off + MiB] != zero_mib:
            nonzero += [sec for sec in range(off // SECTOR, (off + MiB) // SECTOR)
                        if data[sec * SECTOR: (sec + 1) * SECTOR].count(0) != SECTOR]
    assert nonzero == sectors, f"non-zero sectors in the backing file: {nonzero}"


# --------------------------------------------------------------------------- null disks


@pytest.mark.parametrize("backend", NULL_BACKEND_PARAMS, indirect=True)
def test_null_disk_fio_and_zero_reads(guest_image: GuestImage, backend: Backend,
                                      tmp_path: Path) -> None:
    """fio randrw on every queue completes cleanly; data written to a null disk reads back
    as zeroes; every queue served reads and writes."""
    n = backend.queues
    body = fio_body(n, {"rw": "randrw", "rwmixread": "50"}) + r"""
check null-fill fill_mib 200 2
check null-reads-zero mib_is 200 2 $ZERO_MIB_MD5
check null-fio-region-zero same "$(disk_md5 1M 0 4)" "$(zero_md5 1M 4)"
"""
    run = run_fio_guest(guest_image, backend, body, tmp_path)
    run.assert_checks(["fio-observed-running", "fio-exit-status", "null-fill", "null-reads-zero",
                       "null-fio-region-zero"])
    assert_fio_clean(run, n)
    assert_queue_stats(run, n)


# --------------------------------------------------------------------------- packed rings

# The guest's own view: virtio feature bit 34 (VIRTIO_F_RING_PACKED) in the features it acked.
PACKED_BODY = r"""
check packed-acked same "$(cut -c35 /sys/block/vda/device/features)" 1
"""


def assert_packed_negotiated(run: Run, queues: int) -> None:
    """The backend acked VIRTIO_F_RING_PACKED and started every queue as a packed ring (after
    SeaBIOS's split ring on the same connection), and served it."""
    log = run.backend.read_log()
    acked = [line for line in log.splitlines() if "features acked:" in line]
    assert acked and "VIRTIO_F_RING_PACKED" in acked[-1], f"features: {acked}{run.diag()}"
    for i in range(queues):
        assert f"vq{i} started: size 128, packed ring, base 0x80008000" in log, run.diag()
    assert "(packed rings)" in log, f"no packed inflight buffer{run.diag()}"


PACKED_PARAMS = [pytest.param(("file", 2), id="file-q2")]


@pytest.mark.parametrize("backend", PACKED_PARAMS, indirect=True)
def test_packed_rings_fio_verify_then_ext4(guest_image: GuestImage, backend: Backend,
                                           tmp_path: Path) -> None:
    """A guest with `packed=on` and 2 queues: fio randwrite + crc32c verify, one job per queue,
    then the ext4 round trip on the same disk; the guest acked VIRTIO_F_RING_PACKED."""
    n = backend.queues
    body = PACKED_BODY + fio_body(n, {"rw": "randwrite", "verify": "crc32c", "do_verify": "1",
                                      "verify_fatal": "1", "verify_state_save": "0"}) + EXT4_BODY
    run = run_fio_guest(guest_image, backend, body, tmp_path, packed=True)
    run.assert_checks(["packed-acked", "fio-observed-running", "fio-exit-status", *EXT4_CHECKS])
    assert_fio_clean(run, n)
    assert_queue_stats(run, n)
    assert_packed_negotiated(run, n)
    assert_ext4_round_trip(run, backend, tmp_path)


@pytest.mark.parametrize("backend", [pytest.param(("null", 2), id="null-q2")], indirect=True)
def test_packed_rings_on_a_null_disk(guest_image: GuestImage, backend: Backend,
                                     tmp_path: Path) -> None:
    """The same guest on a null disk: fio randrw on both packed queues, zero reads."""
    n = backend.queues
    body = PACKED_BODY + fio_body(n, {"rw": "randrw", "rwmixread": "50"}) + r"""
check null-fill fill_mib 200 2
check null-reads-zero mib_is 200 2 $ZERO_MIB_MD5
"""
    run = run_fio_guest(guest_image, backend, body, tmp_path, packed=True)
    run.assert_checks(["packed-acked", "fio-observed-running", "fio-exit-status", "null-fill",
                       "null-reads-zero"])
    assert_fio_clean(run, n)
    assert_queue_stats(run, n)
    assert_packed_negotiated(run, n)
