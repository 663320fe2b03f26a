"""Every bundled example inventory plans to the outcome its seed deployment plan calls for.

Each inventory in inventories/ is planned twice: through the library (load_inventory + the lock
file + make_plan) and through the command line (`clusterctl plan PATH --json`, with and without
--strict). The numbers are exact: a change in the planner or in a pinned model shows up here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.errors import ExitCode
from clusterctl.inventory import Inventory, load_inventory
from clusterctl.lockfile import lock_path, read_lock, require_metas
from clusterctl.models.meta import ModelMeta
from clusterctl.planner import Plan, make_plan
from clusterctl.units import GIB

ROOT = Path(__file__).resolve().parents[2]
INVENTORIES = ROOT / "inventories"
runner = CliRunner()

OK = int(ExitCode.OK)
MISFIT = int(ExitCode.DOES_NOT_FIT)

# inventory -> (exit code of `plan`, exit code of `plan --strict`, verdict of each service)
EXPECTED: dict[str, tuple[int, int, dict[str, str]]] = {
    "beefcake2": (MISFIT, MISFIT, {
        "deepseek": "does-not-fit", "llama-head": "tight", "strand": "fits"}),
    "holobionte": (MISFIT, MISFIT, {
        "powerinfer": "fits", "ktransformers": "tight", "k2-think": "fits", "hermes": "fits",
        "deepseek-v3": "does-not-fit", "qwen-72b": "tight"}),
    "arthur-rdma": (OK, OK, {"deepseek": "fits", "exo-test": "fits"}),
    "arthur-rdma-8bit": (OK, MISFIT, {"deepseek": "tight", "exo-test": "tight"}),
    "strix-halo": (MISFIT, MISFIT, {
        "ask": "fits", "code": "fits", "autocomplete": "fits", "architect": "does-not-fit"}),
    "bestbox": (OK, OK, {"heavy": "fits", "light": "fits"}),
    "local-demo": (OK, OK, {"chat": "fits"}),
}

# inventory -> device -> (verdict, GiB used to 0.1, utilization in whole percent)
DEVICES: dict[str, dict[str, tuple[str, float, int]]] = {
    "beefcake2": {
        "node1/gpu0": ("tight", 76.3, 95), "node1/ram": ("fits", 1.3, 1),
        "node2/gpu0": ("fits", 17.0, 71), "node2/ram": ("fits", 0.8, 1),
        "node3/gpu0": ("does-not-fit", 443.6, 370), "node3/ram": ("fits", 0.7, 0),
    },
    "holobionte": {
        "node1/unified": ("fits", 18.6, 78),          # PowerInfer-2's declared 20 GB of 24 GiB
        "node2/unified": ("tight", 14.9, 93),         # KTransformers' declared 16 GB of the 16 GiB iGPU
        "node3/gpu0": ("fits", 6.1, 77),              # K2-Think: 24 of 64 layers
        "node3/gpu1": ("fits", 3.2, 40),              # Llama 3.2 3B
        "node3/ram": ("fits", 10.3, 32),              # K2-Think's other 40 layers
        "node4/gpu0": ("does-not-fit", 328.2, 684),   # "DeepSeek-V3 Q4 (42GB)" on one 48 GB card
        "node4/gpu1": ("tight", 46.1, 96),            # vLLM takes 95% of the card, CUDA graphs beside it
    },
    "arthur-rdma": {"alpha/unified": ("fits", 238.2, 47), "beta/unified": ("fits", 119.6, 47)},
    "arthur-rdma-8bit": {"alpha/unified": ("tight", 445.6, 87), "beta/unified": ("tight", 223.3, 87)},
    "strix-halo": {"speed/unified": ("fits", 66.0, 55), "reasoning/unified": ("does-not-fit", 159.9, 133)},
    "bestbox": {"bestbox/unified": ("fits", 15.5, 16)},
    "local-demo": {"local/cpu": ("fits", 0.3, 4)},
}

SIZE_HINT = "fix 'size' (or remove it: the lock file has the real size)"
TIGHT_HINT = ("lower the context or parallel slots, use a smaller quantisation, or raise safe_zone if you "
              "accept the risk")

# inventory -> every finding: (severity, subject, message, hint)
FINDINGS: dict[str, list[tuple[str, str, str, str | None]]] = {
    "beefcake2": [
        ("error", "deepseek", "does not fit: needs 444.3 GiB (weights 442.8 GiB, KV 1.1 GiB at 16384 tokens)",
         "model 'deepseek-coder-iq1s' (UD-IQ1_S, 136.3 GiB) with n_cpu_moe: 11 (its experts of layers 0-10 in "
         "host memory, 18.6 GiB) fits at this context; no combination of nodes has 444.3 GiB free; a node with at "
         "least 444.3 GiB is needed"),
        ("warning", "node1", "node1/gpu0: 95% used, above the 90% safe zone", TIGHT_HINT),
        ("warning", "strand-rust-coder", "the inventory says 6.5 GiB but the files are 14.6 GiB", SIZE_HINT),
        ("warning", "deepseek-coder", "the inventory says 111.8 GiB but the files are 442.8 GiB", SIZE_HINT),
    ],
    "holobionte": [
        ("error", "deepseek-v3", "weights 326.9 GiB per GPU exceed the vLLM budget 45.6 GiB (95% of 48.0 GiB)",
         "raise tensor_parallel, use a quantised checkpoint, or bigger GPUs"),
        ("warning", "node2", "node2/unified: 93% used, above the 90% safe zone", TIGHT_HINT),
        ("warning", "node4", "node4/gpu1: 96% used, above the 90% safe zone", TIGHT_HINT),
        ("warning", "qwen2-57b-a14b", "the inventory says 16.8 GiB but the files are 32.5 GiB", SIZE_HINT),
        ("warning", "deepseek-v3-awq", "the inventory says 39.1 GiB but the files are 326.9 GiB", SIZE_HINT),
    ],
    "arthur-rdma": [
        ("warning", "llama-3.2-1b-4bit", "the inventory says 1.2 GiB but the files are 662.8 MiB", SIZE_HINT),
    ],
    "arthur-rdma-8bit": [
        ("warning", "alpha", "alpha/unified: 87% used, above the 70% safe zone", TIGHT_HINT),
        ("warning", "beta", "beta/unified: 87% used, above the 70% safe zone", TIGHT_HINT),
    ],
    "strix-halo": [
        ("error", "architect", "does not fit: needs 159.9 GiB (weights 158.3 GiB, KV 1.1 GiB at 16384 tokens)",
         "model 'minimax-m2.1' (UD-Q3_K_XL, 94.1 GiB) fits at this context; "
         "split it across reasoning + speed over llama.cpp RPC: add an engine: rpc-server service on speed and "
         "list it in rpc_workers of 'architect'"),
        ("warning", "deepseek-v3.1-1bit", "the inventory says 178.8 GiB but the files are 158.3 GiB", SIZE_HINT),
    ],
    "bestbox": [],
    "local-demo": [],
}


def _load(name: str) -> tuple[Inventory, dict[str, ModelMeta]]:
    path = INVENTORIES / f"{name}.yaml"
    inv = load_inventory(path)
    lpath = lock_path(path)
    return inv, require_metas(inv, read_lock(lpath), lpath)


def _plan(name: str) -> Plan:
    inv, metas = _load(name)
    return make_plan(inv, metas)


def _with_service(inv: Inventory, name: str, **changes: object) -> Inventory:
    svc = inv.services[name].model_copy(update=changes)
    return inv.model_copy(update={"services": {**inv.services, name: svc}})


def _gib(n: int) -> float:
    return round(n / GIB, 1)


def test_every_inventory_has_an_expectation() -> None:
    names = {p.stem for p in INVENTORIES.glob("*.yaml")}
    assert names == set(EXPECTED) == set(DEVICES) == set(FINDINGS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_service_verdicts(name: str) -> None:
    code, _, verdicts = EXPECTED[name]
    plan = _plan(name)
    assert {s.name: s.verdict for s in plan.services} == verdicts
    assert plan.ok is (code == OK)


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_device_use(name: str) -> None:
    plan = _plan(name)
    got = {f"{d.node}/{d.id}": (d.verdict, _gib(d.used), round(d.utilization * 100)) for d in plan.devices}
    assert got == DEVICES[name]


@pytest.mark.parametrize("name", sorted(FINDINGS))
def test_findings(name: str) -> None:
    plan = _plan(name)
    assert [(f.severity, f.subject, f.message, f.hint) for f in plan.findings] == FINDINGS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cli_plan_json_and_exit_codes(name: str) -> None:
    code, strict_code, verdicts = EXPECTED[name]
    path = str(INVENTORIES / f"{name}.yaml")
    result = runner.invoke(app, ["plan", path, "--json"])
    assert result.exit_code == code, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is (code == OK)
    assert {s["name"]: s["verdict"] for s in data["services"]} == verdicts
    devices = {f"{d['node']}/{d['device']}": (d["verdict"], _gib(d["used"]), round(d["utilization"] * 100))
               for d in data["devices"]}
    assert devices == DEVICES[name]
    strict = runner.invoke(app, ["plan", path, "--strict"])
    assert strict.exit_code == strict_code, strict.output


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cli_plan_text(name: str) -> None:
    code, _, _ = EXPECTED[name]
    result = runner.invoke(app, ["plan", str(INVENTORIES / f"{name}.yaml")])
    assert result.exit_code == code, result.output
    errors = sum(1 for f in FINDINGS[name] if f[0] == "error")
    warnings = sum(1 for f in FINDINGS[name] if f[0] == "warning")
    last = result.stdout.strip().splitlines()[-1]
    assert last == (f"{errors} error(s), {warnings} warning(s)" if errors else f"plan ok, {warnings} warning(s)")


def test_console_script_strict_on_the_8bit_mac_cluster() -> None:
    """The seed's 'not recommended' 8-bit model: allowed, but --strict refuses it."""
    path = str(INVENTORIES / "arthur-rdma-8bit.yaml")
    cmd = [sys.executable, "-m", "clusterctl.cli", "plan", path, "--json"]
    loose = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert loose.returncode == 0, loose.stderr
    assert [d["verdict"] for d in json.loads(loose.stdout)["devices"]] == ["tight", "tight"]
    strict = subprocess.run([*cmd, "--strict"], capture_output=True, text=True, check=False)
    assert strict.returncode == MISFIT


