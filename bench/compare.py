"""Side-by-side comparison: dataplane vs qemu-storage-daemon (null and file disks) vs native
fio io_uring (file), in one process tree, systems alternating within each repetition.

    python -m bench.compare --out bench/results/DATE [--quick] [--reps N] [--runtime S]

Every backend starts once and stays up; each run is one `dataplane load` (or `fio`) process.
Repetition r runs every cell, and within a cell every system, in an order rotated by r
(A B, B A, ...), so slow drift of the machine hits every system alike. Reported: medians over
repetitions, ratios (dataplane / qsd, dataplane / native), and backend CPU seconds per million
I/Os. Output directory:

    machine.json            CPU, kernel, versions, load average before and after, the command
    runs.csv, runs.json     every run
    summary.md, summary.csv medians, ratios, the issue's targets
    fio/<label>/<bs>/run-<r>/<rw>-<iodepth>-<numjobs>.json   bench-fio's layout, fio-plot reads it
    fio-median/<bs>/<label>/<rw>-<iodepth>-<numjobs>.json     links to each cell's median run
    charts/*.png            rendered by fio-plot (matplotlib if fio-plot cannot)
    logs/                   backend and load generator output
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import report
from .systems import (
    Backend,
    RunOutput,
    Workload,
    dataplane_backend,
    qsd_backend,
    run_dataplane_load,
    run_native_fio,
    wait_quiet,
)

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILE = Path.home() / ".cache" / "dataplane" / "bench" / "disk-1g.img"
NULL_SIZE = 1 << 30
BackendFactory = Callable[[Path], Backend]     # socket path -> a backend not yet started

WORKLOADS = {
    w.name: w for w in (
        Workload("randread-4k-qd1", "randread", "4k", 1),
        Workload("randread-4k-qd32", "randread", "4k", 32),
        Workload("randread-4k-qd128", "randread", "4k", 128),
        Workload("randwrite-4k-qd32", "randwrite", "4k", 32),
        Workload("read-128k-qd32", "read", "128k", 32),
    )
}
QUEUES = (1, 2)


@dataclass(frozen=True)
class System:
    """One column of the comparison: a backend (None: native fio on the file) and how the
    load generator is placed and polls."""

    key: str
    backend: str | None
    cpus: str = ""          # dataplane load --cpus (queue i's thread on the i-th CPU)
    poll_us: int = 0        # dataplane load --poll-us
    about: str = ""


MAIN_SYSTEMS = {
    "null": [System("dataplane", "dataplane-null",
                    about="dataplane serve, defaults (plan pins dp-vq<i> to cpu i); load unpinned"),
             System("qsd", "qsd-null", about="qemu-storage-daemon, one iothread; load unpinned")],
    "file": [System("dataplane", "dataplane-file",
                    about="dataplane serve, defaults (plan pins dp-vq<i> to cpu i); load unpinned"),
             System("qsd", "qsd-file", about="qemu-storage-daemon, one iothread; load unpinned"),
             System("fio", None, about="fio --ioengine=io_uring --direct=1, numjobs = queues")],
}

# Placement and polling (null disk unless the cell says file): where the threads run and
# whether anyone spins. serve pins dp-vq<i> to CPU i by its plan; the load generator is left
# to the scheduler unless cpus says otherwise.
PLACEMENT_SYSTEMS = {
    "poll50": System("dataplane-poll50", "dataplane-null-poll50",
                     about="serve --poll-us 50; load unpinned"),
    "unpinned": System("dataplane-unpinned", "dataplane-null-unpinned",
                       about="I/O thread not pinned (bench.unpinned_serve); load unpinned"),
    "samecpu": System("dataplane-samecpu", "dataplane-null", cpus="0",
                      about="dp-vq0 on cpu 0 (plan), load on cpu 0"),
    "xcpu": System("dataplane-xcpu", "dataplane-null", cpus="1",
                   about="dp-vq0 on cpu 0 (plan), load on cpu 1, nobody polls"),
    "xcpu-poll10": System("dataplane-xcpu-poll10", "dataplane-null-poll10", cpus="1",
                          about="as xcpu, serve --poll-us 10"),
    "xcpu-poll50": System("dataplane-xcpu-poll50", "dataplane-null-poll50", cpus="1",
                          about="as xcpu, serve --poll-us 50"),
    "xcpu-poll50-lpoll50": System("dataplane-xcpu-poll50-lpoll50", "dataplane-null-poll50",
                                  cpus="1", poll_us=50,
                                  about="as xcpu, serve --poll-us 50, load --poll-us 50"),
    "qsd-xcpu": System("qsd-xcpu", "qsd-null-cpu0", cpus="1",
                       about="qemu-storage-daemon on cpu 0 (taskset), load on cpu 1"),
    "file-poll50": System("dataplane-poll50", "dataplane-file-poll50",
                          about="serve --poll-us 50; load unpinned"),
    "file-poll50-lpoll50": System("dataplane-poll50-lpoll50", "dataplane-file-poll50", poll_us=50,
                                  about="serve --poll-us 50; load --poll-us 50, unpinned"),
    "file-fixed-all": System("dataplane-fixed-all", "dataplane-file-fixed-all",
                             about="serve --fixed all (guest memory registered as fixed buffers "
                                   "too); load unpinned"),
    "file-lpoll50": System("dataplane-lpoll50", "dataplane-file", poll_us=50,
                           about="serve's defaults; load --poll-us 50 (the guest side spins, as a "
                                 "vCPU under KVM's halt polling does), unpinned"),
}
PLACEMENT_CELLS = [
    ("null", "randread-4k-qd32", 1, ["poll50", "unpinned", "samecpu", "xcpu", "xcpu-poll10",
                                     "xcpu-poll50", "xcpu-poll50-lpoll50", "qsd-xcpu"]),
    ("null", "randread-4k-qd1", 1, ["poll50"]),
    ("null", "randread-4k-qd32", 2, ["poll50"]),
    ("file", "randread-4k-qd1", 1, ["file-poll50", "file-poll50-lpoll50", "file-fixed-all", "file-lpoll50"]),
    ("file", "randread-4k-qd32", 1, ["file-poll50", "file-poll50-lpoll50", "file-fixed-all"]),
    ("file", "randread-4k-qd128", 1, ["file-fixed-all"]),
]


@dataclass
class Cell:
    disk: str           # null | file
    workload: Workload
    queues: int
    systems: list[System]

    @property
    def name(self) -> str:
        return f"{self.disk}/{self.workload.name}/q{self.queues}"


@dataclass
class RunRecord:
    rep: int
    disk: str
    workload: str
    rw: str
    bs: str
    iodepth: int
    queues: int
    system: str
    label: str
    iops: float = 0.0
    bw_mib_s: float = 0.0
    clat_p50_us: float = 0.0
    clat_p99_us: float = 0.0
    clat_mean_us: float = 0.0
    lat_mean_us: float = 0.0
    backend_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    served_ios: int = 0
    cpu_s_per_mio: float = 0.0       # backend's (native fio: fio's own) CPU per million I/Os
    client_cpu_s_per_mio: float = 0.0
    service_cpu_s_per_mio: float = 0.0   # systems.SERVICE_PIDS' CPU per million I/Os (bench.rbd)
    other_cpu_cores: float = 0.0     # CPU the rest of the machine used during the run, in cores
    quiet_wait_s: float = 0.0
    pre_busy_cores: float = 0.0
    attempts: int = 1                # runs made for this record (noisy ones are repeated)
    wall_s: float = 0.0
    json: str = ""
    error: str = ""


def build_cells(quick: bool) -> list[Cell]:
    cells = []
    for disk in ("null", "file"):
        for w in WORKLOADS.values():
            for q in QUEUES:
                cells.append(Cell(disk, w, q, list(MAIN_SYSTEMS[disk])))
    by_name = {c.name: c for c in cells}
    for disk, wname, q, extras in PLACEMENT_CELLS:
        by_name[f"{disk}/{wname}/q{q}"].systems += [PLACEMENT_SYSTEMS[k] for k in extras]
    return cells


def backend_factories(file_path: Path, logdir: Path) -> dict[str, BackendFactory]:
    """Every backend a cell of this comparison may name, started only if one does."""
    f = str(file_path)
    null = f"null:{NULL_SIZE}"
    return {
        "dataplane-null": lambda s: dataplane_backend("dataplane-null", s, null, 2, logdir),
        "dataplane-null-poll50": lambda s: dataplane_backend("dataplane-null-poll50", s, null, 2,
                                                             logdir, poll_us=50),
        "dataplane-null-poll10": lambda s: dataplane_backend("dataplane-null-poll10", s, null, 2,
                                                             logdir, poll_us=10),
        "dataplane-null-unpinned": lambda s: dataplane_backend("dataplane-null-unpinned", s, null,
                                                               2, logdir, unpinned=True),
        "dataplane-file": lambda s: dataplane_backend("dataplane-file", s, f, 2, logdir),
        "dataplane-file-poll50": lambda s: dataplane_backend("dataplane-file-poll50", s, f, 2,
                                                             logdir, poll_us=50),
        "dataplane-file-fixed-all": lambda s: with_args(
            dataplane_backend("dataplane-file-fixed-all", s, f, 2, logdir), "--fixed", "all"),
        "qsd-null": lambda s: qsd_backend("qsd-null", s, "null", NULL_SIZE, 2, logdir),
        "qsd-null-cpu0": lambda s: qsd_backend("qsd-null-cpu0", s, "null", NULL_SIZE, 2, logdir,
                                               cpus="0"),
        "qsd-file": lambda s: qsd_backend("qsd-file", s, f, 0, 2, logdir),
    }


def with_args(backend: Backend, *args: str) -> Backend:
    backend.argv += list(args)
    return backend


def prepare_file(path: Path, size: int) -> None:
    """A preallocated file of real (random) data on the real disk, so O_DIRECT reads reach
    the device and no extent is unwritten. Reused when it already has the right size."""
    marker = path.with_suffix(path.suffix + ".ready")
    if path.exists() and path.stat().st_size == size and marker.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("preparing %s (%d MiB of random data)", path, size >> 20)
    marker.unlink(missing_ok=True)
    subprocess.run(["fallocate", "-l", str(size), str(path)], check=True)
    chunk = 4 << 20
    with open(path, "r+b", buffering=0) as f:
        for off in range(0, size, chunk):
            f.write(os.urandom(min(chunk, size - off)))
        os.fsync(f.fileno())
    marker.write_text("filled with random data\n")


def fs_type_of(path: Path) -> str:
    try:
        out = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", str(path)],
                             capture_output=True, text=True, check=True).stdout.strip()
        return out
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _median_rep(records: list[RunRecord]) -> RunRecord:
    ok = sorted((r for r in records if not r.error), key=lambda r: r.iops)
    return ok[(len(ok) - 1) // 2] if ok else records[0]


def run_matrix(args: argparse.Namespace, out: Path, cells: list[Cell],
               factories: dict[str, BackendFactory]) -> tuple[list[RunRecord], dict[str, Any]]:
    """Run every cell's systems args.reps times, rotating the order within each cell, with
    the backends the cells name started once for the whole matrix. Also records the machine
    and links each cell's median run under out/fio-median (fio-plot's layout)."""
    if args.only:
        cells = [c for c in cells if any(pat in c.name for pat in args.only)]
    needed = {s.backend for c in cells for s in c.systems if s.backend}
    logdir = out / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    if any(c.disk == "file" for c in cells):
        prepare_file(args.file, args.file_size)

    machine = report.machine_info(args.file)
    machine["command"] = args.command_line
    machine["file"] = {"path": str(args.file), "size": args.file_size, "mount": fs_type_of(args.file)}
    machine["loadavg_before"] = os.getloadavg()
    machine["settings"] = {"reps": args.reps, "runtime_s": args.runtime, "ramp_s": args.ramp,
                           "quiet_cores": args.quiet_cores, "quiet_timeout_s": args.quiet_timeout,
                           "noisy_cores": args.noisy_cores, "retries": args.retries,
                           "retry_budget_s": args.retry_budget}
    log.info("load average before: %s", " ".join(f"{v:.2f}" for v in machine["loadavg_before"]))

    sockdir = Path(tempfile.mkdtemp(prefix="dp-bench-"))
    backends = {name: factories[name](sockdir / f"{name}.sock") for name in sorted(needed)}
    records: list[RunRecord] = []
    try:
        for b in backends.values():
            b.start()
        time.sleep(0.5)
        total = sum(len(c.systems) for c in cells) * args.reps
        done = 0
        t_start = time.monotonic()
        for rep in range(1, args.reps + 1):
            for cell in cells:
                k = (rep - 1) % len(cell.systems)
                order = cell.systems[k:] + cell.systems[:k]
                for system in order:
                    done += 1
                    rec = run_one(args, out, cell, system, rep, backends, logdir)
                    records.append(rec)
                    eta = (time.monotonic() - t_start) / done * (total - done)
                    log.info("[%d/%d] rep %d %-28s %-30s %10.0f IOPS  p50 %7.1f us  cpu %.2f s/MIO"
                             "%s  (eta %.0f s)", done, total, rep, cell.name, system.key, rec.iops,
                             rec.clat_p50_us, rec.cpu_s_per_mio,
                             f"  ERROR {rec.error}" if rec.error else "", eta)
        machine["backend_cpu_total_s"] = {name: b.cpu_seconds() for name, b in backends.items()
                                          if b.alive()}
        # I/O threads exist once a front end has connected: record where they were allowed to run
        machine["backend_threads"] = {name: b.thread_cpus() for name, b in backends.items()
                                      if b.alive()}
    finally:
        for b in backends.values():
            b.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
    machine["loadavg_after"] = os.getloadavg()
    machine["elapsed_s"] = round(time.monotonic() - args.t0, 1)
    log.info("load average after: %s", " ".join(f"{v:.2f}" for v in machine["loadavg_after"]))

    # The median repetition of each (label, cell), one directory per label (fio-plot names a
    # chart's bars after the directory).
    groups: dict[tuple[str, str, str, int], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.label, r.bs, r.workload, r.queues), []).append(r)
    for (label, bs, _, _), recs in groups.items():
        med = _median_rep(recs)
        if med.json and Path(med.json).exists():
            src = Path(med.json)
            dst = out / "fio-median" / bs / label / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.unlink(missing_ok=True)
            dst.symlink_to(os.path.relpath(src, dst.parent))   # relative: the tree can move
    return records, machine


def run_one(args: argparse.Namespace, out: Path, cell: Cell, system: System, rep: int,
            backends: dict[str, Backend], logdir: Path) -> RunRecord:
    w = cell.workload
    label = f"{system.key}-{cell.disk}"
    json_path = out / "fio" / label / w.bs / f"run-{rep}" / f"{w.rw}-{w.iodepth}-{cell.queues}.json"
    rec = RunRecord(rep, cell.disk, w.name, w.rw, w.bs, w.iodepth, cell.queues, system.key, label,
                    json=str(json_path))
    b = backends.get(system.backend) if system.backend else None
    if b is not None and not b.alive():
        rec.error = f"backend {b.name} is not running"
        return rec
    # A run during which the rest of the machine was busy is done again (up to --retries
    # times); the quietest attempt is kept.
    best: RunRecord | None = None
    for attempt in range(args.retries + 1):
        started = time.monotonic()
        rec.quiet_wait_s, rec.pre_busy_cores = wait_quiet(args.quiet_cores, args.quiet_timeout)
        if b is None:   # the native baseline (bench.rbd brings its own: fio --ioengine=rbd)
            native = getattr(args, "native_fio", None) or (
                lambda *a: run_native_fio(str(args.file), *a))
            res = native(w, cell.queues, args.runtime, args.ramp, json_path, logdir / "fio.log")
        else:
            res = run_dataplane_load(b.socket, w, cell.queues, args.runtime, args.ramp, json_path,
                                     b, logdir / "load.log", cpus=system.cpus,
                                     poll_us=system.poll_us)
        fill_record(rec, res, w, native=b is None)
        rec.attempts = attempt + 1
        if best is None or rec.other_cpu_cores < best.other_cpu_cores:
            best = RunRecord(**asdict(rec))
            if json_path.exists():
                shutil.copyfile(json_path, json_path.with_suffix(".best"))
        if attempt:
            args.retry_budget_left -= time.monotonic() - started
        if rec.error or rec.other_cpu_cores <= args.noisy_cores:
            break
        if args.retry_budget_left <= 0:
            log.info("  other processes used %.2f cores during that run (retry budget spent)",
                     rec.other_cpu_cores)
            break
        log.info("  other processes used %.2f cores during that run: running it again",
                 rec.other_cpu_cores)
    assert best is not None
    best.attempts = rec.attempts
    kept = json_path.with_suffix(".best")
    if kept.exists():
        kept.replace(json_path)
    return best


def fill_record(rec: RunRecord, res: RunOutput, w: Workload, native: bool) -> None:
    rec.error = res.error
    rec.wall_s = round(res.wall_s, 2)
    rec.other_cpu_cores = round(max(0.0, res.host_busy_s - res.ours_s) / res.wall_s, 3) if res.wall_s else 0.0
    if not res.data:
        return
    job = res.data["jobs"][0]
    d = job[w.direction]
    clat = d.get("clat_ns", {})
    pct = clat.get("percentile", {})
    rec.iops = float(d.get("iops", 0.0))
    rec.bw_mib_s = d.get("bw_bytes", 0) / (1 << 20)
    rec.clat_p50_us = pct.get("50.000000", 0) / 1000
    rec.clat_p99_us = pct.get("99.000000", 0) / 1000
    rec.clat_mean_us = clat.get("mean", 0.0) / 1000
    rec.lat_mean_us = d.get("lat_ns", {}).get("mean", 0.0) / 1000
    rec.client_cpu_s = res.client_cpu_s
    rec.served_ios = res.served_ios
    if native:
        rec.backend_cpu_s = res.client_cpu_s      # fio is its own backend
    else:
        rec.backend_cpu_s = res.backend_cpu_s
    if rec.served_ios:
        rec.cpu_s_per_mio = rec.backend_cpu_s / rec.served_ios * 1e6
        rec.service_cpu_s_per_mio = res.service_cpu_s / rec.served_ios * 1e6
    total_ios = int(d.get("total_ios", 0))
    if total_ios and not native:
        rec.client_cpu_s_per_mio = rec.client_cpu_s / total_ios * 1e6


def add_run_options(p: argparse.ArgumentParser, out_suffix: str = "") -> None:
    """The options of a matrix run (shared with bench.placement)."""
    p.set_defaults(out_suffix=out_suffix)
    p.add_argument("--out", type=Path, default=None,
                   help=f"output directory (default: bench/results/<today>{out_suffix})")
    p.add_argument("--quick", action="store_true",
                   help="1 repetition of 1 s runs (a smoke test of the whole pipeline)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per cell (default 3; quick: 1)")
    p.add_argument("--runtime", type=float, default=None, help="seconds per run (default 2.5; quick: 1)")
    p.add_argument("--ramp", type=float, default=None, help="seconds before each run's measurement"
                                                            " (default 0.5; quick: 0.25)")
    p.add_argument("--file", type=Path, default=DEFAULT_FILE,
                   help=f"file on a real disk for the file cells (default {DEFAULT_FILE})")
    p.add_argument("--file-size", type=int, default=1 << 30, help="bytes (default 1 GiB)")
    p.add_argument("--only", action="append", default=[],
                   help="run only cells whose name contains this (e.g. null/randread-4k-qd32/q1)")
    p.add_argument("--quiet-cores", type=float, default=0.3,
                   help="before each run, wait until the rest of the machine uses at most this"
                        " many cores (default 0.3)")
    p.add_argument("--quiet-timeout", type=float, default=10.0,
                   help="seconds to wait for that before running anyway (default 10)")
    p.add_argument("--noisy-cores", type=float, default=0.25,
                   help="a run during which other processes used more cores than this is noisy"
                        " (default 0.25)")
    p.add_argument("--retries", type=int, default=2,
                   help="times a noisy run is repeated; the quietest attempt is kept (default 2)")
    p.add_argument("--retry-budget", type=float, default=240.0,
                   help="seconds all repeated runs may take together (default 240)")
    p.add_argument("--max-load", type=float, default=1.5,
                   help="before starting, wait until the 1-minute load average is below this")
    p.add_argument("--max-load-wait", type=float, default=300.0,
                   help="seconds to wait for that before starting anyway (default 300)")
    p.add_argument("--no-charts", action="store_true", help="skip the PNG charts")


def finish_args(args: argparse.Namespace, argv: list[str] | None, prog: str) -> argparse.Namespace:
    """Fill the defaults that depend on --quick, and record the command line."""
    args.reps = args.reps or (1 if args.quick else 3)
    args.runtime = args.runtime or (1.0 if args.quick else 2.5)
    args.ramp = args.ramp if args.ramp is not None else (0.25 if args.quick else 0.5)
    args.out = args.out or ROOT / "bench" / "results" / (dt.date.today().isoformat() + args.out_suffix)
    args.retry_budget_left = args.retry_budget
    args.command_line = f"{prog} " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    return finish_args(p.parse_args(argv), argv, "python -m bench.compare")


def wait_for_load(max_load: float, timeout: float) -> float:
    """Wait for the 1-minute load average to drop below max_load; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        load1 = os.getloadavg()[0]
        if load1 < max_load or time.monotonic() >= deadline:
            return load1
        log.info("load average %.2f >= %.2f: waiting for the machine to calm down", load1, max_load)
        time.sleep(min(15.0, max(0.0, deadline - time.monotonic())))


