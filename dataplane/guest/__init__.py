"""The test guest: a Debian kernel and a busybox initramfs booted in QEMU against a
vhost-user-blk socket (kit: `python -m dataplane.guest`), and `dataplane demo` (demo)."""

from .kit import (
    GuestError,
    GuestHandle,
    GuestImage,
    GuestResult,
    GuestTimeout,
    build_guest,
    default_cache_dir,
    initrd_with_script,
    qemu_command,
    run_guest,
    start_guest,
)
from .qmp import Qmp, QmpError

__all__ = [
    "GuestError",
    "GuestHandle",
    "GuestImage",
    "GuestResult",
    "GuestTimeout",
    "Qmp",
    "QmpError",
    "build_guest",
    "default_cache_dir",
    "initrd_with_script",
    "qemu_command",
    "run_guest",
    "start_guest",
]
