"""The command line. Thin: parse arguments, call the pure layers, hand results to ui.

This is the only place where exit codes are chosen. Heavy modules are imported inside the
commands so that `--help` and `validate` start fast.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

from clusterctl.baselines import baselines_path
from clusterctl.errors import INTERRUPTED, ClusterctlError, ExitCode

if TYPE_CHECKING:  # the commands import these when they run
    from clusterctl.inventory import Inventory
    from clusterctl.lockfile import LockFile
    from clusterctl.models.meta import ModelMeta
    from clusterctl.planner import Plan
    from clusterctl.transport import Transport

_ARGV = "clusterctl.argv"
# the exception click raises for a bad command line, from the click that typer parses with (newer
# typer releases carry their own copy)
_ClickException: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _wants_json(argv: Sequence[str]) -> bool:
    """Whether --json is among the options of a command line (not after `--`)."""
    options = argv[:list(argv).index("--")] if "--" in argv else argv
    return "--json" in options


def _error_document(code: int, message: str, hint: str | None, location: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "hint": hint, "location": location}}


def _usage_error_json(exc: Any, argv: Sequence[str]) -> None:
    """With --json given, a command-line error also goes to stdout as the error document; click
    then prints it for people and exits with its code (2) as without --json."""
    if not _wants_json(argv):
        return
    from clusterctl import ui

    ctx = getattr(exc, "ctx", None)
    hint = f"see `{ctx.command_path} --help`" if ctx is not None else None
    ui.print_json(_error_document(exc.exit_code, exc.format_message(), hint))


class _Commands(TyperGroup):
    """The command group: command-line errors become JSON too when --json was given."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        argv = list(args)
        try:
            ctx = super().make_context(info_name, args, parent, **extra)
        except _ClickException as exc:
            _usage_error_json(exc, argv)
            raise
        ctx.meta[_ARGV] = argv
        return ctx

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _ClickException as exc:  # the command's own options and arguments
            _usage_error_json(exc, ctx.meta.get(_ARGV, []))
            raise


def _exit_codes_help() -> str:
    from clusterctl.errors import MEANINGS

    listed = ", ".join(f"{int(c)} {m}" for c, m in MEANINGS.items())
    return f"Exit codes: {listed}, {INTERRUPTED} interrupted (docs/commands.md)."


