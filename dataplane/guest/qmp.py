"""A small QMP client (QEMU's JSON monitor): what the migration and memory-hotplug tests and
the README's walk-through need from a running QEMU (`-qmp unix:PATH,server=on,wait=off`)."""

from __future__ import annotations

import json
import select
import socket
import time
from pathlib import Path
from typing import Any

from ..errors import DataplaneError


class QmpError(DataplaneError):
    """QEMU answered a command with an error, or the monitor went away."""


class Qmp:
    """One QMP session: `cmd("query-migrate")` returns the command's "return" value; the
    events that arrive meanwhile are kept for `wait_event`."""

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except OSError as exc:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"QMP socket {path}: {exc.strerror}") from None
                time.sleep(0.05)
        self.timeout = timeout
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        greeting = self._read(timeout)
        if greeting is None or "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or None when none came within timeout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return None
            try:
                chunk = self.sock.recv(65536)
            except OSError as exc:
                raise QmpError(f"QMP: {exc.strerror}") from None
            if not chunk:
                raise QmpError("QMP: QEMU closed the monitor")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
        """Run a command; keyword arguments are QMP's with "_" for "-" (max_bandwidth), args
        are passed as they are."""
        arguments = {**(args or {}), **{k.replace("_", "-"): v for k, v in kw.items()}}
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall((json.dumps(msg) + "\n").encode())
        while True:
            reply = self._read(self.timeout)
            if reply is None:
                raise QmpError(f"{name}: no answer within {self.timeout} s")
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QmpError(f"{name}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def wait_event(self, name: str, timeout: float, **data: Any) -> dict[str, Any]:
        """The first event `name` (whose data holds these items) seen or arriving in time."""
        deadline = time.monotonic() + timeout

        def matches(ev: dict[str, Any]) -> bool:
            return ev.get("event") == name and all(ev.get("data", {}).get(k) == v for k, v in data.items())

        while True:
            for i, ev in enumerate(self.events):
                if matches(ev):
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            ev = self._read(left) if left > 0 else None
            if ev is None:
                raise QmpError(f"no {name} event within {timeout} s")
            self.events.append(ev)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
