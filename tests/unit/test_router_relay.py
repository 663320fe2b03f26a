"""The router's cheap paths: the upstream parser fed at every split point, the lazily armed
request deadlines, the stream tail kept for usage, and streams relayed with their end coalesced
into the last write (against a raw TCP upstream, router and client on one loop)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from clusterctl.router.deadline import Deadlines
from clusterctl.router.server import USAGE_TAIL, JsonLog, Router, _Tail
from clusterctl.router.state import BackendState, Dispatcher
from clusterctl.router.upstream import BodyBroken, ProtocolFailure, Response, _Connection
from tests.router_upstream import LogLines, route_table

# -- the parser ---------------------------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def connection() -> tuple[_Connection, Response]:
    conn = _Connection()
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    return conn, conn.send(b"GET / HTTP/1.1\r\n\r\n")


def collect(resp: Response) -> bytes:
    async def read() -> bytes:
        async with asyncio.timeout(2):
            await resp.head()
            return await resp.read_all()

    return asyncio.run(read())


CHUNKED = (b"HTTP/1.1 100 Continue\r\n\r\n"
           b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
           b"X-Multi: a\r\nx-multi:  b \r\n\r\n"
           b"5;ext=1\r\nhello\r\n6\r\n world\r\n1A\r\n" + b"z" * 26 + b"\r\n0\r\nX-Trailer: 1\r\n\r\n")
LENGTH = b"HTTP/1.1 201 Created\r\nContent-Length: 11\r\nContent-Type: application/json\r\n\r\nhello world"


def splits(data: bytes) -> list[list[bytes]]:
    """Every way of cutting `data` in two, and one byte at a time."""
    return [[data[:i], data[i:]] for i in range(1, len(data))] + [[data[i:i + 1] for i in range(len(data))]]


@pytest.mark.parametrize("pieces", splits(CHUNKED), ids=lambda p: f"{len(p[0])}+{len(p) - 1}")
def test_chunked_at_every_split_point(pieces: list[bytes]) -> None:
    conn, resp = connection()
    for piece in pieces:
        conn.data_received(piece)
    assert collect(resp) == b"hello world" + b"z" * 26
    assert resp.status == 200
    assert resp.headers["x-multi"] == "a, b" and resp.headers["content-type"] == "text/event-stream"
    assert conn.complete and conn.keep_alive and resp.at_eof


@pytest.mark.parametrize("pieces", splits(LENGTH), ids=lambda p: f"{len(p[0])}+{len(p) - 1}")
def test_content_length_at_every_split_point(pieces: list[bytes]) -> None:
    conn, resp = connection()
    for piece in pieces:
        conn.data_received(piece)
    assert collect(resp) == b"hello world"
    assert (resp.status, resp.headers["content-length"]) == (201, "11")
    assert conn.complete and conn.keep_alive


def test_body_bytes_are_handed_over_without_a_copy() -> None:
    conn, resp = connection()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    body = b"0123456789"
    conn.data_received(body)

    async def read() -> bytes:
        await resp.head()
        return await resp.read_chunk()

    assert asyncio.run(read()) is body


def test_until_close_and_bytes_after_the_end() -> None:
    conn, resp = connection()
    conn.data_received(b"HTTP/1.0 200 OK\r\n\r\nsome")
    conn.data_received(b" body")
    conn.connection_lost(None)
    assert collect(resp) == b"some body" and not conn.keep_alive

    conn, resp = connection()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
    assert collect(resp) == b"ok"
    assert not conn.keep_alive  # something followed the response: not reused


@pytest.mark.parametrize("data, error", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", BodyBroken),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n", BodyBroken),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX", BodyBroken),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 2000, BodyBroken),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n", ProtocolFailure),
    (b"SPDY/3 200 OK\r\n\r\n", ProtocolFailure),
])
def test_bad_framing_fails_the_response(data: bytes, error: type[Exception]) -> None:
    conn, resp = connection()
    conn.data_received(data)
    with pytest.raises(error):
        collect(resp)
    assert conn.transport is not None and conn.transport.is_closing() and not conn.keep_alive


def test_head_too_large() -> None:
    conn, resp = connection()
    conn.data_received(b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 70_000)
    with pytest.raises(ProtocolFailure, match="too large"):
        collect(resp)


# -- deadlines ----------------------------------------------------------------------------------


def test_deadline_near_and_far_expire_on_time() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(tick=0.05)
        for delay in (0.05, 0.4):  # armed at once; parked, then armed by a sweep
            start = loop.time()
            with pytest.raises(TimeoutError):
                async with deadlines.at(start + delay) as d:
                    assert len(deadlines) == (0 if delay < 0.1 else 1)
                    await asyncio.sleep(5)
            assert d.expired
            assert delay - 0.01 <= loop.time() - start < delay + 0.2
            assert len(deadlines) == 0

    asyncio.run(main())


def test_deadline_not_reached_leaves_nothing_behind() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(tick=0.05)
        for _ in range(3):
            async with deadlines.at(loop.time() + 60) as d:
                await asyncio.sleep(0.01)
            assert not d.expired
        assert len(deadlines) == 0
        await asyncio.sleep(0.1)
        assert deadlines._sweep is None  # the sweep dropped the empty buckets and stopped
        async with deadlines.at(loop.time() - 1) as d:  # already past: expires at the first await
            await asyncio.sleep(0)
            raise AssertionError("not reached")

    with pytest.raises(TimeoutError):
        asyncio.run(main())


def test_deadline_passes_other_cancellations_through() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(tick=0.05)

        async def waits() -> None:
            async with deadlines.at(loop.time() + 60):
                await asyncio.sleep(5)

        task = asyncio.create_task(waits())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(deadlines) == 0
        # an enclosing asyncio timeout that fires first is that timeout's, not the deadline's
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                async with deadlines.at(loop.time() + 60) as d:
                    await asyncio.sleep(5)
        assert not d.expired
        d2 = deadlines.at(loop.time() + 60)
        async with d2:
            with pytest.raises(RuntimeError):
                await d2.__aenter__()

    asyncio.run(main())


# -- small pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[5], [100] * 200, [USAGE_TAIL + 10, 3], [3, USAGE_TAIL * 2, 1, 1], [4000] * 5])
def test_tail_is_the_last_bytes(sizes: list[int]) -> None:
    chunks = [bytes([65 + i % 26]) * n for i, n in enumerate(sizes)]
    tail = _Tail(chunks[0])
    for chunk in chunks[1:]:
        tail.add(chunk)
    assert tail.value() == b"".join(chunks)[-USAGE_TAIL:]


def test_acquire_nowait_leaves_queued_requests_first() -> None:
    table = route_table({"a": {"url": "http://127.0.0.1:9", "max_concurrency": 1}}, {"chat": ["a"]})
    states = {"a": BackendState("a", table.backends["a"], table.health)}
    dispatcher = Dispatcher(states, 4, 5.0)

    async def main() -> None:
        first = dispatcher.acquire_nowait(("a",))
        assert first is states["a"] and dispatcher.acquire_nowait(("a",)) is None
        waiting = asyncio.create_task(dispatcher.acquire("chat", ("a",)))
        await asyncio.sleep(0)
        assert dispatcher.depth == 1
        states["a"].in_flight -= 1  # a slot frees without a pump: the queued request still comes first
        assert dispatcher.acquire_nowait(("a",)) is None
        dispatcher.pump()
        assert await waiting is states["a"]

    asyncio.run(main())


# -- streams through the router -----------------------------------------------------------------

EVENTS = [b'data: {"choices":[{"delta":{"content":"' + w + b'"}}]}\n\n' for w in (b"a", b"b", b"c")]
EVENTS += [b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\n', b"data: [DONE]\n\n"]
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


Writes = Callable[[], list[bytes]]


def all_at_once() -> list[bytes]:
    return [HEAD + b"".join(chunk(e) for e in EVENTS) + b"0\r\n\r\n"]


def last_with_end() -> list[bytes]:
    return [HEAD] + [chunk(e) for e in EVENTS[:-1]] + [chunk(EVENTS[-1]) + b"0\r\n\r\n"]


def end_alone() -> list[bytes]:
    return [HEAD + chunk(EVENTS[0])] + [chunk(e) for e in EVENTS[1:]] + [b"0\r\n\r\n"]


async def serve_upstream(writes: Writes) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if head.startswith(b"GET"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    continue
                for data in writes():
                    writer.write(data)
                    await writer.drain()
                    await asyncio.sleep(0.02)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


def through_router(writes: Writes, client: Callable[[str], Awaitable[None]], **backend: Any) -> LogLines:
    lines = LogLines()

    async def main() -> None:
        server, port = await serve_upstream(writes)
        table = route_table({"a": {"url": f"http://127.0.0.1:{port}", **backend}}, {"chat": ["a"]},
                            health={"interval": 30.0})
        router = Router(table, log=JsonLog(lines))  # type: ignore[arg-type]
        router_port = await router.start("127.0.0.1", 0)
        try:
            async with asyncio.timeout(20):
                await client(f"http://127.0.0.1:{router_port}/v1/chat/completions")
        finally:
            await router.stop()
            server.close()

    asyncio.run(main())
    return lines


@pytest.mark.parametrize("writes", [all_at_once, last_with_end, end_alone])
def test_stream_relayed_whole_however_its_end_arrives(writes: Writes) -> None:
    async def client(url: str) -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):  # the second on the kept-alive upstream connection
                async with session.post(url, json={"model": "chat", "stream": True}) as resp:
                    assert resp.status == 200 and resp.headers["X-Clusterctl-Backend"] == "a"
                    assert await resp.read() == b"".join(EVENTS)

    lines = through_router(writes, client)
    access = [line for line in lines.access() if line["path"] == "/v1/chat/completions"]
    assert len(access) == 2
    for line in access:
        assert (line["status"], line["tokens_in"], line["tokens_out"]) == (200, 3, 5)
        assert line["bytes"] == len(b"".join(EVENTS)) and "error" not in line


def test_stream_timed_out_after_the_first_byte_is_cut() -> None:
    def stalls() -> list[bytes]:
        return [HEAD + chunk(EVENTS[0])]  # and then nothing

    async def client(url: str) -> None:
        async with aiohttp.ClientSession() as session:
            start = time.monotonic()
            async with session.post(url, json={"model": "chat", "stream": True}) as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
            assert 0.4 <= time.monotonic() - start < 5

    lines = through_router(stalls, client, timeout=0.5)
    line = next(line for line in lines.access() if line["path"] == "/v1/chat/completions")
    assert line["error"] == f"upstream stream timed out after {len(EVENTS[0])} bytes"
    assert json.dumps(line)  # a plain JSON line


async def one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Read one request on an upstream test connection: True for a POST (its body read), False
    for a health check (answered, connection closed)."""
    head = await reader.readuntil(b"\r\n\r\n")
    if head.startswith(b"GET"):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        writer.close()
        return False
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return True


