"""UNIX stream sockets as this project's clients connect them (the vhost-user front end,
driver.client; the management client, rpc.client): `connect_unix`."""

from __future__ import annotations

import math
import socket
import time


class BacklogFull(TimeoutError):
    """The listener's backlog stayed full for the whole timeout."""


def connect_unix(path: str, timeout: float | None) -> socket.socket:
    """A stream socket connected to path, with `timeout` set on it (None: blocking).

    A listener that is slow to accept (a backend serving one front end while others wait, a
    management loop busy with one call) lets connections wait in its backlog; when that is
    full, connect() on a socket with a timeout says EAGAIN at once where a blocking one would
    wait for room. This waits for room, up to the timeout, then raises BacklogFull. Any other
    failure of connect() is raised as it is; the socket is closed either way."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    deadline = time.monotonic() + (math.inf if timeout is None else timeout)
    try:
        while True:
            try:
                sock.connect(path)
                return sock
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BacklogFull(f"{path}: its backlog stayed full for {timeout:g} s") from None
                time.sleep(0.01)
    except BaseException:
        sock.close()
        raise
