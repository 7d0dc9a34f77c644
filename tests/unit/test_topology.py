"""Topology discovery and placement on synthetic sysfs trees built in tmp_path (NVMe with 4, 8
and 64 hw queues, 2 NUMA nodes, SMT pairs, partitions, device-mapper, tmpfs), plus this
machine's real tree, where only invariants are checked (the machine differs between runs).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from dataplane.errors import ConfigError
from dataplane.placement import (
    BlockDevice,
    DeviceInfo,
    Plan,
    Policy,
    Topology,
    format_cpulist,
    iopoll_unsupported,
    parse_cpulist,
    parse_policy,
    plan,
)

# ---- building fake sysfs trees ----------------------------------------------------------------

PCI = "sys/devices/pci0000:00/0000:00:04.0"
NVME_DISK = f"{PCI}/nvme/nvme0/nvme0n1"
VIRTIO_PCI = "sys/devices/pci0000:00/0000:00:02.0"
VIRTIO_DISK = f"{VIRTIO_PCI}/virtio1/block/vda"


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

    def virtio_blk(self, hw_queues: list[list[int]]) -> None:
        """vda (254:0) as on a QEMU guest: block/vda under virtio1 under PCI function 0000:00:02.0,
        which owns the MSI-X vectors (see irq())."""
        self.write(f"{VIRTIO_PCI}/numa_node", "-1")
        self.write(f"{VIRTIO_PCI}/virtio1/uevent", "")
        self.block(VIRTIO_DISK, "254:0", hw_queues=hw_queues, device_link=f"{VIRTIO_PCI}/virtio1")

    def irq(self, function: str, n: int, actions: str | None, effective: str | None = None,
            smp: str | None = None) -> None:
        """MSI-X vector n of a PCI function: msi_irqs/<n>, /sys/kernel/irq/<n>/actions and the
        /proc/irq/<n> affinity lists (each left out when None)."""
        self.write(f"{function}/msi_irqs/{n}", "msix")
        if actions is not None:
            self.write(f"sys/kernel/irq/{n}/actions", actions)
        if effective is not None:
            self.write(f"proc/irq/{n}/effective_affinity_list", effective)
        if smp is not None:
            self.write(f"proc/irq/{n}/smp_affinity_list", smp)

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


def multipath_head(fs: FakeSysfs, cpu_lists: list[str]) -> None:
    """/dev/nvme0n1 as a native-multipath head over one path, nvme0c0n1, with these hw queues."""
    fs.write(f"{PCI}/numa_node", "0")
    path_dir = f"{PCI}/nvme/nvme0/nvme0c0n1"
    fs.write(f"{path_dir}/dev", "")
    for i, cpus in enumerate(cpu_lists):
        fs.write(f"{path_dir}/mq/{i}/cpu_list", cpus)
    fs.link(f"{path_dir}/device", f"{PCI}/nvme/nvme0")
    head = "sys/devices/virtual/nvme-subsystem/nvme-subsys0/nvme0n1"
    fs.block(head, "259:0")
    fs.link(f"{head}/multipath/nvme0c0n1", path_dir)


def test_nvme_multipath_head_uses_a_path_s_queues(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    multipath_head(fs, ["0", "1", "2", "3"])
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


# ---- completion interrupts --------------------------------------------------------------------


def virtio_host(tmp_path: Path, ncpus: int = 2, hw_queues: list[list[int]] | None = None,
                vectors: dict[int, tuple[str, str]] | None = None) -> tuple[Topology, DeviceInfo]:
    """One node of ncpus, a virtio-blk vda; vectors: IRQ → (action name, effective CPUs). The
    default is this VM's: one hw queue on CPUs 0-1, IRQ 36 virtio1-req.0 delivered to CPU 1."""
    fs = FakeSysfs(tmp_path)
    fs.host(ncpus, nodes=[f"0-{ncpus - 1}"])
    fs.virtio_blk(hw_queues or [list(range(ncpus))])
    all_cpus = f"0-{ncpus - 1}"
    for n, (name, effective) in (vectors or {35: ("virtio1-config", "0"),
                                              36: ("virtio1-req.0", "1")}).items():
        fs.irq(VIRTIO_PCI, n, name, effective, all_cpus)
    return (Topology.from_sysfs(tmp_path),
            BlockDevice.resolve("/dev/vda", tmp_path, dev_of=fs.dev_of))


