"""contrib/ holds what a host needs to run the daemon under systemd: the units parse
(`systemd-analyze verify`, which needs no systemd as PID 1), the sample config is valid, and
the service's command line is one serve accepts.

verify insists that every Exec*= binary exists, so it checks copies whose ExecStart names the
`dataplane` entry point next to this interpreter; warnings (an unknown key, a bad value) leave
its exit status at 0, so any output fails the check too; the control shows broken copies
caught."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dataplane.cli import build_parser
from dataplane.config import load_config, merge

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
UNITS = ("dataplane.service", "dataplane-export@.socket")
INSTALLED_PATH = "/usr/bin/dataplane"

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="no systemd-analyze (apt-get install systemd)")


def verify(unit_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *(f"./{u}" for u in UNITS)],
                          cwd=unit_dir, capture_output=True, text=True, timeout=60, check=False)


def copy_units(dest: Path, edit: dict[str, tuple[str, str]] | None = None) -> Path:
    entry = Path(sys.executable).with_name("dataplane")
    assert entry.is_file(), f"no dataplane entry point at {entry}"
    dest.mkdir()
    for unit in UNITS:
        text = (CONTRIB / unit).read_text().replace(INSTALLED_PATH, str(entry))
        if edit and unit in edit:
            old, new = edit[unit]
            assert old in text, f"{old!r} not in {unit}"
            text = text.replace(old, new)
        (dest / unit).write_text(text)
    return dest


@needs_systemd_analyze
def test_units_verify_clean(tmp_path: Path) -> None:
    assert INSTALLED_PATH in (CONTRIB / "dataplane.service").read_text()
    proc = verify(copy_units(tmp_path / "units"))
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), (
        f"systemd-analyze verify ({proc.returncode}):\n{proc.stdout}{proc.stderr}")


@needs_systemd_analyze
@pytest.mark.parametrize(("unit", "old", "new", "complaint"), [
    ("dataplane.service", "Type=notify", "Type=notify\nExecStrat=/bin/true", "Unknown key"),
    ("dataplane.service", "Type=notify", "Type=bogus", "Failed to parse service type"),
    ("dataplane-export@.socket", "ListenStream=", "ListenStraem=", "no Listen setting"),
    ("dataplane-export@.socket", "Service=dataplane.service", "Service=missing.service", "not loaded"),
])
def test_verify_catches_a_broken_unit(tmp_path: Path, unit: str, old: str, new: str, complaint: str) -> None:
    """The control: the same check on a broken copy reports it."""
    proc = verify(copy_units(tmp_path / "units", {unit: (old, new)}))
    assert complaint in proc.stdout + proc.stderr, f"{proc.returncode}: {proc.stdout}{proc.stderr}"


def test_the_service_runs_serve_on_the_sample_config() -> None:
    lines = (CONTRIB / "dataplane.service").read_text().splitlines()
    exec_start = next(line.split("=", 1)[1] for line in lines if line.startswith("ExecStart="))
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED_PATH
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and str(args.config) == "/etc/dataplane/dataplane.toml"
    config = merge(load_config(CONTRIB / "dataplane.toml"), {})
    assert [e.name for e in config.exports] == ["vm1-root", "vm2-data"]
    root, data = config.exports
    assert (root.socket_group, root.socket_mode) == ("kvm", 0o660)
    assert str(root.addr) == "/run/dataplane/vm1-root.sock"
    assert (data.addr.type, data.addr.fd) == ("fd", "vm2-data")       # dataplane-export@vm2-data.socket
    assert config.rpc_socket == Path("/run/dataplane/rpc.sock")
    socket_unit = (CONTRIB / "dataplane-export@.socket").read_text()
    assert "FileDescriptorName=%i" in socket_unit and "ListenStream=/run/dataplane/%i.sock" in socket_unit