def test_example_locks_are_up_to_date() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "tools/example_locks.py"), "--check"],
                          capture_output=True, text=True, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- seed 001: holobionte ------------------------------------------------------------------

def test_holobionte_deepseek_claim_is_off_by_more_than_eight_times() -> None:
    inv, metas = _load("holobionte")
    claimed = inv.models["deepseek-v3-awq"].size
    assert claimed == 42 * 10**9
    assert metas["deepseek-v3-awq"].file_bytes / claimed == pytest.approx(8.36, abs=0.01)
    gpu0 = _plan("holobionte").device("node4", "gpu0")
    assert [(u.service, _gib(u.weights)) for u in gpu0.usages] == [("deepseek-v3", 326.9)]


def test_holobionte_k2_think_needs_partial_offload_on_an_8gib_card() -> None:
    inv, metas = _load("holobionte")
    plan = make_plan(_with_service(inv, "k2-think", gpu_layers="all"), metas)
    sp = next(s for s in plan.services if s.name == "k2-think")
    assert sp.verdict == "does-not-fit"
    assert sp.max_context is None  # the weights alone are twice the card
    finding = next(f for f in plan.findings if f.subject == "k2-think")
    assert finding.message == "does not fit: needs 16.2 GiB (weights 14.8 GiB, KV 1.0 GiB at 4096 tokens)"
    assert _gib(plan.device("node3", "gpu0").used) == 15.8
    # as written (24 of 64 layers on the GPU) the rest waits in RAM
    ram = _plan("holobionte").device("node3", "ram")
    assert [(u.service, _gib(u.weights), _gib(u.kv)) for u in ram.usages] == [
        ("hermes", 0.2, 0.0), ("k2-think", 9.4, 0.6)]


