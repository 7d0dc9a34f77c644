"""Emulated device latency: turn a distribution spec into the inverse-CDF table the C core
samples from, per request, on each queue's own ring.

    fixed:80us                      every request takes 80 us
    uniform:20us-400us              uniform between the bounds
    lognormal:p50=80us,p99=600us    lognormal with that median and 99th percentile
    fio:RESULT.json[:read|write]    the clat_ns percentiles of a real device's fio run

The table holds DP_LATENCY_POINTS quantiles at u = i / (n - 1); the core interpolates
linearly between them. Its top cell (the last 1/1024 of the requests) stands for the whole tail
beyond the table's resolution, so its top value is chosen to keep the distribution's mean
(lognormal: the analytic mean; fio: the run's measured mean) rather than set to an extreme
quantile, which a straight line would weigh as if a thousandth of the requests took that long.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

from ..errors import ConfigError
from ..units import parse_duration_ns

TAIL_CUT = 1e-6


@dataclass
class LatencySpec:
    """A parsed latency distribution plus optional throughput caps (whole device)."""

    text: str
    quantiles_ns: list[int] = field(default_factory=list)   # empty: no added latency
    iops: int = 0
    bw: int = 0

    def percentile_ns(self, pct: float) -> float:
        """The configured distribution's percentile (from the table, as the core samples it)."""
        q = self.quantiles_ns
        if not q:
            return 0.0
        x = pct / 100 * (len(q) - 1)
        i = min(int(x), len(q) - 2)
        return q[i] + (q[i + 1] - q[i]) * (x - i)

    def mean_ns(self) -> float:
        q = self.quantiles_ns
        if not q:
            return 0.0
        return sum((a + b) / 2 for a, b in zip(q, q[1:], strict=False)) / (len(q) - 1)


def _table(inverse_cdf, points: int) -> list[int]:
    return [max(0, round(inverse_cdf(i / (points - 1)))) for i in range(points)]


def _table_mean(table: list[float]) -> float:
    """The mean of what the core draws from a table (linear within each cell)."""
    return sum((a + b) / 2 for a, b in zip(table, table[1:], strict=False)) / (len(table) - 1)


def _fit_top(table: list[float], mean: float, highest: float) -> list[float]:
    """Choose the top entry (within [the one below it, highest]) so that the table's mean is
    `mean`: the top cell carries the tail the table cannot resolve."""
    cells = len(table) - 1
    rest = _table_mean(table[:-1]) * (cells - 1) / cells
    top = 2 * cells * (mean - rest) - table[-2]
    table[-1] = min(max(top, table[-2]), highest)
    return table


def _grid(pts: list[tuple[float, float]], n: int, bend: float) -> list[float]:
    """Sample the inverse CDF through the (u, value) knots at u = i / (n - 1). Between two
    knots the value follows s ** bend (s: position between them): 1 is a straight line, more
    keeps the requests near the lower knot, as in a heavy tail. Then move the nearer end of
    each cell that holds a knot so that the core's straight chord passes through the knot:
    the reported percentiles come out exact instead of cut at each corner."""
    cells = n - 1
    table: list[float] = []
    k = 0
    for i in range(n):
        u = i / cells
        while k + 2 < len(pts) and u > pts[k + 1][0]:
            k += 1
        (u0, v0), (u1, v1) = pts[k], pts[k + 1]
        s = 0.0 if u1 == u0 else min(max((u - u0) / (u1 - u0), 0.0), 1.0)
        table.append(v0 + (v1 - v0) * s ** bend)
    for i in range(1, n):   # percentile lists can wobble by a bucket: keep it monotonic
        table[i] = max(table[i], table[i - 1])
    fixed: set[int] = set()
    for u, v in pts:
        i, frac = int(u * cells), u * cells - int(u * cells)
        if frac == 0 or i >= cells - 1 or i in fixed:
            continue   # on the grid already, in the top cell (see _fit_top), or cell taken
        fixed.add(i)
        if frac >= 0.5:
            table[i + 1] = min(max(table[i] + (v - table[i]) / frac, table[i]), table[i + 2])
        else:
            low = table[i - 1] if i else 0.0
            table[i] = min(max((v - table[i + 1] * frac) / (1 - frac), low), table[i + 1])
    return table


