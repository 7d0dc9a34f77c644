"""Command line: `dataplane serve | demo | load`. Errors are one line on stderr and exit status 2
(no traceback unless --debug)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import ConfigError, DataplaneError

log = logging.getLogger("dataplane")


def default_queues() -> int:
    return len(os.sched_getaffinity(0))


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def add_disk_options(p: argparse.ArgumentParser, *, disk_required: bool = True) -> None:
    p.add_argument("--disk", required=disk_required,
                   help="backing file or block device, or null:SIZE (no I/O, reads return zeroes)")
    p.add_argument("--read-only", action="store_true", help="advertise RO; writes fail with IOERR")
    p.add_argument("--cache", choices=["none", "writeback"], default="none",
                   help="none: O_DIRECT (default); writeback: through the host page cache")
    p.add_argument("--serial", default="dataplane", help="serial number (GET_ID), up to 20 bytes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dataplane", description=__doc__)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the vhost-user-blk backend in the foreground")
    serve.add_argument("--socket", required=True, type=Path, help="UNIX socket path to listen on")
    add_disk_options(serve)
    serve.add_argument("--queues", type=_positive_int, default=default_queues(),
                       help="maximum number of virtqueues offered (default: online CPUs)")

    demo = sub.add_parser("demo", help="serve a default disk and run a QEMU guest against it")
    demo.add_argument("--disk", default=None,
                      help="backing file (default: a 256 MiB file in the cache directory)")
    demo.add_argument("--queues", type=_positive_int, default=2)
    demo.add_argument("--runtime", type=_positive_int, default=5, help="fio seconds per job")

    add_load_parser(sub)
    return parser


def _size_arg(text: str) -> int:
    from .disk import parse_size

    try:
        return parse_size(text)
    except DataplaneError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _time_arg(text: str) -> float:
    from .load import parse_time

    try:
        return parse_time(text)
    except DataplaneError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be negative")
    return value


def add_load_parser(sub: argparse._SubParsersAction) -> None:
    load = sub.add_parser(
        "load", help="drive a vhost-user-blk backend with a C load generator (fio-like output)",
        description="One C thread per queue plays the guest: fio's options and fio's output.")
    load.add_argument("--socket", required=True, help="vhost-user socket of the backend")
    load.add_argument("--queues", type=_positive_int, default=1, help="queues to drive (one job each)")
    load.add_argument("--rw", "--readwrite", dest="rw", default="randread",
                      choices=["read", "write", "randread", "randwrite", "randrw", "rw", "readwrite"])
    load.add_argument("--rwmixread", type=int, default=50, help="percent reads for randrw / rw")
    load.add_argument("--bs", type=_size_arg, default=4096, help="block size (4k, 64k, 1m ...)")
    load.add_argument("--iodepth", type=_positive_int, default=32, help="requests in flight per queue")
    load.add_argument("--runtime", type=_time_arg, default=10.0,
                      help="seconds (10, 10s, 500ms, 2m); 0 with --number-ios: no time limit")
    load.add_argument("--ramp", "--ramp_time", "--ramp-time", dest="ramp", type=_time_arg,
                      default=0.0, help="time before runtime that is not counted")
    load.add_argument("--size", type=_size_arg, default=0, help="bytes from --offset (default: to the end)")
    load.add_argument("--offset", type=_size_arg, default=0, help="start of the region")
    load.add_argument("--number-ios", "--number_ios", dest="number_ios", type=_count_arg, default=0,
                      help="stop each queue after exactly this many I/Os")
    load.add_argument("--rate-iops", "--rate_iops", dest="rate_iops", type=_count_arg, default=0,
                      help="open loop: this many I/Os per second per queue, latency from the schedule")
    load.add_argument("--verify", action="store_true",
                      help="stamp writes and check reads (queues get disjoint regions; "
                           "write-only jobs are read back at the end)")
    load.add_argument("--randseed", type=_count_arg, default=0x89)
    load.add_argument("--indirect", action=argparse.BooleanOptionalAction, default=None,
                      help="one indirect descriptor per request (default: the faster layout)")
    load.add_argument("--poll-us", dest="poll_us", type=_count_arg, default=0,
                      help="spin on the used ring this long before sleeping on the call eventfd")
    load.add_argument("--cpus", default="", help="pin queue i's thread to the i-th CPU of this list")
    load.add_argument("--group-reporting", "--group_reporting", dest="group_reporting",
                      action="store_true", help="one aggregate job instead of one per queue")
    load.add_argument("--output-format", "--output_format", dest="output_format",
                      choices=["normal", "json"], default="normal")
    load.add_argument("--output", type=Path, default=None, help="write the report here")


def cmd_serve(args: argparse.Namespace) -> int:
    from .disk import open_disk
    from .vhost import ServerOptions, VhostUserBlkServer, install_signal_handlers

    disk = open_disk(args.disk, read_only=args.read_only, cache=args.cache, serial=args.serial)
    try:
        server = VhostUserBlkServer(disk, ServerOptions(socket_path=args.socket,
                                                        num_queues=args.queues))
    except BaseException:
        disk.close()
        raise
    install_signal_handlers(server)
    try:
        server.serve_forever()
    finally:
        server.close()
        disk.close()
    log.info("exited cleanly")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(disk=args.disk, queues=args.queues, runtime=args.runtime)


def cmd_load(args: argparse.Namespace) -> int:
    import json

    from .frontend import Device
    from .load import Job

    try:
        cpus = [int(c) for c in args.cpus.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--cpus {args.cpus!r}: expected a comma-separated list of CPU numbers") from None
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
    if args.output_format == "json":
        report = json.dumps(result.to_json(args.group_reporting), indent=2) + "\n"
    else:
        report = result.to_text(args.group_reporting)
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
    _setup_logging(args.log_level)
    handlers = {"serve": cmd_serve, "demo": cmd_demo, "load": cmd_load}
    try:
        return handlers[args.command](args)
    except DataplaneError as exc:
        if args.debug:
            raise
        print(f"dataplane {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
