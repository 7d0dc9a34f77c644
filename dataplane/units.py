"""Sizes and times as fio writes them, for every option that takes one: `4k`, `1g` (powers of
1024); `10s`, `500ms`; `80us` (a bare number: seconds for run times, microseconds for
latencies, as in fio)."""

from __future__ import annotations

import re

from .errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}


def parse_size(text: str) -> int:
    """A byte count with fio's suffixes (k, m, g, t; powers of 1024), e.g. '4G', '512k'."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"bad size {text!r}: expected a number with an optional k/m/g/t suffix")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value != int(value):
        raise ConfigError(f"bad size {text!r}: not a whole number of bytes")
    return int(value)


_TIME_UNITS = {
    "": 1.0, "s": 1.0, "sec": 1.0, "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0, "d": 86400.0, "day": 86400.0,
}


def parse_time(text: str | float | int) -> float:
    """Seconds from fio's time syntax: '10' (seconds), '10s', '500ms', '2m', '250us'."""
    if isinstance(text, int | float):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _TIME_UNITS:
        raise ConfigError(f"bad time {text!r}: expected a number with an optional us/ms/s/m/h suffix")
    return float(m.group(1)) * _TIME_UNITS[m.group(2).lower()]


_DURATION_UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}


def parse_duration_ns(text: str) -> int:
    """'80us', '1.5ms', '250ns', '2s' (a bare number is microseconds, as in fio's clat)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s)?\s*", text)
    if not m:
        raise ConfigError(f"bad duration {text!r}: expected e.g. 80us, 1.5ms")
    return round(float(m.group(1)) * _DURATION_UNITS[m.group(2) or "us"])
