"""Dirty logging and memory slots: what they cost the data path, and how long a memory table
change pauses it.

    python -m bench.migration [--reps 5] [--seconds 3] [--only load|tables] [--out FILE.json]

Part 1: `dataplane load` against `dataplane serve` (null disk, 4k randread, QD32, 1 and 2
queues), four configurations alternating within each repetition (order rotated per
repetition): plain; `--log-all` (a dirty log, LOG_ALL and VHOST_VRING_F_LOG on, harvested
every 100 ms as a migration's iterations do); `--mem-regions 64` (guest memory as 64
regions, sent as ADD_MEM_REG); both. Medians of IOPS and of the backend's CPU per I/O, and
their ratios to plain.

Part 2: memory table changes while two queues run QD32 (null disk, and null with 1 ms of
emulated latency), sent back to back for the whole measured period: ADD_MEM_REG and
REM_MEM_REG (the queues keep running; a REM is answered once the requests popped before it are
done) and, for comparison, SET_MEM_TABLE re-sent (every queue quiesced, the table remapped, the
queues resumed). Their round trips, and the pause the data path sees: the IOPS each kind of
change costs against the same repetition's run without changes, as I/O time lost per change.
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


def part2(work: Path, seconds: float, reps: int) -> dict:
    """Per disk, one connection; per repetition three loads (2 queues, QD32, 0.5 s of ramp, then
    `seconds` measured) in a rotated order: no table change, ADD_MEM_REG + REM_MEM_REG pairs
    back to back for the whole measured period, SET_MEM_TABLE re-sends likewise. The round
    trips are what the control plane waits. The data path's pause is what the changes cost the
    I/O: the IOPS lost against the same repetition's run without changes, as time, per change
    ((1 - ratio) x seconds / changes): a queue stopped for 2 ms per change shows as 2 ms."""
    from dataplane.driver import Device
    from dataplane.driver.load import Job, run_load

    out = {}
    for disk in ("null:1G", "null:1G,latency=fixed:1ms"):
        b = dataplane_backend("memslots", work / "m.sock", disk, 2, work)
        b.start()
        trips: dict[str, list[float]] = {"ADD_MEM_REG": [], "REM_MEM_REG": [], "SET_MEM_TABLE": []}
        runs: list[dict] = []
        try:
            job = Job(rw="randread", bs=4096, iodepth=32, runtime=seconds, ramp_time=0.5)
            with Device.connect(str(b.socket), queues=2, memory=job.memory_needed(2)) as dev:
                for rep in range(reps):
                    for mode in PART2_MODES[rep % 3:] + PART2_MODES[:rep % 3]:
                        wait_quiet(0.5, 10.0)
                        result: dict = {}
                        t = threading.Thread(target=lambda r=result, d=dev, j=job:
                                             r.setdefault("r", run_load(d, j)))
                        t.start()
                        time.sleep(0.5)   # the ramp
                        end, changes = time.monotonic() + seconds, 0
                        while mode != "none" and time.monotonic() < end:
                            t0 = time.monotonic()
                            if mode == "ADD+REM":
                                area = dev.add_memory(1 << 20)
                                t1 = time.monotonic()
                                dev.remove_memory(area)
                                trips["ADD_MEM_REG"].append((t1 - t0) * 1e3)
                                trips["REM_MEM_REG"].append((time.monotonic() - t1) * 1e3)
                            else:
                                dev.client.set_mem_table(dev.mem.table())
                                trips["SET_MEM_TABLE"].append((time.monotonic() - t0) * 1e3)
                            changes += 1
                        t.join()
                        r = result["r"]
                        if r.error or r.io_errors:
                            raise SystemExit(f"{disk} {mode}: {r.summary_of_problems()}")
                        read = r.to_json(group_reporting=True)["jobs"][0]["read"]
                        runs.append({"rep": rep, "mode": mode, "iops": read["iops"], "changes": changes,
                                     "clat_p50_us": read["clat_ns"]["percentile"]["50.000000"] / 1e3,
                                     "clat_p9999_ms": read["clat_ns"]["percentile"]["99.990000"] / 1e6})
        finally:
            b.stop()
        none = {r["rep"]: r for r in runs if r["mode"] == "none"}
        loads = {}
        for mode in PART2_MODES:
            rows = [r for r in runs if r["mode"] == mode]
            ratio = [r["iops"] / none[r["rep"]]["iops"] for r in rows]
            lost = [(1 - x) * seconds / r["changes"] * 1e3 for x, r in zip(ratio, rows, strict=True)
                    if r["changes"]]
            loads[mode] = {"iops": statistics.median(r["iops"] for r in rows), "ratio": ratio,
                           "changes_per_s": statistics.median(r["changes"] for r in rows) / seconds,
                           "lost_ms_per_change": lost, "runs": rows}
        out[disk] = {"round_trips": {name: {"median_ms": statistics.median(v), "max_ms": max(v),
                                            "n": len(v)} for name, v in trips.items() if v},
                     "loads": loads}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--only", choices=("load", "tables"), default=None,
                   help="run only part 1 (load) or part 2 (tables)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dp-bench-migration-"))
    load_before = os.getloadavg()
    t1 = part1(work, args.reps, args.seconds) if args.only != "tables" else {}
    t2 = part2(work, args.seconds, args.reps) if args.only != "load" else {}
    if t1:
        print(f"{'null, 4k randread QD32':<28}{'IOPS':>10}{'ratio':>8}{'CPU us/IO':>11}{'ratio':>8}"
              "   paired with plain per repetition: IOPS, CPU/IO median [min-max]")
    for name, row in t1.items():
        pi, pc = row["paired_iops"], row["paired_cpu"]
        print(f"{name:<28}{row['iops']:>10.0f}{row['iops_ratio']:>8.3f}{row['cpu_us_per_io']:>11.3f}"
              f"{row['cpu_ratio']:>8.3f}   {statistics.median(pi):.3f} [{min(pi):.2f}-{max(pi):.2f}]"
              f", {statistics.median(pc):.3f} [{min(pc):.2f}-{max(pc):.2f}]")
    if t2:
        print(f"\n{'table change round trip, 2 queues QD32':<40}{'median ms':>10}{'max ms':>9}{'n':>6}")
    for disk, res in t2.items():
        for name, row in res["round_trips"].items():
            print(f"{disk + ' ' + name:<40}{row['median_ms']:>10.3f}{row['max_ms']:>9.3f}{row['n']:>6}")
    if t2:
        print(f"\n{'changes back to back, the data path':<40}{'IOPS':>10}{'changes/s':>10}"
              "   IOPS / none, median [min-max]   I/O time lost per change ms, median [min-max]")
    for disk, res in t2.items():
        for mode, row in res["loads"].items():
            ratio, lost = row["ratio"], row["lost_ms_per_change"]
            line = (f"{disk + ' ' + mode:<40}{row['iops']:>10.0f}{row['changes_per_s']:>10.0f}   "
                    f"{statistics.median(ratio):.3f} [{min(ratio):.2f}-{max(ratio):.2f}]")
            if lost:
                line += (f"               {statistics.median(lost):.3f} [{min(lost):.3f}-{max(lost):.3f}]")
            print(line)
    if args.out:
        args.out.write_text(json.dumps({"load": t1, "table_changes": t2, "argv": sys.argv,
                                        "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
