"""What a service manager is to deploy, verify and status: the handle facts are keyed by, the
exact commands that reload, (re)start, stop and inspect a service, and parsers of their output.
Pure: a manager builds commands; the executor (or a read-only check) runs them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from clusterctl.inventory import Node

Argv = tuple[str, ...]
Pattern = tuple[str, str, str]  # (folder, prefix, suffix) of a service's file: FOLDER/PREFIX<service>SUFFIX


def pattern(path_of_any: str) -> Pattern:
    """(folder, prefix, suffix) of a path layout.py built for the service named `*`."""
    folder, _, name = path_of_any.rpartition("/")
    prefix, star, suffix = name.partition("*")
    assert star, path_of_any
    return folder, prefix, suffix


@dataclass(frozen=True)
class Control:
    """One command of a control sequence; `check`: its failure fails the sequence."""

    argv: Argv
    check: bool = True
    timeout: float = 120.0


@dataclass(frozen=True)
class Inspect:
    """What `inspect` learnt of a running service."""

    alive: bool  # running, or starting: not crashed, not stopped
    state: str  # the manager's word: active, activating, running, inactive, failed, ...
    pid: int = 0
    memory: int = 0  # bytes, when the manager accounts for it (systemd's MemoryCurrent)


class ServiceManager(Protocol):
    name: str

    def handle(self, node: Node, service: str) -> str:
        """What identifies the service to this manager (and keys NodeFacts.units)."""
        ...

    def unit_file(self, node: Node, service: str) -> str:
        """The file that defines the service to the manager."""
        ...

    def reload(self) -> list[Control]:
        """After unit files changed."""
        ...

    def restart(self, node: Node, service: str) -> list[Control]: ...
    def stop(self, node: Node, service: str) -> list[Control]: ...

    def remove(self, node: Node, service: str) -> list[Control]:
        """Stop the service for good (and disable it) before its files are deleted."""
        ...

    def installed(self, node: Node) -> Pattern:
        """Where the files that define clusterctl's services to this manager are, as
        (folder, prefix, suffix): the probe lists the folder's `PREFIX*SUFFIX` files."""
        ...

    def inspect(self, node: Node, service: str) -> Control:
        """A read-only command whose output `parse_inspect` reads."""
        ...

    def parse_inspect(self, rc: int, out: str) -> Inspect: ...

    def logs(self, node: Node, service: str, lines: int = 25) -> Control:
        """A read-only command printing the service's last log lines."""
        ...

    def look(self, node: Node, service: str) -> str:
        """The command a person runs to see the service's state."""
        ...

    def errors(self, node: Node, service: str) -> Control | None:
        """A read-only command printing its recent error lines, when the manager keeps levels."""
        ...
