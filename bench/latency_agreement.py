"""How closely the device's observed latency follows the configured distribution, per
percentile, on this host as it is and beside busy loops: the calibration of the bounds of
tests/protocol/test_latency.py::test_configured_and_observed_percentiles_per_queue (the same
job: a null disk with lognormal:p50=500us,p99=3ms, 2 queues x QD4 4k randread, 2 s a run).

    python bench/latency_agreement.py [--runs 4] [--hogs 0] [--spec null:64M,latency=...]

Each line is one run: observed / configured at p10, p50, p90 and p99 for each queue. --hogs N
starts N busy loops (`sh -c 'while :; do :; done'`) for the duration.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataplane.backend import EnginePool, ServerOptions, VhostUserBlkServer  # noqa: E402
from dataplane.core import ffi, lib  # noqa: E402
from dataplane.disks import open_disk  # noqa: E402
from dataplane.driver import Device  # noqa: E402
from dataplane.driver.load import Job  # noqa: E402

PERCENTILES = (10.0, 50.0, 90.0, 99.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--hogs", type=int, default=0, help="busy loops beside the runs")
    p.add_argument("--spec", default="null:64M,latency=lognormal:p50=500us,p99=3ms")
    args = p.parse_args()
    queues, job = 2, Job(rw="randread", bs=4096, iodepth=4, runtime=2.0)
    sock = Path(tempfile.mkdtemp()) / "latency.sock"
    disk = open_disk(args.spec)
    server = VhostUserBlkServer(disk, ServerOptions(socket_path=sock, num_queues=queues), EnginePool())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    while not sock.exists():
        time.sleep(0.01)
    hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(args.hogs)]
    try:
        for _ in range(args.runs):
            with Device.connect(str(sock), queues=queues, queue_size=job.queue_size(True),
                                memory=job.memory_needed(queues)) as dev:
                dev.load(job)
                line = []
                for q in range(queues):
                    hist = ffi.new("struct dp_hist *")
                    lib.dp_vq_get_latency(server.device.vrings[q].handle, hist)
                    line.append(f"vq{q} " + " ".join(
                        f"p{pct:g} {lib.dp_hist_percentile(hist, pct) / disk.latency.percentile_ns(pct):.3f}"
                        for pct in PERCENTILES))
                print(" | ".join(line), flush=True)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        server.stop()
        thread.join(timeout=30)
        server.close()
        disk.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
