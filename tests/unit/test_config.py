"""The TOML config file and its command-line overrides: what a user typing a wrong key, value
or syntax sees, and which value wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane.config import ServeConfig, default_queues, load_config, merge
from dataplane.errors import ConfigError
from dataplane.placement import Policy


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


FULL = """\
# every key
socket = "/run/dataplane/vm0.sock"
disk = "/dev/nvme0n1"
queues = 8
read_only = true
cache = "writeback"
serial = "vm0-root"
policy = "threads=4"
vcpu_cpus = "0-3,8"
metrics = "127.0.0.1:9100"
log_level = "DEBUG"
socket_mode = "0660"
"""


def test_load_every_key(tmp_path: Path) -> None:
    values = load_config(write(tmp_path, FULL))
    assert values == {
        "socket": Path("/run/dataplane/vm0.sock"), "disk": "/dev/nvme0n1", "queues": 8,
        "read_only": True, "cache": "writeback", "serial": "vm0-root",
        "policy": Policy("threads", 4), "vcpu_cpus": [0, 1, 2, 3, 8],
        "metrics": ("127.0.0.1", 9100), "log_level": "debug", "socket_mode": 0o660,
    }
    config = merge(values, {})
    assert config == ServeConfig(**values)


def test_defaults_when_neither_file_nor_flags_set_a_key(tmp_path: Path) -> None:
    config = merge(load_config(write(tmp_path, 'socket = "/s"\ndisk = "null:1G"\n')), {})
    assert config.queues == default_queues()
    assert (config.read_only, config.cache, config.serial, config.log_level) == (
        False, "none", "dataplane", "info")
    assert config.policy == Policy("per-queue") and config.vcpu_cpus is None
    assert config.metrics is None and config.socket_mode == 0o600


def test_flags_override_the_file(tmp_path: Path) -> None:
    values = load_config(write(tmp_path, FULL))
    # as vars(argparse.Namespace): flags not given are None; other attributes are ignored
    cli = {"command": "serve", "debug": False, "config": "config.toml", "socket": None,
           "disk": "null:4G", "queues": "2", "read_only": False, "cache": None, "serial": None,
           "policy": "per-queue", "vcpu_cpus": "4-5", "metrics": ":9200", "log_level": None,
           "socket_mode": "0600"}
    config = merge(values, cli)
    assert config.socket == Path("/run/dataplane/vm0.sock")     # from the file
    assert config.disk == "null:4G" and config.queues == 2
    assert config.read_only is False                              # an explicit flag wins
    assert config.cache == "writeback" and config.serial == "vm0-root"
    assert config.policy == Policy("per-queue") and config.vcpu_cpus == [4, 5]
    assert config.metrics == ("127.0.0.1", 9200) and config.log_level == "debug"
    assert config.socket_mode == 0o600


def test_flags_alone(tmp_path: Path) -> None:
    config = merge({}, {"socket": Path("/s"), "disk": "/d", "queues": 4, "socket_mode": 0o640})
    assert (config.socket, config.disk, config.queues, config.socket_mode) == (Path("/s"), "/d", 4, 0o640)


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "vm").mkdir()
    path = write(tmp_path / "vm", 'socket = "vm.sock"\ndisk = "disk.img"\n')
    values = load_config(path)
    assert values["socket"] == tmp_path / "vm" / "vm.sock"
    assert values["disk"] == str(tmp_path / "vm" / "disk.img")
    assert load_config(write(tmp_path, 'disk = "null:1G"\n'))["disk"] == "null:1G"


def test_hyphenated_keys_are_accepted_once(tmp_path: Path) -> None:
    values = load_config(write(tmp_path, 'read-only = true\nlog-level = "error"\n'))
    assert values == {"read_only": True, "log_level": "error"}
    with pytest.raises(ConfigError, match="read_only is set twice"):
        load_config(write(tmp_path, "read-only = true\nread_only = false\n"))


@pytest.mark.parametrize("line, message", [
    ('queues = "abc"', 'config.toml: queues: expected a positive integer, got "abc"'),
    ("queues = 0", "config.toml: queues: expected a positive integer, got 0"),
    ("queues = true", "config.toml: queues: expected a positive integer, got true"),
    ("queues = 300", "config.toml: queues: 300 is more than the 256 virtqueues vhost-user can address"),
    ('read_only = "yes"', 'config.toml: read_only: expected true or false, got "yes"'),
    ('cache = "direct"', 'config.toml: cache: expected none or writeback, got "direct"'),
    ('serial = "123456789012345678901"', "config.toml: serial: expected a string of at most 20 bytes"),
    ('policy = "round-robin"',
     'config.toml: policy: expected per-queue, shared or threads=K (K ≥ 1), got "round-robin"'),
    ('policy = "threads=0"', 'config.toml: policy: expected per-queue, shared or threads=K'),
    ('vcpu_cpus = "0-3,x"', "config.toml: vcpu_cpus: bad CPU list '0-3,x'"),
    ("vcpu_cpus = [0, -1]", 'config.toml: vcpu_cpus: expected a CPU list like "0-3,8" or an array'),
    ('metrics = "localhost"', 'config.toml: metrics: expected an address like 127.0.0.1:9100'),
    ('metrics = ":70000"', "config.toml: metrics: port 70000 is out of range (1 to 65535)"),
    ('log_level = "verbose"',
     'config.toml: log_level: expected debug, info, warning or error, got "verbose"'),
    ("socket_mode = 0o660",
     'config.toml: socket_mode: expected an octal mode in quotes, like "0660", got 432'),
    ('socket_mode = "0999"', 'config.toml: socket_mode: expected an octal mode in quotes'),
    ('socket_mode = "01777"', "config.toml: socket_mode: mode 01777 has bits beyond 0777"),
    ('socket = ""', 'config.toml: socket: expected a socket path, got ""'),
    ("disk = 3", "config.toml: disk: expected a file, a block device, null:SIZE or rbd:POOL/IMAGE, got 3"),
    ('disk = { path = "x" }',
     'config.toml: disk: expected a file, a block device, null:SIZE or rbd:POOL/IMAGE, got {"path": "x"}'),
])
def test_each_bad_value_names_the_key_and_the_value(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    line: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as exc:
        load_config("config.toml")
    assert str(exc.value).startswith(message)


@pytest.mark.parametrize("key, flag, value, message", [
    ("queues", "--queues", "abc", '--queues: expected a positive integer, got "abc"'),
    ("policy", "--policy", "threads=x", '--policy: expected per-queue, shared or threads=K'),
    ("vcpu_cpus", "--vcpu-cpus", "3-1", "--vcpu-cpus: bad CPU list '3-1': range '3-1' runs backwards"),
    ("socket_mode", "--socket-mode", "rw", '--socket-mode: expected an octal mode like 0660, got "rw"'),
    ("cache", "--cache", "unsafe", '--cache: expected none or writeback, got "unsafe"'),
])
def test_bad_flags_name_the_flag(key: str, flag: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        merge({}, {"socket": "/s", "disk": "/d", key: value})
    assert str(exc.value).startswith(message)


@pytest.mark.parametrize("key, suggestion", [
    ("queue", '(did you mean "queues"?)'),
    ("readonly", '(did you mean "read_only"?)'),
    ("vcpu-cpu", '(did you mean "vcpu-cpus"?)'),       # in the user's own spelling
    ("num_queues", '(did you mean "queues"?)'),
])
def test_unknown_key_suggests_the_close_one(tmp_path: Path, key: str, suggestion: str) -> None:
    path = write(tmp_path, f"{key} = 1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == f'{path}: unknown key "{key}" {suggestion}'


def test_unknown_key_far_from_any_lists_the_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError,
                       match=r'unknown key "zzz" \(known keys: cache, disk, export, fixed, inflight, '
                             r'io_threads,'):
        load_config(write(tmp_path, "zzz = 1\n"))
    with pytest.raises(ConfigError, match='unknown key "serve"'):
        load_config(write(tmp_path, '[serve]\nqueues = 2\n'))


@pytest.mark.parametrize("text, where", [
    ("queues = 4\ndisk = \n", "line 2, column 8"),
    ('disk = "x"\nqueues 4\n', "line 2, column 8"),
    ('disk = "unterminated\n', "line 1, column 21"),
    ("queues = 4\nqueues = 5\n", "line 2, column 11"),
])
def test_bad_toml_reports_line_and_column(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}: {where}: bad TOML syntax: ")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file .*nope.toml does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    (tmp_path / "bin.toml").write_bytes(b"disk = \"\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "bin.toml")


def test_required_keys() -> None:
    with pytest.raises(ConfigError, match="--socket is required"):
        merge({"disk": "/d"}, {})
    with pytest.raises(ConfigError, match="--disk is required"):
        merge({}, {"socket": "/s"})
    assert merge({"disk": "/d"}, {}, command="plan").socket is None   # plan needs no socket


def test_threads_policy_needs_enough_queues() -> None:
    with pytest.raises(ConfigError, match="threads=8 needs at least as many virtqueues, but queues is 4"):
        merge({"disk": "/d", "policy": Policy("threads", 8)}, {"queues": 4}, command="plan")


# ---- exports: [[export]] tables, sockets handed over, export_add's parameters ----

TABLES = """\
rpc_socket = "rpc.sock"
vcpu_cpus = "0-1"

