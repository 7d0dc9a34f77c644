"""`dataplane demo`: the main job in one command.

Serves a built-in disk (a 256 MiB file in the cache directory) with `dataplane serve`, boots
the tiny QEMU guest against it with one virtqueue per vCPU, runs fio write+verify on every
queue inside the guest, then stops the backend and shows what each queue's thread served.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError
from .kit import GuestTimeout, build_guest, default_cache_dir, run_guest

log = logging.getLogger("dataplane.demo")

DEMO_DISK_SIZE = 256 << 20


def fio_script(queues: int, runtime: int, size_mb: int) -> str:
    """One fio job per queue, pinned to the vCPU whose blk-mq context maps to that queue."""
    per_job = size_mb // queues
    jobs = "\n".join(
        f"[q{i}]\ncpus_allowed={i}\noffset={i * per_job}m\nsize={per_job}m\n" for i in range(queues))
    return f"""
echo "guest sees: $(ls /sys/block/vda/mq | wc -l) hardware queue(s), $(cat /sys/block/vda/size) sectors"
cat > /tmp/demo.fio <<'JOB'
[global]
filename=/dev/vda
direct=1
ioengine=libaio
iodepth=16
rw=randrw
rwmixread=50
bs=4k
verify=crc32c
verify_fatal=1
time_based=1
runtime={runtime}
group_reporting=0
{jobs}
JOB
fio --output-format=normal /tmp/demo.fio > /tmp/fio.out 2>&1
rc=$?
grep -E '^q[0-9]+:|IOPS=|err=' /tmp/fio.out
echo "fio exit status $rc"
exit $rc
"""


def _wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise ConfigError(f"the backend exited with status {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise ConfigError(f"the backend did not create {path} within {timeout} s")
        time.sleep(0.05)


def run_demo(disk: str | None, queues: int, runtime: int) -> int:
    cache = default_cache_dir().parent
    if disk is None:
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / "demo.img"
        if not path.exists() or path.stat().st_size != DEMO_DISK_SIZE:
            with open(path, "wb") as f:
                f.truncate(DEMO_DISK_SIZE)
        disk = str(path)
    print(f"demo: building (or reusing) the test guest in {default_cache_dir()} ...", flush=True)
    image = build_guest()

    with tempfile.TemporaryDirectory(prefix="dataplane-demo-") as tmp:
        sock = Path(tmp) / "vhost-user-blk.sock"
        cmd = [sys.executable, "-m", "dataplane", "serve", "--socket", str(sock),
               "--disk", disk, "--queues", str(queues)]
        print("demo: $ " + " ".join(cmd[2:]).replace("-m dataplane", "dataplane"), flush=True)
        backend = subprocess.Popen(cmd, stderr=sys.stderr, stdout=sys.stdout)
        try:
            _wait_for_socket(sock, backend)
            print(f"demo: booting a QEMU guest with vhost-user-blk-pci,num-queues={queues} "
                  f"and running fio for {runtime} s per queue ...", flush=True)
            size_mb = min(192, DEMO_DISK_SIZE >> 20)
            try:
                result = run_guest(image, fio_script(queues, runtime, size_mb), socket=sock,
                                   num_queues=queues, smp=queues, timeout=120 + 4 * runtime)
            except GuestTimeout as exc:
                print(exc.output[-3000:])
                print("demo: the guest timed out", file=sys.stderr)
                return 1
            for line in result.output.splitlines():
                if line.startswith(("guest sees", "q", "  read", "  write", "fio exit")) or "IOPS=" in line:
                    print("  guest| " + line.rstrip())
        finally:
            if backend.poll() is None:
                backend.send_signal(signal.SIGTERM)
            backend_status = backend.wait(timeout=60)
    ok = result.exit_status == 0 and backend_status == 0
    print(f"demo: {'PASSED' if ok else 'FAILED'}: guest fio status {result.exit_status}, "
          f"backend exit status {backend_status} (disk: {disk})")
    return 0 if ok else 1

