"""JSON-RPC 2.0 as the management socket speaks it (dataplane.rpc): the method table and its
parameter schema, the spec's error answers, batches and notifications, answers that wait for
work on another thread, and the limits that keep one client from hurting the others."""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from dataplane.errors import ConfigError
from dataplane.rpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    Client,
    MethodTable,
    Param,
    RpcError,
    RpcServer,
)
from dataplane.rpc import server as rpc_server

TABLE = MethodTable()
CALLS: list[tuple[str, dict]] = []


@TABLE.method("echo", Param("text", "string", required=True), Param("times", "integer", default=1))
def echo(ctx: object, text: str, times: int) -> str:
    CALLS.append(("echo", {"text": text, "times": times}))
    return text * times


@TABLE.method("later", Param("delay", "number", default=0.2))
def later(ctx: object, delay: float) -> Future:
    """Answers from another thread, after delay seconds."""
    f: Future = Future()
    threading.Timer(delay, lambda: f.set_result({"slept": delay})).start()
    return f


@TABLE.method("fail", Param("how", "string", default="rpc"))
def fail(ctx: object, how: str) -> None:
    if how == "rpc":
        raise RpcError(-32010, "no such thing", {"thing": 1})
    if how == "later":
        f: Future = Future()
        f.set_exception(RpcError(-32011, "failed later"))
        return f
    raise ZeroDivisionError("a bug")


@TABLE.method("flag", Param("on", "boolean", required=True), Param("ids", "array"))
def flag(ctx: object, on: bool, ids: list | None) -> dict:
    return {"on": on, "ids": ids}


class Loop:
    """An RpcServer on a socket, served by a selector loop on a thread."""

    def __init__(self, path: Path) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(8)
        self.path = path
        self.server = RpcServer(listener, TABLE, context=None)
        self.sel = selectors.DefaultSelector()
        self.server.register(self.sel)
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop:
            for key, mask in self.sel.select(0.05):
                key.data(mask)

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)
        self.server.close()


@pytest.fixture
def rpc(tmp_path: Path) -> Iterator[Loop]:
    loop = Loop(tmp_path / "rpc.sock")
    yield loop
    loop.close()


