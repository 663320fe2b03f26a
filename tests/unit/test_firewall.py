"""The firewall rule of engines without authentication: when the inventory needs one, from which
addresses it accepts the port, the exact script the unit runs first, and that script run for
real in a network namespace of its own with nftables, with iptables where nft is missing, and
with neither (it refuses)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from clusterctl import firewall
from clusterctl.errors import InventoryErrors
from clusterctl.inventory import Inventory, load_inventory
from clusterctl.planner import make_plan
from clusterctl.render import render

BASE = {
    "cluster": {"name": "fw"},
    "nodes": {
        "head": {"address": "10.1.0.1", "ram": "16GiB"},
        "w": {"address": "10.1.0.2", "ram": "16GiB"},
        "r": {"address": "10.1.0.3", "ram": "16GiB"},
        "mac": {"address": "mac.local", "os": "macos", "unified_memory": "64GiB"},
    },
    "models": {"m": {"source": "hf://org/repo/m.gguf"}, "x": {"source": "hf://org/mlx-m", "format": "mlx"}},
}


def inv_of(services: dict[str, object], router: dict[str, object] | None = None) -> Inventory:
    data: dict[str, object] = {**BASE, "services": services}
    if router is not None:
        data["router"] = router
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fw.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_inventory(path)


def errors_of(services: dict[str, object], router: dict[str, object] | None = None) -> list[str]:
    try:
        inv_of(services, router)
    except InventoryErrors as exc:
        return [e.message for e in exc.errors]
    return []


RPC = {
    "head": {"engine": "llama-server", "node": "head", "model": "m", "port": 8080, "rpc_workers": ["rpc"]},
    "rpc": {"engine": "rpc-server", "node": "w", "port": 50052, "bind": "10.1.0.2"},
}
MLX = {"mlx": {"engine": "mlx-lm", "node": "w", "model": "x", "port": 8090, "bind": "10.1.0.2"}}
ROUTER = {"node": "r", "port": 9000, "default": ["mlx"]}


def test_an_rpc_worker_off_loopback_accepts_its_heads_address_only() -> None:
    inv = inv_of(RPC)
    assert inv.services["rpc"].firewalled("systemd") is True
    assert inv.clients("rpc") == ["head"]
    assert firewall.sources(inv, "rpc") == ["10.1.0.1"]
    assert inv.services["head"].firewalled("systemd") is False  # bound to loopback


def test_a_routed_mlx_lm_accepts_the_routers_node_and_allow_from() -> None:
    services = {"mlx": {**MLX["mlx"], "allow_from": ["head", "192.168.7.0/24", "fd00::5"]}}
    inv = inv_of(services, ROUTER)
    assert inv.clients("mlx") == ["r"]
    assert firewall.sources(inv, "mlx") == ["10.1.0.1", "10.1.0.3", "192.168.7.0/24", "fd00::5"]


def test_the_unit_applies_the_rule_before_the_engine_and_the_script_is_exact() -> None:
    files = {(f.node, f.path): f for f in render(inv_of(MLX, ROUTER)).files}
    unit = files[("w", "/etc/systemd/system/clusterctl-mlx.service")].content
    lines = unit.splitlines()
    pre = lines.index("ExecStartPre=+/opt/clusterctl/bin/mlx-firewall.sh")
    assert lines[pre + 1] == "ExecStart=/opt/clusterctl/bin/mlx.sh"
    script = files[("w", "/opt/clusterctl/bin/mlx-firewall.sh")]
    assert script.mode == 0o755 and script.restarts == ("mlx",)
    assert "\t\ttcp dport 8090 ip saddr { 10.1.0.3 } accept\n" in script.content
    assert "\t\ttcp dport 8090 drop\n" in script.content
    assert "ip6 saddr" not in script.content and "ip6tables" not in script.content
    assert "  iptables -w -A CC-mlx-" in script.content
    assert ("head", "/opt/clusterctl/bin/mlx-firewall.sh") not in files
    # the router's node is the only one that reaches it: no unit elsewhere carries a rule
    assert [p for (_, p) in files if p.endswith("-firewall.sh")] == ["/opt/clusterctl/bin/mlx-firewall.sh"]


@pytest.mark.parametrize(("services", "router", "expected"), [
    ({"mlx": {**MLX["mlx"], "firewall": False}}, ROUTER,
     "services.mlx.firewall: mlx-lm has no authentication and must not bind 10.1.0.2 without the firewall"),
    ({"mlx": {**MLX["mlx"], "node": "mac", "bind": "10.1.0.9"}}, None,
     "services.mlx.bind: node 'mac' uses launchd: clusterctl applies firewall rules in systemd units only"),
    ({"s": {"engine": "llama-server", "node": "w", "model": "m", "port": 8080, "firewall": True}}, None,
     "services.s.firewall: firewall: true has nothing to guard: the service binds 127.0.0.1"),
    ({"s": {"engine": "llama-server", "node": "w", "model": "m", "port": 8080, "allow_from": ["head"]}}, None,
     "services.s.allow_from: allow_from needs the firewall"),
    ({"mlx": {**MLX["mlx"], "allow_from": ["nosuch"]}}, None, "services.mlx.allow_from.0: unknown node 'nosuch'"),
    ({"mlx": {**MLX["mlx"], "allow_from": ["not an address!"]}}, None,
     "services.mlx.allow_from: allow_from 'not an address!' is neither a node name nor an IP address or network"),
    ({"mlx": {**MLX["mlx"], "node": "w", "allow_from": ["mac"]}}, None,
     "services.mlx.firewall: the firewall needs node 'mac''s IP address; its address is 'mac.local'"),
    ({"s": {"engine": "llama-server", "node": "w", "model": "m", "port": 8080, "bind": "10.1.0.2"}}, None,
     "services.s.bind: service binds 10.1.0.2 without an api_key"),
])
def test_bad_firewall_settings_are_refused(services: dict[str, object], router: dict[str, object] | None,
                                           expected: str) -> None:
    assert expected in errors_of(services, router)


def test_an_engine_with_a_key_may_ask_for_the_firewall_instead() -> None:
    services = {"s": {"engine": "llama-server", "node": "w", "model": "m", "port": 8080, "bind": "10.1.0.2",
                      "firewall": True}}
    inv = inv_of(services, {"node": "r", "port": 9000, "default": ["s"]})
    files = {f.path: f.content for f in render(inv).files if f.node == "w"}
    assert "\t\ttcp dport 8080 ip saddr { 10.1.0.3 } accept\n" in files["/opt/clusterctl/bin/s-firewall.sh"]


# --- the script for real, in a network namespace of its own ---------------------------------------

def _script(tmp_path: Path) -> Path:
    services = {"mlx": {**MLX["mlx"], "allow_from": ["192.168.7.0/24"]}}
    content = next(f.content for f in render(inv_of(services, ROUTER)).files if f.path.endswith("-firewall.sh"))
    path = tmp_path / "fw.sh"
    path.write_text(content)
    return path


def _bin_with(tmp_path: Path, *tools: str) -> str:
    """A PATH holding only bash and `tools` (the real programs, linked)."""
    folder = tmp_path / ("bin-" + "-".join(tools or ("none",)))
    folder.mkdir()
    for tool in ("bash", "env", *tools):
        real = shutil.which(tool)
        assert real, f"{tool} is not installed"
        (folder / tool).symlink_to(real)
    return str(folder)


def _in_netns(path: str, script: Path, then: str) -> subprocess.CompletedProcess[str]:
    """Run the script twice (it must be idempotent), then `then`, in a new network namespace."""
    body = f'PATH={path} bash {script} && PATH={path} bash {script} && {then}'
    return subprocess.run(["unshare", "--net", "bash", "-c", body], capture_output=True, text=True, check=False,
                          env={**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.mark.real
@needs_root
def test_with_nftables_the_table_is_exact_after_two_runs(tmp_path: Path) -> None:
    proc = _in_netns(_bin_with(tmp_path, "nft"), _script(tmp_path), "nft list ruleset")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "table inet clusterctl_mlx {\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter; policy accept;\n"
        '\t\tiifname "lo" tcp dport 8090 accept\n'
        "\t\ttcp dport 8090 ip saddr { 10.1.0.3, 192.168.7.0/24 } accept\n"
        "\t\ttcp dport 8090 drop\n"
        "\t}\n"
        "}\n")


@pytest.mark.real
@needs_root
def test_without_nft_iptables_gets_one_chain_after_two_runs(tmp_path: Path) -> None:
    proc = _in_netns(_bin_with(tmp_path, "iptables", "xtables-nft-multi", "iptables-nft"), _script(tmp_path),
                     "iptables -S")
    assert proc.returncode == 0, proc.stderr
    c = firewall.chain("mlx")
    assert proc.stdout.splitlines() == [
        "-P INPUT ACCEPT", "-P FORWARD ACCEPT", "-P OUTPUT ACCEPT", f"-N {c}",
        f"-A INPUT -p tcp -j {c}",
        f"-A {c} -i lo -j RETURN",
        f"-A {c} -s 10.1.0.3/32 -p tcp -m tcp --dport 8090 -j RETURN",
        f"-A {c} -s 192.168.7.0/24 -p tcp -m tcp --dport 8090 -j RETURN",
        f"-A {c} -p tcp -m tcp --dport 8090 -j DROP"]


@pytest.mark.real
@needs_root
def test_with_neither_the_service_does_not_start(tmp_path: Path) -> None:
    proc = _in_netns(_bin_with(tmp_path), _script(tmp_path), "true")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "mlx: neither nft nor iptables on this node; refusing to start with port 8090 open",
        "hint: install nftables (or iptables), or bind the service to 127.0.0.1"]


@pytest.mark.real
def test_the_script_passes_shellcheck(tmp_path: Path) -> None:
    proc = subprocess.run(["shellcheck", "--severity=style", str(_script(tmp_path))], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout



def test_the_plan_warns_about_an_open_rpc_worker_only() -> None:
    def warnings(rpc: dict[str, object]) -> list[str]:
        plan = make_plan(inv_of({"rpc": rpc}), {})
        return [f.message for f in plan.findings if f.subject == "rpc" and "authentication" in f.message]

    rpc = {"engine": "rpc-server", "node": "w", "port": 50052, "bind": "10.1.0.2"}
    assert warnings(rpc) == []
    assert warnings({**rpc, "firewall": False}) == [
        "rpc-server has no authentication: port 50052 on w must be reachable only from the head node"]
    assert warnings({**rpc, "bind": "127.0.0.1"}) == []
