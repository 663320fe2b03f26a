"""Read-only probes of a node: each is a command (argv) and a pure parser of its output.

Nothing here writes. `gather()` runs the probes a deploy needs over a Transport and returns
`NodeFacts`; the parsers are plain functions so they are tested on captured output.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from clusterctl.inventory import Node
from clusterctl.transport import Transport

MANIFEST = "state/manifest.json"  # under the node's base dir: verified weights and engines


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int  # bytes


@dataclass
class NodeFacts:
    node: str
    os: str = ""
    arch: str = ""
    gpus: list[Gpu] = field(default_factory=list)
    memory_total: int = 0
    disk_free: dict[str, int] = field(default_factory=dict)  # path -> bytes available
    hashes: dict[str, str] = field(default_factory=dict)  # path -> sha256 of managed files present
    modes: dict[str, int] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)  # unit -> active/inactive/failed/...
    listeners: list[tuple[str, int, str]] = field(default_factory=list)  # (address, port, process)
    manifest: dict[str, dict[str, object]] = field(default_factory=dict)  # path -> {sha256, size}
    sizes: dict[str, int] = field(default_factory=dict)  # path -> size (weights, .part files)
    has_systemd: bool = False
    executables: set[str] = field(default_factory=set)  # of the binaries asked about, those present
    commands: set[str] = field(default_factory=set)  # of the commands asked about, those on PATH


# -- parsers (pure) ------------------------------------------------------------------------

def parse_uname(text: str) -> tuple[str, str]:
    parts = text.split()
    return (parts[0].lower() if parts else "", parts[1] if len(parts) > 1 else "")


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits` (MiB)."""
    gpus = []
    for line in text.strip().splitlines():
        if "," not in line:
            continue
        name, mem = line.rsplit(",", 1)
        try:
            gpus.append(Gpu(name.strip(), int(float(mem.strip())) * 2**20))
        except ValueError:
            continue
    return gpus


def parse_rocm_smi(text: str) -> list[Gpu]:
    """`rocm-smi --showmeminfo vram --json`: {"card0": {"VRAM Total Memory (B)": "..."}}."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return []
    gpus = []
    for card, info in sorted(data.items()):
        if not isinstance(info, dict):
            continue
        total = next((v for k, v in info.items() if "Total Memory" in k and "VRAM" in k), None)
        if total is not None:
            gpus.append(Gpu(card, int(total)))
    return gpus


def parse_meminfo(text: str) -> int:
    m = re.search(r"^MemTotal:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) * 1024 if m else 0


def parse_df(text: str) -> int:
    """`df -B1 --output=avail PATH`: header then the number."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    try:
        return int(lines[-1])
    except (IndexError, ValueError):
        return 0


# sha256 of files on a node, `HASH *PATH` per line: OpenSSL where the node has it (it uses the
# CPU's SHA extensions: 3.3x coreutils' sha256sum on the test machine), else sha256sum
SHA256_SCRIPT = ('if command -v openssl >/dev/null 2>&1; then for f; do openssl dgst -sha256 -r "$f" || exit 1; '
                 'done; else sha256sum -b -- "$@"; fi')


def parse_sha256sum(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([0-9a-f]{64})\s+\*?(.+)$", line)
        if m:
            out[m.group(2)] = m.group(1)
    return out


def parse_stat(text: str) -> tuple[dict[str, int], dict[str, int]]:
    """`stat -c '%s %a %n' FILES`: sizes and modes of the files that exist."""
    sizes, modes = {}, {}
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0].isdigit():
            sizes[parts[2]] = int(parts[0])
            modes[parts[2]] = int(parts[1], 8)
    return sizes, modes


def parse_is_active(units: Sequence[str], text: str) -> dict[str, str]:
    states = text.split()
    return {u: (states[i] if i < len(states) else "unknown") for i, u in enumerate(units)}


def parse_listeners(text: str) -> list[tuple[str, int, str]]:
    """`ss -ltnpH`: (local address, port, process name) of every listening socket."""
    out = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 4:
            continue
        m = re.match(r"^\[?(.*?)\]?(?:%\S+)?:(\d+)$", cols[3])
        if not m:
            continue
        proc = re.search(r'users:\(\("([^"]+)"', line)
        out.append((m.group(1), int(m.group(2)), proc.group(1) if proc else ""))
    return out


def port_conflict(listeners: list[tuple[str, int, str]], bind: str, port: int) -> tuple[str, str] | None:
    """The (address, process) already listening where `bind:port` would: same port, and the same
    address or a wildcard on either side."""
    wildcard = ("0.0.0.0", "::", "*")
    for address, p, proc in listeners:
        if p == port and (address == bind or address in wildcard or bind in wildcard):
            return address, proc
    return None


def parse_ss(text: str) -> dict[int, str]:
    """`ss -ltnpH`: port -> first process name (empty when ss cannot see it)."""
    out: dict[int, str] = {}
    for _, port, proc in parse_listeners(text):
        out.setdefault(port, proc)
    return out


def parse_found(text: str) -> tuple[set[str], set[str]]:
    """Output of the executables/commands probe: paths before the "--" line, commands after."""
    before, _, after = text.partition("\n--\n") if not text.startswith("--\n") else ("", "", text[3:])
    return set(before.split()), set(after.split())


