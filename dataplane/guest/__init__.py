"""The test guest: a Debian kernel and a busybox initramfs booted in QEMU against a
vhost-user-blk socket (kit: `python -m dataplane.guest`), and `dataplane demo` (demo)."""

from .kit import (
    BLKTRACE_START,
    BLKTRACE_STOP,
    GuestError,
    GuestHandle,
    GuestImage,
    GuestResult,
    GuestTimeout,
    blktrace_start,
    blktrace_stop,
    build_guest,
    default_cache_dir,
    initrd_with_script,
    make_scratch,
    qemu_command,
    read_scratch,
    run_guest,
    start_guest,
)
from .qmp import Qmp, QmpError

__all__ = [
    "BLKTRACE_START",
    "BLKTRACE_STOP",
    "GuestError",
    "GuestHandle",
    "GuestImage",
    "GuestResult",
    "GuestTimeout",
    "blktrace_start",
    "blktrace_stop",
    "Qmp",
    "QmpError",
    "build_guest",
    "default_cache_dir",
    "make_scratch",
    "initrd_with_script",
    "qemu_command",
    "read_scratch",
    "run_guest",
    "start_guest",
]
