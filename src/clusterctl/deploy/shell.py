"""The shell programs deploy runs on nodes, kept as package data (`scripts/*.sh`, linted by
shellcheck in the tests). Each is run as `bash -c TEXT NAME ARGS...`: nothing is installed
on the node first, so a dry run and a first deploy need nothing there but bash."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

SCRIPTS = ("probe", "sha256", "tcp-probe", "build-llama", "venv", "unfirewall")


@cache
def text(name: str) -> str:
    if name not in SCRIPTS:
        raise KeyError(f"no script {name!r}")
    return (files("clusterctl.deploy") / "scripts" / f"{name}.sh").read_text()


def argv(name: str, *args: str) -> list[str]:
    """The command that runs script `name` with `args` (the shell from its shebang)."""
    body = text(name)
    shell = "sh" if body.startswith("#!/bin/sh") else "bash"
    return [shell, "-c", body, f"clusterctl-{name}", *args]
