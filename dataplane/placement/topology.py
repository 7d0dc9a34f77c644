"""Host topology from sysfs: CPUs, SMT siblings, NUMA nodes, isolated CPUs, and the backing
device's blk-mq hardware queues with the CPUs that take each one's completion interrupt.
The planner (placement.planner) turns it into a plan.

Pure data and pure functions: every sysfs read takes a `root` (tests build fake trees), every
stat goes through an injectable `dev_of`, and nothing here pins a thread.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError

MAX_CPUS = 8192   # the kernel's largest NR_CPUS; bounds "0-99999999" typed by mistake

# ---------------------------------------------------------------------------------------------
# CPU lists


def parse_cpulist(text: str, *, what: str = "CPU list") -> list[int]:
    """'0-3,8-11' (sysfs cpulist) or '0, 1, 2' (blk-mq cpu_list) → sorted, distinct CPU numbers.

    An empty or blank list is valid (sysfs writes "\\n" for "no CPU"). Raises ConfigError.
    """
    cpus: set[int] = set()
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"bad {what} {text.strip()!r}: {part!r} is not a CPU number or a "
                              "range (expected e.g. 0-3,8)")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise ConfigError(f"bad {what} {text.strip()!r}: range {part!r} runs backwards")
        if last >= MAX_CPUS:
            raise ConfigError(f"bad {what} {text.strip()!r}: CPU {last} is beyond {MAX_CPUS - 1}")
        cpus.update(range(first, last + 1))
    return sorted(cpus)


def format_cpulist(cpus: Iterable[int]) -> str:
    """[0, 1, 2, 3, 8] → '0-3,8' (the kernel's own notation); '' for no CPU."""
    out: list[str] = []
    run: list[int] = []
    for cpu in sorted(set(cpus)):
        if run and cpu == run[-1] + 1:
            run.append(cpu)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [cpu]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _read_cpulist(path: Path) -> list[int] | None:
    """None when the file is missing or unreadable as a CPU list (the caller degrades)."""
    text = _read(path)
    if text is None:
        return None
    try:
        return parse_cpulist(text, what=str(path))
    except ConfigError:
        return None


# ---------------------------------------------------------------------------------------------
# Host CPUs and NUMA nodes


@dataclass
class Topology:
    """Online CPUs, SMT siblings, cores, packages, NUMA nodes and isolated CPUs of a host."""

    cpus: list[int]                           # online, sorted
    siblings: dict[int, frozenset[int]]       # cpu → its online SMT siblings, itself included
    core_ids: dict[int, int]
    package_ids: dict[int, int]
    nodes: dict[int, list[int]]               # NUMA node → its online CPUs (nodes with CPUs only)
    isolated: frozenset[int] = frozenset()    # isolcpus=: left alone by the scheduler
    allowed: frozenset[int] | None = None     # CPUs this process may run on; None: every online CPU
    notes: list[str] = field(default_factory=list)   # what sysfs lacked and what replaced it

    @classmethod
    def from_sysfs(cls, root: Path = Path("/"), allowed: Iterable[int] | None = None) -> Topology:
        """Read /sys/devices/system/{cpu,node} under `root`. Missing files degrade (with a note):
        no `online` → the cpuN directories; no siblings → no SMT; no node dirs → one node.

        `allowed` (e.g. os.sched_getaffinity(0)) limits the CPUs a plan may pin threads to.
        """
        notes: list[str] = []
        cpu_dir = root / "sys/devices/system/cpu"
        online = _read_cpulist(cpu_dir / "online")
        if online is None:
            online = sorted(int(p.name[3:]) for p in _listdir(cpu_dir) if re.fullmatch(r"cpu\d+", p.name))
            if not online:
                online = list(range(os.cpu_count() or 1)) if root == Path("/") else [0]
            notes.append(f"no {cpu_dir / 'online'}: assuming CPUs {format_cpulist(online)} are online")
        online_set = frozenset(online)

        siblings: dict[int, frozenset[int]] = {}
        core_ids: dict[int, int] = {}
        package_ids: dict[int, int] = {}
        for cpu in online:
            topo = cpu_dir / f"cpu{cpu}" / "topology"
            sib = _read_cpulist(topo / "thread_siblings_list") or _read_cpulist(topo / "core_cpus_list")
            siblings[cpu] = (frozenset(sib) & online_set) | {cpu} if sib else frozenset({cpu})
            core = _read_int(topo / "core_id")
            core_ids[cpu] = core if core is not None else cpu
            package = _read_int(topo / "physical_package_id")
            package_ids[cpu] = package if package is not None and package >= 0 else 0

        nodes: dict[int, list[int]] = {}
        for node_dir in _listdir(root / "sys/devices/system/node"):
            m = re.fullmatch(r"node(\d+)", node_dir.name)
            node_cpus = _read_cpulist(node_dir / "cpulist") if m else None
            if m and node_cpus is not None:
                local = [c for c in node_cpus if c in online_set]
                if local:
                    nodes[int(m.group(1))] = local
        if not nodes:
            nodes = {0: list(online)}
            notes.append("no NUMA information in sysfs: treating the host as one node")
        else:
            stray = online_set - {c for cpus in nodes.values() for c in cpus}
            if stray:
                notes.append(f"CPUs {format_cpulist(stray)} belong to no NUMA node in sysfs")
        nodes = dict(sorted(nodes.items()))

        isolated = frozenset(_read_cpulist(cpu_dir / "isolated") or ()) & online_set
        allowed_set = None
        if allowed is not None:
            allowed_set = frozenset(allowed) & online_set
            outside = online_set - allowed_set
            if outside:
                notes.append(f"CPUs {format_cpulist(outside)} are outside this process's affinity:"
                             " not used")
        return cls(list(online), siblings, core_ids, package_ids, nodes, isolated, allowed_set, notes)

    def node_of(self, cpu: int) -> int | None:
        for node, cpus in self.nodes.items():
            if cpu in cpus:
                return node
        return None

    def siblings_of(self, cpu: int) -> frozenset[int]:
        """The other hardware threads of cpu's core (empty without SMT)."""
        return self.siblings.get(cpu, frozenset({cpu})) - {cpu}

    @property
    def smt(self) -> bool:
        return any(len(s) > 1 for s in self.siblings.values())

    def usable_cpus(self) -> list[int]:
        """Online CPUs this process may run on (all online ones if the affinity leaves none)."""
        if self.allowed:
            return [c for c in self.cpus if c in self.allowed]
        return list(self.cpus)


def _listdir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------
# The backing device and its blk-mq hardware queues


@dataclass(frozen=True)
class HwQueue:
    """One blk-mq hardware context: submissions from `cpus` land on it, and its completions are
    signalled by interrupt vector(s) `irqs`, delivered to `irq_cpus` (both empty: unknown)."""

    index: int
    cpus: tuple[int, ...]
    irqs: tuple[int, ...] = ()
    irq_cpus: tuple[int, ...] = ()


@dataclass
class DeviceInfo:
    """What placement needs to know about the disk behind a path."""

    path: str                                # as given (file, block device node or null:SIZE)
    disk: str | None = None                  # whole-disk name in /sys/block, e.g. nvme0n1
    partition: str | None = None             # the partition in between, e.g. nvme0n1p1
    dev: str | None = None                   # "MAJ:MIN" that was looked up
    sysfs: Path | None = None                # the disk's sysfs directory
    hw_queues: list[HwQueue] = field(default_factory=list)
    numa_node: int | None = None             # None: unknown (sysfs says -1, or no device link)
    mapping_note: str | None = None          # why the CPU → hw queue mapping is missing or indirect
    irq_note: str | None = None              # what was odd or missing about its completion interrupts

    def hw_queue_of(self, cpu: int) -> int | None:
        """The hw queue a submission from cpu lands on. With poll or read queues a CPU is listed
        in several contexts; the default map comes first, and it is the one io_uring uses."""
        for q in self.hw_queues:
            if cpu in q.cpus:
                return q.index
        return None

    def irq_cpus_of(self, hwq: int | None) -> tuple[int, ...]:
        """The CPUs hw queue hwq's completion interrupt is delivered to; () when unknown."""
        for q in self.hw_queues:
            if q.index == hwq:
                return q.irq_cpus
        return ()

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "disk": self.disk, "partition": self.partition, "dev": self.dev,
                "numa_node": self.numa_node,
                "hw_queues": [{"index": q.index, "cpus": list(q.cpus), "irqs": list(q.irqs),
                               "irq_cpus": list(q.irq_cpus)} for q in self.hw_queues],
                "mapping_note": self.mapping_note, "irq_note": self.irq_note}


