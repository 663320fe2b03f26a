"""(desired, observed) -> ordered steps, each with a reason. Pure: no I/O.

A second deploy of an unchanged inventory produces no steps: every rendered file's hash and
mode match, every weight is verified in the node's manifest, every service is active.
"""

from __future__ import annotations

from clusterctl.deploy.model import (
    FETCH_KINDS,
    ROUTER,
    Desired,
    Kind,
    NodeFacts,
    Phase,
    Step,
    WeightFile,
)
from clusterctl.engines.install import archive_name

ORPHAN_REASON = "not in the inventory for this node"


def _phase_of(service: str) -> Phase:
    return "router" if service == ROUTER else "services"


def orphans(desired: Desired, facts: NodeFacts) -> list[str]:
    """The services clusterctl installed on the node that the desired state of this node does
    not hold (dropped from the inventory, or moved to another node; the router counts only on
    its own node). One whose unit file is a file this node should hold is none (a direct
    node's `x-ctl.sh` may be the launch script of a service named `x-ctl`)."""
    keep = set(desired.all_paths()) | desired.unit_files
    return sorted(s for s, path in facts.installed.items() if s not in desired.services and path not in keep)


def diff(desired: Desired, facts: NodeFacts, *, prune: bool = False) -> list[Step]:
    """The steps; with `prune`, also one `remove` step per orphan (see `orphans`)."""
    steps: list[Step] = []
    node = desired.node
    # acquire: engines and weights
    engine_changed: dict[str, str] = {}  # executable -> why the services running it restart
    for e in desired.engines:
        have = facts.hashes.get(e.path)
        if have != e.sha256:
            steps.append(Step("acquire", node, "push-engine", e.path, "missing" if have is None else "differs",
                              e.size))
            if have is not None:
                engine_changed[e.path] = f"{e.path} updated"
    for build, archive in desired.builds:
        built = {t: facts.manifest.get(build.binary(t), {}).get("build") for t in build.targets}
        stale = [t for t in build.targets if built[t] != build.key or build.binary(t) not in facts.executables]
        if not stale:
            continue
        fetch = _fetch_step(node, archive, facts)
        if fetch is not None:
            steps.append(fetch)
        if all(built[t] is None for t in stale):
            why = "not built here yet"
        elif all(build.binary(t) in facts.executables for t in stale):
            why = "built from another source or other flags"
        else:
            why = "binary missing"
        steps.append(Step("acquire", node, "build-engine", build.bindir,
                          f"{', '.join(stale)} from {archive_name(build.source)} ({build.label}): {why}"))
        for t in stale:
            if built[t] is not None:
                engine_changed[build.binary(t)] = f"{build.binary(t)} rebuilt"
    for v in desired.venvs:
        entry = facts.manifest.get(v.link, {})
        if entry.get("venv") == v.key and v.binary in facts.executables:
            continue
        had = entry.get("requirement")
        why = "not installed" if had is None else (f"has {had}" if entry.get("venv") != v.key else "binary missing")
        steps.append(Step("acquire", node, "install-engine", v.link, f"{v.requirement}: {why}"))
        if had is not None:
            for program in v.provides:
                engine_changed[program] = f"{v.engine} now {v.requirement}"
    for w in desired.weights:
        step = _fetch_step(node, w, facts)
        if step is not None:
            steps.append(step)
    # files, by the service they belong to
    changed_services: dict[str, str] = {}
    for f in desired.files:
        have = facts.hashes.get(f.path)
        if have is None:
            reason = "new"
        elif have != f.sha256:
            reason = "changed"
        elif facts.modes.get(f.path, f.mode) != f.mode:
            reason = f"mode {oct(facts.modes[f.path])} -> {oct(f.mode)}"
        else:
            continue
        owner = f.restarts[0] if f.restarts else ROUTER
        steps.append(Step(_phase_of(owner), node, "upload", f.path, reason, len(f.content), owner))
        for s in f.restarts:
            changed_services.setdefault(s, f"{f.path} {reason}")
    for binary, why in engine_changed.items():
        for service in desired.users.get(binary, []):
            changed_services.setdefault(service, why)
    for secret in desired.secrets:
        if secret.data is None and secret.path in facts.hashes:  # a dry run reads no secret: no compare
            steps.append(Step(_phase_of(_secret_owner(desired, secret.path)), node, "secret", secret.path,
                              "not compared: a dry run does not read secrets", 0,
                              _secret_owner(desired, secret.path), sensitive=True))
            continue
        if facts.hashes.get(secret.path) != secret.sha256:
            owner = _secret_owner(desired, secret.path)
            steps.append(Step(_phase_of(owner), node, "secret", secret.path,
                              "new" if secret.path not in facts.hashes else "changed", 0, owner, sensitive=True))
            changed_services.setdefault(owner, f"{secret.path} (sensitive) changed")
    if prune:
        for service in orphans(desired, facts):
            steps.append(Step("services", node, "remove", service, ORPHAN_REASON, service=service))
    if desired.systemd:  # systemd re-reads changed unit files only when told to
        for phase in ("router", "services"):
            if any(st.phase == phase and ((st.kind == "upload" and st.target in desired.unit_files)
                                          or st.kind == "remove") for st in steps):
                steps.append(Step(phase, node, "daemon-reload", "systemd", "unit files changed"))
    for service in desired.services:
        phase = _phase_of(service)
        if service in changed_services:
            steps.append(Step(phase, node, "restart", service, changed_services[service], service=service))
        elif desired.units.get(service) and facts.units.get(desired.units[service], "active") != "active":
            state = facts.units.get(desired.units[service], "unknown")
            steps.append(Step(phase, node, "start", service, f"not running ({state})", service=service))
    return steps


def _fetch_step(node: str, w: WeightFile, facts: NodeFacts) -> Step | None:
    """The step that puts file `w` on the node verified, or None when the manifest says it is."""
    entry = facts.manifest.get(w.path, {})
    size = facts.sizes.get(w.path)
    want = w.size or entry.get("size")  # an unknown size (no lock entry): what was verified before
    if size is not None and size == want and entry.get("size") == size \
            and (w.sha256 is None or entry.get("sha256") == w.sha256):
        return None
    if size == w.size:
        return Step("acquire", node, "verify-source" if w.what == "source" else "verify-weight", w.path,
                    "present, not verified yet")
    part = facts.sizes.get(w.path + ".part", 0)
    kind: Kind
    if w.what == "source":
        kind = "push-source" if w.local else "pull-source"
    else:
        kind = "push-weight" if w.local else "pull-weight"
    reason = f"resume at {part / 1e9:.2f} GB" if 0 < part < w.size else "missing"
    return Step("acquire", node, kind, w.path, reason, w.size - (part if part < w.size else 0))


def _secret_owner(desired: Desired, path: str) -> str:
    name = path.rsplit("/", 1)[-1].removesuffix(".key")
    if name.startswith("clusterctl-router"):
        return ROUTER
    return name if name in desired.services else ROUTER


def summary(steps: list[Step]) -> dict[str, int]:
    return {
        "uploads": sum(1 for s in steps if s.kind in ("upload", "secret")),
        "restarts": sum(1 for s in steps if s.kind in ("restart", "start")),
        "bytes_to_transfer": sum(s.bytes for s in steps if s.kind in (*FETCH_KINDS, "push-engine")),
    }
