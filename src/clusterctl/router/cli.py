"""`clusterctl router ...`: kept import-light; the server is imported when a command runs."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import typer

router_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                         rich_markup_mode=None)


def _fail(exc: Exception | str, code: int, hint: str | None = None) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    if hint:
        typer.echo(f"  hint: {hint}", err=True)
    return typer.Exit(code)


def _print_json(doc: dict[str, object]) -> None:
    typer.echo(json.dumps(doc, indent=2))


@router_app.command("check")
def check(
    routes: str = typer.Option(..., "--routes", help="the rendered route table (JSON)"),
    files: bool = typer.Option(True, "--files/--no-files", help="also check that the key files exist"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output on stdout"),
) -> None:
    """Validate a route table without serving it (exit 3 when it does not hold together)."""
    from clusterctl.router.validate import RouteTableError, load_checked

    try:
        table = load_checked(Path(routes), check_files=files)
    except RouteTableError as exc:
        if as_json:
            _print_json(exc.to_json())
        raise _fail(exc, int(exc.exit_code), exc.hint) from None
    if as_json:
        _print_json({"ok": True, "routes_file": routes, "backends": len(table.backends), "routes": len(table.routes),
                     "rules": len(table.rules), "classifier": table.classifier is not None})
        return
    typer.echo(f"{routes}: ok ({len(table.backends)} backends, {len(table.routes)} routes, "
               f"{len(table.rules)} rules{', classifier' if table.classifier else ''})")


@router_app.command("serve")
def serve(
    routes: str = typer.Option(..., "--routes", help="the rendered route table (JSON)"),
    host: str | None = typer.Option(None, "--host", help="listen address (default: the table's listen_host)"),
    port: int | None = typer.Option(None, "--port", min=0, max=65535,
                                    help="listen port (default: the table's listen_port)"),
) -> None:
    """Serve the OpenAI-compatible router until SIGINT/SIGTERM; SIGHUP re-reads the key files."""
    from clusterctl.errors import ExitCode
    from clusterctl.router.validate import RouteTableError, load_checked

    try:
        table = load_checked(Path(routes), check_files=True)
    except RouteTableError as exc:
        raise _fail(exc, int(exc.exit_code), exc.hint) from None

    from clusterctl.router.keys import KeyFileError
    from clusterctl.router.server import serve as run_server

    try:
        run_server(table, host, port)
    except KeyFileError as exc:
        raise _fail(exc, int(ExitCode.INVALID_INVENTORY)) from None
    except OSError as exc:
        where = _listen_address(host or table.listen_host, table.listen_port if port is None else port)
        reason = exc.strerror or str(exc)
        hint = BIND_HINTS.get(exc.errno or 0, "check --host and --port (or the table's listen_host/listen_port)")
        raise _fail(f"cannot listen on {where}: {reason}", int(ExitCode.NETWORK), hint) from None


BIND_HINTS = {
    errno.EADDRINUSE: "another process listens on that port: stop it, or choose another with --port",
    errno.EADDRNOTAVAIL: "that address is not on this machine: use one of its addresses, or 0.0.0.0 / ::",
    errno.EACCES: "ports below 1024 need privileges: choose a higher --port",
}


def _listen_address(host: str, port: int) -> str:
    # as clusterctl.layout.host_port, which the router's wheel (router/, errors.py) does not carry
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
