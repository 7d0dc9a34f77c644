"""bench.compare's output: machine info, the run table, medians and ratios, the issue's
targets, and charts (fio-plot first; matplotlib when fio-plot cannot render)."""

from __future__ import annotations

import csv
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent


# ---- machine ----

def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return 0.0


def _block_device_of(path: Path) -> dict[str, str]:
    """The block device under a file and the queue settings that matter for O_DIRECT."""
    try:
        st = os.stat(path)
        sysdev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
        queue = sysdev / "queue"
        if not queue.exists():
            queue = sysdev.parent / "queue"     # a partition: its disk's queue
        info = {"device": sysdev.name}
        for key in ("scheduler", "rotational", "nr_requests", "logical_block_size"):
            try:
                info[key] = (queue / key).read_text().strip()
            except OSError:
                pass
        mq = queue.parent / "mq"
        if mq.exists():
            info["hw_queues"] = str(len(list(mq.iterdir())))
        irq_cpus = _completion_irq_cpus(path)
        if irq_cpus:
            info["completion_irq_cpus"] = irq_cpus
        return info
    except OSError:
        return {}


def _completion_irq_cpus(path: Path) -> str:
    """CPUs that take the disk's queue interrupts (effective affinity), as the planner reads
    them: where a thread waiting for its completions is woken without an IPI."""
    from dataplane.errors import ConfigError
    from dataplane.placement import BlockDevice
    try:
        dev = BlockDevice.resolve(path)
    except (ConfigError, OSError):
        return ""
    return ", ".join(f"hw queue {q.index} (irq {','.join(map(str, q.irqs))}): cpu "
                     + ",".join(map(str, q.irq_cpus)) for q in dev.hw_queues if q.irq_cpus)


def _git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "?"


