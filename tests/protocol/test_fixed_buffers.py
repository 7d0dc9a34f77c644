"""Guest memory and the backing file registered with the I/O threads' io_uring (engine/fixed.c).

A file disk's reads and writes of one buffer go out as READ_FIXED / WRITE_FIXED on a fixed file
(the queue's `fixed_ios` counts them, and the ring's fdinfo lists what is registered); memory
hot-plugged while the rings run is registered on the engine's thread before requests use it,
and let go of when it is removed; a region is registered in pieces (1 GiB in production, made
small here) and a buffer across two pieces goes out as readv; where the kernel refuses
(RLIMIT_MEMLOCK without CAP_IPC_LOCK) requests go out as readv/writev and serve says why;
`--fixed none` registers nothing, serve's default (`files`) only the file.

`serve --iopoll` (IORING_SETUP_IOPOLL) on a device without poll queues (this machine's) says
why and serves interrupt-driven; with `--debug-iopoll-without-poll-queues` the polled path runs
anyway (the kernel completes by interrupt, the I/O thread reaps by polling), and data stays
right. Data is verified throughout.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest
from hotplug import hot_plug_under_load
from serve_process import ServeProcess

from dataplane.backend import fetch_stats
from dataplane.core import lib
from dataplane.driver import Device
from dataplane.driver.load import Job, run_load
from dataplane.placement import iopoll_unsupported
from dataplane.protocol import virtio_blk as vb

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def assert_clean(result) -> None:
    assert result.error == 0, result.summary_of_problems()
    assert result.io_errors == 0, result.summary_of_problems()
    assert result.verify_failures == 0, result.summary_of_problems()


def registered(pid: int) -> tuple[list[str], list[int]]:
    """What the io_urings of a process have registered, as the kernel lists it in their fdinfo:
    the files' paths and the buffers' lengths ("UserFiles:", "UserBufs:" and one line each)."""
    files: list[str] = []
    bufs: list[int] = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "io_uring" not in os.readlink(f"/proc/{pid}/fd/{fd}"):
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        section = None
        for line in info.splitlines():
            if not line.startswith(" "):
                section = line.split(":")[0]
                continue
            if ":" not in line:
                continue
            value = line.split(":", 1)[1].strip()
            if section == "UserFiles" and value.startswith("/"):
                files.append(value)
            elif section == "UserBufs" and "/" in value:
                bufs.append(int(value.rsplit("/", 1)[1]))
    return files, bufs


def test_file_disk_reads_and_writes_through_registered_buffers(start_backend, disk_file):
    backend = start_backend(str(disk_file), queues=1)
    job = Job(rw="randrw", bs=4096, iodepth=16, runtime=0.5, verify=True, size=32 * MiB)
    with Device.connect(backend.socket, queues=1, memory=job.memory_needed(1)) as dev:
        assert_clean(run_load(dev, job))
        stats = backend.device.stats()[0]
        assert stats["fixed_buffers"] == 1 and stats["fixed_error"] == 0
        assert stats["fixed_ios"] == stats["reads"] + stats["writes"] > 1000
        # the engine's ring (this process's): the image and the one region are registered
        files, bufs = registered(os.getpid())
        assert str(disk_file) in files
        sizes = [size for _, size, *_ in dev.mem.table()]
        assert all(size in bufs for size in sizes), (dev.mem.table(), bufs)
    # The queue let go of the memory when it stopped: the kernel lists it no more. (Asked of
    # the kernel, not of the session's queues, which the server's loop frees meanwhile.)
    deadline = time.monotonic() + 5
    while any(size in registered(os.getpid())[1] for size in sizes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(size in registered(os.getpid())[1] for size in sizes), registered(os.getpid())


def test_fixed_none_registers_nothing(start_backend, disk_file):
    backend = start_backend(str(disk_file), queues=1, fixed="none")
    job = Job(rw="randrw", bs=4096, iodepth=8, runtime=0.3, verify=True, size=16 * MiB)
    with Device.connect(backend.socket, queues=1, memory=job.memory_needed(1)) as dev:
        assert_clean(run_load(dev, job))
        stats = backend.device.stats()[0]
        assert stats["fixed_ios"] == 0 and stats["fixed_buffers"] == 0
        assert stats["reads"] + stats["writes"] > 100


def test_hot_plugged_memory_is_registered_on_the_engine_thread(start_backend, disk_file):
    """While queues 0 and 1 verify data, memory comes and goes (ADD_MEM_REG / REM_MEM_REG); queue 2
    does I/O through each piece of it: every one of those requests is a fixed one, so the new
    region was registered before its first request, and removing it lets go of it."""
    backend = start_backend(str(disk_file), queues=3)
    job = Job(rw="randrw", bs=4096, iodepth=16, runtime=1.5, verify=True, size=32 * MiB)
    with Device.connect(backend.socket, queues=3, memory=job.memory_needed(3)) as dev:
        seen: dict[str, dict] = {}

        def phase(name: str, cycle: int) -> None:
            now = backend.device.stats()[2]
            if name == "start":
                seen["before"] = now
            elif name == "added":
                assert now["fixed_buffers"] == seen["before"]["fixed_buffers"] + 2
            elif name == "io":
                assert now["fixed_ios"] - seen["before"]["fixed_ios"] == 4, "hot-plugged memory went as readv"
            else:
                assert now["fixed_buffers"] == seen["before"]["fixed_buffers"]

        result, _ = hot_plug_under_load(dev, job, areas=2, min_cycles=3, offset=40 * MiB, phase=phase)
        assert_clean(result)
        stats = backend.device.stats()
        assert all(s["fixed_error"] == 0 for s in stats)
        assert stats[0]["fixed_ios"] == stats[0]["reads"] + stats[0]["writes"]


def test_a_region_is_registered_in_pieces(start_backend, disk_file):
    """Pieces of 1 MiB (1 GiB in production): a 16 MiB table is 16 buffers; a request whose
    buffer lies across two of them goes out as readv, and its data is right either way."""
    assert lib.dp_debug_fixed_piece(1 * MiB) == 0
    try:
        backend = start_backend(str(disk_file), queues=1)
        with Device.connect(backend.socket, queues=1, memory=16 * MiB) as dev:
            dev.write(0, b"\x5a" * 4096)
            stats = backend.device.stats()[0]
            assert stats["fixed_buffers"] == 16
            fixed = stats["fixed_ios"]
            assert fixed >= 1
            buf = 3 * MiB - 2048                   # across the boundary of pieces 2 and 3
            req = dev.submit(vb.ReqType.IN, 0, read_len=4096, buf=buf)
            assert dev.wait([req], timeout=5)[id(req)] == (vb.Status.OK, 4097)
            assert dev.mem.read(buf, 4096) == b"\x5a" * 4096
            assert backend.device.stats()[0]["fixed_ios"] == fixed   # that one was not fixed
            dev.release(req)
    finally:
        lib.dp_debug_fixed_piece(0)


@pytest.mark.skipif(not (shutil.which("prlimit") and shutil.which("setpriv")),
                    reason="needs prlimit and setpriv (util-linux)")
def test_refused_registration_falls_back_to_readv(tmp_path, disk_file):
    """Without CAP_IPC_LOCK and with a 1 MiB RLIMIT_MEMLOCK the kernel refuses to pin the
    guest's memory: serve says so once and serves every request through readv/writev."""
    sock = tmp_path / "serve.sock"
    prefix = ["prlimit", f"--memlock={MiB}:{MiB}", "setpriv", "--bounding-set", "-ipc_lock",
              "--inh-caps", "-ipc_lock"]
    serve = ServeProcess(tmp_path / "serve.log", sock, str(disk_file), ["--queues", "1", "--fixed", "all"],
                         prefix=prefix)
    try:
        job = Job(rw="randrw", bs=4096, iodepth=8, runtime=0.3, verify=True, size=16 * MiB)
        with Device.connect(str(sock), queues=1, memory=job.memory_needed(1)) as dev:
            assert_clean(run_load(dev, job))
            assert serve.wait_log("not registered with io_uring as fixed buffers", 5), serve.log()
        name = errno.errorcode[errno.ENOMEM]
        assert f"({name}, RLIMIT_MEMLOCK too small for it without CAP_IPC_LOCK)" in serve.log()
        assert serve.log().count("not registered with io_uring") == 1
        assert "fixed buffer(s)" not in serve.log()
    finally:
        serve.terminate()


