"""Two QEMU guests on two exports of one `dataplane serve`, fio verify in both at once; one
export is removed by force (JSON-RPC export_remove) in the middle of its guest's run: that
guest's fio sees I/O errors, the other one finishes clean."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from fio_scripts import fio_job_errors, fio_verify_script
from serve_process import DaemonProcess

from dataplane.guest import GuestImage, GuestTimeout, start_guest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

DISK_SIZE = 256 << 20
GUEST_TIMEOUT = 240.0

# The survivor: two fio jobs (one per vCPU, so one per virtqueue) writing and verifying.
SURVIVOR = fio_verify_script(size_mib=96, stride_mib=128)

# The victim: I/O until its disk goes away (fio stops at the first error).
VICTIM = r"""
echo DP-FIO-START
fio --name=victim --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=8 --bs=4k \
    --rw=randrw --time_based --runtime=150 --numjobs=2 --group_reporting > /tmp/fio.out 2>&1
rc=$?
grep -E 'err=' /tmp/fio.out | sed 's/^ */DP-FIO /'
echo "DP-IOERRS $(dmesg | grep -c 'I/O error')"
echo "DP-FIO-RC $rc"
exit 0
"""


def test_two_guests_on_one_daemon_one_export_removed_by_force(guest_image: GuestImage,
                                                              tmp_path: Path) -> None:
    exports = []
    for name in ("survivor", "victim"):
        img = tmp_path / f"{name}.img"
        subprocess.run(["truncate", "-s", str(DISK_SIZE), str(img)], check=True)
        exports.append({"name": name, "disk": str(img), "socket": str(tmp_path / f"{name}.sock"),
                        "queues": 2})
    daemon = DaemonProcess(tmp_path, exports)
    guests = {}
    try:
        for name, script in (("survivor", SURVIVOR), ("victim", VICTIM)):
            guests[name] = start_guest(guest_image, script, socket=tmp_path / f"{name}.sock",
                                       num_queues=2, memory_mb=512,
                                       log_path=tmp_path / f"{name}-console.log")
        for name, guest in guests.items():
            assert guest.wait_for_output("DP-FIO-START", GUEST_TIMEOUT), (
                f"{name} did not start fio:\n{guest.output[-3000:]}\n{daemon.log()[-3000:]}")
        time.sleep(2)   # both guests doing I/O
        with daemon.client() as c:
            assert {e["name"]: e["attached"] for e in c.export_list()} == {"survivor": True, "victim": True}
            assert c.export_remove("victim", force=True) == {"name": "victim", "removed": True}
            assert [e["name"] for e in c.export_list()] == ["survivor"]
        assert "DP-FIO-RC" not in guests["survivor"].output, (
            "the survivor's fio ended before the removal: the test proved nothing (give it more work)")
        survivor = guests["survivor"].wait(GUEST_TIMEOUT)
        try:
            victim = guests["victim"].wait(60)
            victim_out = victim.output
        except GuestTimeout as exc:     # its disk is gone: a guest may also hang on it
            victim_out = exc.output
    finally:
        for guest in guests.values():
            guest.kill()
        log = daemon.log()
        rc = daemon.terminate()
    diag = f"\n--- daemon ---\n{log[-4000:]}"
    out = survivor.output
    assert "DP-MQ 2" in out
    jobs = fio_job_errors(out)
    assert jobs == {"q0": "0", "q1": "0"}, f"survivor's fio: {jobs}\n{out[-3000:]}{diag}"
    assert "DP-FIO-RC 0" in out and survivor.exit_status == 0, f"{out[-3000:]}{diag}"

    err = re.search(r"DP-FIO victim: \(groupid=\d+, jobs=\d+\): err=\s*(\d+)", victim_out)
    assert err and err[1] != "0", f"the victim's fio saw no error:\n{victim_out[-3000:]}{diag}"
    ioerrs = re.search(r"DP-IOERRS (\d+)", victim_out)
    assert ioerrs and int(ioerrs[1]) > 0, f"no I/O error in the victim's kernel log:\n{victim_out[-3000:]}"
    assert re.search(r"DP-FIO-RC [1-9]", victim_out), victim_out[-2000:]

    assert rc == 0, diag
    assert "[victim] removing: 2 queue(s) drained" in log, diag
    survivor_stops = re.findall(r"\[survivor\] vq\d stopped at .*, (\d+) errors", log)
    assert survivor_stops and set(survivor_stops) == {"0"}, diag
    assert not (tmp_path / "victim.sock").exists()
