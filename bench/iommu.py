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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import alternate  # noqa: E402

MODES = {"off": {}, "static": {"extra": ("--iommu", "run")},
         "strict": {"extra": ("--iommu", "request")}}
CELLS = [(1, 32), (2, 32)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    alternate.add_arguments(p, CELLS, "1 and 2 queues at QD32")
    p.add_argument("--modes", default=",".join(MODES), help="of off,static,strict")
    args = p.parse_args()
    cells = alternate.parse_cells(p, args.cells)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes) or "off" not in modes:
        p.error(f"--modes {args.modes!r}: off and any of static, strict")
    runs = alternate.run(args, cells, {m: MODES[m] for m in modes}, "mode")
    if runs is None:
        return 1
    print(f"null disk, 4k randread, {args.reps} reps x {args.seconds:g} s, medians; ratios: mode / off")
    print(f"{'queues':>6} {'QD':>4} {'mode':>7} | {'IOPS':>10} {'ratio':>6} | "
          f"{'CPU us/IO':>9} {'ratio':>6} | {'p50 us':>8}")
    for queues, qd in cells:
        med = alternate.medians(runs, (queues, qd), modes, "mode")
        off = med["off"]
        for mode in modes:
            m = med[mode]
            print(f"{queues:>6} {qd:>4} {mode:>7} | {m['iops']:>10.0f} {m['iops'] / off['iops']:>6.3f} | "
                  f"{m['cpu_us_per_io']:>9.2f} {m['cpu_us_per_io'] / off['cpu_us_per_io']:>6.3f} | "
                  f"{m['p50_us']:>8.1f}")
    print("\nmode / off within each repetition: median [min-max]; other work on the host (cores)")
    for cell in cells:
        for mode in (m for m in modes if m != "off"):
            ratios = alternate.paired(runs, cell, mode, "off", "mode")
            print(f"{cell[0]:>6} {cell[1]:>4} {mode:>7} | {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
