"""Disks: `--disk` specs (spec), opening the backing store and making its C handles (disk),
and the emulated-latency distributions (latency)."""

from .disk import MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR, Disk, open_disk, open_file
from .latency import LatencySpec, parse_latency
from .spec import split_disk_options

__all__ = [
    "MAX_DISCARD_SECTORS",
    "MAX_DISCARD_SEG",
    "SECTOR",
    "Disk",
    "LatencySpec",
    "open_disk",
    "open_file",
    "parse_latency",
    "split_disk_options",
]
