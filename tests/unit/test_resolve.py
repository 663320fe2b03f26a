"""`clusterctl resolve` against a real HTTP server laid out like the hub (nginx), with the
real Gemma 3 270M GGUF: pins the revision, caches the metadata, then `plan` runs offline."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.errors import ExitCode
from tests import assets
from tests.nginx_server import NginxServer, hub_layout, nginx_server

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_canary_Zq8mWv1Xr4"
SIZE = 253_113_024  # the real Gemma 3 270M Q4_K_M file (tools/testbed-assets.sh pins its sha256)
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
runner = CliRunner()

pytestmark = pytest.mark.real  # the real model, served by nginx


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxServer]:
    root = tmp_path_factory.mktemp("hub")
    model = assets.test_model_path()
    hub_layout(root, "unsloth/gemma-3-270m-it-GGUF", "main", {"gemma-3-270m-it-Q4_K_M.gguf": model})
    # the hub's paths-info API answers each file's size and LFS sha256 (as huggingface.co does)
    info = json.dumps([{"type": "file", "path": "gemma-3-270m-it-Q4_K_M.gguf", "size": SIZE, "oid": "0" * 40,
                        "lfs": {"oid": SHA256, "size": SIZE, "pointerSize": 134}}])
    locations = (f"add_header X-Repo-Commit {COMMIT};\n"
                 f"location = /api/models/unsloth/gemma-3-270m-it-GGUF/paths-info/{COMMIT} {{\n"
                 f"  default_type application/json;\n  return 200 '{info}';\n}}")
    with nginx_server(root, tmp_path_factory.mktemp("nginx"), locations=locations) as server:
        yield server


def demo_inventory(tmp_path: Path, endpoint: str) -> Path:
    text = (ROOT / "inventories" / "local-demo.yaml").read_text()
    text = text.replace("cluster:\n  name: local-demo\n",
                        f"cluster:\n  name: local-demo\n  huggingface: {{endpoint: '{endpoint}', "
                        "token: {env: DEMO_HF_TOKEN}}\n")
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    return path


def test_resolve_pins_revision_and_real_metadata(hub: NginxServer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_HF_TOKEN", TOKEN)
    inv = demo_inventory(tmp_path, hub.url)
    hub.clear_access_log()
    result = runner.invoke(app, ["resolve", str(inv), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    [entry] = report["models"]
    assert (entry["model"], entry["action"], entry["revision"]) == ("gemma-270m", "read", COMMIT)
    assert 0 < entry["bytes_read"] < 5 * 2**20  # the header only, never the 253 MB of weights
    lock = json.loads((tmp_path / "demo.lock").read_text())
    meta = lock["models"]["gemma-270m"]["meta"]
    assert (meta["architecture"], meta["n_layer"], meta["file_bytes"]) == ("gemma3", 18, 253_113_024)
    assert lock["models"]["gemma-270m"]["revision"] == COMMIT
    assert lock["models"]["gemma-270m"]["files"] == {"gemma-3-270m-it-Q4_K_M.gguf": {"size": SIZE, "sha256": SHA256}}
    # the token went to the server as a header, and nowhere else
    assert {e.authorization for e in hub.access_log()} == {f"Bearer {TOKEN}"}
    assert TOKEN not in result.output
    assert TOKEN not in (tmp_path / "demo.lock").read_text()

    # the same metadata the committed example lock holds (read from the same file)
    committed = json.loads((ROOT / "inventories" / "local-demo.lock").read_text())["models"]["gemma-270m"]["meta"]
    for key in ("n_layer", "n_head_kv", "head_dim_k", "sliding_window", "swa_layers", "tensor_bytes", "file_bytes",
                "has_chat_template"):
        assert meta[key] == committed[key], key

    # a second resolve reads nothing; plan runs offline from the lock
    hub.clear_access_log()
    again = runner.invoke(app, ["resolve", str(inv), "--json"])
    assert json.loads(again.stdout)["models"][0]["action"] == "kept"
    assert hub.access_log() == []
    planned = runner.invoke(app, ["plan", str(inv), "--json"])
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.stdout)["services"][0]["verdict"] == "fits"


def test_resolve_missing_file_is_a_clear_error(hub: NginxServer, tmp_path: Path) -> None:
    inv = demo_inventory(tmp_path, hub.url)
    inv.write_text(inv.read_text().replace("gemma-3-270m-it-Q4_K_M.gguf", "gemma-3-270m-it-Q8_0.gguf"))
    result = runner.invoke(app, ["resolve", str(inv)])
    assert result.exit_code == ExitCode.METADATA
    assert "404" in result.stderr or "not found" in result.stderr.lower()
    assert not (tmp_path / "demo.lock").exists()