def test_serve_default_registers_the_file_only(tmp_path, disk_file):
    sock = tmp_path / "serve.sock"
    serve = ServeProcess(tmp_path / "serve.log", sock, str(disk_file), ["--queues", "1"])
    try:
        job = Job(rw="randrw", bs=4096, iodepth=8, runtime=0.3, verify=True, size=16 * MiB)
        with Device.connect(str(sock), queues=1, memory=job.memory_needed(1)) as dev:
            assert_clean(run_load(dev, job))
            q = fetch_stats(str(sock))["queues"][0]
            assert q["fixed_ios"] == 0 and q["fixed_buffers"] == 0 and q["fixed_error"] == 0
            files, bufs = registered(serve.proc.pid)
            assert str(disk_file) in files and bufs == []
    finally:
        serve.terminate()


def serve_iopoll(tmp_path: Path, disk_file: Path, *extra: str) -> tuple[ServeProcess, dict]:
    sock = tmp_path / "serve.sock"
    serve = ServeProcess(tmp_path / "serve.log", sock, str(disk_file), ["--queues", "1", "--iopoll", *extra])
    job = Job(rw="randrw", bs=4096, iodepth=8, runtime=0.5, verify=True, size=16 * MiB)
    try:
        with Device.connect(str(sock), queues=1, memory=job.memory_needed(1)) as dev:
            assert_clean(run_load(dev, job))
            queue = fetch_stats(str(sock))["queues"][0]
    except BaseException:
        serve.terminate()
        raise
    return serve, queue