def test_stream_to_a_slow_client_stops_reading_the_upstream() -> None:
    """A client that does not read makes the router stop reading the upstream (the stream is
    relayed from the upstream's read callback, not buffered without bound), and the whole stream
    still arrives, in order, once the client reads again."""
    piece = bytes(range(256)) * 256  # 64 KiB
    pieces = 768  # 48 MiB: more than the kernel's socket buffers on both sides can hold
    written = [0]

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not await one_request(reader, writer):
                return
            writer.write(HEAD)
            for _ in range(pieces):
                writer.write(chunk(piece))
                await writer.drain()
                written[0] += len(piece)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        upstream_port = int(server.sockets[0].getsockname()[1])
        table = route_table({"a": {"url": f"http://127.0.0.1:{upstream_port}"}}, {"chat": ["a"]},
                            health={"interval": 30.0})
        router = Router(table, log=JsonLog(LogLines()))  # type: ignore[arg-type]
        port = await router.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            body = b'{"model": "chat", "stream": true}'
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            async with asyncio.timeout(30):
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                await asyncio.sleep(1.0)  # the client reads nothing: the upstream must stall
                assert written[0] < pieces * len(piece) // 2
                received = 0
                while True:  # chunked framing as the router writes it
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    data = await reader.readexactly(size + 2)
                    if size == 0:
                        break
                    start = received % len(piece)
                    assert data[:-2] == (piece * (size // len(piece) + 2))[start:start + size]
                    received += size
            assert received == pieces * len(piece) == written[0]
        finally:
            writer.close()
            await router.stop()
            server.close()

    asyncio.run(main())


def test_a_failed_write_to_the_client_is_not_the_upstreams_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    """A write to the client that raises while a stream is relayed (from the upstream connection's
    read callback) ends that client's request as a disconnect (499): the upstream connection is
    closed (generation stops), and the backend is not counted as failing."""
    events = [EVENTS[0], b'data: {"choices":[{"delta":{"content":"BOOM"}}]}\n\n', *EVENTS[1:]]
    lines = LogLines()
    upstream_closed = asyncio.Event()

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not await one_request(reader, writer):
                return
            writer.write(HEAD)
            try:
                for event in events:
                    writer.write(chunk(event))
                    await writer.drain()
                    await asyncio.sleep(0.05)
                await reader.read()  # the router closes the connection: the stream ends here
            except ConnectionError:
                pass
            upstream_closed.set()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        upstream_port = int(server.sockets[0].getsockname()[1])
        table = route_table({"a": {"url": f"http://127.0.0.1:{upstream_port}"}}, {"chat": ["a"]},
                            health={"interval": 30.0, "failures": 1})
        router = Router(table, log=JsonLog(lines))  # type: ignore[arg-type]
        port = await router.start("127.0.0.1", 0)
        write = asyncio.selector_events._SelectorSocketTransport.write  # type: ignore[attr-defined]

        def failing_write(self: Any, data: bytes) -> None:
            if self.get_extra_info("sockname")[1] == port and b"BOOM" in bytes(data):
                raise RuntimeError("the client's transport cannot take this write")
            write(self, data)

        monkeypatch.setattr(asyncio.selector_events._SelectorSocketTransport, "write", failing_write)
        try:
            async with asyncio.timeout(20), aiohttp.ClientSession() as session:
                async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                        json={"model": "chat", "stream": True}) as resp:
                    assert resp.status == 200
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await resp.read()
                await upstream_closed.wait()
                state = router.states["a"]
                assert (state.up, state.failures, state.in_flight) == (True, 0, 0)
        finally:
            await router.stop()
            server.close()

    asyncio.run(main())
    access = [line for line in lines.access() if line["path"] == "/v1/chat/completions"]
    assert (access[0]["status"], access[0]["error"]) == (499, "client disconnected")
    assert access[0]["bytes"] == len(EVENTS[0])
