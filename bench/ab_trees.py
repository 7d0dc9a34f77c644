"""A/B of two builds of dataplane: the same `serve` (defaults, one queue) from a baseline
checkout and from this tree, driven alternately by this tree's `dataplane load`; IOPS, median
latency and backend CPU per I/O for a few cells. Use it to prove (or refute) a change to the
I/O path:

    git worktree add /tmp/base <rev> && (cd /tmp/base && python -m dataplane._build)
    python bench/ab_trees.py --base /tmp/base [--reps 3] [--seconds 2] [--cells null:32,file:1]

Both trees must be built. Backends stay up for the whole run; the order alternates per
repetition; the table shows medians. `--base .` with `--base-serve-args` / `--serve-args`
compares one tree with itself under two settings (e.g. `--base-serve-args "--fixed none"`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.systems import Workload, dataplane_backend, run_dataplane_load  # noqa: E402

FILE = Path.home() / ".cache" / "dataplane" / "bench" / "disk-1g.img"
DISKS = {"null": "null:1G", "file": str(FILE), "lat80": "null:1G,latency=fixed:80us"}
CELLS = [("null", 32), ("null", 1), ("file", 1), ("file", 32), ("lat80", 32)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="the baseline checkout (built)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--cells", default=",".join(f"{d}:{qd}" for d, qd in CELLS),
                   help="DISK:IODEPTH,... with DISK one of null, file, lat80 (default: all five)")
    p.add_argument("--base-serve-args", default="", help="more options for the base tree's serve")
    p.add_argument("--serve-args", default="", help="more options for this tree's serve")
    p.add_argument("--load-args", default="", help="more options for `dataplane load` (both sides)")
    args = p.parse_args()
    try:
        cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",") if c]
    except (IndexError, ValueError):
        p.error(f"--cells {args.cells!r}: expected DISK:IODEPTH,...")
    if any(d not in DISKS for d, _ in cells):
        p.error(f"--cells: disks are {', '.join(DISKS)}")
    if not FILE.exists() and any(d == "file" for d, _ in cells):
        print(f"{FILE} is missing: run python -m bench.compare --only file --quick once to make it")
        return 2
    work = Path(tempfile.mkdtemp(prefix="dp-ab-"))
    backends = {}
    for tree, root, extra in (("base", args.base.resolve(), args.base_serve_args),
                              ("this", None, args.serve_args)):
        for d in sorted({d for d, _ in cells}):
            b = dataplane_backend(f"{tree}-{d}", work / f"{tree}-{d}.sock", DISKS[d], 1, work)
            b.argv += extra.split()
            if root is not None:
                b.cwd = root
            backends[(tree, d)] = b
    res: dict[tuple[str, int, str], list[tuple[float, float, float]]] = {}
    try:
        for b in backends.values():
            b.start()
        for rep in range(args.reps):
            for d, qd in cells:
                for tree in ("base", "this") if rep % 2 == 0 else ("this", "base"):
                    b = backends[(tree, d)]
                    out = run_dataplane_load(b.socket, Workload(f"randread-{qd}", "randread", "4k", qd), 1,
                                             args.seconds, 0.3, work / "run.json", b, work / "load.log",
                                             extra=tuple(args.load_args.split()))
                    if out.error:
                        print(f"{d}-qd{qd} {tree}: {out.error}")
                        return 1
                    read = out.data["jobs"][0]["read"]
                    res.setdefault((d, qd, tree), []).append(
                        (read["iops"], read["clat_ns"]["percentile"]["50.000000"] / 1e3,
                         out.backend_cpu_s / max(out.served_ios, 1) * 1e6))
    finally:
        for b in backends.values():
            b.stop()
    print(f"base: {args.base} {args.base_serve_args}; this: {ROOT} {args.serve_args}; "
          f"{args.reps} alternating runs of {args.seconds:g} s; load average {os.getloadavg()[0]:.2f}")
    print(f"{'cell':<12}{'tree':<6}{'IOPS':>10}{'p50 us':>9}{'CPU us/IO':>11}{'this/base':>11}")
    for (d, qd, tree), rows in sorted(res.items()):
        iops = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[2] for r in rows)
        ratio = ""
        if tree == "this":
            base = res[(d, qd, "base")]
            ratio = (f"{iops / statistics.median(r[0] for r in base):.3f} / "
                     f"{cpu / statistics.median(r[2] for r in base):.3f}")
        print(f"{d + '-qd' + str(qd):<12}{tree:<6}{iops:>10.0f}"
              f"{statistics.median(r[1] for r in rows):>9.1f}{cpu:>11.2f}{ratio:>16}")
    print("this/base: IOPS / CPU per I/O, ratios of the medians")
    return 0


if __name__ == "__main__":
    sys.exit(main())
