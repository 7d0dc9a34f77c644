#!/usr/bin/env python3
"""Trace replay against its targets: AFAP replay versus `dataplane load` at the same queue
count, queue depth and read/write mix, side by side in one run; and timed replay's issue lag
at a fixed rate. Writes synthetic single-stream blktrace traces (every record at time 0,
offsets random in --span), serves a null disk with `dataplane serve` (a separate process),
and prints one table. No pass/fail: numbers go to docs/results.md and docs/replay.md.

    python bench/bench_replay.py [--queues 1,2] [--mix randread,randrw:67] [--iodepth 32]
                                 [--bs 4k] [--span 1g] [--seconds 3] [--repeat 5] [--cpus '']
                                 [--base TREE] [--streaming] [--rate 20000] [--spin-us 0,50]

Every AFAP run is a command, as a user would type it, with the default options (--cpus pins
both drivers' threads alike when given):

    dataplane load --socket S --queues Q --rw randrw --rwmixread 67 --bs 4k --iodepth 32 --size 1g
    dataplane replay --socket S --queues Q [--queue-map rr] --mode afap --iodepth 32 TRACE

With 2 queues the single-stream trace is spread with `--queue-map rr` (`trace` would keep it
on one queue). `--base TREE` also runs that tree's `dataplane replay` (an A/B of the replay
engine: the same trace, the same backend, alternating). Ratios are of medians, and "pairs" is
the median of each replay's ratio to the load run before it.

Targets:
  * AFAP replay reaches at least 0.9x the IOPS `dataplane load` reaches with the same block
    size, queue depth, mix and queues (null disk, default options);
  * timed replay at 20k IOPS keeps the p99 issue lag under 100 us.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.systems import dataplane_backend  # noqa: E402
from dataplane.driver import Device  # noqa: E402
from dataplane.replay import open_trace  # noqa: E402
from dataplane.replay.blktrace import TRACE_DTYPES  # noqa: E402
from dataplane.replay.engine import ReplayOptions, replay_device, replay_memory, ring_size  # noqa: E402
from dataplane.units import parse_size  # noqa: E402

DISK = "null:64G"
MAX_PRELOADED = 7_500_000      # records: fits the default --feed-mb (256 MiB, 8 Mi records)
STREAM_FEED_MB = 2             # --streaming: feeds this small make the reader run during the replay
BLK_TC_READ, BLK_TC_WRITE, BLK_TC_SYNC, BLK_TC_QUEUE = 1 << 0, 1 << 1, 1 << 3, 1 << 4
TA_QUEUE = 1
# the tree it runs is the working directory's (python -m puts it first on sys.path)
DATAPLANE = [sys.executable, "-m", "dataplane", "--log-level", "warning"]


def write_blktrace(prefix: Path, time_ns: np.ndarray, offset: np.ndarray, length: np.ndarray,
                   write: np.ndarray, cpu: np.ndarray) -> Path:
    """Q events in blktrace's binary format, one file per CPU (= stream = queue)."""
    for c in np.unique(cpu).tolist():
        idx = np.flatnonzero(cpu == c)
        recs = np.zeros(len(idx), TRACE_DTYPES["<"])
        cats = np.where(write[idx], BLK_TC_WRITE | BLK_TC_SYNC, BLK_TC_READ)
        recs["magic"] = 0x65617407
        recs["sequence"] = np.arange(1, len(idx) + 1)
        recs["time"] = time_ns[idx]
        recs["action"] = (cats | BLK_TC_QUEUE) << 16 | TA_QUEUE
        recs["sector"] = offset[idx] // 512
        recs["bytes"] = length[idx]
        recs["pid"], recs["device"], recs["cpu"] = 1234, 8 << 20, c
        Path(f"{prefix}.blktrace.{c}").write_bytes(recs.tobytes())
    return Path(f"{prefix}.blktrace.0")


