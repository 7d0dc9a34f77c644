"""cffi builder for dataplane._core: compiles csrc/**/*.c (one folder per room) against the
system liburing.

`csrc/core.h` is the whole C surface Python sees: it includes one public header per room
(`csrc/<room>/dp_<room>.h`), which cdef_text expands in place; other preprocessor lines are
dropped before cdef (integer #defines are kept). DATAPLANE_SANITIZE=1 builds with ASan and UBSan.
"""

from __future__ import annotations

import os
import re
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


def c_sources() -> list[Path]:
    """Every .c file under csrc/, whatever room it sits in."""
    return sorted(CSRC.rglob("*.c"))


def compile_flags() -> tuple[list[str], list[str]]:
    cflags = ["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
              "-Wno-missing-field-initializers", "-fno-strict-aliasing"]
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
    builder.cdef(cdef_text(CSRC / "core.h"))
    cflags, ldflags = compile_flags()
    builder.set_source(
        "dataplane._core",
        '#include "core.h"\n',
        sources=sorted(os.path.relpath(p, base) for p in c_sources()),
        include_dirs=[os.path.relpath(CSRC, base)],
        libraries=["uring", "pthread"],
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
