"""Command line: `dataplane serve | plan | stats | rpc | demo | load | trace | replay`. Errors
are one line on stderr and exit status 2 (no traceback unless --debug)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .cli_common import (
    add_ring_argument,
    count_arg,
    parse_cpus,
    positive_int,
    render_report,
    run_command,
    size_arg,
    time_arg,
)
from .errors import ConfigError, DataplaneError

log = logging.getLogger("dataplane")


def _export_of(record: logging.LogRecord) -> str:
    """The export a log line is about: each export's control loop runs on a thread called
    export:NAME (backend.daemon)."""
    name = record.threadName or ""
    return name[7:] if name.startswith("export:") else ""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and export, exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 6), "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        if _export_of(record):
            entry["export"] = _export_of(record)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    """time level logger: [export] message"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:   # noqa: N802 (logging's name)
        export = _export_of(record)
        if export:
            record.message = f"[{export}] {record.message}"
        return super().formatMessage(record)


def _setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def add_disk_options(p: argparse.ArgumentParser) -> None:
    """Disk flags shared by serve and plan. Defaults are None: "not given", so that a config
    file's value is not silently overridden (config.merge applies the real defaults)."""
    p.add_argument("--config", type=Path, default=None,
                   help="TOML file with any of these options (flags override it)")
    p.add_argument("--disk", default=None,
                   help="backing file or block device, or null:SIZE (no I/O, reads return zeroes);"
                        " append ,latency=DIST[,iops=N][,bw=N] to emulate a device")
    p.add_argument("--queues", type=positive_int, default=None,
                   help="maximum number of virtqueues offered (default: online CPUs)")
    p.add_argument("--policy", default=None,
                   help="I/O thread placement: per-queue (default), shared, threads=K")
    p.add_argument("--vcpu-cpus", default=None,
                   help="host CPUs that run the guest's vCPUs (kept free of I/O threads), e.g. 0-3")


