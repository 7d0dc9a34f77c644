#!/usr/bin/env python3
"""Cost of one Prometheus scrape (`serve --metrics`), which runs in the control plane's loop:
a synthetic stats snapshot of Q queues (counters and a latency histogram of 2000 samples each)
rendered by dataplane.observe.prometheus, timed in-process.

    python bench/bench_metrics.py [--queues 2,64] [--scrapes N]

No pass/fail; numbers go to docs/results.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataplane.core import lib  # noqa: E402
from dataplane.observe.hist import new_hist  # noqa: E402
from dataplane.observe.metrics import COUNTERS, GAUGES, RECORD_COUNTERS  # noqa: E402
from dataplane.observe.prometheus import exposition  # noqa: E402


def snapshot(queues: int) -> dict:
    rng = random.Random(1)
    out = []
    for i in range(queues):
        h = new_hist()
        for _ in range(2000):
            lib.dp_hist_add(h, rng.randint(1000, 5_000_000))
        counters = {c: rng.randint(0, 10**9) for c in COUNTERS + RECORD_COUNTERS}
        out.append({"queue": i, "thread": f"dp-vq{i}", **counters,
                    **dict.fromkeys(GAUGES, 1), "_hist": h})
    return {"queues": out}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queues", default="2,64", help="comma-separated queue counts")
    p.add_argument("--scrapes", type=int, default=50)
    args = p.parse_args()
    for queues in (int(q) for q in args.queues.split(",")):
        snap = snapshot(queues)
        exposition(lambda snap=snap: snap)   # warm-up
        t0 = time.perf_counter()
        for _ in range(args.scrapes):
            body, _ = exposition(lambda snap=snap: snap)
        ms = (time.perf_counter() - t0) / args.scrapes * 1e3
        print(f"{queues:>4} queues: {ms:7.2f} ms per scrape, {len(body)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