def begin(args: argparse.Namespace) -> Path:
    """Log to stderr, create the output directory and wait for a calm machine; returns it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.t0 = time.monotonic()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    load1 = wait_for_load(args.max_load, args.max_load_wait)
    log.info("starting with load average %.2f; results in %s", load1, out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = begin(args)
    records, machine = run_matrix(args, out, build_cells(args.quick),
                                  backend_factories(args.file, out / "logs"))
    (out / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    (out / "runs.json").write_text(json.dumps([asdict(r) for r in records], indent=2) + "\n")
    report.write_runs_csv(records, out / "runs.csv")
    summary = report.summarize(records)
    report.write_summary_csv(summary, out / "summary.csv")
    charts: list[tuple[str, Path]] = []
    chart_notes: list[str] = []
    if not args.no_charts:
        charts, chart_notes = report.render_charts(out, summary)
    md = report.summary_markdown(summary, records, machine, charts, chart_notes, out,
                                 {s.key: s.about for ss in MAIN_SYSTEMS.values() for s in ss}
                                 | {s.key: s.about for s in PLACEMENT_SYSTEMS.values()})
    (out / "summary.md").write_text(md)
    failed = [r for r in records if r.error]
    log.info("done in %.0f s: %d runs, %d failed; %s", time.monotonic() - args.t0, len(records),
             len(failed), out / "summary.md")
    return 1 if failed and len(failed) == len(records) else 0


if __name__ == "__main__":
    sys.exit(main())
