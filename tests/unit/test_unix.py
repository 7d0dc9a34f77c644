"""connect_unix (dataplane/unix.py), the connect of both clients: the vhost-user front end's
(driver.VhostUserClient) and the management socket's (rpc.Client).

A listener that serves one front end at a time, or one call at a time, lets others wait in
its backlog. When that is full, connect() on a socket with a timeout says EAGAIN at once
(seen on a busy CI host after the fuzz campaign's streams). The clients wait for room, up to
their timeout, and then say so."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from dataplane.driver import VhostUserClient
from dataplane.errors import ConfigError, DeviceError
from dataplane.rpc import Client
from dataplane.unix import BacklogFull, connect_unix

CLIENTS = {
    "unix": (lambda path, timeout: connect_unix(path, timeout), BacklogFull),
    "vhost-user": (lambda path, timeout: VhostUserClient(path, timeout=timeout), DeviceError),
    "rpc": (lambda path, timeout: Client(path, timeout=timeout), ConfigError),
}


@pytest.fixture
def full_backlog(tmp_path) -> Iterator[tuple[str, socket.socket, list[socket.socket]]]:
    """A listener that accepts nothing, its backlog full: (path, listener, the waiting sockets)."""
    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    waiting = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            waiting.append(s)
            try:
                s.connect(path)
            except BlockingIOError:
                break
        yield path, listener, waiting
    finally:
        for s in waiting:
            s.close()
        listener.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_a_full_listen_backlog_is_waited_out_up_to_the_timeout(full_backlog, client):
    path, listener, waiting = full_backlog
    connect, error = CLIENTS[client]
    started = time.monotonic()
    with pytest.raises(error, match="backlog stayed full for 0.3 s"):
        connect(path, 0.3)
    assert time.monotonic() - started >= 0.3
    accepted = []

    def make_room() -> None:
        time.sleep(0.2)
        for _ in waiting:
            try:
                accepted.append(listener.accept()[0])
            except BlockingIOError:
                break

    listener.setblocking(False)
    thread = threading.Thread(target=make_room)
    thread.start()
    conn = connect(path, 5)   # in the backlog once there is room
    thread.join()
    conn.close()
    for s in accepted:
        s.close()


def test_other_failures_are_raised_as_they_are(tmp_path):
    with pytest.raises(FileNotFoundError):
        connect_unix(str(tmp_path / "absent.sock"), 1.0)
    with pytest.raises(ConfigError, match="no management socket at"):
        Client(tmp_path / "absent.sock", timeout=1.0)
    with pytest.raises(DeviceError, match="cannot connect to"):
        VhostUserClient(str(tmp_path / "absent.sock"), timeout=1.0)
