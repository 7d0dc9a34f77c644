"""The paper's experiment: one I/O thread per virtqueue (`--policy per-queue`, dataplane's
default) against one I/O thread for all of them (`--policy shared`, QEMU's
virtio-blk-data-plane), at 1..min(cores, 8) queues, on a null disk, a file on the real disk and
null disks with emulated SSD latencies (10, 80, 300 us); 4 KiB random reads and writes at
iodepth 32 per queue; IOPS, p99 completion latency and backend CPU per I/O; with serve's
completion polling off (0) and at its default (50 us). Then a model, from the measured per-I/O
costs, of both policies at 8, 16 and 32 queues.

    python -m bench.placement [--out DIR] [--quick] [--reps N] [--poll 0,50] [--cost-queues 4,8]
                              [--disks null,file,lat10,lat80,lat300] [--max-queues N]
                              [--vcpu-kiops 1000,300,100]
    python -m bench.placement --from-runs DIR      # tables, model and charts again, no runs

The machinery is bench.compare's: every backend (one `dataplane serve` per disk, policy and
polling setting, all with --queues = the largest queue count) starts once; each run is one
`dataplane load --queues N` process; systems alternate within each repetition. The cost cells
(`--cost-queues`, null disk, random reads) run more queues than the machine has cores: they do
not measure scaling, only what one shared thread spends per I/O when it serves that many rings,
which is what the model needs. Output directory (default bench/results/<today>-placement):

    placement.md            the tables, the fitted model and its predictions, the charts
    placement.csv           medians per (disk, workload, queues, policy, poll)
    model.json              the fitted per-I/O costs and the predictions
    runs.csv, runs.json, machine.json, fio/, fio-median/, logs/   as bench.compare writes them
    charts/placement-measured.png, charts/placement-model.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import report
from .compare import (
    NULL_SIZE,
    WORKLOADS,
    BackendFactory,
    Cell,
    RunRecord,
    System,
    add_run_options,
    begin,
    finish_args,
    prepare_file,
    run_matrix,
)
from .systems import dataplane_backend

log = logging.getLogger("bench")

POLICIES = ("per-queue", "shared")
EMULATED_US = (10, 80, 300)
MAX_QUEUES = 8
MODEL_QUEUES = (1, 2, 4, 8, 16, 32)
MODEL_THREADS = 4                  # the threads=K policy the model also draws


def disks(file_path: Path) -> dict[str, str]:
    """Disk name -> serve's --disk."""
    out = {"null": f"null:{NULL_SIZE}", "file": str(file_path)}
    out |= {f"lat{us}": f"null:{NULL_SIZE},latency=fixed:{us}us" for us in EMULATED_US}
    return out


def disk_workloads(disk: str) -> list[str]:
    # Reads and writes differ only on the real disk; an emulated or null disk treats them alike
    # apart from the null disk's write path (no copy), so only those two run writes.
    return ["randread-4k-qd32", "randwrite-4k-qd32"] if disk in ("null", "file") else ["randread-4k-qd32"]


def system_key(policy: str, poll: int) -> str:
    return f"{policy}-poll{poll}"


def split_key(key: str) -> tuple[str, int]:
    policy, poll = key.rsplit("-poll", 1)
    return policy, int(poll)


def build_cells(queue_counts: Sequence[int], cost_queues: Sequence[int], polls: Sequence[int],
                disk_names: Iterable[str]) -> list[Cell]:
    systems = [System(system_key(p, poll), f"dp-{{disk}}-{p}-poll{poll}",
                      about=f"serve --policy {p} --poll-us {poll}; load unpinned")
               for poll in polls for p in POLICIES]
    cells = []
    for disk in disk_names:
        for wname in disk_workloads(disk):
            counts = list(queue_counts) + (list(cost_queues) if disk == "null" and
                                           wname.startswith("randread") else [])
            for q in counts:
                cells.append(Cell(disk, WORKLOADS[wname], q,
                                  [System(s.key, s.backend.format(disk=disk), about=s.about)
                                   for s in systems]))
    return cells


