"""One answer per engine: the adapter's launch spec, the router's backend and deploy's health
probe agree for every engine, and the planner's estimator is the adapter's memory model."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from clusterctl.deploy.checks import health_probe
from clusterctl.engines import ADAPTERS, adapter, health_path, launch_specs
from clusterctl.inventory import Service, load_inventory
from clusterctl.render import route_table

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "inventories").glob("*.yaml"))


def test_every_engine_of_the_inventory_has_an_adapter() -> None:
    from typing import get_args

    from clusterctl.inventory import Engine

    assert sorted(ADAPTERS) == sorted(get_args(Engine))
    with pytest.raises(KeyError, match="no adapter for engine 'tgi'; known: custom, exo, llama-server"):
        adapter("tgi")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_router_launch_and_deploy_agree_on_each_backends_health(path: Path) -> None:
    inv = load_inventory(path)
    table = route_table(inv)
    specs = {s.service: s for s in launch_specs(inv)}
    for name, spec in specs.items():
        assert spec.health_path == health_path(inv.services[name])
        probe = health_probe(spec)
        if spec.health_path is None:
            assert probe.script == "tcp-probe" and probe.argv[-1] == str(spec.port)
        else:
            assert probe.argv[-1].endswith(f":{spec.port}{spec.health_path}")
        if table is not None and name in table.backends:
            assert table.backends[name].health_path == spec.health_path, name


@pytest.mark.parametrize(("engine", "expected"), [
    ("llama-server", "/health"), ("vllm", "/health"), ("ollama", "/api/version"), ("mlx-lm", "/v1/models"),
    ("exo", "/v1/models"), ("rpc-server", None), ("custom", None),
])
def test_each_engine_has_one_health_path(engine: str, expected: str | None, tmp_path: Path) -> None:
    """mlx-lm's router backend used /health while deploy waited on /v1/models: one answer now."""
    fields = {"rpc-server": "", "custom": "    command: [/usr/bin/server]\n"}.get(engine, "    model: m\n")
    os = "macos" if engine in ("mlx-lm", "exo") else "linux"
    extra = "    api_key: {env: K}\n    bind: 10.0.0.1\n" if engine == "custom" else ""
    router = "router: {node: n1, port: 9999, default: [s]}\n" if engine != "rpc-server" else ""
    inventory = tmp_path / "one.yaml"
    inventory.write_text(
        "cluster: {name: one}\n"
        f"nodes:\n  n1: {{address: 10.0.0.1, os: {os}, {'unified_memory' if os == 'macos' else 'ram'}: 64GiB}}\n"
        "models:\n  m: {source: 'hf://org/repo', format: " + ("mlx" if os == "macos" else "gguf") + "}\n"
        f"services:\n  s:\n    engine: {engine}\n    node: n1\n{fields}{extra}" + router)
    inv = load_inventory(inventory)
    (spec,) = launch_specs(inv)
    assert spec.health_path == expected
    table = route_table(inv)
    if table is not None:
        assert table.backends["s"].health_path == expected


def test_a_custom_service_may_declare_its_health_path_and_no_other_engine_may() -> None:
    svc = Service.model_validate({"engine": "custom", "node": "n1", "command": ["/bin/x"], "health_path": "/ready"})
    assert health_path(svc) == "/ready"
    with pytest.raises(ValidationError, match="health_path is for engine custom; vllm's health check is built in"):
        Service.model_validate({"engine": "vllm", "node": "n1", "model": "m", "health_path": "/x"})
    with pytest.raises(ValidationError, match="health_path"):
        Service.model_validate({"engine": "custom", "node": "n1", "command": ["/bin/x"], "health_path": "ready"})


def test_installers_and_memory_models_come_from_the_adapters() -> None:
    assert {n: a.installer for n, a in ADAPTERS.items()} == {
        "llama-server": "llama.cpp", "rpc-server": "llama.cpp", "vllm": "venv", "ollama": "none", "mlx-lm": "venv",
        "exo": "venv", "custom": "none"}
    assert {n: a.memory_model for n, a in ADAPTERS.items()} == {
        "llama-server": "llama.cpp", "rpc-server": "none", "vllm": "vllm", "ollama": "llama.cpp", "mlx-lm": "mlx",
        "exo": "mlx", "custom": "declared"}
    assert {n: a.executable for n, a in ADAPTERS.items() if a.installer == "venv"} == {
        "vllm": "vllm", "mlx-lm": "mlx_lm.server", "exo": "exo"}
