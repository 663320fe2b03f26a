"""Seed 003's shape on the real llama.cpp engine: several llama-servers at once on one node
behind the router's mode routes (Ask / Code / Autocomplete), and the planner's "largest
context that fits" held against what a real llama-server allocates.

1. `ask`, `code` and `autocomplete` (the real Gemma 3 270M, ports 8080-8082) behind the router
   on node1. A request picks its mode by the `X-Task-Type` header (a route name) or by
   `model` (a route name); the router names the service that answered in
   `X-Clusterctl-Backend`. With `code` stopped, the Code mode falls back to `ask`; started
   again, `code` is back in rotation.
   The deploy's own verify passes every route check: the router, started before the
   services, counts them as starting and not as failed, so nothing waits out a cool-down. 16
   requests at concurrency 8 to the Code mode (a chain of 4 slots) all succeed with the
   default queue.
2. A CPU-only node whose `ram` (the budget a CPU-only llama-server is charged against) is too
   small for the asked context: `clusterctl plan --json` reports the largest context that fits.
   The same service is deployed at that context and llama.cpp's own buffer lines are compared
   with the budget and with the planner (docs/accuracy.md).
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.errors import ExitCode
from clusterctl.models.gguf_reader import read_local
from clusterctl.models.meta import ModelMeta
from clusterctl.planner.llama import HOST, MIB, LlamaParams, estimate_llama
from tests import assets
from tests.accuracy import TOTAL_TOLERANCE
from tests.e2e.test_deploy import _package_for_nodes, deploy
from tests.e2e.testbed import Testbed, open_testbed
from tests.llama_harness import MemoryReport, parse_memory_report

pytestmark = pytest.mark.real
runner = CliRunner()

ROUTER_PORT = 8000
MODES = {"ask": 8080, "code": 8081, "autocomplete": 8082}
BUDGET = 320 * MIB  # node RAM of the planning case: Gemma 270M fits only with a shorter context
ASKED_CONTEXT = 32768  # the model's training context
LARGEST_CONTEXT = 12800  # the planner's answer for this budget, weights read into memory (mmap: false)
LARGEST_MAPPED = 9472  # the same, memory-mapped (llama.cpp's default): the repacked copy sits beside the mapping


def _engines() -> str:
    return f"llama_cpp: '{assets.llama_bin_dir()}'"


def _modes_inventory(tb: Testbed, tmp: Path) -> Path:
    gemma = assets.test_model_path()
    text = tb.cluster_yaml("strix-halo", _engines()) + textwrap.dedent(f"""\
        nodes:
          node1: {{address: {tb.node("node1").ip}, ram: 8GiB}}
        models:
          gemma: {{source: 'file://{gemma}'}}
        services:
          ask: {{engine: llama-server, node: node1, model: gemma, port: 8080, context: 2048, threads: 1,
                startup_timeout: 120s}}
          code: {{engine: llama-server, node: node1, model: gemma, port: 8081, context: 2048, threads: 1,
                 startup_timeout: 120s}}
          autocomplete: {{engine: llama-server, node: node1, model: gemma, port: 8082, context: 1024,
                         parallel: 2, threads: 1, startup_timeout: 120s}}
        router:
          node: node1
          port: {ROUTER_PORT}
          default: [ask]
          routes: {{ask: [ask], code: [code, ask], autocomplete: [autocomplete]}}
          health: {{interval: 1s, timeout: 2s, failures: 1}}
          command: [/usr/bin/env, 'PYTHONPATH={_package_for_nodes()}', '{sys.executable}', -m, clusterctl.cli]
        """)
    path = tmp / "strix-halo.yaml"
    path.write_text(text)
    resolved = runner.invoke(app, ["resolve", str(path)])
    assert resolved.exit_code == 0, resolved.output
    return path


@dataclass
class FirstDeploy:
    code: int
    seconds: float
    checks: dict[tuple[str, str], tuple[str, str]]
    ready: dict[str, tuple[str, float]]
    """backend -> (how the router first saw it healthy: check or request, seconds after it started)"""
    events: list[dict[str, Any]]
    """the router's events (JSON log lines with an `event`), as they came"""


