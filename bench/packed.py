"""Packed vs split virtqueues, side by side in one run: one `dataplane serve` on a null disk,
driven by `dataplane load --ring split` and `--ring packed` alternately (the order flips every
repetition), 4k randread at QD1, QD32 and QD128 on 1 and 2 queues; IOPS, median completion
latency and the backend's CPU per I/O (its process's utime + stime over the run, divided by the
I/Os it served), medians over the repetitions, and packed / split ratios, also paired within
each repetition (bench/alternate.py):

    python bench/packed.py [--reps 5] [--seconds 3] [--cells 1:1,1:32,1:128,2:1,2:32,2:128]
                           [--cpus LIST] [--json out.json]

The backend and the load generator share this machine: compare the two rings within a run,
never with a number from another run (other work on the host shifts both).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import alternate  # noqa: E402

RINGS = ("split", "packed")
CELLS = [(1, 1), (1, 32), (1, 128), (2, 1), (2, 32), (2, 128)]


def _check_ring(ring: str, job: dict) -> None:
    assert job["dataplane"]["ring"] == ring, job["dataplane"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    alternate.add_arguments(p, CELLS, "1 and 2 queues at QD1, QD32, QD128")
    args = p.parse_args()
    cells = alternate.parse_cells(p, args.cells)
    runs = alternate.run(args, cells, {ring: {"ring": ring} for ring in RINGS}, "ring", _check_ring)
    if runs is None:
        return 1
    print(f"null disk, 4k randread, {args.reps} reps x {args.seconds:g} s, medians")
    print(f"{'queues':>6} {'QD':>4} | {'IOPS split':>10} {'packed':>10} {'ratio':>6} | "
          f"{'CPU us/IO split':>15} {'packed':>7} {'ratio':>6} | {'p50 us split':>12} {'packed':>7}")
    for queues, qd in cells:
        med = alternate.medians(runs, (queues, qd), RINGS, "ring")
        s, k = med["split"], med["packed"]
        print(f"{queues:>6} {qd:>4} | {s['iops']:>10.0f} {k['iops']:>10.0f} {k['iops'] / s['iops']:>6.3f} | "
              f"{s['cpu_us_per_io']:>15.2f} {k['cpu_us_per_io']:>7.2f} "
              f"{k['cpu_us_per_io'] / s['cpu_us_per_io']:>6.3f} | {s['p50_us']:>12.1f} {k['p50_us']:>7.1f}")
    print("\npacked / split within each repetition: median [min-max]; other work on the host (cores)")
    for cell in cells:
        print(f"{cell[0]:>6} {cell[1]:>4} | {alternate.paired(runs, cell, 'packed', 'split', 'ring')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
