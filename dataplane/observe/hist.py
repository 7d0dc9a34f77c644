"""Reading the C core's latency histograms (struct dp_hist, fio's log-linear buckets) from
Python: a fresh one, a summary, and cumulative counts at chosen bounds."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import accumulate
from typing import Any

from ..core import ffi, lib


def new_hist() -> Any:
    h = ffi.new("struct dp_hist *")
    lib.dp_hist_reset(h)
    return h


def hist_summary(h: Any, percentiles: Iterable[float]) -> dict[str, float]:
    """count, mean, min, max and the given percentiles (fio's rule), in nanoseconds."""
    n = h.n
    out: dict[str, float] = {"count": n, "mean_ns": (h.sum / n) if n else 0.0,
                             "min_ns": h.min if n else 0, "max_ns": h.max}
    for p in percentiles:
        out[f"p{p:g}_ns"] = lib.dp_hist_percentile(h, p) if n else 0
    return out


def hist_cumulative(h: Any, bounds_ns: Iterable[int]) -> list[int]:
    """Counts of samples <= each bound (bucket resolution: a bucket counts when its low edge is).
    One pass over the buckets, copied out of C at once: a scrape runs in the control loop."""
    running = list(accumulate(ffi.unpack(h.bucket, lib.DP_HIST_NR)))
    return [running[min(lib.dp_hist_index(bound), lib.DP_HIST_NR - 1)] for bound in bounds_ns]
