"""Typed errors. Each carries a message and a hint; cli.py maps them to exit codes."""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # unexpected: a bug, shown with a stack
    USAGE = 2  # bad command line (Typer/Click use 2 as well)
    INVALID_INVENTORY = 3  # the inventory or lock file does not validate
    DOES_NOT_FIT = 4  # plan/estimate: something does not fit in memory
    METADATA = 5  # model metadata could not be read or resolved
    NETWORK = 6  # a remote endpoint could not be reached
    LOCKED = 7  # another deploy holds the cluster lock
    DEPLOY_FAILED = 8  # a node's rollout failed (and was rolled back where possible)
    VERIFY_FAILED = 9  # a verify check failed
    DIFFERS = 10  # render --diff: the rendered files differ from the tree in --out (not an error)


# What each code means, in a few words (`clusterctl --help`; docs/commands.md has the table).
MEANINGS = {
    ExitCode.OK: "ok",
    ExitCode.FAILURE: "a bug",
    ExitCode.USAGE: "bad command line",
    ExitCode.INVALID_INVENTORY: "invalid or unreadable inventory, lock or baselines file",
    ExitCode.DOES_NOT_FIT: "does not fit",
    ExitCode.METADATA: "model metadata missing or unreadable",
    ExitCode.NETWORK: "unreachable",
    ExitCode.LOCKED: "another deploy holds the lock",
    ExitCode.DEPLOY_FAILED: "a node's rollout failed",
    ExitCode.VERIFY_FAILED: "a verify check failed",
    ExitCode.DIFFERS: "render --diff found differences",
}
INTERRUPTED = 130  # Ctrl-C


# Several nodes failing in different ways exit with the first code here that occurred. A bug
# first (it wants a report); then a mistake in the command line, the inventory or the lock
# (the user must edit something; running again cannot help, and it likely fails every node);
# then an unreachable node or endpoint (the network: running again may help); then the
# cluster lock; then a node whose rollout itself failed; then verify.
SEVERITY = (ExitCode.FAILURE, ExitCode.USAGE, ExitCode.INVALID_INVENTORY, ExitCode.METADATA,
            ExitCode.DOES_NOT_FIT, ExitCode.NETWORK, ExitCode.LOCKED, ExitCode.DEPLOY_FAILED,
            ExitCode.VERIFY_FAILED, ExitCode.DIFFERS)


def most_severe(codes: Iterable[ExitCode]) -> ExitCode:
    """The most severe of `codes` by SEVERITY; OK when there are none."""
    found = set(codes) - {ExitCode.OK}
    return min(found, key=SEVERITY.index) if found else ExitCode.OK


class ClusterctlError(Exception):
    """Base of every error the user can act on."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict[str, Any]:
        """The error document `--json` prints on stdout: {"error": {code, message, hint, location}}."""
        return {"error": error_fields(self)}


def error_fields(exc: ClusterctlError) -> dict[str, Any]:
    location = getattr(exc, "location", "") or None
    return {"code": int(exc.exit_code), "message": exc.message, "hint": exc.hint, "location": location}


class HintedValueError(ValueError):
    """A ValueError from a field validator that carries a hint for the InventoryError it becomes."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(ClusterctlError):
    """A bad option value on the command line."""

    exit_code = ExitCode.USAGE


class InventoryError(ClusterctlError):
    """The inventory file does not parse or validate; location is file:line:col."""

    exit_code = ExitCode.INVALID_INVENTORY

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        file: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        super().__init__(message, hint)
        self.file = file
        self.line = line
        self.column = column

    @property
    def location(self) -> str:
        parts = [p for p in (self.file, self.line, self.column) if p is not None]
        return ":".join(str(p) for p in parts)

    def __str__(self) -> str:
        loc = self.location
        return f"{loc}: {self.message}" if loc else self.message


class InventoryErrors(InventoryError):
    """Several validation errors at once (all are reported, not just the first)."""

    def __init__(self, errors: list[InventoryError]) -> None:
        first = errors[0]
        super().__init__(first.message, first.hint, file=first.file, line=first.line,
                         column=first.column)
        self.errors = errors

    def to_json(self) -> dict[str, Any]:
        """The first error as for one, and every error under "errors" (the first included)."""
        doc = super().to_json()
        if len(self.errors) > 1:
            doc["error"]["errors"] = [error_fields(e) for e in self.errors]
        return doc


class MetadataError(ClusterctlError):
    """Model metadata is missing, unreadable or not understood."""

    exit_code = ExitCode.METADATA


class NetworkError(ClusterctlError):
    exit_code = ExitCode.NETWORK


class DoesNotFitError(ClusterctlError):
    exit_code = ExitCode.DOES_NOT_FIT


class LockedError(ClusterctlError):
    exit_code = ExitCode.LOCKED
