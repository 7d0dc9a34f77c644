"""The cost of the vIOMMU's translation, side by side in one run: one `dataplane serve` on a
null disk, driven by `dataplane load` without a vIOMMU ("off"), behind one with its buffers
mapped once for the run ("static": `--iommu run`, the IOTLB filled before the run, one
4 KiB entry per page as QEMU sends them) and with one map + unmap per request ("strict":
`--iommu request`, an UPDATE before each request is published and an INVALIDATE once it
completed, as a guest in strict IOMMU mode makes QEMU send them). 4k randread at QD32 on 1
and 2 queues; the systems alternate within every repetition (the order flips each time);
IOPS, median completion latency and the backend's CPU per I/O (its process's utime + stime
over the run, divided by the I/Os it served), medians over the repetitions, and each
vIOMMU mode / off:

    python bench/iommu.py [--reps 5] [--seconds 3] [--cells 1:32,2:32] [--cpus 0,1]
                          [--json out.json]

The backend and the load generator share this machine: compare the modes within a run, never
with a number from another run (other work on the host shifts all of them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.systems import Workload, dataplane_backend, run_dataplane_load, wait_quiet  # noqa: E402

MODES = {"off": (), "static": ("--iommu", "run"), "strict": ("--iommu", "request")}
CELLS = [(1, 32), (2, 32)]
DISK = "null:1G"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--ramp", type=float, default=0.5)
    p.add_argument("--cells", default=",".join(f"{q}:{qd}" for q, qd in CELLS),
                   help="QUEUES:IODEPTH,... (default: 1 and 2 queues at QD32)")
    p.add_argument("--modes", default=",".join(MODES), help="of off,static,strict")
    p.add_argument("--cpus", default="",
                   help="pin the load generator's queue i to the i-th CPU of this list (the"
                        " backend pins its own threads)")
    p.add_argument("--quiet-cores", type=float, default=0.5,
                   help="before each run, wait (up to 10 s) until the host's other work is below this")
    p.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    args = p.parse_args()
    try:
        cells = [(int(c.split(":")[0]), int(c.split(":")[1])) for c in args.cells.split(",") if c]
    except (IndexError, ValueError):
        p.error(f"--cells {args.cells!r}: expected QUEUES:IODEPTH,...")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes) or "off" not in modes:
        p.error(f"--modes {args.modes!r}: off and any of static, strict")
    work = Path(tempfile.mkdtemp(prefix="dp-iommu-"))
    backend = dataplane_backend("serve", work / "vub.sock", DISK, max(q for q, _ in cells), work)
    runs: list[dict] = []
    backend.start()
    try:
        for rep in range(args.reps):
            for queues, qd in cells:
                for mode in modes if rep % 2 == 0 else modes[::-1]:
                    wait_quiet(args.quiet_cores, 10.0)
                    w = Workload(f"randread-{qd}", "randread", "4k", qd)
                    out = run_dataplane_load(backend.socket, w, queues, args.seconds, args.ramp,
                                             work / "run.json", backend, work / "load.log",
                                             cpus=args.cpus, extra=MODES[mode])
                    if out.error:
                        print(f"q{queues} qd{qd} {mode}: {out.error}")
                        return 1
                    read = out.data["jobs"][0]["read"]
                    runs.append({"rep": rep, "queues": queues, "iodepth": qd, "mode": mode,
                                 "iops": read["iops"],
                                 "p50_us": read["clat_ns"]["percentile"]["50.000000"] / 1e3,
                                 "cpu_us_per_io": out.backend_cpu_s / max(out.served_ios, 1) * 1e6})
    finally:
        backend.stop()
    if args.json is not None:
        args.json.write_text(json.dumps({"cells": cells, "reps": args.reps, "seconds": args.seconds,
                                         "modes": modes, "runs": runs}, indent=1) + "\n")
    print(f"null disk, 4k randread, {args.reps} reps x {args.seconds:g} s, medians; ratios: mode / off")
    print(f"{'queues':>6} {'QD':>4} {'mode':>7} | {'IOPS':>10} {'ratio':>6} | "
          f"{'CPU us/IO':>9} {'ratio':>6} | {'p50 us':>8}")
    for queues, qd in cells:
        med = {}
        for mode in modes:
            rows = [r for r in runs if (r["queues"], r["iodepth"], r["mode"]) == (queues, qd, mode)]
            med[mode] = {k: statistics.median(r[k] for r in rows)
                         for k in ("iops", "p50_us", "cpu_us_per_io")}
        off = med["off"]
        for mode in modes:
            m = med[mode]
            print(f"{queues:>6} {qd:>4} {mode:>7} | {m['iops']:>10.0f} {m['iops'] / off['iops']:>6.3f} | "
                  f"{m['cpu_us_per_io']:>9.2f} {m['cpu_us_per_io'] / off['cpu_us_per_io']:>6.3f} | "
                  f"{m['p50_us']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