def parse_manifest(data: bytes | None) -> dict[str, dict[str, object]]:
    if not data:
        return {}
    try:
        value = json.loads(data)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def gpu_drift(node: Node, gpus: list[Gpu]) -> str | None:
    """What breaks the plan: fewer NVIDIA GPUs, or less memory on one, than the inventory says."""
    declared = [a.memory for a in node.accelerators if a.kind == "cuda" for _ in range(a.count)]
    if not declared:
        return None
    if len(gpus) >= len(declared) and all(g.memory >= want * 0.95 for g, want in zip(gpus, declared, strict=False)):
        return None
    want = ", ".join(f"{m / 2**30:.0f} GiB" for m in declared)
    have = ", ".join(f"{g.memory / 2**30:.0f} GiB" for g in gpus) or "no GPU"
    return f"the inventory says {len(declared)} GPU(s) of {want}; the node reports {have}"


# -- gathering (I/O through the transport) --------------------------------------------------

def gather(t: Transport, *, base: str, files: Iterable[str], units: Iterable[str], weights: Iterable[str],
           dirs: Iterable[str], systemd: bool, binaries: Iterable[str] = (),
           commands: Iterable[str] = ()) -> NodeFacts:
    """Every probe in one command (one round trip per node), its output cut into sections
    that the pure parsers above read."""
    files = sorted(set(files))
    weights = sorted(set(weights))
    units = sorted(set(units))
    binaries = sorted(set(binaries))
    commands = sorted(set(commands))
    unit_files = [u for u in units if u.endswith(".service")]
    controls = [u for u in units if u.endswith("-ctl.sh")]
    marker = f"@@clusterctl-{secrets.token_hex(6)}@@"

    def words(items: Iterable[str]) -> str:
        return " ".join(shlex.quote(i) for i in items)

    def section(name: str, body: str) -> str:
        return f"echo {marker}{name}\n{body}\n"

    script = section("uname", "uname -sm")
    script += section("linux", 'if [ "$(uname -s)" = Linux ]; then cat /proc/meminfo; echo ' + marker + "nvidia; "
                      "command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total "
                      "--format=csv,noheader,nounits; fi")
    if files:
        script += section("stat", f"stat -c '%s %a %n' -- {words(files)} 2>/dev/null")
        script += section("sha", f'set --; for f in {words(files)}; do [ -f "$f" ] && set -- "$@" "$f"; done; '
                          f'[ $# = 0 ] || sh -c {shlex.quote(SHA256_SCRIPT)} sh "$@"')
    if weights:
        script += section("wstat", f"stat -c '%s %a %n' -- {words([*weights, *(w + '.part' for w in weights)])}"
                          " 2>/dev/null")
    for i, d in enumerate(sorted(set(dirs))):
        script += section(f"df{i}", f'd={shlex.quote(d)}; while [ ! -d "$d" ]; do d=$(dirname "$d"); done; '
                          'df -B1 --output=avail "$d"')
    if systemd:
        script += section("systemctl", "command -v systemctl")
        if unit_files:
            script += section("active", f"command -v systemctl >/dev/null && systemctl is-active -- "
                              f"{words(unit_files)}")
    if controls:
        # direct manager: each control script's `status` exits 0 when its process runs
        script += section("controls", f'for c in {words(controls)}; do if [ -x "$c" ] && "$c" status >/dev/null '
                          "2>&1; then echo active; else echo inactive; fi; done")
    script += section("ss", "command -v ss >/dev/null && ss -ltnpH")
    script += section("manifest", f"cat -- {shlex.quote(f'{base}/{MANIFEST}')} 2>/dev/null")
    if binaries or commands:
        script += section("found", f'for f in {words([*binaries, "--", *commands])}; do if [ "$f" = "--" ]; then '
                          'echo "--"; elif [ -x "$f" ] || command -v "$f" >/dev/null 2>&1; then echo "$f"; fi; done')
    script += "true\n"
    out = parse_sections(t.run(["sh", "-c", script], timeout=300).out, marker)

    facts = NodeFacts(node=t.host)
    facts.os, facts.arch = parse_uname(out.get("uname", ""))
    if facts.os == "linux":
        facts.memory_total = parse_meminfo(out.get("linux", ""))
        facts.gpus = parse_nvidia_smi(out.get("nvidia", ""))
    if files:
        _, facts.modes = parse_stat(out.get("stat", ""))
        facts.hashes = parse_sha256sum(out.get("sha", ""))
    if weights:
        facts.sizes, _ = parse_stat(out.get("wstat", ""))
    for i, d in enumerate(sorted(set(dirs))):
        facts.disk_free[d] = parse_df(out.get(f"df{i}", ""))
    facts.has_systemd = systemd and bool(out.get("systemctl", "").strip())
    if unit_files and facts.has_systemd:
        facts.units = parse_is_active(unit_files, out.get("active", ""))
    if controls:
        facts.units.update(parse_is_active(controls, out.get("controls", "")))
    facts.listeners = parse_listeners(out.get("ss", ""))
    manifest = out.get("manifest", "")
    facts.manifest = parse_manifest(manifest.encode() if manifest.strip() else None)
    if binaries or commands:
        facts.executables, facts.commands = parse_found(out.get("found", "") + "\n")
    return facts


def parse_sections(text: str, marker: str) -> dict[str, str]:
    """Output of the one-command probe: the text after each `MARKERname` line, by name."""
    out: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith(marker):
            if name is not None:
                out[name] = "\n".join(lines)
            name, lines = line[len(marker):], []
        elif name is not None:
            lines.append(line)
    if name is not None:
        out[name] = "\n".join(lines)
    return out
