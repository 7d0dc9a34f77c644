"""Command line: `dataplane serve | demo | load`. Errors are one line on stderr and exit status 2
(no traceback unless --debug)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .cli_common import count_arg, parse_cpus, positive_int, render_report, run_command, size_arg, time_arg
from .errors import DataplaneError

log = logging.getLogger("dataplane")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        entry = {"ts": round(record.created, 6), "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
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
    p.add_argument("--read-only", action=argparse.BooleanOptionalAction, default=None,
                   help="advertise RO; writes fail with IOERR")
    p.add_argument("--cache", choices=["none", "writeback"], default=None,
                   help="none: O_DIRECT (default); writeback: through the host page cache")
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
    p.add_argument("--debug-no-inflight", dest="inflight", action="store_false", default=None,
                   help=argparse.SUPPRESS)   # turns reconnect safety off, to prove the tests see it


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

    plan = sub.add_parser("plan", help="show where each virtqueue's I/O thread would run, and why")
    add_disk_options(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

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
    load.add_argument("--group-reporting", "--group_reporting", dest="group_reporting",
                      action="store_true", help="one aggregate job instead of one per queue")
    load.add_argument("--output-format", "--output_format", dest="output_format",
                      choices=["normal", "json"], default="normal")
    load.add_argument("--output", type=Path, default=None, help="write the report here")


def _config(args: argparse.Namespace):
    from .config import load_config, merge

    file_values = load_config(args.config) if args.config else {}
    return merge(file_values, vars(args), command=args.command)


def make_plan(cfg):
    """The placement plan for a config: topology from sysfs, the disk's hardware queues."""
    from .disks import split_disk_options
    from .placement import BlockDevice, Topology, plan

    topology = Topology.from_sysfs(allowed=os.sched_getaffinity(0))
    device = BlockDevice.resolve(split_disk_options(cfg.disk)[0])
    return plan(topology, device, cfg.queues, cfg.policy, cfg.vcpu_cpus)


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = _config(args)
    p = make_plan(cfg)
    print(p.to_json() if args.json else p.to_table())
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


def cmd_serve(args: argparse.Namespace) -> int:
    from .backend import EnginePool, ServerOptions, VhostUserBlkServer, install_signal_handlers
    from .disks import open_disk

    cfg = _config(args)
    logging.getLogger().setLevel(getattr(logging, (args.log_level or cfg.log_level).upper()))
    disk = open_disk(cfg.disk, read_only=cfg.read_only, cache=cfg.cache, serial=cfg.serial)
    try:
        placement = make_plan(cfg)
        server = VhostUserBlkServer(
            disk,
            ServerOptions(socket_path=cfg.socket, num_queues=cfg.queues, socket_mode=cfg.socket_mode,
                          socket_group=cfg.socket_group, inflight=cfg.inflight, metrics=cfg.metrics,
                          record=cfg.record, record_format=cfg.record_format),
            EnginePool.from_plan(placement, poll_ns=cfg.poll_us * 1000))
    except BaseException:
        disk.close()
        raise
    for note in placement.notes:
        log.info("placement: %s", note)
    for row in placement.rows:
        log.info("placement: vq%d -> %s on cpu %s (%s)", row.virtqueue, row.thread_name,
                 row.host_cpu, row.reason)
    install_signal_handlers(server)
    _install_sighup(args)
    try:
        server.serve_forever()
    finally:
        server.close()
        disk.close()
    log.info("exited cleanly")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .guest.demo import run_demo

    return run_demo(disk=args.disk, queues=args.queues, runtime=args.runtime)


def cmd_load(args: argparse.Namespace) -> int:
    from .driver import Device, Job

    cpus = parse_cpus(args.cpus)
    job = Job(rw=args.rw, rwmixread=args.rwmixread, bs=args.bs, iodepth=args.iodepth,
              runtime=args.runtime, ramp_time=args.ramp, size=args.size, offset=args.offset,
              number_ios=args.number_ios, rate_iops=args.rate_iops, verify=args.verify,
              randseed=args.randseed, indirect=args.indirect, poll_us=args.poll_us, cpus=cpus)
    ring = job.queue_size(indirect=bool(args.indirect))
    if ring > 1024:
        ring = job.queue_size(indirect=True)
    with Device.connect(args.socket, queues=args.queues, queue_size=ring,
                        memory=job.memory_needed(args.queues)) as dev:
        result = dev.load(job)
    report = render_report(result, args.output_format, args.group_reporting)
    if args.output is not None:
        args.output.write_text(report)
    else:
        sys.stdout.write(report)
    if result.error or result.verify_failures or result.io_errors:
        log.error("load: %s", result.summary_of_problems())
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level or "info", args.log_format)
    handlers = {"serve": cmd_serve, "plan": cmd_plan, "stats": cmd_stats, "demo": cmd_demo,
                "load": cmd_load, "trace": cmd_trace, "replay": cmd_replay}
    return run_command(args, handlers[args.command])


if __name__ == "__main__":
    sys.exit(main())
