"""The load generator's latency histogram (csrc/util/hist.c): fio's log-linear buckets, fio's
percentile rule, and merging across threads."""

from __future__ import annotations

import math

import pytest

from dataplane.core import ffi, lib

np = pytest.importorskip("numpy")

# clat percentiles of a real fio 3.33 run (randread, psync): fio reports bucket midpoints, so
# each of these must be one of ours.
FIO_REPORTED = (35584, 37120, 39680, 44800, 48384, 51456, 55040, 58112, 62208, 66048, 72192,
                79360, 108032, 140288, 1028096, 1662976, 1908736, 11200, 2113536, 464896,
                1019904, 4423680, 14221312, 32636928)
FIO_PERCENTILES = (1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0,
                   99.0, 99.5, 99.9, 99.95, 99.99)


def new_hist(values=()) -> object:
    h = ffi.new("struct dp_hist *")
    for v in values:
        lib.dp_hist_add(h, int(v))
    return h


def test_layout_is_fios():
    assert (lib.DP_HIST_BITS, lib.DP_HIST_VAL, lib.DP_HIST_GROUPS) == (6, 64, 29)
    assert lib.DP_HIST_NR == 29 * 64


def test_small_values_are_exact():
    for v in range(128):
        assert lib.dp_hist_index(v) == v
        assert lib.dp_hist_bucket_low(v) == v == lib.dp_hist_bucket_value(v)


def test_buckets_tile_the_range_with_bounded_width():
    for i in range(128, lib.DP_HIST_NR - 1):
        low, high = lib.dp_hist_bucket_low(i), lib.dp_hist_bucket_low(i + 1)
        assert high > low
        assert lib.dp_hist_index(low) == i
        assert lib.dp_hist_index(high - 1) == i
        assert lib.dp_hist_index(high) == i + 1
        # Width is 1/64 of the group's base: the lower bound is within 1/64, the midpoint
        # (what fio prints) within 1/128 of any value in the bucket.
        assert (high - low) / low <= 1 / 64
        mid = lib.dp_hist_bucket_value(i)
        assert low <= mid < high
        assert (high - 1 - mid) / (high - 1) <= 1 / 128 and (mid - low) / low <= 1 / 128


def test_group_boundaries_match_fio():
    # fio: values < 128 index themselves; 128 starts group 2 with 2 ns buckets, 256 group 3...
    assert lib.dp_hist_index(128) == 128 and lib.dp_hist_index(129) == 128
    assert lib.dp_hist_index(130) == 129
    assert lib.dp_hist_index(255) == 191 and lib.dp_hist_index(256) == 192
    assert lib.dp_hist_bucket_value(128) == 129          # fio's plat_idx_to_val(128)
    assert lib.dp_hist_bucket_low(lib.DP_HIST_NR - 1) == (1 << 34) - (1 << 27)
    # Beyond ~17 s everything lands in the last bucket instead of overflowing.
    assert lib.dp_hist_index(1 << 40) == lib.DP_HIST_NR - 1
    assert lib.dp_hist_index((1 << 64) - 1) == lib.DP_HIST_NR - 1


@pytest.mark.parametrize("value", FIO_REPORTED)
def test_fio_reported_values_are_bucket_midpoints(value):
    assert lib.dp_hist_bucket_value(lib.dp_hist_index(value)) == value


@pytest.mark.parametrize("dist", ["lognormal", "bimodal", "uniform_small"])
def test_percentiles_within_fio_error_of_numpy(dist):
    rng = np.random.default_rng(20240611)
    if dist == "lognormal":        # ~20 µs median, long tail
        samples = rng.lognormal(mean=math.log(20_000), sigma=0.8, size=50_000)
    elif dist == "bimodal":        # cache hits and misses
        samples = np.concatenate([rng.normal(8_000, 500, 40_000), rng.normal(2_000_000, 1e5, 10_000)])
    else:                          # values where the histogram is exact
        samples = rng.integers(0, 128, size=20_000)
    samples = np.maximum(samples, 0).astype(np.uint64)
    h = new_hist(samples)
    assert h.n == len(samples)
    for p in FIO_PERCENTILES:
        # fio picks the first bucket whose running count reaches p% of n: the value at that
        # rank is numpy's inverted-CDF percentile, and it lies in the bucket fio reports.
        want = float(np.percentile(samples, p, method="inverted_cdf"))
        got = lib.dp_hist_percentile(h, p)
        if want < 128:
            assert got == want, p
        else:
            # fio's bound is 1/64 (a bucket's width); the midpoint is within half of that.
            assert abs(got - want) / want <= 1 / 128, (p, got, want)


def test_mean_min_max_and_stddev_from_sums():
    rng = np.random.default_rng(7)
    samples = rng.integers(1_000, 5_000_000, size=10_000).astype(np.uint64)
    h = new_hist(samples)
    assert h.min == samples.min() and h.max == samples.max()
    assert h.sum == int(samples.sum())
    mean = h.sum / h.n
    stddev = math.sqrt((h.sumsq / h.n - mean * mean) * h.n / (h.n - 1))
    assert stddev == pytest.approx(float(np.std(samples.astype(float), ddof=1)), rel=1e-9)


def test_merge_equals_one_histogram_of_all_samples():
    rng = np.random.default_rng(11)
    a = rng.lognormal(math.log(50_000), 1.0, 20_000).astype(np.uint64)
    b = rng.lognormal(math.log(5_000), 0.5, 30_000).astype(np.uint64)
    ha, hb, hall = new_hist(a), new_hist(b), new_hist(np.concatenate([a, b]))
    merged = new_hist()
    lib.dp_hist_merge(merged, ha)
    lib.dp_hist_merge(merged, hb)
    lib.dp_hist_merge(merged, new_hist())        # an idle thread's empty histogram
    assert ffi.unpack(merged.bucket, lib.DP_HIST_NR) == ffi.unpack(hall.bucket, lib.DP_HIST_NR)
    assert (merged.n, merged.min, merged.max, merged.sum) == (hall.n, hall.min, hall.max, hall.sum)
    assert merged.sumsq == pytest.approx(hall.sumsq, rel=1e-12)
    for p in FIO_PERCENTILES:
        assert lib.dp_hist_percentile(merged, p) == lib.dp_hist_percentile(hall, p)


def test_empty_histogram():
    h = new_hist()
    assert lib.dp_hist_percentile(h, 50.0) == 0
    lib.dp_hist_reset(h)
    assert h.n == 0 and h.max == 0