def test_iopoll_on_a_device_without_poll_queues_says_why(tmp_path, disk_file):
    """This machine's disks have no poll queues: serve says which device and why, then serves
    with interrupts. (On one with poll queues the queue starts with polled I/O instead.)"""
    why = iopoll_unsupported(str(disk_file))
    serve, queue = serve_iopoll(tmp_path, disk_file)
    try:
        log = serve.log()
        if why is None:
            assert "polled I/O (IOPOLL)" in log
            assert queue["polled_ios"] > 0
        else:
            assert f"--iopoll: {why}; serving with interrupt-driven I/O" in log
            assert "has no poll queues: /sys/block/" in why and "queue/io_poll is 0" in why
            assert "polled I/O (IOPOLL)" not in log
            assert queue["polled_ios"] == 0
        assert queue["reads"] + queue["writes"] > 100 and queue["errors"] == 0
    finally:
        serve.terminate()


def test_iopoll_path_runs_where_the_kernel_completes_by_interrupt(tmp_path, disk_file):
    """The polled ring, made to run on a device that cannot poll: the I/O thread reaps it by
    polling (the kernel completes those requests by interrupt), every read and write goes
    through it or, where the kernel refuses a polled request (ext4: reads of unwritten blocks),
    again through the engine's ring; verify passes."""
    serve, queue = serve_iopoll(tmp_path, disk_file, "--debug-iopoll-without-poll-queues")
    try:
        assert "polled I/O (IOPOLL)" in serve.log()
        assert queue["errors"] == 0
        total = queue["reads"] + queue["writes"]
        assert total > 100 and queue["polled_ios"] > total // 2
    finally:
        serve.terminate()
