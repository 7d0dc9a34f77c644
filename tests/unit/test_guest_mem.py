"""Guest memory tables and the dirty log in C (csrc/vhost/guest_mem.c, dirty_log.c), no
threads: many regions in any order, copies that share mappings, regions taken away, the way
back from a host address to its guest-physical one, fds too short for what they announce,
and the bits of the log."""

from __future__ import annotations

import errno
import mmap
import os
import random

import pytest

from dataplane.core import ffi, lib

PAGE = 4096


def memfd(size: int) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def host(mem, gpa: int, length: int = 1) -> int:
    return int(ffi.cast("uintptr_t", lib.dp_mem_gpa_to_host(mem, gpa, length)))


def test_many_regions_in_any_order_translate_by_binary_search():
    n = int(lib.DP_MAX_MEM_REGIONS)
    assert n >= 256
    buf = ffi.new("char[]", n * PAGE)
    base = int(ffi.cast("uintptr_t", buf))
    order = list(range(n))
    random.Random(1).shuffle(order)
    mem = lib.dp_mem_new()
    try:
        for i in order:   # region i: gpa i * 2 pages (a hole after each), one page of buf
            assert lib.dp_mem_add_region(mem, i * 2 * PAGE, PAGE, (1 << 40) + i * PAGE,
                                         buf + i * PAGE) == 0
        assert lib.dp_mem_region_count(mem) == n
        assert lib.dp_mem_add_region(mem, n * 2 * PAGE, PAGE, 1 << 41, buf) == -errno.ENOSPC
        for i in (0, 1, 7, 8, 9, n // 2, n - 1):
            assert host(mem, i * 2 * PAGE + 5) == base + i * PAGE + 5
            assert lib.dp_mem_gpa_to_host(mem, i * 2 * PAGE + PAGE, 1) == ffi.NULL   # the hole
            assert lib.dp_mem_host_to_gpa(mem, ffi.cast("void *", base + i * PAGE + 9)) == i * 2 * PAGE + 9
        assert lib.dp_mem_gpa_to_host(mem, n * 2 * PAGE, 1) == ffi.NULL
        assert lib.dp_mem_host_to_gpa(mem, ffi.cast("void *", base - 1)) == 2**64 - 1
    finally:
        lib.dp_mem_free(mem)


@pytest.mark.parametrize("nregions", [1, 8, 9, 64])
def test_a_buffer_across_adjacent_regions_of_one_fd_is_split(nregions):
    """QEMU's way of splitting one RAMBlock: one fd, offsets; contiguous in both spaces."""
    size = nregions * 16 * PAGE
    fd = memfd(size)
    mem = lib.dp_mem_new()
    try:
        piece = size // nregions
        for i in reversed(range(nregions)):
            assert lib.dp_mem_map_region(mem, fd, i * piece, piece, (1 << 40) + i * piece, i * piece) == 0
        m = mmap.mmap(fd, size)
        m[:] = bytes(range(256)) * (size // 256)
        for gpa in range(0, size, piece):
            p = lib.dp_mem_gpa_to_host(mem, gpa, piece)
            assert bytes(ffi.buffer(p, 16)) == bytes(m[gpa:gpa + 16])
        if nregions > 1:
            assert lib.dp_mem_gpa_to_host(mem, piece - 8, 16) == ffi.NULL   # two pieces
        m.close()
    finally:
        lib.dp_mem_free(mem)
        os.close(fd)


def test_a_copy_shares_mappings_and_a_removed_region_goes_with_its_last_table():
    fd_a, fd_b = memfd(4 * PAGE), memfd(4 * PAGE)
    old = lib.dp_mem_new()
    try:
        assert lib.dp_mem_map_region(old, fd_a, 0, 4 * PAGE, 1 << 40, 0) == 0
        assert lib.dp_mem_map_region(old, fd_b, 1 << 30, 4 * PAGE, 1 << 41, 0) == 0
        new = lib.dp_mem_clone(old)
        assert lib.dp_mem_region_count(new) == 2
        assert host(new, 0) == host(old, 0) and host(new, 1 << 30) == host(old, 1 << 30)
        assert lib.dp_mem_remove_region(new, 1 << 30, 4 * PAGE, 1 << 42) == -errno.ENOENT
        assert lib.dp_mem_remove_region(new, 1 << 30, 2 * PAGE, 1 << 41) == -errno.ENOENT
        assert lib.dp_mem_remove_region(new, 1 << 30, 4 * PAGE, 1 << 41) == 0
        assert lib.dp_mem_gpa_to_host(new, 1 << 30, 1) == ffi.NULL
        b = lib.dp_mem_gpa_to_host(old, 1 << 30, 1)
        ffi.cast("char *", b)[0] = b"x"            # still mapped: the old table holds it
        lib.dp_mem_free(old)
        old = None
        a = lib.dp_mem_gpa_to_host(new, 0, PAGE)
        ffi.cast("char *", a)[PAGE - 1] = b"y"     # the shared mapping outlived the old table
        assert os.pread(fd_a, 1, PAGE - 1) == b"y" and os.pread(fd_b, 1, 0) == b"x"
        lib.dp_mem_free(new)
    finally:
        if old is not None:
            lib.dp_mem_free(old)
        os.close(fd_a)
        os.close(fd_b)


def test_an_fd_shorter_than_its_region_is_refused():
    """Mapping it would work; touching the missing part would SIGBUS the backend."""
    fd = memfd(2 * PAGE)
    mem = lib.dp_mem_new()
    err = ffi.new("int *")
    try:
        assert lib.dp_mem_map_region(mem, fd, 0, 4 * PAGE, 1 << 40, 0) == -errno.EINVAL
        assert lib.dp_mem_map_region(mem, fd, 0, 2 * PAGE, 1 << 40, PAGE) == -errno.EINVAL
        assert lib.dp_mem_map_region(mem, fd, 0, PAGE, 1 << 40, PAGE) == 0   # an offset inside it
        assert lib.dp_log_map(fd, 4 * PAGE, 0, err) == ffi.NULL and err[0] == -errno.EINVAL
        log = lib.dp_log_map(fd, PAGE, PAGE, err)
        assert log != ffi.NULL, err[0]
        lib.dp_log_free(log)
    finally:
        lib.dp_mem_free(mem)
        os.close(fd)


def test_log_bits_are_one_per_page_and_nothing_is_written_past_the_end():
    size = 16
    fd = memfd(PAGE)
    err = ffi.new("int *")
    log = lib.dp_log_map(fd, size, 8, err)      # 16 bytes at offset 8 of the fd: pages 0..127
    assert log != ffi.NULL, err[0]
    try:
        assert lib.dp_log_size(log) == size
        lib.dp_log_mark(log, 0, 1)                  # page 0
        lib.dp_log_mark(log, 9 * PAGE - 1, 2)       # pages 8 and 9
        lib.dp_log_mark(log, 20 * PAGE, 0)          # nothing
        lib.dp_log_mark(log, 30 * PAGE + 5, 3 * PAGE)  # pages 30..33
        lib.dp_log_mark(log, 126 * PAGE, 4 * PAGE)  # 126, 127; 128 and 129 are past the end
        lib.dp_log_mark(log, 2**64 - PAGE, 2 * PAGE)   # wraps: cut at the top, one page dropped
        data = os.pread(fd, 32, 0)
        assert data[:8] == bytes(8) and data[8 + size:] == bytes(32 - 8 - size)
        bits = int.from_bytes(data[8:8 + size], "little")
        assert {i for i in range(128) if bits >> i & 1} == {0, 8, 9, 30, 31, 32, 33, 126, 127}
        assert lib.dp_log_dropped(log) == 2 + 1
    finally:
        lib.dp_log_free(log)
        os.close(fd)
