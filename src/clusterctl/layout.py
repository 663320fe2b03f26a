"""Where things live on a node, and how a node reaches a service. One place, so render,
deploy, verify and status agree. Pure: it reads the inventory only."""

from __future__ import annotations

from clusterctl.inventory import Inventory, Node

LINUX_BASE = "/opt/clusterctl"
MACOS_BASE = "/usr/local/clusterctl"
SECRETS_DIR = "/etc/clusterctl/secrets"
ROUTER_SERVICE = "clusterctl-router"
ROUTER = "router"  # the router's service name in deploy's steps
ROUTER_HEALTH = "/health"
WILDCARDS = ("0.0.0.0", "::")


def base_dir(node: Node) -> str:
    return MACOS_BASE if node.os == "macos" else LINUX_BASE


def engine_dir(node: Node) -> str:
    return f"{base_dir(node)}/engines"


def llama_bin(node: Node, name: str) -> str:
    return f"{engine_dir(node)}/llama.cpp/bin/{name}"


def secret_path(owner: str) -> str:
    return f"{SECRETS_DIR}/{owner}.key"


def unit_name(service: str) -> str:
    return f"clusterctl-{service}"


def launchd_label(service: str) -> str:
    return f"io.clusterctl.{service}"


def script_path(node: Node, service: str) -> str:
    return f"{base_dir(node)}/bin/{service}.sh"


COMPANIONS = ("stop", "firewall", "post")  # a container's stop, a port's firewall rule, a post-start step


def companion_script(node: Node, service: str, role: str) -> str:
    """A script the service's unit runs besides its launch script (one of COMPANIONS)."""
    assert role in COMPANIONS, role
    return f"{base_dir(node)}/bin/{service}-{role}.sh"


def log_path(node: Node, service: str) -> str:
    return f"{base_dir(node)}/log/{service}.log"


def model_path(inv: Inventory, node: Node, model_name: str) -> str:
    """Where the model's first file lives on the node."""
    model = inv.models[model_name]
    files = model.files or [model.source.rstrip("/").rsplit("/", 1)[-1]]
    return f"{inv.models_dir(node)}/{model_name}/{files[0]}"


def model_dir(inv: Inventory, node: Node, model_name: str) -> str:
    return f"{inv.models_dir(node)}/{model_name}"


def address(node: Node) -> str:
    return node.private_address or node.address


def local_host(bind: str) -> str:
    """The address that reaches a service bound to `bind` from its own node: loopback of the
    same family for a wildcard (a socket on '::' may be IPv6-only)."""
    if bind == "::":
        return "::1"
    return "127.0.0.1" if bind in WILDCARDS else bind


def host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 literal in brackets ('[::1]:8080'), as URLs and
    llama.cpp's --rpc endpoints need it."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def http_url(host: str, port: int, path: str = "", scheme: str = "http") -> str:
    """An http URL of a host (name, IPv4 or IPv6 literal) and port, e.g. 'http://[::1]:8080/health'."""
    return f"{scheme}://{host_port(host, port)}{path}"


def rpc_endpoint(inv: Inventory, worker: str) -> tuple[str, int]:
    """Where a head reaches an rpc-server worker: its bind address, or its node's address."""
    wsvc = inv.services[worker]
    host = wsvc.bind if wsvc.bind not in WILDCARDS else address(inv.nodes[wsvc.node_names[0]])
    return host, wsvc.default_port


def node_name(inv: Inventory, node: Node) -> str:
    for name, n in inv.nodes.items():
        if n is node:
            return name
    raise KeyError(node.address)


def systemd_unit_file(service: str) -> str:
    return f"/etc/systemd/system/{unit_name(service)}.service"


def launchd_plist(service: str) -> str:
    return f"/Library/LaunchDaemons/{launchd_label(service)}.plist"


def control_script(node: Node, service: str) -> str:
    """The direct manager's start/stop/restart/status script of a service."""
    return f"{base_dir(node)}/bin/{service}-ctl.sh"


def pid_file(node: Node, service: str) -> str:
    return f"{base_dir(node)}/run/{service}.pid"
