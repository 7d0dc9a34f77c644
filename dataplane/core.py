"""Loads the C core (dataplane._core) and turns its -errno returns into exceptions."""

from __future__ import annotations

import errno
import os

from .errors import DeviceError

try:
    from ._core import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "dataplane's C core is not built: run `pip install -e .` (needs gcc and liburing-dev)"
    ) from exc

__all__ = ["ffi", "lib", "check"]


def check(rc: int, what: str) -> int:
    """Return rc when it is >= 0; raise DeviceError naming what failed otherwise."""
    if rc < 0:
        code = -rc
        name = errno.errorcode.get(code, str(code))
        raise DeviceError(f"{what}: {os.strerror(code)} ({name})")
    return rc
