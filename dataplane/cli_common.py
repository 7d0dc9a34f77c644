"""What every subcommand's parser and handler share, whichever room owns the command (cli.py
for serve, plan, stats, load, demo; replay.cli for trace and replay): argparse types, and the
rule that an error is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import ConfigError, DataplaneError
from .units import parse_size, parse_time


def int_at_least(minimum: int):
    """An argparse type: a whole number >= minimum, with a message naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"{text!r} cannot be negative" if minimum == 0 else f"{text!r} must be at least {minimum}")
        return value

    return parse


positive_int = int_at_least(1)
count_arg = int_at_least(0)


def parse_cpus(text: str) -> list[int]:
    """--cpus: a comma-separated list of CPU numbers (empty: none)."""
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--cpus {text!r}: expected a comma-separated list of CPU numbers") from None


def render_report(result, output_format: str, group_reporting: bool) -> str:
    """A load or replay result as --output-format asks: fio's JSON or its normal text."""
    if output_format == "json":
        return json.dumps(result.to_json(group_reporting), indent=2) + "\n"
    return result.to_text(group_reporting)


def run_command(args: argparse.Namespace, handler) -> int:
    """Run a command's handler: a DataplaneError is one line on stderr and status 2 (with
    --debug, its traceback), Ctrl-C status 130."""
    try:
        return handler(args)
    except DataplaneError as exc:
        if args.debug:
            raise
        print(f"dataplane {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def size_arg(text: str) -> int:
    """An argparse type: a byte count with fio's suffixes (4k, 1m, 2g)."""
    try:
        return parse_size(text)
    except DataplaneError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def time_arg(text: str) -> float:
    """An argparse type: seconds in fio's time syntax (10, 10s, 500ms, 2m)."""
    try:
        return parse_time(text)
    except DataplaneError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_ring_argument(parser: argparse.ArgumentParser) -> None:
    """`--ring split|packed`: the virtqueue format a driver command plays the guest with."""
    parser.add_argument("--ring", choices=("split", "packed"), default=None,
                        help="virtqueue format (default split, which every backend has; packed "
                             "needs a backend that offers VIRTIO_F_RING_PACKED)")
