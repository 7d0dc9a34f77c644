"""The I/O thread pool of a daemon with many exports (placement.pool): with one export it is
the per-queue plan exactly; with several, a bounded pool over the I/O CPUs onto which queue i
of every export goes to the thread for vCPU i's CPU (where the vCPU CPUs are known) or to the
least-loaded thread; adding an export maps only its queues."""

from __future__ import annotations

import pytest

from dataplane.errors import ConfigError
from dataplane.placement import (
    DeviceInfo,
    ExportDemand,
    HwQueue,
    Policy,
    ThreadPool,
    Topology,
    plan,
)


def host(ncpus: int, *, nodes: int = 1, smt: bool = False) -> Topology:
    """ncpus CPUs split evenly over nodes; with smt, CPUs c and c + ncpus/2 are siblings."""
    cpus = list(range(ncpus))
    half = ncpus // 2
    siblings = {c: frozenset({c, (c + half) % ncpus}) if smt else frozenset({c}) for c in cpus}
    per = ncpus // nodes
    return Topology(cpus=cpus, siblings=siblings, core_ids={c: c % half if smt else c for c in cpus},
                    package_ids=dict.fromkeys(cpus, 0),
                    nodes={n: cpus[n * per:(n + 1) * per] for n in range(nodes)})


def nvme(ncpus: int, nqueues: int) -> DeviceInfo:
    per = ncpus // nqueues
    return DeviceInfo("/dev/nvme0n1", disk="nvme0n1", numa_node=0,
                      hw_queues=[HwQueue(q, tuple(range(q * per, (q + 1) * per))) for q in range(nqueues)])


NULL = DeviceInfo("null:1G")


def demand(name: str, queues: int = 2, device: DeviceInfo = NULL,
           vcpus: tuple[int, ...] | None = None) -> ExportDemand:
    return ExportDemand(name, device, queues, vcpus)


@pytest.mark.parametrize("policy", ["per-queue", "shared", "threads=2"])
@pytest.mark.parametrize("vcpus", [None, [0, 1]])
def test_one_export_is_exactly_the_per_queue_plan(policy: str, vcpus: list[int] | None) -> None:
    topo, dev = host(8, nodes=2), nvme(8, 4)
    pool = ThreadPool.build(topo, [demand("vm1", 4, dev)], policy=policy, vcpu_cpus=vcpus)
    single = plan(topo, dev, 4, policy, vcpus)
    assert pool.single == single
    assert [(r.virtqueue, r.thread_name, r.host_cpu, r.hw_queue, r.reason) for r in pool.rows_of("vm1")] == [
        (r.virtqueue, r.thread_name, r.host_cpu, r.hw_queue, r.reason) for r in single.rows]
    assert pool.threads() == single.threads()


def test_many_exports_share_one_thread_per_io_cpu_and_spread() -> None:
    topo = host(4)
    pool = ThreadPool.build(topo, [demand(f"vm{i}", 2) for i in range(6)])
    assert pool.single is None
    assert [s.name for s in pool.slots] == ["dp-io0", "dp-io1", "dp-io2", "dp-io3"]
    assert sorted(s.cpu for s in pool.slots) == [0, 1, 2, 3]
    assert pool.load() == [3, 3, 3, 3]          # 12 queues over 4 threads
    for i in range(6):
        rows = pool.rows_of(f"vm{i}")
        assert len({r.thread_name for r in rows}) == 2, "an export's queues on distinct threads"
    # Thread i of the pool serves vm0's queue 0, vm1's queues go to the next free threads
    assert [r.thread_name for r in pool.rows_of("vm0")] == ["dp-io0", "dp-io1"]
    assert [r.thread_name for r in pool.rows_of("vm1")] == ["dp-io2", "dp-io3"]


def test_pool_keeps_off_vcpu_cpus_and_maps_queue_i_to_vcpu_i_s_thread() -> None:
    topo = host(8)
    pool = ThreadPool.build(topo, [demand("a", 4), demand("b", 4)], vcpu_cpus=[0, 1, 2, 3])
    assert sorted(s.cpu for s in pool.slots) == [4, 5, 6, 7]     # one per I/O CPU
    for name in ("a", "b"):
        rows = pool.rows_of(name)
        assert [r.vcpu for r in rows] == [0, 1, 2, 3]
        assert [r.thread_name for r in rows] == ["dp-io0", "dp-io1", "dp-io2", "dp-io3"]
        assert "vCPU 2 runs on cpu 2" in rows[2].reason
    # more queues than vCPUs wrap around the vCPUs
    rows = pool.add(demand("c", 6))
    assert [r.thread_name for r in rows] == ["dp-io0", "dp-io1", "dp-io2", "dp-io3", "dp-io0", "dp-io1"]


