"""Emulated latency distributions (dataplane/disks/latency.py + the core's sampler in
csrc/disk/delay.c): what the queues draw matches the spec a user wrote, and a bad spec is one
clear error.

Draws come from `lib.dp_latency_sample`, which samples the table exactly like a queue does
(same generator, same interpolation); percentiles of the draws follow fio's rule (the first
value at which the running count reaches pct% of n), so they compare with fio's numbers.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from dataplane.core import ffi, lib
from dataplane.disks import split_disk_options
from dataplane.disks.latency import LatencySpec, parse_latency
from dataplane.errors import ConfigError

POINTS = int(lib.DP_LATENCY_POINTS)
DRAWS = 100_000
TOLERANCE = 0.05   # issue 8: mean and p99 within 5% over 100k draws


def draw(table: list[int], n: int = DRAWS, seed: int = 0x5EED) -> list[int]:
    params = ffi.new("struct dp_latency_params *")
    params.npoints = len(table)
    for i, value in enumerate(table):
        params.quantile_ns[i] = value
    out = ffi.new("uint64_t[]", n)
    lib.dp_latency_sample(params, seed, out, n)
    return sorted(out)


def percentile(sorted_draws: list[int], pct: float) -> int:
    """fio's rule: the first value where the running count reaches pct% of n."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_draws)))
    return sorted_draws[rank - 1]


def mean(values: list[int]) -> float:
    return sum(values) / len(values)


def assert_close(what: str, got: float, want: float, tolerance: float = TOLERANCE) -> None:
    assert abs(got - want) <= tolerance * want, (
        f"{what}: sampled {got / 1000:.1f} us, expected {want / 1000:.1f} us "
        f"({100 * (got / want - 1):+.1f}%, tolerance {100 * tolerance:.0f}%)")


# --------------------------------------------------------------------------- analytic specs


def test_fixed_is_exactly_the_value() -> None:
    draws = draw(parse_latency("fixed:80us", POINTS))
    assert draws[0] == draws[-1] == 80_000


@pytest.mark.parametrize("spec, lo, hi", [("uniform:20us-400us", 20_000, 400_000),
                                          ("uniform:50us-2ms", 50_000, 2_000_000)])
def test_uniform_mean_p99_and_bounds(spec: str, lo: int, hi: int) -> None:
    draws = draw(parse_latency(spec, POINTS))
    assert lo <= draws[0] and draws[-1] <= hi
    assert_close(f"{spec} mean", mean(draws), (lo + hi) / 2)
    assert_close(f"{spec} p99", percentile(draws, 99), lo + 0.99 * (hi - lo))
    assert_close(f"{spec} p50", percentile(draws, 50), lo + 0.5 * (hi - lo))


@pytest.mark.parametrize("p50_us, p99_us", [(80, 600), (100, 2000), (100, 5000)])
def test_lognormal_median_p99_and_mean(p50_us: int, p99_us: int) -> None:
    spec = f"lognormal:p50={p50_us}us,p99={p99_us}us"
    draws = draw(parse_latency(spec, POINTS))
    sigma = math.log(p99_us / p50_us) / 2.326347874   # z(0.99)
    assert_close(f"{spec} p50", percentile(draws, 50), p50_us * 1000)
    assert_close(f"{spec} p99", percentile(draws, 99), p99_us * 1000)
    assert_close(f"{spec} mean", mean(draws), p50_us * 1000 * math.exp(sigma ** 2 / 2))


@pytest.mark.parametrize("spec", ["uniform:20us-400us", "lognormal:p50=80us,p99=600us"])
def test_configured_percentiles_are_what_the_queues_draw(spec: str) -> None:
    """LatencySpec.percentile_ns / mean_ns (what `configured` latency reports) agree with the
    draws: they read the same table the same way."""
    table = parse_latency(spec, POINTS)
    configured = LatencySpec(spec, table)
    draws = draw(table)
    for pct in (50, 90, 99):
        assert_close(f"{spec} p{pct}", percentile(draws, pct), configured.percentile_ns(pct), 0.03)
    assert_close(f"{spec} mean", mean(draws), configured.mean_ns(), 0.01)


def test_different_seeds_draw_different_streams() -> None:
    """Each queue seeds its own generator: two streams are not the same sequence."""
    table = parse_latency("uniform:20us-400us", POINTS)
    params = ffi.new("struct dp_latency_params *")
    params.npoints = len(table)
    for i, value in enumerate(table):
        params.quantile_ns[i] = value
    a, b = ffi.new("uint64_t[]", 64), ffi.new("uint64_t[]", 64)
    lib.dp_latency_sample(params, 1, a, 64)
    lib.dp_latency_sample(params, 2, b, 64)
    assert list(a) != list(b)


