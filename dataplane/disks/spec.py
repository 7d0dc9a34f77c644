"""`--disk` specs: the backing store, then options after a comma
(`null:4G,latency=fixed:80us,iops=50000,bw=1g`)."""

from __future__ import annotations

import re

from ..core import lib
from ..errors import ConfigError
from ..units import parse_size
from .latency import LatencySpec, parse_latency

_DISK_OPTIONS = ("latency", "iops", "bw")


def split_disk_options(spec: str) -> tuple[str, LatencySpec | None]:
    """`null:4G,latency=fixed:80us,iops=50000,bw=1g` -> ('null:4G', LatencySpec).
    Options start at the first comma followed by a known key."""
    option_start = r",(?=(?:{})=)".format("|".join(_DISK_OPTIONS))
    m = re.search(option_start, spec)
    if not m:
        return spec, None
    base, opts = spec[: m.start()], spec[m.start() + 1:]
    # latency values contain commas (lognormal:p50=..,p99=..): split on ",key=" only
    parts = re.split(option_start, opts)
    spec_obj = LatencySpec(text=opts)
    for part in parts:
        key, _, value = part.partition("=")
        if key == "latency":
            spec_obj.quantiles_ns = parse_latency(value, int(lib.DP_LATENCY_POINTS))
        elif key == "iops":
            spec_obj.iops = _positive(value, "iops", parse=int)
        elif key == "bw":
            spec_obj.bw = _positive(value, "bw", parse=parse_size)
    return base, spec_obj


def _positive(text: str, key: str, parse) -> int:
    try:
        value = parse(text)
    except (ValueError, ConfigError):
        raise ConfigError(f"bad {key}={text!r}: expected a positive number") from None
    if value <= 0:
        raise ConfigError(f"bad {key}={text!r}: expected a positive number")
    return value