app = typer.Typer(
    name="clusterctl",
    help="Plan, render and deploy self-hosted LLM clusters.",
    epilog=_exit_codes_help(),
    cls=_Commands,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

F = TypeVar("F", bound=Callable[..., Any])


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"clusterctl {version('clusterctl')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            from clusterctl import __version__

            typer.echo(f"clusterctl {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_version, help="print the version and exit")] = False) -> None:
    """Plan, render and deploy self-hosted LLM clusters."""

DEFAULT_INVENTORY = "beefcake2"

InventoryArg = Annotated[
    Path | None,
    typer.Argument(help="inventory YAML; default: the bundled beefcake2 example", show_default=False),
]
# Commands that reach nodes (deploy, verify, bench, status, trust) have no default inventory: a
# mistyped command must not connect to the bundled example's addresses.
InventoryOpt = Annotated[Path | None, typer.Option(
    "--inventory", "-i", show_default=False,
    help="inventory YAML (required: commands that reach nodes have no default)")]
# The offline commands take it either way: as INVENTORY, or with -i like the commands that reach nodes.
InventoryAlsoOpt = Annotated[Path | None, typer.Option(
    "--inventory", "-i", show_default=False,
    help="inventory YAML, the same as INVENTORY (as the other commands take it)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output on stdout")]


def handled(func: F) -> F:
    """Map typed errors to exit codes; unexpected exceptions are bugs and show a stack
    (frames only, never local variables). With --json, stdout gets the error document too:
    {"error": {"code", "message", "hint", "location"}}, so it always holds one JSON document."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from clusterctl import ui

        as_json = kwargs.get("json") is True
        try:
            return func(*args, **kwargs)
        except ClusterctlError as exc:
            ui.error(exc)
            if as_json:
                ui.print_json(exc.to_json())
            raise typer.Exit(int(exc.exit_code)) from None
        except KeyboardInterrupt:
            message = ("interrupted: steps already running were let finish, nothing is half-written")
            hint = "run the command again to continue (deploy reconciles from the nodes' state)"
            ui.err.print(f"{message}; {hint}")
            if as_json:
                ui.print_json(_error_document(INTERRUPTED, message, hint))
            raise typer.Exit(INTERRUPTED) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            ui.bug("clusterctl hit a bug; please report it with this trace:\n"
                   + "".join(traceback.format_exc(limit=20)))
            if as_json:
                ui.print_json(_error_document(int(ExitCode.FAILURE), f"clusterctl hit a bug: {type(exc).__name__}",
                                              "please report it with the trace printed on stderr"))
            raise typer.Exit(int(ExitCode.FAILURE)) from None

    return wrapper  # type: ignore[return-value]


def bundled_inventories() -> Path:
    here = Path(__file__).resolve().parent
    packaged = here / "inventories"
    if packaged.is_dir():
        return packaged
    return here.parent.parent / "inventories"


def resolve_inventory_path(path: Path | None) -> Path:
    if path is not None:
        return path
    return bundled_inventories() / f"{DEFAULT_INVENTORY}.yaml"


def _is_inventory_file(arg: str) -> bool:
    """An existing file (an inventory given where a name was expected)."""
    return Path(arg).is_file()


def _inventory_of(positional: Path | None, option: Path | None) -> Path | None:
    """The inventory of an offline command, given as INVENTORY or with -i (not both, differently)."""
    from clusterctl.errors import UsageError

    if positional is not None and option is not None and positional != option:
        raise UsageError(f"two inventories given: {positional} and -i {option}", "give one, after -i")
    return option if option is not None else positional


def _require_inventory(path: Path | None, command: str, args: Sequence[str] = (), usage: str = "") -> Path:
    """The -i of a command that reaches nodes. `args`: its positional arguments, where a
    misplaced inventory file is found and named in the hint; `usage`: what follows -i FILE."""
    from clusterctl.errors import UsageError

    if path is not None:
        return path
    given = next((a for a in args if _is_inventory_file(a)), None)
    if given is None:
        hint = f"clusterctl {command} -i INVENTORY.yaml {usage}".rstrip()
    else:
        rest = " ".join(a for a in args if a != given) or usage
        hint = f"'{given}' is an inventory file: clusterctl {command} -i {given} {rest}".rstrip()
    raise UsageError(f"missing option -i/--inventory: {command} reaches nodes and has no default inventory", hint)


def _check_names(kind: str, given: Sequence[str], known: Mapping[str, object], inventory: Path) -> None:
    """UsageError for the names in `given` that `inventory` does not define (nodes or services)."""
    from clusterctl.errors import UsageError

    unknown = [g for g in given if g not in known]
    if not unknown:
        return
    hint = f"{kind}s in {inventory}: {', '.join(known)}"
    pathlike = [u for u in unknown if u.endswith((".yaml", ".yml")) or "/" in u or _is_inventory_file(u)]
    if pathlike:
        what = "is a file" if _is_inventory_file(pathlike[0]) else "looks like a file"
        if pathlike[0].endswith((".yaml", ".yml")) and what == "is a file":
            what = "is an inventory file"
        hint = f"'{pathlike[0]}' {what}: an inventory goes after -i, not as a {kind}; {hint}"
    noun = kind if len(unknown) == 1 else f"{kind}s"
    raise UsageError(f"unknown {noun} " + ", ".join(f"'{u}'" for u in unknown), hint)


def _finite(option: str, value: float, *, low: float, low_ok: bool, high: float | None = None,
            what: str, hint: str) -> float:
    """`value` when it is finite and within [low (or above it), high); else a UsageError."""
    import math

    from clusterctl.errors import UsageError

    above = value >= low if low_ok else value > low
    if not (math.isfinite(value) and above and (high is None or value < high)):
        raise UsageError(f"{option} {value}: must be {what}", hint)
    return value


def _seconds(option: str, value: float, *, zero: bool, example: str) -> float:
    """A number of seconds given on the command line: finite, > 0 (>= 0 with `zero`)."""
    return _finite(option, value, low=0.0, low_ok=zero, what=f"a finite number of seconds {'>=' if zero else '>'} 0",
                   hint=f"e.g. {option} {example}")


BENCH_LIMITS = {"--concurrency": 1024, "--prompt-tokens": 1 << 20}


def _counts(option: str, text: str) -> list[int]:
    """A comma-separated list of whole numbers from 1 to the option's limit (BENCH_LIMITS)."""
    from clusterctl.errors import UsageError

    most = BENCH_LIMITS[option]
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(1 <= v <= most for v in values):
        raise UsageError(f"{option} {text}: each value must be a whole number from 1 to {most}",
                         "comma-separated, e.g. --concurrency 1,4 --prompt-tokens 16,512")
    return values


def _load(path: Path | None) -> Inventory:
    from clusterctl.inventory import load_inventory

    return load_inventory(resolve_inventory_path(path))


@dataclass(frozen=True)
class Loaded:
    """An inventory with what the commands derive from it: its lock file, the pinned metadata, the plan."""

    inv: Inventory
    path: Path  # the inventory file
    lock_path: Path
    lock: LockFile
    metas: dict[str, ModelMeta]
    plan: Plan | None  # None when no model is pinned (and the metadata were not required)


def _planned(inv: Inventory, *, require: bool = False) -> Loaded:
    """Read the lock file next to `inv` and plan. `require`: every model a service uses must be
    pinned (MetadataError otherwise) and there is always a plan."""
    from clusterctl.lockfile import lock_path, metas_for, read_lock, require_metas
    from clusterctl.planner import make_plan

    assert inv.path is not None
    lpath = lock_path(inv.path)
    lock = read_lock(lpath)
    metas = require_metas(inv, lock, lpath) if require else metas_for(inv, lock)
    plan_ = make_plan(inv, metas) if metas or require else None
    return Loaded(inv=inv, path=inv.path, lock_path=lpath, lock=lock, metas=metas, plan=plan_)


def _load_planned(inventory_path: Path | None, *, require: bool = False) -> Loaded:
    return _planned(_load(inventory_path), require=require)


def _opener(inv: Inventory) -> Callable[[str], Transport]:
    """A transport (not yet connected) for a node of `inv`, by name."""
    from clusterctl.transport.connect import connect

    return lambda name: connect(name, inv.nodes[name], inv.cluster.ssh)


@contextlib.contextmanager
def _deploy_lock(inventory_path: Path) -> Iterator[dict[str, object]]:
    """Hold the cluster's deploy lock; warn when the previous holder did not finish.
    Yields that holder's record (empty when it finished)."""
    from clusterctl import ui
    from clusterctl.deploy.lock import cluster_lock

    with cluster_lock(inventory_path) as stale:
        if stale:
            ui.warn(f"the previous deploy (pid {stale.get('pid')}, started {stale.get('started')}) did not "
                    "finish; this one reconciles from the nodes' actual state")
        yield stale


@app.command()
@handled
def validate(inventory: InventoryArg = None, json: JsonOpt = False, inventory_opt: InventoryAlsoOpt = None) -> None:
    """Check the inventory only: schema, names, references, ports. No network, no SSH."""
    inv = _load(_inventory_of(inventory, inventory_opt))
    from clusterctl import ui

    if json:
        ui.print_json({"ok": True, "path": str(inv.path), "nodes": list(inv.nodes),
                       "models": list(inv.models), "services": list(inv.services)})
    else:
        ui.validated(inv)


@app.command()
@handled
def plan(
    inventory: InventoryArg = None,
    json: JsonOpt = False,
    strict: Annotated[bool, typer.Option(help="also fail when a device is above its safe zone")] = False,
    inventory_opt: InventoryAlsoOpt = None,
) -> None:
    """Offline memory fit per device, placement, and what a deploy would do."""
    from clusterctl import ui

    loaded = _load_planned(_inventory_of(inventory, inventory_opt), require=True)
    p = loaded.plan
    assert p is not None
    if json:
        ui.print_json(p.to_json())
    else:
        ui.plan(p, loaded.inv, f"metadata pinned in {loaded.lock_path.name}")
    if not p.ok:
        raise typer.Exit(int(ExitCode.DOES_NOT_FIT))
    if strict and any(d.verdict == "tight" for d in p.devices):
        raise typer.Exit(int(ExitCode.DOES_NOT_FIT))


@app.command()
@handled
def render(
    inventory: InventoryArg = None,
    node: Annotated[list[str] | None, typer.Option("--node", "-n", help="only these nodes (repeatable)")] = None,
    out: Annotated[Path, typer.Option(help="write the tree here: OUT/NODE/<absolute path>")] = Path("rendered"),
    diff: Annotated[bool, typer.Option(help="show what differs from the tree in --out; write nothing "
                                            "(exit 10 when something differs)")] = False,
    json: JsonOpt = False,
    inventory_opt: InventoryAlsoOpt = None,
) -> None:
    """Systemd units, launchd plists, launch scripts, router and monitoring config per node."""
    from clusterctl import ui
    from clusterctl.render import render as do_render
    from clusterctl.tree import check_tree, diff_tree, write_tree

    loaded = _load_planned(_inventory_of(inventory, inventory_opt))
    assert loaded.inv.path is not None
    _check_names("node", node or [], loaded.inv.nodes, loaded.inv.path)
    result = do_render(loaded.inv, loaded.plan, nodes=node or None)
    check_tree(result.files, out, write=not diff)
    if diff:
        changes = diff_tree(result.files, out)
        if json:
            ui.print_json({"changes": [c.to_json() for c in changes]})
        else:
            ui.tree_diff(changes)
        raise typer.Exit(int(ExitCode.DIFFERS) if changes else 0)
    write_tree(result.files, out)
    if not json:
        ui.rendered(result, out)
        return
    ui.print_json({
        "out": str(out),
        "files": [{"node": f.node, "path": f.path, "sha256": f.sha256, "mode": oct(f.mode),
                   "restarts": list(f.restarts), "secrets": list(f.secrets)} for f in result.files],
        "secrets": [{"node": n, "path": s.path, "from": s.ref} for n, s in result.secrets],
    })


PhaseOpt = Annotated[list[str] | None, typer.Option("--phase", help="acquire, router, services, verify (repeatable)")]


def _deploy_plan(inv: Inventory) -> Loaded:
    """The plan a deploy carries out: every model a service uses must be pinned in the lock file,
    as for `plan`, so that no service starts without its memory fit (dry runs included)."""
    from clusterctl.errors import MetadataError

    try:
        return _planned(inv, require=True)
    except MetadataError as exc:
        raise MetadataError(
            f"cannot plan the deploy: {exc.message}",
            f"run `clusterctl resolve {inv.path}` (header reads only, no weights), check "
            f"`clusterctl plan {inv.path}`, then deploy") from None


@app.command()
@handled
def deploy(
    inventory: InventoryOpt = None,
    nodes: Annotated[list[str] | None, typer.Argument(help="only these nodes", show_default=False)] = None,
    phase: PhaseOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="gather facts, show every step; write nothing")] = False,
    max_fail: Annotated[int, typer.Option(help="failed nodes tolerated before later phases stop")] = 0,
    prune: Annotated[bool, typer.Option("--prune", help="stop and remove the services a node runs that the "
                                        "inventory no longer gives it (weights and engines stay)")] = False,
    json: JsonOpt = False,
) -> None:
    """Make the cluster match the inventory over SSH: acquire -> router -> services -> verify."""
    from clusterctl import ui
    from clusterctl.deploy.model import PHASES
    from clusterctl.deploy.rollout import deploy as do_deploy
    from clusterctl.errors import UsageError
    from clusterctl.render import render as do_render

    inv = _load(_require_inventory(inventory, "deploy", nodes or []))
    assert inv.path is not None
    _check_names("node", nodes or [], inv.nodes, inv.path)
    if max_fail < 0:
        raise UsageError(f"--max-fail {max_fail}: must be a whole number >= 0",
                         "the number of failed nodes tolerated, e.g. --max-fail 1")
    phases = tuple(p for p in PHASES if not phase or p in phase)
    bad = [p for p in phase or [] if p not in PHASES]
    if bad:
        raise UsageError(f"unknown phase(s): {', '.join(bad)}", f"one of {', '.join(PHASES)}")
    loaded = _deploy_plan(inv)
    plan_ = loaded.plan
    assert plan_ is not None
    if not plan_.ok and not dry_run:
        from clusterctl.errors import DoesNotFitError

        raise DoesNotFitError("the plan has errors; deploy refuses to start services that do not fit",
                              "run `clusterctl plan` and fix them first")
    rendered = do_render(inv, plan_)
    reporter = ui.DeployReporter(quiet=json)
    opener = _opener(inv)

    with _deploy_lock(loaded.path) as stale:
        result = do_deploy(inv, loaded.lock, rendered, opener, nodes=nodes or None, phases=phases,
                           dry_run=dry_run, max_fail=max_fail, reporter=reporter, plan=plan_, prune=prune)
    reporter.close()
    checked = None
    if "verify" in phases and not dry_run and result.ok:
        from clusterctl.verify import load_baselines
        from clusterctl.verify import verify as do_verify

        checked = do_verify(inv, opener, nodes=nodes or None, plan=plan_,
                            baselines=load_baselines(baselines_path(loaded.path), loaded.path))
    if json:
        ui.print_json(result.to_json() | ({"verify": checked.to_json()} if checked else {})
                      | ({"stale_lock": stale} if stale else {}))
    else:
        ui.deploy_recap(result)
        if checked is not None:
            ui.verify_table(checked)
    if not result.ok:
        raise typer.Exit(int(result.exit_code))
    if checked is not None and not checked.ok:
        raise typer.Exit(int(ExitCode.VERIFY_FAILED))