@pytest.fixture(scope="module")
def first_deploy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Testbed, FirstDeploy]]:
    tb = open_testbed(1)
    try:
        path = _modes_inventory(tb, tmp_path_factory.mktemp("seed003"))
        started = time.monotonic()
        # the whole deploy, verify included: the router starts before the services (phase order)
        code, data = deploy(path, verify=True)
        seconds = time.monotonic() - started
        node = data["nodes"]["node1"]  # type: ignore[index]
        assert not node["failed"], (node["failed"], node["log_tail"])
        verified = data["verify"]
        assert isinstance(verified, dict)
        checks = {(c["subject"], c["name"]): (c["status"], c["detail"]) for c in verified["checks"]}
        log = tb.node("node1").run(["journalctl", "--no-pager", "-o", "cat", "-u", "clusterctl-router.service"])
        events = [json.loads(line) for line in log.stdout.splitlines() if line.startswith('{"ts"')]
        events = [e for e in events if "event" in e]
        ready = {e["backend"]: (e["via"], e["after_s"]) for e in events if e["event"] == "backend_ready"}
        yield tb, FirstDeploy(code, seconds, checks, ready, events)
    finally:
        tb.close()


@pytest.fixture(scope="module")
def cluster(first_deploy: tuple[Testbed, FirstDeploy]) -> Testbed:
    return first_deploy[0]


def test_verify_right_after_a_first_deploy_passes_every_route_check(first_deploy: tuple[Testbed, FirstDeploy]) -> None:
    tb, result = first_deploy
    t0 = result.events[0]["ts"] if result.events else 0.0
    print(f"\ndeploy with verify {result.seconds:.1f} s; router events: "
          + ", ".join(f"{e['event']} {e.get('backend', '')} +{e['ts'] - t0:.1f}s" for e in result.events))
    # the router never ejected them: each came in at its first passing check or answer
    assert [e["event"] for e in result.events if e["event"] != "listening"] == ["backend_ready"] * 3, result.events
    assert sorted(result.ready) == sorted(MODES)
    routes = {key: value for key, value in result.checks.items() if key[1] == "route" or key[0] == "router"}
    assert routes == {
        ("router", "health"): ("ok", "/health 200"),
        ("route ask", "route"): ("ok", "-> ask"),
        ("route autocomplete", "route"): ("ok", "-> autocomplete"),
        ("route code", "route"): ("ok", "-> code"),
    }
    for name in MODES:
        assert result.checks[(name, "health")] == ("ok", "/health 200")
    # the only checks that may fail are the smoke answers of the real Gemma 270M (no chat
    # template in its GGUF: tests/e2e/test_verify.py); nothing else
    failed = sorted(key for key, (status, _) in result.checks.items() if status == "fail")
    assert all(name == "smoke" for _, name in failed), failed
    assert result.code == (ExitCode.VERIFY_FAILED if failed else ExitCode.OK)
    health = _router_health(tb)
    assert health["status"] == "ok"
    assert {name: b["state"] for name, b in health["backends"].items()} == dict.fromkeys(MODES, "up")
    assert _metric(tb, "clusterctl_router_backend_ejections_total") == 0.0
    print(f"\nfirst deploy with verify: {result.seconds:.1f} s; first healthy (via, s after the router started): "
          + ", ".join(f"{name} {via} {after:.1f}" for name, (via, after) in sorted(result.ready.items())))


# ---------------------------------------------------------------------------------------------
# 1. mode routes


@dataclass(frozen=True)
class Answer:
    status: str
    backend: str
    route: str


