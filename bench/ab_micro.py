"""A/B of the hot-path micro-benchmarks (csrc/bench/bench_hooks.c: pop, parse, push used, the
whole request) of two builds of the C core, loaded side by side into one process and called in
turn, so that both see the same machine at the same moments:

    git archive <rev> | tar -x -C /tmp/base && (cd /tmp/base && python -m dataplane._build)
    python bench/ab_micro.py --base /tmp/base [--rounds 200] [--n 20000]

Each round runs every hook once per build (the order alternates); a hook's figure is its
fastest round in ns per operation (the least disturbed one: other work on the host only ever
adds time), with the median beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RING = 256
BATCH = 32
HOOKS = ("pop", "parse", "push_used", "request")


def load_core(tree: Path, name: str):
    """The cffi module dataplane/_core*.so of a built tree, under its own module name."""
    so = sorted((tree / "dataplane").glob("_core*.so"))
    if not so:
        raise SystemExit(f"{tree}: no dataplane/_core*.so (build it: python -m dataplane._build)")
    spec = importlib.util.spec_from_file_location(f"{name}._core", so[-1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="the baseline tree (built)")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--n", type=int, default=20000, help="operations per call")
    args = p.parse_args()
    builds = {"base": load_core(args.base.resolve(), "ab_base"), "this": load_core(ROOT, "ab_this")}
    rings, results = {}, {}
    for tree, core in builds.items():
        err = core.ffi.new("int *")
        for indirect in (1, 0):
            r = core.lib.dp_bench_ring_new(RING, indirect, 4096, err)
            if r == core.ffi.NULL:
                raise SystemExit(f"{tree}: dp_bench_ring_new: {err[0]}")
            rings[(tree, indirect)] = r
        results[tree] = core.ffi.new("struct dp_bench_result *")
    samples: dict[tuple[str, str, int], list[float]] = {}
    for rnd in range(args.rounds):
        for tree in ("base", "this") if rnd % 2 == 0 else ("this", "base"):
            lib, out = builds[tree].lib, results[tree]
            for indirect in (1, 0):
                ring = rings[(tree, indirect)]
                for hook in HOOKS:
                    fn = getattr(lib, f"dp_bench_{hook}")
                    batched = hook in ("push_used", "request")
                    rc = fn(ring, args.n, BATCH, out) if batched else fn(ring, args.n, out)
                    if rc:
                        raise SystemExit(f"{tree} dp_bench_{hook}: {rc}")
                    samples.setdefault((hook, tree, indirect), []).append(out.ns / args.n)
    for (tree, _), r in rings.items():
        builds[tree].lib.dp_bench_ring_free(r)
    print(f"{args.rounds} rounds x {args.n} operations; ns per operation: fastest round (median)")
    print(f"{'hook':<22}{'base':>16}{'this':>16}{'this/base':>11}")
    for indirect in (1, 0):
        for hook in HOOKS:
            a, b = samples[(hook, "base", indirect)], samples[(hook, "this", indirect)]
            name = f"{hook}[{'indirect' if indirect else 'direct'}]"
            print(f"{name:<22}{min(a):>7.2f} ({statistics.median(a):>6.2f}){min(b):>7.2f} "
                  f"({statistics.median(b):>6.2f}){min(b) / min(a):>11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
