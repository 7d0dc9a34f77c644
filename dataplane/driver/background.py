"""What QEMU does to a running vhost-user device besides I/O, played while the C load threads
drive the rings (`dataplane load --log-all`, `--hotplug-every`): harvest a dirty log as a
migration's iterations do, and hot-plug and unplug memory (ADD_MEM_REG / REM_MEM_REG).

The load threads never use the vhost-user socket, so one Python thread here may; it also
reads the log, which the backend marks while the rings run.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataplaneError

HARVEST_INTERVAL = 0.1       # seconds between two looks at the dirty log (a migration iteration)
HOTPLUG_SIZE = 1 << 20


@dataclass
class BackgroundReport:
    harvests: int = 0
    dirty_pages: int = 0          # marks found over all harvests (a page counts once per harvest)
    distinct_pages: int = 0
    hotplugs: int = 0
    rem_max_ms: float = 0.0       # the longest REM_MEM_REG round trip
    error: str = ""

    def lines(self) -> list[str]:
        out = []
        if self.harvests:
            out.append(f"dirty log: {self.dirty_pages} page marks in {self.harvests} harvests,"
                       f" {self.distinct_pages} distinct pages")
        if self.hotplugs:
            out.append(f"memory: {self.hotplugs} region(s) added and removed while the rings ran,"
                       f" REM_MEM_REG answered in {self.rem_max_ms:.2f} ms at most")
        if self.error:
            out.append(f"background: {self.error}")
        return out


@dataclass
class Background:
    """Start with `with Background(dev, log_all=True, hotplug_every=0.2) as bg: dev.load(job)`;
    bg.report afterwards."""

    dev: Any
    log_all: bool = False
    hotplug_every: float = 0.0    # seconds; 0: no hotplug
    report: BackgroundReport = field(default_factory=BackgroundReport)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _pages: set[int] = field(default_factory=set)

    def __enter__(self) -> Background:
        if self.log_all:
            self.dev.start_dirty_log()
        if self.log_all or self.hotplug_every:
            self._thread = threading.Thread(target=self._run, name="dp-background", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.log_all:
            self._harvest()
            self.report.distinct_pages = len(self._pages)
            self.dev.stop_dirty_log()

    def _harvest(self) -> None:
        pages = self.dev.take_dirty_pages()
        self.report.harvests += 1
        self.report.dirty_pages += len(pages)
        self._pages |= pages

    def _hotplug(self) -> None:
        area = self.dev.add_memory(HOTPLUG_SIZE)
        t0 = time.monotonic()
        self.dev.remove_memory(area)
        self.report.rem_max_ms = max(self.report.rem_max_ms, (time.monotonic() - t0) * 1e3)
        self.report.hotplugs += 1

    def _run(self) -> None:
        now = time.monotonic()
        next_harvest = now + HARVEST_INTERVAL if self.log_all else float("inf")
        next_plug = now + self.hotplug_every if self.hotplug_every else float("inf")
        try:
            while not self._stop.wait(max(0.0, min(next_harvest, next_plug) - time.monotonic())):
                now = time.monotonic()
                if now >= next_harvest:
                    self._harvest()
                    next_harvest = now + HARVEST_INTERVAL
                if now >= next_plug:
                    self._hotplug()
                    next_plug = now + self.hotplug_every
        except (DataplaneError, OSError) as exc:
            self.report.error = str(exc)
