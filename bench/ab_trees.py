"""A/B of two builds of dataplane: the same `serve` (defaults) from a baseline checkout and from
this tree, driven alternately by this tree's `dataplane load`; IOPS, median latency and backend
CPU per I/O for a few cells. Use it to prove (or refute) a change to the I/O path:

    git worktree add /tmp/base <rev> && (cd /tmp/base && python -m dataplane._build)
    python bench/ab_trees.py --base /tmp/base [--reps 3] [--seconds 2]

Both trees must be built. Backends stay up for the whole run; the order alternates per
repetition; the table shows medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.systems import proc_cpu_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
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
    trees = {"base": args.base.resolve(), "this": ROOT}
    work = Path(tempfile.mkdtemp(prefix="dp-ab-"))
    procs = {}
    for tree, root in trees.items():
        for d, spec in DISKS.items():
            if not any(d == c for c, _ in cells):
                continue
            sock = work / f"{tree}-{d}.sock"
            argv = [sys.executable, "-m", "dataplane", "--log-level", "warning", "serve", "--socket",
                    str(sock), "--disk", spec, "--queues", "1"] + (["--cache", "none"] if d == "file" else [])
            procs[(tree, d)] = (subprocess.Popen(argv, cwd=root), sock)
    time.sleep(3)
    res: dict[tuple[str, int, str], list[tuple[float, float, float]]] = {}
    try:
        for rep in range(args.reps):
            for d, qd in cells:
                for tree in (list(trees) if rep % 2 == 0 else list(trees)[::-1]):
                    proc, sock = procs[(tree, d)]
                    out = work / "run.json"
                    c0 = proc_cpu_seconds(proc.pid)
                    subprocess.run([sys.executable, "-m", "dataplane", "--log-level", "warning", "load",
                                    "--socket", str(sock), "--queues", "1", "--rw", "randread", "--bs", "4k",
                                    "--iodepth", str(qd), "--runtime", f"{args.seconds:g}", "--ramp", "0.3",
                                    "--output-format", "json", "--output", str(out)],
                                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
                    cpu = proc_cpu_seconds(proc.pid) - c0
                    job = json.loads(out.read_text())["jobs"][0]
                    ios = job.get("dataplane", {}).get("issued") or job["read"]["total_ios"]
                    res.setdefault((d, qd, tree), []).append(
                        (job["read"]["iops"], job["read"]["clat_ns"]["percentile"]["50.000000"] / 1e3,
                         cpu / max(ios, 1) * 1e6))
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait()
    print(f"{'cell':<12}{'tree':<6}{'IOPS':>10}{'p50 us':>9}{'CPU us/IO':>11}")
    for (d, qd, tree), rows in sorted(res.items()):
        print(f"{d + '-qd' + str(qd):<12}{tree:<6}{statistics.median(r[0] for r in rows):>10.0f}"
              f"{statistics.median(r[1] for r in rows):>9.1f}{statistics.median(r[2] for r in rows):>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
