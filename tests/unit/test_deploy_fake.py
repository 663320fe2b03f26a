"""The deploy package against scripted fake nodes (tests/fakenode.py): the executor, rollback,
max-fail, the dry-run gate and each service manager, without booting systemd. The e2e tests
run the same paths on real nodes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from clusterctl.deploy import checks, gate, ops, shell
from clusterctl.deploy.lock import cluster_lock
from clusterctl.deploy.managers import MANAGERS
from clusterctl.deploy.rollout import DeployResult, deploy
from clusterctl.errors import LockedError
from clusterctl.inventory import Inventory, load_inventory
from clusterctl.lockfile import LockFile
from clusterctl.render import render
from clusterctl.status import snapshot
from clusterctl.verify import verify
from tests.fakenode import FakeNode

PY = "/usr/bin/python3"


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy remembers file hashes under the cache directory: the test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def write_inventory(tmp: Path, services: str, *, nodes: str | None = None, models: str = "", router: str = "",
                    cluster: str = "") -> Inventory:
    text = ("cluster:\n  name: fake\n  defaults: {models_dir: /opt/models}\n" + cluster +
            "nodes:\n" + (nodes or "  n1: {address: 10.0.0.1, ram: 8GiB}\n") +
            (f"models:\n{models}" if models else "") + f"services:\n{services}" + router)
    path = tmp / "fake.yaml"
    path.write_text(text)
    return load_inventory(path)


def run(inv: Inventory, fakes: dict[str, FakeNode], **kwargs: object) -> DeployResult:
    rendered = render(inv, None)
    return deploy(inv, LockFile(), rendered, lambda name: fakes[name], **kwargs)  # type: ignore[arg-type]


WEB = """\
  web:
    engine: custom
    node: n1
    port: 8081
    health_path: /health
    command: [/usr/bin/python3, -m, web]
