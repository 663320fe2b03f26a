"""One HTTP request made from a node with curl (services bind loopback or a private address,
so the controller cannot reach them itself). A key travels on curl's stdin as a header file,
never in argv."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from clusterctl.transport import Transport


@dataclass(frozen=True)
class Http:
    status: int
    body: bytes
    headers: dict[str, str]
    seconds: float


def http(t: Transport, url: str, *, method: str = "GET", body: dict[str, Any] | None = None,
         key: str | None = None, timeout: float = 60.0) -> Http:
    """One request from the node with curl. The key travels on stdin (curl -H @-)."""
    argv = ["curl", "-sS", "-i", "--max-time", str(int(timeout)), "-X", method, "-H", "@-"]
    headers = ""
    if key:
        headers += f"Authorization: Bearer {key}\n"
    if body is not None:
        headers += "Content-Type: application/json\n"
        argv += ["--data-binary", json.dumps(body)]
    start = time.monotonic()
    r = t.run([*argv, url], input=headers.encode(), timeout=timeout + 15)
    seconds = time.monotonic() - start
    if not r.ok:
        return Http(0, r.stderr, {}, seconds)
    raw = r.stdout
    head, _, rest = raw.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/") and b" 100 " in head.split(b"\r\n", 1)[0]:
        head, _, rest = rest.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    m = re.match(r"HTTP/\S+ (\d+)", lines[0] if lines else "")
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return Http(int(m.group(1)) if m else 0, rest, hdrs, seconds)
