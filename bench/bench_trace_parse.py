#!/usr/bin/env python3
"""Trace reader throughput: writes a synthetic trace of N records (default 2 million) in every
format into a temporary directory, reads each back with dataplane.replay and prints records/s.

    python bench/bench_trace_parse.py [--records N] [--formats msr,spc,...] [--gzip] [--keep DIR]

Target: at least 1 million records/s for the CSV formats and fio iologs on one core. There is
no pass/fail here; numbers go to the report.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataplane.replay import open_trace  # noqa: E402
from dataplane.replay.blktrace import TRACE_DTYPES  # noqa: E402

LINES_PER_WRITE = 200_000


def workload(n: int, seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "delta_us": rng.integers(1, 200, n),
        "write": rng.random(n) < 0.4,
        "offset": rng.integers(0, 1 << 28, n) * 4096,  # up to 1 TiB
        "length": rng.choice(np.array([512, 4096, 4096, 8192, 16384, 65536, 131072]), n),
        "stream": rng.integers(0, 4, n),
    }


def write_lines(path: Path, header: str, n: int, make) -> None:
    with open(path, "w") as f:
        f.write(header)
        for start in range(0, n, LINES_PER_WRITE):
            f.write("".join(make(start, min(start + LINES_PER_WRITE, n))))


def generate(fmt: str, w: dict[str, np.ndarray], out: Path) -> Path:
    n = len(w["offset"])
    t_us = np.cumsum(w["delta_us"]).tolist()
    wr, off, ln, st = w["write"].tolist(), w["offset"].tolist(), w["length"].tolist(), w["stream"].tolist()
    path = out / f"bench.{fmt}"
    if fmt == "msr":
        write_lines(path, "", n, lambda a, b: [
            f"{128166372003061629 + 10 * t_us[i]},hm,{st[i]},{'Write' if wr[i] else 'Read'},{off[i]},{ln[i]},"
            f"{1000 + i % 5000}\n" for i in range(a, b)])
    elif fmt == "spc":
        write_lines(path, "", n, lambda a, b: [
            f"{st[i]},{off[i] // 512},{ln[i]},{'w' if wr[i] else 'r'},"
            f"{t_us[i] // 1000000}.{t_us[i] % 1000000:06d}\n" for i in range(a, b)])
    elif fmt == "alibaba":
        write_lines(path, "", n, lambda a, b: [
            f"{100 + st[i]},{'W' if wr[i] else 'R'},{off[i]},{ln[i]},{1577808000000000 + t_us[i]}\n"
            for i in range(a, b)])
    elif fmt in ("fio-v2", "fio-v3"):
        files = [f"/dev/vd{c}" for c in "abcd"]
        v3 = fmt == "fio-v3"
        head = "fio version 3 iolog\n" if v3 else "fio version 2 iolog\n"
        head += "".join(f"{'0 ' if v3 else ''}{f} add\n" for f in files)
        head += "".join(f"{'0 ' if v3 else ''}{f} open\n" for f in files)
        write_lines(path, head, n, lambda a, b: [
            f"{str(t_us[i]) + ' ' if v3 else ''}{files[st[i]]} {'write' if wr[i] else 'read'} "
            f"{off[i]} {ln[i]}\n" for i in range(a, b)])
    elif fmt == "blkparse":
        # Each I/O as blkparse prints it: its Q line and its C line.
        def make(a: int, b: int) -> list[str]:
            lines = []
            for i in range(a, b):
                t = t_us[i] * 1000
                rw = "WS" if wr[i] else "R"
                where = f"{off[i] // 512} + {ln[i] // 512}"
                lines.append(f"  8,0   {st[i]:2d} {2 * i + 1:8d} {t // 10**9:5d}.{t % 10**9:09d}  1234  Q "
                             f"{rw:>3s} {where} [fio]\n")
                t += 50_000
                lines.append(f"  8,0   {st[i]:2d} {2 * i + 2:8d} {t // 10**9:5d}.{t % 10**9:09d}     0  C "
                             f"{rw:>3s} {where} [0]\n")
            return lines
        write_lines(path, "", n, make)
    elif fmt == "blktrace":
        # Q and C events, spread over 4 per-CPU files.
        path = out / "bench.blktrace.0"
        for cpu in range(4):
            idx = np.flatnonzero(w["stream"] == cpu)
            recs = np.zeros(2 * len(idx), TRACE_DTYPES["<"])
            t = np.cumsum(w["delta_us"])[idx] * 1000
            cats = np.where(w["write"][idx], (1 << 1) | (1 << 3), 1 << 0)
            recs["magic"] = 0x65617407
            recs["sequence"] = np.arange(1, 2 * len(idx) + 1)
            recs["time"][0::2], recs["time"][1::2] = t, t + 50_000
            recs["action"][0::2] = (cats | (1 << 4)) << 16 | 1  # Q
            recs["action"][1::2] = (cats | (1 << 7)) << 16 | 8  # C
            for k in (0, 1):
                recs["sector"][k::2] = w["offset"][idx] // 512
                recs["bytes"][k::2] = w["length"][idx]
            recs["pid"], recs["device"], recs["cpu"] = 1234, 8 << 20, cpu
            order = np.argsort(recs["time"], kind="stable")
            (out / f"bench.blktrace.{cpu}").write_bytes(recs[order].tobytes())
    else:
        raise SystemExit(f"unknown format {fmt}")
    return path


def gzip_file(path: Path) -> Path:
    gz = path.with_name(path.name + ".gz")
    with open(path, "rb") as src, gzip.open(gz, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return gz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2_000_000)
    parser.add_argument("--formats", default="msr,spc,alibaba,fio-v2,fio-v3,blkparse,blktrace")
    parser.add_argument("--gzip", action="store_true", help="also read gzip'd copies (text formats)")
    parser.add_argument("--repeat", type=int, default=3, help="reads per file; the best counts")
    parser.add_argument("--keep", type=Path, default=None, help="write the traces here and keep them")
    args = parser.parse_args()
    out = args.keep or Path(tempfile.mkdtemp(prefix="bench-trace-"))
    out.mkdir(parents=True, exist_ok=True)
    w = workload(args.records)
    print(f"{'format':<14}{'records':>10}{'MB':>8}{'best s':>9}{'records/s':>13}{'MB/s':>8}")
    try:
        for fmt in args.formats.split(","):
            path = generate(fmt, w, out)
            paths = [path] + ([gzip_file(path)] if args.gzip and fmt != "blktrace" else [])
            for p in paths:
                size = sum(f.stat().st_size for f in p.parent.glob(p.name.rsplit(".", 1)[0] + ".*")) \
                    if fmt == "blktrace" else p.stat().st_size
                best, count = float("inf"), 0
                for _ in range(args.repeat):
                    reader = open_trace(p, "fio" if fmt.startswith("fio") else fmt)
                    start = time.perf_counter()
                    count = sum(len(batch) for batch in reader)
                    best = min(best, time.perf_counter() - start)
                label = fmt + (" .gz" if p.suffix == ".gz" else "")
                print(f"{label:<14}{count:>10}{size / 1e6:>8.0f}{best:>9.3f}{count / best:>13,.0f}"
                      f"{size / 1e6 / best:>8.0f}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