"""


def node(name: str = "n1", **kwargs: object) -> FakeNode:
    n = FakeNode(name, **kwargs)  # type: ignore[arg-type]
    n.add_file(PY, b"ELF", 0o755)
    return n


def steps(result: DeployResult, name: str = "n1") -> list[tuple[str, str, str]]:
    return [(s.kind, s.target, s.reason) for s in result.nodes[name].steps]


# -- a first deploy, a second one, a dry run ----------------------------------------------------

def test_first_deploy_writes_starts_and_a_second_one_changes_nothing(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path, WEB)
    n1 = node()
    web = n1.service("web", 8081)
    first = run(inv, {"n1": n1})
    assert first.ok, first.nodes["n1"].failed
    assert steps(first) == [
        ("upload", "/etc/systemd/system/clusterctl-web.service", "new"),
        ("upload", "/opt/clusterctl/bin/web.sh", "new"),
        ("daemon-reload", "systemd", "unit files changed"),
        ("restart", "web", "/etc/systemd/system/clusterctl-web.service new"),
    ]
    assert [s.kind for s in first.nodes["n1"].done] == ["upload", "upload", "daemon-reload", "restart"]
    assert n1.stale_starts == []
    assert web.state == "active" and web.starts == 1 and n1.reloads == 1
    assert n1.files["/opt/clusterctl/bin/web.sh"][1] == 0o755
    assert "systemctl restart -- clusterctl-web.service" in n1.commands()
    assert "curl -s -o /dev/null -w '%{http_code}' --max-time 5 http://127.0.0.1:8081/health" in n1.commands()
    assert n1.unknown == [] and n1.closed
    n1.ran.clear()
    second = run(inv, {"n1": n1})
    assert second.ok and second.changes == 0
    assert [r.argv[3] for r in n1.ran] == ["clusterctl-probe"]  # one probe, nothing else
    assert web.starts == 1


def test_a_stopped_service_is_started_without_touching_its_files(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path, WEB)
    n1 = node()
    web = n1.service("web", 8081)
    assert run(inv, {"n1": n1}).ok
    web.state = "failed"
    n1.writes.clear()
    again = run(inv, {"n1": n1})
    assert steps(again) == [("restart", "web", "not running (failed)")] or \
        steps(again) == [("start", "web", "not running (failed)")]
    assert again.ok and web.state == "active" and n1.writes == []


def test_dry_run_shows_every_command_and_writes_nothing(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path, WEB)
    n1 = node()
    n1.service("web", 8081)
    n1.add_file("/opt/clusterctl/bin/web.sh", b"#!/usr/bin/env bash\nold\n", 0o755)
    result = run(inv, {"n1": n1}, dry_run=True)
    assert result.ok and result.dry_run
    assert n1.writes == [] and [r.argv[3] for r in n1.ran] == ["clusterctl-probe"]
    by_target = {s.target: s for s in result.nodes["n1"].steps}
    assert by_target["/opt/clusterctl/bin/web.sh"].reason == "changed"
    assert by_target["/opt/clusterctl/bin/web.sh"].commands == ("write /opt/clusterctl/bin/web.sh (mode 755)",)
    assert by_target["systemd"].commands == ("systemctl daemon-reload",)
    assert by_target["web"].commands == (
        "systemctl enable -- clusterctl-web.service", "systemctl reset-failed -- clusterctl-web.service",
        "systemctl restart -- clusterctl-web.service",
        "curl -s -o /dev/null -w '%{http_code}' --max-time 5 http://127.0.0.1:8081/health")
    diff = result.nodes["n1"].diffs["/opt/clusterctl/bin/web.sh"]
    assert diff.startswith("--- a/opt/clusterctl/bin/web.sh\n+++ b/opt/clusterctl/bin/web.sh\n")
    assert "-old\n" in diff
    data = result.to_json()
    assert data["dry_run"] is True and data["nodes"]["n1"]["steps"][0]["commands"]  # type: ignore[index]


def test_the_gate_refuses_every_write_and_passes_reads() -> None:
    inner = FakeNode("n1")
    inner.add_file("/etc/x", b"x")
    ro = gate.ReadOnly(inner)
    with pytest.raises(gate.WriteRefused, match="n1: a read-only run may not write /etc/x"):
        ro.put("/etc/x", b"y")
    with pytest.raises(gate.WriteRefused, match="may not copy to /opt/m"):
        ro.push(__file__, "/opt/m")
    with pytest.raises(gate.WriteRefused, match="may not run 'mkdir'"):
        ro.run(["mkdir", "-p", "/opt"])
    with pytest.raises(gate.WriteRefused, match="may not run 'bash'"):
        ro.run(shell.argv("venv", "a", "b", "c", "d", "", "", "e"))
    assert ro.get("/etc/x") == b"x" and inner.files["/etc/x"] == (b"x", 0o644)
    assert ro.run(shell.argv("sha256", "/etc/x")).out == f"{hashlib.sha256(b'x').hexdigest()} */etc/x\n"
    ro.close()
    assert inner.closed


# -- weights ------------------------------------------------------------------------------------

def model_inventory(tmp: Path, data: bytes, *, sha: str | None = None) -> Inventory:
    (tmp / "m.gguf").write_bytes(data)
    pin = f", sha256: {sha}" if sha else ""
    return write_inventory(tmp, WEB.replace("    command:", "    model: m\n    command:"),
                           models=f"  m: {{source: 'file://{tmp}/m.gguf', format: gguf{pin}}}\n")


def test_a_local_model_is_pushed_verified_and_recorded(tmp_path: Path) -> None:
    data = b"GGUF" + bytes(range(256)) * 8
    inv = model_inventory(tmp_path, data)
    n1 = node()
    n1.service("web", 8081)
    result = run(inv, {"n1": n1})
    assert result.ok, result.nodes["n1"].failed
    assert steps(result)[0] == ("push-weight", "/opt/models/m/m.gguf", "missing")
    assert result.nodes["n1"].bytes_sent == len(data)
    assert n1.files["/opt/models/m/m.gguf"] == (data, 0o644) and "/opt/models/m/m.gguf.part" not in n1.files
    manifest = json.loads(n1.files["/opt/clusterctl/state/manifest.json"][0])
    assert manifest == {"/opt/models/m/m.gguf": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}
    assert run(inv, {"n1": n1}).changes == 0


def test_a_corrupt_copy_is_removed_and_the_node_stops(tmp_path: Path) -> None:
    data = b"GGUF" + b"\0" * 4096
    inv = model_inventory(tmp_path, data, sha=hashlib.sha256(data).hexdigest())
    n1 = node()
    web = n1.service("web", 8081)
    n1.corrupt_pushes = True
    result = run(inv, {"n1": n1})
    failed = result.nodes["n1"].failed
    assert failed is not None and failed.startswith(
        "n1: /opt/models/m/m.gguf failed verification (sha256 ")
    assert failed.endswith("the partial file was removed (run deploy again to fetch it anew; the previous file is "
                           "untouched)")
    assert "/opt/models/m/m.gguf.part" not in n1.files and "/opt/models/m/m.gguf" not in n1.files
    assert web.starts == 0 and "/opt/clusterctl/bin/web.sh" not in n1.files  # later phases did not run


def test_a_file_already_there_is_verified_in_place(tmp_path: Path) -> None:
    data = b"GGUF-in-place"
    inv = model_inventory(tmp_path, data)
    n1 = node()
    n1.service("web", 8081)
    n1.add_file("/opt/models/m/m.gguf", data)
    result = run(inv, {"n1": n1}, phases=("acquire",))
    assert steps(result) == [("verify-weight", "/opt/models/m/m.gguf", "present, not verified yet")]
    assert result.ok and result.nodes["n1"].bytes_sent == 0
    manifest = json.loads(n1.files["/opt/clusterctl/state/manifest.json"][0])
    assert manifest["/opt/models/m/m.gguf"]["sha256"] == hashlib.sha256(data).hexdigest()


HUB_MODEL = "  m: {source: 'hf://org/repo/m.gguf', format: gguf, size: 12B, sha256: %s}\n"


def hub_inventory(tmp: Path, sha: str) -> Inventory:
    return write_inventory(tmp, WEB.replace("    command:", "    model: m\n    command:"), models=HUB_MODEL % sha,
                           cluster="  huggingface: {endpoint: 'https://hub.test', token: {env: FAKE_HUB_TOKEN}}\n")


def test_a_hub_download_sends_the_token_on_stdin_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_HUB_TOKEN", "hf_secret_value")
    data = b"hub-weights!"
    inv = hub_inventory(tmp_path, hashlib.sha256(data).hexdigest())
    n1 = node()
    n1.service("web", 8081)
    n1.urls["https://hub.test/org/repo/resolve/main/m.gguf"] = data
    result = run(inv, {"n1": n1})
    assert result.ok, result.nodes["n1"].failed
    assert steps(result)[0] == ("pull-weight", "/opt/models/m/m.gguf", "missing")
    pulls = [r for r in n1.ran if r.argv[0] == "curl" and "--output" in r.argv]
    assert len(pulls) == 1 and pulls[0].stdin == b"Authorization: Bearer hf_secret_value\n"
    assert all("hf_secret_value" not in " ".join(r.argv) for r in n1.ran)
    assert n1.files["/opt/models/m/m.gguf"][0] == data


def test_a_missing_hub_file_names_the_file_and_hints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAKE_HUB_TOKEN", raising=False)
    inv = hub_inventory(tmp_path, "ab" * 32)
    n1 = node()
    n1.service("web", 8081)
    n1.urls["https://hub.test/org/repo/resolve/main/m.gguf"] = 404
    result = run(inv, {"n1": n1})
    assert result.nodes["n1"].failed == ("n1: download of m.gguf failed: curl: (22) The requested URL returned "
                                         "error: 404 (the repository, revision or file does not exist)")
    pulls = [r for r in n1.ran if r.argv[0] == "curl" and "--output" in r.argv]
    assert pulls[0].stdin == b""  # no token set: no header


def test_too_little_disk_is_refused_before_any_download(tmp_path: Path) -> None:
    inv = model_inventory(tmp_path, b"x" * 5000)
    n1 = node()
    n1.service("web", 8081)
    n1.disk_free = 1024
    result = run(inv, {"n1": n1})
    assert result.nodes["n1"].failed == ("n1: /opt/models/m has 0.0 GB free, 0.0 GB are needed (free disk space "
                                         "or move models_dir; nothing was downloaded)")
    assert n1.writes == []


# -- rollback -----------------------------------------------------------------------------------

def test_a_new_version_that_crashes_is_rolled_back_and_the_old_one_serves(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path, WEB)
    n1 = node()
    web = n1.service("web", 8081)
    assert run(inv, {"n1": n1}).ok
    old_script = n1.files["/opt/clusterctl/bin/web.sh"]
    web.outcome = lambda fake: "crash" if b"--new" in fake.files["/opt/clusterctl/bin/web.sh"][0] else "ok"
    changed = write_inventory(tmp_path, WEB.replace("-m, web]", "-m, web, --new]"))
    result = run(changed, {"n1": n1})
    r = result.nodes["n1"]
    assert r.failed == "web exited during start-up ; the previous version is serving again"
    assert r.rolled_back == ["/opt/clusterctl/bin/web.sh"]
    assert n1.files["/opt/clusterctl/bin/web.sh"] == old_script
    assert web.state == "active" and web.starts == 3
    assert r.log_tail == "web: listening on 127.0.0.1:8081\nweb: error: failed to load model\n"


def test_a_new_service_that_never_gets_healthy_is_stopped_and_its_files_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inv = write_inventory(tmp_path, WEB + "    startup_timeout: 0.3s\n")
    n1 = node()
    web = n1.service("web", 8081, outcome="unhealthy")
    monkeypatch.setattr(checks, "HEALTH_POLL_MAX", 0.05)
    result = run(inv, {"n1": n1})
    assert result.nodes["n1"].failed == ("web not healthy after 0 s; it was new, so it was stopped and its files "
                                         "removed")
    assert "/opt/clusterctl/bin/web.sh" not in n1.files
    assert "/etc/systemd/system/clusterctl-web.service" not in n1.files
    assert web.state == "inactive"
    assert "systemctl stop -- clusterctl-web.service" in n1.commands()


def test_when_the_old_version_fails_too_the_message_says_how_to_look(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path, WEB)
    n1 = node()
    web = n1.service("web", 8081)
    assert run(inv, {"n1": n1}).ok
    web.outcome = "crash"
    result = run(write_inventory(tmp_path, WEB.replace("-m, web]", "-m, web, --new]")), {"n1": n1})
    assert result.nodes["n1"].failed == (
        "web exited during start-up; the previous version did not come back either (web exited during start-up): "
        "restore it by hand (systemctl status clusterctl-web.service)")


# -- several nodes: max-fail and preflight -------------------------------------------------------

TWO = "  n1: {address: 10.0.0.1, ram: 8GiB}\n  n2: {address: 10.0.0.2, ram: 8GiB}\n"
WEB2 = WEB + WEB.replace("  web:", "  web2:").replace("node: n1", "node: n2").replace("8081", "8082")


def test_a_node_refused_by_preflight_does_not_stop_the_others_within_max_fail(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path, WEB2, nodes=TWO)
    n1, n2 = node("n1"), node("n2")
    n1.service("web", 8081)
    web2 = n2.service("web2", 8082)
    n1.foreign.append(("0.0.0.0", 8081, "nginx"))
    result = run(inv, {"n1": n1, "n2": n2}, max_fail=1)
    assert result.nodes["n1"].failed == (
        "n1: port 8081 is taken on 0.0.0.0 by another process (nginx); web would not start (stop that process or "
        "give the service another port; clusterctl does not kill processes it did not start)")
    assert n1.writes == []
    assert result.nodes["n2"].ok and web2.state == "active"


def test_beyond_max_fail_no_node_goes_on(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path, WEB2, nodes=TWO)
    n1, n2 = node("n1"), node("n2")
    n1.service("web", 8081)
    web2 = n2.service("web2", 8082)
    n1.foreign.append(("0.0.0.0", 8081, "nginx"))
    result = run(inv, {"n1": n1, "n2": n2}, max_fail=0)
    assert not result.ok and result.nodes["n2"].ok
    assert n2.writes == [] and web2.starts == 0 and result.nodes["n2"].done == []


def test_a_missing_engine_and_missing_gpu_are_refused(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path, WEB)
    n1 = FakeNode("n1")  # no /usr/bin/python3
    n1.service("web", 8081)
    assert run(inv, {"n1": n1}).nodes["n1"].failed == (
        "n1: engine(s) missing: /usr/bin/python3 (the custom command for web) (install them on the node, set the "
        "service's `binary`, or set cluster.engines.llama_cpp to push a llama.cpp build)")
    gpu = write_inventory(tmp_path, WEB,
                          nodes="  n1: {address: 10.0.0.1, accelerators: [{kind: cuda, memory: 24GiB}]}\n")
    n1 = node()
    n1.service("web", 8081)
    assert run(gpu, {"n1": n1}).nodes["n1"].failed == (
        "n1: the inventory says 1 GPU(s) of 24 GiB; the node reports no GPU (fix the node's accelerators in the "
        "inventory and run clusterctl plan)")


def test_an_unreachable_node_is_reported_and_the_rest_proceed(tmp_path: Path) -> None:
    from clusterctl.transport import ConnectError

    inv = write_inventory(tmp_path, WEB2, nodes=TWO)
    n2 = node("n2")
    n2.service("web2", 8082)

    def connect(name: str) -> FakeNode:
        if name == "n1":
            raise ConnectError("n1: connection refused", "is sshd running?", host="n1")
        return n2

    result = deploy(inv, LockFile(), render(inv), connect, max_fail=1)  # type: ignore[arg-type]
    assert result.nodes["n1"].failed == "n1: connection refused (is sshd running?)"
    assert result.nodes["n2"].ok


# -- rpc workers ---------------------------------------------------------------------------------

def rpc_inventory(tmp: Path) -> Inventory:
    (tmp / "m.gguf").write_bytes(b"GGUF")
    return write_inventory(tmp, """\
  head:
    engine: llama-server
    node: n1
    model: m
    binary: /usr/local/bin/llama-server
    rpc_workers: [w]
  w:
    engine: rpc-server
    node: n2
    bind: 10.0.0.2
    binary: /usr/local/bin/rpc-server