def test_holobionte_qwen_72b_fits_at_the_bounded_max_model_len() -> None:
    inv, metas = _load("holobionte")
    plan = make_plan(_with_service(inv, "qwen-72b", max_model_len=19952), metas)
    sp = next(s for s in plan.services if s.name == "qwen-72b")
    assert sp.verdict == "tight"  # 95% of the card is vLLM's own gpu_memory_utilization
    assert not [f for f in plan.findings if f.subject == "qwen-72b"]
    usage = plan.device("node4", "gpu1").usages[0]
    assert (_gib(usage.weights), _gib(usage.kv), _gib(usage.compute)) == (38.7, 6.1, 1.3)
    over = make_plan(_with_service(inv, "qwen-72b", max_model_len=19953), metas)
    assert next(s for s in over.services if s.name == "qwen-72b").verdict == "does-not-fit"


def test_holobionte_router_chains_and_failover() -> None:
    inv, _ = _load("holobionte")
    r = inv.router
    assert r is not None
    assert (r.node, r.port, r.health.timeout, r.queue) == ("node3", 8000, 5.0, 64)
    assert r.routes["complex"] == ["deepseek-v3", "k2-think"]
    assert r.default == ["k2-think", "ktransformers"]
    assert [inv.services[s].node for s in r.routes["complex"]] == ["node4", "node3"]
    assert {n: inv.nodes[n].manager for n in inv.nodes} == {
        "node1": "direct", "node2": "systemd", "node3": "systemd", "node4": "systemd"}
    assert all(s.metrics for s in inv.services.values())
    assert {(n, s.default_port) for n, s in inv.services.items() if s.node == "node4"} == {
        ("deepseek-v3", 8000), ("qwen-72b", 8001)}