DevOf = Callable[[str], tuple[int, int, bool]]

# Filesystems whose mount source names no local block device even when it starts with /dev/.
_NO_BLOCK_FS = {"tmpfs", "ramfs", "overlay", "nfs", "nfs4", "cifs", "smb3", "9p", "virtiofs", "fuse",
                "proc", "sysfs", "devtmpfs", "squashfs", "ceph", "glusterfs"}


def stat_dev(path: str) -> tuple[int, int, bool]:
    """(major, minor, is_block): a block device node's own number, else its filesystem's."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return os.major(st.st_rdev), os.minor(st.st_rdev), True
    return os.major(st.st_dev), os.minor(st.st_dev), False


@dataclass
class BlockDevice:
    """A disk's directory in sysfs (/sys/devices/.../block/<name>) and what it says."""

    name: str
    sysfs: Path

    @classmethod
    def resolve(cls, path: str | os.PathLike[str], root: Path = Path("/"),
                dev_of: DevOf = stat_dev) -> DeviceInfo:
        """The disk behind `path`: a block device node (a partition resolves to its disk), a
        regular file (the disk of its filesystem), `null:SIZE` or `rbd:POOL/IMAGE`. Never raises
        for a missing mapping (DeviceInfo.mapping_note says why); raises ConfigError if path does
        not exist."""
        spec = os.fspath(path)
        if spec == "null" or spec.startswith("null:"):
            return DeviceInfo(spec, mapping_note="null disk: no I/O reaches a device, so there is no"
                              " hw queue to map; threads are placed by NUMA and SMT only")
        if spec.startswith("rbd:"):
            image = spec[len("rbd:"):].split(",")[0]
            return DeviceInfo(spec, mapping_note=(
                f"RBD image {image}: its I/O goes over the network to Ceph OSDs, there are no local"
                " hw queues to map; threads are placed by CPU, NUMA and SMT only (librbd's own"
                " threads keep the control plane's CPUs)"))
        try:
            major, minor, is_block = dev_of(spec)
        except FileNotFoundError:
            raise ConfigError(f"disk {spec!r} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"disk {spec!r}: {exc.strerror}") from None
        if major != 0:
            return cls._from_dev(spec, major, minor, root)

        # An anonymous device number: tmpfs, overlay, NFS, FUSE... or btrfs, which gives every
        # subvolume one; the mount table then still names the real device.
        fstype, source = _mount_of(root, f"{major}:{minor}")
        dev = f"{major}:{minor}"
        if fstype not in _NO_BLOCK_FS and source.startswith("/dev/"):
            try:
                smajor, sminor, sblock = dev_of(source)
            except OSError:
                sblock = False
            if sblock and smajor != 0:
                info = cls._from_dev(spec, smajor, sminor, root)
                via = (f"{fstype} gives {spec} the anonymous device {dev}; placed for its mount "
                       f"source {source}")
                info.mapping_note = f"{via}; {info.mapping_note}" if info.mapping_note else via
                return info
        kind = f"a {fstype} filesystem" if fstype else "a filesystem"
        return DeviceInfo(spec, dev=dev, mapping_note=(
            f"{spec} is on {kind} with no block device behind it (device {dev}): no CPU → hw queue"
            " mapping; threads are placed by NUMA and SMT only"))

    @classmethod
    def _from_dev(cls, spec: str, major: int, minor: int, root: Path) -> DeviceInfo:
        dev = f"{major}:{minor}"
        link = root / "sys/dev/block" / dev
        if not link.exists():
            return DeviceInfo(spec, dev=dev, mapping_note=(
                f"device {dev} has no {link}: no CPU → hw queue mapping; threads are placed by NUMA"
                " and SMT only"))
        node_dir = link.resolve()
        partition = None
        if (node_dir / "partition").exists():
            partition, node_dir = node_dir.name, node_dir.parent
        bdev = cls(node_dir.name, node_dir)
        info = DeviceInfo(spec, disk=bdev.name, partition=partition, dev=dev, sysfs=node_dir)
        fallback = "no CPU → hw queue mapping; threads are placed by NUMA and SMT only"

        stacked = bdev.stacked_kind()
        if stacked:
            under = bdev.slaves()
            nodes = {s.numa_node() for s in under}
            info.numa_node = nodes.pop() if len(nodes) == 1 else None
            label = f"{bdev.name} ({bdev.dm_name()})" if bdev.dm_name() else bdev.name
            over = f" over {', '.join(s.name for s in under)}" if under else ""
            info.mapping_note = (f"{label} is {stacked}{over}: it remaps I/O onto other devices and"
                                 f" has no hw queues of its own; {fallback}")
            return info

        info.hw_queues = bdev.hw_queues()
        info.numa_node = bdev.numa_node()
        owner = bdev                                  # whose queues (and interrupts) they are
        if not info.hw_queues:
            for path_dev in bdev.multipath_paths():   # native NVMe multipath: the head is bio-based
                queues = path_dev.hw_queues()
                if queues:
                    info.hw_queues = queues
                    owner = path_dev
                    if info.numa_node is None:
                        info.numa_node = path_dev.numa_node()
                    info.mapping_note = (f"{bdev.name} is an NVMe multipath head: using the hw queues"
                                         f" of its path {path_dev.name}")
                    break
        if not info.hw_queues:
            info.mapping_note = (f"{bdev.name} has no blk-mq hw queues (bio-based driver, e.g. zram"
                                 f" or brd): {fallback}")
            return info
        info.hw_queues, info.irq_note = owner.queue_interrupts(info.hw_queues, root)
        return info

    def hw_queues(self) -> list[HwQueue]:
        """mq/<n>/cpu_list, by n. Contexts no CPU maps to (more queues than CPUs) are dropped."""
        queues = []
        for qdir in _listdir(self.sysfs / "mq"):
            if qdir.name.isdigit():
                cpus = _read_cpulist(qdir / "cpu_list")
                if cpus:
                    queues.append(HwQueue(int(qdir.name), tuple(cpus)))
        return sorted(queues, key=lambda q: q.index)

    def queue_interrupts(self, queues: list[HwQueue],
                         root: Path = Path("/")) -> tuple[list[HwQueue], str | None]:
        """`queues` with the IRQs and CPUs of their completion interrupts filled in where they can
        be told, and a note on whatever could not (None when nothing was odd). Never raises.

        The vectors are those of the PCI function above the disk's device (msi_irqs/, else its
        legacy `irq` line); each vector's action names (/sys/kernel/irq/<n>/actions, else
        /proc/interrupts) say which queue it serves: virtio `virtioN-req.<i>` → hw queue i, NVMe
        `nvmeNq<i>` → hw queue i-1 (q0 is the admin queue). Unknown names are matched in order when
        there are exactly as many vectors as hw contexts, or used for every queue when they all go
        to the same CPUs; otherwise nothing is recorded. CPUs come from
        /proc/irq/<n>/effective_affinity_list (where the kernel actually delivers it), else
        smp_affinity_list.
        """
        device = self.sysfs / "device"
        if not queues or not device.exists():
            return queues, None        # a virtual device (loop, null_blk): no interrupt to follow
        try:
            return _QueueIrqs(self, root, device.resolve()).match(queues)
        except (OSError, RuntimeError, ValueError) as exc:   # a broken tree: say so, never fail
            return queues, (f"completion interrupts of {self.name}: unreadable ({exc}); not used"
                            " for placement")

    def numa_node(self) -> int | None:
        """device/numa_node, else the nearest ancestor's (a virtio or NVMe controller has none of
        its own; its PCI function does). -1 means the firmware did not say."""
        device = self.sysfs / "device"
        if not device.exists():
            return None
        here = device.resolve()
        for _ in range(16):
            node = _read_int(here / "numa_node")
            if node is not None:
                return node if node >= 0 else None
            if here.name == "devices" or here.parent == here:
                break
            here = here.parent
        return None

    def stacked_kind(self) -> str | None:
        if (self.sysfs / "dm").is_dir() or self.name.startswith("dm-"):
            return "a device-mapper device"
        if (self.sysfs / "md").is_dir() or re.fullmatch(r"md\d+|md_.*", self.name):
            return "an md RAID device"
        return None

    def dm_name(self) -> str | None:
        text = (_read(self.sysfs / "dm" / "name") or "").strip()
        return text or None

    def slaves(self) -> list[BlockDevice]:
        """The devices under a stacked one (a partition counts as its disk)."""
        out = []
        for link in _listdir(self.sysfs / "slaves"):
            d = link.resolve()
            if (d / "partition").exists():
                d = d.parent
            if all(s.sysfs != d for s in out):
                out.append(BlockDevice(d.name, d))
        return out

    def multipath_paths(self) -> list[BlockDevice]:
        return [BlockDevice(p.name, p.resolve()) for p in _listdir(self.sysfs / "multipath")]


def iopoll_unsupported(spec: str, cache: str = "none", root: Path = Path("/"),
                       dev_of: DevOf = stat_dev) -> str | None:
    """Why IORING_SETUP_IOPOLL cannot poll this disk's completions, or None when it can: polled
    I/O is O_DIRECT I/O to a block device with poll queues (`queue/io_poll` reads 1; an NVMe
    disk has them only when its driver was loaded with poll_queues=N). On a device without
    them the kernel still completes polled I/O, by interrupt, and the polling thread spins for
    nothing, which is why this is checked rather than left to the kernel."""
    if spec == "null" or spec.startswith(("null:", "rbd:")):
        return f"{spec.split(',')[0]} is not a block device: polled I/O goes to a local device"
    if cache != "none":
        return f"--cache {cache}: polled I/O is O_DIRECT I/O (--cache none)"
    info = BlockDevice.resolve(spec, root, dev_of)
    if info.sysfs is None:
        return f"{spec}: no block device behind it to poll ({info.mapping_note})"
    io_poll = _read(info.sysfs / "queue" / "io_poll")
    if io_poll is None:
        return f"{info.disk}: the kernel does not say whether it polls ({info.sysfs}/queue/io_poll)"
    if io_poll.strip() != "1":
        hint = (" (NVMe polls only with the nvme driver's poll_queues=N)"
                if info.disk and info.disk.startswith("nvme") else "")
        return (f"{info.disk} has no poll queues: /sys/block/{info.disk}/queue/io_poll is "
                f"{io_poll.strip()}{hint}")
    return None


def _mount_of(root: Path, dev: str) -> tuple[str, str]:
    """(fstype, source) of the mount with device number dev, from proc/self/mountinfo."""
    text = _read(root / "proc/self/mountinfo") or ""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or fields[2] != dev or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) > sep + 2:
            return fields[sep + 1], fields[sep + 2]
    return "", ""