def make_trace(prefix: Path, n: int, bs: int, read_pct: int, streams: int, rate: float,
               span: int = parse_size(DISK.partition(":")[2]), seed: int = 11) -> Path:
    """n records of bs bytes at random block offsets in [0, span), read_pct % reads, spread
    round-robin over `streams` CPUs; all at time 0 (rate 0) or Poisson arrivals at rate."""
    rng = np.random.default_rng(seed)
    offset = rng.integers(0, span // bs, n, dtype=np.int64) * bs
    write = rng.random(n) * 100 >= read_pct
    gaps = rng.exponential(1e9 / rate, n) if rate else np.zeros(n)
    time_ns = np.cumsum(gaps).astype(np.int64)
    cpu = np.arange(n) % streams
    return write_blktrace(prefix, time_ns, offset, np.full(n, bs, np.int64), write, cpu)


def parse_mix(text: str) -> tuple[str, int]:
    """randread, randwrite, randrw (50 % reads) or randrw:PCT."""
    name, _, pct = text.partition(":")
    if name not in ("randread", "randwrite", "randrw"):
        raise argparse.ArgumentTypeError(f"{text!r}: randread, randwrite, randrw or randrw:PCT")
    return name, {"randread": 100, "randwrite": 0}.get(name, int(pct or 50))


def run_json(argv: list[str], cwd: Path) -> dict:
    """Run a dataplane command (fio JSON on stdout): IOPS of all its jobs, and its driver
    threads' CPU per I/O (fio's usr/sys percentages of each job's runtime)."""
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise SystemExit(f"{' '.join(argv)} (in {cwd}): exit {out.returncode}\n{out.stderr[-2000:]}")
    jobs = json.loads(out.stdout)["jobs"]
    ios = sum(j[d]["total_ios"] for j in jobs for d in ("read", "write"))
    cpu_s = sum((j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1000 for j in jobs)
    extra = jobs[0].get("dataplane", {})
    return {"iops": sum(j[d]["iops"] for j in jobs for d in ("read", "write")),
            "cpu_us_per_io": cpu_s / max(ios, 1) * 1e6, "ios": ios,
            "kicks": sum(j.get("dataplane", {}).get("kicks", 0) for j in jobs),
            "hazard_waits": extra.get("hazard_waits", 0), "feed_waits": extra.get("feed_waits", 0)}


def load_cmd(sock: Path, queues: int, rw: str, read_pct: int, args: argparse.Namespace) -> list[str]:
    argv = DATAPLANE + ["load", "--socket", str(sock), "--queues", str(queues), "--rw", rw,
                                  "--bs", args.bs, "--iodepth", str(args.iodepth), "--size", args.span,
                                  "--runtime", str(args.seconds), "--ramp", "0.5",
                                  "--output-format", "json"]
    if rw == "randrw":
        argv += ["--rwmixread", str(read_pct)]
    if args.cpus:
        argv += ["--cpus", ",".join(map(str, args.cpus))]
    return argv


def replay_cmd(sock: Path, queues: int, trace: Path, args: argparse.Namespace,
               feed_mb: int | None = None, extra: str = "") -> list[str]:
    argv = DATAPLANE + ["replay", "--socket", str(sock), "--queues", str(queues),
                                  "--mode", "afap", "--iodepth", str(args.iodepth),
                                  "--output-format", "json"]
    if queues > 1:
        argv += ["--queue-map", "rr"]
    if args.cpus:
        argv += ["--cpus", ",".join(map(str, args.cpus))]
    if feed_mb:
        argv += ["--feed-mb", str(feed_mb)]
    return argv + extra.split() + [str(trace)]


def replay(sock: Path, trace: Path, options: ReplayOptions, queues: int) -> dict:
    reader = open_trace(trace)
    with Device.connect(str(sock), queues=queues, queue_size=ring_size(options.depth, True),
                        memory=replay_memory(queues, options, 1 << 20)) as dev:
        result = replay_device(dev, reader, options, target=str(sock))
    if result.error or result.io_errors:
        raise SystemExit(f"replay failed: {result.summary_of_problems()}")
    secs = result.runtime_ns / 1e9
    return {"iops": (result.ios(0) + result.ios(1)) / secs, "lag": result.issue_lag(),
            "records": result.mapping.issued, "seconds": secs,
            "feed_waits": result.total("feed_waits"), "full_waits": result.total("full_waits")}


def ratio_row(label: str, loads: list[dict], runs: list[dict], note: str) -> dict:
    """Print one table row (medians, their ratio, the median of paired ratios, CPU per I/O of
    the driver threads) and return it."""
    base = statistics.median(r["iops"] for r in loads)
    mid = statistics.median(r["iops"] for r in runs)
    pairs = statistics.median(r["iops"] / b["iops"] for r, b in zip(runs, loads, strict=True))
    cpu_l = statistics.median(r["cpu_us_per_io"] for r in loads)
    cpu_r = statistics.median(r["cpu_us_per_io"] for r in runs)
    print(f"{label:<30}{base:>12,.0f}{mid:>13,.0f}{mid / base:>8.3f}{pairs:>8.3f}"
          f"{cpu_l:>9.3f}{cpu_r:>9.3f}   ({note})")
    return {"load_iops": [r["iops"] for r in loads], "replay_iops": [r["iops"] for r in runs],
            "load_cpu_us_per_io": [r["cpu_us_per_io"] for r in loads],
            "replay_cpu_us_per_io": [r["cpu_us_per_io"] for r in runs],
            "ratio_of_medians": mid / base, "median_pair_ratio": pairs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queues", type=lambda t: [int(q) for q in t.split(",")], default=[1, 2],
                   help="queue counts to compare at (comma-separated; default 1,2)")
    p.add_argument("--mix", type=lambda t: [parse_mix(m) for m in t.split(",") if m],
                   default=[("randread", 100), ("randrw", 67)],
                   help="AFAP workloads: randread, randwrite, randrw[:PCT] (default randread,randrw:67;"
                        " '' for none: timed only)")
    p.add_argument("--iodepth", type=int, default=32)
    p.add_argument("--bs", default="4k")
    p.add_argument("--span", default="1g", help="offsets are random in [0, span) (load's --size)")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each load run")
    p.add_argument("--records", type=int, default=4_000_000,
                   help="records per AFAP trace (default 4 M, the issue's; at most 7.5 M, which "
                        "the default --feed-mb loads before the clock starts)")
    p.add_argument("--cpus", type=lambda t: [int(c) for c in t.split(",") if c], default=[],
                   help="pin queue i's driver thread (load's and replay's alike) to the i-th CPU "
                        "(default: unpinned, the commands' defaults)")
    p.add_argument("--base", type=Path, default=None,
                   help="a built tree whose `dataplane replay` runs too (A/B of the replay engine)")
    p.add_argument("--variant", action="append", default=[], metavar="ARGS",
                   help="also run this tree's replay with these extra options (e.g. '--no-stamp'; "
                        "repeatable)")
    p.add_argument("--repeat", type=int, default=5, help="AFAP runs per cell (medians count)")
    p.add_argument("--streaming", action="store_true",
                   help=f"also replay each AFAP trace with --feed-mb {STREAM_FEED_MB} (read while it runs)")
    p.add_argument("--rate", type=float, default=20000.0, help="timed replay: IOPS (all queues)")
    p.add_argument("--spin-us", type=lambda t: [int(v) for v in t.split(",") if v], default=[50],
                   help="timed replay: --spin-us values to try (comma-separated; '' for no timed runs)")
    p.add_argument("--timed-cpus", type=lambda t: [int(c) for c in t.split(",") if c], default=[],
                   help="timed runs: pin the replay threads (default: unpinned)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args()
    bs = parse_size(args.bs)
    span = parse_size(args.span)
    work = Path(tempfile.mkdtemp(prefix="dp-bench-replay-"))
    sock = work / "serve.sock"
    serve = dataplane_backend("serve", sock, DISK, max(args.queues), work)
    serve.start()
    # what runs beside load: this tree's replay, its variants, the base tree's replay
    trees = {"replay": (ROOT, "")} | {f"replay {v}": (ROOT, v) for v in args.variant}
    if args.base:
        trees["base"] = (args.base.resolve(), "")
    out: dict = {"iodepth": args.iodepth, "bs": bs, "span": span, "cpus": os.cpu_count(),
                 "pinned": args.cpus, "base": str(args.base) if args.base else None,
                 "loadavg_before": os.getloadavg()}
    try:
        print(f"null disk {DISK}, iodepth {args.iodepth}, bs {bs}, offsets in {args.span}, "
              f"{os.cpu_count()} CPUs, driver threads on CPUs {args.cpus or 'any'}; "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"medians of {args.repeat} alternating runs of {args.seconds:g} s; ratio: of the medians, "
              f"and the median of each run's ratio to the load run before it; CPU: driver threads' "
              f"us per I/O")
        print(f"{'cell':<30}{'load IOPS':>12}{'replay IOPS':>13}{'ratio':>8}{'pairs':>8}"
              f"{'CPU ld':>9}{'CPU rp':>9}")
        for queues in args.queues:
            for rw, read_pct in args.mix:
                loads: list[dict] = []
                replays: dict[str, list[dict]] = {t: [] for t in trees}
                streamed: list[dict] = []
                trace = None
                for rep in range(args.repeat):
                    loads.append(run_json(load_cmd(sock, queues, rw, read_pct, args), ROOT))
                    if trace is None:
                        # Loaded before the clock starts (it fits the default --feed-mb): the
                        # engine is measured, not the trace reader.
                        n = min(args.records, MAX_PRELOADED)
                        trace = make_trace(work / f"afap-{rw}{read_pct}-q{queues}", n, bs, read_pct, 1,
                                           rate=0, span=span)
                    order = list(trees) if rep % 2 == 0 else list(reversed(trees))
                    for tree in order:
                        cwd, extra = trees[tree]
                        argv = replay_cmd(sock, queues, trace, args, extra=extra)
                        replays[tree].append(run_json(argv, cwd))
                    if args.streaming:
                        streamed.append(run_json(replay_cmd(sock, queues, trace, args, STREAM_FEED_MB), ROOT))
                mix = rw if rw != "randrw" else f"randrw {read_pct}/{100 - read_pct}"
                for tree, runs in replays.items():
                    label = f"{queues}q {mix}" + ("" if tree == "replay" else f" ({tree})")
                    out[f"afap_q{queues}_{rw}{read_pct}_{tree}"] = ratio_row(
                        label, loads, runs,
                        f"best {max(r['iops'] for r in loads):,.0f} / {max(r['iops'] for r in runs):,.0f};"
                        f" {n} records, hazard waits {max(r['hazard_waits'] for r in runs)}")
                if streamed:
                    out[f"afap_q{queues}_{rw}{read_pct}_streamed"] = ratio_row(
                        f"{queues}q {mix} streamed", loads, streamed,
                        f"--feed-mb {STREAM_FEED_MB}: the reader runs during the replay; feed waits "
                        f"{max(r['feed_waits'] for r in streamed)}")
        out["timed"] = []
        if args.spin_us:
            n = int(args.rate * args.seconds)
            trace = make_trace(work / "timed", n, bs, 100, 1, rate=args.rate)
        for spin in args.spin_us:
            r = replay(sock, trace, ReplayOptions(mode="timed", spin_us=spin, cpus=args.timed_cpus), 1)
            lag = r["lag"]
            print(f"timed {args.rate:,.0f} IOPS (Poisson arrivals), {n} records, --spin-us {spin}: "
                  f"achieved {r['iops']:,.0f} IOPS; issue lag (us): "
                  + ", ".join(f"{k}={lag[k] / 1000:.1f}" for k in ("p50", "p90", "p99", "p99.9", "max")))
            out["timed"].append({"rate": args.rate, "spin_us": spin, "achieved_iops": r["iops"],
                                 "records": n, "lag_ns": lag, "full_waits": r["full_waits"]})
    finally:
        serve.stop()
    out["loadavg_after"] = os.getloadavg()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
