"""The route table: what `clusterctl render` writes for the router and `router serve` reads.

JSON, deterministic (sorted keys). Secrets are never in it: API keys are files (0600) named
by path."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ROUTES_VERSION: Literal[1] = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Backend(_Strict):
    url: str = Field(description="base URL of an OpenAI-compatible server, e.g. http://10.0.0.11:8080")
    model: str = Field(description="model name to send upstream (the engine's alias / served name)")
    api_key_file: str | None = Field(None, description="file holding the key the router sends upstream")
    max_concurrency: int = Field(64, ge=1, description="requests in flight to this backend at most")
    health_path: str | None = Field(
        "/health", description="GET it for the active health check; null: a TCP connect is the check")
    timeout: float = Field(600.0, gt=0, description="seconds for a whole upstream request")
    connect_timeout: float = Field(5.0, gt=0)
    startup: float = Field(
        600.0, ge=0, description="seconds after the router starts in which a backend not yet healthy is "
        "'starting': tried, but its failures neither eject it nor count")


class Health(_Strict):
    interval: float = Field(5.0, gt=0)
    timeout: float = Field(5.0, gt=0)
    failures: int = Field(3, ge=1, description="consecutive failures (active or passive) before ejection")
    cooldown: float = Field(30.0, ge=0, description="seconds an ejected backend stays out before re-checks")
    recoveries: int = Field(2, ge=1, description="consecutive passing checks before it comes back")


QUEUE_SIZE = 64
QUEUE_TIMEOUT = 300.0


class Queue(_Strict):
    size: int = Field(QUEUE_SIZE, ge=0, description="requests that may wait for a backend slot (every backend "
                      "of their chain busy or down), all routes together; 0: none wait")
    timeout: float = Field(QUEUE_TIMEOUT, ge=0, description="seconds one request may wait for a slot")


class Rule(_Strict):
    """`model: auto` selection: the first rule that matches picks the route."""

    route: str
    keywords: list[str] = Field(default_factory=list, description="any of these words in the last user message")
    min_prompt_chars: int | None = None
    max_prompt_chars: int | None = None


class Classifier(_Strict):
    """Ask a light model which route to take (seed 004): it answers with one route name."""

    backend: str
    routes: list[str]
    timeout: float = 5.0


class RouteTable(_Strict):
    version: Literal[1] = ROUTES_VERSION
    cluster: str
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(8000, ge=1, le=65535)
    api_keys_file: str | None = Field(None, description="client keys, one per line; None = no auth")
    max_request_bytes: int = Field(8 * 2**20, ge=1024)
    backends: dict[str, Backend]
    routes: dict[str, list[str]] = Field(description="task type -> ordered backend chain")
    default: list[str] = Field(default_factory=list)
    health: Health = Health()
    queue: Queue = Queue()
    rules: list[Rule] = Field(default_factory=list)
    classifier: Classifier | None = None
    access_log: bool = True
    log_prompts: bool = False


def load_routes(path: Path) -> RouteTable:
    return RouteTable.model_validate_json(path.read_text(encoding="utf-8"))