@app.command()
@handled
def trust(
    node: Annotated[str, typer.Argument(help="node name")],
    inventory: InventoryOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="record the key without asking")] = False,
    replace: Annotated[bool, typer.Option(help="replace a different recorded key for this host")] = False,
    json: JsonOpt = False,
) -> None:
    """Record a node's SSH host key in known_hosts after you confirm its fingerprint."""
    import os

    from clusterctl import ui
    from clusterctl.transport.trust import trust as do_trust

    inv = _load(_require_inventory(inventory, "trust", [node], usage="NODE"))
    assert inv.path is not None
    _check_names("node", [node], inv.nodes, inv.path)
    n = inv.nodes[node]
    ssh = inv.cluster.ssh
    port = n.port or ssh.port
    known = os.path.expanduser(ssh.known_hosts)
    message = do_trust(node, n.address, port, known, confirm=lambda text: yes or typer.confirm(text, err=json),
                       replace=replace)
    if json:
        ui.print_json({"node": node, "address": n.address, "port": port, "known_hosts": known, "message": message})
    else:
        ui.info(message)


@app.command()
@handled
def verify(
    inventory: InventoryOpt = None,
    nodes: Annotated[list[str] | None, typer.Argument(help="only these nodes", show_default=False)] = None,
    json: JsonOpt = False,
    junit: Annotated[Path | None, typer.Option(help="also write JUnit XML here")] = None,
    wait: Annotated[float, typer.Option(
        help="seconds to wait for services still starting (not listening yet, or 503 while loading)")] = 30.0,
    tolerance: Annotated[float, typer.Option(help="allowed drop below the tokens/s baseline")] = 0.30,
) -> None:
    """Check every service and route: health, identity, a smoke prompt and its sanity, speed."""
    from clusterctl import ui
    from clusterctl.verify import load_baselines
    from clusterctl.verify import verify as do_verify

    inv = _load(_require_inventory(inventory, "verify", nodes or []))
    assert inv.path is not None
    _check_names("node", nodes or [], inv.nodes, inv.path)
    _seconds("--wait", wait, zero=True, example="30")
    _finite("--tolerance", tolerance, low=0.0, low_ok=True, high=1.0, what="a fraction from 0 to below 1",
            hint="e.g. --tolerance 0.3 (30% below the baseline)")
    loaded = _planned(inv)
    baselines = load_baselines(baselines_path(loaded.path), loaded.path)
    result = do_verify(loaded.inv, _opener(loaded.inv), nodes=nodes or None, plan=loaded.plan,
                       baselines=baselines, wait=wait, tolerance=tolerance)
    if junit is not None:
        junit.write_text(result.junit())
    if json:
        ui.print_json(result.to_json())
    else:
        ui.verify_table(result)
    if not result.ok:
        raise typer.Exit(int(ExitCode.VERIFY_FAILED))


