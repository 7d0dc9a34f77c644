"""What recording costs (`serve --record`), and what happens when its writer cannot keep up.

    python -m bench.record                          # all three parts, ~4 minutes
    python -m bench.record --only overhead --rounds 5 --runtime 3
    python -m bench.record --only drops
    python -m bench.record --only writers

* overhead: `dataplane serve` on a null disk, 1 and 2 queues, 4k random reads at QD32 from
  `dataplane load`, recording off, to blktrace files and to an iolog (on tmpfs, /dev/shm);
  IOPS, backend CPU per I/O (every thread of the process, the writer included) and the
  writer thread's own CPU per I/O, median of --rounds rounds, the order of the three
  rotating per round, a fresh backend per run (so every recording starts empty).
* drops: the same load with the recording going to a pipe read at --pipe-rate bytes/s (a
  slow output: the writer fills the pipe, stops taking entries, the rings fill and entries
  are dropped); IOPS against recording off, the dropped count from `dataplane stats`, and
  the file's own count of what it lost.
* writers: the writer alone, fed by a C producer that plays a busy queue into one ring at a
  given request rate (bench hook dp_bench_record_feed): the C writer thread (blktrace, iolog)
  against a Python thread draining the same ring and formatting blktrace records with numpy,
  the cheapest a Python writer can be. Entries dropped, and the writer's CPU per request.
  Then the I/O thread's share alone: the two ring pushes of a request, timed in bursts of 32
  with 16 us between them (2M requests/s) while the C writer drains (dp_bench_record_push).

Numbers are for this machine only and noisy (other jobs share its two CPUs): compare within
one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.systems import (  # noqa: E402
    CLK_TCK,
    Backend,
    Workload,
    run_dataplane_load,
    wait_quiet,
)
from dataplane.backend import fetch_stats  # noqa: E402

MODES = ("off", "blktrace", "iolog")
WORKLOAD = Workload("randread-4k-qd32", "randread", "4k", 32)
SHM = Path("/dev/shm")


def thread_cpu_s(pid: int, name: str) -> float:
    """utime + stime of the threads of pid named name."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() != name:
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def serve(name: str, sock: Path, queues: int, logdir: Path, record: Path | None, fmt: str) -> Backend:
    argv = [sys.executable, "-m", "dataplane", "--log-level", "warning", "serve", "--socket", str(sock),
            "--disk", "null:1G", "--queues", str(queues)]
    if record is not None:
        argv += ["--record", str(record), "--record-format", fmt]
    return Backend(name, argv, sock, logdir / f"{name}.log")


def one_run(work: Path, queues: int, mode: str, runtime: float, ramp: float, tag: str,
            record_path: Path | None = None) -> dict:
    sock = work / f"{tag}.sock"
    rec = None if mode == "off" else (record_path or SHM / f"{work.name}-{tag}")
    backend = serve(tag, sock, queues, work / "logs", rec, mode if mode != "off" else "blktrace")
    backend.start()
    try:
        w0 = thread_cpu_s(backend.pid, "dp-record")
        out = run_dataplane_load(sock, WORKLOAD, queues, runtime, ramp, work / "json" / f"{tag}.json",
                                 backend, work / "logs" / f"{tag}-load.log")
        writer_s = thread_cpu_s(backend.pid, "dp-record") - w0
        stats = fetch_stats(str(sock))
    finally:
        backend.stop()
    if out.error:
        raise RuntimeError(f"{tag}: {out.error}")
    files = []
    if rec is not None and record_path is None:
        files = [rec] if mode == "iolog" else sorted(rec.parent.glob(rec.name + ".blktrace.*"))
    size = sum(f.stat().st_size for f in files if f.exists())
    for f in files:
        f.unlink(missing_ok=True)
    job = out.data["jobs"][0]
    ios = max(out.served_ios, 1)
    return {"queues": queues, "mode": mode, "iops": job["read"]["iops"],
            "cpu_us_per_io": out.backend_cpu_s / ios * 1e6, "writer_us_per_io": writer_s / ios * 1e6,
            "served": out.served_ios, "recorded": sum(q["recorded"] for q in stats["queues"]),
            "dropped": sum(q["record_dropped"] for q in stats["queues"]), "bytes": size}