def test_an_export_s_own_vcpus_go_to_the_closest_thread() -> None:
    """VM x on CPUs 0-1, VM y on CPUs 4-5 (node 1): each VM's queues stay on its node's
    threads, and queue i of each VM lands on the thread bound to that VM's vCPU i."""
    topo = host(8, nodes=2)
    pool = ThreadPool.build(topo, [demand("x", 2, vcpus=(0, 1)), demand("y", 2, vcpus=(4, 5))],
                            io_threads=4)
    cpus = {s.name: s.cpu for s in pool.slots}
    x = [cpus[r.thread_name] for r in pool.rows_of("x")]
    y = [cpus[r.thread_name] for r in pool.rows_of("y")]
    assert all(topo.node_of(c) == 0 for c in x) and all(topo.node_of(c) == 1 for c in y), (x, y)
    assert len(set(x)) == 2 and len(set(y)) == 2
    # a later disk of VM x: the same threads, queue for queue
    again = pool.add(demand("x2", 2, vcpus=(0, 1)))
    assert [cpus[r.thread_name] for r in again] == x


def test_adding_maps_only_new_queues_and_removing_frees_their_share() -> None:
    topo = host(4)
    pool = ThreadPool.build(topo, [demand("a", 2), demand("b", 2)])
    before = {n: pool.rows_of(n) for n in ("a", "b")}
    pool.add(demand("c", 3))
    assert {n: pool.rows_of(n) for n in ("a", "b")} == before
    assert sorted(pool.load()) == [1, 2, 2, 2]
    pool.remove("c")
    assert pool.load() == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match="already placed"):
        pool.add(demand("a", 1))


def test_a_daemon_started_with_one_export_adds_to_its_per_queue_threads() -> None:
    topo = host(2)
    pool = ThreadPool.build(topo, [demand("first", 2)])
    assert list(pool.threads()) == ["dp-vq0", "dp-vq1"]
    rows = pool.add(demand("second", 2))
    assert {r.thread_name for r in rows} == {"dp-vq0", "dp-vq1"}
    assert list(pool.threads()) == ["dp-vq0", "dp-vq1"]        # no new thread


def test_sizes_and_policies() -> None:
    topo = host(4)
    assert len(ThreadPool.build(topo, [demand("a"), demand("b")], io_threads=2).slots) == 2
    assert len(ThreadPool.build(topo, [demand("a"), demand("b")], policy="shared").slots) == 1
    threads3 = ThreadPool.build(topo, [demand("a"), demand("b")], policy=Policy("threads", 3))
    assert [s.name for s in threads3.slots] == ["dp-io0", "dp-io1", "dp-io2"]
    assert len(ThreadPool.build(topo, []).slots) == 4     # a daemon managed over RPC only
    # one export with io_threads set: the pool, not the per-queue plan
    assert ThreadPool.build(topo, [demand("a", 8)], io_threads=2).single is None
    with pytest.raises(ConfigError, match="give one of them"):
        ThreadPool.build(topo, [demand("a"), demand("b")], policy="shared", io_threads=2)
    with pytest.raises(ConfigError, match="same name"):
        ThreadPool.build(topo, [demand("a"), demand("a")])


def test_rows_carry_each_export_s_own_hw_queue() -> None:
    topo = host(4)
    pool = ThreadPool.build(topo, [demand("nvme", 4, nvme(4, 4)), demand("null", 4)])
    for r in pool.rows_of("nvme"):
        assert r.hw_queue == r.host_cpu            # one CPU per hw queue
    assert all(r.hw_queue is None for r in pool.rows_of("null"))


def test_table_and_json_name_every_export_queue() -> None:
    pool = ThreadPool.build(host(2), [demand("vm1"), demand("vm2", 3)])
    table = pool.to_table()
    assert table.splitlines()[0].startswith("policy per-queue, 2 I/O thread(s) for 2 export(s)")
    assert sum(1 for line in table.splitlines() if line.startswith(("vm1 ", "vm2 "))) == 5
    data = pool.to_dict()
    assert [t["queues"] for t in data["threads"]] == [3, 2]
    assert [r["virtqueue"] for r in data["exports"]["vm2"]] == [0, 1, 2]
