"""Emulated device latency and throughput caps, seen through the frontend.

The backend runs in-process (conftest.start_backend) on a null or file disk with
`,latency=...[,iops=N][,bw=N]`; the C load generator (`Device.load`) plays a closed-loop
guest. What the device did is read from its own counters: `stats()` (delayed, out_of_order)
and `dp_vq_get_latency` (pop-to-completion histogram per queue, fio's layout), next to what
was configured (`LatencySpec.percentile_ns`, from the same table the queues sample).

Run as a script to draw the configured-vs-observed chart of docs/emulation.md:

    python tests/protocol/test_latency.py docs/img/latency-configured-vs-observed.png
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from dataplane.backend import fetch_stats
from dataplane.core import ffi, lib
from dataplane.driver import Device
from dataplane.driver.load import Job, LoadResult

US = 1000
PERCENTILES = (10.0, 50.0, 90.0, 99.0)


@dataclass
class QueueLatency:
    """One queue's configured and observed (pop to completion) latency, in ns."""

    queue: int
    configured: dict[float, float]
    observed: dict[float, int]
    observed_mean: float
    completions: int
    stats: dict[str, int]


def queue_latency(backend, queue: int) -> QueueLatency:
    """What the device reports for one queue: counters, histogram, configured table."""
    hist = ffi.new("struct dp_hist *")
    lib.dp_vq_get_latency(backend.device.vrings[queue].handle, hist)
    spec = backend.disk.latency
    return QueueLatency(
        queue=queue,
        configured={p: spec.percentile_ns(p) for p in PERCENTILES} if spec else {},
        observed={p: int(lib.dp_hist_percentile(hist, p)) for p in PERCENTILES},
        observed_mean=hist.sum / hist.n if hist.n else 0.0,
        completions=int(hist.n),
        stats=backend.device.stats()[queue])


def run(backend, job: Job, queues: int = 1) -> tuple[LoadResult, list[QueueLatency]]:
    """Run a closed-loop job on the first `queues` queues; the device's view of each queue is
    read before the frontend disconnects (a disconnect resets the device)."""
    with Device.connect(backend.socket, queues=queues, queue_size=job.queue_size(True),
                        memory=job.memory_needed(queues)) as dev:
        result = dev.load(job)
        seen = [queue_latency(backend, q) for q in range(queues)]
    assert not result.error and not result.io_errors, result.summary_of_problems()
    return result, seen