def test_virtio_blk_queue_interrupt_is_read_from_the_pci_function(tmp_path: Path) -> None:
    _, dev = virtio_host(tmp_path)
    assert dev.disk == "vda" and dev.hw_queues[0].cpus == (0, 1)
    assert dev.hw_queues[0].irqs == (36,) and dev.hw_queues[0].irq_cpus == (1,)   # config 35 skipped
    assert dev.irq_cpus_of(0) == (1,) and dev.irq_cpus_of(None) == ()
    assert dev.irq_note is None
    assert dev.to_dict()["hw_queues"] == [{"index": 0, "cpus": [0, 1], "irqs": [36], "irq_cpus": [1]}]


def test_one_queue_goes_to_the_cpu_that_takes_the_interrupt(tmp_path: Path) -> None:
    topo, dev = virtio_host(tmp_path)
    p = plan(topo, dev, 1)
    assert_consistent(p, topo, dev)
    assert p.threads() == {"dp-vq0": 1}          # not cpu 0, which wins the tie without IRQ info
    assert p.rows[0].reason == ("cpu 1: hw queue 0 (not used by another thread), takes hw queue 0's"
                                " completion interrupt, NUMA node 0 (the only node)")
    data = json.loads(p.to_json())
    assert data["device"]["hw_queues"][0]["irq_cpus"] == [1] and data["device"]["irq_note"] is None


def test_two_queues_on_one_hw_queue_still_use_both_cpus(tmp_path: Path) -> None:
    topo, dev = virtio_host(tmp_path)
    p = plan(topo, dev, 2)
    assert_consistent(p, topo, dev)
    assert p.threads() == {"dp-vq0": 1, "dp-vq1": 0}
    assert "goes to cpu 1 (dp-vq0 runs on 1)" in p.rows[1].reason
    assert any("1 of 2 thread(s) run on a CPU that does not take their hw queue's completion"
               " interrupt" in n for n in p.notes)


def test_virtio_queue_names_pick_the_interrupt_cpu_of_each_hw_queue(tmp_path: Path) -> None:
    vectors = {40: ("virtio1-config", "0"), 41: ("virtio1-req.0", "1"), 42: ("virtio1-req.1", "3")}
    topo, dev = virtio_host(tmp_path, 4, [[0, 1], [2, 3]], vectors)
    assert [q.irq_cpus for q in dev.hw_queues] == [(1,), (3,)]
    p = plan(topo, dev, 2)
    assert [r.host_cpu for r in p.rows] == [1, 3]   # without interrupts: 0 and 2
    assert [r.hw_queue for r in p.rows] == [0, 1]


def nvme_with_vectors(tmp_path: Path, vectors: dict[int, tuple[str | None, str | None]],
                      nqueues: int = 4, *, proc_irq: bool = True) -> tuple[FakeSysfs, Topology, DeviceInfo]:
    """two_node_host's NVMe with MSI-X vectors IRQ → (actions, effective CPUs) on its PCI function
    (smp_affinity_list: every CPU). With 4 hw queues blk-mq gives 0,1,8,9 / 2,3,10,11 (node 0)
    and 4,5,12,13 / 6,7,14,15 (node 1)."""
    fs = FakeSysfs(tmp_path)
    fs.host(16, smt=True, nodes=[NODE0, NODE1])
    fs.nvme(blk_mq_map(nqueues, [parse_cpulist(NODE0), parse_cpulist(NODE1)], SIBLING16))
    for n, (actions, effective) in vectors.items():
        fs.irq(PCI, n, actions, effective if proc_irq else None, "0-15" if proc_irq else None)
    return (fs, Topology.from_sysfs(tmp_path),
            BlockDevice.resolve("/dev/nvme0n1", tmp_path, dev_of=fs.dev_of))


# Managed vectors: q<i+1>'s interrupt goes to one CPU of hw queue i's cpu_list, here not the lowest.
NVME_VECTORS: dict[int, tuple[str | None, str | None]] = {
    50: ("nvme0q0", "4"), 51: ("nvme0q1", "9"), 52: ("nvme0q2", "11"), 53: ("nvme0q3", "13"),
    54: ("nvme0q4", "15")}


@pytest.mark.parametrize("vectors", [
    NVME_VECTORS,
    # the admin queue sharing its vector with I/O queue 1, as with one vector to spare
    {50: ("nvme0q0,nvme0q1", "9"), 52: ("nvme0q2", "11"), 53: ("nvme0q3", "13"),
     54: ("nvme0q4", "15")},
])
def test_nvme_threads_land_on_the_interrupt_cpus(tmp_path: Path, vectors) -> None:
    _, topo, dev = nvme_with_vectors(tmp_path, vectors)
    assert [q.irq_cpus for q in dev.hw_queues] == [(9,), (11,), (13,), (15,)]   # admin q0 skipped
    assert dev.irq_note is None
    p = plan(topo, dev, 4)
    assert_consistent(p, topo, dev)
    assert [r.host_cpu for r in p.rows] == [13, 15, 9, 11]    # local hw queues first, as before
    for r in p.rows:
        assert f"takes hw queue {r.hw_queue}'s completion interrupt" in r.reason
    assert not any("completion interrupt" in n for n in p.notes)


