"""Sockets handed to serve (backend.handover): systemd's LISTEN_* variables read as
sd_listen_fds(3) says, inherited listening sockets found, claimed and given back, and
sd_notify's datagram. (The whole path through systemd-socket-activate is in
protocol/test_daemon.py.)"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from dataplane.backend.handover import HandedSockets, _listen_fds, sd_notify
from dataplane.errors import ConfigError


def test_listen_fds_for_this_process_only_and_the_variables_are_unset() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "vm1:vm2", "PATH": "/bin"}
    assert _listen_fds(env) == [(3, "vm1"), (4, "vm2")]
    assert env == {"PATH": "/bin"}
    assert _listen_fds({"LISTEN_PID": "1", "LISTEN_FDS": "2"}) == []          # our parent's
    assert _listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"}) == []
    # names that do not match the count are ignored; no names at all is "unknown" (sd_listen_fds)
    assert _listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"}) == [
        (3, "unknown"), (4, "unknown")]
    assert _listen_fds({}) == []


def test_inherited_listening_sockets_are_claimed_by_number_and_given_back(tmp_path: Path) -> None:
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / "l.sock"))
    listening.listen(1)
    plain = socket.socket(socket.AF_UNIX)          # not listening: not taken
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    handed = HandedSockets.from_process(env={})
    try:
        assert listening.fileno() in handed.sockets
        assert plain.fileno() not in handed.sockets and udp.fileno() not in handed.sockets
        fd = str(listening.fileno())
        got = handed.claim(fd, "vm1")
        assert got.sock.fileno() == listening.fileno() and got.label == f"fd {fd}"
        with pytest.raises(ConfigError, match=f"fd {fd} already serves export 'vm1'"):
            handed.claim(fd, "vm2")
        handed.release(int(fd))
        assert handed.claim(fd, "vm2").user == "vm2"
        with pytest.raises(ConfigError, match=f"fd {plain.fileno()} was not handed over"):
            handed.find(str(plain.fileno()))
        with pytest.raises(ConfigError, match=r"no socket named 'vm9' was handed over \(LISTEN_FDN"):
            handed.find("vm9")
    finally:
        for h in handed.sockets.values():
            h.sock.detach()     # the test's own sockets: close them below, once
        listening.close()
        plain.close()
        udp.close()


def test_sd_notify(tmp_path: Path) -> None:
    assert sd_notify("READY=1", env={}) is False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind(str(tmp_path / "notify"))
        assert sd_notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert sink.recv(64) == b"READY=1"
    name = f"dp-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind("\0" + name)                      # abstract namespace: "@name"
        assert sd_notify("STOPPING=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sink.recv(64) == b"STOPPING=1"
    assert sd_notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "nobody")}) is False