@app.command("bench")
@handled
def bench_cmd(
    inventory: InventoryOpt = None,
    services: Annotated[list[str] | None, typer.Argument(help="only these services", show_default=False)] = None,
    concurrency: Annotated[str, typer.Option(help="concurrent requests per level")] = "1,4",
    prompt_tokens: Annotated[str, typer.Option(help="prompt lengths in tokens")] = "16,512",
    max_tokens: Annotated[int, typer.Option(min=1)] = 64,
    report: Annotated[Path | None, typer.Option(help="write REPORT.md and REPORT.png here")] = None,
    save: Annotated[bool, typer.Option(help="store the results as the baselines verify compares with")] = True,
    json: JsonOpt = False,
) -> None:
    """Time to first token, prompt and generation tokens/s per model; router overhead; baselines."""
    from clusterctl import ui
    from clusterctl.bench import bench as do_bench
    from clusterctl.bench import chart, markdown, store_baselines, what_changed
    from clusterctl.verify import load_baselines

    inv = _load(_require_inventory(inventory, "bench", services or []))
    assert inv.path is not None
    _check_names("service", services or [], inv.services, inv.path)
    levels = _counts("--concurrency", concurrency)
    lengths = _counts("--prompt-tokens", prompt_tokens)
    baselines = baselines_path(inv.path)
    load_baselines(baselines, inv.path)  # a damaged file stops the run before anything is measured
    result = do_bench(inv, _opener(inv), services=services or None,
                      concurrency=levels, prompt_tokens=lengths, max_tokens=max_tokens)
    changed = what_changed(baselines, result)
    if save:
        store_baselines(baselines, result)
    text = markdown(result)
    if changed:
        text += "\nSince the stored baseline:\n" + "\n".join(f"- {line}" for line in changed) + "\n"
    if report is not None:
        report.with_suffix(".md").write_text(text)
        chart(result, report.with_suffix(".png"))
    if json:
        ui.print_json(result.to_json() | {"changed": changed})
    else:
        ui.info(text)


