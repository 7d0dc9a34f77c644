"""The backend's statistics endpoints, answered from the server's own loop (no extra thread,
so a snapshot never races a queue being torn down): a UNIX socket next to the vhost-user one
that hands out the JSON snapshot (`dataplane stats`), and with `serve --metrics HOST:PORT` an
HTTP endpoint for Prometheus. fetch_stats is the client side of the UNIX socket.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..observe.metrics import to_json

log = logging.getLogger("dataplane.metrics")

STATS_SUFFIX = ".stats"


def stats_socket_path(vhost_socket: os.PathLike[str] | str) -> str:
    """Where `dataplane stats --socket PATH` finds the backend serving PATH."""
    return os.fspath(vhost_socket) + STATS_SUFFIX


def http_response(body: bytes, status: str = "200 OK",
                  content_type: str = "text/plain; charset=utf-8") -> bytes:
    return (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


def _accept_header(request: str) -> str:
    for line in request.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            return value.strip()
    return ""


def serve_one(conn: socket.socket, snapshot: Callable[[], dict[str, Any]], http: bool) -> None:
    """Answer one stats or metrics client and close it (bounded: 1 s per client)."""
    conn.settimeout(1.0)
    try:
        if http:
            request = conn.recv(4096).decode("latin-1", "replace")
            path = request.split(" ", 2)[1] if request.count(" ") >= 2 else "/"
            if path.split("?")[0] not in ("/metrics", "/"):
                conn.sendall(http_response(b"not found: try /metrics\n", "404 Not Found"))
                return
            from ..observe.prometheus import exposition  # only a --metrics server pays the import

            body, content_type = exposition(snapshot, _accept_header(request))
            conn.sendall(http_response(body, content_type=content_type))
        else:
            conn.sendall(to_json(snapshot()).encode())
    except OSError as exc:
        log.debug("stats client: %s", exc)
    finally:
        conn.close()


def fetch_stats(vhost_socket: str, timeout: float = 5.0) -> dict[str, Any]:
    """What `dataplane stats` prints: the JSON snapshot of the backend serving vhost_socket."""
    path = stats_socket_path(vhost_socket)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    except FileNotFoundError:
        raise ConfigError(f"no backend statistics at {path}: is `dataplane serve --socket "
                          f"{vhost_socket}` running?") from None
    except OSError as exc:
        raise ConfigError(f"cannot read statistics from {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    return json.loads(b"".join(chunks))
