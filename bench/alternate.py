"""Variants of one `dataplane load` job against one `dataplane serve` on a null disk, side by
side in one run: every repetition runs each variant once per cell (queues, iodepth), the order
flipping every repetition, and the figures are medians over the repetitions. This is how
bench/packed.py (split vs packed rings) and bench/iommu.py (with and without a vIOMMU) compare
two ways of running on a machine whose other work shifts every number: within a run, as a
ratio, never against a figure from another run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.systems import Workload, dataplane_backend, run_dataplane_load, wait_quiet

DISK = "null:1G"
FIGURES = ("iops", "p50_us", "cpu_us_per_io")
Cell = tuple[int, int]


def add_arguments(p: argparse.ArgumentParser, cells: Sequence[Cell], cells_help: str) -> None:
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--ramp", type=float, default=0.5)
    p.add_argument("--cells", default=",".join(f"{q}:{qd}" for q, qd in cells),
                   help=f"QUEUES:IODEPTH,... (default: {cells_help})")
    p.add_argument("--cpus", default="",
                   help="pin the load generator's queue i to the i-th CPU of this list (the"
                        " backend pins its own threads)")
    p.add_argument("--quiet-cores", type=float, default=0.5,
                   help="before each run, wait (up to 10 s) until the host's other work is below this")
    p.add_argument("--json", type=Path, default=None, help="also write every run's figures here")


def parse_cells(p: argparse.ArgumentParser, text: str) -> list[Cell]:
    try:
        return [(int(c.split(":")[0]), int(c.split(":")[1])) for c in text.split(",") if c]
    except (IndexError, ValueError):
        p.error(f"--cells {text!r}: expected QUEUES:IODEPTH,...")
        raise


def run(args: argparse.Namespace, cells: Sequence[Cell], variants: dict[str, dict[str, Any]],
        key: str, check: Callable[[str, dict[str, Any]], None] | None = None) -> list[dict] | None:
    """4k randread on every cell with each variant (its keyword arguments for
    run_dataplane_load), alternated; each run's figures, the variant under `key`. None (after
    a line saying why) when a run failed. check(variant, job) may assert on the JSON job."""
    work = Path(tempfile.mkdtemp(prefix="dp-alternate-"))
    backend = dataplane_backend("serve", work / "vub.sock", DISK, max(q for q, _ in cells), work)
    names = list(variants)
    runs: list[dict] = []
    load_before = os.getloadavg()
    backend.start()
    try:
        for rep in range(args.reps):
            for queues, qd in cells:
                for name in names if rep % 2 == 0 else names[::-1]:
                    wait_quiet(args.quiet_cores, 10.0)
                    w = Workload(f"randread-{qd}", "randread", "4k", qd)
                    out = run_dataplane_load(backend.socket, w, queues, args.seconds, args.ramp,
                                             work / "run.json", backend, work / "load.log",
                                             cpus=args.cpus, **variants[name])
                    if out.error:
                        print(f"q{queues} qd{qd} {name}: {out.error}")
                        return None
                    job = out.data["jobs"][0]
                    if check is not None:
                        check(name, job)
                    read = job["read"]
                    runs.append({"rep": rep, "queues": queues, "iodepth": qd, key: name,
                                 "iops": read["iops"],
                                 "p50_us": read["clat_ns"]["percentile"]["50.000000"] / 1e3,
                                 "cpu_us_per_io": out.backend_cpu_s / max(out.served_ios, 1) * 1e6,
                                 # cores the rest of the machine used during the run
                                 "other_cores": max(0.0, out.host_busy_s - out.ours_s) / out.wall_s})
    finally:
        backend.stop()
    if args.json is not None:
        args.json.write_text(json.dumps({"cells": cells, "reps": args.reps, "seconds": args.seconds,
                                         key + "s": names, "argv": sys.argv,
                                         "loadavg_before": load_before,
                                         "loadavg_after": os.getloadavg(), "runs": runs},
                                        indent=1) + "\n")
    return runs


def medians(runs: list[dict], cell: Cell, names: Sequence[str], key: str) -> dict[str, dict[str, float]]:
    """variant -> its median figures on one cell."""
    out = {}
    for name in names:
        rows = [r for r in runs if (r["queues"], r["iodepth"], r[key]) == (*cell, name)]
        out[name] = {k: statistics.median(r[k] for r in rows) for k in FIGURES}
    return out


def paired(runs: list[dict], cell: Cell, variant: str, base: str, key: str) -> str:
    """variant / base within each repetition (the two ran back to back: their ratio cancels the
    machine's drift better than a ratio of medians, and its spread says how far to trust it):
    median [min-max] of IOPS and CPU per I/O, and the other work on the host meanwhile."""
    pairs: dict[int, dict[str, dict]] = {}
    for r in runs:
        if (r["queues"], r["iodepth"]) == cell:
            pairs.setdefault(r["rep"], {})[r[key]] = r
    pairs = {rep: p for rep, p in pairs.items() if variant in p and base in p}
    iops = [p[variant]["iops"] / p[base]["iops"] for p in pairs.values()]
    cpu = [p[variant]["cpu_us_per_io"] / p[base]["cpu_us_per_io"] for p in pairs.values()]
    other = [p[v]["other_cores"] for p in pairs.values() for v in (variant, base)]
    return (f"IOPS {statistics.median(iops):.3f} [{min(iops):.2f}-{max(iops):.2f}]"
            f" | CPU/IO {statistics.median(cpu):.3f} [{min(cpu):.2f}-{max(cpu):.2f}]"
            f" | other {statistics.median(other):.2f} [{min(other):.2f}-{max(other):.2f}]")

