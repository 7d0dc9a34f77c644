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
SET_MEM_TABLE re-sent (every queue quiesced, the table remapped, the queues resumed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.systems import Workload, dataplane_backend, run_dataplane_load  # noqa: E402

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
                    out = run_dataplane_load(b.socket, w, queues, seconds, 0.5, work / "run.json", b,
                                             work / "load.log", extra=CONFIGS[name])
                    if out.error:
                        raise SystemExit(f"q{queues} {name}: {out.error}")
                    iops = out.data["jobs"][0]["read"]["iops"]
                    cpu_us = out.backend_cpu_s / max(out.served_ios, 1) * 1e6
                    res.setdefault((queues, name), []).append((iops, cpu_us))
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
            table[f"q{queues} {name}"] = {"iops": iops, "cpu_us_per_io": cpu,
                                          "iops_ratio": iops / base_iops, "cpu_ratio": cpu / base_cpu,
                                          "runs": rows}
    return table


def part2(work: Path, seconds: float, cycles: int) -> dict:
    from dataplane.driver import Device
    from dataplane.driver.load import Job, run_load

    out = {}
    for disk in ("null:1G", "null:1G,latency=fixed:1ms"):
        b = dataplane_backend("memslots", work / "m.sock", disk, 2, work)
        b.start()
        try:
            job = Job(rw="randread", bs=4096, iodepth=32, runtime=seconds + 2)
            with Device.connect(str(b.socket), queues=2, memory=job.memory_needed(2)) as dev:
                result: dict = {}
                t = threading.Thread(target=lambda r=result, d=dev, j=job: r.setdefault("r", run_load(d, j)))
                t.start()
                time.sleep(0.5)
                add, rem, table = [], [], []
                for _ in range(cycles):
                    t0 = time.monotonic()
                    area = dev.add_memory(1 << 20)
                    t1 = time.monotonic()
                    dev.remove_memory(area)
                    t2 = time.monotonic()
                    dev.client.set_mem_table(dev.mem.table())
                    t3 = time.monotonic()
                    add.append((t1 - t0) * 1e3)
                    rem.append((t2 - t1) * 1e3)
                    table.append((t3 - t2) * 1e3)
                    time.sleep(seconds / cycles)
                t.join()
                r = result["r"]
                if r.error or r.io_errors:
                    raise SystemExit(f"{disk}: {r.summary_of_problems()}")
            out[disk] = {name: {"median_ms": statistics.median(v), "max_ms": max(v), "n": len(v)}
                         for name, v in (("ADD_MEM_REG", add), ("REM_MEM_REG", rem),
                                         ("SET_MEM_TABLE", table))}
        finally:
            b.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--cycles", type=int, default=20, help="table changes per disk in part 2")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dp-bench-migration-"))
    t1 = part1(work, args.reps, args.seconds)
    t2 = part2(work, args.seconds, args.cycles)
    print(f"{'null, 4k randread QD32':<28}{'IOPS':>10}{'ratio':>8}{'CPU us/IO':>11}{'ratio':>8}")
    for name, row in t1.items():
        print(f"{name:<28}{row['iops']:>10.0f}{row['iops_ratio']:>8.3f}{row['cpu_us_per_io']:>11.3f}"
              f"{row['cpu_ratio']:>8.3f}")
    print(f"\n{'table change, 2 queues QD32':<34}{'median ms':>10}{'max ms':>9}")
    for disk, rows in t2.items():
        for name, row in rows.items():
            print(f"{disk + ' ' + name:<34}{row['median_ms']:>10.3f}{row['max_ms']:>9.3f}")
    if args.out:
        args.out.write_text(json.dumps({"load": t1, "table_changes": t2, "argv": sys.argv}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
