"""Reliability: the node pull path from a Hugging Face-like hub (docs/reliability.md, "Weights").

The model is `hf://org/repo/tiny.gguf` and `cluster.huggingface.endpoint` points at a server
on the testbed bridge (`tb.host_ip`): a real nginx laid out like the hub
(`{repo}/resolve/{revision}/{file}`), or a scripted server for retries and stalls. The node
pulls with curl, the token travelling in a header on stdin. The token is a canary that must
never show up in any output, any command line or environment on the node, or its journal.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterctl.errors import ExitCode
from clusterctl.inventory import load_inventory
from tests import assets
from tests.e2e.testbed import Node, Testbed
from tests.faults import (
    NO_VERIFY,
    ArgvSampler,
    BridgeNginx,
    Reply,
    Run,
    ScriptedServer,
    bridge_nginx,
    cli,
    deploy,
    finish,
    inventory,
    node_result,
    on_node,
    remove_services,
    sha256,
    start_deploy,
    steps,
    wait_for,
    web,
)
from tests.nginx_server import hub_layout

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("systemd_nodes")]


TOKEN = f"hf_canary_{secrets.token_hex(8)}"
ENV = {"REL_HF_TOKEN": TOKEN}
TARGET = "/opt/models/rel-hub/tiny.gguf"
LOCATIONS = """\
location /org/private/ { return 401; }
location /org/gated/ { return 403; }
location /org/repo/resolve/main/ { add_header X-Repo-Commit rev1 always; }
"""


@pytest.fixture
def node3(testbed3: Testbed) -> Iterator[Node]:
    node = testbed3.node("node3")
    yield node
    remove_services(node, ["rel-hub"], ["rel-hub"])


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return assets.write_llama_like(tmp_path / "tiny.gguf")


@pytest.fixture
def hub(testbed3: Testbed, tmp_path: Path, tiny: Path) -> Iterator[BridgeNginx]:
    root = tmp_path / "hub"
    hub_layout(root, "org/repo", "main", {"tiny.gguf": tiny})
    hub_layout(root, "org/repo", "rev1", {"tiny.gguf": tiny})
    # the hub's paths-info API: each file's size and LFS sha256 at the revision (what resolve pins)
    size = tiny.stat().st_size
    info = json.dumps([{"type": "file", "path": "tiny.gguf", "size": size, "oid": "0" * 40,
                        "lfs": {"oid": sha256(tiny), "size": size, "pointerSize": 134}}])
    api = (f"location = /api/models/org/repo/paths-info/rev1 {{\n  default_type application/json;\n"
           f"  return 200 '{info}';\n}}\n")
    with bridge_nginx(root, tmp_path / "nginx", testbed3.host_ip, locations=LOCATIONS + api) as server:
        yield server


def hub_inventory(tb: Testbed, tmp: Path, endpoint: str, source: str = "hf://org/repo/tiny.gguf",
                  name: str = "hub.yaml") -> Path:
    cluster = f"huggingface: {{endpoint: '{endpoint}', token: {{env: REL_HF_TOKEN}}}}\n"
    return inventory(tb, tmp, web("rel-hub", "node3", 8151, model="rel-hub"),
                     models=f"rel-hub: {{source: '{source}'}}\n", cluster=cluster, nodes=["node3"], name=name)


def failure(run: Run) -> str:
    value = node_result(run.json(), "node3")["failed"]
    assert isinstance(value, str), run.output
    return value


def gets(server: BridgeNginx, path: str) -> list[tuple[int, str, int]]:
    """(status, range, bytes sent) of each full-file GET of `path` (not resolve's header reads)."""
    return [(e.status, e.range, e.body_bytes_sent) for e in server.access_log()
            if e.uri == path and e.method == "GET" and not e.range.startswith("bytes=0-")]


# -- 401 / 403 / 404 --------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "source", "hint"), [
    (401, "hf://org/private/tiny.gguf", "the hub wants a token: set cluster.huggingface.token"),
    (403, "hf://org/gated/tiny.gguf", "the token has no access to this repository (gated? accept its licence)"),
    (404, "hf://org/repo/nothere.gguf", "the repository, revision or file does not exist")],
    ids=["401", "403", "404"])
