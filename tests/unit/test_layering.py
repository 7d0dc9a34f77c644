"""The map of rooms holds (docs/design.md): every import between Python rooms and every
include between C rooms runs along an allowed arrow, so neither graph has a cycle; the public
C headers cffi sees stand on their own; the old `dataplane.frontend` path still works."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What each room may import (besides itself). The bottom (errors, units, core) imports only
# downwards; the top (cli, __main__) may import anything. docs/design.md draws the same map.
PYTHON_ARROWS = {
    "errors": set(),
    "units": {"errors"},
    "unix": set(),
    "core": {"errors", "_core"},
    "cli_common": {"errors", "units"},
    "protocol": {"errors"},
    "placement": {"errors"},
    "guest": {"errors"},
    "observe": {"core", "errors"},
    "disks": {"core", "errors", "units"},
    "driver": {"core", "errors", "units", "unix", "protocol", "observe"},
    "rpc": {"errors", "unix"},
    "backend": {"core", "errors", "units", "protocol", "disks", "observe", "placement", "config", "rpc"},
    "replay": {"core", "errors", "units", "cli_common", "protocol", "disks", "driver", "observe"},
    "frontend": {"driver"},
    "config": {"errors", "units", "placement"},
    "cli": {"errors", "units", "cli_common", "config", "protocol", "placement", "guest", "observe",
            "disks", "driver", "backend", "replay", "rpc"},
    "__main__": {"cli"},
    "_build": set(),
}

# In C: the engine calls disks only through disk/disk.h, and a disk never includes the engine.
C_ARROWS = {
    "util": set(),
    "vhost": {"util"},
    "disk": {"util"},
    "blk": {"disk", "util"},
    "record": {"util"},
    "engine": {"vhost", "blk", "disk", "record", "util"},
    "driver": {"vhost", "blk", "util"},
    "bench": {"vhost", "blk", "disk", "engine", "record", "util"},
    "core": {"util", "vhost", "disk", "blk", "record", "engine", "driver", "bench"},
}


def python_room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def python_edges() -> dict[tuple[str, str], list[str]]:
    """(from room, to room) -> the modules that import across, lazy imports included."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted((ROOT / "dataplane").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                targets = [".".join(base + [node.module])] if node.module else \
                    [".".join(base + [a.name]) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module or ""]
            else:
                continue
            for target in targets:
                if target.startswith("dataplane.") or target == "dataplane":
                    a, b = python_room(module), python_room(target)
                    if a != b and b != "dataplane":
                        edges.setdefault((a, b), []).append(module)
    return edges


def c_edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = {}
    csrc = ROOT / "csrc"
    for path in sorted(csrc.rglob("*.[ch]")):
        rel = path.relative_to(csrc)
        room = rel.parts[0] if len(rel.parts) > 1 else "core"
        for target in re.findall(r'^\s*#include\s+"([a-z_]+)/', path.read_text(), re.M):
            if target != room:
                edges.setdefault((room, target), []).append(str(rel))
    return edges


def cycle(edges: set[tuple[str, str]]) -> list[str] | None:
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("lang", ["python", "c"])
def test_every_arrow_between_rooms_is_allowed_and_there_is_no_cycle(lang: str) -> None:
    edges, allowed = (python_edges(), PYTHON_ARROWS) if lang == "python" else (c_edges(), C_ARROWS)
    wrong = {f"{a} -> {b} ({', '.join(sorted(set(by)))})" for (a, b), by in edges.items()
             if b not in allowed.get(a, set())}
    assert not wrong, f"arrows the map does not allow: {sorted(wrong)}"
    assert cycle(set(edges)) is None


def test_the_checker_sees_a_cycle() -> None:
    """The check above can fail: a back arrow is a cycle, a one-way chain is not."""
    assert cycle({("engine", "disk"), ("disk", "engine")}) == ["disk", "engine", "disk"]
    assert cycle({("cli", "backend"), ("backend", "core")}) is None
    assert ("disk", "engine") not in {(a, b) for a, bs in C_ARROWS.items() for b in bs}


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
@pytest.mark.parametrize("header", sorted(str(p.relative_to(ROOT / "csrc"))
                                          for p in (ROOT / "csrc").rglob("dp_*.h")))
def test_each_public_header_compiles_on_its_own(header: str) -> None:
    """A room's public header includes what it needs (cffi reads them in core.h's order)."""
    r = subprocess.run(["gcc", "-fsyntax-only", "-std=gnu11", "-Wall", "-Werror", "-I",
                        str(ROOT / "csrc"), "-x", "c", "-"], input=f'#include "{header}"\n',
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_old_frontend_import_path_still_works() -> None:
    import dataplane.driver
    from dataplane.frontend import Device, GuestMemory, Vring

    assert (Device, GuestMemory, Vring) == (dataplane.driver.Device, dataplane.driver.GuestMemory,
                                            dataplane.driver.Vring)
