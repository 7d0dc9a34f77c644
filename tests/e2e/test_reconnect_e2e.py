"""Backend restarts under a real guest: QEMU reconnects, the guest never notices.

A QEMU (TCG) guest with a 2-queue vhost-user-blk disk (`-chardev socket,...,reconnect=1`)
runs fio write+verify (crc32c, QD64, 4k-128k, one job per queue) against `dataplane serve`
on a file disk whose emulated latency is drawn per request (`uniform:2ms-40ms`: dozens of
requests in flight per queue, completing out of order). Mid-run the host SIGKILLs the
backend and starts a new one on the same socket, three times. QEMU sees the socket close,
stops vhost (GET_VRING_BASE fails, so it rewinds each ring's last_avail_idx to its used
index), retries the socket every second, and on connect renegotiates, re-sends the memory
table and the inflight buffer it kept (SET_INFLIGHT_FD), and restarts the rings; the new
backend resubmits what the dead one had in flight. fio's verify must pass, and each
restarted backend's log must show resubmitted requests, some of them older than a request
that had completed (what a rewind to the used index alone would have lost).

With `--debug-no-inflight` the same run must fail: the guest gets completions twice
("id N is not a head!", I/O errors) or never (a hang, caught by the deadline).

Both run with split rings and with packed rings (`packed=on`). With packed rings QEMU cannot
rewind (there is no index in shared memory, so it re-sends the stale base it last knew): the
restarted backend must take the ring's position from the inflight buffer too.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ceph_cluster import CephCluster
from fio_scripts import fio_in_background, timed_verify_job
from serve_process import ServeProcess

from dataplane.guest import GuestHandle, GuestImage, start_guest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

DISK_SIZE = 256 << 20
QUEUES = 2
LATENCY = "uniform:2ms-40ms"
FIO_RUNTIME = 20             # seconds of write+verify passes (time_based)
KILLS = 3                    # restarts that must each find requests in flight, out of order
MAX_KILLS = 5                # a kill that lands between two fio passes finds little in flight
KILL_GAP = 2.0               # seconds of I/O between a reconnect and the next kill
RECONNECT_TIMEOUT = 20.0     # QEMU retries every second (reconnect=1)
RUNNING_TIMEOUT = 90.0       # boot + fio's first writes
FINISH_MARGIN = 60.0         # after fio's runtime: final verify pass, power-off
FAILURE_MARKERS = ("is not a head", "I/O error", "verify:", "DP-FIO-RC ")
STALL_SAMPLES = 6            # DP-IO samples (2 s apart) without a completed I/O: lost requests

# One fio job per queue: with 2 vCPUs and 2 queues, blk-mq maps vCPU i to queue i.
GUEST_SCRIPT = fio_in_background(timed_verify_job(FIO_RUNTIME, "120m", iodepth=64)) + """
# Completed I/Os every 2 s: a guest whose requests were lost shows it as a standstill.
(while sleep 2; do echo "DP-IO $(awk '{print $1 + $5}' /sys/block/vda/stat)"; done) &
ipid=$!
wait $fpid
frc=$?
kill $ipid
wait $ipid 2>/dev/null
echo "DP-FIO-RC $frc"
grep -E 'err=|issued rwts|verify' /tmp/fio.out | sed 's/^ */DP-FIO /'
dmesg | grep -E 'I/O error|not a head|virtio' | sed 's/^/DP-DMESG /'
echo DP-DONE
"""


@dataclass
class Run:
    serves: list[ServeProcess] = field(default_factory=list)
    kills: int = 0
    output: str = ""
    finished: bool = False           # the guest powered off by itself
    exit_status: int | None = None

    def restarted(self) -> list[ServeProcess]:
        return self.serves[1: self.kills + 1]

    def out_of_order_restarts(self) -> list[ServeProcess]:
        """Restarts that resubmitted requests, some older than a completed one."""
        return [s for s in self.restarted()
                if sum(n for n, _ in s.resubmissions().values()) > 0
                and sum(older for _, older in s.resubmissions().values()) > 0]

    def markers(self, prefix: str) -> list[str]:
        return [line.rstrip() for line in self.output.splitlines() if line.startswith(prefix)]

    def failure_seen(self) -> bool:
        rc = self.markers("DP-FIO-RC ")
        return (any(m in self.output for m in FAILURE_MARKERS[:3])
                or bool(rc and rc != ["DP-FIO-RC 0"]) or self.stalled())

    def stalled(self) -> bool:
        """fio still running, and no I/O completed for STALL_SAMPLES samples: a hang."""
        io = self.markers("DP-IO ")[-STALL_SAMPLES:]
        return (len(io) == STALL_SAMPLES and len(set(io)) == 1
                and not self.markers("DP-FIO-RC"))

    def diag(self) -> str:
        logs = "\n".join(f"--- {s.name}: " + "\n".join(
            line for line in s.log().splitlines() if "resubmitted" in line or " ERROR " in line
            or "connected" in line or "stopped" in line or "inflight region" in line)
            for s in self.serves)
        return f"\n--- guest console (tail) ---\n{self.output[-4000:]}\n{logs}"


def kill_and_restart_under_fio(image: GuestImage, tmp: Path, flags: tuple[str, ...] = (),
                               stop_on_failure: bool = False, spec: str | None = None,
                               packed: bool = False) -> Run:
    """spec: the --disk of every backend (default: a file here, with LATENCY stacked on it)."""
    sock = tmp / "vub.sock"
    if spec is None:
        disk = tmp / "disk.img"
        subprocess.run(["truncate", "-s", str(DISK_SIZE), str(disk)], check=True)
        spec = f"{disk},latency={LATENCY}"
    args = ("--queues", str(QUEUES), *flags)
    run = Run()
    run.serves.append(ServeProcess(tmp / "serve0.log", sock, spec, args))
    handle: GuestHandle | None = None
    try:
        handle = start_guest(
            image, GUEST_SCRIPT, socket=None, num_queues=QUEUES, kernel_args=["dpguest.disk=1"],
            extra_args=["-chardev", f"socket,id=vub0,path={sock},reconnect=1",
                        "-device", f"vhost-user-blk-pci,chardev=vub0,num-queues={QUEUES},queue-size=128"
                        + (",packed=on" if packed else "")],
            log_path=tmp / "console.log")
        assert handle.wait_for_output("DP-FIO-RUNNING", RUNNING_TIMEOUT), (
            f"fio never started{run.diag()}\n{handle.output[-3000:]}")
        fio_started = time.monotonic()
        while (len(run.out_of_order_restarts()) < KILLS and run.kills < MAX_KILLS
               and handle.running() and "DP-FIO-RC" not in handle.output):
            time.sleep(KILL_GAP)
            run.output = handle.output
            if stop_on_failure and run.failure_seen():
                break
            run.serves[-1].kill()
            run.kills += 1
            new = ServeProcess(tmp / f"serve{len(run.serves)}.log", sock, spec, args)
            run.serves.append(new)
            assert new.wait_log(f"vq{QUEUES - 1} started", RECONNECT_TIMEOUT), (
                f"QEMU did not reconnect to {new.name} within {RECONNECT_TIMEOUT}s{run.diag()}")
        deadline = fio_started + FIO_RUNTIME + FINISH_MARGIN
        while handle.running() and time.monotonic() < deadline:
            run.output = handle.output
            if stop_on_failure and run.failure_seen():
                break
            time.sleep(0.2)
        run.finished = not handle.running()
        if run.finished:
            run.exit_status = handle.wait(10).exit_status
    finally:
        if handle is not None:
            run.output = handle.output
            handle.kill()
        for s in run.serves[:-1]:
            s.kill()
    return run


def stop_last(run: Run) -> None:
    """SIGTERM the serving backend: it drains and exits 0, its log free of errors."""
    last = run.serves[-1]
    if last.proc.poll() is None:
        last.proc.send_signal(signal.SIGTERM)
    try:
        rc = last.proc.wait(20)
    except subprocess.TimeoutExpired:
        last.kill()
        pytest.fail(f"{last.name} did not exit on SIGTERM{run.diag()}")
    assert rc == 0, f"{last.name} exited {rc}{run.diag()}"


RINGS = pytest.mark.parametrize("ring", ["split", "packed"])


@RINGS
def test_three_backend_kills_under_fio_verify(guest_image: GuestImage, tmp_path: Path, ring: str) -> None:
    run = kill_and_restart_under_fio(guest_image, tmp_path, packed=ring == "packed")
    assert_nothing_lost(run, packed=ring == "packed")


def test_three_backend_kills_under_fio_verify_on_rbd(guest_image: GuestImage, ceph: CephCluster,
                                                      tmp_path: Path) -> None:
    """The same on an RBD image. Each killed backend leaves the image's exclusive lock with a
    dead librados client; each restarted one must take it over at once (it breaks the lock of
    its dead predecessor), or the guest's writes would stall ~30 s per restart and fio would
    miss the deadline."""
    image = ceph.new_image("reconnect-e2e", DISK_SIZE)
    run = kill_and_restart_under_fio(guest_image, tmp_path, spec=image.disk(f"latency={LATENCY}"))
    assert_nothing_lost(run)
    # Each restart found the lock free (its predecessor was killed before it wrote) or broke
    # it; none was left waiting for a dead holder.
    broke = [s.name for s in run.restarted() if "broke the exclusive lock" in s.log()]
    stuck = [s.name for s in run.restarted()
             if "holds the exclusive lock" in s.log() or "could not break" in s.log()]
    assert broke and not stuck, f"lock reclaimed by {broke}, left held by {stuck}{run.diag()}"


def assert_nothing_lost(run: Run, packed: bool = False) -> None:
    stop_last(run)
    assert run.finished, f"the guest did not finish in time{run.diag()}"
    qualifying = run.out_of_order_restarts()
    assert len(qualifying) >= KILLS, (
        f"{run.kills} kill(s), {len(qualifying)} found requests in flight out of order:"
        f" {[s.resubmissions() for s in run.restarted()]}{run.diag()}")
    assert run.markers("DP-FIO-RC") == ["DP-FIO-RC 0"], f"fio failed{run.diag()}"
    errs = {m[1]: int(m[2]) for line in run.markers("DP-FIO")
            if (m := re.match(r"DP-FIO (q\d+): \(groupid=\d+, jobs=\d+\): err=\s*(\d+)", line))}
    assert errs == {"q0": 0, "q1": 0}, f"fio job errors {errs}{run.diag()}"
    bad = [line for line in run.markers("DP-DMESG") if "I/O error" in line or "not a head" in line]
    assert not bad, f"guest kernel errors {bad}{run.diag()}"
    assert run.markers("DP-DONE") and run.exit_status == 0, run.diag()
    for s in run.serves:
        assert " ERROR " not in s.log() and "ring broken" not in s.log(), (
            f"{s.name} logged errors:\n{s.log()[-3000:]}")
        assert s.log().count("front end connected") == 1, f"{s.name}{run.diag()}"
    if packed:
        assert "VIRTIO_F_RING_PACKED" in run.serves[0].log(), run.diag()
        # QEMU re-sent a stale base: each restarted backend took the position from the region
        for s in run.restarted():
            assert "packed ring position" in s.log() and "from the inflight region" in s.log(), (
                f"{s.name}{run.diag()}")


@RINGS
def test_the_same_kills_without_inflight_tracking_fail(guest_image: GuestImage, tmp_path: Path,
                                                       ring: str) -> None:
    """--debug-no-inflight: the restarted backend starts at the used index (split) or at the
    stale base (packed) and knows nothing of what was in flight. The guest must notice:
    double completions ("not a head"), I/O errors, a verify failure, or a hang past the
    deadline."""
    run = kill_and_restart_under_fio(guest_image, tmp_path, ("--debug-no-inflight",),
                                     stop_on_failure=True, packed=ring == "packed")
    stop_last(run)
    assert run.kills >= 1, run.diag()
    assert all(s.resubmissions() == {} for s in run.serves), run.diag()
    clean = (run.finished and run.exit_status == 0 and run.markers("DP-FIO-RC") == ["DP-FIO-RC 0"]
             and not run.failure_seen())
    assert not clean, f"without inflight tracking {run.kills} kill(s) went unnoticed{run.diag()}"
