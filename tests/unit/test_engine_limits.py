"""Nonsense the engines refuse is refused when the inventory loads (exit 3, file:line, a hint),
not rendered into a unit that fails on the node: llama.cpp's own limits (--parallel at most
LLAMA_MAX_SEQ = 256, no quantized V cache without flash attention, no negative layer count or
split share), and values no engine or node could mean (a negative time limit, a link of 0 bit/s,
a router bound to a word, a relative models folder, a node without memory)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.errors import ExitCode, InventoryError, InventoryErrors
from clusterctl.inventory import LLAMA_CPP_MAX_PARALLEL, load_inventory

BASE = """\
cluster:
  name: lim
  ssh: {user: root}
  defaults: {models_dir: /opt/models, link_speed: 1Gbit}
nodes:
  n1:
    address: 10.0.0.1
    ram: 16GiB
    accelerators: [{kind: cuda, count: 2, memory: 24GiB}]
models:
  m:
    source: hf://org/repo@abc123/model-Q4_K_M.gguf
services:
  chat:
    engine: llama-server
    node: n1
    model: m
    port: 8080
    parallel: 4
    cache_type_v: f16
    gpu_layers: all
    startup_timeout: 10m
router:
  node: n1
  bind: 127.0.0.1
  default: [chat]
"""

# (case, the line as in BASE, its replacement, the error: message, line)
CASES: list[tuple[str, str, str, str, int]] = [
    ("parallel-over-llama-max", "    parallel: 4", "    parallel: 300",
     "services.chat.parallel: parallel 300: llama.cpp serves at most 256 slots (it refuses to start above its "
     "LLAMA_MAX_SEQ); run a second instance behind the router for more", 19),
    ("parallel-257", "    parallel: 4", "    parallel: 257",
     "services.chat.parallel: parallel 257: llama.cpp serves at most 256 slots (it refuses to start above its "
     "LLAMA_MAX_SEQ); run a second instance behind the router for more", 19),
    ("quantized-v-without-fa", "    cache_type_v: f16", "    cache_type_v: q8_0\n    flash_attn: false",
     "services.chat.flash_attn: flash_attn: false with cache_type_v: q8_0: llama.cpp refuses a quantized V cache "
     "without flash attention; leave flash_attn unset (auto) or true, or use cache_type_v: f16", 21),
    ("negative-gpu-layers", "    gpu_layers: all", "    gpu_layers: -5",
     "services.chat.gpu_layers: gpu_layers -5: give a number of layers (0: none on the GPU) or 'all'", 21),
    ("tensor-split-nan", "    gpu_layers: all", "    gpu_layers: all\n    tensor_split: [.nan, 1]",
     "services.chat.tensor_split: tensor_split nan, 1: each share must be a finite number >= 0 (llama.cpp's "
     "proportions per device, e.g. [3, 1])", 22),
    ("tensor-split-inf", "    gpu_layers: all", "    gpu_layers: all\n    tensor_split: [1, .inf]",
     "services.chat.tensor_split: tensor_split 1, inf: each share must be a finite number >= 0 (llama.cpp's "
     "proportions per device, e.g. [3, 1])", 22),
    ("tensor-split-negative", "    gpu_layers: all", "    gpu_layers: all\n    tensor_split: [3, -1]",
     "services.chat.tensor_split: tensor_split 3, -1: each share must be a finite number >= 0 (llama.cpp's "
     "proportions per device, e.g. [3, 1])", 22),
    ("startup-timeout-negative", "    startup_timeout: 10m", "    startup_timeout: -5",
     "services.chat.startup_timeout: -5 s is not a time limit: give a positive duration such as '10s' or '5m'", 22),
    ("startup-timeout-zero", "    startup_timeout: 10m", "    startup_timeout: 0s",
     "services.chat.startup_timeout: 0 s is not a time limit: give a positive duration such as '10s' or '5m'", 22),
    ("min-speed-inf", "    startup_timeout: 10m", "    startup_timeout: 10m\n    min_tokens_per_second: .inf",
     "services.chat.min_tokens_per_second: Input should be a finite number", 23),
    ("router-bind-not-ip", "  bind: 127.0.0.1", "  bind: not an ip",
     "router.bind: bind 'not an ip' must be an IP address (e.g. 127.0.0.1, 10.0.0.5 or ::1)", 25),
    ("models-dir-relative", "models_dir: /opt/models,", "models_dir: models,",
     "cluster.defaults.models_dir: 'models' must be an absolute path without '..'", 4),
    ("models-dir-dotdot", "models_dir: /opt/models,", "models_dir: /opt/../etc,",
     "cluster.defaults.models_dir: '/opt/../etc' must be an absolute path without '..'", 4),
    ("ssh-user", "  ssh: {user: root}", "  ssh: {user: 'root; reboot'}",
     "cluster.ssh.user: 'root; reboot' is not a valid user name", 3),
    ("ssh-connect-timeout", "  ssh: {user: root}", "  ssh: {user: root, connect_timeout: -1}",
     "cluster.ssh.connect_timeout: -1 s is not a time limit: give a positive duration such as '10s' or '5m'", 3),
    ("link-speed-zero", "link_speed: 1Gbit}", "link_speed: 0Gbit}",
     "cluster.defaults.link_speed: link_speed '0Gbit' would make every download take forever: give a speed "
     "above 0", 4),
    ("node-without-memory", "    ram: 16GiB\n    accelerators: [{kind: cuda, count: 2, memory: 24GiB}]\n", "",
     "nodes.n1: the node has no memory to plan", 7),
    ("ram-zero", "    ram: 16GiB", "    ram: 0GiB", "nodes.n1.ram: Input should be greater than 0", 8),
    ("gpu-memory-limit-zero", "    ram: 16GiB", "    ram: 16GiB\n    gpu_memory_limit: 0B",
     "nodes.n1.gpu_memory_limit: Input should be greater than 0", 9),
    ("device-memory-zero", "memory: 24GiB}", "memory: 0GiB}",
     "nodes.n1.accelerators.0.memory: Input should be greater than 0", 9),
]


def errors_of(tmp_path: Path, text: str) -> list[InventoryError]:
    path = tmp_path / "lim.yaml"
    path.write_text(text)
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    exc = info.value
    assert exc.exit_code == ExitCode.INVALID_INVENTORY
    errs = exc.errors if isinstance(exc, InventoryErrors) else [exc]
    assert all(e.file == str(path) or str(e.file) == str(path) for e in errs)
    return errs


def test_the_base_inventory_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "lim.yaml"
    path.write_text(BASE)
    inv = load_inventory(path)
    assert (inv.services["chat"].parallel, inv.services["chat"].startup_timeout) == (4, 600.0)


@pytest.mark.parametrize(("case", "old", "new", "message", "line"), CASES, ids=[c[0] for c in CASES])
def test_nonsense_is_refused_with_its_line(tmp_path: Path, case: str, old: str, new: str, message: str,
                                           line: int) -> None:
    assert BASE.count(old) == 1, case
    errs = errors_of(tmp_path, BASE.replace(old, new))
    assert [(e.message, e.line) for e in errs] == [(message, line)]


def test_the_limits_are_llama_cpp_s_own() -> None:
    # llama.cpp's LLAMA_MAX_SEQ (src/llama-cparams.h); the real binary refuses -np 257 with
    # "n_seq_max must be <= 256" and starts with -np 256
    assert LLAMA_CPP_MAX_PARALLEL == 256


@pytest.mark.parametrize("lines", [
    "    parallel: 256\n    cache_type_v: f16",
    "    parallel: 4\n    cache_type_v: q8_0\n    flash_attn: true",
    "    parallel: 4\n    cache_type_v: q8_0",  # flash attention auto: llama.cpp turns it on
    "    parallel: 4\n    cache_type_k: q8_0\n    flash_attn: false",  # a quantized K cache needs no FA
    "    parallel: 4\n    gpu_layers: 0",
])
def test_what_llama_cpp_accepts_still_loads(tmp_path: Path, lines: str) -> None:
    old = "    parallel: 4\n    cache_type_v: f16\n"
    assert BASE.count(old) == 1
    path = tmp_path / "lim.yaml"
    path.write_text(BASE.replace(old, lines + "\n").replace("    gpu_layers: all\n", "", lines.count("gpu_layers")))
    assert "chat" in load_inventory(path).services


def test_parallel_above_llama_cpp_s_limit_is_only_llama_server_s_limit(tmp_path: Path) -> None:
    # vLLM ignores `parallel`; the field's own bound (512) still applies to it
    text = BASE.replace("    engine: llama-server", "    engine: vllm").replace("    parallel: 4", "    parallel: 300")
    path = tmp_path / "lim.yaml"
    path.write_text(text)
    assert load_inventory(path).services["chat"].parallel == 300


def test_a_node_without_services_still_needs_memory_declared(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, BASE.replace("models:", "  n2: {address: 10.0.0.2}\nmodels:", 1))
    assert [(e.message, e.hint, e.line) for e in errs] == [
        ("nodes.n2: the node has no memory to plan", "give its ram, unified_memory or accelerators", 10)]


runner = CliRunner()


@pytest.mark.parametrize(("args", "message"), [
    (["--ctx", "-1"], "Invalid value for '--ctx' / '-c': Input should be greater than or equal to 1"),
    (["--gpu-layers", "-5"],
     "Invalid value for '--gpu-layers' / '-ngl': Input should be greater than or equal to 0"),
    (["--parallel", "300"], "--parallel 300: llama.cpp serves at most 256 slots"),
    (["--tensor-split", "nan,1"], "--tensor-split nan,1: each share must be a finite number >= 0"),
    (["--tensor-split", "3,-1"], "--tensor-split 3,-1: each share must be a finite number >= 0"),
    (["-ctv", "q8_0", "--no-flash-attn"],
     "--cache-type-v q8_0 with --no-flash-attn: llama.cpp refuses a quantized V cache without flash attention"),
])
def test_estimate_refuses_what_llama_cpp_refuses(tmp_path: Path, args: list[str], message: str) -> None:
    # refused before the model is read: the path does not exist
    result = runner.invoke(app, ["estimate", str(tmp_path / "absent.gguf"), *args])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert message in " ".join(result.output.split()), result.output

