"""Dirty logging and memory slots: what they cost the data path, and how long a memory table
change pauses it.

    python -m bench.migration [--reps 5] [--seconds 3] [--out FILE.json]

Part 1: `dataplane load` against `dataplane serve` (null disk, 4k randread, QD32, 1 and 2
queues), four configurations alternating within each repetition (order rotated per
repetition): plain; `--log-all` (a dirty log, LOG_ALL and VHOST_VRING_F_LOG on, harvested
every 100 ms as a migration's iterations do); `--mem-regions 64` (guest memory as 64
regions, sent as ADD_MEM_REG); both. Medians of IOPS and of the backend's CPU per I/O, and
their ratios to plain.

Part 2: memory table changes while two queues run QD32 (null disk, and null with 1 ms of
emulated latency): round trips of ADD_MEM_REG and REM_MEM_REG (the queues keep running; a
REM is answered once the requests popped before it are done) and, for comparison, of
SET_MEM_TABLE re-sent (every queue quiesced, the table remapped, the queues resumed); and the
pause the data path sees: per repetition, three loads (no change, ADD+REM pairs, SET_MEM_TABLE
re-sends) and their completion latency (p99.99, max) and IOPS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.systems import Workload, dataplane_backend, run_dataplane_load, wait_quiet  # noqa: E402

CONFIGS = {
    "plain": (),
    "log-all": ("--log-all",),
    "regions-64": ("--mem-regions", "64"),
    "log-all+regions-64": ("--log-all", "--mem-regions", "64"),
}


def part1(work: Path, reps: int, seconds: float) -> dict:
    w = Workload("randread-4k-qd32", "randread", "4k", 32)
    res: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for queues in (1, 2):
        b = dataplane_backend(f"null-q{queues}", work / f"q{queues}.sock", "null:1G", queues, work)
        b.start()
        try:
            names = list(CONFIGS)
            for rep in range(reps):
                order = names[rep % len(names):] + names[:rep % len(names)]
                for name in order:
                    wait_quiet(0.5, 10.0)
                    out = run_dataplane_load(b.socket, w, queues, seconds, 0.5, work / "run.json", b,
                                             work / "load.log", extra=CONFIGS[name])
                    if out.error:
                        raise SystemExit(f"q{queues} {name}: {out.error}")
                    iops = out.data["jobs"][0]["read"]["iops"]
                    cpu_us = out.backend_cpu_s / max(out.served_ios, 1) * 1e6
                    other = max(0.0, out.host_busy_s - out.ours_s) / out.wall_s
                    res.setdefault((queues, name), []).append((iops, cpu_us, rep, other))
        finally:
            b.stop()
    table = {}
    for queues in (1, 2):
        base = res[(queues, "plain")]
        base_iops = statistics.median(r[0] for r in base)
        base_cpu = statistics.median(r[1] for r in base)
        for name in CONFIGS:
            rows = res[(queues, name)]
            iops = statistics.median(r[0] for r in rows)
            cpu = statistics.median(r[1] for r in rows)
            # the same repetition's plain run ran beside it: the ratio within a repetition
            plain = {r[2]: r for r in base}
            paired = [(r[0] / plain[r[2]][0], r[1] / plain[r[2]][1]) for r in rows]
            table[f"q{queues} {name}"] = {"iops": iops, "cpu_us_per_io": cpu,
                                          "iops_ratio": iops / base_iops, "cpu_ratio": cpu / base_cpu,
                                          "paired_iops": [p[0] for p in paired],
                                          "paired_cpu": [p[1] for p in paired],
                                          "runs": [{"iops": r[0], "cpu_us_per_io": r[1], "rep": r[2],
                                                    "other_cores": r[3]} for r in rows]}
    return table


PART2_MODES = ("none", "ADD+REM", "SET_MEM_TABLE")


def part2(work: Path, seconds: float, cycles: int, reps: int) -> dict:
    """Per disk, one connection; per repetition three loads (2 queues, QD32) in a rotated order:
    no table change, `cycles` ADD_MEM_REG + REM_MEM_REG pairs, `cycles` SET_MEM_TABLE re-sends.
    The round trips are what the control plane waits; the data path's pause shows in the
    load's own completion latency (max, p99.99) against the run without changes: a request
    held by a quiesce completes that much later."""
    from dataplane.driver import Device
    from dataplane.driver.load import Job, run_load

    out = {}
    for disk in ("null:1G", "null:1G,latency=fixed:1ms"):
        b = dataplane_backend("memslots", work / "m.sock", disk, 2, work)
        b.start()
        trips: dict[str, list[float]] = {"ADD_MEM_REG": [], "REM_MEM_REG": [], "SET_MEM_TABLE": []}
        loads: dict[str, list[dict]] = {m: [] for m in PART2_MODES}
        try:
            job = Job(rw="randread", bs=4096, iodepth=32, runtime=seconds + 2)
            with Device.connect(str(b.socket), queues=2, memory=job.memory_needed(2)) as dev:
                for rep in range(reps):
                    for mode in PART2_MODES[rep % 3:] + PART2_MODES[:rep % 3]:
                        result: dict = {}
                        t = threading.Thread(target=lambda r=result, d=dev, j=job:
                                             r.setdefault("r", run_load(d, j)))
                        t.start()
                        time.sleep(0.5)
                        for _ in range(cycles):
                            t0 = time.monotonic()
                            if mode == "ADD+REM":
                                area = dev.add_memory(1 << 20)
                                t1 = time.monotonic()
                                dev.remove_memory(area)
                                trips["ADD_MEM_REG"].append((t1 - t0) * 1e3)
                                trips["REM_MEM_REG"].append((time.monotonic() - t1) * 1e3)
                            elif mode == "SET_MEM_TABLE":
                                dev.client.set_mem_table(dev.mem.table())
                                trips["SET_MEM_TABLE"].append((time.monotonic() - t0) * 1e3)
                            time.sleep(seconds / cycles)
                        t.join()
                        r = result["r"]
                        if r.error or r.io_errors:
                            raise SystemExit(f"{disk} {mode}: {r.summary_of_problems()}")
                        read = r.to_json(group_reporting=True)["jobs"][0]["read"]
                        clat = read["clat_ns"]
                        loads[mode].append({"iops": read["iops"], "clat_max_ms": clat["max"] / 1e6,
                                            "clat_p9999_ms": clat["percentile"]["99.990000"] / 1e6,
                                            "clat_p50_us": clat["percentile"]["50.000000"] / 1e3})
        finally:
            b.stop()
        out[disk] = {"round_trips": {name: {"median_ms": statistics.median(v), "max_ms": max(v),
                                            "n": len(v)} for name, v in trips.items()},
                     "loads": {mode: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                               | {"runs": rows} for mode, rows in loads.items()}}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--cycles", type=int, default=20, help="table changes per disk in part 2")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dp-bench-migration-"))
    load_before = os.getloadavg()
    t1 = part1(work, args.reps, args.seconds)
    t2 = part2(work, args.seconds, args.cycles, args.reps)
    print(f"{'null, 4k randread QD32':<28}{'IOPS':>10}{'ratio':>8}{'CPU us/IO':>11}{'ratio':>8}"
          "   paired with plain per repetition: IOPS, CPU/IO median [min-max]")
    for name, row in t1.items():
        pi, pc = row["paired_iops"], row["paired_cpu"]
        print(f"{name:<28}{row['iops']:>10.0f}{row['iops_ratio']:>8.3f}{row['cpu_us_per_io']:>11.3f}"
              f"{row['cpu_ratio']:>8.3f}   {statistics.median(pi):.3f} [{min(pi):.2f}-{max(pi):.2f}]"
              f", {statistics.median(pc):.3f} [{min(pc):.2f}-{max(pc):.2f}]")
    print(f"\n{'table change, 2 queues QD32':<40}{'median ms':>10}{'max ms':>9}")
    for disk, res in t2.items():
        for name, row in res["round_trips"].items():
            print(f"{disk + ' ' + name:<40}{row['median_ms']:>10.3f}{row['max_ms']:>9.3f}")
    print(f"\n{'the data path meanwhile (medians)':<40}{'IOPS':>10}{'p50 us':>8}{'p99.99 ms':>10}"
          f"{'max ms':>8}   max ms per run")
    for disk, res in t2.items():
        for mode, row in res["loads"].items():
            runs = " ".join(f"{r['clat_max_ms']:.2f}" for r in row["runs"])
            print(f"{disk + ' ' + mode:<40}{row['iops']:>10.0f}{row['clat_p50_us']:>8.1f}"
                  f"{row['clat_p9999_ms']:>10.3f}{row['clat_max_ms']:>8.2f}   {runs}")
    if args.out:
        args.out.write_text(json.dumps({"load": t1, "table_changes": t2, "argv": sys.argv,
                                        "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