def overhead(args: argparse.Namespace, work: Path) -> list[dict]:
    runs = []
    for rnd in range(args.rounds):
        for queues in args.queues:
            order = MODES[rnd % 3:] + MODES[:rnd % 3]
            for mode in order:
                wait_quiet(0.5, 10)
                r = one_run(work, queues, mode, args.runtime, args.ramp, f"q{queues}-{mode}-{rnd}")
                r["round"] = rnd
                runs.append(r)
                print(f"  round {rnd} q{queues} {mode:8s} {r['iops'] / 1e6:6.2f}M IOPS "
                      f"{r['cpu_us_per_io']:.3f} us/IO (writer {r['writer_us_per_io']:.3f}), "
                      f"recorded {r['recorded']}, dropped {r['dropped']}", flush=True)
    print("\nqueues  recording   IOPS (median)  vs off   backend CPU us/IO  writer us/IO  dropped")
    for queues in args.queues:
        base = statistics.median(r["iops"] for r in runs if r["queues"] == queues and r["mode"] == "off")
        for mode in MODES:
            sel = [r for r in runs if r["queues"] == queues and r["mode"] == mode]
            iops = statistics.median(r["iops"] for r in sel)
            print(f"{queues:6d}  {mode:9s}  {iops / 1e6:10.2f}M  {iops / base:7.3f}  "
                  f"{statistics.median(r['cpu_us_per_io'] for r in sel):17.3f}  "
                  f"{statistics.median(r['writer_us_per_io'] for r in sel):12.3f}  "
                  f"{sum(r['dropped'] for r in sel)}")
    # Each round ran the three modes back to back: the ratio to the same round's run without
    # recording, and its spread over the rounds (how far a shared machine moved the figure).
    print("\nrecording / off within each round: median [min-max]")
    for queues in args.queues:
        off = {r["round"]: r for r in runs if r["queues"] == queues and r["mode"] == "off"}
        for mode in MODES[1:]:
            sel = [r for r in runs if r["queues"] == queues and r["mode"] == mode]
            iops = [r["iops"] / off[r["round"]]["iops"] for r in sel]
            cpu = [r["cpu_us_per_io"] / off[r["round"]]["cpu_us_per_io"] for r in sel]
            print(f"{queues:6d}  {mode:9s}  IOPS {statistics.median(iops):.3f} [{min(iops):.2f}-"
                  f"{max(iops):.2f}]  CPU/IO {statistics.median(cpu):.3f} [{min(cpu):.2f}-{max(cpu):.2f}]")
    return runs


class SlowReader(threading.Thread):
    """Reads a pipe at `rate` bytes/s until told to hurry, then to its end (an end before the
    writer has opened it is not one: a FIFO reads as empty until then)."""

    def __init__(self, fd: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.fd, self.rate, self.hurry, self.data = fd, rate, threading.Event(), bytearray()

    def run(self) -> None:
        os.set_blocking(self.fd, True)
        start = None    # the rate counts from the first byte: no credit for the backend's start-up
        while True:
            if not self.hurry.is_set() and start is not None:
                wait = start + len(self.data) / self.rate - time.monotonic()
                if wait > 0:
                    time.sleep(min(0.01, wait))
                    continue
            chunk = os.read(self.fd, 4096 if not self.hurry.is_set() else 1 << 20)
            if chunk:
                if start is None:
                    start = time.monotonic()
                self.data += chunk
            elif self.hurry.is_set():
                return
            else:
                time.sleep(0.01)


def drops(args: argparse.Namespace, work: Path) -> list[dict]:
    runs = []
    for rnd in range(args.rounds):
        wait_quiet(0.5, 10)
        off = one_run(work, 1, "off", args.runtime, args.ramp, f"drops-off-{rnd}")
        fifo = work / f"pipe-{rnd}.iolog"
        os.mkfifo(fifo)
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)   # the writer's open needs a reader
        reader = SlowReader(fd, args.pipe_rate)
        reader.start()
        try:
            wait_quiet(0.5, 10)
            slow = one_run_slow(work, args, fifo, reader, f"drops-pipe-{rnd}")
        finally:
            reader.join(30)
            os.close(fd)
        lines = bytes(reader.data).decode().splitlines()
        in_file = sum(int(line.split()[3]) for line in lines if " dropped " in line)
        io_lines = sum(1 for line in lines if len(line.split()) == 8)
        r = {"round": rnd, "iops_off": off["iops"], "iops_pipe": slow["iops"], "served": slow["served"],
             "recorded": slow["recorded"], "dropped": slow["dropped"], "dropped_in_file": in_file,
             "lines": io_lines, "pipe_bytes": len(reader.data)}
        runs.append(r)
        total = 2 * slow["served"]
        print(f"  round {rnd}: off {off['iops'] / 1e6:.2f}M IOPS, recording to a pipe read at "
              f"{args.pipe_rate / 1e6:g} MB/s {slow['iops'] / 1e6:.2f}M IOPS "
              f"({slow['iops'] / off['iops']:.3f}x); {slow['dropped']} of {total} entries dropped "
              f"({slow['dropped'] / total:.1%}), the file says {in_file}; {io_lines} lines written",
              flush=True)
    return runs


