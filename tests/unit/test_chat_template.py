"""A model without a chat template: the plan warns, a service names a built-in template or a
Jinja file, the launch script runs llama-server with it, and the lock file records it."""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from pathlib import Path

import gguf
import pytest

from clusterctl.engines import launch_specs
from clusterctl.errors import InventoryError, InventoryErrors
from clusterctl.inventory import LLAMA_CPP_CHAT_TEMPLATES, Inventory, load_inventory
from clusterctl.lockfile import LockedModel, LockFile, read_lock, require_metas, write_lock
from clusterctl.models.gguf_reader import read_local
from clusterctl.models.meta import ModelMeta
from clusterctl.planner.plan import Finding, make_plan
from clusterctl.render import render
from tests import assets

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "inventories" / "local-demo.yaml"

TEMPLATE = ("{%- for m in messages %}Question: {{ m['content'] }}\n{% endfor -%}"
            "{%- if add_generation_prompt %}Answer:{% endif %}")

BASE = """\
cluster:
  name: demo
nodes:
  n1:
    address: 10.0.0.1
    ram: 8GiB
models:
  m:
    source: hf://org/repo@abc123/model-Q4_K_M.gguf
services:
  chat:
    engine: llama-server
    node: n1
    model: m
    context: 2048
"""


def load(tmp_path: Path, extra: str, base: str = BASE) -> Inventory:
    path = tmp_path / "inv.yaml"
    path.write_text(base + textwrap.indent(textwrap.dedent(extra), "    "))
    return load_inventory(path)


def errors_of(tmp_path: Path, extra: str, base: str = BASE) -> list[str]:
    with pytest.raises(InventoryError) as info:
        load(tmp_path, extra, base)
    exc = info.value
    errors = exc.errors if isinstance(exc, InventoryErrors) else [exc]
    return [str(e) for e in errors]


# --- the inventory -------------------------------------------------------------------------------

def test_a_builtin_name_loads(tmp_path: Path) -> None:
    svc = load(tmp_path, "chat_template: gemma\n").services["chat"]
    assert (svc.chat_template, svc.chat_template_file, svc.chat_template_text) == ("gemma", None, None)


def test_an_unknown_name_is_an_error_at_its_line_with_the_closest_name(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "chat_template: gemam\n") == [
        f"{tmp_path / 'inv.yaml'}:16:20: services.chat.chat_template: 'gemam' is not one of llama.cpp's built-in "
        "chat templates (did you mean 'gemma'? see `llama-server --help`; for another template give "
        "chat_template_file)"]
    assert errors_of(tmp_path, "chat_template: qwerty\n") == [
        f"{tmp_path / 'inv.yaml'}:16:20: services.chat.chat_template: 'qwerty' is not one of llama.cpp's built-in "
        "chat templates (see `llama-server --help`; for another template give chat_template_file)"]


