"""A C core built without librbd (what a machine without librbd-dev gets): it builds, serves
files as before, and an `rbd:` disk fails with one line naming the package to install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_an_rbd_less_build_names_the_missing_package(tmp_path, disk_file):
    pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "dataplane", pkg / "dataplane",
                    ignore=shutil.ignore_patterns("_core*.so", "__pycache__"))
    build = tmp_path / "build"
    build.mkdir()
    env = {**os.environ, "DATAPLANE_NO_RBD": "1", "DATAPLANE_SANITIZE": "0"}
    made = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from dataplane._build import "
         "make_builder; make_builder(Path(sys.argv[1])).compile(tmpdir=sys.argv[1], target=sys.argv[2])",
         str(build), str(pkg / "dataplane" / "_core.abi3.so")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    assert "building without RBD disks" in made.stderr

    run_env = {**os.environ, "PYTHONPATH": str(pkg)}
    probe = subprocess.run([sys.executable, "-c", "import dataplane, dataplane.core as c;"
                            "print(dataplane.__file__, hasattr(c.lib, 'dp_rbd_disk_new'),"
                            " hasattr(c.lib, 'dp_file_disk_new'))"],
                           cwd=pkg, env=run_env, capture_output=True, text=True, check=True)
    assert probe.stdout.split() == [str(pkg / "dataplane" / "__init__.py"), "False", "True"]

    serve = subprocess.run([sys.executable, "-m", "dataplane", "serve", "--socket",
                            str(tmp_path / "v.sock"), "--disk", "rbd:rbd/vm1,conf=/etc/ceph/ceph.conf"],
                           cwd=pkg, env=run_env, capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2, serve.stdout + serve.stderr
    lines = [line for line in serve.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in serve.stderr, serve.stderr
    assert "built without RBD support" in lines[0] and "apt-get install librbd-dev" in lines[0]

    # the same build still opens a file disk, C handles and all
    opened = subprocess.run([sys.executable, "-c", "import sys; from dataplane.disks import open_disk;"
                             " d = open_disk(sys.argv[1], cache='writeback'); print(d.size); d.close()",
                             str(disk_file)], cwd=pkg, env=run_env, capture_output=True, text=True)
    assert opened.returncode == 0 and opened.stdout.strip() == str(64 << 20), opened.stderr