def backend_factories(disk_specs: dict[str, str], polls: Sequence[int], queues: int,
                      logdir: Path) -> dict[str, BackendFactory]:
    out: dict[str, BackendFactory] = {}
    for disk, spec in disk_specs.items():
        for poll in polls:
            for policy in POLICIES:
                name = f"dp-{disk}-{policy}-poll{poll}"
                out[name] = (lambda s, name=name, spec=spec, poll=poll, policy=policy:
                             dataplane_backend(name, s, spec, queues, logdir, poll_us=poll,
                                               policy=policy))
    return out


# ---- the model ----

@dataclass
class Point:
    """One measured median: a policy at a queue count."""

    disk: str
    workload: str
    queues: int
    policy: str
    poll: int
    iops: float
    p99_us: float
    lat_mean_us: float
    cpu_us: float            # backend CPU microseconds per I/O (= CPU seconds per million)
    client_cpu_us: float     # the load generator's own CPU per I/O


@dataclass
class Fit:
    """Per-I/O costs of one (disk, workload), and what follows from them.

    c1_us      CPU per I/O of a thread serving one queue (the lowest measured: shared at 1
               queue, per-queue at up to `cores` queues)
    shared_a_us, shared_b_us
               a shared thread serving N queues spends shared_a_us + shared_b_us * N per I/O
               (least squares over the measured N; b is what each extra ring costs it)
    issuer_iops
               what this benchmark's issuer (one `dataplane load` thread) can ask for per
               queue: 1e6 / its own CPU per I/O. A guest vCPU asks for far less (its kernel,
               virtio driver and fio are on that path): predictions take a vCPU rate.
    device_us  the emulated device latency (0: none)
    depth      requests in flight per queue
    ceiling    IOPS the backing device gives at most (file: the best measured here; else ∞)
    base_lat_us
               mean latency of one queue served by its own thread (measured, best policy)
    """

    disk: str
    workload: str
    c1_us: float
    shared_a_us: float
    shared_b_us: float
    issuer_iops: float
    device_us: float
    depth: int
    ceiling: float
    shared_n_max: int          # the most queues a shared thread was measured with
    base_lat_us: float
    points: list[Point]

    def shared_cost(self, n: int) -> float:
        """CPU per I/O of one thread serving n queues. A cost that fell with more queues (more
        work per wake-up) is not extrapolated beyond the measured range."""
        if self.shared_b_us < 0:
            n = min(n, self.shared_n_max)
        return self.shared_a_us + self.shared_b_us * n

    def thread_capacity(self, queues_on_thread: int) -> float:
        """IOPS one I/O thread can serve when it never waits (1e6 / CPU µs per I/O)."""
        return 1e6 / (self.c1_us if queues_on_thread <= 1 else self.shared_cost(queues_on_thread))

    def demand(self, vcpu_iops: float | None) -> float:
        """What one queue asks for: its vCPU's rate (None: this benchmark's issuer), and no more
        than Little's law allows on an emulated device (iodepth / latency)."""
        rate = self.issuer_iops if vcpu_iops is None else vcpu_iops
        return min(rate, self.depth / self.device_us * 1e6) if self.device_us else rate

    def predict(self, policy: str, n: int, vcpu_iops: float | None = None,
                threads: int | None = None) -> dict[str, float]:
        """IOPS and mean latency at n queues, each vCPU and each I/O thread on a core of its own
        (2n cores for per-queue). Latency: while the vCPUs are what limits, each request sees
        what one queue on its own thread sees; once the I/O threads (or the device) limit, all
        n·depth requests wait in the backend, and Little's law gives n·depth / IOPS."""
        k = n if policy == "per-queue" else 1 if policy == "shared" else min(threads or 1, n)
        capacity = k * self.thread_capacity(-(-n // k))
        asked = n * self.demand(vcpu_iops)
        iops = min(asked, capacity, self.ceiling)
        lat = self.base_lat_us if iops >= asked else max(self.base_lat_us, n * self.depth / iops * 1e6)
        return {"iops": iops, "lat_mean_us": lat, "thread_busy": iops / capacity, "threads": k}

    def saturation(self, vcpu_iops: float | None = None) -> float:
        """Queues from which one shared thread is the bottleneck (n·demand ≥ its capacity)."""
        for n in range(1, 1025):
            if n * self.demand(vcpu_iops) >= min(1e6 / self.shared_cost(n), self.ceiling):
                return n
        return float("inf")


def _least_squares(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    if len(xs) == 1:
        return ys[0], 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def fit(points: Sequence[Point], device_us: dict[str, float], cores: int = 1) -> list[Fit]:
    """A Fit per (disk, workload) that has 1-queue points; `cores`: the most queues that ran
    with a core per I/O thread.

    Cost of a thread at a queue count: the lower CPU per I/O of the polling settings (a thread
    that spins while not saturated charges the spin to its I/Os; one that sleeps charges its
    wake-ups; a saturated thread does neither, which is the case the model is about).

    The shared thread's slope b (what each more ring costs it) comes from the group measured at
    the most queue counts (the null disk's cost cells), when it has at least three: two points
    of a noisy machine make a slope of either sign. Every group then fits only its own a."""
    groups: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        if p.iops > 0 and p.cpu_us > 0:
            groups.setdefault((p.disk, p.workload), []).append(p)

    def cost_in(pts: list[Point], policy: str, n: int) -> float | None:
        vals = [p.cpu_us for p in pts if p.policy == policy and p.queues == n]
        return min(vals) if vals else None

    def shared_ns(pts: list[Point]) -> list[int]:
        return [n for n in sorted({p.queues for p in pts}) if cost_in(pts, "shared", n) is not None]

    widest = max(groups.values(), key=lambda pts: len(shared_ns(pts)), default=[])
    slope = None
    if len(shared_ns(widest)) >= 3:
        xs = shared_ns(widest)
        slope = _least_squares(xs, [cost_in(widest, "shared", n) or 0.0 for n in xs])[1]
    fits = []
    for (disk, workload), pts in groups.items():
        def cost(policy: str, n: int, pts: list[Point] = pts) -> float | None:
            return cost_in(pts, policy, n)
        if cost("per-queue", 1) is None and cost("shared", 1) is None:
            continue
        # A thread serving one queue: per-queue at any N that had a core per thread, or shared
        # at 1 (a busier thread does more per wake-up: the lowest is the saturated cost).
        one = [c for c in [cost("shared", 1)] + [cost("per-queue", n) for n in range(1, cores + 1)]
               if c is not None]
        xs = shared_ns(pts)
        ys = [cost("shared", n) or 0.0 for n in xs]
        if slope is not None and len(xs) < 3:
            a, b = (sum(ys) - slope * sum(xs)) / len(xs) if xs else min(one), slope
        else:
            a, b = _least_squares(xs, ys) if xs else (min(one), 0.0)
        client = [p.client_cpu_us for p in pts if p.queues == 1 and p.client_cpu_us > 0]
        ceiling = max(p.iops for p in pts) if disk == "file" else float("inf")
        base = min(p.lat_mean_us for p in pts if p.queues == 1)
        fits.append(Fit(disk, workload, min(one), a, b,
                        1e6 / min(client) if client else float("inf"), device_us.get(disk, 0.0),
                        WORKLOADS[workload].iodepth, ceiling, max(xs, default=1), base,
                        sorted(pts, key=lambda p: (p.queues, p.policy, p.poll))))
    return fits


def points_from_summary(summary: Sequence[report.Summary]) -> list[Point]:
    out = []
    for s in summary:
        if s.runs == s.failed:
            continue
        policy, poll = split_key(s.system)
        out.append(Point(s.disk, s.workload, s.queues, policy, poll, s.iops, s.clat_p99_us,
                         s.lat_mean_us, s.cpu_s_per_mio, s.client_cpu_s_per_mio))
    return out


# ---- the report ----

def _k(v: float) -> str:
    """IOPS as bench.compare's report writes them; an unbounded rate as ∞."""
    return "∞" if v == float("inf") else report._fmt_iops(v)


def _disk_order(t: tuple[Any, ...]) -> tuple[Any, ...]:
    """Rows in the order disks() names them (null, file, lat10, ...), then the rest of t."""
    names = list(disks(Path("-")))
    return (names.index(t[0]) if t[0] in names else len(names), *t[1:])


def measured_table(points: Sequence[Point], polls: Sequence[int]) -> list[str]:
    head = "| disk | workload | queues |" + "".join(
        f" {p} poll {poll}: IOPS | p99 µs | CPU µs/IO |" for poll in polls for p in POLICIES)
    head += " per-queue / shared IOPS |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    idx = {(p.disk, p.workload, p.queues, p.policy, p.poll): p for p in points}
    for disk, workload, q in sorted({(p.disk, p.workload, p.queues) for p in points}, key=_disk_order):
        row = f"| {disk} | {workload} | {q} |"
        ratios = []
        for poll in polls:
            for policy in POLICIES:
                p = idx.get((disk, workload, q, policy, poll))
                row += (f" {_k(p.iops)} | {p.p99_us:.0f} | {p.cpu_us:.2f} |" if p else " – | – | – |")
            a = idx.get((disk, workload, q, "per-queue", poll))
            b = idx.get((disk, workload, q, "shared", poll))
            if a and b and b.iops:
                ratios.append(f"{a.iops / b.iops:.2f} (poll {poll})")
        lines.append(row + " " + ", ".join(ratios) + " |")
    return lines


VCPU_RATES = (None, 1e6, 300e3, 100e3)   # None: this benchmark's issuer


def _rate_name(rate: float | None) -> str:
    return "issuer here" if rate is None else f"vCPU {_k(rate)}"


def model_table(fits: Sequence[Fit], rates: Sequence[float | None] = VCPU_RATES) -> list[str]:
    cols = ", ".join(f"N={n}" for n in (8, 16, 32))
    lines = [f"| disk | workload | c1 µs/IO | shared a + b·N µs/IO | queue asks for | shared saturates at N"
             f" | per-queue / shared / threads={MODEL_THREADS} IOPS ({cols}) | per-queue ÷ shared ({cols}) |",
             "|" + "---|" * 8]
    for f in fits:
        # a device that caps everything (the file here) makes the vCPU rate irrelevant
        for rate in rates if f.ceiling == float("inf") else rates[:1]:
            preds = [(f.predict("per-queue", n, rate), f.predict("shared", n, rate),
                      f.predict("threads", n, rate, MODEL_THREADS)) for n in (8, 16, 32)]
            lines.append(
                f"| {f.disk} | {f.workload} | {f.c1_us:.2f} | {f.shared_a_us:.2f} + {f.shared_b_us:.3f}·N"
                f" | {_rate_name(rate)}: {_k(f.demand(rate))} | {f.saturation(rate):g} | "
                + "; ".join(f"{_k(pq['iops'])} / {_k(sh['iops'])} / {_k(tk['iops'])}" for pq, sh, tk in preds)
                + " | " + ", ".join(f"{pq['iops'] / sh['iops']:.2f}" for pq, sh, _ in preds) + " |")
    return lines


def latency_table(fits: Sequence[Fit], rate: float) -> list[str]:
    lines = ["| disk | workload | " + " | ".join(f"N={n}" for n in MODEL_QUEUES) + " |",
             "|" + "---|" * (2 + len(MODEL_QUEUES))]
    for f in fits:
        row = f"| {f.disk} | {f.workload} |"
        for n in MODEL_QUEUES:
            row += (f" {f.predict('per-queue', n, rate)['lat_mean_us']:.0f} /"
                    f" {f.predict('shared', n, rate)['lat_mean_us']:.0f} |")
        lines.append(row)
    return lines


# ---- charts ----

_STYLE = {"per-queue": "-", "shared": "--", "threads": ":"}


def measured_chart(path: Path, points: Sequence[Point]) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    combos = sorted({(p.disk, p.workload) for p in points}, key=_disk_order)
    if not combos:
        return False
    fig, axes = plt.subplots(len(combos), 3, figsize=(13, 2.5 * len(combos) + 0.8), squeeze=False)
    metrics = [("iops", "kIOPS", 1e-3), ("p99_us", "p99 clat µs", 1.0), ("cpu_us", "backend CPU µs/IO", 1.0)]
    for r, (disk, workload) in enumerate(combos):
        pts = [p for p in points if p.disk == disk and p.workload == workload]
        for c, (attr, label, scale) in enumerate(metrics):
            ax = axes[r][c]
            for key in sorted({(p.policy, p.poll) for p in pts}):
                line = sorted((p for p in pts if (p.policy, p.poll) == key), key=lambda p: p.queues)
                ax.plot([p.queues for p in line], [getattr(p, attr) * scale for p in line],
                        _STYLE[key[0]], marker="o" if key[1] else "s",
                        label=f"{key[0]}, poll {key[1]} µs")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({p.queues for p in pts}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_ylim(bottom=0)
            ax.grid(linestyle=":", alpha=0.6)
            ax.set_title(f"{disk} {workload}: {label}", fontsize=9)
            if r == len(combos) - 1:
                ax.set_xlabel("queues (above the core count: cost cells, oversubscribed)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Per-queue vs shared I/O thread, measured (medians)")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=85)
    plt.close(fig)
    return True


CHART_RATE = 300e3      # the vCPU rate the model chart draws next to this benchmark's issuer


def model_chart(path: Path, fits: Sequence[Fit]) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fits = [f for f in fits if f.ceiling == float("inf")]   # a capped device is a flat line
    if not fits:
        return False
    ns = list(range(1, 33))
    fig, axes = plt.subplots(2, len(fits), figsize=(3.3 * len(fits) + 0.5, 6.5), squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, f in enumerate(fits):
        top, bottom = axes[0][c], axes[1][c]
        for color, rate in ((palette[0], None), (palette[1], CHART_RATE)):
            for policy, threads in (("per-queue", None), ("shared", None), ("threads", MODEL_THREADS)):
                pred = [f.predict(policy, n, rate, threads) for n in ns]
                label = f"{policy if threads is None else f'threads={threads}'}, {_rate_name(rate)}"
                top.plot(ns, [p["iops"] / 1e6 for p in pred], _STYLE[policy], color=color, label=label)
                bottom.plot(ns, [p["lat_mean_us"] for p in pred], _STYLE[policy], color=color)
        for policy, marker in (("per-queue", "o"), ("shared", "s")):
            best: dict[int, Point] = {}
            for p in f.points:
                if p.policy == policy and (p.queues not in best or p.iops > best[p.queues].iops):
                    best[p.queues] = p
            top.scatter(list(best), [p.iops / 1e6 for p in best.values()], marker=marker,
                        color="black", label=f"{policy}, measured here", zorder=3)
        top.set_title(f"{f.disk} {f.workload}", fontsize=9)
        top.set_ylabel("M IOPS")
        top.set_yscale("log")
        bottom.set_ylabel("mean latency µs (Little)")
        bottom.set_yscale("log")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks([1, 2, 4, 8, 16, 32])
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.grid(linestyle=":", alpha=0.6)
        bottom.set_xlabel("queues (= vCPUs)")
    axes[0][0].legend(fontsize=6)
    fig.suptitle("Model: each vCPU and each I/O thread on a core of its own (blue: this "
                 f"benchmark's issuer; orange: a vCPU asking {_k(CHART_RATE)} IOPS)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=85)
    plt.close(fig)
    return True


def write_report(out: Path, args: argparse.Namespace, summary: Sequence[report.Summary],
                 records: Sequence[Any], machine: dict[str, Any]) -> list[Fit]:
    points = points_from_summary(summary)
    fits = fit(points, {f"lat{us}": float(us) for us in EMULATED_US}, args.max_queues)
    (out / "model.json").write_text(json.dumps({
        "fits": [{k: v for k, v in asdict(f).items() if k != "points"} for f in fits],
        "predictions": {f"{f.disk}/{f.workload}": {_rate_name(rate): {
            str(n): {"per-queue": f.predict("per-queue", n, rate), "shared": f.predict("shared", n, rate),
                     f"threads={MODEL_THREADS}": f.predict("threads", n, rate, MODEL_THREADS)}
            for n in MODEL_QUEUES} for rate in [None] + [r * 1e3 for r in args.vcpu_kiops]}
            for f in fits}}, indent=2, default=str) + "\n")
    with open(out / "placement.csv", "w") as fh:
        fh.write("disk,workload,queues,policy,poll_us,iops,p99_us,lat_mean_us,cpu_us_per_io,"
                 "client_cpu_us_per_io\n")
        for p in points:
            fh.write(f"{p.disk},{p.workload},{p.queues},{p.policy},{p.poll},{p.iops:.0f},"
                     f"{p.p99_us:.1f},{p.lat_mean_us:.1f},{p.cpu_us:.3f},{p.client_cpu_us:.3f}\n")
    charts = []
    if not args.no_charts:
        for name, draw, data in (("placement-measured.png", measured_chart, points),
                                 ("placement-model.png", model_chart, fits)):
            target = out / "charts" / name
            if draw(target, data):
                charts.append(target)
    lines = ["# Placement: per-queue vs shared I/O thread", "",
             f"Command: `{machine.get('command', '')}`", ""]
    lines += report.machine_lines(machine)
    lines += ["", "## Measured (medians)", "",
              "IOPS and p99 completion latency from `dataplane load` (fio JSON); CPU: the backend "
              "process's utime+stime per I/O it served.", ""]
    lines += measured_table(points, args.poll)
    lines += ["", "## Model", "",
              "c1: CPU per I/O of a thread serving one queue (the lowest measured); a shared thread"
              " serving N queues spends a + b·N (b fitted where measured at ≥ 3 queue counts, a "
              "per disk). A queue asks for its "
              "vCPU's rate (this benchmark's issuer: 1e6 / its CPU per I/O; or an assumed guest "
              "vCPU rate), no more than iodepth / latency on an emulated disk. Each vCPU and each "
              "I/O thread on a core of its own: per-queue = N·min(ask, 1e6/c1); shared = min(N·ask,"
              " 1e6/(a+b·N)); "
              f"threads={MODEL_THREADS}: {MODEL_THREADS} threads of N/{MODEL_THREADS} queues; "
              "the file disk is capped at the best IOPS measured on it.", ""]
    lines += model_table(fits, [None] + [r * 1e3 for r in args.vcpu_kiops])
    lines += ["", f"Mean latency µs, per-queue / shared, vCPUs asking {_k(CHART_RATE)} IOPS (the "
              "1-queue latency while the vCPUs limit; N·iodepth / IOPS once the backend does):",
              ""] + latency_table(fits, CHART_RATE)
    failed = [r for r in records if r.error]
    if failed:
        lines += ["", "## Failed runs", ""] + [
            f"* rep {r.rep} {r.disk}/{r.workload}/q{r.queues} {r.system}: {r.error}" for r in failed]
    for c in charts:
        lines += ["", f"![{c.stem}]({os.path.relpath(c, out)})"]
    (out / "placement.md").write_text("\n".join(lines) + "\n")
    return fits


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"negative value in {text!r}")
    return vals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.placement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p, "-placement")
    p.add_argument("--poll", type=_ints, default=[0, 50],
                   help="serve --poll-us settings to run each policy with (default 0,50)")
    p.add_argument("--max-queues", type=int, default=min(len(os.sched_getaffinity(0)), MAX_QUEUES),
                   help="the curve runs 1..this many queues (default: min(CPUs, 8))")
    p.add_argument("--cost-queues", type=_ints, default=None,
                   help="extra queue counts for the null random-read cost cells (default 4,8 "
                        "where above --max-queues)")
    p.add_argument("--disks", type=lambda t: [d for d in t.split(",") if d], default=None,
                   help="a subset of null,file,lat10,lat80,lat300 (default all)")
    p.add_argument("--vcpu-kiops", type=_ints, default=[int(r / 1e3) for r in VCPU_RATES[1:]],
                   help="guest vCPU rates (kIOPS each) the model predicts for, besides this "
                        "benchmark's issuer (default 1000,300,100): measure yours with fio in a "
                        "guest, one queue, against a per-queue backend")
    p.add_argument("--from-runs", type=Path, default=None, metavar="DIR",
                   help="run nothing: write DIR's tables, model and charts again from its runs.json")
    args = finish_args(p.parse_args(argv), argv, "python -m bench.placement")
    if args.max_queues < 1:
        p.error("--max-queues must be at least 1")
    if args.cost_queues is None:
        args.cost_queues = [n for n in (4, 8) if n > args.max_queues]
    known = disks(args.file)
    args.disks = args.disks or list(known)
    unknown = [d for d in args.disks if d not in known]
    if unknown:
        p.error(f"--disks: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    return args


def rerender(args: argparse.Namespace) -> int:
    """Tables, model and charts again from a finished run's runs.json (after a model change)."""
    src: Path = args.from_runs
    records = [RunRecord(**r) for r in json.loads((src / "runs.json").read_text())]
    machine = json.loads((src / "machine.json").read_text())
    args.poll = sorted({split_key(r.system)[1] for r in records})
    args.max_queues = int(machine.get("settings", {}).get("max_queues", args.max_queues))
    write_report(src, args, report.summarize(records), records, machine)
    print(src / "placement.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_runs:
        return rerender(args)
    out = begin(args)
    specs = {d: s for d, s in disks(args.file).items() if d in args.disks}
    if "file" in specs:
        prepare_file(args.file, args.file_size)
    queue_counts = list(range(1, args.max_queues + 1))
    cells = build_cells(queue_counts, args.cost_queues, args.poll, specs)
    backend_queues = max(queue_counts + args.cost_queues)
    records, machine = run_matrix(args, out, cells,
                                  backend_factories(specs, args.poll, backend_queues, out / "logs"))
    machine["disks"] = specs
    machine["settings"]["max_queues"] = args.max_queues
    machine["settings"]["cost_queues"] = args.cost_queues
    (out / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    (out / "runs.json").write_text(json.dumps([asdict(r) for r in records], indent=2) + "\n")
    report.write_runs_csv(records, out / "runs.csv")
    fits = write_report(out, args, report.summarize(records), records, machine)
    for f in fits:
        log.info("%s/%s: c1 %.2f us/IO, shared %.2f + %.3f*N us/IO, issuer %s per queue",
                 f.disk, f.workload, f.c1_us, f.shared_a_us, f.shared_b_us, _k(f.issuer_iops))
    failed = [r for r in records if r.error]
    log.info("done in %.0f s: %d runs, %d failed; %s", time.monotonic() - args.t0, len(records),
             len(failed), out / "placement.md")
    return 1 if not records or len(failed) == len(records) else 0


if __name__ == "__main__":
    sys.exit(main())
