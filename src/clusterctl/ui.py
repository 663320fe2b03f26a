"""Everything the user reads. The only module that imports rich."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from clusterctl.units import GIB, MIB, fmt_duration, fmt_size

if TYPE_CHECKING:
    from clusterctl.deploy.model import Phase, Step
    from clusterctl.deploy.rollout import DeployResult
    from clusterctl.errors import ClusterctlError
    from clusterctl.inventory import Inventory
    from clusterctl.models.meta import ModelMeta
    from clusterctl.planner import Plan
    from clusterctl.planner.llama import LlamaEstimate
    from clusterctl.render import Rendered
    from clusterctl.status import StatusSnapshot
    from clusterctl.tree import Change
    from clusterctl.verify import VerifyResult

# A terminal's width, or COLUMNS when set (rich reads it); 160 columns into a pipe or file.
out = Console(highlight=False, soft_wrap=True,
              width=None if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)

_VERDICT_STYLE = {"fits": "green", "tight": "yellow", "does-not-fit": "bold red"}
_VERDICT_TEXT = {"fits": "fits", "tight": "tight", "does-not-fit": "does not fit"}


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def error(exc: ClusterctlError) -> None:
    from clusterctl.errors import InventoryErrors

    items = exc.errors if isinstance(exc, InventoryErrors) else [exc]
    for item in items:
        err.print(f"[bold red]error:[/] {escape(str(item))}")
        if item.hint:
            err.print(f"  [cyan]hint:[/] {escape(item.hint)}")
    if len(items) > 1:
        err.print(f"{len(items)} errors")


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}")


def info(message: str) -> None:
    err.print(escape(message))


def bug(text: str) -> None:
    err.print(text, markup=False)


def validated(inv: Inventory) -> None:
    path = inv.path or "inventory"
    out.print(f"{escape(str(path))}: ok  ({len(inv.nodes)} nodes, {len(inv.models)} models, "
              f"{len(inv.services)} services{', router' if inv.router else ''})")


def _bar(used: int, capacity: int, safe: float, width: int = 24) -> str:
    if capacity <= 0:
        return "[" + ">" * width + "]"
    frac = used / capacity
    filled = min(width, round(frac * width))
    over = frac > 1.0
    body = "#" * filled + " " * (width - filled)
    mark = min(width - 1, int(safe * width))
    if body[mark] == " ":
        body = body[:mark] + "|" + body[mark + 1:]
    return "[" + body + "]" + (">>>" if over else "")


def plan(p: Plan, inv: Inventory, lock_note: str) -> None:
    from clusterctl.planner.plan import node_summary

    def say(*text: Any) -> None:  # wrapped at the console's width, hints and long lines included
        out.print(*text, soft_wrap=False)

    router = f", router on {inv.router.node}" if inv.router else ""
    say(f"[bold]{escape(p.cluster)}[/]: {len(inv.nodes)} nodes, {len(inv.models)} models, "
              f"{len(inv.services)} services{router}    [dim]({escape(lock_note)})[/]")
    for node_name, node in inv.nodes.items():
        devs = [d for d in p.devices if d.node == node_name]
        say()
        sz = inv.effective_safe_zone(node)
        say(f"[bold]{escape(node_name)}[/]  {escape(node_summary(node))}  "
                  f"[dim]{escape(node.address)}  safe zone {sz:.0%}[/]")
        for d in devs:
            if not d.usages and d.id == "ram":
                continue
            style = _VERDICT_STYLE[d.verdict]
            verdict = _VERDICT_TEXT[d.verdict] if d.usages else "idle"
            say(f"  {d.id:<8}{escape(_bar(d.used, d.capacity, d.safe_zone))}  "
                      f"{d.used / GIB:6.1f} / {d.capacity / GIB:.1f} GiB  {d.utilization:4.0%}  "
                      f"[{style}]{verdict}[/]")
            for u in d.usages:
                model = inv.models[u.model] if u.model else None
                label = escape(u.model or "")
                quant = (model.quant if model and model.quant else None) or u.quant or ""
                note = f"  ({escape(u.note)})" if u.note else ""
                say(f"          {escape(u.service):<16} {label} {escape(quant)}  "
                          f"weights {u.weights / GIB:.1f}  kv {u.kv / GIB:.1f}  "
                          f"compute {u.compute / GIB:.1f}{note}")
            if d.reserve:
                say(f"          [dim]reserve {d.reserve / GIB:.1f}[/]")
    say()
    say("[bold]services[/]")
    t = Table(box=None, pad_edge=False, show_header=True, header_style="dim")
    # below 100 columns the engine goes (the rollout names it), so that no name is cut
    narrow = out.width < 100
    cols = [c for c in ("service", "engine", "node", "model", "port", "context", "total", "verdict")
            if not (narrow and c == "engine")]
    for col in cols:
        # names are never cut: the narrow columns wrap (a verdict, a context with its max) instead
        t.add_column(col, no_wrap=col in ("service", "engine", "node", "model", "port", "total"),
                     overflow="fold", justify="right" if col in ("port", "total") else "left")
    for s in p.services:
        ctx = str(s.context) if s.context else "-"
        if s.max_context:
            ctx += f" (max {s.max_context})"
        row = [s.name, s.engine, ",".join(s.nodes), s.model or "-", str(s.port), ctx,
               fmt_size(s.total) if s.total else "-", f"[{_VERDICT_STYLE[s.verdict]}]{_VERDICT_TEXT[s.verdict]}[/]"]
        t.add_row(*(row[:1] + row[2:] if narrow else row))
    say(t)
    kv = [s for s in p.services if s.kv_tokens is not None and s.max_concurrency is not None]
    if kv:
        say()
        say("[bold]vLLM KV cache[/] (per instance, as vLLM logs it at start-up)")
        for s in kv:
            say(f"  {escape(s.name):<16} {s.kv_tokens:,} tokens: {s.max_concurrency:.2f} "
                f"requests of {s.context or 0:,} tokens at once")
    say()
    say(f"[bold]rollout[/] (what deploy would do; downloads at {escape(p.link_speed)})")
    for st in p.steps:
        extra = ""
        if st.bytes:
            extra = f"  {fmt_size(st.bytes)}  ~{fmt_duration(st.seconds)}"
        say(f"  {st.phase:<9} {escape(st.node):<8} {st.action} {escape(st.detail)}{extra}")
    if p.findings:
        say()
    for f in p.findings:
        style = {"error": "bold red", "warning": "yellow", "info": "cyan"}[f.severity]
        say(f"[{style}]{f.severity}:[/] {escape(f.subject)}: {escape(f.message)}")
        if f.hint:
            hint = Text.from_markup(f"[cyan]hint:[/] {escape(f.hint)}")
            out.print(Padding(hint, (0, 0, 0, 2), expand=False), soft_wrap=False)  # wrapped lines stay indented
    say()
    errors = sum(1 for f in p.findings if f.severity == "error")
    warnings = sum(1 for f in p.findings if f.severity == "warning")
    if errors:
        say(f"[bold red]{errors} error(s)[/], {warnings} warning(s)")
    else:
        say(f"[green]plan ok[/], {warnings} warning(s)")


def meta(m: ModelMeta) -> None:
    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(style="dim")
    t.add_column()
    rows = [
        ("name", m.name or "-"), ("architecture", m.architecture), ("format", m.format),
        ("file type", m.file_type or "-"),
        ("files", f"{len(m.files)} ({fmt_size(m.file_bytes)})" if m.files else "-"),
        ("weights", fmt_size(m.weights_bytes)),
        ("layers", str(m.n_layer)), ("embedding", str(m.n_embd)),
        ("heads / kv heads", f"{m.n_head} / {m.n_head_kv}"),
        ("head dim k / v", f"{m.head_dim_k} / {m.head_dim_v}"),
        ("vocab", str(m.n_vocab)), ("training context", str(m.n_ctx_train)),
    ]
    if m.sliding_window:
        n_swa = sum(1 for s in (m.swa_layers or []) if s)
        rows.append(("sliding window", f"{m.sliding_window} tokens on {n_swa} of {m.n_layer} layers"))
    if m.n_expert:
        rows.append(("experts", f"{m.n_expert} ({m.n_expert_used} used, {m.n_expert_shared} shared)"))
    if m.kv_lora_rank:
        rows.append(("MLA", f"kv_lora_rank {m.kv_lora_rank}, cache row {m.head_dim_k}, no V"))
    if m.header_bytes_read:
        rows.append(("bytes read", f"{m.header_bytes_read:,}"))
    for k, v in rows:
        t.add_row(k, escape(v))
    out.print(t)


def estimate(est: LlamaEstimate) -> None:
    t = Table(box=None, pad_edge=False, header_style="dim")
    for col in ("device", "weights MiB", "kv MiB", "compute MiB", "total MiB"):
        t.add_column(col, justify="right" if col != "device" else "left")
    for dev, d in est.devices.items():
        t.add_row(dev, f"{d.weights / MIB:.2f}", f"{d.kv / MIB:.2f}", f"{d.compute / MIB:.2f}",
                  f"{d.total / MIB:.2f}")
    t.add_row("total", "", f"{est.kv_total / MIB:.2f}", "", f"{est.total / MIB:.2f}")
    out.print(f"context {est.n_ctx} cells ({est.n_ctx_seq} per sequence)")
    for c in est.caches:
        if c.recurrent:
            out.print(f"  recurrent state: {c.cells} sequences x {c.layers} layers = {c.total / MIB:.2f} MiB")
            continue
        kind = "SWA" if c.swa else "full"
        out.print(f"  {kind} KV cache: {c.cells} cells x {c.layers} layers = {c.total / MIB:.2f} MiB")
    repack = sum(d.repack for d in est.devices.values())
    if repack:
        out.print(f"  weights include {repack / MIB:.2f} MiB of the CPU backend's repacked copies (--no-mmap: none)")
    out.print(t)


def rendered(result: Rendered, root: object) -> None:
    nodes = sorted({f.node for f in result.files})
    for node in nodes:
        files = result.for_node(node)
        out.print(f"[bold]{escape(node)}[/]  {len(files)} files")
        for f in files:
            restarts = f"  restarts {', '.join(f.restarts)}" if f.restarts else ""
            out.print(f"  {oct(f.mode)[2:]:>4} {escape(f.path)}  [dim]{f.sha256[:12]}{escape(restarts)}[/]")
    for node, secret in result.secrets:
        out.print(f"  [dim]secret[/] {escape(node)}:{escape(secret.path)} from {escape(secret.ref)} (sensitive)")
    out.print(f"wrote {len(result.files)} files under {escape(str(root))}")


def tree_diff(changes: list[Change]) -> None:
    if not changes:
        out.print("no changes")
        return
    for c in changes:
        out.print(f"[bold]{c.kind}[/] {escape(c.node)}:{escape(c.path)}"
                  + (f"  (restarts {', '.join(c.restarts)})" if c.restarts else ""))
        if c.diff:
            out.print(escape(c.diff), end="")
    out.print(f"{len(changes)} file(s) differ")


class DeployReporter:
    """Live output of a deploy: one line per step start/finish, a progress bar per transfer."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.quiet = quiet
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True,
                                 disable=quiet)
        self.tasks: dict[tuple[str, str], object] = {}
        self.started = False

    def phase(self, phase: Phase) -> None:
        if not self.quiet:
            err.print(f"[bold]{phase}[/]")

    def step(self, node: str, step: Step, status: str, detail: str = "") -> None:
        if self.quiet or status != "done":
            return
        target = "(sensitive)" if step.sensitive else step.target
        err.print(f"  {escape(node):<10} {step.kind:<13} {escape(target)}  [dim]{escape(step.reason)}[/]")

    def progress(self, node: str, label: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if not self.started:
            self.bars.start()
            self.started = True
        key = (node, label)
        if key not in self.tasks:
            self.tasks[key] = self.bars.add_task(f"{node} {label.rsplit('/', 1)[-1]}", total=total)
        self.bars.update(self.tasks[key], completed=done)  # type: ignore[arg-type]

    def close(self) -> None:
        if self.started:
            self.bars.stop()


def deploy_recap(result: DeployResult) -> None:
    verb = "would" if result.dry_run else "did"
    for name, r in sorted(result.nodes.items()):
        status = "[green]ok[/]" if r.ok else "[bold red]failed[/]"
        count = len(r.steps) if result.dry_run else len(r.done)
        what = f"{count} step(s) {verb} run" if (count or r.ok) else "refused before any step ran"
        out.print(f"[bold]{escape(name)}[/]  {status}  {what}"
                  + (f", {r.bytes_sent / 1e6:.1f} MB sent" if r.bytes_sent else ""))
        if result.dry_run:
            for st in r.steps:
                target = "(sensitive)" if st.sensitive else st.target
                out.print(f"  {st.phase:<9} {st.kind:<13} {escape(target)}  [dim]{escape(st.reason)}[/]")
                for command in st.commands:
                    out.print(f"      [dim]$ {escape(command)}[/]")
                if r.diffs.get(st.target):
                    out.print(escape(r.diffs[st.target]), end="")
        removing = {st.target for st in r.steps if st.kind == "remove"}
        removed = {st.target for st in r.done if st.kind == "remove"}
        for orphan in r.orphans:
            if orphan in removed:
                note = "removed"
            elif orphan in removing:
                note = "would be removed" if result.dry_run else "not removed"
            else:
                note = "left alone: deploy --prune removes it"
            out.print(f"  [yellow]orphan[/] {escape(name)}/{escape(orphan)}: not in the inventory for this node; "
                      f"{note}")
        if r.failed:
            out.print(f"  [red]{escape(r.failed)}[/]")
            if r.rolled_back:
                out.print(f"  restored: {escape(', '.join(r.rolled_back))}")
            if r.log_tail.strip():
                out.print("  last log lines:")
                for line in r.log_tail.strip().splitlines()[-15:]:
                    out.print(f"    {escape(line)}")
    if result.changes == 0 and result.ok:
        out.print("no changes")
    else:
        failed = sum(1 for r in result.nodes.values() if not r.ok)
        ran = result.changes if result.dry_run else sum(len(r.done) for r in result.nodes.values())
        out.print(f"{len(result.nodes)} node(s), {ran} step(s), {failed} failed, "
                  f"{result.seconds:.1f} s")


def verify_table(result: VerifyResult) -> None:
    t = Table(box=None, pad_edge=False, header_style="dim")
    for col in ("node", "subject", "check", "status", "detail"):
        t.add_column(col)
    style = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    for c in result.checks:
        t.add_row(c.node, c.subject, c.name, f"[{style[c.status]}]{c.status}[/]", escape(c.detail))
    out.print(t)
    failed = sum(1 for c in result.checks if c.status == "fail")
    warned = sum(1 for c in result.checks if c.status == "warn")
    out.print(f"{len(result.checks)} checks, {failed} failed, {warned} warnings")


def _status_renderable(snap: StatusSnapshot, previous: StatusSnapshot | None) -> Table:
    t = Table(box=None, pad_edge=False, header_style="dim")
    for col in ("node", "service", "engine", "state", "health", "memory / plan", "recent errors"):
        t.add_column(col)
    style = {"active": "green", "ok": "green", "loading": "yellow", "failed": "bold red", "down": "bold red",
             "unreachable": "bold red"}
    for s in snap.services:
        mem = fmt_size(s.memory) if s.memory else "-"
        if s.planned:
            mem += f" / {fmt_size(s.planned)}"
        t.add_row(s.node, s.service, s.engine, f"[{style.get(s.state, 'yellow')}]{s.state}[/]",
                  f"[{style.get(s.health, 'dim')}]{s.health}[/]", mem, escape("; ".join(s.errors)[:80]))
    rate = ""
    if snap.requests_total is not None and previous is not None and previous.requests_total is not None:
        seconds = max(snap.taken - previous.taken, 1e-6)
        rate = f"{(snap.requests_total - previous.requests_total) / seconds:.2f} requests/s through the router"
    elif snap.requests_total is not None:
        rate = f"{snap.requests_total:.0f} requests through the router so far"
    t.caption = rate
    return t


def status_table(snap: StatusSnapshot, previous: StatusSnapshot | None) -> None:
    out.print(_status_renderable(snap, previous))


def status_live(take: object, interval: float) -> None:
    import time

    from rich.live import Live

    assert callable(take)
    previous = None
    snap = take()
    with Live(_status_renderable(snap, None), console=out, refresh_per_second=2) as live:
        try:
            while True:
                time.sleep(interval)
                previous, snap = snap, take()
                live.update(_status_renderable(snap, previous))
        except KeyboardInterrupt:
            pass
