"""Charts of block traces (`dataplane trace plot`) and of two run reports (`dataplane replay
--compare A.json B.json --plot DIR`), drawn with matplotlib's object API on the Agg canvas (no
display, no pyplot state). matplotlib is optional: `pip install 'dataplane[plot]'`.

Every chart kind is one figure with one panel per trace (or per report, or per direction), so
that traces sit side by side on shared axes where that helps to compare them. The plotting
functions return what they drew (`Chart`: the file, and per panel what kind of plot it holds)
for callers and tests, and write a JSON summary of the numbers behind the charts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .profile import DATA_OPS, OFFSET_BINS, TraceProfile, merge_bins, size_label
from .records import OP_NAMES, Op
from .reports import Direction

FORMATS = ("png", "svg")
DPI = 100
PANEL_SIZE = (5.2, 3.6)  # inches
MAX_COLUMNS = 3
MAX_STREAM_BARS = 12
OP_COLORS = {Op.READ: "#1f77b4", Op.WRITE: "#d62728", Op.TRIM: "#2ca02c", Op.FLUSH: "#7f7f7f"}
RUN_COLORS = ("#1f77b4", "#ff7f0e")
DIRECTION_STYLES = {"read": "-", "write": "--", "trim": ":", "sync": "-."}
INSTALL_HINT = "charts need matplotlib, which is not installed: pip install 'dataplane[plot]'"
TRACE_CHARTS = ("offset_time", "sizes", "iops", "interarrival", "queue_depth", "sequentiality")
COMPARE_CHARTS = ("compare_iops_time", "compare_latency", "compare_throughput")
SUMMARY_FILE = "summary.json"
COMPARE_SUMMARY_FILE = "compare.json"


class PlotUnavailable(ConfigError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise PlotUnavailable (one line: how to get it) unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise PlotUnavailable(INSTALL_HINT) from None


@dataclass
class Panel:
    title: str
    kind: str          # scatter, density, bars, stacked-bars, lines, empty
    artists: int = 0   # series, bar groups or cells drawn


@dataclass
class Chart:
    name: str
    path: Path
    panels: list[Panel] = field(default_factory=list)
    axes: int = 0      # data axes in the figure (colorbars not counted)


@dataclass
class PlotSet:
    charts: dict[str, Chart]
    summary_path: Path
    summary: dict[str, Any]


# ---- figures and files ----


def _figure(n: int, *, sharex: bool = False, sharey: bool = False, title: str = ""):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(n, MAX_COLUMNS)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows + 0.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, cols, sharex=sharex, sharey=sharey, squeeze=False)
    axes = list(grid.ravel())
    for extra in axes[n:]:
        fig.delaxes(extra)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig, axes[:n]


def _empty(ax, title: str, why: str) -> Panel:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=9, wrap=True)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    return Panel(title, "empty")


def _eng(ax, axis: str = "y") -> None:
    """Counts as 2.5M rather than 2.5 with a 1e6 offset."""
    from matplotlib.ticker import EngFormatter

    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(EngFormatter(sep=""))


def _us_text(us: float) -> str:
    if us >= 1e6:
        return f"{us / 1e6:.3g} s"
    if us >= 1e3:
        return f"{us / 1e3:.3g} ms"
    return f"{us:.3g} us"


class _Writer:
    """Charts go to hidden temporary names and are renamed into place only when every one of
    them (and the summary) is written: a failed run leaves nothing that claims success."""

    def __init__(self, out_dir: Path, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ConfigError(f"chart format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        self.out_dir = Path(out_dir)
        self.fmt = fmt
        self.pending: list[tuple[Path, Path]] = []
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {self.out_dir}: {exc.strerror or exc}") from None

    def _tmp(self, name: str) -> tuple[Path, Path]:
        final = self.out_dir / name
        tmp = self.out_dir / f".{name}.part"
        self.pending.append((tmp, final))
        return tmp, final

    def figure(self, name: str, fig, panels: list[Panel]) -> Chart:
        tmp, final = self._tmp(f"{name}.{self.fmt}")
        try:
            fig.savefig(tmp, format=self.fmt, dpi=DPI)
        except OSError as exc:
            raise ConfigError(f"cannot write {final}: {exc.strerror or exc}") from None
        axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        return Chart(name, final, panels, len(axes))

    def json(self, name: str, data: dict[str, Any]) -> Path:
        tmp, final = self._tmp(name)
        try:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot write {final}: {exc.strerror or exc}") from None
        return final

    def commit(self, stale: Sequence[str]) -> None:
        for tmp, final in self.pending:
            tmp.replace(final)
        written = {final.name for _, final in self.pending}
        for name in stale:  # a chart of an earlier run this one did not draw
            if name not in written:
                (self.out_dir / name).unlink(missing_ok=True)
        self.pending = []

    def abort(self) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending = []


def _render(out_dir: Path, fmt: str, drawers: list[tuple[str, Callable[[], tuple[Any, list[Panel]] | None]]],
            summary_name: str, summary: dict[str, Any], known: Sequence[str]) -> PlotSet:
    writer = _Writer(out_dir, fmt)
    charts: dict[str, Chart] = {}
    try:
        for name, draw in drawers:
            drawn = draw()
            if drawn is None:
                continue
            fig, panels = drawn
            charts[name] = writer.figure(name, fig, panels)
            fig.clear()
        summary["charts"] = {name: chart.path.name for name, chart in charts.items()}
        summary_path = writer.json(summary_name, summary)
        writer.commit([f"{name}.{f}" for name in known for f in FORMATS])
    except BaseException:
        writer.abort()
        raise
    return PlotSet(charts, summary_path, summary)


# ---- trace charts ----


def _op_legend(ax, ops: Sequence[int]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=OP_COLORS[op], label=OP_NAMES[op]) for op in ops]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper right")


def _offset_unit(profiles: Sequence[TraceProfile]) -> tuple[float, str]:
    top = max((p.max_end for p in profiles), default=0)
    return (2.0**30, "GiB") if top >= 2**30 else (2.0**20, "MiB")


def draw_offset_time(profiles: Sequence[TraceProfile]):
    from matplotlib.colors import LogNorm

    fig, axes = _figure(len(profiles), sharey=True, title="Offset over time (where each request lands)")
    scale, unit = _offset_unit(profiles)
    panels = []
    for ax, p in zip(axes, profiles, strict=True):
        title = f"{p.label} ({p.records:,} requests)"
        pts = p.points()
        if p.records == 0:
            panels.append(_empty(ax, p.label, "no requests"))
            continue
        if pts is not None:
            data = pts[pts["op"] != Op.FLUSH]
            ops = [op for op in DATA_OPS if np.any(data["op"] == op)]
            for op in ops:
                sel = data[data["op"] == op]
                ax.scatter(sel["time_ns"] / 1e9, sel["offset"] / scale, s=3, linewidths=0,
                           color=OP_COLORS[op], rasterized=True)
            _op_legend(ax, ops)
            panels.append(Panel(title, "scatter", len(ops)))
        else:
            f = max(1, p.display_factor(target=256))
            cols = -(-p.used_bins // f)
            grid = merge_bins(p.density, f)[:cols]
            rows = min(OFFSET_BINS, int(p.max_end // p.offset_width) + 1)
            grid = grid[:, :rows]
            t_edges = np.arange(cols + 1) * (p.width_ns * f) / 1e9
            o_edges = np.arange(rows + 1) * p.offset_width / scale
            masked = np.ma.masked_equal(grid.T, 0)
            vmax = max(1, int(grid.max()))
            mesh = ax.pcolormesh(t_edges, o_edges, masked, norm=LogNorm(vmin=1, vmax=vmax), cmap="viridis",
                                 rasterized=True, shading="flat")
            fig.colorbar(mesh, ax=ax, label="requests per cell", pad=0.01)
            panels.append(Panel(title, "density", int(np.count_nonzero(grid))))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("time (s)")
    axes[0].set_ylim(bottom=0)  # once all are drawn: the axes share it
    axes[0].set_ylabel(f"offset ({unit})")
    return fig, panels


def draw_sizes(profiles: Sequence[TraceProfile]):
    fig, axes = _figure(len(profiles), sharex=True, sharey=True,
                        title="Request sizes per op (share of that op's requests)")
    used = sorted({b for p in profiles for op in DATA_OPS for b in np.flatnonzero(p.size_buckets[op])})
    labels = [size_label(1 << b) for b in used]
    x = np.arange(len(used))
    panels = []
    for ax, p in zip(axes, profiles, strict=True):
        ops = [op for op in DATA_OPS if p.op_counts[op]]
        if not ops:
            panels.append(_empty(ax, p.label, "no reads, writes or trims"))
            continue
        width = 0.8 / len(ops)
        for i, op in enumerate(ops):
            share = 100.0 * p.size_buckets[op][used] / p.op_counts[op]
            mean = p.op_bytes[op] / p.op_counts[op]
            ax.bar(x + (i - (len(ops) - 1) / 2) * width, share, width, color=OP_COLORS[op],
                   label=f"{OP_NAMES[op]} ({int(p.op_counts[op]):,}, mean {size_label(round(mean))})")
        ax.set_xticks(x, labels, rotation=45 if len(labels) > 6 else 0, fontsize=8)
        ax.set_title(p.label, fontsize=10)
        ax.set_xlabel("request size (up to)")
        ax.legend(fontsize=7)
        panels.append(Panel(p.label, "bars", len(ops)))
    axes[0].set_ylabel("% of the op's requests")
    return fig, panels


def draw_iops(profiles: Sequence[TraceProfile]):
    fig, axes = _figure(len(profiles), title="IOPS over time, stacked by op (the read/write mix)")
    panels = []
    for ax, p in zip(axes, profiles, strict=True):
        if p.records == 0:
            panels.append(_empty(ax, p.label, "no requests"))
            continue
        f = p.display_factor()
        starts, counts, _ = p.series(f)
        width = p.width_ns * f / 1e9
        bottom = np.zeros(len(starts))
        drawn = 0
        for op in (Op.READ, Op.WRITE, Op.TRIM, Op.FLUSH):
            iops = counts[:, op] / width
            if not iops.any():
                continue
            ax.bar(starts, iops, width, bottom=bottom, align="edge", color=OP_COLORS[op], linewidth=0,
                   label=OP_NAMES[op])
            bottom += iops
            drawn += 1
        ax.set_title(f"{p.label}: {p.mix_text()}", fontsize=10)
        ax.set_xlabel("time (s)")
        _eng(ax)
        ax.legend(fontsize=8, loc="upper right")
        panels.append(Panel(p.label, "stacked-bars", drawn))
    axes[0].set_ylabel("IOPS")
    return fig, panels


def draw_interarrival(profiles: Sequence[TraceProfile]):
    fig, axes = _figure(len(profiles), sharex=True, sharey=True,
                        title="Inter-arrival time CDF (gap to the previous request)")
    panels = []
    for ax, p in zip(axes, profiles, strict=True):
        edges, cdf, zero = p.interarrival_cdf()
        if p.records < 2:
            panels.append(_empty(ax, p.label, "fewer than two requests"))
            continue
        keep = np.flatnonzero(np.diff(cdf, prepend=zero))
        lo = max(int(keep[0]) - 1, 0) if len(keep) else 0
        hi = int(keep[-1]) + 2 if len(keep) else len(edges)
        ax.step(edges[lo:hi], 100 * cdf[lo:hi], where="post", color="#1f77b4")
        ax.set_xscale("log")
        ia = p.summary()["interarrival_us"]
        note = f"mean {_us_text(ia['mean'])}" + (f", {100 * zero:.1f}% at 0" if zero else "")
        ax.set_title(f"{p.label}: {note}", fontsize=10)
        ax.set_xlabel("inter-arrival time (us)")
        ax.set_ylim(0, 100)
        ax.grid(True, which="both", alpha=0.3)
        panels.append(Panel(p.label, "lines", 1))
    axes[0].set_ylabel("% of gaps at or below")
    return fig, panels


def draw_queue_depth(profiles: Sequence[TraceProfile]):
    if not any(p.depth for p in profiles):
        return None
    fig, axes = _figure(len(profiles), title="Queue depth over time (mean requests in flight per interval)")
    panels = []
    for ax, p in zip(axes, profiles, strict=True):
        if not p.depth:
            why = f"no completions in this trace ({p.format_name or 'unknown'}):\n"
            panels.append(_empty(ax, p.label, why + "queue depth needs Q/C or D/C event pairs"))
            continue
        f = p.display_factor(target=200)
        drawn = 0
        for channel, label, color, style in (("q", "block layer (Q->C)", "#9467bd", "-"),
                                             ("d", "device (D->C)", "#8c564b", "--")):
            s = p.depth_series(channel, f)
            if s is None:
                continue
            t, mean = s
            ax.step(np.append(t, t[-1] + p.width_ns * f / 1e9), np.append(mean, mean[-1]), where="post",
                    label=f"{label}, mean {mean.mean():.2f}", color=color, linestyle=style)
            drawn += 1
        ax.set_title(p.label, fontsize=10)
        ax.set_xlabel("time (s)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        panels.append(Panel(p.label, "lines", drawn))
    axes[0].set_ylabel("requests in flight")
    return fig, panels


def draw_sequentiality(profiles: Sequence[TraceProfile]):
    fig, axes = _figure(len(profiles), sharey=True,
                        title="Sequentiality (requests starting where the stream's previous one ended)")
    panels = []
    for ax, p in zip(axes, profiles, strict=True):
        seq = p.summary()["sequential"]
        if not seq["requests"]:
            panels.append(_empty(ax, p.label, "no stream has two data requests"))
            continue
        streams = list(seq["streams"].items())[:MAX_STREAM_BARS]
        names = ["all"] + [name if len(name) <= 14 else "..." + name[-12:] for name, _ in streams]
        shares = [seq["share"]] + [(s["share"] or 0.0) for _, s in streams]
        colors = ["#444444"] + ["#17becf"] * len(streams)
        bars = ax.bar(np.arange(len(names)), [100 * v for v in shares], color=colors)
        ax.bar_label(bars, labels=[f"{100 * v:.0f}%" for v in shares], fontsize=7)
        ax.set_xticks(np.arange(len(names)), names, rotation=45 if len(names) > 4 else 0, fontsize=8)
        more = len(seq["streams"]) - len(streams)
        top = f" (top {len(streams)} of {len(seq['streams'])} streams)" if more else ""
        ax.set_title(p.label + top, fontsize=10)
        ax.set_ylim(0, 105)
        panels.append(Panel(p.label, "bars", len(names)))
    axes[0].set_ylabel("% sequential")
    return fig, panels


TRACE_DRAWERS = {"offset_time": draw_offset_time, "sizes": draw_sizes, "iops": draw_iops,
                 "interarrival": draw_interarrival, "queue_depth": draw_queue_depth,
                 "sequentiality": draw_sequentiality}


def plot_traces(profiles: Sequence[TraceProfile], out_dir: str | Path, fmt: str = "png") -> PlotSet:
    """Every trace chart for `profiles` side by side, into out_dir (`NAME.png` or `.svg`, and
    summary.json with the numbers behind them)."""
    require_matplotlib()
    if not profiles:
        raise ConfigError("no trace to plot")
    summary = {"traces": [p.summary() for p in profiles]}
    drawers = [(name, (lambda d=draw: d(profiles))) for name, draw in TRACE_DRAWERS.items()]
    return _render(Path(out_dir), fmt, drawers, SUMMARY_FILE, summary, TRACE_CHARTS)


# ---- comparing two reports ----


def draw_compare_iops_time(runs: Sequence[tuple[str, dict[str, Direction]]]):
    if not any(d.series for _, dirs in runs for d in dirs.values()):
        return None
    fig, axes = _figure(len(runs), sharey=True, title="IOPS over time")
    panels = []
    colors = {"read": OP_COLORS[Op.READ], "write": OP_COLORS[Op.WRITE], "trim": OP_COLORS[Op.TRIM],
              "sync": OP_COLORS[Op.FLUSH]}
    for ax, (name, dirs) in zip(axes, runs, strict=True):
        with_series = [d for d in dirs.values() if d.series]
        if not with_series:
            panels.append(_empty(ax, name, "no IOPS series in this report\n(fio's JSON has none)"))
            continue
        for d in with_series:
            interval, iops = d.series
            t = np.arange(len(iops) + 1) * interval / 1000
            ax.step(t, np.append(iops, iops[-1]), where="post", color=colors[d.name], label=d.name,
                    linestyle=DIRECTION_STYLES[d.name])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("time (s)")
        _eng(ax)
        ax.legend(fontsize=8)
        panels.append(Panel(name, "lines", len(with_series)))
    axes[0].set_ylim(bottom=0)
    axes[0].set_ylabel("IOPS")
    return fig, panels


def _count_text(v: float) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def draw_compare_latency(runs: Sequence[tuple[str, dict[str, Direction]]]):
    names = [d for d in ("read", "write", "trim", "sync") if any(d in dirs for _, dirs in runs)]
    if not names:
        return None
    fig, axes = _figure(len(names), sharey=True, title="Completion latency percentiles (clat)")
    panels = []
    for ax, dname in zip(axes, names, strict=True):
        drawn = 0
        for color, (run, dirs) in zip(RUN_COLORS, runs, strict=False):
            d = dirs.get(dname)
            if d is None or not d.clat:
                continue
            points = [(ns / 1000, _nines(p)) for p, ns in d.clat if p < 100]
            ax.plot([x for x, _ in points], [y for _, y in points], marker=".", color=color,
                    label=run + (" (~)" if d.approximate else ""))
            drawn += 1
        if not drawn:
            panels.append(_empty(ax, dname, "no latency percentiles in either report"))
            continue
        ax.set_xscale("log")
        ax.set_title(dname, fontsize=10)
        ax.set_xlabel("completion latency (us)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        panels.append(Panel(dname, "lines", drawn))
    # The tail matters: percentiles on a "nines" axis (90, 99, 99.9 equally spaced).
    axes[0].set_yticks([_nines(p) for p in NINES], [f"{p:g}" for p in NINES])
    axes[0].set_ylim(0, _nines(99.99) * 1.02)
    axes[0].set_ylabel("percentile")
    return fig, panels


NINES = (0, 50, 90, 99, 99.9, 99.99)


def _nines(pct: float) -> float:
    """-log10(1 - p): 0 -> 0, 90 -> 1, 99 -> 2, 99.9 -> 3."""
    return -math.log10(1 - min(pct, 99.999) / 100)


def draw_compare_throughput(runs: Sequence[tuple[str, dict[str, Direction]]]):
    names = [d for d in ("read", "write", "trim", "sync") if any(d in dirs for _, dirs in runs)]
    if not names:
        return None
    fig, axes = _figure(2, title="Throughput per direction")
    panels = []
    x = np.arange(len(names))
    width = 0.8 / len(runs)
    for ax, (metric, unit, get) in zip(axes, (("IOPS", "IOPS", lambda d: d.iops),
                                              ("bandwidth", "MiB/s", lambda d: d.bw_bytes / 2**20)),
                                       strict=True):
        for i, (color, (run, dirs)) in enumerate(zip(RUN_COLORS, runs, strict=False)):
            values = [get(dirs[d]) if d in dirs else 0.0 for d in names]
            bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, values, width, color=color, label=run)
            ax.bar_label(bars, labels=[_count_text(v) if v else "" for v in values], fontsize=7)
        ax.set_xticks(x, names)
        _eng(ax)
        ax.set_title(metric, fontsize=10)
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
        panels.append(Panel(metric, "bars", len(runs)))
    return fig, panels


def plot_compare(runs: Sequence[tuple[str, dict[str, Direction]]], out_dir: str | Path, fmt: str = "png",
                 rows: list[dict[str, Any]] | None = None) -> PlotSet:
    """Charts of two (or more) reports' directions side by side, into out_dir, and
    compare.json (the --compare rows and what each chart drew)."""
    require_matplotlib()
    summary: dict[str, Any] = {
        "runs": [{"name": name, "directions": {d.name: {"ios": d.ios, "iops": d.iops, "bw_bytes": d.bw_bytes,
                                                        "clat_ns": d.clat, "approximate": d.approximate,
                                                        "series": d.series is not None}
                                               for d in dirs.values()}} for name, dirs in runs],
        "rows": rows or [],
    }
    drawers = [("compare_iops_time", lambda: draw_compare_iops_time(runs)),
               ("compare_latency", lambda: draw_compare_latency(runs)),
               ("compare_throughput", lambda: draw_compare_throughput(runs))]
    return _render(Path(out_dir), fmt, drawers, COMPARE_SUMMARY_FILE, summary, COMPARE_CHARTS)
