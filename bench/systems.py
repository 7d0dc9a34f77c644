"""What bench.compare runs: backends that stay up for the whole matrix (`dataplane serve`,
qemu-storage-daemon), the two load generators (`dataplane load` against a backend's socket,
native `fio --ioengine=io_uring` against the file), and the CPU accounting around each run.

Every run yields one fio JSON file (fio 3.33's layout, which `dataplane load` also writes) and
the CPU seconds it cost: the backend process's utime + stime from /proc/PID/stat before and
after (all its threads), or fio's own usr + sys for native fio.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent
# Processes whose CPU a run counts as its own besides the backend's and the load generator's:
# the storage service the backend talks to (bench.rbd: the Ceph cluster's daemons), so that its
# work is measured (RunOutput.service_cpu_s) and not taken for another tenant's noise.
SERVICE_PIDS: list[int] = []


# ---- CPU accounting ----

def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of a process, live or exited (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def host_busy_seconds() -> float:
    """CPU seconds all CPUs spent in user, nice and system mode since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    user, nice, system = (int(v) for v in parts[1:4])
    return (user + nice + system) / CLK_TCK


def children_cpu_seconds() -> float:
    """CPU of this process's exited and waited-for children (the load generator runs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_quiet(max_cores: float, timeout: float, window: float = 0.3) -> tuple[float, float]:
    """Wait until the host's busy CPU over `window` seconds is below max_cores (our backends idle
    between runs, so what shows is other people's work). Returns (seconds waited, last busy
    cores); gives up after timeout and lets the run go ahead."""
    start = time.monotonic()
    while True:
        b0 = host_busy_seconds()
        time.sleep(window)
        busy = (host_busy_seconds() - b0) / window
        waited = time.monotonic() - start
        if busy <= max_cores or waited >= timeout:
            return waited, busy
        time.sleep(min(1.0, max(0.0, timeout - waited)))
        window = 1.0


# ---- backends ----

@dataclass
class Backend:
    """A vhost-user-blk backend process that serves one front end at a time, on one socket."""

    name: str
    argv: list[str]
    socket: Path
    log_path: Path
    cpus: str = ""                  # taskset CPU list for the whole process ("": not pinned)
    cwd: Path = ROOT                # the tree whose `dataplane` it runs (bench.ab_trees: another)
    proc: subprocess.Popen | None = None
    _log_file: Any = None

    def start(self, timeout: float = 20.0) -> None:
        self.socket.unlink(missing_ok=True)
        argv = (["taskset", "-c", self.cpus] if self.cpus else []) + self.argv
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "w")   # noqa: SIM115 - closed in stop()
        self._log_file.write("$ " + " ".join(argv) + "\n")
        self._log_file.flush()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, cwd=self.cwd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend {self.name} exited with status {self.proc.returncode};"
                                   f" see {self.log_path}")
            if self.socket.exists():    # both create it once they listen
                return
            time.sleep(0.05)
        raise RuntimeError(f"backend {self.name}: no socket {self.socket} after {timeout} s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def thread_cpus(self) -> dict[str, str]:
        """Thread name -> allowed CPU list (the first thread of each name), to record where
        the I/O threads were pinned."""
        out: dict[str, str] = {}
        for task in sorted(Path(f"/proc/{self.pid}/task").iterdir()):
            try:
                name = (task / "comm").read_text().strip()
                status = (task / "status").read_text()
            except OSError:
                continue
            cpus = next((line.split(":", 1)[1].strip() for line in status.splitlines()
                         if line.startswith("Cpus_allowed_list")), "?")
            out.setdefault(name, cpus)
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.socket.unlink(missing_ok=True)


def dataplane_backend(name: str, sock: Path, disk: str, queues: int, logdir: Path,
                      poll_us: int | None = None, unpinned: bool = False,
                      policy: str | None = None) -> Backend:
    """`dataplane serve` (poll_us None: serve's default; policy None: per-queue)."""
    if unpinned:
        argv = [sys.executable, "-m", "bench.unpinned_serve", "--socket", str(sock), "--disk", disk,
                "--queues", str(queues), "--poll-us", str(poll_us or 0)]
    else:
        argv = [sys.executable, "-m", "dataplane", "--log-level", "warning", "serve",
                "--socket", str(sock), "--disk", disk, "--queues", str(queues)]
        if poll_us is not None:
            argv += ["--poll-us", str(poll_us)]
        if policy is not None:
            argv += ["--policy", policy]
    if not disk.startswith("null:"):
        argv += ["--cache", "none"]
    return Backend(name, argv, sock, logdir / f"{name}.log")


def qsd_backend(name: str, sock: Path, disk: str, size: int, queues: int, logdir: Path,
                cpus: str = "") -> Backend:
    """qemu-storage-daemon exporting vhost-user-blk from an iothread (its adaptive polling on,
    as QEMU configures iothreads by default)."""
    if disk == "null":
        blockdev = f"driver=null-co,node-name=disk0,read-zeroes=on,size={size}"
    else:
        blockdev = f"driver=file,node-name=disk0,filename={disk},cache.direct=on,aio=io_uring"
    argv = ["qemu-storage-daemon", "--object", "iothread,id=iot0", "--blockdev", blockdev,
            "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                        f"addr.path={sock},writable=on,num-queues={queues},iothread=iot0"]
    return Backend(name, argv, sock, logdir / f"{name}.log", cpus=cpus)


# ---- load generators ----

@dataclass(frozen=True)
class Workload:
    name: str          # e.g. randread-4k-qd32
    rw: str            # fio's rw
    bs: str            # fio's size syntax: 4k, 128k
    iodepth: int

    @property
    def direction(self) -> str:
        return "read" if self.rw in ("read", "randread") else "write"


@dataclass
class RunOutput:
    """What one run measured; `error` is set (and numbers are 0) when it failed."""

    data: dict[str, Any] = field(default_factory=dict)   # the fio JSON
    backend_cpu_s: float = 0.0       # backend process CPU over the run (0 for native fio)
    client_cpu_s: float = 0.0        # load generator's own CPU over the measured period
    served_ios: int = 0              # I/Os the backend completed, ramp included
    wall_s: float = 0.0
    host_busy_s: float = 0.0         # every CPU's user+system time over the run
    ours_s: float = 0.0              # backend + load generator (+ service) CPU over the run
    service_cpu_s: float = 0.0       # SERVICE_PIDS' CPU over the run
    error: str = ""


def _own_cpu(job: dict[str, Any]) -> float:
    """CPU seconds a fio-layout job reports for itself over the measured period (group
    reporting: job_runtime is the sum over jobs and usr/sys_cpu the average, so this is the
    total)."""
    return (job.get("usr_cpu", 0.0) + job.get("sys_cpu", 0.0)) / 100.0 * job.get("job_runtime", 0) / 1000.0


def _service_cpu_seconds() -> float:
    total = 0.0
    for pid in SERVICE_PIDS:
        try:
            total += proc_cpu_seconds(pid)
        except OSError:
            pass   # it exited: what it used is gone with it
    return total


def _run(argv: list[str], out_json: Path, timeout: float, backend: Backend | None,
         log_path: Path) -> RunOutput:
    res = RunOutput()
    out_json.parent.mkdir(parents=True, exist_ok=True)
    busy0, kids0 = host_busy_seconds(), children_cpu_seconds()
    cpu0 = backend.cpu_seconds() if backend else 0.0
    svc0 = _service_cpu_seconds()
    t0 = time.monotonic()
    with open(log_path, "a") as logf:
        logf.write("$ " + " ".join(argv) + "\n")
        logf.flush()
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                  timeout=timeout, cwd=ROOT)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -1
            res.error = f"timed out after {timeout:.0f} s"
    res.wall_s = time.monotonic() - t0
    if backend:
        if not backend.alive():
            res.error = res.error or f"backend {backend.name} died (status {backend.proc.returncode})"
        else:
            res.backend_cpu_s = backend.cpu_seconds() - cpu0
    res.service_cpu_s = _service_cpu_seconds() - svc0
    res.ours_s = res.backend_cpu_s + children_cpu_seconds() - kids0 + res.service_cpu_s
    res.host_busy_s = host_busy_seconds() - busy0
    if rc != 0 and not res.error:
        res.error = f"exit status {rc} (see {log_path.name})"
    try:
        res.data = json.loads(out_json.read_text())
    except (OSError, ValueError) as exc:
        res.error = res.error or f"no JSON report: {exc}"
        return res
    job = res.data["jobs"][0]
    res.client_cpu_s = _own_cpu(job)
    dp = job.get("dataplane")
    if dp is not None:
        res.served_ios = int(dp.get("issued", 0))
    return res


def run_dataplane_load(sock: Path, w: Workload, queues: int, runtime: float, ramp: float,
                       out_json: Path, backend: Backend, log_path: Path, cpus: str = "",
                       poll_us: int = 0, ring: str | None = None,
                       extra: tuple[str, ...] = ()) -> RunOutput:
    """One `dataplane load` run (ring: --ring split|packed; None: load's default); extra: more
    of its options (--log-all, --mem-regions N)."""
    argv = [sys.executable, "-m", "dataplane", "--log-level", "warning", "load",
            "--socket", str(sock), "--queues", str(queues), "--rw", w.rw, "--bs", w.bs,
            "--iodepth", str(w.iodepth), "--runtime", f"{runtime:g}", "--ramp", f"{ramp:g}",
            "--group-reporting", "--output-format", "json", "--output", str(out_json)]
    if cpus:
        argv += ["--cpus", cpus]
    if poll_us:
        argv += ["--poll-us", str(poll_us)]
    if ring:
        argv += ["--ring", ring]
    argv += list(extra)
    return _run(argv, out_json, runtime + ramp + 60, backend, log_path)


def run_native_fio(path: str, w: Workload, numjobs: int, runtime: float, ramp: float,
                   out_json: Path, log_path: Path) -> RunOutput:
    argv = ["fio", "--name=native", f"--filename={path}", "--ioengine=io_uring", "--direct=1",
            f"--rw={w.rw}", f"--bs={w.bs}", f"--iodepth={w.iodepth}", f"--numjobs={numjobs}",
            f"--runtime={runtime:g}", f"--ramp_time={ramp:g}", "--time_based", "--norandommap",
            "--group_reporting", "--output-format=json", f"--output={out_json}"]
    res = _run(argv, out_json, runtime + ramp + 60, None, log_path)
    if res.data:
        job = res.data["jobs"][0]
        res.served_ios = int(job[w.direction]["total_ios"])
    return res
