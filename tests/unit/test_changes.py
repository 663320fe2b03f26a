"""The pure diff: desired files/weights/services vs facts -> steps with reasons."""

from __future__ import annotations

from clusterctl.deploy.changes import diff, summary
from clusterctl.deploy.facts import parse_listener_units, parse_sha256sum, parse_ss, parse_stat
from clusterctl.deploy.model import Desired, EngineFile, NodeFacts, SecretValue, WeightFile
from clusterctl.render import RenderedFile

SCRIPT = RenderedFile("n1", "/opt/clusterctl/bin/chat.sh", "#!/usr/bin/env bash\nexec x\n", 0o755, ("chat",))
UNIT = RenderedFile("n1", "/etc/systemd/system/clusterctl-chat.service", "[Service]\n", 0o644, ("chat",))
ROUTES = RenderedFile("n1", "/opt/clusterctl/router/routes.json", "{}\n", 0o644, ("router",))
PROM = RenderedFile("n1", "/opt/clusterctl/monitoring/prometheus.yml", "x: 1\n")
WEIGHT = WeightFile("/opt/models/m/m.gguf", 1000, "ab" * 32, local="/src/m.gguf")
ENGINE = EngineFile("/opt/clusterctl/engines/llama.cpp/bin/llama-server", "/src/llama-server", "cd" * 32, 500)
KEY = SecretValue("/etc/clusterctl/secrets/chat.key", "env:KEY", b"s3cret\n")


def desired() -> Desired:
    return Desired(node="n1", base="/opt/clusterctl", manager="systemd", files=[SCRIPT, UNIT, ROUTES, PROM],
                   secrets=[KEY], weights=[WEIGHT], engines=[ENGINE], services=["chat", "router"],
                   units={"chat": "clusterctl-chat.service", "router": "clusterctl-router.service"},
                   unit_files={UNIT.path})


def converged() -> NodeFacts:
    f = NodeFacts(node="n1")
    for rf in (SCRIPT, UNIT, ROUTES, PROM):
        f.hashes[rf.path] = rf.sha256
        f.modes[rf.path] = rf.mode
    f.hashes[KEY.path] = KEY.sha256
    f.hashes[ENGINE.path] = ENGINE.sha256
    f.sizes[WEIGHT.path] = 1000
    f.manifest[WEIGHT.path] = {"sha256": WEIGHT.sha256, "size": 1000}
    f.units = {"clusterctl-chat.service": "active", "clusterctl-router.service": "active"}
    return f


def test_converged_node_has_no_steps() -> None:
    steps = diff(desired(), converged())
    assert steps == []
    assert summary(steps) == {"uploads": 0, "restarts": 0, "bytes_to_transfer": 0}


def test_fresh_node_gets_everything_in_phase_order() -> None:
    steps = diff(desired(), NodeFacts(node="n1"))
    assert [(s.phase, s.kind, s.target) for s in steps] == [
        ("acquire", "push-engine", ENGINE.path),
        ("acquire", "push-weight", WEIGHT.path),
        ("services", "upload", SCRIPT.path),
        ("services", "upload", UNIT.path),
        ("router", "upload", ROUTES.path),
        ("router", "upload", PROM.path),
        ("services", "secret", KEY.path),
        ("services", "daemon-reload", "systemd"),
        ("services", "restart", "chat"),
        ("router", "restart", "router"),
    ]
    secret = next(s for s in steps if s.kind == "secret")
    assert secret.sensitive and "s3cret" not in repr(secret)
    assert summary(steps) == {"uploads": 5, "restarts": 2, "bytes_to_transfer": 1500}


def test_two_changed_files_of_one_service_mean_one_restart() -> None:
    facts = converged()
    facts.hashes[SCRIPT.path] = "0" * 64
    facts.hashes[UNIT.path] = "1" * 64
    steps = diff(desired(), facts)
    assert [(s.kind, s.target, s.reason) for s in steps] == [
        ("upload", SCRIPT.path, "changed"), ("upload", UNIT.path, "changed"),
        ("daemon-reload", "systemd", "unit files changed"),
        ("restart", "chat", f"{SCRIPT.path} changed"),
    ]


