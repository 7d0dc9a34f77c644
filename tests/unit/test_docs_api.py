"""docs/api.md is executable: every ```python block runs, in order, in one namespace, against a
`dataplane serve` started here (a 64 MiB file, 2 queues). The examples see `SOCKET` (the
backend's socket), `RPC_SOCKET` (its management socket) and `TMPDIR` (a scratch directory)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "api.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


BLOCKS = python_blocks(DOC.read_text())


class DocSession:
    """Runs the blocks in order, each at most once; a failure stops the ones after it."""

    def __init__(self, namespace: dict) -> None:
        self.namespace = namespace
        self.done = 0
        self.failed: int | None = None

    def run_through(self, index: int) -> None:
        while self.done <= index:
            if self.failed is not None:
                line = BLOCKS[self.failed][0]
                pytest.fail(f"an earlier example (docs/api.md line {line}) failed", pytrace=False)
            line, code = BLOCKS[self.done]
            try:
                exec(compile(code, f"{DOC}:{line}", "exec"), self.namespace)   # noqa: S102
            except BaseException:
                self.failed = self.done
                raise
            self.done += 1


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DocSession]:
    tmp = tmp_path_factory.mktemp("docs-api")
    disk = tmp / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    sock = tmp / "vhost.sock"
    log = open(tmp / "serve.log", "w")   # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataplane", "--log-level", "warning", "serve", "--socket", str(sock),
         "--disk", str(disk), "--queues", "2", "--cache", "writeback",
         "--rpc-socket", str(tmp / "rpc.sock")],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, (tmp / "serve.log").read_text()
            assert time.monotonic() < deadline, "dataplane serve did not listen within 30 s"
            time.sleep(0.05)
        yield DocSession({"__name__": "docs_api", "SOCKET": str(sock), "TMPDIR": str(tmp),
                          "RPC_SOCKET": str(tmp / "rpc.sock")})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_the_walkthrough_covers_the_api():
    code = "\n".join(c for _, c in BLOCKS)
    assert len(BLOCKS) >= 8
    for api in ("Device.connect", ".submit(", ".wait(", ".load(", "Job(", "dp_hist_percentile",
                "fetch_stats", "to_json(", "rpc.export_add", "export_remove"):
        assert api in code, f"docs/api.md has no example using {api}"


@pytest.mark.parametrize("index", range(len(BLOCKS)),
                         ids=[f"line{line}" for line, _ in BLOCKS])
def test_example(session: DocSession, index: int) -> None:
    session.run_through(index)
