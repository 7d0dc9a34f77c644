"""Topology discovery and placement on synthetic sysfs trees built in tmp_path (NVMe with 4, 8
and 64 hw queues, 2 NUMA nodes, SMT pairs, partitions, device-mapper, tmpfs), plus this
machine's real tree, where only invariants are checked (the machine differs between runs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dataplane.errors import ConfigError
from dataplane.topology import (
    BlockDevice,
    DeviceInfo,
    Plan,
    Policy,
    Topology,
    format_cpulist,
    parse_cpulist,
    parse_policy,
    plan,
)

# ---- building fake sysfs trees ----------------------------------------------------------------

PCI = "sys/devices/pci0000:00/0000:00:04.0"
NVME_DISK = f"{PCI}/nvme/nvme0/nvme0n1"


class FakeSysfs:
    """Writes the sysfs files topology.py reads, with relative symlinks like the kernel's."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.devs: dict[str, tuple[int, int, bool]] = {}   # what dev_of answers

    def write(self, rel: str, text: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")

    def link(self, rel: str, target: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(os.path.relpath(self.root / target, path.parent))

    def host(self, ncpus: int, *, smt: bool = False, nodes: list[str] | None = None,
             isolated: str = "") -> None:
        """CPUs 0..n-1; with smt, cpu c and c + n/2 are siblings (Intel numbering)."""
        cpu = "sys/devices/system/cpu"
        self.write(f"{cpu}/online", f"0-{ncpus - 1}")
        self.write(f"{cpu}/isolated", isolated)
        half = ncpus // 2
        node_of = {c: n for n, spec in enumerate(nodes or []) for c in parse_cpulist(spec)}
        for c in range(ncpus):
            sibs = f"{c % half},{c % half + half}" if smt else str(c)
            self.write(f"{cpu}/cpu{c}/topology/thread_siblings_list", sibs)
            self.write(f"{cpu}/cpu{c}/topology/core_id", str(c % half if smt else c))
            self.write(f"{cpu}/cpu{c}/topology/physical_package_id", str(node_of.get(c, 0)))
        for n, spec in enumerate(nodes or []):
            self.write(f"sys/devices/system/node/node{n}/cpulist", spec)

    def block(self, rel: str, dev: str, *, hw_queues: list[list[int]] | None = None,
              device_link: str | None = None, partition: bool = False) -> None:
        """A disk (or partition) directory at `rel`, reachable from /sys/dev/block and /dev."""
        name = rel.rsplit("/", 1)[1]
        self.write(f"{rel}/dev", dev)
        for i, cpus in enumerate(hw_queues or []):
            self.write(f"{rel}/mq/{i}/cpu_list", ", ".join(map(str, cpus)))   # the kernel's format
        if device_link:
            self.link(f"{rel}/device", device_link)
        if partition:
            self.write(f"{rel}/partition", name[-1])
        else:
            self.link(f"sys/block/{name}", rel)
        self.link(f"sys/dev/block/{dev}", rel)
        major, minor = map(int, dev.split(":"))
        self.devs[f"/dev/{name}"] = (major, minor, True)

    def nvme(self, hw_queues: list[list[int]], numa_node: int = 1) -> None:
        """nvme0n1 (259:0) with partition nvme0n1p1 (259:1); numa_node only on the PCI function,
        as on real hardware (the controller and namespace directories have none)."""
        self.write(f"{PCI}/numa_node", str(numa_node))
        self.write(f"{PCI}/nvme/nvme0/uevent", "")
        self.block(NVME_DISK, "259:0", hw_queues=hw_queues, device_link=f"{PCI}/nvme/nvme0")
        self.block(f"{NVME_DISK}/nvme0n1p1", "259:1", partition=True)

    def dev_of(self, path: str) -> tuple[int, int, bool]:
        try:
            return self.devs[path]
        except KeyError:
            raise FileNotFoundError(2, "No such file or directory", path) from None


def blk_mq_map(nqueues: int, nodes: list[list[int]], sibling: dict[int, int]) -> list[list[int]]:
    """Like the kernel's group_cpus_evenly: queues split across nodes by CPU count, each node's
    CPUs in sibling-grouped order cut into contiguous runs; with more queues than CPUs, one CPU
    per queue and the rest map no CPU at all."""
    total = sum(len(n) for n in nodes)
    ordered_nodes = []
    for cpus in nodes:
        ordered: list[int] = []
        for c in sorted(cpus):
            if c not in ordered:
                ordered += [c] + ([sibling[c]] if sibling.get(c, c) != c else [])
        ordered_nodes.append(ordered)
    if nqueues >= total:
        flat = [c for ordered in ordered_nodes for c in ordered]
        return [[c] for c in flat] + [[] for _ in range(nqueues - total)]
    out = []
    for ordered in ordered_nodes:
        share = nqueues * len(ordered) // total
        run = len(ordered) // share
        out += [sorted(ordered[i * run:(i + 1) * run]) for i in range(share)]
    return out


NODE0, NODE1 = "0-3,8-11", "4-7,12-15"
SIBLING16 = {c: (c + 8) % 16 for c in range(16)}


def two_node_host(tmp_path: Path, nqueues: int, *, isolated: str = "") -> tuple[Topology, DeviceInfo]:
    """16 CPUs, SMT pairs c/c+8, node 0 = 0-3,8-11, node 1 = 4-7,12-15, NVMe on node 1."""
    fs = FakeSysfs(tmp_path)
    fs.host(16, smt=True, nodes=[NODE0, NODE1], isolated=isolated)
    fs.nvme(blk_mq_map(nqueues, [parse_cpulist(NODE0), parse_cpulist(NODE1)], SIBLING16))
    return (Topology.from_sysfs(tmp_path),
            BlockDevice.resolve("/dev/nvme0n1", tmp_path, dev_of=fs.dev_of))


def one_node_host(tmp_path: Path, ncpus: int, nqueues: int, *,
                  smt: bool = False) -> tuple[Topology, DeviceInfo]:
    fs = FakeSysfs(tmp_path)
    fs.host(ncpus, smt=smt, nodes=[f"0-{ncpus - 1}"])
    sibling = {c: (c + ncpus // 2) % ncpus for c in range(ncpus)} if smt else {}
    fs.nvme(blk_mq_map(nqueues, [list(range(ncpus))], sibling), numa_node=0)
    return (Topology.from_sysfs(tmp_path),
            BlockDevice.resolve("/dev/nvme0n1", tmp_path, dev_of=fs.dev_of))


def assert_consistent(p: Plan, topo: Topology, dev: DeviceInfo) -> None:
    """What must hold for any plan: one row per queue, vCPU i on virtqueue i, every column
    agreeing with the topology and the device, and a reason that names the CPU."""
    for i, row in enumerate(p.rows):
        assert (row.vcpu, row.virtqueue) == (i, i)
        assert row.host_cpu in topo.cpus
        assert row.hw_queue == dev.hw_queue_of(row.host_cpu)
        assert row.numa_node == topo.node_of(row.host_cpu)
        assert p.thread_for_queue(i) == (row.thread_name, row.host_cpu)
        assert row.reason.startswith(f"cpu {row.host_cpu}:") or row.reason.startswith("same thread")


def siblings_used_twice(p: Plan, topo: Topology) -> bool:
    cpus = set(p.threads().values())
    return any(topo.siblings_of(c) & cpus for c in cpus)


# ---- CPU lists and policies -------------------------------------------------------------------


@pytest.mark.parametrize("text, cpus", [
    ("0-3,8", [0, 1, 2, 3, 8]),
    ("0-3,8-11\n", [0, 1, 2, 3, 8, 9, 10, 11]),
    ("0, 1, 2, 3", [0, 1, 2, 3]),      # blk-mq's mq/*/cpu_list format
    ("5", [5]),
    ("3,1,1", [1, 3]),
    ("", []),
    ("\n", []),
])
def test_parse_cpulist(text: str, cpus: list[int]) -> None:
    assert parse_cpulist(text) == cpus


@pytest.mark.parametrize("text, message", [
    ("a-b", "'a-b' is not a CPU number or a range"),
    ("1-", "'1-' is not a CPU number"),
    ("3-1", "range '3-1' runs backwards"),
    ("0-99999999", "beyond 8191"),
    ("-1", "not a CPU number"),
])
def test_parse_cpulist_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="bad CPU list") as exc:
        parse_cpulist(text)
    assert message in str(exc.value)


def test_format_cpulist_round_trips() -> None:
    for cpus in ([0, 1, 2, 3, 8], [5], [], [0, 2, 4], list(range(64))):
        assert parse_cpulist(format_cpulist(cpus)) == cpus
    assert format_cpulist([8, 0, 1, 2, 3, 10, 11]) == "0-3,8,10-11"


@pytest.mark.parametrize("text, policy", [
    ("per-queue", Policy("per-queue")),
    ("shared", Policy("shared")),
    ("threads=4", Policy("threads", 4)),
    (" Threads = 2 ", Policy("threads", 2)),
])
def test_parse_policy(text: str, policy: Policy) -> None:
    assert parse_policy(text) == policy
    assert parse_policy(str(policy)) == policy


@pytest.mark.parametrize("text", ["perqueue", "threads=0", "threads=", "threads=x", "", "threads"])
def test_parse_policy_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="expected per-queue, shared or threads=K"):
        parse_policy(text)


# ---- host topology ----------------------------------------------------------------------------


def test_topology_two_nodes_with_smt(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.host(16, smt=True, nodes=[NODE0, NODE1], isolated="14-15")
    topo = Topology.from_sysfs(tmp_path)
    assert topo.cpus == list(range(16))
    assert topo.smt
    assert topo.siblings_of(0) == {8} and topo.siblings_of(13) == {5}
    assert topo.nodes == {0: parse_cpulist(NODE0), 1: parse_cpulist(NODE1)}
    assert topo.node_of(12) == 1 and topo.node_of(9) == 0
    assert topo.core_ids[9] == 1 and topo.package_ids[12] == 1
    assert topo.isolated == {14, 15}
    assert topo.notes == []


def test_topology_without_numa_or_topology_files_is_one_node(tmp_path: Path) -> None:
    (tmp_path / "sys/devices/system/cpu").mkdir(parents=True)
    (tmp_path / "sys/devices/system/cpu/online").write_text("0-5\n")
    topo = Topology.from_sysfs(tmp_path)
    assert topo.cpus == list(range(6))
    assert topo.nodes == {0: list(range(6))}
    assert not topo.smt and topo.siblings_of(3) == frozenset()
    assert topo.isolated == frozenset()
    assert any("one node" in n for n in topo.notes)


def test_topology_from_an_empty_tree_still_has_a_cpu(tmp_path: Path) -> None:
    topo = Topology.from_sysfs(tmp_path)
    assert topo.cpus and topo.nodes == {0: topo.cpus}
    assert any("online" in n for n in topo.notes)


def test_topology_ignores_offline_cpus(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.host(8, smt=True, nodes=["0-7"])
    fs.write("sys/devices/system/cpu/online", "0-2,4-7")   # cpu 3 went offline
    topo = Topology.from_sysfs(tmp_path)
    assert topo.cpus == [0, 1, 2, 4, 5, 6, 7]
    assert topo.siblings_of(0) == {4} and topo.siblings_of(7) == frozenset()   # 3 is gone
    assert topo.nodes == {0: [0, 1, 2, 4, 5, 6, 7]}


def test_topology_affinity_limits_usable_cpus(tmp_path: Path) -> None:
    FakeSysfs(tmp_path).host(8, nodes=["0-7"])
    topo = Topology.from_sysfs(tmp_path, allowed={2, 3, 42})
    assert topo.usable_cpus() == [2, 3]
    assert any("affinity" in n for n in topo.notes)


# ---- the backing device -----------------------------------------------------------------------


def test_nvme_hw_queues_and_numa_node_from_pci_parent(tmp_path: Path) -> None:
    _, dev = two_node_host(tmp_path, 8)
    assert dev.disk == "nvme0n1" and dev.partition is None and dev.dev == "259:0"
    assert [q.index for q in dev.hw_queues] == list(range(8))
    assert dev.hw_queues[0].cpus == (0, 8)      # siblings share a hw queue, as blk-mq groups them
    assert dev.numa_node == 1
    assert dev.mapping_note is None
    assert dev.hw_queue_of(12) == dev.hw_queue_of(4)


def test_64_hw_queues_on_16_cpus_keeps_the_contexts_cpus_map_to(tmp_path: Path) -> None:
    _, dev = two_node_host(tmp_path, 64)
    assert len(list((tmp_path / NVME_DISK / "mq").iterdir())) == 64
    assert len(dev.hw_queues) == 16
    assert sorted(c for q in dev.hw_queues for c in q.cpus) == list(range(16))


def test_partition_resolves_to_its_disk(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.host(16, smt=True, nodes=[NODE0, NODE1])
    fs.nvme(blk_mq_map(4, [parse_cpulist(NODE0), parse_cpulist(NODE1)], SIBLING16))
    dev = BlockDevice.resolve("/dev/nvme0n1p1", tmp_path, dev_of=fs.dev_of)
    assert (dev.disk, dev.partition, dev.dev) == ("nvme0n1", "nvme0n1p1", "259:1")
    assert len(dev.hw_queues) == 4 and dev.numa_node == 1
    assert dev.sysfs == (tmp_path / NVME_DISK).resolve()


def test_regular_file_resolves_to_the_disk_of_its_filesystem(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.host(16, smt=True, nodes=[NODE0, NODE1])
    fs.nvme(blk_mq_map(8, [parse_cpulist(NODE0), parse_cpulist(NODE1)], SIBLING16))
    fs.devs["/srv/vm/disk.img"] = (259, 1, False)   # st_dev of a file on nvme0n1p1
    dev = BlockDevice.resolve(Path("/srv/vm/disk.img"), tmp_path, dev_of=fs.dev_of)
    assert dev.path == "/srv/vm/disk.img"
    assert (dev.disk, dev.partition) == ("nvme0n1", "nvme0n1p1")
    assert len(dev.hw_queues) == 8 and dev.numa_node == 1 and dev.mapping_note is None


def test_device_mapper_has_no_mapping_and_says_so(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.host(16, smt=True, nodes=[NODE0, NODE1])
    fs.nvme(blk_mq_map(8, [parse_cpulist(NODE0), parse_cpulist(NODE1)], SIBLING16))
    dm = "sys/devices/virtual/block/dm-0"
    fs.block(dm, "254:0")
    fs.write(f"{dm}/dm/name", "vg0-root")
    fs.link(f"{dm}/slaves/nvme0n1p1", f"{NVME_DISK}/nvme0n1p1")
    fs.devs["/var/lib/vm.img"] = (254, 0, False)
    dev = BlockDevice.resolve("/var/lib/vm.img", tmp_path, dev_of=fs.dev_of)
    assert dev.disk == "dm-0" and dev.hw_queues == []
    assert dev.numa_node == 1                       # from the device underneath
    assert dev.mapping_note is not None
    for words in ("dm-0 (vg0-root)", "device-mapper", "over nvme0n1", "no CPU → hw queue mapping"):
        assert words in dev.mapping_note


def test_md_raid_has_no_mapping(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.block("sys/devices/virtual/block/md0", "9:0")
    (tmp_path / "sys/devices/virtual/block/md0/md").mkdir()
    dev = BlockDevice.resolve("/dev/md0", tmp_path, dev_of=fs.dev_of)
    assert dev.hw_queues == [] and "md RAID" in (dev.mapping_note or "")


def test_tmpfs_file_has_no_block_device(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.write("proc/self/mountinfo",
             "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
             "45 27 0:45 / /run/vm rw,nosuid - tmpfs tmpfs rw,size=1024k")
    fs.devs["/run/vm/disk.img"] = (0, 45, False)
    dev = BlockDevice.resolve("/run/vm/disk.img", tmp_path, dev_of=fs.dev_of)
    assert dev.disk is None and dev.hw_queues == [] and dev.numa_node is None
    assert "on a tmpfs filesystem with no block device behind it" in (dev.mapping_note or "")
    assert "0:45" in (dev.mapping_note or "")


def test_major_0_without_mountinfo_still_explains(tmp_path: Path) -> None:
    dev = BlockDevice.resolve("/mnt/nfs/disk.img", tmp_path,
                              dev_of=lambda p: (0, 52, False))
    assert "no block device behind it" in (dev.mapping_note or "")


def test_btrfs_anonymous_device_uses_the_mount_source(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.host(16, smt=True, nodes=[NODE0, NODE1])
    fs.nvme(blk_mq_map(8, [parse_cpulist(NODE0), parse_cpulist(NODE1)], SIBLING16))
    fs.write("proc/self/mountinfo", "30 1 0:31 /@home /home rw - btrfs /dev/nvme0n1p1 rw,ssd")
    fs.devs["/home/u/vm.img"] = (0, 31, False)
    dev = BlockDevice.resolve("/home/u/vm.img", tmp_path, dev_of=fs.dev_of)
    assert (dev.disk, dev.partition) == ("nvme0n1", "nvme0n1p1") and len(dev.hw_queues) == 8
    assert "mount source /dev/nvme0n1p1" in (dev.mapping_note or "")


def test_loop_device_with_mq_maps_and_has_no_numa_node(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.block("sys/devices/virtual/block/loop0", "7:0", hw_queues=[[0, 1]])
    dev = BlockDevice.resolve("/dev/loop0", tmp_path, dev_of=fs.dev_of)
    assert dev.hw_queues[0].cpus == (0, 1) and dev.numa_node is None and dev.mapping_note is None


def test_bio_based_device_without_mq(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.block("sys/devices/virtual/block/zram0", "253:0")
    dev = BlockDevice.resolve("/dev/zram0", tmp_path, dev_of=fs.dev_of)
    assert "zram0 has no blk-mq hw queues" in (dev.mapping_note or "")


def test_numa_node_minus_one_is_unknown(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.nvme([[0], [1]], numa_node=-1)
    dev = BlockDevice.resolve("/dev/nvme0n1", tmp_path, dev_of=fs.dev_of)
    assert dev.numa_node is None and len(dev.hw_queues) == 2


def test_nvme_multipath_head_uses_a_path_s_queues(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.write(f"{PCI}/numa_node", "0")
    path_dir = f"{PCI}/nvme/nvme0/nvme0c0n1"
    fs.write(f"{path_dir}/dev", "")
    for i in range(4):
        fs.write(f"{path_dir}/mq/{i}/cpu_list", str(i))
    fs.link(f"{path_dir}/device", f"{PCI}/nvme/nvme0")
    head = "sys/devices/virtual/nvme-subsystem/nvme-subsys0/nvme0n1"
    fs.block(head, "259:0")
    fs.link(f"{head}/multipath/nvme0c0n1", path_dir)
    dev = BlockDevice.resolve("/dev/nvme0n1", tmp_path, dev_of=fs.dev_of)
    assert len(dev.hw_queues) == 4 and dev.numa_node == 0
    assert "multipath" in (dev.mapping_note or "")


def test_missing_disk_and_null_disk(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="disk '/nope' does not exist"):
        BlockDevice.resolve("/nope", tmp_path, dev_of=FakeSysfs(tmp_path).dev_of)
    dev = BlockDevice.resolve("null:4G", tmp_path)
    assert dev.hw_queues == [] and "null disk" in (dev.mapping_note or "")


# ---- placement --------------------------------------------------------------------------------


@pytest.mark.parametrize("hwqs", [4, 8, 64])
def test_per_queue_threads_get_distinct_hw_queues_local_first(tmp_path: Path, hwqs: int) -> None:
    topo, dev = two_node_host(tmp_path, hwqs)
    queues = min(hwqs, 8)
    p = plan(topo, dev, queues)
    assert_consistent(p, topo, dev)
    assert [r.thread_name for r in p.rows] == [f"dp-vq{i}" for i in range(queues)]
    cpus = [r.host_cpu for r in p.rows]
    assert len(set(cpus)) == queues
    assert len({r.hw_queue for r in p.rows}) == queues          # the point of the design
    local = [r for r in p.rows if r.numa_node == 1]
    local_hwqs = {dev.hw_queue_of(c) for c in parse_cpulist(NODE1)}
    assert len(local) == min(queues, len(local_hwqs))           # every local hw queue is used
    assert p.rows[0].numa_node == 1 and "(device-local)" in p.rows[0].reason


def test_reason_reads_like_the_design(tmp_path: Path) -> None:
    topo, dev = two_node_host(tmp_path, 16)
    p = plan(topo, dev, 4, vcpu_cpus=[0, 1])
    row = p.rows[0]
    assert row.reason == (f"cpu {row.host_cpu}: hw queue {row.hw_queue} (not used by another thread),"
                          " NUMA node 1 (device-local), not a vCPU CPU, no I/O thread on SMT sibling"
                          f" {row.host_cpu + 8}")


def test_8_hw_queues_8_threads_use_every_core_once(tmp_path: Path) -> None:
    topo, dev = two_node_host(tmp_path, 8)
    p = plan(topo, dev, 8)
    assert not siblings_used_twice(p, topo)
    assert [r.host_cpu for r in p.rows] == [4, 5, 6, 7, 0, 1, 2, 3]
    assert any("4 of 8 thread(s) run off the device's NUMA node 1" in n for n in p.notes)


def test_numa_locality_beats_smt_when_hw_queues_are_distinct_either_way(tmp_path: Path) -> None:
    topo, dev = two_node_host(tmp_path, 64)   # one hw queue per CPU
    p = plan(topo, dev, 8)
    assert sorted(r.host_cpu for r in p.rows) == parse_cpulist(NODE1)
    assert "SMT sibling of dp-vq0 on 4" in p.rows[4].reason


def test_smt_siblings_avoided_on_one_node(tmp_path: Path) -> None:
    topo, dev = one_node_host(tmp_path, 16, 16, smt=True)
    p = plan(topo, dev, 8)
    assert sorted(r.host_cpu for r in p.rows) == list(range(8))
    assert not siblings_used_twice(p, topo)
    assert "(device-local)" in p.rows[0].reason


def test_64_hw_queues_on_8_cpus(tmp_path: Path) -> None:
    topo, dev = one_node_host(tmp_path, 8, 64)
    assert len(dev.hw_queues) == 8
    p = plan(topo, dev, 8)
    assert_consistent(p, topo, dev)
    assert sorted(r.host_cpu for r in p.rows) == list(range(8))
    assert len({r.hw_queue for r in p.rows}) == 8
    assert not any("round-robin" in n for n in p.notes)


@pytest.mark.parametrize("ncpus, queues", [(16, 64), (8, 64), (8, 9)])
def test_more_queues_than_cpus_share_round_robin(tmp_path: Path, ncpus: int, queues: int) -> None:
    topo, dev = one_node_host(tmp_path, ncpus, 64)
    p = plan(topo, dev, queues)
    assert_consistent(p, topo, dev)
    assert len({r.thread_name for r in p.rows}) == queues
    assert len(set(p.threads().values())) == ncpus
    for i in range(ncpus, queues):
        assert p.rows[i].host_cpu == p.rows[i % ncpus].host_cpu
        assert f"shared with dp-vq{i % ncpus}" in p.rows[i].reason
    assert any(f"{queues} I/O threads but only {ncpus} suitable CPU(s)" in n and "round-robin" in n
               for n in p.notes)


def test_vcpu_cpus_are_avoided(tmp_path: Path) -> None:
    topo, dev = two_node_host(tmp_path, 64)
    p = plan(topo, dev, 8, vcpu_cpus=parse_cpulist("4-7"))
    cpus = [r.host_cpu for r in p.rows]
    assert not set(cpus) & {4, 5, 6, 7}
    assert cpus[:4] == [12, 13, 14, 15]        # the local CPUs left over
    assert all("not a vCPU CPU" in r.reason for r in p.rows)
    assert any("kept off vCPU CPUs 4-7" in n for n in p.notes)


def test_isolated_and_vcpu_cpus_push_threads_off_node_rather_than_onto_them(tmp_path: Path) -> None:
    topo, dev = two_node_host(tmp_path, 8, isolated="12-15")
    p = plan(topo, dev, 8, vcpu_cpus=[4, 5, 6, 7])
    cpus = [r.host_cpu for r in p.rows]
    assert sorted(cpus) == parse_cpulist(NODE0)
    assert cpus[:4] == [0, 1, 2, 3]            # a hw queue each before doubling up
    assert all("remote: device on node 1" in r.reason for r in p.rows)
    assert any("kept off vCPU CPUs 4-7 and isolated CPUs 12-15" in n for n in p.notes)
    assert any("only 4 distinct hw queue(s)" in n for n in p.notes)


def test_when_every_cpu_is_reserved_they_are_used_anyway(tmp_path: Path) -> None:
    topo, dev = one_node_host(tmp_path, 4, 4)
    p = plan(topo, dev, 4, vcpu_cpus=range(4))
    assert sorted(r.host_cpu for r in p.rows) == [0, 1, 2, 3]
    assert all("a vCPU CPU (nothing else left)" in r.reason for r in p.rows)
    assert any("share them anyway" in n for n in p.notes)


def test_shared_policy_is_one_thread(tmp_path: Path) -> None:
    topo, dev = two_node_host(tmp_path, 8)
    p = plan(topo, dev, 8, "shared")
    assert_consistent(p, topo, dev)
    assert p.threads() == {"dp-io0": 4}
    assert {r.host_cpu for r in p.rows} == {4}
    assert p.rows[3].reason == "same thread as virtqueue 0 (cpu 4)"
    assert any("virtio-blk-data-plane" in n for n in p.notes)


def test_threads_k_spreads_queues_evenly(tmp_path: Path) -> None:
    topo, dev = two_node_host(tmp_path, 8)
    p = plan(topo, dev, 8, parse_policy("threads=3"))
    assert_consistent(p, topo, dev)
    assert [r.thread_name for r in p.rows] == ["dp-io0"] * 3 + ["dp-io1"] * 3 + ["dp-io2"] * 2
    assert list(p.threads().values()) == [4, 5, 6]
    assert len({dev.hw_queue_of(c) for c in p.threads().values()}) == 3
    assert "2 or 3 consecutive virtqueue(s) each" in p.notes[0]


def test_threads_k_equal_to_queues_places_like_per_queue(tmp_path: Path) -> None:
    topo, dev = two_node_host(tmp_path, 8)
    k = plan(topo, dev, 8, "threads=8")
    per_queue = plan(topo, dev, 8)
    assert [r.host_cpu for r in k.rows] == [r.host_cpu for r in per_queue.rows]
    assert k.rows[7].thread_name == "dp-io7"


def test_threads_k_over_queues_and_zero_queues_are_errors(tmp_path: Path) -> None:
    topo, dev = two_node_host(tmp_path, 8)
    with pytest.raises(ConfigError, match="threads=5: more I/O threads than the 4 virtqueue"):
        plan(topo, dev, 4, "threads=5")
    with pytest.raises(ConfigError, match="queues: expected a positive integer"):
        plan(topo, dev, 0)


def test_no_mapping_still_plans_by_numa_and_smt(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.host(16, smt=True, nodes=[NODE0, NODE1])
    fs.write("proc/self/mountinfo", "45 27 0:45 / /run/vm rw - tmpfs tmpfs rw")
    fs.devs["/run/vm/d.img"] = (0, 45, False)
    topo = Topology.from_sysfs(tmp_path)
    dev = BlockDevice.resolve("/run/vm/d.img", tmp_path, dev_of=fs.dev_of)
    p = plan(topo, dev, 4)
    assert_consistent(p, topo, dev)
    assert [r.host_cpu for r in p.rows] == [0, 1, 2, 3]     # one per core
    assert all(r.hw_queue is None and "no hw queue mapping" in r.reason for r in p.rows)
    assert all("device node unknown" in r.reason for r in p.rows)
    assert dev.mapping_note in p.notes


def test_affinity_is_respected(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.host(16, smt=True, nodes=[NODE0, NODE1])
    fs.nvme(blk_mq_map(16, [parse_cpulist(NODE0), parse_cpulist(NODE1)], SIBLING16))
    topo = Topology.from_sysfs(tmp_path, allowed=range(8))
    dev = BlockDevice.resolve("/dev/nvme0n1", tmp_path, dev_of=fs.dev_of)
    p = plan(topo, dev, 4)
    assert [r.host_cpu for r in p.rows] == [4, 5, 6, 7]


def test_plan_outputs(tmp_path: Path) -> None:
    topo, dev = two_node_host(tmp_path, 4)
    p = plan(topo, dev, 6, "threads=2", vcpu_cpus=[0])
    data = json.loads(p.to_json())
    assert data["policy"] == "threads=2" and data["queues"] == 6
    assert data["device"]["disk"] == "nvme0n1" and data["device"]["numa_node"] == 1
    assert [t["virtqueues"] for t in data["threads"]] == [[0, 1, 2], [3, 4, 5]]
    assert data["rows"][4] == {"vcpu": 4, "virtqueue": 4, "thread": "dp-io1",
                               "host_cpu": p.rows[4].host_cpu, "hw_queue": p.rows[4].hw_queue,
                               "numa_node": p.rows[4].numa_node, "reason": p.rows[4].reason}
    assert data["notes"] == p.notes

    lines = p.to_table().splitlines()
    assert lines[0].startswith("policy threads=2, 6 virtqueues, 2 I/O threads; disk /dev/nvme0n1:"
                               " nvme0n1, 4 hw queues, NUMA node 1")
    header, rows = lines[1], lines[2:8]
    column = header.index("reason")
    for row, plan_row in zip(rows, p.rows, strict=True):
        assert row[column:] == plan_row.reason                   # columns are aligned
        assert row.split()[:4] == [str(plan_row.vcpu), str(plan_row.virtqueue), plan_row.thread_name,
                                   str(plan_row.host_cpu)]
    assert lines[8:] == [f"note: {n}" for n in p.notes]


# ---- this machine -----------------------------------------------------------------------------


def test_real_topology_invariants() -> None:
    topo = Topology.from_sysfs(allowed=os.sched_getaffinity(0))
    assert topo.cpus and topo.cpus == sorted(set(topo.cpus))
    assert set(topo.usable_cpus()) <= os.sched_getaffinity(0) & set(topo.cpus)
    for cpu in topo.cpus:
        assert cpu in topo.siblings[cpu] and topo.siblings[cpu] <= set(topo.cpus)
    in_nodes = [c for cpus in topo.nodes.values() for c in cpus]
    assert len(in_nodes) == len(set(in_nodes)) and set(in_nodes) <= set(topo.cpus)
    assert topo.isolated <= set(topo.cpus)


def test_real_device_of_a_tmp_file(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    topo = Topology.from_sysfs(allowed=os.sched_getaffinity(0))
    dev = BlockDevice.resolve(disk)
    assert dev.hw_queues or dev.mapping_note            # a mapping, or a reason why not
    assert len({q.index for q in dev.hw_queues}) == len(dev.hw_queues)
    for q in dev.hw_queues:
        assert q.cpus
    assert dev.numa_node is None or dev.numa_node >= 0
    queues = len(topo.usable_cpus()) + 1                  # one more than CPUs: forces sharing
    p = plan(topo, dev, queues)
    assert_consistent(p, topo, dev)
    assert set(p.threads().values()) <= set(topo.usable_cpus())
    assert len(p.to_table().splitlines()) >= queues + 2
