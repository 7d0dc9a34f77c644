"""I/O threads for a daemon that serves many exports: a bounded pool of threads over the I/O
CPUs and the map (export, virtqueue) → thread → host CPU → hardware queue.

With one export the pool is exactly the single-disk plan (planner.plan: the paper's
per-queue design, a thread per virtqueue). With several, the threads are a fixed pool
(default: one per I/O CPU, i.e. every allowed CPU not running a vCPU and not isolated), made
once and pinned by the same rules, and each export's queues are mapped onto it:

* where the export's vCPU CPUs are known (`vcpu_cpus`, its own or the daemon's), queue i goes
  to the thread for vCPU i's host CPU, so queue i of every disk of a VM shares one thread (the
  idea of QEMU's `iothread-vq-mapping`, which puts vq i on iothread i mod N). The daemon's
  `vcpu_cpus` binds vCPU i's CPU to thread i mod N, as the single-disk plan does; a CPU met
  later goes to the closest thread (on it, then an SMT sibling, then its NUMA node), the one
  with the fewest vCPU CPUs bound to it first;
* otherwise each queue goes to the least-loaded thread this export does not use yet (queues
  counted per thread), so the exports spread over the pool.

Adding an export maps only its own queues; queues that run never move. Removing one frees
its share of the load. Pure data, as planner.py: nothing here starts or pins a thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .planner import PER_QUEUE, Plan, Policy, _dash, _place, parse_policy, plan
from .topology import DeviceInfo, Topology


@dataclass(frozen=True)
class ExportDemand:
    """What placement needs of an export: its name, the disk behind it, how many virtqueues,
    and where its VM's vCPUs run (vCPU i on the i-th CPU; None: unknown)."""

    name: str
    device: DeviceInfo
    queues: int
    vcpu_cpus: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Slot:
    """One I/O thread of the pool."""

    name: str
    cpu: int
    reason: str


@dataclass(frozen=True)
class PoolRow:
    export: str
    virtqueue: int
    vcpu: int | None          # whose requests arrive on it (vCPU i → virtqueue i), when known
    thread_name: str
    host_cpu: int
    hw_queue: int | None      # of this export's device
    numa_node: int | None
    reason: str


