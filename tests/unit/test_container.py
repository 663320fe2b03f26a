"""`container:` services: the exact docker / podman command line each engine's spec becomes
(containerise), and the launch and stop scripts that run it. tests/e2e/test_engine_container.py
runs the same rendering on a real dockerd."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterctl.engines import LaunchSpec, launch_specs
from clusterctl.engines.container import VLLM_SHM_SIZE
from clusterctl.errors import InventoryErrors
from clusterctl.inventory import Inventory, load_inventory
from clusterctl.render import render_template

NODES = """\
cluster: {name: c}
nodes:
  cpu: {address: 10.0.0.1, ram: 64GiB}
  amd: {address: 10.0.0.2, accelerators: [{kind: rocm, memory: 96GiB}]}
  nv: {address: 10.0.0.3, accelerators: [{kind: cuda, count: 2, memory: 24GiB}]}
models:
  m: {source: 'hf://org/repo/m.gguf'}
  s: {source: 'hf://org/safe', format: safetensors}
services:
"""
LLAMA_ARGS = ["--model", "/opt/models/m/m.gguf", "--alias", "chat", "--host", "127.0.0.1", "--port", "8080",
              "--ctx-size", "4096", "--parallel", "1", "--n-gpu-layers", "999", "--batch-size", "2048",
              "--ubatch-size", "512", "--cache-type-k", "f16", "--cache-type-v", "f16", "--flash-attn", "auto",
              "--fit", "off", "--threads", "2", "--metrics"]


def _inventory(tmp_path: Path, services: str) -> Inventory:
    path = tmp_path / "c.yaml"
    path.write_text(NODES + "".join(f"  {line}\n" for line in services.splitlines()))
    return load_inventory(path)


def _spec(tmp_path: Path, services: str, name: str) -> LaunchSpec:
    return next(s for s in launch_specs(_inventory(tmp_path, services)) if s.service == name)


def test_llama_server_on_a_cpu_node(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "chat: {engine: llama-server, node: cpu, model: m, port: 8080, context: 4096, "
                 "threads: 2, container: {image: 'reg.example/llama:1'}}", "chat")
    assert list(spec.command) == [
        "/usr/bin/docker", "run", "--rm", "--name", "clusterctl-chat", "--network", "host",
        "--volume", "/opt/models:/opt/models:ro", "--entrypoint", "llama-server", "reg.example/llama:1",
        *LLAMA_ARGS]
    assert spec.container_name == "clusterctl-chat"
    assert list(spec.argv) == LLAMA_ARGS  # the engine's arguments: they follow the image


def test_the_environment_and_secrets_pass_by_name(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "chat: {engine: llama-server, node: cpu, model: m, port: 8080, context: 4096, "
                 "threads: 2, env: {FOO: bar}, api_key: {env: KEY}, container: {image: 'img:1'}}", "chat")
    assert list(spec.container) == [
        "/usr/bin/docker", "run", "--rm", "--name", "clusterctl-chat", "--network", "host",
        "--volume", "/opt/models:/opt/models:ro",
        "--volume", "/etc/clusterctl/secrets/chat.key:/etc/clusterctl/secrets/chat.key:ro",
        "--env", "FOO", "--entrypoint", "llama-server", "img:1"]
    assert spec.argv[-2:] == ("--api-key-file", "/etc/clusterctl/secrets/chat.key")
    # the value is exported by the launch script, never on the command line
    assert "bar" not in spec.command and "FOO=bar" not in spec.command


def test_rocm_devices_and_podman_and_an_executable_off_path(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "r: {engine: llama-server, node: amd, model: m, port: 8081, context: 2048, container: "
                 "{image: 'ghcr.io/ggml-org/llama.cpp:server-rocm', runtime: podman, executable: /app/llama-server}}",
                 "r")
    assert list(spec.container) == [
        "/usr/bin/podman", "run", "--rm", "--name", "clusterctl-r", "--network", "host",
        "--group-add", "video", "--security-opt", "seccomp=unconfined",
        "--device", "/dev/kfd", "--device", "/dev/dri",
        "--volume", "/opt/models:/opt/models:ro", "--entrypoint", "/app/llama-server",
        "ghcr.io/ggml-org/llama.cpp:server-rocm"]
    assert spec.argv[:2] == ("--model", "/opt/models/m/m.gguf")


def test_vllm_gets_shared_memory_and_the_gpus(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "v: {engine: vllm, node: nv, model: s, port: 8000, "
                 "container: {image: 'vllm/vllm-openai:v0.8.5'}}", "v")
    assert VLLM_SHM_SIZE == 8 * 2**30
    assert list(spec.container) == [
        "/usr/bin/docker", "run", "--rm", "--name", "clusterctl-v", "--network", "host", "--gpus", "all",
        "--shm-size", "8192m", "--volume", "/opt/models:/opt/models:ro", "--env", "HF_HUB_OFFLINE",
        "--entrypoint", "vllm", "vllm/vllm-openai:v0.8.5"]
    assert spec.argv[0] == "serve"
    assert spec.env == (("HF_HUB_OFFLINE", "1"),)


def test_shm_size_from_the_inventory(tmp_path: Path) -> None:
    services = ("v: {engine: vllm, node: nv, model: s, port: 8000, container: {image: 'i:1', shm_size: 16GiB}}\n"
                "chat: {engine: llama-server, node: cpu, model: m, port: 8080, context: 4096, "
                "container: {image: 'i:1', shm_size: 512MiB}}")
    specs = {s.service: s for s in launch_specs(_inventory(tmp_path, services))}
    assert specs["v"].container[9:11] == ("--shm-size", "16384m")
    assert specs["chat"].container[7:9] == ("--shm-size", "512m")
    plain = _spec(tmp_path, "chat: {engine: llama-server, node: cpu, model: m, port: 8080, context: 4096, "
                  "container: {image: 'i:1'}}", "chat")
    assert "--shm-size" not in plain.container  # only vLLM needs more than the runtime's default


@pytest.mark.parametrize(("container", "message"), [
    ("{image: 'i:1', shm_size: 4KiB}", "greater than or equal to 1048576"),
    ("{image: 'i:1', executable: 'llama-server --x'}", "is not an executable's name or path"),
    ("{image: 'no spaces'}", "is not a container image reference"),
])
def test_bad_container_fields_are_refused(tmp_path: Path, container: str, message: str) -> None:
    with pytest.raises(InventoryErrors, match=message):
        _inventory(tmp_path, f"chat: {{engine: llama-server, node: cpu, model: m, container: {container}}}")


def test_the_launch_script_clears_a_stale_container_and_the_stop_script_waits_for_removal(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "chat: {engine: llama-server, node: cpu, model: m, port: 8080, context: 4096, "
                 "threads: 2, env: {FOO: bar}, container: {image: 'img:1'}}", "chat")
    launch = render_template("scripts/launch.sh.j2", spec=spec).splitlines()
    assert launch[3:7] == [
        "export FOO=bar",
        "/usr/bin/docker rm --force clusterctl-chat >/dev/null 2>&1 || true",
        "exec /usr/bin/docker \\",
        "    run \\",
    ]
    assert launch[-2:] == ["    --threads 2 \\", "    --metrics"]
    stop = render_template("scripts/container-stop.sh.j2", spec=spec).splitlines()
    assert stop == [
        "#!/usr/bin/env bash",
        "# stops the container of chat: written by clusterctl, do not edit.",
        "set -euo pipefail",
        "runtime=/usr/bin/docker",
        "name=clusterctl-chat",
        "# gone already: it exited, and `run --rm` removed it",
        '"$runtime" container inspect "$name" >/dev/null 2>&1 || exit 0',
        '"$runtime" stop --time 30 "$name" >/dev/null || true',
        "# `run --rm` removes it once it has stopped; wait for that, so that a new start can take the name",
        "for _ in $(seq 1 100); do",
        '  "$runtime" container inspect "$name" >/dev/null 2>&1 || exit 0',
        "  sleep 0.1",
        "done",
        'exec "$runtime" rm --force "$name" >/dev/null',
    ]
