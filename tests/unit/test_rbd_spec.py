"""`rbd:` disk specs, without a cluster: the grammar, its errors, how it combines with the
latency options, what a build without librbd says, and what `plan` says about an image."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from dataplane import _build
from dataplane.config import load_config
from dataplane.disks import split_disk_options
from dataplane.disks.rbd import RbdSpec, parse_rbd_spec, rbd_available, require_rbd
from dataplane.errors import ConfigError
from dataplane.placement import BlockDevice


def test_the_full_grammar():
    spec = parse_rbd_spec("rbd:pool/ns/img@snap,conf=/c/ceph.conf,id=client.dp,keyring=/k,"
                          "cluster=east,timeout=5,rbd_cache_policy=writeback,ms_async_op_threads=1")
    assert spec == RbdSpec(pool="pool", image="img", namespace="ns", snap="snap", conf="/c/ceph.conf",
                           client_id="dp", keyring="/k", cluster="east", timeout=5,
                           options={"rbd_cache_policy": "writeback", "ms_async_op_threads": "1"})
    assert spec.name == "pool/ns/img@snap"
    plain = parse_rbd_spec("rbd:rbd/vm1")
    assert (plain.client_id, plain.cluster, plain.conf, plain.timeout, plain.lock_break) == (
        "admin", "ceph", None, 30, True)
    assert parse_rbd_spec("rbd:rbd/vm1,debug-no-lock-break").lock_break is False


@pytest.mark.parametrize(("text", "message"), [
    ("rbd:", "expected rbd:POOL/IMAGE"),
    ("rbd:onlypool", "expected rbd:POOL/IMAGE"),
    ("rbd:/img", "expected rbd:POOL/IMAGE"),
    ("rbd:pool/", "expected rbd:POOL/IMAGE"),
    ("rbd:a/b/c/d", "expected rbd:POOL/IMAGE"),
    ("rbd:pool/img@", "rbd:POOL/IMAGE@SNAPSHOT"),
    ("rbd:pool/img@a@b", "more than one @"),
    ("rbd:pool/img,conf", "option 'conf' is not key=value"),
    ("rbd:pool/img,conf=", "option 'conf=' is not key=value"),
    ("rbd:pool/img,id=a,id=b", "id is given twice"),
    ("rbd:pool/img,timeout=soon", "timeout='soon': expected whole seconds"),
    ("rbd:pool/img,timeout=-1", "expected whole seconds"),
    ("rbd:pool/img,kyring=/k", "unknown option 'kyring' (known: conf, id, keyring, cluster, timeout"),
])
def test_bad_specs_say_what_is_wrong(text, message):
    with pytest.raises(ConfigError, match="bad rbd disk .*" + re.escape(message)):
        parse_rbd_spec(text)


def test_latency_options_split_off_before_the_rbd_options():
    base, latency = split_disk_options("rbd:rbd/vm1,conf=/c,latency=lognormal:p50=80us,p99=600us,iops=500")
    assert base == "rbd:rbd/vm1,conf=/c" and latency is not None and latency.iops == 500
    assert parse_rbd_spec(base).conf == "/c"


def test_a_build_without_librbd_names_the_package():
    """What open_disk says when the core has no dp_rbd_* (the real such build is exercised in
    tests/protocol/test_rbd_build.py)."""
    core_without = SimpleNamespace()
    assert not rbd_available(core_without)
    with pytest.raises(ConfigError, match=r"built without RBD support .*apt-get install librbd-dev"):
        require_rbd("rbd:rbd/vm1", core_without)


def test_the_build_finds_librbd_here_and_can_leave_it_out(monkeypatch):
    # ./dev installs librbd-dev: this machine's core must have RBD disks, or the suite would
    # silently test a build that cannot serve them.
    assert _build.have_librbd() and rbd_available()
    assert _build.RBD_SOURCE in _build.c_sources(rbd=True)
    assert _build.RBD_SOURCE not in _build.c_sources(rbd=False)
    assert "dp_rbd_disk_new" in _build.cdef_surface(rbd=True)
    surface = _build.cdef_surface(rbd=False)
    assert "dp_rbd" not in surface and "dp_null_disk_new" in surface
    monkeypatch.setenv("DATAPLANE_NO_RBD", "1")
    assert not _build.have_librbd()


def test_a_toml_disk_keeps_its_rbd_spec(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('disk = "rbd:rbd/vm1,conf=/etc/ceph/ceph.conf,latency=fixed:1ms"\n')
    assert load_config(config)["disk"] == "rbd:rbd/vm1,conf=/etc/ceph/ceph.conf,latency=fixed:1ms"


def test_plan_places_an_rbd_disk_by_cpu_without_hw_queues():
    info = BlockDevice.resolve("rbd:rbd/vm1,conf=/nonexistent")   # no cluster needed to plan
    assert info.hw_queues == [] and "no local hw queues" in info.mapping_note
    out = subprocess.run([sys.executable, "-m", "dataplane", "plan", "--disk",
                          "rbd:rbd/vm1,latency=fixed:1ms", "--queues", "2", "--json"],
                         capture_output=True, text=True, check=True)
    plan = json.loads(out.stdout)
    assert any("RBD image rbd/vm1" in note and "placed by CPU, NUMA and SMT" in note
               for note in plan["notes"]), plan["notes"]
    assert [row["virtqueue"] for row in plan["rows"]] == [0, 1]
