"""A libvirt-managed VM whose disk is an export: Debian 12's libvirtd (9.0) and virsh define
and start a TCG domain (dataplane.guest.libvirt's XML) on an export added over JSON-RPC; the
guest's fio verify passes on both virtqueues. QEMU runs as libvirt-qemu, so the export's
socket is group kvm, mode 0660, in a directory that user can search; the control test shows
the default (root, 0600) refused.

The libvirtd is a private one (tests/e2e/libvirt_daemon.py), started once per run."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from fio_scripts import fio_job_errors, fio_verify_script
from libvirt_daemon import LibvirtDaemon
from serve_process import DaemonProcess

from dataplane.guest import GuestImage, initrd_with_script
from dataplane.guest.libvirt import render_domain_xml

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

DISK_SIZE = 256 << 20
QUEUES = 2
MEMORY_MIB = 1024
GUEST_TIMEOUT = 240.0      # boot + fio + power-off under TCG on a busy 2-core host
DENIED_TIMEOUT = 30.0
CMDLINE = "console=ttyS0 quiet panic=-1 dpguest.disk=1"
LIBVIRT_QEMU_UID = 64055   # Debian's libvirt-qemu

FIO_SCRIPT = fio_verify_script(size_mib=24, stride_mib=32)

_STOP_RE = re.compile(r"\[(\S+)\] vq(\d+) stopped at avail_idx \d+: \d+ requests \((\d+) reads, "
                      r"(\d+) writes,.*\), (\d+) errors")


def guest_files(libvirtd: LibvirtDaemon, image: GuestImage, name: str,
                script: str) -> tuple[Path, Path, Path]:
    """(dir, kernel, initrd) in a directory libvirt-qemu can reach (/root's cache and pytest's
    tmp are 0700). Copies: libvirt chowns kernel and initrd to libvirt-qemu while it runs."""
    gdir = libvirtd.guest_dir(name)
    kernel = gdir / "kernel"
    shutil.copyfile(image.kernel, kernel)
    initrd = initrd_with_script(image, script, gdir / "initrd")
    return gdir, kernel, initrd


@pytest.fixture
def daemon(tmp_path: Path):
    """`dataplane serve` with no export at start: the tests add theirs over RPC."""
    d = DaemonProcess(tmp_path, [])
    yield d
    d.kill()


def test_libvirt_tcg_domain_fio_verify_on_an_export(libvirtd: LibvirtDaemon, guest_image: GuestImage,
                                                   daemon: DaemonProcess, tmp_path: Path) -> None:
    """virsh define + start of a TCG domain whose vda is an export; fio verify passes on both
    virtqueues; the attached front end is QEMU as libvirt-qemu, one TCG thread per vCPU."""
    name = "dp-fio-verify"
    gdir, kernel, initrd = guest_files(libvirtd, guest_image, name, FIO_SCRIPT)
    disk = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", str(DISK_SIZE), str(disk)], check=True)
    sock = gdir / "vm.sock"
    client = daemon.client()
    client.export_add(name="vm", disk=str(disk), socket=str(sock), queues=QUEUES,
                      socket_group="kvm", socket_mode="0660")
    console = tmp_path / "console.log"
    xml = render_domain_xml(name, kernel, initrd, CMDLINE, sock, QUEUES, MEMORY_MIB, console)
    try:
        assert libvirtd.define(xml, tmp_path / "domain.xml") == name
        libvirtd.virsh("start", name)
        pid = libvirtd.qemu_pid(name)
        assert pid is not None, "no pid file for the running domain"
        threads = sorted((t / "comm").read_text().strip() for t in Path(f"/proc/{pid}/task").iterdir())
        deadline = time.monotonic() + 30
        while (front := client.export_get("vm")["front_end"]) is None:
            assert time.monotonic() < deadline, "QEMU never attached"
            time.sleep(0.1)
        finished = libvirtd.wait_state(name, "shut off", GUEST_TIMEOUT)
        out = console.read_text(errors="replace") if console.exists() else ""
        diag = (f"\n--- console ---\n{out[-4000:]}\n--- serve ---\n{daemon.log()[-3000:]}"
                f"\n--- qemu log ---\n{libvirtd.qemu_log_path(name).read_text()[-3000:]}")
        assert finished, f"guest still running after {GUEST_TIMEOUT}s{diag}"
    finally:
        libvirtd.remove_domain(name)
    assert front["pid"] == pid and front["uid"] == LIBVIRT_QEMU_UID, front
    assert {"CPU 0/TCG", "CPU 1/TCG"} <= set(threads), f"not multi-threaded TCG: {threads}"
    assert "DP-MQ 2" in out, f"guest did not see 2 blk-mq queues{diag}"
    jobs = fio_job_errors(out)
    assert jobs == {"q0": "0", "q1": "0"}, f"fio job errors: {jobs}{diag}"
    assert "DP-FIO-RC 0" in out and "DP-GUEST-EXIT 0" in out, f"guest script failed{diag}"
    # the firmware drives the disk first (libvirt gives it bootindex=1), then the kernel: the
    # last stop line of each queue is the guest's
    stats = {int(q): (int(r), int(w), int(e))
             for n, q, r, w, e in _STOP_RE.findall(daemon.log()) if n == "vm"}
    assert sorted(stats) == [0, 1], f"queues that ran: {sorted(stats)}{diag}"
    for vq, (reads, writes, errors) in stats.items():
        assert reads > 0 and writes > 0 and errors == 0, f"vq{vq}: {stats[vq]}{diag}"
    assert client.export_remove("vm") == {"name": "vm", "removed": True}   # nobody attached now
    client.close()
    assert daemon.terminate() == 0
    assert kernel.stat().st_uid == 0 and initrd.stat().st_uid == 0     # libvirt gave them back


def test_an_export_libvirt_qemu_cannot_open_is_refused(libvirtd: LibvirtDaemon, guest_image: GuestImage,
                                                      daemon: DaemonProcess, tmp_path: Path) -> None:
    """The default socket (root, 0600) is refused to libvirt-qemu: QEMU logs EACCES and, with
    reconnect on, retries, so `virsh start` blocks until `virsh destroy`. (The control for the
    test above's socket_group = "kvm", socket_mode = "0660".)"""
    name = "dp-denied"
    gdir, kernel, initrd = guest_files(libvirtd, guest_image, name, "exit 0\n")
    sock = gdir / "vm.sock"
    with daemon.client() as client:
        client.export_add(name="denied", disk="null:64M", socket=str(sock), queues=QUEUES)
    xml = render_domain_xml(name, kernel, initrd, CMDLINE, sock, QUEUES, MEMORY_MIB,
                            tmp_path / "console.log")
    libvirtd.define(xml, tmp_path / "domain.xml")
    start = subprocess.Popen(["virsh", "-c", libvirtd.uri, "start", name], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    qemu_log = libvirtd.qemu_log_path(name)
    try:
        deadline = time.monotonic() + DENIED_TIMEOUT
        while not (qemu_log.exists() and "Permission denied" in qemu_log.read_text()):
            assert time.monotonic() < deadline, (
                f"no EACCES in the QEMU log within {DENIED_TIMEOUT}s:\n"
                f"{qemu_log.read_text() if qemu_log.exists() else '(no log)'}\n{daemon.log()}")
            time.sleep(0.1)
        time.sleep(1)   # a reconnect attempt
        assert start.poll() is None, "virsh start returned while QEMU could not connect"
    finally:
        libvirtd.remove_domain(name)
        out, _ = start.communicate(timeout=30)
    assert start.returncode != 0, out
    assert "front end connected" not in daemon.log()
    assert "Failed to connect to" in qemu_log.read_text()
    assert daemon.terminate() == 0