def test_hub_error_is_clear_and_never_shows_the_token(testbed3: Testbed, tmp_path: Path, node3: Node,
                                                      hub: BridgeNginx, status: int, source: str, hint: str) -> None:
    path = hub_inventory(testbed3, tmp_path, hub.url, source)
    with ArgvSampler([node3], needles=[TOKEN]) as sampler:
        run = deploy(path, env=ENV)
        text = cli("deploy", "--inventory", str(path), *NO_VERIFY, env=ENV)
    assert run.code == text.code == ExitCode.DEPLOY_FAILED, run.output
    file = source.rsplit("/", 1)[-1]
    message = f"node3: download of {file} failed: curl: (22) The requested URL returned error: {status} ({hint})"
    assert failure(run) == message
    assert message in text.stdout
    requests = [e for e in hub.access_log() if e.uri.endswith(f"/resolve/main/{file}")]
    assert [e.status for e in requests] == [status, status]  # one request per deploy: 4xx is not retried
    assert all(e.authorization == f"Bearer {TOKEN}" for e in requests)  # the token did reach the hub
    for output in (run.output, text.output):
        assert TOKEN not in output
    # the refused download's curl lives for milliseconds: the 10 ms sampler may or may not catch
    # it (test_reliability_secrets samples whole deploys, where it always does)
    assert sampler.samples > 10
    assert sampler.matching(TOKEN) == [] and sampler.environ_hits == set()
    assert TOKEN not in node3.run(["journalctl", "--no-pager", "-o", "cat"]).stdout
    assert node3.run(["find", "/opt/models/rel-hub", "-type", "f"]).stdout == ""


# -- retries, stalls, truncation --------------------------------------------------------------


def test_transient_503_is_retried_then_succeeds(testbed3: Testbed, tmp_path: Path, node3: Node, tiny: Path) -> None:
    busy = Reply(503, {"Retry-After": "1"}, b"busy\n")
    with ScriptedServer(testbed3.host_ip, [busy, busy, Reply(200, file=tiny)]) as server:
        run = deploy(hub_inventory(testbed3, tmp_path, server.url), env=ENV)
    assert run.code == 0, run.output
    assert len(server.requests) == 3
    assert all(headers.get("authorization") == f"Bearer {TOKEN}" for _, headers in server.requests)
    assert sha256(on_node(node3, TARGET)) == sha256(tiny)
    assert TOKEN not in run.output


def test_persistent_429_gives_up_after_bounded_retries(testbed3: Testbed, tmp_path: Path, node3: Node) -> None:
    with ScriptedServer(testbed3.host_ip, [Reply(429, {"Retry-After": "1"}, b"slow down\n")]) as server:
        run = deploy(hub_inventory(testbed3, tmp_path, server.url), env=ENV, timeout=120)
    assert run.code == ExitCode.DEPLOY_FAILED, run.output
    assert failure(run) == "node3: download of tiny.gguf failed: curl: (22) The requested URL returned error: 429"
    assert len(server.requests) == 6  # curl --retry 5
    assert run.seconds < 40
    assert node3.run(["find", "/opt/models/rel-hub", "-type", "f"]).stdout == ""


def test_stalled_transfer_is_watched_and_a_cut_one_resumes(testbed3: Testbed, tmp_path: Path, node3: Node,
                                                           tiny: Path, hub: BridgeNginx) -> None:
    """A server that stops sending: curl runs with a low-speed watchdog (fixed at 60 s, see
    docs/reliability.md); when the server hangs up mid-body the deploy fails at once, and the
    next deploy asks only for the rest (Range) and completes."""
    sent = 100_000
    with ScriptedServer(testbed3.host_ip, [Reply(200, file=tiny, stall_after=sent)]) as server:
        path = hub_inventory(testbed3, tmp_path, server.url)
        with ArgvSampler([node3]) as sampler:
            proc = start_deploy(path, env=ENV)
            try:
                [curl] = wait_for("curl on the node", lambda: [line for line in sampler.matching("--speed-limit")
                                                               if line.startswith("curl ")], 30)
                part = on_node(node3, TARGET + ".part")
                wait_for("the first bytes", lambda: part.exists() and part.stat().st_size > 0, 30)
            finally:
                server.release.set()  # the server hangs up mid-body
            run = finish(proc, 30)
    assert "--speed-limit 1024 --speed-time 60" in curl and "--retry 5" in curl and "--continue-at -" in curl
    assert run.code == ExitCode.DEPLOY_FAILED, run.output
    assert failure(run) == (f"node3: download of tiny.gguf failed: curl: (18) transfer closed with "
                            f"{tiny.stat().st_size - sent} bytes remaining to read")
    assert on_node(node3, TARGET + ".part").stat().st_size == sent  # kept for the next run

    path = hub_inventory(testbed3, tmp_path, hub.url)
    assert cli("resolve", str(path), env=ENV).code == 0  # the size is known: the step says it resumes
    run = deploy(path, env=ENV)
    assert run.code == 0, run.output
    pull = steps(run.json(), "node3")[0]
    assert (pull["kind"], pull["reason"]) == ("pull-weight", "resume at 0.00 GB")
    # resolve pinned rev1 (the hub's X-Repo-Commit): deploy asks for that revision, and only for the rest
    assert gets(hub, "/org/repo/resolve/rev1/tiny.gguf") == [(206, f"bytes={sent}-", tiny.stat().st_size - sent)]
    assert sha256(on_node(node3, TARGET)) == sha256(tiny)


