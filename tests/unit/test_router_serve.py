"""`clusterctl router serve` as a process: it serves, re-reads the key files on SIGHUP, logs JSON
lines to stderr without secrets, and stops on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.router_upstream import ROOT, Upstream, free_port

CHAT = "/v1/chat/completions"


@pytest.fixture()
def upstream() -> Iterator[Upstream]:
    with Upstream("a") as up:
        yield up


def test_serve_reloads_keys_on_sighup(tmp_path: Path, upstream: Upstream) -> None:
    clients = tmp_path / "clients"
    clients.write_text("sk-old\n")
    clients.chmod(0o600)
    upkey = tmp_path / "upstream"
    upkey.write_text("sk-up-1\n")
    upkey.chmod(0o600)
    port = free_port()
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({
        "cluster": "t", "listen_port": 1, "api_keys_file": str(clients),
        "backends": {"a": {"url": upstream.url, "model": "m", "api_key_file": str(upkey)}},
        "routes": {"chat": ["a"]}, "health": {"interval": 30}}))
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "clusterctl.cli", "router", "serve", "--routes", str(routes),
                                 "--host", "127.0.0.1", "--port", str(port)],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, stderr.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "router did not start"
            time.sleep(0.05)

        def status(key: str) -> int:
            return httpx.post(f"{url}{CHAT}", json={"model": "chat", "messages": []},
                              headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code

        assert (status("sk-old"), status("sk-new")) == (200, 401)
        clients.write_text("sk-new\n")
        upkey.write_text("sk-up-2\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while status("sk-new") != 200:
            assert time.monotonic() < deadline, "keys not reloaded"
            time.sleep(0.05)
        assert status("sk-old") == 401
        assert [r["authorization"] for r in upstream.requests()] == ["Bearer sk-up-1", "Bearer sk-up-2"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    lines = [json.loads(line) for line in stderr.read_text().splitlines()]
    events = [line["event"] for line in lines if "event" in line]
    # the backend's first passing check (or answer) made it ready, once
    assert [e for e in events if e != "backend_ready"] == ["listening", "keys_reloaded", "stopping"]
    assert [line["backend"] for line in lines if line.get("event") == "backend_ready"] == ["a"]
    statuses = [line["status"] for line in lines if line.get("path") == CHAT]
    # before the reload: old key in, new key out; (new key out until the signal lands); then the reverse
    assert statuses[:2] == [200, 401] and statuses[-2:] == [200, 401] and set(statuses[2:-2]) <= {401}
    assert "sk-" not in stderr.read_text()


def test_serve_refuses_an_inconsistent_table(tmp_path: Path) -> None:
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"cluster": "t", "backends": {"a": {"url": "http://127.0.0.1:9", "model": "m"}},
                                  "routes": {"chat": ["b"]}}))
    proc = subprocess.run([sys.executable, "-m", "clusterctl.cli", "router", "serve", "--routes", str(routes)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 3
    assert "routes.chat: 'b' is not a backend (backends: a)" in proc.stderr


def test_router_cli_stays_import_light() -> None:
    code = ("import sys; import clusterctl.router.cli; "
            "heavy = [m for m in ('aiohttp', 'orjson', 'prometheus_client', 'clusterctl.router.server') "
            "if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "[]"
