"""Tensor overrides in the inventory: `override_tensors`, `cpu_moe`, `n_cpu_moe` and `mmap` are
validated, rendered into llama-server's command line in the order the planner applies them,
and planned tensor by tensor (the experts' bytes move from the GPU to the host's RAM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterctl.engines import launch_specs
from clusterctl.errors import InventoryErrors
from clusterctl.inventory import Inventory, load_inventory
from clusterctl.planner import make_plan
from tests.unit.test_estimate_overrides import ATTN, EXPERT, MIB, moe_meta

NODES = """\
cluster: {name: c}
nodes:
  gpu: {address: 10.0.0.1, ram: 64GiB, accelerators: [{kind: cuda, count: 2, memory: 24GiB}]}
  w: {address: 10.0.0.2, ram: 64GiB, accelerators: [{kind: cuda, memory: 24GiB}]}
models:
  m: {source: 'hf://org/repo/m.gguf'}
services:
"""


def _inventory(tmp_path: Path, services: str) -> Inventory:
    path = tmp_path / "c.yaml"
    path.write_text(NODES + "".join(f"  {line}\n" for line in services.splitlines()))
    return load_inventory(path)


CHAT = "chat: {engine: llama-server, node: gpu, model: m, port: 8080, context: 1024"


def test_the_flags_are_rendered_in_the_planners_order(tmp_path: Path) -> None:
    inv = _inventory(tmp_path, CHAT + r", override_tensors: ['blk\.3\..*_exps\.=CUDA0', '_exps\.=CPU'], "
                     "cpu_moe: true, n_cpu_moe: 2, mmap: false}")
    (spec,) = launch_specs(inv)
    argv = list(spec.argv)
    i = argv.index("--override-tensor")
    assert argv[i:i + 9] == ["--override-tensor", r"blk\.3\..*_exps\.=CUDA0", "--override-tensor", r"_exps\.=CPU",
                             "--cpu-moe", "--n-cpu-moe", "2", "--load-mode", "none"]
    assert argv.count("--fit") == 1 and argv[argv.index("--fit") + 1] == "off"


def test_no_override_flags_by_default(tmp_path: Path) -> None:
    (spec,) = launch_specs(_inventory(tmp_path, CHAT + "}"))
    assert not {"--override-tensor", "--cpu-moe", "--n-cpu-moe", "--load-mode"} & set(spec.argv)


@pytest.mark.parametrize(("value", "message"), [
    ("'exps'", r"override_tensors 'exps': give PATTERN=BUFFER_TYPE, e.g. '_exps\.=CPU'"),
    ("'blk\\.[0-9]{1,2}\\.=CPU'", "override_tensors 'blk\\\\.[0-9]{1,2}\\\\.=CPU': llama.cpp splits -ot at commas; "
     "give each PATTERN=BUFT as its own entry, and no comma inside a pattern (write [0-9][0-9] for {2})"),
    ("'blk\\.(=CPU'", "override_tensors 'blk\\\\.(=CPU': the pattern is not a regular expression "
     "(missing ), unterminated subpattern at position 5)"),
])
def test_bad_overrides_are_refused_at_load(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(InventoryErrors) as err:
        _inventory(tmp_path, CHAT + f", override_tensors: [{value}]}}")
    assert message in str(err.value)


def test_a_negative_n_cpu_moe_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InventoryErrors, match="n_cpu_moe"):
        _inventory(tmp_path, CHAT + ", n_cpu_moe: -1}")


def test_the_plan_moves_the_experts_to_the_hosts_ram(tmp_path: Path) -> None:
    meta = moe_meta()
    plain = make_plan(_inventory(tmp_path, CHAT + "}"), {"m": meta})
    moved = make_plan(_inventory(tmp_path, CHAT + ", n_cpu_moe: 2}"), {"m": meta})

    def weights(plan: object, dev: str) -> int:
        d = plan.device("gpu", dev)  # type: ignore[attr-defined]
        return sum(u.weights for u in d.usages)
    # layers 0-2 on gpu0, layer 3 and the output on gpu1: the experts of layers 0 and 1 move
    assert weights(plain, "gpu0") - weights(moved, "gpu0") == 6 * EXPERT
    assert weights(plain, "gpu1") == weights(moved, "gpu1")
    assert weights(moved, "ram") - weights(plain, "ram") == 6 * EXPERT
    assert weights(moved, "gpu0") == 3 * ATTN + 3 * EXPERT and weights(plain, "ram") == 4 * MIB
    assert weights(moved, "gpu1") == ATTN + 3 * EXPERT + 3 * MIB + 1024


def test_an_override_naming_a_missing_gpu_is_a_plan_error(tmp_path: Path) -> None:
    plan = make_plan(_inventory(tmp_path, CHAT + r", override_tensors: ['_exps\.=CUDA5']}"), {"m": moe_meta()})
    assert [(f.severity, f.subject, f.message) for f in plan.findings if f.severity == "error"] == [
        ("error", "chat", "override_tensors: buffer type 'CUDA5' is none of this instance's devices "
                          "(CPU, gpu/gpu0, gpu/gpu1)")]


def test_an_override_may_name_an_rpc_worker(tmp_path: Path) -> None:
    override = r"blk\.0\..*_exps\.=RPC[10.0.0.2:50052]"
    inv = _inventory(tmp_path, CHAT + f", rpc_workers: [rpc], override_tensors: ['{override}']}}"
                     "\nrpc: {engine: rpc-server, node: w, port: 50052, bind: 10.0.0.2}")
    plan = make_plan(inv, {"m": moe_meta()})
    errors = [f for f in plan.findings if f.severity == "error"]
    assert errors == []
    rpc = sum(u.weights for u in plan.device("w", "gpu0").usages)
    assert rpc >= 3 * EXPERT  # layer 0's experts went to the worker


def test_tensor_split_may_cover_the_rpc_workers_devices(tmp_path: Path) -> None:
    """llama.cpp splits over the head's GPUs and every RPC worker's devices: 3 shares for 2 + 1."""
    rpc = "\nrpc: {engine: rpc-server, node: w, port: 50052, bind: 10.0.0.2}"
    inv = _inventory(tmp_path, CHAT + ", rpc_workers: [rpc], tensor_split: [2, 1, 1]}" + rpc)
    assert inv.services["chat"].tensor_split == [2, 1, 1]
    with pytest.raises(InventoryErrors, match="tensor_split has 4 entries; node 'gpu' has 2 and its RPC workers 1 "
                                              "devices"):
        _inventory(tmp_path, CHAT + ", rpc_workers: [rpc], tensor_split: [2, 1, 1, 1]}" + rpc)


def test_estimate_takes_llama_servers_defaults_and_the_override_flags(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from clusterctl.cli import app
    from clusterctl.models.gguf_reader import read_local
    from tests import assets

    path = assets.write_llama_like(tmp_path / "tiny.gguf")
    runner = CliRunner()
    bare = json.loads(runner.invoke(app, ["estimate", str(path), "--json"]).stdout)
    assert (bare["slots"], bare["kv_unified"], bare["n_ctx"], bare["n_ctx_seq"]) == (4, True, 4096, 4096)
    one = json.loads(runner.invoke(app, ["estimate", str(path), "-np", "1", "--json"]).stdout)
    assert (one["slots"], one["kv_unified"]) == (1, False)

    layer0 = sum(t.bytes for t in read_local(path).tensors or [] if t.name.startswith("blk.0."))
    args = ["estimate", str(path), "--devices", "1GiB", "--no-mmap", "--json"]
    plain = json.loads(runner.invoke(app, args).stdout)["devices"]
    moved = json.loads(runner.invoke(app, [*args, "-ot", r"blk\.0\.=CPU"]).stdout)["devices"]
    assert round(moved["host"]["weights"] - plain["host"]["weights"], 2) == round(layer0 / 2**20, 2)
    assert round(plain["dev0"]["weights"] - moved["dev0"]["weights"], 2) == round(layer0 / 2**20, 2)

    bad = runner.invoke(app, [*args, "-ot", r"blk\.0\.=CUDA1"])
    assert bad.exit_code == 2
    assert json.loads(bad.stdout)["error"]["message"] == (
        "--override-tensor: buffer type 'CUDA1' is none of this instance's devices (CPU, dev0 = CUDA0)")
    help_text = runner.invoke(app, ["estimate", "--help"], env={"COLUMNS": "200"}).stdout
    assert "--override-tensor" in help_text and "--cpu-moe" in help_text and "--n-cpu-moe" in help_text


def test_plan_proposes_the_fewest_expert_layers_in_host_memory(tmp_path: Path) -> None:
    """A GPU too small for the model: the plan names the smallest n_cpu_moe that fits, and that
    inventory change indeed fits while one layer fewer does not."""
    import re

    nodes = NODES.replace("accelerators: [{kind: cuda, count: 2, memory: 24GiB}]",
                          "accelerators: [{kind: cuda, memory: 100MiB}]")

    def inventory(extra: str) -> Inventory:
        path = tmp_path / "small.yaml"
        path.write_text(nodes + f"  {CHAT}{extra}}}\n")
        return load_inventory(path)

    meta = moe_meta()
    plan = make_plan(inventory(""), {"m": meta})
    (error,) = [f for f in plan.findings if f.severity == "error"]
    match = re.search(r"n_cpu_moe: (\d+) \(llama.cpp --n-cpu-moe: the experts of layers 0-(\d+) in gpu's ram",
                      error.hint or "")
    assert match, error.hint
    n = int(match.group(1))
    assert int(match.group(2)) == n - 1 and 1 <= n <= 4
    assert make_plan(inventory(f", n_cpu_moe: {n}"), {"m": meta}).ok
    assert not make_plan(inventory(f", n_cpu_moe: {n - 1}"), {"m": meta}).ok
