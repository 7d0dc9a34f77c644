"""Micro-benchmarks of the request hot path: pop a chain, parse a request, push a used element,
and the three together. Each timed call is one C loop of N iterations over a fake guest
(csrc/bench/bench_hooks.c), so cffi's call overhead is amortised over N requests.

They assert only that the loop ran and produced something; timings are for reading, never for
failing a build (`pytest tests/bench --benchmark-only` shows the table; ns per operation is
the table's time divided by N).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dataplane.core import ffi, lib

N = 20_000          # iterations per timed call: ~1-2 ms each
ROUNDS = 15
RING = 256
BATCH = 32          # notification decision once per batch, like the engine

pytestmark = pytest.mark.benchmark


@pytest.fixture(params=[True, False], ids=["indirect", "direct"])
def ring(request: pytest.FixtureRequest) -> Iterator[object]:
    err = ffi.new("int *")
    handle = lib.dp_bench_ring_new(RING, int(request.param), 4096, err)
    assert handle != ffi.NULL, f"dp_bench_ring_new failed: {err[0]}"
    yield handle
    lib.dp_bench_ring_free(handle)


def _run(benchmark, fn, *args) -> object:
    result = ffi.new("struct dp_bench_result *")

    def call() -> int:
        return fn(*args, result)

    rc = benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert rc == 0
    assert result.iterations == N
    assert result.ns > 0
    return result


def test_pop_chain(benchmark, ring):
    result = _run(benchmark, lib.dp_bench_pop, ring, N)
    assert result.checksum != 0


def test_parse_request(benchmark, ring):
    result = _run(benchmark, lib.dp_bench_parse, ring, N)
    assert result.checksum != 0     # sector offsets and lengths were read from the headers


def test_push_used(benchmark, ring):
    result = _run(benchmark, lib.dp_bench_push_used, ring, N, BATCH)
    assert result.checksum != 0     # the used index moved


def test_whole_request(benchmark, ring):
    result = _run(benchmark, lib.dp_bench_request, ring, N, BATCH)
    assert result.checksum != 0


@pytest.fixture(params=[(True, 0), (True, 1), (False, 1)],
                ids=["indirect-one-entry", "indirect-per-page", "direct-per-page"])
def viommu_ring(request: pytest.FixtureRequest) -> Iterator[object]:
    """The same ring behind a vIOMMU: IOVAs everywhere, translated through an IOTLB of one
    entry, or of one 4 KiB entry per page (QEMU's updates of scattered pages)."""
    indirect, per_page = request.param
    err = ffi.new("int *")
    handle = lib.dp_bench_ring_new(RING, int(indirect), 4096, err)
    assert handle != ffi.NULL, f"dp_bench_ring_new failed: {err[0]}"
    assert lib.dp_bench_ring_iommu(handle, per_page) == 0
    yield handle
    lib.dp_bench_ring_free(handle)


def test_pop_chain_behind_a_viommu(benchmark, viommu_ring):
    result = _run(benchmark, lib.dp_bench_pop, viommu_ring, N)
    assert result.checksum != 0


def test_whole_request_behind_a_viommu(benchmark, viommu_ring):
    result = _run(benchmark, lib.dp_bench_request, viommu_ring, N, BATCH)
    assert result.checksum != 0


def test_bad_ring_parameters_are_refused():
    err = ffi.new("int *")
    for num, data_len in ((100, 4096), (256, 1000), (256, 0), (2048, 4096)):
        assert lib.dp_bench_ring_new(num, 1, data_len, err) == ffi.NULL
        assert err[0] < 0
