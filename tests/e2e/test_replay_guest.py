"""End-to-end: a block trace converted with `dataplane trace convert --to fio-v3` and replayed
by real fio (`read_iolog=`) inside the QEMU test guest against `dataplane serve`.

The trace (blkparse text, written here) holds reads, writes and PREFLUSH writes (a flush, then
the write). fio must finish without error, and the requests the backend served (its per-queue
stop lines, summed over queues) must be the trace's, once what the guest kernel read before fio
started (partition probing, from /sys/block/vda/stat) is taken off.

No discards: fio (3.33 here) parses iolog trims but never issues them (axboe/fio#769; its
"issued rwts" says 0 trims), so they could not be counted at the backend. `dataplane replay`
turns trims into DISCARD itself (tests/protocol/test_replay.py).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dataplane.guest import GuestImage, GuestTimeout, run_guest

if TYPE_CHECKING:
    from conftest import Backend  # tests/e2e/conftest.py

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent.parent
GUEST_TIMEOUT = 150.0
DISCONNECT_TIMEOUT = 15.0
SECTOR = 512
KiB, MiB = 1 << 10, 1 << 20
STAT_RE = re.compile(r"^DP-STAT (\w+) (.*)$")
# /sys/block/<dev>/stat: fields 1, 5, 12, 16 (1-based) count read, write, discard, flush requests
STAT_FIELDS = {"reads": 0, "writes": 4, "discards": 11, "flushes": 15}


def write_blkparse(path: Path, n: int, region: int, seed: int = 5) -> Path:
    """Q events as blkparse prints them: reads, writes, PREFLUSH writes, 1-2 ms apart."""
    rng = random.Random(seed)
    t_ns = 1000
    lines = []
    for seq in range(1, n + 1):
        r = rng.random()
        if r < 0.55:
            rwbs, length = "R", rng.choice([4, 8, 16, 64]) * KiB
        elif r < 0.9:
            rwbs, length = "WS", rng.choice([4, 8, 16, 64]) * KiB
        else:
            rwbs, length = "FWFS", 4 * KiB
        offset = rng.randrange(0, region - length, 4096)
        cpu = seq % 2
        lines.append(f"  8,16  {cpu:2d} {seq:8d} {t_ns // 10**9:5d}.{t_ns % 10**9:09d}  1201  Q {rwbs:>4s} "
                     f"{offset // SECTOR} + {length // SECTOR} [fio]")
        t_ns += rng.randrange(1_000_000, 2_000_000)
    path.write_text("\n".join(lines) + "\n")
    return path


def dataplane(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dataplane", *args], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, f"dataplane {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


def guest_script(iolog: str) -> str:
    return f"""
cat > /tmp/trace.iolog <<'EOF'
{iolog}EOF
echo "DP-STAT before $(cat /sys/block/vda/stat)"
fio --name=replay --read_iolog=/tmp/trace.iolog --ioengine=psync --direct=1 --invalidate=0 \\
    > /tmp/fio.out 2>&1
rc=$?
echo "DP-STAT after $(cat /sys/block/vda/stat)"
echo "DP-FIO-RC $rc"
grep -E 'err=|issued rwts' /tmp/fio.out | sed 's/^ */DP-FIO /'
[ $rc -eq 0 ] || tail -n 40 /tmp/fio.out
exit $rc
"""


def _stat(output: str, which: str) -> dict[str, int]:
    for line in output.splitlines():
        m = STAT_RE.match(line.strip())
        if m and m.group(1) == which:
            fields = [int(v) for v in m.group(2).split()]
            return {name: fields[i] for name, i in STAT_FIELDS.items()}
    raise AssertionError(f"no DP-STAT {which} line in the guest output:\n{output[-3000:]}")


@pytest.mark.parametrize("backend", [pytest.param(("file", 2), id="file-q2"),
                                     pytest.param(("null", 1), id="null-q1")], indirect=True)
def test_fio_replays_a_converted_trace(guest_image: GuestImage, backend: Backend, tmp_path: Path) -> None:
    trace = write_blkparse(tmp_path / "trace.blkparse.txt", 160, backend.disk_size - 16 * MiB)
    iolog = tmp_path / "trace.iolog"
    dataplane("trace", "convert", str(trace), "--to", "fio-v3", "--device", "/dev/vda", "-o", str(iolog))
    stats = json.loads(dataplane("trace", "stats", str(trace), "--json"))
    want = {"reads": stats["ops"]["read"], "writes": stats["ops"]["write"],
            "discards": stats["ops"]["trim"], "flushes": stats["ops"]["flush"]}
    assert want["reads"] and want["writes"] and want["flushes"] and not want["discards"], want

    try:
        result = run_guest(guest_image, guest_script(iolog.read_text()), socket=backend.socket,
                           num_queues=backend.queues, timeout=GUEST_TIMEOUT,
                           log_path=tmp_path / "console.log")
    except GuestTimeout as exc:
        pytest.fail(f"{exc}\n--- backend log (tail) ---\n{backend.log_tail()}")
    out = result.output
    diag = f"\n--- guest console (tail) ---\n{out[-4000:]}\n--- backend log ---\n{backend.log_tail()}"
    assert result.markers("DP-FIO-RC") == ["DP-FIO-RC 0"], f"fio failed{diag}"
    assert result.exit_status == 0, diag
    assert any(" err= 0" in line for line in result.markers("DP-FIO")), diag
    issued = f"issued rwts: total={want['reads']},{want['writes']},0,{want['flushes']} "
    assert any(issued in line for line in result.markers("DP-FIO")), f"fio did not issue {issued}{diag}"

    # The guest's own counters: a flush is an empty PREFLUSH write, counted as a write too.
    before, after = _stat(out, "before"), _stat(out, "after")
    guest = {k: after[k] - before[k] for k in want}
    guest["writes"] -= guest["flushes"]
    assert guest == want, f"guest block-layer counts {guest}{diag}"

    assert backend.wait_for_log("front end disconnected", DISCONNECT_TIMEOUT), diag
    served = backend.final_queue_stats()
    assert sorted(served) == list(range(backend.queues)), diag
    assert not any(s.errors or s.broken for s in served.values()), diag
    total = {k: sum(getattr(s, k) for s in served.values()) for k in want}
    assert {k: total[k] - before[k] for k in want} == want, (
        f"backend served {total}, guest had issued {before} before fio; trace {want}{diag}")
