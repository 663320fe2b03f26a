"""Wrapping any engine's spec in a container run (docker / podman): the engine's argv runs
inside the image, with the node's devices, the models folder and the secret files mounted."""

from __future__ import annotations

import dataclasses

from clusterctl.engines.base import LaunchSpec
from clusterctl.inventory import Inventory, Node, Service
from clusterctl.layout import unit_name


def containerise(spec: LaunchSpec, svc: Service, inv: Inventory, node: Node) -> LaunchSpec:
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
    mdir = inv.models_dir(node)
    prefix += ["--volume", f"{mdir}:{mdir}:ro"]
    for secret in spec.secrets:
        prefix += ["--volume", f"{secret.path}:{secret.path}:ro"]
        if secret.env:
            prefix += ["--env", secret.env]
    for key, _ in spec.env:
        prefix += ["--env", key]
    prefix.append(c.image)
    # inside the image the engine is on PATH: use the executable's base name
    argv = (spec.argv[0].rsplit("/", 1)[-1], *spec.argv[1:])
    return dataclasses.replace(spec, argv=argv, container=tuple(prefix), container_name=cname)
