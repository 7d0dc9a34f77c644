"""cffi builder for dataplane._core: compiles csrc/**/*.c (one folder per room) against the
system liburing, and the RBD disk (csrc/disk/rbd.c) against librbd when librbd-dev is there.

`csrc/core.h` is the whole C surface Python sees: it includes one public header per room
(`csrc/<room>/dp_<room>.h`), which cdef_text expands in place; other preprocessor lines are
dropped before cdef (integer #defines are kept). DATAPLANE_SANITIZE=1 builds with ASan and UBSan.

librbd is optional: without its header and library (Debian: librbd-dev) the build leaves out
rbd.c and its public header dp_rbd.h, so the module has no dp_rbd_* and `rbd:` disks say what
to install. DATAPLANE_NO_RBD=1 builds that way on purpose (the tests check the message).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


INCLUDE = re.compile(r'#include\s+"([^"]+)"')
INT_DEFINE = re.compile(r"#define\s+(\w+)\s+(-?\d+)\s*(?:/\*.*\*/)?\s*$")   # a trailing comment is fine


def cdef_text(header: Path, seen: set[Path] | None = None) -> str:
    """header as cffi's cdef wants it: quoted includes (paths from csrc/) expanded in place,
    each file once; other preprocessor lines dropped, except integer #defines."""
    seen = set() if seen is None else seen
    seen.add(header)
    lines = []
    for line in header.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            include = INCLUDE.match(stripped)
            if include:
                target = CSRC / include.group(1)
                if target not in seen:
                    lines.append(cdef_text(target, seen))
            elif define := INT_DEFINE.match(stripped):
                lines.append(f"#define {define.group(1)} {define.group(2)}")
            continue
        lines.append(line)
    return "\n".join(lines)


RBD_SOURCE = CSRC / "disk" / "rbd.c"
RBD_HEADER = CSRC / "disk" / "dp_rbd.h"
RBD_PACKAGE = "librbd-dev"   # the Debian package with librbd.h and librbd.so (and librados-dev)


def _library_found(name: str) -> bool:
    """Whether the linker finds lib<name>.so (gcc answers with the bare name when it does not)."""
    try:
        out = subprocess.run([os.environ.get("CC", "gcc"), f"-print-file-name=lib{name}.so"],
                             capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return False
    return os.path.isabs(out) and os.path.exists(out)


def have_librbd() -> bool:
    """librbd's header and its libraries (librbd, librados) are installed, and not turned off."""
    if os.environ.get("DATAPLANE_NO_RBD", "") not in ("", "0"):
        return False
    headers = any(Path(d, "rbd", "librbd.h").exists() for d in ("/usr/include", "/usr/local/include"))
    return headers and _library_found("rbd") and _library_found("rados")


def c_sources(rbd: bool = True) -> list[Path]:
    """Every .c file under csrc/, whatever room it sits in (rbd.c only with librbd)."""
    return sorted(p for p in CSRC.rglob("*.c") if rbd or p != RBD_SOURCE)


def cdef_surface(rbd: bool) -> str:
    """What cffi declares: core.h, without dp_rbd.h when rbd.c is left out."""
    return cdef_text(CSRC / "core.h", seen=None if rbd else {RBD_HEADER})


def compile_flags() -> tuple[list[str], list[str]]:
    # -fvisibility=hidden: the module's one export is its PyInit (cffi calls the rest inside
    # the module); without it every call between rooms (guest_mem_translate from the ring
    # walker, three per request) went through the PLT.
    cflags = ["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
              "-Wno-missing-field-initializers", "-fno-strict-aliasing", "-fvisibility=hidden"]
    ldflags: list[str] = []
    if os.environ.get("DATAPLANE_SANITIZE", "") not in ("", "0"):
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
               "-fno-sanitize-recover=undefined"]
        cflags = [f for f in cflags if f != "-O2"] + ["-O1"] + san
        ldflags += san
    return cflags, ldflags


def make_builder(base: Path) -> FFI:
    """A builder whose source paths are relative to base (setuptools refuses absolute ones)."""
    builder = FFI()
    rbd = have_librbd()
    if not rbd:
        print(f"dataplane._build: no librbd ({RBD_PACKAGE}): building without RBD disks", file=sys.stderr)
    builder.cdef(cdef_surface(rbd))
    cflags, ldflags = compile_flags()
    builder.set_source(
        "dataplane._core",
        '#include "core.h"\n',
        sources=sorted(os.path.relpath(p, base) for p in c_sources(rbd)),
        include_dirs=[os.path.relpath(CSRC, base)],
        libraries=["uring", "pthread"] + (["rbd", "rados"] if rbd else []),
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    return builder


ffibuilder = make_builder(Path.cwd())

if __name__ == "__main__":
    # In-place build for a source checkout: python -m dataplane._build
    tmp = ROOT / "build" / "cffi"
    tmp.mkdir(parents=True, exist_ok=True)
    make_builder(tmp).compile(tmpdir=str(tmp), target=str(ROOT / "dataplane" / "_core.abi3.so"))
