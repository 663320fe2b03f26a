"""Measure each model: time to first token, prompt and generation tokens/s, at several
concurrency levels and prompt lengths; router overhead; stored as baselines for `verify`.

Requests are made on the service's node (services bind loopback or a private address) by a
fixed script that starts N curl processes at once; the engine's own timings (llama-server's
`timings`) give prompt and generation speed, wall time gives throughput.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clusterctl.baselines import read_baselines
from clusterctl.engines import LaunchSpec, launch_specs
from clusterctl.errors import NetworkError
from clusterctl.inventory import Inventory
from clusterctl.layout import http_url, local_host
from clusterctl.secretref import read_secret
from clusterctl.transport import Transport, TransportError

# Starts "$1" curl requests at once with the body in "$2" against "$3"; headers on stdin.
# Prints one line per request: the elapsed seconds, a tab, the response body.
LOAD_SCRIPT = r"""
set -u
n="$1"; body="$2"; url="$3"; headers=$(cat); dir=$(mktemp -d)
for i in $(seq 1 "$n"); do
  ( printf '%s\n' "$headers" | curl -sS --max-time 600 -H @- -H 'Content-Type: application/json' \
      --data-binary @"$body" -o "$dir/$i.json" -w '%{time_total}\t%{time_starttransfer}\n' "$url" \
      > "$dir/$i.t" ) &
done
wait
for i in $(seq 1 "$n"); do
  printf '%s\t' "$(cat "$dir/$i.t" | tr -d '\n')"; tr -d '\n' < "$dir/$i.json"; echo
