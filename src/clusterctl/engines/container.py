"""Wrapping any engine's spec in a container run (docker / podman): the engine's argv runs
inside the image, with the node's devices, the models folder and the secret files mounted."""

from __future__ import annotations

import dataclasses

from clusterctl.engines.base import LaunchSpec
from clusterctl.inventory import Inventory, Node, Service
from clusterctl.layout import unit_name

#: /dev/shm of a vLLM container unless `container.shm_size` says otherwise: vLLM's processes
#: share tensors through it, and the runtime's default (64 MiB) is far too small for that.
VLLM_SHM_SIZE = 8 * 2**30


def executable(spec: LaunchSpec, svc: Service) -> str:
    """What the container runs: `container.executable`, else the base name of the engine's
    executable on the node (found on the image's PATH)."""
    assert svc.container is not None
    return svc.container.executable or spec.argv[0].rsplit("/", 1)[-1]


def shm_size(spec: LaunchSpec, svc: Service) -> int | None:
    """The container's /dev/shm in bytes, or None for the runtime's default."""
    assert svc.container is not None
    if svc.container.shm_size is not None:
        return svc.container.shm_size
    return VLLM_SHM_SIZE if spec.engine == "vllm" else None


def containerise(spec: LaunchSpec, svc: Service, inv: Inventory, node: Node) -> LaunchSpec:
    """`spec` run as `RUNTIME run ... --entrypoint EXECUTABLE IMAGE ARGS`. The container shares the
    node's network (`--network host`: the engine listens where the inventory says), is named
    after the unit (`clusterctl-SERVICE`, so the stop script finds it) and removed when it stops.
    `--entrypoint`: an image's own ENTRYPOINT would otherwise get the engine's argv as arguments.
    The spec's `argv` becomes the engine's arguments only (they follow the image)."""
    assert svc.container is not None
    c = svc.container
    runtime = f"/usr/bin/{c.runtime}"
    cname = unit_name(spec.service)
    prefix = [runtime, "run", "--rm", "--name", cname, "--network", "host"]
    devices = list(c.devices)
    if "rocm" in spec.gpu_kinds:
        devices += [d for d in ("/dev/kfd", "/dev/dri") if d not in devices]
        prefix += ["--group-add", "video", "--security-opt", "seccomp=unconfined"]
    if "vulkan" in spec.gpu_kinds and "/dev/dri" not in devices:
        devices.append("/dev/dri")
    if "cuda" in spec.gpu_kinds:
        prefix += ["--gpus", "all"]
    for d in devices:
        prefix += ["--device", d]
    shm = shm_size(spec, svc)
    if shm is not None:
        prefix += ["--shm-size", f"{shm // 2**20}m"]  # m: MiB for docker and podman
    mdir = inv.models_dir(node)
    prefix += ["--volume", f"{mdir}:{mdir}:ro"]
    for secret in spec.secrets:
        prefix += ["--volume", f"{secret.path}:{secret.path}:ro"]
        if secret.env:
            prefix += ["--env", secret.env]  # the launch script exports it; the runtime passes it on
    for key, _ in spec.env:
        prefix += ["--env", key]
    prefix += ["--entrypoint", executable(spec, svc), c.image]
    return dataclasses.replace(spec, argv=tuple(spec.argv[1:]), container=tuple(prefix), container_name=cname)
