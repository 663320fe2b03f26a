"""Hostile and odd input: no traceback, no hang. Each case exits with its documented code and an
error naming file:line:col with a hint; with --json, stdout holds exactly one JSON document, the
error included."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.errors import InventoryError
from clusterctl.lockfile import LockFile, write_lock
from clusterctl.yamlsrc import MAX_DOCUMENT_BYTES, load_yaml

runner = CliRunner()

INVENTORY = """\
cluster:
  name: demo
nodes:
  n1:
    address: 10.0.0.1
    ram: 64GiB
    accelerators: [{kind: cuda, count: 2, memory: 24GiB}]
models:
  m:
    source: hf://org/repo@abc123/model-Q4_K_M.gguf
services:
  chat:
    engine: llama-server
    node: n1
    model: m
    port: 8080
    context: 8192
"""

SIZE_HINT = "write e.g. '80GiB' (binary, 2^30 bytes) or '77.3GB' (decimal, 10^9 bytes)"
ALIAS_HINT = ("an alias repeats the whole value it names; anchor small mappings (`<<: *defaults`) "
              "and write the rest out")


def write(tmp_path: Path, text: str, name: str = "inv.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def yaml_error(text: str) -> InventoryError:
    with pytest.raises(InventoryError) as info:
        load_yaml(text, "inv.yaml")
    return info.value


# --- YAML alias bombs ---------------------------------------------------------------------------

# 9 ** 9 = 387 million list items from 300 bytes
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


def test_billion_laughs_is_refused_at_the_alias_that_crosses_the_budget() -> None:
    started = time.monotonic()
    err = yaml_error(LAUGHS)
    assert time.monotonic() - started < 1
    # line 4 (`d:`), the first `*c`: a=10, b=91, c=820 values; 9 aliases of c pass 1,000 + 4 x spelled
    assert (err.line, err.column) == (4, 8)
    assert err.message == "aliases expand this document past 1,072 values (at '*c')"
    assert err.hint == ALIAS_HINT


def test_billion_laughs_of_mappings_through_the_cli(tmp_path: Path) -> None:
    lines = ["l0: &l0 {k: v}"]
    lines += [f"l{i}: &l{i} {{{', '.join(f'k{j}: *l{i - 1}' for j in range(9))}}}" for i in range(1, 10)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    assert len(path.read_bytes()) < 1000
    started = time.monotonic()
    code, out, err = invoke("validate", str(path), "--json")
    assert err.startswith("error: ")  # the text for people goes to stderr
    assert time.monotonic() - started < 2
    # l3 is the first to pass 1,000 + 4 x spelled: l2 counts 343 values, its third alias in l3 is over
    assert code == 3
    assert json.loads(out) == {"error": {
        "code": 3, "message": "aliases expand this document past 1,128 values (at '*l2')",
        "hint": ALIAS_HINT, "location": f"{path}:4:32"}}


@pytest.mark.parametrize(("text", "where"), [
    ("a: &a [1, *a]\n", (1, 11)),
    ("a: &a {b: {c: *a}}\n", (1, 15)),
    ("a: &a\n  <<: *a\n", (2, 7)),  # a merge key naming its own mapping
])
def test_recursive_alias_is_refused(text: str, where: tuple[int, int]) -> None:
    err = yaml_error(text)
    assert (err.line, err.column) == where
    assert err.message == "recursive alias '*a': it names a value that contains it"
    assert err.hint == "an alias cannot appear inside the value its anchor names"


def test_nesting_deeper_than_64_levels_is_refused() -> None:
    err = yaml_error("a: " + "[" * 5000 + "]" * 5000 + "\n")
    # the top mapping and 63 lists are 64 levels: the 64th '[' opens the 65th
    assert (err.line, err.column, err.message) == (1, 67, "nested more than 64 levels deep")


def test_small_aliases_and_merge_keys_still_work() -> None:
    data, smap = load_yaml("d: &d {node: n1, port: 8080, env: {A: '1'}}\np: &p 9\n"
                           "s:\n  <<: *d\n  port: 8081\n  q: *p\n", "inv.yaml")
    assert data["s"] == {"port": 8081, "q": 9, "node": "n1", "env": {"A": "1"}}
    assert smap.values[("s", "port")] == (5, 9)  # the override, not the anchor's value
    assert smap.values[("s", "node")] == (1, 14)  # a merged value points where it is written


def test_merge_key_override_validates_as_an_inventory(tmp_path: Path) -> None:
    text = INVENTORY.replace("  chat:\n", "  chat: &svc\n") + "  chat2:\n    <<: *svc\n    port: 8081\n"
    code, out, err = invoke("validate", str(write(tmp_path, text)), "--json")
    assert code == 0, err
    assert json.loads(out)["services"] == ["chat", "chat2"]


def test_of_several_merged_mappings_the_first_wins_and_duplicates_are_errors() -> None:
    data, _ = load_yaml("a: &a {p: 1}\nb: &b {p: 2, q: 2}\nc: {<<: [*a, *b]}\n", "inv.yaml")
    assert data["c"] == {"p": 1, "q": 2}
    err = yaml_error("a: &a {p: 1}\nc: {p: 3, p: 4}\n")
    assert (err.line, err.column, err.message) == (2, 11, "duplicate key 'p' (first defined on line 2)")
    err = yaml_error("c: {<<: 3}\n")
    assert (err.line, err.column, err.message) == (1, 9, "merge key '<<' takes a mapping or a list of mappings")


# --- the inventory file itself ------------------------------------------------------------------

def test_inventory_larger_than_the_bound_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (MAX_DOCUMENT_BYTES + 1))
    code, out, err = invoke("validate", str(path))
    assert (code, out) == (3, "")
    assert err == f"error: {path}: the inventory is larger than 16 MiB\n  hint: is this the right file?\n"


def test_inventory_path_is_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.mkdir()
    code, out, err = invoke("validate", str(path), "--json")
    assert err.startswith("error: ")  # the text for people goes to stderr
    assert code == 3
    assert json.loads(out) == {"error": {
        "code": 3, "message": "the inventory is a directory, not a file",
        "hint": "pass the inventory path, e.g. inventories/local-demo.yaml", "location": str(path)}}


def test_inventory_not_utf8_names_the_line_of_the_first_bad_byte(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_bytes(b"cluster:\n  name: d\xe9mo\n")
    code, out, err = invoke("validate", str(path))
    assert (code, out) == (3, "")
    assert err == (f"error: {path}:2:10: the inventory is not UTF-8 text (byte 0xe9)\n"
                   "  hint: save it as UTF-8; is this a binary file?\n")


def test_inventory_with_control_characters(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_bytes(b"cluster:\n  name: demo\x00\n")
    code, out, err = invoke("validate", str(path))
    assert (code, out) == (3, "")
    assert err == (f"error: {path}:2:13: character U+0000 is not allowed in YAML\n"
                   "  hint: an inventory is UTF-8 text; is this a binary file?\n")


# --- numbers too large for a float --------------------------------------------------------------

HUGE = "1" + "0" * 400


def test_size_too_large_for_a_float(tmp_path: Path) -> None:
    path = write(tmp_path, INVENTORY.replace("ram: 64GiB", f"ram: {HUGE}GiB"))
    code, out, err = invoke("validate", str(path), "--json")
    assert err.startswith("error: ")  # the text for people goes to stderr
    assert code == 3
    assert json.loads(out) == {"error": {
        "code": 3, "message": "nodes.n1.ram: '10000000000000000000...00000GiB' is larger than 1 EiB: "
        "not a size any device has", "hint": SIZE_HINT, "location": f"{path}:6:10"}}


@pytest.mark.parametrize(("edit", "line", "message", "hint"), [
    ("    startup_timeout: {HUGE}s\n", 18,
     "services.chat.startup_timeout: '10000000000000000000...0000000s' is not a duration a cluster waits "
     "for (at most a year)", "write e.g. '30s', '250ms', '10m' or '2h'"),
    ("    startup_timeout: .inf\n", 18,
     "services.chat.startup_timeout: 'inf' is not a duration a cluster waits for (at most a year)",
     "write e.g. '30s', '250ms', '10m' or '2h'"),
])
def test_duration_too_large_or_infinite(tmp_path: Path, edit: str, line: int, message: str, hint: str) -> None:
    path = write(tmp_path, INVENTORY + edit.format(HUGE=HUGE))
    code, out, err = invoke("validate", str(path))
    assert (code, out) == (3, "")
    assert err == f"error: {path}:{line}:22: {message}\n  hint: {hint}\n"


def test_link_speed_too_large(tmp_path: Path) -> None:
    text = INVENTORY.replace("  name: demo\n", f"  name: demo\n  defaults: {{link_speed: {HUGE}Gbit}}\n")
    path = write(tmp_path, text)
    code, out, err = invoke("validate", str(path))
    assert (code, out) == (3, "")
    assert err == (f"error: {path}:3:26: cluster.defaults.link_speed: '10000000000000000000...0000Gbit' is "
                   "faster than any link (at most 8 Pbit/s)\n"
                   "  hint: write the link's speed, e.g. '1Gbit', '25Gbit' or '100MB/s'\n")


def test_estimate_devices_too_large_is_a_usage_error() -> None:
    code, out, err = invoke("estimate", "x.gguf", "--devices", f"{HUGE}GiB", "--json")
    assert err.startswith("error: ")  # the text for people goes to stderr
    assert code == 2
    assert json.loads(out)["error"]["message"] == ("'10000000000000000000...00000GiB' is larger than 1 EiB: "
                                                   "not a size any device has")


# --- the lock file ------------------------------------------------------------------------------

REWRITE = "delete it and run `clusterctl resolve` to write it again"


def test_lock_path_is_a_directory(tmp_path: Path) -> None:
    path = write(tmp_path, INVENTORY)
    (tmp_path / "inv.lock").mkdir()
    for command in ("plan", "resolve"):
        code, out, err = invoke(command, str(path), "--json")
        assert code == 3, err
        assert json.loads(out) == {"error": {"code": 3, "message": "the lock file is a directory, not a file",
                                             "hint": REWRITE, "location": str(tmp_path / "inv.lock")}}


def test_lock_file_with_binary_bytes(tmp_path: Path) -> None:
    path = write(tmp_path, INVENTORY)
    (tmp_path / "inv.lock").write_bytes(b'{"version": 1,\n "models": \x89PNG}')
    code, out, err = invoke("plan", str(path))
    assert (code, out) == (3, "")
    assert err == (f"error: {tmp_path / 'inv.lock'}:2:12: the lock file is not UTF-8 text (byte 0x89)\n"
                   "  hint: save it as UTF-8; is this a binary file?\n")


@pytest.mark.parametrize(("content", "message"), [
    ("[" * 100_000, "lock file is not valid JSON: nested too deeply"),
    ('{"version": NaN}', "lock file is not valid JSON: NaN is not a number JSON allows"),
])
def test_lock_file_nested_too_deeply_or_not_a_number(tmp_path: Path, content: str, message: str) -> None:
    path = write(tmp_path, INVENTORY)
    (tmp_path / "inv.lock").write_text(content)
    code, out, err = invoke("plan", str(path))
    assert (code, out) == (3, "")
    assert err == f"error: {tmp_path / 'inv.lock'}: {message}\n  hint: {REWRITE}\n"


def test_lock_file_in_a_folder_that_cannot_hold_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(InventoryError) as info:
        write_lock(tmp_path / "file" / "inv.lock", LockFile())
    assert info.value.message == "cannot write the lock file: Not a directory"
    assert info.value.location == str(tmp_path / "file" / "inv.lock")


# --- --json: the error is a JSON document too ---------------------------------------------------

def test_json_invalid_inventory_lists_every_error(tmp_path: Path) -> None:
    text = INVENTORY.replace("    port: 8080", "    prot: 8080").replace("    context: 8192", "    contxt: 8192")
    path = write(tmp_path, text)
    code, out, err = invoke("validate", str(path), "--json")
    assert err.startswith("error: ")  # the text for people goes to stderr
    assert code == 3
    first = {"code": 3, "message": "services.chat: unknown key 'prot'", "hint": "did you mean 'port'?",
             "location": f"{path}:16:5"}
    second = {"code": 3, "message": "services.chat: unknown key 'contxt'", "hint": "did you mean 'context'?",
              "location": f"{path}:17:5"}
    assert json.loads(out) == {"error": {**first, "errors": [first, second]}}


def test_json_yaml_that_does_not_parse(tmp_path: Path) -> None:
    path = write(tmp_path, "cluster: {name: x\n")
    code, out, err = invoke("plan", str(path), "--json")
    assert err.startswith("error: ")  # the text for people goes to stderr
    assert code == 3
    doc = json.loads(out)
    assert doc["error"]["location"] == f"{path}:2:1"
    assert doc["error"]["message"].startswith("YAML syntax error: ")


def test_json_plan_without_a_lock(tmp_path: Path) -> None:
    path = write(tmp_path, INVENTORY)
    code, out, err = invoke("plan", str(path), "--json")
    assert err.startswith("error: ")  # the text for people goes to stderr
    assert code == 5
    assert json.loads(out) == {"error": {
        "code": 5, "message": f"no pinned metadata for m in {tmp_path / 'inv.lock'}",
        "hint": f"run `clusterctl resolve {path}` to read and pin it", "location": None}}


def test_json_inspect_of_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "meta.json"
    bad.write_text('{"meta": 3')
    code, out, err = invoke("inspect", str(bad), "--json")
    assert err.startswith("error: ")  # the text for people goes to stderr
    assert code == 5
    assert json.loads(out) == {"error": {
        "code": 5, "message": f"{bad} is not model metadata: Expecting ',' delimiter: line 1 column 11 (char 10)",
        "hint": "write it with `clusterctl inspect MODEL --json`", "location": None}}


def test_json_resolve_with_an_unreachable_hub(tmp_path: Path) -> None:
    text = INVENTORY.replace("  name: demo\n", "  name: demo\n  huggingface: {endpoint: 'http://127.0.0.1:9'}\n")
    code, out, err = invoke("resolve", str(write(tmp_path, text)), "--json")
    assert err.startswith("error: ")  # the text for people goes to stderr
    assert code == 6
    doc = json.loads(out)["error"]
    assert doc["code"] == 6 and doc["message"].startswith("cannot reach 127.0.0.1:9: ")
    assert doc["hint"] == "check the network, the URL or HF_ENDPOINT"


def test_json_deploy_usage_errors(tmp_path: Path) -> None:
    code, out, err = invoke("deploy", "--json")
    assert code == 2
    assert json.loads(out) == {"error": {
        "code": 2, "message": "missing option -i/--inventory: deploy reaches nodes and has no default inventory",
        "hint": "clusterctl deploy -i INVENTORY.yaml", "location": None}}
    # errors click finds in the command line itself: a bad value, an unknown option, a missing argument
    code, out, err = invoke("deploy", "-i", "x.yaml", "--max-fail", "many", "--json")
    assert code == 2
    assert json.loads(out) == {"error": {
        "code": 2, "message": "Invalid value for '--max-fail': Input should be a valid integer, unable to parse "
        "string as an integer", "hint": "see `clusterctl deploy --help`", "location": None}}
    assert "Invalid value for '--max-fail'" in err  # and the usual text for people
    code, out, err = invoke("plan", "--json", "--bogus")
    assert (code, json.loads(out)["error"]["message"]) == (2, "No such option: --bogus")
    code, out, err = invoke("estimate", "--json")
    assert (code, json.loads(out)["error"]["message"]) == (2, "Missing argument 'model'.")
    code, out, err = invoke("nosuch", "--json")
    assert (code, json.loads(out)["error"]["message"]) == (2, "No such command 'nosuch'.")


def test_without_json_usage_errors_print_nothing_on_stdout() -> None:
    code, out, err = invoke("deploy", "-i", "x.yaml", "--max-fail", "many")
    assert (code, out) == (2, "")
    code, out, err = invoke("validate", "missing.yaml")
    assert err.startswith("error: ")  # the text for people goes to stderr
    assert (code, out) == (3, "")


def test_json_a_bug_is_a_document_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import clusterctl.inventory

    def broken(path: Path) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(clusterctl.inventory, "load_inventory", broken)
    code, out, err = invoke("validate", str(write(tmp_path, INVENTORY)), "--json")
    assert code == 1
    assert json.loads(out) == {"error": {"code": 1, "message": "clusterctl hit a bug: RuntimeError",
                                         "hint": "please report it with the trace printed on stderr",
                                         "location": None}}
    assert "RuntimeError: boom" in err


def test_json_error_as_a_user_runs_it(tmp_path: Path) -> None:
    """The real program: stdout is one JSON document and nothing else, the exit code as without --json."""
    path = write(tmp_path, LAUGHS)
    for argv in (["validate", str(path), "--json"], ["deploy", "--json", "--max-fail", "x"]):
        proc = subprocess.run([sys.executable, "-m", "clusterctl.cli", *argv], capture_output=True, text=True,
                              timeout=60)
        doc = json.loads(proc.stdout)
        assert proc.returncode == doc["error"]["code"] == (3 if argv[0] == "validate" else 2)
        assert "Traceback" not in proc.stderr
    assert doc["error"]["hint"] == "see `python -m clusterctl.cli deploy --help`"


# --- siblings: other files the user names -------------------------------------------------------

def test_secret_file_with_binary_bytes(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_bytes(b"\x89\xffhf_")
    text = INVENTORY.replace("  name: demo\n", f"  name: demo\n  huggingface: {{token: {{file: '{token}'}}}}\n")
    code, out, err = invoke("resolve", str(write(tmp_path, text)), "--json")
    assert code == 3
    assert json.loads(out) == {"error": {"code": 3, "message": "cannot read the secret file: it is not UTF-8 text",
                                         "hint": "it holds the secret as one line of text (mode 0600)",
                                         "location": str(token)}}
    assert "hf_" not in out + err


def test_inspect_of_a_binary_metadata_file(tmp_path: Path) -> None:
    bad = tmp_path / "meta.json"
    bad.write_bytes(b"\xff{}")
    code, out, err = invoke("inspect", str(bad))
    assert (code, out) == (5, "")
    assert err == (f"error: {bad} is not model metadata: 'utf-8' codec can't decode byte 0xff in position 0: "
                   "invalid start byte\n  hint: write it with `clusterctl inspect MODEL --json`\n")


@pytest.mark.parametrize(("key", "value"), [("health", "{interval: -1}"), ("health", "{timeout: 0s}"),
                                            ("health", "{cooldown: 0}"), ("queue_timeout", "-5")])
def test_router_durations_must_be_positive(tmp_path: Path, key: str, value: str) -> None:
    from clusterctl.errors import InventoryErrors
    from clusterctl.inventory import load_inventory

    path = tmp_path / "r.yaml"
    path.write_text(f"""\
cluster: {{name: c}}
nodes:
  n: {{address: 10.0.0.1, ram: 8GiB}}
services:
  web: {{engine: custom, node: n, port: 8080, command: [/bin/true], memory: 1GiB}}
router:
  node: n
  default: [web]
  {key}: {value}
""")
    with pytest.raises(InventoryErrors) as exc:
        load_inventory(path)
    [error] = exc.value.errors
    assert error.line == 9 and error.message.startswith(f"router.{key}"), error.message