# --- seed 002: arthur-rdma ------------------------------------------------------------------

@pytest.mark.parametrize(("name", "weights_share"), [("arthur-rdma", 0.458), ("arthur-rdma-8bit", 0.863)])
def test_arthur_weights_alone_against_the_seeds_49_and_93_percent(name: str, weights_share: float) -> None:
    """The seed's 49% and 93% are weights / 768 GB; the KV cache and exo's overhead come on top."""
    plan = _plan(name)
    capacity = sum(d.capacity for d in plan.devices)
    weights = sum(u.weights for d in plan.devices for u in d.usages if u.service == "deepseek")
    assert round(weights / capacity, 3) == weights_share
    alpha, beta = plan.device("alpha", "unified"), plan.device("beta", "unified")
    share = {u.service: u.weights for u in alpha.usages}["deepseek"] / weights
    assert round(share, 3) == 0.667  # exo splits layers by memory: 512 : 256
    assert (alpha.safe_zone, beta.safe_zone) == (0.7, 0.7)


# --- seed 003: strix-halo -------------------------------------------------------------------

def test_strix_halo_reasoning_box_cannot_hold_the_1bit_deepseek_at_any_context() -> None:
    inv, metas = _load("strix-halo")
    for ctx in (4096, 16384, 65536):
        plan = make_plan(_with_service(inv, "architect", context=ctx), metas)
        sp = next(s for s in plan.services if s.name == "architect")
        assert (sp.verdict, sp.max_context) == ("does-not-fit", None), ctx
    assert _gib(metas["deepseek-v3.1-1bit"].weights_bytes) == 158.3  # above 120 GiB before any KV


@pytest.mark.parametrize(("ctx", "verdict", "used", "percent"), [
    (16384, "fits", 98.1, 82), (65536, "tight", 109.8, 91), (None, "does-not-fit", 141.0, 118)])
def test_strix_halo_minimax_context_changes_the_fit(ctx: int | None, verdict: str, used: float,
                                                    percent: int) -> None:
    inv, metas = _load("strix-halo")
    plan = make_plan(_with_service(inv, "architect", model="minimax-m2.1", context=ctx), metas)
    dev = plan.device("reasoning", "unified")
    assert (dev.verdict, _gib(dev.used), round(dev.utilization * 100)) == (verdict, used, percent)
    sp = next(s for s in plan.services if s.name == "architect")
    assert sp.verdict == verdict
    if ctx is None:  # the training context, 196608 tokens: the largest that fits is given
        assert (sp.context, sp.max_context) == (196608, 109824)


def test_strix_halo_three_services_share_the_speed_box() -> None:
    plan = _plan("strix-halo")
    speed = plan.device("speed", "unified")
    per_service: dict[str, float] = {}
    for u in speed.usages:
        per_service[u.service] = per_service.get(u.service, 0) + u.total
    assert {k: _gib(v) for k, v in per_service.items()} == {"ask": 12.2, "autocomplete": 17.3, "code": 36.5}
    inv, _ = _load("strix-halo")
    assert inv.router is not None
    assert set(inv.router.routes) == {"ask", "code", "autocomplete", "architect", "debug"}


# --- seed 004: bestbox ----------------------------------------------------------------------

def test_bestbox_native_and_container_services() -> None:
    inv, _ = _load("bestbox")
    heavy, light = inv.services["heavy"], inv.services["light"]
    assert (heavy.port, heavy.context, heavy.parallel, heavy.container) == (8080, 8192, 1, None)
    assert (light.port, light.context, light.parallel) == (8081, 4096, 2)
    assert light.container is not None
    assert light.container.devices == ["/dev/kfd", "/dev/dri"]
    assert inv.router is not None
    assert inv.router.routes["classify"][0] == "light"
    assert inv.router.default == ["heavy", "light"]
    plan = _plan("bestbox")
    assert {s.name: (s.context, _gib(s.total)) for s in plan.services} == {
        "heavy": (8192, 10.0), "light": (4096, 5.4)}


# --- local-demo -----------------------------------------------------------------------------

def test_local_demo_is_the_real_gemma_on_cpu() -> None:
    inv, metas = _load("local-demo")
    assert inv.nodes["local"].is_local
    assert metas["gemma-270m"].file_bytes == 253_113_024
    dev = _plan("local-demo").device("local", "cpu")
    assert [(u.service, u.note) for u in dev.usages] == [("chat", "host")]
