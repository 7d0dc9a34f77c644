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

    def __init__(self, log_path: Path, socket: Path, disk: str, args: Sequence[str] = ()) -> None:
        self.name = log_path.stem
        self.log_path = log_path
        self.socket = socket
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dataplane", "serve", "--socket", str(socket), "--disk", disk,
                 *args],
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
