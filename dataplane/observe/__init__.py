"""Seeing what the data plane does: per-queue statistics snapshots (metrics), reading the C
core's latency histograms (hist), and their Prometheus exposition (prometheus, imported only
where it is served)."""

from .metrics import COUNTERS, GAUGES, RECORD_COUNTERS, StatsCollector, format_table, to_json

__all__ = ["COUNTERS", "GAUGES", "RECORD_COUNTERS", "StatsCollector", "format_table", "to_json"]
