"""bench.placement: the cells it runs, the model it fits, and one real (tiny) run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import placement  # noqa: E402
from bench.placement import Point, fit  # noqa: E402

RR = "randread-4k-qd32"


def points(disk: str = "null", c1: float = 0.5, shared: dict[int, float] | None = None,
           client: float = 0.25, lat: float = 10.0) -> list[Point]:
    """Measured medians as bench.placement would collect them: per-queue threads cost c1 per
    I/O at every N, the shared thread `shared[N]`, each at both polling settings (polling
    spinning adds cost to one of them)."""
    shared = shared or {1: c1, 2: c1 + 0.1}
    out = []
    for poll, extra in ((0, 0.0), (50, 0.3)):
        for n in sorted(shared):
            out.append(Point(disk, RR, n, "per-queue", poll, 1e6 * n, 20.0, lat, c1 + extra, client))
            out.append(Point(disk, RR, n, "shared", poll, 1e6, 40.0, lat * n, shared[n] + extra, client))
    return out


def test_fit_takes_the_cheaper_polling_setting_and_a_straight_line_for_shared() -> None:
    [f] = fit(points(shared={1: 0.5, 2: 0.6, 4: 0.8, 8: 1.2}), {})
    assert f.c1_us == pytest.approx(0.5)
    assert f.shared_a_us == pytest.approx(0.4)
    assert f.shared_b_us == pytest.approx(0.1)
    assert f.issuer_iops == pytest.approx(4e6)          # 1e6 / 0.25 us
    assert f.shared_cost(32) == pytest.approx(3.6)
    assert f.base_lat_us == pytest.approx(10.0)


def test_per_queue_scales_and_shared_saturates() -> None:
    [f] = fit(points(shared={1: 0.5, 2: 0.6, 4: 0.8}), {})
    vcpu = 300e3
    for n in (1, 2, 8, 32):
        assert f.predict("per-queue", n, vcpu)["iops"] == pytest.approx(n * vcpu)
    # one thread at 0.4 + 0.1·N us per I/O: 1e6 / (0.4 + 0.1·8) = 833k < 8 · 300k
    sh8 = f.predict("shared", 8, vcpu)
    assert sh8["iops"] == pytest.approx(1e6 / 1.2)
    assert sh8["thread_busy"] == pytest.approx(1.0)
    # saturated: all 8·32 requests wait in the backend (Little's law)
    assert sh8["lat_mean_us"] == pytest.approx(8 * 32 / sh8["iops"] * 1e6)
    assert f.predict("per-queue", 8, vcpu)["lat_mean_us"] == pytest.approx(f.base_lat_us)
    # shared keeps up while N·300k is below 1e6 / (0.4 + 0.1·N): 1.2M < 1.25M at N=4,
    # 1.5M > 1.11M at N=5
    assert f.saturation(vcpu) == 5
    assert f.predict("shared", 4, vcpu)["iops"] == pytest.approx(1.2e6)
    # threads=4 at 16 queues: 4 threads of 4 queues, each 1e6/0.8
    assert f.predict("threads", 16, 1e6, threads=4)["iops"] == pytest.approx(4 * 1e6 / 0.8)


def test_a_cost_that_falls_with_more_queues_is_not_extrapolated() -> None:
    [f] = fit(points(shared={1: 1.0, 2: 0.8}), {})
    assert f.shared_b_us < 0
    assert f.shared_cost(32) == pytest.approx(0.8)


def test_emulated_latency_limits_what_a_queue_asks_and_file_has_a_ceiling() -> None:
    [lat] = fit(points("lat80"), {"lat80": 80.0})
    assert lat.demand(None) == pytest.approx(32 / 80e-6)          # iodepth / latency
    assert lat.demand(100e3) == pytest.approx(100e3)
    [file] = fit(points("file"), {})
    assert file.ceiling == pytest.approx(2e6)                     # the best measured
    assert file.predict("per-queue", 32, 1e6)["iops"] == pytest.approx(2e6)


def test_cells_cover_both_policies_and_cost_cells_only_on_null_reads() -> None:
    cells = placement.build_cells([1, 2], [4], [0, 50], ["null", "file", "lat80"])
    names = [c.name for c in cells]
    assert "null/randread-4k-qd32/q4" in names
    assert "file/randread-4k-qd32/q4" not in names and "null/randwrite-4k-qd32/q4" not in names
    assert "lat80/randwrite-4k-qd32/q1" not in names
    for c in cells:
        assert sorted(s.key for s in c.systems) == sorted(
            f"{p}-poll{poll}" for p in placement.POLICIES for poll in (0, 50))
        assert all(s.backend.startswith(f"dp-{c.disk}-") for s in c.systems)
    factories = placement.backend_factories({"null": "null:1G"}, [0], 4, Path("/tmp"))
    b = factories["dp-null-shared-poll0"](Path("/tmp/x.sock"))
    assert b.argv[b.argv.index("--policy") + 1] == "shared"
    assert b.argv[b.argv.index("--poll-us") + 1] == "0"
    assert b.argv[b.argv.index("--queues") + 1] == "4"


def test_bad_options_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        placement.parse_args(["--disks", "null,floppy"])
    assert "unknown floppy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        placement.parse_args(["--poll", "0,x"])


def test_a_tiny_real_run_writes_the_tables_and_the_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.placement", "--out", str(out), "--disks", "null",
         "--poll", "0", "--max-queues", "1", "--cost-queues", "2", "--reps", "1",
         "--runtime", "0.3", "--ramp", "0.1", "--retries", "0", "--quiet-timeout", "0",
         "--max-load-wait", "0", "--no-charts"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (out / "placement.csv").read_text().splitlines()
    # null randread at 1 and 2 queues, randwrite at 1, for both policies
    assert len(rows) == 1 + 3 * 2, rows
    assert all(float(r.split(",")[5]) > 0 for r in rows[1:]), rows       # IOPS measured
    model = json.loads((out / "model.json").read_text())
    assert {f["workload"] for f in model["fits"]} == {"randread-4k-qd32", "randwrite-4k-qd32"}
    md = (out / "placement.md").read_text()
    assert "## Model" in md and "| null | randread-4k-qd32 | 2 |" in md
    machine = json.loads((out / "machine.json").read_text())
    threads = machine["backend_threads"]
    assert set(threads["dp-null-shared-poll0"]) >= {"dp-io0"}
    assert set(threads["dp-null-per-queue-poll0"]) >= {"dp-vq0", "dp-vq1"}


def test_the_slope_comes_from_the_disk_measured_at_most_queue_counts() -> None:
    pts = points("null", shared={1: 0.5, 2: 0.6, 4: 0.8, 8: 1.2}) + points(
        "lat80", c1=1.0, shared={1: 1.2, 2: 1.0})          # two noisy points: a falling line
    fits = {f.disk: f for f in fit(pts, {"lat80": 80.0})}
    assert fits["lat80"].shared_b_us == pytest.approx(0.1)
    # a through the two points' mean: (1.2 + 1.0 - 0.1 * 3) / 2
    assert fits["lat80"].shared_a_us == pytest.approx(0.95)
