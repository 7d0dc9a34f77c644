"""Packed vs split virtqueues, side by side in one run: one `dataplane serve` on a null disk,
driven by `dataplane load --ring split` and `--ring packed` alternately (the order flips every
repetition), 4k randread at QD1, QD32 and QD128 on 1 and 2 queues; IOPS, median completion
latency and the backend's CPU per I/O (its process's utime + stime over the run, divided by the
I/Os it served), medians over the repetitions, and packed / split ratios:

    python bench/packed.py [--reps 5] [--seconds 3] [--cells 1:1,1:32,1:128,2:1,2:32,2:128]
                           [--json out.json]

The backend and the load generator share this machine: compare the two rings within a run,
never with a number from another run (other work on the host shifts both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.systems import Workload, dataplane_backend, run_dataplane_load, wait_quiet  # noqa: E402

RINGS = ("split", "packed")
CELLS = [(1, 1), (1, 32), (1, 128), (2, 1), (2, 32), (2, 128)]
DISK = "null:1G"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--ramp", type=float, default=0.5)
    p.add_argument("--cells", default=",".join(f"{q}:{qd}" for q, qd in CELLS),
                   help="QUEUES:IODEPTH,... (default: 1 and 2 queues at QD1, QD32, QD128)")
    p.add_argument("--quiet-cores", type=float, default=0.5,
                   help="before each run, wait (up to 10 s) until the host's other work is below this")
    p.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    args = p.parse_args()
    try:
        cells = [(int(c.split(":")[0]), int(c.split(":")[1])) for c in args.cells.split(",") if c]
    except (IndexError, ValueError):
        p.error(f"--cells {args.cells!r}: expected QUEUES:IODEPTH,...")
    work = Path(tempfile.mkdtemp(prefix="dp-packed-"))
    backend = dataplane_backend("serve", work / "vub.sock", DISK, max(q for q, _ in cells), work)
    runs: list[dict] = []
    load_before = os.getloadavg()
    backend.start()
    try:
        for rep in range(args.reps):
            for queues, qd in cells:
                for ring in RINGS if rep % 2 == 0 else RINGS[::-1]:
                    wait_quiet(args.quiet_cores, 10.0)
                    w = Workload(f"randread-{qd}", "randread", "4k", qd)
                    out = run_dataplane_load(backend.socket, w, queues, args.seconds, args.ramp,
                                             work / "run.json", backend, work / "load.log", ring=ring)
                    if out.error:
                        print(f"q{queues} qd{qd} {ring}: {out.error}")
                        return 1
                    job = out.data["jobs"][0]
                    assert job["dataplane"]["ring"] == ring, job["dataplane"]
                    read = job["read"]
                    runs.append({"rep": rep, "queues": queues, "iodepth": qd, "ring": ring,
                                 "iops": read["iops"],
                                 "p50_us": read["clat_ns"]["percentile"]["50.000000"] / 1e3,
                                 "cpu_us_per_io": out.backend_cpu_s / max(out.served_ios, 1) * 1e6,
                                 # cores the rest of the machine used during the run
                                 "other_cores": max(0.0, out.host_busy_s - out.ours_s) / out.wall_s})
    finally:
        backend.stop()
    if args.json is not None:
        args.json.write_text(json.dumps({"cells": cells, "reps": args.reps, "seconds": args.seconds,
                                         "argv": sys.argv, "loadavg_before": load_before,
                                         "loadavg_after": os.getloadavg(), "runs": runs},
                                        indent=1) + "\n")
    print(f"null disk, 4k randread, {args.reps} reps x {args.seconds:g} s, medians")
    print(f"{'queues':>6} {'QD':>4} | {'IOPS split':>10} {'packed':>10} {'ratio':>6} | "
          f"{'CPU us/IO split':>15} {'packed':>7} {'ratio':>6} | {'p50 us split':>12} {'packed':>7}")
    for queues, qd in cells:
        med = {}
        for ring in RINGS:
            rows = [r for r in runs if (r["queues"], r["iodepth"], r["ring"]) == (queues, qd, ring)]
            med[ring] = {k: statistics.median(r[k] for r in rows)
                         for k in ("iops", "p50_us", "cpu_us_per_io")}
        s, k = med["split"], med["packed"]
        print(f"{queues:>6} {qd:>4} | {s['iops']:>10.0f} {k['iops']:>10.0f} {k['iops'] / s['iops']:>6.3f} | "
              f"{s['cpu_us_per_io']:>15.2f} {k['cpu_us_per_io']:>7.2f} "
              f"{k['cpu_us_per_io'] / s['cpu_us_per_io']:>6.3f} | {s['p50_us']:>12.1f} {k['p50_us']:>7.1f}")
    # The two rings of one repetition ran back to back: their ratio cancels the machine's drift
    # better than a ratio of medians, and its spread over the repetitions says how far to trust it.
    print("\npacked / split within each repetition: median [min-max]; other work on the host (cores)")
    for queues, qd in cells:
        pairs = {}
        for r in runs:
            if (r["queues"], r["iodepth"]) == (queues, qd):
                pairs.setdefault(r["rep"], {})[r["ring"]] = r
        iops = [p["packed"]["iops"] / p["split"]["iops"] for p in pairs.values()]
        cpu = [p["packed"]["cpu_us_per_io"] / p["split"]["cpu_us_per_io"] for p in pairs.values()]
        other = [r["other_cores"] for p in pairs.values() for r in p.values()]
        print(f"{queues:>6} {qd:>4} | IOPS {statistics.median(iops):.3f} [{min(iops):.2f}-{max(iops):.2f}]"
              f" | CPU/IO {statistics.median(cpu):.3f} [{min(cpu):.2f}-{max(cpu):.2f}]"
              f" | other {statistics.median(other):.2f} [{min(other):.2f}-{max(other):.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
