"""The Python client of the management socket: `Client(path).call(method, **params)`, with a
helper per method. An error answer raises RpcError (code, message, data as the daemon sent
them); a daemon that cannot be reached raises ConfigError naming the socket."""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Self

from ..errors import ConfigError
from ..unix import BacklogFull, connect_unix
from .protocol import JSONRPC, MAX_LINE, RpcError, encode

DEFAULT_SOCKET = "/run/dataplane/rpc.sock"


class Client:
    """A connection to `dataplane serve --rpc-socket PATH`; one call at a time."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_SOCKET, timeout: float | None = 60.0) -> None:
        self.path = os.fspath(path)
        self._ids = itertools.count(1)
        self._buf = bytearray()
        try:
            # The daemon's loop accepts between calls: a busy one lets clients wait in its backlog.
            self.sock = connect_unix(self.path, timeout)
        except FileNotFoundError:
            raise ConfigError(f"no management socket at {self.path}: is `dataplane serve"
                              f" --rpc-socket {self.path}` running?") from None
        except BacklogFull:
            raise ConfigError(f"cannot connect to {self.path}: its backlog stayed full for "
                              f"{timeout:g} s") from None
        except OSError as exc:
            raise ConfigError(f"cannot connect to {self.path}: {exc.strerror or exc}") from None

    def call(self, method: str, params: dict[str, Any] | list[Any] | None = None, /,
             **kwargs: Any) -> Any:
        """Call method with params (an object, or an array in declared order) or keywords;
        returns its result."""
        if params is not None and kwargs:
            raise TypeError("give params or keywords, not both")
        rid = next(self._ids)
        request: dict[str, Any] = {"jsonrpc": JSONRPC, "id": rid, "method": method}
        if params is not None or kwargs:
            request["params"] = params if params is not None else kwargs
        reply = self.exchange(request)
        if reply.get("id") != rid:
            raise ConfigError(f"{self.path}: answer to request {reply.get('id')!r}, expected {rid}")
        if "error" in reply:
            err = reply["error"]
            raise RpcError(err.get("code", 0), err.get("message", ""), err.get("data"))
        return reply.get("result")

    def exchange(self, message: Any) -> Any:
        """Send one JSON-RPC message (a request, a batch) and read one line back."""
        try:
            self.sock.sendall(encode(message))
            return json.loads(self._readline())
        except TimeoutError:
            raise ConfigError(f"{self.path}: no answer within {self.sock.gettimeout()} s") from None
        except OSError as exc:
            raise ConfigError(f"{self.path}: {exc.strerror or exc}") from None

    def _readline(self) -> bytes:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[:end + 1]
                return line
            if len(self._buf) > 64 * MAX_LINE:
                raise ConfigError(f"{self.path}: answer too long")
            data = self.sock.recv(65536)
            if not data:
                raise ConfigError(f"{self.path}: the daemon closed the connection")
            self._buf += data

    # ---- one helper per method ----

    def export_add(self, **config: Any) -> dict[str, Any]:
        """Add an export: the keys of an [[export]] table (name, disk, socket or addr, queues,
        read_only, cache, serial, socket_mode, socket_group, vcpu_cpus)."""
        return self.call("export_add", config)

    def export_remove(self, name: str, force: bool = False) -> dict[str, Any]:
        return self.call("export_remove", name=name, force=force)

    def export_list(self) -> list[dict[str, Any]]:
        return self.call("export_list")

    def export_get(self, name: str) -> dict[str, Any]:
        return self.call("export_get", name=name)

    def stats(self, export: str | None = None) -> dict[str, Any]:
        return self.call("stats", export=export) if export is not None else self.call("stats")

    def log_level_set(self, level: str) -> dict[str, Any]:
        return self.call("log_level_set", level=level)

    def record_start(self, name: str, path: str, format: str = "blktrace") -> dict[str, Any]:  # noqa: A002
        return self.call("record_start", name=name, path=path, format=format)

    def record_stop(self, name: str) -> dict[str, Any]:
        return self.call("record_stop", name=name)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