def steady_iops(result: LoadResult, direction: str = "read") -> float:
    """Sum over queues of the median IOPS of the run's 0.5 s intervals: a host that stalls a
    thread for a while (other jobs on a 2-CPU CI machine) costs one interval, not the result."""
    d = lib.DP_DIR_READ if direction == "read" else lib.DP_DIR_WRITE
    total = 0.0
    for q in result.queues:
        s = q.stats
        cumulative = [0] + [int(s.sample_ios[d][i]) for i in range(s.nsamples)]
        rates = sorted((b - a) / (s.sample_ns / 1e9)
                       for a, b in zip(cumulative, cumulative[1:], strict=False))
        assert rates, "the run was too short for one sample interval"
        total += rates[len(rates) // 2]
    return total


def client_p50(result: LoadResult, queue: int = 0, direction: str = "read") -> int:
    job = result.to_json()["jobs"][queue]
    return job[direction]["clat_ns"]["percentile"]["50.000000"]


# --------------------------------------------------------------------------- fixed latency


def test_qd1_fixed_latency_p50_is_the_configured_value(start_backend) -> None:
    """At QD1 every request waits its 100 us alone: the device's median completion time is
    within 10 us of 100 us (p50, not p99: the tail belongs to the host's scheduler). The
    guest, one kick and one interrupt further away, never sees it faster than the device."""
    backend = start_backend("null:64M,latency=fixed:100us", queues=1)
    result, (q,) = run(backend, Job(rw="randread", bs=4096, iodepth=1, runtime=1.5, ramp_time=0.3))
    assert q.completions > 1000, q
    assert abs(q.observed[50.0] - 100 * US) <= 10 * US, (
        f"device p50 {q.observed[50.0] / US:.1f} us for fixed:100us ({q.observed})")
    assert q.stats["delayed"] > 0.9 * q.stats["requests"], q.stats
    assert q.stats["out_of_order"] == 0, q.stats
    guest = client_p50(result)
    assert guest >= q.observed[50.0], (
        f"the guest saw p50 {guest / US:.1f} us, below the device's {q.observed[50.0] / US:.1f} us")


def test_fixed_latency_on_a_file_disk_comes_after_the_real_io(start_backend, disk_file) -> None:
    """File disks add the emulated delay after the real I/O: the same QD1 O_DIRECT writes to
    the same file take 200 us longer at the median with latency=fixed:200us than without (a
    delay counted from the pop would add only 200 us minus the write's own ~60 us). The delay
    is never swallowed by the write; the +200 us itself is measured up to three times,
    because another job writing to the same disk (a QEMU guest next to the tests) moves the
    write time between two runs."""
    job = Job(rw="randwrite", bs=4096, iodepth=1, runtime=1.0, size=8 << 20)
    plain_backend = start_backend(str(disk_file), queues=1)
    slow_backend = start_backend(f"{disk_file},latency=fixed:200us", queues=1)
    seen = []
    for _attempt in range(3):
        _, (before,) = run(plain_backend, job)
        _, (slow,) = run(slow_backend, job)
        _, (after,) = run(plain_backend, job)   # the disk's drift, bracketed
        assert slow.stats["out_of_order"] == 0 and slow.stats["errors"] == 0, slow.stats
        assert slow.observed[50.0] >= 180 * US, slow.observed
        plain = (before.observed[50.0] + after.observed[50.0]) / 2
        added = slow.observed[50.0] - plain
        seen.append(f"{plain / US:.0f} -> {slow.observed[50.0] / US:.0f} us")
        if abs(added - 200 * US) <= 40 * US:
            return
    pytest.fail(f"p50 without -> with latency=fixed:200us: {seen}")


# --------------------------------------------------------------------------- reordering


def test_uniform_latency_reorders_completions(start_backend) -> None:
    """With latency drawn per request, later requests overtake earlier ones at QD >= 8, as on
    a real device; the guest still gets every completion."""
    backend = start_backend("null:64M,latency=uniform:20us-400us", queues=1)
    result, (q,) = run(backend, Job(rw="randread", bs=4096, iodepth=16, runtime=1.0))
    s = q.stats
    assert s["out_of_order"] > 0.1 * s["requests"], s
    assert s["inflight"] == 0 and s["errors"] == 0, s
    assert result.queues[0].stats.bad_used == 0


def test_fixed_latency_at_qd1_never_reorders(start_backend) -> None:
    backend = start_backend("null:64M,latency=fixed:50us", queues=1)
    _, (q,) = run(backend, Job(rw="randwrite", bs=4096, iodepth=1, runtime=0.5))
    s = q.stats
    assert s["requests"] > 500 and s["out_of_order"] == 0, s


# --------------------------------------------------------------------------- caps


def test_queues_stop_and_restart_while_requests_are_held(start_backend) -> None:
    """Sessions that end with requests still held back by the latency layer: each stop drains
    them, the layer's state on each I/O thread is released with the last queue and made again
    for the next session (the threads live on), and nothing is lost or failed. (The one case
    this cannot force, a timeout still on the ring when the state goes, is
    tests/unit/test_disk_interface.py's.)"""
    backend = start_backend("null:16M,latency=uniform:20us-400us", queues=2, poll_us=50)
    for _ in range(20):
        dev = Device.connect(backend.socket, queues=2)
        try:
            reqs = [dev.submit(0, sector=8 * i, read_len=4096, queue=i % 2) for i in range(16)]
            dev.wait(reqs[:4])   # the rest are still held when the session ends
        finally:
            dev.close()
    with Device.connect(backend.socket, queues=2) as dev:
        assert dev.read(0, 4096, queue=1) == bytes(4096)
        assert dev.read(4096, 4096, queue=0) == bytes(4096)
    totals = fetch_stats(backend.socket)["queues"]   # answered by the server's own loop
    assert sum(q["delayed"] for q in totals) >= 20 * 16 * 0.9 and sum(q["errors"] for q in totals) == 0


def assert_capped(backend, job: Job, cap: float, what: str, queues: int = 1) -> None:
    """Never above the cap (over a whole run), and at it (within 10%, median 0.5 s interval)
    while the load allows. A host that freezes timers for seconds (seen on this 2-CPU CI
    machine while a QEMU guest runs next to the tests) can only lower a run's rate: up to
    three runs get the chance to show the cap; every one of them must stay under it."""
    seen = []
    for _attempt in range(3):
        result, _ = run(backend, job, queues=queues)
        average, steady = result.iops("read"), steady_iops(result)
        assert average <= 1.1 * cap, f"{what}: {average:.0f} IOPS over the run, cap {cap:.0f}"
        seen.append(round(steady))
        if abs(steady - cap) <= 0.1 * cap:
            return
    pytest.fail(f"{what}: {seen} IOPS (median interval of each run), cap {cap:.0f}")


@pytest.mark.parametrize("queues_driven, expected", [(2, 4000), (1, 2000)])
def test_iops_cap_is_split_between_the_queues(start_backend, queues_driven: int, expected: int) -> None:
    """iops=4000 on a 2-queue device: 2000 per queue, so 4000 with both queues busy and
    2000 with one (queues share nothing on the I/O path, not even a token bucket)."""
    backend = start_backend("null:64M,iops=4000", queues=2)
    assert_capped(backend, Job(rw="randread", bs=4096, iodepth=8, runtime=2.0, ramp_time=0.3),
                  expected, f"iops=4000, {queues_driven} of 2 queues driven", queues=queues_driven)


def test_bandwidth_cap(start_backend) -> None:
    """bw=32m with 64 KiB requests: 512 IOPS."""
    backend = start_backend("null:64M,bw=32m", queues=1)
    assert_capped(backend, Job(rw="randread", bs=64 * 1024, iodepth=8, runtime=2.0, ramp_time=0.3),
                  (32 << 20) / (64 * 1024), "bw=32m")


def test_latency_and_iops_cap_together(start_backend) -> None:
    """The cap wins when it is the tighter limit: 8 in flight at ~1 ms would do ~7.8k IOPS."""
    backend = start_backend("null:64M,latency=uniform:50us-2ms,iops=3000", queues=1)
    assert_capped(backend, Job(rw="randread", bs=4096, iodepth=8, runtime=2.0, ramp_time=0.3),
                  3000, "latency=uniform:50us-2ms,iops=3000")


# --------------------------------------------------------------------------- configured vs observed


OVERSHOOT = 50 * US  # a timer's wake-up on a busy host, added to every delay
# How far above the configured value each observed percentile may be. The tail is where a
# busy host's scheduler shows; how much depends on the moment on this shared VM (measured
# with bench/latency_agreement.py: docs/emulation.md, "Reading configured vs observed").
SLOWER = {10.0: 1.1, 50.0: 1.1, 90.0: 1.25, 99.0: 1.5}
# In the sanitized pass (./dev test's second run) the ring walk, the completion and the load
# generator are all instrumented: each request takes longer than OVERSHOOT allows for, by
# design (bench/latency_agreement.py under ASan, quiet host: p10 and p50 at 1.09–1.30x). That
# pass checks memory safety; the upper bound is the main pass's to check.
SANITIZED = os.environ.get("DATAPLANE_SANITIZE") not in (None, "", "0")


def test_configured_and_observed_percentiles_per_queue(start_backend) -> None:
    """Each queue reports its own observed distribution next to the configured one; with a
    light closed-loop load they agree. Never faster than 90% of the configured value: that
    bound is tight, since the host can only add (and a distribution too wide or too narrow
    breaks it at p10 or p90). Slower by at most SLOWER's fraction plus the timer's wake-up,
    a constant (OVERSHOOT): two I/O threads and the driver share this CI machine's two cores,
    with whatever else runs there. A host stall (seconds, while a QEMU guest runs beside the
    tests) can only make it slower, so up to three runs get the chance to show the agreement.
    Under the sanitizers only the lower bound holds (SANITIZED)."""
    backend = start_backend("null:64M,latency=lognormal:p50=500us,p99=3ms", queues=2)
    problems: list[str] = []
    for _attempt in range(3):
        _, seen = run(backend, Job(rw="randread", bs=4096, iodepth=4, runtime=2.0), queues=2)
        problems = []
        for queue, q in enumerate(seen):
            assert q.completions > 1000, q
            assert q.stats["delayed"] > 0.9 * q.completions, q.stats
            for pct in (10.0, 50.0, 90.0, 99.0):
                observed, configured = q.observed[pct], q.configured[pct]
                assert observed >= 0.9 * configured, (
                    f"vq{queue} p{pct:g}: observed {observed / US:.0f} us, configured "
                    f"{configured / US:.0f} us")
                if not SANITIZED and observed > SLOWER[pct] * configured + OVERSHOOT:
                    problems.append(f"vq{queue} p{pct:g} {observed / US:.0f} us (configured "
                                    f"{configured / US:.0f} us)")
        if not problems:
            return
    pytest.fail(f"observed above configured in every run: {problems}")


# --------------------------------------------------------------------------- chart


CHART_SPECS = ("fixed:100us", "uniform:50us-2ms", "lognormal:p50=200us,p99=1ms")


def draw_chart(out: Path, tmp: Path) -> None:
    """Configured vs observed percentiles of a real run per distribution (QD4, 2 queues, 3 s)
    for docs/emulation.md."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dataplane.backend import ServerOptions, VhostUserBlkServer
    from dataplane.disks import open_disk

    pcts = (1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9)
    fig, axes = plt.subplots(1, len(CHART_SPECS), figsize=(13, 4))
    for ax, spec in zip(axes, CHART_SPECS, strict=True):
        disk = open_disk(f"null:64M,latency={spec}")
        server = VhostUserBlkServer(disk, ServerOptions(socket_path=tmp / "chart.sock", num_queues=2))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        job = Job(rw="randread", bs=4096, iodepth=4, runtime=3.0)
        with Device.connect(str(tmp / "chart.sock"), queues=2, queue_size=job.queue_size(True),
                            memory=job.memory_needed(2)) as dev:
            result = dev.load(job)
            hists = []
            for vring in server.device.vrings[:2]:
                h = ffi.new("struct dp_hist *")
                lib.dp_vq_get_latency(vring.handle, h)
                hists.append(h)
        merged = ffi.new("struct dp_hist *")
        for h in hists:
            lib.dp_hist_merge(merged, h)
        guest = ffi.new("struct dp_hist *")
        for q in result.queues:
            lib.dp_hist_merge(guest, ffi.addressof(q.stats.dir[lib.DP_DIR_READ], "clat"))
        x = list(range(len(pcts)))
        ax.plot(x, [disk.latency.percentile_ns(p) / US for p in pcts], "o-", label="configured")
        ax.plot(x, [lib.dp_hist_percentile(merged, p) / US for p in pcts], "s--",
                label="observed by the device")
        ax.plot(x, [lib.dp_hist_percentile(guest, p) / US for p in pcts], "^:",
                label="observed by the guest")
        ax.set_xticks(x, [f"p{p:g}" for p in pcts], rotation=45)
        ax.set_title(spec, fontsize=10)
        ax.set_ylabel("latency (us)")
        ax.grid(alpha=0.3)
        server.stop()
        thread.join(30)
        server.close()
        disk.close()
    axes[0].legend(fontsize=8)
    fig.suptitle("dataplane serve --disk null:64M,latency=...: 2 queues x QD4 randread, 3 s each")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp_dir:
        draw_chart(Path(sys.argv[1] if len(sys.argv) > 1 else "latency.png"), Path(tmp_dir))
