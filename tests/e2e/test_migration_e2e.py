"""Live migration of a QEMU guest whose disk is `dataplane serve`: two QEMUs on this host.

QEMU A (TCG, 2 vCPUs, 1 GiB) runs a guest on a 2-queue vhost-user-blk disk served by backend
A. QEMU B is the same machine started with `-incoming`, its disk served by backend B on the
same image. Mid-run the host migrates A to B (QMP `migrate`): QEMU A hands backend A a dirty
log (SET_LOG_BASE), turns LOG_ALL on and sets VHOST_VRING_F_LOG on both rings while they run,
copies memory while the guest goes on, then stops the VM, stops the rings (GET_VRING_BASE,
which drains and logs) and copies what the logs marked last. B starts its rings where A
stopped them, against backend B.

* `test_fio_verify_survives_migration` (file disk, migration over a UNIX socket): fio
  write+verify, QD32 per job, 4k-128k, one job per queue, 40 s; the migration lands in the
  middle and fio must finish on B with no verify error.
* `test_guest_memory_the_device_wrote_arrives` (null disk, migration over TCP): the guest
  writes a pattern into memory, lets the migration send it, then has the device overwrite it
  (fio, O_DIRECT reads of zeroes into that memory) and checks it a few seconds later. The
  host holds the migration in its iterations (1 ms downtime limit, a guest that keeps
  dirtying memory) until a read has completed on A after a full pass over memory, then lets
  it converge, so the check runs on B over pages only the device wrote since they were sent.
  Only the dirty log brings those pages over again.
* With `--debug-no-dirty-log` on backend A the same test must fail: the used rings and the
  read data are stale on B (QEMU B refuses the stale ring: "VQ n size .. < last_avail_idx ..
  - used_idx ..", or the guest finds the pattern).

Downtime and total time of each migration are recorded (`record_property`) and printed.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fio_scripts import fio_in_background, timed_verify_job
from serve_process import ServeProcess

from dataplane.guest import GuestHandle, GuestImage, Qmp, QmpError, start_guest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

DISK_SIZE = 256 << 20
QUEUES = 2
# 8 KiB short of 1 GiB. QEMU 7.2 syncs the dirty bitmap of a RAM block whose size is a multiple
# of 64 pages word by word without resetting TCG's TLB (cpu_physical_memory_sync_dirty_bitmap,
# include/exec/ram_addr.h): a vCPU then keeps writing pages through TLB entries that no longer
# mark them dirty, and a guest that writes a lot during the migration arrives with stale
# kernel pages, with no vhost-user device at all (seen here: oopses on B). Any other size
# takes the page-by-page path, which resets the TLB. KVM is not affected.
MEMORY_KB = (1 << 20) - 8
FIO_RUNTIME = 60            # long enough for a migration on a loaded 2-CPU host (seen: 43 s)
MIGRATE_AFTER = 12.0          # seconds of fio on A before the migration starts
RUNNING_TIMEOUT = 90.0        # boot + fio's first writes
MIGRATION_TIMEOUT = 90.0
FINISH_MARGIN = 90.0          # after fio's runtime: final verify pass, power-off

FIO_SCRIPT = fio_in_background(timed_verify_job(FIO_RUNTIME, "120m")) + """
wait $fpid
echo "DP-FIO-RC $?"
grep -E 'err=|issued rwts|verify' /tmp/fio.out | sed 's/^ */DP-FIO /'
dmesg | grep -E 'I/O error|not a head|virtio' | sed 's/^/DP-DMESG /'
echo DP-DONE
"""

MEM_MIB = 32                  # read per round, into a tmpfs file full of a pattern
MEM_ROUNDS = 3
MEM_SLEEP = 3                 # seconds between a round's read and its check
HOLD_BANDWIDTH = 128 << 20    # bytes/s while the host holds the migration in its iterations
HOLD_TRICKLE = 4 << 20        # bytes/s once the first pass is done (below)

# Each round writes a random pattern into a tmpfs file (CPU stores: QEMU tracks them) and lets
# the migration send it, then fio reads the null disk (zeroes) with O_DIRECT into that file
# mapped shared (iomem=mmapshared): only the device writes those pages now. A few seconds
# later the guest checks they hold zeroes. For its first two rounds the guest also keeps
# rewriting 128 small files in the background (a shell loop: new pages all the time). QEMU
# completes once what is dirty fits in the downtime limit at the bandwidth it measures: at
# HOLD_BANDWIDTH and 1 ms, 32 pages, which a TCG vCPU does not always dirty between two syncs
# 10-20 ms apart (three runs in a row converged before their first read on a quiet host). So
# once the first pass is done the host throttles the migration to HOLD_TRICKLE (a threshold
# of one page, dirty syncs seconds apart); it does not converge then until the host raises
# the limits.
MEM_SCRIPT = f"""
head -c 1048576 /dev/urandom > /tmp/pattern
ZERO=$(dd if=/dev/zero bs=1M count={MEM_MIB} 2>/dev/null | md5sum | cut -d' ' -f1)
(n=0; while :; do echo $n > /dev/shm/dirty$((n % 128)); n=$((n + 1)); done) &
dirtier=$!
echo DP-READY
k=0
while [ $k -lt {MEM_ROUNDS} ]; do
    i=0
    while [ $i -le {MEM_MIB} ]; do cat /tmp/pattern; i=$((i + 1)); done > /dev/shm/buf
    sleep 2   # the pattern sent (at HOLD_TRICKLE too) before the device overwrites it
    fio --name=round$k --filename=/dev/vda --rw=read --direct=1 --ioengine=libaio --bs=1M \\
        --iodepth={MEM_MIB} --number_ios={MEM_MIB} --size={MEM_MIB}M \\
        --iomem=mmapshared:/dev/shm/buf > /tmp/fio.out 2>&1 || echo "DP-FIO-FAILED $k"
    echo "DP-READ-DONE $k"
    sleep {MEM_SLEEP}
    got=$(head -c $(({MEM_MIB} * 1048576)) /dev/shm/buf | md5sum | cut -d' ' -f1)
    [ "$got" = "$ZERO" ] || echo "DP-MEM-BAD $k"
    echo "DP-CHECKED $k"
    [ $k -eq 1 ] && kill $dirtier
    k=$((k + 1))
