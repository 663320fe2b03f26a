"""No accidental targets: the commands that reach nodes take their inventory from -i only, and
deploy starts nothing the plan has not fitted.

The inventory's node is a `ConnectionCounter`: any attempt to reach it shows in its count.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.errors import ExitCode
from tests import assets
from tests.faults import ConnectionCounter

runner = CliRunner()

# the commands that reach nodes, each with the positional arguments it needs
REACHING = [["deploy"], ["deploy", "--dry-run"], ["verify"], ["bench"], ["status", "--once"], ["trust", "n1"]]


@pytest.fixture
def counter() -> Iterator[ConnectionCounter]:
    with ConnectionCounter() as c:
        yield c


def write_inventory(tmp_path: Path, counter: ConnectionCounter, name: str = "inv.yaml") -> Path:
    model = assets.write_llama_like(tmp_path / "tiny.gguf")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    path = tmp_path / name
    path.write_text(f"""\
cluster:
  name: targets
  ssh: {{user: root, known_hosts: '{known_hosts}', connect_timeout: 2s}}
nodes:
  n1: {{address: {counter.host}, port: {counter.port}, ram: 4GiB}}
  n2: {{address: {counter.host}, port: {counter.port}, ram: 4GiB}}
models:
  m: {{source: 'file://{model}'}}
services:
  chat: {{engine: llama-server, node: n1, model: m, port: 8080, context: 512}}
""")
    return path


def invoke(args: list[str]) -> tuple[int, str]:
    """Exit code and stderr with its line wrapping undone (rich wraps at the terminal width)."""
    result = runner.invoke(app, args)
    return result.exit_code, " ".join(result.stderr.split())


# -- -i is required ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", REACHING, ids=" ".join)
def test_command_that_reaches_nodes_without_inventory_is_a_usage_error(command: list[str]) -> None:
    code, err = invoke(command)
    assert code == ExitCode.USAGE == 2
    usage = " NODE" if command[0] == "trust" else ""
    assert err == (f"error: missing option -i/--inventory: {command[0]} reaches nodes and has no default "
                   f"inventory hint: clusterctl {command[0]} -i INVENTORY.yaml{usage}")


@pytest.mark.parametrize(("command", "rest"), [("deploy", ""), ("verify", " n2"), ("bench", " chat"), ("trust", "")])
def test_inventory_given_positionally_is_named_in_the_hint(tmp_path: Path, counter: ConnectionCounter,
                                                           command: str, rest: str) -> None:
    path = write_inventory(tmp_path, counter)
    code, err = invoke([command, str(path), *rest.split()])
    assert code == ExitCode.USAGE
    usage = rest or (" NODE" if command == "trust" else "")
    assert err == (f"error: missing option -i/--inventory: {command} reaches nodes and has no default "
                   f"inventory hint: '{path}' is an inventory file: clusterctl {command} -i {path}{usage}")
    assert counter.count == 0


@pytest.mark.parametrize("command", ["deploy", "verify", "bench", "status", "trust"])
def test_help_says_the_inventory_is_required(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "-i, --inventory <path> inventory YAML (required: commands that reach nodes have no default)" in text


@pytest.mark.parametrize("command", [["plan", "--json"], ["validate", "--json"]])
def test_offline_commands_keep_the_bundled_default(command: list[str]) -> None:
    result = runner.invoke(app, command)
    assert result.exit_code in (0, ExitCode.DOES_NOT_FIT), result.output
    assert '"beefcake2' in result.stdout or "beefcake2.yaml" in result.stdout


# -- unknown names ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["verify"], ["deploy"], ["trust"]], ids=" ".join)
def test_inventory_file_given_as_a_node_is_an_unknown_node(tmp_path: Path, counter: ConnectionCounter,
                                                           command: list[str]) -> None:
    path = write_inventory(tmp_path, counter)
    code, err = invoke([*command, "-i", str(path), str(path)])
    assert code == ExitCode.USAGE
    assert err == (f"error: unknown node '{path}' hint: '{path}' is an inventory file: an inventory goes "
                   f"after -i, not as a node; nodes in {path}: n1, n2")
    assert counter.count == 0


def test_unknown_nodes_are_listed_with_the_known_ones(tmp_path: Path, counter: ConnectionCounter) -> None:
    path = write_inventory(tmp_path, counter)
    code, err = invoke(["verify", "-i", str(path), "n1", "nx", "ny"])
    assert code == ExitCode.USAGE
    assert err == f"error: unknown nodes 'nx', 'ny' hint: nodes in {path}: n1, n2"
    assert counter.count == 0


def test_a_missing_file_given_as_a_service_is_called_a_file(tmp_path: Path, counter: ConnectionCounter) -> None:
    path = write_inventory(tmp_path, counter)
    code, err = invoke(["bench", "-i", str(path), "other.yaml"])
    assert code == ExitCode.USAGE
    assert err == (f"error: unknown service 'other.yaml' hint: 'other.yaml' looks like a file: an inventory "
                   f"goes after -i, not as a service; services in {path}: chat")
    assert counter.count == 0


# -- deploy plans before it starts anything ---------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--dry-run"], ["--json"]], ids=lambda e: " ".join(e) or "plain")
def test_deploy_without_lock_file_is_refused_before_any_connection(tmp_path: Path, counter: ConnectionCounter,
                                                                   extra: list[str]) -> None:
    path = write_inventory(tmp_path, counter)
    code, err = invoke(["deploy", "-i", str(path), *extra])
    assert code == ExitCode.METADATA == 5
    assert err == (f"error: cannot plan the deploy: no pinned metadata for m in {path.with_suffix('.lock')} "
                   f"hint: run `clusterctl resolve {path}` (header reads only, no weights), check "
                   f"`clusterctl plan {path}`, then deploy")
    assert counter.count == 0
    assert not path.with_suffix(".lock").exists()  # deploy does not write the lock file


def test_deploy_with_a_stale_lock_entry_is_refused(tmp_path: Path, counter: ConnectionCounter) -> None:
    path = write_inventory(tmp_path, counter)
    assert runner.invoke(app, ["resolve", str(path)]).exit_code == 0
    other = assets.write_llama_like(tmp_path / "other.gguf")
    path.write_text(path.read_text().replace(str(tmp_path / "tiny.gguf"), str(other)))
    code, err = invoke(["deploy", "-i", str(path)])
    assert code == ExitCode.METADATA
    assert (f"error: cannot plan the deploy: no pinned metadata for m in {path.with_suffix('.lock')} "
            "(m: source changed since it was locked) hint: run `clusterctl resolve") in err
    assert counter.count == 0


def test_control_deploy_after_resolve_reaches_the_node(tmp_path: Path, counter: ConnectionCounter) -> None:
    path = write_inventory(tmp_path, counter)
    resolved = runner.invoke(app, ["resolve", str(path)])
    assert resolved.exit_code == 0, resolved.output
    code, err = invoke(["deploy", "-i", str(path)])
    assert code == ExitCode.NETWORK, err  # the node is a mere TCP listener: unreachable over SSH
    assert counter.count >= 1