done
rm -rf "$dir"
"""

WORDS = ("the", "river", "carried", "small", "stones", "past", "the", "old", "mill", "while", "a", "heron",
         "waited", "on", "the", "far", "bank", "and", "clouds", "moved", "slowly", "over", "the", "hills")


def prompt_of(tokens: int) -> str:
    """About `tokens` tokens of plain English (one word is roughly 1.3 tokens)."""
    count = max(4, int(tokens / 1.3))
    return " ".join(WORDS[i % len(WORDS)] for i in range(count)) + ". Continue the story."


@dataclass
class Sample:
    wall: float
    ttft: float
    prompt_tps: float
    gen_tps: float
    completion_tokens: int


@dataclass
class Point:
    service: str
    concurrency: int
    prompt_tokens: int
    requests: int
    ttft_p50: float
    prompt_tps: float
    gen_tps: float  # per request, mean
    throughput: float  # completion tokens / wall time of the whole batch
    errors: int


@dataclass
class BenchResult:
    points: list[Point] = field(default_factory=list)
    router: dict[str, dict[str, float]] = field(default_factory=dict)  # service -> direct/through ms
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)  # service -> engine version, model, node

    def to_json(self) -> dict[str, Any]:
        return {"points": [asdict(p) for p in self.points], "router": self.router, "facts": self.facts}

    def baseline(self, service: str) -> dict[str, float]:
        single = [p for p in self.points if p.service == service and p.concurrency == 1]
        if not single:
            return {}
        shortest = min(single, key=lambda p: p.prompt_tokens)
        if shortest.gen_tps <= 0:  # nothing generated: no speed to compare with
            return {}
        return {"tokens_per_second": round(shortest.gen_tps, 2), "ttft_seconds": round(shortest.ttft_p50, 4)}


def _key(inv: Inventory, service: str) -> str | None:
    return read_secret(inv.services[service].api_key) if service in inv.services else None


@dataclass
class Load:
    """One batch of `n` concurrent requests: the answers, how many failed and why, its wall time."""

    samples: list[Sample]
    errors: int
    wall: float
    reason: str = ""  # the first error curl printed, if any


def _load(t: Transport, url: str, body: dict[str, Any], n: int, key: str | None) -> Load:
    # the request body in a folder of its own (mktemp -d: unpredictable name, mode 0700), never
    # at a name in /tmp that another user of the node could guess and take first
    made = t.run(["mktemp", "-d", "-t", "clusterctl-bench.XXXXXXXX"], timeout=30)
    folder = made.out.strip()
    if not made.ok or not folder.startswith("/"):
        raise TransportError(f"{t.host}: cannot create a temporary folder: {made.err.strip() or made.rc}",
                             "check that the node's temporary directory ($TMPDIR or /tmp) is writable", host=t.host)
    path = f"{folder}/body.json"
    try:
        t.put(path, json.dumps(body).encode(), mode=0o600)
        headers = f"Authorization: Bearer {key}\n" if key else "X-Clusterctl-Bench: 1\n"
        start = time.monotonic()
        r = t.run(["bash", "-c", LOAD_SCRIPT, "load", str(n), path, url], input=headers.encode(), timeout=1800)
        wall = time.monotonic() - start
    finally:
        t.run(["rm", "-rf", "--", folder], timeout=30)
    samples, errors = [], 0
    for line in r.out.splitlines():
        total, _, rest = line.partition("\t")
        starttransfer, _, payload = rest.partition("\t")
        try:
            data = json.loads(payload)
            timings = data.get("timings") or {}
            usage = data.get("usage") or {}
            elapsed = float(total)
            completion = int(usage.get("completion_tokens") or 0)
            samples.append(Sample(
                wall=elapsed,
                ttft=float(timings.get("prompt_ms") or 0) / 1000 or float(starttransfer or 0),
                prompt_tps=float(timings.get("prompt_per_second") or 0),
                gen_tps=float(timings.get("predicted_per_second") or (completion / elapsed if elapsed else 0)),
                completion_tokens=completion))
        except (ValueError, json.JSONDecodeError, AttributeError):
            errors += 1
    errors += max(0, n - len(samples) - errors)  # a request that printed no line at all
    reason = next((line.strip() for line in r.err.splitlines() if line.startswith("curl:")), r.err.strip()[:200])
    return Load(samples, errors, wall, reason)


def _point(service: str, c: int, tokens: int, samples: list[Sample], errors: int, wall: float) -> Point:
    if not samples:
        return Point(service, c, tokens, c, 0.0, 0.0, 0.0, 0.0, errors)
    return Point(service, c, tokens, len(samples) + errors,
                 ttft_p50=statistics.median(s.ttft for s in samples),
                 prompt_tps=statistics.mean(s.prompt_tps for s in samples),
                 gen_tps=statistics.mean(s.gen_tps for s in samples),
                 throughput=sum(s.completion_tokens for s in samples) / wall if wall else 0.0,
                 errors=errors)


def bench(inv: Inventory, connect: Callable[[str], Transport], *, services: Sequence[str] | None = None,
          concurrency: Sequence[int] = (1, 4), prompt_tokens: Sequence[int] = (16, 512), max_tokens: int = 64,
          rounds: int = 1) -> BenchResult:
    # the engines whose OpenAI API clusterctl knows (their adapters say so)
    specs = [s for s in launch_specs(inv) if s.chat and s.identity and (not services or s.service in services)]
    result = BenchResult()
    for spec in specs:
        t = connect(spec.node)
        try:
            target = http_url(local_host(spec.bind), spec.port, "/v1/chat/completions")
            key = _key(inv, spec.service)
            for tokens in prompt_tokens:
                body = {"model": spec.model_id, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                        "messages": [{"role": "user", "content": prompt_of(tokens)}], "cache_prompt": False}
                for c in concurrency:
                    samples: list[Sample] = []
                    errors, wall = 0, 0.0
                    for _ in range(rounds):
                        load = _load(t, target, body, c, key)
                        if not load.samples:
                            raise _unanswered(inv, spec.service, target, load, c)
                        samples += load.samples
                        errors += load.errors
                        wall += load.wall
                    result.points.append(_point(spec.service, c, tokens, samples, errors, wall))
            version = t.run([spec.argv[0], "--version"], timeout=30)
            manifest = t.get("/opt/clusterctl/state/manifest.json") or b"{}"
            result.facts[spec.service] = {
                "node": spec.node, "engine": spec.engine,
                "engine_version": (version.out + version.err).strip().splitlines()[-1:] or [""],
                "model_files": json.loads(manifest) if spec.engine != "rpc-server" else {},
                "uname": t.run(["uname", "-srm"], timeout=30).out.strip(),
                "cpus": t.run(["nproc"], timeout=30).out.strip(),
            }
            if inv.router is not None and spec.node == inv.router.node:
                result.router[spec.service] = _router_overhead(inv, t, spec, target, key)
        finally:
            t.close()
    return result


def _unanswered(inv: Inventory, service: str, url: str, load: Load, n: int) -> NetworkError:
    """No request of a batch was answered: the service is down or unreachable, and a run of
    zeros must not become the baseline verify compares with."""
    why = f": {load.reason}" if load.reason else ""
    return NetworkError(f"{service}: no answer from {url} ({load.errors} of {n} requests failed{why})",
                        f"is {service} running? `clusterctl status -i {inv.path}` shows it; nothing was stored "
                        "as a baseline")


def _router_overhead(inv: Inventory, t: Transport, spec: LaunchSpec, direct_url: str, key: str | None
                     ) -> dict[str, float]:
    r = inv.router
    assert r is not None
    via = http_url(local_host(r.bind), r.port, "/v1/chat/completions")
    body = {"model": spec.service, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}]}
    direct: list[float] = []
    through: list[float] = []
    for _ in range(5):
        for url, sink, k in ((direct_url, direct, key), (via, through, read_secret(r.api_key))):
            load = _load(t, url, body, 1, k)
            if load.samples:
                sink.append(load.samples[0].wall * 1000)
    if not direct or not through:
        return {}
    return {"direct_ms": round(statistics.median(direct), 2), "router_ms": round(statistics.median(through), 2),
            "added_ms": round(statistics.median(through) - statistics.median(direct), 2)}


def what_changed(path: Path, result: BenchResult) -> list[str]:
    """Differences between this run and the stored baselines: engine version, model files,
    node facts, and speed (so a slower run says why it might be slower)."""
    old = read_baselines(path)
    lines = []
    for service, facts in sorted(result.facts.items()):
        before = old.get(service)
        if not before:
            continue
        prev = before.get("facts", {})
        for key in ("engine_version", "uname", "cpus", "node"):
            if prev.get(key) != facts.get(key):
                lines.append(f"{service}: {key} {prev.get(key)!r} -> {facts.get(key)!r}")
        old_models = {p: v.get("sha256") for p, v in (prev.get("model_files") or {}).items() if isinstance(v, dict)}
        new_models = {p: v.get("sha256") for p, v in (facts.get("model_files") or {}).items() if isinstance(v, dict)}
        for p in sorted(set(old_models) | set(new_models)):
            if old_models.get(p) != new_models.get(p):
                lines.append(f"{service}: model file {p} changed")
        now = result.baseline(service).get("tokens_per_second")
        was = before.get("tokens_per_second")
        if now and was:
            lines.append(f"{service}: {was:.1f} -> {now:.1f} tokens/s ({now / was - 1:+.0%})")
    return lines


def store_baselines(path: Path, result: BenchResult) -> None:
    services: dict[str, Any] = dict(read_baselines(path))
    data = {"services": services}
    for service, facts in result.facts.items():
        entry = result.baseline(service)
        if entry:
            services[service] = entry | {"facts": facts, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def markdown(result: BenchResult) -> str:
    lines = ["# clusterctl bench", "",
             "| service | concurrency | prompt tokens | TTFT p50 (s) | prompt tok/s | gen tok/s (per request) "
             "| throughput tok/s | errors |", "|---|---|---|---|---|---|---|---|"]
    for p in result.points:
        lines.append(f"| {p.service} | {p.concurrency} | {p.prompt_tokens} | {p.ttft_p50:.3f} | "
                     f"{p.prompt_tps:.1f} | {p.gen_tps:.1f} | {p.throughput:.1f} | {p.errors} |")
    if result.router:
        lines += ["", "| service | direct (ms) | through the router (ms) | added (ms) |", "|---|---|---|---|"]
        for service, r in result.router.items():
            lines.append(f"| {service} | {r.get('direct_ms')} | {r.get('router_ms')} | {r.get('added_ms')} |")
    best: dict[int, Point] = {}
    for p in result.points:
        if p.concurrency == 1 and (p.prompt_tokens not in best or p.gen_tps > best[p.prompt_tokens].gen_tps):
            best[p.prompt_tokens] = p
    if best:
        lines += ["", "Fastest generation per prompt length: "
                  + ", ".join(f"{k} tokens: {v.service}" for k, v in sorted(best.items()))]
    return "\n".join(lines) + "\n"


def chart(result: BenchResult, path: Path) -> bool:
    """A PNG of generation throughput by concurrency, one line per service and prompt length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    keys = sorted({(p.service, p.prompt_tokens) for p in result.points})
    for service, tokens in keys:
        pts = sorted((p.concurrency, p.throughput) for p in result.points
                     if p.service == service and p.prompt_tokens == tokens)
        ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", label=f"{service}, {tokens}-token prompt")
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tokens/s (all requests)")
    ax.set_title("clusterctl bench: throughput")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True

