"""Memory hotplug under a QEMU guest whose disk is `dataplane serve`.

The guest (TCG, `-m 1G,slots=16,maxmem=5G`) runs fio write+verify on a 2-queue file disk
while the host hot-plugs 12 DIMMs of 128 MiB over QMP (`object-add memory-backend-memfd,
share=on` + `device_add pc-dimm`): QEMU sends each to the backend as an ADD_MEM_REG while the
rings run, and the 8th is no longer refused ("a used vhost backend has no free memory slots
left"). The guest onlines them (`memhp_default_state=online_movable`: movable, so that they
can be taken away again) and a second fio job's buffers land in them: anonymous memory comes
from the Movable zone first, and the guest shows that zone's free pages dropping by the
buffers' size while that job runs. Then, with the disk idle, the host unplugs 4 of the DIMMs
(`device_del`, a REM_MEM_REG each once the guest has offlined them) and a last verify job
must still pass.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fio_scripts import timed_verify_job
from serve_process import ServeProcess

from dataplane.guest import GuestImage, Qmp, start_guest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(360)]

DISK_SIZE = 256 << 20
QUEUES = 2
DIMMS = 12
UNPLUG = 4
DIMM_MIB = 128
RUNNING_TIMEOUT = 90.0
FINISH_TIMEOUT = 200.0


GUEST_SCRIPT = f"""
memtotal() {{ awk '/MemTotal/ {{print $2}}' /proc/meminfo; }}
movable_free() {{ awk '/^Node/ {{z=$4}} z=="Movable" && /pages free/ {{print $3; exit}}' /proc/zoneinfo; }}
wait_memtotal() {{   # CMP KB: until MemTotal compares so (-ge / -le) with KB, 60 s at most
    i=0
    while ! [ "$(memtotal)" $1 $2 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
    [ "$(memtotal)" $1 $2 ]
}}
cat > /tmp/a.fio <<'EOF'
{timed_verify_job(30, "96m")}EOF
cat > /tmp/b.fio <<'EOF'
{timed_verify_job(8, "32m", "256k-512k", offsets=("96m", "224m"))}EOF
cat > /tmp/c.fio <<'EOF'
{timed_verify_job(5, "32m", "4k-64k")}EOF
w0=$(awk '{{print $5}}' /sys/block/vda/stat)
fio /tmp/a.fio > /tmp/a.out 2>&1 &
apid=$!
while [ "$(awk '{{print $5}}' /sys/block/vda/stat)" = "$w0" ] && kill -0 $apid 2>/dev/null; do
    sleep 0.05
done
base=$(memtotal)
echo "DP-FIO-RUNNING $base"
wait_memtotal -ge $((base + {DIMMS * DIMM_MIB * 1024})) && echo "DP-MEM-ADDED $(memtotal)" \\
    || echo "DP-MEM-NOT-ADDED $(memtotal)"
before=$(movable_free)
fio /tmp/b.fio > /tmp/b.out 2>&1 &
bpid=$!
during=$before   # the lowest free count while b runs (a loaded host starts fio late)
while kill -0 $bpid 2>/dev/null; do
    f=$(movable_free)
    [ "$f" -lt "$during" ] && during=$f
    sleep 0.2
done
echo "DP-MOVABLE before=$before during=$during"
wait $bpid
echo "DP-FIO-RC b $?"
wait $apid
echo "DP-FIO-RC a $?"
added=$(memtotal)
echo DP-UNPLUG-READY
wait_memtotal -le $((added - {UNPLUG * DIMM_MIB * 1024})) && echo "DP-MEM-REMOVED $(memtotal)" \\
    || echo "DP-MEM-NOT-REMOVED $(memtotal)"
fio /tmp/c.fio > /tmp/c.out 2>&1
echo "DP-FIO-RC c $?"
for f in a b c; do grep -E 'err=|verify' /tmp/$f.out | sed "s/^ */DP-FIO $f /"; done
dmesg | grep -E 'I/O error|not a head|memory|Memory' | tail -20 | sed 's/^/DP-DMESG /'
echo DP-DONE
"""


def test_twelve_dimms_under_fio_then_four_unplugged(guest_image: GuestImage, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", str(DISK_SIZE), str(disk)], check=True)
    sock, qmp_sock = tmp_path / "vub.sock", tmp_path / "qmp.sock"
    backend = ServeProcess(tmp_path / "serve.log", sock, str(disk), ("--queues", str(QUEUES)))
    guest = start_guest(guest_image, GUEST_SCRIPT, socket=sock, num_queues=QUEUES,
                        memory_slots=16, max_memory_mb=5120,
                        kernel_args=["memhp_default_state=online_movable"],
                        extra_args=["-qmp", f"unix:{qmp_sock},server=on,wait=off"],
                        log_path=tmp_path / "console.log")
    qmp = None

    def diag() -> str:
        lines = [x for x in backend.log().splitlines() if "memory" in x or "ERROR" in x]
        return f"\n--- guest (tail) ---\n{guest.output[-3000:]}\n--- backend ---\n" + "\n".join(lines[-40:])

    def markers(prefix: str) -> list[str]:
        return [x.rstrip() for x in guest.output.splitlines() if x.startswith(prefix)]

    try:
        qmp = Qmp(qmp_sock)
        assert guest.wait_for_output("DP-FIO-RUNNING", RUNNING_TIMEOUT), diag()
        for i in range(DIMMS):
            qmp.cmd("object-add", {"qom-type": "memory-backend-memfd", "id": f"mem{i}",
                                   "size": DIMM_MIB << 20, "share": True})
            qmp.cmd("device_add", driver="pc-dimm", id=f"dimm{i}", memdev=f"mem{i}")
        assert guest.wait_for_output("DP-UNPLUG-READY", FINISH_TIMEOUT), diag()
        assert markers("DP-MEM-ADDED"), diag()
        for i in range(DIMMS - UNPLUG, DIMMS):
            qmp.cmd("device_del", id=f"dimm{i}")
        for i in range(DIMMS - UNPLUG, DIMMS):
            qmp.wait_event("DEVICE_DELETED", 60, device=f"dimm{i}")
            qmp.cmd("object-del", id=f"mem{i}")
        assert guest.wait_for_output("DP-DONE", FINISH_TIMEOUT), diag()
        deadline = time.monotonic() + 20
        while guest.running() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        if qmp is not None:
            qmp.close()
        guest.kill()
    out = diag()
    assert markers("DP-MEM-REMOVED"), out
    assert markers("DP-FIO-RC") == ["DP-FIO-RC b 0", "DP-FIO-RC a 0", "DP-FIO-RC c 0"], out
    errs = [x for x in markers("DP-FIO") if re.search(r"err=\s*[1-9]", x)]
    assert not errs and len([x for x in markers("DP-FIO ") if "err=" in x]) == 6, out
    bad = [x for x in markers("DP-DMESG") if "I/O error" in x or "not a head" in x]
    assert not bad, out
    # The second job's buffers came out of the hot-plugged (Movable) memory.
    m = re.search(r"DP-MOVABLE before=(\d+) during=(\d+)", guest.output)
    assert m, out
    before, during = int(m[1]), int(m[2])
    assert before > DIMMS * DIMM_MIB * 256 * 0.9, f"the DIMMs are not Movable memory{out}"
    assert before - during >= 2 * 32 * 512 * 1024 // 4096 * 0.9, f"fio's buffers are elsewhere{out}"
    log = backend.log()
    added = re.findall(r"memory: added gpa (0x[0-9a-f]+)", log)
    removed = re.findall(r"memory: removed gpa (0x[0-9a-f]+)", log)
    assert len(added) == 1 + DIMMS and all(int(g, 16) >= 1 << 32 for g in added[1:]), out
    assert len(removed) == UNPLUG, out
    backend.proc.send_signal(signal.SIGTERM)
    assert backend.proc.wait(20) == 0, out
    assert " ERROR " not in backend.log() and "ring broken" not in backend.log(), out
