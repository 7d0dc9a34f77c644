"""`dataplane trace plot` and `dataplane replay --compare A.json B.json --plot DIR`: the command
line around dataplane.observe's profiles and charts.

Wiring (in dataplane/replay/cli.py): `add_plot_command(sub)` among the trace subcommands, and
`run_plot(args)` for `trace plot`; `plot_reports(...)` from replay's --compare.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..cli_common import int_at_least
from ..errors import ConfigError
from .profile import SCATTER_LIMIT

PLOT_DESCRIPTION = """\
Chart block traces, one panel per trace side by side: offset over time (a scatter, or a 2-D
density above --scatter-limit requests), request sizes per op, IOPS over time by op, the
inter-arrival time CDF, queue depth over time (blktrace/blkparse: from Q, D and C events) and
sequentiality per stream. Writes NAME.png (or .svg) per chart and summary.json (the numbers
behind them) into --out. Needs matplotlib: pip install 'dataplane[plot]'."""


def add_plot_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .charts import FORMATS as IMAGE_FORMATS
    from .detect import FORMATS

    p = sub.add_parser("plot", help="charts of one or more traces side by side (needs matplotlib)",
                       description=PLOT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", type=Path, nargs="+", metavar="TRACE",
                   help="trace files (" + ", ".join(FORMATS) + "; blktrace: any DEV.blktrace.N)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for the charts")
    p.add_argument("--format", dest="image_format", choices=IMAGE_FORMATS, default="png",
                   help="image format (default png)")
    p.add_argument("--format-of", dest="format_of", action="append", default=[], metavar="[TRACE=]FMT",
                   help="trace format (default: detect): FMT for every trace, TRACE=FMT for one; repeatable")
    p.add_argument("--label", dest="labels", action="append", default=[], metavar="NAME",
                   help="panel title of the next trace, in order (default: its file name); repeatable")
    p.add_argument("--events", choices=("queue", "issue"), default="queue",
                   help="blktrace/blkparse: chart queue (Q, default) or issue (D) events")
    p.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                   help="malformed lines: stop at the first (default) or skip and count them")
    p.add_argument("--scatter-limit", type=int_at_least(0), default=SCATTER_LIMIT,
                   help=f"offset x time: a scatter up to this many requests, a density above "
                        f"(default {SCATTER_LIMIT})")
    return p


def trace_formats(inputs: list[Path], specs: list[str]) -> list[str | None]:
    """--format-of: each trace's format (None: detect)."""
    from .detect import FORMATS

    every: str | None = None
    named: dict[str, str] = {}
    for spec in specs:
        path, eq, fmt = spec.rpartition("=")
        if fmt not in FORMATS:
            raise ConfigError(f"--format-of {spec!r}: unknown trace format {fmt!r}; "
                              f"known: {', '.join(FORMATS)}")
        if eq:
            if path not in {str(p) for p in inputs}:
                raise ConfigError(f"--format-of {spec!r}: {path} is not one of the traces to plot")
            named[path] = fmt
        else:
            every = fmt
    return [named.get(str(p), every) for p in inputs]


def run_plot(args: argparse.Namespace) -> int:
    from .charts import plot_traces, require_matplotlib
    from .profile import profile_trace

    require_matplotlib()  # before reading anything: a long trace read for nothing is no help
    if len(args.labels) > len(args.inputs):
        raise ConfigError(f"{len(args.labels)} --label for {len(args.inputs)} trace(s)")
    labels = args.labels + [None] * (len(args.inputs) - len(args.labels))
    formats = trace_formats(args.inputs, args.format_of)
    profiles = [profile_trace(path, format=fmt, events=args.events, on_error=args.on_error, label=label,
                              scatter_limit=args.scatter_limit)
                for path, fmt, label in zip(args.inputs, formats, labels, strict=True)]
    result = plot_traces(profiles, args.out, args.image_format)
    for p in profiles:
        if p.skipped:
            print(f"trace plot: skipped {p.skipped} malformed lines of {p.path}", file=sys.stderr)
    names = ", ".join(chart.path.name for chart in result.charts.values())
    print(f"trace plot: {len(profiles)} trace(s), {sum(p.records for p in profiles)} requests -> "
          f"{args.out}: {names}, {result.summary_path.name}", file=sys.stderr)
    return 0


def plot_reports(reports: list[tuple[str, dict[str, Any]]], out_dir: Path, fmt: str,
                 rows: list[dict[str, Any]]) -> None:
    """--compare ... --plot DIR: the compare charts of the reports (name, parsed JSON)."""
    from .charts import plot_compare, require_matplotlib
    from .reports import report_directions

    require_matplotlib()
    names = [Path(name).name for name, _ in reports]
    if len(set(names)) < len(names):
        names = [name for name, _ in reports]
    runs = [(name, report_directions(data)) for name, (_, data) in zip(names, reports, strict=True)]
    result = plot_compare(runs, out_dir, fmt, rows)
    names = ", ".join(chart.path.name for chart in result.charts.values())
    print(f"replay --compare: charts in {out_dir}: {names}, {result.summary_path.name}", file=sys.stderr)