def add_serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", type=Path, default=None, help="UNIX socket path to listen on")
    p.add_argument("--socket-fd", default=None, metavar="N|NAME",
                   help="serve on a listening socket handed over instead: a descriptor number, or the"
                        " name systemd gave it (socket activation, LISTEN_FDNAMES)")
    p.add_argument("--name", default=None,
                   help="the export's name in RPC, metrics and logs (default: the socket's stem)")
    p.add_argument("--read-only", action=argparse.BooleanOptionalAction, default=None,
                   help="advertise RO; writes fail with IOERR")
    p.add_argument("--cache", choices=["none", "writeback"], default=None,
                   help="none: O_DIRECT (default); writeback: through the host page cache")
    p.add_argument("--fixed", choices=("all", "buffers", "files", "none"), default=None,
                   help="file disks: what each I/O thread registers with its io_uring: the file as "
                        "a fixed file (files, the default), guest memory as fixed buffers too (all: "
                        "READ_FIXED/WRITE_FIXED, no page pinning per request, but all of the guest's "
                        "memory is faulted in and pinned when a queue starts, seconds per GiB of "
                        "memory not yet touched), buffers, or none")
    p.add_argument("--iopoll", action=argparse.BooleanOptionalAction, default=None,
                   help="file disks: poll the device for completions (IORING_SETUP_IOPOLL) instead of "
                        "waiting for its interrupts; needs --cache none and a device with poll "
                        "queues (NVMe: nvme.poll_queues=N), else serve says why and uses interrupts")
    p.add_argument("--serial", default=None, help="serial number (GET_ID), up to 20 bytes")
    p.add_argument("--socket-mode", default=None, help="socket permissions (default 0600)")
    p.add_argument("--socket-group", default=None, help="group owning the socket")
    p.add_argument("--poll-us", default=None,
                   help="I/O threads spin up to this many microseconds for work before sleeping"
                        " (default 50; 0 when they share CPUs with vCPUs)")
    p.add_argument("--metrics", default=None,
                   help="serve Prometheus metrics on [HOST:]PORT (HOST defaults to 127.0.0.1)")
    p.add_argument("--record", type=Path, default=None, metavar="FILE",
                   help="record every request served: blktrace files FILE.blktrace.<queue> "
                        "(blkparse -i FILE reads them), or with --record-format iolog a fio iolog FILE")
    p.add_argument("--record-format", choices=["blktrace", "iolog"], default=None,
                   help="format of --record (default blktrace)")
    p.add_argument("--rpc-socket", type=Path, default=None,
                   help="JSON-RPC 2.0 management socket (mode 0600): add, remove and inspect exports"
                        " while serving (`dataplane rpc`)")
    p.add_argument("--io-threads", default=None,
                   help="I/O threads shared by the exports when there are several (default: one per"
                        " CPU not running a vCPU)")
    p.add_argument("--iotlb-timeout", type=time_arg, default=None, metavar="TIME",
                   help="behind a vIOMMU, how long a request waits for the IOTLB entry it"
                        " missed before it fails with IOERR (default 10s)")
    # The vIOMMU enforces nothing: unknown IOVAs are taken as guest-physical, permissions and
    # invalidations are ignored (to prove the hostile IOTLB tests see it).
    p.add_argument("--debug-no-iotlb-check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--debug-no-inflight", dest="inflight", action="store_false", default=None,
                   help=argparse.SUPPRESS)   # turns reconnect safety off, to prove the tests see it
    # The same for migration: LOG_ALL and LOG_SHMFD are offered, nothing is logged.
    p.add_argument("--debug-no-dirty-log", dest="dirty_log", action="store_false", default=None,
                   help=argparse.SUPPRESS)
    # The lost interrupt after a restart: no signal when a queue starts or gets a call fd...
    p.add_argument("--debug-no-call-on-start", action="store_true", help=argparse.SUPPRESS)
    # ...and a SIGKILL between the N-th used-index store and its interrupt.
    p.add_argument("--debug-kill-before-signal", type=positive_int, default=None, metavar="N",
                   help=argparse.SUPPRESS)
    # REM_MEM_REG without waiting for the requests in flight (use-after-unmap, to prove the test).
    p.add_argument("--debug-no-mem-drain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--debug-serial-control", action="store_true", help=argparse.SUPPRESS)
    # --iopoll on a device without poll queues (its completions come by interrupt and the I/O
    # thread polls for them): runs the polled path on machines that have no such device
    p.add_argument("--debug-iopoll-without-poll-queues", action="store_true", help=argparse.SUPPRESS)
    # one export's control work at a time (as one blocking loop would): proves the isolation test


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dataplane", description=__doc__)
    parser.add_argument("--log-level", default=None,
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="json: one JSON object per log line (structured logs)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the vhost-user-blk backend in the foreground")
    add_disk_options(serve)
    add_serve_options(serve)

    stats = sub.add_parser("stats", help="per-queue statistics of a running `dataplane serve`")
    stats.add_argument("--socket", type=Path, required=True, help="the backend's vhost-user socket")
    stats.add_argument("--json", action="store_true", help="print the JSON snapshot")

    plan = sub.add_parser("plan", help="show where each virtqueue's I/O thread would run, and why"
                                       " (every export's, with --config FILE of [[export]] tables)")
    add_disk_options(plan)
    plan.add_argument("--io-threads", default=None, help=argparse.SUPPRESS)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    rpc = sub.add_parser("rpc", help="call a method of a running `dataplane serve --rpc-socket`",
                         description="Call a JSON-RPC method and print its result as JSON. Values"
                         " are JSON when they parse as JSON (2, true, [0, 1]), else strings; a.b=v"
                         " sets member b of object a (addr.type=fd).")
    rpc.add_argument("method", help="export_add, export_remove, export_list, export_get, stats,"
                                    " log_level_set, threads, methods")
    rpc.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                     help="a parameter (repeat for more)")
    rpc.add_argument("--socket", default=None,
                     help="the management socket (default: $DATAPLANE_RPC_SOCKET or"
                          " /run/dataplane/rpc.sock)")
    rpc.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")

    demo = sub.add_parser("demo", help="serve a default disk and run a QEMU guest against it")
    demo.add_argument("--disk", default=None,
                      help="backing file (default: a 256 MiB file in the cache directory)")
    demo.add_argument("--queues", type=positive_int, default=2)
    demo.add_argument("--runtime", type=positive_int, default=5, help="fio seconds per job")

    add_load_parser(sub)
    from .replay.cli import add_replay_command, add_trace_commands

    add_trace_commands(sub)
    add_replay_command(sub)
    return parser


