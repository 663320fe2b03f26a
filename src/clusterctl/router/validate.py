"""Cross-checks of a route table beyond its schema (what `clusterctl router check` reports).

Import-light: pydantic (through config.py) and the standard library only.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import ValidationError

from clusterctl.errors import ClusterctlError, ExitCode
from clusterctl.router.config import RouteTable, load_routes
from clusterctl.router.keys import too_open

AUTO = "auto"
"""The `model` value that asks the router to choose (rules, then the classifier, then the default)."""


class RouteTableError(ClusterctlError):
    """The route table does not load or does not hold together."""

    exit_code = ExitCode.INVALID_INVENTORY


_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")


def _listen_problems(host: str) -> list[str]:
    """listen_host must be an IP address (IPv6 without brackets: the socket takes it bare) or a host name."""
    try:
        ipaddress.ip_address(host)
        return []
    except ValueError:
        pass
    if _HOST_NAME.fullmatch(host) and len(host) <= 253:
        return []
    if host.startswith("[") and host.endswith("]"):
        return [f"listen_host: {host!r}: write an IPv6 address without brackets ({host[1:-1]!r})"]
    return [f"listen_host: {host!r} is neither an IP address nor a host name (no port: that is listen_port)"]


def problems(table: RouteTable, *, check_files: bool = True) -> list[str]:
    """Every inconsistency of `table`, one sentence each; empty when it holds together."""
    out: list[str] = []
    backends = table.backends
    routes = table.routes
    if not backends:
        out.append("no backends are defined")
    out.extend(_listen_problems(table.listen_host))
    for name, backend in sorted(backends.items()):
        try:
            parts = urlsplit(backend.url)
            parts.port  # noqa: B018 (a port that is not a number raises here)
        except ValueError as exc:  # '[::1' or an IPv6 literal without brackets ('http://::1:8080')
            out.append(f"backends.{name}.url: {backend.url!r} is not a URL ({exc}); an IPv6 address goes in "
                       "brackets: http://[::1]:8080")
            continue
        if parts.scheme not in ("http", "https") or not parts.hostname:
            out.append(f"backends.{name}.url: {backend.url!r} is not an http(s) URL with a host")
        if parts.query or parts.fragment:
            out.append(f"backends.{name}.url: {backend.url!r} must not carry a query or fragment")
        if backend.health_path is not None and not backend.health_path.startswith("/"):
            out.append(f"backends.{name}.health_path: {backend.health_path!r} must start with '/'")
        if not backend.model:
            out.append(f"backends.{name}.model: empty")
    for reserved in (AUTO,):
        if reserved in backends:
            out.append(f"backends.{reserved}: {reserved!r} is reserved for automatic selection")
        if reserved in routes:
            out.append(f"routes.{reserved}: {reserved!r} is reserved for automatic selection")
    for name, chain in sorted(routes.items()):
        out.extend(_chain_problems(f"routes.{name}", chain, backends, allow_empty=False))
    out.extend(_chain_problems("default", table.default, backends, allow_empty=True))
    for i, rule in enumerate(table.rules):
        where = f"rules[{i}]"
        if rule.route not in routes:
            out.append(f"{where}.route: {rule.route!r} is not a route (routes: {_names(routes)})")
        if (rule.min_prompt_chars is not None and rule.max_prompt_chars is not None
                and rule.min_prompt_chars > rule.max_prompt_chars):
            out.append(f"{where}: min_prompt_chars {rule.min_prompt_chars} > max_prompt_chars {rule.max_prompt_chars}")
        if any(not word.strip() for word in rule.keywords):
            out.append(f"{where}.keywords: empty keyword")
    if table.classifier is not None:
        cls = table.classifier
        if cls.backend not in backends:
            out.append(f"classifier.backend: {cls.backend!r} is not a backend (backends: {_names(backends)})")
        if not cls.routes:
            out.append("classifier.routes: empty")
        for route in cls.routes:
            if route not in routes:
                out.append(f"classifier.routes: {route!r} is not a route (routes: {_names(routes)})")
        if cls.timeout <= 0:
            out.append(f"classifier.timeout: {cls.timeout} must be > 0")
    if (table.rules or table.classifier is not None) and not table.default:
        out.append("default: empty, but rules/classifier need a default chain for requests nothing matches")
    if check_files:
        out.extend(_file_problems(table))
    return out


def _names(items: Mapping[str, object]) -> str:
    return ", ".join(sorted(items)) or "none"


def _chain_problems(where: str, chain: list[str], backends: Mapping[str, object], *, allow_empty: bool) -> list[str]:
    out: list[str] = []
    if not chain and not allow_empty:
        out.append(f"{where}: empty chain")
    seen: set[str] = set()
    for name in chain:
        if name not in backends:
            out.append(f"{where}: {name!r} is not a backend (backends: {_names(backends)})")
        elif name in seen:
            out.append(f"{where}: {name!r} is listed twice")
        seen.add(name)
    return out


def _file_problems(table: RouteTable) -> list[str]:
    out: list[str] = []
    files = [("api_keys_file", table.api_keys_file)]
    files += [(f"backends.{name}.api_key_file", b.api_key_file) for name, b in sorted(table.backends.items())]
    for where, path in files:
        if path is None:
            continue
        p = Path(path)
        if not p.is_file():
            out.append(f"{where}: {path} does not exist")
        elif not os.access(p, os.R_OK):
            out.append(f"{where}: {path} is not readable")
        elif (problem := too_open(path)) is not None:
            out.append(f"{where}: {path}: {problem}")
    return out


def load_checked(path: Path, *, check_files: bool = True) -> RouteTable:
    """load_routes + problems(); raises RouteTableError with every problem listed."""
    try:
        table = load_routes(path)
    except OSError as exc:
        raise RouteTableError(f"{path}: cannot read the route table: {exc.strerror or exc}") from None
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"{loc}: {err['msg']}")
        raise RouteTableError(f"{path}: invalid route table:\n  " + "\n  ".join(lines),
                              hint="see docs/router.md for the format") from None
    found = problems(table, check_files=check_files)
    if found:
        raise RouteTableError(f"{path}: the route table does not hold together:\n  " + "\n  ".join(found),
                              hint="see docs/router.md for the format")
    return table