# --------------------------------------------------------------------------- fio: from a real run


def _fio_result(directory: Path) -> Path:
    """A real fio JSON result: 1 s of psync randrw with bs=1m on a 32 MiB file (O_DIRECT when
    the filesystem has it). Large blocks keep the latency dominated by the transfer. A run
    that a loaded host stalled so badly that a few requests own the mean (stddev over
    MAX_CV x the mean: 100k draws could not pin such a mean to 5%) is run again."""
    fio = shutil.which("fio")
    if fio is None:
        pytest.skip("fio is not installed (apt-get install fio)")
    out = directory / "fio.json"
    direct = "1"
    for _attempt in range(3):
        cmd = [fio, "--name=dev", f"--filename={directory / 'fio.data'}", "--size=32m", "--bs=1m",
               "--rw=randrw", "--ioengine=psync", f"--direct={direct}", "--runtime=1",
               "--time_based", "--output-format=json", f"--output={out}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0 and direct == "1":   # a filesystem without O_DIRECT
            direct = "0"
            proc = subprocess.run([*cmd[:6], "--direct=0", *cmd[7:]], capture_output=True,
                                  text=True, timeout=60)
        if proc.returncode != 0:
            pytest.fail(f"fio failed ({proc.returncode}): {proc.stderr.strip()}")
        job = json.loads(out.read_text())["jobs"][0]
        if all(job[d]["clat_ns"]["stddev"] <= MAX_CV * job[d]["clat_ns"]["mean"]
               for d in ("read", "write")):
            return out
    return out


MAX_CV = 8.0


@pytest.fixture(scope="module")
def fio_result(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fio_result(tmp_path_factory.mktemp("fio"))


@pytest.mark.parametrize("direction", ["read", "write"])
def test_fio_distribution_matches_the_run(fio_result: Path, direction: str) -> None:
    clat = json.loads(fio_result.read_text())["jobs"][0][direction]["clat_ns"]
    assert clat["N"] > 50, f"fio measured only {clat['N']} {direction}s"
    draws = draw(parse_latency(f"fio:{fio_result}:{direction}", POINTS))
    assert_close(f"fio {direction} mean", mean(draws), clat["mean"])
    for pct in ("50.000000", "90.000000", "99.000000"):
        assert_close(f"fio {direction} p{float(pct):g}", percentile(draws, float(pct)),
                     clat["percentile"][pct])
    assert clat["min"] <= draws[0] and draws[-1] <= clat["max"]


def test_fio_without_a_direction_takes_the_reads(fio_result: Path) -> None:
    assert parse_latency(f"fio:{fio_result}", POINTS) == parse_latency(
        f"fio:{fio_result}:read", POINTS)


def _synthetic_fio_json(path: Path, samples: list[int]) -> dict:
    """What fio would write for these completion latencies: fio's percentile_list computed
    with fio's own histogram (csrc/util/hist.c), exact min/max/mean."""
    hist = ffi.new("struct dp_hist *")
    lib.dp_hist_reset(hist)
    for v in samples:
        lib.dp_hist_add(hist, v)
    pcts = (1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5,
            99.9, 99.95, 99.99)
    m = mean(samples)
    clat = {"min": min(samples), "max": max(samples), "mean": m, "N": len(samples),
            "stddev": math.sqrt(sum((v - m) ** 2 for v in samples) / (len(samples) - 1)),
            "percentile": {f"{p:f}": int(lib.dp_hist_percentile(hist, p)) for p in pcts}}
    empty = {"min": 0, "max": 0, "mean": 0.0, "N": 0, "stddev": 0.0}
    path.write_text(json.dumps({"jobs": [{"read": {"clat_ns": clat}, "write": {"clat_ns": empty}}]}))
    return clat


@pytest.mark.parametrize("sigma, outliers, lo_ms, hi_ms", [
    (0.5, 1, 50, 60),      # one 50 ms stall in 10k requests
    (0.5, 2, 50, 60),
    (0.5, 3, 200, 750),    # three stalls of up to 0.75 s: they own the mean
    (0.3, 20, 1, 3),       # a second mode at 0.2% (p99.9 lands in it)
    (1.2, 0, 0, 0),        # a plain heavy lognormal tail
])
def test_fio_heavy_tail_keeps_the_mean_and_the_percentiles(tmp_path: Path, sigma: float, outliers: int,
                                                           lo_ms: int, hi_ms: int) -> None:
    """What a loaded host or a real device's tail puts in a fio run: fio's percentile list
    thins out above p99.9, and a straight line from p99.95 to p99.99 to max weighs the tail
    as if a thousandth of the requests took that long. The emulated device keeps the run's
    mean and its percentiles up to p99.9. Regression: the emulated mean came out +15% .. +40%
    here (+200% on a real run with one 0.75 s stall), and p99 up to 11% high on real runs,
    because the table was resampled straight through fio's percentile points."""
    rng = random.Random(8)
    samples = [round(60_000 * math.exp(rng.gauss(0, sigma))) for _ in range(10_000)]
    samples += [rng.randrange(lo_ms * 1_000_000, hi_ms * 1_000_000) for _ in range(outliers)]
    path = tmp_path / "tail.json"
    clat = _synthetic_fio_json(path, samples)
    table = parse_latency(f"fio:{path}", POINTS)
    configured = LatencySpec("fio", table)
    # What the queues draw on average and at each percentile: no sampling noise here.
    assert_close("configured mean", configured.mean_ns(), clat["mean"], 0.001)
    for pct in ("1.000000", "50.000000", "90.000000", "99.000000", "99.500000", "99.900000"):
        assert_close(f"configured p{float(pct):g}", configured.percentile_ns(float(pct)),
                     clat["percentile"][pct], 0.001)
    assert table[0] == clat["min"] and table[-1] <= clat["max"]
    # And the draws themselves, where the run's spread lets 1M draws pin the mean to 5%.
    if clat["stddev"] / clat["mean"] < 10:
        draws = draw(table, 1_000_000)
        assert_close("mean", mean(draws), clat["mean"])
        assert_close("p99", percentile(draws, 99), clat["percentile"]["99.000000"])


# --------------------------------------------------------------------------- bad specs


@pytest.mark.parametrize("disk, message", [
    ("null:4G,latency=fixed:", "bad duration ''"),
    ("null:4G,latency=fixed:80xs", "bad duration '80xs': expected e.g. 80us, 1.5ms"),
    ("null:4G,latency=fixed:-5us", "bad duration '-5us'"),
    ("null:4G,latency=uniform:400us", "expected uniform:LOW-HIGH, e.g. uniform:20us-400us"),
    ("null:4G,latency=uniform:400us-20us", "the upper bound is below the lower bound"),
    ("null:4G,latency=lognormal:p50=80us", "expected lognormal:p50=X,p99=Y"),
    ("null:4G,latency=lognormal:p50=80us,p99=600us,p90=1ms", "expected lognormal:p50=X,p99=Y"),
    ("null:4G,latency=lognormal:p50=600us,p99=80us", "need 0 < p50 < p99"),
    ("null:4G,latency=gamma:3", "expected fixed:, uniform:, lognormal: or fio:"),
    ("null:4G,latency=", "expected fixed:, uniform:, lognormal: or fio:"),
    ("null:4G,latency=fio:/nonexistent/run.json", "latency fio:/nonexistent/run.json: no such file"),
    ("null:4G,iops=0", "bad iops='0': expected a positive number"),
    ("null:4G,latency=fixed:80us,iops=many", "bad iops='many': expected a positive number"),
    ("null:4G,bw=12q", "bad bw='12q': expected a positive number"),
])
def test_bad_specs_name_what_is_wrong(disk: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        split_disk_options(disk)
    assert message in str(exc.value)


def test_fio_file_that_is_not_fio_json(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a fio JSON result"):
        parse_latency(f"fio:{tmp_path / 'notes.txt'}", POINTS)
    with pytest.raises(ConfigError, match=r"no jobs\[\] in the file"):
        parse_latency(f"fio:{tmp_path / 'empty.json'}", POINTS)


def test_fio_direction_without_data(tmp_path: Path) -> None:
    _synthetic_fio_json(tmp_path / "reads.json", [100_000] * 100)   # reads only
    with pytest.raises(ConfigError, match="no write clat_ns percentiles in it"):
        parse_latency(f"fio:{tmp_path / 'reads.json'}:write", POINTS)


def test_caps_and_latency_together() -> None:
    base, spec = split_disk_options("null:4G,latency=lognormal:p50=80us,p99=600us,iops=50000,bw=1g")
    assert base == "null:4G"
    assert spec is not None and spec.iops == 50_000 and spec.bw == 1 << 30
    assert spec.percentile_ns(50) == pytest.approx(80_000, rel=0.01)
