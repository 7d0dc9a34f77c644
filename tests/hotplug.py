"""Memory hot-plugged and removed while the C load generator verifies data: what the memory
slot and fixed-buffer tests share. Importable from every test module (tests/ is on sys.path)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

MiB = 1 << 20


def hot_plug_under_load(dev: Any, job: Any, *, areas: int, min_cycles: int, offset: int,
                        phase: Callable[[str, int], None] = lambda name, cycle: None) -> tuple[Any, int]:
    """Queues 0 and 1 run job while, cycle after cycle, `areas` regions of 2 MiB are added
    (ADD_MEM_REG), a 64 KiB write and its read-back go through each on queue 2 (the data must
    come back), and the regions are removed again (REM_MEM_REG), until the load is done and at
    least min_cycles have run. phase(name, cycle) is called at "start", "added", "io" and
    "removed" of each cycle. Returns the load's result and the cycles run."""
    from dataplane.driver.load import run_load

    result: dict[str, Any] = {}
    load = threading.Thread(target=lambda: result.setdefault("r", run_load(dev, job, [0, 1])))
    load.start()
    cycles = 0
    try:
        while load.is_alive() or cycles < min_cycles:
            phase("start", cycles)
            added = [dev.add_memory(2 * MiB) for _ in range(areas)]
            phase("added", cycles)
            for i, area in enumerate(added):
                data = os.urandom(64 * 1024)
                at = offset + (cycles * areas + i) % 64 * 64 * 1024
                dev.write(at, data, queue=2, area=area)
                assert dev.read(at, len(data), queue=2, area=area) == data
            phase("io", cycles)
            for area in reversed(added):
                dev.remove_memory(area)
            phase("removed", cycles)
            cycles += 1
    finally:
        load.join()
    return result["r"], cycles
