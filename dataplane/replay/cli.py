"""`dataplane trace convert | stats | plot` and `dataplane replay`: the trace tools from the command line.

Wiring (in dataplane/cli.py): `add_trace_commands(sub)` and `add_replay_command(sub)` next to
serve and demo, and `"trace": replay.cli.run`, `"replay": replay.cli.run_replay` in the
handler table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..cli_common import add_ring_argument, int_at_least, parse_cpus, render_report, run_command, size_arg
from ..errors import ConfigError

TARGETS = ("fio-v3",)
log = logging.getLogger("dataplane.replay")


def add_trace_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .detect import FORMATS

    trace = subparsers.add_parser("trace", help="read block traces: convert them, summarise them",
                                  description="Read block traces (" + ", ".join(FORMATS) + "), "
                                  "plain or gzip'd.")
    sub = trace.add_subparsers(dest="trace_command", required=True, metavar="{convert,stats,plot}")

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

    from .plot_cli import add_plot_command

    add_plot_command(sub)
    return trace


def run(args: argparse.Namespace) -> int:
    from .convert import format_stats, trace_stats, write_fio_v3
    from .detect import open_trace

    if args.trace_command == "plot":
        from .plot_cli import run_plot

        return run_plot(args)
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


# ---- dataplane replay ----

REPLAY_DESCRIPTION = """\
Replay a block trace: through a vhost-user-blk socket (this backend, qemu-storage-daemon, ...)
with one C thread per virtqueue playing the guest, or with --native straight to a file or block
device with io_uring (O_DIRECT), the bare-metal baseline. Reports in fio's layout.
`--compare A.json B.json` sets two reports side by side."""


_positive_int = int_at_least(1)
_count = int_at_least(0)


def _speed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def add_replay_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .detect import FORMATS
    from .engine import FEED_MEMORY, FITS, MAX_REQUEST, MODES, QUEUE_MAPS

    p = subparsers.add_parser("replay", help="replay a block trace against a vhost-user-blk socket "
                              "or a file (fio-style report)", description=REPLAY_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path, nargs="?", metavar="TRACE",
                   help="trace file (" + ", ".join(FORMATS) + "; gzip'd or not)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--socket", type=Path, default=None, help="vhost-user-blk socket to replay through")
    target.add_argument("--native", type=Path, default=None, metavar="FILE",
                        help="replay straight to this file or block device (io_uring, O_DIRECT)")
    target.add_argument("--compare", type=Path, nargs=2, default=None, metavar=("A.json", "B.json"),
                        help="compare two JSON reports (replay's, load's or fio's) instead of replaying")
    p.add_argument("--queues", type=_positive_int, default=1,
                   help="virtqueues (or --native threads) to replay on (default 1)")
    add_ring_argument(p)
    p.add_argument("--format", choices=FORMATS, default=None, help="trace format (default: detect)")
    p.add_argument("--events", choices=("queue", "issue"), default="queue",
                   help="blktrace/blkparse: replay queue (Q, default) or issue (D) events")
    p.add_argument("--mode", choices=MODES, default="timed",
                   help="timed: honour timestamps, measure issue lag (default); afap: as fast as "
                        "iodepth allows, in trace order per queue")
    p.add_argument("--speed", type=_speed, default=1.0, help="timed: play the trace this many times faster")
    p.add_argument("--iodepth", type=_positive_int, default=None,
                   help="requests in flight per queue (default 32 afap, 128 timed)")
    p.add_argument("--queue-map", "--queue_map", dest="queue_map", choices=QUEUE_MAPS, default="trace",
                   help="trace: the trace's stream (CPU, host/disk, device) picks the queue; hash: a "
                        "hash of the offset; rr: round robin (default trace)")
    p.add_argument("--fit", choices=FITS, default="wrap",
                   help="offsets past the target: wrap (modulo capacity, default), scale (by "
                        "capacity / footprint) or fail")
    p.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                   help="malformed trace lines: stop at the first (default) or skip and count them")
    p.add_argument("--max-request", type=size_arg, default=MAX_REQUEST,
                   help="longer reads and writes are split (default 1m)")
    p.add_argument("--spin-us", type=_count, default=50,
                   help="timed: spin this close to a record's time instead of sleeping (default 50)")
    p.add_argument("--poll-us", type=_count, default=None,
                   help="spin on completions this long before sleeping (default 5 afap, 0 timed)")
    p.add_argument("--feed-mb", type=_positive_int, default=FEED_MEMORY >> 20,
                   help="memory for records waiting to be issued, all queues (default 256): a trace "
                        "that fits is loaded before the clock starts, a longer one streams")
    p.add_argument("--cpus", default="", help="pin queue i's thread to the i-th CPU of this list")
    p.add_argument("--stamp", action=argparse.BooleanOptionalAction, default=False,
                   help="every 4 KiB a write carries names its queue and record, so the target's "
                        "contents say which record wrote them, and reads report the stamp they "
                        "find (default off: about one cache miss per write against a fast backend)")
    p.add_argument("--read-only", action="store_true",
                   help="--native: open the target read-only; writes and trims are skipped (counted)")
    p.add_argument("--group-reporting", "--group_reporting", dest="group_reporting", action="store_true",
                   help="one aggregate job instead of one per queue")
    p.add_argument("--output-format", "--output_format", dest="output_format",
                   choices=("normal", "json"), default="normal")
    p.add_argument("--output", type=Path, default=None, help="write the report here (default: stdout)")
    p.add_argument("--timeseries", type=Path, default=None, metavar="FILE.csv",
                   help="per-second CSV: IOPS, MB/s, mean and p99 latency, issue lag")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR",
                   help="with --compare: charts of the two reports into DIR (needs matplotlib)")
    p.add_argument("--plot-format", choices=("png", "svg"), default="png",
                   help="--plot image format (default png)")
    return p


def _write(text: str, path: Path | None) -> None:
    if path is None:
        sys.stdout.write(text)
        return
    try:
        path.write_text(text)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None


def run_replay(args: argparse.Namespace) -> int:
    """`dataplane replay`: 0 clean, 1 when I/O failed or the run ended early (ConfigError and
    other DataplaneErrors are the caller's: one line, status 2)."""
    if args.compare:
        return _run_compare(args)
    if args.plot is not None:
        raise ConfigError("--plot goes with --compare A.json B.json (charts of traces: dataplane trace plot)")
    if args.trace is None:
        raise ConfigError("name a TRACE to replay (or use --compare A.json B.json)")
    if args.socket is None and args.native is None:
        raise ConfigError("name the target: --socket PATH (vhost-user-blk) or --native FILE")
    if args.native is not None and args.ring is not None:
        raise ConfigError("--ring is the virtqueue format of a --socket replay; --native has none")
    from .detect import open_trace
    from .engine import ReplayOptions

    cpus = parse_cpus(args.cpus)
    options = ReplayOptions(mode=args.mode, speed=args.speed, iodepth=args.iodepth,
                            queue_map=args.queue_map, fit=args.fit, max_request=args.max_request,
                            spin_us=args.spin_us, poll_us=args.poll_us, cpus=cpus,
                            stamp=args.stamp, feed_memory=args.feed_mb << 20)
    reader = open_trace(args.trace, args.format, on_error=args.on_error, events=args.events)
    if args.native is not None:
        from .native import replay_native

        result = replay_native(args.native, reader, options, queues=args.queues, read_only=args.read_only)
    else:
        result = _replay_socket(args.socket, reader, options, args.queues, args.ring)
    _write(render_report(result, args.output_format, args.group_reporting), args.output)
    if args.timeseries is not None:
        result.write_timeseries(args.timeseries)
    if result.reader_skipped:
        log.warning("replay: skipped %d malformed line(s) of %s", result.reader_skipped, args.trace)
    if result.error or result.io_errors:
        log.error("replay: %s", result.summary_of_problems())
        return 1
    return 0


def _replay_socket(socket: Path, reader, options, queues: int, ring: str | None = None):
    from ..driver import Device
    from .engine import Geometry, buffer_size, replay_device, replay_memory, ring_size, scan_trace

    scan = scan_trace(reader, options.max_request)
    # Buffers are sized before the device's block size is known: assume the largest common one.
    buf = buffer_size(scan, Geometry(capacity=1 << 62, block_size=4096, discard=True, flush=True), options)
    with Device.connect(str(socket), queues=queues, queue_size=ring_size(options.depth, True),
                        memory=replay_memory(queues, options, buf), ring=ring) as dev:
        return replay_device(dev, reader, options, scan=scan, target=str(socket))


def _run_compare(args: argparse.Namespace) -> int:
    from .results import compare_reports, format_compare, load_report

    path_a, path_b = args.compare
    if args.plot is not None:
        from .charts import require_matplotlib

        require_matplotlib()
    a, b = load_report(path_a), load_report(path_b)
    rows = compare_reports(a, b)
    if not rows:
        raise ConfigError(f"{path_a} and {path_b} hold no I/O to compare")
    if args.plot is not None:
        from .plot_cli import plot_reports

        plot_reports([(str(path_a), a), (str(path_b), b)], args.plot, args.plot_format, rows)
    if args.output_format == "json":
        text = json.dumps({"a": str(path_a), "b": str(path_b), "rows": rows}, indent=2) + "\n"
    else:
        text = format_compare(rows, str(path_a), str(path_b))
    _write(text, args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dataplane.replay.cli replay ...`: the replay command on its own, with the
    main CLI's conventions (errors are one line on stderr and status 2)."""
    parser = argparse.ArgumentParser(prog="python -m dataplane.replay.cli")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    add_replay_command(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return run_command(args, run_replay)


if __name__ == "__main__":
    sys.exit(main())
