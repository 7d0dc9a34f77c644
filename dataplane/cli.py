"""Command line: `dataplane serve | demo`. Errors are one line on stderr and exit status 2
(no traceback unless --debug)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import DataplaneError

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
    return parser


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    handlers = {"serve": cmd_serve, "demo": cmd_demo}
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