""", nodes=TWO, models=f"  m: {{source: 'file://{tmp}/m.gguf', format: gguf}}\n")


def test_workers_start_first_and_a_head_whose_worker_is_down_is_not_touched(tmp_path: Path) -> None:
    inv = rpc_inventory(tmp_path)
    n1, n2 = node("n1"), node("n2")
    n1.add_file("/usr/local/bin/llama-server", b"ELF", 0o755)
    n2.add_file("/usr/local/bin/rpc-server", b"ELF", 0o755)
    head = n1.service("head", 8080, process="llama-server")
    w = n2.service("w", 50052, bind="10.0.0.2", health_path=None, process="rpc-server", outcome="crash")
    result = run(inv, {"n1": n1, "n2": n2}, max_fail=1)
    assert result.nodes["n2"].failed == "w exited during start-up; it was new, so it was stopped and its files removed"
    assert result.nodes["n1"].failed == (
        "n1: head was not restarted: its rpc worker w (10.0.0.2:50052 on n2) is not reachable (start w first "
        "(deploy n2) and check the firewall between the nodes)")
    assert head.starts == 0 and "/opt/clusterctl/bin/head.sh" not in n1.files
    # the worker up (a fake node answers one node's probes; a head reaches its worker through its own)
    w.outcome = "ok"
    n1.foreign.append(("10.0.0.2", 50052, "rpc-server"))
    again = run(inv, {"n1": n1, "n2": n2})
    assert again.ok, {k: v.failed for k, v in again.nodes.items()}
    assert head.state == "active" and w.state == "active"
    assert "tcp-probe.sh 10.0.0.2 50052" in n2.commands()  # the worker's own health check is a TCP connect


# -- engines installed on the node ---------------------------------------------------------------

def test_llama_cpp_is_built_on_the_node_and_a_failed_build_says_why(tmp_path: Path) -> None:
    archive = tmp_path / "llama.cpp-b1.tar.gz"
    archive.write_bytes(b"\x1f\x8b source")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    services = "  chat:\n    engine: llama-server\n    node: n1\n    model: m\n"
    cluster = f"  engines: {{llama_cpp_build: {{source: 'file://{archive}'}}}}\n"
    models = f"  m: {{source: 'file://{tmp_path}/m.gguf', format: gguf}}\n"
    inv = write_inventory(tmp_path, services, models=models, cluster=cluster)
    n1 = node()
    n1.service("chat", 8080, process="llama-server")
    n1.build_rc = 4
    failed = run(inv, {"n1": n1})
    r = failed.nodes["n1"]
    assert [s.kind for s in r.steps[:3]] == ["push-source", "build-engine", "push-weight"]
    assert r.failed is not None and r.failed.startswith(
        "n1: building llama.cpp (llama-server, CPU, RPC) failed: cmake could not configure the build; logs in "
        "/opt/clusterctl/engines/llama.cpp/build-")
    assert r.log_tail.startswith("CMake Error")
    n1.build_rc = 0
    ok = run(inv, {"n1": n1})
    assert ok.ok, ok.nodes["n1"].failed
    assert [s.kind for s in ok.nodes["n1"].steps[:2]] == ["build-engine", "push-weight"]  # the source was kept
    built = n1.files["/opt/clusterctl/engines/llama.cpp/bin/llama-server"]
    manifest = json.loads(n1.files["/opt/clusterctl/state/manifest.json"][0])
    entry = manifest["/opt/clusterctl/engines/llama.cpp/bin/llama-server"]
    assert entry["sha256"] == hashlib.sha256(built[0]).hexdigest() and entry["size"] == len(built[0])
    assert run(inv, {"n1": n1}).changes == 0


def test_a_pip_engine_gets_its_venv_and_a_failed_install_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text("{}")
    services = "  v:\n    engine: vllm\n    node: n1\n    model: tiny\n"
    cluster = "  engines: {vllm: {requirement: 'vllm==0.11.0', python: /usr/bin/python3}}\n"
    models = f"  tiny: {{source: 'file://{tmp_path}/tiny/config.json', format: safetensors, files: [config.json]}}\n"
    inv = write_inventory(tmp_path, services, models=models, cluster=cluster)
    n1 = node()
    v = n1.service("v", 8000, process="vllm")
    n1.venv_rc = 4
    bad = run(inv, {"n1": n1})
    assert bad.nodes["n1"].failed == ("n1: installing vllm failed: pip could not install vllm==0.11.0 (the "
                                      "previous installation, if any, is untouched and still in use)")
    assert v.starts == 0
    n1.venv_rc = 0
    good = run(inv, {"n1": n1})
    assert good.ok, good.nodes["n1"].failed
    assert good.nodes["n1"].steps[0].reason == "vllm==0.11.0: not installed"
    assert any(c.startswith("venv.sh /usr/bin/python3 /opt/clusterctl/engines/vllm-") for c in n1.commands())
    assert v.state == "active"


# -- the service managers ------------------------------------------------------------------------

def test_a_launchd_node_is_driven_with_launchctl(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path, WEB, nodes="  n1: {address: 10.0.0.1, os: macos, unified_memory: 32GiB}\n")
    n1 = node(manager="launchd", os="macos")
    web = n1.service("web", 8081)
    result = run(inv, {"n1": n1})
    assert result.ok, result.nodes["n1"].failed
    assert [s.kind for s in result.nodes["n1"].steps] == ["upload", "upload", "restart"]  # no daemon-reload
    assert "/Library/LaunchDaemons/io.clusterctl.web.plist" in n1.files
    commands = n1.commands()
    assert commands.index("launchctl bootout system/io.clusterctl.web") < \
        commands.index("launchctl bootstrap system /Library/LaunchDaemons/io.clusterctl.web.plist") < \
        commands.index("launchctl kickstart system/io.clusterctl.web")
    assert not any(c.startswith(("systemctl", "/usr/local/clusterctl/bin/web-ctl.sh")) for c in commands)
    assert web.loaded and web.state == "active" and n1.unknown == []
    n1.ran.clear()
    assert run(inv, {"n1": n1}).changes == 0  # launchctl print says it runs
    web.state = "failed"
    restarted = run(inv, {"n1": n1})
    assert steps(restarted) == [("start", "web", "not running (inactive)")] and web.state == "active"


def test_a_direct_node_is_driven_with_its_control_script(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path, WEB, nodes="  n1: {address: 10.0.0.1, os: android, ram: 8GiB}\n")
    n1 = node(manager="direct")
    web = n1.service("web", 8081)
    result = run(inv, {"n1": n1})
    assert result.ok, result.nodes["n1"].failed
    assert "/opt/clusterctl/bin/web-ctl.sh restart" in n1.commands()
    assert web.state == "active" and n1.unknown == []
    assert run(inv, {"n1": n1}).changes == 0


@pytest.mark.parametrize(("name", "out", "rc", "alive", "state", "pid"), [
    ("systemd", "ActiveState=active\nSubState=running\nMainPID=42\nMemoryCurrent=1024\n", 0, True, "active", 42),
    ("systemd", "ActiveState=activating\nSubState=auto-restart\nMainPID=0\n", 0, False, "activating", 0),
    ("launchd", "system/io.clusterctl.x = {\n\tstate = running\n\tpid = 7\n}\n", 0, True, "running", 7),
    ("launchd", "", 113, False, "unloaded", 0),
    ("direct", "x: running (pid 9)\n", 0, True, "active", 9),
    ("direct", "x: stopped\n", 3, False, "inactive", 0),
])
def test_each_manager_reads_its_own_status_output(name: str, out: str, rc: int, alive: bool, state: str,
                                                   pid: int) -> None:
    seen = MANAGERS[name].parse_inspect(rc, out)
    assert (seen.alive, seen.state, seen.pid) == (alive, state, pid)


# -- a custom command: one answer for deploy, verify and status ----------------------------------

TCP = """\
  plain:
    engine: custom
    node: n1
    port: 9000
    command: [/usr/bin/python3, -m, plain]