def test_interrupt_cpu_is_preferred_to_the_device_node(tmp_path: Path) -> None:
    """A vCPU holds hw queue 2's interrupt CPU 13: the queues whose interrupt CPUs are free
    come first, even off-node, then the leftover local CPU (see plan()'s docstring)."""
    _, topo, dev = nvme_with_vectors(tmp_path, NVME_VECTORS)
    p = plan(topo, dev, 4, vcpu_cpus=[13])
    assert [r.host_cpu for r in p.rows] == [15, 9, 11, 4]
    assert "hw queue 2's completion interrupt goes to cpu 13 (13 is a vCPU CPU)" in p.rows[3].reason
    assert "(device-local)" in p.rows[3].reason


def test_without_proc_irq_the_plan_is_unchanged(tmp_path: Path) -> None:
    _, topo, dev = nvme_with_vectors(tmp_path / "a", NVME_VECTORS, proc_irq=False)
    before_topo, before_dev = two_node_host(tmp_path / "b", 4)
    assert all(q.irq_cpus == () for q in dev.hw_queues)
    p, before = plan(topo, dev, 4), plan(before_topo, before_dev, 4)
    assert [r.host_cpu for r in p.rows] == [r.host_cpu for r in before.rows] == [4, 6, 0, 2]
    assert [r.reason for r in p.rows] == [r.reason for r in before.rows]
    assert dev.irq_note is not None and dev.irq_note in p.notes
    assert ("no /proc/irq/<n>/effective_affinity_list or smp_affinity_list for IRQs 51, 52, 53, 54"
            in dev.irq_note)
    assert dev.irq_note.endswith("not used for placement")


def test_no_vectors_at_all_changes_nothing_and_says_so(tmp_path: Path) -> None:
    topo, dev = two_node_host(tmp_path, 4)
    assert "0000:00:04.0 lists no MSI/MSI-X vector or legacy IRQ" in (dev.irq_note or "")
    assert [r.host_cpu for r in plan(topo, dev, 4).rows] == [4, 6, 0, 2]