def add_load_parser(sub: argparse._SubParsersAction) -> None:
    load = sub.add_parser(
        "load", help="drive a vhost-user-blk backend with a C load generator (fio-like output)",
        description="One C thread per queue plays the guest: fio's options and fio's output.")
    load.add_argument("--socket", required=True, help="vhost-user socket of the backend")
    load.add_argument("--queues", type=positive_int, default=1, help="queues to drive (one job each)")
    add_ring_argument(load)
    load.add_argument("--rw", "--readwrite", dest="rw", default="randread",
                      choices=["read", "write", "randread", "randwrite", "randrw", "rw", "readwrite"])
    load.add_argument("--rwmixread", type=int, default=50, help="percent reads for randrw / rw")
    load.add_argument("--bs", type=size_arg, default=4096, help="block size (4k, 64k, 1m ...)")
    load.add_argument("--iodepth", type=positive_int, default=32, help="requests in flight per queue")
    load.add_argument("--runtime", type=time_arg, default=10.0,
                      help="seconds (10, 10s, 500ms, 2m); 0 with --number-ios: no time limit")
    load.add_argument("--ramp", "--ramp_time", "--ramp-time", dest="ramp", type=time_arg,
                      default=0.0, help="time before runtime that is not counted")
    load.add_argument("--size", type=size_arg, default=0, help="bytes from --offset (default: to the end)")
    load.add_argument("--offset", type=size_arg, default=0, help="start of the region")
    load.add_argument("--number-ios", "--number_ios", dest="number_ios", type=count_arg, default=0,
                      help="stop each queue after exactly this many I/Os")
    load.add_argument("--rate-iops", "--rate_iops", dest="rate_iops", type=count_arg, default=0,
                      help="open loop: this many I/Os per second per queue, latency from the schedule")
    load.add_argument("--verify", action="store_true",
                      help="stamp writes and check reads (queues get disjoint regions; "
                           "write-only jobs are read back at the end)")
    load.add_argument("--randseed", type=count_arg, default=0x89)
    load.add_argument("--indirect", action=argparse.BooleanOptionalAction, default=None,
                      help="one indirect descriptor per request (default: the faster layout)")
    load.add_argument("--poll-us", dest="poll_us", type=count_arg, default=0,
                      help="spin on the used ring this long before sleeping on the call eventfd")
    load.add_argument("--cpus", default="", help="pin queue i's thread to the i-th CPU of this list")
    load.add_argument("--mem-regions", dest="mem_regions", type=positive_int, default=1,
                      help="give guest memory to the backend as this many regions (more than 8"
                           " need CONFIGURE_MEM_SLOTS: one ADD_MEM_REG each)")
    load.add_argument("--log-all", dest="log_all", action="store_true",
                      help="run as under a live migration: a dirty log (SET_LOG_BASE, LOG_ALL,"
                           " VHOST_VRING_F_LOG) harvested every 100 ms")
    load.add_argument("--iommu", choices=["run", "request"], default=None,
                      help="play a guest behind a vIOMMU (VIRTIO_F_IOMMU_PLATFORM): addresses are"
                           " IOVAs, misses answered; run: the buffers mapped once for the run"
                           " (static mappings), request: each request mapped before it is"
                           " published and unmapped when it completes (strict IOMMU mode)")
    load.add_argument("--iommu-page", dest="iommu_page", type=size_arg, default=4096,
                      help="--iommu run: bytes per IOTLB update of the run's mappings (4k, as"
                           " QEMU sends them; 0: one update per buffer area)")
    load.add_argument("--hotplug-every", dest="hotplug_every", type=time_arg, default=0.0,
                      help="while it runs, hot-plug 1 MiB of memory and remove it again this often"
                           " (ADD_MEM_REG / REM_MEM_REG)")
    load.add_argument("--group-reporting", "--group_reporting", dest="group_reporting",
                      action="store_true", help="one aggregate job instead of one per queue")
    load.add_argument("--output-format", "--output_format", dest="output_format",
                      choices=["normal", "json"], default="normal")
    load.add_argument("--output", type=Path, default=None, help="write the report here")