[[export]]
name = "vm1"
disk = "vm1.img"
socket = "vm1.sock"
queues = 2
socket_group = "kvm"
socket_mode = "0660"

[[export]]
disk = "null:1G"
socket_fd = "vm2"           # systemd socket activation (LISTEN_FDNAMES)
read_only = true
serial = "vm2-data"

[[export]]
name = "vm3"
disk = "null:2G"
addr = { type = "fd", str = "7" }
vcpu_cpus = [4, 5]
"""


def test_export_tables(tmp_path: Path) -> None:
    from dataplane.config import ExportConfig, SocketAddress

    config = merge(load_config(write(tmp_path, TABLES)), {})
    assert config.rpc_socket == tmp_path / "rpc.sock" and config.vcpu_cpus == [0, 1]
    vm1, vm2, vm3 = config.exports
    assert vm1 == ExportConfig(name="vm1", disk=str(tmp_path / "vm1.img"),
                               addr=SocketAddress("unix", path=tmp_path / "vm1.sock"), queues=2,
                               socket_group="kvm", socket_mode=0o660)
    assert (vm2.name, vm2.addr, vm2.read_only, vm2.serial) == (
        "vm2", SocketAddress("fd", fd="vm2"), True, "vm2-data")   # the name from the fd's name
    assert vm2.queues == default_queues()
    assert (vm3.addr, vm3.vcpu_cpus) == (SocketAddress("fd", fd="7"), (4, 5))
    assert vm1.to_dict()["socket_mode"] == "0660" and vm3.to_dict()["addr"] == {"type": "fd", "str": "7"}


def test_top_level_keys_and_flags_are_one_export(tmp_path: Path) -> None:
    config = merge(load_config(write(tmp_path, FULL)), {"socket": None, "name": "root"})
    (export,) = config.exports
    assert (export.name, export.disk, export.queues, export.read_only, export.cache) == (
        "root", "/dev/nvme0n1", 8, True, "writeback")
    assert merge({}, {"socket": Path("/run/x/vm7.sock"), "disk": "null:1G"}).exports[0].name == "vm7"
    fd = merge({}, {"socket_fd": "3", "disk": "null:1G"}).exports[0]
    assert (fd.addr.type, fd.addr.fd, fd.name) == ("fd", "3", "export0")
    # a daemon managed over RPC alone has no export at start
    assert merge({}, {"rpc_socket": "/run/rpc.sock"}).exports == []


@pytest.mark.parametrize("text, message", [
    ('[[export]]\nname = "a"\ndisk = "null:1G"\nsocket = "/a"\nqueues = -1\n',
     'config.toml: [[export]] #1 "a": queues: expected a positive integer, got -1'),
    ('[[export]]\ndisk = "null:1G"\nsocket = "/a"\n[[export]]\nname = "b c"\ndisk = "null:1G"\n',
     'config.toml: [[export]] #2: name: expected a name of letters, digits and _.:-'),
    ('[[export]]\nname = "a"\ndisk = "null:1G"\nsocket = "/a"\nqueus = 2\n',
     'config.toml: [[export]] #1 "a": unknown key "queus" (did you mean "queues"?)'),
    ('[[export]]\nname = "a"\nsocket = "/a"\n', 'config.toml: [[export]] #1 "a": disk is required'),
    ('[[export]]\nname = "a"\ndisk = "null:1G"\n',
     'config.toml: [[export]] #1 "a": socket is required (or socket_fd, or addr'),
    ('[[export]]\nname = "a"\ndisk = "null:1G"\nsocket = "/a"\nsocket_fd = 3\n',
     'config.toml: [[export]] #1 "a": socket and socket_fd both say where to listen'),
    ('[[export]]\nname = "a"\ndisk = "null:1G"\naddr = { type = "tcp", path = "x" }\n',
     'config.toml: [[export]] #1 "a": addr.type: expected "unix" or "fd", got "tcp"'),
    ('[[export]]\nname = "a"\ndisk = "null:1G"\naddr = { type = "fd", path = "x" }\n',
     'config.toml: [[export]] #1 "a": addr: unknown key "path" for type fd (it takes str)'),
    ('[[export]]\nname = "a"\ndisk = "null:1G"\nsocket_fd = -3\n',
     'config.toml: [[export]] #1 "a": socket_fd: expected a file descriptor number or a LISTEN_FDNAMES'),
    ('[[export]]\nname = "a"\ndisk = "null:1G"\nsocket = "/a"\n[[export]]\nname = "a"\ndisk = "null:1G"\n'
     'socket = "/b"\n', 'config.toml: [[export]] #2: name "a" is already config.toml: [[export]] #1\'s'),
    ('[[export]]\nname = "a"\ndisk = "null:1G"\nsocket = "/s"\n[[export]]\nname = "b"\ndisk = "null:1G"\n'
     'socket = "/s"\n',
     'config.toml: [[export]] #2: socket "/s" is already config.toml: [[export]] #1 "a"\'s'),
    ('disk = "null:1G"\n[[export]]\nname = "a"\ndisk = "null:1G"\nsocket = "/a"\n',
     "config.toml: disk is set at the top level, but the file describes its exports as [[export]] tables"),
    ('export = "vm1"\n', 'config.toml: export must be [[export]] tables (an array of tables), got "vm1"'),
    ("io_threads = 0\n", "config.toml: io_threads: expected a number of I/O threads from 1 to 1024, got 0"),
])
def test_a_bad_export_table_is_one_line_naming_table_and_key(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path, text: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config("config.toml")
    assert str(exc.value).startswith(message), str(exc.value)
    assert "\n" not in str(exc.value)


def test_export_flags_with_tables_are_refused(tmp_path: Path) -> None:
    values = load_config(write(tmp_path, TABLES))
    with pytest.raises(ConfigError, match=r"^--queues: the config file describes its exports as \[\[export"):
        merge(values, {"queues": "4"})
    assert merge(values, {"policy": "shared", "metrics": ":9100"}).policy == Policy("shared")


def test_export_add_parameters_go_through_the_same_checks() -> None:
    from dataplane.config import export_config

    e = export_config({"name": "vm9", "disk": "null:1G", "socket": "/run/vm9.sock", "queues": "3",
                       "socket_mode": "0660"}, "export_add")
    assert (e.queues, e.socket_mode, str(e.addr)) == (3, 0o660, "/run/vm9.sock")
    with pytest.raises(ConfigError, match=r'^export_add "vm9": socket: vm9.sock is a relative path; give an'):
        export_config({"name": "vm9", "disk": "null:1G", "socket": "vm9.sock"}, "export_add")
    with pytest.raises(ConfigError, match=r'^export_add "vm9": socket_mode: expected an octal mode in'):
        export_config({"name": "vm9", "disk": "null:1G", "socket": "/s", "socket_mode": 432}, "export_add")
    rbd = export_config({"disk": "rbd:pool/image", "socket": "/s"}, "export_add")
    assert rbd.disk == "rbd:pool/image"      # a disk named by a scheme is not a path
