"""Recording what the backend serves (`serve --record FILE`, and at runtime through
VhostUserBlkServer.start_recording / stop_recording): a C recorder (csrc/record/) with one
lock-free ring per queue, filled by the queue's I/O thread, and a C writer thread that turns
the rings into a blktrace (FILE.blktrace.<q>, one file per queue) or a fio iolog v3 (FILE).

Why the writer is C and not a Python thread: at a million requests a second a recording is two
million ring entries a second; the C writer formats and writes them with a few percent of one
core, where a Python thread (even formatting batches with numpy) needs far more, and holds the
GIL the control plane's loop needs. bench/record.py --writers measures both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import ffi, lib
from ..errors import ConfigError

log = logging.getLogger("dataplane.record")

FORMATS = {"blktrace": lib.DP_REC_BLKTRACE, "iolog": lib.DP_REC_IOLOG}
DEFAULT_RING_ENTRIES = int(lib.DP_REC_DEFAULT_ENTRIES)
OPS = ("read", "write", "flush", "discard", "write-zeroes")   # DP_REC_OP_* order


def record_files(path: str | os.PathLike[str], fmt: str, queues: int) -> list[Path]:
    """The files a recording to `path` writes."""
    path = Path(path)
    if fmt == "blktrace":
        return [path.with_name(f"{path.name}.blktrace.{q}") for q in range(queues)]
    return [path]


@dataclass
class Recording:
    """One recording in progress: the C recorder and what it has counted so far."""

    path: Path
    format: str
    queues: int
    ring_entries: int = 0
    hold_lines: int = 0          # iolog: lines a queue may hold in memory (0: the C default)
    handle: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"record format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        entries = self.ring_entries or DEFAULT_RING_ENTRIES
        if entries < 4 or entries & (entries - 1):
            raise ConfigError(f"record ring of {entries} entries: must be a power of two, at least 4")
        params = ffi.new("struct dp_recorder_params *")
        params.format = FORMATS[self.format]
        params.queues = self.queues
        params.ring_entries = entries
        params.hold_lines = self.hold_lines
        params.names = b"vq"
        err = ffi.new("int *")
        handle = lib.dp_recorder_new(os.fsencode(self.path), params, err)
        if handle == ffi.NULL:
            raise ConfigError(f"cannot record to {self.path}: {os.strerror(-err[0])}")
        self.handle = handle
        self.files = record_files(self.path, self.format, self.queues)
        log.info("recording to %s (%s, %d queue(s))", ", ".join(map(str, self.files)), self.format,
                 self.queues)

    def queue_stats(self) -> list[dict[str, int]]:
        """Per queue: requests recorded, entries dropped (ring full), entries written."""
        out = []
        s = ffi.new("struct dp_record_stats *")
        for q in range(self.queues):
            lib.dp_recorder_get_stats(self.handle, q, s)
            out.append({"requests": s.requests, "dropped": s.dropped, "written": s.written})
        return out

    def info(self) -> dict[str, Any]:
        err = lib.dp_recorder_error(self.handle) if self.handle is not None else 0
        return {"path": str(self.path), "format": self.format,
                "files": [str(f) for f in self.files],
                "bytes": lib.dp_recorder_bytes(self.handle) if self.handle is not None else 0,
                "error": os.strerror(-err) if err else None}

    def close(self) -> dict[str, Any]:
        """Finish the files (the writer drains every ring first); no queue may still record
        into it. Returns the summary: info() and the totals."""
        if self.handle is None:
            raise ConfigError("the recording is already closed")
        rc = lib.dp_recorder_stop(self.handle)
        stats = self.queue_stats()
        summary = {**self.info(), "requests": sum(s["requests"] for s in stats),
                   "dropped": sum(s["dropped"] for s in stats), "queues": stats}
        lib.dp_recorder_free(self.handle)
        self.handle = None
        if rc < 0:
            log.error("recording to %s failed: %s", self.path, summary["error"])
        log.info("recorded %d request(s) to %s%s", summary["requests"], self.path,
                 f", {summary['dropped']} entries dropped (the writer fell behind)"
                 if summary["dropped"] else "")
        return summary