def test_mode_drift_stopped_service_and_partial_download() -> None:
    facts = converged()
    facts.modes[SCRIPT.path] = 0o644
    facts.units["clusterctl-router.service"] = "failed"
    del facts.sizes[WEIGHT.path]
    facts.sizes[WEIGHT.path + ".part"] = 400
    steps = diff(desired(), facts)
    assert [(s.kind, s.target, s.reason, s.bytes) for s in steps] == [
        ("push-weight", WEIGHT.path, "resume at 0.00 GB", 600),
        ("upload", SCRIPT.path, "mode 0o644 -> 0o755", len(SCRIPT.content)),
        ("restart", "chat", f"{SCRIPT.path} mode 0o644 -> 0o755", 0),
        ("start", "router", "not running (failed)", 0),
    ]


def test_unverified_weight_is_hashed_in_place_not_downloaded() -> None:
    facts = converged()
    facts.manifest.clear()
    steps = diff(desired(), facts)
    assert [(s.kind, s.reason, s.bytes) for s in steps] == [("verify-weight", "present, not verified yet", 0)]


def test_probe_parsers() -> None:
    assert parse_sha256sum("ab" * 32 + "  /a b\n" + "cd" * 32 + " */x\n") == {"/a b": "ab" * 32, "/x": "cd" * 32}
    sizes, modes = parse_stat("12 755 /opt/x.sh\n0 600 /etc/k\n")
    assert sizes == {"/opt/x.sh": 12, "/etc/k": 0} and modes == {"/opt/x.sh": 0o755, "/etc/k": 0o600}
    ss = ('LISTEN 0 128 127.0.0.1:8080 0.0.0.0:* users:(("llama-server",pid=7,fd=3))\n'
          "LISTEN 0 4096 [::]:22 [::]:*\n")
    assert parse_ss(ss) == {8080: "llama-server", 22: ""}
    units = ss + "#unit 7 clusterctl-chat.service\n#unit 9\n"  # pid 9: no unit in its cgroup
    assert parse_listener_units(units) == {("127.0.0.1", 8080): "clusterctl-chat.service"}
    assert parse_ss(units) == {8080: "llama-server", 22: ""}  # the #unit lines are no listeners


def test_gpu_drift_stops_a_node_that_has_less_than_the_inventory_says() -> None:
    from clusterctl.deploy.facts import Gpu, gpu_drift, parse_nvidia_smi
    from clusterctl.inventory import Accelerator, Node

    node = Node(address="10.0.0.1", accelerators=[Accelerator(kind="cuda", count=1, memory="48GiB")])
    assert gpu_drift(node, parse_nvidia_smi("NVIDIA RTX 6000 Ada Generation, 49140\n")) is None
    assert gpu_drift(node, [Gpu("RTX 4090", 24564 * 2**20)]) == \
        "the inventory says 1 GPU(s) of 48 GiB; the node reports 24 GiB"
    assert gpu_drift(node, []) == "the inventory says 1 GPU(s) of 48 GiB; the node reports no GPU"
    assert gpu_drift(Node(address="10.0.0.2", ram="8GiB"), []) is None


def test_direct_manager_service_that_stopped_is_started() -> None:
    d = desired()
    d.manager = "direct"
    d.units = {"chat": "/opt/clusterctl/bin/chat-ctl.sh", "router": "/opt/clusterctl/bin/router-ctl.sh"}
    facts = converged()
    facts.units = {"/opt/clusterctl/bin/chat-ctl.sh": "inactive", "/opt/clusterctl/bin/router-ctl.sh": "active"}
    assert [(s.kind, s.target, s.reason) for s in diff(d, facts)] == [("start", "chat", "not running (inactive)")]


def test_probe_sections_are_cut_at_the_marker_lines_only() -> None:
    from clusterctl.deploy.facts import parse_found, parse_sections

    m = "@@clusterctl-0a1b2c@@"
    text = (f"{m}uname\nLinux x86_64\n{m}manifest\n{{\"a\": 1}}\nnot @@clusterctl-0a1b2c@@x at the start\n"
            f"{m}found\n/opt/x\n--\ncmake\n{m}empty\n")
    out = parse_sections("noise before\n" + text, m)
    assert out == {"uname": "Linux x86_64", "manifest": "{\"a\": 1}\nnot @@clusterctl-0a1b2c@@x at the start",
                   "found": "/opt/x\n--\ncmake", "empty": ""}
    assert parse_found(out["found"] + "\n") == ({"/opt/x"}, {"cmake"})
    assert parse_found("--\n") == (set(), set())