def _ask(tb: Testbed, *, task: str | None = None, model: str = "auto") -> Answer:
    """One completion through the router: by the X-Task-Type header, or by the model name."""
    body = json.dumps({"model": model, "temperature": 0, "max_tokens": 8,
                       "messages": [{"role": "user", "content": "Say hi."}]})
    header = ["-H", f"X-Task-Type: {task}"] if task else []
    written = "%{http_code} %header{x-clusterctl-backend} %header{x-clusterctl-route}"
    r = tb.node("node1").run(
        ["curl", "-sS", "-o", "/dev/null", "-w", written, "--max-time", "120", "-H", "Content-Type: application/json",
         *header, "--data-binary", body, f"http://127.0.0.1:{ROUTER_PORT}/v1/chat/completions"], timeout=150)
    assert r.returncode == 0, r.stderr
    status, backend, route = r.stdout.split(" ")
    return Answer(status, backend, route)


def _router_health(tb: Testbed) -> dict[str, Any]:
    r = tb.node("node1").run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{ROUTER_PORT}/health"])
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def _wait_backend(tb: Testbed, name: str, up: bool, timeout: float) -> float:
    """Seconds until the router reports backend `name` up (or down)."""
    started = time.monotonic()
    while True:
        backends = _router_health(tb)["backends"]
        if backends[name]["up"] is up:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            pytest.fail(f"the router did not report {name} {'up' if up else 'down'} in {timeout:g} s: {backends}")
        time.sleep(0.5)


def _wait_healthy(tb: Testbed, port: int, timeout: float = 120) -> None:
    """Wait until the llama-server on node1's loopback `port` answers /health with 200."""
    deadline = time.monotonic() + timeout
    while True:
        r = tb.node("node1").run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                                  f"http://127.0.0.1:{port}/health"])
        if r.stdout.strip() == "200":
            return
        if time.monotonic() > deadline:
            pytest.fail(f"nothing healthy on node1 127.0.0.1:{port} after {timeout:g} s")
        time.sleep(0.5)


def _metric(tb: Testbed, series: str) -> float:
    """The sum of the router's samples of `series` (a name, or a name with its labels); 0 when absent."""
    r = tb.node("node1").run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{ROUTER_PORT}/metrics"])
    assert r.returncode == 0, r.stderr
    total = 0.0
    for line in r.stdout.splitlines():
        name = line.split(" ")[0]
        if name == series or (name.startswith(series + "{") and "{" not in series):
            total += float(line.split()[-1])
    return total


def _requests_metric(tb: Testbed, route: str, backend: str) -> float:
    return _metric(tb, f'clusterctl_router_requests_total{{backend="{backend}",route="{route}",status="200"}}')


def test_three_llama_servers_on_one_node_each_mode_answered_by_its_service(cluster: Testbed) -> None:
    tb = cluster
    node = tb.node("node1")
    for name, port in MODES.items():
        unit = node.run(["systemctl", "is-active", f"clusterctl-{name}.service"])
        assert unit.stdout.strip() == "active", (name, unit.stdout, unit.stderr)
        listening = node.run(["bash", "-c", f"tr '\\0' ' ' < /proc/$(systemctl show -p MainPID --value "
                                            f"clusterctl-{name}.service)/cmdline"])
        assert f"--port {port} " in listening.stdout and f"--alias {name} " in listening.stdout, listening.stdout
    assert sorted(_router_health(tb)["routes"]) == ["ask", "autocomplete", "code"]

    code_before, fallback_before = _requests_metric(tb, "code", "code"), _requests_metric(tb, "code", "ask")
    # the mode by header (what an editor's mode sends) and by model name
    assert _ask(tb, task="ask") == Answer("200", "ask", "ask")
    assert _ask(tb, task="code") == Answer("200", "code", "code")
    assert _ask(tb, task="autocomplete") == Answer("200", "autocomplete", "autocomplete")
    assert _ask(tb, model="code") == Answer("200", "code", "code")
    assert _ask(tb, model="autocomplete") == Answer("200", "autocomplete", "autocomplete")
    assert _ask(tb) == Answer("200", "ask", "default")  # model "auto" and no rules: the default chain
    # a mode the router does not serve is refused, not sent somewhere
    assert _ask(tb, task="architect") == Answer("404", "", "")
    # the router's own count: two Code requests, both served by `code`, none fell back
    assert _requests_metric(tb, "code", "code") == code_before + 2
    assert _requests_metric(tb, "code", "ask") == fallback_before


