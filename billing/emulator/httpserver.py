"""A small HTTP/1.1 server on asyncio: keep-alive, Content-Length bodies, one write per response.

Why not `http.server`: a thread per connection tops out well below the emulator's target rate on
two cores (figures in docs/performance.md), and its separate header/body writes stall keep-alive
clients on delayed ACKs. Here each connection is an `asyncio.Protocol`; a handler returns a
`Response` (fast path, no task) or an awaitable (when it must wait, e.g. injected latency), or
`None` to drop the connection without answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_BUG = b'{"error": {"type": "api_error", "message": "Internal emulator error."}}'
log = logging.getLogger("billing.emulator")


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    peer: str


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"
    close: bool = False

    def encode(self, keep_alive: bool) -> bytes:
        head = [f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Unknown')}"]
        head.append(f"Content-Type: {self.content_type}")
        head.append(f"Content-Length: {len(self.body)}")
        head.extend(f"{k}: {v}" for k, v in self.headers)
        head.append("Connection: keep-alive" if keep_alive else "Connection: close")
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body


HandlerResult = Response | Awaitable["Response | None"] | None
Handler = Callable[[Request], HandlerResult]


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HTTPProtocol(asyncio.Protocol):
    """One connection. Requests are answered strictly in order (pipelining-safe)."""

    def __init__(self, handler: Handler, connections: set[HTTPProtocol]) -> None:
        self._handler = handler
        self._connections = connections
        self._buf = bytearray()
        self._busy = False
        self._closed = False
        self._transport: asyncio.Transport | None = None
        self._peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # answers leave at once, not after delayed ACKs
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else str(peer or "")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._transport = None
        self._connections.discard(self)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            self._process()

    def _process(self) -> None:
        while not self._closed and self._transport is not None:
            try:
                parsed = self._parse_one()
            except _BadRequest as exc:
                body = f'{{"error": {{"message": "{exc}", "type": "invalid_request_error"}}}}'
                self._write(Response(exc.status, body.encode(), close=True), keep_alive=False)
                return
            if parsed is None:
                return
            request, keep_alive = parsed
            try:
                result = self._handler(request)
            except Exception:  # a handler bug answers 500 instead of hanging the client
                log.exception("handler crashed")
                result = Response(500, _BUG)
            if result is None or isinstance(result, Response):
                self._finish(result, keep_alive)
                continue
            self._busy = True
            task = asyncio.ensure_future(result)
            task.add_done_callback(lambda t, ka=keep_alive: self._on_done(t, ka))
            return

    def _on_done(self, task: asyncio.Future, keep_alive: bool) -> None:
        self._busy = False
        try:
            result = task.result()
        except Exception:
            log.exception("handler crashed")
            result = Response(500, _BUG)
        self._finish(result, keep_alive)
        if self._buf:
            self._process()

    def _finish(self, response: Response | None, keep_alive: bool) -> None:
        if response is None:  # injected "dropped connection": close without a byte
            self._abort()
            return
        keep_alive = keep_alive and not response.close
        self._write(response, keep_alive)

    def _write(self, response: Response, keep_alive: bool) -> None:
        if self._transport is None:
            return
        self._transport.write(response.encode(keep_alive))  # one write: see module docstring
        if not keep_alive:
            self._transport.close()
            self._closed = True

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._closed = True
        self._buf.clear()

    def _parse_one(self) -> tuple[Request, bool] | None:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEADER_BYTES:
                raise _BadRequest(431, "Request headers too large")
            return None
        try:
            head = bytes(buf[:end]).decode("latin-1")
        except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes anything
            raise _BadRequest(400, "Bad request") from exc
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise _BadRequest(400, "Malformed request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(400, "Malformed header")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise _BadRequest(411, "Chunked bodies are not supported; send Content-Length")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError as exc:
            raise _BadRequest(400, "Bad Content-Length") from exc
        if length < 0 or length > MAX_BODY_BYTES:
            raise _BadRequest(413, "Body too large")
        total = end + 4 + length
        if len(buf) < total:
            expects = headers.get("expect", "").lower() == "100-continue"
            if expects and len(buf) == end + 4 and self._transport is not None:
                self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return None
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        path, _, query = target.partition("?")
        conn = headers.get("connection", "").lower()
        keep_alive = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
        return Request(method.upper(), path, query, headers, body, self._peer), keep_alive


async def serve(
    handler: Handler, host: str, port: int, connections: set[HTTPProtocol]
) -> asyncio.Server:
    """Listen; `connections` tracks open connections so a stop can close keep-alive ones."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: HTTPProtocol(handler, connections), host, port, reuse_address=True, backlog=1024
    )
