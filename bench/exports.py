"""Scaling with exports: N exports × 2 queues on the null disk, 4k randread at QD32 per queue
on every export at once, aggregate IOPS and backend CPU per I/O for

    dataplane     one `dataplane serve` with N exports (one I/O thread pool)
    qsd-shared    one qemu-storage-daemon with N vhost-user-blk exports (one iothread per CPU,
                  the exports spread over them round-robin)
    qsd-each      N qemu-storage-daemon processes, one export (and one iothread) each

    python -m bench.exports --out bench/results/DATE-exports [--exports 1,4,16] [--reps 3]

One driver process plays every guest: it connects N frontends, then starts every export's
load at the same instant (a thread per export, the C load generator per queue), so all N run
over the same window. Repetition r runs every (N, system) cell in an order rotated by r.
Reported: medians over repetitions of the aggregate IOPS (sum over exports), the backend
processes' CPU seconds (utime + stime of every thread, /proc/PID/stat) over the run divided by
the I/Os they served (ramp included), and the machine's busy cores meanwhile.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .systems import ROOT, Backend, host_busy_seconds, proc_cpu_seconds, wait_quiet

log = logging.getLogger("bench")

NULL_SIZE = 1 << 30
SYSTEMS = ("dataplane", "qsd-shared", "qsd-each")


# ---- backends: a set of processes serving N sockets ----

@dataclass
class Fleet:
    """The backend processes of one system serving N exports."""

    system: str
    sockets: list[Path]
    backends: list[Backend]

    def start(self) -> None:
        for b in self.backends:
            b.start()

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(b.pid) for b in self.backends)

    def alive(self) -> bool:
        return all(b.alive() for b in self.backends)

    def stop(self) -> None:
        for b in self.backends:
            b.stop()


def _qsd_export(i: int, sock: Path, queues: int, iothread: str) -> list[str]:
    return ["--blockdev", f"driver=null-co,node-name=disk{i},read-zeroes=on,size={NULL_SIZE}",
            "--export", f"type=vhost-user-blk,id=exp{i},node-name=disk{i},addr.type=unix,"
                        f"addr.path={sock},writable=on,num-queues={queues},iothread={iothread}"]


def fleet(system: str, n: int, queues: int, workdir: Path) -> Fleet:
    sockets = [workdir / f"{system}-{i}.sock" for i in range(n)]
    logs = workdir / "logs"
    if system == "dataplane":
        lines = ['log_level = "warning"']
        for i, sock in enumerate(sockets):
            lines += ["[[export]]", f'name = "e{i}"', f'disk = "null:{NULL_SIZE}"', f'socket = "{sock}"',
                      f"queues = {queues}"]
        config = workdir / f"dataplane-{n}.toml"
        config.write_text("\n".join(lines) + "\n")
        argv = [sys.executable, "-m", "dataplane", "--log-level", "warning", "serve", "--config",
                str(config)]
        return Fleet(system, sockets, [Backend(f"dataplane-{n}", argv, sockets[-1],
                                               logs / f"dataplane-{n}.log")])
    if system == "qsd-shared":
        threads = min(n, len(os.sched_getaffinity(0)))
        argv = ["qemu-storage-daemon"]
        for t in range(threads):
            argv += ["--object", f"iothread,id=iot{t}"]
        for i, sock in enumerate(sockets):
            argv += _qsd_export(i, sock, queues, f"iot{i % threads}")
        return Fleet(system, sockets, [Backend(f"qsd-shared-{n}", argv, sockets[-1],
                                               logs / f"qsd-shared-{n}.log")])
    backends = [Backend(f"qsd-each-{n}-{i}", ["qemu-storage-daemon", "--object", "iothread,id=iot0",
                                              *_qsd_export(0, sock, queues, "iot0")],
                        sock, logs / f"qsd-each-{n}-{i}.log") for i, sock in enumerate(sockets)]
    return Fleet(system, sockets, backends)


# ---- the driver (a process of its own: its CPU is not the backends') ----

def drive(sockets: list[str], queues: int, iodepth: int, runtime: float, ramp: float) -> dict:
    """Connect every socket, then run 4k randread on all of them at once."""
    from dataplane.driver import Device, Job

    job = Job(rw="randread", bs=4096, iodepth=iodepth, runtime=runtime, ramp_time=ramp)
    devices = []
    try:
        for sock in sockets:
            deadline = time.monotonic() + 20
            while True:     # qemu-storage-daemon makes its socket file before it listens
                try:
                    devices.append(Device.connect(sock, queues=queues,
                                                  queue_size=job.queue_size(True),
                                                  memory=job.memory_needed(queues)))
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        results: list = [None] * len(devices)
        start = threading.Barrier(len(devices))

        def run(i: int) -> None:
            start.wait()
            results[i] = devices[i].load(job)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(devices))]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
    finally:
        for dev in devices:
            dev.close()
    exports = []
    for r in results:
        data = r.to_json()
        exports.append({"iops": r.iops("read"),
                        "issued": sum(j["dataplane"]["issued"] for j in data["jobs"]),
                        "errors": r.io_errors, "error": r.error})
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"exports": exports, "wall_s": wall, "driver_cpu_s": ru.ru_utime + ru.ru_stime}


# ---- one run, the matrix, the summary ----

@dataclass
class Run:
    system: str
    exports: int
    rep: int
    iops: float              # aggregate over exports
    min_export_iops: float
    served_ios: int
    backend_cpu_s: float
    cpu_us_per_io: float
    driver_cpu_s: float
    driver_us_per_io: float
    busy_cores: float        # the whole machine's, over the run
    wall_s: float
    error: str = ""


def run_one(system: str, n: int, rep: int, args: argparse.Namespace, workdir: Path) -> Run:
    f = fleet(system, n, args.queues, workdir)
    f.start()
    try:
        wait_quiet(args.quiet_cores, args.quiet_timeout)
        cpu0, busy0, t0 = f.cpu_seconds(), host_busy_seconds(), time.monotonic()
        out = workdir / f"drive-{system}-{n}-{rep}.json"
        proc = subprocess.run([sys.executable, "-m", "bench.exports", "--drive",
                               ",".join(map(str, f.sockets)), "--queues", str(args.queues),
                               "--iodepth", str(args.iodepth), "--runtime", str(args.runtime),
                               "--ramp", str(args.ramp), "--drive-out", str(out)],
                              cwd=ROOT, capture_output=True, text=True,
                              timeout=args.runtime + args.ramp + 120)
        wall = time.monotonic() - t0
        error = "" if f.alive() else "a backend died"
        cpu = f.cpu_seconds() - cpu0 if not error else 0.0
        busy = (host_busy_seconds() - busy0) / wall
    finally:
        f.stop()
    if proc.returncode != 0 or not out.exists():
        return Run(system, n, rep, 0, 0, 0, 0, 0, 0, 0, 0, wall,
                   error or f"driver: {proc.stderr.strip()[-300:]}")
    data = json.loads(out.read_text())
    exports = data["exports"]
    served = sum(e["issued"] for e in exports)
    bad = [e for e in exports if e["errors"] or e["error"]]
    per_io = (lambda s: s / served * 1e6) if served else (lambda s: 0.0)
    return Run(system, n, rep, sum(e["iops"] for e in exports), min(e["iops"] for e in exports), served,
               cpu, per_io(cpu), data["driver_cpu_s"], per_io(data["driver_cpu_s"]), busy, wall,
               error or (f"{len(bad)} export(s) with errors" if bad else ""))


def summarize(runs: list[Run], counts: list[int]) -> tuple[list[dict], str]:
    rows = []
    for n in counts:
        for system in SYSTEMS:
            ok = [r for r in runs if r.system == system and r.exports == n and not r.error]
            if not ok:
                continue
            rows.append({"exports": n, "system": system, "runs": len(ok),
                         "iops": statistics.median(r.iops for r in ok),
                         "iops_min": min(r.iops for r in ok), "iops_max": max(r.iops for r in ok),
                         "min_export_iops": statistics.median(r.min_export_iops for r in ok),
                         "cpu_us_per_io": statistics.median(r.cpu_us_per_io for r in ok),
                         "driver_us_per_io": statistics.median(r.driver_us_per_io for r in ok),
                         "busy_cores": statistics.median(r.busy_cores for r in ok)})
    by = {(r["exports"], r["system"]): r for r in rows}
    lines = ["| exports | system | aggregate IOPS (median) | min–max | slowest export | backend CPU µs/I/O |"
             " load generator µs/I/O | busy cores | dataplane vs this |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dp = by.get((r["exports"], "dataplane"))
        ratio = f"{dp['iops'] / r['iops']:.2f}x" if dp and r["system"] != "dataplane" and r["iops"] else "—"
        k = 1e3
        lines.append(f"| {r['exports']} | {r['system']} | {r['iops'] / k:,.0f}k | {r['iops_min'] / k:,.0f}k–"
                     f"{r['iops_max'] / k:,.0f}k | {r['min_export_iops'] / k:,.0f}k |"
                     f" {r['cpu_us_per_io']:.2f} | {r['driver_us_per_io']:.2f} | {r['busy_cores']:.2f} |"
                     f" {ratio} |")
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.exports", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="results directory (runs.json, summary.md)")
    p.add_argument("--exports", default="1,4,16", help="export counts")
    p.add_argument("--queues", type=int, default=2)
    p.add_argument("--iodepth", type=int, default=32, help="per queue")
    p.add_argument("--runtime", type=float, default=5.0)
    p.add_argument("--ramp", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quiet-cores", type=float, default=0.3, help="wait for the machine to be this idle")
    p.add_argument("--quiet-timeout", type=float, default=5.0)
    p.add_argument("--drive", default=None, help=argparse.SUPPRESS)
    p.add_argument("--drive-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.drive:
        result = drive(args.drive.split(","), args.queues, args.iodepth, args.runtime, args.ramp)
        args.drive_out.write_text(json.dumps(result))
        return 0
    if args.out is None:
        p.error("--out is required")
    counts = [int(c) for c in args.exports.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = (args.out / "work").resolve()
    workdir.mkdir(exist_ok=True)
    started = time.time()
    load_before = os.getloadavg()
    runs: list[Run] = []
    for rep in range(args.reps):
        for n in counts:
            order = list(SYSTEMS[rep % len(SYSTEMS):] + SYSTEMS[:rep % len(SYSTEMS)])
            for system in order:
                run = run_one(system, n, rep, args, workdir)
                runs.append(run)
                log.info("rep %d, %2d exports, %-10s %9.0f IOPS  %.2f µs CPU/I/O  busy %.2f%s", rep, n,
                         system, run.iops, run.cpu_us_per_io, run.busy_cores,
                         f"  ERROR {run.error}" if run.error else "")
    rows, table = summarize(runs, counts)
    command = " ".join(["python -m bench.exports", *(argv if argv is not None else sys.argv[1:])])
    machine = {"cpus": len(os.sched_getaffinity(0)), "kernel": os.uname().release,
               "load_before": load_before, "load_after": os.getloadavg(), "started": started,
               "minutes": (time.time() - started) / 60, "command": command}
    (args.out / "runs.json").write_text(json.dumps({"machine": machine, "runs": [asdict(r) for r in runs],
                                                    "summary": rows}, indent=1))
    (args.out / "summary.md").write_text(f"{table}\n\nmachine: {json.dumps(machine)}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