done
dmesg | grep -E 'I/O error|not a head|virtio' | sed 's/^/DP-DMESG /'
echo DP-DONE
"""


@dataclass
class Migration:
    """One source/destination pair and what happened to it."""

    tmp: Path
    backends: dict[str, ServeProcess] = field(default_factory=dict)
    guests: dict[str, GuestHandle] = field(default_factory=dict)
    qmp: dict[str, Qmp] = field(default_factory=dict)
    info: dict = field(default_factory=dict)          # the last query-migrate on A
    held_round: int | None = None                     # the round read on A, checked on B

    def output(self, side: str) -> str:
        g = self.guests.get(side)
        return g.output if g is not None else ""

    def markers(self, side: str, prefix: str) -> list[str]:
        return [line.rstrip() for line in self.output(side).splitlines() if line.startswith(prefix)]

    def diag(self) -> str:
        logs = "\n".join(f"--- backend {n} ---\n" + "\n".join(
            line for line in b.log().splitlines() if any(
                w in line for w in ("dirty", "started", "stopped", "ERROR", "connected", "memory")))
            for n, b in self.backends.items())
        return (f"\nquery-migrate: {self.info}\n--- guest A (tail) ---\n{self.output('A')[-2500:]}"
                f"\n--- guest B (tail) ---\n{self.output('B')[-2500:]}\n{logs}")

    def close(self) -> None:
        for q in self.qmp.values():
            q.close()
        for g in self.guests.values():
            g.kill()
        for b in self.backends.values():
            b.kill()


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pair(image: GuestImage, tmp: Path, disk: str, script: str, incoming: str,
               flags_a: tuple[str, ...] = (), kernel_args: tuple[str, ...] = ()) -> Migration:
    """Backends A and B on one disk, QEMU A booting, QEMU B waiting with -incoming."""
    m = Migration(tmp)
    try:
        for side, flags in (("A", flags_a), ("B", ())):
            m.backends[side] = ServeProcess(tmp / f"serve{side}.log", tmp / f"vub{side}.sock", disk,
                                            ("--queues", str(QUEUES), *flags))
        for side in ("A", "B"):
            extra = ["-qmp", f"unix:{tmp / f'qmp{side}.sock'},server=on,wait=off"]
            if side == "B":
                extra += ["-incoming", incoming]
            m.guests[side] = start_guest(image, script, socket=tmp / f"vub{side}.sock",
                                         num_queues=QUEUES, kernel_args=list(kernel_args),
                                         memory_kb=MEMORY_KB, extra_args=extra,
                                         log_path=tmp / f"console{side}.log")
            m.qmp[side] = Qmp(tmp / f"qmp{side}.sock")
    except BaseException:
        m.close()
        raise
    return m


def migrate(m: Migration, uri: str, downtime_ms: int = 300, bandwidth: int = 1 << 30) -> None:
    qa = m.qmp["A"]
    qa.cmd("migrate-set-parameters", downtime_limit=downtime_ms, max_bandwidth=bandwidth)
    qa.cmd("migrate", uri=uri)


def wait_migration(m: Migration, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m.info = m.qmp["A"].cmd("query-migrate")
        if m.info.get("status") in ("completed", "failed", "cancelled"):
            return m.info["status"]
        time.sleep(0.2)
    return m.info.get("status", "?")


def report(m: Migration, record_property, what: str) -> None:
    downtime, total = m.info.get("downtime"), m.info.get("total-time")
    ram = m.info.get("ram", {})
    record_property("downtime_ms", downtime)
    record_property("total_time_ms", total)
    print(f"\n{what}: migration {m.info.get('status')}, downtime {downtime} ms, total {total} ms,"
          f" {ram.get('transferred', 0) >> 20} MiB sent, {ram.get('dirty-sync-count')} dirty syncs")


def wait_guest_done(m: Migration, side: str, timeout: float, give_up_on: str = "") -> bool:
    g = m.guests[side]
    deadline = time.monotonic() + timeout
    while not g.wait_for_output("DP-DONE", 1) and time.monotonic() < deadline:
        if (give_up_on and give_up_on in g.output) or not g.running():
            return False
    deadline = time.monotonic() + 20
    while g.running() and time.monotonic() < deadline:   # power-off after DP-DONE
        time.sleep(0.1)
    return "DP-DONE" in g.output


def backend_stop_index(b: ServeProcess, queue: int) -> int | None:
    found = re.findall(rf"vq{queue} stopped at avail_idx (\d+)", b.log())
    return int(found[-1]) if found else None


def backend_start_index(b: ServeProcess, queue: int) -> int | None:
    found = re.findall(rf"vq{queue} started: size \d+, avail_idx (\d+)", b.log())
    return int(found[-1]) if found else None


def stop_backends_cleanly(m: Migration) -> None:
    for name, b in m.backends.items():
        if b.proc.poll() is None:
            b.proc.send_signal(signal.SIGTERM)
        try:
            rc = b.proc.wait(20)
        except subprocess.TimeoutExpired:
            b.kill()
            pytest.fail(f"backend {name} did not exit on SIGTERM{m.diag()}")
        assert rc == 0, f"backend {name} exited {rc}{m.diag()}"
        assert " ERROR " not in b.log() and "ring broken" not in b.log(), f"backend {name}{m.diag()}"


def test_fio_verify_survives_migration(guest_image: GuestImage, tmp_path: Path, record_property) -> None:
    disk = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", str(DISK_SIZE), str(disk)], check=True)
    mig = tmp_path / "migrate.sock"
    m = start_pair(guest_image, tmp_path, str(disk), FIO_SCRIPT, f"unix:{mig}")
    try:
        assert m.guests["A"].wait_for_output("DP-FIO-RUNNING", RUNNING_TIMEOUT), m.diag()
        time.sleep(MIGRATE_AFTER)
        assert "DP-FIO-RC" not in m.output("A"), f"fio ended before the migration{m.diag()}"
        migrate(m, f"unix:{mig}")
        status = wait_migration(m, MIGRATION_TIMEOUT)
        report(m, record_property, "file disk, unix socket")
        assert status == "completed", m.diag()
        assert "DP-FIO-RC" not in m.output("A"), f"fio ended on A before the migration did{m.diag()}"
        assert m.qmp["B"].cmd("query-status")["status"] == "running", m.diag()
        m.qmp["A"].cmd("quit")
        assert wait_guest_done(m, "B", FIO_RUNTIME + FINISH_MARGIN), f"guest did not finish on B{m.diag()}"
        assert m.markers("B", "DP-FIO-RC") == ["DP-FIO-RC 0"], f"fio failed on B{m.diag()}"
        errs = {x[1]: int(x[2]) for line in m.markers("B", "DP-FIO")
                if (x := re.match(r"DP-FIO (q\d+): \(groupid=\d+, jobs=\d+\): err=\s*(\d+)", line))}
        assert errs == {"q0": 0, "q1": 0}, f"fio job errors {errs}{m.diag()}"
        bad = [x for x in m.markers("B", "DP-DMESG") if "I/O error" in x or "not a head" in x]
        assert not bad, f"guest kernel errors {bad}{m.diag()}"
        a, b = m.backends["A"], m.backends["B"]
        assert "dirty logging on" in a.log(), m.diag()
        for q in range(QUEUES):   # B resumed each ring exactly where A stopped it
            assert backend_stop_index(a, q) is not None, m.diag()
            assert backend_start_index(b, q) == backend_stop_index(a, q), m.diag()
    finally:
        m.close()


def memory_migration(image: GuestImage, tmp: Path, flags_a: tuple[str, ...]) -> tuple[Migration, str]:
    """The null-disk run; the status of the migration. It is held until a read completed on A
    after a full pass over memory; check_held says whether it was."""
    port = free_tcp_port()
    uri = f"tcp:127.0.0.1:{port}"
    m = start_pair(image, tmp, f"null:{DISK_SIZE >> 20}M", MEM_SCRIPT, uri, flags_a)
    try:
        assert m.guests["A"].wait_for_output("DP-READY", RUNNING_TIMEOUT), m.diag()
        # Hold it in its iterations until a full pass over memory is done and a read has
        # completed after that; then let it converge (it may converge by itself meanwhile).
        migrate(m, uri, downtime_ms=1, bandwidth=HOLD_BANDWIDTH)
        deadline = time.monotonic() + MIGRATION_TIMEOUT
        reads_at_pass: int | None = None
        while time.monotonic() < deadline:
            m.info = m.qmp["A"].cmd("query-migrate")
            if m.info.get("status") in ("completed", "failed", "cancelled"):
                break
            reads = len(m.markers("A", "DP-READ-DONE"))
            if reads_at_pass is None and m.info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
                reads_at_pass = reads
                m.qmp["A"].cmd("migrate-set-parameters", max_bandwidth=HOLD_TRICKLE)
            if reads_at_pass is not None and reads > reads_at_pass:
                m.held_round = reads - 1
                m.qmp["A"].cmd("migrate-set-parameters", downtime_limit=10000, max_bandwidth=1 << 30)
                break
            time.sleep(0.1)
        status = wait_migration(m, MIGRATION_TIMEOUT)
        if status == "completed":
            try:
                m.qmp["A"].cmd("quit")
            except QmpError:
                pass
            wait_guest_done(m, "B", MEM_ROUNDS * (MEM_SLEEP + 20) + 30, give_up_on="DP-MEM-BAD")
        return m, status
    except BaseException:
        m.close()
        raise


def held_memory_migration(image: GuestImage, tmp: Path, flags_a: tuple[str, ...],
                          tries: int = 3) -> tuple[Migration, str]:
    """memory_migration until it was held past a read on A (check_held's premise): on a loaded
    host the guest's rounds can be so slow that the migration converges before the first read,
    and such a run tests nothing. Only that premise is retried, never an outcome."""
    for attempt in range(tries):
        where = tmp / f"try{attempt}"
        where.mkdir()
        m, status = memory_migration(image, where, flags_a)
        if status != "completed" or m.held_round is not None or attempt + 1 == tries:
            return m, status
        print(f"\nattempt {attempt + 1}: the migration converged before a read on A; again")
        m.close()
    raise AssertionError("unreachable")


def check_held(m: Migration) -> None:
    """The migration converged only after a round's read on A, and that round was checked on
    B: only then does the run test what it means to."""
    assert m.held_round is not None, f"the migration converged before a read on A{m.diag()}"
    checked_on_b = {int(x.split()[1]) for x in m.markers("B", "DP-CHECKED")}
    assert m.held_round in checked_on_b or m.markers("B", f"DP-MEM-BAD {m.held_round}") or \
        m.guests["B"].running() is False, m.diag()


def test_guest_memory_the_device_wrote_arrives(guest_image: GuestImage, tmp_path: Path,
                                               record_property) -> None:
    m, status = held_memory_migration(guest_image, tmp_path, ())
    try:
        report(m, record_property, "null disk, tcp")
        assert status == "completed", m.diag()
        assert "DP-DONE" in m.output("B"), f"guest did not finish on B{m.diag()}"
        assert not m.markers("B", "DP-MEM-BAD"), f"guest memory differs on B{m.diag()}"
        assert not m.markers("A", "DP-FIO-FAILED") + m.markers("B", "DP-FIO-FAILED"), m.diag()
        check_held(m)
        checked_on_b = {int(x.split()[1]) for x in m.markers("B", "DP-CHECKED")}
        assert m.held_round in checked_on_b, f"round {m.held_round} was not checked on B{m.diag()}"
        bad = [x for x in m.markers("B", "DP-DMESG") if "I/O error" in x or "not a head" in x]
        assert not bad, m.diag()
        stop_backends_cleanly(m)
    finally:
        m.close()


@pytest.mark.timeout(900)
def test_without_the_dirty_log_the_destination_gets_stale_memory(guest_image: GuestImage,
                                                                 tmp_path: Path) -> None:
    """--debug-no-dirty-log: the same run must end with stale memory on B (or a ring QEMU B
    refuses). Whether the device's writes land after QEMU sent those pages is timing (a slow,
    loaded host can let the last pass copy them anyway), so up to three runs: one that shows
    the loss is enough; three that show none fail the test."""
    seen = []
    for run in range(3):
        where = tmp_path / f"run{run}"
        where.mkdir()
        m, status = held_memory_migration(guest_image, where, ("--debug-no-dirty-log",))
        try:
            if status == "completed":
                check_held(m)
            bad = [x for x in m.markers("B", "DP-DMESG") if "I/O error" in x or "not a head" in x]
            clean = (status == "completed" and "DP-DONE" in m.output("B")
                     and not m.markers("B", "DP-MEM-BAD") and not bad
                     and m.guests["B"].running() is False)
            refused = "VQ" in m.output("B") and "used_idx" in m.output("B")
            print(f"\nwithout the dirty log (run {run + 1}): migration {status}; QEMU B refused a"
                  f" stale ring: {refused}; pattern found on B: {m.markers('B', 'DP-MEM-BAD')}")
            if not clean:
                return
            seen.append(m.diag())
        finally:
            m.close()
    pytest.fail("without the dirty log the migration went unnoticed three times" + seen[-1])
