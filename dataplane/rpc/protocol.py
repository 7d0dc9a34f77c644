"""JSON-RPC 2.0 as the management socket speaks it: error codes, the request shape, and the
method table (a method is one registered function with a declared parameter schema).

Framing: one JSON text per line (UTF-8, `\\n`-terminated) each way; a line holds a request, a
notification (no `id`: no answer) or a batch (an array of them), as the spec allows.

The table checks parameters before a method runs (unknown names, missing required ones and
wrong types are INVALID_PARAMS naming the parameter), so a method body only sees typed
values. Adding a method is one decorated function:

    @METHODS.method("record_start", Param("export", "string", required=True),
                    Param("path", "string", required=True), doc="start recording an export")
    def record_start(daemon, export, path): ...
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

JSONRPC = "2.0"
MAX_LINE = 1 << 20           # bytes of one request line

# The spec's codes ...
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# ... and ours, in its "server error" range (-32000 to -32099).
EXPORT_EXISTS = -32001       # a name, socket path or handed-over socket already taken
NO_SUCH_EXPORT = -32002
EXPORT_BUSY = -32003         # a front end is attached: force=true to drain and drop it
EXPORT_FAILED = -32004       # it could not be set up (disk, socket): the message says why
SHUTTING_DOWN = -32005
NOT_AVAILABLE = -32006       # the daemon was started without what the method needs

ERROR_NAMES = {
    PARSE_ERROR: "parse error", INVALID_REQUEST: "invalid request", METHOD_NOT_FOUND: "method not found",
    INVALID_PARAMS: "invalid params", INTERNAL_ERROR: "internal error", EXPORT_EXISTS: "export exists",
    NO_SUCH_EXPORT: "no such export", EXPORT_BUSY: "export busy", EXPORT_FAILED: "export failed",
    SHUTTING_DOWN: "shutting down", NOT_AVAILABLE: "not available",
}


class RpcError(Exception):
    """A JSON-RPC error: raised by methods (and the table's checks), and by the client when
    the daemon answers with one."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err

    def __str__(self) -> str:
        return f"{self.message} ({ERROR_NAMES.get(self.code, 'error')} {self.code})"


TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "object": (dict,), "array": (list,),
}


@dataclass(frozen=True)
class Param:
    """One parameter: its name, JSON type ("string", "integer", "number", "boolean", "object",
    "array" or "any"), whether it is required, its default, and a line of help."""

    name: str
    type: str = "any"
    required: bool = False
    default: Any = None
    doc: str = ""

    def check(self, value: Any, method: str) -> Any:
        """The value as the method will see it. Lenient where a command line cannot say the
        JSON type: "2" for an integer, "true"/"false" for a boolean, 660 for a string."""
        if self.type == "any":
            return value
        if self.type == "integer" and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        if self.type == "boolean" and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if self.type == "string" and isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        ok = isinstance(value, TYPES[self.type]) and not (
            isinstance(value, bool) and self.type in ("integer", "number"))
        if not ok:
            raise RpcError(INVALID_PARAMS, f"{method}: {self.name}: expected {_a(self.type)},"
                           f" got {json.dumps(value)}", {"param": self.name})
        return value

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "required": self.required,
                "default": self.default, "doc": self.doc}


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


@dataclass(frozen=True)
class Method:
    name: str
    func: Callable[..., Any]
    params: tuple[Param, ...]
    doc: str = ""

    def bind(self, raw: Any) -> dict[str, Any]:
        """The keyword arguments for func from the request's params (an object, an array in
        declared order, or absent)."""
        if raw is None:
            given: dict[str, Any] = {}
        elif isinstance(raw, list):
            if len(raw) > len(self.params):
                raise RpcError(INVALID_PARAMS, f"{self.name}: takes at most {len(self.params)}"
                               f" positional parameter(s), got {len(raw)}")
            given = {p.name: v for p, v in zip(self.params, raw, strict=False)}
        elif isinstance(raw, dict):
            given = dict(raw)
        else:
            raise RpcError(INVALID_REQUEST, "params must be an object or an array")
        known = {p.name: p for p in self.params}
        for name in given:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = (f' (did you mean "{close[0]}"?)' if close
                        else f" (it takes: {', '.join(known) or 'no parameters'})")
                raise RpcError(INVALID_PARAMS, f"{self.name}: unknown parameter \"{name}\"{hint}",
                               {"param": name})
        kwargs = {}
        for p in self.params:
            if p.name in given:
                kwargs[p.name] = p.check(given[p.name], self.name)
            elif p.required:
                raise RpcError(INVALID_PARAMS, f"{self.name}: parameter \"{p.name}\" is required",
                               {"param": p.name})
            else:
                kwargs[p.name] = p.default
        return kwargs

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "doc": self.doc, "params": [p.describe() for p in self.params]}


@dataclass
class MethodTable:
    """Methods by name. `method(...)` registers a function f(context, **params)."""

    methods: dict[str, Method] = field(default_factory=dict)

    def method(self, name: str, *params: Param,
               doc: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(func: Callable[..., Any]) -> Callable[..., Any]:
            self.add(Method(name, func, tuple(params), doc or (func.__doc__ or "").strip()))
            return func

        return register

    def add(self, method: Method) -> None:
        if method.name in self.methods:
            raise ValueError(f"RPC method {method.name} is registered twice")
        self.methods[method.name] = method

    def get(self, name: str) -> Method:
        method = self.methods.get(name)
        if method is None:
            close = difflib.get_close_matches(name, self.methods, n=1, cutoff=0.6)
            hint = (f' (did you mean "{close[0]}"?)' if close
                    else f" (methods: {', '.join(sorted(self.methods))})")
            raise RpcError(METHOD_NOT_FOUND, f"no method \"{name}\"{hint}")
        return method

    def describe(self) -> list[dict[str, Any]]:
        return [self.methods[name].describe() for name in sorted(self.methods)]


def parse_request(obj: Any) -> tuple[Any, str, Any, bool]:
    """(id, method, params, is_notification) of one request object, or RpcError
    INVALID_REQUEST (whose data carries the id when one could be read)."""
    if not isinstance(obj, dict):
        raise RpcError(INVALID_REQUEST, "a request must be a JSON object")
    notification = "id" not in obj
    rid = obj.get("id")
    number = isinstance(rid, int | float) and not isinstance(rid, bool)
    if not (rid is None or isinstance(rid, str) or number):
        raise RpcError(INVALID_REQUEST, "id must be a string, a number or null")
    if obj.get("jsonrpc") != JSONRPC:
        raise RpcError(INVALID_REQUEST, 'jsonrpc must be "2.0"', {"id": rid})
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        raise RpcError(INVALID_REQUEST, "method must be a non-empty string", {"id": rid})
    unknown = set(obj) - {"jsonrpc", "id", "method", "params"}
    if unknown:
        raise RpcError(INVALID_REQUEST, f"unknown member(s) {', '.join(sorted(unknown))}", {"id": rid})
    params = obj.get("params")
    if params is not None and not isinstance(params, dict | list):
        raise RpcError(INVALID_REQUEST, "params must be an object or an array", {"id": rid})
    return rid, method, params, notification


def result_response(rid: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": rid, "result": result}


def error_response(rid: Any, err: RpcError) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": rid, "error": err.to_dict()}


def encode(message: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"
