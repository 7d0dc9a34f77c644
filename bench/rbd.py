"""RBD exports: dataplane vs qemu-storage-daemon (`--blockdev driver=rbd`) vs native
`fio --ioengine=rbd`, on one image of one cluster, 4 KiB random reads and writes at iodepth 1,
16 and 32 per queue, 1 and 2 queues: IOPS, p50/p99 completion latency and the backend's CPU
per I/O (every thread of the process, librados's included; fio: its own).

    python -m bench.rbd [--out DIR] [--quick] [--reps N] [--runtime S] [--image-size BYTES]
                        [--conf CEPH_CONF --pool POOL --image NAME --id CLIENT]

Without --conf it starts a single-node cluster of its own (tests/ceph_cluster.py: one monitor,
one memstore OSD, in a temporary directory, stopped at the end) and fills a new image with
`rbd bench` (a read of an object never written costs no OSD round trip with object-map on).

Fair settings: librbd's cache is off for all three (dataplane --cache none, qsd cache.direct=on,
fio through a conf file with `rbd cache = false`: fio's engine takes options from the conf
only). Each backend opens the image once and keeps it for the whole run; fio opens it per run.
"2 queues" for fio is one job with twice the iodepth: one librados client and one image
handle, as the two backends have (two fio jobs would be two clients, and their writes would
pass the exclusive lock back and forth). The machinery (alternating systems, quiet waits,
medians, fio JSON layout) is bench.compare's. Output directory (default
bench/results/<today>-rbd): summary.md (the table and the goals), summary.csv, runs.csv,
runs.json, machine.json, fio/, fio-median/, logs/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from . import report, systems
from .compare import (
    Cell,
    System,
    Workload,
    add_run_options,
    begin,
    finish_args,
    run_matrix,
)
from .systems import Backend, RunOutput, _run, children_cpu_seconds, dataplane_backend

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parent.parent

WORKLOADS = [Workload(f"{rw}-4k-qd{qd}", rw, "4k", qd) for rw in ("randread", "randwrite")
             for qd in (1, 16, 32)]
QUEUES = (1, 2)
SYSTEMS = [
    System("dataplane", "dataplane-rbd", about="dataplane serve --cache none (rbd_cache=false)"),
    System("qsd", "qsd-rbd", about="qemu-storage-daemon, driver=rbd cache.direct=on, one iothread"),
    System("fio", None, about="fio --ioengine=rbd, one job of iodepth queues x QD, rbd cache off"),
]
GOALS = {"qsd": 1.0, "fio": 0.95}
POLL0 = System("dataplane-poll0", "dataplane-rbd-poll0",
               about="dataplane serve --cache none --poll-us 0 (I/O threads never spin)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.rbd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p, out_suffix="-rbd")
    p.add_argument("--conf", type=Path, default=None,
                   help="an existing cluster's ceph.conf (default: start one for the run)")
    p.add_argument("--pool", default="rbd")
    p.add_argument("--image", default=None, help="an existing, filled image (with --conf)")
    p.add_argument("--id", default="dataplane", help="client id (client.ID)")
    p.add_argument("--image-size", type=int, default=1 << 30,
                   help="bytes of the image made for the run (default 1 GiB)")
    p.add_argument("--poll0", action="store_true",
                   help="also run dataplane with --poll-us 0 (no adaptive polling)")
    return finish_args(p.parse_args(argv), argv, "python -m bench.rbd")


def build_cells(quick: bool, poll0: bool = False) -> list[Cell]:
    workloads = [w for w in WORKLOADS if w.iodepth in (1, 32)] if quick else WORKLOADS
    systems = SYSTEMS + ([POLL0] if poll0 else [])
    return [Cell("rbd", w, q, list(systems)) for w in workloads for q in QUEUES]


def qsd_rbd_backend(sock: Path, conf: Path, pool: str, image: str, client: str, queues: int,
                    logdir: Path) -> Backend:
    blockdev = (f"driver=rbd,node-name=disk0,pool={pool},image={image},conf={conf},user={client},"
                "cache.direct=on")
    argv = ["qemu-storage-daemon", "--object", "iothread,id=iot0", "--blockdev", blockdev,
            "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                        f"addr.path={sock},writable=on,num-queues={queues},iothread=iot0"]
    return Backend("qsd-rbd", argv, sock, logdir / "qsd-rbd.log")


def fio_rbd(pool: str, image: str, client: str):
    """The native runner bench.compare calls for System("fio", None)."""

    def run(w: Workload, queues: int, runtime: float, ramp: float, out_json: Path,
            log_path: Path) -> RunOutput:
        argv = ["fio", "--name=fio-rbd", "--ioengine=rbd", f"--clientname={client}", f"--pool={pool}",
                f"--rbdname={image}", f"--rw={w.rw}", f"--bs={w.bs}", f"--iodepth={w.iodepth * queues}",
                "--numjobs=1", f"--runtime={runtime:g}", f"--ramp_time={ramp:g}", "--time_based",
                "--norandommap", "--group_reporting", "--output-format=json", f"--output={out_json}"]
        kids0 = children_cpu_seconds()
        res = _run(argv, out_json, runtime + ramp + 60, None, log_path)
        if res.data:
            # Its whole process, librados's threads and the ramp included, as for the backends
            # (fio's own usr/sys figures leave librados's threads out), over the I/Os of the
            # ramp (at the measured rate) and of the run.
            res.client_cpu_s = children_cpu_seconds() - kids0
            res.served_ios = round(int(res.data["jobs"][0][w.direction]["total_ios"])
                                   * (runtime + ramp) / runtime)
        return res

    return run


def _goal(ratio: float | None, goal: float) -> str:
    if ratio is None:
        return "–"
    return f"{ratio:.2f}x {'✓' if ratio >= goal else '✗'}"


def paired_ratios(records: list, system: str, other: str) -> dict[str, float]:
    """Per cell: the median over repetitions of system's IOPS / other's in the same repetition
    (the two ran back to back, so drift of the machine cancels better than in a ratio of
    medians)."""
    runs: dict[tuple[str, int], dict[str, float]] = {}
    for r in records:
        if not r.error and r.iops:
            runs.setdefault((f"{r.disk}/{r.workload}/q{r.queues}", r.rep), {})[r.system] = r.iops
    ratios: dict[str, list[float]] = {}
    for (cell, _), iops in runs.items():
        if system in iops and other in iops:
            ratios.setdefault(cell, []).append(iops[system] / iops[other])
    return {cell: statistics.median(v) for cell, v in ratios.items()}


def rbd_table(summary: list[report.Summary], records: list) -> list[str]:
    idx = {(s.cell, s.system): s for s in summary}
    paired = {k: paired_ratios(records, "dataplane", k) for k in GOALS}

    def svc(cell: str, system: str) -> str:
        vals = [r.service_cpu_s_per_mio for r in records if not r.error and r.system == system
                and f"{r.disk}/{r.workload}/q{r.queues}" == cell]
        return f"{statistics.median(vals):.1f}" if vals else "–"

    cells: list[str] = []
    for s in summary:
        if s.cell not in cells:
            cells.append(s.cell)
    lines = ["| workload | queues | IOPS dp | IOPS qsd | IOPS fio | dp/qsd (≥1.0) | dp/fio (≥0.95) "
             "| paired dp/qsd | paired dp/fio "
             "| p50 µs dp / qsd / fio | p99 µs dp / qsd / fio | CPU µs/I/O dp / qsd / fio "
             "| cluster CPU µs/I/O dp / qsd / fio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for cell in cells:
        dp, qsd, fio = (idx.get((cell, k)) for k in ("dataplane", "qsd", "fio"))
        _, workload, q = cell.split("/")

        def col(s: report.Summary | None, attr: str, digits: int = 0) -> str:
            return f"{getattr(s, attr):.{digits}f}" if s is not None and s.runs > s.failed else "–"

        def ratio(other: report.Summary | None, dp: report.Summary | None = dp) -> float | None:
            ok = dp is not None and other is not None and other.iops and dp.runs > dp.failed
            return dp.iops / other.iops if ok else None

        lines.append(
            f"| {workload} | {q[1:]} | {col(dp, 'iops')} | {col(qsd, 'iops')} | {col(fio, 'iops')} "
            f"| {_goal(ratio(qsd), GOALS['qsd'])} | {_goal(ratio(fio), GOALS['fio'])} "
            f"| {_goal(paired['qsd'].get(cell), GOALS['qsd'])} "
            f"| {_goal(paired['fio'].get(cell), GOALS['fio'])} "
            f"| {col(dp, 'clat_p50_us')} / {col(qsd, 'clat_p50_us')} / {col(fio, 'clat_p50_us')} "
            f"| {col(dp, 'clat_p99_us')} / {col(qsd, 'clat_p99_us')} / {col(fio, 'clat_p99_us')} "
            f"| {col(dp, 'cpu_s_per_mio', 1)} / {col(qsd, 'cpu_s_per_mio', 1)} "
            f"/ {col(fio, 'cpu_s_per_mio', 1)} "
            f"| {svc(cell, 'dataplane')} / {svc(cell, 'qsd')} / {svc(cell, 'fio')} |")
    return lines


def poll0_lines(summary: list[report.Summary]) -> list[str]:
    """dataplane with --poll-us 0 next to its default, when the run had it (--poll0)."""
    idx = {(s.cell, s.system): s for s in summary}
    rows = []
    for s in summary:
        if s.system != POLL0.key:
            continue
        dp, qsd, fio = (idx.get((s.cell, k)) for k in ("dataplane", "qsd", "fio"))
        _, workload, q = s.cell.split("/")

        def over(other: report.Summary | None, s: report.Summary = s) -> str:
            return f"{s.iops / other.iops:.2f}x" if other and other.iops and s.iops else "–"

        rows.append(f"| {workload} | {q[1:]} | {s.iops:.0f} | {over(dp)} | {over(qsd)} | {over(fio)} "
                    f"| {s.clat_p50_us:.0f} / {s.clat_p99_us:.0f} | {s.cpu_s_per_mio:.1f} |")
    if not rows:
        return []
    return ["", f"{POLL0.about}:", "",
            "| workload | queues | IOPS | vs dataplane (poll 50) | vs qsd | vs fio | p50 / p99 µs "
            "| CPU µs/I/O |", "|---|---:|---:|---:|---:|---:|---|---|", *rows]


def summary_markdown(summary: list[report.Summary], records: list, machine: dict) -> str:
    met = {k: 0 for k in GOALS}
    met_paired = {k: 0 for k in GOALS}
    total = 0
    idx = {(s.cell, s.system): s for s in summary}
    for s in summary:
        if s.system != "dataplane" or not s.iops:
            continue
        total += 1
        for k, goal in GOALS.items():
            other = idx.get((s.cell, k))
            if other and other.iops and s.iops / other.iops >= goal:
                met[k] += 1
            if paired_ratios(records, "dataplane", k).get(s.cell, 0.0) >= goal:
                met_paired[k] += 1
    rbd = machine["rbd"]
    where = ("a cluster of its own (one monitor, one memstore OSD, on this machine)"
             if rbd["own_cluster"] else f"the cluster of {rbd['conf']}")
    lines = [
        "# RBD: dataplane vs qemu-storage-daemon vs fio --ioengine=rbd", "",
        f"Command: `{machine['command']}`", "",
        f"Image {machine['rbd']['image']} ({machine['rbd']['size'] >> 20} MiB, filled), rbd_cache=false"
        " for all three; medians of the repetitions. CPU per I/O: the backend process, every thread"
        " (librados's too), over the run and its ramp; fio: its whole process likewise. The"
        " cluster's own CPU per I/O (OSD + monitor) is in the last column.", "",
        *rbd_table(summary, records), "",
        "The ratio columns are of the medians; the paired ones are the median over repetitions of"
        " the ratio within each repetition (the systems ran back to back).", "",
        f"Goals met (ratio of medians): dp/qsd ≥ 1.0 in {met['qsd']} of {total} cells, dp/fio ≥ 0.95"
        f" in {met['fio']} of {total}; paired: {met_paired['qsd']} and {met_paired['fio']} of {total}.",
        *poll0_lines(summary), "",
        *[line for line in report.machine_lines(machine) if not line.startswith("* file:")],
        f"* ceph: {machine['rbd'].get('version', '?')}; {where}", "",
        "Systems:", "",
        *[f"- {s.key}: {s.about}" for s in [*SYSTEMS, POLL0]
          if any(r.system == s.key for r in records)],
    ]
    failed = [r for r in records if r.error]
    if failed:
        lines += ["", f"{len(failed)} run(s) failed:", *[f"- {r.system} {r.workload} q{r.queues}"
                                                         f" rep {r.rep}: {r.error}" for r in failed]]
    return "\n".join(lines) + "\n"


def prepare_cluster(args: argparse.Namespace, stack: list) -> tuple[Path, str]:
    """(conf, image) of the cluster and image the run uses, a new cluster when none is given."""
    if args.conf is not None:
        if not args.image:
            raise SystemExit("--conf needs --image (an existing, filled image)")
        return args.conf, args.image
    sys.path.insert(0, str(ROOT / "tests"))
    from ceph_cluster import CephCluster

    base = Path(tempfile.mkdtemp(prefix="dp-bench-ceph-"))
    cluster = CephCluster(base / "c").start()
    stack.append((cluster, base))
    # the OSD's and the monitor's work is part of every run, not other tenants' noise
    systems.SERVICE_PIDS[:] = [p.pid for p in (cluster.osd_proc, cluster.mon_proc) if p is not None]
    args.pool, args.id = cluster.pool, cluster.client_id
    image = "bench"
    cluster.create_image(image, args.image_size)
    t0 = time.monotonic()
    cluster.rbd("bench", "--io-type", "write", "--io-pattern", "seq", "--io-size", "4M",
                "--io-threads", "4", "--io-total", str(args.image_size), f"{cluster.pool}/{image}",
                timeout=600)
    log.info("cluster up in %.1f s, image %s/%s (%d MiB) filled in %.1f s", cluster.startup_s,
             cluster.pool, image, args.image_size >> 20, time.monotonic() - t0)
    return cluster.conf_path, image


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = begin(args)
    stack: list = []
    try:
        conf, image = prepare_cluster(args, stack)
        # fio's rbd engine reads its options from a conf file only ($CEPH_CONF, no CEPH_ARGS)
        nocache = out / "fio-nocache.conf"
        nocache.write_text(conf.read_text() + f"\n[client.{args.id}]\n\trbd cache = false\n")
        os.environ["CEPH_CONF"] = str(nocache)
        os.environ.pop("CEPH_ARGS", None)
        args.native_fio = fio_rbd(args.pool, image, args.id)
        spec = f"rbd:{args.pool}/{image},conf={conf},id={args.id}"
        logdir = out / "logs"
        factories = {
            "dataplane-rbd": lambda s: dataplane_backend("dataplane-rbd", s, spec, max(QUEUES), logdir),
            "dataplane-rbd-poll0": lambda s: dataplane_backend("dataplane-rbd-poll0", s, spec,
                                                               max(QUEUES), logdir, poll_us=0),
            "qsd-rbd": lambda s: qsd_rbd_backend(s, conf, args.pool, image, args.id, max(QUEUES), logdir),
        }
        args.file = Path(conf)   # machine_info's "file": the conf, for the record
        records, machine = run_matrix(args, out, build_cells(args.quick, args.poll0), factories)
    finally:
        for cluster, base in stack:
            cluster.stop()
            shutil.rmtree(base, ignore_errors=True)
    machine.pop("file", None)
    machine.pop("file_device", None)
    version = subprocess.run(["ceph-osd", "--version"], capture_output=True, text=True).stdout.strip()
    machine["rbd"] = {"conf": str(conf), "pool": args.pool, "image": f"{args.pool}/{image}",
                      "size": args.image_size, "client": f"client.{args.id}", "rbd_cache": False,
                      "own_cluster": bool(stack), "version": version}
    (out / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    (out / "runs.json").write_text(json.dumps([asdict(r) for r in records], indent=2) + "\n")
    report.write_runs_csv(records, out / "runs.csv")
    summary = report.summarize(records)
    report.write_summary_csv(summary, out / "summary.csv")
    (out / "summary.md").write_text(summary_markdown(summary, records, machine))
    failed = [r for r in records if r.error]
    log.info("done in %.0f s: %d runs, %d failed; %s", time.monotonic() - args.t0, len(records),
             len(failed), out / "summary.md")
    return 1 if failed and len(failed) == len(records) else 0


if __name__ == "__main__":
    sys.exit(main())