@app.command()
@handled
def status(
    inventory: InventoryOpt = None,
    once: Annotated[bool, typer.Option(help="print one snapshot and exit")] = False,
    interval: Annotated[float, typer.Option(help="seconds between refreshes")] = 5.0,
    json: JsonOpt = False,
) -> None:
    """Live view of nodes and services: state, health, memory vs plan, router requests/s, errors."""
    from clusterctl import ui
    from clusterctl.status import snapshot

    loaded = _load_planned(_require_inventory(inventory, "status"))
    _seconds("--interval", interval, zero=False, example="5")
    opener = _opener(loaded.inv)

    def take() -> Any:
        return snapshot(loaded.inv, opener, loaded.plan)

    if json:
        ui.print_json(take().to_json())
        return
    if once:
        ui.status_table(take(), None)
        return
    ui.status_live(take, interval)


ModelArg = Annotated[str, typer.Argument(
    help="a .gguf path, hf://org/repo[@rev]/file.gguf, https://..., a safetensors/MLX repo "
    "(hf://org/repo or a folder), or a JSON file from `inspect --json`")]


@app.command()
@handled
def inspect(
    model: ModelArg,
    json: JsonOpt = False,
    format: Annotated[str | None, typer.Option(help="gguf, safetensors or mlx (default: from the name)")] = None,
    token_env: Annotated[str, typer.Option(help="environment variable holding a hub token")] = "HF_TOKEN",
) -> None:
    """Model metadata from a file header or a hub repository, without downloading weights."""
    import os

    from clusterctl import ui
    from clusterctl.models.fetch import read_meta

    meta = read_meta(model, format=format, token=os.environ.get(token_env) or None)
    if json:
        ui.print_json(meta.model_dump(mode="json"))
    else:
        ui.meta(meta)