def test_virtual_device_has_no_interrupt_note(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.block("sys/devices/virtual/block/loop0", "7:0", hw_queues=[[0, 1]])
    dev = BlockDevice.resolve("/dev/loop0", tmp_path, dev_of=fs.dev_of)
    assert dev.irq_note is None and dev.hw_queues[0].irq_cpus == ()


@pytest.mark.parametrize("effective, smp, cpus, said", [
    ("zz", "9", (9,), "ignored /proc/irq/51/effective_affinity_list 'zz' (not a CPU list)"),
    ("", "9", (9,), "ignored /proc/irq/51/effective_affinity_list: empty"),
    ("99999999", "", (), "ignored /proc/irq/51/smp_affinity_list: empty"),
    ("1-x", None, (), "ignored /proc/irq/51/effective_affinity_list '1-x'"),
])
def test_garbage_affinity_is_ignored_with_a_note(tmp_path: Path, effective, smp, cpus, said) -> None:
    fs, _, _ = nvme_with_vectors(tmp_path, NVME_VECTORS)
    fs.write("proc/irq/51/effective_affinity_list", effective)
    if smp is None:
        (tmp_path / "proc/irq/51/smp_affinity_list").unlink()
    else:
        fs.write("proc/irq/51/smp_affinity_list", smp)
    topo = Topology.from_sysfs(tmp_path)
    dev = BlockDevice.resolve("/dev/nvme0n1", tmp_path, dev_of=fs.dev_of)
    assert dev.hw_queues[0].irq_cpus == cpus
    assert [q.irq_cpus for q in dev.hw_queues[1:]] == [(11,), (13,), (15,)]   # the others still count
    assert said in (dev.irq_note or "")
    p = plan(topo, dev, 4)
    assert_consistent(p, topo, dev)
    assert dev.irq_note in p.notes


def test_smp_affinity_fallback_may_name_several_cpus(tmp_path: Path) -> None:
    fs, _, _ = nvme_with_vectors(tmp_path, NVME_VECTORS)
    (tmp_path / "proc/irq/51/effective_affinity_list").unlink()    # an older kernel
    fs.write("proc/irq/51/smp_affinity_list", "8-9")
    topo = Topology.from_sysfs(tmp_path)
    dev = BlockDevice.resolve("/dev/nvme0n1", tmp_path, dev_of=fs.dev_of)
    assert dev.hw_queues[0].irq_cpus == (8, 9) and dev.irq_note is None
    row = plan(topo, dev, 4).rows[2]
    assert row.host_cpu == 8 and row.hw_queue == 0
    assert "one of the CPUs hw queue 0's completion interrupt may go to (8-9)" in row.reason


def test_garbage_names_and_entries_never_raise(tmp_path: Path) -> None:
    fs, _, _ = nvme_with_vectors(tmp_path, {
        50: ("\x00\x01", "4"), 51: ("", "9"), 52: ("???", "zz"), 53: ("nvme0qX", "13")})
    fs.write(f"{PCI}/msi_irqs/notanumber", "msix")
    fs.write("sys/kernel/irq/53/actions", "")
    (tmp_path / "sys/kernel/irq/54").mkdir(parents=True)     # a directory with no actions file
    fs.write(f"{PCI}/msi_irqs/54", "msix")
    topo = Topology.from_sysfs(tmp_path)
    dev = BlockDevice.resolve("/dev/nvme0n1", tmp_path, dev_of=fs.dev_of)
    assert all(q.irq_cpus == () for q in dev.hw_queues)
    note = dev.irq_note or ""
    assert "ignored 0000:00:04.0/msi_irqs entries that are no IRQ number: 'notanumber'" in note
    assert note.endswith("not used for placement")
    assert [r.host_cpu for r in plan(topo, dev, 4).rows] == [4, 6, 0, 2]


def test_unknown_names_match_in_order_when_the_counts_agree(tmp_path: Path) -> None:
    _, _, dev = nvme_with_vectors(tmp_path, {60: ("foo-a", "9"), 61: ("foo-b", "11"),
                                             62: ("foo-c", "13"), 63: ("foo-d", "15")})
    assert [(q.irqs, q.irq_cpus) for q in dev.hw_queues] == [((60,), (9,)), ((61,), (11,)),
                                                             ((62,), (13,)), ((63,), (15,))]
    assert "matched its 4 vector(s) to its 4 hw queue(s) in order" in (dev.irq_note or "")


def test_unknown_names_on_the_same_cpus_serve_every_queue(tmp_path: Path) -> None:
    _, topo, dev = nvme_with_vectors(tmp_path, {60: ("ahci0", "6"), 61: ("ahci1", "6")})
    assert all(q.irq_cpus == (6,) for q in dev.hw_queues)
    assert "all go to cpu 6: used for every hw queue" in (dev.irq_note or "")
    assert plan(topo, dev, 1).rows[0].host_cpu == 6


def test_ambiguous_unknown_names_record_nothing(tmp_path: Path) -> None:
    _, _, dev = nvme_with_vectors(tmp_path, {60: ("foo-a", "9"), 61: ("foo-b", "11")})
    assert all(q.irq_cpus == () and q.irqs == () for q in dev.hw_queues)
    assert "cannot tell which of IRQs 60, 61 serve which of its 4 hw queues" in (dev.irq_note or "")
    assert (dev.irq_note or "").endswith("not used for placement")


def test_names_from_proc_interrupts_without_sys_kernel_irq(tmp_path: Path) -> None:
    fs, _, _ = nvme_with_vectors(tmp_path, {n: (None, e) for n, (_, e) in NVME_VECTORS.items()})
    fs.write("proc/interrupts", "\n".join([
        "           CPU0       CPU1",
        " 50:          1          0  IR-PCI-MSIX-0000:00:04.0    0-edge      nvme0q0",
        " 51:          0        100  IR-PCI-MSIX-0000:00:04.0    1-edge      nvme0q1",
        " 52:          0        100  IR-PCI-MSIX-0000:00:04.0    2-edge      nvme0q2",
        " 53:          0        100  IR-PCI-MSIX-0000:00:04.0    3-edge      nvme0q3, other",
        " 54:          0        100  IR-PCI-MSIX-0000:00:04.0    4-edge      nvme0q4",
        "NMI:          0          0   Non-maskable interrupts"]))
    dev = BlockDevice.resolve("/dev/nvme0n1", tmp_path, dev_of=fs.dev_of)
    assert [q.irq_cpus for q in dev.hw_queues] == [(9,), (11,), (13,), (15,)]
    assert dev.irq_note is None


def test_legacy_intx_line_serves_the_only_queue(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.host(2, nodes=["0-1"])
    fs.virtio_blk([[0, 1]])
    fs.write(f"{VIRTIO_PCI}/irq", "11")
    fs.write("sys/kernel/irq/11/actions", "virtio1")
    fs.write("proc/irq/11/effective_affinity_list", "1")
    dev = BlockDevice.resolve("/dev/vda", tmp_path, dev_of=fs.dev_of)
    assert dev.hw_queues[0].irqs == (11,) and dev.hw_queues[0].irq_cpus == (1,)


def test_nvme_multipath_head_uses_the_interrupts_of_its_path(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    multipath_head(fs, ["0, 1", "2, 3"])
    for n, (name, eff) in {50: ("nvme0q0", "0"), 51: ("nvme0q1", "1"), 52: ("nvme0q2", "3")}.items():
        fs.irq(PCI, n, name, eff)
    dev = BlockDevice.resolve("/dev/nvme0n1", tmp_path, dev_of=fs.dev_of)
    assert [q.irq_cpus for q in dev.hw_queues] == [(1,), (3,)]


def _real_queue_irq_cpus(disk: str) -> dict[int, set[int]]:
    """hw queue → effective CPUs of its vector, read here without topology.py's help."""
    try:
        here = Path(f"/sys/block/{disk}/device").resolve(strict=True)
    except OSError:
        return {}
    while here != here.parent and not (here / "msi_irqs").is_dir():
        here = here.parent
    out: dict[int, set[int]] = {}
    for entry in (here / "msi_irqs").iterdir() if (here / "msi_irqs").is_dir() else []:
        try:
            actions = Path(f"/sys/kernel/irq/{entry.name}/actions").read_text()
            effective = Path(f"/proc/irq/{entry.name}/effective_affinity_list").read_text()
        except OSError:
            continue
        for name in actions.strip().split(","):
            m = re.fullmatch(r"virtio\d+-req\.(\d+)", name) or re.fullmatch(r"nvme\d+q([1-9]\d*)", name)
            if m and effective.strip():
                index = int(m.group(1)) - (1 if name.startswith("nvme") else 0)
                out[index] = set(parse_cpulist(effective))
    return out


def test_real_plan_follows_the_completion_interrupt() -> None:
    """On this machine (a VM whose vda's interrupt goes to CPU 1) dp-vq0 must sit where its hw
    queue's interrupt is delivered."""
    for where in ("/work", "/"):
        if os.path.exists(where):
            break
    dev = BlockDevice.resolve(where)
    if not dev.disk or not dev.hw_queues:
        pytest.skip(f"{where} has no blk-mq disk behind it")
    expected = _real_queue_irq_cpus(dev.disk)
    if not expected:
        pytest.skip(f"the completion interrupts of {dev.disk} are not readable here")
    topo = Topology.from_sysfs(allowed=os.sched_getaffinity(0))
    if not set().union(*expected.values()) & (set(topo.usable_cpus()) - topo.isolated):
        pytest.skip("no interrupt CPU is usable by this process")
    for q in dev.hw_queues:
        if q.index in expected:
            assert set(q.irq_cpus) == expected[q.index]
    p = plan(topo, dev, 1)
    assert_consistent(p, topo, dev)
    row = p.rows[0]
    assert row.host_cpu in expected[row.hw_queue], (row, expected)
    assert "takes hw queue" in row.reason


def test_iopoll_needs_a_device_with_poll_queues(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.host(16, smt=True, nodes=[NODE0, NODE1])
    fs.nvme(blk_mq_map(8, [parse_cpulist(NODE0), parse_cpulist(NODE1)], SIBLING16))
    fs.devs["/srv/vm/disk.img"] = (259, 1, False)   # a file on nvme0n1p1
    fs.write(f"{NVME_DISK}/queue/io_poll", "0")
    why = iopoll_unsupported("/srv/vm/disk.img", "none", tmp_path, fs.dev_of)
    assert why == ("nvme0n1 has no poll queues: /sys/block/nvme0n1/queue/io_poll is 0 (NVMe polls only "
                   "with the nvme driver's poll_queues=N)")
    fs.write(f"{NVME_DISK}/queue/io_poll", "1")
    assert iopoll_unsupported("/srv/vm/disk.img", "none", tmp_path, fs.dev_of) is None
    assert iopoll_unsupported("/dev/nvme0n1p1", "none", tmp_path, fs.dev_of) is None
    assert "O_DIRECT" in iopoll_unsupported("/dev/nvme0n1", "writeback", tmp_path, fs.dev_of)
    assert "not a block device" in iopoll_unsupported("null:1G", "none", tmp_path, fs.dev_of)
    assert "not a block device" in iopoll_unsupported("rbd:pool/img,conf=x", "none", tmp_path, fs.dev_of)
