#!/usr/bin/env python3
"""How long `dataplane trace plot` takes on a long trace, and how much memory it needs.

Writes a synthetic trace of N I/Os (default 4 million) into a temporary directory, then times
`python -m dataplane trace plot` on it in a child process and prints the wall time and the
child's peak RSS. The workload is the one of the paper behind issue 17: one CPU writes
sequentially in 128 KiB requests, the other issues random 4 KiB reads and writes.

    python bench/bench_trace_plot.py [--records N] [--format blktrace|fio-v3] [--keep DIR]

blktrace: one file per CPU with Q, D and C events for every I/O (3 N events, 144 bytes an
I/O), so the plot reads the trace once for its requests and again for the queue depth's
events. fio-v3: one line an I/O, no completions. There is no pass/fail; numbers go to
docs/patterns.md with the command.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataplane.replay.blktrace import (  # noqa: E402
    BLK_IO_TRACE_MAGIC,
    BLK_IO_TRACE_VERSION,
    BLK_TA_COMPLETE,
    BLK_TA_ISSUE,
    BLK_TA_QUEUE,
    BLK_TC_READ,
    BLK_TC_WRITE,
    TRACE_DTYPES,
)

CHUNK = 500_000
CHILD = """
import resource, sys
from dataplane.cli import main
rc = main(sys.argv[1:])
usage = resource.getrusage(resource.RUSAGE_SELF)
with open("/proc/self/status") as f:
    sys.stderr.write(next(line for line in f if line.startswith("VmHWM")))
sys.stderr.write(f"CPU {usage.ru_utime + usage.ru_stime:.1f}\\n")
sys.exit(rc)
"""
DEVICE = (8 << 20) | 16
TC_QUEUE, TC_ISSUE, TC_COMPLETE = 1 << 4, 1 << 6, 1 << 7


def workload(n: int, seed: int = 17) -> dict[str, np.ndarray]:
    """Half the I/Os sequential 128k writes on CPU 0, half random 4k I/Os (30% writes) on CPU 1."""
    rng = np.random.default_rng(seed)
    cpu = (rng.random(n) < 0.5).astype(np.int64)
    seq = cpu == 0
    length = np.where(seq, 128 << 10, 4 << 10)
    offset = np.zeros(n, np.int64)
    nseq = int(seq.sum())
    offset[seq] = (np.arange(nseq) * (128 << 10)) % (64 << 30)
    offset[~seq] = rng.integers(0, (64 << 30) // 4096, n - nseq) * 4096
    write = seq | (rng.random(n) < 0.3)
    t_q = np.cumsum(rng.integers(1_000, 40_000, n))  # ns: about 50k IOPS
    latency = rng.exponential(80_000, n).astype(np.int64) + 20_000
    return {"cpu": cpu, "offset": offset, "length": length, "write": write, "t_q": t_q,
            "t_d": t_q + 500, "t_c": t_q + 500 + latency}


def _events(w: dict[str, np.ndarray], lo: int, hi: int) -> np.ndarray:
    n = hi - lo
    ev = np.zeros(3 * n, TRACE_DTYPES["<"])
    rw = np.where(w["write"][lo:hi], BLK_TC_WRITE, BLK_TC_READ)
    kinds = ((w["t_q"], BLK_TA_QUEUE, TC_QUEUE), (w["t_d"], BLK_TA_ISSUE, TC_ISSUE),
             (w["t_c"], BLK_TA_COMPLETE, TC_COMPLETE))
    for k, (when, act, cat) in enumerate(kinds):
        part = ev[k * n:(k + 1) * n]
        part["magic"] = BLK_IO_TRACE_MAGIC | BLK_IO_TRACE_VERSION
        part["time"] = when[lo:hi]
        part["sector"] = w["offset"][lo:hi] // 512
        part["bytes"] = w["length"][lo:hi]
        part["action"] = act | ((rw | cat) << 16)
        part["pid"] = 4242
        part["device"] = DEVICE
        part["cpu"] = w["cpu"][lo:hi]
    return ev


def write_blktrace(w: dict[str, np.ndarray], out: Path) -> Path:
    """bench.blktrace.0 and .1, each in time order (events past a chunk's last Q wait for the next)."""
    n = len(w["cpu"])
    files = [open(out / f"bench.blktrace.{cpu}", "wb") for cpu in (0, 1)]
    seqno = [0, 0]
    held = np.zeros(0, TRACE_DTYPES["<"])
    try:
        for lo in range(0, n, CHUNK):
            hi = min(lo + CHUNK, n)
            ev = np.concatenate([held, _events(w, lo, hi)])
            ev = ev[np.argsort(ev["time"], kind="stable")]
            cut = int(np.searchsorted(ev["time"], w["t_q"][hi - 1], side="right")) if hi < n else len(ev)
            ready, held = ev[:cut], ev[cut:]
            for cpu in (0, 1):
                mine = ready[ready["cpu"] == cpu].copy()
                mine["sequence"] = np.arange(seqno[cpu], seqno[cpu] + len(mine))
                seqno[cpu] += len(mine)
                files[cpu].write(mine.tobytes())
    finally:
        for f in files:
            f.close()
    return out / "bench.blktrace.0"


def write_fio_v3(w: dict[str, np.ndarray], out: Path) -> Path:
    path = out / "bench.iolog"
    names = ("/dev/vda", "/dev/vdb")
    with open(path, "w") as f:
        f.write("fio version 3 iolog\n" + "".join(f"0 {d} add\n0 {d} open\n" for d in names))
        n = len(w["cpu"])
        for lo in range(0, n, CHUNK):
            hi = min(lo + CHUNK, n)
            us = (w["t_q"][lo:hi] // 1000 + 1).tolist()
            dev = w["cpu"][lo:hi].tolist()
            act = np.where(w["write"][lo:hi], "write", "read").tolist()
            off, ln = w["offset"][lo:hi].tolist(), w["length"][lo:hi].tolist()
            f.write("".join(f"{us[i]} {names[dev[i]]} {act[i]} {off[i]} {ln[i]}\n" for i in range(hi - lo)))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=4_000_000)
    ap.add_argument("--format", choices=("blktrace", "fio-v3"), default="blktrace")
    ap.add_argument("--keep", type=Path, default=None, help="write the trace and charts here and keep them")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-trace-plot-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        w = workload(args.records)
        trace = (write_blktrace if args.format == "blktrace" else write_fio_v3)(w, work)
        del w
        size = sum(p.stat().st_size for p in work.glob(trace.name.rsplit(".", 1)[0] + "*"))
        print(f"trace: {args.records:,} I/Os, {args.format}, {size / 2**20:.0f} MiB "
              f"(written in {time.perf_counter() - t0:.1f} s)")
        # The child reports its own high-water mark (VmHWM): a fork's rusage would count the
        # pages it shared with this process, which held the workload.
        cmd = [sys.executable, "-c", CHILD, "trace", "plot", str(trace), "--out", str(work / "charts")]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        ours = [line for line in proc.stderr.splitlines() if line.startswith(("VmHWM", "CPU "))]
        sys.stderr.write("".join(line + "\n" for line in proc.stderr.splitlines() if line not in ours))
        if proc.returncode:
            print(f"trace plot failed: status {proc.returncode}", file=sys.stderr)
            return 1
        hwm = next(line for line in ours if line.startswith("VmHWM"))
        cpu = next(line for line in ours if line.startswith("CPU "))
        print(f"trace plot: {wall:.1f} s wall, {cpu.split()[1]} s CPU, "
              f"peak RSS {int(hwm.split()[1]) / 1024:.0f} MiB")
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
