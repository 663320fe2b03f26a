"""Service managers: one module per manager (systemd, launchd, direct), each the single
answer to how a service is controlled and inspected on a node of that kind.

A new manager is one module here with a class satisfying `ServiceManager` and a `MANAGER`,
plus its name in `MANAGERS` (and the inventory's node `manager` literal)."""

from __future__ import annotations

from clusterctl.deploy.managers import direct, launchd, systemd
from clusterctl.deploy.managers.base import Control, Inspect, ServiceManager
from clusterctl.inventory import Node

MANAGERS: dict[str, ServiceManager] = {m.MANAGER.name: m.MANAGER for m in (systemd, launchd, direct)}

__all__ = ["MANAGERS", "Control", "Inspect", "ServiceManager", "manager"]


def manager(node: Node) -> ServiceManager:
    assert node.manager is not None  # the inventory fills it in from the node's os
    return MANAGERS[node.manager]
