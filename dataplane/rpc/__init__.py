"""The management interface: JSON-RPC 2.0 on a UNIX socket (`serve --rpc-socket PATH`). The
protocol and the method table (protocol), the server the daemon runs in its loop (server) and
the client (`from dataplane.rpc import Client`). The methods themselves are the daemon's
(backend.methods)."""

from .client import DEFAULT_SOCKET, Client
from .protocol import (
    EXPORT_BUSY,
    EXPORT_EXISTS,
    EXPORT_FAILED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NO_SUCH_EXPORT,
    NOT_AVAILABLE,
    PARSE_ERROR,
    SHUTTING_DOWN,
    Method,
    MethodTable,
    Param,
    RpcError,
)
from .server import RpcServer

__all__ = [
    "DEFAULT_SOCKET",
    "EXPORT_BUSY",
    "EXPORT_EXISTS",
    "EXPORT_FAILED",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "NOT_AVAILABLE",
    "NO_SUCH_EXPORT",
    "PARSE_ERROR",
    "SHUTTING_DOWN",
    "Client",
    "Method",
    "MethodTable",
    "Param",
    "RpcError",
    "RpcServer",
]