def _config(args: argparse.Namespace):
    from .config import load_config, merge

    file_values = load_config(args.config) if args.config else {}
    return merge(file_values, vars(args), command=args.command)


def make_pool(cfg):
    """The I/O thread pool serve would start with: topology from sysfs, each disk's hardware
    queues. With one export its `single` is the per-queue plan."""
    from .backend import plan_pool
    from .placement import Topology

    topology = Topology.from_sysfs(allowed=os.sched_getaffinity(0))
    return plan_pool(topology, cfg.exports, cfg.policy, cfg.io_threads, cfg.vcpu_cpus)


def cmd_plan(args: argparse.Namespace) -> int:
    pool = make_pool(_config(args))
    shown = pool.single if pool.single is not None else pool
    print(shown.to_json() if args.json else shown.to_table())
    return 0


def rpc_params(items: list[str]) -> dict:
    """--param KEY=VALUE ... as JSON-RPC params (VALUE is JSON when it parses, else a string)."""
    params: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        *parents, last = key.split(".")
        target = params
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--param {item!r}: {part} is not an object")
        target[last] = value
    return params


def cmd_rpc(args: argparse.Namespace) -> int:
    from .rpc import DEFAULT_SOCKET, Client, RpcError

    path = args.socket or os.environ.get("DATAPLANE_RPC_SOCKET") or DEFAULT_SOCKET
    params = rpc_params(args.param)
    with Client(path, timeout=args.timeout) as client:
        try:
            result = client.call(args.method, params or None)
        except RpcError as exc:
            print(json.dumps({"error": exc.to_dict()}, indent=2))
            print(f"dataplane rpc {args.method}: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(result, indent=2))
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from .replay import cli as trace_cli

    return trace_cli.run(args)


def cmd_replay(args: argparse.Namespace) -> int:
    from .replay import cli as trace_cli

    return trace_cli.run_replay(args)


def cmd_stats(args: argparse.Namespace) -> int:
    from .backend import fetch_stats
    from .observe import format_table

    snap = fetch_stats(str(args.socket))
    print(json.dumps(snap, indent=2) if args.json else format_table(snap))
    return 0


def _install_sighup(args: argparse.Namespace) -> None:
    """SIGHUP re-reads the log level (from --config when given, else the command line's)."""

    def on_sighup(_signum: int, _frame: object) -> None:
        level = args.log_level
        if args.config:
            try:
                level = _config(args).log_level if args.log_level is None else args.log_level
            except DataplaneError as exc:
                log.error("SIGHUP: keeping the log level: %s", exc)
                return
        level = level or "info"
        logging.getLogger().setLevel(getattr(logging, level.upper()))
        log.warning("SIGHUP: log level is now %s", level)

    signal.signal(signal.SIGHUP, on_sighup)


def _debug_switches(args: argparse.Namespace) -> None:
    """The hidden switches with which tests show what a protection is for (process-wide)."""
    from .backend import set_debug_switches

    set_debug_switches(args.debug_no_call_on_start, args.debug_kill_before_signal or 0,
                       args.debug_no_mem_drain)
    if args.debug_no_call_on_start:
        log.warning("debug: no interrupt when a queue starts or its call fd changes")
    if args.debug_kill_before_signal:
        log.warning("debug: SIGKILL before interrupt number %d", args.debug_kill_before_signal)
    if args.debug_no_mem_drain:
        log.warning("debug: memory regions removed under the requests in flight")
    if getattr(args, "debug_no_iotlb_check", False):
        log.warning("debug: the vIOMMU's IOTLB is not enforced (addresses, permissions,"
                    " invalidations)")


def _iotlb_timeout(args: argparse.Namespace) -> dict[str, int]:
    if args.iotlb_timeout is None:
        return {}
    ms = round(args.iotlb_timeout * 1000)
    if ms < 1:
        raise ConfigError(f"--iotlb-timeout {args.iotlb_timeout:g}s: at least 1 ms")
    return {"iotlb_miss_timeout_ms": ms}


def cmd_serve(args: argparse.Namespace) -> int:
    from .backend import Daemon, DaemonOptions, HandedSockets, install_signal_handlers

    handed = HandedSockets.from_process()   # first: before this process opens sockets of its own
    cfg = _config(args)
    logging.getLogger().setLevel(getattr(logging, (args.log_level or cfg.log_level).upper()))
    daemon = Daemon(DaemonOptions(policy=cfg.policy, vcpu_cpus=cfg.vcpu_cpus, io_threads=cfg.io_threads,
                                  poll_us=cfg.poll_us, metrics=cfg.metrics, rpc_socket=cfg.rpc_socket,
                                  serial_control=args.debug_serial_control,
                                  iopoll_unchecked=args.debug_iopoll_without_poll_queues,
                                  dirty_log=args.dirty_log is not False,
                                  iotlb_check=not args.debug_no_iotlb_check,
                                  **_iotlb_timeout(args)), handed=handed)
    _debug_switches(args)
    # Before any socket appears: a SIGTERM that follows the socket at once still drains.
    install_signal_handlers(daemon)
    _install_sighup(args)
    daemon.start(cfg.exports)
    try:
        daemon.serve_forever()
    finally:
        daemon.close()
    log.info("exited cleanly")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .guest.demo import run_demo

    return run_demo(disk=args.disk, queues=args.queues, runtime=args.runtime)


def cmd_load(args: argparse.Namespace) -> int:
    from .driver import Device, Job
    from .driver.background import Background

    cpus = parse_cpus(args.cpus)
    job = Job(rw=args.rw, rwmixread=args.rwmixread, bs=args.bs, iodepth=args.iodepth,
              runtime=args.runtime, ramp_time=args.ramp, size=args.size, offset=args.offset,
              number_ios=args.number_ios, rate_iops=args.rate_iops, verify=args.verify,
              randseed=args.randseed, indirect=args.indirect, poll_us=args.poll_us, cpus=cpus,
              iommu=args.iommu or "run", iommu_page=args.iommu_page)
    size = job.queue_size(indirect=bool(args.indirect))
    if size > 1024:
        size = job.queue_size(indirect=True)
    with Device.connect(args.socket, queues=args.queues, queue_size=size, ring=args.ring,
                        memory=job.memory_needed(args.queues), regions=args.mem_regions,
                        iommu=args.iommu is not None) as dev:
        with Background(dev, log_all=args.log_all, hotplug_every=args.hotplug_every) as bg:
            result = dev.load(job)
    for line in bg.report.lines():
        log.info("load: %s", line)
    report = render_report(result, args.output_format, args.group_reporting)
    if args.output is not None:
        args.output.write_text(report)
    else:
        sys.stdout.write(report)
    if result.error or result.verify_failures or result.io_errors or bg.report.error:
        log.error("load: %s", "; ".join(filter(None, [
            result.summary_of_problems() if result.error or result.verify_failures
            or result.io_errors else "", bg.report.error])))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level or "info", args.log_format)
    handlers = {"serve": cmd_serve, "plan": cmd_plan, "stats": cmd_stats, "rpc": cmd_rpc,
                "demo": cmd_demo, "load": cmd_load, "trace": cmd_trace, "replay": cmd_replay}
    return run_command(args, handlers[args.command])


if __name__ == "__main__":
    sys.exit(main())
