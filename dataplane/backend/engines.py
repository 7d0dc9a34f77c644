"""The backend's I/O threads: one C engine (a pthread with its own io_uring) per name, made
when the first virtqueue placed on it starts, and kept for the server's life.

An `EnginePool` serves one export by itself (`placement`: vring index → thread) or, in a
daemon, is shared by every export, each seeing it through an `EngineView` of its own mapping.
Exports start their queues from their own control threads, so making an engine is locked.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core import check, ffi, lib


@dataclass
class EnginePool:
    """I/O threads by name, created on first use. `placement` maps a vring index to its
    thread name and host CPU (-1: not pinned); by default vring i gets its own unpinned
    thread `dp-vq<i>`. Several vrings naming one thread share it (the shared-thread baseline).
    """

    ring_entries: int = 1024
    placement: dict[int, tuple[str, int]] = field(default_factory=dict)
    poll_ns: int = 0
    engines: dict[str, object] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def from_plan(cls, plan: Any, ring_entries: int = 1024, poll_ns: int = 0) -> EnginePool:
        return cls(ring_entries=ring_entries, poll_ns=poll_ns,
                   placement={row.virtqueue: (row.thread_name, row.host_cpu) for row in plan.rows})

    def name_for(self, index: int) -> str:
        return self.placement.get(index, (f"dp-vq{index}", -1))[0]

    def engine_for(self, index: int) -> object:
        name, cpu = self.placement.get(index, (f"dp-vq{index}", -1))
        sharing = sum(1 for n, _ in self.placement.values() if n == name) or 1
        return self.engine(name, cpu, sharing)

    def engine(self, name: str, cpu: int, sharing: int = 1) -> object:
        """The engine called name, started (pinned to cpu) if it is not running yet; its ring
        is sized for the `sharing` queues expected on it."""
        with self._lock:
            engine = self.engines.get(name)
            if engine is None:
                err = ffi.new("int *")
                engine = lib.dp_engine_new(name.encode(), cpu, self.ring_entries * max(1, sharing), err)
                if engine == ffi.NULL:
                    check(err[0], f"starting I/O thread {name}")
                lib.dp_engine_set_poll(engine, self.poll_ns)
                self.engines[name] = engine
            return engine

    def thread_ids(self) -> dict[str, int]:
        with self._lock:
            return {name: lib.dp_engine_thread_id(e) for name, e in self.engines.items()}

    def poll_windows_ns(self) -> dict[str, int]:
        """Each I/O thread's current spin window (it adapts between 0 and poll_ns)."""
        with self._lock:
            return {name: lib.dp_engine_poll_window(e) for name, e in self.engines.items()}

    def close(self) -> None:
        with self._lock:
            for engine in self.engines.values():
                lib.dp_engine_free(engine)
            self.engines.clear()


class EngineView:
    """One export's view of a shared pool: its own vring → (thread, CPU) mapping; closing it
    leaves the threads to the pool (other exports' queues run on them)."""

    def __init__(self, pool: EnginePool, placement: Mapping[int, tuple[str, int]],
                 sharing: Mapping[str, int] | None = None) -> None:
        self.pool = pool
        self.placement = dict(placement)
        self.sharing = dict(sharing or {})

    def name_for(self, index: int) -> str:
        return self.placement.get(index, (f"dp-vq{index}", -1))[0]

    def engine_for(self, index: int) -> object:
        name, cpu = self.placement.get(index, (f"dp-vq{index}", -1))
        return self.pool.engine(name, cpu, self.sharing.get(name, 1))

    def thread_ids(self) -> dict[str, int]:
        return self.pool.thread_ids()

    def poll_windows_ns(self) -> dict[str, int]:
        return self.pool.poll_windows_ns()

    def close(self) -> None:
        """Nothing to do: the pool owns the threads."""


def set_debug_switches(no_call_on_start: bool = False, kill_before_signal: int = 0,
                       no_mem_drain: bool = False) -> None:
    """Process-wide switches with which tests show what a protection is for: no interrupt when
    a queue starts or its call fd changes; SIGKILL at the n-th interrupt about to be sent,
    after the used index it is for was published; a memory region removed (and unmapped)
    without waiting for the requests that may point into it."""
    lib.dp_debug_set_flags((lib.DP_DEBUG_NO_START_SIGNAL if no_call_on_start else 0)
                           | (lib.DP_DEBUG_NO_MEM_DRAIN if no_mem_drain else 0))
    lib.dp_debug_kill_before_signal(kill_before_signal)
