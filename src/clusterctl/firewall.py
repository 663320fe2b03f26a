"""Which services get a host firewall rule, and from which addresses their port is accepted.

Engines without authentication (rpc-server, mlx-lm, Ollama, exo) may listen off loopback only
behind a rule that accepts their port from the nodes that use them: an rpc-server worker's
heads, the router's node for a routed service, and the service's own `allow_from`. Everything
else that reaches the port is dropped. Systemd units apply the rule before the engine starts
(nftables, iptables where nft is missing); a node with neither refuses to start the service.
Pure: it reads the inventory only.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re

from clusterctl.inventory import Inventory
from clusterctl.layout import WILDCARDS, address


def sources(inv: Inventory, name: str) -> list[str]:
    """The allowed addresses or networks: the clients' node addresses and allow_from (the
    inventory has refused a node to allow whose address is not an IP)."""
    svc = inv.services[name]
    own = set(svc.node_names)  # its own node reaches it over loopback, which is always accepted
    out = {address(inv.nodes[e]) if e in inv.nodes else e for e in [*inv.clients(name), *svc.allow_from]
           if e not in own}
    return sorted(out, key=_sort_key)


def _sort_key(value: str) -> tuple[int, str]:
    net = ipaddress.ip_network(value, strict=False)
    return net.version, str(net)


def family(bind: str) -> tuple[int, ...]:
    """The IP versions the rule covers: the bind address's, both for a wildcard bind."""
    if bind == "0.0.0.0":
        return (4,)
    if bind in WILDCARDS:
        return (4, 6)
    return (ipaddress.ip_address(bind).version,)


def table(service: str) -> str:
    """The nftables table of the service (a name nft takes unquoted)."""
    return "clusterctl_" + re.sub(r"[^A-Za-z0-9_]", "_", service)


def chain(service: str) -> str:
    """The iptables chain of the service: at most 28 characters, unique per service name."""
    digest = hashlib.sha256(service.encode()).hexdigest()[:6]
    return f"CC-{service[:18]}-{digest}"
