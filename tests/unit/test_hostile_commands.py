"""Hostile and odd command lines: no traceback, no hang, nothing half-written. Each case exits
with its documented code (docs/commands.md) and says what to do; see docs/reliability.md."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.errors import ExitCode
from tests import assets
from tests.faults import ConnectionCounter
from tests.unit.test_cli_targets import write_inventory

runner = CliRunner()


@pytest.fixture
def counter() -> Iterator[ConnectionCounter]:
    with ConnectionCounter() as c:
        yield c


def invoke(args: list[str]) -> tuple[int, str, str]:
    """Exit code, stdout, and stderr with its line wrapping undone (rich wraps at the terminal width)."""
    result = runner.invoke(app, args)
    return result.exit_code, result.stdout, " ".join(result.stderr.split())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_inventory(tmp_path: Path, port: int) -> Path:
    """One llama-server on this machine (a localhost node runs its commands here) at `port`."""
    model = assets.write_llama_like(tmp_path / "tiny.gguf")
    path = tmp_path / "local.yaml"
    path.write_text(f"""\
cluster:
  name: local
nodes:
  here: {{address: 127.0.0.1, ram: 4GiB}}
models:
  m: {{source: 'file://{model}'}}
services:
  chat: {{engine: llama-server, node: here, model: m, port: {port}, context: 512}}