def machine_info(file_path: Path | None = None) -> dict[str, Any]:
    uname = os.uname()
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpus_online": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "memory_gib": _mem_gib(),
        "kernel": f"{uname.sysname} {uname.release} {uname.machine}",
        "python": sys.version.split()[0],
        "fio": _first_line(["fio", "--version"]),
        "qemu_storage_daemon": _first_line(["qemu-storage-daemon", "--version"]),
        "liburing": _first_line(["dpkg-query", "-W", "-f", "${Version}", "liburing-dev"]),
        "git": _git_state(),
    }
    try:
        info["virtualization"] = subprocess.run(["systemd-detect-virt"], capture_output=True,
                                                text=True, timeout=10).stdout.strip() or "none"
    except OSError:
        info["virtualization"] = "?"
    if file_path is not None and file_path.exists():
        info["file_device"] = _block_device_of(file_path)
    plan = subprocess.run([sys.executable, "-m", "dataplane", "plan", "--disk", "null:1G",
                           "--queues", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    info["serve_plan_2_queues"] = plan.stdout.strip() or plan.stderr.strip()
    return info


# ---- tables ----

def write_runs_csv(records: Sequence[Any], path: Path) -> None:
    if not records:
        path.write_text("")
        return
    names = [f.name for f in fields(records[0])]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for r in records:
            row = asdict(r)
            row["json"] = os.path.relpath(row["json"], path.parent) if row["json"] else ""
            w.writerow(row)


@dataclass
class Summary:
    """Medians over the repetitions of one system in one cell."""

    disk: str
    workload: str
    rw: str
    bs: str
    iodepth: int
    queues: int
    system: str
    label: str
    runs: int
    failed: int
    iops: float
    iops_min: float
    iops_max: float
    bw_mib_s: float
    clat_p50_us: float
    clat_p99_us: float
    lat_mean_us: float
    cpu_s_per_mio: float
    client_cpu_s_per_mio: float
    other_cpu_cores_max: float

    @property
    def cell(self) -> str:
        return f"{self.disk}/{self.workload}/q{self.queues}"


def _median(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.median(vals) if vals else 0.0


def summarize(records: Sequence[Any]) -> list[Summary]:
    groups: dict[tuple, list[Any]] = {}
    for r in records:
        groups.setdefault((r.disk, r.workload, r.queues, r.system), []).append(r)
    out = []
    for (disk, workload, queues, system), recs in groups.items():
        ok = [r for r in recs if not r.error]
        first = recs[0]
        out.append(Summary(
            disk, workload, first.rw, first.bs, first.iodepth, queues, system, first.label,
            runs=len(recs), failed=len(recs) - len(ok),
            iops=_median(r.iops for r in ok),
            iops_min=min((r.iops for r in ok), default=0.0),
            iops_max=max((r.iops for r in ok), default=0.0),
            bw_mib_s=_median(r.bw_mib_s for r in ok),
            clat_p50_us=_median(r.clat_p50_us for r in ok),
            clat_p99_us=_median(r.clat_p99_us for r in ok),
            lat_mean_us=_median(r.lat_mean_us for r in ok),
            cpu_s_per_mio=_median(r.cpu_s_per_mio for r in ok),
            client_cpu_s_per_mio=_median(r.client_cpu_s_per_mio for r in ok),
            other_cpu_cores_max=max((r.other_cpu_cores for r in recs), default=0.0)))
    return out


def write_summary_csv(summary: Sequence[Summary], path: Path) -> None:
    names = [f.name for f in fields(Summary)]
    ratios = ratio_rows(summary)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names + ["iops_vs_qsd", "iops_vs_native", "cpu_vs_qsd"])
        for s in summary:
            r = ratios.get(s.cell, {}) if s.system == "dataplane" else {}
            w.writerow([getattr(s, n) if not isinstance(getattr(s, n), float)
                        else round(getattr(s, n), 3) for n in names]
                       + [_r3(r.get("iops_vs_qsd")), _r3(r.get("iops_vs_native")),
                          _r3(r.get("cpu_vs_qsd"))])


def _r3(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def _index(summary: Sequence[Summary]) -> dict[tuple[str, str], Summary]:
    return {(s.cell, s.system): s for s in summary}


def ratio_rows(summary: Sequence[Summary]) -> dict[str, dict[str, float]]:
    """Per cell: dataplane / qsd and dataplane / native fio, for IOPS and CPU per I/O."""
    idx = _index(summary)
    out: dict[str, dict[str, float]] = {}
    for s in summary:
        if s.system != "dataplane" or not s.iops:
            continue
        r: dict[str, float] = {}
        qsd = idx.get((s.cell, "qsd"))
        if qsd and qsd.iops:
            r["iops_vs_qsd"] = s.iops / qsd.iops
            if qsd.cpu_s_per_mio:
                r["cpu_vs_qsd"] = s.cpu_s_per_mio / qsd.cpu_s_per_mio
        fio = idx.get((s.cell, "fio"))
        if fio and fio.iops:
            r["iops_vs_native"] = s.iops / fio.iops
            r["p50_minus_native_us"] = s.clat_p50_us - fio.clat_p50_us
        out[s.cell] = r
    return out


def _fmt_iops(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def _fmt(v: float, digits: int = 1) -> str:
    return f"{v:.{digits}f}"


def main_table(summary: Sequence[Summary]) -> list[str]:
    """The comparison matrix: one row per cell, systems side by side."""
    idx = _index(summary)
    ratios = ratio_rows(summary)
    cells: list[str] = []
    for s in summary:
        if s.cell not in cells:
            cells.append(s.cell)
    lines = [
        "| disk | workload | queues | dataplane IOPS | qsd IOPS | fio IOPS | dp/qsd | dp/fio "
        "| p50 clat µs dp / qsd / fio | CPU s per M I/O dp / qsd / fio |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for cell in cells:
        dp, qsd, fio = (idx.get((cell, k)) for k in ("dataplane", "qsd", "fio"))
        if dp is None:
            continue
        r = ratios.get(cell, {})
        disk, workload, q = cell.split("/")

        def col(s: Summary | None, attr: str, fmt: Any) -> str:
            return fmt(getattr(s, attr)) if s is not None and s.runs > s.failed else "–"

        lines.append(
            f"| {disk} | {workload} | {q[1:]} | {col(dp, 'iops', _fmt_iops)} | {col(qsd, 'iops', _fmt_iops)} "
            f"| {col(fio, 'iops', _fmt_iops)} | {_ratio(r.get('iops_vs_qsd'))} "
            f"| {_ratio(r.get('iops_vs_native'))} "
            f"| {col(dp, 'clat_p50_us', _fmt)} / {col(qsd, 'clat_p50_us', _fmt)} "
            f"/ {col(fio, 'clat_p50_us', _fmt)} "
            f"| {col(dp, 'cpu_s_per_mio', _fmt2)} / {col(qsd, 'cpu_s_per_mio', _fmt2)}"
            f" / {col(fio, 'cpu_s_per_mio', _fmt2)} |")
    return lines


def _fmt2(v: float) -> str:
    return f"{v:.2f}"


def _ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def placement_table(summary: Sequence[Summary], about: dict[str, str]) -> list[str]:
    """Every system measured in the cells that have placement variants."""
    by_cell: dict[str, list[Summary]] = {}
    for s in summary:
        by_cell.setdefault(s.cell, []).append(s)
    lines = ["| cell | system | how | IOPS (min–max) | p50 clat µs | p99 clat µs "
             "| backend CPU s per M I/O | load gen CPU s per M I/O |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for cell, rows in by_cell.items():
        if len(rows) <= 3 and all(r.system in ("dataplane", "qsd", "fio") for r in rows):
            continue
        for s in rows:
            lines.append(f"| {cell} | {s.system} | {about.get(s.system, '')} "
                         f"| {_fmt_iops(s.iops)} ({_fmt_iops(s.iops_min)}–{_fmt_iops(s.iops_max)}) "
                         f"| {_fmt(s.clat_p50_us)} | {_fmt(s.clat_p99_us)} | {_fmt(s.cpu_s_per_mio, 2)} "
                         f"| {_fmt(s.client_cpu_s_per_mio, 2)} |")
    return lines


@dataclass
class Target:
    name: str
    wanted: str
    measured: str
    met: bool | None       # None: not measured


def targets(summary: Sequence[Summary]) -> list[Target]:
    idx = _index(summary)
    out: list[Target] = []

    def get(cell: str, system: str) -> Summary | None:
        s = idx.get((cell, system))
        return s if s is not None and s.runs > s.failed and s.iops else None

    dp, qsd = get("null/randread-4k-qd32/q1", "dataplane"), get("null/randread-4k-qd32/q1", "qsd")
    if dp and qsd:
        ratio = dp.iops / qsd.iops
        out.append(Target("(a) null, 1 queue, 4k randread QD32: IOPS vs qsd", "≥ 2x (goal 3x)",
                          f"{ratio:.2f}x ({_fmt_iops(dp.iops)} vs {_fmt_iops(qsd.iops)})"
                          + (" — goal met" if ratio >= 3 else ""), ratio >= 2))
        out.append(Target("(a) same cell: backend CPU per I/O", "less than qsd",
                          f"{dp.cpu_s_per_mio:.2f} vs {qsd.cpu_s_per_mio:.2f} CPU s per M I/O "
                          f"({dp.cpu_s_per_mio / qsd.cpu_s_per_mio:.2f}x)" if qsd.cpu_s_per_mio else "?",
                          dp.cpu_s_per_mio < qsd.cpu_s_per_mio))
    else:
        out.append(Target("(a) null, 1 queue, 4k randread QD32", "≥ 2x qsd", "not measured", None))
    for qd in (32, 1):
        cell = f"file/randread-4k-qd{qd}/q1"
        dp, fio = get(cell, "dataplane"), get(cell, "fio")
        if dp and fio:
            ratio = dp.iops / fio.iops
            out.append(Target(f"(b) file, 1 queue, 4k randread QD{qd}: IOPS vs native fio", "≥ 0.95x",
                              f"{ratio:.2f}x ({_fmt_iops(dp.iops)} vs {_fmt_iops(fio.iops)})",
                              ratio >= 0.95))
            if qd == 1:
                diff = dp.clat_p50_us - fio.clat_p50_us
                out.append(Target("(b) file, QD1: median latency vs native fio", "within 10 µs",
                                  f"{diff:+.1f} µs ({dp.clat_p50_us:.1f} vs {fio.clat_p50_us:.1f} µs)",
                                  diff <= 10))
        else:
            out.append(Target(f"(b) file, 4k randread QD{qd}", "≥ 0.95x native", "not measured", None))
    one, two = get("null/randread-4k-qd32/q1", "dataplane"), get("null/randread-4k-qd32/q2", "dataplane")
    if one and two:
        scale = two.iops / one.iops
        out.append(Target("(c) null, 4k randread QD32: 2 queues vs 1 queue", "≥ 1.6x",
                          f"{scale:.2f}x ({_fmt_iops(two.iops)} vs {_fmt_iops(one.iops)})", scale >= 1.6))
    else:
        out.append(Target("(c) null, 2 queues vs 1", "≥ 1.6x", "not measured", None))
    return out


def targets_table(ts: Sequence[Target]) -> list[str]:
    lines = ["| target | wanted | measured | met |", "|---|---|---|---|"]
    for t in ts:
        met = "–" if t.met is None else ("**yes**" if t.met else "**no**")
        lines.append(f"| {t.name} | {t.wanted} | {t.measured} | {met} |")
    return lines


def machine_lines(machine: dict[str, Any]) -> list[str]:
    la = machine.get("loadavg_before", (0, 0, 0))
    lb = machine.get("loadavg_after", (0, 0, 0))
    fdev = machine.get("file_device", {})
    f = machine.get("file", {})
    settings = machine.get("settings", {})
    lines = [
        f"* CPU: {machine.get('cpu_model')} — {machine.get('cpus_online')} CPUs online "
        f"({machine.get('cpus_allowed')} allowed), {machine.get('memory_gib')} GiB, "
        f"virtualization: {machine.get('virtualization')}",
        f"* kernel: {machine.get('kernel')}; Python {machine.get('python')}; {machine.get('fio')}; "
        f"{machine.get('qemu_storage_daemon')}; liburing {machine.get('liburing')}",
        f"* file: {f.get('path')} ({int(f.get('size', 0)) >> 20} MiB, random data) on "
        f"{f.get('mount')}; device {fdev.get('device', '?')} (scheduler {fdev.get('scheduler', '?')}, "
        f"rotational {fdev.get('rotational', '?')}, hw queues {fdev.get('hw_queues', '?')}, "
        f"completion interrupts {fdev.get('completion_irq_cpus', '?')})",
        f"* load average before: {' '.join(f'{v:.2f}' for v in la)}; after: "
        f"{' '.join(f'{v:.2f}' for v in lb)}",
        f"* git: {machine.get('git')}; run took {machine.get('elapsed_s', 0):.0f} s; "
        f"{settings.get('reps')} repetitions of {settings.get('runtime_s')} s "
        f"(+ {settings.get('ramp_s')} s ramp)",
    ]
    threads = machine.get("backend_threads", {})
    if threads:
        parts = []
        for name, tmap in threads.items():
            parts.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in tmap.items()))
        lines.append("* backend thread CPUs (Cpus_allowed_list): " + "; ".join(parts))
    return lines


def summary_markdown(summary: Sequence[Summary], records: Sequence[Any], machine: dict[str, Any],
                     charts: Sequence[tuple[str, Path]], chart_notes: Sequence[str], out: Path,
                     about: dict[str, str]) -> str:
    lines = ["# Comparison: dataplane vs qemu-storage-daemon vs native fio", "",
             f"Command: `{machine.get('command', '')}`", ""]
    lines += machine_lines(machine)
    lines += ["", "## Targets", ""] + targets_table(targets(summary))
    lines += ["", "## Matrix (medians)", "",
              "IOPS are medians over repetitions; ratios are of medians. CPU: backend process "
              "utime+stime per million I/Os it served (native fio: fio's own usr+sys). p50 clat: "
              "median completion latency.", ""]
    lines += main_table(summary)
    lines += ["", "## Placement and polling", ""] + placement_table(summary, about)
    settings = machine.get("settings", {})
    limit = settings.get("noisy_cores", 0.25)
    retried = sum(1 for r in records if getattr(r, "attempts", 1) > 1)
    lines += ["", f"Noise: a run during which other processes used more than {limit} cores was "
              f"repeated up to {settings.get('retries', 0)} times and the quietest attempt kept "
              f"({retried} of {len(records)} runs were repeated)."]
    noisy = [s for s in summary if s.other_cpu_cores_max > limit]
    if noisy:
        lines += ["Cells with a run that stayed noisy (system, most cores used by others): "
                  + ", ".join(sorted({f"{s.cell} ({s.system}, {s.other_cpu_cores_max:.2f})"
                                      for s in noisy}))]
    failed = [r for r in records if r.error]
    if failed:
        lines += ["", "## Failed runs", ""] + [
            f"* rep {r.rep} {r.disk}/{r.workload}/q{r.queues} {r.system}: {r.error}" for r in failed]
    if charts or chart_notes:
        lines += ["", "## Charts", ""]
        lines += [f"* {n}" for n in chart_notes]
        for title, path in charts:
            lines += ["", f"### {title}", "", f"![{title}]({os.path.relpath(path, out)})"]
    return "\n".join(lines) + "\n"


# ---- charts ----

def _fio_plot_cmd() -> list[str] | None:
    exe = shutil.which("fio-plot")
    if exe:
        return [exe]
    try:
        import fio_plot  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-c", "import sys, fio_plot; sys.exit(fio_plot.main())"]


def render_charts(out: Path, summary: Sequence[Summary]) -> tuple[list[tuple[str, Path]], list[str]]:
    """fio-plot compare charts per disk and workload family; matplotlib if fio-plot fails."""
    charts_dir = out / "charts"
    charts_dir.mkdir(exist_ok=True)
    notes: list[str] = []
    charts: list[tuple[str, Path]] = []
    cmd = _fio_plot_cmd()
    if cmd is None:
        notes.append("fio-plot is not installed (pip install -e '.[bench]'): charts drawn with matplotlib")
    else:
        charts, failures = _fio_plot_charts(cmd, out, charts_dir, summary)
        notes += failures
        if charts:
            notes.append("rendered with fio-plot from the median repetition of each cell "
                         "(fio-median/<bs>/<label>/); bars are IOPS and mean latency")
    if not charts:
        charts += _matplotlib_charts(charts_dir, summary, notes)
    charts += _placement_chart(charts_dir, summary, notes)
    return charts, notes


# (title, rw, bs, iodepths) of the fio-plot compare charts, one chart per iodepth and queues
FIO_PLOT_CHARTS = (
    ("4k random read", "randread", "4k", (1, 32, 128)),
    ("4k random write", "randwrite", "4k", (32,)),
    ("128k sequential read", "read", "128k", (32,)),
)
MAIN_KEYS = ("dataplane", "qsd", "fio")
DPI = "80"


def _order(system: str) -> tuple[int, str]:
    return (MAIN_KEYS.index(system) if system in MAIN_KEYS else len(MAIN_KEYS), system)


def _fio_plot_charts(cmd: list[str], out: Path, charts_dir: Path, summary: Sequence[Summary]
                     ) -> tuple[list[tuple[str, Path]], list[str]]:
    charts: list[tuple[str, Path]] = []
    failures: list[str] = []

    def plot(name: str, title: str, argv: list[str]) -> None:
        target = charts_dir / f"{name}.png"
        ok, msg = _run_plot(cmd + argv + ["-T", title, "-D", DPI, "-o", str(target)], target)
        if ok:
            charts.append((title, target))
        else:
            failures.append(f"fio-plot failed for {name}: {msg}")

    ok = [s for s in summary if s.runs > s.failed]
    # Systems side by side, one chart per disk, workload and queue count (fio-plot -C).
    for disk in ("null", "file"):
        for title, rw, bs, depths in FIO_PLOT_CHARTS:
            for qd in depths:
                for queues in (1, 2):
                    rows = sorted((s for s in ok if s.disk == disk and s.rw == rw and s.bs == bs
                                   and s.iodepth == qd and s.queues == queues and s.system in MAIN_KEYS),
                                  key=lambda s: _order(s.system))
                    dirs = [out / "fio-median" / bs / s.label for s in rows]
                    if len(dirs) < 2:
                        continue
                    plot(f"{disk}-{rw}-{bs}-qd{qd}-q{queues}",
                         f"{title} QD{qd}, {disk} disk, {queues} queue(s)",
                         ["-i", *map(str, dirs), "-C", "-r", rw, "-d", str(qd), "-n", str(queues),
                          "--xlabel-parent", "0"])
    # Every placement / polling variant of a cell that has them.
    cells: dict[str, list[Summary]] = {}
    for s in ok:
        cells.setdefault(s.cell, []).append(s)
    for rows in cells.values():
        if all(s.system in MAIN_KEYS for s in rows):
            continue
        rows.sort(key=lambda s: _order(s.system))
        first = rows[0]
        plot(f"placement-{first.disk}-{first.rw}-{first.bs}-qd{first.iodepth}-q{first.queues}",
             f"placement and polling: {first.disk} {first.workload}, {first.queues} queue(s)",
             ["-i", *(str(out / "fio-median" / s.bs / s.label) for s in rows), "-C", "-r", first.rw,
              "-d", str(first.iodepth), "-n", str(first.queues), "--xlabel-parent", "0",
              "--xlabel-segment-size", "40"])
    # IOPS and latency across queue depths, per system (fio-plot -l).
    for s in ok:
        if s.rw == "randread" and s.iodepth == 32 and s.system in MAIN_KEYS:
            plot(f"{s.label}-randread-by-qd-q{s.queues}",
                 f"{s.label}: 4k random read by queue depth, {s.queues} queue(s)",
                 ["-i", str(out / "fio-median" / s.bs / s.label), "-l", "-r", "randread",
                  "-d", "1", "32", "128", "-n", str(s.queues)])
    return charts, failures


def _run_plot(argv: list[str], target: Path) -> tuple[bool, str]:
    env = dict(os.environ, MPLBACKEND="Agg")
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=target.parent)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    if p.returncode != 0 or not target.exists():
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return False, f"exit {p.returncode}: " + " | ".join(tail)
    return True, ""


def _matplotlib_charts(charts_dir: Path, summary: Sequence[Summary], notes: list[str]
                       ) -> list[tuple[str, Path]]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        notes.append("matplotlib is not installed either: no charts")
        return []
    charts = []
    for disk in ("null", "file"):
        rows = [s for s in summary if s.disk == disk and s.system in MAIN_KEYS and s.runs > s.failed]
        if not rows:
            continue
        cells = []
        for s in rows:
            if s.cell not in cells:
                cells.append(s.cell)
        systems = [k for k in MAIN_KEYS if any(s.system == k for s in rows)]
        idx = _index(rows)
        fig, ax = plt.subplots(figsize=(12, 5))
        width = 0.8 / len(systems)
        for i, system in enumerate(systems):
            vals = [idx[(c, system)].iops / 1000 if (c, system) in idx else 0 for c in cells]
            ax.bar([x + i * width for x in range(len(cells))], vals, width, label=system)
        ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(cells))])
        ax.set_xticklabels([c.split("/", 1)[1] for c in cells], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("kIOPS (median)")
        ax.set_title(f"{disk} disk")
        ax.legend()
        fig.tight_layout()
        target = charts_dir / f"{disk}-iops.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        charts.append((f"IOPS, {disk} disk", target))
    return charts


def _placement_chart(charts_dir: Path, summary: Sequence[Summary], notes: list[str]
                     ) -> list[tuple[str, Path]]:
    """One figure for the placement and polling variants: IOPS and backend CPU per I/O side by
    side (fio-plot's compare chart has no room for that many long labels)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    cells: dict[str, list[Summary]] = {}
    for s in summary:
        if s.runs > s.failed:
            cells.setdefault(s.cell, []).append(s)
    cells = {c: sorted(rows, key=lambda s: _order(s.system)) for c, rows in cells.items()
             if any(s.system not in MAIN_KEYS for s in rows)}
    if not cells:
        return []
    height = sum(len(rows) for rows in cells.values()) * 0.32 + len(cells) * 0.6 + 1
    fig, (ax_iops, ax_cpu) = plt.subplots(1, 2, figsize=(13, height), sharey=True)
    labels, iops, lo, hi, cpu, colors = [], [], [], [], [], []
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (cell, rows) in enumerate(cells.items()):
        for s in rows:
            labels.append(f"{cell}  {s.system}")
            iops.append(s.iops / 1e3)
            lo.append((s.iops - s.iops_min) / 1e3)
            hi.append((s.iops_max - s.iops) / 1e3)
            cpu.append(s.cpu_s_per_mio)
            colors.append(palette[i % len(palette)])
    y = list(range(len(labels)))[::-1]
    ax_iops.barh(y, iops, xerr=[lo, hi], color=colors, capsize=2)
    ax_iops.set_xscale("log")
    ax_iops.set_xlabel("kIOPS, median (bars: min–max of the repetitions), log scale")
    ax_iops.set_yticks(y)
    ax_iops.set_yticklabels(labels, fontsize=8)
    ax_cpu.barh(y, cpu, color=colors)
    ax_cpu.set_xscale("log")
    ax_cpu.set_xlabel("backend CPU seconds per million I/Os (native fio: its own), log scale")
    for ax in (ax_iops, ax_cpu):
        ax.grid(axis="x", linestyle=":", alpha=0.6)
    fig.suptitle("Placement and polling")
    fig.tight_layout()
    target = charts_dir / "placement-summary.png"
    fig.savefig(target, dpi=90)
    plt.close(fig)
    notes.append("placement-summary.png is drawn with matplotlib (too many long labels for fio-plot)")
    return [("Placement and polling, all variants (matplotlib)", target)]