# ---------------------------------------------------------------------------------------------
# Completion interrupts of a disk's hw queues

_PCI_FUNCTION = re.compile(r"[0-9a-fA-F]{4,}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")
_CONFIG = "config"


def _action_role(name: str) -> int | str | None:
    """The hw queue an interrupt action name serves, _CONFIG for a config or admin vector, None
    when the name is not one this module knows."""
    m = re.fullmatch(r"virtio\d+-(?:req|request)\.(\d+)", name)     # virtio-blk, virtio-scsi
    if m:
        return int(m.group(1))
    m = re.fullmatch(r"nvme\d+q(\d+)", name)      # I/O queue i serves hw context i-1
    if m:
        return int(m.group(1)) - 1 if int(m.group(1)) >= 1 else _CONFIG
    if re.fullmatch(r"virtio\d+-(?:config|control|event)", name):
        return _CONFIG
    return None


def _parse_proc_interrupts(text: str) -> dict[int, list[str]]:
    """IRQ number → action names from /proc/interrupts: the last field, plus the fields before it
    that end in ',' (several handlers on one line read 'nvme0q0, nvme0q1')."""
    lines = text.splitlines()
    if not lines:
        return {}
    ncpus = len(lines[0].split())
    out: dict[int, list[str]] = {}
    for line in lines[1:]:
        head, sep, rest = line.partition(":")
        if not sep or not head.strip().isdecimal():
            continue
        tail = rest.split()[ncpus:]       # chip, hwirq and trigger, then the names
        if len(tail) < 3:
            continue
        names = [tail[-1]]
        i = len(tail) - 2
        while i > 0 and tail[i].endswith(","):
            names.insert(0, tail[i].rstrip(","))
            i -= 1
        out[int(head)] = [n for n in names if n]
    return out


