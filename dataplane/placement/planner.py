"""The placement plan: vCPU i → virtqueue i → I/O thread → host CPU → blk-mq hardware queue of
the backing device, on the device's NUMA node, with a reason for every row.

Pure data and pure functions over a Topology and a DeviceInfo (placement.topology); nothing
here pins a thread (the server does, from a `Plan`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .topology import DeviceInfo, Topology, format_cpulist


@dataclass(frozen=True)
class Policy:
    """per-queue (a thread per virtqueue), shared (one thread: QEMU's virtio-blk-data-plane
    baseline) or threads=K (K threads, the queues spread evenly)."""

    kind: str                  # "per-queue" | "shared" | "threads"
    threads: int | None = None

    def __str__(self) -> str:
        return f"threads={self.threads}" if self.kind == "threads" else self.kind


PER_QUEUE = Policy("per-queue")
SHARED = Policy("shared")


def parse_policy(text: str | Policy) -> Policy:
    if isinstance(text, Policy):
        return text
    if not isinstance(text, str):
        raise ConfigError(f"bad policy {text!r}: expected per-queue, shared or threads=K")
    value = text.strip().lower().replace(" ", "")
    if value in ("per-queue", "shared"):
        return Policy(value)
    m = re.fullmatch(r"threads=(\d+)", value)
    if m and int(m.group(1)) >= 1:
        return Policy("threads", int(m.group(1)))
    raise ConfigError(f"bad policy {text!r}: expected per-queue, shared or threads=K with K ≥ 1")


@dataclass(frozen=True)
class PlanRow:
    vcpu: int
    virtqueue: int
    thread_name: str
    host_cpu: int
    hw_queue: int | None
    numa_node: int | None
    reason: str


@dataclass
class Plan:
    """Who serves which virtqueue where, and why. Rows are ordered by virtqueue."""

    policy: Policy
    device: DeviceInfo
    rows: list[PlanRow]
    notes: list[str] = field(default_factory=list)

    @property
    def queues(self) -> int:
        return len(self.rows)

    def thread_for_queue(self, index: int) -> tuple[str, int]:
        row = self.rows[index]
        return row.thread_name, row.host_cpu

    def threads(self) -> dict[str, int]:
        """Thread name → host CPU, in order of first use."""
        return {row.thread_name: row.host_cpu for row in self.rows}

    def to_dict(self) -> dict[str, Any]:
        threads = [{"name": name, "cpu": cpu,
                    "virtqueues": [r.virtqueue for r in self.rows if r.thread_name == name]}
                   for name, cpu in self.threads().items()]
        return {"policy": str(self.policy), "queues": self.queues, "device": self.device.to_dict(),
                "threads": threads,
                "rows": [{"vcpu": r.vcpu, "virtqueue": r.virtqueue, "thread": r.thread_name,
                          "host_cpu": r.host_cpu, "hw_queue": r.hw_queue, "numa_node": r.numa_node,
                          "reason": r.reason} for r in self.rows],
                "notes": list(self.notes)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_table(self) -> str:
        header = ("vCPU", "virtqueue", "thread", "host CPU", "hw queue", "NUMA node", "reason")
        body = [(str(r.vcpu), str(r.virtqueue), r.thread_name, str(r.host_cpu), _dash(r.hw_queue),
                 _dash(r.numa_node), r.reason) for r in self.rows]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header) - 1)]
        lines = [self._title()]
        for row in [header, *body]:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
                         + "  " + row[-1])
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _title(self) -> str:
        d = self.device
        what = [d.disk or "no block device"]
        if d.hw_queues:
            what.append(f"{len(d.hw_queues)} hw queue{'s' if len(d.hw_queues) != 1 else ''}")
        what.append(f"NUMA node {d.numa_node}" if d.numa_node is not None else "NUMA node unknown")
        return (f"policy {self.policy}, {self.queues} virtqueue{'s' if self.queues != 1 else ''},"
                f" {len(self.threads())} I/O thread{'s' if len(self.threads()) != 1 else ''};"
                f" disk {d.path}: {', '.join(what)}")


def _dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def plan(topology: Topology, device_info: DeviceInfo, queues: int, policy: Policy | str = PER_QUEUE,
         vcpu_cpus: Iterable[int] | None = None) -> Plan:
    """Place the I/O threads for `queues` virtqueues. vCPU i's requests arrive on virtqueue i (the
    guest's blk-mq maps cpu i to hctx i when queues == vCPUs), so each row starts at a vCPU.

    CPU choice, strongest rule first: a CPU of its own while there are enough; not a vCPU or
    isolated CPU unless there is nothing else; a hw queue no other thread submits to (the
    least-shared one otherwise); a CPU that takes its hw queue's completion interrupt (only where
    the interrupt's CPUs are known: unknown is neutral); the device's NUMA node; no other I/O
    thread on an SMT sibling; the lowest number. Hw queue before NUMA: distinct hw queues are the
    point of the design, and a thread one hop away still completes without contending for another
    thread's tags.

    The interrupt rule: io_uring posts a completion from the device's interrupt, so a thread on
    another CPU is woken by an IPI each time (on a 2-vCPU VM, 4k QD1 O_DIRECT reads went from
    ~110 to ~70 µs median when the thread moved onto the interrupt CPU). After the hw queue: the
    queue decides tag and doorbell sharing for the whole run, and with managed vectors (NVMe,
    multi-queue virtio) a queue's interrupt is delivered to one of that queue's own CPUs, so
    choosing the queue first and the interrupt CPU within it costs nothing. Before NUMA: a
    cross-CPU wake-up per request costs microseconds (tens in a VM), a thread off the device's
    node pays some remote cache misses per request; and the two rarely disagree, since managed
    vectors stay with their queue's CPUs: only when a local queue's interrupt CPU is taken or kept
    off does a remote queue whose interrupt CPU is free win. Before SMT: a busy sibling costs
    throughput, the wake-up costs latency on every request, and blk-mq puts siblings in the same
    hw queue, so the hw-queue rule has usually separated them already.
    """
    policy = parse_policy(policy)
    if queues < 1:
        raise ConfigError(f"queues: expected a positive integer, got {queues}")
    if policy.kind == "per-queue":
        names = [f"dp-vq{i}" for i in range(queues)]
        owner = list(range(queues))
    elif policy.kind == "shared":
        names = ["dp-io0"]
        owner = [0] * queues
    else:
        k = policy.threads or 1
        if k > queues:
            raise ConfigError(f"policy threads={k}: more I/O threads than the {queues} virtqueue(s);"
                              f" use at most threads={queues}")
        names = [f"dp-io{t}" for t in range(k)]
        owner = [i * k // queues for i in range(queues)]   # contiguous runs, sizes differ by ≤ 1

    notes = [_policy_note(policy, queues, len(names))]
    cpus, reasons, place_notes = _place(topology, device_info, names, vcpu_cpus)
    if device_info.mapping_note:
        notes.append(device_info.mapping_note)
    if device_info.irq_note:
        notes.append(device_info.irq_note)
    notes += place_notes + topology.notes

    rows = []
    first_row: dict[int, int] = {}
    for i in range(queues):
        t = owner[i]
        cpu = cpus[t]
        if t in first_row:
            reason = f"same thread as virtqueue {first_row[t]} (cpu {cpu})"
        else:
            first_row[t] = i
            reason = reasons[t]
        rows.append(PlanRow(i, i, names[t], cpu, device_info.hw_queue_of(cpu), topology.node_of(cpu),
                            reason))
    return Plan(policy, device_info, rows, notes)


def _policy_note(policy: Policy, queues: int, threads: int) -> str:
    if policy.kind == "per-queue":
        return f"per-queue: one I/O thread per virtqueue ({queues})"
    if policy.kind == "shared":
        return (f"shared: one I/O thread serves all {queues} virtqueue(s), as QEMU's"
                " virtio-blk-data-plane does (the baseline)")
    low, high = queues // threads, -(-queues // threads)
    each = str(low) if low == high else f"{low} or {high}"
    return f"threads={threads}: {threads} I/O threads, {each} consecutive virtqueue(s) each"


def _place(topology: Topology, device: DeviceInfo, names: Sequence[str],
           vcpu_cpus: Iterable[int] | None) -> tuple[list[int], list[str], list[str]]:
    """A host CPU per thread, a reason per thread, and notes on every compromise."""
    notes: list[str] = []
    usable = topology.usable_cpus()
    vcpus = frozenset(vcpu_cpus) if vcpu_cpus is not None else None
    reserved = (vcpus or frozenset()) | topology.isolated
    pool = [c for c in usable if c not in reserved]
    if vcpus is not None:
        offline = vcpus - set(topology.cpus)
        if offline:
            notes.append(f"vCPU CPUs {format_cpulist(offline)} are not online here: ignored")
    if not pool:
        pool = usable
        notes.append("every usable CPU runs a vCPU or is isolated: I/O threads share them anyway")
    elif len(pool) < len(usable):
        kinds = []
        if vcpus and vcpus & set(usable):
            kinds.append(f"vCPU CPUs {format_cpulist(vcpus & set(usable))}")
        if topology.isolated & set(usable):
            kinds.append(f"isolated CPUs {format_cpulist(topology.isolated & set(usable))}")
        notes.append(f"kept off {' and '.join(kinds)}")

    device_node = device.numa_node
    hwq_of = {c: device.hw_queue_of(c) for c in pool}
    remote = {c: device_node is not None and topology.node_of(c) != device_node for c in pool}
    # Only a CPU known not to take its hw queue's interrupt is penalised: unknown is neutral.
    irq_miss = {c: bool(device.irq_cpus_of(hwq_of[c])) and c not in device.irq_cpus_of(hwq_of[c])
                for c in pool}
    hwq_load: Counter[int] = Counter()
    chosen: list[int] = []
    taken: set[int] = set()

    def key(cpu: int) -> tuple[int, bool, bool, bool, int, int]:
        hwq = hwq_of[cpu]
        return (hwq_load[hwq] if hwq is not None else 0, hwq is None and bool(device.hw_queues),
                irq_miss[cpu], remote[cpu], len(topology.siblings_of(cpu) & taken), cpu)

    for _ in range(min(len(names), len(pool))):
        cpu = min((c for c in pool if c not in taken), key=key)
        chosen.append(cpu)
        taken.add(cpu)
        if hwq_of[cpu] is not None:
            hwq_load[hwq_of[cpu]] += 1
    cpus = [chosen[t % len(chosen)] for t in range(len(names))]   # round-robin beyond the pool
    if len(names) > len(chosen):
        notes.append(f"{len(names)} I/O threads but only {len(chosen)} suitable CPU(s)"
                     f" ({format_cpulist(chosen)}): threads share CPUs round-robin")

    distinct_hwqs = {device.hw_queue_of(c) for c in chosen} - {None}
    if device.hw_queues and len(distinct_hwqs) < len(chosen):
        notes.append(f"{len(chosen)} CPUs in use but only {len(distinct_hwqs)} distinct hw queue(s)"
                     f" behind them (the device has {len(device.hw_queues)}): some threads share"
                     " a hw queue")
    away = [t for t, c in enumerate(cpus) if irq_miss[c]]
    if away:
        notes.append(f"{len(away)} of {len(names)} thread(s) run on a CPU that does not take their hw"
                     " queue's completion interrupt: each completion wakes them from another CPU")
    off_node = [t for t, c in enumerate(cpus) if remote[c]]
    if off_node:
        notes.append(f"{len(off_node)} of {len(names)} thread(s) run off the device's NUMA node"
                     f" {device_node} (its CPUs are taken, kept off, or on busier hw queues)")

    reasons = [_reason(t, cpus, names, topology, device, vcpus) for t in range(len(names))]
    return cpus, reasons, notes


def _reason(t: int, cpus: list[int], names: Sequence[str], topology: Topology, device: DeviceInfo,
            vcpus: frozenset[int] | None) -> str:
    cpu = cpus[t]
    first = cpus.index(cpu)
    if first != t:
        return (f"cpu {cpu}: shared with {names[first]} (more threads than suitable CPUs),"
                f" hw queue {_dash(device.hw_queue_of(cpu))}")
    parts = []
    others = {c: names[u] for u, c in enumerate(cpus) if c != cpu and cpus.index(c) == u}
    hwq = device.hw_queue_of(cpu)
    if hwq is not None:
        same = [name for c, name in others.items() if device.hw_queue_of(c) == hwq]
        parts.append(f"hw queue {hwq} (also used by {', '.join(same)})" if same
                     else f"hw queue {hwq} (not used by another thread)")
    elif device.hw_queues:
        parts.append("in no hw queue's cpu_list")
    else:
        parts.append("no hw queue mapping")
    irq_cpus = device.irq_cpus_of(hwq)
    if irq_cpus == (cpu,):
        parts.append(f"takes hw queue {hwq}'s completion interrupt")
    elif cpu in irq_cpus:
        parts.append(f"one of the CPUs hw queue {hwq}'s completion interrupt may go to"
                     f" ({format_cpulist(irq_cpus)})")
    elif irq_cpus:
        whys = []
        for c in irq_cpus:
            if c in others:
                whys.append(f"{others[c]} runs on {c}")
            elif vcpus is not None and c in vcpus:
                whys.append(f"{c} is a vCPU CPU")
            elif c in topology.isolated:
                whys.append(f"{c} is isolated")
            elif c not in topology.usable_cpus():
                whys.append(f"{c} is not usable here")
        why = f" ({', '.join(whys[:3])})" if whys else ""
        parts.append(f"hw queue {hwq}'s completion interrupt goes to cpu {format_cpulist(irq_cpus)}"
                     + why)
    node = topology.node_of(cpu)
    if device.numa_node is not None:
        parts.append(f"NUMA node {node} (device-local)" if node == device.numa_node
                     else f"NUMA node {_dash(node)} (remote: device on node {device.numa_node})")
    elif len(topology.nodes) == 1:
        parts.append(f"NUMA node {_dash(node)} (the only node)")
    else:
        parts.append(f"NUMA node {_dash(node)} (device node unknown)")
    if vcpus is not None:
        parts.append("a vCPU CPU (nothing else left)" if cpu in vcpus else "not a vCPU CPU")
    if cpu in topology.isolated:
        parts.append("isolated (nothing else left)")
    siblings = topology.siblings_of(cpu)
    if siblings:
        busy = [f"{others[s]} on {s}" for s in sorted(siblings) if s in others]
        parts.append(f"SMT sibling of {', '.join(busy)}" if busy
                     else f"no I/O thread on SMT sibling {format_cpulist(siblings)}")
    return f"cpu {cpu}: " + ", ".join(parts)