"""


def test_a_custom_command_without_health_path_is_probed_by_tcp_everywhere(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path, TCP)
    n1 = node()
    plain = n1.service("plain", 9000, health_path=None)
    result = run(inv, {"n1": n1})
    assert result.ok, result.nodes["n1"].failed
    assert "tcp-probe.sh 127.0.0.1 9000" in n1.commands()
    assert not any(c.startswith("curl") for c in n1.commands())
    checked = verify(inv, lambda name: n1, wait=0)  # type: ignore[arg-type, return-value]
    assert [(c.name, c.status) for c in checked.checks] == [("listening", "ok")] and checked.ok
    snap = snapshot(inv, lambda name: n1)  # type: ignore[arg-type, return-value]
    assert [(s.service, s.state, s.health) for s in snap.services] == [("plain", "active", "ok")]
    plain.state = "inactive"
    snap = snapshot(inv, lambda name: n1)  # type: ignore[arg-type, return-value]
    assert [(s.service, s.state, s.health) for s in snap.services] == [("plain", "inactive", "down")]


def test_verify_and_status_of_an_http_service_on_a_fake_node(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path, WEB)
    n1 = node()
    n1.service("web", 8081, models=("web",))
    assert run(inv, {"n1": n1}).ok
    checked = verify(inv, lambda name: n1, wait=0)  # type: ignore[arg-type, return-value]
    assert [(c.name, c.status) for c in checked.checks] == [("listening", "ok"), ("health", "ok"), ("smoke", "ok"),
                                                            ("speed", "ok")]
    snap = snapshot(inv, lambda name: n1)  # type: ignore[arg-type, return-value]
    assert [(s.state, s.health, s.memory) for s in snap.services] == [("active", "ok", 123 * 2**20)]


# -- the ops are what runs -----------------------------------------------------------------------

def test_every_packaged_script_is_run_by_name_and_shown_by_name() -> None:
    r = ops.tcp_probe("10.0.0.2", 50052)
    assert r.argv[:2] == ("bash", "-c") and r.argv[3] == "clusterctl-tcp-probe"
    assert r.display() == "tcp-probe.sh 10.0.0.2 50052" and not r.check
    assert ops.sha256("/a b").display() == "sha256.sh '/a b'" and ops.sha256("/x").argv[0] == "sh"
    assert ops.Put("/etc/k", 0o600, sensitive=True).display() == "write /etc/k (mode 600, sensitive)"
    assert ops.Push("/l", "/r.part", 0o644).display() == "copy /l -> /r.part (resumable)"
    with pytest.raises(KeyError, match="no script 'nope'"):
        shell.text("nope")


def test_the_deploy_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    inventory = tmp_path / "c.yaml"
    with cluster_lock(inventory) as stale:
        assert stale == {}
        with pytest.raises(LockedError, match=r"another deploy of c\.yaml is running: pid \d+"), \
                cluster_lock(inventory):
            pass


def test_the_dry_run_recap_prints_each_step_with_its_commands(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from clusterctl import ui

    inv = write_inventory(tmp_path, WEB)
    n1 = node()
    n1.service("web", 8081)
    ui.deploy_recap(run(inv, {"n1": n1}, dry_run=True))
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("  services  restart       web  /etc/systemd/system/clusterctl-web.service new")
    assert lines[at + 1:at + 5] == [
        "      $ systemctl enable -- clusterctl-web.service",
        "      $ systemctl reset-failed -- clusterctl-web.service",
        "      $ systemctl restart -- clusterctl-web.service",
        "      $ curl -s -o /dev/null -w '%{http_code}' --max-time 5 http://127.0.0.1:8081/health"]
    assert lines[-1].startswith("1 node(s), 4 step(s), 0 failed, ")


def test_a_macos_node_is_verified_and_reported_with_bsd_tools(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path, WEB, nodes="  n1: {address: 10.0.0.1, os: macos, unified_memory: 32GiB}\n")
    n1 = node(manager="launchd", os="macos")
    n1.service("web", 8081)
    assert run(inv, {"n1": n1}).ok
    checked = verify(inv, lambda name: n1, wait=0)  # type: ignore[arg-type, return-value]
    assert [(c.name, c.status, c.detail) for c in checked.checks][:2] == [
        ("listening", "ok", "bound to 127.0.0.1"), ("health", "ok", "/health 200")]
    snap = snapshot(inv, lambda name: n1)  # type: ignore[arg-type, return-value]
    assert [(s.state, s.health, s.memory) for s in snap.services] == [("running", "ok", 20480 * 1024)]
    assert "ps -o rss= -p 4001" in n1.commands() and n1.unknown == []


def test_mlx_lm_is_checked_against_the_folder_it_serves_and_an_empty_listing_is_named(tmp_path: Path) -> None:
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text("{}")
    inv = write_inventory(tmp_path, "  chat: {engine: mlx-lm, node: n1, model: tiny, binary: /usr/bin/python3}\n",
                          models=f"  tiny: {{source: 'file://{tmp_path}/tiny/config.json', format: mlx}}\n")
    n1 = node()
    chat = n1.service("chat", 8080, health_path="/v1/models", models=("/opt/models/tiny",))
    assert run(inv, {"n1": n1}).ok
    script = n1.files["/opt/clusterctl/bin/chat.sh"][0].decode()
    assert "HF_HUB_CACHE=/opt/models/tiny" in script and "HF_HUB_OFFLINE=1" in script
    checked = verify(inv, lambda name: n1, wait=0)  # type: ignore[arg-type, return-value]
    assert [(c.name, c.status, c.detail) for c in checked.checks][2] == ("model", "ok", "serves '/opt/models/tiny'")
    chat.models = None
    checked = verify(inv, lambda name: n1, wait=0)  # type: ignore[arg-type, return-value]
    assert [(c.name, c.status, c.detail) for c in checked.checks][2:] == [(
        "model", "fail", "/v1/models answered 200 with an empty body, expected '/opt/models/tiny' (mlx-lm does "
        "this when HF_HUB_CACHE is not an existing folder)")]


# -- the router installed by deploy ---------------------------------------------------------------

ROUTER = "router:\n  node: n1\n  bind: 127.0.0.1\n  port: 8000\n  default: [web]\n"


def test_a_new_router_wheel_gets_a_venv_of_its_own_and_restarts_the_router(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clusterctl.deploy import router_wheel

    inv = write_inventory(tmp_path, WEB, router=ROUTER)
    n1 = node()
    n1.service("web", 8081)
    router = n1.service("router", 8000)
    first = run(inv, {"n1": n1})
    assert first.ok, first.nodes["n1"].failed
    wheel = router_wheel.build(router_wheel.cache_folder())
    pushed = f"/opt/clusterctl/router/wheels/{wheel.filename}"
    assert n1.files[pushed][0] == wheel.path.read_bytes()
    installs = [c for c in n1.commands() if c.startswith("venv.sh ")]
    assert len(installs) == 1 and f" {pushed} " in f" {installs[0]} ", installs
    assert router.starts == 1
    assert run(inv, {"n1": n1}).changes == 0  # the same code: nothing to install, no restart
    assert router.starts == 1

    real = router_wheel._sources
    monkeypatch.setattr(router_wheel, "_sources", lambda: [*real(), ("clusterctl/router/_changed.py", b"x = 1\n")])
    new = router_wheel.build(router_wheel.cache_folder())
    assert new.version != wheel.version and new.version.startswith(wheel.version.split("+")[0] + "+g")
    n1.ran.clear()
    second = run(inv, {"n1": n1})
    assert second.ok, second.nodes["n1"].failed
    kinds = [(s.kind, s.target) for s in second.nodes["n1"].steps]
    assert ("push-engine", f"/opt/clusterctl/router/wheels/{new.filename}") in kinds, kinds
    assert any(k == "install-engine" for k, _ in kinds) and ("restart", "router") in kinds, kinds
    assert router.starts == 2 and router.state == "active"


# -- orphans: services a node runs that the inventory no longer gives it --------------------------

OLD = """\
  old:
    engine: custom
    node: n1
    port: 8082
    health_path: /health
    command: [/usr/bin/python3, -m, old]
