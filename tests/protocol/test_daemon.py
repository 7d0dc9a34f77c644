"""One `dataplane serve` with many exports, managed while it runs (JSON-RPC on a UNIX socket):
every export verified under load at once, exports added and removed over RPC beside running
ones, a fuzzed RPC stream and a hostile guest on one export leaving the others serving, and
the control plane answering while one export drains.

The daemons are real processes started from a TOML file of [[export]] tables; the guests are
`dataplane load` processes (the C load generator) and the Python frontend."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_process import DaemonProcess, run_load

from dataplane.driver import Device
from dataplane.errors import DeviceError
from dataplane.protocol import virtio_blk as vb
from dataplane.rpc import EXPORT_BUSY, EXPORT_EXISTS, EXPORT_FAILED, INVALID_PARAMS, NO_SUCH_EXPORT, RpcError

MiB = 1 << 20
pytestmark = pytest.mark.timeout(300)


def disk(tmp: Path, name: str, size: int = 64 * MiB) -> str:
    path = tmp / f"{name}.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def file_exports(tmp: Path, names: list[str], queues: int = 2, **extra: object) -> list[dict]:
    return [{"name": n, "disk": disk(tmp, n), "socket": str(tmp / f"{n}.sock"), "queues": queues, **extra}
            for n in names]


def load_report(proc: subprocess.Popen, output: Path, timeout: float = 120) -> dict:
    """The report of a finished `dataplane load` (Ctrl-C, as in fio, ends a run early, and the
    report and exit status are those of a completed run)."""
    out, _ = proc.communicate(timeout=timeout)
    assert output.exists(), f"no report from dataplane load (rc {proc.returncode}):\n{out}"
    report = json.loads(output.read_text())
    assert proc.returncode == 0, f"dataplane load failed:\n{out}\n{json.dumps(report['jobs'])[:2000]}"
    return report


def assert_verified(report: dict, what: str) -> int:
    """Every job of a `load --verify` report checked data, found no mismatch and no error;
    returns its I/O count."""
    ios = 0
    for job in report["jobs"]:
        dp = job["dataplane"]
        assert job["error"] == 0, f"{what}: job error {job['error']}"
        assert dp["verify_failures"] == 0 and dp["verify_checked"] > 0, f"{what}: {dp}"
        assert job["read"]["total_ios"] > 0 and job["write"]["total_ios"] > 0, what
        ios += job["read"]["total_ios"] + job["write"]["total_ios"]
    return ios


def io_threads(pid: int) -> set[str]:
    names = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            names.add(Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip())
        except FileNotFoundError:
            continue
    return {n for n in names if n.startswith("dp-")}


@pytest.fixture
def daemons(tmp_path: Path):
    started: list[DaemonProcess] = []

    def start(exports: list[dict], *args: str, **kw: object) -> DaemonProcess:
        d = DaemonProcess(tmp_path, exports, *args, name=f"daemon{len(started)}", **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


# ---- acceptance: 8 exports at once -------------------------------------------------------

def test_eight_exports_verified_under_load_at_once(daemons, tmp_path: Path) -> None:
    names = [f"vm{i}" for i in range(8)]
    d = daemons(file_exports(tmp_path, names))
    assert io_threads(d.proc.pid) == set(), "I/O threads start with the first queue"
    loads = {n: run_load(tmp_path / f"{n}.sock", "--verify", "--rw", "randrw", "--bs", "4k",
                         "--iodepth", "8", "--runtime", "10", output=tmp_path / f"{n}.json") for n in names}
    # all eight attached at once (8 loads start slowly on 2 CPUs: wait for the last)
    with d.client() as c:
        deadline = time.monotonic() + 9
        while True:   # attached first, then each front end starts its queues
            attached = sorted(e["name"] for e in c.export_list() if e["attached"])
            running = sum(q["running"] for s in c.stats()["exports"].values() for q in s["queues"])
            if (attached == names and running == 16) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    # the I/O threads are the pool's (one per CPU), not two per export
    threads = io_threads(d.proc.pid)
    assert attached == names and running == 16, (attached, running)
    for n, proc in loads.items():
        assert_verified(load_report(proc, tmp_path / f"{n}.json"), n)
    assert threads == {f"dp-io{i}" for i in range(len(os.sched_getaffinity(d.proc.pid)))}, threads
    with d.client() as c:
        stats = c.stats()["exports"]
    assert sorted(stats) == names
    for n in names:
        assert all(q["errors"] == 0 and q["requests"] > 0 for q in stats[n]["queues"]), stats[n]
    assert d.terminate() == 0
    assert d.log().rstrip().endswith("exited cleanly")
    assert not any((tmp_path / f"{n}.sock").exists() for n in names)


# ---- acceptance: adding and removing while others run -------------------------------------

def test_exports_come_and_go_over_rpc_while_others_run_untouched(daemons, tmp_path: Path) -> None:
    d = daemons(file_exports(tmp_path, ["keep1", "keep2"]))
    keep = {n: run_load(tmp_path / f"{n}.sock", "--verify", "--rw", "randrw", "--iodepth", "16",
                        "--runtime", "8", output=tmp_path / f"{n}.json") for n in ("keep1", "keep2")}
    c = d.client()
    time.sleep(0.5)
    # one comes, is used and verified, and goes
    info = c.export_add(name="new1", disk=disk(tmp_path, "new1"), socket=str(tmp_path / "new1.sock"),
                        queues=2)
    assert info["state"] == "listening" and [r["virtqueue"] for r in info["plan"]] == [0, 1]
    assert_verified(load_report(run_load(tmp_path / "new1.sock", "--verify", "--rw", "randrw",
                                         "--runtime", "1", output=tmp_path / "new1.json"),
                                tmp_path / "new1.json"), "new1")
    assert c.export_remove("new1") == {"name": "new1", "removed": True}
    assert not (tmp_path / "new1.sock").exists()
    # refusals leave everything as it was
    for params, code, text in [
        ({"name": "keep1", "disk": "null:1G", "socket": str(tmp_path / "x.sock")}, EXPORT_EXISTS,
         'an export named "keep1" exists already'),
        ({"name": "dup", "disk": "null:1G", "socket": str(tmp_path / "keep2.sock")}, EXPORT_EXISTS,
         "socket"),
        ({"name": "bad", "disk": "/nonexistent.img", "socket": str(tmp_path / "bad.sock")}, EXPORT_FAILED,
         "does not exist"),
        ({"name": "bad", "disk": "null:1G", "socket": str(tmp_path / "bad.sock"), "queues": 0},
         INVALID_PARAMS, "export_add \"bad\": queues: expected a positive integer, got 0"),
        ({"name": "bad", "disk": "null:1G", "socket_fd": 99}, EXPORT_FAILED, "fd 99 was not handed over"),
    ]:
        with pytest.raises(RpcError) as exc:
            c.export_add(**params)
        assert exc.value.code == code and text in exc.value.message, (params, exc.value)
    with pytest.raises(RpcError) as exc:
        c.export_remove("keep1")               # a front end is attached
    assert exc.value.code == EXPORT_BUSY and "force=true" in exc.value.message
    assert exc.value.data["front_end"]["pid"] == keep["keep1"].pid
    with pytest.raises(RpcError) as exc:
        c.export_remove("nope")
    assert exc.value.code == NO_SUCH_EXPORT
    # one comes and is taken away by force while its guest does I/O
    c.export_add(name="victim", disk=disk(tmp_path, "victim"), socket=str(tmp_path / "victim.sock"))
    dev = Device.connect(str(tmp_path / "victim.sock"), queues=2, timeout=5)
    dev.write(0, b"v" * 4096)
    stop = threading.Event()
    seen: list[str] = []

    def victim_io() -> None:
        while not stop.is_set():
            try:
                dev.write(4096, b"w" * 4096, queue=1)
            except DeviceError as exc:
                seen.append(str(exc))
                return
            except Exception as exc:    # the connection going away
                seen.append(repr(exc))
                return

    th = threading.Thread(target=victim_io)
    th.start()
    time.sleep(0.3)
    removed = c.export_remove("victim", force=True)
    stop.set()
    th.join(10)
    assert removed == {"name": "victim", "removed": True}
    assert seen and "IOERR" in seen[0], seen
    dev.client.close()
    for n, proc in keep.items():
        assert_verified(load_report(proc, tmp_path / f"{n}.json"), n)
    stats = c.stats()["exports"]
    assert sorted(stats) == ["keep1", "keep2"]
    for n in ("keep1", "keep2"):
        assert sum(q["errors"] for q in stats[n]["queues"]) == 0
    c.close()
    assert "removing: 2 queue(s) drained" in d.log()
    assert d.terminate() == 0


# ---- acceptance: a fuzzed RPC stream -----------------------------------------------------

def test_a_fuzzed_rpc_stream_leaves_the_exports_serving(daemons, tmp_path: Path) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    d = daemons(file_exports(tmp_path, ["keep1", "keep2"]))
    examples = int(os.environ.get("DATAPLANE_FUZZ_EXAMPLES", "300"))
    runtime = 600   # a bound only: the loads run until the campaign is over, then get Ctrl-C
    keep = {n: run_load(tmp_path / f"{n}.sock", "--verify", "--rw", "randrw", "--iodepth", "8",
                        "--runtime", str(runtime), output=tmp_path / f"{n}.json") for n in ("keep1", "keep2")}
    started = time.monotonic()
    names = st.sampled_from(["keep1", "keep2", "f1", "f2", "", "x" * 70, "a b"])
    values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                          | st.text(max_size=12) | names
                          | st.sampled_from([str(tmp_path / "keep1.sock"), str(tmp_path / "f1.sock"),
                                             str(tmp_path / "missing-dir" / "x"),   # never outside tmp
                                             "null:1M", "null:0", "rel.sock", "0660"]),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                              st.text(max_size=6), inner, max_size=3), max_leaves=6)
    keys = st.sampled_from(["name", "disk", "socket", "queues", "force", "level", "export", "addr",
                            "socket_fd", "socket_mode", "read_only", "grace_s", "bogus"])
    method = st.sampled_from(["export_add", "export_remove", "export_list", "export_get", "stats",
                              "log_level_set", "threads", "methods", "nope", ""])
    request = st.fixed_dictionaries({"jsonrpc": st.sampled_from(["2.0", "2.0", "1.0"]), "method": method},
                                    optional={"id": st.integers(0, 10**6) | st.text(max_size=4) | st.none(),
                                              "params": st.dictionaries(keys, values, max_size=4)
                                              | st.lists(values, max_size=3)})
    line = (request.map(json.dumps) | st.lists(request, min_size=1, max_size=3).map(json.dumps)
            | values.map(lambda v: json.dumps(v)) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(str(d.rpc_socket))
    buf = bytearray()
    counts = {"answers": 0, "errors": 0}

    def answers_until(marker: int) -> list[dict]:
        got = []
        while True:
            while b"\n" not in buf:
                data = sock.recv(65536)
                assert data, "the daemon closed the RPC connection"
                buf.extend(data)
            end = buf.index(b"\n")
            msg = json.loads(bytes(buf[:end]))
            del buf[:end + 1]
            got.append(msg)
            if isinstance(msg, dict) and msg.get("id") == f"sentinel-{marker}":
                return got

    @settings(max_examples=examples, deadline=None,
              suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(line, min_size=1, max_size=6))
    def campaign(lines: list[str]) -> None:
        safe = []
        for text in lines:
            # never ask to take a survivor away by force: that is allowed, not a fuzz failure
            if "keep" in text and "export_remove" in text and "force" in text:
                continue
            safe.append(text.replace("\n", " "))
        marker = counts["answers"]
        payload = "".join(t + "\n" for t in safe) + json.dumps(
            {"jsonrpc": "2.0", "id": f"sentinel-{marker}", "method": "export_list"}) + "\n"
        sock.sendall(payload.encode("utf-8", "surrogateescape"))
        for msg in answers_until(marker):
            for one in msg if isinstance(msg, list) else [msg]:
                assert one["jsonrpc"] == "2.0" and ("result" in one) != ("error" in one), one
                if "error" in one:
                    assert isinstance(one["error"]["code"], int) and one["error"]["message"], one
                    counts["errors"] += 1
        counts["answers"] += 1

    campaign()
    fuzz_s = time.monotonic() - started
    outlived = [n for n, proc in keep.items() if proc.poll() is None]
    sock.close()
    with d.client() as c:
        listed = {e["name"] for e in c.export_list()}
        assert {"keep1", "keep2"} <= listed
        for extra in listed - {"keep1", "keep2"}:
            c.call("export_remove", name=extra, force=True)
        c.log_level_set("info")
    assert outlived == list(keep), f"a load ended before the campaign ({fuzz_s:.1f}s) it was to outlast"
    for proc in keep.values():
        proc.send_signal(signal.SIGINT)
    for n, proc in keep.items():
        assert_verified(load_report(proc, tmp_path / f"{n}.json"), n)
    assert counts["errors"] > counts["answers"] // 2      # mostly garbage, as intended
    assert d.proc.poll() is None
    print(f"\nrpc fuzz: {counts['answers']} streams in {fuzz_s:.1f}s, {counts['errors']} error answers")
    assert d.terminate() == 0


# ---- acceptance: a hostile guest on one export ------------------------------------------

def test_a_hostile_guest_on_one_export_leaves_the_others_serving(daemons, tmp_path: Path) -> None:
    d = daemons(file_exports(tmp_path, ["victim", "keep"]))
    keep = run_load(tmp_path / "keep.sock", "--verify", "--rw", "randrw", "--iodepth", "16",
                    "--runtime", "5", output=tmp_path / "keep.json")
    time.sleep(0.5)
    # 1. a ring the guest breaks (avail index jumps by more than the ring size)
    dev = Device.connect(str(tmp_path / "victim.sock"), queues=2)
    err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    from dataplane.protocol.vhost_user import Request

    dev.client.set_u64(Request.SET_VRING_ERR, 0, [err_fd])
    ring = dev.rings[0]
    ring.set_avail_idx(ring.avail_idx + ring.num + 1)
    ring.kick()
    import select

    assert select.select([err_fd], [], [], 5)[0], "the ring was not marked broken"
    dev.write(0, b"q1 still works".ljust(512, b"\0"), queue=1)
    os.close(err_fd)
    dev.client.close()          # and leaves mid-session, a broken ring behind
    for r in dev.rings:
        r.close()
    dev.mem.close()
    # 2. garbage on the socket, and a message cut off mid-way
    for junk in (os.urandom(4096), b"\x01\x00\x00\x00\x01\x00\x00\x00\xff\xff"):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(tmp_path / "victim.sock"))
            s.sendall(junk)
            time.sleep(0.2)
    # 3. a request in flight when the guest disconnects
    dev = Device.connect(str(tmp_path / "victim.sock"), queues=1)
    dev.submit(vb.ReqType.OUT, 8, data=b"x" * 65536)
    dev.client.close()
    time.sleep(0.3)
    assert_verified(load_report(keep, tmp_path / "keep.json"), "keep")
    with d.client() as c:
        snap = c.stats()["exports"]
    assert sum(q["errors"] for q in snap["keep"]["queues"]) == 0
    assert sum(q["broken"] for q in snap["victim"]["queues"]) == 0   # the next session starts clean
    # and the victim's export serves the next, well-behaved guest
    with Device.connect(str(tmp_path / "victim.sock"), queues=2) as dev:
        dev.write(0, b"fine".ljust(4096, b"\0"))
        assert dev.read(0, 512)[:4] == b"fine"
    assert "ring broken" in d.log()
    assert d.terminate() == 0


# ---- the control plane stays responsive ----------------------------------------------

@pytest.mark.parametrize("serial", [False, True], ids=["per-export-threads", "debug-serial-control"])
def test_one_export_draining_does_not_hold_the_others(daemons, tmp_path: Path, serial: bool) -> None:
    """export_remove(force) of an export whose requests take 2 s to drain, and a front end that
    stops mid-message on it: meanwhile another export's handshake and the RPC socket answer at
    once. --debug-serial-control (one export's control work at a time, as one blocking loop
    would do) shows the test can see the difference."""
    exports = [{"name": "slow", "disk": "null:64M,latency=fixed:2s", "socket": str(tmp_path / "slow.sock"),
                "queues": 1},
               {"name": "fast", "disk": "null:64M", "socket": str(tmp_path / "fast.sock"), "queues": 1}]
    d = daemons(exports, *(["--debug-serial-control"] if serial else []))
    dev = Device.connect(str(tmp_path / "slow.sock"), queues=1)
    for i in range(8):
        dev.submit(vb.ReqType.IN, i * 8, read_len=4096)
    time.sleep(0.2)
    c = d.client()
    result: list = []
    remover = threading.Thread(target=lambda: result.append(d.client().export_remove("slow", force=True)))
    remover.start()
    time.sleep(0.3)                                # the drain has begun
    t0 = time.monotonic()
    assert [e["name"] for e in c.export_list()] == ["fast", "slow"]
    rpc_s = time.monotonic() - t0
    t0 = time.monotonic()
    with Device.connect(str(tmp_path / "fast.sock"), queues=1) as other:
        other.read(0, 4096)
    handshake_s = time.monotonic() - t0
    remover.join(30)
    assert result == [{"name": "slow", "removed": True}]
    dev.client.close()
    c.close()
    assert rpc_s < 0.5, f"export_list took {rpc_s:.2f}s while another export drained"
    if serial:
        assert handshake_s > 1.0, f"serialised control did not hold the handshake ({handshake_s:.2f}s)"
    else:
        assert handshake_s < 1.0, f"a handshake took {handshake_s:.2f}s while another export drained"
    assert d.terminate() == 0


# ---- sockets handed over --------------------------------------------------------------

def test_socket_fd_handed_over(tmp_path: Path) -> None:
    """--socket-fd N: a listening socket made by the parent (as QEMU's vhost-user-blk qtest does
    for qemu-storage-daemon); serve does not unlink a path it did not bind."""
    path = tmp_path / "given.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(4)
    fd = listener.fileno()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dataplane", "serve", "--socket-fd", str(fd),
                                 "--disk", "null:16M", "--queues", "1", "--name", "given"],
                                stdout=out, stderr=subprocess.STDOUT, pass_fds=[fd])
    listener.close()        # the child has its copy
    try:
        with Device.connect(str(path), queues=1, timeout=20) as dev:
            dev.write(0, b"handed".ljust(512, b"\0"))
            assert dev.read(0, 512) == bytes(512)       # the null disk
        proc.terminate()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert f"[given] listening on fd {fd}" in text
    assert path.exists(), "serve removed a socket path it did not create"
    r = subprocess.run([sys.executable, "-m", "dataplane", "serve", "--socket-fd", "7", "--disk",
                        "null:1M"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "fd 7 was not handed over as a listening UNIX socket" in r.stderr


@pytest.mark.skipif(not Path("/usr/bin/systemd-socket-activate").exists(),
                    reason="systemd-socket-activate is not installed (apt-get install systemd)")
def test_systemd_socket_activation_and_readiness(daemons, tmp_path: Path) -> None:
    """systemd-socket-activate listens on two sockets, starts serve at the first connection with
    LISTEN_FDS=2 LISTEN_FDNAMES=vm1:vm2; each export takes its socket by name. serve tells
    NOTIFY_SOCKET READY=1 once it serves, STOPPING=1 when it stops."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    exports = [{"name": "vm1", "disk": "null:16M", "socket_fd": "vm1", "queues": 1},
               {"name": "vm2", "disk": "null:16M", "addr": {"type": "fd", "str": "vm2"}, "queues": 1}]
    d = daemons(exports, env=env, prefix=["systemd-socket-activate", "-l", str(tmp_path / "vm1.sock"),
                                          "-l", str(tmp_path / "vm2.sock"), "-l", str(tmp_path / "vm3.sock"),
                                          "--fdname=vm1:vm2:vm3",
                                          "-E", "NOTIFY_SOCKET"])   # it passes on no other variable
    deadline = time.monotonic() + 10
    while not (tmp_path / "vm3.sock").exists():
        assert time.monotonic() < deadline and d.proc.poll() is None, d.log()
        time.sleep(0.05)
    # the first connection starts serve; it waits in the backlog meanwhile
    with Device.connect(str(tmp_path / "vm1.sock"), queues=1, timeout=30) as dev:
        dev.write(0, b"activated".ljust(512, b"\0"))
    assert notify.recv(256) == b"READY=1"
    with Device.connect(str(tmp_path / "vm2.sock"), queues=1) as dev:
        assert dev.read(0, 512) == bytes(512)
    with d.client() as c:
        listing = {e["name"]: e["socket"] for e in c.export_list()}
        assert listing == {"vm1": "socket 'vm1'", "vm2": "socket 'vm2'"}
        # the third socket, unused at start, is taken over RPC; given back when removed, and
        # taken again by the next export (systemd keeps the path: serve never unlinks it)
        for name in ("vm3", "vm3-again"):
            c.export_add(name=name, disk="null:16M", addr={"type": "fd", "str": "vm3"}, queues=1)
            with pytest.raises(RpcError, match=f'export_add: socket_fd "vm3" is already export "{name}"\'s'):
                c.export_add(name="thief", disk="null:16M", socket_fd="vm3")
            with Device.connect(str(tmp_path / "vm3.sock"), queues=1) as dev:
                dev.write(0, bytes(512))
            assert c.export_remove(name)["removed"]
            assert (tmp_path / "vm3.sock").exists()
    assert d.terminate() == 0
    assert notify.recv(256) == b"STOPPING=1"
    log = d.log()
    assert "[vm1] listening on fd 3 ('vm1' from systemd)" in log
    assert "[vm2] listening on fd 4 ('vm2' from systemd)" in log
    assert "fd 5 ('vm3' from systemd) was handed over but no export uses it" in log
    notify.close()