""")
    return path


# -- 1. bench -------------------------------------------------------------------------------


@pytest.mark.parametrize("json_output", [False, True], ids=["text", "json"])
def test_bench_against_a_stopped_service_fails_and_saves_nothing(tmp_path: Path, json_output: bool) -> None:
    port = free_port()  # nothing listens there
    path = local_inventory(tmp_path, port)
    code, out, err = invoke(["bench", "-i", str(path), "--concurrency", "1", "--prompt-tokens", "16",
                             *(["--json"] if json_output else [])])
    assert code == ExitCode.NETWORK == 6
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    assert err.startswith(f"error: chat: no answer from {url} (1 of 1 requests failed: curl: (7) ")
    assert err.endswith("hint: is chat running? `clusterctl status -i "
                        f"{path}` shows it; nothing was stored as a baseline")
    assert not path.with_name(".local.baselines.json").exists()
    if json_output:
        doc = json.loads(out)
        assert doc["error"]["code"] == 6 and doc["error"]["message"].startswith(f"chat: no answer from {url}")
    else:
        assert out == ""


@pytest.mark.parametrize(("args", "message"), [
    (["--concurrency", "0"], "--concurrency 0: each value must be a whole number from 1 to 1024"),
    (["--concurrency", "1,-4"], "--concurrency 1,-4: each value must be a whole number from 1 to 1024"),
    (["--concurrency", "2000"], "--concurrency 2000: each value must be a whole number from 1 to 1024"),
    (["--concurrency", "1,,4"], "--concurrency 1,,4: each value must be a whole number from 1 to 1024"),
    (["--prompt-tokens", "-5"], "--prompt-tokens -5: each value must be a whole number from 1 to 1048576"),
    (["--prompt-tokens", "0"], "--prompt-tokens 0: each value must be a whole number from 1 to 1048576"),
    (["--prompt-tokens", "16,x"], "--prompt-tokens 16,x: each value must be a whole number from 1 to 1048576"),
    (["--prompt-tokens", "10000000000"],
     "--prompt-tokens 10000000000: each value must be a whole number from 1 to 1048576"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_bench_counts_must_be_positive(tmp_path: Path, counter: ConnectionCounter, args: list[str],
                                       message: str) -> None:
    path = write_inventory(tmp_path, counter)
    code, _out, err = invoke(["bench", "-i", str(path), *args])
    assert code == ExitCode.USAGE == 2
    assert err == f"error: {message} hint: comma-separated, e.g. --concurrency 1,4 --prompt-tokens 16,512"
    assert counter.count == 0


@pytest.mark.parametrize(("command", "args", "message", "hint"), [
    ("verify", ["--wait", "-1"], "--wait -1.0: must be a finite number of seconds >= 0", "e.g. --wait 30"),
    ("verify", ["--wait", "nan"], "--wait nan: must be a finite number of seconds >= 0", "e.g. --wait 30"),
    ("verify", ["--wait", "inf"], "--wait inf: must be a finite number of seconds >= 0", "e.g. --wait 30"),
    ("verify", ["--tolerance", "nan"], "--tolerance nan: must be a fraction from 0 to below 1",
     "e.g. --tolerance 0.3 (30% below the baseline)"),
    ("verify", ["--tolerance", "-0.1"], "--tolerance -0.1: must be a fraction from 0 to below 1",
     "e.g. --tolerance 0.3 (30% below the baseline)"),
    ("verify", ["--tolerance", "1"], "--tolerance 1.0: must be a fraction from 0 to below 1",
     "e.g. --tolerance 0.3 (30% below the baseline)"),
    ("status", ["--interval", "-1"], "--interval -1.0: must be a finite number of seconds > 0",
     "e.g. --interval 5"),
    ("status", ["--interval", "0"], "--interval 0.0: must be a finite number of seconds > 0",
     "e.g. --interval 5"),
    ("status", ["--interval", "nan"], "--interval nan: must be a finite number of seconds > 0",
     "e.g. --interval 5"),
    ("deploy", ["--max-fail", "-1"], "--max-fail -1: must be a whole number >= 0",
     "the number of failed nodes tolerated, e.g. --max-fail 1"),
])
def test_durations_and_counts_must_be_sane(tmp_path: Path, counter: ConnectionCounter, command: str,
                                           args: list[str], message: str, hint: str) -> None:
    path = write_inventory(tmp_path, counter)
    code, _out, err = invoke([command, "-i", str(path), *args])
    assert code == ExitCode.USAGE == 2
    assert err == f"error: {message} hint: {hint}"
    assert counter.count == 0


# -- 2. the baselines file ------------------------------------------------------------------


@pytest.mark.parametrize(("content", "message"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "the baselines file is not UTF-8 text (byte 0x89)"),
    (b'[{"tokens_per_second": 10}]', "the baselines file is not a JSON object with 'services'"),
    (b'{"services": [1, 2]}', "the baselines file is not a JSON object with 'services'"),
    (b'{"services": {"chat": {"tokens_per_second": NaN}}}',
     "the baselines file is not valid JSON: NaN is not a number"),
    (b'{"services": ', "the baselines file is not valid JSON: Expecting value"),
])
@pytest.mark.parametrize("command", ["verify", "bench"])
def test_a_bad_baselines_file_is_named_not_a_traceback(tmp_path: Path, counter: ConnectionCounter, command: str,
                                                       content: bytes, message: str) -> None:
    path = write_inventory(tmp_path, counter)
    baselines = tmp_path / ".inv.baselines.json"
    baselines.write_bytes(content)
    code, out, _err = invoke([command, "-i", str(path), "--json"])
    assert code == ExitCode.INVALID_INVENTORY == 3
    doc = json.loads(out)["error"]
    assert doc["message"] == message
    assert doc["location"].startswith(str(baselines))
    assert doc["hint"] == f"bench writes it; delete it and run `clusterctl bench -i {path}` to measure again"
    assert counter.count == 0
    assert baselines.read_bytes() == content


# -- 5. render --out ------------------------------------------------------------------------


def demo() -> str:
    return str(Path(__file__).resolve().parents[2] / "inventories" / "local-demo.yaml")


@pytest.mark.parametrize("target", ["file", "/dev/null", "under-a-file"])
def test_render_out_onto_a_file_is_a_usage_error(tmp_path: Path, target: str) -> None:
    existing = tmp_path / "existing"
    existing.write_text("keep me\n")
    out_dir = {"file": str(existing), "/dev/null": "/dev/null", "under-a-file": str(existing / "sub")}[target]
    code, _out, err = invoke(["render", demo(), "--out", out_dir])
    assert code == ExitCode.USAGE == 2
    blocker = "/dev/null" if target == "/dev/null" else str(existing)
    assert err == (f"error: --out {out_dir}: {blocker} is not a folder hint: name a folder to write the "
                   "rendered tree into (it is created when missing), e.g. --out rendered")
    assert existing.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_render_out_into_a_read_only_folder_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes through the mode bits: make the folder refuse as a read-only mount does
        import clusterctl.tree

        real = clusterctl.tree.tempfile.mkstemp

        def refuse(*args: object, dir: str | None = None, **kwargs: object) -> tuple[int, str]:
            if dir is not None and Path(dir).is_relative_to(folder):
                raise PermissionError(13, "Permission denied", dir)
            return real(*args, dir=dir, **kwargs)  # type: ignore[call-overload,no-any-return]

        monkeypatch.setattr(clusterctl.tree.tempfile, "mkstemp", refuse)
        monkeypatch.setattr(clusterctl.tree.os, "access", lambda p, mode: not Path(p).is_relative_to(folder))
    code, _out, err = invoke(["render", demo(), "--out", str(folder / "tree")])
    assert code == ExitCode.USAGE == 2
    assert err == (f"error: --out {folder / 'tree'}: cannot write in {folder}: permission denied hint: name "
                   "a folder you can write to, e.g. --out rendered")
    assert list(folder.iterdir()) == []


def test_render_diff_exits_with_the_differences_code(tmp_path: Path) -> None:
    out_dir = tmp_path / "tree"
    code, _out, _err = invoke(["render", demo(), "--out", str(out_dir), "--diff"])
    assert code == ExitCode.DIFFERS == 10
    assert not out_dir.exists()
    assert invoke(["render", demo(), "--out", str(out_dir)])[0] == 0
    assert invoke(["render", demo(), "--out", str(out_dir), "--diff"])[0] == 0


# -- 4. one command line ----------------------------------------------------------------------

ALL_COMMANDS = [["validate"], ["plan"], ["render"], ["resolve"], ["deploy"], ["deploy", "--dry-run"], ["verify"],
                ["bench"], ["status", "--once"], ["trust", "n1"]]


@pytest.mark.parametrize("command", [["validate"], ["plan"], ["render", "--diff"]], ids=" ".join)
def test_offline_commands_take_the_inventory_with_i_too(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(Path(demo()).read_text())
    path.with_suffix(".lock").write_text(Path(demo()).with_suffix(".lock").read_text())
    as_option = runner.invoke(app, [*command, "-i", str(path), "--json"])
    positional = runner.invoke(app, [*command, str(path), "--json"])
    assert as_option.exit_code == positional.exit_code
    assert as_option.exit_code in (0, ExitCode.DIFFERS), as_option.output
    assert json.loads(as_option.stdout) == json.loads(positional.stdout)


def test_two_different_inventories_are_a_usage_error(tmp_path: Path) -> None:
    code, _out, err = invoke(["validate", demo(), "-i", str(tmp_path / "other.yaml")])
    assert code == ExitCode.USAGE
    assert err == f"error: two inventories given: {demo()} and -i {tmp_path / 'other.yaml'} hint: give one, after -i"


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=" ".join)
@pytest.mark.parametrize("case", ["missing", "unreadable"])
def test_a_missing_or_unreadable_inventory_is_one_code_in_every_command(tmp_path: Path, command: list[str],
                                                                        case: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = tmp_path / "missing.yaml" if case == "missing" else blocker / "inv.yaml"  # ENOTDIR: cannot be read
    code, out, err = invoke([command[0], "-i", str(path), *command[1:], "--json"]
                            if command[0] != "trust" else ["trust", "-i", str(path), "n1", "--json"])
    assert code == ExitCode.INVALID_INVENTORY == 3
    if case == "missing":
        assert err == f"error: no such file: {path} hint: pass the inventory path, e.g. inventories/local-demo.yaml"
    else:
        assert err == f"error: {path}: cannot read the inventory: Not a directory hint: check the file's permissions"
    assert json.loads(out)["error"]["code"] == 3


def test_an_inventory_that_is_a_fifo_is_refused_not_waited_for(tmp_path: Path) -> None:
    fifo = tmp_path / "inv.yaml"
    os.mkfifo(fifo)
    code, _out, err = invoke(["validate", str(fifo)])
    assert code == ExitCode.INVALID_INVENTORY
    assert err == (f"error: {fifo}: the inventory is not a regular file (a named pipe) hint: pass the inventory "
                   "path, e.g. inventories/local-demo.yaml")


@pytest.mark.parametrize("command", [["render", "--node"], ["deploy"], ["verify"], ["trust"]], ids=" ".join)
def test_an_unknown_node_is_a_usage_error_in_every_command(tmp_path: Path, counter: ConnectionCounter,
                                                           command: list[str]) -> None:
    path = write_inventory(tmp_path, counter)
    code, _out, err = invoke([command[0], "-i", str(path), *command[1:], "nx"])
    assert code == ExitCode.USAGE == 2
    assert err == f"error: unknown node 'nx' hint: nodes in {path}: n1, n2"
    assert counter.count == 0


@pytest.mark.parametrize("command", [["render", "--node"], ["deploy"], ["verify"], ["trust"]], ids=" ".join)
def test_an_existing_file_given_as_a_node_says_so(tmp_path: Path, counter: ConnectionCounter,
                                                  command: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_inventory(tmp_path, counter)
    (tmp_path / "inventory").write_text(path.read_text())
    monkeypatch.chdir(tmp_path)
    code, _out, err = invoke([command[0], "-i", str(path), *command[1:], "inventory"])
    assert code == ExitCode.USAGE
    assert err == ("error: unknown node 'inventory' hint: 'inventory' is a file: an inventory goes after -i, not "
                   f"as a node; nodes in {path}: n1, n2")
    assert counter.count == 0


def exit_code_table() -> dict[int, str]:
    text = (Path(__file__).resolve().parents[2] / "docs" / "commands.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    return {int(r[1]): r[2].strip() for r in rows}


def test_every_exit_code_is_in_the_one_table() -> None:
    table = exit_code_table()
    assert set(table) == {int(c) for c in ExitCode} | {130}
    assert list(table) == sorted(table)


def test_help_lists_every_exit_code() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    from clusterctl.errors import MEANINGS

    assert set(MEANINGS) == set(ExitCode)
    listed = ", ".join(f"{int(c)} {m}" for c, m in MEANINGS.items())
    assert f"Exit codes: {listed}, 130 interrupted (docs/commands.md)." in text


# -- 6. --json everywhere, --version ----------------------------------------------------------


def test_version_is_the_package_version() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"clusterctl {version('clusterctl')}\n"


def test_trust_takes_json(tmp_path: Path, counter: ConnectionCounter, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_inventory(tmp_path, counter)
    import clusterctl.transport.trust

    monkeypatch.setattr(clusterctl.transport.trust, "trust",
                        lambda node, address, port, known, **kw: f"{node}: recorded ED25519 SHA256:abc in {known}")
    result = runner.invoke(app, ["trust", "-i", str(path), "n1", "--yes", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "node": "n1", "address": counter.host, "port": counter.port, "known_hosts": str(tmp_path / "known_hosts"),
        "message": f"n1: recorded ED25519 SHA256:abc in {tmp_path / 'known_hosts'}"}
    code, out, _err = invoke(["trust", "-i", str(path), "nx", "--json"])
    assert code == ExitCode.USAGE
    assert json.loads(out)["error"] == {"code": 2, "message": "unknown node 'nx'",
                                        "hint": f"nodes in {path}: n1, n2", "location": None}


def test_router_check_takes_json(tmp_path: Path) -> None:
    table = tmp_path / "routes.json"
    table.write_text(json.dumps({"cluster": "c", "backends": {"a": {"url": "http://127.0.0.1:8080", "model": "m"}},
                                 "routes": {"chat": ["a"]}}))
    result = runner.invoke(app, ["router", "check", "--routes", str(table), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"ok": True, "routes_file": str(table), "backends": 1, "routes": 1,
                                         "rules": 0, "classifier": False}
    table.write_text("[1, 2")
    result = runner.invoke(app, ["router", "check", "--routes", str(table), "--json"])
    assert result.exit_code == ExitCode.INVALID_INVENTORY
    doc = json.loads(result.stdout)["error"]
    assert doc["code"] == 3 and doc["message"].startswith(f"{table}: ")
    missing = runner.invoke(app, ["router", "check", "--routes", str(tmp_path / "none.json"), "--json"])
    assert missing.exit_code == ExitCode.INVALID_INVENTORY
    assert json.loads(missing.stdout)["error"]["code"] == 3


# -- 7. 80 columns, one unit style ------------------------------------------------------------


def plan_text(columns: int) -> str:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} | {"COLUMNS": str(columns)}
    run = subprocess.run([sys.executable, "-m", "clusterctl.cli", "plan", "inventories/beefcake2.yaml"],
                         cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == ExitCode.DOES_NOT_FIT, run.stderr
    return run.stdout


def test_plan_at_80_columns_wraps_hints_and_cuts_no_model_name() -> None:
    text = plan_text(80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    table = lines[lines.index("services") + 1:lines.index("services") + 5]
    assert table[0].split() == ["service", "node", "model", "port", "context", "total", "verdict"]
    assert [row.split()[:3] for row in table[1:]] == [["deepseek", "node3", "deepseek-coder"],
                                                      ["llama-head", "node1", "or1-behemoth"],
                                                      ["strand", "node2", "strand-rust-coder"]]
    hint = next(i for i, line in enumerate(lines) if line.startswith("  hint: model 'deepseek-coder-iq1s'"))
    assert lines[hint + 1].startswith("  (its experts")  # wrapped, and indented under the hint
    wide = plan_text(200).splitlines()
    assert "engine" in wide[wide.index("services") + 1].split()


def test_plan_rollout_sizes_are_binary() -> None:
    text = plan_text(200)
    assert "download OR1-Behemoth-73B.Q8_0.gguf  72.3 GiB  ~10 min" in text
    rollout = text[text.index("rollout"):text.index("error:")]
    assert " GB " not in rollout and " GB\n" not in rollout


def test_plan_text_has_no_decimal_units() -> None:
    import re

    assert not re.search(r"\d GB\b", plan_text(200))