def test_code_mode_falls_back_to_ask_while_code_is_stopped(cluster: Testbed) -> None:
    tb = cluster
    node = tb.node("node1")
    before = _requests_metric(tb, "code", "ask")
    stopped = node.run(["systemctl", "stop", "clusterctl-code.service"])
    assert stopped.returncode == 0, stopped.stderr
    try:
        assert node.run(["systemctl", "is-active", "clusterctl-code.service"]).stdout.strip() == "inactive"
        # at once (the request finds code's port closed and goes on along the chain) and after
        # the router's health check has ejected it
        assert _ask(tb, task="code") == Answer("200", "ask", "code")
        _wait_backend(tb, "code", up=False, timeout=15)
        assert _ask(tb, model="code") == Answer("200", "ask", "code")
        assert _ask(tb, task="autocomplete") == Answer("200", "autocomplete", "autocomplete")
        assert _requests_metric(tb, "code", "ask") == before + 2
    finally:
        started = node.run(["systemctl", "start", "clusterctl-code.service"])
        assert started.returncode == 0, started.stderr
    _wait_healthy(tb, MODES["code"])
    # it was healthy before: the router re-admits it after its cooldown (30 s) and two passing
    # checks
    _wait_backend(tb, "code", up=True, timeout=90)
    assert _ask(tb, task="code") == Answer("200", "code", "code")
    assert node.run(["systemctl", "is-active", "clusterctl-code.service"]).stdout.strip() == "active"


def test_16_requests_at_concurrency_8_all_succeed_with_the_default_queue(cluster: Testbed) -> None:
    """The Code mode's chain [code, ask] has 4 slots (2 x parallel 1 each); 8 at once is twice
    that. With no queue the 4 beyond the slots would get 503; the default queue holds them."""
    tb = cluster
    health = _router_health(tb)
    slots = sum(health["backends"][name]["max_concurrency"] for name in ("code", "ask"))
    assert slots == 4
    queued_before = _metric(tb, 'clusterctl_router_queued_total{route="code"}')
    served_before = {name: _requests_metric(tb, "code", name) for name in ("code", "ask")}
    deepest = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal deepest
        while not done.wait(0.1):
            deepest = max(deepest, int(_router_health(tb)["queue_depth"]))

    def one(i: int) -> Answer:
        body = json.dumps({"model": "code", "temperature": 0, "max_tokens": 32, "ignore_eos": True,
                           "messages": [{"role": "user", "content": f"Count to ten, request {i}."}]})
        written = "%{http_code} %header{x-clusterctl-backend} %header{x-clusterctl-route}"
        r = tb.node("node1").run(
            ["curl", "-sS", "-o", "/dev/null", "-w", written, "--max-time", "300", "-H",
             "Content-Type: application/json", "--data-binary", body,
             f"http://127.0.0.1:{ROUTER_PORT}/v1/chat/completions"], timeout=330)
        assert r.returncode == 0, r.stderr
        status, backend, route = r.stdout.split(" ")
        return Answer(status, backend, route)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(one, range(16)))
    finally:
        done.set()
        watcher.join(30)
    seconds = time.monotonic() - started
    assert [a.status for a in answers] == ["200"] * 16, answers
    assert {a.route for a in answers} == {"code"}
    by_backend = {name: sum(1 for a in answers if a.backend == name) for name in ("code", "ask")}
    assert sum(by_backend.values()) == 16
    assert {name: _requests_metric(tb, "code", name) - served_before[name] for name in by_backend} == by_backend
    queued = _metric(tb, 'clusterctl_router_queued_total{route="code"}') - queued_before
    assert queued >= 1 and deepest >= 1, (queued, deepest)  # some did wait for a slot, and were served
    assert _router_health(tb)["queue_depth"] == 0
    print(f"\n16 requests at concurrency 8 on 4 slots: 16/16 answered in {seconds:.1f} s, by code "
          f"{by_backend['code']} and ask {by_backend['ask']}; {queued:.0f} waited in the queue (deepest {deepest})")


