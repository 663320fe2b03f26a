"""A small HTTP/1.1 client for the router's upstream requests, on asyncio protocols.

It does only what a proxy in front of OpenAI-compatible servers needs, and does it with
little CPU per request (a general-purpose client costs more than the whole rest of the
router): one request per connection at a time, kept-alive connections reused per backend
(last in, first out, at most `keepalive` seconds idle), responses with Content-Length,
chunked transfer encoding or a body that ends with the connection, interim 1xx answers
skipped, body bytes handed over as they arrive. Timeouts are the caller's
(`asyncio.timeout`); a response that is not read to its end closes its connection.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)
MAX_HEAD = 64 * 1024
_WS = " \t\r\n\x0b\x0c"
"""What bytes.strip() strips (a head is parsed as latin-1 text, where str.strip() would strip more)."""
PAUSE_AT = 1 << 20
"""Buffered body bytes above which reading from the upstream pauses until the consumer catches up."""


class UpstreamError(Exception):
    reason = "error"


class ConnectFailed(UpstreamError):
    reason = "connect"


class Disconnected(UpstreamError):
    """The connection closed before the response head was complete."""

    reason = "disconnected"


class BodyBroken(UpstreamError):
    """The connection closed (or the framing broke) in the middle of the body."""

    reason = "stream_aborted"


class ProtocolFailure(UpstreamError):
    reason = "error"


Sink = Callable[[bytes], bool]
"""Takes body bytes as they arrive; True asks the response to stop reading until the consumer
has caught up."""


class Response:
    """One upstream response: `await head()`, then `read_chunk()` until b"", `read_all()`, or
    `relay()`."""

    __slots__ = ("_chunks", "_conn", "_eof", "_exc", "_paused", "_sink", "_size", "_waiter", "headers", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = 0
        self.headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._exc: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._sink: Sink | None = None

    # -- fed by the connection --

    def _got_head(self) -> None:
        self._wake()

    def _got_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._sink is not None:
            return  # handed over at the end of this read (_read_done)
        self._wake()
        if self._size > PAUSE_AT and not self._paused and self._conn.transport is not None:
            self._paused = True
            self._conn.transport.pause_reading()

    def _read_done(self) -> None:
        """The end of one read from the connection, while relaying: the body bytes it carried go
        to the sink, unless the body ended or failed in it (then relay() hands over the rest)."""
        if not self._chunks or self._eof or self._exc is not None:
            return
        assert self._sink is not None
        if self._sink(self._take()):
            self._pause()

    def _pause(self) -> None:
        if not self._paused and self._conn.transport is not None:
            self._paused = True
            self._conn.transport.pause_reading()
            self._wake()

    def _take(self) -> bytes:
        """The body bytes received and not handed over yet, at once."""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        return data

    def _got_eof(self) -> None:
        self._eof = True
        self._wake()

    def _fail(self, exc: UpstreamError) -> None:
        if self._exc is None and not self._eof:
            self._exc = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    # -- read by the caller --

    @property
    def at_eof(self) -> bool:
        """True when the body has ended and every byte of it was read: read_chunk() would return b""."""
        return self._eof and not self._chunks

    async def head(self) -> None:
        while self.status == 0 and self._exc is None:
            waiter = self._waiter = self._conn.loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        if self.status == 0:
            raise self._exc or Disconnected("no response")

    async def read_chunk(self) -> bytes:
        """The body bytes that arrived since the last call (waits for some); b"" at the end."""
        chunks = self._chunks
        while not chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            waiter = self._waiter = self._conn.loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        data = self._take()
        if self._paused and self._conn.transport is not None:
            self._paused = False
            self._conn.transport.resume_reading()
        return data

    async def relay(self, sink: Sink, drain: Callable[[], Awaitable[None]]) -> bytes:
        """Hand the body to `sink` as it arrives, from the connection's read callback: no task
        switch per read. When sink returns True, reading pauses until `drain()` returned. Returns
        the bytes of the body's last read (for the caller to send together with its end); raises
        the upstream's error like read_chunk() (after the bytes that came before it went to sink)."""
        self._sink = sink
        chunks = self._chunks
        try:
            while True:
                if chunks:
                    data = self._take()
                    if self._eof and self._exc is None:
                        return data
                    if sink(data):
                        self._pause()
                    continue
                if self._exc is not None:
                    raise self._exc
                if self._eof:
                    return b""
                if self._paused:
                    await drain()
                    self._paused = False
                    if self._conn.transport is not None:
                        self._conn.transport.resume_reading()
                    continue
                waiter = self._waiter = self._conn.loop().create_future()
                try:
                    await waiter
                finally:
                    self._waiter = None
        finally:
            self._sink = None

    async def read_all(self) -> bytes:
        if self._eof and self._exc is None:  # all of it is here already (a small answer, usually)
            return self._take() if self._chunks else b""
        parts: list[bytes] = []
        while True:
            data = await self.read_chunk()
            if not data:
                return b"".join(parts)
            parts.append(data)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.keep_alive = False
        self.idle_since = 0.0
        self.response: Response | None = None
        self._buf = b""
        """Received bytes not parsed yet (an incomplete head, chunk size line or chunk end)."""
        self._state = _DONE
        self._remaining = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, looked up once per connection (each lookup is a getpid() call)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        r = self.response
        if r is None:
            return
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            r._got_eof()
        elif self._state == _HEAD:
            r._fail(Disconnected("connection closed before the response"))
        elif self._state != _DONE:
            r._fail(BodyBroken("connection closed in the middle of the body"))

    def data_received(self, data: bytes) -> None:
        if self.response is None or self._state == _DONE:
            self.keep_alive = False  # nobody asked: the connection is not in a state to reuse
            if self.transport is not None:
                self.transport.close()
            return
        if self._buf:
            data = self._buf + data
            self._buf = b""
        r = self.response
        try:
            pos = self._parse(data)
        except (ValueError, IndexError) as exc:
            self._protocol_error(f"bad response framing: {exc}")
            return
        if pos < len(data):
            self._buf = data[pos:]
        if r is not None and r._sink is not None:
            r._read_done()

    # -- the parser --

    def _protocol_error(self, message: str) -> None:
        self.keep_alive = False
        r = self.response
        if r is not None:
            r._fail(ProtocolFailure(message) if self._state == _HEAD else BodyBroken(message))
        self._state = _DONE
        self._buf = b""
        if self.transport is not None:
            self.transport.close()

    def _parse(self, data: bytes) -> int:
        """Parse `data` from its start; returns how much of it was consumed (the rest is an
        incomplete piece that needs the next bytes). Bytes are only copied to hand body bytes over
        (not at all when a read holds nothing but body bytes)."""
        r = self.response
        assert r is not None
        pos = 0
        size = len(data)
        while pos < size:
            state = self._state
            if state in (_CHUNK_DATA, _LENGTH):
                n = min(size - pos, self._remaining)
                r._got_data(data[pos:pos + n])
                pos += n
                self._remaining -= n
                if self._remaining == 0:
                    if state == _LENGTH:
                        self._finish()
                    else:
                        self._state = _CHUNK_CRLF
            elif state == _CHUNK_SIZE:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    if size - pos > 1024:
                        self._protocol_error("chunk size line too long")
                        return size
                    return pos
                line = data[pos:end]
                if b";" in line:
                    line = line.split(b";", 1)[0]
                chunk_size = int(line, 16)
                if chunk_size < 0:
                    raise ValueError(f"negative chunk size {line!r}")
                pos = end + 2
                if chunk_size == 0:
                    self._state = _TRAILERS
                else:
                    self._remaining = chunk_size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_CRLF:
                if size - pos < 2:
                    return pos
                if not data.startswith(b"\r\n", pos):
                    self._protocol_error("missing CRLF after a chunk")
                    return size
                pos += 2
                self._state = _CHUNK_SIZE
            elif state == _HEAD:
                end = data.find(b"\r\n\r\n", pos)
                if end < 0:
                    if size - pos > MAX_HEAD:
                        self._protocol_error("response head too large")
                        return size
                    return pos
                head = data[pos:end].decode("latin-1")
                pos = end + 4
                if not self._parse_head(head, r):
                    return size
            elif state == _TRAILERS:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    return pos
                if end == pos:
                    self._finish()
                pos = end + 2
            elif state == _UNTIL_CLOSE:
                r._got_data(data[pos:])
                return size
            else:  # bytes after the end of the response: do not reuse this connection
                self.keep_alive = False
                return size
        return pos

    def _parse_head(self, head: str, r: Response) -> bool:
        """Act on a response head (without its final blank line); False after a protocol error."""
        lines = head.split("\r\n")
        version, _, rest = lines[0].partition(" ")
        status = int(rest[:3])
        if not version.startswith("HTTP/1."):
            self._protocol_error("not an HTTP/1.x response")
            return False
        if 100 <= status < 200:
            return True  # an interim answer (100 Continue): the real one follows
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                key = name.strip(_WS).lower()
                val = value.strip(_WS)
                headers[key] = f"{headers[key]}, {val}" if key in headers else val
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.1":
            self.keep_alive = "close" not in connection
        else:
            self.keep_alive = "keep-alive" in connection
        r.status = status
        r.headers = headers
        if status in (204, 304):
            self._finish()
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = _CHUNK_SIZE
        elif "content-length" in headers:
            self._remaining = int(headers["content-length"])
            if self._remaining < 0:
                raise ValueError("negative Content-Length")
            self._state = _LENGTH
            if self._remaining == 0:
                self._finish()
        else:
            self._state = _UNTIL_CLOSE
            self.keep_alive = False
        r._got_head()
        return True

    def _finish(self) -> None:
        self._state = _DONE
        r = self.response
        if r is not None:
            r._got_eof()

    # -- used by the pool --

    def send(self, data: bytes) -> Response:
        assert self.transport is not None
        response = Response(self)
        self.response = response
        self._state = _HEAD
        self._buf = b""
        self.transport.write(data)
        return response

    @property
    def complete(self) -> bool:
        return self._state == _DONE and self.response is not None and self.response._exc is None

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Connections to one upstream (scheme://host:port)."""

    def __init__(self, url: str, *, connect_timeout: float, keepalive: float = 4.0, max_idle: int = 1024) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.https = parts.scheme == "https"
        self.port = parts.port or (443 if self.https else 80)
        default = 443 if self.https else 80
        self.host_header = self.host if self.port == default else f"{self.host}:{self.port}"
        if ":" in self.host and not self.host.startswith("["):
            self.host_header = f"[{self.host}]" + ("" if self.port == default else f":{self.port}")
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.max_idle = max_idle
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if self.https else None
        self._idle: list[_Connection] = []

    def request_head(self, method: str, path: str, headers: dict[str, str]) -> bytes:
        """The request line and headers up to (not including) Content-Length."""
        lines = [f"{method} {self.base_path}{path} HTTP/1.1", f"Host: {self.host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n").encode("latin-1")

    async def probe(self) -> None:
        """Open a new connection and close it: the health check of a backend with no HTTP
        health path. Raises ConnectFailed."""
        (await self._connect()).close()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    _Connection, self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None)
        except TimeoutError:
            raise ConnectFailed(f"connect timed out after {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect ({exc.strerror or exc})") from None
        return conn

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive:
                conn.reused = True
                return conn
            conn.close()
        return None

    async def send(self, head: bytes, body: bytes, *, fresh: bool = False) -> tuple[_Connection, Response]:
        """Send `head` (from request_head) + Content-Length + `body` on a pooled (or, with fresh,
        a new) connection; returns the connection (give it back with release) and the response."""
        conn = None if fresh else self._take_idle()
        if conn is None:
            conn = await self._connect()
        return self._send_on(conn, head, body)

    def send_idle(self, head: bytes, body: bytes) -> tuple[_Connection, Response] | None:
        """send() on a pooled connection without waiting: None when there is no idle one."""
        conn = self._take_idle()
        return None if conn is None else self._send_on(conn, head, body)

    def _send_on(self, conn: _Connection, head: bytes, body: bytes) -> tuple[_Connection, Response]:
        data = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
        try:
            return conn, conn.send(data)
        except (OSError, RuntimeError) as exc:
            conn.close()
            raise Disconnected(f"write failed ({exc})") from None

    def release(self, conn: _Connection | None) -> None:
        """Back to the pool if its response was read to the end and it may be kept alive."""
        if conn is None:
            return
        if conn.complete and conn.keep_alive and not conn.closed and len(self._idle) < self.max_idle:
            conn.response = None
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