def test_hub_file_shorter_than_the_pinned_size_is_refused(testbed3: Testbed, tmp_path: Path, node3: Node,
                                                          tiny: Path, hub: BridgeNginx) -> None:
    path = hub_inventory(testbed3, tmp_path, hub.url)
    assert cli("resolve", str(path), env=ENV).code == 0  # pins the size (and revision)
    short = tmp_path / "short.gguf"
    short.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    hub_layout(hub.root, "org/repo", "main", {"tiny.gguf": short})  # served complete, but cut at the source
    hub_layout(hub.root, "org/repo", "rev1", {"tiny.gguf": short})
    run = deploy(path, env=ENV)
    assert run.code == ExitCode.DEPLOY_FAILED, run.output
    assert failure(run) == (f"node3: {TARGET} has {short.stat().st_size} bytes, {tiny.stat().st_size} were "
                            "expected; the partial file was removed (run deploy again; if it persists, run "
                            "clusterctl resolve)")
    assert node3.run(["find", "/opt/models/rel-hub", "-type", "f"]).stdout == ""  # nothing placed, no .part


# -- what exactly is fetched ------------------------------------------------------------------


def test_deploy_fetches_the_revision_pinned_by_resolve(testbed3: Testbed, tmp_path: Path, node3: Node,
                                                       tiny: Path, hub: BridgeNginx) -> None:
    path = hub_inventory(testbed3, tmp_path, hub.url)
    assert cli("resolve", str(path), env=ENV).code == 0
    assert '"revision": "rev1"' in path.with_suffix(".lock").read_text()
    moved = assets.write_llama_like(tmp_path / "moved.gguf", n_layer=2)  # main now points at other bytes
    hub_layout(hub.root, "org/repo", "main", {"tiny.gguf": moved})
    run = deploy(path, env=ENV)
    assert run.code == 0, run.output
    assert len(gets(hub, "/org/repo/resolve/rev1/tiny.gguf")) == 1  # the pinned revision, not the branch
    assert gets(hub, "/org/repo/resolve/main/tiny.gguf") == []
    assert sha256(on_node(node3, TARGET)) == sha256(tiny)


def test_hub_model_without_lock_entry_is_not_downloaded_twice(testbed3: Testbed, tmp_path: Path, node3: Node,
                                                              hub: BridgeNginx) -> None:
    path = hub_inventory(testbed3, tmp_path, hub.url)
    first = deploy(path, env=ENV)
    assert first.code == 0, first.output
    second = deploy(path, env=ENV)
    assert second.code == 0, second.output
    assert len(gets(hub, "/org/repo/resolve/main/tiny.gguf")) == 1
    assert second.json()["changes"] == 0


def test_node_side_pull_reports_its_progress(testbed3: Testbed, tmp_path: Path, node3: Node, tiny: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The node's curl writes the file; deploy reports its size while it grows (the progress
    bars): a server that sends 100,000 bytes and then waits shows the bytes curl has written
    (it writes in blocks: up to that figure), every second, for as long as the transfer runs."""
    from clusterctl.deploy.executor import NullReporter
    from clusterctl.deploy.rollout import deploy as rollout_deploy
    from clusterctl.lockfile import lock_path, read_lock
    from clusterctl.render import render
    from clusterctl.transport.connect import connect

    seen: list[tuple[str, str, int, int]] = []

    class Recorder(NullReporter):
        def progress(self, node: str, label: str, done: int, total: int) -> None:
            seen.append((node, label, done, total))

    monkeypatch.setenv("REL_HF_TOKEN", TOKEN)
    sent = 100_000
    with ScriptedServer(testbed3.host_ip, [Reply(200, file=tiny, stall_after=sent)]) as server:
        inv = load_inventory(hub_inventory(testbed3, tmp_path, server.url))
        result: list[object] = []

        def run() -> None:
            try:
                result.append(rollout_deploy(
                    inv, read_lock(lock_path(inv.path)), render(inv, None),
                    lambda name: connect(name, inv.nodes[name], inv.cluster.ssh),
                    nodes=["node3"], phases=("acquire",), reporter=Recorder()))
            except Exception as exc:  # shown by the assertion below
                result.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        try:
            wait_for("two reports of the first bytes", lambda: len([e for e in seen if e[2] > 0]) >= 2 or result, 30)
        finally:
            server.release.set()
            worker.join(60)
    assert not worker.is_alive() and result
    assert len([e for e in seen if e[2] > 0]) >= 2, (seen, result)
    # the size is unknown (nothing resolved): total 0, and never more than the server sent
    assert all(node == "node3" and label == TARGET and 0 <= done <= sent and total == 0
               for node, label, done, total in seen), seen
