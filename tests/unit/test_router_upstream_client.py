"""The router's upstream HTTP/1.1 client (clusterctl.router.upstream) against canned answers
from a raw TCP server on 127.0.0.1: framing, interim answers, keep-alive reuse, failures."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from clusterctl.router.upstream import BodyBroken, ConnectFailed, Disconnected, Pool
from tests.router_upstream import free_port

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def run(script: Script, client: Callable[[Pool], Awaitable[None]]) -> list[bytes]:
    """Serve `script` for every connection, run `client` against it; returns the requests seen."""
    seen: list[bytes] = []

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            async def recording_read() -> bytes:
                request = await read_request(reader)
                seen.append(request)
                return request
            reader.read_request = recording_read  # type: ignore[attr-defined]
            try:
                await script(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = Pool(f"http://127.0.0.1:{port}/base", connect_timeout=2.0)
        try:
            async with asyncio.timeout(10):
                await client(pool)
        finally:
            pool.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    return seen


def head(pool: Pool) -> bytes:
    return pool.request_head("POST", "/v1/chat/completions", {"Content-Type": "a/b"})


def test_content_length_split_over_writes_and_keep_alive_reuse() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(2):
            await reader.read_request()  # type: ignore[attr-defined]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Le")
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(b"ngth: 10\r\n\r\n{\"n\": " + str(i).encode() + b"}")
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(b"  ")
            await writer.drain()

    async def client(pool: Pool) -> None:
        for i in range(2):
            conn, resp = await pool.send(head(pool), b'{"x": 1}')
            await resp.head()
            assert (resp.status, resp.headers["content-type"]) == (200, "application/json")
            assert await resp.read_all() == b'{"n": ' + str(i).encode() + b"}  "
            assert conn.reused is (i == 1)
            pool.release(conn)

    seen = run(script, client)
    assert len(seen) == 2
    assert seen[0].startswith(b"POST /base/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nContent-Type: a/b\r\nContent-Length: 8\r\n\r\n{\"x\": 1}" in seen[0]


def test_chunked_with_extensions_trailers_and_interim_answer() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read_request()  # type: ignore[attr-defined]
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"5;ext=1\r\nhello\r\n", b"6\r\n wor", b"ld\r\n", b"0\r\nX-Trailer: 1\r\n\r\n"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        await reader.read()

    async def client(pool: Pool) -> None:
        conn, resp = await pool.send(head(pool), b"")
        await resp.head()
        assert resp.status == 200
        chunks = []
        while data := await resp.read_chunk():
            chunks.append(data)
        assert b"".join(chunks) == b"hello world"
        assert len(chunks) >= 3  # handed over as they came
        assert conn.complete and conn.keep_alive

    run(script, client)


def test_body_until_close_and_connection_close_are_not_reused() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read_request()  # type: ignore[attr-defined]
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nall of it")
        await writer.drain()

    async def client(pool: Pool) -> None:
        conn, resp = await pool.send(head(pool), b"")
        await resp.head()
        assert await resp.read_all() == b"all of it"
        assert not conn.keep_alive
        pool.release(conn)
        conn2, resp2 = await pool.send(head(pool), b"")
        assert conn2 is not conn and not conn2.reused
        await resp2.head()
        await resp2.read_all()

    assert len(run(script, client)) == 2


def test_failures_are_typed() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read_request()  # type: ignore[attr-defined]
        if b"head" in request:
            return  # close before answering
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()

    async def client(pool: Pool) -> None:
        _, resp = await pool.send(head(pool), b"head")
        with pytest.raises(Disconnected):
            await resp.head()
        _, resp = await pool.send(head(pool), b"body")
        await resp.head()
        assert await resp.read_chunk() == b"partial"
        with pytest.raises(BodyBroken):
            await resp.read_chunk()
        dead = Pool(f"http://127.0.0.1:{free_port()}", connect_timeout=2.0)
        with pytest.raises(ConnectFailed):
            await dead.send(head(dead), b"")

    run(script, client)


def test_send_idle_uses_only_a_kept_alive_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.read_request()  # type: ignore[attr-defined]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async def client(pool: Pool) -> None:
        assert pool.send_idle(head(pool), b"") is None  # nothing pooled yet
        conn, resp = await pool.send(head(pool), b"first")
        await resp.head()
        assert await resp.read_all() == b"ok"
        pool.release(conn)
        sent = pool.send_idle(head(pool), b"second")
        assert sent is not None
        conn2, resp2 = sent
        assert conn2 is conn and conn2.reused
        await resp2.head()
        assert await resp2.read_all() == b"ok"
        pool.release(conn2)

    seen = run(script, client)
    assert [s.rsplit(b"\r\n\r\n", 1)[1] for s in seen] == [b"first", b"second"]
