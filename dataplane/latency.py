"""Emulated device latency: turn a distribution spec into the inverse-CDF table the C core
samples from, per request, on each queue's own ring.

    fixed:80us                      every request takes 80 us
    uniform:20us-400us              uniform between the bounds
    lognormal:p50=80us,p99=600us    lognormal with that median and 99th percentile
    fio:RESULT.json[:read|write]    the clat_ns percentiles of a real device's fio run

The table holds DP_LATENCY_POINTS quantiles at u = i / (n - 1); the core interpolates
linearly between them. The lognormal tail is cut at the 1 - 1e-6 quantile.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

from .errors import ConfigError

_DURATION_UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
TAIL_CUT = 1e-6


def parse_duration_ns(text: str) -> int:
    """'80us', '1.5ms', '250ns', '2s' (a bare number is microseconds, as in fio's clat)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s)?\s*", text)
    if not m:
        raise ConfigError(f"bad duration {text!r}: expected e.g. 80us, 1.5ms")
    return round(float(m.group(1)) * _DURATION_UNITS[m.group(2) or "us"])


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


def _from_points(points_ns: list[tuple[float, float]], n: int) -> list[int]:
    """Piecewise-linear inverse CDF through (u, value) points, resampled at n points."""
    pts = sorted(points_ns)

    def inv(u: float) -> float:
        for (u0, v0), (u1, v1) in zip(pts, pts[1:], strict=False):
            if u <= u1:
                return v0 if u1 == u0 else v0 + (v1 - v0) * (u - u0) / (u1 - u0)
        return pts[-1][1]

    table = _table(inv, n)
    for i in range(1, n):   # percentile lists can wobble by a bucket: keep it monotonic
        table[i] = max(table[i], table[i - 1])
    return table


def _fio_points(path: Path, direction: str | None) -> list[tuple[float, float]]:
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
                return pts
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
        return _table(lambda u: math.exp(mu + sigma * z(min(max(u, TAIL_CUT), 1 - TAIL_CUT))), points)
    if kind == "fio":
        path_text, _, direction = arg.rpartition(":") if arg.endswith((":read", ":write")) else (arg, "", "")
        return _from_points(_fio_points(Path(path_text), direction or None), points)
    raise ConfigError(f"bad latency {text!r}: expected fixed:, uniform:, lognormal: or fio:")