def one_run_slow(work: Path, args: argparse.Namespace, fifo: Path, reader: SlowReader, tag: str) -> dict:
    """one_run with the recording into fifo; the reader hurries once the load is done so that
    the backend can finish its file and exit."""
    sock = work / f"{tag}.sock"
    backend = serve(tag, sock, 1, work / "logs", fifo, "iolog")
    backend.start()
    try:
        out = run_dataplane_load(sock, WORKLOAD, 1, args.runtime, args.ramp, work / "json" / f"{tag}.json",
                                 backend, work / "logs" / f"{tag}-load.log")
        stats = fetch_stats(str(sock))
    finally:
        reader.hurry.set()
        backend.stop()
    if out.error:
        raise RuntimeError(f"{tag}: {out.error}")
    return {"iops": out.data["jobs"][0]["read"]["iops"], "served": out.served_ios,
            "recorded": sum(q["recorded"] for q in stats["queues"]),
            "dropped": sum(q["record_dropped"] for q in stats["queues"])}


# ---- the writer alone ----

ENTRY = np.dtype([("time_ns", "<u8"), ("offset", "<u8"), ("aux", "<u8"), ("len", "<u4"), ("slot", "<u2"),
                  ("kind", "u1"), ("info", "u1")])
TRACE = np.dtype([("magic", "<u4"), ("sequence", "<u4"), ("time", "<u8"), ("sector", "<u8"),
                  ("bytes", "<u4"), ("action", "<u4"), ("pid", "<u4"), ("device", "<u4"), ("cpu", "<u4"),
                  ("error", "<u2"), ("pdu_len", "<u2")])
assert ENTRY.itemsize == 32 and TRACE.itemsize == 48


class PythonWriter(threading.Thread):
    """Drains ring 0 of a DP_REC_NONE recorder and writes blktrace records, numpy-vectorised."""

    def __init__(self, rec, path: Path) -> None:
        super().__init__(daemon=True)
        self.rec, self.path, self.stop, self.cpu_s, self.entries = rec, path, threading.Event(), 0.0, 0

    def run(self) -> None:
        from dataplane.core import ffi, lib

        batch = 16384
        buf = ffi.new("struct dp_rec_entry[]", batch)
        view = np.frombuffer(ffi.buffer(buf), ENTRY)
        seq = 0
        t0 = time.thread_time()
        with open(self.path, "wb", buffering=1 << 20) as f:
            while True:
                n = lib.dp_recorder_take(self.rec, 0, buf, batch)
                if not n:
                    if self.stop.is_set():
                        break
                    time.sleep(0.001)
                    continue
                e = view[:n]
                e = e[e["kind"] != 3]   # DROP entries: no event
                out = np.zeros(len(e), TRACE)
                out["magic"] = 0x65617407
                out["sequence"] = np.arange(seq + 1, seq + 1 + len(e))
                seq += len(e)
                out["time"] = e["time_ns"]
                out["sector"] = e["offset"] >> np.uint64(9)
                out["bytes"] = e["len"]
                done = e["kind"] == 2
                out["action"] = np.where(done, 8 | ((1 << 7 | 1) << 16), 1 | ((1 << 4 | 1) << 16))
                f.write(out.tobytes())
                self.entries += int(n)
        self.cpu_s = time.thread_time() - t0


