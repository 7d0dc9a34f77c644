"""Listening sockets handed to the daemon instead of paths it binds, and telling systemd it is
ready.

* systemd socket activation (sd_listen_fds(3)): when LISTEN_PID is this process, descriptors
  3 .. 3+LISTEN_FDS-1 are listening sockets, named by LISTEN_FDNAMES (colon-separated, one
  per descriptor; a socket unit's FileDescriptorName=). The variables are unset once read, so
  no child inherits them.
* any other listening UNIX stream socket open at start (`--socket-fd N`, as QEMU's
  vhost-user-blk qtest hands one to qemu-storage-daemon).

An export takes one by number or by name (`socket_fd = 3`, `socket_fd = "vm1"`, or
`addr = { type = "fd", str = ... }`), holds it while it exists and gives it back when removed,
so the same socket can serve a later export (systemd keeps its own copy and its path). Only
sockets found at start can be taken: a number sent over RPC can never reach a descriptor the
daemon opened itself (its RPC socket, another export's listener).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from ..errors import ConfigError

log = logging.getLogger("dataplane.vhost")

SD_LISTEN_FDS_START = 3


@dataclass
class HandedSocket:
    fd: int
    sock: socket.socket
    name: str | None          # LISTEN_FDNAMES entry (None: inherited without a name)
    user: str | None = None   # the export holding it

    @property
    def label(self) -> str:
        return f"fd {self.fd}" + (f" ({self.name!r} from systemd)" if self.name else "")


class HandedSockets:
    """The listening sockets this process was given at start."""

    def __init__(self) -> None:
        self.sockets: dict[int, HandedSocket] = {}
        self.activation_names: list[str] = []

    @classmethod
    def from_process(cls, env: MutableMapping[str, str] | None = None,
                     scan_inherited: bool = True) -> HandedSockets:
        """Read systemd's variables (and unset them) and, with scan_inherited, pick up every
        other listening UNIX stream socket among the open descriptors."""
        env = os.environ if env is None else env
        handed = cls()
        for fd, name in _listen_fds(env):
            handed._adopt(fd, name, from_systemd=True)
        if scan_inherited:
            for fd in _open_fds():
                if fd >= SD_LISTEN_FDS_START and fd not in handed.sockets:
                    handed._adopt(fd, None, from_systemd=False)
        return handed

    def _adopt(self, fd: int, name: str | None, from_systemd: bool) -> None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            if from_systemd:
                log.warning("LISTEN_FDS: fd %d is not a socket: ignored", fd)
            return
        try:
            ok = (sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
                  and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        except OSError:
            ok = False
        if not ok:
            sock.detach()     # not ours to close: some other descriptor of the process
            if from_systemd:
                log.warning("LISTEN_FDS: fd %d is not a listening UNIX stream socket: ignored", fd)
            return
        os.set_inheritable(fd, False)
        self.sockets[fd] = HandedSocket(fd, sock, name)
        if name:
            self.activation_names.append(name)

    def find(self, ref: str) -> HandedSocket:
        """The socket a config names: a descriptor number or a LISTEN_FDNAMES name."""
        if ref.isdigit():
            handed = self.sockets.get(int(ref))
            if handed is None:
                raise ConfigError(f"fd {ref} was not handed over as a listening UNIX socket at start"
                                  f" (handed over: {self.describe_all()})")
            return handed
        matches = [h for h in self.sockets.values() if h.name == ref]
        if not matches:
            raise ConfigError(f"no socket named {ref!r} was handed over (LISTEN_FDNAMES:"
                              f" {':'.join(self.activation_names) or 'none'})")
        free = [h for h in matches if h.user is None]
        return (free or matches)[0]

    def claim(self, ref: str, user: str) -> HandedSocket:
        handed = self.find(ref)
        if handed.user is not None:
            raise ConfigError(f"{handed.label} already serves export {handed.user!r}")
        handed.user = user
        return handed

    def release(self, fd: int) -> None:
        handed = self.sockets.get(fd)
        if handed is not None:
            handed.user = None

    def describe_all(self) -> str:
        return ", ".join(h.label for h in self.sockets.values()) or "none"

    def unclaimed(self) -> list[HandedSocket]:
        return [h for h in self.sockets.values() if h.user is None]

    def close(self) -> None:
        for handed in self.sockets.values():
            handed.sock.close()
        self.sockets.clear()


def _listen_fds(env: MutableMapping[str, str]) -> list[tuple[int, str | None]]:
    """(fd, name) of systemd's sockets, when they are for this process; unsets the variables."""
    pid, count, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(var, None)
    if pid is None or count is None:
        return []
    if not pid.isdigit() or int(pid) != os.getpid():
        return []        # meant for another process (our parent): not ours
    if not count.isdigit():
        log.warning("LISTEN_FDS=%r is not a number: ignored", count)
        return []
    n = int(count)
    labels = names.split(":") if names else []
    if names is not None and len(labels) != n:
        log.warning("LISTEN_FDNAMES has %d name(s) for %d socket(s): names ignored", len(labels), n)
        labels = []
    return [(SD_LISTEN_FDS_START + i, labels[i] if labels else "unknown") for i in range(n)]


def _open_fds() -> list[int]:
    try:
        return sorted(int(name) for name in os.listdir("/proc/self/fd"))
    except OSError:
        return []


def sd_notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Tell the service manager about our state ("READY=1", "STOPPING=1"); a no-op (False)
    without NOTIFY_SOCKET. An address starting with @ is in the abstract namespace."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
        return True
    log.warning("NOTIFY_SOCKET %s: could not send %s", env.get("NOTIFY_SOCKET"), state)
    return False
