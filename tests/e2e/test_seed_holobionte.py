"""Seed 001's shape on real engines: two vLLM instances on one node ("per GPU", ports 8000 and
8001), a llama.cpp service beside them, and the router with fallback chains. The first vLLM is
killed while requests stream through the router; every request is still answered."""

from __future__ import annotations

import json
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import assets
from tests.e2e.test_deploy import _package_for_nodes, deploy, resolve
from tests.e2e.testbed import Testbed, open_testbed

pytestmark = pytest.mark.real
REQUESTS = 40


def _inventory(tb: Testbed, tmp: Path) -> Path:
    tiny = assets.tiny_model_dir()
    engines = f"{assets.vllm_engine()}\nllama_cpp: '{assets.llama_bin_dir()}'"
    files = ", ".join(assets.TINY_FILES)
    text = tb.cluster_yaml("holobionte", engines) + textwrap.dedent(f"""\
        nodes:
          node1: {{address: {tb.node("node1").ip}, ram: 16GiB}}
        models:
          tiny: {{source: 'file://{tiny}/config.json', format: safetensors, files: [{files}]}}
          gemma: {{source: 'file://{assets.test_model_path()}'}}
        services:
          vllm-a: {{engine: vllm, node: node1, model: tiny, port: 8000, max_model_len: 2048, startup_timeout: 300s}}
          vllm-b: {{engine: vllm, node: node1, model: tiny, port: 8001, max_model_len: 2048, startup_timeout: 300s}}
          gemma: {{engine: llama-server, node: node1, model: gemma, port: 8080, context: 2048, threads: 1,
                   startup_timeout: 120s}}
        router:
          node: node1
          port: 9000
          default: [gemma]
          routes: {{complex: [vllm-a, vllm-b, gemma]}}
          health: {{interval: 1s, timeout: 2s, failures: 1}}
          command: [/usr/bin/env, 'PYTHONPATH={_package_for_nodes()}', '{sys.executable}', -m, clusterctl.cli]
        """)
    path = tmp / "holobionte.yaml"
    path.write_text(text)
    return resolve(path)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    tb = open_testbed(1)
    try:
        path = _inventory(tb, tmp_path_factory.mktemp("seed001"))
        code, data = deploy(path)
        node = data["nodes"]["node1"]  # type: ignore[index]
        assert code == 0, (node["failed"], node["log_tail"])
        yield tb
    finally:
        tb.close()


def _ask(tb: Testbed) -> tuple[str, str]:
    """One completion through the router on route `complex`: (status line, serving backend)."""
    body = json.dumps({"model": "complex", "temperature": 0, "max_tokens": 24,
                       "messages": [{"role": "user", "content": "Write one sentence about the sea."}]})
    r = tb.node("node1").run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %header{x-clusterctl-backend}",
                              "--max-time", "120", "-H", "Content-Type: application/json", "--data-binary", body,
                              "http://127.0.0.1:9000/v1/chat/completions"], timeout=150)
    code, _, backend = r.stdout.strip().partition(" ")
    return code, backend


def test_the_first_vllm_killed_under_load_every_request_is_answered(cluster: Testbed) -> None:
    tb = cluster
    assert _ask(tb) == ("200", "vllm-a")
    answers: list[tuple[str, str]] = []

    def load() -> None:
        for _ in range(REQUESTS):
            answers.append(_ask(tb))

    worker = threading.Thread(target=load)
    worker.start()
    while len(answers) < 5:
        time.sleep(0.05)
    killed = tb.node("node1").run(["systemctl", "kill", "--signal", "KILL", "--", "clusterctl-vllm-a.service"])
    assert killed.returncode == 0, killed.stderr
    worker.join(timeout=600)
    assert not worker.is_alive()
    assert len(answers) == REQUESTS
    assert [code for code, _ in answers] == ["200"] * REQUESTS, answers
    after = [backend for _, backend in answers[5:]]
    assert "vllm-b" in after, answers  # the chain's second vLLM took over
    assert set(after) <= {"vllm-a", "vllm-b", "gemma"}
