"""Read-only probes of a node: one script (scripts/probe.sh) and pure parsers of its output.

Nothing here writes. `gather()` runs the probe a deploy needs over a Transport and returns
`NodeFacts`; the parsers are plain functions so they are tested on captured output.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence

from clusterctl.deploy import shell
from clusterctl.deploy.model import Gpu, NodeFacts
from clusterctl.inventory import NAME_RE, Node
from clusterctl.transport import Transport

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
    """`df -Pk PATH` (POSIX, GNU and BSD alike): bytes available, the 4th column of the last line."""
    lines = [line.split() for line in text.strip().splitlines() if line.strip()]
    try:
        return int(lines[-1][3]) * 1024
    except (IndexError, ValueError):
        return 0


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


def _ss_rows(text: str) -> Iterator[tuple[str, int, str, str]]:
    """(local address, port, process name, pid) of each `ss -ltnpH` row; the probe's `#` lines
    are none. Name and pid are empty where ss cannot see the process."""
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 4 or line.startswith("#"):
            continue
        m = re.match(r"^\[?(.*?)\]?(?:%\S+)?:(\d+)$", cols[3])
        if not m:
            continue
        name = re.search(r'users:\(\("([^"]+)"', line)
        pid = re.search(r"pid=(\d+)", line)
        yield m.group(1), int(m.group(2)), name.group(1) if name else "", pid.group(1) if pid else ""


def parse_listeners(text: str) -> list[tuple[str, int, str]]:
    """`ss -ltnpH`, or `lsof -nP -iTCP -sTCP:LISTEN` after a `#lsof` line (macOS): (local
    address, port, process name) of every listening socket."""
    if text.startswith("#lsof"):
        return parse_lsof(text)
    return [(address, port, name) for address, port, name, _ in _ss_rows(text)]


def parse_listener_units(text: str) -> dict[tuple[str, int], str]:
    """(local address, port) -> systemd unit of the process listening there, from the
    `#unit PID UNIT` lines the probe adds after `ss` (the unit of the process's cgroup; absent
    where there is none)."""
    units = dict(line.split()[1:3] for line in text.splitlines()
                 if line.startswith("#unit ") and len(line.split()) == 3)
    return {(address, port): units[pid] for address, port, _, pid in _ss_rows(text) if pid in units}


def parse_lsof(text: str) -> list[tuple[str, int, str]]:
    """`lsof -nP -iTCP -sTCP:LISTEN` rows: COMMAND PID USER FD TYPE DEVICE SIZE/OFF NODE NAME (LISTEN)."""
    out = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 10 or cols[-1] != "(LISTEN)":
            continue
        m = re.match(r"^\[?(.*?)\]?:(\d+)$", cols[-2])
        if m:
            out.append((m.group(1), int(m.group(2)), cols[0]))
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


def parse_pythons(text: str) -> dict[str, tuple[int, int]]:
    """Output of the interpreters' version probe: `COMMAND MAJOR MINOR` per line (0 0: it would not run)."""
    out: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        words = line.rsplit(None, 2)
        if len(words) == 3 and words[1].isdigit() and words[2].isdigit():
            out[words[0]] = (int(words[1]), int(words[2]))
    return out


