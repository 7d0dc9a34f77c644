"""The interrupt lost when a backend dies between publishing a used element and signalling it.

The frontend plays a guest driver that, like Linux's virtio-blk, looks at the used ring only
when an interrupt arrives (the call eventfd). The backend is killed at exactly the bad
moment: `--debug-kill-before-signal 3` SIGKILLs it right after the used index of the third
request was stored, before the interrupt for it is sent. A new backend takes the socket and
the frontend reconnects as QEMU does. The request is complete in guest memory, so nothing
resubmits it; only the interrupt every queue now sends when it starts (and when its call fd
changes) makes the guest see it. With `--debug-no-call-on-start` the guest waits forever.
"""

from __future__ import annotations

import os
import select
import signal
from pathlib import Path

import pytest
from serve_process import ServeProcess

from dataplane.driver import Device
from dataplane.protocol import virtio_blk as vb
from dataplane.protocol.vhost_user import Request

INTERRUPT_TIMEOUT = 3.0


def wait_interrupt(ring, timeout: float) -> bool:
    """Block on the call eventfd only, as a driver waiting for its interrupt."""
    r, _, _ = select.select([ring.call_fd], [], [], timeout)
    if not r:
        return False
    os.eventfd_read(ring.call_fd)
    return True


def drain_interrupts(ring) -> None:
    while wait_interrupt(ring, 0.05):
        pass


def complete_on_interrupt(dev: Device, req, timeout: float) -> bool:
    """What the guest driver does: on an interrupt, collect the used ring; True once req is in it."""
    ring = dev.rings[req.queue]
    while wait_interrupt(ring, timeout):
        if any(head == req.head for head, _ in ring.pop_used()):
            return True
    return False


def kill_between_used_index_and_interrupt(tmp_path: Path, restart_args: tuple[str, ...]) -> bool:
    """Returns whether the guest saw the request that was published by the killed backend."""
    sock = tmp_path / "vub.sock"
    first = ServeProcess(tmp_path / "serve0.log", sock, "null:64M",
                         ("--queues", "1", "--debug-kill-before-signal", "3"))
    second = None
    dev = Device.connect(str(sock), queues=1)
    try:
        ring = dev.rings[0]
        drain_interrupts(ring)                    # the queue's start
        for _ in range(2):
            req = dev.submit(vb.ReqType.IN, 0, read_len=4096)
            assert complete_on_interrupt(dev, req, INTERRUPT_TIMEOUT)
            dev.release(req)
        req = dev.submit(vb.ReqType.IN, 8, read_len=4096)
        assert first.proc.wait(10) == -signal.SIGKILL, first.log()
        assert ring.used_idx() == 3, "the killed backend had published the third used element"
        assert not wait_interrupt(ring, 0.3), "and not signalled it"
        second = ServeProcess(tmp_path / "serve1.log", sock, "null:64M", ("--queues", "1", *restart_args))
        dev.reconnect()
        seen = complete_on_interrupt(dev, req, INTERRUPT_TIMEOUT)
        if seen:
            assert dev.mem.read(req.status, 1) == bytes([vb.Status.OK])
            # and the ring goes on
            after = dev.submit(vb.ReqType.IN, 16, read_len=4096)
            assert complete_on_interrupt(dev, after, INTERRUPT_TIMEOUT)
        return seen
    finally:
        dev.close()
        for s in (first, second):
            if s is not None:
                s.kill()


def test_a_restarted_queue_signals_the_interrupt_the_dead_backend_owed(tmp_path):
    assert kill_between_used_index_and_interrupt(tmp_path, ())


def test_without_the_start_signal_the_guest_never_sees_it(tmp_path):
    assert not kill_between_used_index_and_interrupt(tmp_path, ("--debug-no-call-on-start",))


def test_a_new_call_fd_is_signalled_once_while_the_queue_runs(start_backend):
    backend = start_backend("null:16M", queues=1)
    with Device.connect(backend.socket, queues=1) as dev:
        ring = dev.rings[0]
        drain_interrupts(ring)
        new = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        dev.client.set_u64(Request.SET_VRING_CALL, 0, [new])
        r, _, _ = select.select([new], [], [], INTERRUPT_TIMEOUT)
        assert r and os.eventfd_read(new) == 1
        os.close(ring.call_fd)
        ring.call_fd = new
        req = dev.submit(vb.ReqType.IN, 0, read_len=4096)
        assert complete_on_interrupt(dev, req, INTERRUPT_TIMEOUT)


@pytest.fixture(autouse=True)
def _no_stray_socket(tmp_path):
    yield
    (tmp_path / "vub.sock").unlink(missing_ok=True)
