"""The JSON-RPC server: clients of one listening UNIX socket, served from the caller's selector
loop without blocking it (non-blocking reads and writes, bounded buffers).

A method returns its result, or a concurrent.futures.Future when the work takes time on
another thread (adding an export opens its disk, removing one drains it): the answer is sent
when the future is done, and meanwhile the loop serves everyone else. Nothing a client sends
can stop the server: bad JSON, a bad request, an unknown method or a bad parameter is an
error response; a line over MAX_LINE, a client that does not read its answers or one too many
clients is disconnected.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .protocol import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    MAX_LINE,
    PARSE_ERROR,
    MethodTable,
    RpcError,
    encode,
    error_response,
    parse_request,
    result_response,
)

log = logging.getLogger("dataplane.rpc")

MAX_CLIENTS = 64
MAX_OUTPUT = 16 << 20        # bytes of answers a client may leave unread
MAX_PENDING = 64             # answers a client may be waiting for at once (futures)
MAX_BATCH = 1024


@dataclass
class _Client:
    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    pending: int = 0
    closed: bool = False


@dataclass
class _Answer:
    """The answers of one line (a request or a batch), some of them still futures."""

    client: _Client
    items: list[Any]          # dict (ready), Future (waiting) or None (a notification)
    rids: list[Any]
    batch: bool


class RpcServer:
    """Serves `table`'s methods, called as f(context, **params), on a listening socket."""

    def __init__(self, listener: socket.socket, table: MethodTable, context: Any) -> None:
        self.listener = listener
        self.listener.setblocking(False)
        self.table = table
        self.context = context
        self.clients: dict[int, _Client] = {}
        self.sel: selectors.BaseSelector | None = None
        self._done_r, self._done_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._finished: list[_Answer] = []

    # ---- the selector ----

    def register(self, sel: selectors.BaseSelector) -> None:
        """Join the caller's loop: its key.data are callables taking the event mask."""
        self.sel = sel
        sel.register(self.listener, selectors.EVENT_READ, lambda _mask: self._accept())
        sel.register(self._done_r, selectors.EVENT_READ, lambda _mask: self._flush_finished())

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)
        if self.sel is not None:
            for obj in (self.listener, self._done_r):
                try:
                    self.sel.unregister(obj)
                except (KeyError, ValueError):
                    pass
        self.listener.close()
        os.close(self._done_r)
        os.close(self._done_w)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("rpc: accept failed: %s", exc.strerror)
            return
        if len(self.clients) >= MAX_CLIENTS:
            self._drop_departed()
        if len(self.clients) >= MAX_CLIENTS:
            try:
                sock.send(encode(error_response(None, RpcError(
                    INTERNAL_ERROR, f"too many clients ({MAX_CLIENTS}): try again later"))))
            except OSError:
                pass
            sock.close()
            return
        sock.setblocking(False)
        client = _Client(sock)
        self.clients[sock.fileno()] = client
        assert self.sel is not None
        self.sel.register(sock, selectors.EVENT_READ, lambda mask: self._on_client(client, mask))

    def _on_client(self, client: _Client, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._write(client)
        if client.closed or not mask & selectors.EVENT_READ:
            return
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            self._drop(client)
            return
        client.inbuf += data
        while not client.closed:
            end = client.inbuf.find(b"\n")
            if end < 0:
                if len(client.inbuf) > MAX_LINE:
                    self._send(client, error_response(None, RpcError(
                        PARSE_ERROR, f"request line longer than {MAX_LINE} bytes")))
                    self._write(client)
                    self._drop(client)
                return
            line = bytes(client.inbuf[:end])
            del client.inbuf[:end + 1]
            if line.strip():
                self._on_line(client, line)

    # ---- requests ----

    def _on_line(self, client: _Client, line: bytes) -> None:
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            self._send(client, error_response(None, RpcError(PARSE_ERROR, f"not UTF-8 (byte {exc.start})")))
            return
        except RecursionError:
            self._send(client, error_response(None, RpcError(PARSE_ERROR, "JSON nested too deeply")))
            return
        except ValueError as exc:
            self._send(client, error_response(None, RpcError(PARSE_ERROR, f"bad JSON: {exc}")))
            return
        if isinstance(obj, list):
            if not obj:
                self._send(client, error_response(None, RpcError(INVALID_REQUEST, "empty batch")))
                return
            if len(obj) > MAX_BATCH:
                self._send(client, error_response(None, RpcError(
                    INVALID_REQUEST, f"batch of {len(obj)} requests (at most {MAX_BATCH})")))
                return
            answer = _Answer(client, [], [], batch=True)
            for item in obj:
                self._dispatch(answer, item)
        else:
            answer = _Answer(client, [], [], batch=False)
            self._dispatch(answer, obj)
        futures = [f for f in answer.items if isinstance(f, Future)]
        if not futures:
            self._answer(answer)
            return
        client.pending += 1
        left = [len(futures)]

        def one_done(_f: Future) -> None:
            with self._lock:
                left[0] -= 1
                if left[0]:
                    return
                self._finished.append(answer)
            try:
                os.write(self._done_w, b"x")
            except OSError:
                pass

        for f in futures:
            f.add_done_callback(one_done)

    def _dispatch(self, answer: _Answer, obj: Any) -> None:
        try:
            rid, name, params, notification = parse_request(obj)
        except RpcError as err:
            rid = err.data.get("id") if isinstance(err.data, dict) else None
            answer.items.append(error_response(rid, RpcError(err.code, err.message)))
            answer.rids.append(rid)
            return
        answer.rids.append(rid)
        if answer.client.pending >= MAX_PENDING:
            answer.items.append(None if notification else error_response(rid, RpcError(
                INTERNAL_ERROR, f"{MAX_PENDING} requests of this client are still running: wait"
                " for their answers")))
            return
        try:
            method = self.table.get(name)
            result = method.func(self.context, **method.bind(params))
        except RpcError as err:
            answer.items.append(None if notification else error_response(rid, err))
            return
        except Exception as exc:   # a bug must not take the daemon down
            log.exception("rpc: %s failed", name)
            answer.items.append(None if notification else error_response(
                rid, RpcError(INTERNAL_ERROR, f"{name}: {type(exc).__name__}: {exc}")))
            return
        if isinstance(result, Future):
            answer.items.append(result if not notification else _ignored(result))
        else:
            answer.items.append(None if notification else result_response(rid, result))

    def _flush_finished(self) -> None:
        try:
            os.read(self._done_r, 4096)
        except OSError:
            pass
        with self._lock:
            finished, self._finished = self._finished, []
        for answer in finished:
            answer.client.pending -= 1
            self._answer(answer)

    def _answer(self, answer: _Answer) -> None:
        out = []
        for item, rid in zip(answer.items, answer.rids, strict=True):
            if isinstance(item, Future):
                err = item.exception()
                if isinstance(err, RpcError):
                    item = error_response(rid, err)
                elif err is not None:
                    log.error("rpc: a request failed: %s", err)
                    item = error_response(rid, RpcError(INTERNAL_ERROR, f"{type(err).__name__}: {err}"))
                else:
                    item = result_response(rid, item.result())
            if item is not None:
                out.append(item)
        if not out or answer.client.closed:
            return
        self._send(answer.client, out if answer.batch else out[0])

    # ---- output ----

    def _send(self, client: _Client, message: Any) -> None:
        if client.closed:
            return
        try:
            data = encode(message)
        except (TypeError, ValueError) as exc:
            log.error("rpc: cannot encode an answer: %s", exc)
            data = encode(error_response(None, RpcError(INTERNAL_ERROR, "the answer could not be encoded")))
        client.outbuf += data
        if len(client.outbuf) > MAX_OUTPUT:
            log.warning("rpc: dropping a client that does not read its answers")
            self._drop(client)
            return
        self._write(client)

    def _write(self, client: _Client) -> None:
        if client.closed:
            return
        try:
            while client.outbuf:
                n = client.sock.send(client.outbuf)
                del client.outbuf[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(client)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.outbuf else 0)
        assert self.sel is not None
        try:
            self.sel.modify(client.sock, events, self.sel.get_key(client.sock).data)
        except (KeyError, ValueError):
            pass

    def _drop_departed(self) -> None:
        """Forget clients that hung up but whose EOF the loop has not read yet, so that a
        newcomer is not turned away for a slot that is already free."""
        for client in list(self.clients.values()):
            try:
                if client.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    self._drop(client)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._drop(client)

    def _drop(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        self.clients.pop(client.sock.fileno(), None)
        if self.sel is not None:
            try:
                self.sel.unregister(client.sock)
            except (KeyError, ValueError):
                pass
        client.sock.close()


def _ignored(future: Future) -> None:
    """A notification's future: nobody waits for its answer, but its failure is logged."""

    def done(f: Future) -> None:
        if f.exception() is not None:
            log.warning("rpc: a notification failed: %s", f.exception())

    future.add_done_callback(done)
