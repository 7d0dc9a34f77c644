"""A/B of the C hot-path micro-benchmarks (csrc/bench/bench_hooks.c: pop a chain, push a used
element, a whole request) between a baseline checkout and this tree, each in its own process,
alternating; ns per operation, medians. Use it for changes too small for a whole-system
benchmark to resolve (a branch on the request path):

    git archive <rev> | tar -x -C /tmp/base && (cd /tmp/base && python -m dataplane._build)
    python bench/ab_micro.py --base /tmp/base [--reps 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs inside one tree (cwd): every hook, a few rounds, median ns per operation.
PROBE = r"""
import json, statistics, sys
from dataplane.core import ffi, lib
N, ROUNDS = 20000, 25
out = {}
for indirect in (1, 0):
    err = ffi.new("int *")
    ring = lib.dp_bench_ring_new(256, indirect, 4096, err)
    res = ffi.new("struct dp_bench_result *")
    for name, call in (("pop", lambda: lib.dp_bench_pop(ring, N, res)),
                       ("push_used", lambda: lib.dp_bench_push_used(ring, N, 32, res)),
                       ("request", lambda: lib.dp_bench_request(ring, N, 32, res))):
        ns = []
        for _ in range(ROUNDS):
            assert call() == 0
            ns.append(res.ns / N)
        out[f"{name}-{'indirect' if indirect else 'direct'}"] = statistics.median(ns)
    lib.dp_bench_ring_free(ring)
print(json.dumps(out))
"""


def probe(tree: Path) -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=tree, capture_output=True, text=True,
                       check=True)
    return json.loads(r.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="the baseline checkout (built)")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    trees = {"base": args.base.resolve(), "this": ROOT}
    res: dict[str, dict[str, list[float]]] = {"base": {}, "this": {}}
    for rep in range(args.reps):
        for name in ("base", "this") if rep % 2 == 0 else ("this", "base"):
            for k, v in probe(trees[name]).items():
                res[name].setdefault(k, []).append(v)
    print(f"{'hook':<22}{'base ns':>9}{'this ns':>9}{'this/base':>11}")
    for k in res["base"]:
        b, t = statistics.median(res["base"][k]), statistics.median(res["this"][k])
        print(f"{k:<22}{b:>9.1f}{t:>9.1f}{t / b:>11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
