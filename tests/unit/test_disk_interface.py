"""The disk interface's life cycle (csrc/disk/disk.h) where it is easiest to get wrong: a disk's
state on an engine must outlive every SQE of it on the engine's ring. Driven by hand through
the ops table (csrc/bench/disk_hooks.c), so the one ordering the protocol tests cannot force
happens every time: the latency layer's last request completed by poll while the timeout armed
for it is still on the ring."""

from __future__ import annotations

import errno

from dataplane.core import ffi, lib


def test_the_latency_layer_outlives_its_armed_timeout() -> None:
    first, cqes = ffi.new("int *"), ffi.new("unsigned *")
    assert lib.dp_bench_delay_close(first, cqes) == 0
    # close refused while the timeout was on the ring (a state freed here would take the
    # timeout's completion into freed memory: the sanitizer pass runs this), and succeeded once
    # the timeout's completion (and its removal's) had been reaped.
    assert first[0] == -errno.EBUSY
    assert cqes[0] >= 1
