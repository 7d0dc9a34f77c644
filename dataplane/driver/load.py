"""`dataplane load`: a fio-like load generator whose hot path is C (csrc/driver/load.c).

The Python frontend (`Device.connect`) negotiates and sets up the rings; `run_load` then hands
each queue's ring to a C thread `dp-load<i>` that issues virtio-blk requests at a fixed
iodepth (closed loop) or on a schedule (open loop, `rate_iops`), and collects fio-style
statistics. Results render as fio's normal text or fio's JSON layout (fio 3.33), so tools
written for fio read them:

    with Device.connect(sock, queues=2, memory=job.memory_needed(2)) as dev:
        result = run_load(dev, Job(rw="randread", bs=4096, iodepth=32, runtime=5))
        print(result.to_text())
"""

from __future__ import annotations

import errno
import logging
import math
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core import check, ffi, lib
from ..errors import ConfigError, DataplaneError, DeviceError
from ..protocol import virtio_blk as vb
from .packed import PackedVring

log = logging.getLogger("dataplane.load")

FIO_LAYOUT = "fio-3.33"
VERSION = f"dataplane-load-0.1.0 ({FIO_LAYOUT} json layout)"
SECTOR = 512
# fio's default percentile_list
PERCENTILES = (1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0,
               99.0, 99.5, 99.9, 99.95, 99.99)
RW_MODES = {
    "read": lib.DP_RW_READ, "write": lib.DP_RW_WRITE,
    "randread": lib.DP_RW_RANDREAD, "randwrite": lib.DP_RW_RANDWRITE,
    "randrw": lib.DP_RW_RANDRW, "rw": lib.DP_RW_RW, "readwrite": lib.DP_RW_RW,
}
DIRS = (("read", lib.DP_DIR_READ), ("write", lib.DP_DIR_WRITE))
MAX_QUEUE_SIZE = 1024
IOMMU_MODES = ("run", "request")
# One indirect descriptor per request when negotiated, as a Linux guest does: measured as fast
# as 3-descriptor chains or slightly faster (4k randread QD32, null disks, both backends), and
# iodepth can then go up to the ring size.
PREFER_INDIRECT = True

def _fio_size(n: int) -> str:
    for suffix, unit in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


@dataclass
class Job:
    """One load job, fio's option names; it runs on every queue (one fio job per queue)."""

    rw: str = "randread"
    rwmixread: int = 50
    bs: int = 4096
    iodepth: int = 32
    runtime: float = 10.0          # seconds; 0: no time limit (needs number_ios)
    ramp_time: float = 0.0         # seconds not counted, before runtime
    size: int = 0                  # bytes from offset; 0: to the end of the device
    offset: int = 0
    number_ios: int = 0            # per queue; 0: no limit
    rate_iops: int = 0             # per queue; 0: closed loop
    verify: bool = False
    randseed: int = 0x89           # fio's default seed
    indirect: bool | None = None   # None: the measured faster layout when negotiated
    poll_us: int = 0               # spin on the used ring before sleeping on the call fd
    timeout: float = 30.0          # no completion for this long ends the run
    cpus: Sequence[int] = ()       # pin queue i's thread to cpus[i % len(cpus)]
    name: str = "q"
    # Behind a vIOMMU (Device.connect(iommu=True)): "run" maps the buffers once for the run
    # (static mappings: an UPDATE per iommu_page of them, and of the rings, before it starts),
    # "request" maps each request's buffers before it is published and unmaps them when it
    # completes (a guest in strict IOMMU mode: an UPDATE and an INVALIDATE per request).
    iommu: str = "run"
    iommu_page: int = 4096         # bytes per UPDATE of a run's mappings (0: one per area)

    def __post_init__(self) -> None:
        if self.rw not in RW_MODES:
            raise ConfigError(f"rw={self.rw!r}: expected one of {', '.join(RW_MODES)}")
        if not 0 <= self.rwmixread <= 100:
            raise ConfigError(f"rwmixread={self.rwmixread}: expected 0..100")
        if self.bs <= 0 or self.bs % SECTOR:
            raise ConfigError(f"bs={self.bs}: expected a positive multiple of {SECTOR}")
        if self.iodepth < 1:
            raise ConfigError(f"iodepth={self.iodepth}: expected at least 1")
        if self.runtime < 0 or self.ramp_time < 0 or self.number_ios < 0 or self.rate_iops < 0:
            raise ConfigError("runtime, ramp_time, number_ios and rate_iops cannot be negative")
        if self.offset < 0 or self.size < 0 or self.offset % SECTOR:
            raise ConfigError(f"offset={self.offset}: expected a multiple of {SECTOR}")
        if self.iommu not in IOMMU_MODES:
            raise ConfigError(f"iommu={self.iommu!r}: expected one of {', '.join(IOMMU_MODES)}")
        if self.iommu_page < 0 or self.iommu_page % 4096:
            raise ConfigError(f"iommu_page={self.iommu_page}: expected a multiple of 4096 (or 0)")

    @property
    def reads(self) -> bool:
        return self.rw in ("read", "randread", "randrw", "rw", "readwrite")

    @property
    def writes(self) -> bool:
        return self.rw in ("write", "randwrite", "randrw", "rw", "readwrite")

    def queue_size(self, indirect: bool) -> int:
        """Ring size that holds iodepth requests (3 descriptors each unless indirect)."""
        need = self.iodepth if indirect else 3 * self.iodepth
        size = 128
        while size < need:
            size *= 2
        return size

    def arena_size(self, per_request_iommu: bool = False) -> int:
        """Guest memory one queue's requests take (a page per request more when each request
        is mapped by itself)."""
        if per_request_iommu:
            return lib.dp_load_arena_size_iommu(self.bs, self.iodepth)
        return lib.dp_load_arena_size(self.bs, self.iodepth)

    def memory_needed(self, queues: int) -> int:
        """Guest memory for Device.connect: every queue's buffers plus room for the rings
        and the frontend's own requests."""
        arena = self.arena_size(self.iommu == "request")
        return queues * (arena + 64 * 1024) + (16 << 20)

    def options(self, numjobs: int = 1) -> dict[str, str]:
        """fio's 'job options': what was set, as strings. numjobs: the queues one reported job
        stands for (group_reporting merges them)."""
        opts = {"rw": self.rw, "bs": _fio_size(self.bs), "iodepth": str(self.iodepth),
                "numjobs": str(numjobs)}
        if self.rw in ("randrw", "rw", "readwrite"):
            opts["rwmixread"] = str(self.rwmixread)
        if self.runtime:
            opts["runtime"] = f"{self.runtime:g}"
            opts["time_based"] = "1"
        if self.ramp_time:
            opts["ramp_time"] = f"{self.ramp_time:g}"
        if self.size:
            opts["size"] = _fio_size(self.size)
        if self.offset:
            opts["offset"] = _fio_size(self.offset)
        if self.number_ios:
            opts["number_ios"] = str(self.number_ios)
        if self.rate_iops:
            opts["rate_iops"] = str(self.rate_iops)
        if self.verify:
            opts["verify"] = "dataplane"
        return opts