def _from_points(points_ns: list[tuple[float, float]], n: int, mean: float | None = None) -> list[int]:
    """Inverse CDF through (u, value) points (u = 0 and 1: min and max), resampled at n
    points, exact at each point below the top cell. With `mean`, keep that mean: first with
    the top cell, then, if the straight lines between the points still weigh the tail too
    much (or too little), by bending every interval (the smallest bend that does it)."""
    pts = sorted(points_ns)
    lowest, highest = pts[0][1], pts[-1][1]
    # fio reports a percentile as its histogram bucket's middle, which can lie past the exact
    # min or max: no emulated request is faster or slower than the run's own extremes
    pts = [(u, min(max(v, lowest), highest)) for u, v in pts]
    table = _grid(pts, n, 1.0)
    if mean is not None and mean > 0:
        _fit_top(table, mean, highest)
        if abs(_table_mean(table) - mean) > 1e-6 * mean:
            lo, hi = (1.0, 64.0) if _table_mean(table) > mean else (1 / 64, 1.0)
            for _ in range(50):   # the mean falls as the bend grows: bisect on its log
                bend = math.sqrt(lo * hi)
                table = _fit_top(_grid(pts, n, bend), mean, highest)
                lo, hi = (bend, hi) if _table_mean(table) > mean else (lo, bend)
    return [max(0, round(v)) for v in table]


def _fio_points(path: Path, direction: str | None) -> tuple[list[tuple[float, float]], float | None]:
    """fio's clat_ns percentiles as (u, ns) points plus min and max, and the run's mean."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"latency fio:{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"latency fio:{path}: not a fio JSON result ({exc})") from None
    jobs = data.get("jobs") if isinstance(data, dict) else None
    if not jobs:
        raise ConfigError(f"latency fio:{path}: no jobs[] in the file")
    directions = [direction] if direction else ["read", "write"]
    for job in jobs:
        for d in directions:
            clat = job.get(d, {}).get("clat_ns", {})
            pct = clat.get("percentile")
            if clat.get("N", 0) and pct:
                pts = [(float(k) / 100, float(v)) for k, v in pct.items()]
                pts.append((0.0, float(clat.get("min", pts[0][1]))))
                pts.append((1.0, float(clat.get("max", pts[-1][1]))))
                mean = clat.get("mean")
                return pts, float(mean) if isinstance(mean, int | float) and mean > 0 else None
    raise ConfigError(f"latency fio:{path}: no {'/'.join(directions)} clat_ns percentiles in it")


def parse_latency(text: str, points: int) -> list[int]:
    """The inverse-CDF table for a distribution spec (see the module doc)."""
    kind, _, arg = text.partition(":")
    if kind == "fixed":
        value = parse_duration_ns(arg)
        return [value] * points
    if kind == "uniform":
        lo_text, sep, hi_text = arg.partition("-")
        if not sep:
            raise ConfigError(f"bad latency {text!r}: expected uniform:LOW-HIGH, e.g. uniform:20us-400us")
        lo, hi = parse_duration_ns(lo_text), parse_duration_ns(hi_text)
        if hi < lo:
            raise ConfigError(f"bad latency {text!r}: the upper bound is below the lower bound")
        return _table(lambda u: lo + (hi - lo) * u, points)
    if kind == "lognormal":
        params = dict(p.partition("=")[::2] for p in arg.split(",") if p)
        if set(params) != {"p50", "p99"}:
            raise ConfigError(f"bad latency {text!r}: expected lognormal:p50=X,p99=Y")
        p50, p99 = parse_duration_ns(params["p50"]), parse_duration_ns(params["p99"])
        if not 0 < p50 < p99:
            raise ConfigError(f"bad latency {text!r}: need 0 < p50 < p99")
        mu = math.log(p50)
        sigma = (math.log(p99) - mu) / NormalDist().inv_cdf(0.99)
        z = NormalDist().inv_cdf
        table = [math.exp(mu + sigma * z(min(max(i / (points - 1), TAIL_CUT), 1 - TAIL_CUT)))
                 for i in range(points)]
        return [round(v) for v in _fit_top(table, math.exp(mu + sigma ** 2 / 2), table[-1])]
    if kind == "fio":
        path_text, _, direction = arg.rpartition(":") if arg.endswith((":read", ":write")) else (arg, "", "")
        pts, mean = _fio_points(Path(path_text), direction or None)
        return _from_points(pts, points, mean)
    raise ConfigError(f"bad latency {text!r}: expected fixed:, uniform:, lognormal: or fio:")
