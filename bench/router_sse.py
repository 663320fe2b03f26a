"""A small, cheap SSE upstream for the router benchmark (plain asyncio protocol, no framework).

    python bench/router_sse.py --port 18201 --chunks 16 --interval 0.02

Every POST gets an OpenAI-style chat completion stream: a role chunk, `--chunks` content
chunks `--interval` seconds apart on a fixed schedule from the request's arrival (all at once
with 0), a final chunk with usage, then
`data: [DONE]`; chunked transfer encoding, keep-alive. A `bench-tNNN` token in the request
(NNN: digits) comes back as `tNNN`, the text of the last content chunk (the benchmark's client
sends its clock that way, to time each stream itself). GET /health answers 200. It binds
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal

_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n")
_TOKEN = re.compile(rb"bench-(t[0-9]{1,20})\b")
_HEALTH = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(payload: dict[str, object]) -> bytes:
    return _chunk(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


def _content(text: str) -> dict[str, object]:
    return {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def _echo(body: bytes) -> str | None:
    """`tNNN` when the request holds `bench-tNNN` (the benchmark's client puts its send time in
    its prompt that way; it comes back as the last content chunk, through any proxy)."""
    m = _TOKEN.search(body)
    return m.group(1).decode() if m else None


def _events(chunks: int) -> list[bytes]:
    event = _event
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}
    out = [event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "finish_reason": None}]})]
    out += [event(_content(f"tok{i} ")) for i in range(chunks)]
    out.append(event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 5, "completion_tokens": chunks, "total_tokens": 5 + chunks}}))
    out.append(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return out


class _Conn(asyncio.Protocol):
    def __init__(self, events: list[bytes], interval: float) -> None:
        self.events = events
        self.interval = interval
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None
        self.started = 0.0
        self.echo: bytes | None = None
        """This request's last content chunk, when it carries the request's token (see _echo)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._next_request()

    def _next_request(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            if head.startswith("GET"):
                self.transport.write(_HEALTH)
                continue
            self.busy = True
            echo = _echo(body)
            self.echo = None if echo is None else _event(_content(echo))
            if self.interval <= 0:
                self.transport.write(b"".join([_HEAD, *self.events[:-3], self._last_content(), *self.events[-2:]]))
                self.busy = False
                continue
            self.transport.write(_HEAD + self.events[0])
            self.started = asyncio.get_running_loop().time()
            self._schedule(1)

    def _schedule(self, index: int) -> None:
        # on a fixed schedule from the request's arrival: late wake-ups do not add up over a stream
        loop = asyncio.get_running_loop()
        self.timer = loop.call_at(self.started + index * self.interval, self._send, index)

    def _last_content(self) -> bytes:
        return self.events[-3] if self.echo is None else self.echo

    def _send(self, index: int) -> None:
        if self.transport is None:
            return
        if index < len(self.events) - 2:
            self.transport.write(self.events[index] if index != len(self.events) - 3 else self._last_content())
            self._schedule(index + 1)
            return
        self.transport.write(self.events[index] + self.events[index + 1])
        self.busy = False
        self._next_request()


async def main(port: int, chunks: int, interval: float) -> None:
    loop = asyncio.get_running_loop()
    events = _events(chunks)
    server = await loop.create_server(lambda: _Conn(events, interval), "127.0.0.1", port, backlog=4096,
                                      reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        run(main(args.port, args.chunks, args.interval))