"""
REMOVE_OLD = ("systemctl stop -- clusterctl-old.service", "systemctl disable -- clusterctl-old.service",
              "unfirewall.sh clusterctl_old CC-old-cba06b",
              "rm -f -- /etc/systemd/system/clusterctl-old.service /opt/clusterctl/bin/old.sh "
              "/opt/clusterctl/bin/old-stop.sh /opt/clusterctl/bin/old-firewall.sh /opt/clusterctl/bin/old-post.sh "
              "/etc/clusterctl/secrets/old.key")


def deployed_with_old(tmp_path: Path, **kwargs: object) -> tuple[FakeNode, Inventory]:
    """n1 runs web and old; the inventory returned holds web only."""
    n1 = node(**kwargs)
    n1.service("web", 8081)
    n1.service("old", 8082)
    nodes = "  n1: {address: 10.0.0.1, os: macos, unified_memory: 32GiB}\n" if kwargs.get("os") == "macos" else \
        "  n1: {address: 10.0.0.1, os: android, ram: 8GiB}\n" if kwargs.get("manager") == "direct" else None
    first = run(write_inventory(tmp_path, WEB + OLD, nodes=nodes), {"n1": n1})
    assert first.ok, first.nodes["n1"].failed
    assert n1.services["old"].state == "active"
    n1.ran.clear()
    n1.writes.clear()
    return n1, write_inventory(tmp_path, WEB, nodes=nodes)


def test_a_dropped_service_is_reported_and_left_running_without_prune(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from clusterctl import ui

    n1, inv = deployed_with_old(tmp_path)
    result = run(inv, {"n1": n1})
    assert result.ok and steps(result) == [] and result.changes == 0
    assert result.nodes["n1"].orphans == ["old"]
    assert result.to_json()["nodes"]["n1"]["orphans"] == ["old"]  # type: ignore[index]
    assert n1.services["old"].state == "active" and n1.services["old"].starts == 1
    assert n1.writes == [] and [r.argv[3] for r in n1.ran] == ["clusterctl-probe"]
    assert "/etc/systemd/system/clusterctl-old.service" in n1.files
    ui.deploy_recap(result)
    lines = capsys.readouterr().out.splitlines()
    assert "  orphan n1/old: not in the inventory for this node; left alone: deploy --prune removes it" in lines
    assert lines[-1] == "no changes"
    dry = run(inv, {"n1": n1}, dry_run=True)
    assert dry.nodes["n1"].orphans == ["old"] and steps(dry) == [] and n1.writes == []


def test_prune_stops_disables_and_deletes_an_orphan_and_a_second_deploy_changes_nothing(tmp_path: Path) -> None:
    n1, inv = deployed_with_old(tmp_path)
    reloads, web_starts = n1.reloads, n1.services["web"].starts
    result = run(inv, {"n1": n1}, prune=True)
    assert result.ok, result.nodes["n1"].failed
    assert steps(result) == [("remove", "old", "not in the inventory for this node"),
                             ("daemon-reload", "systemd", "unit files changed")]
    assert result.nodes["n1"].steps[0].commands == REMOVE_OLD
    assert [s.kind for s in result.nodes["n1"].done] == ["remove", "daemon-reload"]
    assert n1.removed == ["/etc/systemd/system/clusterctl-old.service", "/opt/clusterctl/bin/old.sh"]
    assert "/etc/systemd/system/clusterctl-old.service" not in n1.files and "/opt/clusterctl/bin/old.sh" not in n1.files
    assert n1.disabled == ["clusterctl-old.service"] and n1.reloads == reloads + 1
    assert n1.unfirewalled == [("clusterctl_old", "CC-old-cba06b")]
    commands = n1.commands()
    assert commands.index(REMOVE_OLD[0]) < commands.index(REMOVE_OLD[3]) < commands.index("systemctl daemon-reload")
    assert n1.services["old"].state == "inactive"
    assert n1.services["web"].state == "active" and n1.services["web"].starts == web_starts
    assert "/opt/clusterctl/bin/web.sh" in n1.files and n1.unknown == []
    again = run(inv, {"n1": n1}, prune=True)
    assert again.ok and again.changes == 0 and again.nodes["n1"].orphans == []
    assert run(inv, {"n1": n1}).changes == 0


def test_a_dry_run_with_prune_lists_the_removal_and_writes_nothing(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from clusterctl import ui

    n1, inv = deployed_with_old(tmp_path)
    result = run(inv, {"n1": n1}, dry_run=True, prune=True)
    assert result.ok and result.dry_run
    assert steps(result) == [("remove", "old", "not in the inventory for this node"),
                             ("daemon-reload", "systemd", "unit files changed")]
    assert result.nodes["n1"].steps[0].commands == REMOVE_OLD
    assert n1.writes == [] and n1.removed == [] and [r.argv[3] for r in n1.ran] == ["clusterctl-probe"]
    assert n1.services["old"].state == "active" and n1.reloads == 1
    ui.deploy_recap(result)
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("  services  remove        old  not in the inventory for this node")
    assert lines[at + 1:at + 5] == [f"      $ {c}" for c in REMOVE_OLD]
    assert "  orphan n1/old: not in the inventory for this node; would be removed" in lines


def test_a_failing_removal_fails_the_node_naming_node_and_service(tmp_path: Path) -> None:
    n1, inv = deployed_with_old(tmp_path)
    n1.read_only.add("/etc/systemd/system/clusterctl-old.service")
    result = run(inv, {"n1": n1}, prune=True)
    assert not result.ok and int(result.exit_code) == 8
    failed = result.nodes["n1"].failed
    assert failed is not None and failed.startswith(
        "n1: removing old failed: rm: cannot remove '/etc/systemd/system/clusterctl-old.service': Permission denied")
    assert [s.kind for s in result.nodes["n1"].done] == []
    assert "/etc/systemd/system/clusterctl-old.service" in n1.files


def test_the_router_is_an_orphan_only_off_its_node_and_a_moved_service_is_one_where_it_was(tmp_path: Path) -> None:
    nodes = "  n1: {address: 10.0.0.1, ram: 8GiB}\n  n2: {address: 10.0.0.2, ram: 8GiB}\n"
    inv = write_inventory(tmp_path, WEB, nodes=nodes, router=ROUTER)
    n1, n2 = node(), node("n2")
    n1.service("web", 8081)
    n1.service("router", 8000)
    n2.service("web", 8081)
    n2.service("router", 8000)  # the router was here once: its unit is left, stopped
    n2.add_file("/etc/systemd/system/clusterctl-router.service", b"[Unit]\n")
    n2.add_file("/etc/systemd/system/clusterctl-router-extra.conf", b"")  # not a unit clusterctl writes
    n2.add_file("/etc/systemd/system/other.service", b"[Unit]\n")  # not clusterctl's
    first = run(inv, {"n1": n1, "n2": n2})
    assert first.ok, first.nodes["n1"].failed
    assert first.nodes["n1"].orphans == [] and first.nodes["n2"].orphans == ["router"]
    keep = OLD.replace("old", "keep").replace("8082", "8083")
    n1.service("keep", 8083)
    moved = write_inventory(tmp_path, WEB.replace("node: n1", "node: n2") + keep, nodes=nodes,
                            router=ROUTER.replace("[web]", "[keep]"))
    result = run(moved, {"n1": n1, "n2": n2}, prune=True)
    assert result.ok, (result.nodes["n1"].failed, result.nodes["n2"].failed)
    assert result.nodes["n1"].orphans == ["web"] and result.nodes["n2"].orphans == ["router"]
    assert [(s.kind, s.target) for s in result.nodes["n1"].steps if s.kind == "remove"] == [("remove", "web")]
    assert [(s.kind, s.target) for s in result.nodes["n2"].steps if s.kind == "remove"] == [("remove", "router")]
    assert n1.services["router"].state == "active" and n1.services["web"].state == "inactive"
    assert n2.services["web"].state == "active"
    assert "/etc/systemd/system/other.service" in n2.files and "/etc/systemd/system/clusterctl-router.service" \
        not in n2.files


def test_a_launchd_node_removes_an_orphan_with_launchctl(tmp_path: Path) -> None:
    n1, inv = deployed_with_old(tmp_path, manager="launchd", os="macos")
    result = run(inv, {"n1": n1}, prune=True)
    assert result.ok, result.nodes["n1"].failed
    assert steps(result) == [("remove", "old", "not in the inventory for this node")]  # no daemon-reload
    assert result.nodes["n1"].steps[0].commands == (
        "launchctl bootout system/io.clusterctl.old",  # no firewall rule on macOS
        "rm -f -- /Library/LaunchDaemons/io.clusterctl.old.plist /usr/local/clusterctl/bin/old.sh "
        "/usr/local/clusterctl/bin/old-stop.sh /usr/local/clusterctl/bin/old-firewall.sh "
        "/usr/local/clusterctl/bin/old-post.sh /etc/clusterctl/secrets/old.key")
    assert n1.removed == ["/Library/LaunchDaemons/io.clusterctl.old.plist", "/usr/local/clusterctl/bin/old.sh"]
    assert not n1.services["old"].loaded and n1.services["old"].state == "inactive"
    assert n1.services["web"].state == "active" and n1.unknown == []
    assert run(inv, {"n1": n1}, prune=True).changes == 0


def test_a_direct_node_removes_an_orphan_with_its_control_script(tmp_path: Path) -> None:
    n1, inv = deployed_with_old(tmp_path, manager="direct")
    result = run(inv, {"n1": n1}, prune=True)
    assert result.ok, result.nodes["n1"].failed
    assert steps(result) == [("remove", "old", "not in the inventory for this node")]
    assert result.nodes["n1"].steps[0].commands == (
        "/opt/clusterctl/bin/old-ctl.sh stop",  # an android node: no firewall rule either
        "rm -f -- /opt/clusterctl/bin/old-ctl.sh /opt/clusterctl/bin/old.sh /opt/clusterctl/bin/old-stop.sh "
        "/opt/clusterctl/bin/old-firewall.sh /opt/clusterctl/bin/old-post.sh /etc/clusterctl/secrets/old.key")
    assert n1.removed == ["/opt/clusterctl/bin/old-ctl.sh", "/opt/clusterctl/bin/old.sh"]
    assert n1.services["old"].state == "inactive" and n1.services["web"].state == "active"
    assert n1.unknown == []
    assert run(inv, {"n1": n1}, prune=True).changes == 0


def test_a_service_renamed_with_its_port_kept_needs_prune_and_then_takes_the_port(tmp_path: Path) -> None:
    n1, _ = deployed_with_old(tmp_path)
    renamed = write_inventory(tmp_path, WEB + OLD.replace("  old:", "  new:").replace("-m, old", "-m, new"))
    new = n1.service("new", 8082)
    refused = run(renamed, {"n1": n1})  # old holds 8082: the start of new is refused before any write
    assert refused.nodes["n1"].failed == ("n1: port 8082 is taken on 127.0.0.1 by old (clusterctl-old.service), "
                                          "which the inventory no longer gives this node; new would not start "
                                          "(deploy --prune removes it first)")
    assert n1.writes == [] and n1.services["old"].state == "active"
    pruned = run(renamed, {"n1": n1}, prune=True)  # old goes first, then new starts on its port
    assert pruned.ok, pruned.nodes["n1"].failed
    kinds = [s.kind for s in pruned.nodes["n1"].done]
    assert kinds.index("remove") < kinds.index("restart")
    assert n1.services["old"].state == "inactive" and new.state == "active" and new.starts == 1
    assert run(renamed, {"n1": n1}).changes == 0


def test_a_stranger_on_the_port_is_not_blamed_on_an_orphan(tmp_path: Path) -> None:
    """The orphan old runs on 8082; a process clusterctl never started holds 8090, where the
    renamed service would go: the refusal names the stranger, not old (systemd tells them apart
    by the listener's cgroup)."""
    n1, _ = deployed_with_old(tmp_path)
    n1.foreign.append(("127.0.0.1", 8090, "python3"))
    moved = write_inventory(tmp_path, WEB + OLD.replace("  old:", "  new:").replace("8082", "8090"))
    n1.service("new", 8090)
    refused = run(moved, {"n1": n1})
    assert refused.nodes["n1"].failed == ("n1: port 8090 is taken on 127.0.0.1 by another process (python3); new "
                                          "would not start (stop that process or give the service another port; "
                                          "clusterctl does not kill processes it did not start)")


def test_without_cgroups_the_refusal_says_the_orphan_may_hold_the_port(tmp_path: Path) -> None:
    n1, _ = deployed_with_old(tmp_path, os="macos", manager="launchd")
    nodes = "  n1: {address: 10.0.0.1, os: macos, unified_memory: 32GiB}\n"
    renamed = write_inventory(tmp_path, WEB + OLD.replace("  old:", "  new:"), nodes=nodes)
    n1.service("new", 8082)
    refused = run(renamed, {"n1": n1})
    assert refused.nodes["n1"].failed == ("n1: port 8082 is taken on 127.0.0.1 by another process (server); new "
                                          "would not start (if it is old, which the inventory no longer gives this "
                                          "node, deploy --prune removes it first; else stop that process or give "
                                          "the service another port)")