# ---- what the RPC methods say ------------------------------------------------------------

def test_rpc_methods_stats_match_prometheus_and_the_cli(daemons, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = daemons(file_exports(tmp_path, ["vm1", "vm2"], socket_mode="0660"), metrics=f"127.0.0.1:{port}")
    assert stat.S_IMODE(d.rpc_socket.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "vm1.sock").stat().st_mode) == 0o660
    with Device.connect(str(tmp_path / "vm1.sock"), queues=2) as dev:
        for i in range(6):
            dev.write(i * 4096, bytes([i]) * 4096, queue=i % 2)
        dev.read(0, 4096, queue=1)
        with d.client() as c:
            got = c.export_get("vm1")
            assert got["state"] == "attached" and got["front_end"]["pid"] == os.getpid()
            assert got["front_end"]["queues_running"] == 2 and got["config"]["socket_mode"] == "0660"
            assert [r["thread"] for r in got["plan"]] == ["dp-io0", "dp-io1"][:len(got["plan"])]
            snap = c.stats("vm1")["exports"]["vm1"]
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            assert c.log_level_set("debug") == {"level": "debug", "previous": "info"}
            with pytest.raises(RpcError, match="expected debug, info, warning or error"):
                c.log_level_set("loud")
            assert {m["name"] for m in c.call("methods")} >= {
                "export_add", "export_remove", "export_list", "export_get", "stats", "log_level_set"}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body) for s in fam.samples}
    for q in snap["queues"]:
        labels = (("export", "vm1"), ("queue", str(q["queue"])), ("thread", q["thread"]))
        for name in ("requests", "reads", "writes", "bytes_written", "errors"):
            assert samples[(f"dataplane_{name}_total", labels)] == q[name], name
        assert samples[("dataplane_inflight", labels)] == q["inflight"]
        buckets = q["latency_buckets"]
        for le, count in zip(buckets["le"], buckets["counts"], strict=True):
            bucket = (*labels[:1], ("le", le), *labels[1:])
            assert samples[("dataplane_request_latency_seconds_bucket", bucket)] == count
    assert sum(q["writes"] for q in snap["queues"]) == 6
    assert any(lbl == ("export", "vm2") for (_, labels) in samples for lbl in labels)
    # the command-line client prints the result as JSON; an error answer is exit 1
    env = {**os.environ, "DATAPLANE_RPC_SOCKET": str(d.rpc_socket)}
    r = subprocess.run([sys.executable, "-m", "dataplane", "rpc", "export_get", "--param", "name=vm2"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["config"]["name"] == "vm2", r.stderr
    r = subprocess.run([sys.executable, "-m", "dataplane", "rpc", "export_add", "-p", "name=vm3",
                        "-p", "disk=null:8M", "-p", "addr.type=unix",
                        "-p", f"addr.path={tmp_path / 'vm3.sock'}",
                        "-p", "queues=1", "-p", "read_only=true"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["config"]["read_only"] is True, r.stderr
    with Device.connect(str(tmp_path / "vm3.sock"), queues=1) as dev:
        assert dev.features & (1 << vb.VIRTIO_BLK_F_RO)
    r = subprocess.run([sys.executable, "-m", "dataplane", "rpc", "export_remove", "-p", "name=vm9"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == NO_SUCH_EXPORT
    assert 'no export named "vm9" (exports: vm1, vm2, vm3)' in r.stderr
    r = subprocess.run([sys.executable, "-m", "dataplane", "rpc", "export_list", "--socket",
                        str(tmp_path / "none.sock")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "no management socket at" in r.stderr
    assert d.terminate() == 0
    assert not d.rpc_socket.exists()


def test_exports_sharing_one_io_thread_get_fair_shares(daemons, tmp_path: Path) -> None:
    """Four exports' queues on one I/O thread, each loaded alike at once (bench.exports' driver:
    every load starts at the same instant): none starves. (Before the engine marked every queue
    with work while it spins, the queue first in its list took nearly everything: 10:1.)"""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.exports import drive

    names = [f"e{i}" for i in range(4)]
    d = daemons([{"name": n, "disk": "null:256M", "socket": str(tmp_path / f"{n}.sock"), "queues": 1}
                 for n in names], io_threads=1)
    result = drive([str(tmp_path / f"{n}.sock") for n in names], queues=1, iodepth=32, runtime=2, ramp=0.3)
    iops = [e["iops"] for e in result["exports"]]
    assert all(e["errors"] == 0 and not e["error"] for e in result["exports"])
    assert min(iops) >= 0.3 * max(iops), f"an export starved on the shared thread: {iops}"
    with d.client() as c:
        assert [t["queues"] for t in c.call("threads")["threads"]] == [4]
    assert d.terminate() == 0


def test_plan_of_a_config_is_what_serve_runs(daemons, tmp_path: Path) -> None:
    """`dataplane plan --config FILE` prints the pool serve starts with: the same threads, CPUs
    and (export, virtqueue) -> thread map as the running daemon reports (RPC threads)."""
    exports = file_exports(tmp_path, ["a", "b"], queues=2) + [
        {"name": "c", "disk": "null:1G", "socket": str(tmp_path / "c.sock"), "queues": 3,
         "vcpu_cpus": [0, 1]}]
    d = daemons(exports)
    r = subprocess.run([sys.executable, "-m", "dataplane", "plan", "--config", str(d.config), "--json"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    planned = json.loads(r.stdout)
    with d.client() as c:
        running = c.call("threads")
    assert planned == running
    assert [row["vcpu"] for row in planned["exports"]["c"]] == [0, 1, 0]
    table = subprocess.run([sys.executable, "-m", "dataplane", "plan", "--config", str(d.config)],
                           capture_output=True, text=True, timeout=30).stdout
    assert table.startswith("policy per-queue,") and sum(line[:2] in ("a ", "b ", "c ")
                                                         for line in table.splitlines()) == 7
    assert d.terminate() == 0


def test_recording_per_export_over_rpc_and_in_the_config(daemons, tmp_path: Path) -> None:
    """record_start/record_stop act on one export while the others serve unrecorded; an
    [[export]] table's `record` key records that export from the start; bad requests are one
    clear error each and change nothing."""
    from dataplane.replay.recording import read_recording

    exports = file_exports(tmp_path, ["vm1", "vm2"], queues=2)
    exports[1]["record"] = str(tmp_path / "vm2-boot")
    exports[1]["record_format"] = "iolog"
    d = daemons(exports)
    with d.client() as c:
        rec = c.record_start("vm1", str(tmp_path / "vm1-trace"))
        assert rec["format"] == "blktrace" and len(rec["files"]) == 2, rec
        for name in ("vm1", "vm2"):
            with Device.connect(str(tmp_path / f"{name}.sock"), queues=2) as dev:
                for i in range(5):
                    dev.write(i * 8192, bytes([i + 1]) * 8192, queue=i % 2)
                dev.read(0, 4096, queue=1)
        for params, code, text in [
            ({"name": "vm1", "path": str(tmp_path / "again")}, EXPORT_FAILED, "already recording"),
            ({"name": "vm2", "path": "relative"}, INVALID_PARAMS, "relative path"),
            ({"name": "vm2", "path": str(tmp_path / "x"), "format": "pcap"}, INVALID_PARAMS,
             "format: expected blktrace or iolog"),
            ({"name": "vm9", "path": str(tmp_path / "x")}, NO_SUCH_EXPORT, 'no export named "vm9"'),
        ]:
            with pytest.raises(RpcError) as exc:
                c.call("record_start", **params)
            assert exc.value.code == code and text in exc.value.message, (params, exc.value)
        summary = c.record_stop("vm1")
        assert summary["requests"] == 6 and summary["dropped"] == 0, summary
        with pytest.raises(RpcError) as exc:
            c.record_stop("vm1")
        assert exc.value.code == EXPORT_FAILED and "not recording" in exc.value.message
        booted = c.record_stop("vm2")
        assert booted["format"] == "iolog" and booted["requests"] == 6, booted
        snap = c.stats("vm1")["exports"]["vm1"]
        assert sum(q["recorded"] for q in snap["queues"]) == 6
    reqs = read_recording(tmp_path / "vm1-trace").requests
    assert sorted((r.queue, r.op, r.offset, r.length) for r in reqs) == sorted(
        [(i % 2, "write", i * 8192, 8192) for i in range(5)] + [(1, "read", 0, 4096)])
    assert len(read_recording(tmp_path / "vm2-boot").requests) == 6
    assert d.terminate() == 0