@dataclass
class ThreadPool:
    """The daemon's I/O threads and which export queue each one serves."""

    topology: Topology
    policy: Policy
    slots: list[Slot]
    notes: list[str] = field(default_factory=list)
    single: Plan | None = None      # the per-queue plan, when the pool was made for one export
    rows: dict[str, list[PoolRow]] = field(default_factory=dict)
    vcpu_cpus: tuple[int, ...] | None = None
    _bound: dict[int, int] = field(default_factory=dict)    # vCPU host CPU -> slot

    # ---- making one ----

    @classmethod
    def build(cls, topology: Topology, exports: Sequence[ExportDemand], *,
              policy: Policy | str = PER_QUEUE, io_threads: int | None = None,
              vcpu_cpus: Iterable[int] | None = None) -> ThreadPool:
        """The pool for the exports a daemon starts with (any number, none included).

        One export: planner.plan's threads and rows as they are (per-queue: `dp-vq<i>`).
        Otherwise `io_threads` threads `dp-io<t>` (per-queue's default: one per I/O CPU;
        shared: one; threads=K: K), placed for the first export's device."""
        policy = parse_policy(policy)
        daemon_vcpus = tuple(vcpu_cpus) if vcpu_cpus is not None else None
        if io_threads is not None and io_threads < 1:
            raise ConfigError(f"io_threads: expected a positive integer, got {io_threads}")
        names = {e.name for e in exports}
        if len(names) != len(exports):
            raise ConfigError("two exports have the same name")
        if len(exports) == 1 and io_threads is None:
            return cls._for_one(topology, exports[0], policy, daemon_vcpus)

        reserved = set(daemon_vcpus or ())
        for e in exports:
            reserved |= set(e.vcpu_cpus or ())
        if io_threads is not None and policy.kind != "per-queue":
            raise ConfigError(f"io_threads = {io_threads} and policy {policy} both size the pool:"
                              " give one of them")
        if policy.kind == "shared":
            count = 1
        elif policy.kind == "threads":
            count = policy.threads or 1
        else:
            count = io_threads or len(_io_cpus(topology, reserved))
        device = exports[0].device if exports else DeviceInfo("(no export yet)")
        thread_names = [f"dp-io{t}" for t in range(count)]
        cpus, reasons, notes = _place(topology, device, thread_names, reserved or None)
        about = (f"pool: {count} I/O thread(s) shared by every export"
                 f" ({_pool_why(policy, io_threads)}), placed for {device.path}")
        pool = cls(topology, policy, [Slot(n, c, r) for n, c, r in zip(thread_names, cpus, reasons,
                                                                         strict=True)],
                   [about, *notes, *topology.notes], vcpu_cpus=daemon_vcpus)
        pool._bind_in_order(daemon_vcpus)
        for e in exports:
            pool.add(e)
        return pool

    @classmethod
    def _for_one(cls, topology: Topology, export: ExportDemand, policy: Policy,
                 vcpus: tuple[int, ...] | None) -> ThreadPool:
        vcpus = vcpus if vcpus is not None else export.vcpu_cpus
        single = plan(topology, export.device, export.queues, policy, vcpus)
        slots: dict[str, Slot] = {}
        for row in single.rows:
            slots.setdefault(row.thread_name, Slot(row.thread_name, row.host_cpu, row.reason))
        pool = cls(topology, policy, list(slots.values()), list(single.notes), single,
                   vcpu_cpus=vcpus)
        order = list(slots)
        pool.rows[export.name] = [
            PoolRow(export.name, r.virtqueue, r.vcpu, r.thread_name, r.host_cpu, r.hw_queue,
                    r.numa_node, r.reason) for r in single.rows]
        if vcpus:   # vCPU i's CPU is bound to the thread of virtqueue i, as the plan says
            for i, cpu in enumerate(vcpus):
                if i < len(single.rows):
                    pool._bound.setdefault(cpu, order.index(single.rows[i].thread_name))
        return pool

    def _bind_in_order(self, vcpus: Sequence[int] | None) -> None:
        for i, cpu in enumerate(vcpus or ()):
            self._bound.setdefault(cpu, i % len(self.slots))

    # ---- exports coming and going ----

    def add(self, export: ExportDemand) -> list[PoolRow]:
        """Map a new export's queues onto the pool (nothing else moves)."""
        if export.name in self.rows:
            raise ConfigError(f"export {export.name!r} is already placed")
        if export.queues < 1:
            raise ConfigError(f"queues: expected a positive integer, got {export.queues}")
        vcpus = export.vcpu_cpus if export.vcpu_cpus is not None else self.vcpu_cpus
        load = self.load()
        used: set[int] = set()
        rows = []
        for i in range(export.queues):
            if vcpus:
                vcpu: int | None = i % len(vcpus)     # more queues than vCPUs: round again
                cpu = vcpus[i % len(vcpus)]
                t = self._slot_for_vcpu(cpu)
                why = f"vCPU {vcpu} runs on cpu {cpu}: {self.slots[t].name} is that CPU's thread"
            else:
                free = [t for t in range(len(self.slots)) if t not in used] or list(range(len(self.slots)))
                t = min(free, key=lambda s: (load[s], s))
                why = (f"least-loaded thread ({load[t]} queue(s) before this one)" if len(self.slots) > 1
                       else "the only I/O thread")
                vcpu = None
            used.add(t)
            load[t] += 1
            slot = self.slots[t]
            rows.append(PoolRow(export.name, i, vcpu, slot.name, slot.cpu,
                                export.device.hw_queue_of(slot.cpu), self.topology.node_of(slot.cpu),
                                f"{why}; {slot.reason}"))
        self.rows[export.name] = rows
        return rows

    def remove(self, name: str) -> None:
        self.rows.pop(name, None)

    def _slot_for_vcpu(self, cpu: int) -> int:
        """The thread for a vCPU's host CPU: bound once, then kept."""
        if cpu not in self._bound:
            bound_to = [list(self._bound.values()).count(t) for t in range(len(self.slots))]
            siblings = self.topology.siblings_of(cpu)
            node = self.topology.node_of(cpu)

            def key(t: int) -> tuple[int, int, int]:
                c = self.slots[t].cpu
                near = 0 if c == cpu else 1 if c in siblings else 2 if node is not None and \
                    self.topology.node_of(c) == node else 3
                return (near, bound_to[t], t)

            self._bound[cpu] = min(range(len(self.slots)), key=key)
        return self._bound[cpu]

    # ---- reading it ----

    def load(self) -> list[int]:
        """Queues per thread, in slot order."""
        counts = [0] * len(self.slots)
        index = {s.name: t for t, s in enumerate(self.slots)}
        for rows in self.rows.values():
            for r in rows:
                counts[index[r.thread_name]] += 1
        return counts

    def rows_of(self, name: str) -> list[PoolRow]:
        return list(self.rows.get(name, []))

    def mapping_of(self, name: str) -> dict[int, tuple[str, int]]:
        """virtqueue -> (thread name, host CPU) for one export (what its engines need)."""
        return {r.virtqueue: (r.thread_name, r.host_cpu) for r in self.rows.get(name, [])}

    def threads(self) -> dict[str, int]:
        return {s.name: s.cpu for s in self.slots}

    def to_dict(self) -> dict[str, Any]:
        load = self.load()
        return {
            "policy": str(self.policy),
            "threads": [{"name": s.name, "cpu": s.cpu, "queues": n, "reason": s.reason}
                        for s, n in zip(self.slots, load, strict=True)],
            "exports": {name: [_row_dict(r) for r in rows] for name, rows in self.rows.items()},
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_table(self) -> str:
        header = ("export", "vCPU", "virtqueue", "thread", "host CPU", "hw queue", "NUMA node", "reason")
        body = [(r.export, _dash(r.vcpu), str(r.virtqueue), r.thread_name, str(r.host_cpu),
                 _dash(r.hw_queue), _dash(r.numa_node), r.reason)
                for rows in self.rows.values() for r in rows]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header) - 1)]
        load = self.load()
        lines = [f"policy {self.policy}, {len(self.slots)} I/O thread(s) for {len(self.rows)} export(s): "
                 + ", ".join(f"{s.name} on cpu {s.cpu} ({n} queue(s))"
                             for s, n in zip(self.slots, load, strict=True))]
        for row in [header, *body]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _row_dict(r: PoolRow) -> dict[str, Any]:
    return {"export": r.export, "vcpu": r.vcpu, "virtqueue": r.virtqueue, "thread": r.thread_name,
            "host_cpu": r.host_cpu, "hw_queue": r.hw_queue, "numa_node": r.numa_node,
            "reason": r.reason}


def _io_cpus(topology: Topology, reserved: set[int]) -> list[int]:
    usable = topology.usable_cpus()
    pool = [c for c in usable if c not in reserved and c not in topology.isolated]
    return pool or usable


def _pool_why(policy: Policy, io_threads: int | None) -> str:
    if policy.kind == "shared":
        return "policy shared"
    if policy.kind == "threads":
        return f"policy threads={policy.threads}"
    if io_threads is not None:
        return f"io_threads = {io_threads}"
    return "one per I/O CPU"