def parse_installed(text: str, folder: str, prefix: str, suffix: str) -> dict[str, str]:
    """The services of the `installed` section: one file name per line (PREFIX<service>SUFFIX,
    the files clusterctl writes for its services in `folder`) -> service -> that file's path;
    names that are not clusterctl's (another prefix or suffix, not a valid service name) are
    left out."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        name = line.strip()
        if not (name.startswith(prefix) and name.endswith(suffix)) or len(name) <= len(prefix) + len(suffix):
            continue
        service = name[len(prefix):len(name) - len(suffix)]
        if NAME_RE.match(service) and ".." not in service:
            out[service] = f"{folder}/{name}"
    return dict(sorted(out.items()))


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

SECTIONS = ("uname", "memory", "nvidia", "stat", "sha", "wstat", "manager", "states", "installed", "listeners",
            "manifest", "found", "pythons")
NO_LISTING = ("", "", "")  # (folder, prefix, suffix): list no installed services


def probe_argv(*, marker: str, base: str, manager: str, files: Sequence[str], weights: Sequence[str],
               dirs: Sequence[str], handles: Sequence[str], binaries: Sequence[str],
               commands: Sequence[str], installed: tuple[str, str, str] = NO_LISTING) -> list[str]:
    """The one read-only command that gathers every fact (scripts/probe.sh)."""
    return shell.argv("probe", shell.text("sha256"), marker, base, manager, *installed, *files, "--", *weights,
                      "--", *dirs, "--", *handles, "--", *binaries, "--", *commands)


def gather(t: Transport, *, base: str, files: Iterable[str], handles: Iterable[str], weights: Iterable[str],
           dirs: Iterable[str], manager: str, binaries: Iterable[str] = (),
           commands: Iterable[str] = (), installed: tuple[str, str, str] = NO_LISTING) -> NodeFacts:
    """Every probe in one command (one round trip per node), its output cut into sections
    that the pure parsers above read. `installed`: (folder, prefix, suffix) of the files that
    define clusterctl's services to the node's manager (ServiceManager.installed)."""
    marker = f"@@clusterctl-{secrets.token_hex(6)}@@"
    dirs = sorted(set(dirs))
    units = sorted(set(handles))
    argv = probe_argv(marker=marker, base=base, manager=manager, files=sorted(set(files)),
                      weights=sorted(set(weights)), dirs=dirs, handles=units, binaries=sorted(set(binaries)),
                      commands=sorted(set(commands)), installed=installed)
    r = t.run(argv, timeout=300)
    if not r.ok:  # facts from a probe that did not finish would be read as "absent" and acted on
        from clusterctl.deploy.desired import DeployError

        last = r.err.strip().splitlines()[-1] if r.err.strip() else "no error output"
        raise DeployError(f"{t.host}: gathering facts failed (probe exit {r.rc}): {last}",
                          hint="the node needs bash and coreutils on PATH; run the probe by hand over ssh to "
                               "see more; nothing was changed on the node")
    return parse_probe(t.host, r.out, marker, dirs=dirs, handles=units, installed=installed)


def parse_probe(node: str, text: str, marker: str, *, dirs: Sequence[str], handles: Sequence[str],
                installed: tuple[str, str, str] = NO_LISTING) -> NodeFacts:
    out = parse_sections(text, marker)
    facts = NodeFacts(node=node)
    facts.os, facts.arch = parse_uname(out.get("uname", ""))
    facts.memory_total = parse_meminfo(out.get("memory", ""))
    facts.gpus = parse_nvidia_smi(out.get("nvidia", ""))
    _, facts.modes = parse_stat(out.get("stat", ""))
    facts.hashes = parse_sha256sum(out.get("sha", ""))
    facts.sizes, _ = parse_stat(out.get("wstat", ""))
    for i, d in enumerate(dirs):
        facts.disk_free[d] = parse_df(out.get(f"df{i}", ""))
    manager = out.get("manager", "").strip()
    facts.has_manager = bool(manager)
    facts.has_systemd = manager.endswith("systemctl")
    if facts.has_manager:
        facts.units = parse_is_active(list(handles), out.get("states", ""))
    if installed[0]:
        facts.installed = parse_installed(out.get("installed", ""), *installed)
    facts.listeners = parse_listeners(out.get("listeners", ""))
    facts.port_units = parse_listener_units(out.get("listeners", ""))
    manifest = out.get("manifest", "")
    facts.manifest = parse_manifest(manifest.encode() if manifest.strip() else None)
    facts.executables, facts.commands = parse_found(out.get("found", "") + "\n")
    facts.python_versions = parse_pythons(out.get("pythons", ""))
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
