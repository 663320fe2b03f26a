"""The llama.cpp limits the inventory enforces (clusterctl.inventory.LLAMA_CPP_*) are the pinned
build's own: the real llama-server starts with --parallel 256 and refuses 257, and refuses a
quantized V cache with flash attention off. If a new llama.cpp moves a limit, this fails."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from clusterctl.inventory import LLAMA_CPP_MAX_PARALLEL, LLAMA_CPP_QUANTIZED_CACHE
from tests import assets

pytestmark = pytest.mark.real


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(tmp_path: Path, *args: str, timeout: float = 90.0) -> tuple[bool, str]:
    """Start llama-server on the test model; (listening, its log). It is stopped either way."""
    port = _free_port()
    log = tmp_path / f"llama-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(assets.llama_bin_dir() / "llama-server"), "--model", str(assets.test_model_path()),
                                 "--host", "127.0.0.1", "--port", str(port), "--fit", "off", "--threads", "1", *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False, log.read_text(errors="replace")
            text = log.read_text(errors="replace")
            if "server is listening" in text or "listening on http" in text:
                return True, text
            time.sleep(0.2)
        pytest.fail(f"llama-server neither started nor exited in {timeout:.0f} s:\n{log.read_text()[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def test_parallel_limit_is_llama_cpp_s(tmp_path: Path) -> None:
    ok, log = serve(tmp_path, "--parallel", str(LLAMA_CPP_MAX_PARALLEL), "--ctx-size", "8192")
    assert ok, log[-2000:]
    ok, log = serve(tmp_path, "--parallel", str(LLAMA_CPP_MAX_PARALLEL + 1), "--ctx-size", "8192")
    assert not ok
    assert f"n_seq_max must be <= {LLAMA_CPP_MAX_PARALLEL}" in log, log[-2000:]


def test_a_quantized_v_cache_needs_flash_attention(tmp_path: Path) -> None:
    assert "q8_0" in LLAMA_CPP_QUANTIZED_CACHE
    ok, log = serve(tmp_path, "--cache-type-v", "q8_0", "--flash-attn", "off")
    assert not ok
    assert "quantized V cache requires flash_attn to be enabled" in log, log[-2000:]
    ok, log = serve(tmp_path, "--cache-type-v", "q8_0", "--flash-attn", "on")
    assert ok, log[-2000:]
