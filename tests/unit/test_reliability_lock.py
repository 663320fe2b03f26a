"""The cluster lock's stale record (docs/reliability.md, "Locking and interruption").

A deploy that did not finish (killed, crashed) leaves its record in the lock file; the next
deploy must say so. No node is needed: the inventory's node is a `ConnectionCounter`.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.errors import ExitCode
from tests.faults import ROOT, ConnectionCounter, cli_argv, wait_for

runner = CliRunner()
STALE = {"pid": 4242, "host": "controller-7", "started": "2025-01-02T03:04:05+0000"}
WARNING = ("warning: the previous deploy (pid 4242, started 2025-01-02T03:04:05+0000) did not finish; "
           "this one reconciles from the nodes' actual state")


def stale_inventory(tmp_path: Path, counter: ConnectionCounter, connect_timeout: str = "1s") -> Path:
    path = tmp_path / "inv.yaml"
    path.write_text(f"""\
cluster:
  name: stale
  ssh: {{known_hosts: '{tmp_path / "known_hosts"}', connect_timeout: {connect_timeout}}}
nodes:
  n1: {{address: {counter.host}, port: {counter.port}, ram: 4GiB}}
services:
  web: {{engine: custom, node: n1, port: 8080, command: [python3, -m, http.server, '8080']}}
""")
    tmp_path.joinpath(".inv.deploy.lock").write_text(json.dumps(STALE))
    return path


def test_stale_record_is_reported_by_the_next_deploy(tmp_path: Path) -> None:
    with ConnectionCounter() as counter:
        path = stale_inventory(tmp_path, counter)
        result = runner.invoke(app, ["deploy", "--inventory", str(path)])
    assert result.exit_code == ExitCode.NETWORK  # the node is a mere TCP listener: unreachable
    assert WARNING in " ".join(result.stderr.split())
    assert tmp_path.joinpath(".inv.deploy.lock").read_text() == ""  # this run finished: record cleared


def test_stale_record_is_reported_with_json_output(tmp_path: Path) -> None:
    with ConnectionCounter() as counter:
        path = stale_inventory(tmp_path, counter)
        result = runner.invoke(app, ["deploy", "--inventory", str(path), "--json"])
    assert result.exit_code == ExitCode.NETWORK
    data = json.loads(result.stdout)
    assert WARNING in " ".join(result.stderr.split()) or "stale" in json.dumps(data)


def test_ctrl_c_is_reported(tmp_path: Path) -> None:
    with ConnectionCounter(hold=True) as counter:  # the node never answers: the deploy waits on it
        path = stale_inventory(tmp_path, counter, connect_timeout="3s")
        proc = subprocess.Popen(cli_argv("deploy", "--inventory", str(path)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            wait_for("the deploy to reach the node", lambda: counter.count >= 1, 20)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 130
    assert "interrupted" in err
