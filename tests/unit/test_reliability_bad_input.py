"""Bad input is refused before any node is contacted (docs/reliability.md, "Bad input").

Every inventory here points its node at a `ConnectionCounter`: a TCP listener on 127.0.0.2
(loopback, but not an address clusterctl treats as the controller itself, so a node there is
reached over SSH). A command that tried to reach the node would show up in its count. Each bad
inventory must give a clear error with file:line:col, the documented exit code, at once, and
leave the count at zero; a valid inventory (the control) does connect.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.errors import ExitCode
from tests import assets
from tests.faults import ConnectionCounter

runner = CliRunner()

BASE = """\
cluster:
  name: bad
  ssh: {{user: root, known_hosts: '{known_hosts}', connect_timeout: 2s}}
nodes:
  n1:
    address: {host}
    port: {port}
    ram: 4GiB
    accelerators: [{{kind: cuda, count: 1, memory: 24GiB}}]
models:
  m: {{source: 'file://{model}'}}
services:
  chat:
    engine: custom
    node: n1
    port: 8080
    command: [python3, -m, http.server, '8080']
"""

VLLM = """\
  a: {engine: vllm, node: n1, model: m, port: 8001, devices: [0]}
  b: {engine: vllm, node: n1, model: m, port: 8002, devices: [0]}
"""

# (case, edit of the valid text, the text of the line the error must point at, message part)
Edit = Callable[[str], str]
CASES: list[tuple[str, Edit, str, str]] = [
    # the parser notices the unclosed '[' where the next key starts
    ("yaml-syntax", lambda t: t.replace("    port: 8080", "    port: [8080"), "    command:",
     "YAML syntax error: expected ',' or ']'"),
    ("unknown-key", lambda t: t.replace("    port: 8080", "    prot: 8080"), "    prot: 8080",
     "services.chat: unknown key 'prot'"),
    ("wrong-type", lambda t: t.replace("    port: 8080", "    port: eighty"), "    port: eighty",
     "services.chat.port: Input should be a valid integer"),
    ("duplicate-key", lambda t: t + "    port: 8081\n", "    port: 8081",
     "duplicate key 'port' (first defined on line 16)"),
    ("duplicate-port", lambda t: t + "  chat2: {engine: custom, node: n1, port: 8080, command: [x]}\n",
     "  chat2:", "port 8080 on node 'n1' is already used by service 'chat'"),
    ("duplicate-gpu", lambda t: t + VLLM, "  b:", "GPU 0 of node 'n1' is already given to vLLM service 'a'"),
    ("hostile-name", lambda t: t.replace("  chat:", '  "x;reboot":'), '  "x;reboot":', "is not allowed"),
    ("hostile-address", lambda t: t.replace("    address: ", "    address: 'reboot;' #"), "    address: 'reboot;'",
     "is not an IP address or host name"),
    ("public-bind-without-key", lambda t: t + "    bind: 0.0.0.0\n", "    bind: 0.0.0.0",
     "service binds 0.0.0.0 without an api_key"),
]
# commands that reach nodes when the inventory is valid
COMMANDS = [["deploy", "-i"], ["deploy", "--dry-run", "-i"], ["verify", "-i"], ["trust", "n1", "-i"]]


@pytest.fixture
def counter() -> Iterator[ConnectionCounter]:
    with ConnectionCounter() as c:
        yield c


def valid(tmp_path: Path, counter: ConnectionCounter) -> str:
    model = assets.write_llama_like(tmp_path / "tiny.gguf")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    return BASE.format(host=counter.host, port=counter.port, model=model, known_hosts=known_hosts)


def run(command: list[str], path: Path) -> tuple[int, str, float]:
    started = time.monotonic()
    result = runner.invoke(app, [*command, str(path)])
    return result.exit_code, result.output, time.monotonic() - started


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith(needle))


def test_control_a_valid_inventory_does_reach_the_node(tmp_path: Path, counter: ConnectionCounter) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(valid(tmp_path, counter))
    code, output, _ = run(["deploy", "-i"], path)
    assert code == ExitCode.NETWORK, output  # a TCP listener, no SSH: the node is unreachable
    assert counter.count >= 1  # the probe sees connection attempts


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:-1]))
@pytest.mark.parametrize(("case", "edit", "where", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_inventory_is_refused_before_any_connection(tmp_path: Path, counter: ConnectionCounter,
                                                        command: list[str], case: str, edit: Edit,
                                                        where: str, message: str) -> None:
    text = edit(valid(tmp_path, counter))
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    code, output, seconds = run(command, path)
    assert code == ExitCode.INVALID_INVENTORY, output
    assert f"error: {path}:{line_of(text, where)}:" in output, output
    assert message in output, output
    assert seconds < 5
    assert counter.count == 0, f"{case}: a connection was opened"


def test_corrupt_lock_file_is_refused_before_any_connection(tmp_path: Path, counter: ConnectionCounter) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(valid(tmp_path, counter))
    path.with_suffix(".lock").write_text('{"version": 1, "models": {')
    for command in COMMANDS[:3]:
        code, output, _ = run(command, path)
        assert code == ExitCode.INVALID_INVENTORY, output
        assert f"error: {path.with_suffix('.lock')}:1:" in output and "lock file is not valid JSON" in output
    assert counter.count == 0


def _does_not_fit(tmp_path: Path, counter: ConnectionCounter) -> Path:
    """A llama-server whose model needs more memory than its node has (the plan says so)."""
    text = valid(tmp_path, counter).replace("    ram: 4GiB\n    accelerators: [{kind: cuda, count: 1, memory: 24GiB}]",
                                            "    ram: 1MiB")
    text += "  big: {engine: llama-server, node: n1, model: m, port: 8090, context: 4096}\n"
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    resolved = runner.invoke(app, ["resolve", str(path)])
    assert resolved.exit_code == 0, resolved.output
    plan = runner.invoke(app, ["plan", str(path)])
    assert plan.exit_code == ExitCode.DOES_NOT_FIT, plan.output
    assert "big: does not fit" in plan.output
    return path


def test_model_that_does_not_fit_is_refused_before_any_connection(tmp_path: Path,
                                                                  counter: ConnectionCounter) -> None:
    path = _does_not_fit(tmp_path, counter)
    code, output, seconds = run(["deploy", "-i"], path)
    assert code != 0 and seconds < 5
    assert "error: the plan has errors; deploy refuses to start services that do not fit" in output
    assert counter.count == 0


def test_model_that_does_not_fit_exits_with_does_not_fit(tmp_path: Path, counter: ConnectionCounter) -> None:
    path = _does_not_fit(tmp_path, counter)
    code, output, _ = run(["deploy", "-i"], path)
    assert code == ExitCode.DOES_NOT_FIT, output
