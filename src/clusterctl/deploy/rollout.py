"""Deploy: make the nodes match the inventory, in phases acquire -> router -> services -> verify.

Orchestration only. Per node: facts (facts.py) -> steps (changes.py) with their operations
(ops.py) -> preflight (checks.py) -> the executor (executor.py), the one writer. Nodes run in
parallel (bounded); phases are barriers; a failed node stops its own rollout and never
another's in-flight work; results are kept per node. A dry run gets a read-only transport
(gate.py), so it cannot change a node whatever it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from clusterctl.deploy import checks, facts, ops
from clusterctl.deploy.changes import diff, orphans
from clusterctl.deploy.desired import build_desired
from clusterctl.deploy.executor import Executor, NodeResult, NullReporter, Reporter
from clusterctl.deploy.gate import ReadOnly
from clusterctl.deploy.managers import manager
from clusterctl.deploy.model import PHASES, ROUTER, Desired, NodeFacts, Phase, Step
from clusterctl.engines import LaunchSpec, launch_specs
from clusterctl.errors import ClusterctlError, ExitCode, most_severe
from clusterctl.inventory import Inventory
from clusterctl.lockfile import LockFile
from clusterctl.planner import Plan
from clusterctl.render import Rendered, router_spec
from clusterctl.transport import Transport, TransportError

Connector = Callable[[str], Transport]


@dataclass
class DeployResult:
    nodes: dict[str, NodeResult]
    dry_run: bool
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.nodes.values())

    @property
    def exit_code(self) -> ExitCode:
        """The most severe of the nodes' exit codes (errors.SEVERITY), OK when all succeeded."""
        return most_severe(r.exit_code for r in self.nodes.values())

    @property
    def changes(self) -> int:
        return sum(len(r.steps) for r in self.nodes.values())

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok, "exit_code": int(self.exit_code),
            "dry_run": self.dry_run, "seconds": round(self.seconds, 3), "changes": self.changes,
            "nodes": {
                name: {
                    "ok": r.ok, "exit_code": int(r.exit_code), "failed": r.failed, "log_tail": r.log_tail,
                    "rolled_back": r.rolled_back,
                    "bytes_sent": r.bytes_sent,
                    "steps": [{"phase": s.phase, "kind": s.kind, "target": s.target, "reason": s.reason,
                               "bytes": s.bytes, "done": s in r.done, "sensitive": s.sensitive,
                               "commands": list(s.commands)}
                              for s in r.steps],
                    "diffs": r.diffs,
                    "orphans": r.orphans,
                } for name, r in sorted(self.nodes.items())
            },
        }


def service_specs(inv: Inventory, plan: Plan | None) -> list[LaunchSpec]:
    """Every service deploy starts, the router included."""
    specs = launch_specs(inv, plan)
    return specs + ([router_spec(inv, specs)] if inv.router is not None else [])


