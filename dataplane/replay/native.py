"""`dataplane replay --native FILE`: the same trace, the same scheduling code (csrc/driver/replay.c),
but each queue's thread submits straight to the file with its own io_uring (O_DIRECT, buffers
registered), so a replay through a vhost-user-blk backend can be set against bare metal.

Flushes are fdatasync and trims punch holes (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE), as the
backend does for a file; the target's logical block size is the file's (its block device's).
"""

from __future__ import annotations

from pathlib import Path

from ..disks import open_file
from .base import TraceReader
from .engine import (
    MAX_DISCARD,
    Geometry,
    ReplayOptions,
    TraceScan,
    base_params,
    prepare,
    run_engine,
)
from .results import ReplayResult


def replay_native(path: str | Path, reader: TraceReader, options: ReplayOptions, *, queues: int = 1,
                  read_only: bool = False, scan: TraceScan | None = None) -> ReplayResult:
    """Replay the trace against a regular file or block device with io_uring, one thread per
    queue (queues play the role of virtqueues for --queue-map)."""
    from ..core import lib

    disk = open_file(str(path), read_only=read_only, direct=True, serial="native")
    try:
        geometry = Geometry(capacity=disk.size, block_size=disk.logical_block_size,
                            discard=not read_only, flush=True, max_discard=MAX_DISCARD,
                            description=str(path), writable=not read_only)
        scan, mapper, buf = prepare(reader, geometry, queues, options, scan)
        params = []
        for q in range(queues):
            p = base_params(q, options, geometry, buf, q)
            p.kind = lib.DP_REPLAY_URING
            p.fd = disk.fd
            params.append(p)
        engine = run_engine(params, reader, mapper, options)
    finally:
        disk.close()
    return ReplayResult.build(engine, reader, scan, mapper, geometry, options, target=str(path),
                              native=True)