@app.command()
@handled
def estimate(
    model: ModelArg,
    ctx: Annotated[int | None, typer.Option("--ctx", "-c", min=1,
                                            help="context tokens (default: training context)")] = None,
    cache_type_k: Annotated[str, typer.Option("--cache-type-k", "-ctk")] = "f16",
    cache_type_v: Annotated[str, typer.Option("--cache-type-v", "-ctv")] = "f16",
    flash_attn: Annotated[bool, typer.Option("--flash-attn/--no-flash-attn", "-fa/-nofa")] = True,
    parallel: Annotated[int | None, typer.Option(
        "--parallel", "-np", min=1, help="slots (default: llama-server's: 4 slots sharing one unified KV pool)")
    ] = None,
    kv_unified: Annotated[bool, typer.Option("--kv-unified", help="one KV pool shared by all slots")] = False,
    ubatch: Annotated[int, typer.Option("--ubatch", "-ub", min=1)] = 512,
    batch: Annotated[int, typer.Option("--batch", "-b", min=1)] = 2048,
    gpu_layers: Annotated[int, typer.Option("--gpu-layers", "-ngl", min=0)] = 999,
    swa_full: Annotated[bool, typer.Option("--swa-full")] = False,
    devices: Annotated[str | None, typer.Option(
        help="comma-separated device memory, e.g. 24GiB,24GiB (RPC workers count as devices); "
        "default: CPU only")] = None,
    tensor_split: Annotated[str | None, typer.Option("--tensor-split", "-ts", help="e.g. 3,1")] = None,
    override_tensor: Annotated[list[str] | None, typer.Option(
        "--override-tensor", "-ot", help="PATTERN=BUFT, repeatable, first match wins (llama.cpp's -ot): a regex "
        "searched in tensor names and CPU or a device (dev0, CUDA0 = the first of --devices), e.g. "
        "-ot 'blk\\.(1[3-9]|[2-5][0-9])\\.ffn_.*_exps\\.=CPU'")] = None,
    cpu_moe: Annotated[bool, typer.Option("--cpu-moe", "-cmoe", help="every MoE expert tensor in host memory "
                                          "(applied after -ot)")] = False,
    n_cpu_moe: Annotated[int, typer.Option("--n-cpu-moe", "-ncmoe", min=0, help="the experts of layers 0..N-1 in "
                                           "host memory (applied after -ot and --cpu-moe)")] = 0,
    no_mmap: Annotated[bool, typer.Option("--no-mmap", help="weights read into memory, not mapped (no second copy "
                                          "beside the CPU backend's repacked tensors)")] = False,
    json: JsonOpt = False,
) -> None:
    """Memory of one llama.cpp instance per device: weights, KV cache, compute buffers (MiB).

    With no flags it takes llama-server's own defaults: 4 slots sharing one unified KV cache,
    the model's training context, every layer offloaded, memory-mapped weights."""
    import os

    from clusterctl import ui
    from clusterctl.errors import UsageError
    from clusterctl.inventory import LLAMA_CPP_MAX_PARALLEL, LLAMA_CPP_QUANTIZED_CACHE, split_override
    from clusterctl.models.fetch import read_meta
    from clusterctl.planner.llama import CACHE_TYPES, Device, LlamaParams, OverrideError, estimate_llama
    from clusterctl.planner.llama_base import moe_overrides
    from clusterctl.units import MIB, parse_size

    for name, value in (("--cache-type-k", cache_type_k), ("--cache-type-v", cache_type_v)):
        if value not in CACHE_TYPES:
            raise UsageError(f"{name} {value}: unknown cache type", f"one of {', '.join(CACHE_TYPES)}")
    try:
        budgets = [parse_size(d) for d in devices.split(",")] if devices else []
        split = tuple(float(x) for x in tensor_split.split(",")) if tensor_split else ()
    except ValueError as exc:
        raise UsageError(str(exc), "e.g. --devices 24GiB,24GiB --tensor-split 3,1") from None
    if parallel is None:  # llama-server's -np auto: 4 slots, one unified KV cache
        parallel, kv_unified = 4, True
    overrides: list[tuple[str, str]] = []
    for item in override_tensor or []:
        for part in item.split(","):  # llama.cpp's -ot takes a comma-separated list too
            try:
                overrides.append(split_override(part))
            except ValueError as exc:
                raise UsageError(f"--override-tensor {part!r}: {exc}",
                                 "e.g. -ot 'blk\\.[0-9]\\.ffn_.*_exps\\.=CPU'") from None
    if parallel > LLAMA_CPP_MAX_PARALLEL:
        raise UsageError(f"--parallel {parallel}: llama.cpp serves at most {LLAMA_CPP_MAX_PARALLEL} slots",
                         f"--parallel 1..{LLAMA_CPP_MAX_PARALLEL}")
    if not all(0 <= x < float("inf") for x in split):
        raise UsageError(f"--tensor-split {tensor_split}: each share must be a finite number >= 0", "e.g. 3,1")
    if not flash_attn and cache_type_v in LLAMA_CPP_QUANTIZED_CACHE:
        raise UsageError(f"--cache-type-v {cache_type_v} with --no-flash-attn: llama.cpp refuses a quantized V "
                         "cache without flash attention", "drop --no-flash-attn, or --cache-type-v f16")
    meta = read_meta(model, token=os.environ.get("HF_TOKEN") or None)
    params = LlamaParams(n_ctx=ctx, n_parallel=parallel, kv_unified=kv_unified, cache_type_k=cache_type_k,
                         cache_type_v=cache_type_v, flash_attn=flash_attn, n_batch=batch, n_ubatch=ubatch,
                         n_gpu_layers=gpu_layers, swa_full=swa_full, tensor_split=split,
                         overrides=tuple(overrides) + moe_overrides(cpu_moe, n_cpu_moe), mmap=not no_mmap)
    try:
        est = estimate_llama(meta, params, [Device(f"dev{i}", b, aliases=(f"CUDA{i}",))
                                            for i, b in enumerate(budgets)])
    except OverrideError as exc:
        raise UsageError(f"--override-tensor: {exc}", "name CPU or one of the --devices: dev0, dev1.. "
                         "(CUDA0, CUDA1..)") from None
    over = [f"dev{i}" for i, b in enumerate(budgets) if est.devices[f"dev{i}"].total > b]
    if json:
        ui.print_json({
            "model": meta.name or model, "n_ctx": est.n_ctx, "n_ctx_seq": est.n_ctx_seq,
            "unit": "MiB",
            "slots": params.n_parallel, "kv_unified": params.kv_unified,
            "devices": {k: {"weights": round(d.weights / MIB, 2), "repack": round(d.repack / MIB, 2),
                            "kv": round(d.kv / MIB, 2),
                            "compute": round(d.compute / MIB, 2), "total": round(d.total / MIB, 2),
                            "layers": len(d.layers), "output": d.output}
                        for k, d in est.devices.items()},
            "kv_caches": [{"cells": c.cells, "layers": c.layers, "k": round(c.k_bytes / MIB, 2),
                           "v": round(c.v_bytes / MIB, 2), "swa": c.swa, "recurrent": c.recurrent}
                          for c in est.caches],
            "total": round(est.total / MIB, 2),
            "fits": not over,
        })
    else:
        ui.estimate(est)
    if over:
        raise typer.Exit(int(ExitCode.DOES_NOT_FIT))


