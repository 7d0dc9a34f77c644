"""`dataplane serve` as a subprocess, for the tests that kill and restart it (protocol and
e2e reconnect suites). Importable from every test module: pytest puts tests/ on sys.path for
tests/conftest.py, which also offers it as the `start_serve` fixture."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# A restarted backend says, per queue, what it resubmitted from the inflight region.
RESUBMIT_RE = re.compile(r"vq(\d+): resubmitted (\d+) request\(s\) in flight at the previous back "
                         r"end's end \((\d+) of them older than a request that had completed\)")
SERVE_START_TIMEOUT = 20.0


class ServeProcess:
    """One `dataplane serve` subprocess on a socket, started once it listens; its output goes
    to log_path (its stem names it in messages)."""

    def __init__(self, log_path: Path, socket: Path, disk: str, args: Sequence[str] = (),
                 prefix: Sequence[str] = ()) -> None:
        """prefix: a command that runs serve (prlimit, setpriv, ...)."""
        self.name = log_path.stem
        self.log_path = log_path
        self.socket = socket
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "dataplane", "serve", "--socket", str(socket),
                 "--disk", disk, *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + SERVE_START_TIMEOUT
        while "listening on" not in self.log():
            assert self.proc.poll() is None, f"{self.name} exited {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, (
                f"{self.name} did not listen in {SERVE_START_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float) -> bool:
        """Whether text shows in the log within timeout (False at once if the process ended)."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return text in self.log()
            time.sleep(0.05)
        return True

    def resubmissions(self) -> dict[int, tuple[int, int]]:
        """vq -> (requests resubmitted, of them older than a completed one), from the log."""
        return {int(m[1]): (int(m[2]), int(m[3])) for m in RESUBMIT_RE.finditer(self.log())}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def toml_value(value: object) -> str:
    """A Python value as TOML (strings, numbers, booleans, lists, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, exports: Sequence[dict], **top: object) -> Path:
    """A dataplane.toml: top-level keys, then one [[export]] table per dict."""
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items() if v is not None]
    for export in exports:
        lines += ["", "[[export]]"] + [f"{k} = {toml_value(v)}" for k, v in export.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class DaemonProcess:
    """`dataplane serve --config FILE` with [[export]] tables (and an RPC socket), started once
    every export listens; its output goes to log_path."""

    def __init__(self, tmp: Path, exports: Sequence[dict], *args: str, rpc: bool = True,
                 env: dict[str, str] | None = None, pass_fds: Sequence[int] = (),
                 prefix: Sequence[str] = (), name: str = "daemon", **top: object) -> None:
        self.tmp = tmp
        self.rpc_socket = tmp / f"{name}-rpc.sock" if rpc else None
        self.config = write_config(tmp / f"{name}.toml", exports, rpc_socket=self.rpc_socket, **top)
        self.log_path = tmp / f"{name}.log"
        self.exports = list(exports)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "dataplane", "serve", "--config", str(self.config), *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=env, pass_fds=pass_fds)
        if not prefix:
            self.wait_listening(len(self.exports))

    def wait_listening(self, count: int, timeout: float = SERVE_START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count("listening on") < count or (
                self.rpc_socket is not None and not self.rpc_socket.exists()):
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"serve did not listen in {timeout}s:\n{self.log()}"
            time.sleep(0.02)

    def client(self, timeout: float = 60.0):
        from dataplane.rpc import Client

        assert self.rpc_socket is not None
        return Client(self.rpc_socket, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def run_load(socket: Path, *args: str, queues: int = 2, output: Path | None = None) -> subprocess.Popen:
    """`dataplane load` against a socket, JSON report to output (fio's layout)."""
    argv = [sys.executable, "-m", "dataplane", "--log-level", "warning", "load", "--socket", str(socket),
            "--queues", str(queues), *args]
    if output is not None:
        argv += ["--output-format", "json", "--output", str(output)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