# ---------------------------------------------------------------------------------------------
# 2. the largest context that fits, against a real start


def _budget_inventory(tb: Testbed, tmp: Path, context: int, extra_args: list[str], *, mmap: bool = False) -> Path:
    gemma = assets.test_model_path()
    text = tb.cluster_yaml("strix-budget", _engines()) + textwrap.dedent(f"""\
        nodes:
          node1: {{address: {tb.node("node1").ip}, ram: {BUDGET // MIB}MiB}}
        models:
          gemma: {{source: 'file://{gemma}'}}
        services:
          architect: {{engine: llama-server, node: node1, model: gemma, port: 8090, context: {context},
                      threads: 1, startup_timeout: 120s, chat_template: gemma, mmap: {json.dumps(mmap)},
                      extra_args: {json.dumps(extra_args)}}}
        """)
    path = tmp / "strix-budget.yaml"
    path.write_text(text)
    resolved = runner.invoke(app, ["resolve", str(path)])
    assert resolved.exit_code == 0, resolved.output
    return path


def _plan(path: Path) -> tuple[int, dict[str, Any]]:
    result = runner.invoke(app, ["plan", "--json", str(path)])
    return result.exit_code, dict(json.loads(result.stdout))


def _started_report(tb: Testbed, path: Path) -> MemoryReport:
    """Deploy the budget inventory and parse llama.cpp's memory lines of the service's current run."""
    code, data = deploy(path)
    node = data["nodes"]["node1"]  # type: ignore[index]
    assert code == 0, (node["failed"], node["log_tail"])
    n1 = tb.node("node1")
    _wait_healthy(tb, 8090)
    invocation = n1.run(["systemctl", "show", "-p", "InvocationID", "--value", "clusterctl-architect.service"])
    deadline = time.monotonic() + 30
    while True:
        log = n1.run(["journalctl", "--no-pager", "-o", "cat", f"_SYSTEMD_INVOCATION_ID={invocation.stdout.strip()}"])
        report = parse_memory_report(log.stdout)
        if report.compute_buffers or time.monotonic() > deadline:
            return report
        time.sleep(0.5)


def _mib(n: int) -> float:
    return n / MIB


def test_largest_context_that_fits_holds_on_a_real_llama_server(cluster: Testbed, tmp_path: Path) -> None:
    tb = cluster
    meta = read_local(assets.test_model_path())

    # the asked context does not fit the node's RAM: plan says so and names the largest that does
    path = _budget_inventory(tb, tmp_path, ASKED_CONTEXT, ["-lv", "4"])
    code, plan = _plan(path)
    assert code == ExitCode.DOES_NOT_FIT
    [svc] = plan["services"]
    assert (svc["verdict"], svc["context"], svc["max_context"]) == ("does-not-fit", ASKED_CONTEXT, LARGEST_CONTEXT)
    [finding] = plan["findings"]
    assert f"the largest context that fits is {LARGEST_CONTEXT} (asked {ASKED_CONTEXT})" in finding["hint"]

    def estimate(ctx: int) -> int:
        total: int = estimate_llama(meta, LlamaParams(n_ctx=ctx, flash_attn=True, mmap=False), []).total
        return total

    # it is the largest: one llama.cpp context step (256 cells) more is over the budget
    assert estimate(LARGEST_CONTEXT) <= BUDGET < estimate(LARGEST_CONTEXT + 256)

    # at that context the plan passes (above the 90% safe zone: a warning, exit 0)
    path = _budget_inventory(tb, tmp_path, LARGEST_CONTEXT, ["-lv", "4"])
    code, plan = _plan(path)
    assert code == ExitCode.OK, plan
    [svc] = plan["services"]
    assert (svc["verdict"], svc["context"], svc["max_context"]) == ("tight", LARGEST_CONTEXT, None)
    assert svc["total"] == estimate(LARGEST_CONTEXT)
    # a CPU-only node: the whole instance (weights, KV, compute, logits) is charged to its RAM
    [device] = plan["devices"]
    assert (device["node"], device["device"], device["capacity"], device["verdict"]) == (
        "node1", "cpu", BUDGET, "tight")
    [usage] = device["usages"]

    try:
        _check_real_starts(tb, tmp_path, meta, path, usage)
    finally:
        tb.node("node1").run(["systemctl", "stop", "clusterctl-architect.service"])


