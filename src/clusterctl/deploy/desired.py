"""What each node should hold (Desired), from the inventory, the lock file and the rendered
files. It reads controller-side files only (hashes of local weights and engines, secret values)
and never a node."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path

from clusterctl.deploy import router_wheel
from clusterctl.deploy.managers import manager
from clusterctl.deploy.model import ROUTER, Desired, EngineFile, SecretValue, WeightFile
from clusterctl.engines import adapter, launch_specs
from clusterctl.engines.base import PlannedContexts
from clusterctl.engines.install import (
    BACKEND_TOOLS,
    backends,
    llama_build,
    llama_targets,
    pip_engines,
    router_venv,
    venv_install,
)
from clusterctl.errors import ClusterctlError, ExitCode
from clusterctl.inventory import Inventory, Node, SecretRef
from clusterctl.layout import base_dir, llama_bin, model_dir
from clusterctl.lockfile import LockFile
from clusterctl.models.remote import parse_source, source_url
from clusterctl.render import Rendered
from clusterctl.secretref import read_secret

ROUTER_PYTHON = (3, 11)  # the oldest Python the router runs on


class DeployError(ClusterctlError):
    exit_code = ExitCode.DEPLOY_FAILED


def _secret_value(ref: str) -> bytes:
    kind, _, name = ref.partition(":")
    value = read_secret(SecretRef(env=name) if kind == "env" else SecretRef(file=name))
    if value is None:
        where = f"environment variable {name}" if kind == "env" else f"file {name}"
        raise DeployError(f"secret {ref} is not set", hint=f"set the {where} on the controller")
    return (value + "\n").encode()


def _secret_if_set(ref: str) -> bytes | None:
    try:
        return _secret_value(ref)
    except DeployError:
        return None


def _hash_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "clusterctl" / "file-hashes.json"


def file_sha256(path: str) -> str:
    """sha256 of a controller file, remembered by (path, size, mtime) across runs: a 100 GB
    model is hashed once, not on every deploy."""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = _hash_cache_path()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key in cache:
        return str(cache[key])
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(4 << 20), b""):
            h.update(chunk)
    cache[key] = h.hexdigest()
    with contextlib.suppress(OSError):
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache, sort_keys=True))
        os.replace(tmp, cache_path)
    return str(cache[key])


def build_desired(inv: Inventory, lock: LockFile, rendered: Rendered, plan: PlannedContexts | None = None,
                  *, read_secrets: bool = True) -> dict[str, Desired]:
    """What each node should hold: rendered files, secrets, weights, engines, services.
    `read_secrets=False` (a dry run): the secrets' values are not needed; one that is set is
    compared, one that is not is shown as not compared."""
    specs = launch_specs(inv, plan)
    out: dict[str, Desired] = {}
    for name, node in inv.nodes.items():
        assert node.manager is not None
        out[name] = Desired(node=name, base=base_dir(node), manager=node.manager)
    for f in rendered.files:
        out[f.node].files.append(f)
    values: dict[str, bytes | None] = {}
    for node_name, secret in rendered.secrets:
        if secret.ref not in values:
            values[secret.ref] = _secret_value(secret.ref) if read_secrets else _secret_if_set(secret.ref)
        out[node_name].secrets.append(SecretValue(secret.path, secret.ref, values[secret.ref]))
    order = [s.service for s in specs]
    started = [(s.node, s.service) for s in specs] + ([(inv.router.node, ROUTER)] if inv.router else [])
    for node_name, service in started:
        d, node = out[node_name], inv.nodes[node_name]
        if service not in d.services:
            d.services.append(service)
            d.units[service] = manager(node).handle(node, service)
            d.unit_files.add(manager(node).unit_file(node, service))
    for spec in specs:
        svc = inv.services[spec.service]
        node = inv.nodes[spec.node]
        d = out[spec.node]
        if svc.model is not None:
            _add_weights(inv, lock, d, node, svc.model)
        if adapter(svc.engine).installer == "llama.cpp" and svc.binary is None and inv.cluster.engines.llama_cpp:
            _add_llama_engine(inv, d, node)
    _add_builds(inv, out)
    for node_name, engines in pip_engines(inv).items():
        for engine, python_engine in engines:
            install = venv_install(inv.nodes[node_name], engine, python_engine)
            out[node_name].venvs.append(install)
            out[node_name].commands.setdefault("install-engine", []).append(install.python)
    if inv.router is not None and not inv.router.command:
        _add_router_install(inv, out[inv.router.node], inv.nodes[inv.router.node])
    for spec in specs:
        provider = adapter(spec.engine).provider
        program = spec.container[0] if spec.container else spec.argv[0]
        if program.startswith("/"):
            out[spec.node].binaries[program] = f"{spec.container[0].rsplit('/', 1)[-1]} for {spec.service}" \
                if spec.container else f"{provider} for {spec.service}"
            out[spec.node].users.setdefault(program, []).append(spec.service)
    for d in out.values():
        d.services.sort(key=lambda s: order.index(s) if s in order else len(order))
    return out


def _add_router_install(inv: Inventory, d: Desired, node: Node) -> None:
    """The controller's router as a wheel pushed to the router node and pip-installed into
    /opt/clusterctl/venv (a new wheel restarts the router)."""
    wheel = router_wheel.build(router_wheel.cache_folder())
    path = f"{base_dir(node)}/router/wheels/{wheel.filename}"
    d.engines.append(EngineFile(path, str(wheel.path), wheel.sha256, wheel.size))
    install = router_venv(node, inv.cluster.engines.router, path, wheel.sha256)
    d.venvs.append(install)
    d.commands.setdefault("install-engine", []).append(install.python)
    d.pythons[install.python] = ROUTER_PYTHON
    d.binaries[install.binary] = "the clusterctl router"  # probed: an install whose binary is gone is redone
    for program in install.provides:
        d.users.setdefault(program, []).append(ROUTER)


def _add_weights(inv: Inventory, lock: LockFile, d: Desired, node: Node, model_name: str) -> None:
    model = inv.models[model_name]
    entry = lock.models.get(model_name)
    meta = entry.meta if entry and entry.source == model.source else None
    src = parse_source(model.source)
    if entry is not None and meta is not None and entry.revision and src.scheme == "hf":
        src = dataclasses.replace(src, revision=entry.revision)  # the revision the plan was made from
    names = model.files or (meta.files if meta and meta.files else [src.filename])
    total = (meta.file_bytes if meta else 0) or model.size or 0
    folder = model_dir(inv, node, model_name)
    existing = {w.path for w in d.weights}
    for fname in names:
        path = f"{folder}/{fname.rsplit('/', 1)[-1]}"
        if path in existing:
            continue
        if src.scheme == "file":
            base = src.path if len(names) == 1 else f"{src.path.rsplit('/', 1)[0]}/{fname}"
            size = os.stat(base).st_size if os.path.exists(base) else 0
            sha = model.sha256 if len(names) == 1 and model.sha256 else (file_sha256(base) if size else None)
            d.weights.append(WeightFile(path, size, sha, local=base))
        else:
            sub = src.with_path(f"{src.path.rsplit('/', 1)[0]}/{fname}" if "/" in src.path else fname)
            pin = (entry.files or {}).get(fname) if entry is not None and meta is not None else None
            # the model's size: the one file's size, never a part's (a part's comes from its pin)
            size = pin.size if pin is not None else (total if len(names) == 1 else 0)
            sha = model.sha256 if len(names) == 1 and model.sha256 else (pin.sha256 if pin else None)
            if pin is not None and pin.sha256 and sha != pin.sha256:
                raise DeployError(f"models.{model_name}: sha256 {sha} differs from the hub's {pin.sha256} "
                                  f"for {fname} at revision {entry.revision if entry else '-'}",
                                  hint="fix models.*.sha256 in the inventory, or run `clusterctl resolve --refresh`")
            d.weights.append(WeightFile(path, size, sha,
                                        url=source_url(sub, endpoint=inv.cluster.huggingface.endpoint),
                                        hub=src.scheme == "hf"))


def _add_builds(inv: Inventory, out: dict[str, Desired]) -> None:
    """llama.cpp built on each node whose llama-server / rpc-server services use the default binary."""
    build = inv.cluster.engines.llama_cpp_build
    wanted = llama_targets(inv)
    if build is None or not wanted:
        return
    local = url = None
    size = 0
    sha = build.sha256
    if build.source.startswith("file://"):
        local = build.source.removeprefix("file://")
        if not os.path.isfile(local):
            raise DeployError(f"cluster.engines.llama_cpp_build.source: {local} does not exist on the controller",
                              hint="download the archive there, or give an https:// URL the nodes can reach")
        size = os.stat(local).st_size
        actual = file_sha256(local)
        if sha is not None and actual != sha:
            raise DeployError(f"cluster.engines.llama_cpp_build.source: {local} has sha256 {actual[:16]}..., "
                              f"the inventory pins {sha[:16]}...", hint="fetch the pinned archive again")
        sha = actual
    else:
        url = build.source
    assert sha is not None  # https sources are pinned by the inventory's validation
    for node_name, targets in wanted.items():
        b = llama_build(inv, node_name, targets, sha)
        assert b is not None
        d = out[node_name]
        d.builds.append((b, WeightFile(b.archive, size, sha, local=local, url=url, what="source")))
        node = inv.nodes[node_name]
        d.commands["build-engine"] = ["cmake", "c++|g++|clang++", "tar", "make|ninja"] + [
            f"{tool}|{'/usr/local/cuda/bin/nvcc' if tool == 'nvcc' else '/opt/rocm/bin/' + tool}"
            for k, tool in BACKEND_TOOLS.items() if k in backends(node)]
        if url is not None:
            d.commands["pull-source"] = ["curl"]


def _add_llama_engine(inv: Inventory, d: Desired, node: Node) -> None:
    folder = inv.cluster.engines.llama_cpp
    assert folder is not None
    folder = os.path.expanduser(folder)
    for target, candidates in (("llama-server", ["llama-server"]), ("rpc-server", ["rpc-server", "ggml-rpc-server"])):
        local = next((f"{folder}/{c}" for c in candidates if os.path.exists(f"{folder}/{c}")), None)
        if local is None:
            raise DeployError(f"cluster.engines.llama_cpp: no {' or '.join(candidates)} in {folder}",
                              hint="point it at a folder with the llama.cpp binaries built for the nodes")
        path = llama_bin(node, target)
        if all(e.path != path for e in d.engines):
            d.engines.append(EngineFile(path, local, file_sha256(local), os.stat(local).st_size))
