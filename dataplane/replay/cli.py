"""`dataplane trace convert | stats`: the trace readers from the command line.

Wiring (in dataplane/cli.py): `add_trace_commands(sub)` next to serve and demo, and
`"trace": replay.cli.run` in the handler table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ConfigError

TARGETS = ("fio-v3",)


def add_trace_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .detect import FORMATS

    trace = subparsers.add_parser("trace", help="read block traces: convert them, summarise them",
                                  description="Read block traces (" + ", ".join(FORMATS) + "), "
                                  "plain or gzip'd.")
    sub = trace.add_subparsers(dest="trace_command", required=True, metavar="{convert,stats}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("input", type=Path, metavar="INPUT",
                       help="trace file (blktrace: any DEV.blktrace.N, or the DEV prefix)")
        p.add_argument("--format", choices=FORMATS, default=None, help="input format (default: detect)")
        p.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                       help="malformed lines: stop at the first (default) or skip and count them")
        p.add_argument("--events", choices=("queue", "issue"), default="queue",
                       help="blktrace/blkparse: replay queue (Q, default) or issue (D) events")

    convert = sub.add_parser("convert", help="rewrite a trace as a fio iolog (read_iolog=)")
    common(convert)
    convert.add_argument("--to", choices=TARGETS, default="fio-v3", help="output format (default fio-v3)")
    convert.add_argument("--device", default="/dev/vda",
                         help="the file or device every I/O targets in the iolog (default /dev/vda)")
    convert.add_argument("-o", "--output", type=Path, default=None, help="output file (default: stdout)")

    stats = sub.add_parser("stats", help="I/O mix, sizes, rate, footprint and streams of a trace")
    common(stats)
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")
    return trace


def run(args: argparse.Namespace) -> int:
    from .convert import format_stats, trace_stats, write_fio_v3
    from .detect import open_trace

    reader = open_trace(args.input, args.format, on_error=args.on_error, events=args.events)
    if args.trace_command == "stats":
        stats = trace_stats(reader)
        if args.json:
            json.dump(stats, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(format_stats(stats))
        return 0
    if args.trace_command != "convert":
        raise ConfigError(f"unknown trace command {args.trace_command!r}")
    if args.output is None:
        count = write_fio_v3(reader, sys.stdout, device=args.device)
    else:
        tmp = args.output.with_name(args.output.name + ".part")
        try:
            with open(tmp, "w", buffering=1 << 20) as out:
                count = write_fio_v3(reader, out, device=args.device)
            tmp.replace(args.output)
        except OSError as exc:
            raise ConfigError(f"cannot write {args.output}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
    if reader.skipped:
        print(f"trace convert: skipped {reader.skipped} malformed lines", file=sys.stderr)
    if args.output is not None:
        print(f"trace convert: wrote {count} I/Os to {args.output}", file=sys.stderr)
    return 0