def _irq_list(irqs: Iterable[int]) -> str:
    numbers = sorted(set(irqs))
    return f"IRQ{'s' if len(numbers) != 1 else ''} {', '.join(map(str, numbers))}"


class _QueueIrqs:
    """Matching one disk's interrupt vectors to its hw queues (BlockDevice.queue_interrupts)."""

    def __init__(self, disk: BlockDevice, root: Path, device: Path) -> None:
        self.disk = disk
        self.root = root
        self.device = device               # the resolved device directory, e.g. .../virtio1
        self.problems: list[str] = []
        self.unreadable: list[int] = []       # IRQs without /proc/irq/<n> affinity files
        self._proc_names: dict[int, list[str]] | None = None
        self._affinity: dict[int, tuple[int, ...] | None] = {}

    def match(self, queues: list[HwQueue]) -> tuple[list[HwQueue], str | None]:
        function = self._function()
        if function is None:
            return queues, self._note(f"no PCI function above {self.device.name} in sysfs")
        irqs = self._vectors(function)
        if not irqs:
            return queues, self._note(f"{function.name} lists no MSI/MSI-X vector or legacy IRQ")

        named: dict[int, list[int]] = {}      # hw queue → the vectors whose names serve it
        unknown: list[int] = []               # vectors that serve no known queue and are no config
        for irq in irqs:
            names = self._names(irq)
            if names == []:
                continue                      # no handler: this vector takes no interrupt
            roles = [_action_role(n) for n in names] if names is not None else [None]
            served = [r for r in roles if isinstance(r, int)]
            for q in served:
                named.setdefault(q, []).append(irq)
            if not served and any(r is None for r in roles):
                unknown.append(irq)

        contexts = sorted(int(d.name) for d in _listdir(self.disk.sysfs / "mq") if d.name.isdigit())
        if named:
            assign = named
            missing = [q.index for q in queues if q.index not in named]
            if missing:
                self.problems.append(f"no vector is named for hw queue(s) {format_cpulist(missing)}"
                                     " (polled queues have none)")
        elif unknown and len(unknown) == len(contexts):
            assign = {ctx: [irq] for ctx, irq in zip(contexts, unknown, strict=True)}
            self.problems.append(f"vector names not recognised; matched its {len(unknown)}"
                                 f" vector(s) to its {len(contexts)} hw queue(s) in order")
        elif unknown:
            cpus = {irq: self._cpus(irq) for irq in unknown}
            distinct = set(cpus.values())
            if None in distinct or len(distinct) != 1:
                return queues, self._note(
                    f"cannot tell which of {_irq_list(unknown)} serve which of its {len(contexts)}"
                    " hw queues (names not recognised, CPUs differ or unknown)")
            assign = {q.index: unknown for q in queues}
            self.problems.append(f"vector names not recognised, but {_irq_list(unknown)} all go to"
                                 f" cpu {format_cpulist(distinct.pop() or ())}: used for every hw"
                                 " queue")
        else:
            return queues, self._note(f"{_irq_list(irqs)} of {function.name} are config or admin"
                                      " vectors only")

        out = []
        for q in queues:
            vectors = tuple(sorted(set(assign.get(q.index, ()))))
            known = [self._cpus(irq) for irq in vectors]
            cpus = sorted({c for k in known if k for c in k})
            out.append(replace(q, irqs=vectors, irq_cpus=tuple(cpus)))
        if not any(q.irq_cpus for q in out):
            return out, self._note("")
        return out, self._note("", final=False)

    def _note(self, problem: str, *, final: bool = True) -> str | None:
        """The problems so far (and `problem`), and, when final, that interrupts are not used."""
        parts = list(self.problems)
        if self.unreadable:
            parts.append(f"no /proc/irq/<n>/effective_affinity_list or smp_affinity_list for"
                         f" {_irq_list(self.unreadable)}")
        parts += [problem] if problem else []
        if final:
            parts.append("not used for placement")
        elif not parts:
            return None
        return f"completion interrupts of {self.disk.name}: " + "; ".join(parts)

    def _function(self) -> Path | None:
        """The nearest directory at or above the device that owns its interrupt vectors: one with
        msi_irqs/, or a PCI function (virtio-blk: virtio1 → 0000:00:02.0; NVMe: nvme0 → nvme →
        its PCI function)."""
        here = self.device
        for _ in range(16):
            if (here / "msi_irqs").is_dir() or _PCI_FUNCTION.fullmatch(here.name):
                return here
            if here.name == "devices" or here == self.root or here.parent == here:
                return None
            here = here.parent
        return None

    def _vectors(self, function: Path) -> list[int]:
        entries = [p.name for p in _listdir(function / "msi_irqs")]
        irqs = sorted(int(n) for n in entries if n.isdecimal())
        odd = [n for n in entries if not n.isdecimal()]
        if odd:
            self.problems.append(f"ignored {function.name}/msi_irqs entries that are no IRQ number:"
                                 f" {', '.join(repr(n) for n in odd[:3])}")
        if irqs:
            return irqs
        text = _read(function / "irq")                 # no MSI: the legacy INTx line
        if text is not None and text.strip().isdecimal() and int(text) > 0:
            return [int(text)]
        if text is not None and text.strip() not in ("", "0"):
            self.problems.append(f"ignored {function.name}/irq {text.strip()[:20]!r}")
        return []

    def _names(self, irq: int) -> list[str] | None:
        """The action names of an IRQ ([] when no handler is attached), None when unknown."""
        text = _read(self.root / "sys/kernel/irq" / str(irq) / "actions")
        if text is not None:
            return [n.strip() for n in text.split(",") if n.strip()]
        if self._proc_names is None:
            self._proc_names = _parse_proc_interrupts(_read(self.root / "proc/interrupts") or "")
        return self._proc_names.get(irq)

    def _cpus(self, irq: int) -> tuple[int, ...] | None:
        """Where the kernel delivers the IRQ; None (with a problem recorded) when unknown."""
        if irq not in self._affinity:
            self._affinity[irq] = self._read_cpus(irq)
        return self._affinity[irq]

    def _read_cpus(self, irq: int) -> tuple[int, ...] | None:
        base = self.root / "proc/irq" / str(irq)
        found = False
        for name in ("effective_affinity_list", "smp_affinity_list"):
            text = _read(base / name)
            if text is None:
                continue
            found = True
            try:
                cpus = parse_cpulist(text)
            except ConfigError:
                self.problems.append(f"ignored /proc/irq/{irq}/{name} {text.strip()[:20]!r} (not a CPU list)")
                continue
            if cpus:
                return tuple(cpus)
            self.problems.append(f"ignored /proc/irq/{irq}/{name}: empty")
        if not found:
            self.unreadable.append(irq)
        return None