def _check_real_starts(tb: Testbed, tmp_path: Path, meta: ModelMeta, path: Path, usage: dict[str, int]) -> None:
    # the real llama-server, deployed from that inventory (weights read into memory, not mapped)
    report = _started_report(tb, path)
    est = estimate_llama(meta, LlamaParams(n_ctx=LARGEST_CONTEXT, flash_attn=True, mmap=False), [])
    # the KV cache is exact: llama.cpp's own lines equal the estimator's caches from the GGUF header
    assert [(c.kind, c.cells, c.layers, c.size_mib) for c in report.kv_caches] == [
        ("non-SWA", LARGEST_CONTEXT, 3, _mib(est.caches[0].total)),
        ("SWA", 1024, 15, _mib(est.caches[1].total)),
    ]
    assert [_mib(c.total) for c in est.caches] == [37.5, 15.0]
    assert _mib(usage["kv"]) == sum(c.size_mib for c in report.kv_caches) == 52.5
    real = report.per_device()["CPU"]
    real_total = real.model + real.kv + real.compute + real.output
    assert real.model == pytest.approx(_mib(meta.weights_bytes), abs=0.01)  # CPU + CPU_REPACK = the file's tensors
    assert (real.kv, real.output) == (52.5, 1.0)
    assert real.compute + real.output == pytest.approx(_mib(usage["compute"]), abs=0.05)
    # the real total fits the budget, and the planner is within the documented 5% of it
    assert real_total <= BUDGET / MIB, report.to_json()
    planned = _mib(usage["total"])
    assert abs(planned - real_total) / real_total <= TOTAL_TOLERANCE, (planned, real_total)
    assert est.devices[HOST].total == usage["total"]

    # memory-mapped (llama.cpp's default) the CPU backend keeps a repacked copy of the Q4_K
    # tensors beside the mapping, which the planner counts: a smaller largest context
    path = _budget_inventory(tb, tmp_path, ASKED_CONTEXT, ["-lv", "4"], mmap=True)
    code, plan = _plan(path)
    assert code == ExitCode.DOES_NOT_FIT
    assert plan["services"][0]["max_context"] == LARGEST_MAPPED
    path = _budget_inventory(tb, tmp_path, LARGEST_MAPPED, ["-lv", "4"], mmap=True)
    code, plan = _plan(path)
    assert code == ExitCode.OK, plan
    [usage_mapped] = plan["devices"][0]["usages"]
    mapped = _started_report(tb, path)
    repack = mapped.model_buffers["CPU_REPACK"]
    assert mapped.model_buffers["CPU_Mapped"] == pytest.approx(_mib(meta.weights_bytes), abs=0.01)
    m = mapped.per_device()["CPU"]
    assert m.model == pytest.approx(_mib(usage_mapped["weights"]), abs=0.01)  # mapping + repacked copy
    mapped_total = m.model + m.kv + m.compute + m.output
    assert mapped_total <= BUDGET / MIB, mapped.to_json()
    planned_mapped = _mib(usage_mapped["total"])
    assert abs(planned_mapped - mapped_total) / mapped_total <= TOTAL_TOLERANCE, (planned_mapped, mapped_total)
    print(f"\nbudget {BUDGET / MIB:.2f} MiB: at context {LARGEST_CONTEXT} (load-mode none) planner {planned:.2f}, "
          f"llama.cpp {real_total:.2f}; at context {LARGEST_MAPPED} (mmap, CPU_REPACK {repack:.2f}) planner "
          f"{planned_mapped:.2f}, llama.cpp {mapped_total:.2f}")
