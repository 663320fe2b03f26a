"""Containers for real: seed 004's light model in Docker (bestbox's `light` service), deployed
by `clusterctl deploy` over SSH onto a testbed node that runs its own dockerd
(tests/e2e/docker_node.py). The image holds the real llama-server from the cached llama.cpp
build and the libraries it loads (imported from a root file system tarball: no registry); the
real Gemma 3 270M is pushed to the node's models folder and mounted read-only into the
container. Proven here: deploy and verify (health, identity, smoke), the container by its name,
a failed start of a new image rolled back to the previous container, the unit's stop removing
the container, and a start that clears a stale container of the same name."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.errors import ExitCode
from tests import assets
from tests.e2e.docker_node import DATA_MOUNT, DockerNode, binary_rootfs
from tests.e2e.test_deploy import chat, deploy
from tests.e2e.testbed import Testbed, open_testbed

pytestmark = pytest.mark.real
runner = CliRunner()
SERVICE = "light"
CONTAINER = f"clusterctl-{SERVICE}"
UNIT = f"{CONTAINER}.service"
# What verify's smoke prompt gets from this Gemma with its own chat template, greedily, 1 thread.
# (llama-server's default template makes it repeat the prompt: tests/e2e/test_verify.py.)
SMOKE = '.  <h2><strong><em>The 1000th episode of the series</em></st'


@dataclass
class Deployed:
    tb: Testbed
    docker: DockerNode
    path: Path
    image: str
    code: int
    data: dict[str, object]


def _inventory(tb: Testbed, tmp: Path, image: str) -> Path:
    text = textwrap.dedent(f"""\
        cluster:
          name: container
          ssh: {{user: root, key: '{tb.key_path}', known_hosts: '{tb.known_hosts}', connect_timeout: 5s}}
          defaults: {{models_dir: /opt/models, link_speed: 1Gbit}}
        nodes:
          node1: {{address: {tb.node("node1").ip}, ram: 4GiB}}
        models:
          gemma: {{source: 'file://{assets.test_model_path()}'}}
        services:
          {SERVICE}:
            engine: llama-server
            node: node1
            model: gemma
            port: 8081
            context: 1024
            parallel: 2
            threads: 1
            startup_timeout: 120s
            container: {{image: '{image}', runtime: docker}}
            extra_args: [--chat-template, gemma]
        """)
    path = tmp / "container.yaml"
    path.write_text(text)
    resolved = runner.invoke(app, ["resolve", str(path)])
    assert resolved.exit_code == 0, resolved.output
    return path


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    tmp = tmp_path_factory.mktemp("container")
    rootfs = binary_rootfs(assets.llama_bin_dir() / "llama-server", tmp / "images")
    image = f"clusterctl-test/llama-server:{rootfs.stem.rsplit('-', 1)[-1]}"
    tb = open_testbed(1)
    try:
        with DockerNode(tb.node("node1")) as docker:
            # an ENTRYPOINT of its own, as the llama.cpp project's images have: the rendered
            # --entrypoint must win over it (the engine's arguments are not the image's)
            docker.import_rootfs(rootfs, image, entrypoint=("/usr/local/bin/llama-server", "--version"))
            path = _inventory(tb, tmp, image)
            code, data = deploy(path, verify=True)
            yield Deployed(tb, docker, path, image, code, data)
    finally:
        tb.close()


def _running(d: Deployed) -> list[tuple[str, str, str]]:
    return [(c["Names"], c["Image"], c["State"]) for c in d.docker.containers(CONTAINER)]


def test_deploy_runs_the_engine_in_its_container_and_verify_passes(deployed: Deployed) -> None:
    d = deployed
    node = d.data["nodes"]["node1"]  # type: ignore[index]
    assert d.code == 0, (node["failed"], node["log_tail"], d.data.get("verify"))
    steps = [(s["phase"], s["kind"], s["target"]) for s in node["steps"]]
    assert ("acquire", "push-weight", f"/opt/models/gemma/{assets.GEMMA_FILE}") in steps
    assert not [s for s in steps if s[1] in ("push-engine", "build-engine")]  # the image brings the engine
    checks = {(c["subject"], c["name"]): (c["status"], c["detail"]) for c in d.data["verify"]["checks"]}  # type: ignore[index]
    assert checks[(SERVICE, "listening")] == ("ok", "bound to 127.0.0.1")
    assert checks[(SERVICE, "health")] == ("ok", "/health 200")
    assert checks[(SERVICE, "model")] == ("ok", f"serves '{SERVICE}'")
    assert checks[(SERVICE, "smoke")] == ("ok", f"answer: {SMOKE!r}")
    assert checks[(SERVICE, "speed")][0] == "ok"
    assert _running(d) == [(CONTAINER, d.image, "running")]
    n1 = d.tb.node("node1")
    assert n1.run(["systemctl", "is-active", UNIT]).stdout.strip() == "active"
    # the engine runs in the container: its root is the image's overlay in the node's dockerd,
    # and the node itself has no llama-server
    pid = d.docker.docker("inspect", "--format", "{{.State.Pid}}", CONTAINER).stdout.strip()
    mounts = n1.run(["cat", f"/proc/{pid}/mountinfo"]).stdout.splitlines()
    root = [line.split(" - ", 1)[1].split() for line in mounts if line.split()[4] == "/"]
    assert len(root) == 1 and root[0][0] == "overlay", mounts
    assert f"upperdir={DATA_MOUNT}/data/overlay2/" in root[0][2], root
    comm = n1.run(["cat", f"/proc/{pid}/comm"]).stdout.strip()
    assert comm == "llama-server"
    assert n1.run(["test", "-e", "/usr/local/bin/llama-server"]).returncode == 1
    assert n1.run(["test", "-e", "/opt/clusterctl/engines"]).returncode == 1
    code, again = deploy(d.path)
    assert (code, again["changes"]) == (0, 0), again


def test_a_new_image_that_cannot_start_is_rolled_back(deployed: Deployed) -> None:
    d = deployed
    assert d.code == 0
    missing = "clusterctl-test/llama-server:missing"
    d.path.write_text(d.path.read_text().replace(d.image, missing))
    try:
        code, data = deploy(d.path)
        assert code == ExitCode.DEPLOY_FAILED, data
        node = data["nodes"]["node1"]  # type: ignore[index]
        assert node["failed"].startswith(f"{SERVICE} exited during start-up"), node["failed"]
        assert node["failed"].endswith("the previous version is serving again"), node["failed"]
        assert node["rolled_back"] == [f"/opt/clusterctl/bin/{SERVICE}.sh"]
        assert f"Unable to find image '{missing}' locally" in node["log_tail"]
        assert _running(d) == [(CONTAINER, d.image, "running")]
        assert chat(d.tb, "node1", 8081, SERVICE)["choices"]
        script = d.tb.node("node1").run(["cat", f"/opt/clusterctl/bin/{SERVICE}.sh"]).stdout
        assert d.image in script and missing not in script
    finally:
        d.path.write_text(d.path.read_text().replace(missing, d.image))


def test_stopping_the_unit_removes_the_container_and_a_start_clears_a_stale_one(deployed: Deployed) -> None:
    d = deployed
    assert d.code == 0
    n1 = d.tb.node("node1")
    assert n1.run(["systemctl", "stop", UNIT], timeout=90).returncode == 0
    assert n1.run(["systemctl", "is-active", UNIT]).stdout.strip() == "inactive"
    assert d.docker.containers(CONTAINER) == []
    assert n1.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8081/health"]).returncode == 7  # refused

    # a stale container holds the name (a crash, a daemon restart): the start removes it first
    created = d.docker.docker("create", "--name", CONTAINER, d.image)
    assert created.returncode == 0, created.stderr
    assert _running(d) == [(CONTAINER, d.image, "created")]
    assert n1.run(["systemctl", "start", UNIT]).returncode == 0
    verified = runner.invoke(app, ["verify", "--inventory", str(d.path), "--json", "--wait", "60"])
    checks = {(c["subject"], c["name"]): c["status"] for c in json.loads(verified.stdout)["checks"]}
    got = (verified.exit_code, checks.get((SERVICE, "health")), checks.get((SERVICE, "smoke")))
    assert got == (0, "ok", "ok"), verified.stdout
    assert _running(d) == [(CONTAINER, d.image, "running")]
