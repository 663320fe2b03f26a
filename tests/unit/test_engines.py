"""Engines on the nodes: build flags and keys per node kind, the inventory's pins, and the
diff's build / install / restart steps. Pure."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.deploy.changes import diff
from clusterctl.deploy.model import Desired, NodeFacts, Step, WeightFile
from clusterctl.engines.install import COMMON_FLAGS, LlamaBuild, backend_label, build_key, cmake_flags, venv_install
from clusterctl.inventory import Engines, LlamaCppBuild, Node, PythonEngine

SRC = LlamaCppBuild(source="file:///srv/llama.cpp-b6000.tar.gz", cmake_flags=["-DCMAKE_CUDA_ARCHITECTURES=89"])


def node(**kw: object) -> Node:
    return Node.model_validate({"address": "10.0.0.1", **kw})


def test_flags_follow_the_node_kind() -> None:
    cuda = node(accelerators=[{"kind": "cuda", "memory": "24GiB", "count": 2}])
    strix = node(unified_memory="128GiB", accelerators=[{"kind": "rocm", "memory": "96GiB"}])
    mac = node(os="macos", unified_memory="64GiB")
    cpu = node(ram="32GiB")
    assert cmake_flags(cuda, SRC) == (*COMMON_FLAGS, "-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=89")
    assert cmake_flags(strix, SRC) == (*COMMON_FLAGS, "-DGGML_HIP=ON", "-DCMAKE_CUDA_ARCHITECTURES=89")
    assert cmake_flags(mac, SRC)[len(COMMON_FLAGS)] == "-DGGML_METAL=ON"
    assert cmake_flags(cpu, LlamaCppBuild(source=SRC.source)) == COMMON_FLAGS
    assert "-DGGML_RPC=ON" in COMMON_FLAGS and "-DGGML_NATIVE=ON" in COMMON_FLAGS
    assert [backend_label(n) for n in (cuda, strix, mac, cpu)] == ["CUDA, RPC", "HIP, RPC", "Metal, RPC", "CPU, RPC"]


def test_build_key_changes_with_source_subdir_and_flags_only() -> None:
    a = build_key("ab" * 32, None, COMMON_FLAGS)
    assert a == build_key("ab" * 32, None, COMMON_FLAGS) and len(a) == 16
    assert len({a, build_key("cd" * 32, None, COMMON_FLAGS), build_key("ab" * 32, "vendor/llama.cpp", COMMON_FLAGS),
                build_key("ab" * 32, None, (*COMMON_FLAGS, "-DGGML_CUDA=ON"))}) == 4


@pytest.mark.parametrize(("value", "message"), [
    ({"llama_cpp_build": {"source": "https://example.org/llama.cpp-b6000.tar.gz"}}, "needs its sha256"),
    ({"llama_cpp_build": {"source": "http://example.org/a.tar.gz", "sha256": "ab" * 32}}, "give an https:// URL"),
    ({"llama_cpp_build": {"source": "file:///srv/llama.zip"}}, "is not a tar archive"),
    ({"llama_cpp_build": {"source": "file:///a.tgz", "subdir": "../x"}}, "without '..'"),
    ({"llama_cpp_build": {"source": "file:///a.tgz", "cmake_flags": ["GGML_CUDA=ON"]}}, "is not a cmake option"),
    ({"llama_cpp": "/b", "llama_cpp_build": {"source": "file:///a.tgz"}}, "not both"),
    ({"vllm": {"requirement": "vllm"}}, "not a pinned requirement"),
    ({"vllm": {"requirement": "vllm>=0.10"}}, "not a pinned requirement"),
    ({"exo": {"requirement": "exo==1.0", "index_url": "--extra-index-url=x"}}, "must be one word"),
])
def test_unpinned_or_malformed_engines_are_refused(value: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Engines.model_validate(value)


def test_pinned_requirements_are_accepted() -> None:
    e = Engines.model_validate({"vllm": {"requirement": "vllm==0.11.0"},
                                "exo": {"requirement": "exo @ git+https://github.com/exo-explore/exo@v1.0"},
                                "mlx_lm": {"requirement": "mlx-lm[server]==0.28.1", "python": "python3.12"}})
    assert e.python_engine("vllm") == PythonEngine(requirement="vllm==0.11.0")
    assert e.python_engine("mlx-lm") is not None and e.python_engine("ollama") is None


BUILD = LlamaBuild(key="k1", source=SRC.source, archive="/opt/clusterctl/engines/llama.cpp/sources/a.tar.gz",
                   sha256="ab" * 32, subdir=None, flags=COMMON_FLAGS, targets=("llama-server", "rpc-server"),
                   jobs=None, workdir="/opt/clusterctl/engines/llama.cpp/build-k1",
                   bindir="/opt/clusterctl/engines/llama.cpp/bin", label="CPU, RPC")
ARCHIVE = WeightFile(BUILD.archive, 1000, "ab" * 32, local="/srv/a.tar.gz", what="source")
VENV = venv_install(node(), "vllm", PythonEngine(requirement="vllm==0.11.0"))


def built_desired() -> Desired:
    server, worker = BUILD.binary("llama-server"), BUILD.binary("rpc-server")
    return Desired(node="n1", base="/opt/clusterctl", manager="systemd", builds=[(BUILD, ARCHIVE)], venvs=[VENV],
                   services=["rpc", "chat", "big"],
                   units={"rpc": "clusterctl-rpc.service", "chat": "clusterctl-chat.service",
                          "big": "clusterctl-big.service"},
                   users={server: ["chat"], worker: ["rpc"], VENV.binary: ["big"]})


def built_facts(key: str = "k1", venv: str | None = None) -> NodeFacts:
    f = NodeFacts(node="n1")
    for t in BUILD.targets:
        f.manifest[BUILD.binary(t)] = {"sha256": "ef" * 32, "size": 10, "build": key}
        f.executables.add(BUILD.binary(t))
    had = "vllm==0.11.0" if venv is None else "vllm==0.10.2"
    f.manifest[VENV.link] = {"venv": venv or VENV.key, "requirement": had}
    f.executables.add(VENV.binary)
    f.units = {u: "active" for u in ("clusterctl-rpc.service", "clusterctl-chat.service", "clusterctl-big.service")}
    return f


def kinds(steps: list[Step]) -> list[tuple[str, str, str]]:
    return [(s.kind, s.target, s.reason) for s in steps]


def test_built_and_installed_node_has_no_steps() -> None:
    assert diff(built_desired(), built_facts()) == []


def test_fresh_node_gets_source_then_build_then_venv_without_restarts() -> None:
    steps = diff(built_desired(), NodeFacts(node="n1"))
    assert kinds(steps)[:3] == [
        ("push-source", ARCHIVE.path, "missing"),
        ("build-engine", BUILD.bindir, "llama-server, rpc-server from llama.cpp-b6000.tar.gz (CPU, RPC): "
                                       "not built here yet"),
        ("install-engine", VENV.link, "vllm==0.11.0: not installed"),
    ]
    assert steps[3:] == []  # a first install restarts nothing (the services start with their files)


def test_other_flags_rebuild_and_restart_exactly_the_services_on_that_binary() -> None:
    facts = built_facts(key="k0")
    facts.manifest[BUILD.binary("llama-server")]["build"] = "k1"  # only the worker is stale
    facts.sizes[ARCHIVE.path] = 1000
    facts.manifest[ARCHIVE.path] = {"sha256": ARCHIVE.sha256, "size": 1000}  # the source is there, verified
    steps = diff(built_desired(), facts)
    assert kinds(steps) == [
        ("build-engine", BUILD.bindir, "rpc-server from llama.cpp-b6000.tar.gz (CPU, RPC): "
                                       "built from another source or other flags"),
        ("restart", "rpc", f"{BUILD.binary('rpc-server')} rebuilt"),
    ]


def test_a_new_requirement_installs_a_new_venv_and_restarts_its_service() -> None:
    steps = diff(built_desired(), built_facts(venv="0123456789abcdef"))
    assert kinds(steps) == [("install-engine", VENV.link, "vllm==0.11.0: has vllm==0.10.2"),
                            ("restart", "big", "vllm now vllm==0.11.0")]


def test_a_deleted_binary_is_rebuilt_even_when_the_manifest_says_built() -> None:
    facts = built_facts()
    facts.executables.discard(BUILD.binary("llama-server"))
    steps = diff(built_desired(), facts)
    assert [s.kind for s in steps] == ["push-source", "build-engine", "restart"]
    assert steps[1].reason.endswith("binary missing")


def test_venv_paths_are_per_requirement_behind_a_stable_link() -> None:
    other = venv_install(node(), "vllm", PythonEngine(requirement="vllm==0.10.2"))
    assert VENV.link == other.link == "/opt/clusterctl/engines/vllm"
    assert VENV.binary == "/opt/clusterctl/engines/vllm/bin/vllm"
    assert VENV.venv != other.venv and VENV.venv.startswith("/opt/clusterctl/engines/vllm-")
    mlx = venv_install(node(os="macos", unified_memory="64GiB"), "mlx-lm", PythonEngine(requirement="mlx-lm==0.28.1"))
    assert mlx.binary == "/usr/local/clusterctl/engines/mlx-lm/bin/mlx_lm.server"


def test_plan_lists_the_builds_and_installs_each_node_needs(tmp_path: Path) -> None:
    from tests import assets

    model = assets.write_llama_like(tmp_path / "m.gguf")
    inv = tmp_path / "b.yaml"
    inv.write_text(textwrap.dedent(f"""\
        cluster:
          name: b
          engines:
            llama_cpp_build: {{source: 'https://example.org/llama.cpp-b6000.tar.gz', sha256: '{"ab" * 32}'}}
            vllm: {{requirement: 'vllm==0.11.0'}}
        nodes:
          gpu: {{address: 10.0.0.2, accelerators: [{{kind: cuda, memory: 24GiB}}]}}
          cpu: {{address: 10.0.0.3, ram: 16GiB}}
        models:
          m: {{source: 'file://{model}'}}
        services:
          head: {{engine: llama-server, node: gpu, model: m, port: 8080, context: 1024, rpc_workers: [w]}}
          w: {{engine: rpc-server, node: cpu, port: 50052, bind: 10.0.0.3}}
          own: {{engine: llama-server, node: cpu, model: m, port: 8081, context: 1024, binary: /usr/bin/llama-server}}
          big: {{engine: vllm, node: gpu, model: m, port: 8000, context: 1024}}
        """))
    assert CliRunner().invoke(app, ["resolve", str(inv)]).exit_code == 0
    result = CliRunner().invoke(app, ["plan", str(inv), "--json"])
    steps = [(s["node"], s["action"], s["detail"]) for s in json.loads(result.stdout)["steps"]
             if s["phase"] == "acquire" and s["action"] != "download"]
    assert steps == [
        ("cpu", "build", "llama.cpp rpc-server from llama.cpp-b6000.tar.gz (CPU, RPC)"),  # not for `own`
        ("gpu", "build", "llama.cpp llama-server from llama.cpp-b6000.tar.gz (CUDA, RPC)"),
        ("gpu", "install", "vllm==0.11.0 (venv)"),
    ]
