"""The router benchmark's own stream timing (bench/router_bench.py, bench/router_sse.py), end to
end with real wrk, the real paced upstream and the real router: every stream is timed from
the clock it carries through the router and back, and the first stream of each connection
is told apart. No speed is asserted here; the figures belong to the benchmark."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import router_bench as rb  # noqa: E402

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (tools/test.sh installs it)"),
]

CONNECTIONS = 4
CHUNKS = 3
PACE = 0.1  # a stream takes CHUNKS * PACE = 0.3 s: longer than the 0.2 s in which streams count as first


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, str]]:
    procs: list[rb.Proc] = []
    try:
        sse_port = rb.free_port()
        sse = rb.spawn("sse", [sys.executable, str(ROOT / "bench" / "router_sse.py"), "--port", str(sse_port),
                               "--chunks", str(CHUNKS), "--interval", str(PACE)], tmp_path)
        procs.append(sse)
        rb.wait_http(sse, f"http://127.0.0.1:{sse_port}/health", 15)
        port = rb.free_port()
        table = rb.router_table(tmp_path, {"paced": f"http://127.0.0.1:{sse_port}"}, {"chat": ["paced"]}, port)
        procs.append(rb.start_router(tmp_path, table, port))
        yield {"direct": f"http://127.0.0.1:{sse_port}/v1/chat/completions",
               "router": f"http://127.0.0.1:{port}/v1/chat/completions"}
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_streams_are_timed_through_the_router_and_first_ones_apart(stack: dict[str, str], tmp_path: Path) -> None:
    for name, model, key in (("direct", "m", None), ("router", "chat", rb.ROUTER_KEY)):
        r = rb.wrk(stack[name], model, True, key, CONNECTIONS, 2, tmp_path, timed=True)
        assert r["errors"] == 0, (name, r)
        # every connection's first stream, and no other, counts as first; every stream was timed
        assert r["first_n"] == CONNECTIONS, (name, r)
        assert r["untimed"] == 0 and r["timed_n"] >= CONNECTIONS, (name, r)
        assert r["first_n"] + r["timed_n"] == r["requests"], (name, r)
        # the client's own timing: at least the upstream's schedule, not wildly more
        for key_ in ("p50_us", "p99_us", "first_p50_us", "first_p99_us"):
            assert CHUNKS * PACE * 1e6 <= r[key_] < CHUNKS * PACE * 1e6 + 200_000, (name, key_, r)

