#!/usr/bin/env python3
"""Trace replay against its targets: AFAP replay versus `dataplane load`, and timed replay's
issue lag at a fixed rate. Writes synthetic blktrace traces, serves a null disk with
`dataplane serve` (a separate process), and prints one table. No pass/fail: numbers go to
docs/replay.md.

    python bench/bench_replay.py [--queues 1] [--iodepth 32] [--bs 4k] [--seconds 3] [--repeat 7]
                                 [--cpus 1] [--rate 20000] [--rw randread,randrw] [--spin-us 0,50]
                                 [--replay-poll-us 5,0] [--streaming]

Targets:
  * AFAP replay reaches at least 0.9x the IOPS `dataplane load` reaches with the same block
    size, queue depth and queues (null disk);
  * timed replay at 20k IOPS keeps the p99 issue lag under 100 us.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.systems import dataplane_backend  # noqa: E402
from dataplane.driver import Device  # noqa: E402
from dataplane.driver.load import Job  # noqa: E402
from dataplane.replay import open_trace  # noqa: E402
from dataplane.replay.blktrace import TRACE_DTYPES  # noqa: E402
from dataplane.replay.engine import ReplayOptions, replay_device, replay_memory, ring_size  # noqa: E402
from dataplane.units import parse_size  # noqa: E402

DISK = "null:64G"
MAX_PRELOADED = 7_500_000      # records: fits the default --feed-mb (256 MiB, 8 Mi records)
STREAM_FEED = 65536
BLK_TC_READ, BLK_TC_WRITE, BLK_TC_SYNC, BLK_TC_QUEUE = 1 << 0, 1 << 1, 1 << 3, 1 << 4
TA_QUEUE = 1


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


def make_trace(prefix: Path, n: int, bs: int, rw: str, queues: int, rate: float, seed: int = 11) -> Path:
    rng = np.random.default_rng(seed)
    blocks = parse_size(DISK.partition(":")[2]) // bs
    offset = rng.integers(0, blocks, n, dtype=np.int64) * bs
    write = rng.random(n) < 0.5 if rw == "randrw" else np.zeros(n, bool)
    gaps = rng.exponential(1e9 / rate, n) if rate else np.full(n, 1000.0)
    time_ns = np.cumsum(gaps).astype(np.int64)
    cpu = np.arange(n) % queues
    return write_blktrace(prefix, time_ns, offset, np.full(n, bs, np.int64), write, cpu)


def load_iops(sock: Path, rw: str, bs: int, iodepth: int, queues: int, seconds: float,
              cpus: list[int]) -> float:
    job = Job(rw=rw, bs=bs, iodepth=iodepth, runtime=seconds, ramp_time=0.5, cpus=cpus)
    with Device.connect(str(sock), queues=queues, queue_size=job.queue_size(True),
                        memory=job.memory_needed(queues)) as dev:
        result = dev.load(job)
    return result.iops("read") + result.iops("write")


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


def ratio_row(label: str, loads: list[float], runs: list[dict], note: str) -> dict:
    """Print one table row (medians, their ratio, the median of paired ratios) and return it."""
    base = statistics.median(loads)
    mid = statistics.median(r["iops"] for r in runs)
    pairs = statistics.median(r["iops"] / b for r, b in zip(runs, loads, strict=True))
    print(f"{label:<26}{base:>12,.0f}{mid:>13,.0f}{mid / base:>8.3f}{pairs:>8.3f}   ({note})")
    return {"load_iops": loads, "replay_iops": [r["iops"] for r in runs],
            "ratio_of_medians": mid / base, "median_pair_ratio": pairs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queues", type=int, default=1)
    p.add_argument("--iodepth", type=int, default=32)
    p.add_argument("--bs", default="4k")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each run")
    p.add_argument("--cpus", type=lambda t: [int(c) for c in t.split(",") if c], default=[1],
                   help="AFAP runs: pin queue i's driver thread (load's and replay's alike) to the "
                        "i-th CPU; serve puts dp-vq0 on CPU 0 (default 1; '' leaves them unpinned)")
    p.add_argument("--timed-cpus", type=lambda t: [int(c) for c in t.split(",") if c], default=[],
                   help="timed runs: the same (default: unpinned, so a busy CPU is not waited for)")
    p.add_argument("--rate", type=float, default=20000.0, help="timed replay: IOPS (all queues)")
    p.add_argument("--rw", default="randread,randrw",
                   help="AFAP workloads to compare with load ('' for none: timed only)")
    p.add_argument("--replay-poll-us", type=lambda t: [int(v) for v in t.split(",")], default=[5, 0],
                   help="AFAP replays at each of these --poll-us (5 is replay's afap default; load's is 0)")
    p.add_argument("--spin-us", type=lambda t: [int(v) for v in t.split(",")], default=[50],
                   help="timed replay: --spin-us values to try (comma-separated)")
    p.add_argument("--repeat", type=int, default=7, help="AFAP runs per workload (medians count)")
    p.add_argument("--streaming", action="store_true",
                   help="also replay each AFAP trace through 64 Ki-record feeds (read while it runs)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args()
    bs = parse_size(args.bs)
    work = Path(tempfile.mkdtemp(prefix="dp-bench-replay-"))
    sock = work / "serve.sock"
    serve = dataplane_backend("serve", sock, DISK, args.queues, work)
    serve.start()
    out: dict = {"queues": args.queues, "iodepth": args.iodepth, "bs": bs, "cpus": os.cpu_count(),
                 "pinned": args.cpus}
    try:
        print(f"null disk {DISK}, {args.queues} queue(s), iodepth {args.iodepth}, bs {bs}, "
              f"{os.cpu_count()} CPUs, driver threads on CPUs {args.cpus or 'any'}")
        print(f"medians of {args.repeat} alternating runs of {args.seconds:g} s; ratio: of the medians, "
              f"and the median of each run's ratio to the load run before it")
        print(f"{'workload':<26}{'load IOPS':>12}{'replay IOPS':>13}{'ratio':>8}{'pairs':>8}")
        for rw in [w for w in args.rw.split(",") if w]:
            # Runs alternate (load, replay at each --replay-poll-us, load, ...) so drift on a
            # shared machine hits them all alike.
            loads: list[float] = []
            replays: dict[int, list[dict]] = {poll: [] for poll in args.replay_poll_us}
            streamed: list[dict] = []
            trace = None
            for _ in range(args.repeat):
                loads.append(load_iops(sock, rw, bs, args.iodepth, args.queues, args.seconds, args.cpus))
                if trace is None:
                    # As long as the load run, but loaded before the clock starts (it fits the
                    # default --feed-mb): the engine is measured, not the trace reader.
                    n = min(int(loads[0] * args.seconds), MAX_PRELOADED)
                    trace = make_trace(work / f"afap-{rw}", n, bs, rw, args.queues, rate=0)
                for poll, runs in replays.items():
                    runs.append(replay(sock, trace, ReplayOptions(mode="afap", iodepth=args.iodepth,
                                                                  cpus=args.cpus, poll_us=poll), args.queues))
                if args.streaming:
                    streamed.append(replay(sock, trace, ReplayOptions(
                        mode="afap", iodepth=args.iodepth, cpus=args.cpus, feed_records=STREAM_FEED),
                        args.queues))
            for poll, runs in replays.items():
                out[f"afap_{rw}_poll{poll}"] = ratio_row(
                    f"afap {rw} poll {poll}us", loads, runs,
                    f"best {max(loads):,.0f} / {max(r['iops'] for r in runs):,.0f}; "
                    f"{runs[0]['records']} records, feed waits {max(r['feed_waits'] for r in runs)}")
            if streamed:
                out[f"afap_{rw}_streamed"] = ratio_row(
                    f"afap {rw} streamed", loads, streamed,
                    f"{STREAM_FEED}-record feeds: the reader runs during the replay; feed waits "
                    f"{max(r['feed_waits'] for r in streamed)}")
        n = int(args.rate * args.seconds)
        trace = make_trace(work / "timed", n, bs, "randread", args.queues, rate=args.rate)
        out["timed"] = []
        for spin in args.spin_us:
            r = replay(sock, trace, ReplayOptions(mode="timed", spin_us=spin, cpus=args.timed_cpus),
                       args.queues)
            lag = r["lag"]
            print(f"timed {args.rate:,.0f} IOPS (Poisson arrivals), {n} records, --spin-us {spin}: "
                  f"achieved {r['iops']:,.0f} IOPS; issue lag (us): "
                  + ", ".join(f"{k}={lag[k] / 1000:.1f}" for k in ("p50", "p90", "p99", "p99.9", "max")))
            out["timed"].append({"rate": args.rate, "spin_us": spin, "achieved_iops": r["iops"],
                                 "records": n, "lag_ns": lag, "full_waits": r["full_waits"]})
    finally:
        serve.stop()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