def raw(path: Path, data: bytes, answers: int = 1, timeout: float = 5) -> list:
    """Send bytes, read `answers` lines back as JSON."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        if data:
            s.sendall(data)
        buf = b""
        while buf.count(b"\n") < answers:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def test_calls_and_the_schema(rpc: Loop) -> None:
    with Client(rpc.path) as c:
        assert c.call("echo", text="ab", times=2) == "abab"
        assert c.call("echo", ["x", "3"]) == "xxx"           # by position; "3" taken as 3
        assert c.call("flag", on="true") == {"on": True, "ids": None}
        with pytest.raises(RpcError) as exc:
            c.call("echo", txt="a")
        assert exc.value.code == INVALID_PARAMS
        assert 'unknown parameter "txt" (did you mean "text"?)' in exc.value.message
        with pytest.raises(RpcError, match='parameter "text" is required'):
            c.call("echo")
        with pytest.raises(RpcError, match=r"echo: times: expected an integer, got \"many\""):
            c.call("echo", text="a", times="many")
        with pytest.raises(RpcError, match=r"flag: on: expected a boolean, got 1"):
            c.call("flag", on=1)
        with pytest.raises(RpcError) as exc:
            c.call("ecoh")
        assert exc.value.code == METHOD_NOT_FOUND and 'did you mean "echo"?' in exc.value.message
        with pytest.raises(RpcError) as exc:
            c.call("fail")
        assert (exc.value.code, exc.value.data) == (-32010, {"thing": 1})
        with pytest.raises(RpcError, match="ZeroDivisionError: a bug"):
            c.call("fail", how="bug")
        assert c.call("echo", text="still here") == "still here"


def test_answers_that_wait_do_not_hold_other_clients(rpc: Loop) -> None:
    slow = Client(rpc.path)
    t0 = time.monotonic()
    result: list = []
    th = threading.Thread(target=lambda: result.append(slow.call("later", delay=1.0)))
    th.start()
    time.sleep(0.1)
    with Client(rpc.path) as fast:
        assert fast.call("echo", text="quick") == "quick"
        assert time.monotonic() - t0 < 0.9, "a waiting answer held the loop"
        with pytest.raises(RpcError, match="failed later"):
            fast.call("fail", how="later")
    th.join(5)
    slow.close()
    assert result == [{"slept": 1.0}]


@pytest.mark.parametrize("line, code, rid", [
    (b"{not json}\n", PARSE_ERROR, None),
    (b"\xff\xfe\n", PARSE_ERROR, None),
    (b"[" * 100_000 + b"\n", PARSE_ERROR, None),
    (b"[]\n", INVALID_REQUEST, None),
    (b"42\n", INVALID_REQUEST, None),
    (b'{"jsonrpc": "1.0", "id": 7, "method": "echo"}\n', INVALID_REQUEST, 7),
    (b'{"jsonrpc": "2.0", "id": {"x": 1}, "method": "echo"}\n', INVALID_REQUEST, None),
    (b'{"jsonrpc": "2.0", "id": 8, "method": 5}\n', INVALID_REQUEST, 8),
    (b'{"jsonrpc": "2.0", "id": 9, "method": "echo", "params": "text"}\n', INVALID_REQUEST, 9),
    (b'{"jsonrpc": "2.0", "id": "a", "method": "echo", "extra": 1}\n', INVALID_REQUEST, "a"),
])
def test_bad_requests_get_the_spec_s_errors(rpc: Loop, line: bytes, code: int, rid: object) -> None:
    (answer,) = raw(rpc.path, line)
    assert answer["jsonrpc"] == "2.0" and answer["id"] == rid and answer["error"]["code"] == code
    assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]


def test_batches_and_notifications(rpc: Loop) -> None:
    CALLS.clear()
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "echo", "params": {"text": "a"}},
        {"jsonrpc": "2.0", "method": "echo", "params": {"text": "notified"}},    # no answer
        {"jsonrpc": "2.0", "id": 2, "method": "later", "params": {"delay": 0.1}},
        {"jsonrpc": "2.0", "id": 3, "method": "nope"},
        "junk",
    ]
    (answers,) = raw(rpc.path, json.dumps(batch).encode() + b"\n")
    by_id = {a["id"]: a for a in answers}
    assert by_id[1]["result"] == "a" and by_id[2]["result"] == {"slept": 0.1}
    assert by_id[3]["error"]["code"] == METHOD_NOT_FOUND and by_id[None]["error"]["code"] == INVALID_REQUEST
    assert len(answers) == 4
    assert ("echo", {"text": "notified", "times": 1}) in CALLS
    # a notification alone is answered with nothing: the next request's answer comes first
    answers = raw(rpc.path, b'{"jsonrpc":"2.0","method":"echo","params":{"text":"n"}}\n'
                  b'{"jsonrpc":"2.0","id":5,"method":"echo","params":{"text":"r"}}\n')
    assert answers == [{"jsonrpc": "2.0", "id": 5, "result": "r"}]


def test_a_line_over_the_limit_drops_only_that_client(rpc: Loop, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rpc_server, "MAX_LINE", 4096)
    with Client(rpc.path) as other:
        (answer,) = raw(rpc.path, b"x" * 10_000)
        assert answer["error"]["code"] == PARSE_ERROR and "longer than" in answer["error"]["message"]
        assert other.call("echo", text="unharmed") == "unharmed"


def test_too_many_clients_are_turned_away(rpc: Loop, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rpc_server, "MAX_CLIENTS", 2)
    a, b = Client(rpc.path), Client(rpc.path)
    try:
        assert a.call("echo", text="1") == "1" and b.call("echo", text="2") == "2"
        (answer,) = raw(rpc.path, b"")
        assert "too many clients" in answer["error"]["message"]
    finally:
        a.close()
        b.close()
    with Client(rpc.path) as c:
        assert c.call("echo", text="3") == "3"


def test_client_errors_name_the_socket(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no management socket at .*nothing.sock: is `dataplane serve"):
        Client(tmp_path / "nothing.sock")


def test_a_method_is_one_registered_function() -> None:
    table = MethodTable()

    @table.method("record_start", Param("export", "string", required=True), doc="start recording")
    def record_start(ctx: dict, export: str) -> str:
        return f"{ctx['who']} records {export}"

    assert table.get("record_start").func({"who": "dp"}, **table.get("record_start").bind(
        {"export": "vm1"})) == "dp records vm1"
    assert table.describe() == [{"name": "record_start", "doc": "start recording", "params": [
        {"name": "export", "type": "string", "required": True, "default": None, "doc": ""}]}]
    with pytest.raises(ValueError, match="registered twice"):
        table.method("record_start")(record_start)
