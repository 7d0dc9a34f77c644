"""Benchmarks. `python -m bench.compare` runs the comparison matrix (dataplane vs
qemu-storage-daemon vs native fio); see docs/results.md for the latest results."""
