"""Supervisor duties seen from outside: placement in /proc matches the plan, per-queue
statistics (`dataplane stats`, Prometheus), structured logs, SIGHUP re-reading the log level."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dataplane.driver import Device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.sock = tmp_path / "vhost.sock"
        self.log = tmp_path / "serve.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dataplane", *args[:0], "serve", "--socket", str(self.sock), *args],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        deadline = time.monotonic() + 15
        while not self.sock.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "socket never appeared"
            time.sleep(0.02)

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                assert self.proc.wait(timeout=20) == 0, self.text()
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()


@pytest.fixture
def serve(tmp_path):
    started: list[Serve] = []

    def start(*args: str) -> Serve:
        s = Serve(tmp_path, *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dataplane", *args], capture_output=True,
                          text=True, timeout=60)


def threads_of(pid: int) -> dict[str, set[int]]:
    """thread name -> CPUs it may run on, from /proc."""
    out: dict[str, set[int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except FileNotFoundError:
            continue
        m = re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.M)
        cpus: set[int] = set()
        for part in m.group(1).split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
        out[name] = cpus
    return out


@pytest.mark.parametrize("policy, expected_threads", [
    ("per-queue", {"dp-vq0", "dp-vq1"}),
    ("shared", {"dp-io0"}),
    ("threads=1", {"dp-io0"}),
])
def test_thread_names_and_affinities_match_the_printed_plan(serve, disk_file, policy, expected_threads):
    plan = json.loads(cli("plan", "--disk", str(disk_file), "--queues", "2", "--policy", policy,
                          "--json").stdout)
    planned = {row["thread"]: row["host_cpu"] for row in plan["rows"]}
    assert set(planned) == expected_threads
    s = serve("--disk", str(disk_file), "--queues", "2", "--policy", policy)
    with Device.connect(str(s.sock), queues=2) as dev:
        dev.write(0, b"a" * 4096, queue=0)
        dev.write(4096, b"b" * 4096, queue=1)
        seen = threads_of(s.proc.pid)
        for name, cpu in planned.items():
            assert name in seen, (name, seen)
            assert seen[name] == {cpu}, f"{name}: affinity {seen[name]}, plan says cpu {cpu}"
        assert not {n for n in seen if n.startswith("dp-")} - expected_threads
    for row in plan["rows"]:
        assert f"vq{row['virtqueue']} -> {row['thread']} on cpu {row['host_cpu']}" in s.text()


def prometheus_samples(body: str) -> dict[tuple[str, tuple], float]:
    """(name, sorted labels) -> value of every sample in a text exposition, read by
    prometheus_client's own parser (label order in the text does not matter)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def test_stats_command_and_prometheus_metrics(serve, disk_file):
    port = free_port()
    s = serve("--disk", f"{disk_file},latency=fixed:50us", "--queues", "2", "--metrics", f"127.0.0.1:{port}")
    with Device.connect(str(s.sock), queues=2) as dev:
        for i in range(10):
            dev.write(i * 4096, bytes([i]) * 4096, queue=i % 2)
        for i in range(6):
            dev.read(i * 4096, 4096, queue=1)
        snap = json.loads(cli("stats", "--socket", str(s.sock), "--json").stdout)
        q0, q1 = snap["queues"]
        assert (q0["writes"], q0["reads"]) == (5, 0)
        assert (q1["writes"], q1["reads"]) == (5, 6)
        assert q1["bytes_read"] == 6 * 4096 and q0["bytes_written"] == 5 * 4096
        assert q0["thread"] == "dp-vq0" and q0["running"] is True and q0["inflight"] == 0
        assert 45_000 <= q1["latency"]["p50_ns"] <= 2_000_000   # emulated 50 us, loaded machine
        assert snap["configured_latency"]["p50_ns"] == 50_000
        table = cli("stats", "--socket", str(s.sock)).stdout
        assert "dp-vq1" in table and "configured latency=fixed:50us: p50 50.0 us" in table

        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        samples = prometheus_samples(body)
        # the export label is the export's name (default: the socket's stem)
        samples = {(name, tuple(kv for kv in labels if kv != ("export", "vhost"))): v
                   for (name, labels), v in samples.items() if ("export", "vhost") in labels}
        assert samples[("dataplane_writes_total", (("queue", "0"), ("thread", "dp-vq0")))] == 5
        assert samples[("dataplane_reads_total", (("queue", "1"), ("thread", "dp-vq1")))] == 6
        assert "# TYPE dataplane_request_latency_seconds histogram" in body
        q1 = (("queue", "1"), ("thread", "dp-vq1"))
        buckets = [(le, v) for (name, labels), v in samples.items()
                   if name == "dataplane_request_latency_seconds_bucket" and labels[1:] == q1
                   for le in [labels[0][1]]]
        assert [le for le, _ in buckets][-2:] == ["1", "+Inf"] and len(buckets) == 16
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and counts[-1] == 11   # cumulative, +Inf = count
        assert samples[("dataplane_request_latency_seconds_count", q1)] == 11
    # Counters survive the front end leaving (folded into totals).
    snap = json.loads(cli("stats", "--socket", str(s.sock), "--json").stdout)
    assert snap["queues"][1]["reads"] == 6 and snap["sessions"] == 1
    assert snap["queues"][1]["running"] is False


def test_stats_without_a_backend_is_a_clear_error(tmp_path):
    r = cli("stats", "--socket", str(tmp_path / "nothing.sock"))
    assert r.returncode == 2 and "is `dataplane serve --socket" in r.stderr


def test_metrics_port_in_use_is_exit_2(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cli("serve", "--socket", str(tmp_path / "s.sock"), "--disk", "null:1M",
                "--metrics", f"127.0.0.1:{port}")
    assert r.returncode == 2 and "--metrics" in r.stderr, r.stderr


def test_json_logs_and_sighup_rereads_the_log_level(tmp_path, disk_file):
    config = tmp_path / "dp.toml"
    config.write_text(f'disk = "{disk_file}"\nqueues = 1\nlog_level = "info"\n')
    sock = tmp_path / "vhost.sock"
    log_path = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "dataplane", "--log-format", "json", "serve",
                             "--config", str(config), "--socket", str(sock)],
                            stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        with Device.connect(str(sock)) as dev:
            dev.read(0, 512)
        assert '"level": "debug"' not in log_path.read_text()
        config.write_text(config.read_text().replace('"info"', '"debug"'))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "log level is now debug" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        with Device.connect(str(sock)) as dev:
            dev.read(0, 512)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    assert any(e["level"] == "debug" and "GET_FEATURES" in e["msg"] for e in entries)