class NodeRun:
    """One node's rollout: gather, plan its steps, check, then run them phase by phase."""

    def __init__(self, inv: Inventory, desired: Desired, transport: Transport, reporter: Reporter,
                 specs: dict[str, LaunchSpec]) -> None:
        self.inv, self.d, self.t, self.reporter, self.specs = inv, desired, transport, reporter, specs
        self.node = inv.nodes[desired.node]
        self.mgr = manager(self.node)
        self.result = NodeResult(desired.node)
        self.facts: NodeFacts | None = None

    def gather(self, phases: tuple[Phase, ...] = PHASES, *, prune: bool = False) -> None:
        d = self.d
        weights = [w.path for w in d.weights] + [archive.path for _, archive in d.builds]
        commands = sorted({c for alts in d.commands.values() for alt in alts for c in alt.split("|")})
        self.facts = facts.gather(self.t, base=d.base, files=d.all_paths(), handles=[u for u in d.units.values() if u],
                                  weights=weights, dirs=sorted({w.rsplit("/", 1)[0] for w in weights}),
                                  manager=self.mgr.name, binaries=list(d.binaries), commands=commands,
                                  installed=self.mgr.installed(self.node))
        self.result.orphans = orphans(d, self.facts)
        self.result.steps = [dataclasses.replace(s, commands=ops.describe(self.ops(s)))
                             for s in diff(d, self.facts, prune=prune) if s.phase in phases]

    def ops(self, s: Step) -> list[ops.Op]:
        spec = self.specs.get(s.service or "")
        probe = checks.health_probe(spec) if spec else None
        return ops.step_ops(s, self.d, self.node, self.mgr, health=(probe,) if probe else ())

    def preflight(self) -> None:
        assert self.facts is not None
        checks.preflight(self.inv, self.d, self.facts, self.result.steps, self.specs)

    def dry_run_diffs(self) -> None:
        for s in self.result.steps:
            if s.kind != "upload":
                continue
            f = next(f for f in self.d.files if f.path == s.target)
            old = self.t.get(s.target)
            old_text = old.decode(errors="replace") if old is not None else ""
            self.result.diffs[s.target] = "".join(difflib.unified_diff(
                old_text.splitlines(keepends=True), f.content.splitlines(keepends=True),
                f"a{s.target}", f"b{s.target}"))

    def executor(self) -> Executor:
        if not hasattr(self, "_executor"):
            self._executor = Executor(self.inv, self.d, self.node, self.mgr, self.t, self.reporter, self.specs,
                                      self.result)
        return self._executor

    def run_phase(self, phase: Phase, *, services_wave: str | None = None) -> None:
        steps = [s for s in self.result.steps if s.phase == phase]
        if phase == "services" and services_wave is not None:
            first = {n for n, spec in self.specs.items() if spec.worker}  # rpc workers, headless ranks
            wave = [s for s in steps if (s.service in first if services_wave == "workers"
                                         else s not in self.result.done)
                    and s.kind != "daemon-reload"]
            # the manager re-reads unit files after this wave's uploads, before its restarts
            units = any((s.kind == "upload" and s.target in self.d.unit_files) or s.kind == "remove" for s in wave)
            steps = wave + [s for s in steps if s.kind == "daemon-reload" and units]
        if not steps:
            return
        if phase == "acquire":
            for s in steps:
                self.executor().acquire(s)
        else:
            self.executor().apply(steps)


def deploy(inv: Inventory, lock: LockFile, rendered: Rendered, connect: Connector, *,
           nodes: list[str] | None = None, phases: tuple[Phase, ...] = PHASES, dry_run: bool = False,
           max_fail: int = 0, reporter: Reporter | None = None, plan: Plan | None = None,
           prune: bool = False) -> DeployResult:
    """Run the rollout. `max_fail`: how many failed nodes are tolerated before the remaining
    phases are skipped for everyone (in-flight work always finishes). `prune`: remove the
    services a node runs that the inventory no longer gives it (orphans); without it they are
    only reported."""
    reporter = reporter or NullReporter()
    started = time.monotonic()
    wanted = nodes or list(inv.nodes)
    desired = build_desired(inv, lock, rendered, plan, read_secrets=not dry_run)
    specs = service_specs(inv, plan)
    runs: dict[str, NodeRun] = {}
    results: dict[str, NodeResult] = {}
    transports: dict[str, Transport] = {}

    def prepare(name: str) -> None:
        try:
            t = connect(name)
            transports[name] = t
            node_specs = {(ROUTER if s.engine == "router" else s.service): s for s in specs if s.node == name}
            run = runs[name] = NodeRun(inv, desired[name], ReadOnly(t) if dry_run else t, reporter, node_specs)
            run.gather(phases, prune=prune)
            if dry_run:
                run.dry_run_diffs()
            else:
                run.preflight()
            results[name] = run.result
        except (TransportError, ClusterctlError) as exc:
            results[name] = runs[name].result if name in runs else NodeResult(name)
            results[name].fail(exc)

    workers = max(1, min(inv.cluster.max_parallel, len(wanted)))
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(prepare, wanted))
            for phase in () if dry_run else phases:
                if phase == "verify":
                    continue
                if sum(1 for r in results.values() if not r.ok) > max_fail:
                    break
                reporter.phase(phase)
                for wave in ["workers", "rest"] if phase == "services" else [None]:

                    def step(name: str, phase: Phase = phase, wave: str | None = wave) -> None:
                        try:
                            runs[name].run_phase(phase, services_wave=wave)
                        except (TransportError, ClusterctlError) as exc:
                            results[name].fail(exc)

                    list(pool.map(step, [n for n in wanted if n in runs and results[n].ok]))
    finally:
        for t in transports.values():
            with contextlib.suppress(Exception):
                t.close()
    return DeployResult(results, dry_run, time.monotonic() - started)
