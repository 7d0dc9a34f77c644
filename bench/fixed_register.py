"""What registering guest memory as fixed buffers costs at queue start: the time from connecting
a frontend to a file-disk backend to its first queue running, with `--fixed none` and with
`--fixed all` (every region of guest memory pinned on the I/O thread), alternating:

    python bench/fixed_register.py [--memory 2g] [--reps 2] [--file PATH]

The frontend's guest memory is a fresh memfd each time, untouched: registration faults every
page in (and zeroes it) before pinning it, as it would a VM's memory not yet used. Prints the
connect times and the backend's fixed_buffers gauge.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataplane.backend import EnginePool, ServerOptions, VhostUserBlkServer  # noqa: E402
from dataplane.disks import open_disk  # noqa: E402
from dataplane.driver import Device  # noqa: E402
from dataplane.units import parse_size  # noqa: E402

FILE = Path.home() / ".cache" / "dataplane" / "bench" / "disk-1g.img"


def connect_time(path: Path, fixed: str, memory: int, work: Path) -> tuple[float, int]:
    disk = open_disk(str(path), fixed=fixed)
    sock = work / f"reg-{fixed}.sock"
    server = VhostUserBlkServer(disk, ServerOptions(socket_path=sock, num_queues=1), EnginePool(poll_ns=0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        while not sock.exists():
            time.sleep(0.01)
        t0 = time.monotonic()
        # registration answers SET_VRING_ENABLE only when it is done: give it time
        with Device.connect(str(sock), queues=1, memory=memory, timeout=600) as dev:
            elapsed = time.monotonic() - t0
            buffers = server.device.stats()[0]["fixed_buffers"]
            dev.write(0, b"x" * 4096)
    finally:
        server.stop()
        thread.join(30)
        server.close()
        disk.close()
    return elapsed, buffers


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", default="2g", help="guest memory (default 2g)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--file", type=Path, default=FILE)
    args = p.parse_args()
    memory = parse_size(args.memory)
    work = Path(tempfile.mkdtemp(prefix="dp-fixed-register-"))
    times: dict[str, list[float]] = {"none": [], "all": []}
    for rep in range(args.reps):
        for fixed in ("none", "all") if rep % 2 == 0 else ("all", "none"):
            elapsed, buffers = connect_time(args.file, fixed, memory, work)
            times[fixed].append(elapsed)
            print(f"--fixed {fixed:<4} connect {elapsed:7.3f} s  fixed_buffers {buffers}")
    for fixed, t in times.items():
        print(f"--fixed {fixed}: median {statistics.median(t):.3f} s over {len(t)} "
              f"({args.memory} of guest memory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