@app.command()
@handled
def resolve(
    inventory: InventoryArg = None,
    refresh: Annotated[bool, typer.Option(help="read every model again, even when locked")] = False,
    json: JsonOpt = False,
    inventory_opt: InventoryAlsoOpt = None,
) -> None:
    """Read every model's metadata (header range reads, no weights) and pin it in the lock file."""
    from clusterctl import ui
    from clusterctl.lockfile import LockedModel, LockFile, lock_path, read_lock, write_lock
    from clusterctl.models.fetch import read_meta
    from clusterctl.models.pins import hub_pins
    from clusterctl.secretref import read_secret
    from clusterctl.units import fmt_size

    inv = _load(_inventory_of(inventory, inventory_opt))
    assert inv.path is not None
    path = lock_path(inv.path)
    old = read_lock(path)
    token = read_secret(inv.cluster.huggingface.token)
    endpoint = inv.cluster.huggingface.endpoint
    models: dict[str, LockedModel] = {}
    report = []
    for name, model in inv.models.items():
        entry = old.models.get(name)
        if entry is not None and entry.source == model.source and not refresh:
            if entry.files is None and model.source.startswith("hf://"):  # a lock from before per-file pins
                entry = entry.model_copy(update={"files": hub_pins(
                    model.source, entry.meta.files, format=entry.meta.format, revision=entry.revision,
                    token=token, endpoint=endpoint) or None})
            models[name] = entry
            report.append({"model": name, "action": "kept", "revision": entry.revision, "bytes_read": 0})
            continue
        meta = read_meta(model.source, format=model.format, token=token, endpoint=endpoint)
        pins = hub_pins(model.source, meta.files, format=meta.format, revision=meta.revision, token=token,
                        endpoint=endpoint)
        models[name] = LockedModel(source=model.source, revision=meta.revision, meta=meta, files=pins or None)
        report.append({"model": name, "action": "read", "revision": meta.revision,
                       "bytes_read": meta.header_bytes_read})
        if not json:
            ui.info(f"{name}: {meta.architecture} {meta.file_type or ''} {fmt_size(meta.file_bytes)}, "
                    f"revision {meta.revision or '-'}, {meta.header_bytes_read:,} bytes read")
    write_lock(path, LockFile(models=models))
    if json:
        ui.print_json({"lock": str(path), "models": report})
    else:
        ui.info(f"wrote {path} ({len(models)} models)")


def _register_subcommands() -> None:
    from clusterctl.router.cli import router_app  # import-light: the server loads on use

    app.add_typer(router_app, name="router", help="The model router that runs on the router node.")


_register_subcommands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