def writers(args: argparse.Namespace, work: Path) -> list[dict]:
    from dataplane.core import ffi, lib

    runs = []
    for rate in args.rates:
        for kind in ("C blktrace", "C iolog", "Python+numpy blktrace"):
            wait_quiet(0.5, 10)
            params = ffi.new("struct dp_recorder_params *")
            params.format = {"C blktrace": lib.DP_REC_BLKTRACE, "C iolog": lib.DP_REC_IOLOG}.get(
                kind, lib.DP_REC_NONE)
            params.queues = 1
            params.ring_entries = args.ring or lib.DP_REC_DEFAULT_ENTRIES
            err = ffi.new("int *")
            path = SHM / f"{work.name}-w-{rate}-{kind.split()[0]}"
            rec = lib.dp_recorder_new(str(path).encode(), params, err)
            assert rec != ffi.NULL, err[0]
            py = None
            if params.format == lib.DP_REC_NONE:
                py = PythonWriter(rec, path.with_name(path.name + ".blktrace.0"))
                py.start()
            w0 = thread_cpu_s(os.getpid(), "dp-record")
            res = ffi.new("struct dp_bench_result *")
            lib.dp_bench_record_feed(rec, 0, int(rate), int(args.writer_seconds * 1e9), res)
            if py is not None:
                py.stop.set()
                py.join()
                writer_s = py.cpu_s
            else:
                writer_s = thread_cpu_s(os.getpid(), "dp-record") - w0
            lib.dp_recorder_stop(rec)
            stats = ffi.new("struct dp_record_stats *")
            lib.dp_recorder_get_stats(rec, 0, stats)
            lib.dp_recorder_free(rec)
            for f in SHM.glob(path.name + "*"):
                f.unlink()
            played = res.iterations
            written = 2 * played - stats.dropped
            r = {"rate": rate, "writer": kind, "requests": played, "achieved": played / (res.ns / 1e9),
                 "dropped": stats.dropped, "entries": 2 * played, "written": written,
                 "writer_ns_per_entry": writer_s / max(written, 1) * 1e9,
                 "writer_cores": writer_s / (res.ns / 1e9)}
            runs.append(r)
            share = r["dropped"] / r["entries"]
            print(f"  {rate / 1e6:g}M req/s asked ({r['achieved'] / 1e6:.2f}M played) {kind:22s} "
                  f"dropped {r['dropped']:>9d} of {r['entries']} entries ({share:.1%}), writer "
                  f"{r['writer_ns_per_entry']:.1f} ns per entry written, {r['writer_cores']:.2f} cores",
                  flush=True)
    pushes = []
    for _ in range(5):
        params = ffi.new("struct dp_recorder_params *")
        params.format, params.queues = lib.DP_REC_BLKTRACE, 1
        err = ffi.new("int *")
        path = SHM / f"{work.name}-push"
        rec = lib.dp_recorder_new(str(path).encode(), params, err)
        assert rec != ffi.NULL, err[0]
        res = ffi.new("struct dp_bench_result *")
        lib.dp_bench_record_push(rec, 0, 2_000_000, 16_000, res)
        lib.dp_recorder_free(rec)
        for f in SHM.glob(path.name + "*"):
            f.unlink()
        pushes.append(res.ns / res.iterations)
    runs.append({"writer": "push", "ns_per_request": statistics.median(pushes), "runs": pushes})
    print(f"  the I/O thread's two pushes per request (2M req/s, C writer draining): median "
          f"{statistics.median(pushes):.1f} ns, runs {', '.join(f'{p:.1f}' for p in pushes)}")
    return runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("overhead", "drops", "writers"), action="append", default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=float, default=3.0)
    p.add_argument("--ramp", type=float, default=1.0)
    p.add_argument("--queues", type=lambda s: [int(q) for q in s.split(",")], default=[1, 2])
    p.add_argument("--pipe-rate", type=float, default=2e6, help="drops: bytes/s the pipe is read at")
    p.add_argument("--rates", type=lambda s: [float(r) for r in s.split(",")], default=[1e6, 2e6, 4e6],
                   help="writers: requests/s the producer plays (two entries each)")
    p.add_argument("--writer-seconds", type=float, default=2.0)
    p.add_argument("--ring", type=int, default=0, help="writers: ring entries (0: the default)")
    p.add_argument("--json", type=Path, default=None, help="write every run here")
    args = p.parse_args()
    parts = args.only or ["overhead", "drops", "writers"]
    work = Path(tempfile.mkdtemp(prefix="dp-bench-record-"))
    (work / "logs").mkdir()
    out: dict = {"argv": sys.argv, "loadavg_before": os.getloadavg()}
    try:
        if "overhead" in parts:
            print("overhead: null disk, 4k randread QD32, recording off / blktrace / iolog (tmpfs)")
            out["overhead"] = overhead(args, work)
        if "drops" in parts:
            print("\ndrops: 1 queue, recording (iolog) to a pipe read slowly")
            out["drops"] = drops(args, work)
        if "writers" in parts:
            print("\nwriters: one ring fed by a C producer, drained by each writer")
            out["writers"] = writers(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["loadavg_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
