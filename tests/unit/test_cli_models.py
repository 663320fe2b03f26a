"""`inspect` and `estimate` on the real Gemma 3 270M file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.errors import ExitCode
from tests import assets

runner = CliRunner()


@pytest.mark.real
def test_inspect_json_real_model() -> None:
    result = runner.invoke(app, ["inspect", str(assets.test_model_path()), "--json"])
    assert result.exit_code == 0, result.output
    meta = json.loads(result.stdout)
    assert (meta["architecture"], meta["file_type"], meta["n_layer"], meta["n_head_kv"]) == ("gemma3", "Q4_K_M", 18, 1)
    assert meta["swa_layers"].count(False) == 3 and meta["sliding_window"] == 512


@pytest.mark.real
def test_estimate_json_matches_llama_cpp_kv(tmp_path: Path) -> None:
    """-c 8192 -np 4 (non-unified): 4 streams of 2048 cells; KV 84.00 MiB as llama.cpp prints."""
    result = runner.invoke(app, ["estimate", str(assets.test_model_path()), "--ctx", "8192", "-np", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["n_ctx"], data["n_ctx_seq"]) == (8192, 2048)
    assert data["devices"]["host"]["kv"] == 84.0
    assert [(c["cells"], c["layers"], c["swa"]) for c in data["kv_caches"]] == [(8192, 3, False), (4096, 15, True)]
    # the same from a metadata file written by inspect --json (no model file needed)
    meta = tmp_path / "meta.json"
    meta.write_text(runner.invoke(app, ["inspect", str(assets.test_model_path()), "--json"]).stdout)
    again = runner.invoke(app, ["estimate", str(meta), "--ctx", "8192", "-np", "4", "--json"])
    assert json.loads(again.stdout)["devices"] == data["devices"]


@pytest.mark.real
def test_estimate_does_not_fit_exit_code() -> None:
    result = runner.invoke(app, ["estimate", str(assets.test_model_path()), "--ctx", "32768",
                                 "--devices", "100MiB,100MiB", "--json"])
    assert result.exit_code == ExitCode.DOES_NOT_FIT
    data = json.loads(result.stdout)
    assert data["fits"] is False and data["devices"]["dev1"]["output"] is True


@pytest.mark.real
def test_estimate_bad_cache_type_and_bad_size() -> None:
    bad = runner.invoke(app, ["estimate", str(assets.test_model_path()), "-ctk", "q3_x"])
    assert bad.exit_code == ExitCode.USAGE
    assert "error: --cache-type-k q3_x: unknown cache type" in bad.stderr
    size = runner.invoke(app, ["estimate", str(assets.test_model_path()), "--devices", "24"])
    assert size.exit_code == ExitCode.USAGE
    assert "has no unit" in size.stderr


def test_inspect_missing_file() -> None:
    result = runner.invoke(app, ["inspect", "/nonexistent/model.gguf"])
    assert result.exit_code == ExitCode.METADATA
    assert "error: no such file or folder: /nonexistent/model.gguf" in result.stderr
