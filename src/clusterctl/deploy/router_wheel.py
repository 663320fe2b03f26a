"""A wheel of the controller's own router, for the router node: the running clusterctl's
`clusterctl.router` package (with the package root and `clusterctl.errors`, all it imports),
its third-party dependencies as the controller's metadata pins them, and a `clusterctl-router`
console script. It is built from the code that runs, editable install or not, byte for byte the
same for the same code (sorted entries, fixed timestamps), so its sha256 says whether the
router node runs this controller's router; the version carries a hash of the code, so a changed
router is a new version even before the release number moves."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import clusterctl

DIST = "clusterctl-router"
SCRIPT = "clusterctl-router"
# what clusterctl.router imports from outside the standard library (uvloop: optional, faster)
DEPENDENCIES = ("aiohttp", "orjson", "prometheus-client", "pydantic", "typer", "uvloop")
EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class RouterWheel:
    path: Path  # on the controller
    version: str
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return self.path.name


def _sources() -> list[tuple[str, bytes]]:
    """(name in the wheel, content) of every module the router runs, sorted."""
    root = Path(clusterctl.__file__).parent
    files = [root / "__init__.py", root / "errors.py", *sorted((root / "router").rglob("*.py"))]
    return sorted((f"clusterctl/{p.relative_to(root).as_posix()}", p.read_bytes()) for p in files)


def _requires() -> list[str]:
    """The controller's own pins for the router's dependencies (its installed metadata)."""
    try:
        declared = importlib.metadata.requires("clusterctl") or []
    except importlib.metadata.PackageNotFoundError:
        declared = []
    out = []
    for req in declared:
        name = re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")
        if name in DEPENDENCIES and "extra ==" not in req:
            out.append(req)
    found = {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in out}
    out += [d for d in DEPENDENCIES if d not in found and d != "uvloop"]
    return sorted(out)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build(folder: Path) -> RouterWheel:
    """The router's wheel in `folder` (built once per code: an existing one is reused)."""
    sources = _sources()
    code = hashlib.sha256()
    for name, data in sources:
        code.update(name.encode() + b"\0" + data + b"\0")
    version = f"{clusterctl.__version__}+g{code.hexdigest()[:12]}"
    info = f"clusterctl_router-{version}.dist-info"
    requires = "".join(f"Requires-Dist: {r}\n" for r in _requires())
    meta = [
        (f"{info}/METADATA", (f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {version}\n"
                              f"Summary: the clusterctl router, as the controller runs it\n"
                              f"Requires-Python: >=3.11\n{requires}").encode()),
        (f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: clusterctl\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
        (f"{info}/entry_points.txt", f"[console_scripts]\n{SCRIPT} = clusterctl.router.cli:router_app\n".encode()),
    ]
    entries = sources + meta
    record = "\n".join([*(_record_line(n, d) for n, d in entries), f"{info}/RECORD,,"]) + "\n"
    entries.append((f"{info}/RECORD", record.encode()))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"clusterctl_router-{version}-py3-none-any.whl"
    if not path.is_file():
        tmp = folder / f".{path.name}.{os.getpid()}"
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries:
                zi = zipfile.ZipInfo(name, EPOCH)
                zi.external_attr = 0o644 << 16
                zi.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(zi, data)
        os.replace(tmp, path)
    data = path.read_bytes()
    return RouterWheel(path, version, hashlib.sha256(data).hexdigest(), len(data))


def cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "clusterctl" / "router-wheels"


def pinned() -> list[str]:
    """The router's dependencies at the versions this controller runs (for a wheelhouse that
    air-gapped router nodes install from: `pip download` of these)."""
    out = []
    for name in DEPENDENCIES:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