def test_a_template_file_is_read_when_the_inventory_loads(tmp_path: Path) -> None:
    template = tmp_path / "qa.jinja"
    template.write_text(TEMPLATE)
    svc = load(tmp_path, f"chat_template_file: {template}\n").services["chat"]
    assert (svc.chat_template, svc.chat_template_file, svc.chat_template_text) == (None, str(template), TEMPLATE)


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read {path}: No such file or directory"),
    (b"", "{path} is empty or not text"),
    (b"\xff\xfe{{ x }}", "{path} is not UTF-8 text"),
    (b"x" * (256 * 1024 + 1), "{path} is larger than 256 KiB: not a chat template"),
], ids=["missing", "empty", "not-utf8", "too-large"])
def test_a_bad_template_file_is_an_error_at_its_line(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "t.jinja"
    if content is not None:
        path.write_bytes(content)
    assert errors_of(tmp_path, f"chat_template_file: {path}\n") == [
        f"{tmp_path / 'inv.yaml'}:16:25: services.chat.chat_template_file: " + message.format(path=path)]


def test_a_relative_template_path_is_an_error(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "chat_template_file: templates/qa.jinja\n") == [
        f"{tmp_path / 'inv.yaml'}:16:25: services.chat.chat_template_file: 'templates/qa.jinja' must be an "
        "absolute path without '..'"]


def test_name_and_file_together_or_on_another_engine_are_errors(tmp_path: Path) -> None:
    template = tmp_path / "qa.jinja"
    template.write_text(TEMPLATE)
    assert errors_of(tmp_path, f"chat_template: gemma\nchat_template_file: {template}\n") == [
        f"{tmp_path / 'inv.yaml'}:12:5: services.chat: give either chat_template (a built-in name) or "
        "chat_template_file, not both"]
    vllm = BASE.replace("engine: llama-server", "engine: vllm")
    assert errors_of(tmp_path, "chat_template: gemma\n", vllm) == [
        f"{tmp_path / 'inv.yaml'}:12:5: services.chat: chat_template is for engine llama-server; vllm takes its "
        "template from the model"]
    assert errors_of(tmp_path, f"container: {{image: ghcr.io/ggml-org/llama.cpp:server}}\n"
                               f"chat_template_file: {template}\n") == [
        f"{tmp_path / 'inv.yaml'}:12:5: services.chat: chat_template_file is not mounted into a container; use a "
        "built-in chat_template, or bake the template into the image and pass it in extra_args"]


# --- the launch script -----------------------------------------------------------------------------

def test_a_builtin_name_runs_without_jinja(tmp_path: Path) -> None:
    inv = load(tmp_path, "chat_template: gemma\n")
    [spec] = launch_specs(inv)
    assert spec.argv[spec.argv.index("--metrics") + 1:] == ("--no-jinja", "--chat-template", "gemma")
    assert spec.extra_files == ()
    script = next(f for f in render(inv).files if f.path == "/opt/clusterctl/bin/chat.sh")
    assert script.content.endswith("    --metrics \\\n    --no-jinja \\\n    --chat-template gemma\n")


def test_a_template_file_is_pushed_and_run_with_jinja(tmp_path: Path) -> None:
    template = tmp_path / "qa.jinja"
    template.write_text(TEMPLATE)
    inv = load(tmp_path, f"chat_template_file: {template}\n")
    [spec] = launch_specs(inv)
    assert spec.argv[spec.argv.index("--metrics") + 1:] == (
        "--jinja", "--chat-template-file", "/opt/clusterctl/templates/chat.jinja")
    files = {f.path: f for f in render(inv).files}
    pushed = files["/opt/clusterctl/templates/chat.jinja"]
    assert (pushed.node, pushed.content, pushed.mode, pushed.restarts) == ("n1", TEMPLATE, 0o644, ("chat",))
    assert files["/opt/clusterctl/bin/chat.sh"].content.endswith(
        "    --jinja \\\n    --chat-template-file /opt/clusterctl/templates/chat.jinja\n")


def test_no_template_no_flag(tmp_path: Path) -> None:
    [spec] = launch_specs(load(tmp_path, ""))
    assert not {"--jinja", "--no-jinja", "--chat-template", "--chat-template-file"} & set(spec.argv)


# --- the plan ----------------------------------------------------------------------------------------

WARNING = Finding(
    "warning", "chat",
    "model 'gemma-270m' carries no chat template (tokenizer.chat_template): llama-server falls back to ChatML, "
    "which the model may not follow",
    "set chat_template: gemma (llama.cpp's built-in for gemma3) or chat_template_file: /path/to/template.jinja "
    "on the service")


def _demo(tmp_path: Path, old: str, new: str) -> tuple[Inventory, dict[str, ModelMeta]]:
    text = DEMO.read_text()
    assert old in text
    path = tmp_path / "local-demo.yaml"
    path.write_text(text.replace(old, new))
    (tmp_path / "local-demo.lock").write_text((ROOT / "inventories" / "local-demo.lock").read_text())
    inv = load_inventory(path)
    return inv, require_metas(inv, read_lock(tmp_path / "local-demo.lock"), tmp_path / "local-demo.lock")


def test_the_plan_warns_about_a_gguf_without_a_chat_template(tmp_path: Path) -> None:
    inv, metas = _demo(tmp_path, "    chat_template: gemma", "    ")
    assert metas["gemma-270m"].has_chat_template is False
    assert [f for f in make_plan(inv, metas).findings if "chat template" in f.message] == [WARNING]


def test_a_service_that_names_a_template_silences_the_warning(tmp_path: Path) -> None:
    template = tmp_path / "qa.jinja"
    template.write_text(TEMPLATE)
    for line in ("    chat_template: gemma", f"    chat_template_file: {template}"):
        inv, metas = _demo(tmp_path, "    chat_template: gemma", line)
        assert make_plan(inv, metas).findings == []


def test_no_warning_when_the_lock_does_not_record_it(tmp_path: Path) -> None:
    inv, metas = _demo(tmp_path, "    chat_template: gemma", "    ")
    old = {"gemma-270m": metas["gemma-270m"].model_copy(update={"has_chat_template": None})}
    assert make_plan(inv, old).findings == []
    with_template = {"gemma-270m": metas["gemma-270m"].model_copy(update={"has_chat_template": True})}
    assert make_plan(inv, with_template).findings == []


def test_the_hint_names_no_builtin_for_an_architecture_without_an_obvious_one(tmp_path: Path) -> None:
    inv, metas = _demo(tmp_path, "    chat_template: gemma", "    ")
    llama = {"gemma-270m": metas["gemma-270m"].model_copy(update={"architecture": "llama"})}
    [finding] = make_plan(inv, llama).findings
    assert finding.hint == ("set chat_template: NAME (one of llama.cpp's built-ins, see `llama-server --help`) "
                            "or chat_template_file: /path/to/template.jinja on the service")


# --- metadata and the lock file ----------------------------------------------------------------------

def _gguf(path: Path, **kv: str) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_head_count(4)
    for key, value in kv.items():
        w.add_string(key.replace("__", "."), value)
    assets.add_vocab(w, 100)
    assets.add_f32(w, "token_embd.weight", [64, 100])
    assets.add_f32(w, "blk.0.attn_q.weight", [64, 64])
    assets.finish(w)
    return path


@pytest.mark.parametrize(("kv", "expected"), [
    ({}, False),
    ({"tokenizer__chat_template": "{{ messages[0]['content'] }}"}, True),
    ({"tokenizer__chat_template": "  "}, False),
    ({"tokenizer__chat_template__tool_use": "{{ tools }}"}, True),
])
def test_the_gguf_header_tells_whether_a_template_is_there(tmp_path: Path, kv: dict[str, str],
                                                          expected: bool) -> None:
    assert read_local(_gguf(tmp_path / "m.gguf", **kv)).has_chat_template is expected


def test_the_lock_file_round_trips_the_flag_and_reads_old_files(tmp_path: Path) -> None:
    meta = read_local(_gguf(tmp_path / "m.gguf"))
    path = tmp_path / "inv.lock"
    write_lock(path, LockFile(models={"m": LockedModel(source="file:///m.gguf", meta=meta)}))
    assert json.loads(path.read_text())["models"]["m"]["meta"]["has_chat_template"] is False
    assert read_lock(path).models["m"].meta == meta
    # a lock file written before the field: still readable, the flag is unknown
    data = json.loads(path.read_text())
    del data["models"]["m"]["meta"]["has_chat_template"]
    path.write_text(json.dumps(data))
    assert read_lock(path).models["m"].meta.has_chat_template is None
    assert read_lock(path).models["m"].meta == meta.model_copy(update={"has_chat_template": None})


# --- the real files --------------------------------------------------------------------------------

@pytest.mark.real
def test_the_real_gemma_gguf_has_no_chat_template() -> None:
    assert read_local(assets.test_model_path()).has_chat_template is False


@pytest.mark.real
def test_the_builtin_names_are_the_real_llama_servers() -> None:
    out = subprocess.run([str(assets.llama_bin_dir() / "llama-server"), "--help"], capture_output=True,
                         text=True, check=False, timeout=60).stdout
    section = out[out.index("--chat-template JINJA_TEMPLATE"):out.index("--chat-template-file")]
    listed = section.split("list of built-in templates:", 1)[1].split("(env:", 1)[0]
    assert tuple(re.split(r"[\s,]+", listed.strip())) == LLAMA_CPP_CHAT_TEMPLATES