@dataclass
class VerifyState:
    """What each queue wrote where: one generation per bs-sized block of its region. Pass the
    same state to consecutive runs to read back (and check) what an earlier run wrote."""

    bs: int
    regions: dict[int, tuple[int, int]]         # queue -> (offset, size)
    run_id: int = field(default_factory=lambda: secrets.randbits(63))
    maps: dict[int, Any] = field(default_factory=dict)
    generations: dict[int, int] = field(default_factory=dict)

    def map_for(self, queue: int) -> Any:
        if queue not in self.maps:
            self.maps[queue] = ffi.new("uint32_t[]", self.regions[queue][1] // self.bs)
            self.generations[queue] = 0
        return self.maps[queue]


def verify_regions(offset: int, size: int, bs: int, queues: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Disjoint, bs-aligned slices of [offset, offset + size), one per queue."""
    per_queue = size // len(queues) // bs * bs
    if per_queue < bs:
        raise ConfigError(f"verify: {size} bytes cannot be split into {len(queues)} regions of bs={bs}")
    return {q: (offset + i * per_queue, per_queue) for i, q in enumerate(queues)}


# ---- results ----

def _hist_summary(h: Any) -> dict[str, Any]:
    n = int(h.n)
    if n == 0:
        return {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0}
    mean = h.sum / n
    var = max(0.0, h.sumsq / n - mean * mean) * (n / (n - 1) if n > 1 else 0.0)
    return {"min": int(h.min), "max": int(h.max), "mean": mean, "stddev": math.sqrt(var), "N": n}


def _percentiles(h: Any) -> dict[str, int]:
    """fio's clat percentile dict, keys like "99.900000"; h is a struct dp_hist * ."""
    return {f"{p:f}": int(lib.dp_hist_percentile(h, p)) for p in PERCENTILES}


def _sample_stats(values: list[float]) -> tuple[float, float, float, float]:
    if not values:
        return 0.0, 0.0, 0.0, 0.0
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return min(values), max(values), mean, math.sqrt(var)


def _latency_buckets(h: Any) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """fio's latency_ns / latency_us / latency_ms: percent of I/Os per latency range."""
    edges = (2, 4, 10, 20, 50, 100, 250, 500, 750, 1000)
    ms_edges = edges + (2000,)
    total = int(h.n)
    counts = ffi.unpack(h.bucket, lib.DP_HIST_NR)
    ns = dict.fromkeys(edges, 0)
    us = dict.fromkeys(edges, 0)
    ms: dict[int | str, int] = dict.fromkeys(ms_edges, 0)
    ms[">=2000"] = 0
    for i, c in enumerate(counts):
        if not c:
            continue
        v = lib.dp_hist_bucket_value(i)
        for scale, table, keys in ((1, ns, edges), (1000, us, edges), (1000000, ms, ms_edges)):
            if v < keys[-1] * scale:
                table[next(k for k in keys if v < k * scale)] += c
                break
        else:
            ms[">=2000"] += c

    def pct(table: dict) -> dict[str, float]:
        return {str(k): (100.0 * v / total if total else 0.0) for k, v in table.items()}

    return pct(ns), pct(us), pct(ms)


def _dist(levels: Sequence[int], keys: Sequence[str]) -> dict[str, float]:
    total = sum(levels)
    return {k: (100.0 * v / total if total else 0.0) for k, v in zip(keys, levels, strict=True)}


def dir_json(ds: Any, runtime_ns: int, iops_samples: Sequence[float], bw_samples: Sequence[float],
             lat_percentiles: bool = False, sample_ms: float = 0.0) -> dict[str, Any]:
    """fio's JSON for one direction of one job. ds: a struct dp_load_dir_stats (ios, bytes, errors,
    slat/clat/lat histograms); samples: IOPS and KiB/s per interval of sample_ms (kept as the
    `iops_series` the charts of --compare --plot draw); lat_percentiles: fio's
    lat_percentiles=1 (open loop, where lat counts from the schedule)."""
    runtime_ms = int(runtime_ns // 1_000_000) if ds.ios else 0
    secs = runtime_ns / 1e9 if runtime_ns else 0.0
    bw_bytes = int(ds.bytes / secs) if secs else 0
    clat = _hist_summary(ds.clat)
    if ds.clat.n:
        clat["percentile"] = _percentiles(ffi.addressof(ds, "clat"))
    lat = _hist_summary(ds.lat)
    if ds.lat.n and lat_percentiles:
        lat["percentile"] = _percentiles(ffi.addressof(ds, "lat"))
    bmin, bmax, bmean, bdev = _sample_stats(list(bw_samples))
    imin, imax, imean, idev = _sample_stats(list(iops_samples))
    out = {
        "io_bytes": int(ds.bytes), "io_kbytes": int(ds.bytes // 1024),
        "bw_bytes": bw_bytes, "bw": bw_bytes // 1024,
        "iops": ds.ios / secs if secs else 0.0,
        "runtime": runtime_ms, "total_ios": int(ds.ios), "short_ios": int(ds.short_ios),
        "drop_ios": 0,
        "slat_ns": _hist_summary(ds.slat), "clat_ns": clat, "lat_ns": lat,
        "bw_min": int(bmin), "bw_max": int(bmax), "bw_agg": 100.0 if bw_samples else 0.0,
        "bw_mean": bmean, "bw_dev": bdev, "bw_samples": len(bw_samples),
        "iops_min": int(imin), "iops_max": int(imax), "iops_mean": imean,
        "iops_stddev": idev, "iops_samples": len(iops_samples),
        # dataplane's own, outside fio's layout
        "errors": {"ioerr": int(ds.err_ioerr), "unsupp": int(ds.err_unsupp),
                   "other": int(ds.err_other)},
    }
    if sample_ms and iops_samples:
        out["iops_series"] = {"interval_ms": sample_ms, "iops": [round(v, 1) for v in iops_samples]}
    return out


DEPTH_KEYS = ("1", "2", "4", "8", "16", "32", ">=64")
BATCH_KEYS = ("0", "4", "8", "16", "32", "64", ">=64")


def report_json(version: str, stamp: float, global_options: dict[str, str],
                jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """fio's JSON report around its jobs; stamp: when the run started (time.time())."""
    return {
        "fio version": version,
        "timestamp": int(stamp),
        "timestamp_ms": int(stamp * 1000),
        "time": time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(stamp)),
        "global options": global_options,
        "jobs": jobs,
    }


def job_json(name: str, error: int, elapsed_s: int, options: dict[str, str]) -> dict[str, Any]:
    """The head of one fio job's JSON; the directions and job_tail_json follow."""
    return {"jobname": name, "groupid": 0, "error": error, "eta": 0, "elapsed": elapsed_s,
            "job options": {"name": name, **options}}


def bw_totals(units: Sequence[tuple[Any, int]], dirs: Sequence[int]) -> dict[int, int]:
    """KiB/s of every job together, per direction: the base of each job's bw_agg. units: each
    job's per-direction stats (indexable by direction) and runtime_ns."""
    return {d: sum(int(ds[d].bytes / (runtime_ns / 1e9)) // 1024 for ds, runtime_ns in units
                   if runtime_ns) for d in dirs}


def with_bw_agg(d: dict[str, Any], total: int) -> dict[str, Any]:
    """d (a dir_json) with bw_agg: its share of all jobs' bandwidth (total, KiB/s)."""
    d["bw_agg"] = 100.0 * d["bw"] / total if total else 0.0
    return d


def job_tail_json(c: Any, runtime_ns: int, clat: Any, depth: int,
                  dataplane: dict[str, Any]) -> dict[str, Any]:
    """One fio job's CPU use, depth distributions and latency buckets, then dataplane's own
    object. c: a dp_load_stats or dp_replay_counters (CPU time, context switches, depth and
    batch levels); clat: a struct dp_hist * of every direction's completion latency."""
    secs = runtime_ns / 1e9
    lat_ns, lat_us, lat_ms = _latency_buckets(clat)
    return {
        "job_runtime": int(runtime_ns // 1_000_000),
        "usr_cpu": 100.0 * c.usr_ns / 1e9 / secs if secs else 0.0,
        "sys_cpu": 100.0 * c.sys_ns / 1e9 / secs if secs else 0.0,
        "ctx": int(c.ctx), "majf": 0, "minf": 0,
        "iodepth_level": _dist(list(c.depth_level), DEPTH_KEYS),
        "iodepth_submit": _dist(list(c.submit_level), BATCH_KEYS),
        "iodepth_complete": _dist(list(c.complete_level), BATCH_KEYS),
        "latency_ns": lat_ns, "latency_us": lat_us, "latency_ms": lat_ms,
        "latency_depth": depth, "latency_target": 0,
        "latency_percentile": 100.0, "latency_window": 0,
        "dataplane": dataplane,
    }


def dataplane_json(tid: int, c: Any, issued: int) -> dict[str, Any]:
    """The start of a job's `dataplane` object: its thread and ring counters."""
    return {"tid": tid, "kicks": int(c.kicks), "interrupts": int(c.interrupts), "issued": issued,
            "bad_used": int(c.bad_used), "late_ios": int(c.late_ios)}


def run_problems(error: int, io_errors: int) -> list[str]:
    """What a summary of a run's problems starts with: an early end (error: errno), I/O errors."""
    parts = []
    if error:
        parts.append(f"run ended early: {os.strerror(error)}")
    if io_errors:
        parts.append(f"{io_errors} I/O error(s)")
    return parts


@dataclass
class QueueResult:
    """One queue's run: the C stats block plus what Python knows about it."""

    queue: int
    tid: int
    region: tuple[int, int]
    stats: Any                      # struct dp_load_stats *

    @property
    def error(self) -> int:
        return -int(self.stats.error)

    @property
    def verify_failures(self) -> int:
        return int(self.stats.verify_failures)

    @property
    def verify_fail_offsets(self) -> list[int]:
        n = min(self.verify_failures, lib.DP_LOAD_VERIFY_REPORTS)
        return [int(self.stats.verify_fail_offset[i]) for i in range(n)]

    def ios(self, d: int) -> int:
        return int(self.stats.dir[d].ios)

    def absorb_verify(self, other: QueueResult) -> None:
        """Take the verify findings (not the I/O counts) of a read-back run of this queue."""
        s, o = self.stats, other.stats
        for i in range(min(int(o.verify_failures), lib.DP_LOAD_VERIFY_REPORTS)):
            if s.verify_failures + i < lib.DP_LOAD_VERIFY_REPORTS:
                s.verify_fail_offset[s.verify_failures + i] = o.verify_fail_offset[i]
        s.verify_checked += o.verify_checked
        s.verify_failures += o.verify_failures
        s.bad_used += o.bad_used
        for name in ("err_ioerr", "err_unsupp", "err_other"):
            setattr(s.dir[lib.DP_DIR_READ], name,
                    getattr(s.dir[lib.DP_DIR_READ], name) + getattr(o.dir[lib.DP_DIR_READ], name))
        if o.error and not s.error:
            s.error = o.error

    def errors(self, d: int) -> int:
        ds = self.stats.dir[d]
        return int(ds.err_ioerr + ds.err_unsupp + ds.err_other)


class _Merged:
    """Several queues' stats folded into one (fio's group_reporting)."""

    def __init__(self, results: Sequence[QueueResult]) -> None:
        self.stats = ffi.new("struct dp_load_stats *")
        s = self.stats
        for r in results:
            src = r.stats
            for d in range(2):
                for name in ("ios", "bytes", "short_ios", "err_ioerr", "err_unsupp", "err_other"):
                    setattr(s.dir[d], name, getattr(s.dir[d], name) + getattr(src.dir[d], name))
                for h in ("slat", "clat", "lat"):
                    lib.dp_hist_merge(ffi.addressof(s.dir[d], h), ffi.addressof(src.dir[d], h))
            for name in ("issued", "completed", "kicks", "interrupts", "bad_used", "late_ios",
                         "verify_checked", "verify_failures", "usr_ns", "sys_ns", "ctx"):
                setattr(s, name, getattr(s, name) + getattr(src, name))
            for name in ("depth_level", "submit_level", "complete_level"):
                for i in range(7):
                    getattr(s, name)[i] += getattr(src, name)[i]
            s.runtime_ns = max(s.runtime_ns, src.runtime_ns)
            s.sample_ns = src.sample_ns
            if src.error and not s.error:
                s.error = src.error
        s.nsamples = min((r.stats.nsamples for r in results), default=0)
        for d in range(2):
            for i in range(s.nsamples):
                s.sample_ios[d][i] = sum(r.stats.sample_ios[d][i] for r in results)


@dataclass
class LoadResult:
    job: Job
    queues: list[QueueResult]
    started: float
    features: int = 0

    @property
    def error(self) -> int:
        return next((q.error for q in self.queues if q.error), 0)

    @property
    def ring(self) -> str:
        """The virtqueue format the job ran on."""
        return "packed" if self.features & (1 << vb.VIRTIO_F_RING_PACKED) else "split"

    @property
    def verify_failures(self) -> int:
        return sum(q.verify_failures for q in self.queues)

    @property
    def io_errors(self) -> int:
        return sum(q.errors(d) for q in self.queues for d in range(2))

    def summary_of_problems(self) -> str:
        parts = run_problems(self.error, self.io_errors)
        if self.verify_failures:
            offsets = [o for q in self.queues for o in q.verify_fail_offsets][:4]
            parts.append(f"{self.verify_failures} sector(s) failed verify, first at offset(s) "
                         + ", ".join(str(o) for o in offsets))
        return "; ".join(parts) or "no problem"

    def iops(self, direction: str = "read") -> float:
        d = dict(DIRS)[direction]
        return sum(q.ios(d) / (q.stats.runtime_ns / 1e9) for q in self.queues
                   if q.stats.runtime_ns)

    # ---- fio JSON ----

    def _dir_json(self, s: Any, d: int) -> dict[str, Any]:
        ds = s.dir[d]
        interval = s.sample_ns / 1e9
        prev, iops_samples = 0, []
        for i in range(s.nsamples):
            cur = int(s.sample_ios[d][i])
            iops_samples.append((cur - prev) / interval)
            prev = cur
        if not ds.ios:
            iops_samples = []
        bw_samples = [v * self.job.bs / 1024 for v in iops_samples]
        return dir_json(ds, int(s.runtime_ns), iops_samples, bw_samples,
                        lat_percentiles=bool(self.job.rate_iops), sample_ms=s.sample_ns / 1e6)

    def _job_error(self, s: Any) -> int:
        if s.error:
            return -int(s.error)
        if s.verify_failures:
            return errno.EILSEQ          # what fio reports for a verify failure
        if any(s.dir[d].err_ioerr + s.dir[d].err_unsupp + s.dir[d].err_other for d in range(2)):
            return errno.EIO
        return 0

    def _job_json(self, name: str, s: Any, tid: int, bw_agg: dict[int, int],
                  numjobs: int) -> dict[str, Any]:
        empty = {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0}
        out = job_json(name, self._job_error(s), int(round((s.ramp_ns + s.runtime_ns) / 1e9)),
                       self.job.options(numjobs))
        for dname, d in DIRS:
            out[dname] = with_bw_agg(self._dir_json(s, d), bw_agg.get(d, 0))
        out["trim"] = {k: (dict(empty) if k.endswith("_ns") else 0) for k in out["read"]
                       if k not in ("errors", "iops_series")}
        out["trim"].update(iops=0.0, bw_agg=0.0, bw_mean=0.0, bw_dev=0.0, iops_mean=0.0,
                           iops_stddev=0.0)
        out["sync"] = {"total_ios": 0, "lat_ns": dict(empty)}
        out.update(job_tail_json(s, int(s.runtime_ns), _merged_clat(s), self.job.iodepth, {
            **dataplane_json(tid, s, int(s.issued)),
            "ring": self.ring,
            "verify_checked": int(s.verify_checked),
            "verify_failures": int(s.verify_failures),
            "verify_fail_offsets": [int(s.verify_fail_offset[i]) for i in range(
                min(int(s.verify_failures), lib.DP_LOAD_VERIFY_REPORTS))],
        }))
        return out

    def _units(self) -> list[tuple[str, Any, int]]:
        return [(f"{self.job.name}{q.queue}", q.stats, q.tid) for q in self.queues]

    def to_json(self, group_reporting: bool = False) -> dict[str, Any]:
        """fio's JSON: a job per queue, or with group_reporting one for all of them (its
        numjobs says how many, as fio's does)."""
        units = self._units()
        numjobs = 1
        if group_reporting and len(units) > 1:
            units = [(f"{self.job.name}all", _Merged(self.queues).stats, 0)]
            numjobs = len(self.queues)
        bw_agg = bw_totals([(s.dir, s.runtime_ns) for _, s, _ in units], [d for _, d in DIRS])
        return report_json(VERSION, self.started, self.job.options(numjobs),
                           [self._job_json(name, s, tid, bw_agg, numjobs) for name, s, tid in units])

    # ---- fio normal text ----

    def to_text(self, group_reporting: bool = False) -> str:
        data = self.to_json(group_reporting)
        lines: list[str] = []
        for job in data["jobs"]:
            lines.append(f"{job['jobname']}: (g=0): rw={self.job.rw}, bs=(R) {self.job.bs}B-"
                         f"{self.job.bs}B, (W) {self.job.bs}B-{self.job.bs}B, (T) {self.job.bs}B-"
                         f"{self.job.bs}B, ioengine=dataplane, iodepth={self.job.iodepth}")
        lines.append(VERSION)
        lines.append(f"Starting {len(data['jobs'])} thread{'s' if len(data['jobs']) > 1 else ''}")
        lines.append("")
        for job in data["jobs"]:
            lines += _text_job(job, data["time"])
        lines.append("")
        lines += run_status_lines(data)
        return "\n".join(lines) + "\n"


def run_status_lines(data: dict[str, Any], dirs: Sequence[str] = ("read", "write")) -> list[str]:
    """fio's closing "Run status group 0" block for a JSON report's jobs."""
    lines = ["Run status group 0 (all jobs):"]
    for dname in dirs:
        label = f"{dname.upper():>7}"
        jobs = [j[dname] for j in data["jobs"] if j[dname]["total_ios"]]
        if not jobs:
            continue
        total_bw = sum(j["bw_bytes"] for j in jobs)
        total_io = sum(j["io_bytes"] for j in jobs)
        bws = [j["bw_bytes"] for j in jobs]
        runs = [j["runtime"] for j in jobs]
        lines.append(
            f"{label}: bw={_bw(total_bw)}, {_iec(min(bws))}/s-{_iec(max(bws))}/s "
            f"({_si(min(bws))}/s-{_si(max(bws))}/s), io={_iec(total_io)} ({_si(total_io)}), "
            f"run={min(runs)}-{max(runs)}msec")
    return lines


def _merged_clat(s: Any) -> Any:
    h = ffi.new("struct dp_hist *")
    for d in range(2):
        lib.dp_hist_merge(h, ffi.addressof(s.dir[d], "clat"))
    return h


# fio's num2str(): at most maxlen digits before scaling up a unit, maxlen - 1 significant
# digits after (46.2k, 4464.6k, 181MiB, 17.6MiB)
_COUNT_UNITS = ("", "k", "M", "G", "T", "P")
_IEC_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_SI_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def _num2str(v: float, maxlen: int = 4, units: Sequence[str] = _COUNT_UNITS,
             base: int = 1000) -> str:
    i = 0
    while abs(v) >= 10 ** maxlen and i + 1 < len(units):
        v /= base
        i += 1
    if i == 0:
        return f"{round(v)}{units[0]}"
    whole = len(str(int(abs(v))))
    return f"{v:.{max(0, maxlen - 1 - whole)}f}{units[i]}"


def _num(v: float, maxlen: int = 6) -> str:
    return _num2str(v, maxlen)


def _iec(v: float) -> str:
    return _num2str(v, 4, _IEC_UNITS, 1024)


def _si(v: float) -> str:
    return _num2str(v, 4, _SI_UNITS, 1000)


def _bw(b: float) -> str:
    return f"{_iec(b)}/s ({_si(b)}/s)"


def _lat_line(label: str, lat: dict[str, Any]) -> str:
    mn, mx, mean, sd = lat["min"], lat["max"], lat["mean"], lat["stddev"]
    unit, div = "nsec", 1
    if mn >= 1_000_000:
        unit, div = "msec", 1_000_000
    elif mn >= 1_000:
        unit, div = "usec", 1_000
    return (f"{label} ({unit}): min={_num(mn / div)}, max={_num(mx / div)}, "
            f"avg={mean / div:.2f}, stdev={sd / div:.2f}")


def _pct_lines(title: str, pct: dict[str, int]) -> list[str]:
    values = list(pct.values())
    lo, hi = min(values), max(values)
    if lo > 2_000_000 and hi > 99_999_999:
        unit, div = "msec", 1_000_000
    elif lo > 2000 and hi > 99_999:
        unit, div = "usec", 1000
    else:
        unit, div = "nsec", 1
    out = [f"    {title} percentiles ({unit}):"]
    items = [f"{float(k):5.2f}th=[{v // div:8d}]" for k, v in pct.items()]
    for i in range(0, len(items), 3):
        chunk = items[i: i + 3]
        end = "," if i + 3 < len(items) else ""
        out.append("     | " + ", ".join(chunk) + end)
    return out


def _dist_lines(job: dict[str, Any]) -> list[str]:
    out = []
    for key, unit in (("latency_ns", "nsec"), ("latency_us", "usec"), ("latency_ms", "msec")):
        items = [f"{k}={v:.2f}%" for k, v in job[key].items() if v >= 0.005]
        for i in range(0, len(items), 5):
            out.append(f"  lat ({unit})   : " + ", ".join(items[i: i + 5]))
    return out


def _text_job(job: dict[str, Any], when: str) -> list[str]:
    dp = job["dataplane"]
    out = [f"{job['jobname']}: (groupid=0, jobs=1): err={job['error']:2d}: pid={dp['tid']}: {when}"]
    for dname in ("read", "write"):
        d = job[dname]
        if not d["total_ios"]:
            continue
        secs = d["runtime"] / 1000 if d["runtime"] else 0
        out.append(f"  {dname}: IOPS={_num2str(d['iops'])}, BW={_bw(d['bw_bytes'])}"
                   f"({_iec(d['io_bytes'])}/{int(secs * 1000)}msec)")
        if d["slat_ns"]["N"]:
            out.append(_lat_line("    slat", d["slat_ns"]))
        out.append(_lat_line("    clat", d["clat_ns"]))
        out.append(_lat_line("     lat", d["lat_ns"]))
        out += _pct_lines("clat", d["clat_ns"]["percentile"])
        if "percentile" in d["lat_ns"]:
            out += _pct_lines(" lat", d["lat_ns"]["percentile"])
        if d["bw_samples"]:
            out.append(f"   bw (  KiB/s): min={d['bw_min']}, max={d['bw_max']}, "
                       f"per={d['bw_agg']:.2f}%, avg={d['bw_mean']:.2f}, stdev={d['bw_dev']:.2f}, "
                       f"samples={d['bw_samples']}")
            out.append(f"   iops        : min={d['iops_min']}, max={d['iops_max']}, "
                       f"avg={d['iops_mean']:.2f}, stdev={d['iops_stddev']:.2f}, "
                       f"samples={d['iops_samples']}")
        errs = d["errors"]
        if any(errs.values()):
            out.append(f"  errors       : ioerr={errs['ioerr']}, unsupp={errs['unsupp']}, "
                       f"other={errs['other']}")
    out += _dist_lines(job)
    out.append(f"  cpu          : usr={job['usr_cpu']:.2f}%, sys={job['sys_cpu']:.2f}%, "
               f"ctx={job['ctx']}, majf=0, minf=0")
    fmt = ", ".join
    out.append("  IO depths    : " + fmt(f"{k}={v:.1f}%" for k, v in job["iodepth_level"].items()))
    out.append("     submit    : " + fmt(f"{k}={v:.1f}%" for k, v in job["iodepth_submit"].items()))
    out.append("     complete  : " + fmt(f"{k}={v:.1f}%" for k, v in job["iodepth_complete"].items()))
    r, w = job["read"], job["write"]
    out.append(f"     issued rwts: total={r['total_ios']},{w['total_ios']},0,0 "
               f"short={r['short_ios']},{w['short_ios']},0,0 dropped=0,0,0,0")
    out.append(f"     latency   : target=0, window=0, percentile=100.00%, depth={job['latency_depth']}")
    out.append(f"     ring      : {dp.get('ring', 'split')}, kicks={dp['kicks']}, "
               f"interrupts={dp['interrupts']}, bad_used={dp['bad_used']}"
               + (f", late={dp['late_ios']}" if dp["late_ios"] else ""))
    if dp["verify_checked"] or dp["verify_failures"]:
        line = f"     verify    : sectors={dp['verify_checked']}, bad={dp['verify_failures']}"
        if dp["verify_fail_offsets"]:
            line += ", first at offset " + ", ".join(str(o) for o in dp["verify_fail_offsets"][:4])
        out.append(line)
    if job["error"]:
        out.append(f"     error     : {os.strerror(job['error'])} ({errno.errorcode.get(job['error'], '?')})")
    return out


# ---- running ----

def hand_over(dev: Any, queue: int, out: Any, arena: int, arena_len: int, indirect: bool,
              arena_addr: int | None = None) -> None:
    """Fill out (a struct dp_ring_handover) for a C driver thread (load, replay) that takes
    dev's ring `queue` (split or packed) over and lays its requests out in the guest memory
    [arena, arena + arena_len), one indirect descriptor each when indirect. The descriptors
    carry arena_addr onwards (default: what the device is told for arena: its guest-physical
    address, or its IOVA in the static window behind a vIOMMU)."""
    ring = dev.rings[queue]
    out.desc_host = dev.mem.uva(ring.desc)
    out.avail_host = dev.mem.uva(ring.avail)
    out.used_host = dev.mem.uva(ring.used)
    out.num = ring.num
    out.avail_idx = ring.avail_idx
    out.last_used_idx = ring.last_used_idx
    out.kick_fd = ring.kick_fd
    out.call_fd = ring.call_fd
    out.event_idx = int(ring.event_idx)
    out.indirect = int(indirect)
    out.packed = int(isinstance(ring, PackedVring))
    out.arena_host = dev.mem.uva(arena)
    if arena_addr is None:
        dma_addr = getattr(dev, "dma_addr", None)   # a stand-in device may lack it
        arena_addr = dma_addr(arena) if dma_addr is not None else arena
    out.arena_gpa = arena_addr
    out.arena_len = arena_len


def take_back(dev: Any, queue: int, state: Any) -> None:
    """dev's ring `queue` again after a driver thread's run: state (its dp_load_stats or
    dp_replay_counters) says where the thread left the ring's indices."""
    ring = dev.rings[queue]
    ring.avail_idx = int(state.avail_idx)
    ring.last_used_idx = int(state.last_used_idx)


def _region(dev: Any, job: Job) -> tuple[int, int]:
    if job.offset >= dev.capacity:
        raise ConfigError(f"offset={job.offset} is past the end of the device ({dev.capacity} bytes)")
    size = job.size or dev.capacity - job.offset
    size = min(size, dev.capacity - job.offset) // job.bs * job.bs
    if size < job.bs:
        raise ConfigError(f"size={job.size} at offset={job.offset} holds no block of bs={job.bs}")
    return job.offset, size


def run_load(dev: Any, job: Job, queues: Sequence[int] | None = None,
             verify_state: VerifyState | None = None) -> LoadResult:
    """Run job on each of dev's queues (all by default) until it ends; returns the results.

    The C threads take over the rings Device.connect set up and give them back at the end, so
    the Device keeps working afterwards (unless the run ended with a ring error)."""
    queues = list(range(len(dev.rings))) if queues is None else list(queues)
    if not queues:
        raise ConfigError("no queue to run on")
    if not job.runtime and not job.number_ios:
        raise ConfigError("set runtime or number_ios, or the job never ends")
    offset, size = _region(dev, job)
    negotiated_indirect = bool(dev.features & (1 << vb.VIRTIO_RING_F_INDIRECT_DESC))
    indirect = PREFER_INDIRECT if job.indirect is None else job.indirect
    if job.indirect is None and negotiated_indirect:
        # Direct chains take 3 descriptors per request; fall back to indirect when they do not fit.
        indirect = indirect or any(job.iodepth > dev.rings[q].num // 3 for q in queues)
    if indirect and not negotiated_indirect:
        if job.indirect:
            raise ConfigError("indirect descriptors were not negotiated with this backend")
        indirect = False

    regions: dict[int, tuple[int, int]]
    if job.verify:
        if verify_state is None:
            verify_state = VerifyState(job.bs, verify_regions(offset, size, job.bs, queues))
        elif verify_state.bs != job.bs:
            raise ConfigError("verify state was made with another bs")
        regions = verify_state.regions
        if any(regions[q][1] // job.bs <= job.iodepth for q in queues):
            raise ConfigError(f"verify: each queue's region must hold more than iodepth={job.iodepth} "
                              f"blocks of bs={job.bs}")
    else:
        regions = dict.fromkeys(queues, (offset, size))

    viommu = getattr(dev, "iommu", None)
    per_request = viommu is not None and job.iommu == "request"
    arena_size = job.arena_size(per_request)
    started = time.time()
    running: list[tuple[int, Any, Any]] = []      # (queue, handle, arena gpa)
    mapped: list[tuple[int, int]] = []            # (iova, size) mapped for the run
    results: list[QueueResult] = []
    err = ffi.new("int *")
    try:
        for i, q in enumerate(queues):
            ring = dev.rings[q]
            if ring.chains:
                raise DeviceError(f"queue {q}: {len(ring.chains)} request(s) of the frontend in flight")
            room = ring.num if indirect else ring.num // 3
            if job.iodepth > room:
                raise ConfigError(f"iodepth={job.iodepth} needs a ring of "
                                  f"{job.queue_size(indirect)} (queue {q} has {ring.num})")
            try:
                arena = dev.mem.alloc(arena_size, 4096)
            except DeviceError:
                raise DeviceError(
                    f"queue {q}: no room for {arena_size} bytes of request buffers in guest memory; "
                    f"connect with memory=job.memory_needed({len(queues)})") from None
            p = ffi.new("struct dp_load_params *")
            arena_addr = None
            if viommu is not None:
                arena_addr = _iommu_prepare(dev, job, q, arena, arena_size, per_request, mapped)
                if per_request:
                    p.iommu_socket = dev.client.vu
            hand_over(dev, q, p.ring, arena, arena_size, indirect, arena_addr)
            p.queue = q
            p.rw = RW_MODES[job.rw]
            p.rwmixread = job.rwmixread
            p.bs = job.bs
            p.iodepth = job.iodepth
            p.offset, p.size = regions[q]
            p.runtime_ns = int(job.runtime * 1e9)
            p.ramp_ns = int(job.ramp_time * 1e9) if job.runtime else 0
            p.number_ios = job.number_ios
            p.rate_iops = job.rate_iops
            p.seed = job.randseed
            p.poll_ns = job.poll_us * 1000
            p.timeout_ns = int(job.timeout * 1e9)
            p.cpu = job.cpus[i % len(job.cpus)] if job.cpus else -1
            if job.verify:
                assert verify_state is not None
                p.verify = 1
                p.verify_map = verify_state.map_for(q)
                p.verify_run_id = verify_state.run_id
                p.verify_generation = verify_state.generations[q]
            handle = lib.dp_load_start(p, err)
            if handle == ffi.NULL:
                dev.mem.free(arena)
                check(err[0], f"queue {q}: starting the load thread")
            running.append((q, handle, arena))
        _wait_all([h for _, h, _ in running])
    finally:
        for q, handle, arena in running:
            lib.dp_load_stop(handle)
            while not lib.dp_load_wait(handle, 1000):
                log.warning("queue %d: waiting for the load thread to drain", q)
            st = ffi.new("struct dp_load_stats *")
            check(lib.dp_load_get_stats(handle, st), f"queue {q}: load stats")
            tid = lib.dp_load_thread_id(handle)
            lib.dp_load_free(handle)
            take_back(dev, q, st)
            if st.error:
                log.error("queue %d: load ended early: %s", q, os.strerror(-st.error))
            else:
                dev.mem.free(arena)    # a ring left mid-flight may still point into it
            if verify_state is not None:
                verify_state.generations[q] = st.verify_generation
            results.append(QueueResult(q, tid, regions[q], st))
        _iommu_release(dev, mapped, per_request)
    return LoadResult(job, results, started, dev.features)


def _iommu_prepare(dev: Any, job: Job, queue: int, arena: int, arena_size: int,
                   per_request: bool, mapped: list[tuple[int, int]]) -> int:
    """The arena's IOVA for a run behind the frontend's vIOMMU. Per run: the static window's,
    its pages and the queue's rings pushed now, so that the run itself sees no miss. Per
    request: fresh IOVAs nothing maps yet (the load thread maps each request's slot)."""
    viommu = dev.iommu
    if per_request:
        iova = viommu.alloc_iova(arena_size)
    else:
        iova = viommu.iova(arena)
        viommu.push(iova, arena_size, job.iommu_page)
    dev._push_rings(viommu, [dev.rings[queue]], "rings")
    mapped.append((iova, arena_size))
    return iova


def _iommu_release(dev: Any, mapped: list[tuple[int, int]], per_request: bool) -> None:
    """The run's mappings end with it: one INVALIDATE per arena (a run that ended early may
    have left requests mapped)."""
    for iova, size in mapped:
        try:
            dev.iommu.invalidate(iova, size)
        except DataplaneError as exc:
            log.warning("vIOMMU: invalidating the run's mappings at %#x: %s", iova, exc)
        if per_request:
            dev.iommu.free_iova(iova, size)


def run_job(dev: Any, job: Job, queues: Sequence[int] | None = None,
            verify_state: VerifyState | None = None) -> LoadResult:
    """run_load, and for a verify job that only writes, fio's verify phase: read every block
    back (sequentially, not measured) and fold its verify results into the job's."""
    if job.verify and verify_state is None:
        queues = list(range(len(dev.rings))) if queues is None else list(queues)
        offset, size = _region(dev, job)
        verify_state = VerifyState(job.bs, verify_regions(offset, size, job.bs, queues))
    result = run_load(dev, job, queues, verify_state)
    if not job.verify or job.reads or result.error:
        return result
    assert verify_state is not None
    blocks = next(iter(verify_state.regions.values()))[1] // job.bs
    readback = Job(rw="read", bs=job.bs, iodepth=min(job.iodepth, blocks - 1), runtime=0,
                   number_ios=blocks, verify=True, indirect=job.indirect, timeout=job.timeout,
                   cpus=job.cpus, iommu=job.iommu, iommu_page=job.iommu_page)
    check_run = run_load(dev, readback, [q.queue for q in result.queues], verify_state)
    for q, v in zip(result.queues, check_run.queues, strict=True):
        q.absorb_verify(v)
    return result


def _wait_all(handles: Sequence[Any]) -> None:
    """Wait in short slices so that Ctrl-C reaches Python (the C wait releases the GIL).
    Like fio, Ctrl-C ends the run early and still reports what was measured."""
    pending = list(handles)
    while pending:
        try:
            pending = [h for h in pending if not lib.dp_load_wait(h, 200)]
        except KeyboardInterrupt:
            log.warning("interrupted: stopping the load threads")
            for h in handles:
                lib.dp_load_stop(h)
